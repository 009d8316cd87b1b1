"""Typed errors raised by the library.

Only :mod:`clip_es.cli` turns these into exit codes and one-line messages.
Every error message says what went wrong, where, and how to fix it.
"""

from __future__ import annotations


def first_line(e: BaseException | str, limit: int = 200) -> str:
    """The first line of ``str(e)``, at most ``limit`` characters ("" for an empty message)."""
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else ""


class ClipEsError(Exception):
    """Base class of every error the library raises on purpose."""

    exit_code: int = 2


class ConfigError(ClipEsError):
    """An option or configuration value is invalid."""


class RegistryError(ConfigError):
    """A name was looked up in a registry that does not hold it."""


class WeightsError(ClipEsError):
    """Model weights could not be resolved or loaded."""


class DatasetError(ClipEsError):
    """A dataset is missing, malformed or inconsistent."""


class ClassFileError(DatasetError):
    """A class file is empty, malformed or has duplicates."""


class LabelError(DatasetError):
    """An image-level label file is malformed or names unknown classes."""


class ImageError(DatasetError):
    """One image could not be read. Per-image: a stage records it and goes on."""


class RunDirError(ClipEsError):
    """A run directory is inconsistent with the requested stage parameters."""


class StageFailures(ClipEsError):
    """A stage finished but some images failed; the manifest lists them."""

    exit_code = 1


class MaskImportError(ClipEsError):
    """Corrected masks to import (``clipes import-masks``) are malformed or do not match the run:
    truncated file, wrong size, unknown class or colour, an image that is not the run's."""

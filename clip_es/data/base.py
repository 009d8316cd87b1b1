"""The one small interface every dataset reader implements, and shared helpers.

Conventions (all readers):
  * class indices are 0-based positions in ``dataset.classes``;
  * ground-truth masks are ``(H, W)`` uint8 with 0 = background, ``k + 1`` = class
    ``k``, 255 = ignore (object borders in VOC); readers map their own ids to this;
  * ``dataset.category_ids[k]`` is the id class ``k`` has in the source dataset
    (VOC: ``k + 1``; COCO: the category id), used by exports.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from clip_es.errors import ClassFileError, DatasetError, ImageError

#: Characters that may never appear in an image id: path separators (both, so a labels
#: file written on Windows cannot name a sub-folder either).
_SEPARATORS = ("/", "\\")
#: Unicode categories refused in ids: control characters (NUL, newline, tab, DEL, C1),
#: line/paragraph separators (they would split line-based split files) and lone
#: surrogates (what Python makes of file-name bytes that are not valid UTF-8).
_BAD_CATEGORIES = ("Cc", "Zl", "Zp", "Cs")


@dataclass(frozen=True)
class ClassSpec:
    """One class: display name plus optional synonyms.

    ``prompt_words`` is what goes into the text templates: the synonyms when there are
    any (CLIP-ES writes e.g. ``person`` as "person with clothes, people, human"),
    otherwise the name.
    """

    name: str
    synonyms: tuple[str, ...] = ()

    @property
    def prompt_words(self) -> tuple[str, ...]:
        return self.synonyms or (self.name,)


@dataclass
class Sample:
    """One image with its image-level labels and optional ground truth.

    Attributes:
        id: image id (file stem), safe to use as a file name.
        image: ``(H, W, 3)`` uint8 RGB.
        labels: sorted 0-based class indices present in the image.
        gt: ``(H, W)`` uint8 mask (0 bg, k+1 class k, 255 ignore) or ``None``.
    """

    id: str
    image: np.ndarray
    labels: tuple[int, ...]
    gt: np.ndarray | None = None


@runtime_checkable
class Dataset(Protocol):
    """What stages need from a dataset. ``labels`` must not decode the image."""

    name: str
    root: Path
    split: str
    classes: list[ClassSpec]
    category_ids: list[int]

    def ids(self) -> list[str]: ...

    def labels(self, image_id: str) -> tuple[int, ...]: ...

    def load_image(self, image_id: str) -> np.ndarray: ...

    def load_gt(self, image_id: str) -> np.ndarray | None: ...

    def image_path(self, image_id: str) -> Path: ...


def worker_view(ds: Dataset, ids: list[str]):
    """What a spawned loader worker is sent to read ``ids``: ``ds.worker_view(ids)`` where the
    reader has one (a slim, picklable object with the same ``labels`` / ``load_image`` /
    ``image_path`` for those ids, e.g. COCO's, whose full json index would otherwise be pickled
    into every worker), else ``ds`` itself (readers whose state is a few paths and a labels table)."""
    view = getattr(ds, "worker_view", None)
    return view(ids) if callable(view) else ds


def sample_of(ds: Dataset, image_id: str, with_gt: bool = False) -> Sample:
    """Load one :class:`Sample` from a dataset."""
    return Sample(image_id, ds.load_image(image_id), ds.labels(image_id),
                  ds.load_gt(image_id) if with_gt else None)


def validate_gt(mask: np.ndarray, num_classes: int, where: str | Path,
                image_hw: tuple[int, int] | None = None, image_where: str | Path | None = None) -> np.ndarray:
    """Check a ground-truth mask against the class list and, optionally, its image size.

    Args:
        mask: ``(H, W)`` uint8 mask (0 bg, ``k + 1`` class ``k``, 255 ignore).
        num_classes: number of foreground classes ``K``; allowed values are ``0..K`` and 255.
        where: the mask's file (or a description), named in errors.
        image_hw: ``(H, W)`` of the image the mask belongs to; ``None`` skips the size check.
        image_where: the image's file, named in the size error.

    Returns:
        ``mask`` itself (unchanged).

    Raises:
        ImageError: a value outside ``0..K`` and not 255, or a size that differs from the image.
    """
    bad = (mask > num_classes) & (mask != 255)
    if bad.any():
        raise ImageError(f"{where}: mask values {sorted(np.unique(mask[bad]).tolist())} are outside "
                         f"0..{num_classes} and not 255 (ignore); the class list has {num_classes} classes, "
                         "so fix the mask or pass the class file it was drawn with")
    if image_hw is not None and tuple(mask.shape[:2]) != tuple(image_hw):
        (mh, mw), (ih, iw) = mask.shape[:2], image_hw
        raise ImageError(f"{where}: mask is {mw}x{mh} (WxH) but its image {image_where or ''} is {iw}x{ih}; "
                         "ground truth must have the image's size (after EXIF rotation); re-export the mask")
    return mask


def id_problem(image_id: str) -> str | None:
    """Why ``image_id`` is not a plain file name, or ``None`` when it is one.

    An image id is the image's file name without its extension, kept exactly as the
    file spells it (spaces, accents, CJK, ``Photo (1)``...), so every output file
    ``<id>.png`` maps back to its input. Refused: the empty id, ``.`` and ``..``, any
    path separator (``/`` or ``\\``), NUL and other control characters, line
    separators, names that are not valid UTF-8, names starting with ``.`` (hidden
    files such as macOS's ``._IMG_1.jpg``, and the run folder's ``.tmp-`` files) and
    names starting or ending with white space (labels files trim their cells).
    """
    if not image_id:
        return "it is empty"
    if image_id in (".", ".."):
        return f"{image_id!r} names a folder, not a file"
    for sep in _SEPARATORS:
        if sep in image_id:
            return f"it contains the path separator {sep!r}"
    for ch in image_id:
        cat = unicodedata.category(ch)
        if cat in _BAD_CATEGORIES:
            what = "bytes that are not valid UTF-8" if cat == "Cs" else f"the control character U+{ord(ch):04X}"
            return f"it contains {what}"
    if image_id.startswith("."):
        return "it starts with '.' (a hidden file)"
    if image_id != image_id.strip():
        return "it starts or ends with white space (labels files trim cells, so it could not be named there)"
    return None


def check_id(image_id: str, where: str) -> str:
    """``image_id`` itself if it is a plain file name (see :func:`id_problem`).

    This is what keeps every reader inside its dataset folder: ``../x``, ``/abs`` and
    ``a/b`` are refused, so no list or labels file can point outside it.

    Raises:
        DatasetError: the id is not a plain file name (the message says why and where).
    """
    problem = id_problem(image_id) if isinstance(image_id, str) else "it is not a string"
    if problem is not None:
        raise DatasetError(f"{where}: image id {image_id!r} is not a plain file name: {problem}; "
                           "an id is a file name without its extension (no '/', no control characters, "
                           "not '.', '..' or hidden); rename the file or fix the list")
    return image_id


def parse_class_lines(lines: list[str], where: str) -> list[ClassSpec]:
    """Parse class-file lines: ``name[, synonym, synonym...]``; ``#`` comments, blank lines skipped.

    Raises:
        ClassFileError: empty file, empty name (a synonyms-only line), or a duplicate class.
    """
    classes: list[ClassSpec] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = [p.strip() for p in line.split(",")]
        name, syn = parts[0], tuple(p for p in parts[1:] if p)
        if not name:
            raise ClassFileError(f"{where}:{n}: line {raw.strip()!r} has synonyms but no class name; "
                                 "write the class name first: 'name, synonym, ...'")
        if name in seen:
            raise ClassFileError(f"{where}:{n}: class {name!r} is listed twice (first on line {seen[name]}); "
                                 "keep one line per class")
        seen[name] = n
        classes.append(ClassSpec(name, syn))
    if not classes:
        raise ClassFileError(f"{where}: no classes found; write one class per line: 'name[, synonym, ...]'")
    return classes


def read_class_file(path: str | Path) -> list[ClassSpec]:
    """Read a class file (one class per line, synonyms after the name, comma-separated)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ClassFileError(f"class file {path} does not exist; pass an existing file") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ClassFileError(f"class file {path} cannot be read as UTF-8 text: {e}") from e
    return parse_class_lines(text.splitlines(), str(path))


def write_class_file(path: str | Path, classes: list[ClassSpec]) -> None:
    """Write classes in the class-file format."""
    Path(path).write_text("".join(", ".join((c.name,) + c.synonyms) + "\n" for c in classes), encoding="utf-8")


def read_word_list(path: str | Path) -> list[str]:
    """One word or phrase per line (background sets); ``#`` comments and blanks skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ClassFileError(f"word list {path} cannot be read: {e}; pass an existing text file") from e
    return [w for w in (ln.split("#", 1)[0].strip() for ln in lines) if w]

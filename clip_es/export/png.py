"""PNG: the run's palette PNGs (VOC palette, ``k + 1`` = class ``k``, 255 = unsure) copied to
a folder as ``<id>.png``, with ``classes.txt`` (one class name per line; line ``n`` is label
value ``n``, so it is also a valid ``--class-file``). Unsure pixels stay 255.

Import (``--format png``): a folder of ``<id>.png`` (or ``<image file name>.png``) masks,
palette or grayscale (values are label values) or RGB in the VOC colours (what an image
editor may save). With a ``classes.txt`` beside them, its names are matched to the run's
(another order is remapped; an unknown name is refused); without one the values are the
run's. 255 is unsure, 0 background.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from clip_es.data.image_io import voc_palette
from clip_es.errors import ConfigError, MaskImportError
from clip_es.export.common import BACKGROUND, ExportResult, RunImages, values_from_names
from clip_es.refine.crf import IGNORE
from clip_es.refine.store import MASKS, output_path
from clip_es.rundir import atomic_write_bytes

CLASSES_TXT = "classes.txt"


def write(rimgs: RunImages, ids: list[str], out: Path, progress: bool = True) -> ExportResult:
    """Copy the palette PNG pseudo masks of ``ids`` into folder ``out`` and write ``classes.txt``."""
    out = out_folder(out, "png")
    for image_id in tqdm(ids, desc="export png", unit="img", disable=not progress):
        atomic_write_bytes(out / f"{image_id}.png", output_path(rimgs.run, MASKS, image_id).read_bytes())
    atomic_write_bytes(out / CLASSES_TXT, "".join(f"{c}\n" for c in rimgs.classes).encode("utf-8"))
    return ExportResult(str(out), len(ids))


def out_folder(out: Path, fmt: str) -> Path:
    """Create folder ``out`` for a folder export.

    Raises:
        ConfigError: ``out`` exists and is not a folder, or cannot be created.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder; {fmt} export writes a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create folder {out} for --out: {e.strerror}") from e
    return out


def colour_table(values: dict[int, int]) -> dict[int, int]:
    """``{0xRRGGBB colour: label value}`` for VOC palette indices ``values`` (index -> value)."""
    pal = voc_palette()
    return {(pal[3 * i] << 16) | (pal[3 * i + 1] << 8) | pal[3 * i + 2]: v for i, v in values.items()}


def read_label_png(path: Path, where: str, colours: dict[int, int] | None = None) -> np.ndarray:
    """``(H, W)`` uint8 of a label PNG: palette/grayscale indices as they are; RGB(A) through
    ``colours`` (``0xRRGGBB -> value``; default the VOC palette's index of each colour).

    Raises:
        MaskImportError: unreadable, or a colour ``colours`` does not declare.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("P", "L") and colours is None:
                return np.asarray(im).copy()
            rgb = np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:
        raise MaskImportError(f"{where}: not a readable PNG ({type(e).__name__}: {e}); export it again") from e
    return map_colours(rgb, colours if colours is not None else colour_table({i: i for i in range(256)}), where)


def map_colours(rgb: np.ndarray, colours: dict[int, int], where: str) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB -> ``(H, W)`` uint8 label values through ``colours``.

    Raises:
        MaskImportError: a colour not in ``colours``.
    """
    code = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    uniq, inv = np.unique(code, return_inverse=True)
    missing = [int(c) for c in uniq if int(c) not in colours]
    if missing:
        c = missing[0]
        raise MaskImportError(f"{where}: colour ({c >> 16},{(c >> 8) & 255},{c & 255}) is not a declared label "
                              f"colour ({len(missing)} undeclared colour(s)); paint with the labels' own colours")
    lut = np.array([colours[int(c)] for c in uniq], np.uint8)
    return lut[inv.reshape(code.shape)]


def remap(mask: np.ndarray, lut: dict[int, int], where: str) -> np.ndarray:
    """Map a mask's values through ``lut`` (value -> run value).

    Raises:
        MaskImportError: a value ``lut`` does not hold.
    """
    table = np.full(256, -1, np.int32)
    for k, v in lut.items():
        table[k] = v
    out = table[mask]
    if (out < 0).any():
        bad = sorted(int(v) for v in np.unique(mask[out < 0]))
        raise MaskImportError(f"{where}: value {bad[0]} is no label (valid: {', '.join(map(str, sorted(lut)))}: "
                              "0 background, 1..K the classes, 255 unsure)")
    return out.astype(np.uint8)


def read(src: Path, values: dict[str, int]) -> Iterator[tuple[str, str, np.ndarray]]:
    """``(image reference, where, mask)`` for each PNG of folder ``src`` (see the module doc)."""
    if not src.is_dir():
        raise MaskImportError(f"--from {src}: not a folder; --format png reads a folder of <id>.png masks")
    lut = png_value_table(src / CLASSES_TXT, values)
    for p in sorted(src.glob("*.png")):
        yield p.name[: -len(".png")], str(p), remap(read_label_png(p, str(p)), lut, str(p))


def png_value_table(classes_txt: Path, values: dict[str, int]) -> dict[int, int]:
    """file value -> run value: from ``classes.txt`` (line ``n`` = value ``n``) when it exists, else identity."""
    if not classes_txt.is_file():
        return {v: v for v in values.values()}
    try:
        lines = classes_txt.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MaskImportError(f"{classes_txt}: not readable UTF-8 text ({e})") from e
    names = {n: line.split(",")[0].strip() for n, line in enumerate(lines, 1) if line.split(",")[0].strip()}
    lut = values_from_names(names, values, str(classes_txt))
    return {0: values[BACKGROUND], IGNORE: IGNORE, **lut}

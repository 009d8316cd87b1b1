"""CVAT "Segmentation mask 1.1" (the Pascal VOC segmentation layout CVAT imports and exports)::

    OUT(.zip or folder)/
        labelmap.txt                    # label:color_rgb:parts:actions, background first
        ImageSets/Segmentation/default.txt   one image name (file stem) per line
        SegmentationClass/<stem>.png    RGB, each pixel its label's colour
        SegmentationObject/<stem>.png   palette PNG, one instance per label present (1, 2, ...)

Colours are the VOC palette's: background (0,0,0), class ``k`` the colour of index ``k + 1``
(what the run's palette PNGs show), and the unsure pixels a declared label ``unsure`` in
the VOC "void" colour (224,224,192). CVAT refuses a colour its labelmap does not declare
(cvat-ai/cvat#7847), so unsure is declared rather than left as 255: the doubtful regions
show as ``unsure`` masks, the ones to repaint. Create the task with the label names of
``labelmap.txt`` (``unsure`` included), then Actions > Upload annotations > "Segmentation
mask 1.1" with the zip.

Import (``--format cvat``): CVAT's own "Segmentation mask 1.1" export, as the zip or
unpacked: ``labelmap.txt`` names must be background, the run's classes or ``unsure``
(which goes back to 255, still ignored in training); every colour must be declared.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from clip_es.data.image_io import voc_palette
from clip_es.errors import MaskImportError
from clip_es.export.common import BACKGROUND, ExportResult, RunImages, check_name_safe, safe_ref, values_from_names
from clip_es.export.png import map_colours, out_folder
from clip_es.refine.crf import IGNORE
from clip_es.rundir import atomic_write

LABELMAP, IMAGESET = "labelmap.txt", "ImageSets/Segmentation/default.txt"
CLASS_DIR, OBJECT_DIR = "SegmentationClass", "SegmentationObject"


def colours(n_classes: int) -> dict[int, tuple[int, int, int]]:
    """Label value -> RGB colour: the VOC palette's colour of the value (255: the void colour)."""
    pal = voc_palette()
    return {v: (pal[3 * v], pal[3 * v + 1], pal[3 * v + 2]) for v in [*range(n_classes + 1), IGNORE]}


def labelmap_text(rimgs: RunImages) -> str:
    """``labelmap.txt``: a comment line, then ``name:r,g,b::`` per label, background first, unsure last."""
    cols = colours(len(rimgs.classes))
    lines = ["# label:color_rgb:parts:actions"]
    for v, name in rimgs.label_names().items():
        check_name_safe(name, "CVAT's labelmap.txt", ":\n\r")
        lines.append(f"{name}:{','.join(map(str, cols[v]))}::")
    return "\n".join(lines) + "\n"


def _png(arr: np.ndarray, palette: list[int] | None = None) -> bytes:
    im = Image.fromarray(np.ascontiguousarray(arr), mode="P" if palette else "RGB")
    if palette:
        im.putpalette(palette)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def mask_files(mask: np.ndarray, n_classes: int) -> tuple[bytes, bytes]:
    """``(SegmentationClass PNG, SegmentationObject PNG)`` bytes of one ``(H, W)`` pseudo mask."""
    cols = colours(n_classes)
    lut = np.zeros((256, 3), np.uint8)
    for v, c in cols.items():
        lut[v] = c
    obj = np.zeros(mask.shape, np.uint8)
    for n, v in enumerate([int(v) for v in np.unique(mask) if v != 0], 1):
        obj[mask == v] = n
    return _png(lut[mask]), _png(obj, voc_palette())


def write(rimgs: RunImages, ids: list[str], out: Path, progress: bool = True) -> ExportResult:
    """Write ``ids``' pseudo masks in CVAT's "Segmentation mask 1.1": a zip when ``out`` ends
    with ``.zip``, else a folder (see the module doc)."""
    files: dict[str, bytes] = {LABELMAP: labelmap_text(rimgs).encode("utf-8")}
    names = []
    for image_id in tqdm(ids, desc="export cvat", unit="img", disable=not progress):
        stem = image_id  # the image's file name without extension, as CVAT names its masks
        names.append(stem)
        cls, obj = mask_files(rimgs.mask(image_id), len(rimgs.classes))
        files[f"{CLASS_DIR}/{stem}.png"], files[f"{OBJECT_DIR}/{stem}.png"] = cls, obj
    files[IMAGESET] = "".join(f"{n}\n" for n in names).encode("utf-8")
    if out.suffix.lower() == ".zip":
        from clip_es.export.coco import _parent

        _parent(out)

        def put(f):
            with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
                for name, data in files.items():
                    z.writestr(name, data)

        atomic_write(out, put)
    else:
        out_folder(out, "cvat")
        for name, data in files.items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(out / name, lambda f, d=data: f.write(d))
    return ExportResult(str(out), len(ids))


# ----------------------------------------------------------------------------- import
def parse_labelmap(text: str, where: str) -> dict[int, str]:
    """``{0xRRGGBB: name}`` of a ``labelmap.txt``.

    Raises:
        MaskImportError: a line that is not ``name:r,g,b:...``, or a colour given twice.
    """
    out: dict[int, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split(":")
        try:
            r, g, b = (int(x) for x in parts[1].split(","))
            if not all(0 <= c <= 255 for c in (r, g, b)):
                raise ValueError
        except (IndexError, ValueError):
            raise MaskImportError(f"{where} line {n}: {line.strip()!r} is not 'name:r,g,b:parts:actions'") from None
        code = (r << 16) | (g << 8) | b
        if code in out:
            raise MaskImportError(f"{where} line {n}: colour {r},{g},{b} is also {out[code]!r}'s")
        out[code] = parts[0].strip()
    return out


class _Source:
    """The files of a zip or a folder, by POSIX name relative to its root."""

    def __init__(self, src: Path):
        self.src = src
        if src.is_dir():
            self.zip = None
            self.names = [p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()]
        elif src.is_file():
            try:
                self.zip = zipfile.ZipFile(src)
                self.names = [i.filename for i in self.zip.infolist() if not i.is_dir()]
            except (zipfile.BadZipFile, OSError) as e:
                raise MaskImportError(f"{src}: not a readable zip ({e}); a truncated download? export it again "
                                      "from CVAT") from e
        else:
            raise MaskImportError(f"--from {src}: no such file or folder")
        for n in self.names:  # a member such as ../../x.png would be written outside: refuse the archive
            safe_ref(n, str(src))
        root = _root(self.names)
        self.root = root

    def find(self, name: str) -> str | None:
        full = f"{self.root}{name}"
        return full if full in self.names else None

    def under(self, folder: str) -> list[str]:
        pre = f"{self.root}{folder}/"
        return sorted(n for n in self.names if n.startswith(pre) and n.lower().endswith(".png"))

    def read(self, name: str) -> bytes:
        try:
            return self.zip.read(name) if self.zip is not None else (self.src / name).read_bytes()
        except (zipfile.BadZipFile, OSError, EOFError) as e:  # a truncated member (bad CRC) as well
            raise MaskImportError(f"{self.src}: cannot read {name} ({e}); a truncated archive? export it again") from e


def _root(names: list[str]) -> str:
    """The folder prefix holding ``labelmap.txt`` (CVAT zips have none; an unpacked copy may)."""
    hits = sorted((n for n in names if PurePosixPath(n).name == LABELMAP), key=len)
    return hits[0][: -len(LABELMAP)] if hits else ""


def read(src: Path, values: dict[str, int]) -> Iterator[tuple[str, str, np.ndarray]]:
    """``(image reference, where, mask)`` for each ``SegmentationClass`` PNG (see the module doc)."""
    s = _Source(src)
    lm = s.find(LABELMAP)
    if lm is None:
        raise MaskImportError(f"{src}: no {LABELMAP}; export from CVAT as 'Segmentation mask 1.1'")
    try:
        text = s.read(lm).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise MaskImportError(f"{src}/{lm}: not UTF-8 text") from e
    named = parse_labelmap(text, f"{src}/{lm}")
    cols = values_from_names(named, values, f"{src}/{lm}")
    if BACKGROUND not in named.values():  # CVAT's default background colour
        cols.setdefault(0, values[BACKGROUND])
    files = s.under(CLASS_DIR)
    if not files:
        raise MaskImportError(f"{src}: no {CLASS_DIR}/*.png masks")
    for name in files:
        where = f"{src}:{name}"
        try:
            with Image.open(io.BytesIO(s.read(name))) as im:
                rgb = np.asarray(im.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as e:
            raise MaskImportError(f"{where}: not a readable PNG ({e})") from e
        yield name[len(s.root) + len(CLASS_DIR) + 1:], where, map_colours(rgb, cols, where)



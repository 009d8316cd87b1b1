"""Your own tagged images: a folder of images, a labels file and a class file.

Layout::

    ROOT/images/<id>.<ext>        images (.jpg .jpeg .png .bmp .webp, any case); or pass image_dir
    ROOT/classes.txt              class file (one class per line, synonyms after the name)
    ROOT/<split>.csv              labels, or ROOT/<split>.json, or any .csv/.json path as split
    ROOT/masks/<id>.png           optional GT (palette or grayscale PNG: 0 bg, k+1 class k, 255 ignore)

Labels files:

* CSV, one image per row: ``image,label1;label2``. The image cell may carry an
  extension (``cat1.jpg``) or not (``cat1``); the id is the name without it. A first row
  whose first cell is ``image`` is a header and skipped; blank rows and rows whose
  first cell starts with ``#`` are skipped; an empty label cell means no labels.
* JSON, one object: ``{"cat1": ["cat"], "dog2.jpg": ["dog", "person"]}``.

Labels are class **names** as written first on a class-file line; synonyms are prompt
words only and are not accepted as labels (so a label always names exactly one class).
Every id must be a plain file name (any characters a file name may hold, spaces and
non-ASCII letters included; no ``/`` or ``\\``, not ``.``/``..``, no control characters,
not hidden; see :func:`~clip_es.data.base.id_problem`), so nothing outside ROOT's image
and mask folders is ever read. An image whose name starts with ``#`` is written quoted in
a CSV (``"#1.jpg",cat``); an unquoted ``#`` starts a comment row. Errors name the labels
file and the CSV line or JSON id.
"""

from __future__ import annotations

import csv
import difflib
import json
import logging
import unicodedata
from functools import cached_property
from pathlib import Path

import numpy as np

from clip_es.data.base import ClassSpec, check_id, id_problem, read_class_file
from clip_es.data.image_io import read_gt, read_image
from clip_es.errors import ClassFileError, DatasetError, LabelError

log = logging.getLogger(__name__)

#: Image extensions looked up for an id (lower case; upper-case files are found too).
IMAGE_EXTS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def split_image_name(name: str) -> tuple[str, str | None]:
    """``"cat1.JPG" -> ("cat1", ".JPG")``; ``"cat1" -> ("cat1", None)``.

    Only a known image extension is removed, by string operations (never ``Path.stem``,
    which would silently drop a ``../`` prefix that :func:`check_id` must see).
    """
    for ext in IMAGE_EXTS:
        if name.lower().endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], name[-len(ext):]
    return name, None


def printable_name(name: str) -> str:
    """``name`` safe to print or store as JSON text (undecodable file-name bytes as ``\\xNN``)."""
    import os

    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")


def scan_images(folder: str | Path) -> tuple[list[tuple[str, Path]], dict[str, str]]:
    """The images directly in ``folder``: ``([(id, path)], {file name: why it was left out}``.

    An image is a file with one of :data:`IMAGE_EXTS` (any case); its id is the name
    without the extension, kept exactly (``chien café.jpg`` -> ``chien café``). Sorted by
    file name. Hidden files (``.name``, e.g. macOS's ``._IMG_1.jpg``) and sub-folders are
    not looked at. A name that is not a valid id (a control character, bytes that are not
    UTF-8) or whose id another image already has (``a.jpg`` and ``a.png``: the first in
    name order keeps it) is left out with the reason, so one odd file never stops the folder.

    Raises:
        DatasetError: ``folder`` is not a folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder} is not a folder; pass a folder of images ({', '.join(IMAGE_EXTS)})")
    found: dict[str, Path] = {}
    refused: dict[str, str] = {}
    for p in sorted(folder.iterdir(), key=lambda q: q.name):
        name = p.name
        if name.startswith(".") or not p.is_file():
            continue
        image_id, ext = split_image_name(name)
        if ext is None:
            continue
        shown = printable_name(name)
        problem = id_problem(image_id)
        if problem is not None:
            refused[shown] = f"{folder / shown}: left out, its name is not a usable image id: {problem}; rename it"
        elif image_id in found:
            refused[shown] = (f"{folder / shown}: left out, image {found[image_id].name} has the same id "
                              f"{image_id!r} (ids are names without the extension); rename one of them")
        else:
            found[image_id] = p
    return list(found.items()), refused


class _Pairs(list):
    """A JSON object as its ``(key, value)`` pairs, so duplicate keys stay visible."""


def _json_kind(value: object) -> str:
    return {list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _image_key(name: str, where: str) -> tuple[str, str | None]:
    """``(id, extension)`` of a labels-file image name; an unsafe id is a :class:`LabelError`."""
    image_id, ext = split_image_name(name)
    try:
        check_id(image_id, where)
    except DatasetError as e:
        raise LabelError(str(e)) from e
    return image_id, ext


class FolderDataset:
    """Images in a folder with image-level labels from a CSV or JSON file.

    Args:
        root: dataset folder.
        split: labels file: ``ROOT/{split}.csv`` or ``ROOT/{split}.json``, or a path to a
            ``.csv`` / ``.json`` file (absolute, or relative to the working dir or ROOT).
        class_file: class file; default ``ROOT/classes.txt`` (required).
        image_dir: image folder; default ``ROOT/images`` if it exists, else ROOT.

    Raises:
        ClassFileError: no class file, or a malformed one.
        DatasetError: the labels file cannot be found or is ambiguous.
    """

    name = "folder"

    def __init__(self, root: str | Path, split: str = "labels", class_file: str | Path | None = None,
                 image_dir: str | Path | None = None):
        self.root = Path(root)
        self.split = split
        if not self.root.is_dir():
            raise DatasetError(f"dataset folder {self.root} does not exist; point root at the folder holding "
                               "images/, classes.txt and the labels file (see data/README.md)")
        if class_file is None:
            class_file = self.root / "classes.txt"
            if not Path(class_file).is_file():
                raise ClassFileError(f"{class_file} not found: a folder dataset needs a class file; write one "
                                     "class per line ('name[, synonym, ...]') to ROOT/classes.txt or pass "
                                     "class_file")
        self.class_file = Path(class_file)
        self.classes: list[ClassSpec] = read_class_file(self.class_file)
        self.category_ids = list(range(1, len(self.classes) + 1))
        self._index = {c.name: k for k, c in enumerate(self.classes)}
        if image_dir is not None:
            self.image_dir = Path(image_dir)
        else:
            self.image_dir = self.root / "images" if (self.root / "images").is_dir() else self.root
        self.mask_dir = self.root / "masks"
        self.labels_file = self._find_labels_file(split)

    def _find_labels_file(self, split: str) -> Path:
        if split.lower().endswith((".csv", ".json")):
            for p in (Path(split), self.root / split):
                if p.is_file():
                    return p
            raise DatasetError(f"labels file {split} not found (tried it as given and under {self.root})")
        found = [p for p in (self.root / f"{split}.csv", self.root / f"{split}.json") if p.is_file()]
        if len(found) == 2:
            raise DatasetError(f"split {split!r} is ambiguous: both {found[0]} and {found[1]} exist; "
                               "pass the labels file path as the split, or remove one")
        if not found:
            avail = sorted(p.name for p in self.root.iterdir() if p.suffix.lower() in (".csv", ".json"))
            raise DatasetError(f"no labels file for split {split!r}: tried {self.root / (split + '.csv')} and "
                               f"{self.root / (split + '.json')}; labels files in {self.root}: "
                               f"{', '.join(avail) or 'none'}")
        return found[0]

    # ------------------------------------------------------------------ labels file
    def _class_index(self, label: str, where: str) -> int:
        try:
            return self._index[label]
        except KeyError:
            close = difflib.get_close_matches(label, list(self._index), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise LabelError(f"{where}: label {label!r} is not in the class file {self.class_file}{hint}; "
                             f"known classes: {', '.join(self._index)}") from None

    @cached_property
    def _table(self) -> dict[str, tuple[tuple[int, ...], str | None]]:
        """id -> (sorted class indices, extension given in the labels file or None)."""
        p = self.labels_file
        try:
            text = p.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise LabelError(f"{p}: cannot be read as UTF-8 text ({e})") from e
        table = self._parse_json(text) if p.suffix.lower() == ".json" else self._parse_csv(text)
        log.info("%s: %d images, %d classes", p, len(table), len(self.classes))
        return table

    def _parse_csv(self, text: str) -> dict[str, tuple[tuple[int, ...], str | None]]:
        p = self.labels_file
        out: dict[str, tuple[tuple[int, ...], str | None]] = {}
        first_line: dict[str, int] = {}
        lines = ["" if ln.lstrip().startswith("#") else ln for ln in text.splitlines()]  # comments: unquoted '#'
        reader = csv.reader(lines, strict=True, skipinitialspace=True)
        first = True
        n = 0
        try:
            for row in reader:
                n = reader.line_num
                cells = [c.strip() for c in row]
                if not cells or not any(cells):
                    continue
                if first and cells[0].lower() == "image":
                    first = False
                    continue
                first = False
                where = f"{p}:{n}"
                if len(cells) > 2:
                    raise LabelError(f"{where}: expected 2 columns 'image,label1;label2', got {len(cells)} "
                                     f"({','.join(cells)!r}); separate labels with ';' not ','")
                image_id, ext = _image_key(cells[0], where)
                if image_id in out:
                    raise LabelError(f"{where}: image {image_id!r} is listed twice (also on line "
                                     f"{first_line[image_id]}); keep one row per image with all its labels")
                names = [s.strip() for s in (cells[1] if len(cells) > 1 else "").split(";")]
                labels = {self._class_index(s, where) for s in names if s}
                out[image_id] = (tuple(sorted(labels)), ext)
                first_line[image_id] = n
        except csv.Error as e:
            raise LabelError(f"{p}:{reader.line_num or n}: malformed CSV ({e}); "
                             "write rows as 'image,label1;label2'") from e
        return out

    def _parse_json(self, text: str) -> dict[str, tuple[tuple[int, ...], str | None]]:
        p = self.labels_file

        try:
            data = json.loads(text, object_pairs_hook=_Pairs)
        except json.JSONDecodeError as e:
            raise LabelError(f"{p}:{e.lineno}:{e.colno}: malformed JSON ({e.msg}); "
                             'expected {"image_id": ["label", ...], ...}') from e
        if not isinstance(data, _Pairs):
            raise LabelError(f'{p}: expected one JSON object {{"image_id": ["label", ...], ...}}, '
                             f"got a JSON {_json_kind(data)}")
        out: dict[str, tuple[tuple[int, ...], str | None]] = {}
        key_of: dict[str, str] = {}
        for key, value in data:
            where = f"{p}: id {key!r}"
            image_id, ext = _image_key(key.strip(), where)
            if image_id in out:
                raise LabelError(f"{where}: image {image_id!r} is listed twice (keys {key_of[image_id]!r} and "
                                 f"{key!r}); keep one entry per image")
            if type(value) is not list or not all(isinstance(v, str) for v in value):
                raise LabelError(f"{where}: labels must be a list of class names, got {json.dumps(value)}")
            labels = {self._class_index(v.strip(), where) for v in value if v.strip()}
            out[image_id] = (tuple(sorted(labels)), ext)
            key_of[image_id] = key
        return out

    def _entry(self, image_id: str) -> tuple[tuple[int, ...], str | None]:
        check_id(image_id, str(self.labels_file))
        try:
            return self._table[image_id]
        except KeyError:
            raise DatasetError(f"image id {image_id!r} is not in {self.labels_file}; use an id from ids()") from None

    # ------------------------------------------------------------------ Dataset protocol
    def ids(self) -> list[str]:
        """Image ids in labels-file order."""
        return list(self._table)

    def image_path(self, image_id: str) -> Path:
        """The image file: the extension from the labels file if given, else the first of
        :data:`IMAGE_EXTS` (lower or upper case) that exists; the ``.jpg`` path if none does."""
        _, ext = self._entry(image_id)
        exts = ([ext] if ext else []) + [e for x in IMAGE_EXTS for e in (x, x.upper())]
        for stem in _spellings(image_id):
            for e in exts:
                p = self.image_dir / f"{stem}{e}"
                if p.is_file():
                    return p
        return self.image_dir / f"{image_id}{ext or '.jpg'}"

    def labels(self, image_id: str) -> tuple[int, ...]:
        """Sorted class indices from the labels file (no image decoding)."""
        return self._entry(image_id)[0]

    def load_image(self, image_id: str) -> np.ndarray:
        """``(H, W, 3)`` uint8 RGB."""
        return read_image(self.image_path(image_id))

    def gt_path(self, image_id: str) -> Path | None:
        """``ROOT/masks/<id>.png`` if it exists, else ``None``."""
        check_id(image_id, str(self.root))
        for stem in _spellings(image_id):
            p = self.mask_dir / f"{stem}.png"
            if p.is_file():
                return p
        return None

    def load_gt(self, image_id: str) -> np.ndarray | None:
        """``(H, W)`` uint8 mask from ``ROOT/masks/<id>.png``, or ``None`` without one.

        Raises:
            ImageError: values outside ``0..K`` and not 255, or a size that differs from the image's.
        """
        p = self.gt_path(image_id)
        if p is None:
            return None
        return read_gt(p, len(self.classes), self.image_path(image_id))


def _spellings(image_id: str) -> list[str]:
    """``image_id`` and its other Unicode normal forms: a labels file typed with composed
    accents (``café``, NFC) still finds a file whose name was stored decomposed (NFD, as
    macOS writes names), and the other way round."""
    out = [image_id]
    for form in ("NFC", "NFD"):
        alt = unicodedata.normalize(form, image_id)
        if alt not in out:
            out.append(alt)
    return out

"""Label Studio: tasks with pre-annotations (``predictions``) as brush masks, and the labeling
config they need::

    OUT/
        tasks.json              [{data: {image, clipes_id, file_name}, predictions: [...]}, ...]
        labeling_config.xml     <BrushLabels name="tag" toName="image"> one <Label> per name

Each task's prediction: ``{model_version, score, result}``; ``score`` is the image's (the
lowest class confidence, as in ``review.csv``: Label Studio sorts tasks by it, least sure
first) and each result item is one label's region::

    {"from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": W,
     "original_height": H, "image_rotation": 0, "score": S,
     "value": {"format": "rle", "rle": [...], "brushlabels": [name]}}

with ``S`` the mean refine confidence over the region's pixels (left out when the run saved no
confidence maps). Unsure pixels are a region of a declared ``unsure`` label, so the doubtful
areas show as their own brush layer to repaint; background has no region.

``data.image`` is ``/data/local-files/?d=<path under the dataset root>`` (URL-quoted: spaces
and non-ASCII names work): start Label Studio with
``LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true`` and
``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=<dataset root>``, add a Local Files storage on the
image folder, import ``tasks.json`` and paste ``labeling_config.xml`` as the labeling setup.

Brush RLE (Label Studio's own, not COCO's): the mask is an RGBA image, ``H * W * 4`` bytes in
row-major order (every channel 255 inside the region, 0 outside), run-length coded into a
bit stream, most significant bit first, padded with zeros to whole bytes and given as a
list of byte values:

* header: 32 bits the number of values (``H * W * 4``), 5 bits ``word size - 1`` (8 bits a
  value), then four 4-bit fields ``run-length field width - 1`` (we write widths 3, 4, 8, 16);
* then records until the count is reached: 1 bit ``x``, 2 bits choosing one of the four
  widths, that many bits ``n - 1``; if ``x`` is 1, one value repeated ``n`` times follows,
  else ``n`` values one after the other.

The encoder writes repeat records only; the decoder reads both kinds (Label Studio's editor
writes both).

Import (``--format labelstudio``): Label Studio's "JSON" export of the project. Each task's
latest annotation that was not cancelled is its corrected mask (a task without one was not
corrected and is left out); a pixel in no region is background, ``unsure`` gives 255, and where
regions overlap the later one wins. Tasks are matched to images by ``data.clipes_id``, else by
the image URL's file name.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path, PurePosixPath
from typing import Any, Iterator
from urllib.parse import parse_qs, quote, unquote, urlparse
from xml.sax.saxutils import quoteattr

import numpy as np
from tqdm import tqdm

from clip_es.errors import MaskImportError
from clip_es.export.coco import load_json
from clip_es.export.common import ExportResult, RunImages, image_stats, region_score, safe_ref
from clip_es.export.png import out_folder
from clip_es.rundir import atomic_write_bytes

FROM_NAME, TO_NAME = "tag", "image"
TASKS, CONFIG = "tasks.json", "labeling_config.xml"
RLE_WIDTHS = (3, 4, 8, 16)
WORD_BITS = 8


# ----------------------------------------------------------------------------- brush RLE
def brush_encode(values: np.ndarray) -> list[int]:
    """Label Studio brush RLE of a flat uint8 array (see the module doc).

    Args:
        values: uint8 array, flattened in C order (an ``(H, W, 4)`` RGBA mask).

    Returns:
        The RLE as a list of byte values (0..255).
    """
    flat = np.ascontiguousarray(values, np.uint8).ravel()
    n = flat.size
    if n >= 1 << 32:
        raise ValueError(f"{n} values do not fit the 32-bit count of a brush RLE")
    bits = [f"{n:032b}", f"{WORD_BITS - 1:05b}", *(f"{w - 1:04b}" for w in RLE_WIDTHS)]
    if n:
        starts = np.r_[0, np.flatnonzero(flat[1:] != flat[:-1]) + 1]
        lengths = np.diff(np.r_[starts, n])
        longest = 1 << RLE_WIDTHS[-1]
        for length, value in zip(lengths.tolist(), flat[starts].tolist()):
            while length:
                take = min(length, longest)
                w = next(i for i, width in enumerate(RLE_WIDTHS) if take - 1 < 1 << width)
                bits.append(f"1{w:02b}{take - 1:0{RLE_WIDTHS[w]}b}{value:08b}")
                length -= take
    text = "".join(bits)
    text += "0" * (-len(text) % 8)
    return list(int(text, 2).to_bytes(len(text) // 8, "big"))


def brush_decode(rle: list[int] | bytes) -> np.ndarray:
    """The flat uint8 values of a Label Studio brush RLE (the inverse of :func:`brush_encode`).

    Raises:
        ValueError: not a list of byte values, or a stream that ends before its count.
    """
    data = bytes(rle)  # ValueError for values outside 0..255
    bits = (np.unpackbits(np.frombuffer(data, np.uint8)) + ord("0")).tobytes().decode("ascii")
    pos = 0

    def take(k: int) -> int:
        nonlocal pos
        if pos + k > len(bits):
            raise ValueError(f"the RLE ends after {len(data)} bytes, before its last record (truncated)")
        v = int(bits[pos:pos + k], 2) if k else 0
        pos += k
        return v

    n = take(32)
    word = take(5) + 1
    widths = [take(4) + 1 for _ in range(4)]
    out = np.empty(n, np.uint8)
    i = 0
    while i < n:
        repeat = take(1)
        count = take(widths[take(2)]) + 1
        if i + count > n:
            raise ValueError(f"a record runs past the {n} values the header announces")
        if repeat:
            out[i:i + count] = take(word)
        else:
            for j in range(i, i + count):
                out[j] = take(word)
        i += count
    return out


def region_rle(region: np.ndarray) -> list[int]:
    """Brush RLE of a ``(H, W)`` bool region: RGBA, every channel 255 inside."""
    return brush_encode(np.repeat(region.astype(np.uint8) * 255, 4))


def rle_region(rle: list[int], width: int, height: int, where: str) -> np.ndarray:
    """``(height, width)`` bool region of a brush RLE (alpha channel at least 128).

    Raises:
        MaskImportError: undecodable, or not ``width * height * 4`` values.
    """
    try:
        flat = brush_decode(rle)
    except (ValueError, TypeError) as e:
        raise MaskImportError(f"{where}: brush RLE cannot be decoded ({e})") from e
    if flat.size != width * height * 4:
        raise MaskImportError(f"{where}: brush RLE holds {flat.size} values, not {width}x{height}x4 RGBA "
                              f"(original_width x original_height)")
    return flat.reshape(height, width, 4)[..., 3] >= 128


# ----------------------------------------------------------------------------- export
def labeling_config(rimgs: RunImages) -> str:
    """The labeling config XML: an image and one brush label per class, plus ``unsure``."""
    from clip_es.draw import PALETTE

    names = {v: n for v, n in rimgs.label_names().items() if v != 0}
    labels = "\n".join(f'    <Label value={quoteattr(n)} background="#{"".join(f"{c:02x}" for c in PALETTE[v])}"/>'
                       for v, n in names.items())
    return (f'<View>\n  <Image name="{TO_NAME}" value="$image" zoom="true"/>\n'
            f'  <BrushLabels name="{FROM_NAME}" toName="{TO_NAME}">\n{labels}\n  </BrushLabels>\n</View>\n')


def image_url(rimgs: RunImages, image_id: str) -> str:
    """``/data/local-files/?d=<path under the dataset root>``, URL-quoted."""
    p = rimgs.image_path(image_id)
    root = getattr(rimgs.dataset, "root", None)
    try:
        rel = p.resolve().relative_to(Path(root).resolve()).as_posix() if p is not None and root else None
    except ValueError:
        rel = None
    return "/data/local-files/?d=" + quote(rel or rimgs.file_name(image_id), safe="/")


def _region_id(image_id: str, value: int) -> str:
    return hashlib.sha1(f"{image_id}\0{value}".encode()).hexdigest()[:10]


def task(rimgs: RunImages, image_id: str, model_version: str) -> dict[str, Any]:
    """One Label Studio task with the image's pseudo mask as its prediction."""
    mask, conf = rimgs.mask(image_id), rimgs.conf(image_id)
    h, w = mask.shape
    names = rimgs.label_names()
    result = []
    for v in [int(v) for v in np.unique(mask) if v != 0]:
        if v not in names:
            raise MaskImportError(f"{image_id}: mask value {v} is not a label of the run")
        region = mask == v
        item: dict[str, Any] = {"id": _region_id(image_id, v), "from_name": FROM_NAME, "to_name": TO_NAME,
                                "type": "brushlabels", "original_width": int(w), "original_height": int(h),
                                "image_rotation": 0, "origin": "prediction",
                                "value": {"format": "rle", "rle": region_rle(region), "brushlabels": [names[v]]}}
        s = region_score(conf, region)
        if s is not None:
            item["score"] = s
        result.append(item)
    pred: dict[str, Any] = {"model_version": model_version, "result": result}
    stats = image_stats(image_id, mask, conf, rimgs.crf(image_id) if conf is not None else None, rimgs.classes)
    if stats.lowest_conf is not None:
        pred["score"] = stats.lowest_conf
    return {"data": {"image": image_url(rimgs, image_id), "clipes_id": image_id,
                     "file_name": rimgs.file_name(image_id)}, "predictions": [pred]}


def write(rimgs: RunImages, ids: list[str], out: Path, progress: bool = True) -> ExportResult:
    """Write ``OUT/tasks.json`` and ``OUT/labeling_config.xml`` for ``ids`` (see the module doc)."""
    out = out_folder(out, "labelstudio")
    info = rimgs.run.stage_info("refine") or {}
    version = f"clipes-refine-{info.get('hash', 'unknown')}"
    tasks = [task(rimgs, i, version) for i in tqdm(ids, desc="export labelstudio", unit="img", disable=not progress)]
    atomic_write_bytes(out / CONFIG, labeling_config(rimgs).encode("utf-8"))
    atomic_write_bytes(out / TASKS, json.dumps(tasks, ensure_ascii=False).encode("utf-8"))
    root = getattr(rimgs.dataset, "root", None)
    note = (f"label studio: serve the images with LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true "
            f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={Path(root).resolve() if root else '<the image folder>'}; "
            f"labeling setup: {out / CONFIG}")
    return ExportResult(str(out / TASKS), len(tasks), sum(len(t["predictions"][0]["result"]) for t in tasks),
                        note=note)


# ----------------------------------------------------------------------------- import
_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")


def task_ref(t: dict[str, Any], where: str) -> str:
    """The image a task is about: ``data.clipes_id``, else the file path in ``data.image``'s URL.

    Raises:
        MaskImportError: no image, or a path outside the run.
    """
    data = t.get("data") or {}
    if data.get("clipes_id"):
        ref = str(data["clipes_id"])
        safe_ref(ref, where)
        if "/" in ref.replace("\\", "/"):
            raise MaskImportError(f"{where}: data.clipes_id {ref!r} points outside the run; it is an image id")
        return ref
    url = data.get("image")
    if not url:
        raise MaskImportError(f"{where}: task has no data.image nor data.clipes_id")
    u = urlparse(str(url))
    d = parse_qs(u.query).get("d")
    if d:  # local files: a path under the document root
        return str(safe_ref(d[0], where))
    path = unquote(u.path)
    if ".." in PurePosixPath(path).parts:
        safe_ref(path, where)  # refused: points outside the run
    if path.startswith("/data/upload/"):  # an uploaded file: /data/upload/<project>/<8 hex>-<name>
        return _UPLOAD_PREFIX.sub("", PurePosixPath(path).name)
    if u.scheme or u.netloc:  # cloud storage or a web server (s3://bucket/x.jpg, https://host/x.jpg)
        return PurePosixPath(path).name
    return str(safe_ref(path, where))


def read_tasks(src: Path, values: dict[str, int], key: str = "annotations"
               ) -> Iterator[tuple[str, str, np.ndarray]]:
    """``(image reference, where, mask)`` per task of a Label Studio JSON export.

    Args:
        src: the JSON file (a list of tasks).
        values: name -> label value (:meth:`RunImages.label_values`).
        key: ``annotations`` (the people's, what import reads) or ``predictions`` (the export's own).

    Raises:
        MaskImportError: truncated or malformed JSON, an unknown label, an undecodable RLE.
    """
    doc = load_json(src)
    if isinstance(doc, dict) and "data" in doc:
        doc = [doc]
    if not isinstance(doc, list):
        raise MaskImportError(f"{src}: not a Label Studio JSON export (a list of tasks)")
    for n, t in enumerate(doc):
        where = f"{src} task {t.get('id', n) if isinstance(t, dict) else n}"
        if not isinstance(t, dict):
            raise MaskImportError(f"{where}: not a task object")
        entries = [a for a in (t.get(key) or []) if isinstance(a, dict) and not a.get("was_cancelled")]
        if not entries:
            continue  # not corrected
        ref = task_ref(t, where)
        yield ref, f"{where} ({ref})", _result_mask(entries[-1].get("result") or [], values, f"{where} ({ref})")


def _result_mask(result: list[Any], values: dict[str, int], where: str) -> np.ndarray | None:
    size = None
    mask = None
    for r in result:
        if not isinstance(r, dict):
            raise MaskImportError(f"{where}: a result item is not an object")
        if r.get("type") != "brushlabels":
            raise MaskImportError(f"{where}: result type {r.get('type')!r}; only brush masks (brushlabels) are "
                                  "imported: paint the regions with the brush")
        try:
            w, h = int(r["original_width"]), int(r["original_height"])
            val = r["value"]
            names, rle = val["brushlabels"], val["rle"]
        except (KeyError, TypeError, ValueError) as e:
            raise MaskImportError(f"{where}: brush result without {e}") from e
        if val.get("format", "rle") != "rle":
            raise MaskImportError(f"{where}: brush format {val.get('format')!r}, expected 'rle'")
        if size is None:
            size, mask = (h, w), np.zeros((h, w), np.uint8)
        elif size != (h, w):
            raise MaskImportError(f"{where}: results disagree on the image size ({w}x{h} vs {size[1]}x{size[0]})")
        if len(names) != 1:
            raise MaskImportError(f"{where}: a brush region with {len(names)} labels; give each region one")
        if names[0] not in values:
            raise MaskImportError(f"{where}: unknown class name {names[0]!r}; the run's names are "
                                  f"{', '.join(values)}")
        mask[rle_region(rle, w, h, where)] = values[names[0]]
    return mask


def read(src: Path, values: dict[str, int]) -> Iterator[tuple[str, str, np.ndarray | None]]:
    """The corrected masks of a Label Studio JSON export (``read_tasks`` on ``annotations``).

    A folder is read as the ``tasks.json`` inside it. A task whose annotation has no region
    yields ``None``: all background at the image's size."""
    if src.is_dir():
        src = src / TASKS
    yield from read_tasks(src, values, "annotations")



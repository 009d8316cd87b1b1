"""``clipes show``: one picture that shows what every stage made of an image.

One row per image, every tile the same size (the image letterboxed into it)::

    image | ground truth | pseudo mask | CRF | segmenter | CAM c1 | CAA c1 | CAM c2 | CAA c2 | ...

Tiles are labelled above; masks are drawn in vivid display colours (:func:`display_palette`,
not the VOC colours of the PNG files, whose dark and grey entries vanish on a photo) over a
dimmed grey copy of the image with region outlines, ignored pixels (255) hatched; CAM/CAA heatmaps use the
jet colour map over the image. A legend at the bottom gives the colour of every class
that appears in the sheet, the ignore colour and the heatmap scale. A column appears when
at least one image of the sheet has it (ground truth, a refine run, a trained
``segmenter`` whose predictions are computed for the shown images); a row that lacks it
gets an empty tile saying so, so every column stays aligned.

The pure part is :func:`render_rows` (arrays in, ``(H, W, 3)`` uint8 RGB out);
:func:`show_run` reads the run folder and writes the PNG.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from clip_es.cam.store import load_cam
from clip_es.draw import _lab, display_palette, heatmap_overlay, mask_overlay, PALETTE  # noqa: F401 (re-exported)
from clip_es.errors import ClipEsError, ConfigError, RunDirError
from clip_es.refine.crf import IGNORE
from clip_es.refine.store import CRF, MASKS, output_path, read_output
from clip_es.rundir import RunDir, atomic_write_bytes

log = logging.getLogger(__name__)

#: Largest contact sheet (images).
MAX_IMAGES = 64

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_BG = (30, 30, 34)          # sheet background
_TILE_BG = (50, 50, 56)     # letterbox colour
_TEXT = (235, 235, 235)
_DIM_TEXT = (160, 160, 170)




@dataclass
class Tile:
    """One labelled panel: ``(H, W, 3)`` uint8 RGB image and a caption (with an optional colour swatch).

    ``image=None`` is an empty tile (a column this row has nothing for); ``note`` is written in it.
    """

    image: np.ndarray | None
    caption: str
    swatch: tuple[int, int, int] | None = None
    note: str = ""


@dataclass
class Row:
    """One image's panels and the label ids they show (for the legend)."""

    title: str
    tiles: list[Tile]
    labels: set[int] = field(default_factory=set)
    has_ignore: bool = False


# ----------------------------------------------------------------------------- pure drawing
def _fit(image: np.ndarray, w: int, h: int) -> np.ndarray:
    """Letterbox ``image`` into a ``(h, w, 3)`` tile, keeping its aspect ratio."""
    ih, iw = image.shape[:2]
    s = min(w / iw, h / ih)
    nw, nh = max(1, round(iw * s)), max(1, round(ih * s))
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_NEAREST if s >= 2 else cv2.INTER_LINEAR
    small = cv2.resize(image, (nw, nh), interpolation=interp)
    tile = np.empty((h, w, 3), np.uint8)
    tile[:] = _TILE_BG
    y, x = (h - nh) // 2, (w - nw) // 2
    tile[y:y + nh, x:x + nw] = small
    return tile


def ascii_text(text: str) -> str:
    """``text`` as OpenCV's fonts can draw it (ASCII only): accents dropped (``café`` ->
    ``cafe``), other characters (``熊``) as ``?``. For captions only; file names are unchanged."""
    import unicodedata

    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c if c.isascii() else "?" for c in decomposed if not unicodedata.combining(c))


def _text_width(text: str, scale: float, thick: int = 1) -> int:
    return cv2.getTextSize(ascii_text(text), _FONT, scale, thick)[0][0]


def _clip_text(text: str, width: int, scale: float) -> str:
    if _text_width(text, scale) <= width:
        return text
    while text and _text_width(text + "..", scale) > width:
        text = text[:-1]
    return text + ".."


def _put(canvas: np.ndarray, text: str, x: int, y: int, scale: float = 0.45, colour=_TEXT, thick: int = 1) -> None:
    cv2.putText(canvas, ascii_text(text), (x, y), _FONT, scale, colour, thick, cv2.LINE_AA)


def _swatch(canvas: np.ndarray, x: int, y: int, size: int, colour, hatched: bool = False) -> None:
    cv2.rectangle(canvas, (x, y), (x + size, y + size), tuple(int(c) for c in colour), -1)
    if hatched:
        for k in range(-size, size, 4):
            cv2.line(canvas, (x + max(k, 0), y + max(-k, 0)), (x + min(size, size + k), y + min(size, size - k)),
                     (120, 120, 120), 1)
    cv2.rectangle(canvas, (x, y), (x + size, y + size), (200, 200, 200), 1)


def render_rows(rows: list[Row], class_names: list[str], title: str = "", tile_w: int = 200,
                tile_h: int = 160) -> np.ndarray:
    """Lay rows of tiles out on one sheet with captions and a legend.

    Args:
        rows: one :class:`Row` per image.
        class_names: ``class_names[k]`` is label id ``k + 1``'s name.
        title: text of the top bar.
        tile_w, tile_h: size of every tile in pixels.

    Returns:
        ``(H, W, 3)`` uint8 RGB.
    """
    gap, margin, cap_h, title_h, row_title_h = 6, 12, 22, 34, 22
    ncols = max(len(r.tiles) for r in rows)
    width = 2 * margin + ncols * tile_w + (ncols - 1) * gap
    width = max(width, 520)
    row_h = row_title_h + cap_h + tile_h + 10

    # legend entries: classes seen anywhere in the sheet, then ignore and the heat scale
    labels = sorted(set().union(*(r.labels for r in rows)) - {0, IGNORE})
    entries = [(f"{k} {class_names[k - 1]}" if 0 < k <= len(class_names) else str(k), tuple(PALETTE[k]), False)
               for k in labels]
    entries = [("0 background (grey image)", (95, 95, 95), False)] + entries
    if any(r.has_ignore for r in rows):
        entries.append(("255 ignore (low confidence)", (255, 255, 255), True))
    sw, lscale = 14, 0.45
    label_col = margin + max(_text_width("legend", lscale), _text_width("heatmap", lscale)) + 14
    lines: list[list[tuple[str, tuple, bool, int]]] = [[]]
    x = label_col
    for text, colour, hatched in entries:
        w = sw + 6 + _text_width(text, lscale) + 18
        if x + w > width - margin and lines[-1]:
            lines.append([])
            x = label_col
        lines[-1].append((text, colour, hatched, x))
        x += w
    legend_h = 16 + 22 * len(lines) + 34

    height = title_h + len(rows) * row_h + legend_h
    sheet = np.empty((height, width, 3), np.uint8)
    sheet[:] = _BG
    _put(sheet, _clip_text(title, width - 2 * margin, 0.55), margin, 23, 0.55, _TEXT, 1)
    cv2.line(sheet, (0, title_h - 4), (width, title_h - 4), (70, 70, 78), 1)

    y0 = title_h
    for r in rows:
        _put(sheet, _clip_text(r.title, width - 2 * margin, 0.5), margin, y0 + 16, 0.5, (255, 220, 120), 1)
        for j, t in enumerate(r.tiles):
            x0 = margin + j * (tile_w + gap)
            cy = y0 + row_title_h + cap_h - 7
            tx = x0
            if t.swatch is not None:
                _swatch(sheet, x0, cy - 10, 11, t.swatch)
                tx = x0 + 16
            _put(sheet, _clip_text(t.caption, tile_w - (tx - x0), 0.45), tx, cy, 0.45)
            ty = y0 + row_title_h + cap_h
            if t.image is None:  # an aligned empty tile: this row has nothing for the column
                sheet[ty:ty + tile_h, x0:x0 + tile_w] = _TILE_BG
                note = _clip_text(t.note, tile_w - 12, 0.42)
                _put(sheet, note, x0 + (tile_w - _text_width(note, 0.42)) // 2, ty + tile_h // 2, 0.42, _DIM_TEXT)
            else:
                sheet[ty:ty + tile_h, x0:x0 + tile_w] = _fit(t.image, tile_w, tile_h)
        y0 += row_h

    # legend
    cv2.line(sheet, (0, y0 + 2), (width, y0 + 2), (70, 70, 78), 1)
    ly = y0 + 16
    for line in lines:
        _put(sheet, "legend" if line is lines[0] else "", margin, ly + 12, lscale, _DIM_TEXT)
        for text, colour, hatched, x in line:
            _swatch(sheet, x, ly, sw, colour, hatched)
            _put(sheet, text, x + sw + 6, ly + 12, lscale)
        ly += 22
    # heat scale bar
    bar_w = min(260, width - 2 * margin - 200)
    bx = label_col
    _put(sheet, "heatmap", margin, ly + 16, lscale, _DIM_TEXT)
    _put(sheet, "0", bx, ly + 16, lscale)
    gx = bx + 8 + _text_width("0", lscale)
    grad = cv2.applyColorMap(np.linspace(0, 255, bar_w).astype(np.uint8)[None], cv2.COLORMAP_JET)[..., ::-1]
    sheet[ly + 5:ly + 19, gx:gx + bar_w] = np.repeat(grad, 14, axis=0)
    _put(sheet, "1  (CAM / CAA score)", gx + bar_w + 6, ly + 16, lscale)
    return sheet


# ----------------------------------------------------------------------------- run reading
#: Mask columns of a row, in order: key, caption, what an empty tile says.
MASK_COLUMNS = (("gt", "ground truth", "no ground truth"), ("mask", "pseudo mask", "no pseudo mask"),
                ("crf", "CRF (no ignore)", "no CRF output"), ("seg", "segmenter", "no prediction"))


def image_row(image_id: str, image: np.ndarray, keys: np.ndarray, cam: np.ndarray, caa: np.ndarray,
              class_names: list[str], gt: np.ndarray | None = None, mask: np.ndarray | None = None,
              crf: np.ndarray | None = None, seg: np.ndarray | None = None,
              columns: tuple[str, ...] | None = None) -> Row:
    """The tiles of one image (pure: arrays in).

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        keys: ``(K,)`` 0-based class indices of ``cam``/``caa``.
        cam, caa: ``(K, H, W)`` maps in [0, 1].
        gt, mask, crf, seg: ``(H, W)`` uint8 label maps (ground truth, pseudo mask, CRF argmax,
            segmenter prediction), or ``None`` when absent.
        columns: the mask columns of the sheet (keys of :data:`MASK_COLUMNS`): each one gets a
            tile, an empty one when this row lacks it, so rows stay aligned. ``None``: the
            columns this row has.
    """
    names = [class_names[int(k)] for k in keys]
    tiles = [Tile(image, "image")]
    labels: set[int] = {int(k) + 1 for k in keys}
    has_ignore = False
    arrays = {"gt": gt, "mask": mask, "crf": crf, "seg": seg}
    for key, cap, empty in MASK_COLUMNS:
        arr = arrays[key]
        if columns is not None and key not in columns:
            continue
        if arr is None:
            if columns is not None:
                tiles.append(Tile(None, cap, note=empty))
            continue
        tiles.append(Tile(mask_overlay(image, arr), cap))
        labels |= {int(v) for v in np.unique(arr)}
        has_ignore |= bool((arr == IGNORE).any())
    for k, name, c, a in zip(keys, names, cam, caa):
        colour = tuple(int(v) for v in PALETTE[int(k) + 1])
        tiles.append(Tile(heatmap_overlay(image, c), f"CAM {name}", colour))
        tiles.append(Tile(heatmap_overlay(image, a), f"CAA {name}", colour))
    h, w = image.shape[:2]
    title = f"{image_id}  ({w}x{h})  labels: {', '.join(names) or 'none'}"
    return Row(title, tiles, labels, has_ignore)


def _segmenter_of_run(rd: RunDir, class_names: list[str]):
    """The run's trained ``segmenter`` (``RUN/segmenter/last.pt``) when it predicts the run's
    classes, else ``None`` (with a log line saying why)."""
    ckpt = rd.path / "segmenter" / "last.pt"
    if not ckpt.is_file():
        return None
    from clip_es.train.segment import load_segmenter

    try:
        seg = load_segmenter(ckpt, "cpu")
    except ClipEsError as e:
        log.warning("segmenter column left out: %s", e)
        return None
    if [c.name for c in seg.classes] != class_names:
        log.warning("segmenter column left out: %s predicts other classes than the run's", ckpt)
        return None
    return seg


def _pick_ids(available: list[str], ids: list[str] | None, n: int) -> list[str]:
    if not available:
        return []
    if not ids:
        return available[:n]
    missing = [i for i in ids if i not in available]
    if missing:
        raise ConfigError(f"image id(s) {', '.join(missing)} have no cam output in this run; "
                          f"valid ids include {', '.join(available[:5])}")
    if len(ids) == 1 and n > 1:  # a contact sheet starting at that image
        start = available.index(ids[0])
        return available[start:start + n]
    return list(ids)


def show_run(run: str | Path, out: str | Path, ids: list[str] | None = None, n: int = 1,
             tile: int = 200) -> Path:
    """Render images of a run (CAM, CAA, pseudo mask, GT) into a PNG.

    Args:
        run: the run folder (needs the cam stage; refine and GT are shown when present).
        out: PNG file to write.
        ids: image ids to show; one id with ``n > 1`` starts a sheet of ``n`` images there.
        n: number of images when ``ids`` is not given (the first ``n`` with cam outputs).
        tile: tile width in pixels (height is 4/5 of it).

    Returns:
        The written path.

    Raises:
        RunDirError: no cam outputs in the run. ConfigError: bad ids or options.
    """
    from clip_es.data.registry import dataset_of_run

    if not 1 <= n <= MAX_IMAGES:
        raise ConfigError(f"--n must be in 1..{MAX_IMAGES}, got {n}")
    if not 64 <= tile <= 1024:
        raise ConfigError(f"--tile must be in 64..1024 pixels, got {tile}")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out must be a .png file, got {out}")
    rd = RunDir(run)
    if not rd.manifest_path.is_file():
        raise RunDirError(f"{rd.path}: no manifest.json; is this a clipes run folder?")
    cam_dir = rd.stage_dir("cam")
    ds = dataset_of_run(rd)
    available = [i for i in ds.ids() if (cam_dir / f"{i}.npz").is_file()]
    chosen = _pick_ids(available, ids, n)
    if not chosen:
        raise RunDirError(f"{rd.path}: no cam outputs to show; run 'clipes cam --out {rd.path}' first")
    names = [c.name for c in ds.classes]
    seg_model = _segmenter_of_run(rd, names)
    items = []
    for image_id in chosen:
        maps = load_cam(cam_dir / f"{image_id}.npz")
        image = ds.load_image(image_id)
        try:
            gt = ds.load_gt(image_id)
        except ClipEsError as e:
            log.warning("%s: ground truth not shown (%s)", image_id, e)
            gt = None
        arrays = {"gt": gt}
        for key, kind in (("mask", MASKS), ("crf", CRF)):
            p = output_path(rd, kind, image_id)
            arrays[key] = read_output(p) if p.is_file() else None
        if seg_model is not None:
            from clip_es.train.segment import predict_labels

            arrays["seg"] = predict_labels(seg_model, image)
        items.append((image_id, image, maps, arrays))
    columns = tuple(key for key, _, _ in MASK_COLUMNS if any(a.get(key) is not None for *_, a in items))
    rows = [image_row(image_id, image, maps.keys, maps.cam, maps.caa, names, columns=columns, **arrays)
            for image_id, image, maps, arrays in items]
    kind = (rd.read_manifest().get("dataset") or {}).get("kind", "")
    title = f"clipes show   run {rd.path.resolve().name}   dataset {kind}/{ds.split}   {len(chosen)} image(s)"
    sheet = render_rows(rows, names, title, tile_w=tile, tile_h=tile * 4 // 5)
    ok, png = cv2.imencode(".png", np.ascontiguousarray(sheet[..., ::-1]))
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 3-channel array
        raise ClipEsError(f"could not encode the {sheet.shape[1]}x{sheet.shape[0]} sheet as PNG")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create folder {out.parent} for --out: {e.strerror}") from e
    atomic_write_bytes(out, png.tobytes())
    return out

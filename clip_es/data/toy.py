"""The procedural toy world: images with exact ground truth (SPEC section 6).

Eight foreground classes, each with a shape, a colour family and a texture, drawn
on one of six textured backgrounds. One to three objects per image, sizes from
small to large, occlusion allowed, and two deliberate co-occurrences: a ``boat``
sits on ``water`` and a ``kite`` flies in the ``sky`` most of the time, so the
class-related background set has something to fix.

The pure part is :func:`render_scene` (``(rng, size) -> Scene``); :func:`make_toy`
writes a dataset in PASCAL VOC layout. Every image is generated from its own
``numpy`` generator seeded with ``(seed, index)``, so a dataset is deterministic
for a seed and any subset of indices can be rendered independently.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from clip_es.errors import ConfigError

log = logging.getLogger(__name__)

#: Foreground classes, in class-id order (id = index + 1; 0 is background).
TOY_CLASSES: tuple[str, ...] = ("ball", "star", "heart", "ring", "boat", "kite", "flower", "fish")
#: Textured backgrounds; all of them are words of CLIP-ES's VOC background set.
TOY_BACKGROUNDS: tuple[str, ...] = ("grass", "water", "sky", "wall", "road", "ground")
#: class -> (background it usually sits on, probability of that background).
TOY_COOCCURRENCE: dict[str, tuple[str, float]] = {"boat": ("water", 0.8), "kite": ("sky", 0.8)}


@dataclass(frozen=True)
class ToyObject:
    """One drawn object: class id (1-based) and its bounding box ``(x0, y0, x1, y1)``."""

    class_id: int
    box: tuple[int, int, int, int]


@dataclass
class Scene:
    """A rendered toy image.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB.
        mask: ``(H, W)`` uint8, 0 = background, ``k`` = ``TOY_CLASSES[k-1]``.
        background: index into :data:`TOY_BACKGROUNDS`.
        objects: drawn objects, bottom to top (later ones may occlude earlier ones).
    """

    image: np.ndarray
    mask: np.ndarray
    background: int
    objects: list[ToyObject] = field(default_factory=list)

    @property
    def labels(self) -> list[int]:
        """Sorted class ids (1-based) with at least one visible pixel."""
        return sorted(int(c) for c in np.unique(self.mask) if c != 0)

    def caption(self, rng: np.random.Generator | None = None) -> str:
        """A caption naming the visible objects and the background."""
        return caption_for([TOY_CLASSES[c - 1] for c in self.labels], TOY_BACKGROUNDS[self.background], rng)


def caption_for(names: list[str], background: str | None, rng: np.random.Generator | None = None) -> str:
    """``"a photo of a star and a ring on grass."`` with optional word-order shuffling."""
    names = list(names)
    if rng is not None:
        rng.shuffle(names)
    if not names:
        return f"a photo of {background}." if background else "a photo."
    if len(names) == 1:
        things = f"a {names[0]}"
    else:
        things = ", ".join(f"a {n}" for n in names[:-1]) + f" and a {names[-1]}"
    where = {"sky": "in the sky", "water": "on the water"}.get(background or "", f"on {background}")
    return f"a photo of {things} {where}." if background else f"a photo of {things}."


# ----------------------------------------------------------------------------- colours
def _hsv_color(rng: np.random.Generator, hue: float, hue_jit: float, sat: tuple, val: tuple) -> np.ndarray:
    """One RGB colour (float32 in [0, 255]) from an OpenCV-style HSV family (hue in 0..180)."""
    h = (hue + rng.uniform(-hue_jit, hue_jit)) % 180
    s = rng.uniform(*sat)
    v = rng.uniform(*val)
    hsv = np.array([[[h, s, v]]], dtype=np.float32)
    hsv[..., 1:] *= 1.0  # s, v already in 0..255
    rgb = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)
    return rgb[0, 0].astype(np.float32)


def _noise(rng: np.random.Generator, h: int, w: int, scale: int) -> np.ndarray:
    """Smooth value noise in [-1, 1], ``(h, w)`` float32, feature size ~``scale`` px."""
    gh, gw = max(2, h // scale + 2), max(2, w // scale + 2)
    small = rng.uniform(-1, 1, size=(gh, gw)).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).clip(-1, 1)


# ----------------------------------------------------------------------------- backgrounds
def _background(kind: str, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A textured background ``(h, w, 3)`` float32 RGB in [0, 255]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "grass":
        base = _hsv_color(rng, 55, 6, (120, 200), (110, 170))
        img = np.broadcast_to(base, (h, w, 3)).copy()
        img *= (1 + 0.18 * _noise(rng, h, w, 24))[..., None]
        for _ in range(int(h * w / 60)):  # blades
            x, y = rng.integers(0, w), rng.integers(0, h)
            ln = rng.integers(4, 10)
            dx = rng.integers(-2, 3)
            shade = rng.uniform(0.6, 1.3)
            cv2.line(img, (int(x), int(y)), (int(x + dx), int(y - ln)), (base * shade).tolist(), 1)
    elif kind == "water":
        base = _hsv_color(rng, 108, 5, (150, 230), (120, 190))
        img = np.broadcast_to(base, (h, w, 3)).copy()
        freq = rng.uniform(0.25, 0.45)
        phase = _noise(rng, h, w, 40) * 3
        waves = np.sin(yy * freq + phase + np.sin(xx * 0.08) * 1.5)
        img *= (1 + 0.16 * waves + 0.06 * _noise(rng, h, w, 12))[..., None]
        img += (np.clip(waves - 0.85, 0, None) * 300)[..., None]  # glints
    elif kind == "sky":
        top = _hsv_color(rng, 104, 6, (110, 170), (200, 250))
        bottom = _hsv_color(rng, 100, 6, (40, 90), (220, 255))
        t = (yy / max(h - 1, 1))[..., None]
        img = top * (1 - t) + bottom * t
        clouds = np.clip(_noise(rng, h, w, 48) * 1.6 - 0.4, 0, 1) ** 1.5
        img = img * (1 - clouds[..., None]) + 248 * clouds[..., None]
    elif kind == "wall":
        brick = _hsv_color(rng, 6, 5, (130, 200), (120, 180))
        mortar = _hsv_color(rng, 20, 10, (10, 50), (170, 220))
        img = np.broadcast_to(mortar, (h, w, 3)).copy()
        bh = int(rng.integers(10, 16))
        bw = int(bh * rng.uniform(1.8, 2.6))
        for r, y in enumerate(range(0, h, bh)):
            off = (bw // 2) * (r % 2)
            for x in range(-off, w, bw):
                c = brick * rng.uniform(0.8, 1.15)
                cv2.rectangle(img, (x + 1, y + 1), (x + bw - 2, y + bh - 2), c.tolist(), -1)
        img *= (1 + 0.08 * _noise(rng, h, w, 6))[..., None]
    elif kind == "road":
        base = _hsv_color(rng, 0, 180, (0, 20), (70, 105))
        img = np.broadcast_to(base, (h, w, 3)).copy()
        img *= (1 + 0.12 * rng.standard_normal((h, w)).astype(np.float32) * 0.8)[..., None]
        y = int(rng.uniform(0.3, 0.7) * h)
        dash = int(rng.integers(14, 24))
        for x in range(int(rng.integers(-dash, 0)), w, dash * 2):
            cv2.rectangle(img, (x, y - 2), (x + dash, y + 2), (230, 225, 200), -1)
    elif kind == "ground":
        base = _hsv_color(rng, 15, 4, (90, 150), (90, 140))
        img = np.broadcast_to(base, (h, w, 3)).copy()
        img *= (1 + 0.2 * _noise(rng, h, w, 16) + 0.1 * _noise(rng, h, w, 4))[..., None]
        for _ in range(int(h * w / 400)):  # pebbles
            x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
            r = int(rng.integers(1, 4))
            cv2.circle(img, (x, y), r, (base * rng.uniform(0.6, 1.4)).tolist(), -1)
    else:  # pragma: no cover - guarded by TOY_BACKGROUNDS
        raise ConfigError(f"unknown toy background {kind!r}; valid: {', '.join(TOY_BACKGROUNDS)}")
    return img


# ----------------------------------------------------------------------------- shapes
def _star_points(cx: float, cy: float, r: float, rot: float, n: int = 5, inner: float = 0.45) -> np.ndarray:
    ang = rot + np.arange(2 * n) * math.pi / n
    rad = np.where(np.arange(2 * n) % 2 == 0, r, r * inner)
    return np.stack([cx + rad * np.sin(ang), cy - rad * np.cos(ang)], 1)


def _rotate(pts: np.ndarray, cx: float, cy: float, rot: float) -> np.ndarray:
    c, s = math.cos(rot), math.sin(rot)
    d = pts - [cx, cy]
    return np.stack([cx + d[:, 0] * c - d[:, 1] * s, cy + d[:, 0] * s + d[:, 1] * c], 1)


def _poly(canvas: np.ndarray, pts: np.ndarray, value: int = 1) -> None:
    cv2.fillPoly(canvas, [np.round(pts * 4).astype(np.int32)], value, lineType=cv2.LINE_8, shift=2)


def _draw_object(name: str, rng: np.random.Generator, h: int, w: int, cx: float, cy: float, r: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Draw one object. Returns ``(support (h, w) bool, colour layer (h, w, 3) float32)``."""
    sup = np.zeros((h, w), np.uint8)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rot = rng.uniform(-0.5, 0.5)
    layer = np.zeros((h, w, 3), np.float32)
    if name == "ball":
        cv2.circle(sup, (int(cx), int(cy)), int(r), 1, -1)
        col = _hsv_color(rng, 0, 6, (170, 240), (170, 240))
        d = np.sqrt((xx - cx + r * 0.35) ** 2 + (yy - cy + r * 0.35) ** 2) / max(r, 1)
        layer[:] = col
        layer *= np.clip(1.25 - 0.55 * d, 0.45, 1.3)[..., None]
    elif name == "star":
        _poly(sup, _star_points(cx, cy, r, rot))
        col = _hsv_color(rng, 27, 4, (180, 250), (210, 255))
        layer[:] = col
        layer *= (1 + 0.08 * _noise(rng, h, w, 5))[..., None]
    elif name == "heart":
        t = np.linspace(0, 2 * math.pi, 60)
        hx = 16 * np.sin(t) ** 3
        hy = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([cx + hx / 17 * r, cy + hy / 17 * r], 1)
        _poly(sup, _rotate(pts, cx, cy, rot))
        col = _hsv_color(rng, 165, 6, (120, 200), (190, 250))
        layer[:] = col
        hl = np.exp(-(((xx - cx + r * 0.4) ** 2 + (yy - cy + r * 0.3) ** 2) / (0.1 * r * r + 1)))
        layer += (hl * 60)[..., None]
    elif name == "ring":
        cv2.circle(sup, (int(cx), int(cy)), int(r), 1, -1)
        cv2.circle(sup, (int(cx), int(cy)), int(r * rng.uniform(0.45, 0.6)), 0, -1)
        col = _hsv_color(rng, 135, 6, (140, 220), (130, 210))
        ang = np.arctan2(yy - cy, xx - cx)
        layer[:] = col
        layer *= (1 + 0.18 * np.sin(ang * 8))[..., None]
    elif name == "boat":
        hull = np.array([[-1.0, 0.15], [1.0, 0.15], [0.65, 0.6], [-0.65, 0.6]])
        sail = np.array([[-0.05, 0.1], [-0.05, -0.95], [0.75, 0.1]])
        hull_pts = _rotate(hull * r + [cx, cy], cx, cy, rot * 0.4)
        sail_pts = _rotate(sail * r + [cx, cy], cx, cy, rot * 0.4)
        hs = np.zeros((h, w), np.uint8)
        _poly(hs, hull_pts)
        _poly(sup, sail_pts)
        sup |= hs
        wood = _hsv_color(rng, 12, 4, (140, 200), (90, 150))
        planks = 1 + 0.15 * np.sin(yy * 1.2)
        layer[:] = 245
        layer[hs > 0] = (wood * planks[..., None])[hs > 0]
    elif name == "kite":
        pts = np.array([[0, -1.0], [0.6, -0.15], [0, 1.0], [-0.6, -0.15]]) * r + [cx, cy]
        pts = _rotate(pts, cx, cy, rot)
        _poly(sup, pts)
        tail = _rotate(np.array([[0, 1.0], [0.15, 1.5], [-0.1, 1.9]]) * r + [cx, cy], cx, cy, rot)
        cv2.polylines(sup, [np.round(tail).astype(np.int32)], False, 1, max(1, int(r / 10)))
        c1 = _hsv_color(rng, 14, 4, (200, 255), (220, 255))
        c2 = _hsv_color(rng, 90, 6, (150, 230), (130, 200))
        d = _rotate(np.stack([xx.ravel(), yy.ravel()], 1), cx, cy, -rot).reshape(h, w, 2)
        quad = ((d[..., 0] > cx) ^ (d[..., 1] > cy - 0.15 * r))
        layer[:] = c1
        layer[quad] = c2
    elif name == "flower":
        petal = _hsv_color(rng, 150 if rng.random() < 0.5 else 0, 6, (0, 60), (225, 255))
        n = int(rng.integers(5, 8))
        for i in range(n):
            a = rot + i * 2 * math.pi / n
            px, py = cx + 0.55 * r * math.cos(a), cy + 0.55 * r * math.sin(a)
            cv2.ellipse(sup, (int(px), int(py)), (max(1, int(0.45 * r)), max(1, int(0.28 * r))),
                        math.degrees(a), 0, 360, 1, -1)
        center = _hsv_color(rng, 25, 3, (200, 255), (200, 255))
        layer[:] = petal
        inner = (xx - cx) ** 2 + (yy - cy) ** 2 < (0.3 * r) ** 2
        cv2.circle(sup, (int(cx), int(cy)), max(1, int(0.3 * r)), 1, -1)
        layer[inner] = center
    elif name == "fish":
        cv2.ellipse(sup, (int(cx), int(cy)), (max(1, int(r)), max(1, int(0.5 * r))), math.degrees(rot), 0, 360, 1, -1)
        tail = np.array([[0.85, 0], [1.45, -0.5], [1.45, 0.5]]) * r + [cx, cy]
        _poly(sup, _rotate(tail, cx, cy, rot))
        col = _hsv_color(rng, 88, 5, (120, 200), (150, 220))
        d = _rotate(np.stack([xx.ravel(), yy.ravel()], 1), cx, cy, -rot).reshape(h, w, 2)
        layer[:] = col
        layer *= (1 + 0.22 * np.sign(np.sin((d[..., 0] - cx) / max(r, 1) * 9)))[..., None]
        eye = (d[..., 0] - cx + 0.55 * r) ** 2 + (d[..., 1] - cy + 0.1 * r) ** 2 < (0.1 * r + 0.5) ** 2
        layer[eye] = 20
    else:  # pragma: no cover
        raise ConfigError(f"unknown toy class {name!r}; valid: {', '.join(TOY_CLASSES)}")
    return sup.astype(bool), layer


def render_scene(rng: np.random.Generator, size: tuple[int, int] | None = None) -> Scene:
    """Render one random toy image.

    Args:
        rng: the generator that decides everything in the image.
        size: ``(H, W)``; by default drawn from 128..208 x 160..256.

    Returns:
        A :class:`Scene` with 1-3 visible objects.
    """
    if size is None:
        h, w = int(rng.integers(128, 209)), int(rng.integers(160, 257))
    else:
        h, w = size
    n_obj = int(rng.choice([1, 2, 3], p=[0.35, 0.4, 0.25]))
    names = [TOY_CLASSES[i] for i in rng.integers(0, len(TOY_CLASSES), size=n_obj)]
    # Background: co-occurrence of the first co-occurring object decides it most of the time.
    bg = int(rng.integers(0, len(TOY_BACKGROUNDS)))
    for name in names:
        if name in TOY_COOCCURRENCE:
            place, p = TOY_COOCCURRENCE[name]
            if rng.random() < p:
                bg = TOY_BACKGROUNDS.index(place)
            break
    img = _background(TOY_BACKGROUNDS[bg], rng, h, w)
    mask = np.zeros((h, w), np.uint8)
    objects: list[ToyObject] = []
    side = min(h, w)
    for name in names:
        cid = TOY_CLASSES.index(name) + 1
        for _attempt in range(6):
            r = side * 0.5 * math.exp(rng.uniform(math.log(0.16), math.log(0.62)))
            cx = rng.uniform(r * 0.6, w - r * 0.6)
            cy = rng.uniform(r * 0.6, h - r * 0.6)
            sup, layer = _draw_object(name, rng, h, w, cx, cy, r)
            if sup.sum() < 40:
                continue
            # Keep previously drawn objects at least 40% visible.
            ok = all((mask == o.class_id).sum() == 0 or ((mask == o.class_id) & ~sup).sum()
                     >= 0.4 * (mask == o.class_id).sum() for o in objects)
            if ok:
                break
        else:
            continue
        shade = 1 + 0.06 * _noise(rng, h, w, 8)
        img[sup] = (layer * shade[..., None])[sup]
        mask[sup] = cid
        ys, xs = np.nonzero(sup)
        objects.append(ToyObject(cid, (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))))
    if not objects:  # extremely unlikely; guarantee at least one object
        return render_scene(rng, (h, w))
    # Soft edges: blur the composite slightly so shapes are not pixel-perfect cut-outs.
    img = cv2.GaussianBlur(img, (3, 3), 0.6)
    img += rng.normal(0, 3.0, img.shape).astype(np.float32)
    return Scene(np.clip(img, 0, 255).astype(np.uint8), mask, bg, objects)


def scene_for(seed: int, index: int, size: tuple[int, int] | None = None) -> Scene:
    """The deterministic scene number ``index`` of world ``seed``."""
    return render_scene(np.random.default_rng([seed, index]), size)


# ----------------------------------------------------------------------------- writer
def _voc_xml(image_id: str, scene: Scene) -> str:
    h, w = scene.mask.shape
    objs = "".join(
        f"<object><name>{TOY_CLASSES[o.class_id - 1]}</name><bndbox><xmin>{o.box[0]}</xmin>"
        f"<ymin>{o.box[1]}</ymin><xmax>{o.box[2]}</xmax><ymax>{o.box[3]}</ymax></bndbox></object>"
        for o in scene.objects if (scene.mask == o.class_id).any())
    return (f"<annotation><filename>{image_id}.jpg</filename><size><width>{w}</width><height>{h}</height>"
            f"<depth>3</depth></size><background>{TOY_BACKGROUNDS[scene.background]}</background>{objs}"
            "</annotation>\n")


def make_toy(out: str | Path, n: int = 1000, seed: int = 1, val_fraction: float = 0.2,
             progress: bool = True) -> Path:
    """Write a toy dataset of ``n`` images in PASCAL VOC layout.

    Layout: ``JPEGImages/*.jpg`` (quality 95), ``SegmentationClass/*.png`` (VOC palette,
    values 0..8, no 255), ``Annotations/*.xml`` (object names and boxes),
    ``ImageSets/Segmentation/{train,val,trainval}.txt``, ``classes.txt``,
    ``background.txt`` and ``labels.json`` (``{id: [class names]}``).
    The last ``round(n * val_fraction)`` images form ``val``.

    Returns:
        The dataset root.
    """
    from tqdm import tqdm

    from clip_es.data.image_io import mask_to_png_bytes
    from clip_es.rundir import atomic_write_bytes

    if n < 1:
        raise ConfigError(f"--n must be at least 1, got {n}")
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    root = Path(out)
    for sub in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = [f"toy_{seed}_{i:06d}" for i in range(n)]
    labels: dict[str, list[str]] = {}
    for i in tqdm(range(n), desc="toy make", disable=not progress, unit="img"):
        scene = scene_for(seed, i)
        iid = ids[i]
        ok, jpg = cv2.imencode(".jpg", scene.image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
        atomic_write_bytes(root / "JPEGImages" / f"{iid}.jpg", jpg.tobytes())
        atomic_write_bytes(root / "SegmentationClass" / f"{iid}.png", mask_to_png_bytes(scene.mask))
        atomic_write_bytes(root / "Annotations" / f"{iid}.xml", _voc_xml(iid, scene).encode())
        labels[iid] = [TOY_CLASSES[c - 1] for c in scene.labels]
    n_val = int(round(n * val_fraction))
    splits = {"train": ids[: n - n_val], "val": ids[n - n_val:], "trainval": ids}
    for name, part in splits.items():
        atomic_write_bytes(root / "ImageSets" / "Segmentation" / f"{name}.txt", "".join(f"{i}\n" for i in part).encode())
    atomic_write_bytes(root / "classes.txt", "".join(f"{c}\n" for c in TOY_CLASSES).encode())
    atomic_write_bytes(root / "background.txt", "".join(f"{b}\n" for b in TOY_BACKGROUNDS).encode())
    atomic_write_bytes(root / "labels.json", json.dumps(labels, indent=0).encode())
    log.info("wrote %d toy images (%d val) to %s", n, n_val, root)
    return root

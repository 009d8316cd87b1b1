"""Reading images and masks from untrusted files.

Every image becomes ``(H, W, 3)`` uint8 RGB whatever its mode (grayscale, RGBA, CMYK,
palette, 16-bit), with the EXIF orientation applied (so it looks as a viewer shows
it; ground truth drawn on the rotated view stays aligned, and masks are never
EXIF-rotated since PNG masks carry no orientation). Images whose longer side exceeds
``MAX_SIDE`` are refused before decoding pixels (their header is read only), which bounds
memory: an accepted image needs at most about ``7 * H * W`` bytes while decoding (PIL's
4-byte pixels plus the 3-byte array returned), 340 MB for an 8000x6000 photo.
Failures raise :class:`~clip_es.errors.ImageError` naming the file; so does any
exception a decoder raises on a malformed file (files from the wild can trip decoders
in unexpected ways; none of them may stop a batch).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from clip_es.errors import ImageError, first_line

log = logging.getLogger(__name__)

#: Longest accepted image side in pixels (an 8000x6000 photo is 8000). Larger images
#: are refused with a message; resize them first. 48 MP RGB = 144 MB decoded.
MAX_SIDE = 8192
#: Decompression-bomb guard for PIL (pixels).
Image.MAX_IMAGE_PIXELS = MAX_SIDE * MAX_SIDE


def read_image(path: str | Path, max_side: int = MAX_SIDE) -> np.ndarray:
    """Decode an image file to ``(H, W, 3)`` uint8 RGB.

    Raises:
        ImageError: missing, empty, truncated or non-image file, or a side above ``max_side``.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: image file not found")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: image file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if max(im.size) > max_side:
                    raise ImageError(f"{path}: image is {im.size[0]}x{im.size[1]}, above the {max_side}-pixel "
                                     "side limit; downscale it first")
                im.load()
                try:
                    ImageOps.exif_transpose(im, in_place=True)
                except Exception as e:  # noqa: BLE001 - a broken EXIF block: use the pixels as stored,
                    log.debug("%s: EXIF orientation ignored (%s)", path, e)  # as image_size does
                return _to_rgb(im)
    except ImageError:
        raise
    except MemoryError as e:
        raise ImageError(f"{path}: out of memory decoding it") from e
    except Exception as e:  # noqa: BLE001 - decoders raise many types on malformed files
        raise ImageError(f"{path}: not a readable image ({type(e).__name__}: {first_line(e)})") from e


def as_rgb_image(image, what: str = "image") -> np.ndarray:
    """An image given in memory or by path as ``(H, W, 3)`` uint8 RGB (the in-memory API's input rule).

    Args:
        image: a PIL image (any mode; converted as :func:`read_image` converts files), an
            ``(H, W, 3)`` uint8 RGB array (returned as it is, not copied), or a file path
            (``str`` or :class:`~pathlib.Path`, read with :func:`read_image`).
        what: how error messages name the input (``"image 3"``).

    Raises:
        ImageError: an unreadable file, a wrong array shape or dtype, or another type; the
            message names the value and the conversion that fixes it.
    """
    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, Image.Image):
        try:
            return _to_rgb(image)
        except Exception as e:  # noqa: BLE001 - a lazily decoded PIL image can fail here
            raise ImageError(f"{what}: PIL image ({image.mode}, {image.size[0]}x{image.size[1]}) cannot be "
                             f"decoded ({type(e).__name__}: {first_line(e)})") from e
    if isinstance(image, np.ndarray):
        if image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 4)):
            fix = "np.repeat(a[..., None], 3, axis=2)" if image.ndim == 2 else \
                "np.repeat(a, 3, axis=2)" if image.shape[2] == 1 else "a[..., :3]"
            raise ImageError(f"{what}: array of shape {image.shape}, expected (H, W, 3) RGB; convert it, e.g. "
                             f"{fix}, or pass a PIL image")
        if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
            raise ImageError(f"{what}: array of shape {image.shape}, expected (H, W, 3) RGB with H, W >= 1")
        if image.dtype != np.uint8:
            raise ImageError(f"{what}: array of dtype {image.dtype}, expected uint8 in 0..255; convert it, e.g. "
                             "np.clip(a * 255, 0, 255).round().astype(np.uint8) for floats in [0, 1]")
        if max(image.shape[:2]) > MAX_SIDE:
            raise ImageError(f"{what}: image is {image.shape[1]}x{image.shape[0]}, above the {MAX_SIDE}-pixel "
                             "side limit; downscale it first")
        return image
    raise ImageError(f"{what}: got a {type(image).__name__}; pass a PIL image, an (H, W, 3) uint8 RGB numpy "
                     "array, or an image file path")


def image_size(path: str | Path) -> tuple[int, int]:
    """``(H, W)`` of an image as :func:`read_image` would return it, from the header only.

    The EXIF orientation is taken into account (orientations 5-8 swap height and width),
    so the result can be compared with a ground-truth mask without decoding pixels.

    Raises:
        ImageError: missing, empty or non-image file.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            w, h = im.size
            try:
                orientation = int(im.getexif().get(0x0112, 1))
            except Exception:  # a broken EXIF block: read_image's exif_transpose ignores it too
                orientation = 1
    except Exception as e:  # noqa: BLE001 - as in read_image
        raise ImageError(f"{path}: not a readable image ({type(e).__name__}: {first_line(e)})") from e
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        hi = arr.max() if arr.size else 1.0
        arr /= 65535.0 if hi > 255 else 255.0  # in place: one float copy of a (large) image at most
        arr *= 255.0
        np.clip(arr, 0, 255, out=arr)
        gray = arr.astype(np.uint8)
        del arr
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(bg, rgba).convert("RGB"))
    return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))  # no extra copy for RGB


def read_mask(path: str | Path) -> np.ndarray:
    """Read a label PNG as ``(H, W)`` uint8 indices (palette indices, not colours)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise ImageError(f"{path}: mask must be a palette or grayscale PNG, got mode {im.mode}")
            return np.asarray(im).copy()
    except ImageError:
        raise
    except FileNotFoundError as e:
        raise ImageError(f"{path}: mask file not found") from e
    except Exception as e:  # noqa: BLE001 - as in read_image: a corrupt file is an ImageError
        raise ImageError(f"{path}: not a readable mask ({type(e).__name__}: {first_line(e)})") from e


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map as a flat 768-long list (index 255 is the ignore colour)."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def mask_to_png_bytes(mask: np.ndarray) -> bytes:
    """Encode a ``(H, W)`` uint8 mask as a palette PNG (VOC colours) in memory."""
    import io

    im = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="P")
    im.putpalette(voc_palette())
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def read_gt(mask_path: Path, num_classes: int, image_path: Path) -> np.ndarray:
    """Read a ground-truth mask and check it against the class count and, when the image
    file exists, its image's size (after EXIF rotation).

    Raises:
        ImageError: unreadable mask, values outside ``0..K`` and not 255, or a size mismatch.
    """
    from clip_es.data.base import validate_gt

    return validate_gt(read_mask(mask_path), num_classes, mask_path,
                       image_size(image_path) if image_path.is_file() else None, image_path)

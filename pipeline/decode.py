"""Image bytes -> RGB uint8 array: the one decode path of the annotate job.

Runs once per image, so it does as little as it can: one lazy ``Image.open``, an optional
JPEG downscale-on-decode (``draft``, which only reconfigures the decoder), a pixel-cap check on
the size to be decoded (from the header, before any pixel is decoded), one load, a mode
conversion only when the mode is not RGB, a transpose only when the EXIF orientation asks for
one, and one copy into numpy.

Every failure becomes :class:`DecodeError` whose message says what is wrong (empty, not an
image, truncated/corrupt, pixel cap with the numbers, unsupported mode), so the caller can
record it on the image's row and go on.

Conversions to RGB (documented in the README):
- EXIF orientation is applied; ``width``/``height`` are in the displayed (rotated) frame.
- Greyscale (``L``, ``1``) is replicated to three channels.
- CMYK uses Pillow's conversion (no ICC colour management).
- Transparency (``RGBA``, ``LA``, palette with ``tRNS``/GIF transparency, ``PA``) is
  composited on white, the background a viewer shows; dropping alpha instead would expose
  arbitrary colours stored under fully transparent pixels.
- 16-bit samples (``I;16*``, ``I``) are scaled to 8 bits by ``round(v * 255 / 65535)``
  (not clipped); 32-bit float images are taken as [0, 1] when their maximum is <= 1, else
  clipped to [0, 255].
- Animated or multi-frame images (GIF, APNG, WebP, TIFF) give their first frame.
- Truncated files are errors (no partial grey images); broken EXIF metadata is ignored.
- Pillow refuses images above twice its own limit (about 179 MP) at open, whatever
  ``max_pixels`` says; that refusal is reported as a pixel-cap DecodeError too.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

# Pillow's own warning threshold (about 89.5 MP): a decoded RGB image of this size is ~270 MB.
DEFAULT_MAX_PIXELS = 89_478_485

_ORIENTATION_TAG = 0x0112
_TRANSPOSE_FOR_ORIENTATION = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT,),
    3: (Image.Transpose.ROTATE_180,),
    4: (Image.Transpose.FLIP_TOP_BOTTOM,),
    5: (Image.Transpose.TRANSPOSE,),
    6: (Image.Transpose.ROTATE_270,),   # PIL rotates counter-clockwise: 270 CCW == 90 CW
    7: (Image.Transpose.TRANSVERSE,),
    8: (Image.Transpose.ROTATE_90,),
}
_SWAPS_AXES = frozenset((5, 6, 7, 8))
_DRAFT_FORMATS = frozenset(("JPEG", "MPO"))
_SIXTEEN_BIT_MODES = frozenset(("I;16", "I;16L", "I;16B", "I;16N", "I"))
_WHITE = (255, 255, 255)


class DecodeError(Exception):
    """An image could not be turned into RGB pixels; the message says why."""


@dataclass
class Decoded:
    """A decoded image.

    ``width``/``height`` are the original size after EXIF orientation and before any
    downscale-on-decode; ``array`` may be smaller (JPEG ``draft``) and ``scale`` is
    ``array width / width`` (1.0 when not downscaled). The array is (H, W, 3) uint8 RGB,
    C-contiguous and writable. Map array coordinates back with ``width / array.shape[1]`` and
    ``height / array.shape[0]`` for exactness (draft rounds each side up).
    """

    array: np.ndarray
    width: int
    height: int
    scale: float


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft_size: int | None = None) -> Decoded:
    """Decode image bytes to RGB; raise :class:`DecodeError` (only) on any failure.

    ``max_pixels`` refuses images whose header announces more pixels, before decoding them
    (for a JPEG decoded with ``draft`` the downscaled size counts: that is what gets allocated).
    ``draft_size`` is the model input's shorter side: a JPEG whose shorter side is at least
    twice it is decoded at 1/2, 1/4 or 1/8 scale, keeping the shorter side >= ``draft_size``.
    """
    if not data:
        raise DecodeError("empty file (0 bytes): nothing to decode")
    try:
        with warnings.catch_warnings():
            # Pillow warns about bombs (our cap below replaces that) and about broken metadata
            # (which we tolerate); a warning per image would flood worker logs.
            warnings.simplefilter("ignore")
            return _decode(data, max_pixels, draft_size)
    except DecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"pixel cap exceeded (Pillow's decompression-bomb limit): {exc}") from None
    except Image.UnidentifiedImageError:
        raise DecodeError(
            f"not an image: no decoder recognises these {len(data)} bytes "
            f"(they start with {bytes(data[:12])!r})") from None
    except MemoryError:
        raise DecodeError(f"out of memory while decoding a {len(data)}-byte image; "
                          "lower max_pixels or give the workers more memory") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError) as exc:
        # Pillow reports truncated and corrupt data with these (e.g. "image file is truncated").
        raise DecodeError(f"truncated or corrupt image data: {exc}") from None
    except Exception as exc:  # decode must never raise anything but DecodeError
        raise DecodeError(f"decode failed ({type(exc).__name__}): {exc}") from None


def _decode(data: bytes, max_pixels: int, draft_size: int | None) -> Decoded:
    with Image.open(io.BytesIO(data)) as im:
        src_w, src_h = im.size  # from the header; nothing decoded yet
        if src_w <= 0 or src_h <= 0:
            raise DecodeError(f"image header gives an empty size {src_w}x{src_h}")
        fmt = im.format
        if (draft_size and fmt in _DRAFT_FORMATS
                and min(src_w, src_h) >= 2 * draft_size):
            im.draft("RGB", (draft_size, draft_size))  # only reconfigures the decoder
        out_w, out_h = im.size
        if out_w * out_h > max_pixels:
            at = f" (decoded at {out_w}x{out_h})" if (out_w, out_h) != (src_w, src_h) else ""
            raise DecodeError(
                f"pixel cap exceeded: {fmt} image of {src_w}x{src_h} = {src_w * src_h} pixels{at} "
                f"> max_pixels = {max_pixels}; refused without decoding (raise max_pixels to accept it)")
        im.load()
        orientation = _orientation(im)
        rgb = _to_rgb(im, fmt)
        for method in _TRANSPOSE_FOR_ORIENTATION.get(orientation, ()):
            rgb = rgb.transpose(method)
        array = np.array(rgb, dtype=np.uint8)  # one copy, writable, C-contiguous
    if array.ndim != 3 or array.shape[2] != 3:
        raise DecodeError(f"internal: converted {fmt} image has array shape {array.shape}, not (H, W, 3)")
    width, height = (src_h, src_w) if orientation in _SWAPS_AXES else (src_w, src_h)
    return Decoded(array=array, width=width, height=height, scale=array.shape[1] / width)


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1..8); a missing or malformed EXIF block counts as upright."""
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
        return int(value) if value in _TRANSPOSE_FOR_ORIENTATION else 1
    except Exception:  # broken metadata must not lose an otherwise good image
        return 1


def _to_rgb(im: Image.Image, fmt: str | None) -> Image.Image:
    """Any Pillow mode -> an RGB image (the rules are in the module docstring)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P" or mode == "PA":
        has_alpha = mode == "PA" or "transparency" in im.info
        return _on_white(im.convert("RGBA")) if has_alpha else im.convert("RGB")
    if mode in ("RGBA", "LA", "RGBa", "La"):
        return _on_white(im.convert("RGBA"))
    if mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(im).astype(np.uint32)
        np.clip(wide, 0, 65535, out=wide)
        grey = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
    if mode == "F":
        values = np.nan_to_num(np.asarray(im, dtype=np.float32))
        peak = float(values.max()) if values.size else 0.0
        values = values * 255.0 if peak <= 1.0 else values
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
    if mode in ("L", "1", "CMYK", "YCbCr", "RGBX"):
        return im.convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError:
        raise DecodeError(f"unsupported {fmt} pixel mode {mode!r}: cannot convert it to RGB") from None


def _on_white(rgba: Image.Image) -> Image.Image:
    """Composite an RGBA image over an opaque white background."""
    background = Image.new("RGB", rgba.size, _WHITE)
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background

"""The bad-input corpus: every awkward image and shard the annotate job must survive.

Each :class:`Case` builds its bytes in memory (no files in the repo) and says what decode must
give: ``ok`` with the displayed ``size`` and colour probes, or a ``DecodeError`` whose message
contains ``error``. ``write_images`` / ``write_corpus_tar`` / ``write_corrupt_tar`` /
``write_traversal_tar`` put them in a directory for the source and end-to-end tests.
Case names have distinct stems, so in a tar each case's key is its name without the extension.
"""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)
CYAN = (0, 255, 255)
EXIF_ORIENTATION = 0x0112

# 16-bit sample values of the four bands of ``grey16.png`` and their 8-bit results (v / 257).
GREY16_BANDS = (1000, 32896, 65535, 0)
GREY16_EXPECTED = (4, 128, 255, 0)


@dataclass(frozen=True)
class Case:
    """One corpus image: its file name, its bytes, and what decoding it must give."""

    name: str
    build: Callable[[], bytes]
    ok: bool
    error: str | None = None                 # substring of the DecodeError message when not ok
    size: tuple[int, int] | None = None      # (width, height) after EXIF orientation
    # ((fx, fy), rgb): the pixel at fraction (fx, fy) of the displayed image, +-tol per channel
    probes: tuple[tuple[tuple[float, float], tuple[int, int, int]], ...] = field(default=())
    tol: int = 0

    def data(self) -> bytes:
        return self.build()


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def halves(size: tuple[int, int], left: tuple, right: tuple, mode: str = "RGB") -> Image.Image:
    """An image whose left half is ``left`` and right half ``right``."""
    w, h = size
    img = Image.new(mode, size, left)
    img.paste(Image.new(mode, (w - w // 2, h), right), (w // 2, 0))
    return img


def gradient_rgb(width: int, height: int) -> np.ndarray:
    """A smooth (JPEG-friendly) RGB ramp: R follows x, G follows y, B is constant."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    return np.stack([x, y, np.full_like(x, 96)], axis=2).round().astype(np.uint8)


def jpeg_with_orientation(orientation: int, size: tuple[int, int] = (48, 32)) -> bytes:
    """A JPEG stored left-red/right-blue, tagged with an EXIF orientation."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return encode(halves(size, RED, BLUE), "JPEG", quality=95, exif=exif.tobytes())


def large_jpeg(width: int = 1600, height: int = 1200, orientation: int | None = None) -> bytes:
    """A big smooth JPEG for downscale-on-decode (draft) tests."""
    kwargs = {"quality": 90}
    if orientation:
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = orientation
        kwargs["exif"] = exif.tobytes()
    return encode(Image.fromarray(gradient_rgb(width, height)), "JPEG", **kwargs)


def huge_png(width: int = 10_000, height: int = 10_000) -> bytes:
    """A single-colour 1-bit PNG of ``width * height`` pixels, written by hand in ~10 KB.

    Building it through Pillow would allocate the whole image; here the rows are zlib-compressed
    one at a time, so a 100-megapixel bomb costs a few MB of zeros and well under a second.
    """
    def chunk(tag: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed 1-bit samples
    comp = zlib.compressobj(9)
    parts = [comp.compress(row) for _ in range(height)]
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


@cache
def _good_jpeg() -> bytes:
    return encode(halves((64, 48), GREEN, BLUE), "JPEG", quality=95)


def _truncated_jpeg() -> bytes:
    data = encode(Image.fromarray(gradient_rgb(128, 96)), "JPEG", quality=95)
    return data[: len(data) // 2]


def _cmyk_jpeg() -> bytes:
    return encode(halves((32, 24), (255, 0, 0, 0), (0, 0, 0, 255), mode="CMYK"), "JPEG", quality=95)


def _grey16_png() -> bytes:
    bands = np.repeat(np.array(GREY16_BANDS, dtype=np.uint16), 16)[None, :].repeat(8, 0)
    img = Image.fromarray(bands)
    assert img.mode == "I;16", img.mode
    return encode(img, "PNG")


def _palette_trns_png() -> bytes:
    img = Image.new("P", (32, 16), 0)
    img.putpalette(list(RED) + list(BLUE) + [0, 0, 0] * 254)
    img.paste(1, (16, 0, 32, 16))
    return encode(img, "PNG", transparency=0)  # index 0 (red) is fully transparent


def _rgba_png() -> bytes:
    arr = np.zeros((10, 30, 4), dtype=np.uint8)
    arr[:, :10] = (255, 0, 0, 0)      # transparent red -> white
    arr[:, 10:20] = (0, 255, 0, 255)  # opaque green
    arr[:, 20:] = (0, 0, 0, 128)      # half-transparent black -> mid grey
    return encode(Image.fromarray(arr, "RGBA"), "PNG")


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


CASES: tuple[Case, ...] = (
    Case("zero_byte.jpg", lambda: b"", ok=False, error="empty"),
    Case("truncated.jpg", _truncated_jpeg, ok=False, error="truncated"),
    Case("not_an_image.jpg", lambda: b"this is a text file, not a JPEG\n" * 4, ok=False,
         error="not an image"),
    Case("bomb_100mp.png", huge_png, ok=False, error="pixel cap"),
    Case("good.jpg", _good_jpeg, ok=True, size=(64, 48),
         probes=(((0.2, 0.5), GREEN), ((0.8, 0.5), BLUE)), tol=12),
    Case("cmyk.jpg", _cmyk_jpeg, ok=True, size=(32, 24),
         probes=(((0.2, 0.5), CYAN), ((0.8, 0.5), BLACK)), tol=12),
    Case("grey16.png", _grey16_png, ok=True, size=(64, 8),
         probes=tuple(((i / 4 + 1 / 8, 0.5), (v, v, v)) for i, v in enumerate(GREY16_EXPECTED))),
    Case("grey.png", lambda: encode(Image.new("L", (20, 10), 77), "PNG"), ok=True, size=(20, 10),
         probes=(((0.5, 0.5), (77, 77, 77)),)),
    Case("palette_trns.png", _palette_trns_png, ok=True, size=(32, 16),
         probes=(((0.2, 0.5), WHITE), ((0.8, 0.5), BLUE))),
    Case("rgba.png", _rgba_png, ok=True, size=(30, 10),
         probes=(((0.15, 0.5), WHITE), ((0.5, 0.5), GREEN), ((0.85, 0.5), (127, 127, 127))), tol=1),
    # Stored 48x32, left red / right blue. Orientation 6 = rotate 90 deg clockwise to display:
    # the stored left column becomes the top row. Orientation 8 (90 deg counter-clockwise): bottom.
    Case("exif_rot6.jpg", lambda: jpeg_with_orientation(6), ok=True, size=(32, 48),
         probes=(((0.5, 0.2), RED), ((0.5, 0.8), BLUE)), tol=12),
    Case("exif_rot8.jpg", lambda: jpeg_with_orientation(8), ok=True, size=(32, 48),
         probes=(((0.5, 0.2), BLUE), ((0.5, 0.8), RED)), tol=12),
    Case("animated.gif", _animated_gif, ok=True, size=(16, 16), probes=(((0.5, 0.5), RED),)),
    Case("good_webp.webp", lambda: encode(Image.new("RGB", (24, 16), GREEN), "WEBP", lossless=True),
         ok=True, size=(24, 16), probes=(((0.5, 0.5), GREEN),)),
    Case("good_bmp.bmp", lambda: encode(Image.new("RGB", (24, 16), BLUE), "BMP"), ok=True, size=(24, 16),
         probes=(((0.5, 0.5), BLUE),)),
    Case("good_tif.tif", lambda: encode(Image.new("RGB", (24, 16), RED), "TIFF"), ok=True, size=(24, 16),
         probes=(((0.5, 0.5), RED),)),
)

CASES_BY_NAME: dict[str, Case] = {c.name: c for c in CASES}

# Tar members whose names try to escape the extraction directory: each must become an error row.
TRAVERSAL_NAMES = ("../evil.jpg", "/abs.jpg", "ok/../../evil2.jpg")


def write_images(directory: Path, cases: Iterable[Case] = CASES) -> dict[str, Path]:
    """Write each case as a file in ``directory``; returns name -> path."""
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for case in cases:
        path = directory / case.name
        path.write_bytes(case.data())
        out[case.name] = path
    return out


def write_tar(path: Path, members: Mapping[str, bytes]) -> Path:
    """Write a plain tar whose members have exactly these names (unsafe names kept verbatim)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tf.addfile(info, io.BytesIO(data))
    return path


def write_corpus_tar(path: Path, cases: Iterable[Case] = CASES, *, sidecars: bool = True) -> Path:
    """A WebDataset-style shard holding every case (``<key>.<ext>``) plus ignored ``.json`` sidecars."""
    members: dict[str, bytes] = {}
    for case in cases:
        members[case.name] = case.data()
        if sidecars:
            members[case.name.rsplit(".", 1)[0] + ".json"] = b'{"note": "ignored sidecar"}'
    return write_tar(path, members)


def write_traversal_tar(path: Path) -> Path:
    """A shard with one good image and members named to escape the directory (``../``, ``/abs``)."""
    members = {"good.jpg": _good_jpeg()}
    members.update({name: _good_jpeg() for name in TRAVERSAL_NAMES})
    return write_tar(path, members)


def write_corrupt_tar(path: Path) -> Path:
    """A tar cut off in the middle of its second member's data (a partial upload)."""
    whole = io.BytesIO()
    with tarfile.open(fileobj=whole, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for i in range(3):
            data = encode(Image.fromarray(gradient_rgb(64, 48)), "PNG")
            info = tarfile.TarInfo(f"{i:06d}.png")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    raw = whole.getvalue()
    first_size = len(encode(Image.fromarray(gradient_rgb(64, 48)), "PNG"))
    first_end = 512 + (first_size + 511) // 512 * 512
    cut = first_end + 512 + 100  # second header intact, second member's data truncated
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw[:cut])
    return path


def write_garbage_tar(path: Path) -> Path:
    """Bytes that are not a tar at all, under a ``.tar`` name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not a tar archive " * 100)
    return path


def write_bad_header_tar(path: Path) -> Path:
    """A tar whose second header is overwritten with garbage (tarfile alone would stop silently)."""
    members = {f"{i:06d}.jpg": _good_jpeg() for i in range(3)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    raw = bytearray(buf.getvalue())
    second = 512 + (len(_good_jpeg()) + 511) // 512 * 512
    raw[second:second + 512] = (b"garbage header " * 40)[:512]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(raw))
    return path


def large_jpeg_case() -> Case:
    """A 1600x1200 JPEG: decodes at 1/4 scale (400x300) with draft_size=224."""
    return Case("large.jpg", large_jpeg, ok=True, size=(1600, 1200))

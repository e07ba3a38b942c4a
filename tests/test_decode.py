"""decode_image on the bad-input corpus: pixel values, orientation, sizes, errors, caps, draft."""

from __future__ import annotations

import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from corpus import (
    BLUE,
    CASES,
    CASES_BY_NAME,
    EXIF_ORIENTATION,
    GREEN,
    RED,
    WHITE,
    encode,
    gradient_rgb,
    huge_png,
    large_jpeg,
)
from PIL import Image

from pipeline.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image


def probe(array: np.ndarray, fx: float, fy: float) -> tuple[int, ...]:
    h, w = array.shape[:2]
    return tuple(int(v) for v in array[min(int(fy * h), h - 1), min(int(fx * w), w - 1)])


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corpus_case(case):
    if not case.ok:
        with pytest.raises(DecodeError, match=case.error):
            decode_image(case.data())
        return
    out = decode_image(case.data())
    assert (out.width, out.height) == case.size
    assert out.array.shape == (case.size[1], case.size[0], 3)
    assert out.array.dtype == np.uint8 and out.array.flags.c_contiguous and out.array.flags.writeable
    assert out.scale == 1.0
    for (fx, fy), rgb in case.probes:
        got = probe(out.array, fx, fy)
        assert np.all(np.abs(np.subtract(got, rgb)) <= case.tol), (case.name, (fx, fy), got, rgb)


def test_sixteen_bit_is_scaled_not_clipped():
    out = decode_image(CASES_BY_NAME["grey16.png"].data())
    band_values = [int(out.array[4, 16 * i + 8, 0]) for i in range(4)]
    # 1000/257 = 3.9 -> 4 (clipping would give 255, a plain >> 8 would give 3)
    assert band_values == [4, 128, 255, 0]


def _quadrants_png(orientation: int) -> bytes:
    """Stored 40x20: top-left red, top-right green, bottom-left blue, bottom-right white."""
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:10, :20], arr[:10, 20:], arr[10:, :20], arr[10:, 20:] = RED, GREEN, BLUE, WHITE
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return encode(Image.fromarray(arr), "PNG", exif=exif.tobytes())


# Where the stored top-left (red) and top-right (green) corners are displayed, from the EXIF
# definition of each orientation (which visual side the stored 0th row and 0th column are).
ORIENTATION_CORNERS = {
    1: ("TL", "TR"), 2: ("TR", "TL"), 3: ("BR", "BL"), 4: ("BL", "BR"),
    5: ("TL", "BL"), 6: ("TR", "BR"), 7: ("BR", "TR"), 8: ("BL", "TL"),
}
CORNER_AT = {"TL": (0.1, 0.1), "TR": (0.9, 0.1), "BL": (0.1, 0.9), "BR": (0.9, 0.9)}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation(orientation):
    out = decode_image(_quadrants_png(orientation))
    swapped = orientation >= 5
    assert (out.width, out.height) == ((20, 40) if swapped else (40, 20))
    assert out.array.shape[:2] == (out.height, out.width)
    red_at, green_at = ORIENTATION_CORNERS[orientation]
    assert probe(out.array, *CORNER_AT[red_at]) == RED
    assert probe(out.array, *CORNER_AT[green_at]) == GREEN


def test_draft_downscales_large_jpeg_and_keeps_original_size():
    data = large_jpeg(1600, 1200)
    full = decode_image(data)
    small = decode_image(data, draft_size=224)
    assert full.array.shape == (1200, 1600, 3) and full.scale == 1.0
    # 1200 // 224 = 5 -> the largest JPEG scale <= 5 is 1/4
    assert small.array.shape == (300, 400, 3)
    assert (small.width, small.height) == (1600, 1200) and small.scale == 0.25
    assert min(small.array.shape[:2]) >= 224
    # Same picture: compare against a box-downscaled full decode (smooth ramp, JPEG noise).
    reference = full.array.reshape(300, 4, 400, 4, 3).mean(axis=(1, 3))
    assert np.abs(reference - small.array.astype(np.float32)).mean() < 3.0


def test_draft_only_when_source_is_at_least_twice_the_input():
    data = large_jpeg(1600, 1200)
    assert decode_image(data, draft_size=601).array.shape == (1200, 1600, 3)   # 1200 < 2 * 601
    assert decode_image(data, draft_size=600).array.shape == (600, 800, 3)     # exactly 2x -> 1/2


def test_draft_with_exif_rotation():
    out = decode_image(large_jpeg(1600, 1200, orientation=6), draft_size=224)
    assert (out.width, out.height) == (1200, 1600)
    assert out.array.shape == (400, 300, 3)
    # Rotated 90 deg clockwise: the stored top row (green channel ~0) is now the right column.
    assert out.array[:, -1, 1].mean() < 20 and out.array[:, 0, 1].mean() > 230


def test_pixel_cap_counts_the_draft_size_for_jpegs():
    data = large_jpeg(1600, 1200)  # 1.92 MP, decoded at 400x300 with draft_size=224
    with pytest.raises(DecodeError, match="1600x1200 = 1920000 pixels > max_pixels = 1000000"):
        decode_image(data, max_pixels=1_000_000)
    out = decode_image(data, max_pixels=1_000_000, draft_size=224)
    assert out.array.shape == (300, 400, 3) and (out.width, out.height) == (1600, 1200)
    with pytest.raises(DecodeError, match=r"decoded at 400x300"):
        decode_image(data, max_pixels=100_000, draft_size=224)


def test_draft_ignored_for_non_jpeg():
    data = encode(Image.fromarray(gradient_rgb(640, 480)), "PNG")
    out = decode_image(data, draft_size=100)
    assert out.array.shape == (480, 640, 3) and out.scale == 1.0


def test_pixel_cap_is_configurable_and_names_the_numbers():
    data = CASES_BY_NAME["good.jpg"].data()  # 64x48 = 3072 pixels
    with pytest.raises(DecodeError, match=r"64x48 = 3072 pixels > max_pixels = 3071"):
        decode_image(data, max_pixels=3071)
    assert decode_image(data, max_pixels=3072).array.shape == (48, 64, 3)
    assert DEFAULT_MAX_PIXELS == 89_478_485


def test_pixel_cap_refuses_from_the_header_without_decoding():
    bomb = huge_png()  # 10000 x 10000
    assert len(bomb) < 1_000_000
    start = time.perf_counter()
    with pytest.raises(DecodeError, match="pixel cap"):
        decode_image(bomb)
    assert time.perf_counter() - start < 0.5
    # The same header followed by garbage pixel data: a decoder that loaded pixels would report
    # corrupt data; the cap must answer first.
    def chunk(tag: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))

    ihdr = struct.pack(">IIBBBBB", 10_000, 10_000, 8, 2, 0, 0, 0)
    fake = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"not zlib data" * 10)
    with pytest.raises(DecodeError, match="pixel cap"):
        decode_image(fake)
    with pytest.raises(DecodeError, match="corrupt"):  # proof that loading it would fail differently
        decode_image(fake, max_pixels=10**9)


def test_refusing_the_bomb_keeps_memory_small():
    """In a fresh process (so peak RSS means something): refusing 100 MP stays far below the
    300 MB a decoded RGB copy would take."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux /proc for the peak-memory reading")
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from corpus import huge_png\n"
        "from pipeline.decode import DecodeError, decode_image\n"
        "data = huge_png()\n"
        "try:\n    decode_image(data)\nexcept DecodeError as e:\n    print('refused', e)\n"
        # VmHWM, not ru_maxrss: the latter can carry the forking parent's peak across exec
        "hwm = [x for x in open('/proc/self/status') if x.startswith('VmHWM')][0]\n"
        "print(int(hwm.split()[1]) // 1024)\n")
    out = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent)],
                         capture_output=True, text=True, timeout=60, check=True).stdout.split("\n")
    assert out[0].startswith("refused pixel cap exceeded")
    assert int(out[1]) < 200, f"peak RSS {out[1]} MB"


def test_pillow_hard_limit_is_a_decode_error_too():
    # 200 MP is above Pillow's own error threshold (2 x 89.5 MP) even when our cap allows it.
    with pytest.raises(DecodeError, match="pixel cap"):
        decode_image(huge_png(20_000, 10_000), max_pixels=10**9)


def _samples() -> list[bytes]:
    img = Image.fromarray(gradient_rgb(48, 32))
    return [encode(img, "JPEG"), encode(img, "PNG"), encode(img, "GIF"),
            encode(img, "WEBP"), CASES_BY_NAME["exif_rot6.jpg"].data()]


def test_damaged_bytes_only_ever_raise_decode_error():
    rng = np.random.default_rng(0)
    outcomes = {"ok": 0, "error": 0}
    for data in _samples():
        variants = [data[:n] for n in range(0, len(data), max(1, len(data) // 25))]
        for _ in range(25):
            damaged = bytearray(data)
            for pos in rng.integers(0, len(data), size=4):
                damaged[pos] = int(rng.integers(0, 256))
            variants.append(bytes(damaged))
        for variant in variants:
            try:
                out = decode_image(variant)
            except DecodeError as exc:
                assert str(exc)
                outcomes["error"] += 1
            else:
                assert out.array.ndim == 3 and out.array.shape[2] == 3
                outcomes["ok"] += 1
    assert outcomes["error"] > 50


def test_la_and_palette_without_transparency():
    la = np.zeros((4, 4, 2), dtype=np.uint8)
    la[..., 0], la[..., 1] = 0, 0          # black, fully transparent -> white
    la[:, 2:, 1] = 255                     # right half opaque black
    out = decode_image(encode(Image.fromarray(la, "LA"), "PNG"))
    assert probe(out.array, 0.1, 0.5) == WHITE and probe(out.array, 0.9, 0.5) == (0, 0, 0)
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette(list(RED) + list(BLUE) + [0, 0, 0] * 254)
    assert probe(decode_image(encode(pal, "PNG")).array, 0.5, 0.5) == BLUE

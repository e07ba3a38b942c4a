"""Synthetic COCO-format data: coloured shapes on textured backgrounds, with exact masks.

Tests, the demo and fine-tuning need labelled images without downloading anything. Each
image is drawn from a random generator seeded by ``(seed, index)``, so any single image can be
re-rendered on its own and a whole dataset is byte-identical on re-run. Masks are computed
geometrically (pixel centres inside the shape), shapes are painted in order so later shapes
occlude earlier ones, and each instance's mask is what stays visible.

On storage the dataset is WebDataset-style tar shards (``<key>.jpg`` + ``<key>.json``, the
JSON holding that image's own annotations) plus one COCO ``annotations.json``.
"""

from __future__ import annotations

import io
import json
import math
import numbers
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline import storage

CATEGORIES: list[dict] = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "rectangle", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
    {"id": 4, "name": "ellipse", "supercategory": "shape"},
    {"id": 5, "name": "star", "supercategory": "shape"},
]
_NAMES = {c["id"]: c["name"] for c in CATEGORIES}

MIN_VISIBLE_AREA = 50  # instances with fewer visible pixels are not annotated
MAX_SHAPES = 6
MIN_SIDE_LIMIT = 32  # smallest image side render_sample accepts
ANNOTATIONS_FILE = "annotations.json"
DATASET_VERSION = "1"


@dataclass
class SynthInstance:
    """One annotated shape: its visible (post-occlusion) mask, tight xywh box and pixel area."""

    category_id: int
    bbox: list[float]
    mask: np.ndarray
    area: int


@dataclass
class SynthSample:
    """One rendered image and its instances, in painting order (earlier ones may be occluded)."""

    key: str
    image: Image.Image
    instances: list[SynthInstance]


def shard_name(shard: int) -> str:
    """File name of shard number ``shard`` (``shard-00000.tar``)."""
    return f"shard-{shard:05d}.tar"


def sample_key(index: int) -> str:
    """Key (tar member stem) of image ``index``."""
    return f"{index:08d}"


# ---------------------------------------------------------------- geometry


def _grid(h: int, w: int, box: tuple[float, float, float, float]):
    """Pixel-centre coordinates of the image window covering ``box`` (x0, y0, x1, y1), or None."""
    x0 = max(int(math.floor(box[0])), 0)
    y0 = max(int(math.floor(box[1])), 0)
    x1 = min(int(math.ceil(box[2])) + 1, w)
    y1 = min(int(math.ceil(box[3])) + 1, h)
    if x0 >= x1 or y0 >= y1:
        return None
    ys = np.arange(y0, y1, dtype=np.float64)[:, None] + 0.5
    xs = np.arange(x0, x1, dtype=np.float64)[None, :] + 0.5
    return (slice(y0, y1), slice(x0, x1)), xs, ys


def _ellipse_mask(h: int, w: int, cx: float, cy: float, a: float, b: float, angle: float) -> np.ndarray:
    mask = np.zeros((h, w), dtype=bool)
    r = max(a, b)
    g = _grid(h, w, (cx - r, cy - r, cx + r, cy + r))
    if g is None:
        return mask
    window, xs, ys = g
    dx, dy = xs - cx, ys - cy
    c, s = math.cos(angle), math.sin(angle)
    u = (dx * c + dy * s) / a
    v = (-dx * s + dy * c) / b
    mask[window] = u * u + v * v <= 1.0
    return mask


def _polygon_mask(h: int, w: int, vertices: np.ndarray) -> np.ndarray:
    """Even-odd rule on pixel centres; works for non-convex polygons (stars)."""
    mask = np.zeros((h, w), dtype=bool)
    g = _grid(h, w, (vertices[:, 0].min(), vertices[:, 1].min(), vertices[:, 0].max(), vertices[:, 1].max()))
    if g is None:
        return mask
    window, xs, ys = g
    inside = np.zeros((ys.shape[0], xs.shape[1]), dtype=bool)
    n = len(vertices)
    for i in range(n):
        xa, ya = vertices[i]
        xb, yb = vertices[(i + 1) % n]
        if ya == yb:
            continue  # a horizontal edge never crosses a horizontal ray through a pixel centre
        crosses = (ya > ys) != (yb > ys)
        x_at = xa + (ys - ya) * (xb - xa) / (yb - ya)
        inside ^= crosses & (xs < x_at)
    mask[window] = inside
    return mask


def _regular_vertices(cx: float, cy: float, radii: np.ndarray, angles: np.ndarray) -> np.ndarray:
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)


def _shape_mask(name: str, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Draw one random shape of class ``name``; returns its full (unoccluded, clipped) mask."""
    r = rng.uniform(0.08, 0.28) * min(h, w)
    cx = rng.uniform(0, w)
    cy = rng.uniform(0, h)
    angle = rng.uniform(0, math.pi)
    if name == "circle":
        return _ellipse_mask(h, w, cx, cy, r, r, 0.0)
    if name == "ellipse":
        return _ellipse_mask(h, w, cx, cy, r, r * rng.uniform(0.35, 0.65), angle)
    if name == "rectangle":
        half_w, half_h = r, r * rng.uniform(0.4, 1.0)
        corners = np.array([[-half_w, -half_h], [half_w, -half_h], [half_w, half_h], [-half_w, half_h]])
        c, s = math.cos(angle), math.sin(angle)
        rot = corners @ np.array([[c, s], [-s, c]])
        return _polygon_mask(h, w, rot + [cx, cy])
    if name == "triangle":
        angles = angle * 2 + np.array([0.0, 2 * math.pi / 3, 4 * math.pi / 3]) + rng.uniform(-0.35, 0.35, 3)
        return _polygon_mask(h, w, _regular_vertices(cx, cy, r * rng.uniform(0.8, 1.0, 3), angles))
    if name == "star":
        points = 5
        angles = angle * 2 + np.arange(2 * points) * math.pi / points
        radii = np.where(np.arange(2 * points) % 2 == 0, r, r * rng.uniform(0.4, 0.55))
        return _polygon_mask(h, w, _regular_vertices(cx, cy, radii, angles))
    raise ValueError(f"unknown shape class {name!r}; known: {sorted(_NAMES.values())}")


# ---------------------------------------------------------------- textures


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A float32 HxWx3 background: gradient, stripes, checkerboard or smooth noise, plus grain."""
    c0 = rng.uniform(0, 255, 3).astype(np.float32)
    c1 = rng.uniform(0, 255, 3).astype(np.float32)
    kind = int(rng.integers(0, 4))
    ys = np.arange(h, dtype=np.float32)[:, None]
    xs = np.arange(w, dtype=np.float32)[None, :]
    theta = rng.uniform(0, 2 * math.pi)
    proj = xs * np.float32(math.cos(theta)) + ys * np.float32(math.sin(theta))
    if kind == 0:  # linear gradient
        t = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1e-6)
    elif kind == 1:  # soft stripes
        period = rng.uniform(6, 40)
        t = 0.5 + 0.5 * np.sin(proj * np.float32(2 * math.pi / period))
    elif kind == 2:  # checkerboard
        cell = int(rng.integers(8, 48))
        t = ((np.arange(h)[:, None] // cell + np.arange(w)[None, :] // cell) % 2).astype(np.float32)
    else:  # smooth blotches: a coarse random grid upsampled bilinearly
        coarse = rng.uniform(0, 255, (max(h // 24, 2), max(w // 24, 2))).astype(np.uint8)
        t = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR), np.float32) / 255
    grain = rng.standard_normal((h, w, 3), dtype=np.float32)
    grain *= 6.0
    grain += c0
    grain += t[..., None] * (c1 - c0)
    return grain


def _shape_colour(rng: np.random.Generator, background_mean: np.ndarray) -> np.ndarray:
    """A random colour, re-drawn (a few times) while too close to the background's mean colour."""
    colour = rng.uniform(0, 255, 3)
    for _ in range(8):
        if np.linalg.norm(colour - background_mean) >= 90:
            break
        colour = rng.uniform(0, 255, 3)
    return colour


# ---------------------------------------------------------------- rendering


def _tight_bbox(mask: np.ndarray) -> list[float]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]


def render_sample(seed: int, index: int, min_size: int = 160, max_size: int = 480) -> SynthSample:
    """Render image ``index`` of the dataset with ``seed``; same inputs, same pixels and masks.

    Image sides are drawn independently in [min_size, max_size]; 1-6 shapes of random class,
    size, colour, position and rotation are painted in order; instances whose visible area is
    below ``MIN_VISIBLE_AREA`` are dropped (their pixels stay in the image, unlabelled).
    """
    min_size, max_size = _check_sizes(min_size, max_size)
    seed, index = _integer("seed", seed), _integer("index", index)
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    w = int(rng.integers(min_size, max_size + 1))
    h = int(rng.integers(min_size, max_size + 1))
    img = _background(rng, h, w)
    background_mean = img.mean(axis=(0, 1), dtype=np.float64)

    owner = np.full((h, w), -1, dtype=np.int16)  # which shape is visible at each pixel
    categories: list[int] = []
    for i in range(int(rng.integers(1, MAX_SHAPES + 1))):
        category = CATEGORIES[int(rng.integers(0, len(CATEGORIES)))]
        mask = _shape_mask(category["name"], rng, h, w)
        colour = _shape_colour(rng, background_mean)
        img[mask] = colour + 3.0 * rng.standard_normal((int(mask.sum()), 3), dtype=np.float32)
        owner[mask] = i
        categories.append(category["id"])

    instances = []
    for i, category_id in enumerate(categories):
        visible = owner == i
        area = int(visible.sum())
        if area < MIN_VISIBLE_AREA:
            continue
        instances.append(SynthInstance(category_id, _tight_bbox(visible), visible, area))
    image = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8))
    return SynthSample(sample_key(index), image, instances)


def encode_mask(mask: np.ndarray) -> dict:
    """Bool HxW mask -> COCO compressed RLE with ``counts`` as an ASCII string (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


# ---------------------------------------------------------------- writing


def _integer(name: str, value: Any) -> int:
    """``value`` as a plain int (numpy integers accepted); bools and floats are rejected."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _check_sizes(min_size: int, max_size: int) -> tuple[int, int]:
    min_size, max_size = _integer("min_size", min_size), _integer("max_size", max_size)
    if min_size < MIN_SIDE_LIMIT:
        raise ValueError(f"min_size must be >= {MIN_SIDE_LIMIT}, got {min_size}")
    if max_size < min_size:
        raise ValueError(f"max_size ({max_size}) must be >= min_size ({min_size})")
    return min_size, max_size


def _check_args(images: int, shards: int, seed: int, jpeg_quality: int) -> tuple[int, int, int, int]:
    images, shards = _integer("images", images), _integer("shards", shards)
    seed, jpeg_quality = _integer("seed", seed), _integer("jpeg_quality", jpeg_quality)
    if images < 1:
        raise ValueError(f"images must be >= 1, got {images}")
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if shards > images:
        raise ValueError(f"shards ({shards}) must not exceed images ({images}): every shard needs an image")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
    return images, shards, seed, jpeg_quality


def shard_ranges(images: int, shards: int) -> list[range]:
    """Image indices of each shard: contiguous, sizes differing by at most one."""
    return [range(s * images // shards, (s + 1) * images // shards) for s in range(shards)]


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # fixed metadata: identical bytes on re-run
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _jpeg_bytes(image: Image.Image, quality: int) -> bytes:
    """JPEG without chroma subsampling (4:4:4): colour stays put at mask edges (files ~1.5x larger)."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def write_dataset(
    output: str,
    images: int,
    shards: int,
    seed: int = 0,
    storage_options: Mapping[str, Any] | None = None,
    min_size: int = 160,
    max_size: int = 480,
    jpeg_quality: int = 90,
) -> dict:
    """Render ``images`` samples into ``shards`` tar shards plus a COCO ``annotations.json`` at ``output``.

    ``output`` is any fsspec URL (local path, ``s3://bucket/prefix``, ``memory://name``). Each
    object is written atomically (see ``pipeline.storage``); ``annotations.json`` is written
    last, so its presence means the dataset is complete. Returns a summary (URLs and counts).
    """
    images, shards, seed, jpeg_quality = _check_args(images, shards, seed, jpeg_quality)
    min_size, max_size = _check_sizes(min_size, max_size)
    try:
        fs, root = storage.open_fs(output, storage_options)
        fs.makedirs(root, exist_ok=True)
        existing = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.glob(storage.join(root, "shard-*.tar"))}
    except (OSError, ValueError, ImportError) as e:
        raise ValueError(f"output {output!r} cannot be opened for writing: {e}") from e
    stale = sorted(existing - {shard_name(s) for s in range(shards)})
    if stale:
        raise ValueError(f"output {output!r} already holds {len(stale)} shard file(s) beyond shards={shards} "
                         f"(first: {stale[0]}), left by another dataset; use an empty output or remove them")
    # annotations.json marks a complete dataset: drop an old one before rewriting shards.
    _remove_if_exists(fs, storage.join(root, ANNOTATIONS_FILE), output)

    coco_images: list[dict] = []
    coco_annotations: list[dict] = []
    shard_urls: list[str] = []
    total_bytes = 0
    for shard, indices in enumerate(shard_ranges(images, shards)):
        name = shard_name(shard)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for index in indices:
                sample = render_sample(seed, index, min_size, max_size)
                image_id = index + 1
                file_name = f"{sample.key}.jpg"
                record = {"id": image_id, "file_name": file_name, "width": sample.image.width,
                          "height": sample.image.height, "shard": name}
                annotations = []
                for inst in sample.instances:
                    annotations.append({
                        "id": len(coco_annotations) + len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": inst.category_id,
                        "bbox": inst.bbox,
                        "area": inst.area,
                        "segmentation": encode_mask(inst.mask),
                        "iscrowd": 0,
                    })
                own = {"key": sample.key, **record, "annotations": annotations}
                _tar_member(tar, file_name, _jpeg_bytes(sample.image, jpeg_quality))
                _tar_member(tar, f"{sample.key}.json", json.dumps(own).encode())
                coco_images.append(record)
                coco_annotations.extend(annotations)
        data = buf.getvalue()
        path = storage.join(root, name)
        _write(fs, path, data, output)
        total_bytes += len(data)
        shard_urls.append(storage.join(output, name))

    coco = {
        "info": {"description": "mnv3-pipeline synthetic shapes", "version": DATASET_VERSION, "seed": seed,
                 "images": images, "shards": shards, "min_size": min_size, "max_size": max_size},
        "images": coco_images,
        "annotations": coco_annotations,
        "categories": CATEGORIES,
    }
    ann_data = json.dumps(coco).encode()
    _write(fs, storage.join(root, ANNOTATIONS_FILE), ann_data, output)
    total_bytes += len(ann_data)
    return {
        "output": output,
        "annotations": storage.join(output, ANNOTATIONS_FILE),
        "shards": shard_urls,
        "images": images,
        "instances": len(coco_annotations),
        "categories": len(CATEGORIES),
        "seed": seed,
        "bytes": total_bytes,
    }


def _remove_if_exists(fs, path: str, output: str) -> None:
    try:
        if fs.exists(path):
            fs.rm_file(path)
    except OSError as e:
        raise ValueError(f"output {output!r} is not writable (cannot replace {path}): {e}") from e


def _write(fs, path: str, data: bytes, output: str) -> None:
    try:
        storage.write_bytes_atomic(fs, path, data)
    except OSError as e:
        raise ValueError(f"output {output!r} is not writable ({path}): {e}") from e

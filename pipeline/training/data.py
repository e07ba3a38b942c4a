"""COCO-format training data from any fsspec URL, turned into model inputs and targets.

Two layouts are read: ``annotations.json`` beside an ``images/`` folder whose files match each
image's ``file_name``, and ``annotations.json`` beside WebDataset-style tar shards (the ``synth``
output; an image record's ``shard`` names its tar, else every ``*.tar`` is scanned). Category ids
are remapped to contiguous labels (background = 0 for detection and segmentation, classes
from 0 for classification) and the mapping travels with the exported model.

Datasets here are small enough for every training worker to hold the encoded images in memory;
each worker decodes and augments its own slice (``rank::world_size``).
"""

from __future__ import annotations

import io
import json
import posixpath
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

from pipeline import storage
from pipeline.decode import decode_image

ANNOTATIONS_FILE = "annotations.json"
IMAGES_DIR = "images"
IGNORE_INDEX = 255


@dataclass
class CocoSource:
    """A parsed COCO dataset: image records (with their annotations), categories and where pixels live."""

    url: str
    images: list[dict]
    categories: list[dict]
    layout: str  # "images" | "shards"
    storage_options: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, str] = field(default_factory=dict)  # file_name -> class name (classification)

    @property
    def annotations_url(self) -> str:
        return storage.join(self.url, ANNOTATIONS_FILE)

    def coco_dict(self) -> dict:
        """The dataset as a COCO dict (for pycocotools' ground truth)."""
        anns = [a for img in self.images for a in img["annotations"]]
        images = [{k: v for k, v in img.items() if k != "annotations"} for img in self.images]
        return {"images": images, "annotations": anns, "categories": self.categories}


@dataclass(frozen=True)
class CategoryMap:
    """Dataset category id <-> contiguous model label; ``offset`` is 1 when label 0 is background."""

    category_ids: tuple[int, ...]
    names: tuple[str, ...]
    offset: int

    @classmethod
    def from_categories(cls, categories: Sequence[Mapping[str, Any]], background: bool) -> CategoryMap:
        cats = sorted(categories, key=lambda c: int(c["id"]))
        if not cats:
            raise ValueError("the dataset has no categories; annotations.json needs a 'categories' list")
        ids = tuple(int(c["id"]) for c in cats)
        return cls(ids, tuple(str(c["name"]) for c in cats), 1 if background else 0)

    @property
    def num_classes(self) -> int:
        return len(self.category_ids) + self.offset

    @property
    def labels(self) -> list[str]:
        """Model label names indexed by label id (``__background__`` first when there is one)."""
        return (["__background__"] if self.offset else []) + list(self.names)

    def label(self, category_id: int) -> int | None:
        try:
            return self.category_ids.index(int(category_id)) + self.offset
        except ValueError:
            return None

    def category_id(self, label: int) -> int | None:
        i = int(label) - self.offset
        return self.category_ids[i] if 0 <= i < len(self.category_ids) else None

    def by_name(self, name: str) -> int | None:
        return self.names.index(name) + self.offset if name in self.names else None

    def to_json(self) -> list[dict]:
        """The saved mapping: one entry per label with the dataset category id and name."""
        out = [{"label_id": 0, "category_id": None, "name": "__background__"}] if self.offset else []
        out += [
            {"label_id": i + self.offset, "category_id": cid, "name": name}
            for i, (cid, name) in enumerate(zip(self.category_ids, self.names))
        ]
        return out


def _read_json(url: str, storage_options: Mapping[str, Any] | None) -> Any:
    fs, path = storage.open_fs(url, storage_options)
    with fs.open(path, "rb") as f:
        return json.load(f)


def load_source(
    url: str, storage_options: Mapping[str, Any] | None = None, manifest: str | None = None
) -> CocoSource:
    """Read ``<url>/annotations.json`` and find the layout (``images/`` folder or tar shards).

    ``manifest``: optional JSON URL mapping ``file_name`` -> class name, for classification
    datasets whose labels are not in the COCO file.
    """
    options = dict(storage_options or {})
    fs, root = storage.open_fs(url, options)
    ann_path = storage.join(root, ANNOTATIONS_FILE)
    if not fs.exists(ann_path):
        raise FileNotFoundError(
            f"dataset {url!r} has no {ANNOTATIONS_FILE}; expected a COCO file beside an "
            f"'{IMAGES_DIR}/' folder or tar shards (e.g. mnv3-pipeline synth output)"
        )
    with fs.open(ann_path, "rb") as f:
        coco = json.load(f)
    if not isinstance(coco, dict) or "images" not in coco or "categories" not in coco:
        raise ValueError(
            f"{storage.join(url, ANNOTATIONS_FILE)} is not a COCO file (needs 'images' and 'categories')"
        )
    by_image: dict[int, list[dict]] = {}
    for ann in coco.get("annotations", []):
        by_image.setdefault(int(ann["image_id"]), []).append(ann)
    images = [{**img, "annotations": by_image.get(int(img["id"]), [])} for img in coco["images"]]
    layout = "images" if fs.isdir(storage.join(root, IMAGES_DIR)) else "shards"
    if layout == "shards" and not fs.glob(storage.join(root, "*.tar")):
        raise FileNotFoundError(
            f"dataset {url!r} has neither an '{IMAGES_DIR}/' folder nor *.tar shards "
            f"beside {ANNOTATIONS_FILE}"
        )
    labels = {}
    if manifest:
        labels = {str(k): str(v) for k, v in _read_json(manifest, options).items()}
    return CocoSource(url, images, list(coco["categories"]), layout, options, labels)


def read_image_bytes(source: CocoSource, indices: Sequence[int] | None = None) -> dict[int, bytes]:
    """Encoded bytes of the selected images (all by default), keyed by image id."""
    fs, root = storage.open_fs(source.url, source.storage_options)
    chosen = [source.images[i] for i in (range(len(source.images)) if indices is None else indices)]
    out: dict[int, bytes] = {}
    if source.layout == "images":
        for img in chosen:
            path = storage.join(root, IMAGES_DIR, img["file_name"])
            try:
                out[int(img["id"])] = fs.cat_file(path)
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"image {img['file_name']!r} of {source.url!r} is missing (looked for {path})"
                ) from None
        return out
    wanted: dict[str, list[dict]] = {}
    for img in chosen:
        wanted.setdefault(img.get("shard") or "*", []).append(img)
    shard_names = (
        sorted(wanted)
        if "*" not in wanted
        else sorted(p.rsplit("/", 1)[-1] for p in fs.glob(storage.join(root, "*.tar")))
    )
    by_name = {img["file_name"]: int(img["id"]) for img in chosen}
    by_base = {posixpath.basename(img["file_name"]): int(img["id"]) for img in chosen}
    for name in shard_names:
        data = fs.cat_file(storage.join(root, name))
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                image_id = by_name.get(member.name, by_base.get(posixpath.basename(member.name)))
                if image_id is not None and image_id not in out:
                    out[image_id] = tar.extractfile(member).read()
    missing = [img["file_name"] for img in chosen if int(img["id"]) not in out]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} images of {source.url!r} are in no tar shard (first: {missing[0]!r})"
        )
    return out


def decode_rgb(data: bytes) -> np.ndarray:
    """Encoded image -> HWC uint8 RGB (EXIF orientation applied), through the pipeline's decoder."""
    return decode_image(data).array


# --------------------------------------------------------------------------- targets


def detection_target(record: Mapping[str, Any], cats: CategoryMap) -> dict[str, torch.Tensor]:
    """Boxes (xyxy float32, original pixels) and int64 labels; crowd, unknown and empty boxes dropped."""
    boxes, labels = [], []
    for ann in record["annotations"]:
        label = cats.label(ann["category_id"])
        if ann.get("iscrowd", 0) or label is None:
            continue
        x, y, w, h = (float(v) for v in ann["bbox"])
        if w <= 1e-3 or h <= 1e-3:
            continue
        boxes.append([x, y, x + w, y + h])
        labels.append(label)
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def _ann_mask(ann: Mapping[str, Any], height: int, width: int) -> np.ndarray:
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        rles = mask_utils.frPyObjects(seg, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, height, width)
    elif isinstance(seg, dict):
        counts = seg["counts"]
        rle = {"size": seg["size"], "counts": counts.encode() if isinstance(counts, str) else counts}
    else:
        return np.zeros((height, width), dtype=bool)
    return mask_utils.decode(rle).astype(bool)


def semantic_mask(record: Mapping[str, Any], cats: CategoryMap) -> np.ndarray:
    """HxW uint8 label map: 0 background, class labels, 255 for crowd and where classes overlap."""
    height, width = int(record["height"]), int(record["width"])
    out = np.zeros((height, width), dtype=np.uint8)
    for ann in record["annotations"]:
        label = cats.label(ann["category_id"])
        if label is None:
            continue
        m = _ann_mask(ann, height, width)
        if ann.get("iscrowd", 0):
            out[m] = IGNORE_INDEX
            continue
        clash = m & (out != 0) & (out != label)
        out[m & (out == 0)] = label
        out[clash] = IGNORE_INDEX
    return out


def classification_label(record: Mapping[str, Any], cats: CategoryMap, source: CocoSource) -> int:
    """The image's class: manifest entry, else ``category_id`` on the image record, else its folder
    name (``cat/001.jpg``), else the category covering the largest annotated area."""
    name = source.manifest.get(record["file_name"])
    if name is not None:
        label = cats.by_name(name)
        if label is None:
            raise ValueError(
                f"manifest label {name!r} of {record['file_name']!r} is not a dataset category "
                f"({', '.join(cats.names)})"
            )
        return label
    if record.get("category_id") is not None:
        label = cats.label(record["category_id"])
        if label is not None:
            return label
    folder = posixpath.dirname(record["file_name"]).rsplit("/", 1)[-1]
    if folder and cats.by_name(folder) is not None:
        return cats.by_name(folder)
    best = max(record["annotations"], key=lambda a: float(a.get("area", 0.0)), default=None)
    if best is None or cats.label(best["category_id"]) is None:
        raise ValueError(
            f"image {record['file_name']!r} has no class: give it a category_id, a category "
            "folder, a manifest entry or at least one annotation"
        )
    return cats.label(best["category_id"])


def split_indices(n: int, rank: int, world_size: int) -> list[int]:
    """This worker's images: every ``world_size``-th one starting at ``rank``."""
    return list(range(rank, n, world_size))

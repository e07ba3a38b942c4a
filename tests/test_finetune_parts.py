"""Fine-tuning building blocks without Ray: data layouts, targets, augmentations, optim, averaging."""

from __future__ import annotations

import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from mnv3 import transforms
from pipeline.synth import encode_mask, write_dataset
from pipeline.training import data, ema, optim
from pipeline.training.export import sidecar_uri, torchvision_layout


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_dataset(str(root), images=6, shards=2, seed=3, min_size=64, max_size=96)
    return root


def _as_images_layout(shards, dest):
    """The same dataset in the other layout: annotations.json beside images/<file_name>."""
    (dest / "images").mkdir(parents=True)
    for tar_path in sorted(shards.glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                if m.name.endswith(".jpg"):
                    (dest / "images" / m.name).write_bytes(tar.extractfile(m).read())
    (dest / "annotations.json").write_text((shards / "annotations.json").read_text())
    return dest


def test_both_layouts_give_the_same_images(shards, tmp_path):
    a = data.load_source(str(shards))
    b = data.load_source(str(_as_images_layout(shards, tmp_path / "flat")))
    assert (a.layout, b.layout) == ("shards", "images")
    assert data.read_image_bytes(a) == data.read_image_bytes(b)
    assert len(data.read_image_bytes(a, [1, 4])) == 2


def test_missing_annotations_names_the_url(tmp_path):
    with pytest.raises(FileNotFoundError, match="annotations.json"):
        data.load_source(str(tmp_path))


def test_category_remap_is_contiguous_and_reversible():
    cats = data.CategoryMap.from_categories(
        [{"id": 44, "name": "b"}, {"id": 7, "name": "a"}], background=True
    )
    assert cats.labels == ["__background__", "a", "b"]
    assert (cats.label(7), cats.label(44), cats.label(3)) == (1, 2, None)
    assert cats.category_id(2) == 44 and cats.num_classes == 3
    flat = data.CategoryMap.from_categories(
        [{"id": 44, "name": "b"}, {"id": 7, "name": "a"}], background=False
    )
    assert flat.label(7) == 0 and flat.to_json()[0] == {"label_id": 0, "category_id": 7, "name": "a"}


def _record(masks_and_cats, h=8, w=8, **extra):
    anns = []
    for i, (mask, cid) in enumerate(masks_and_cats):
        ys, xs = np.nonzero(mask)
        anns.append(
            {
                "id": i + 1,
                "image_id": 1,
                "category_id": cid,
                "iscrowd": 0,
                "area": float(mask.sum()),
                "bbox": [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)],
                "segmentation": encode_mask(mask),
            }
        )
    return {"id": 1, "file_name": "x.jpg", "height": h, "width": w, "annotations": anns, **extra}


def test_semantic_mask_marks_class_overlaps_255_and_targets_are_xyxy():
    cats = data.CategoryMap.from_categories(
        [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}], background=True
    )
    m1 = np.zeros((8, 8), bool)
    m1[0:4, 0:4] = True
    m2 = np.zeros((8, 8), bool)
    m2[2:6, 2:6] = True
    m3 = np.zeros((8, 8), bool)
    m3[0:2, 0:2] = True  # same class as m1 on top of it: no clash
    rec = _record([(m1, 1), (m2, 2), (m3, 1)])
    sem = data.semantic_mask(rec, cats)
    assert sem[0, 0] == 1 and sem[5, 5] == 2 and sem[7, 7] == 0
    assert (sem[2:4, 2:4] == 255).all() and (sem == 255).sum() == 4
    target = data.detection_target(rec, cats)
    assert target["boxes"][0].tolist() == [0.0, 0.0, 4.0, 4.0]
    assert target["labels"].tolist() == [1, 2, 1] and target["labels"].dtype == torch.int64


def test_classification_label_sources():
    cats = data.CategoryMap.from_categories(
        [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}], background=False
    )
    big = np.zeros((8, 8), bool)
    big[:6, :6] = True
    small = np.zeros((8, 8), bool)
    small[7, 7] = True
    src = data.CocoSource("x", [], [], "images", manifest={"m.jpg": "dog"})
    assert data.classification_label(_record([(small, 1), (big, 2)]), cats, src) == 1  # largest area: dog
    assert data.classification_label({"file_name": "cat/1.jpg", "annotations": []}, cats, src) == 0
    assert (
        data.classification_label({"file_name": "a.jpg", "category_id": 2, "annotations": []}, cats, src) == 1
    )
    assert data.classification_label({"file_name": "m.jpg", "annotations": []}, cats, src) == 1
    with pytest.raises(ValueError, match="has no class"):
        data.classification_label({"file_name": "z.jpg", "annotations": []}, cats, src)


def test_hflip_moves_boxes_with_pixels():
    img = torch.zeros(3, 10, 20)
    img[:, 2:5, 1:4] = 1.0
    target = {"boxes": torch.tensor([[1.0, 2.0, 4.0, 5.0]]), "labels": torch.tensor([1])}
    torch.manual_seed(0)
    for _ in range(20):
        out, t = transforms.random_hflip_detection(img, target, p=1.0)
        x1, y1, x2, y2 = t["boxes"][0].int().tolist()
        assert out[0, y1:y2, x1:x2].min() == 1.0 and out[0].sum() == img[0].sum()
        assert t["boxes"][0].tolist() == [16.0, 2.0, 19.0, 5.0]


def test_segmentation_train_preset_pads_mask_with_255_and_keeps_labels():
    torch.manual_seed(0)
    img = torch.rand(3, 20, 30)
    mask = torch.zeros(20, 30, dtype=torch.long)
    mask[:, 15:] = 3
    preset = transforms.SegmentationTrainPreset(base_size=20, crop_size=48)
    seen255 = False
    for _ in range(10):
        x, m = preset(img, mask)
        assert x.shape == (3, 48, 48) and m.shape == (48, 48)
        assert set(m.unique().tolist()) <= {0, 3, 255}
        seen255 |= bool((m == 255).any())
    assert seen255


def test_classification_train_preset_shapes_and_erasing():
    torch.manual_seed(0)
    img = torch.rand(3, 50, 70)
    preset = transforms.ClassificationTrainPreset(crop_size=32, auto_augment=True, random_erase=1.0)
    for _ in range(25):  # every AutoAugment sub-policy gets a chance
        assert preset(img).shape == (3, 32, 32)
    top, left, h, w = transforms.random_resized_crop_box(50, 70, scale=(0.5, 0.5), ratio=(1.0, 1.0))
    assert abs(h * w - 1750) < 150 and 0 <= top <= 50 - h and 0 <= left <= 70 - w
    for name, _, _ in (s for pair in transforms.IMAGENET_POLICY for s in pair):
        out = transforms._autoaugment_op(Image.new("RGB", (16, 16), (10, 200, 30)), name, 9)
        assert out.size == (16, 16)


def test_schedules_and_tf_eps():
    assert optim.tf_eps_to_torch(0.001) == pytest.approx(0.0316, abs=1e-4)
    kw = {"total_steps": 100, "steps_per_epoch": 10}
    assert optim.lr_factor(0, schedule="constant", warmup_steps=10, warmup_factor=0.1, **kw) == pytest.approx(
        0.1
    )
    assert optim.lr_factor(5, schedule="constant", warmup_steps=10, warmup_factor=0.1, **kw) == pytest.approx(
        0.55
    )
    assert optim.lr_factor(45, schedule="step", step_size=2, gamma=0.5, **kw) == pytest.approx(0.25)
    assert optim.lr_factor(75, schedule="multistep", milestones=[3, 7], **kw) == pytest.approx(0.01)
    assert optim.lr_factor(50, schedule="cosine", **kw) == pytest.approx(0.5)
    assert optim.lr_factor(50, schedule="poly", power=1.0, **kw) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown lr schedule"):
        optim.lr_factor(0, schedule="linear", **kw)


def test_no_weight_decay_on_norm_layers():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    groups = optim.param_groups(model, weight_decay=1e-4, norm_weight_decay=0.0)
    by_wd = {g["weight_decay"]: len(g["params"]) for g in groups}
    assert by_wd == {1e-4: 2, 0.0: 2}
    opt = optim.build_optimizer("rmsprop", groups, lr=0.1, eps=0.001, eps_tf=True)
    assert opt.defaults["eps"] == pytest.approx(math.sqrt(0.001))


def test_ema_and_best_checkpoint_average():
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    averager = ema.ModelEma(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    averager.update(model)
    assert averager.module.weight.flatten().tolist() == [0.5, 0.5]
    best = ema.BestCheckpoints(k=2)
    for epoch, score, value in ((0, 0.1, 1.0), (1, 0.05, 9.0), (2, 0.2, 2.0), (3, 0.3, 4.0)):
        best.offer(epoch, score, {"w": torch.tensor([value])})
    assert [e for e, _, _ in best.items] == [2, 3]
    assert best.averaged()["w"].item() == pytest.approx(3.0)


def test_export_layout_and_sidecar_name():
    sd = {"a.weight": torch.ones(1), "a.num_batches_tracked": torch.tensor(3)}
    assert list(torchvision_layout("detect", sd)) == ["a.weight"]
    assert list(torchvision_layout("segment", sd)) == list(sd)
    assert sidecar_uri("s3://b/run/export/m-0123abcd.pth") == "s3://b/run/export/m-0123abcd.json"


def test_decoded_shard_images_match_annotations(shards):
    src = data.load_source(str(shards))
    raw = data.read_image_bytes(src)
    for rec in src.images:
        arr = data.decode_rgb(raw[rec["id"]])
        assert arr.shape == (rec["height"], rec["width"], 3)
    buf = io.BytesIO(raw[src.images[0]["id"]])
    assert Image.open(buf).format == "JPEG"
    assert json.loads((shards / "annotations.json").read_text())["categories"] == src.categories

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
from pipeline.training import data, ema, models, optim
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


def test_init_from_a_checkpoint_replaces_the_head(tmp_path):
    from mnv3.mobilenetv3 import mobilenet_v3_small

    torch.manual_seed(1)
    source = mobilenet_v3_small(num_classes=1000)
    path = tmp_path / "imagenet-small.pth"
    torch.save(source.state_dict(), path)
    model, report = models.build_model("classify", "mobilenet_v3_small", 4, str(path))
    assert report.kind == "full" and report.fresh == ["classifier.3.bias", "classifier.3.weight"]
    assert model.classifier[3].out_features == 4
    assert torch.equal(model.features[3].block[0][0].weight, source.features[3].block[0][0].weight)
    with pytest.raises(ValueError, match="share no key"):
        torch.save({"other.weight": torch.zeros(2)}, tmp_path / "bad.pth")
        models.build_model("classify", "mobilenet_v3_small", 4, str(tmp_path / "bad.pth"))


def test_detector_from_a_classifier_checkpoint_freezes_early_backbone_layers(tmp_path):
    from mnv3.mobilenetv3 import mobilenet_v3_large

    torch.manual_seed(2)
    path = tmp_path / "imagenet-large.pth"
    classifier = mobilenet_v3_large()
    torch.save(classifier.state_dict(), path)
    model, report = models.build_model(
        "detect", "fasterrcnn_mobilenet_v3_large_320_fpn", 6, str(path), trainable_backbone_layers=2
    )
    assert report.kind == "backbone" and report.loaded > 200
    assert torch.equal(model.backbone.body[1].block[0][0].weight, classifier.features[1].block[0][0].weight)
    body = dict(model.backbone.body.named_parameters())
    trainable = sorted({int(name.split(".")[0]) for name, p in body.items() if p.requires_grad})
    assert trainable and trainable[0] >= 10  # only the last stages train
    assert model.roi_heads.box_predictor.cls_score.out_features == 6


def test_qat_export_is_the_int8_model_annotate_loads(tmp_path):
    from mnv3.quantization import convert_qat, freeze_bn_stats, freeze_observers
    from pipeline.bundle import TaskSpec
    from pipeline.bundle import build_model as annotate_build
    from pipeline.training import export

    torch.manual_seed(0)
    model, _ = models.build_model("classify", "mobilenet_v3_small", 3, qat=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    for step in range(3):
        if step == 2:  # the recipe's epoch hooks: observers, then BN statistics frozen
            freeze_observers(model)
            freeze_bn_stats(model)
        model.train()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    expected = convert_qat(model.eval())(x)
    weights, _ = export.export_model(
        str(tmp_path), task="classify", builder="mobilenet_v3_small", state_dict=model.state_dict(),
        labels=["a", "b", "c"], categories=[], params={"resize_size": 32, "crop_size": 32}, metrics={},
        lineage={}, precision="int8",
    )
    side = export.read_sidecar(weights)
    keys = export.config_overrides(side, weights)
    assert keys["tasks.classify.precision"] == "int8" and keys["tasks.classify.num_classes"] == 3
    spec = TaskSpec(task="classify", builder="mobilenet_v3_small", weights=weights, precision="int8",
                    labels=("a", "b", "c"), params={"resize_size": 32, "crop_size": 32})
    int8 = annotate_build(spec)
    assert not getattr(int8, "needs_calibration", False)  # QAT checkpoint: converted as it loads
    assert torch.allclose(int8(x), expected, atol=1e-5)


def test_auto_resume_picks_the_newest_unfinished_run(tmp_path):
    from pipeline.training import trainer

    for name, ckpt, exported in (
        ("finetune-detect-20261201-010000", True, False),
        ("finetune-detect-20261202-010000", True, True),  # finished (exported)
        ("finetune-detect-20261202-020000", False, False),  # died before any checkpoint
        ("finetune-segment-20261203-010000", True, False),  # another task
    ):
        (tmp_path / name).mkdir()
        if ckpt:
            (tmp_path / name / "checkpoint_2026-12-01_01-00-00.000000").mkdir()
        if exported:
            (tmp_path / name / "export").mkdir()
    out = str(tmp_path)
    assert trainer.unfinished_run(out, "detect") == "finetune-detect-20261201-010000"
    assert trainer.choose_run_name(out, "detect", "auto") == ("finetune-detect-20261201-010000", True)
    name, continues = trainer.choose_run_name(out, "classify", "auto")
    assert not continues and name.startswith("finetune-classify-2")
    with pytest.raises(FileNotFoundError, match="cannot resume run 'nope'"):
        trainer.choose_run_name(out, "detect", "nope")


def test_time_budget_drives_cosine_and_poly_decay():
    kw = {"total_steps": 1000, "steps_per_epoch": 100}
    assert optim.lr_factor(10, schedule="cosine", progress=0.5, **kw) == pytest.approx(0.5)
    assert optim.lr_factor(10, schedule="cosine", progress=1.5, **kw) == pytest.approx(0.0)
    assert optim.lr_factor(500, schedule="cosine", progress=0.0, **kw) == pytest.approx(0.5)  # steps ahead
    assert optim.lr_factor(10, schedule="poly", power=1.0, progress=0.75, **kw) == pytest.approx(0.25)
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    spent = [0.0]
    sched = optim.build_scheduler(opt, progress_fn=lambda: spent[0], schedule="cosine", **kw)
    spent[0] = 1.0
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)


def test_detection_validation_survives_a_batch_without_proposals(shards):
    from pipeline.training import validation

    src = data.load_source(str(shards))
    cats = data.CategoryMap.from_categories(src.categories, background=True)
    raw = data.read_image_bytes(src, [0, 1])
    items = [validation.ValImage(r, data.decode_rgb(raw[r["id"]])) for r in src.images[:2]]
    torch.manual_seed(0)
    # No objectness reaches 1.01: the RPN keeps no proposal, as early in training from scratch.
    model, _ = models.build_model(
        "detect", "fasterrcnn_mobilenet_v3_large_320_fpn", cats.num_classes,
        detector_kwargs={"min_size": 64, "max_size": 96, "rpn_score_thresh": 1.01},
    )
    src.images = src.images[:2]
    metrics = validation.evaluate_detection(model, items, src, cats)
    assert metrics["detections"] == 0 and metrics["map50"] in (0.0, -1.0)


def test_precise_bn_replaces_stale_running_statistics():
    """Running stats become the exact average over the given batches; weights, momentum and
    train/eval mode are untouched; a model without BatchNorm is left alone."""
    from pipeline.training.precise_bn import recompute_bn_stats

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4, momentum=0.01))
    model.eval()
    weights = {k: v.clone() for k, v in model.state_dict().items()
               if "running" not in k and "num_batches" not in k}
    batches = [torch.randn(4, 3, 5, 5) * 3 + 2 for _ in range(3)]
    assert recompute_bn_stats(model, batches) == 3
    with torch.no_grad():
        feats = [model[0](b) for b in batches]
    expect_mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)
    expect_var = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in feats]).mean(0)
    bn = model[1]
    assert torch.allclose(bn.running_mean, expect_mean, atol=1e-5)
    assert torch.allclose(bn.running_var, expect_var, atol=1e-4)
    assert bn.momentum == 0.01 and not model.training and not bn.training
    for k, v in weights.items():
        assert torch.equal(model.state_dict()[k], v), k
    # No batch: statistics stay as they were.
    before = bn.running_mean.clone()
    assert recompute_bn_stats(model, []) == 0
    assert torch.equal(bn.running_mean, before)
    assert recompute_bn_stats(torch.nn.Linear(2, 2), batches) == 0


def _bn_setup(shards, images: int, batch_size: int, precise_bn_images: int):
    """A from-scratch 320 detector, decoded training images and the loop's config for precise BN."""
    from pipeline.training import loop

    source = data.load_source(str(shards))
    cats = data.CategoryMap.from_categories(source.categories, background=True)
    local = loop._decode_all(source, list(range(images)))
    cfg = {"batch_size": batch_size, "hflip_prob": 0.5, "min_size": 96, "max_size": 128,
           "precise_bn_images": precise_bn_images}
    model, _ = models.build_model("detect", "fasterrcnn_mobilenet_v3_large_320_fpn", cats.num_classes,
                                  detector_kwargs=loop._detector_kwargs(cfg))
    return loop, model, local, cats, cfg, source


def test_precise_bn_in_the_loop_uses_the_detector_backbone(shards):
    """The loop's precise-BN step runs the detector's backbone on training images and sets
    statistics that differ from the untouched initial ones; 0 images turns it off."""
    loop, model, local, cats, cfg, source = _bn_setup(shards, images=4, batch_size=2, precise_bn_images=4)
    model.eval()
    first_bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    off = {**cfg, "precise_bn_images": 0}
    assert loop._recompute_bn("detect", model, local, cats, off, source, None) == 0
    assert torch.equal(first_bn.running_mean, torch.zeros_like(first_bn.running_mean))
    assert loop._recompute_bn("detect", model, local, cats, cfg, source, None) == 2
    assert not torch.equal(first_bn.running_mean, torch.zeros_like(first_bn.running_mean))
    assert not model.training


def test_precise_bn_skips_a_trailing_one_image_batch(shards):
    """Batch size 1 is raised to 2 and a last batch of one image is left out (BatchNorm has no
    batch statistics for one image at a 1x1 map); QAT runs skip it."""
    loop, model, local, cats, cfg, source = _bn_setup(shards, images=3, batch_size=1, precise_bn_images=3)
    assert loop._recompute_bn("detect", model, local, cats, cfg, source, None) == 1
    assert loop._recompute_bn("detect", model, local, cats, {**cfg, "qat": True}, source, None) == 0


def test_ray_quiet_hook_silences_only_the_placement_group_cleaner(caplog):
    """Local clusters run without a dashboard; Ray Train's cleaner then warns every second."""
    import logging

    from pipeline import ray_quiet

    noisy = logging.getLogger(ray_quiet.NOISY_LOGGERS[0])
    other = logging.getLogger("ray.train.v2._internal.execution.controller.controller")
    before = noisy.level
    try:
        ray_quiet.worker_setup()
        with caplog.at_level(logging.WARNING):
            noisy.warning("Failed to query Ray Train Controller actor state.")
            noisy.error("a real error")
            other.warning("an ordinary warning")
        assert [r.getMessage() for r in caplog.records] == ["a real error", "an ordinary warning"]
    finally:
        noisy.setLevel(before)
    assert ray_quiet.LOCAL_RUNTIME_ENV["worker_process_setup_hook"] == "pipeline.ray_quiet.worker_setup"


def test_unset_lr_is_the_recipe_lr_scaled_to_the_total_batch():
    from jobs import config as cfgmod
    from jobs.finetune import FinetuneConfig, resolve_settings

    def lr(**keys):
        ft = cfgmod._build(FinetuneConfig, {"train": "t", "output": "o", **keys}, "finetune", None)
        return resolve_settings(ft)["lr"]

    assert lr(task="classify") == pytest.approx(0.064 * 32 / 1024)  # one worker, default batch 32
    assert lr(task="classify", batch_size=64, workers=2) == pytest.approx(0.064 * 128 / 1024)
    assert lr(task="detect") == pytest.approx(0.02 * 2 / 16)
    assert lr(task="segment", workers=8) == pytest.approx(0.01)  # the recipe's own 8 x 4
    assert lr(task="classify", lr=0.05) == 0.05  # a set lr is kept as given

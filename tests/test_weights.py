"""Weights registry and loader: local, memory:// and http:// reads, hash checks, clear errors.

Checkpoints are made here from freshly built models and named with their own sha256
prefix (torchvision's "<name>-<hex>.pth" convention). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import http.server
import io
import re
import threading
import uuid
from pathlib import Path

import fsspec
import pytest
import torch

import mnv3
from mnv3 import categories, weights
from mnv3.layers import FrozenBatchNorm2d
from mnv3.transforms import ClassificationPreset, SegmentationPreset
from mnv3.weights import WeightsError, load_state_dict, load_weights


def _save(obj, directory: Path, stem: str) -> Path:
    """torch.save ``obj`` as ``<stem>-<sha256[:8]>.pth`` in ``directory``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    path = directory / f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    path.write_bytes(data)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch, tmp_path):
    """No test may fall back to the network or to a real torch hub cache."""
    monkeypatch.setenv(weights.OFFLINE_ENV, "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(weights.WEIGHTS_DIR_ENV, raising=False)


@pytest.fixture(scope="module")
def small_sd():
    torch.manual_seed(0)
    return mnv3.mobilenet_v3_small().state_dict()


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="module")
def small_file(small_sd, ckpt_dir) -> Path:
    return _save(small_sd, ckpt_dir, "small")


def _assert_loaded(model: torch.nn.Module, sd: dict) -> None:
    got = model.state_dict()
    assert got.keys() == sd.keys()
    for key, value in sd.items():
        assert torch.equal(got[key], value), key


# ------------------------------------------------------------------ successful loads


def test_load_local_path(small_file, small_sd):
    model = mnv3.mobilenet_v3_small()
    info = load_weights(model, str(small_file))
    _assert_loaded(model, small_sd)
    assert info.sha256 == _sha(small_file)
    assert info.uri == str(small_file)
    assert info.entry is None and info.num_keys == len(small_sd)
    assert info.missing_keys == () and info.unexpected_keys == ()


def test_load_memory_uri(small_file, small_sd):
    fs = fsspec.filesystem("memory")
    path = f"/mnv3-test-{uuid.uuid4().hex}/{small_file.name}"
    fs.pipe(path, small_file.read_bytes())
    try:
        model = mnv3.mobilenet_v3_small()
        info = load_weights(model, f"memory://{path}")
        _assert_loaded(model, small_sd)
        assert info.sha256 == _sha(small_file)
    finally:
        fs.rm(path)


@pytest.fixture(scope="module")
def http_root(ckpt_dir):
    handler = functools.partial(_QuietHandler, directory=str(ckpt_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_load_http_url(http_root, small_file, small_sd):
    model = mnv3.mobilenet_v3_small()
    info = load_weights(model, f"{http_root}/{small_file.name}")
    _assert_loaded(model, small_sd)
    assert info.sha256 == _sha(small_file)


def test_http_missing_file_names_url(http_root):
    url = f"{http_root}/nothing-here.pth"
    with pytest.raises(WeightsError, match=re.escape(url)):
        load_weights(mnv3.mobilenet_v3_small(), url)


@pytest.fixture(scope="module")
def s3_options():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield {"key": "testing", "secret": "testing", "endpoint_url": f"http://{host}:{port}",
           "client_kwargs": {"region_name": "eu-west-1"}}
    server.stop()


def test_load_s3_uri_and_s3_weights_dir(s3_options, small_file, small_sd):
    fs = fsspec.filesystem("s3", **s3_options)
    bucket = f"weights-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    fs.pipe(f"{bucket}/models/{small_file.name}", small_file.read_bytes())
    model = mnv3.mobilenet_v3_small()
    info = load_weights(model, f"s3://{bucket}/models/{small_file.name}", storage_options=s3_options)
    _assert_loaded(model, small_sd)
    assert info.sha256 == _sha(small_file)
    # A registry name is looked up in an s3:// weights directory (this copy fails the official hash).
    entry = weights.get_weights("mobilenet_v3_small.imagenet1k_v1")
    fs.pipe(f"{bucket}/models/{entry.filename}", small_file.read_bytes())
    expected = f"s3://{bucket}/models/{entry.filename}.*expected prefix 047dcff4"
    with pytest.raises(WeightsError, match=expected):
        load_weights(model, entry.name, weights_dir=f"s3://{bucket}/models", storage_options=s3_options)


def test_builder_weights_argument(ckpt_dir):
    torch.manual_seed(1)
    sd = mnv3.mobilenet_v3_large().state_dict()
    path = _save(sd, ckpt_dir, "large")
    model = mnv3.mobilenet_v3_large(weights=str(path))
    _assert_loaded(model, sd)


def test_frozen_bn_and_batchnorm_checkpoints_interchange(small_sd, tmp_path):
    """num_batches_tracked is dropped by FrozenBatchNorm2d and filled in by BatchNorm2d."""
    frozen = mnv3.mobilenet_v3_small(norm_layer=FrozenBatchNorm2d)
    load_weights(frozen, str(_save(small_sd, tmp_path, "bn")))
    assert torch.equal(frozen.state_dict()["features.0.1.running_var"], small_sd["features.0.1.running_var"])
    frozen_sd = frozen.state_dict()
    assert not any(k.endswith("num_batches_tracked") for k in frozen_sd)
    model = mnv3.mobilenet_v3_small()
    load_weights(model, str(_save(frozen_sd, tmp_path, "frozen")))
    assert torch.equal(model.state_dict()["classifier.3.bias"], small_sd["classifier.3.bias"])


def test_training_checkpoint_wrappers(small_sd, tmp_path):
    wrapped = {"model": small_sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 7}
    ddp = {"state_dict": {f"module.{k}": v for k, v in small_sd.items()}}
    for obj in (wrapped, ddp):
        path = _save(obj, tmp_path, "wrapped")
        assert load_state_dict(str(path)).keys() == small_sd.keys()
        model = mnv3.mobilenet_v3_small()
        load_weights(model, str(path))
        _assert_loaded(model, small_sd)


def test_explicit_sha256_and_opt_out(small_sd, small_file, tmp_path):
    assert load_state_dict(str(small_file), sha256=_sha(small_file)).keys() == small_sd.keys()
    renamed = tmp_path / "small-00000000aaaa.pth"  # tail looks like a hash but is not this file's
    renamed.write_bytes(small_file.read_bytes())
    with pytest.raises(WeightsError, match="00000000aaaa"):
        load_state_dict(str(renamed))
    assert load_state_dict(str(renamed), sha256="").keys() == small_sd.keys()


def test_non_strict_reports_missing_keys(small_sd, tmp_path):
    partial = {k: v for k, v in small_sd.items() if not k.startswith("classifier.")}
    path = _save(partial, tmp_path, "headless")
    model = mnv3.mobilenet_v3_small(num_classes=5)
    info = load_weights(model, str(path), strict=False)
    assert set(info.missing_keys) == {k for k in small_sd if k.startswith("classifier.")}
    assert torch.equal(model.state_dict()["features.0.0.weight"], small_sd["features.0.0.weight"])


# ------------------------------------------------------------------ errors


def test_wrong_hash_in_file_name(small_file, tmp_path):
    bad = tmp_path / "small-deadbeef.pth"
    bad.write_bytes(small_file.read_bytes())
    with pytest.raises(WeightsError) as err:
        load_weights(mnv3.mobilenet_v3_small(), str(bad))
    msg = str(err.value)
    assert str(bad) in msg and "deadbeef" in msg and _sha(small_file) in msg


def test_wrong_explicit_hash(small_file):
    with pytest.raises(WeightsError, match="expected prefix 0123abcd"):
        load_state_dict(str(small_file), sha256="0123abcd")


def test_official_name_with_other_content_fails_registry_hash(small_file, tmp_path):
    entry = weights.get_weights("MobileNet_V3_Small_Weights.IMAGENET1K_V1")
    fake = tmp_path / entry.filename
    fake.write_bytes(small_file.read_bytes())
    with pytest.raises(WeightsError, match=f"expected prefix {entry.sha256_prefix}"):
        load_weights(mnv3.mobilenet_v3_small(), str(fake))
    # The same file found through the registry name and a weights directory.
    with pytest.raises(WeightsError, match=f"{re.escape(str(fake))}.*expected prefix {entry.sha256_prefix}"):
        load_weights(mnv3.mobilenet_v3_small(), "mobilenet_v3_small.default", weights_dir=tmp_path)


def test_weights_dir_from_env(small_file, tmp_path, monkeypatch):
    entry = weights.get_weights("MobileNet_V3_Small_Weights.IMAGENET1K_V1")
    (tmp_path / entry.filename).write_bytes(small_file.read_bytes())
    monkeypatch.setenv(weights.WEIGHTS_DIR_ENV, str(tmp_path))
    uri, found = weights.resolve("MobileNet_V3_Small_Weights.DEFAULT")
    assert found is entry and uri == f"{tmp_path}/{entry.filename}"


def test_registry_name_not_local_and_offline():
    entry = weights.get_weights("MobileNet_V3_Large_Weights.DEFAULT")
    with pytest.raises(WeightsError) as err:
        load_weights(mnv3.mobilenet_v3_large(), "MobileNet_V3_Large_Weights.DEFAULT")
    msg = str(err.value)
    assert entry.filename in msg and entry.url in msg and weights.WEIGHTS_DIR_ENV in msg
    with pytest.raises(WeightsError, match="downloading is off"):
        weights.resolve(entry.name, allow_download=False)


def test_missing_file(tmp_path):
    path = tmp_path / "absent-1234abcd.pth"
    with pytest.raises(WeightsError, match=f"not found: {re.escape(str(path))}"):
        load_weights(mnv3.mobilenet_v3_small(), str(path))
    with pytest.raises(WeightsError, match="memory://no/such/file.pth"):
        load_state_dict("memory://no/such/file.pth")


def test_small_file_into_large_model(small_file):
    model = mnv3.mobilenet_v3_large()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError) as err:
        load_weights(model, str(small_file))
    msg = str(err.value)
    assert str(small_file) in msg
    assert re.search(r"\d+ missing from file: features\.", msg)
    assert re.search(r"\d+ unexpected in file: features\.", msg)
    assert re.search(r"\d+ shape mismatches: features\.\S+ file \[", msg)
    assert "MobileNetV3-Small" in msg and "MobileNetV3-Large" in msg
    _assert_loaded(model, before)  # untouched on error


def test_num_classes_mismatch(small_file):
    with pytest.raises(WeightsError) as err:
        mnv3.mobilenet_v3_small(weights=str(small_file), num_classes=10)
    msg = str(err.value)
    assert "classifier.3.weight: file [1000, 1024] vs model [10, 1024]" in msg
    assert "num_classes=1000" in msg
    assert "missing" not in msg and "unexpected" not in msg


def test_detection_checkpoint_into_classifier(small_sd, tmp_path):
    det = {"backbone.body." + k.removeprefix("features."): v
           for k, v in small_sd.items() if k.startswith("features.")}
    det["rpn.head.cls_logits.weight"] = torch.zeros(15, 256, 1, 1)
    det["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(91, 1024)
    path = _save(det, tmp_path, "det")
    with pytest.raises(WeightsError) as err:
        load_weights(mnv3.mobilenet_v3_small(), str(path))
    msg = str(err.value)
    assert "Faster R-CNN" in msg and "fasterrcnn_mobilenet_v3_large_fpn" in msg
    assert "unexpected in file: backbone.body." in msg


def test_aux_head_in_file_hints_aux_loss(small_sd, tmp_path):
    extra = {**small_sd, "aux_classifier.4.weight": torch.zeros(21, 10, 1, 1)}
    path = _save(extra, tmp_path, "aux")
    with pytest.raises(WeightsError) as err:
        load_weights(mnv3.mobilenet_v3_small(), str(path))
    assert "1 unexpected in file: aux_classifier.4.weight" in str(err.value)
    assert "build the model with aux_loss=True" in str(err.value)


def test_garbage_bytes(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a checkpoint at all\x00\x01" * 50)
    with pytest.raises(WeightsError, match=f"{re.escape(str(path))} is not a PyTorch checkpoint"):
        load_weights(mnv3.mobilenet_v3_small(), str(path))


def test_non_tensor_objects_refused(small_sd, tmp_path):
    path = _save({"model": small_sd, "args": argparse.Namespace(lr=0.1)}, tmp_path, "train")
    with pytest.raises(WeightsError, match="weights_only") as err:
        load_weights(mnv3.mobilenet_v3_small(), str(path))
    assert str(path) in str(err.value) and "model.state_dict()" in str(err.value)


def test_pickle_without_state_dict(tmp_path):
    path = _save({"epoch": 3, "note": "no tensors"}, tmp_path, "empty")
    with pytest.raises(WeightsError, match="holds no state_dict"):
        load_state_dict(str(path))


# ------------------------------------------------------------------ registry


def test_registry_integrity():
    expected_counts = {"imagenet1k": 1000, "coco91": 91, "voc21": 21}
    assert len(weights.WEIGHTS) == 9
    for name, entry in weights.WEIGHTS.items():
        assert entry.name == name
        match = re.fullmatch(r"(?:quantized/)?[a-z0-9_]+-([0-9a-f]{8})\.pth", entry.file)
        assert match and match.group(1) == entry.sha256_prefix, entry.file
        assert entry.url == "https://download.pytorch.org/models/" + entry.file
        assert weights.expected_sha256(entry.url) == entry.sha256_prefix
        assert len(entry.categories) == expected_counts[entry.category_set]
        assert entry.metrics and all(v for v in entry.metrics.values())
        assert entry.num_params > 0 and entry.min_size == (1, 1)
    for enum, target in weights.DEFAULTS.items():
        assert target.startswith(enum + ".") and target in weights.WEIGHTS


def test_registry_facts():
    large_v2 = weights.get_weights("MobileNet_V3_Large_Weights.IMAGENET1K_V2")
    assert weights.get_weights("MobileNet_V3_Large_Weights.DEFAULT") is large_v2
    assert weights.get_weights("mobilenet_v3_large.default") is large_v2
    assert weights.default_weights("mobilenet_v3_large") is large_v2
    assert weights.get_weights("MOBILENET_V3_LARGE.IMAGENET1K_V1").sha256_prefix == "8738ca79"
    assert large_v2.preprocessing.make() == ClassificationPreset(crop_size=224, resize_size=232)
    assert weights.get_weights("mobilenet_v3_small.imagenet1k_v1").preprocessing.resize_size == 256
    quant = weights.get_weights("quantized_mobilenet_v3_large.default")
    assert quant.backend == "qnnpack" and quant.file.startswith("quantized/")
    assert quant.unquantized == "MobileNet_V3_Large_Weights.IMAGENET1K_V1"
    deeplab = weights.default_weights("deeplabv3_mobilenet_v3_large")
    assert deeplab.builder_kwargs["aux_loss"] is True and deeplab.builder_kwargs["num_classes"] == 21
    assert deeplab.preprocessing.make() == SegmentationPreset(resize_size=520)
    assert weights.default_weights("fasterrcnn_mobilenet_v3_large_fpn").num_params == 19_386_354
    assert weights.default_weights("lraspp_mobilenet_v3_large").categories[0] == "__background__"
    with pytest.raises(KeyError, match="unknown weights"):
        weights.get_weights("MobileNet_V3_Large_Weights.IMAGENET1K_V9")
    with pytest.raises(KeyError, match="no published weights"):
        weights.default_weights("resnet50")


def test_category_lists():
    coco = categories.COCO_91
    assert coco[0] == "__background__" and coco[1] == "person" and coco[90] == "toothbrush"
    assert [i for i, n in enumerate(coco) if n == "N/A"] == [12, 26, 29, 30, 45, 66, 68, 69, 71, 83]
    assert categories.VOC_21[0] == "__background__" and categories.VOC_21[20] == "tvmonitor"
    imagenet = categories.imagenet_1k()
    assert len(set(imagenet)) == 1000 and imagenet[0] == "tench"

"""Synthetic data: masks round-trip through pycocotools, pixels match masks, bytes are deterministic."""

from __future__ import annotations

import io
import json
import os
import tarfile
import uuid

import fsspec
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from jobs import cli
from jobs.synth import parse_storage_options
from pipeline import storage, synth

SMALL = {"min_size": 64, "max_size": 160}  # small images keep the suite fast


def read_tar(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def mask_bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    summary = synth.write_dataset(str(out), images=7, shards=3, seed=11, **SMALL)
    return out, summary


def test_render_sample_properties():
    seen_categories, shapes = set(), set()
    for index in range(30):
        sample = synth.render_sample(5, index, **SMALL)
        w, h = sample.image.size
        assert sample.image.mode == "RGB"
        assert 64 <= w <= 160 and 64 <= h <= 160
        shapes.add(w == h)
        assert sample.key == f"{index:08d}"
        assert 1 <= len(sample.instances) <= synth.MAX_SHAPES
        covered = np.zeros((h, w), dtype=int)
        for inst in sample.instances:
            assert inst.mask.shape == (h, w) and inst.mask.dtype == bool
            assert inst.area == int(inst.mask.sum()) >= synth.MIN_VISIBLE_AREA
            assert inst.bbox == mask_bbox(inst.mask)
            covered += inst.mask
            seen_categories.add(inst.category_id)
        assert covered.max() <= 1, "visible masks of one image must not overlap"
    assert seen_categories == {c["id"] for c in synth.CATEGORIES}
    assert False in shapes, "image sizes should include non-square images"


def test_categories_are_coco_style():
    assert len(synth.CATEGORIES) >= 3
    ids = [c["id"] for c in synth.CATEGORIES]
    assert ids == sorted(set(ids)) and min(ids) >= 1
    assert all(set(c) == {"id", "name", "supercategory"} for c in synth.CATEGORIES)


def test_occlusion_removes_hidden_pixels():
    # Find a sample where a later shape covers part of an earlier one, and check the earlier
    # instance's visible mask excludes exactly those pixels.
    for index in range(40):
        sample = synth.render_sample(1, index, **SMALL)
        if len(sample.instances) >= 2:
            union = np.zeros_like(sample.instances[0].mask)
            for inst in sample.instances:
                assert not (union & inst.mask).any()
                union |= inst.mask
            return
    pytest.fail("no sample with two instances in 40 draws")


def test_round_trip_with_pycocotools(dataset):
    out, summary = dataset
    coco = COCO(str(out / "annotations.json"))
    assert sorted(coco.getImgIds()) == list(range(1, 8))
    assert {c["name"] for c in coco.loadCats(coco.getCatIds())} >= {"circle", "rectangle", "triangle"}
    total = 0
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        sample = synth.render_sample(11, image_id - 1, **SMALL)
        assert info["file_name"] == f"{sample.key}.jpg"
        assert (info["width"], info["height"]) == sample.image.size
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert len(anns) == len(sample.instances) >= 1
        for ann, inst in zip(anns, sample.instances):
            decoded = coco.annToMask(ann).astype(bool)
            assert np.array_equal(decoded, inst.mask)
            assert ann["category_id"] == inst.category_id
            assert ann["bbox"] == mask_bbox(decoded)
            assert list(mask_utils.toBbox(ann["segmentation"])) == ann["bbox"]
            assert ann["area"] == int(decoded.sum()) == int(mask_utils.area(ann["segmentation"]))
            assert ann["iscrowd"] == 0 and isinstance(ann["segmentation"]["counts"], str)
        total += len(anns)
    assert summary["instances"] == total == len(coco.getAnnIds())
    assert len({a["id"] for a in coco.dataset["annotations"]}) == total


def test_shards_hold_images_and_their_own_annotations(dataset):
    out, summary = dataset
    coco = json.loads((out / "annotations.json").read_text())
    by_image = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    ranges = synth.shard_ranges(7, 3)
    assert [len(r) for r in ranges] == [2, 2, 3]
    assert summary["shards"] == [str(out / f"shard-{s:05d}.tar") for s in range(3)]
    for shard, indices in enumerate(ranges):
        members = read_tar((out / f"shard-{shard:05d}.tar").read_bytes())
        keys = [f"{i:08d}" for i in indices]
        assert list(members) == [f"{k}{ext}" for k in keys for ext in (".jpg", ".json")]
        for index, key in zip(indices, keys):
            own = json.loads(members[f"{key}.json"])
            image = coco["images"][index]
            assert image["shard"] == f"shard-{shard:05d}.tar"
            assert {k: own[k] for k in ("file_name", "width", "height")} == {
                k: image[k] for k in ("file_name", "width", "height")}
            assert own["annotations"] == by_image.get(index + 1, [])
            with Image.open(io.BytesIO(members[f"{key}.jpg"])) as im:
                assert im.format == "JPEG" and im.size == (own["width"], own["height"])


def test_jpeg_pixels_match_masks(dataset):
    out, _ = dataset
    coco = COCO(str(out / "annotations.json"))
    checked = 0
    for shard in range(3):
        members = read_tar((out / f"shard-{shard:05d}.tar").read_bytes())
        for name, data in members.items():
            if not name.endswith(".jpg"):
                continue
            index = int(name[:-4])
            decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)
            rendered = np.asarray(synth.render_sample(11, index, **SMALL).image, dtype=np.float64)
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=index + 1)):
                mask = coco.annToMask(ann).astype(bool)
                if mask.sum() < 100:
                    continue
                colour = np.median(rendered[mask], axis=0)  # the shape's fill colour
                # The rendered shape is flat colour (+ light noise) exactly under its mask ...
                assert np.abs(rendered[mask] - colour).mean() < 6
                # ... and survives JPEG: the mean inside the mask is close to that colour.
                assert np.abs(decoded[mask].mean(axis=0) - colour).max() < 6, (name, ann["id"])
                checked += 1
    assert checked >= 5


def test_same_seed_same_bytes_other_seed_differs(tmp_path, dataset):
    out, _ = dataset
    again = tmp_path / "again"
    synth.write_dataset(str(again), images=7, shards=3, seed=11, **SMALL)
    names = sorted(os.listdir(out))
    expected = ["annotations.json"] + [f"shard-{s:05d}.tar" for s in range(3)]
    assert names == sorted(os.listdir(again)) == expected
    for name in names:
        assert (out / name).read_bytes() == (again / name).read_bytes(), name
    other = tmp_path / "other"
    synth.write_dataset(str(other), images=7, shards=3, seed=12, **SMALL)
    for name in names:
        assert (out / name).read_bytes() != (other / name).read_bytes(), name


def test_memory_url():
    url = f"memory://synth-test-{uuid.uuid4().hex}"
    summary = synth.write_dataset(url, images=3, shards=2, seed=4, **SMALL)
    fs, root = fsspec.core.url_to_fs(url)
    try:
        assert summary["annotations"] == f"{url}/annotations.json"
        coco = json.loads(fs.cat_file(f"{root}/annotations.json"))
        assert [im["id"] for im in coco["images"]] == [1, 2, 3]
        members = read_tar(fs.cat_file(f"{root}/shard-00001.tar"))
        assert list(members) == ["00000001.jpg", "00000001.json", "00000002.jpg", "00000002.json"]
        assert summary["shards"] == [f"{url}/shard-00000.tar", f"{url}/shard-00001.tar"]
    finally:
        fs.rm(root, recursive=True)


@pytest.mark.parametrize("kwargs, word", [
    ({"images": 0, "shards": 1}, "images"),
    ({"images": 3, "shards": 0}, "shards"),
    ({"images": 2, "shards": 3}, "shards"),
    ({"images": 2, "shards": 1, "seed": -1}, "seed"),
    ({"images": 2, "shards": 1, "min_size": 8}, "min_size"),
    ({"images": 2, "shards": 1, "min_size": 100, "max_size": 90}, "max_size"),
    ({"images": 2, "shards": 1, "jpeg_quality": 0}, "jpeg_quality"),
    ({"images": 2.5, "shards": 1}, "images"),
    ({"images": 2, "shards": True}, "shards"),
])
def test_bad_arguments_name_the_argument(tmp_path, kwargs, word):
    with pytest.raises(ValueError, match=word):
        synth.write_dataset(str(tmp_path / "x"), **kwargs)
    assert not (tmp_path / "x").exists(), "nothing is written when arguments are bad"


def test_numpy_integers_are_accepted(tmp_path):
    summary = synth.write_dataset(str(tmp_path / "np"), images=np.int64(2), shards=np.int32(1),
                                  seed=np.uint8(3), min_size=np.int64(64), max_size=96)
    assert summary["images"] == 2 and json.loads(json.dumps(summary)) == summary


def test_rewrite_in_place_and_stale_shards(tmp_path):
    out = tmp_path / "re"
    synth.write_dataset(str(out), images=4, shards=2, seed=1, **SMALL)
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    synth.write_dataset(str(out), images=4, shards=2, seed=1, **SMALL)
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    with pytest.raises(ValueError, match="shard-00001.tar"):
        synth.write_dataset(str(out), images=4, shards=1, seed=1, **SMALL)
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before, "a refused run changes nothing"


def test_unwritable_output_names_output(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="output"):
        synth.write_dataset(str(blocker / "data"), images=1, shards=1, **SMALL)
    with pytest.raises(ValueError, match="output 'nosuchproto://bucket/x'"):
        synth.write_dataset("nosuchproto://bucket/x", images=1, shards=1, **SMALL)


def test_cli_writes_dataset_and_reports_errors(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = cli.main(["synth", "--output", str(out), "--images", "3", "--shards", "2", "--seed", "7",
                   "--min-size", "64", "--max-size", "96"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "wrote 3 images" in printed and "annotations.json" in printed
    coco = json.loads((out / "annotations.json").read_text())
    assert all(64 <= im["width"] <= 96 and 64 <= im["height"] <= 96 for im in coco["images"])
    reference = synth.render_sample(7, 0, 64, 96)
    assert (coco["images"][0]["width"], coco["images"][0]["height"]) == reference.image.size

    rc = cli.main(["synth", "--output", str(tmp_path / "bad"), "--images", "2", "--shards", "5"])
    assert rc == 2
    assert "shards" in capsys.readouterr().err


def test_parse_storage_options():
    assert parse_storage_options(["anon=true", "endpoint_url=http://127.0.0.1:9000", "n=3"]) == {
        "anon": True, "endpoint_url": "http://127.0.0.1:9000", "n": 3}
    assert parse_storage_options(None) == {}
    with pytest.raises(ValueError, match="key=value"):
        parse_storage_options(["novalue"])


def test_storage_join_and_atomic_write(tmp_path):
    assert storage.join("s3://bucket/prefix/", "a", "/b.tar") == "s3://bucket/prefix/a/b.tar"
    assert storage.join("/data", "x.json") == "/data/x.json"
    fs, path = storage.open_fs(str(tmp_path / "deep" / "dir"))
    target = storage.join(path, "obj.bin")
    storage.write_bytes_atomic(fs, target, b"first")
    storage.write_bytes_atomic(fs, target, b"second")
    assert (tmp_path / "deep" / "dir" / "obj.bin").read_bytes() == b"second"
    assert os.listdir(tmp_path / "deep" / "dir") == ["obj.bin"], "no temp files left behind"
    assert os.stat(target).st_mode & 0o777 != 0o600, "published files are not private temp files"
    mfs, mpath = storage.open_fs(f"memory://storage-test-{uuid.uuid4().hex}")
    try:
        storage.write_bytes_atomic(mfs, storage.join(mpath, "o.bin"), b"abc")
        assert mfs.cat_file(storage.join(mpath, "o.bin")) == b"abc"
    finally:
        mfs.rm(mpath, recursive=True)


@pytest.fixture(scope="module")
def s3_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def test_s3_url_via_storage_options(s3_server, capsys):
    bucket = f"synth-{uuid.uuid4().hex[:12]}"
    options = {"key": "testing", "secret": "testing", "endpoint_url": s3_server,
               "client_kwargs": {"region_name": "eu-west-1"}}
    fs, _ = storage.open_fs(f"s3://{bucket}", options)
    fs.mkdir(bucket)
    url = f"s3://{bucket}/datasets/shapes"
    rc = cli.main(["synth", "--output", url, "--images", "3", "--shards", "2", "--seed", "9",
                   "--min-size", "64", "--max-size", "96",
                   *[f"--storage-option={k}={json.dumps(v) if isinstance(v, dict) else v}"
                     for k, v in options.items()]])
    assert rc == 0, capsys.readouterr().err
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/datasets/shapes")) == [
        "annotations.json", "shard-00000.tar", "shard-00001.tar"]
    local = synth.write_dataset(f"memory://synth-s3-ref-{bucket}", images=3, shards=2, seed=9,
                                min_size=64, max_size=96)
    mfs, mroot = fsspec.core.url_to_fs(local["output"])
    try:
        for name in ("annotations.json", "shard-00000.tar", "shard-00001.tar"):
            assert fs.cat_file(f"{bucket}/datasets/shapes/{name}") == mfs.cat_file(f"{mroot}/{name}"), name
    finally:
        mfs.rm(mroot, recursive=True)

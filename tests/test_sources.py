"""Listing inputs into shards and reading shard members: tar, files, manifests, Parquet, S3."""

from __future__ import annotations

import pickle
import random
import re
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from corpus import (
    CASES,
    TRAVERSAL_NAMES,
    write_bad_header_tar,
    write_corpus_tar,
    write_corrupt_tar,
    write_garbage_tar,
    write_tar,
    write_traversal_tar,
)

from pipeline.decode import DecodeError, decode_image
from pipeline.sources import (
    Member,
    ShardReadError,
    ShardSpec,
    SourceError,
    list_shards,
    read_shard,
)

SAFE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


def read_all(spec: ShardSpec, **kwargs) -> list[Member]:
    return list(read_shard(spec, **kwargs))


def image_files(directory, names, payload=lambda name: name.encode()):
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).write_bytes(payload(name))


# ------------------------------------------------------------------------------------ tar

def test_tar_shards_listed_with_stable_safe_ids(tmp_path):
    write_corpus_tar(tmp_path / "train" / "000000.tar")
    write_corpus_tar(tmp_path / "train" / "000001.tar", CASES[:3])
    write_tar(tmp_path / "val.tar", {"a.jpg": b"x"})
    write_tar(tmp_path / "_tmp" / "partial.tar", {"a.jpg": b"x"})  # hidden: skipped
    write_tar(tmp_path / ".000002.tar.tmp", {"a.jpg": b"x"})
    (tmp_path / "README.txt").write_text("not an input")
    specs = list_shards(str(tmp_path))
    assert [(s.shard_id, s.kind) for s in specs] == [
        ("train__000000", "tar"), ("train__000001", "tar"), ("val", "tar")]
    assert specs[0].uris == (str(tmp_path / "train" / "000000.tar"),)
    assert list_shards(str(tmp_path) + "/") == specs  # deterministic, trailing slash irrelevant
    assert list_shards(str(tmp_path / "train" / "000001.tar"))[0].shard_id == "000001"


def test_tar_members_keys_bytes_and_sidecars(tmp_path):
    spec = list_shards(str(write_corpus_tar(tmp_path / "s.tar")))[0]
    members = read_all(spec)
    assert len(members) == len(CASES)  # the .json sidecars are not images
    for m, case in zip(members, CASES):
        assert m.key == case.name.rsplit(".", 1)[0]
        assert m.error is None and m.data == case.data(), m.key
        assert m.source_uri == f"{spec.uris[0]}#{case.name}"


def test_tar_keys_that_repeat_keep_their_full_name(tmp_path):
    tar = write_tar(tmp_path / "dup.tar", {"./a.jpg": b"1", "a.png": b"2", "a.json": b"{}", "sub/": b""})
    [spec] = list_shards(str(tar))
    assert [(m.key, m.data) for m in read_all(spec)] == [("a", b"1"), ("a.png", b"2")]


def test_corpus_tar_read_and_decoded(tmp_path):
    """Reader + decoder together: every corpus image gives its expected outcome from a shard."""
    [spec] = list_shards(str(write_corpus_tar(tmp_path / "corpus.tar")), images_per_shard=4)
    for member, case in zip(read_shard(spec), CASES, strict=True):
        try:
            out = decode_image(member.data, draft_size=224)
        except DecodeError as exc:
            assert not case.ok and case.error in str(exc), case.name
        else:
            assert case.ok and (out.width, out.height) == case.size, case.name


def test_tar_path_traversal_members_are_error_rows(tmp_path):
    spec = list_shards(str(write_traversal_tar(tmp_path / "evil.tar")))[0]
    members = read_all(spec)
    assert [m.key for m in members] == ["good", *TRAVERSAL_NAMES]
    assert members[0].data and members[0].error is None
    for m in members[1:]:
        assert m.data is None and "unsafe tar member name" in m.error and "refused" in m.error
    assert not (tmp_path.parent / "evil.jpg").exists()


@pytest.mark.parametrize("writer, message", [
    (write_corrupt_tar, "unexpected end of data"),
    (write_bad_header_tar, "unreadable member header"),
    (write_garbage_tar, "not a readable tar archive"),
])
def test_corrupt_tars_raise_shard_read_error(tmp_path, writer, message):
    spec = list_shards(str(writer(tmp_path / "bad.tar")))[0]
    with pytest.raises(ShardReadError, match=message) as info:
        read_all(spec)
    assert info.value.shard_id == "bad" and str(tmp_path / "bad.tar") in str(info.value)
    clone = pickle.loads(pickle.dumps(info.value))  # crosses Ray process boundaries
    assert (clone.shard_id, str(clone)) == (info.value.shard_id, str(info.value))


def test_tar_deleted_after_listing(tmp_path):
    spec = list_shards(str(write_tar(tmp_path / "gone.tar", {"a.jpg": b"x"})))[0]
    (tmp_path / "gone.tar").unlink()
    with pytest.raises(ShardReadError, match="not found"):
        read_all(spec)


def test_oversized_tar_member_is_an_error_row(tmp_path):
    spec = list_shards(str(write_tar(tmp_path / "big.tar", {"big.jpg": b"x" * 5000, "ok.jpg": b"y"})))[0]
    members = read_all(spec, max_member_bytes=4096)
    assert members[0].data is None and "5000 bytes" in members[0].error
    assert members[1].data == b"y"


# ------------------------------------------------------------------------------ image files

def names(count, seed=0):
    rng = random.Random(seed)
    return [f"{rng.getrandbits(48):012x}.jpg" for _ in range(count)]


def shard_map(specs):
    return {s.shard_id: s.uris for s in specs}


def test_files_grouping_covers_everything_once_with_average_size(tmp_path):
    image_files(tmp_path / "day1", names(600))
    image_files(tmp_path / "day1", ["notes.txt", "meta.json"], payload=lambda n: b"{}")
    specs = list_shards(str(tmp_path), images_per_shard=40)
    assert all(s.kind == "files" and SAFE_ID.match(s.shard_id) for s in specs)
    uris = [u for s in specs for u in s.uris]
    assert sorted(uris) == sorted(str(tmp_path / "day1" / n) for n in names(600))
    assert len(uris) == len(set(uris))
    assert 5 <= len(specs) <= 40, len(specs)  # ~600 / 40 = 15 expected
    assert list_shards(str(tmp_path), images_per_shard=40) == specs


def test_files_grouping_is_stable_for_a_growing_prefix(tmp_path):
    image_files(tmp_path / "day1", names(500))
    specs_before = list_shards(str(tmp_path), images_per_shard=25)
    before = shard_map(specs_before)
    new_names = names(10, seed=1)  # random names land anywhere in the sorted order
    image_files(tmp_path / "day1", new_names)
    image_files(tmp_path / "day2", names(60, seed=2))
    after = shard_map(list_shards(str(tmp_path), images_per_shard=25))
    changed = {sid for sid in before if before[sid] != after.get(sid)}
    # Only shards that received one of the new files may change; none disappears.
    receivers = {sid for sid, uris in after.items()
                 if any(u.rsplit("/", 1)[-1] in new_names for u in uris)}
    assert changed and changed <= receivers and len(changed) <= 10
    assert all(sid in after for sid in before)
    assert all(before[sid] == after[sid] for sid in set(before) - receivers)
    prints = {s.shard_id: s.fingerprint() for s in list_shards(str(tmp_path), images_per_shard=25)}
    old_prints = {s.shard_id: s.fingerprint() for s in specs_before}
    assert {sid for sid in old_prints if old_prints[sid] != prints[sid]} == changed
    assert {sid for sid in after if sid.startswith("day2--")}  # new directory: new shards only


def test_files_shard_reads_bytes_and_missing_objects(tmp_path):
    image_files(tmp_path, [f"{i:03d}.png" for i in range(40)])
    specs = list_shards(str(tmp_path), images_per_shard=10**9)
    assert len(specs) == 1 and specs[0].shard_id == "root--start"
    (tmp_path / "007.png").unlink()
    members = read_all(specs[0])
    assert [m.key for m in members] == [f"{i:03d}.png" for i in range(40)]
    assert members[7].data is None and "not found" in members[7].error
    assert all(m.data == m.key.encode() for i, m in enumerate(members) if i != 7)


def test_memory_filesystem(tmp_path):
    root = f"memory://sources-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    write_tar(tmp_path / "t.tar", {"k1.jpg": b"one", "k1.json": b"{}"})
    fs.pipe(f"{root}/tars/0.tar", (tmp_path / "t.tar").read_bytes())
    fs.pipe(f"{root}/imgs/a.jpg", b"a")
    try:
        specs = list_shards(root)
        assert [(s.shard_id, s.kind) for s in specs] == [("imgs--start", "files"), ("tars__0", "tar")]
        assert [(m.key, m.data) for m in read_all(specs[0])] == [("imgs/a.jpg", b"a")]
        assert [(m.key, m.data) for m in read_all(specs[1])] == [("k1", b"one")]
    finally:
        fs.rm(root, recursive=True)


# ------------------------------------------------------------------------------- manifests

def test_text_manifest_replaces_listing(tmp_path):
    image_files(tmp_path / "imgs", ["a.jpg", "b.jpg", "c.jpg", "unlisted.jpg"])
    write_tar(tmp_path / "t" / "0.tar", {"x.jpg": b"x"})
    manifest = tmp_path / "list.txt"
    manifest.write_text("# comment\n\nimgs/a.jpg\n" + f"{tmp_path}/imgs/b.jpg\n"
                        + "imgs/c.jpg\tpinned\nimgs/missing.jpg\n" + "t/0.tar\n")
    specs = list_shards(str(tmp_path), manifest=str(manifest))
    kinds = {s.shard_id: s.kind for s in specs}
    assert kinds == {"imgs--start": "uris", "pinned": "uris", "t__0": "tar"}
    by_id = {s.shard_id: s for s in specs}
    members = read_all(by_id["imgs--start"])
    assert [(m.key, m.data) for m in members[:2]] == [("imgs/a.jpg", b"a.jpg"), ("imgs/b.jpg", b"b.jpg")]
    assert members[2].key == "imgs/missing.jpg" and "not found" in members[2].error
    assert [m.key for m in read_all(by_id["pinned"])] == ["imgs/c.jpg"]
    assert "unlisted" not in repr(specs)


def test_parquet_manifest_with_shard_column(tmp_path):
    image_files(tmp_path, ["a.jpg", "b.jpg", "c.jpg"])
    pq.write_table(pa.table({"uri": [str(tmp_path / n) for n in ("a.jpg", "b.jpg", "c.jpg")],
                             "shard": ["s/1", "s/1", "s/2"]}), tmp_path / "m.parquet")
    specs = list_shards(str(tmp_path), manifest=str(tmp_path / "m.parquet"))
    assert [(s.shard_id, len(s.uris)) for s in specs] == [("s__1", 2), ("s__2", 1)]
    pq.write_table(pa.table({"path": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(SourceError, match="no 'uri' column"):
        list_shards(str(tmp_path), manifest=str(tmp_path / "bad.parquet"))


def test_exclude_leaves_out_the_jobs_own_output(tmp_path):
    write_tar(tmp_path / "in" / "0.tar", {"a.jpg": b"a"})
    (tmp_path / "in" / "out").mkdir()
    pq.write_table(pa.table({"image_id": ["x"]}), tmp_path / "in" / "out" / "0.parquet")
    with pytest.raises(SourceError, match="image_column"):
        list_shards(str(tmp_path / "in"))
    specs = list_shards(str(tmp_path / "in"), exclude=[str(tmp_path / "in" / "out") + "/"])
    assert [s.shard_id for s in specs] == ["0"]


def test_listing_errors_name_the_input(tmp_path):
    with pytest.raises(SourceError, match=re.escape(str(tmp_path)) + ".*--manifest"):
        list_shards(str(tmp_path))
    with pytest.raises(SourceError, match="input not found"):
        list_shards(str(tmp_path / "nope"))
    with pytest.raises(SourceError, match="manifest not found"):
        list_shards(str(tmp_path), manifest=str(tmp_path / "nope.txt"))
    with pytest.raises(SourceError, match="images_per_shard"):
        list_shards(str(tmp_path), images_per_shard=0)


def test_colliding_ids_are_made_unique(tmp_path):
    write_tar(tmp_path / "a" / "b.tar", {"x.jpg": b"1"})
    write_tar(tmp_path / "a__b.tar", {"x.jpg": b"2"})
    write_tar(tmp_path / "we ird#name.tar", {"x.jpg": b"3"})
    ids = [s.shard_id for s in list_shards(str(tmp_path))]
    assert len(set(ids)) == 3 and all(SAFE_ID.match(i) for i in ids)
    assert "we_ird_name" in ids


# --------------------------------------------------------------------------------- parquet

def write_images_parquet(path, rows, row_group_size, **columns):
    table = pa.table(columns) if columns else pa.table({
        "key": [f"k{i}" for i in range(rows)],
        "image": pa.array([f"img{i}".encode() if i != 3 else None for i in range(rows)], pa.binary()),
        "label": list(range(rows)),
    })
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def test_parquet_shards_split_by_row_groups(tmp_path):
    write_images_parquet(tmp_path / "part-0.parquet", rows=50, row_group_size=10)
    specs = list_shards(str(tmp_path), images_per_shard=20)
    assert [s.shard_id for s in specs] == [
        "part-0-rg00000-00001", "part-0-rg00002-00003", "part-0-rg00004-00004"]
    members = [m for s in specs for m in read_all(s)]
    assert [m.key for m in members] == [f"k{i}" for i in range(50)]
    assert members[3].data is None and "null" in members[3].error
    assert all(m.data == f"img{i}".encode() for i, m in enumerate(members) if i != 3)
    assert members[25].source_uri == f"{tmp_path / 'part-0.parquet'}#row=25"
    assert [s.shard_id for s in list_shards(str(tmp_path), images_per_shard=100)] == ["part-0"]


def test_parquet_column_detection(tmp_path):
    # a single binary column under any name; no key column -> row numbers
    write_images_parquet(tmp_path / "a.parquet", 3, 10, blob=pa.array([b"1", b"2", b"3"]))
    [spec] = list_shards(str(tmp_path / "a.parquet"))
    assert [(m.key, m.data) for m in read_all(spec)] == [("00000000", b"1"), ("00000001", b"2"),
                                                          ("00000002", b"3")]
    # Hugging Face datasets layout: image = struct<bytes, path>
    hf = pa.array([{"bytes": b"x", "path": "x.jpg"}],
                  pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    write_images_parquet(tmp_path / "hf.parquet", 1, 10, image=hf, id=pa.array([7]))
    [spec] = list_shards(str(tmp_path / "hf.parquet"))
    assert [(m.key, m.data) for m in read_all(spec)] == [("7", b"x")]
    # two binary columns: ambiguous unless one has a known name or image_column says
    write_images_parquet(tmp_path / "two.parquet", 1, 10, thumb=pa.array([b"t"]), raw=pa.array([b"r"]))
    with pytest.raises(SourceError, match=r"image_column.*|binary columns"):
        list_shards(str(tmp_path / "two.parquet"))
    [spec] = list_shards(str(tmp_path / "two.parquet"), image_column="raw")
    assert [m.data for m in read_all(spec)] == [b"r"]
    with pytest.raises(SourceError, match="'nope' not in"):
        list_shards(str(tmp_path / "two.parquet"), image_column="nope")


def test_parquet_deleted_after_listing(tmp_path):
    path = write_images_parquet(tmp_path / "p.parquet", rows=5, row_group_size=5)
    [spec] = list_shards(str(path))
    path.write_bytes(b"PAR1 truncated")
    with pytest.raises(ShardReadError, match="p.parquet"):
        read_all(spec)


# -------------------------------------------------------------------------------------- S3

@pytest.fixture
def s3_options(moto_s3):
    """s3fs storage options for the session's moto S3 server (tests/conftest.py)."""
    return dict(moto_s3)


def test_s3_tar_files_and_manifest(tmp_path, s3_options):
    fs = fsspec.filesystem("s3", **s3_options)
    bucket = f"src-{uuid.uuid4().hex[:10]}"
    fs.mkdir(bucket)
    fs.pipe(f"{bucket}/in/shards/000000.tar", write_traversal_tar(tmp_path / "t.tar").read_bytes())
    fs.pipe(f"{bucket}/in/shards/000001.tar", write_corrupt_tar(tmp_path / "c.tar").read_bytes())
    for i in range(40):
        fs.pipe(f"{bucket}/in/images/{i:03d}.jpg", f"img{i}".encode())
    specs = list_shards(f"s3://{bucket}/in", storage_options=s3_options, images_per_shard=10**9)
    assert [(s.shard_id, s.kind) for s in specs] == [
        ("images--start", "files"), ("shards__000000", "tar"), ("shards__000001", "tar")]
    members = read_all(specs[0], storage_options=s3_options)
    assert [m.data for m in members] == [f"img{i}".encode() for i in range(40)]
    assert members[0].source_uri == f"s3://{bucket}/in/images/000.jpg" and members[0].key == "images/000.jpg"
    tar_members = read_all(specs[1], storage_options=s3_options)
    assert [m.error is None for m in tar_members] == [True, False, False, False]
    with pytest.raises(ShardReadError, match="unexpected end of data"):
        read_all(specs[2], storage_options=s3_options)
    fs.pipe(f"{bucket}/m.txt", b"images/001.jpg\nimages/002.jpg\n")
    [spec] = list_shards(f"s3://{bucket}/in", storage_options=s3_options,
                         manifest=f"s3://{bucket}/m.txt")
    assert spec.kind == "uris" and spec.shard_id == "images--start"
    assert [m.data for m in read_all(spec, storage_options=s3_options)] == [b"img1", b"img2"]

"""Where images come from: list an input once into shards, then read one shard's members.

A shard is the unit of work and of commit, so its id must be deterministic, safe as a file
name, and stable across runs for the same input object. Inputs (any fsspec URL):

- ``*.tar`` (also ``.tar.gz``/``.tgz``) WebDataset-style shards: one shard per archive; members
  ``<key>.<ext>`` with an image extension become images, other members (``.json``, ...) are
  ignored. Member names with ``..`` or an absolute path become error members, never paths.
- image files under a prefix: grouped per directory, then cut into runs at "anchor" files
  whose name hashes to 0 modulo ``images_per_shard`` (content-defined boundaries, so shards
  hold ``images_per_shard`` images on average). A new file only changes the one shard whose
  name range it falls in, and a new directory (e.g. a nightly ``2026-11-29/``) only adds
  shards. A manifest with a ``shard`` column fixes the grouping exactly.
- ``*.parquet`` files with an image-bytes column (auto-detected or ``image_column``): one shard
  per file, or per range of row groups holding at least ``images_per_shard`` rows.
- a manifest (text: one URI per line, optionally ``<TAB>shard``; or Parquet: column ``uri``,
  optional ``shard``) replaces listing entirely; its ``.tar`` / ``.parquet`` entries become
  those shards, everything else is an image URI.

Names starting with ``.`` or ``_`` (temp files, ``_SUCCESS``) are skipped when listing.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import re
import tarfile
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

IMAGE_EXTENSIONS = frozenset(("jpg", "jpeg", "png", "gif", "webp", "bmp", "tif", "tiff"))
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet",)
IMAGE_COLUMN_NAMES = ("image", "img", "image_bytes", "jpg", "jpeg", "png", "bytes", "content", "data")
KEY_COLUMN_NAMES = ("key", "__key__", "id", "image_id", "filename", "file_name", "name", "path")
DEFAULT_MAX_MEMBER_BYTES = 256 * 1024 * 1024
_FETCH_CHUNK = 32  # objects fetched concurrently per fs.cat call (s3fs/gcsfs run them in parallel)


class SourceError(ValueError):
    """The input cannot be listed into shards (nothing found, bad manifest, bad column)."""


class ShardReadError(Exception):
    """A whole shard cannot be read (corrupt tar, missing or unreadable object)."""

    def __init__(self, shard_id: str, message: str):
        message = " ".join(message.split())  # one line, for logs and the error column
        super().__init__(f"shard {shard_id}: {message}")
        self.shard_id = shard_id
        self.message = message

    def __reduce__(self):  # picklable across Ray workers despite the two-argument constructor
        return (type(self), (self.shard_id, self.message))


@dataclass(frozen=True)
class ShardSpec:
    """One shard: ``kind`` is ``tar`` | ``files`` | ``parquet`` | ``uris``.

    ``extra`` holds (name, value) pairs: ``root`` (files/uris: keys are URIs relative to it),
    ``column``/``field``/``key_column``/``row_groups`` (parquet).
    """

    shard_id: str
    kind: str
    uris: tuple[str, ...]
    extra: tuple = ()

    def fingerprint(self) -> str:
        """A hash of the shard's content list: the id stays stable when a grouped prefix grows,
        this changes, so a resumed run can tell that a committed shard gained members."""
        text = "\n".join((self.kind, *self.uris, repr(self.extra)))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def option(self, name: str, default: Any = None) -> Any:
        for key, value in self.extra:
            if key == name:
                return value
        return default


@dataclass
class Member:
    """One image of a shard: its bytes, or ``data=None`` and an ``error`` saying why not."""

    key: str
    source_uri: str
    data: bytes | None
    error: str | None = None


# ----------------------------------------------------------------------------------- listing

def list_shards(input_url: str, *, storage_options: dict | None = None, manifest: str | None = None,
                images_per_shard: int = 256, image_column: str | None = None,
                key_column: str | None = None, exclude: Sequence[str] = ()) -> list[ShardSpec]:
    """List ``input_url`` (or read ``manifest``) once into shards, sorted by shard id.

    ``exclude`` holds URL prefixes to leave out, e.g. the job's own output when it lies under
    the input prefix (its Parquet files would otherwise be listed as inputs the next night).
    """
    if images_per_shard < 1:
        raise SourceError(f"images_per_shard must be >= 1, got {images_per_shard}")
    opts = storage_options or {}
    if manifest:
        root = _base(input_url) if input_url else _parent(_base(manifest))
        entries = _read_manifest(manifest, root, opts)
    else:
        root, entries = _list_input(input_url, opts)
    if exclude:
        prefixes = tuple(_normalize_url(e, opts).rstrip("/") for e in exclude)
        entries = [(u, s) for u, s in entries
                   if not any(u == p or u.startswith(p + "/") for p in prefixes)]
    specs = _build_specs(entries, root, opts, images_per_shard, image_column, key_column,
                         from_manifest=bool(manifest))
    if not specs:
        where = f"manifest {manifest}" if manifest else input_url
        raise SourceError(
            f"no shards found in {where}: expected *.tar shards, image files "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))}) or *.parquet files; "
            "pass --manifest with a list of URIs if the objects are elsewhere")
    return sorted(_dedupe_ids(specs), key=lambda s: s.shard_id)


def _list_input(input_url: str, opts: dict) -> tuple[str, list[tuple[str, str | None]]]:
    """(root URL, [(uri, None)]) for the files under ``input_url`` (a prefix, file or glob)."""
    fs, path = fsspec.core.url_to_fs(input_url, **opts)
    try:
        if any(ch in path for ch in "*?["):
            base = path[: min(path.index(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0]
            paths = []
            for p in sorted(fs.glob(path)):
                paths.extend(fs.find(p) if fs.isdir(p) else [p])
        elif fs.isdir(path):
            base, paths = path, fs.find(path)
        elif fs.isfile(path):
            base, paths = posixpath.dirname(path.rstrip("/")), [path]
        else:
            raise SourceError(f"input not found: {input_url}: check the path or bucket and the "
                              "storage options (endpoint, credentials)")
    except SourceError:
        raise
    except Exception as exc:
        raise SourceError(f"cannot list {input_url}: {type(exc).__name__}: {exc}; check the URL, "
                          "credentials and storage options") from exc
    base = base.rstrip("/")
    kept = [p for p in sorted(set(paths)) if not _hidden(_relative(p, base))]
    return _unstrip(fs, base), [(_unstrip(fs, p), None) for p in kept]


def _read_manifest(manifest: str, base: str, opts: dict) -> list[tuple[str, str | None]]:
    """[(uri, shard or None)] from a text or Parquet manifest; relative URIs join ``base``."""
    fs, path = fsspec.core.url_to_fs(manifest, **opts)
    try:
        with fs.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise SourceError(f"manifest not found: {manifest}") from None
    except Exception as exc:
        raise SourceError(f"cannot read manifest {manifest}: {type(exc).__name__}: {exc}") from exc
    pairs: list[tuple[str, str | None]] = []
    if path.lower().endswith(PARQUET_SUFFIXES):
        try:
            pf = pq.ParquetFile(io.BytesIO(raw))
            names = pf.schema_arrow.names
            if "uri" not in names:
                raise SourceError(f"Parquet manifest {manifest} has no 'uri' column (columns: {names}); "
                                  "add one, and optionally a 'shard' column")
            table = pf.read(columns=[c for c in ("uri", "shard") if c in names])
        except SourceError:
            raise
        except Exception as exc:
            raise SourceError(f"manifest {manifest} is not a readable Parquet file: {exc}") from exc
        uris = table.column("uri").to_pylist()
        shards = (table.column("shard").cast(pa.string()).to_pylist()
                  if "shard" in table.column_names else [None] * len(uris))
        pairs = [(u, s) for u, s in zip(uris, shards) if u]
    else:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise SourceError(f"manifest {manifest} is neither Parquet nor UTF-8 text with one URI "
                              "per line") from None
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            uri, _, shard = line.partition("\t")
            pairs.append((uri.strip(), shard.strip() or None))
    return [(_resolve(uri, base), shard) for uri, shard in pairs]


def _build_specs(entries: Sequence[tuple[str, str | None]], root: str, opts: dict,
                 images_per_shard: int, image_column: str | None, key_column: str | None,
                 *, from_manifest: bool) -> list[ShardSpec]:
    specs: list[ShardSpec] = []
    images: list[tuple[str, str]] = []          # (uri, key) grouped by content-defined runs
    pinned: dict[str, list[str]] = defaultdict(list)  # manifest shard column -> uris
    for uri, shard in entries:
        lower = uri.lower()
        rel = _relative(uri, root)
        if lower.endswith(TAR_SUFFIXES):
            stem = re.sub(r"(\.tar\.gz|\.tgz|\.tar)$", "", rel, flags=re.IGNORECASE)
            specs.append(ShardSpec(_slug(stem), "tar", (uri,)))
        elif lower.endswith(PARQUET_SUFFIXES):
            specs.extend(_parquet_specs(uri, rel, opts, images_per_shard, image_column, key_column))
        elif from_manifest and shard is not None:
            pinned[shard].append(uri)
        elif from_manifest or _extension(lower) in IMAGE_EXTENSIONS:
            images.append((uri, rel))
    kind = "uris" if from_manifest else "files"
    extra = (("root", root),)
    for shard, uris in pinned.items():
        specs.append(ShardSpec(_slug(shard), kind, tuple(uris), extra))
    for shard_id, uris in _group_images(images, images_per_shard):
        specs.append(ShardSpec(shard_id, kind, uris, extra))
    return specs


def _group_images(images: list[tuple[str, str]], per_shard: int) -> Iterator[tuple[str, tuple[str, ...]]]:
    """Group (uri, relative key) per directory into runs that start at anchor names.

    A name is an anchor when its hash is 0 modulo ``per_shard``; a run goes from one anchor to
    the next, so runs average ``per_shard`` images and inserting a name changes only its own
    run. The run before a directory's first anchor is that directory's ``start`` run.
    """
    by_dir: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for uri, rel in images:
        directory, _, name = rel.rpartition("/")
        by_dir[directory].append((name, uri))
    for directory in sorted(by_dir):
        dir_id = _slug(directory) if directory else "root"
        anchor, run = "start", []
        for name, uri in sorted(by_dir[directory]):
            if _is_anchor(name, per_shard):
                if run:
                    yield f"{dir_id}--{anchor}", tuple(run)
                    run = []
                anchor = _slug(name)
            run.append(uri)
        if run:
            yield f"{dir_id}--{anchor}", tuple(run)


def _is_anchor(name: str, per_shard: int) -> bool:
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % per_shard == 0


def _parquet_specs(uri: str, rel: str, opts: dict, per_shard: int, image_column: str | None,
                   key_column: str | None) -> list[ShardSpec]:
    """One spec per file, or per run of row groups holding >= ``per_shard`` rows."""
    fs, path = fsspec.core.url_to_fs(uri, **opts)
    try:
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
            schema = meta.schema.to_arrow_schema()
    except Exception as exc:
        raise SourceError(f"cannot read the Parquet footer of {uri}: {type(exc).__name__}: {exc}; "
                          "remove the file or exclude it with a manifest") from exc
    column, field = _image_column(schema, image_column, uri)
    key = _key_column(schema, key_column, uri)
    stem = _slug(re.sub(r"\.parquet$", "", rel, flags=re.IGNORECASE))
    ranges, start, rows = [], 0, 0
    for i in range(meta.num_row_groups):
        rows += meta.row_group(i).num_rows
        if rows >= per_shard:
            ranges.append((start, i + 1))
            start, rows = i + 1, 0
    if rows or start < meta.num_row_groups:
        ranges.append((start, meta.num_row_groups))
    ranges = [(a, b) for a, b in ranges if sum(meta.row_group(i).num_rows for i in range(a, b))]
    specs = []
    for a, b in ranges:
        shard_id = stem if len(ranges) == 1 else f"{stem}-rg{a:05d}-{b - 1:05d}"
        extra = (("column", column), ("field", field), ("key_column", key), ("row_groups", (a, b)))
        specs.append(ShardSpec(shard_id, "parquet", (uri,), extra))
    return specs


def _image_column(schema: pa.Schema, wanted: str | None, uri: str) -> tuple[str, str | None]:
    """(column, struct field or None) holding the image bytes."""
    names = schema.names
    if wanted:
        if wanted not in names:
            raise SourceError(f"image column {wanted!r} not in {uri} (columns: {names})")
        typ = schema.field(wanted).type
        if _is_binary(typ):
            return wanted, None
        if pa.types.is_struct(typ) and typ.get_field_index("bytes") >= 0:
            return wanted, "bytes"
        raise SourceError(f"image column {wanted!r} in {uri} has type {typ}, not binary bytes")
    binary = [f.name for f in schema if _is_binary(f.type)]
    if len(binary) == 1:
        return binary[0], None
    preferred = [n for n in IMAGE_COLUMN_NAMES if n in binary]
    if preferred:
        return preferred[0], None
    structs = [f.name for f in schema if pa.types.is_struct(f.type) and f.type.get_field_index("bytes") >= 0
               and _is_binary(f.type.field("bytes").type)]
    if len(structs) == 1 and not binary:  # Hugging Face datasets: image = {bytes, path}
        return structs[0], "bytes"
    raise SourceError(f"cannot tell which column of {uri} holds the image bytes (binary columns: "
                      f"{binary}, all columns: {names}); set image_column")


def _key_column(schema: pa.Schema, wanted: str | None, uri: str) -> str | None:
    if wanted:
        if wanted not in schema.names:
            raise SourceError(f"key column {wanted!r} not in {uri} (columns: {schema.names})")
        return wanted
    for name in KEY_COLUMN_NAMES:
        if name in schema.names:
            typ = schema.field(name).type
            if pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_integer(typ):
                return name
    return None


def _is_binary(typ: pa.DataType) -> bool:
    return pa.types.is_binary(typ) or pa.types.is_large_binary(typ) or pa.types.is_fixed_size_binary(typ)


# ----------------------------------------------------------------------------------- reading

def read_shard(spec: ShardSpec, *, storage_options: dict | None = None,
               max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> Iterator[Member]:
    """Yield the shard's images in a deterministic order.

    Unreadable members come back with ``data=None`` and ``error``; a shard that cannot be read
    at all (or is cut off part-way) raises :class:`ShardReadError` — possibly after some members
    were yielded, so the caller must treat the whole shard as failed.
    """
    opts = storage_options or {}
    if spec.kind == "tar":
        yield from _read_tar(spec, opts, max_member_bytes)
    elif spec.kind == "parquet":
        yield from _read_parquet(spec, opts)
    elif spec.kind in ("files", "uris"):
        yield from _read_objects(spec, opts)
    else:
        raise ShardReadError(spec.shard_id, f"unknown shard kind {spec.kind!r}")


def _read_tar(spec: ShardSpec, opts: dict, max_member_bytes: int) -> Iterator[Member]:
    uri = spec.uris[0]
    try:
        fs, path = fsspec.core.url_to_fs(uri, **opts)
        f = fs.open(path, "rb")
    except FileNotFoundError:
        raise ShardReadError(spec.shard_id, f"tar not found: {uri}") from None
    except Exception as exc:
        raise ShardReadError(spec.shard_id, f"cannot open {uri}: {type(exc).__name__}: {exc}") from exc
    with f:
        try:
            tf = tarfile.open(fileobj=f, mode="r:*")
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ShardReadError(spec.shard_id, f"{uri} is not a readable tar archive: {exc}") from None
        seen: set[str] = set()
        while True:
            try:
                info = tf.next()
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise ShardReadError(spec.shard_id, f"corrupt tar {uri}: {exc}") from None
            if info is None:
                break
            member = _tar_member(tf, info, uri, seen, max_member_bytes, spec.shard_id)
            if member is not None:
                yield member
        _check_tar_end(tf, uri, spec.shard_id)


def _tar_member(tf: tarfile.TarFile, info: tarfile.TarInfo, uri: str, seen: set[str],
                max_member_bytes: int, shard_id: str) -> Member | None:
    name = info.name
    if info.isdir() or _extension(name.lower()) not in IMAGE_EXTENSIONS:
        return None  # sidecars (.json, .cls, ...) and directories are not images
    source = f"{uri}#{name}"
    problem = _unsafe_name(name)
    if problem:
        return Member(name, source, None, f"unsafe tar member name {name!r} ({problem}): refused")
    if not info.isfile():
        return Member(name, source, None, f"tar member {name!r} is a link or special file, not image data")
    clean = name[2:] if name.startswith("./") else name
    key = clean.rsplit(".", 1)[0]
    key = clean if key in seen else key  # two images with one key (a.jpg, a.png): keep both
    seen.add(key)
    if info.size > max_member_bytes:
        return Member(key, source, None, f"tar member {name!r} is {info.size} bytes, over the "
                      f"{max_member_bytes}-byte limit per image")
    try:
        handle = tf.extractfile(info)
        data = handle.read() if handle is not None else b""
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ShardReadError(shard_id, f"corrupt tar {uri}: member {name!r}: {exc}") from None
    return Member(key, source, data, None)


def _check_tar_end(tf: tarfile.TarFile, uri: str, shard_id: str) -> None:
    """tarfile stops silently at a damaged header; make sure what follows is really the end."""
    try:
        tf.fileobj.seek(tf.offset)
        block = tf.fileobj.read(tarfile.BLOCKSIZE)
    except Exception as exc:
        raise ShardReadError(shard_id, f"corrupt tar {uri}: cannot read its end: {exc}") from None
    if block.strip(b"\0"):
        raise ShardReadError(shard_id, f"corrupt tar {uri}: unreadable member header at byte "
                             f"{tf.offset}; the archive is damaged or truncated")


def _read_parquet(spec: ShardSpec, opts: dict) -> Iterator[Member]:
    uri = spec.uris[0]
    column, field = spec.option("column"), spec.option("field")
    key_column = spec.option("key_column")
    first, last = spec.option("row_groups", (0, None))
    try:
        fs, path = fsspec.core.url_to_fs(uri, **opts)
        f = fs.open(path, "rb")
    except FileNotFoundError:
        raise ShardReadError(spec.shard_id, f"Parquet file not found: {uri}") from None
    except Exception as exc:
        raise ShardReadError(spec.shard_id, f"cannot open {uri}: {type(exc).__name__}: {exc}") from exc
    with f:
        try:
            pf = pq.ParquetFile(f)
            last = pf.metadata.num_row_groups if last is None else last
            row = sum(pf.metadata.row_group(i).num_rows for i in range(first))
            columns = [column] + ([key_column] if key_column and key_column != column else [])
            batches = pf.iter_batches(batch_size=64, row_groups=list(range(first, last)), columns=columns)
            for batch in batches:
                images = batch.column(column)
                if field:
                    images = images.field(field)
                keys = batch.column(key_column).to_pylist() if key_column else None
                for i, data in enumerate(images.to_pylist()):
                    key = str(keys[i]) if keys is not None and keys[i] is not None else f"{row:08d}"
                    source = f"{uri}#row={row}"
                    row += 1
                    if data is None:
                        yield Member(key, source, None, f"no image bytes (null in column {column!r})")
                    else:
                        yield Member(key, source, data, None)
        except ShardReadError:
            raise
        except Exception as exc:
            raise ShardReadError(spec.shard_id, f"cannot read {uri} (column {column!r}): "
                                 f"{type(exc).__name__}: {exc}") from exc


def _read_objects(spec: ShardSpec, opts: dict) -> Iterator[Member]:
    """Each URI is one image object; fetched in chunks so object stores fetch concurrently."""
    root = spec.option("root", "")
    filesystems: dict[str, Any] = {}
    for start in range(0, len(spec.uris), _FETCH_CHUNK):
        chunk = spec.uris[start:start + _FETCH_CHUNK]
        results: dict[str, Any] = {}
        groups: dict[str, tuple[Any, list[tuple[str, str]]]] = {}
        for uri in chunk:
            scheme = uri.split("://", 1)[0] if "://" in uri else "file"
            try:
                if scheme not in filesystems:
                    filesystems[scheme] = fsspec.core.url_to_fs(uri, **opts)[0]
                fs = filesystems[scheme]
                path = fs._strip_protocol(uri)
            except Exception as exc:
                results[uri] = exc
                continue
            groups.setdefault(scheme, (fs, []))[1].append((uri, path))
        for fs, items in groups.values():
            try:
                fetched = fs.cat([p for _, p in items], on_error="return")
            except Exception as exc:
                fetched = {p: exc for _, p in items}
            for uri, path in items:
                results[uri] = fetched.get(path, fetched.get(fs._strip_protocol(path),
                                                             FileNotFoundError(path)))
        for uri in chunk:
            value = results[uri]
            key = _relative(uri, root)
            if isinstance(value, (bytes, bytearray, memoryview)):
                yield Member(key, uri, bytes(value), None)
            elif isinstance(value, FileNotFoundError):
                yield Member(key, uri, None, f"object not found: {uri}")
            else:
                yield Member(key, uri, None, f"cannot read {uri}: {type(value).__name__}: {value}")


# ----------------------------------------------------------------------------------- helpers

def _slug(text: str) -> str:
    """A file-name-safe, deterministic rendering of a relative path or shard name."""
    slug = re.sub(r"[^A-Za-z0-9._-]", "_", text.strip("/").replace("/", "__")).lstrip(".-")
    if not slug:
        slug = "_"
    if len(slug) > 100:
        slug = f"{slug[:80]}-{_hash8(text)}"
    return slug


def _hash8(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def _dedupe_ids(specs: list[ShardSpec]) -> list[ShardSpec]:
    """Give every spec a unique id; ids that collide after slugging get a hash of their source."""
    counts: dict[str, int] = defaultdict(int)
    for spec in specs:
        counts[spec.shard_id] += 1
    out = []
    for spec in specs:
        if counts[spec.shard_id] > 1:
            source = f"{spec.kind}|{spec.uris[0]}|{spec.extra!r}"
            spec = ShardSpec(f"{spec.shard_id}-{_hash8(source)}", spec.kind, spec.uris, spec.extra)
        out.append(spec)
    return out


def _unsafe_name(name: str) -> str | None:
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if ".." in re.split(r"[\\/]", name):
        return "'..' path component"
    if "\x00" in name:
        return "NUL byte"
    return None


def _extension(name: str) -> str:
    base = posixpath.basename(name)
    return base.rsplit(".", 1)[1] if "." in base else ""


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split("/") if part)


def _relative(uri: str, root: str) -> str:
    root = root.rstrip("/")
    if root and uri.startswith(root + "/"):
        return uri[len(root) + 1:]
    return re.sub(r"^[A-Za-z][A-Za-z0-9+.-]*://", "", uri).lstrip("/")


def _unstrip(fs: Any, path: str) -> str:
    """A URL for ``path`` on ``fs``: plain paths stay plain for the local file system."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else fs.unstrip_protocol(path)


def _normalize_url(url: str, opts: dict) -> str:
    """``url`` spelled the way listing spells it (absolute local paths, fsspec URLs)."""
    fs, path = fsspec.core.url_to_fs(url, **opts)
    return _unstrip(fs, path.rstrip("/"))


def _base(url: str) -> str:
    """A URL to resolve relative manifest entries against: local paths made absolute."""
    if url.startswith("file://"):
        url = url[len("file://"):]
    if "://" not in url:
        return os.path.abspath(url)
    return url.rstrip("/")


def _parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else ""


def _resolve(uri: str, base: str) -> str:
    """Absolute URIs and paths as they are; relative ones joined to ``base`` (string work only:
    a manifest may hold millions of entries)."""
    if uri.startswith("file://"):
        return uri[len("file://"):]
    if "://" in uri or uri.startswith("/"):
        return uri
    return f"{base}/{uri}"

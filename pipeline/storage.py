"""One way to reach storage: fsspec URLs in, atomic whole-object writes out.

Every writer in the pipeline (synthetic shards, per-shard Parquet, manifests, reports) goes
through ``write_bytes_atomic`` so that a reader never sees half an object: on local disk the
bytes go to a temporary file in the target's directory and are moved into place with
``os.replace``; on object stores (S3, GCS, ``memory://``) a single upload publishes the whole
object at once (large S3 uploads are multipart, which S3 also publishes atomically).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files 0600; published files get the usual 0666 & ~umask instead.
_FILE_MODE = 0o666 & ~_current_umask()


def open_fs(
    url: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """``url`` (local path, ``s3://bucket/prefix``, ``memory://x``, ...) -> (filesystem, path in it).

    ``storage_options`` go to the filesystem constructor (e.g. ``{"endpoint_url": ...}`` for s3fs).
    """
    if not isinstance(url, str) or not url:
        raise ValueError(f"storage URL must be a non-empty string, got {url!r}")
    return fsspec.core.url_to_fs(url, **dict(storage_options or {}))


def join(url: str, *parts: str) -> str:
    """Join a URL or path with relative parts using ``/`` (works for ``s3://`` and local paths)."""
    out = url
    for part in parts:
        part = part.strip("/")
        if not part:
            continue
        out = out if out.endswith("/") else out + "/"
        out += part
    return out


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True when ``fs`` is the local disk (where atomicity needs temp file + rename)."""
    return isinstance(fs, LocalFileSystem)


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` on ``fs`` so that the object appears complete or not at all.

    Local: parent directories are created, the bytes go to a hidden temp file next to the
    target, are fsync'ed, and ``os.replace`` moves them into place. Elsewhere: one
    ``pipe_file`` call (a single PUT).
    """
    if is_local(fs):
        path = fs._strip_protocol(path)
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, _FILE_MODE)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    else:
        fs.pipe_file(path, bytes(data))

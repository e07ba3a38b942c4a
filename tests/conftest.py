"""Session fixtures shared by the suite: a real local Ray cluster and a real S3 server.

- ``RAY_AUTH_MODE=disabled`` is set before anything imports Ray (Ray 2.59+ turns token auth
  on for local clusters and writes ``~/.ray/auth_token`` otherwise).
- ``ray_cluster``: ``ray.init(num_cpus=2)`` once per session, with a finite Ray Data
  no-progress timeout so a stalled pipeline fails fast instead of hanging the suite.
- ``moto_s3``: moto's S3 server on 127.0.0.1 (a free port), started in a thread of the test
  process; ``s3_bucket`` gives each test a fresh bucket and the s3fs storage options.
"""

from __future__ import annotations

import os
import uuid

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "120")
# moto accepts any credentials; these keep botocore from looking for real ones.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

NO_PROGRESS_TIMEOUT_S = 120.0


@pytest.fixture(scope="session")
def ray_cluster():
    """A 2-CPU local Ray cluster for the whole session; yields its GCS address."""
    import ray

    if not ray.is_initialized():
        # address="local": always a fresh cluster of our own, even when another Ray cluster
        # (`ray start`) runs on this machine, which a bare ray.init() would connect to.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_no_progress_timeout_s = NO_PROGRESS_TIMEOUT_S
    ctx.enable_progress_bars = False
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def moto_s3():
    """An S3-compatible server on 127.0.0.1; yields the s3fs storage options that reach it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing",
               "client_kwargs": {"region_name": "eu-west-1"}}
    yield options
    server.stop()


@pytest.fixture
def s3_bucket(moto_s3):
    """A fresh, empty bucket: yields (``s3://<bucket>``, storage options)."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(**moto_s3)
    fs.mkdir(name)
    yield f"s3://{name}", dict(moto_s3)

"""Silence Ray worker log lines that are noise in a local cluster started without a dashboard.

Our local clusters (the demo, a finetune or annotate run without ``--ray-address``) start
without the dashboard, so Ray's state API is absent. Ray Train's placement-group cleaner
asks that API about its controller every second and logs a warning each time it cannot
(hundreds of lines per training run, none of them actionable). The hook below runs in every
worker process of such a cluster and raises only that logger's level; everything else is
logged as before. Clusters with a dashboard (``ray up``, KubeRay) do not need it.
"""

from __future__ import annotations

import logging

NOISY_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)

# ``ray.init(runtime_env=LOCAL_RUNTIME_ENV, include_dashboard=False, ...)``
LOCAL_RUNTIME_ENV = {"worker_process_setup_hook": "pipeline.ray_quiet.worker_setup"}


def worker_setup() -> None:
    """Worker-process setup hook: only errors from the loggers in ``NOISY_LOGGERS``."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)

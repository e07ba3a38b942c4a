"""Keep the output of local Ray clusters readable: no repeated warnings, no doubled lines.

Our local clusters (the demo, a finetune run without a cluster address) start without the
dashboard, so Ray's state API is absent. Ray Train's placement-group cleaner asks that API
about its controller every second and logs a warning each time it cannot (hundreds of lines
per training run, none of them actionable). The hook below runs in every worker process of
such a cluster and raises only that logger's level; everything else is logged as before.

Ray Train also patches ``print`` in its workers to go through its logger, and in a worker
whose stdout Ray has wrapped it prints the line a second time, so every progress line of a
training run appeared twice. ``RAY_TRAIN_ENABLE_PRINT_PATCH=0`` keeps the plain ``print``.
On a cluster you submit to, pass the same with ``--runtime-env-json`` (docs/scale_out.md).
"""

from __future__ import annotations

import logging

NOISY_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)

# ``ray.init(runtime_env=LOCAL_RUNTIME_ENV, include_dashboard=False, ...)``
LOCAL_RUNTIME_ENV = {"worker_process_setup_hook": "pipeline.ray_quiet.worker_setup",
                     "env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}


def worker_setup() -> None:
    """Worker-process setup hook: only errors from the loggers in ``NOISY_LOGGERS``."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)

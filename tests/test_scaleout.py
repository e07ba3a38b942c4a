"""Scale-out: the cluster launcher config, the KubeRay manifests, nightly submission, and node loss.

- ``ray_cluster.yaml`` passes Ray's own launcher validation (``prepare_config`` fills the AWS
  defaults, ``validate_config`` checks it against Ray's JSON schema), and has what the issue
  asks for: a 0-CPU head, a spot autoscaling worker type, the 2.60 py311 CPU image, this
  project pinned at its own version, token auth with the token from a secret.
- The manifests under ``deploy/`` parse, use only fields the KubeRay v1 CRDs define, carry the
  required ones, take secrets from Secrets, and their entrypoints parse with the project's own
  CLI parser and config loader.
- ``scripts/submit_nightly.sh`` builds dated submission ids, never runs a date twice, and exits
  with the job's own exit code (checked against a stand-in job client: the job server needs
  ``ray[default]``, which the test environment does not install).
- Node loss: a head (0 CPUs) and two worker nodes (``ray.cluster_utils.Cluster``, in a
  subprocess so the session cluster is untouched); the annotate driver runs as its own process
  connected through ``RAY_ADDRESS`` (as under ``ray job submit``); the worker node running a
  model actor is killed (SIGKILL) once shards are committing. The run finishes, or a re-run
  finishes, with every image exactly once. Measured, and printed: time until the node is
  marked dead and until the next commit, and rows redone (traced in the actors and read tasks).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SUBMIT = ROOT / "scripts" / "submit_nightly.sh"
RAY_IMAGE = "rayproject/ray:2.60.0-py311-cpu"


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def load_cluster_yaml() -> dict:
    return yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())


# --------------------------------------------------------------------------- ray_cluster.yaml


def test_ray_cluster_yaml_passes_rays_launcher_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(load_cluster_yaml())
    validate_config(config)  # Ray's JSON schema + head/worker consistency checks
    assert config["provider"]["type"] == "aws"

    broken = load_cluster_yaml()
    broken["available_node_types"]["ray.worker.cpu_spot"]["min_wrokers"] = 1
    with pytest.raises(Exception, match="min_wrokers"):
        validate_config(prepare_config(broken))


def test_ray_cluster_yaml_has_what_the_pipeline_needs():
    cfg = load_cluster_yaml()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head must advertise 0 CPUs so no work lands on it"
    workers = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert len(workers) == 1
    worker = workers[0]
    assert worker["min_workers"] < worker["max_workers"] <= cfg["max_workers"]  # autoscaling
    assert worker["min_workers"] >= 1  # the run plans its pool from the CPUs present at its start
    assert worker["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert cfg["docker"]["image"] == RAY_IMAGE

    # The project is installed at a pinned version equal to pyproject's (a tag), never a branch.
    setup = " ".join(cfg["setup_commands"])
    pins = re.findall(r"mnv3-pipeline @ git\+https://[^\"@ ]+@([\w.\-]+)", setup)
    assert pins == [f"v{project_version()}"], setup
    assert "download.pytorch.org/whl/cpu" in setup  # CPU torch wheels, not CUDA

    # Token auth: the mode is set on every node, the token comes from a secret store at setup time.
    opts = " ".join(cfg["docker"]["run_options"])
    assert "-e RAY_AUTH_MODE=token" in opts
    assert "RAY_AUTH_TOKEN=" not in opts and "auth_token" not in json.dumps(cfg["file_mounts"])
    assert "secretsmanager" in setup and ".ray' / 'auth_token'" in setup
    region = re.search(r"AWS_DEFAULT_REGION=(\S+)", opts).group(1)
    assert region == cfg["provider"]["region"]
    assert cfg["provider"]["availability_zone"].startswith(region)
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        assert "--num-cpus" not in cmd  # CPUs come from the node types, not a start flag


# --------------------------------------------------------------------------- KubeRay manifests


def load_manifests() -> dict[str, list[dict]]:
    docs = {}
    for path in sorted(DEPLOY.glob("*.yaml")):
        docs[path.name] = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def ray_cluster_specs(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    if doc["kind"] == "RayCluster":
        return [spec]
    if doc["kind"] == "RayJob":
        return [spec["rayClusterSpec"]]
    if doc["kind"] == "RayCronJob":
        return [spec["jobTemplate"]["rayClusterSpec"]]
    return []


def job_specs(doc: dict) -> list[dict]:
    if doc["kind"] == "RayJob":
        return [doc["spec"]]
    if doc["kind"] == "RayCronJob":
        return [doc["spec"]["jobTemplate"]]
    return []


def check_auth_env(container: dict, where: str) -> None:
    env = env_of(container)
    assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", where
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "mnv3-ray-auth", where
    assert "value" not in env["RAY_AUTH_TOKEN"], where


def test_kuberay_manifests_have_the_required_fields():
    import ray

    docs = load_manifests()
    kinds = sorted(d["kind"] for ds in docs.values() for d in ds)
    assert kinds.count("RayJob") == 2 and "RayCronJob" in kinds and "CronJob" in kinds, kinds
    image = f"ghcr.io/OWNER/mnv3-pipeline:{project_version()}"
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"FROM {RAY_IMAGE}" in dockerfile
    for name, ds in docs.items():
        for doc in ds:
            where = f"{name}: {doc['kind']}"
            assert doc["metadata"]["name"], where
            if doc["kind"] in ("RayJob", "RayCronJob", "RayCluster"):
                assert doc["apiVersion"] == "ray.io/v1", where
            for spec in ray_cluster_specs(doc):
                assert spec["rayVersion"] == ray.__version__, where
                head = spec["headGroupSpec"]
                assert head["rayStartParams"]["num-cpus"] == "0", where
                pods = [head["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
                for group in spec["workerGroupSpecs"]:
                    assert 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], where
                for pod in pods:
                    for c in containers(pod):
                        assert c["image"] == image, where
                        check_auth_env(c, where)
                        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                            ref = env_of(c)[key]["valueFrom"]["secretKeyRef"]
                            assert ref["name"] == "mnv3-s3-credentials" and "value" not in env_of(c)[key]
            for job in job_specs(doc):
                assert job["entrypoint"].startswith("mnv3-pipeline "), where
                assert job["shutdownAfterJobFinishes"] is True and job["backoffLimit"] >= 1, where
                for c in containers(job["submitterPodTemplate"]):
                    check_auth_env(c, where + " submitter")
            if doc["kind"] == "RayCronJob":
                assert len(doc["spec"]["schedule"].split()) == 5, where
                assert doc["spec"]["timeZone"] == "Etc/UTC", where


# Field names of the KubeRay v1 CRDs (ray-project/kuberay ray-operator/config/crd/bases, Aug 2026)
# at the levels the manifests set. The API server drops or rejects unknown fields, so a misspelt
# or invented field (a RayCronJob has no concurrencyPolicy) would silently do nothing.
KUBERAY_FIELDS = {
    "RayJob.spec": {
        "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
        "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
        "preRunningDeadlineSeconds", "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes",
        "submissionMode", "submitterConfig", "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished"},
    "RayCronJob.spec": {"jobTemplate", "schedule", "suspend", "timeZone"},
    "RayClusterSpec": {
        "authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
        "headGroupSpec", "headServiceAnnotations", "historyServerOptions", "managedBy", "networkPolicy",
        "rayVersion", "suspend", "tlsOptions", "upgradeStrategy", "workerGroupSpecs"},
    "headGroupSpec": {
        "enableIngress", "headService", "ingressOptions", "labels", "rayStartParams", "resources",
        "serviceType", "template"},
    "workerGroupSpec": {
        "groupName", "idleTimeoutSeconds", "labels", "maxReplicas", "minReplicas", "numOfHosts", "priority",
        "rayStartParams", "replicas", "resources", "scaleStrategy", "suspend", "template"},
    "autoscalerOptions": {
        "args", "command", "env", "envFrom", "idleTimeoutSeconds", "image", "imagePullPolicy", "resources",
        "securityContext", "upscalingMode", "version", "volumeMounts"},
}


def test_kuberay_manifests_use_only_known_crd_fields():
    def check(obj: dict, level: str, where: str) -> None:
        unknown = set(obj) - KUBERAY_FIELDS[level]
        assert not unknown, f"{where}: {sorted(unknown)} are not {level} fields"

    seen = set()
    for name, ds in load_manifests().items():
        for doc in ds:
            if doc["kind"] == "RayCronJob":
                check(doc["spec"], "RayCronJob.spec", name)
                assert {"jobTemplate", "schedule"} <= set(doc["spec"])
            for job in job_specs(doc):
                check(job, "RayJob.spec", name)
            for spec in ray_cluster_specs(doc):
                check(spec, "RayClusterSpec", name)
                check(spec["headGroupSpec"], "headGroupSpec", name)
                check(spec.get("autoscalerOptions", {}), "autoscalerOptions", name)
                for group in spec["workerGroupSpecs"]:
                    check(group, "workerGroupSpec", name)
                    assert {"groupName", "maxReplicas", "minReplicas", "template"} <= set(group)
                seen.add(doc["kind"])
    assert seen == {"RayJob", "RayCronJob", "RayCluster"}


def test_manifest_entrypoints_parse_with_the_project_cli(tmp_path):
    from jobs import config as cfgmod
    from jobs.annotate import output_url
    from jobs.cli import build_parser

    docs = load_manifests()
    parser = build_parser()
    commands = []
    for ds in docs.values():
        for doc in ds:
            commands += [shlex.split(job["entrypoint"]) for job in job_specs(doc)]
            if doc["kind"] == "CronJob":
                pod = doc["spec"]["jobTemplate"]["spec"]["template"]
                (submit,) = containers(pod)
                assert submit["command"] == ["/home/ray/mnv3-pipeline/scripts/submit_nightly.sh"]
                args = submit["args"]
                # what the script submits: {run_date} replaced by the night's date
                commands.append([a.replace("{run_date}", "2026-12-02") for a in args[args.index("--") + 1:]])
                rules = doc["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]["rules"]
                assert rules == [{"action": "FailJob", "onExitCodes": {
                    "containerName": "submit", "operator": "In", "values": [1, 2]}}]
                check_auth_env(submit, "CronJob")
    assert "scripts/submit_nightly.sh" in (DEPLOY / "Dockerfile").read_text()
    assert {c[1] for c in commands} == {"annotate", "finetune"} and len(commands) == 4
    nightly = []
    for argv in commands:
        assert argv[0] == "mnv3-pipeline"
        args = parser.parse_args(argv[1:])  # SystemExit on an unknown flag
        if argv[1] == "annotate":
            assert args.config == "/etc/mnv3/annotate.yaml"
            output, template, date = output_url(args)
            if template:
                nightly.append((output, date))
                assert args.input == "s3://BUCKET/images/"  # one growing input; dated outputs
    # Both nightly variants write a dated prefix: {date} is resolved from --date or today (UTC).
    assert len(nightly) == 2
    assert ("s3://BUCKET/annotations/dt=2026-12-02/", "2026-12-02") in nightly
    assert all(re.fullmatch(r"s3://BUCKET/annotations/dt=\d{4}-\d{2}-\d{2}/", o) for o, _ in nightly)

    # The config every annotate manifest mounts loads with the project's loader.
    (cm,) = docs["configmap-annotate.yaml"]
    path = tmp_path / "annotate.yaml"
    path.write_text(cm["data"]["annotate.yaml"])
    cfg = cfgmod.load(str(path), {})
    assert cfg.tasks.enabled() == ["classify", "detect"]
    assert cfg.run.no_progress_timeout_s == 600


def test_dated_manifests_get_valid_names_and_submission_ids():
    for name in ("rayjob-annotate.yaml", "rayjob-finetune.yaml"):
        (doc,) = yaml.safe_load_all((DEPLOY / name).read_text().replace("RUN_DATE", "2026-12-02"))
        assert doc["spec"]["jobId"].endswith("-2026-12-02")
        name = doc["metadata"]["name"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, name


def test_nothing_secret_is_committed_under_deploy():
    for path in sorted(DEPLOY.iterdir()):
        for doc in (yaml.safe_load_all(path.read_text()) if path.suffix == ".yaml" else []):
            if doc and doc.get("kind") == "Secret":
                assert set(doc["stringData"].values()) == {"REPLACE_ME"}, path.name


# --------------------------------------------------------------------------- nightly submission


def test_submit_nightly_dates_the_submission_id_and_the_prefixes():
    res = subprocess.run(["bash", str(SUBMIT), "--date", "2026-11-29", "--dry-run", "--", "mnv3-pipeline",
                          "annotate", "--input", "s3://b/images/", "--output", "s3://b/annotations/dt={date}/",
                          "--date", "{run_date}"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    out = dict(line.split("=", 1) for line in res.stdout.splitlines())
    assert out["submission_id"] == "nightly-annotate-2026-11-29"
    assert shlex.split(out["entrypoint"]) == [
        "mnv3-pipeline", "annotate", "--input", "s3://b/images/", "--output", "s3://b/annotations/dt={date}/",
        "--date", "2026-11-29"]
    bad = subprocess.run(["bash", str(SUBMIT), "--date", "29/11/2026", "--", "true"], capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode == 2 and "YYYY-MM-DD" in bad.stderr  # a usage error: not retried


def test_submit_nightly_unreachable_cluster_is_retryable():
    env = {"PATH": "/usr/bin:/bin", "RAY_ADDRESS": "http://127.0.0.1:9", "PYTHON": sys.executable,
           "RAY_AUTH_MODE": "disabled"}
    res = subprocess.run(["bash", str(SUBMIT), "--date", "2026-11-29", "--", "true"], capture_output=True,
                         text=True, timeout=120, env=env)
    assert res.returncode == 3, res.stderr  # 3: the scheduler retries
    assert "nightly-annotate-2026-11-29" in res.stderr


# A stand-in for ray.job_submission (the dashboard's job server needs ray[default], not installed
# here): jobs live in a JSON file; a submitted job ends as FAKE_NEXT says.
_FAKE_JOB_SUBMISSION = """
import enum, json, os


class JobStatus(str, enum.Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"


class _Info:
    def __init__(self, job):
        self.status, self.driver_exit_code = JobStatus(job["status"]), job.get("code")


class JobSubmissionClient:
    def __init__(self, address=None):
        self.path = os.environ["FAKE_JOBS"]

    def _jobs(self):
        with open(self.path) as f:
            return json.load(f)

    def get_job_info(self, job_id):
        jobs = self._jobs()
        if job_id not in jobs:
            raise RuntimeError(f"Job {job_id} does not exist")
        return _Info(jobs[job_id])

    def get_job_status(self, job_id):
        return self.get_job_info(job_id).status

    def get_job_logs(self, job_id):
        return f"log of {job_id}\\n"

    def submit_job(self, *, entrypoint, submission_id, **kwargs):
        jobs = self._jobs()
        jobs[submission_id] = {**json.loads(os.environ["FAKE_NEXT"]), "entrypoint": entrypoint,
                               "metadata": kwargs.get("metadata")}
        with open(self.path, "w") as f:
            json.dump(jobs, f)
        return submission_id
"""


@pytest.mark.parametrize("existing, next_job, code, ids", [
    ({}, {"status": "SUCCEEDED", "code": 0}, 0, ["nightly-annotate-2026-11-29"]),
    ({}, {"status": "FAILED", "code": 1}, 1, ["nightly-annotate-2026-11-29"]),
    ({"nightly-annotate-2026-11-29": {"status": "SUCCEEDED", "code": 0}}, None, 0,
     ["nightly-annotate-2026-11-29"]),  # already done: not submitted again
    ({"nightly-annotate-2026-11-29": {"status": "FAILED", "code": 2}}, None, 2,
     ["nightly-annotate-2026-11-29"]),  # a bad command is not resubmitted
    ({"nightly-annotate-2026-11-29": {"status": "FAILED", "code": 3}}, {"status": "SUCCEEDED", "code": 0}, 0,
     ["nightly-annotate-2026-11-29", "nightly-annotate-2026-11-29-r2"]),  # a stopped run is retried
    ({}, {"status": "STOPPED", "code": None}, 3, ["nightly-annotate-2026-11-29"]),
])
def test_submit_nightly_exit_codes_follow_the_job(tmp_path, existing, next_job, code, ids):
    fake = tmp_path / "fake" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "job_submission.py").write_text(_FAKE_JOB_SUBMISSION)
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps(existing))
    env = {"PATH": os.environ["PATH"], "PYTHON": sys.executable, "PYTHONPATH": str(tmp_path / "fake"),
           "FAKE_JOBS": str(jobs), "FAKE_NEXT": json.dumps(next_job)}
    res = subprocess.run(["bash", str(SUBMIT), "--date", "2026-11-29", "--", "mnv3-pipeline", "annotate",
                          "--output", "s3://b/a/dt={date}/", "--date", "{run_date}"], capture_output=True,
                         text=True, timeout=60, env=env)
    assert res.returncode == code, res.stderr
    after = json.loads(jobs.read_text())
    assert sorted(after) == ids
    for job_id in set(ids) - set(existing):
        argv = shlex.split(after[job_id]["entrypoint"])
        assert argv[-3:] == ["s3://b/a/dt={date}/", "--date", "2026-11-29"]
        assert after[job_id]["metadata"] == {"nightly_date": "2026-11-29"}
        assert f"log of {job_id}" in res.stdout


# --------------------------------------------------------------------------- node loss

# Loaded by every Python process of the test cluster (PYTHONPATH): counts the rows each model
# actor is handed, so rows redone after the node loss are measured, not guessed. Patches
# InferenceBundle.__call__ right after pipeline.bundle is imported; the pipeline is not modified.
_TRACE_SITECUSTOMIZE = r"""
import functools
import os
import sys
import time

_TRACE = os.environ.get("MNV3_TEST_TRACE_DIR")


def _log(kind, ids, ends):
    import ray

    now, node = time.time(), ray.get_runtime_context().get_node_id()
    with open(os.path.join(_TRACE, f"{os.getpid()}.{kind}.txt"), "a") as f:
        f.writelines(f"{now:.3f} {node} {i}\n" for i, end in zip(ids, ends or [0] * len(ids)) if not end)


def _rows(table):
    ends = table.column("_end").to_pylist() if "_end" in table.column_names else []
    return table.column("image_id").to_pylist(), ends


def _patch(module):
    if module.__name__ == "pipeline.bundle":
        call = module.InferenceBundle.__call__

        def traced_call(self, batch):
            _log("model", *_rows(batch))
            return call(self, batch)

        module.InferenceBundle.__call__ = traced_call
    else:
        read = module.read_and_decode

        @functools.wraps(read)  # same module and name: still pickled by reference
        def traced_read(*args, **kwargs):
            for table in read(*args, **kwargs):
                _log("read", *_rows(table))
                yield table

        module.read_and_decode = traced_read


if _TRACE:
    import importlib.abc
    import importlib.machinery

    class _Trace(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name not in ("pipeline.bundle", "pipeline.run"):
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None:
                return None
            load = spec.loader.exec_module

            def exec_module(module):
                load(module)
                _patch(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Trace())
"""

_NODE_LOSS_SCRIPT = r"""
import json, os, subprocess, sys, time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from pipeline.synth import write_dataset

src, cfg, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
images, shards = int(sys.argv[4]), int(sys.argv[5])
write_dataset(src, images=images, shards=shards, min_size=64, max_size=96)
head = {"num_cpus": 0, "include_dashboard": False}
cluster = Cluster(initialize_head=True, head_node_args=head)
workers = [cluster.add_node(num_cpus=2), cluster.add_node(num_cpus=2)]
cluster.wait_for_nodes()
ray.init(address=cluster.address, log_to_driver=False)  # an observer only; the job is its own driver

manifest = out / "_manifest"
env = dict(os.environ, RAY_ADDRESS=cluster.address)
cmd = [sys.executable, "-m", "jobs.cli", "annotate", "--input", src, "--output", str(out), "--config", cfg]

def committed():
    return sorted(manifest.glob("*.json")) if manifest.exists() else []

def run_driver(log):
    with open(log, "w") as f:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)

result = {"nodes_before": len([n for n in ray.nodes() if n["Alive"]])}
start = time.monotonic()
proc = run_driver(out.parent / "run1.log")
deadline = start + 240
while time.monotonic() < deadline and proc.poll() is None and len(committed()) < 2:
    time.sleep(0.05)
result["committed_at_kill"] = len(committed())
result["driver_alive_at_kill"] = proc.poll() is None
# Kill the worker node whose model actor ran the latest batch (ties: the busiest node).
trace = sorted(ln.split() for p in Path(os.environ["MNV3_TEST_TRACE_DIR"]).glob("*.model.txt")
               for ln in p.read_text().splitlines())
actor_nodes = [node for _, node, _ in trace]
free = ray._private.state.available_resources_per_node()
victim = max(workers, key=lambda n: (actor_nodes[-1:] == [n.node_id],
                                     -free.get(n.node_id, {}).get("CPU", 0.0)))
result["victim"] = victim.node_id
result["victim_ran_actor"] = victim.node_id in actor_nodes
t_kill = time.time()
cluster.remove_node(victim, allow_graceful=False)  # SIGKILL: a spot node gone, no goodbye
result["kill_s"] = round(time.monotonic() - start, 2)
t0 = time.monotonic()  # how long until the cluster itself knows the node is gone
while time.monotonic() - t0 < 60 and any(n["NodeID"] == victim.node_id and n["Alive"] for n in ray.nodes()):
    time.sleep(0.2)
result["dead_detected_s"] = round(time.monotonic() - t0, 2)
try:
    result["rc1"] = proc.wait(timeout=240)
except subprocess.TimeoutExpired:
    proc.kill()
    result["rc1"] = "timeout"
result["run1_s"] = round(time.monotonic() - start, 2)
result["committed_by_run1"] = len(committed())
if result["rc1"] != 0:
    t = time.monotonic()
    rerun = run_driver(out.parent / "run2.log")
    result["rc2"] = rerun.wait(timeout=240)
    result["rerun_s"] = round(time.monotonic() - t, 2)
result["t_kill"] = t_kill
result["commit_times"] = sorted(p.stat().st_mtime for p in committed())
result["nodes_after"] = len([n for n in ray.nodes() if n["Alive"]])
ray.shutdown()
cluster.shutdown()
print("RESULT " + json.dumps(result))
"""


def _run_reports(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "_runs").glob("*.json"))]


def recovery_numbers(result: dict) -> dict:
    """Commit timing around the kill: median gap before it, first commit and longest gap after it."""
    times, t_kill = result["commit_times"], result["t_kill"]
    before = [b - a for a, b in zip(times, times[1:]) if b <= t_kill]
    after = [t for t in times if t > t_kill]
    gaps_after = [b - a for a, b in zip([t_kill] + after, after)]
    return {"median_gap_before_s": round(sorted(before)[len(before) // 2], 2) if before else None,
            "first_commit_after_kill_s": round(after[0] - t_kill, 2) if after else None,
            "longest_gap_after_kill_s": round(max(gaps_after), 2) if gaps_after else None}


def test_worker_node_killed_mid_run_every_image_exactly_once(tmp_path):
    images, shards = 36, 12
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "tasks": {"classify": {"builder": "mobilenet_v3_small", "resize_size": 144, "crop_size": 128,
                               "top_k": 3}},
        "batch": {"max_images": 1},
        "actors": {"max_actors": 2},
        "run": {"progress_interval_s": 1.0, "no_progress_timeout_s": 60.0},
    }))
    out, trace, site = tmp_path / "out", tmp_path / "trace", tmp_path / "site"
    trace.mkdir()
    site.mkdir()
    (site / "sitecustomize.py").write_text(_TRACE_SITECUSTOMIZE)
    env = dict(os.environ, MNV3_TEST_TRACE_DIR=str(trace),
               PYTHONPATH=os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]),
               # GCS notices a dead node after 3 missed 1 s health checks (Ray's default waits for
               # 5 missed 3 s checks): keeps the test short; recovery starts only after detection.
               RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="1000",
               RAY_health_check_failure_threshold="3")
    res = subprocess.run([sys.executable, "-c", _NODE_LOSS_SCRIPT, str(tmp_path / "in"), str(cfg), str(out),
                          str(images), str(shards)], capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env=env)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    logs = "".join(p.read_text()[-3000:] for p in sorted(tmp_path.glob("run*.log")))
    assert res.returncode == 0 and lines, res.stderr[-3000:] + logs
    result = json.loads(lines[-1][len("RESULT "):])
    traced = [ln.split() for p in trace.glob("*.model.txt") for ln in p.read_text().splitlines()]
    inferred = [image_id for _, _, image_id in traced]
    decoded = [ln.split()[2] for p in trace.glob("*.read.txt") for ln in p.read_text().splitlines()]
    before_kill = {image_id for t, _, image_id in traced if float(t) <= result["t_kill"]}
    measured = {**recovery_numbers(result), "rows_inferred": len(inferred),
                "rows_redone": len(inferred) - len(set(inferred)),
                "rows_decoded": len(decoded), "rows_decoded_again": len(decoded) - len(set(decoded)),
                "rows_started_before_kill": len(before_kill),
                "rows_on_victim": sum(node == result["victim"] for _, node, _ in traced),
                "actor_nodes": len({node for _, node, _ in traced}),
                **{k: v for k, v in result.items() if k not in ("commit_times", "t_kill")}}
    reports = _run_reports(out)
    retries = [r["retries"] for r in reports]  # the run report's account of what was done again
    measured["report_rows_redone"] = sum(r["rows_redone"] for r in retries)
    measured["report_shards_with_redone_rows"] = sorted(
        {s for r in retries for s in r["shards_with_redone_rows"]})
    print("node-loss:", json.dumps(measured))
    assert result["nodes_before"] == 3 and result["nodes_after"] == 2
    assert result["victim_ran_actor"], result  # the killed node held a model actor
    assert result["driver_alive_at_kill"] and 2 <= result["committed_at_kill"] < shards, result
    assert result["rc1"] in (0, 3), (result, logs)  # 3 = stopped, retryable; never a silent partial
    final_rc = result["rc1"] if result["rc1"] == 0 else result.get("rc2")
    assert final_rc == 0, (result, logs)

    # Every image exactly once, read back from the Parquet files themselves.
    ids = []
    for part in sorted(out.glob("part-*.parquet")):
        ids += pq.read_table(part, columns=["image_id"]).column("image_id").to_pylist()
    assert len(ids) == images and len(set(ids)) == images
    assert len(list((out / "_manifest").glob("*.json"))) == shards
    assert set(inferred) == set(ids) == set(decoded)  # the traces saw every image: the numbers are real
    assert len(before_kill) < images  # the node died while there was model work left

    assert sum(r["shards"]["committed"] for r in reports) == shards
    assert sum(r["images"]["total"] for r in reports) == images
    if result["rc1"] != 0:  # the re-run skipped what the interrupted run had committed
        assert reports[-1]["shards"]["skipped_committed"] == result["committed_by_run1"]
    # Rows the driver received twice (a retried read task or actor call) are dropped and counted;
    # each was handed to a model actor twice, so the report never counts more than the trace.
    # (The trace also sees work lost with the node before its result was delivered.)
    assert measured["report_rows_redone"] <= measured["rows_redone"]
    assert len(measured["report_shards_with_redone_rows"]) <= measured["report_rows_redone"]

#!/usr/bin/env bash
# Submit one nightly job to a running Ray cluster with a dated submission id, wait for it, and exit
# with the job's own exit code, so a scheduler (cron, a Kubernetes CronJob, Airflow) can decide
# whether to retry: 0 done, 1 some images/shards failed, 2 config/usage error (do not retry),
# 3 the run stopped or the cluster could not be reached (retry).
#
#   scripts/submit_nightly.sh [--date YYYY-MM-DD] [--name annotate] [--working-dir DIR] [--dry-run] \
#       -- mnv3-pipeline annotate --input s3://b/images/ --output 's3://b/annotations/dt={date}/' \
#          --date '{run_date}'
#
# {run_date} in the command is replaced by the run date (default: today, UTC) before submission, so
# the submission id (nightly-<name>-<date>) and annotate's dated output ({date}, resolved by annotate
# from --date) always agree, also for a retry after midnight. Submitting a date twice does not run
# it twice: a succeeded job with that id ends the script with 0, a running one is followed, one that
# ended with exit 1 or 2 ends the script with that code, and one that stopped (3) or failed before
# its driver ran is retried under nightly-<name>-<date>-r2, -r3, ... (annotate then skips every
# shard committed under this date or an earlier one).
#
# Environment: RAY_ADDRESS (the dashboard, e.g. http://127.0.0.1:8265); with token auth
# RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (from your secret store, never from a file in the repo).
# PYTHON selects the interpreter that has Ray (default: python3).
set -euo pipefail

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

run_date="" name="annotate" working_dir="" dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --date) run_date="${2:-}"; shift 2 ;;
    --name) name="${2:-}"; shift 2 ;;
    --working-dir) working_dir="${2:-}"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "submit_nightly: unknown option $1 (the job's command goes after --)" >&2; exit 2 ;;
  esac
done
[[ $# -gt 0 ]] || { echo "submit_nightly: no command given after --" >&2; exit 2; }
run_date="${run_date:-$(date -u +%F)}"
if ! [[ "$run_date" =~ ^[0-9]{4}-[0-9]{2}-[0-9]{2}$ ]]; then
  echo "submit_nightly: --date must be YYYY-MM-DD, got '$run_date'" >&2; exit 2
fi
if ! [[ "$name" =~ ^[a-z0-9][a-z0-9-]*$ ]]; then
  echo "submit_nightly: --name must be lower-case letters, digits and '-', got '$name'" >&2; exit 2
fi

args=()
for a in "$@"; do args+=("${a//\{run_date\}/$run_date}"); done
entrypoint="$(printf '%q ' "${args[@]}")"
entrypoint="${entrypoint% }"
submission_id="nightly-${name}-${run_date}"

if [[ $dry_run -eq 1 ]]; then
  printf 'submission_id=%s\nentrypoint=%s\n' "$submission_id" "$entrypoint"
  exit 0
fi

export SUBMIT_ID="$submission_id" SUBMIT_ENTRYPOINT="$entrypoint" SUBMIT_WORKING_DIR="$working_dir"
export SUBMIT_DATE="$run_date"
exec "${PYTHON:-python3}" - <<'PY'
import os
import sys
import time

from ray.job_submission import JobStatus, JobSubmissionClient

base, entrypoint = os.environ["SUBMIT_ID"], os.environ["SUBMIT_ENTRYPOINT"]
working_dir = os.environ.get("SUBMIT_WORKING_DIR") or None
DONE = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}


def say(msg):
    print(f"[submit_nightly] {msg}", file=sys.stderr, flush=True)


def info(client, job_id):
    try:
        return client.get_job_info(job_id)
    except RuntimeError as e:  # "Job ... does not exist"
        if "does not exist" in str(e) or "404" in str(e):
            return None
        raise


try:
    client = JobSubmissionClient(os.environ.get("RAY_ADDRESS"))
    job_id, attempt = base, 1
    while True:
        found = info(client, job_id)
        if found is None:
            runtime_env = {"working_dir": working_dir} if working_dir else None
            client.submit_job(entrypoint=entrypoint, submission_id=job_id, runtime_env=runtime_env,
                              entrypoint_num_cpus=0, metadata={"nightly_date": os.environ["SUBMIT_DATE"]})
            say(f"submitted {job_id}: {entrypoint}")
            break
        if found.status == JobStatus.SUCCEEDED:
            say(f"{job_id} already succeeded; nothing to do")
            sys.exit(0)
        if found.status not in DONE:
            say(f"{job_id} is already {found.status.value}; following it")
            break
        if found.driver_exit_code in (1, 2):  # failed images or a bad command: a re-run cannot help
            say(f"{job_id} already ended with exit code {found.driver_exit_code}; not resubmitting")
            sys.exit(found.driver_exit_code)
        attempt += 1
        job_id = f"{base}-r{attempt}"
    seen = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        sys.stdout.write(logs[seen:])
        sys.stdout.flush()
        seen = len(logs)
        if status in DONE:
            break
        time.sleep(10)
    final = client.get_job_info(job_id)
except SystemExit:
    raise
except Exception as e:  # noqa: BLE001 - cluster unreachable, auth refused, ...: the scheduler retries
    say(f"could not submit or follow {os.environ['SUBMIT_ID']}: {type(e).__name__}: {e}")
    sys.exit(3)
code = final.driver_exit_code
if final.status == JobStatus.SUCCEEDED:
    code = 0
elif code is None or code == 0:
    code = 3  # stopped, or failed before the driver ran: retryable
say(f"{job_id} {final.status.value}, exit code {code}")
sys.exit(code)
PY

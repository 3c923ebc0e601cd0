#!/bin/bash
# The nightly batch as a Slurm job array: 4 shards of one run, 2 tasks at a time.
#
#   sbatch deploy/slurm/array.sh                       (from the directory holding config.toml)
#   pipeline status config.toml --run-id nightly-images-<array job id>
#
# Each task runs `pipeline run --shard auto/4`: K is SLURM_ARRAY_TASK_ID (less the array's first
# index). Every task uses the same run id (the array's job id, not the date) and the same ledger,
# a MySQL/MariaDB table (the SQLite ledger file is refused with --shard). Keep --array's size = N
# of auto/N, and its %P = --parallel: caps are divided by --parallel.
#
# Retries, by exit code (README, "Command line"):
#   2        config error, nothing ran: never retried.
#   1        items failed or the run failed: run again here, up to MAX_ATTEMPTS in all, with
#            --retry-failed; the ledger makes each attempt redo only what is left.
#   130/143  interrupted (preempted, scancel, time limit): SIGTERM drained; --requeue brings a
#            preempted task back and the ledger resumes it.
# Slurm sends SIGTERM, then SIGKILL after KillWait (30 s by default): keep [pipeline]
# grace_period below KillWait.
#
#SBATCH --job-name=nightly-images
#SBATCH --array=0-3%2
#SBATCH --requeue
#SBATCH --time=04:00:00
#SBATCH --cpus-per-task=2
#SBATCH --mem=2G
#SBATCH --output=slurm-%x-%A_%a.out

set -u

CONFIG="${CONFIG:-config.toml}"
RUN_ID="${RUN_ID:-nightly-images-${SLURM_ARRAY_JOB_ID:?run this under sbatch, or set RUN_ID}}"
MAX_ATTEMPTS="${MAX_ATTEMPTS:-3}"
RETRY_DELAY="${RETRY_DELAY:-60}" # seconds before an attempt after exit 1 (a database failing over)
# PIPELINE_DB_CATALOG_PASSWORD comes from the environment sbatch was given (--export).

attempt=1
retry=()
while :; do
    # srun: Slurm signals the step itself on preemption or scancel, so SIGTERM reaches pipeline.
    srun --ntasks=1 pipeline run "$CONFIG" --shard auto/4 --parallel 2 --run-id "$RUN_ID" \
        --no-progress --log-format json "${retry[@]}"
    code=$?
    case "$code" in
        0) exit 0 ;;
        2)
            echo "array.sh: config error (exit 2): not retried; fix the config and submit again" >&2
            exit 2
            ;;
        130 | 143)
            echo "array.sh: interrupted (exit $code); a requeued task resumes from the ledger" >&2
            exit "$code"
            ;;
    esac
    if ((attempt >= MAX_ATTEMPTS)); then
        echo "array.sh: exit $code after $attempt attempts; giving up on shard $SLURM_ARRAY_TASK_ID" >&2
        exit "$code"
    fi
    echo "array.sh: exit $code; attempt $((attempt + 1)) of $MAX_ATTEMPTS resumes from the ledger" >&2
    sleep "$RETRY_DELAY"
    attempt=$((attempt + 1))
    retry=(--retry-failed)
done

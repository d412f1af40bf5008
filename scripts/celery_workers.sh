#!/usr/bin/env bash
# Start N Celery workers for the pipeline's distributed executor (RECSYS_EXECUTOR=celery):
#
#   RECSYS_CELERY_BROKER=amqp://guest:guest@127.0.0.1:5672// \
#   RECSYS_DATA_ROOT=/shared/recsys DAGSTER_HOME=$PWD/dagster_home \
#       bash scripts/celery_workers.sh 2
#
# Each worker is one process taking one step at a time (--concurrency 1; give a bigger
# machine more workers), named recsys-<i>@<host>, in its own process group whose id is written
# to $RECSYS_WORKER_PIDS/<i>.pgid (default $DAGSTER_HOME/celery-workers). The script stays in
# the foreground; Ctrl-C (or TERM) stops every worker it started. Workers need the same code,
# the same RECSYS_DATA_ROOT (a shared volume or an object-store URI), the same Dagster instance
# (DAGSTER_HOME with PostgreSQL storage across machines) and deploy/celery.yaml.
set -euo pipefail
n="${1:-2}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${RECSYS_VENV:-$here/.venv}/bin"
export PATH="$bin:$PATH"  # dagster-celery starts `celery` from the PATH
: "${DAGSTER_HOME:?set DAGSTER_HOME (the Dagster instance the runs are recorded in)}"
export RECSYS_CELERY_BROKER="${RECSYS_CELERY_BROKER:-amqp://guest:guest@127.0.0.1:5672//}"
export RECSYS_DATA_ROOT="${RECSYS_DATA_ROOT:-$here/data}"
config="${RECSYS_CELERY_CONFIG:-$here/deploy/celery.yaml}"
pids="${RECSYS_WORKER_PIDS:-$DAGSTER_HOME/celery-workers}"
mkdir -p "$pids"
cd "$here"  # the code location (pipelines/) is imported from here

started=()
stop() {
    for pg in "${started[@]}"; do kill -TERM -- "-$pg" 2>/dev/null || true; done
    wait
}
trap stop EXIT INT TERM

for i in $(seq 1 "$n"); do
    setsid "$bin/dagster-celery" worker start -A dagster_celery.app -y "$config" \
        -n "recsys-$i" --loglevel "${RECSYS_WORKER_LOGLEVEL:-INFO}" -- --concurrency 1 &
    pg=$!
    started+=("$pg")
    echo "$pg" > "$pids/$i.pgid"
done
echo "started $n workers (process groups ${started[*]}) on $(echo "$RECSYS_CELERY_BROKER" | sed 's#//[^@]*@#//***@#')"
wait

"""Running a Dagster job of the code location from the command line, on the persistent
instance in DAGSTER_HOME, so the run shows up in the Dagster UI like any other."""

from __future__ import annotations

import os
import sys

from recsys.errors import RecsysError


def get_job(name: str):
    from pipelines.definitions import defs

    return defs.resolve_job_def(name)


def _recsys_pipeline():
    return get_job("recsys_pipeline")


def _ingest_job():
    return get_job("ingest_job")


_RECONSTRUCTABLE = {"recsys_pipeline": _recsys_pipeline, "ingest_job": _ingest_job}


def run_job(name: str, quiet: bool = False, log_level: str = "WARNING") -> int:
    """Execute job `name` with its own executor (multiprocess for sharded steps); 0 on success.

    Dagster's console log is kept at `log_level` (the full log is in the Dagster UI)."""
    import dagster as dg

    if "DAGSTER_HOME" not in os.environ:
        raise RecsysError(
            "set DAGSTER_HOME (e.g. export DAGSTER_HOME=$PWD/dagster_home) so the "
            "run is recorded where the Dagster UI looks"
        )
    if name not in _RECONSTRUCTABLE:
        raise RecsysError(f"unknown job {name!r}; known: {', '.join(_RECONSTRUCTABLE)}")
    instance = dg.DagsterInstance.get()
    run_config = {"loggers": {"console": {"config": {"log_level": log_level}}}}
    result = dg.execute_job(
        dg.reconstructable(_RECONSTRUCTABLE[name]),
        instance=instance,
        run_config=run_config,
        raise_on_error=False,
    )
    steps = [e for e in result.all_events if e.is_step_failure]
    failed_checks = [
        e.asset_check_evaluation_data.asset_check_key.to_user_string()
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
        and not e.asset_check_evaluation_data.passed
    ]
    if result.success:
        if not quiet:
            print(f"run {result.run_id[:8]} of {name} succeeded")
        if failed_checks:
            print(
                f"checks that did not pass (see the Dagster UI): {', '.join(failed_checks)}",
                file=sys.stderr,
            )
        return 0
    print(
        f"run {result.run_id} of {name} failed at: "
        f"{', '.join(sorted({e.step_key for e in steps})) or 'unknown step'}",
        file=sys.stderr,
    )
    for e in steps[:3]:
        err = e.step_failure_data.error
        print(f"  {e.step_key}: {err.message.strip() if err else 'failed'}", file=sys.stderr)
    if failed_checks:
        print(f"checks that did not pass: {', '.join(failed_checks)}", file=sys.stderr)
    return 1

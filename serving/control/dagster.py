"""A small client of a running Dagster webserver's GraphQL API (`config.dagster_url`).

The serving process never imports dagster: a job of the control plane is a Dagster run of the
project's code location, launched, read, listed and terminated over HTTP (urllib3) through
the webserver's `/graphql` endpoint, exactly as the Dagster UI does. What the API shows, the UI
shows at `ui_link(run_id)` (`<url>/runs/<id>`).

Data flow: `launch(job, run_config, tags)` -> `launchRun` mutation -> run id; `run(id)` ->
`runOrError` (status, tags, step stats, the execution plan's step keys, times); `runs(...)` ->
`runsOrError` with a `RunsFilter` (tags, statuses, created before/after); `terminate(id)` ->
`terminateRun`; `events(id)` -> `logsForRun`. Schedules: `reload()` reloads the code location
(so schedules defined from files appear), `start_schedule` / `stop_schedule` / `schedule`.

Errors: Dagster unreachable, timing out or answering garbage -> `ProblemError` 503 naming
Dagster (recommendations do not depend on it and keep serving); run config Dagster rejects ->
`DagsterConfigInvalid` (422 with Dagster's messages and paths); a job the code location does
not have -> 503 (the deployment is incomplete, not the request). Checked against the GraphQL
schema of dagster-graphql 1.13 (`launchRun`, `runOrError`, `runsOrError`, `terminateRun`,
`logsForRun`, `reloadRepositoryLocation`, `startSchedule`, `stopRunningSchedule`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
import urllib3

from serving.errors import ProblemError

LOCATION = "recsys"  # workspace.yaml's location_name
REPOSITORY = "__repository__"  # the repository a `dg.Definitions` object makes
UNAVAILABLE = "RECSYS_DAGSTER_UNAVAILABLE"
FINISHED = frozenset({"SUCCESS", "FAILURE", "CANCELED"})
ACTIVE = frozenset({"QUEUED", "NOT_STARTED", "STARTING", "STARTED", "CANCELING", "SUSPENDED"})

_RUN_FIELDS = """
  runId jobName status creationTime startTime endTime updateTime canTerminate
  tags { key value }
  stats { ... on RunStatsSnapshot { stepsSucceeded stepsFailed } }
  stepStats { stepKey status startTime endTime }
  executionPlan { steps { key } }
"""

_RUN_QUERY = """
query Run($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run { RUN_FIELDS runConfigYaml }
    ... on PythonError { message }
  }
}
""".replace("RUN_FIELDS", _RUN_FIELDS)

_RUNS_QUERY = """
query Runs($filter: RunsFilter, $limit: Int, $cursor: String) {
  runsOrError(filter: $filter, limit: $limit, cursor: $cursor) {
    __typename
    ... on Runs { results { RUN_FIELDS } }
    ... on InvalidPipelineRunsFilterError { message }
    ... on PythonError { message }
  }
}
""".replace("RUN_FIELDS", _RUN_FIELDS)

_LAUNCH = """
mutation Launch($executionParams: ExecutionParams!) {
  launchRun(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on RunConfigValidationInvalid { errors { message path reason } }
    ... on PipelineNotFoundError { message }
    ... on InvalidSubsetError { message }
    ... on RunConflict { message }
    ... on UnauthorizedError { message }
    ... on PresetNotFoundError { message }
    ... on ConflictingExecutionParamsError { message }
    ... on NoModeProvidedError { message }
    ... on PythonError { message }
  }
}
"""

_TERMINATE = """
mutation Terminate($runId: String!, $policy: TerminateRunPolicy) {
  terminateRun(runId: $runId, terminatePolicy: $policy) {
    __typename
    ... on TerminateRunSuccess { run { runId status } }
    ... on TerminateRunFailure { message run { runId status } }
    ... on RunNotFoundError { message }
    ... on UnauthorizedError { message }
    ... on PythonError { message }
  }
}
"""

_LOGS = """
query Logs($runId: ID!, $cursor: String, $limit: Int) {
  logsForRun(runId: $runId, afterCursor: $cursor, limit: $limit) {
    __typename
    ... on EventConnection {
      cursor hasMore
      events {
        __typename
        ... on MessageEvent { message timestamp level stepKey eventType }
        ... on ExecutionStepFailureEvent { error { message } }
        ... on RunFailureEvent { error { message } }
      }
    }
    ... on RunNotFoundError { message }
    ... on PythonError { message }
  }
}
"""

_RELOAD = """
mutation Reload($name: String!) {
  reloadRepositoryLocation(repositoryLocationName: $name) {
    __typename
    ... on WorkspaceLocationEntry {
      locationOrLoadError { __typename ... on PythonError { message } }
    }
    ... on ReloadNotSupported { message }
    ... on RepositoryLocationNotFound { message }
    ... on UnauthorizedError { message }
    ... on PythonError { message }
  }
}
"""

_SCHEDULE = """
query Schedule($selector: ScheduleSelector!) {
  scheduleOrError(scheduleSelector: $selector) {
    __typename
    ... on Schedule {
      name cronSchedule pipelineName executionTimezone
      scheduleState { id selectorId status }
    }
    ... on ScheduleNotFoundError { message }
    ... on PythonError { message }
  }
}
"""

_SCHEDULES = """
query Schedules($selector: RepositorySelector!) {
  repositoryOrError(repositorySelector: $selector) {
    __typename
    ... on Repository {
      schedules {
        name cronSchedule pipelineName executionTimezone
        scheduleState { id selectorId status }
      }
    }
    ... on RepositoryNotFoundError { message }
    ... on PythonError { message }
  }
}
"""

_START_SCHEDULE = """
mutation Start($selector: ScheduleSelector!) {
  startSchedule(scheduleSelector: $selector) {
    __typename
    ... on ScheduleStateResult { scheduleState { status } }
    ... on ScheduleNotFoundError { message }
    ... on UnauthorizedError { message }
    ... on PythonError { message }
  }
}
"""

_STOP_SCHEDULE = """
mutation Stop($id: String) {
  stopRunningSchedule(id: $id) {
    __typename
    ... on ScheduleStateResult { scheduleState { status } }
    ... on ScheduleNotFoundError { message }
    ... on UnauthorizedError { message }
    ... on PythonError { message }
  }
}
"""


class DagsterConfigInvalid(ProblemError):
    """Dagster refused the run config (422; `errors` holds Dagster's messages and paths)."""

    def __init__(self, job: str, errors: list[dict[str, Any]]) -> None:
        self.errors = errors
        first = "; ".join(
            f"{'.'.join(e.get('path') or []) or '(root)'}: {e.get('message')}" for e in errors[:5]
        )
        super().__init__(
            422,
            f"Dagster rejected the run config of job '{job}': {first}",
            code="RECSYS_INVALID_RUN_CONFIG",
            extra={"errors": errors},
        )


@dataclasses.dataclass(frozen=True)
class Step:
    key: str
    status: str | None  # SUCCESS / FAILURE / IN_PROGRESS / SKIPPED, None: not started
    start: float | None
    end: float | None


@dataclasses.dataclass(frozen=True)
class Run:
    """One Dagster run as the control plane shows it."""

    run_id: str
    job: str
    status: str  # Dagster's RunStatus
    tags: dict[str, str]
    created: float
    started: float | None
    ended: float | None
    updated: float | None
    steps: tuple[Step, ...]  # every planned step, with its stats when it has any
    steps_succeeded: int
    steps_failed: int
    can_terminate: bool
    run_config_yaml: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @property
    def steps_done(self) -> int:
        return sum(1 for s in self.steps if s.status in ("SUCCESS", "FAILURE", "SKIPPED"))


def _run(node: Mapping[str, Any]) -> Run:
    stats = {s["stepKey"]: s for s in node.get("stepStats") or ()}
    planned = [s["key"] for s in ((node.get("executionPlan") or {}).get("steps") or ())]
    keys = planned + [k for k in stats if k not in planned]
    steps = tuple(
        Step(
            k,
            (stats.get(k) or {}).get("status"),
            (stats.get(k) or {}).get("startTime"),
            (stats.get(k) or {}).get("endTime"),
        )
        for k in keys
    )
    counts = node.get("stats") or {}
    return Run(
        run_id=node["runId"],
        job=node["jobName"],
        status=node["status"],
        tags={t["key"]: t["value"] for t in node.get("tags") or ()},
        created=node["creationTime"],
        started=node.get("startTime"),
        ended=node.get("endTime"),
        updated=node.get("updateTime"),
        steps=steps,
        steps_succeeded=int(counts.get("stepsSucceeded") or 0),
        steps_failed=int(counts.get("stepsFailed") or 0),
        can_terminate=bool(node.get("canTerminate")),
        run_config_yaml=node.get("runConfigYaml"),
    )


class DagsterClient:
    """The GraphQL API of one Dagster webserver (thread-safe: urllib3's pool)."""

    def __init__(
        self,
        url: str,
        *,
        location: str = LOCATION,
        repository: str = REPOSITORY,
        timeout_s: float = 10.0,
        pool: urllib3.PoolManager | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.location = location
        self.repository = repository
        self._timeout = urllib3.Timeout(connect=min(3.0, timeout_s), read=timeout_s)
        self._http = pool or urllib3.PoolManager(num_pools=2, maxsize=8)

    # -- transport -------------------------------------------------------------------------

    def _down(self, why: str) -> ProblemError:
        return ProblemError(
            503,
            f"Dagster (the job runner at {self.url}) is not available: {why}. "
            "Recommendations keep serving; retry the job request later.",
            code=UNAVAILABLE,
            title="Dagster unavailable",
            headers={"Retry-After": "30"},
            extra={"dependency": "dagster"},
        )

    def query(
        self,
        text: str,
        variables: Mapping[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """The `data` of one GraphQL request; 503 naming Dagster on any transport failure."""
        body = orjson.dumps({"query": text, "variables": dict(variables or {})})
        try:
            resp = self._http.request(
                "POST",
                f"{self.url}/graphql",
                body=body,
                headers={"Content-Type": "application/json", "Accept": "application/json"},
                timeout=self._timeout
                if timeout_s is None
                else urllib3.Timeout(connect=3.0, read=timeout_s),
                retries=urllib3.Retry(total=1, connect=1, read=0, redirect=0),
            )
        except urllib3.exceptions.HTTPError as ex:
            raise self._down(type(ex).__name__) from None
        if resp.status != 200:
            raise self._down(f"HTTP {resp.status} from /graphql")
        try:
            doc = orjson.loads(resp.data)
        except orjson.JSONDecodeError:
            raise self._down("/graphql answered something that is not JSON") from None
        if doc.get("errors"):
            messages = "; ".join(str(e.get("message")) for e in doc["errors"][:3])
            raise self._down(f"GraphQL errors: {messages}")
        return doc.get("data") or {}

    @staticmethod
    def _failed(result: Mapping[str, Any], what: str) -> ProblemError:
        return ProblemError(
            503,
            f"Dagster could not {what}: {result.get('__typename')}: {result.get('message')}",
            code=UNAVAILABLE,
            title="Dagster unavailable",
            extra={"dependency": "dagster"},
        )

    # -- runs ------------------------------------------------------------------------------

    def ui_link(self, run_id: str) -> str:
        return f"{self.url}/runs/{run_id}"

    def launch(
        self,
        job: str,
        run_config: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        *,
        asset_selection: Iterable[str] | None = None,
    ) -> str:
        """Launch (queue) a run of `job` of the code location; its run id."""
        selector: dict[str, Any] = {
            "jobName": job,
            "repositoryName": self.repository,
            "repositoryLocationName": self.location,
        }
        if asset_selection is not None:
            selector["assetSelection"] = [{"path": key.split("/")} for key in asset_selection]
        params = {
            "selector": selector,
            "runConfigData": dict(run_config or {}),
            "executionMetadata": {
                "tags": [{"key": k, "value": str(v)} for k, v in (tags or {}).items()]
            },
        }
        result = self.query(_LAUNCH, {"executionParams": params})["launchRun"]
        kind = result["__typename"]
        if kind == "LaunchRunSuccess":
            return result["run"]["runId"]
        if kind == "RunConfigValidationInvalid":
            raise DagsterConfigInvalid(job, result["errors"])
        raise self._failed(result, f"launch job '{job}'")

    def run(self, run_id: str) -> Run | None:
        """The run, or None when Dagster has no run of that id."""
        result = self.query(_RUN_QUERY, {"runId": run_id})["runOrError"]
        if result["__typename"] == "Run":
            return _run(result)
        if result["__typename"] == "RunNotFoundError":
            return None
        raise self._failed(result, f"read run {run_id}")

    def runs(
        self,
        *,
        tags: Mapping[str, str] | None = None,
        statuses: Iterable[str] | None = None,
        job: str | None = None,
        created_after: float | None = None,
        created_before: float | None = None,
        run_ids: Iterable[str] | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> list[Run]:
        """Runs matching every given filter, newest first (at most `limit`; `cursor`: a run id
        to continue after)."""
        flt: dict[str, Any] = {}
        if tags:
            flt["tags"] = [{"key": k, "value": v} for k, v in tags.items()]
        if statuses:
            flt["statuses"] = list(statuses)
        if job:
            flt["pipelineName"] = job
        if created_after is not None:
            flt["createdAfter"] = created_after
        if created_before is not None:
            flt["createdBefore"] = created_before
        if run_ids is not None:
            flt["runIds"] = list(run_ids)
        variables = {"filter": flt, "limit": limit, "cursor": cursor}
        result = self.query(_RUNS_QUERY, variables)["runsOrError"]
        if result["__typename"] != "Runs":
            raise self._failed(result, "list runs")
        return [_run(node) for node in result["results"]]

    def terminate(self, run_id: str, *, force: bool = False) -> str | None:
        """Ask Dagster to terminate the run: its status after the request (CANCELING /
        CANCELED), the status it already had when it could not be terminated (it finished, or
        is still STARTING), or None when there is no such run. `force` marks the run canceled
        at once (MARK_AS_CANCELED_IMMEDIATELY: for a run whose worker has not started, which
        then never executes; a worker that is running is not waited for)."""
        policy = "MARK_AS_CANCELED_IMMEDIATELY" if force else "SAFE_TERMINATE"
        variables = {"runId": run_id, "policy": policy}
        result = self.query(_TERMINATE, variables)["terminateRun"]
        kind = result["__typename"]
        if kind == "TerminateRunSuccess":  # (the run in the answer can predate the change)
            fresh = self.run(run_id)
            return fresh.status if fresh is not None else result["run"]["status"]
        if kind == "RunNotFoundError":
            return None
        if kind == "TerminateRunFailure" and result.get("run"):
            return result["run"]["status"]
        raise self._failed(result, f"terminate run {run_id}")

    def events(
        self, run_id: str, *, cursor: str | None = None, limit: int = 500
    ) -> tuple[list[dict[str, Any]], str | None, bool] | None:
        """A page of the run's event log: (events, cursor for the next page, has more); None
        when there is no such run. Each event: type, message, timestamp (ms), level, step,
        event type and, for failures, the error message."""
        variables = {"runId": run_id, "cursor": cursor, "limit": limit}
        result = self.query(_LOGS, variables)["logsForRun"]
        kind = result["__typename"]
        if kind == "RunNotFoundError":
            return None
        if kind != "EventConnection":
            raise self._failed(result, f"read the events of run {run_id}")
        events = [
            {
                "type": e["__typename"],
                "message": e.get("message"),
                "timestamp": e.get("timestamp"),
                "level": e.get("level"),
                "step": e.get("stepKey"),
                "event_type": e.get("eventType"),
                "error": (e.get("error") or {}).get("message"),
            }
            for e in result["events"]
        ]
        return events, result.get("cursor"), bool(result.get("hasMore"))

    # -- code location and schedules -------------------------------------------------------

    def reload(self) -> None:
        """Reload the code location (definitions read from files at load time change)."""
        # (a reload re-imports the code location: slow on a busy machine)
        result = self.query(_RELOAD, {"name": self.location}, timeout_s=180.0)
        result = result["reloadRepositoryLocation"]
        if result["__typename"] != "WorkspaceLocationEntry":
            raise self._failed(result, f"reload code location '{self.location}'")
        loaded = result.get("locationOrLoadError") or {}
        if loaded.get("__typename") == "PythonError":
            raise self._failed(loaded, f"load code location '{self.location}'")

    def _selector(self, name: str) -> dict[str, str]:
        return {
            "repositoryName": self.repository,
            "repositoryLocationName": self.location,
            "scheduleName": name,
        }

    def schedule(self, name: str) -> dict[str, Any] | None:
        """The schedule (name, cron, job, timezone, state status) or None if not defined."""
        result = self.query(_SCHEDULE, {"selector": self._selector(name)})["scheduleOrError"]
        if result["__typename"] == "Schedule":
            return _schedule(result)
        if result["__typename"] == "ScheduleNotFoundError":
            return None
        raise self._failed(result, f"read schedule '{name}'")

    def schedules(self) -> dict[str, dict[str, Any]]:
        """{name: schedule} of every schedule the code location defines, in one query."""
        selector = {"repositoryName": self.repository, "repositoryLocationName": self.location}
        result = self.query(_SCHEDULES, {"selector": selector})["repositoryOrError"]
        if result["__typename"] != "Repository":
            raise self._failed(result, f"list the schedules of '{self.location}'")
        return {found["name"]: _schedule(found) for found in result["schedules"]}

    def start_schedule(self, name: str) -> str:
        result = self.query(_START_SCHEDULE, {"selector": self._selector(name)})["startSchedule"]
        if result["__typename"] != "ScheduleStateResult":
            raise self._failed(result, f"start schedule '{name}'")
        return result["scheduleState"]["status"]

    def stop_schedule(self, name: str) -> str | None:
        found = self.schedule(name)
        if found is None:
            return None
        result = self.query(_STOP_SCHEDULE, {"id": found["state_id"]})["stopRunningSchedule"]
        if result["__typename"] != "ScheduleStateResult":
            raise self._failed(result, f"stop schedule '{name}'")
        return result["scheduleState"]["status"]


def _schedule(found: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": found["name"],
        "cron": found["cronSchedule"],
        "job": found["pipelineName"],
        "timezone": found.get("executionTimezone"),
        "status": found["scheduleState"]["status"],
        "state_id": found["scheduleState"]["id"],
    }


def client_for(url: str | None) -> DagsterClient:
    """The client of the configured webserver; 503 naming Dagster when none is configured."""
    if not url:
        raise ProblemError(
            503,
            "Dagster (the job runner) is not configured: set RECSYS_DAGSTER_URL to a running "
            "Dagster webserver. Recommendations keep serving.",
            code=UNAVAILABLE,
            title="Dagster unavailable",
            extra={"dependency": "dagster"},
        )
    return DagsterClient(url)

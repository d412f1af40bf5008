"""Real servers in tests: a free port, a command started in a process group of its own, a wait
until it answers, and a stop of the whole group (the server and every process it started).

Every test that starts gunicorn, `dagster dev`, `mlflow ui` or another long-running process goes
through these (``from servers import ...``: pytest puts ``tests/`` on ``sys.path`` for
``tests/conftest.py``). The pattern, for a server whose port is in its command line:

    port = free_port()
    proc = start([...,"--port", str(port)], env=env, log=tmp_path / "server.log")
    with serving(proc, f"http://127.0.0.1:{port}", "/health", log=...) as url:
        ...  # the group is stopped on the way out, also when the wait fails

`gunicorn`, `dagster_dev` and `mlflow_ui` build the three command lines the project's tests
start (as `recsys serve`, the README's `dagster dev` and `mlflow ui` run them).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # (the venv's console scripts: dagster, mlflow, recsys)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | Path = REPO,
    log: str | Path | None = None,
) -> subprocess.Popen:
    """`argv` in a session (so a process group) of its own, its output appended to `log` (or
    dropped); `env` is its whole environment (None: this process's)."""
    out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(
            list(map(str, argv)),
            cwd=str(cwd),
            env=dict(env) if env is not None else None,
            stdout=out,
            stderr=subprocess.STDOUT if log is not None else subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        if log is not None:
            out.close()  # (the child has its own descriptor)


def stop_group(proc: subprocess.Popen | None, timeout: float = 30.0) -> None:
    """SIGTERM the process group `proc` leads, SIGKILL it if `proc` outlives `timeout`; then
    SIGKILL what is left of the group (children that outlived their parent)."""
    if proc is None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        proc.wait()
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def tail(log: str | Path | None, n: int = 40) -> str:
    """The last `n` lines of a server's log (for a failure message)."""
    if log is None:
        return "(no log)"
    try:
        return "\n".join(Path(log).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def wait_http(
    url: str,
    proc: subprocess.Popen | None = None,
    *,
    body: bytes | None = None,
    timeout: float = 120.0,
    log: str | Path | None = None,
    until: Callable[[bytes], bool] | None = None,
    interval: float = 0.5,
) -> bytes:
    """The body of the first 2xx answer of `url` (a JSON POST of `body` when given) for which
    `until(body)` holds; fails with the log's tail when `proc` exits or `timeout` runs out."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{url}: the server exited ({proc.returncode}):\n{tail(log)}")
        try:
            req = urllib.request.Request(
                url, data=body, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=10) as resp:
                data = resp.read()
            if until is None or until(data):
                return data
            last = data[:500]
        except (OSError, http.client.HTTPException, ValueError) as exc:  # not up yet
            last = exc
        time.sleep(interval)
    raise AssertionError(f"{url} did not answer within {timeout}s ({last}):\n{tail(log)}")


def wait_json(
    url: str,
    body: bytes | None = None,
    timeout: float = 120.0,
    until: Callable[[Any], bool] | None = None,
    proc: subprocess.Popen | None = None,
    log: str | Path | None = None,
) -> Any:
    """The JSON answer of `url` once it answers 2xx with JSON (and `until(answer)` holds)."""

    def ready(data: bytes) -> bool:
        try:
            doc = json.loads(data)
        except ValueError:
            return False
        return until is None or bool(until(doc))

    return json.loads(
        wait_http(url, proc, body=body, timeout=timeout, log=log, until=ready, interval=1.0)
    )


@contextlib.contextmanager
def serving(
    proc: subprocess.Popen,
    url: str,
    ready: str,
    *,
    timeout: float = 120.0,
    log: str | Path | None = None,
    body: bytes | None = None,
    until: Callable[[bytes], bool] | None = None,
) -> Iterator[str]:
    """`url` once `url + ready` answers (`wait_http`); the process group of `proc` is stopped
    on the way out, also when the wait fails."""
    try:
        wait_http(url + ready, proc, body=body, timeout=timeout, log=log, until=until)
        yield url
    finally:
        stop_group(proc)


# --- the project's servers -------------------------------------------------------------------
def gunicorn(
    env: Mapping[str, str],
    *,
    workers: int = 2,
    log: str | Path | None = None,
    **options: Any,
) -> tuple[subprocess.Popen, str]:
    """`recsys serve`'s gunicorn (`serving.cli.gunicorn_argv`, sync workers unless `options`
    say otherwise) on a free port with the environment `env`; (process, base URL)."""
    from serving.cli import gunicorn_argv

    port = free_port()
    argv = gunicorn_argv(f"127.0.0.1:{port}", workers, **options)
    return start(argv, env=env, log=log), f"http://127.0.0.1:{port}"


def dagster_dev(
    home: Path, env: Mapping[str, str], log: str | Path | None = None
) -> tuple[subprocess.Popen, str]:
    """`dagster dev` (webserver + daemon) of the project's workspace on a free port, with its
    own DAGSTER_HOME (`home`, given the project's dagster.yaml) and `env` over this process's
    environment; (process, base URL)."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    port = free_port()
    argv = [BIN / "dagster", "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)]
    proc = start(argv, env={**os.environ, **env, "DAGSTER_HOME": str(home)}, log=log)
    return proc, f"http://127.0.0.1:{port}"


def mlflow_ui(
    backend_uri: str,
    artifact_root: str | Path,
    *,
    cwd: str | Path,
    env: Mapping[str, str] | None = None,
    log: str | Path | None = None,
) -> tuple[subprocess.Popen, str]:
    """`mlflow ui` on `backend_uri` on a free port; (process, base URL). One worker process:
    uvicorn's supervisor restarts workers whose start outlasts its health check (seconds on a
    loaded machine), again and again."""
    port = free_port()
    argv = [
        BIN / "mlflow",
        "ui",
        "--backend-store-uri",
        backend_uri,
        "--default-artifact-root",
        str(artifact_root),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    return start(argv, env=env, cwd=cwd, log=log), f"http://127.0.0.1:{port}"

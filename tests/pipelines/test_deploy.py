"""The worked deployment under deploy/ is valid: the Celery executor's config as the workers
read it, the code location with RECSYS_EXECUTOR=celery (`dagster definitions validate`), and
the compose file (`docker compose config`, where a compose tool is installed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(ROOT, "deploy")
BIN = os.path.dirname(sys.executable)


def test_celery_yaml_is_what_the_workers_accept(monkeypatch):
    pytest.importorskip("dagster_celery", reason="the distributed extra is not installed")
    from dagster_celery.cli import get_validated_config

    monkeypatch.setenv("RECSYS_CELERY_BROKER", "amqp://u:p@broker:5672//")
    cfg = get_validated_config(os.path.join(DEPLOY, "celery.yaml"))
    assert cfg["broker"] == "amqp://u:p@broker:5672//" and cfg["backend"] == "rpc://"
    source = cfg["config_source"]
    assert source["task_acks_late"] and source["task_reject_on_worker_lost"]
    assert source["worker_prefetch_multiplier"] == 1


def test_definitions_validate_with_the_celery_executor(tmp_path):
    pytest.importorskip("dagster_celery", reason="the distributed extra is not installed")
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(os.path.join(ROOT, "dagster_home", "dagster.yaml"), home)
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "RECSYS_EXECUTOR": "celery",
        "RECSYS_CELERY_BROKER": "amqp://guest:guest@127.0.0.1:5672//",
        "RECSYS_DATA_ROOT": str(tmp_path / "data"),
    }
    done = subprocess.run(
        [os.path.join(BIN, "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    probe = subprocess.run(
        [sys.executable, "-c", "from pipelines.definitions import defs; "
         "print(*(defs.resolve_job_def(j).executor_def.name for j in "
         "('recsys_pipeline', 'publish_job', 'user_shards_job')))"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert probe.stdout.split() == ["recsys_celery"] * 3, probe.stderr[-2000:]


def _compose() -> list[str] | None:
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_file_is_valid_and_has_the_roles():
    import yaml

    compose = _compose()
    if compose is None:
        pytest.skip("neither `docker compose` nor docker-compose is installed")
    env = {**os.environ, "RECSYS_JWT_SECRET": "x" * 64}
    done = subprocess.run(
        [*compose, "-f", os.path.join(DEPLOY, "docker-compose.yml"), "config"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    resolved = yaml.safe_load(done.stdout)
    services = resolved["services"]
    assert {"rabbitmq", "postgres", "redis", "worker", "api", "lb", "dagster-daemon"} <= set(
        services
    )
    assert services["api"]["deploy"]["replicas"] >= 2
    assert services["worker"]["deploy"]["replicas"] >= 2
    for role in ("worker", "api", "dagster-daemon", "dagster-web"):
        env_ = services[role]["environment"]
        assert env_["RECSYS_DATA_ROOT"] == "/data" and env_["RECSYS_EXECUTOR"] == "celery"
    # without the secret the API refuses to start: compose says so
    bad = subprocess.run(
        [*compose, "-f", os.path.join(DEPLOY, "docker-compose.yml"), "config", "-q"],
        env={k: v for k, v in os.environ.items() if k != "RECSYS_JWT_SECRET"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode != 0 and "RECSYS_JWT_SECRET" in bad.stderr

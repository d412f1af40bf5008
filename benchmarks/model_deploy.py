"""Deploy and roll back a model version through the API under load, and print the figures.

Starts `recsys serve` (gunicorn) on a data root whose tenant has two published snapshots of two
registered versions of ``recsys-<tenant>``, runs wrk against POST /v1/recommend the whole time,
and through the API alone:

1. deploys version B to prod at 100 %: the time the call takes, and the time from the call to
   the first of N consecutive /v1/recommend answers whose ``meta.algo_version`` is B's
   (both gunicorn workers serve it);
2. rolls B back: the same, until A's lists are served again;
3. deploys B at 10 %: the share of 2,000 users the canary experiment gives B, then rolls back.

wrk's count of non-2xx answers and socket errors over the whole run is the "failed requests"
figure. Wall-clock times on a loaded machine are noisy; the script prints the load average.

    .venv/bin/python benchmarks/model_deploy.py --data-root /tmp/demo-data --a 1 --b 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(base: str, method: str, path: str, token: str, body: dict | None = None):
    req = urllib.request.Request(
        base + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as ex:
        return ex.code, json.loads(ex.read() or b"null")


def served(base: str, token: str, user: str) -> tuple[str, str | None]:
    status, body = call(base, "POST", "/v1/recommend", token, {"user": {"user_id": user}, "k": 10})
    if status != 200:
        raise RuntimeError(f"/v1/recommend answered {status}: {body}")
    meta = body["meta"]
    return meta["algo_version"], (meta.get("experiment") or {}).get("variant")


def until_served(base: str, token: str, want: str, streak: int = 20) -> float:
    """Seconds until `streak` answers in a row carry algo_version `want` (from now)."""
    t0, ok = time.perf_counter(), 0
    while ok < streak:
        ok = ok + 1 if served(base, token, "u0000001")[0] == want else 0
        if time.perf_counter() - t0 > 60:
            raise RuntimeError(f"{want} not served after 60 s")
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--tenant", default="default")
    ap.add_argument("--a", default="1", help="the live version")
    ap.add_argument("--b", default="2", help="the version to deploy")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--connections", type=int, default=8)
    args = ap.parse_args()
    from serving.auth import mint_token

    secret = secrets.token_hex(32)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "RECSYS_DATA_ROOT": args.data_root,
        "RECSYS_JWT_SECRET": secret,
        # (wrk's load is not to be answered 429: every non-2xx is counted as a failure)
        "RECSYS_RATE_LIMIT": "100000000/60",
        "RECSYS_TENANT_RATE_LIMIT": "100000000/60",
    }
    server = subprocess.Popen(
        [f"{BIN}/recsys", "serve", "--bind", f"127.0.0.1:{port}", "--workers", str(args.workers)],
        env=env,
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    name = f"recsys-{args.tenant}"
    read = mint_token(secret, args.tenant, ("recommend",), 3600)
    admin = mint_token(secret, args.tenant, ("admin",), 3600)
    wrk = None
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if served(base, read, "u0000001")[0]:
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        a, b = f"{name}@{args.a}", f"{name}@{args.b}"
        print(f"live before: {served(base, read, 'u0000001')[0]} (load {os.getloadavg()[0]:.1f})")
        script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)  # noqa: SIM115
        users = ", ".join(f'"u{n:07d}"' for n in range(1, 201))
        script.write(
            'wrk.method = "POST"\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
            f'wrk.headers["Authorization"] = "Bearer {read}"\n'
            f"local users = {{{users}}}\n"
            "request = function()\n"
            "  local u = users[math.random(#users)]\n"
            '  return wrk.format(nil, "/v1/recommend", nil, '
            '\'{"k": 10, "user": {"user_id": "\' .. u .. \'"}}\')\n'
            "end\n"
        )
        script.close()
        wrk = subprocess.Popen(
            ["wrk", "-t2", f"-c{args.connections}", "-d600s", "--latency", "-s", script.name,
             base],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )  # fmt: skip
        time.sleep(3)
        figures = {}
        for label, method, path, body, want in (
            ("deploy 100 % (first MLflow calls of the worker)", "deploy", args.b, {}, b),
            ("rollback", "rollback", args.b, None, a),
            ("deploy 100 % (again)", "deploy", args.b, {"env": "prod", "traffic_pct": 100}, b),
            ("rollback (again)", "rollback", args.b, None, a),
        ):
            t0 = time.perf_counter()
            status, answer = call(
                base, "POST", f"/v1/recs/models/{name}/versions/{path}/{method}", admin, body
            )
            took = time.perf_counter() - t0
            assert status == 200, (status, answer)
            rest = until_served(base, read, want)
            figures[label] = (took, took + rest, answer.get("seconds"))
            print(
                f"{label}: call {took:.2f} s (server-side {answer.get('seconds')} s), "
                f"served by every worker {took + rest:.2f} s after the call started"
            )
            time.sleep(3)
        status, answer = call(
            base,
            "POST",
            f"/v1/recs/models/{name}/versions/{args.b}/deploy",
            admin,
            {"env": "prod", "traffic_pct": 10},
        )
        assert status == 200, (status, answer)
        variants = [served(base, read, f"canary-user-{n}")[1] for n in range(2000)]
        share = sum(v == f"v{args.b}" for v in variants) / len(variants)
        print(f"canary 10 %: {share:.1%} of 2,000 users get version {args.b}")
        status, answer = call(
            base, "POST", f"/v1/recs/models/{name}/versions/{args.b}/rollback", admin
        )
        assert status == 200, (status, answer)
        time.sleep(2)
        os.killpg(wrk.pid, signal.SIGINT)
        out = wrk.communicate(timeout=60)[0]
        wrk = None
        total = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        sock = re.search(r"Socket errors: (.*)", out)
        print(
            f"wrk: {total.group(1)} requests in {total.group(2)}{total.group(3)}, "
            f"non-2xx {non2xx.group(1) if non2xx else 0}, "
            f"socket errors {sock.group(1) if sock else 'none'}"
        )
        print(out)
        return 0
    finally:
        if wrk is not None:
            os.killpg(wrk.pid, signal.SIGKILL)
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())

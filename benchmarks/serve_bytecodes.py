"""Python bytecodes per POST /v1/recommend, by function: where the app's own work goes.

    .venv/bin/python benchmarks/serve_bytecodes.py [--data-root data/bench] [--requests 200]

`serve_instructions.py` counts what a gunicorn worker executes per request: the figure to
compare, but not where it goes (callgrind sees the interpreter's C functions, not the Python
functions it runs). This builds the app of `create_app` in process, with the environment of
serve_load.py's server (access log on, rate limits on), sends it serve_instructions.py's
requests as WSGI calls after a warm-up, and counts the bytecodes each Python function executes
per request (`sys.settrace` with opcode events): deterministic, a few seconds, no valgrind.
It prints the total, the share of each file and the top functions.

Calibration (2026-12-03, b95430f): dataclass -> msgspec Struct removed 207 bytecodes per
request and 9.3k instructions of the in-process app (callgrind, zoned), about 45 instructions a
bytecode. C work (the JSON codecs, the kernels, hashing) is not in these counts, so use this to
find the places to look, and serve_instructions.py to tell what a change is worth.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks._snapshots import TENANT, ensure_snapshot  # noqa: E402
from benchmarks.serve_instructions import recommend_bodies  # noqa: E402
from benchmarks.serve_load import SECRET, server_env  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", default=os.path.join(REPO, "data", "bench"))
    ap.add_argument("--requests", type=int, default=200, help="counted requests")
    ap.add_argument("--warmup", type=int, default=500, help="requests before the counting")
    ap.add_argument("--top", type=int, default=40, help="functions listed")
    args = ap.parse_args()
    data_root = os.path.abspath(args.data_root)
    ensure_snapshot(data_root)
    os.environ.update(server_env(data_root))

    from falcon import testing

    from serving.app import create_app
    from serving.auth import mint_token

    app = create_app()
    headers = {
        "Content-Type": "application/json",
        "Authorization": "Bearer " + mint_token(SECRET, TENANT, ["recommend"], 7200),
    }
    environs = [
        testing.create_environ(path="/v1/recommend", method="POST", body=body, headers=headers)
        for body in recommend_bodies(args.warmup + args.requests, seed=1)
    ]

    def start_response(status, _headers, exc_info=None):
        if not status.startswith("200"):
            raise RuntimeError(f"answered {status}")

    for env in environs[: args.warmup]:
        b"".join(app(env, start_response))

    counts: collections.Counter[tuple[str, int, str]] = collections.Counter()

    def tracer(frame, event, _arg):
        frame.f_trace_opcodes = True
        if event == "opcode":
            code = frame.f_code
            counts[(code.co_filename, code.co_firstlineno, code.co_name)] += 1
        return tracer

    sys.settrace(tracer)
    try:
        for env in environs[args.warmup :]:
            b"".join(app(env, start_response))
    finally:
        sys.settrace(None)

    n = args.requests
    mine = {key: c for key, c in counts.items() if key[0] != os.path.abspath(__file__)}

    def where(path: str) -> str:
        path = path.split("site-packages/")[-1]
        return os.path.relpath(path, REPO) if path.startswith(REPO) else path

    by_file: collections.Counter[str] = collections.Counter()
    for (path, _, _), c in mine.items():
        by_file[where(path)] += c
    print(f"POST /v1/recommend: {sum(mine.values()) / n:,.0f} bytecodes per request ({n} requests)")
    print("\nby file:")
    for path, c in by_file.most_common(15):
        print(f"{c / n:8.0f}  {path}")
    print(f"\ntop {args.top} functions:")
    for (path, line, name), c in sorted(mine.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"{c / n:8.0f}  {where(path)}:{line} {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

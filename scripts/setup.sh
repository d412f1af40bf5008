#!/usr/bin/env bash
# Create .venv and install the project with its dev extras; re-installs only when
# pyproject.toml changed. Quiet on success; the pip log is printed on failure.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PYTHON="$candidate"; break; fi
  done
fi
if [ -z "$PYTHON" ] || ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "recsys needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp="$(sha256sum pyproject.toml | cut -c1-16)"
if [ "$(cat .venv/.recsys-installed 2>/dev/null || true)" != "$stamp" ]; then
  mkdir -p data/logs
  if ! .venv/bin/python -m pip install --disable-pip-version-check -q -e '.[dev]' \
      > data/logs/pip-install.log 2>&1; then
    grep -v "^WARNING: Location" data/logs/pip-install.log | tail -40 >&2
    echo "installing the project failed; full log in data/logs/pip-install.log" >&2
    exit 1
  fi
  echo "$stamp" > .venv/.recsys-installed
fi

# Chromium for the browser tests and web/node_modules for the generated client (quiet, idempotent).
bash scripts/setup_browser.sh

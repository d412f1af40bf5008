#!/usr/bin/env bash
# What the demo page's client generation and the browser tests need, installed from the
# registries (idempotent, quiet on success; the log is printed on failure):
#   - Debian's chromium and chromium-driver (apt; needs root or passwordless sudo), and its
#     docker-compose where no compose tool is installed (tests/pipelines/test_deploy.py
#     validates deploy/docker-compose.yml with it),
#   - web/node_modules from web/package-lock.json (npm ci; openapi-typescript, openapi-fetch).
# Called by scripts/setup.sh; RECSYS_SKIP_BROWSER=1 skips it (the browser tests then skip and
# say why).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${RECSYS_SKIP_BROWSER:-0}" = "1" ] && exit 0
mkdir -p data/logs
log=data/logs/setup-browser.log

packages=()
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  packages+=(chromium chromium-driver)
fi
if ! command -v docker-compose >/dev/null 2>&1 \
    && ! { command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; }; then
  packages+=(docker-compose)
fi
if [ ${#packages[@]} -gt 0 ]; then
  as_root=()
  if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      as_root=(sudo -n)
    else
      echo "setup_browser: ${packages[*]} missing and apt needs root; their tests will skip" >&2
      as_root=()
    fi
  fi
  if [ "$(id -u)" = "0" ] || [ ${#as_root[@]} -gt 0 ]; then
    # (a lock held by another apt run is waited for, not failed on)
    apt_opts=(-y -q -o DPkg::Lock::Timeout=600 --no-install-recommends)
    if ! { "${as_root[@]}" apt-get install "${apt_opts[@]}" "${packages[@]}" \
          || { "${as_root[@]}" apt-get update -q -o DPkg::Lock::Timeout=600 \
               && "${as_root[@]}" apt-get install "${apt_opts[@]}" "${packages[@]}"; }; \
        } > "$log" 2>&1; then
      tail -30 "$log" >&2
      echo "installing ${packages[*]} failed; full log in $log" >&2
      exit 1
    fi
  fi
fi

if command -v npm >/dev/null 2>&1; then
  stamp="$(sha256sum web/package-lock.json | cut -c1-16)"
  if [ "$(cat web/node_modules/.recsys-installed 2>/dev/null || true)" != "$stamp" ]; then
    if ! (cd web && npm ci --no-audit --no-fund --loglevel=error) > "$log.npm" 2>&1; then
      tail -30 "$log.npm" >&2
      echo "npm ci in web/ failed; full log in $log.npm" >&2
      exit 1
    fi
    echo "$stamp" > web/node_modules/.recsys-installed
  fi
else
  echo "setup_browser: npm not found; the client cannot be regenerated (scripts/gen_client.sh)" >&2
fi

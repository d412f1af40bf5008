#!/usr/bin/env bash
# Regenerate the typed TypeScript client and the demo page from the route table, in one command:
#   1. web/client/openapi.json   the app's /openapi.json, dumped from create_app (no server)
#   2. web/client/schema.d.ts    its types (openapi-typescript)
#   3. serving/demo/*.js         the page's ES modules, compiled from web/src/*.ts against those
#                                types (tsc), and openapi-fetch's ES module copied beside them
# All of it is checked in; tests/browser/test_client.py fails when it is stale against the spec.
# `--check` regenerates nothing and exits 1 when something is stale.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d web/node_modules/openapi-typescript ] || bash scripts/setup_browser.sh
check=0
[ "${1:-}" = "--check" ] && check=1

out=web/client
if [ "$check" = 1 ]; then
  out="$(mktemp -d)"; trap 'rm -rf "$out"' EXIT
fi
.venv/bin/python -c "import sys; from serving.resources.demo import dump_openapi; dump_openapi(sys.argv[1])" \
  "$out/openapi.json"
out="$(cd "$out" && pwd)"
(cd web && node_modules/.bin/openapi-typescript "$out/openapi.json" -o "$out/schema.d.ts" \
   --default-non-nullable false --empty-objects-unknown --alphabetize >/dev/null 2>&1) \
  || { echo "openapi-typescript failed on $out/openapi.json" >&2; exit 1; }
if [ "$check" = 1 ]; then
  stale=0
  for f in openapi.json schema.d.ts; do
    cmp -s "$out/$f" "web/client/$f" || { echo "web/client/$f is stale: run scripts/gen_client.sh" >&2; stale=1; }
  done
  exit $stale
fi
(cd web && node_modules/.bin/tsc -p tsconfig.json)
cp web/node_modules/openapi-fetch/dist/index.mjs serving/demo/openapi-fetch.js

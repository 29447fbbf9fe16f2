#!/usr/bin/env bash
# Property-based fuzzing of the REST API from its own OpenAPI document:
# validates the document, then lets schemathesis generate requests (valid
# and invalid, following the documented links between operations) against
# a real `task-queue serve` on a fresh database, with an admin token.
# Fails on any 5xx, any response that does not match the document, and any
# invalid request the server accepts.
#
#   bash .ci/api-fuzz.sh [BINARY] [SECONDS]
#
# The server runs with --no-engine: generated tasks are stored and answered
# for, never executed (they would run arbitrary generated commands).
set -euo pipefail
cd "$(dirname "$0")/.."

bin=$(realpath "${1:-target/debug/task-queue}")
budget=${2:-120}
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore \
  'schemathesis>=4.3,<5' 'openapi-spec-validator>=0.7'

dir=$(mktemp -d)
server_pid=
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

token=$("$bin" --db "$dir/q.db" token create --role admin --name fuzz 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
(cd "$dir" && exec "$bin" --db "$dir/q.db" serve --no-engine --bind 127.0.0.1:0 2>"$dir/serve.log") &
server_pid=$!
base=
for _ in $(seq 1 100); do
  base=$(sed -n 's/.*listening on \(http:\/\/[0-9.:]*\).*/\1/p' "$dir/serve.log" | head -1)
  [ -n "$base" ] && break
  sleep 0.1
done
[ -n "$base" ] || { echo "serve did not start:"; cat "$dir/serve.log"; exit 1; }

echo "== OpenAPI document: validate"
curl -sf -H "Authorization: Bearer $token" "$base/api/v1/openapi.json" >"$dir/openapi.json"
python3 -m openapi_spec_validator "$dir/openapi.json"

echo "== schemathesis against $base (budget ${budget}s)"
# positive_data_acceptance is left out: the document states shapes,
# ranges and lengths, but cross-field rules (command xor argv xor http,
# schedule at xor cron, tail xor offset), the syntax of cron expressions
# and durations, byte (not character) lengths and cursors are checked by
# the server and answered 400 naming the field, which that check counts
# as a failure. The event stream
# (/events) never ends, so it is not fuzzed here; tests cover it.
st run "$base/api/v1/openapi.json" \
  --url "$base/api/v1" \
  -H "Authorization: Bearer $token" \
  --checks all \
  --exclude-checks positive_data_acceptance \
  --exclude-path /events \
  --max-examples 40 \
  --max-time "$budget" \
  --request-timeout 10 \
  --seed 20261127 \
  --no-color

echo "== server stderr had no panic"
if grep -q "panicked" "$dir/serve.log"; then
  cat "$dir/serve.log"
  exit 1
fi

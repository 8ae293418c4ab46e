#!/usr/bin/env bash
# Compares two keel builds (or two configs of one build) by running them *at the same time*,
# each under its own half of the load, so that this shared machine's drift (the same binary
# can serve 20% fewer calls a minute later) hits both alike. Alternating rounds cannot cancel
# that drift; running side by side does: an A/A run agreed within 3% on throughput and
# 1.5% on CPU per call (DEVELOPERS.md, "Where the gateway's CPU goes").
#
# usage: bench/ab.sh BIN_A CONFIG_A BIN_B CONFIG_B
#   CONFIG_*: a keel.toml with a `listen` line and a `sqlite://` store `url` line, which this
#   script replaces (keel A and B on 127.0.0.1:8420 and :8421, swapped every round, each
#   with a store of its own in a temp dir); its providers must point at a running
#   OpenAI-compatible server, such as the simulator:
#   cargo run --release -p keel-sim --example serve -- 127.0.0.1:9100
# env: ROUNDS (5), DUR seconds per round (6), CONNS per keel (32), ROUTE (bench),
#   ENV_A / ENV_B (extra environment for each keel, `NAME=value ...`).
# needs: wrk, curl, bc. Each round prints both sides' requests/s and CPU per call (user +
# system time from /proc over the round) and B/A. A side whose load got errors fails the run.
set -euo pipefail
if [ $# -ne 4 ]; then
  sed -n 2,17p "$0"
  exit 2
fi
BIN_A=$1 CONFIG_A=$2 BIN_B=$3 CONFIG_B=$4
ROUNDS=${ROUNDS:-5} DUR=${DUR:-6} CONNS=${CONNS:-32} ROUTE=${ROUTE:-bench}
for tool in wrk curl bc; do
  command -v $tool > /dev/null || { echo "bench/ab.sh needs $tool" >&2; exit 2; }
done
work=$(mktemp -d)
pids=()
cleanup() {
  [ ${#pids[@]} -eq 0 ] || kill "${pids[@]}" 2> /dev/null || true
  wait 2> /dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
cat > "$work/post.lua" << LUA
wrk.method = "POST"
wrk.body = '{"model":"$ROUTE","messages":[{"role":"user","content":"Say hello in one word."}],"max_tokens":8}'
wrk.headers["Content-Type"] = "application/json"
LUA

# start NAME PORT CONFIG BIN ENV: keel in this shell (so it can be waited for and killed),
# its pid in $started.
start() {
  local dir="$work/$1"
  mkdir -p "$dir"
  sed -e "s#^listen *=.*#listen = \"127.0.0.1:$2\"#" \
    -e "s#^url *= *\"sqlite:.*#url = \"sqlite://$dir/keel.db\"#" "$3" > "$dir/keel.toml"
  grep -q "^listen = \"127.0.0.1:$2\"" "$dir/keel.toml" &&
    grep -q "^url = \"sqlite://$dir/keel.db\"" "$dir/keel.toml" || {
    echo "$3 needs a listen line and a sqlite:// store url line" >&2
    exit 2
  }
  # shellcheck disable=SC2086
  env ${5:-} "$4" serve --config "$dir/keel.toml" > "$dir/keel.log" 2>&1 &
  started=$!
  pids+=("$started")
}
ready() { # PORT LOGDIR
  for _ in $(seq 100); do
    curl -sf "127.0.0.1:$1/readyz" > /dev/null && return
    sleep 0.1
  done
  echo "keel on :$1 did not start; its log:" >&2
  cat "$work/$2/keel.log" >&2
  exit 1
}
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# load PORT SECONDS OUT: wrk's report in OUT.
load() {
  wrk -t1 -c"$CONNS" -d"$2"s -s "$work/post.lua" "http://127.0.0.1:$1/v1/chat/completions" > "$3"
}
rate() { # wrk report -> requests/s; errors fail the run
  if grep -q "Non-2xx\|Socket errors" "$1"; then
    echo "the load got errors (is ROUTE=$ROUTE a route of the config?):" >&2
    cat "$1" >&2
    exit 1
  fi
  awk '/Requests\/sec/ {print $2}' "$1"
}
ticks=$(getconf CLK_TCK)
per_call() { echo "scale=1; ($2 - $1) * 1000000 / $ticks / ($3 * $DUR)" | bc; }

for round in $(seq "$ROUNDS"); do
  if [ $((round % 2)) = 1 ]; then PA=8420 PB=8421; else PA=8421 PB=8420; fi
  start "a$round" $PA "$CONFIG_A" "$BIN_A" "${ENV_A:-}"
  KA=$started
  start "b$round" $PB "$CONFIG_B" "$BIN_B" "${ENV_B:-}"
  KB=$started
  ready $PA "a$round"
  ready $PB "b$round"
  # Warm both up, then measure both at once.
  load $PA 2 "$work/warm-a" &
  load $PB 2 "$work/warm-b"
  wait $!
  A0=$(cpu "$KA") B0=$(cpu "$KB")
  load $PA "$DUR" "$work/a" &
  load $PB "$DUR" "$work/b"
  wait $!
  A1=$(cpu "$KA") B1=$(cpu "$KB")
  kill "$KA" "$KB"
  wait "$KA" "$KB" || true
  pids=()
  RA=$(rate "$work/a") RB=$(rate "$work/b")
  printf "round %d  A %8.0f req/s %6.1f us/call | B %8.0f req/s %6.1f us/call | B/A %.3f\n" \
    "$round" "$RA" "$(per_call "$A0" "$A1" "$RA")" "$RB" "$(per_call "$B0" "$B1" "$RB")" \
    "$(echo "scale=4; $RB / $RA" | bc)"
done

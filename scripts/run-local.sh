#!/usr/bin/env bash
# The headline use on one machine: start a coordinator on 127.0.0.1, an `mpirun -np 2` worker
# group, submit a C4 perplexity job over gRPC, print the result, shut everything down.
# Extra arguments go to `kvtp submit ppl` (default: the embedded Llama on the held-out C4 sample).
# usage: scripts/run-local.sh [kvtp submit ppl options...]   (WORKERS=N: a group of N ranks, default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
kvtp=${KVTP:-build/kvtp}  # KVTP: another binary (the GPU bundle's)
[ -x "$kvtp" ] || { echo "run scripts/setup.sh first (no $kvtp)" >&2; exit 1; }
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--model models/kvtp-llama-2m --data data/c4/c4-heldout-200.json.gz)

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
# Two roles, two tokens: this script's client (submit) and the worker group.
token() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
token > "$work/client-token"
token > "$work/worker-token"
echo "local $(cat "$work/client-token") submit" > "$work/client-tokens"

"$kvtp" coordinator --listen 127.0.0.1:0 --db "$work/jobs.db" --client-tokens "$work/client-tokens" \
  --worker-token-file "$work/worker-token" --data-root "$PWD" 2> "$work/coordinator.log" &
pids+=($!)
for _ in $(seq 100); do grep -q "(port " "$work/coordinator.log" && break; sleep 0.1; done
port=$(sed -n 's/.*(port \([0-9]*\)).*/\1/p' "$work/coordinator.log")
[ -n "$port" ] || { cat "$work/coordinator.log" >&2; exit 1; }
echo "coordinator on 127.0.0.1:$port; starting a worker group: mpirun -np ${WORKERS:-2} kvtp worker" >&2

root=(); [ "$(id -u)" -eq 0 ] && root=(--allow-run-as-root)
threads=$(( $(nproc) / 2 )); [ "$threads" -ge 1 ] || threads=1
OMP_NUM_THREADS=$threads mpirun "${root[@]}" --oversubscribe --bind-to none -x OMP_NUM_THREADS -np "${WORKERS:-2}" \
  "$kvtp" worker --coordinator "127.0.0.1:$port" --token-file "$work/worker-token" 2> "$work/worker.log" &
pids+=($!)

"$kvtp" submit ppl --coordinator "127.0.0.1:$port" --token-file "$work/client-token" --wait "${args[@]}"

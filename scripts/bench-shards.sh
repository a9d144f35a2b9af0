#!/usr/bin/env bash
# The critical path of a split run, measured: a single run at 1 thread against N shards run two
# at a time at 1 thread each (as on two 1-core machines at once), with the prefix recomputed and
# with the activations handed over by N capture jobs; then the merge. Prints the slowest shard,
# the critical path and the speed-up.
#
#   AWQ_TEST_MODEL=… scripts/bench-shards.sh [N…]        # default N = 2 4
#
# Model: $AWQ_TEST_MODEL (SmolLM2-135M), group 64, 4 blocks of 128 tokens of wiki.valid.calib.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${AWQ_TEST_MODEL:?set AWQ_TEST_MODEL to the SmolLM2 test model}
[ -n "${AWQ_BIN:-}" ] || cargo build --release --quiet --bin awq
awq=${AWQ_BIN:-target/release/awq}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
args=(--model "$model" --group 64 --calib data/wikitext-2-raw/wiki.valid.calib.txt
      --seqlen 128 --max-blocks 4 -q)
export RAYON_NUM_THREADS=1
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.1f}')"; }

t0=$(now); "$awq" quantize "${args[@]}" -o "$work/single" >/dev/null; t1=$(now)
single=$(secs "$t0" "$t1")
echo "single run, 1 thread: ${single}s"

# Runs "$@" for every k of 0..n-1, two at a time; prints the longest wall time.
pairs() {
  local n=$1; shift
  local worst=0
  for ((k = 0; k < n; k += 2)); do
    local pids=() starts=()
    for ((i = k; i < k + 2 && i < n; i++)); do
      ( s=$(now); "$@" "$i" >/dev/null; e=$(now); secs "$s" "$e" >"$work/t-$i" ) &
      pids+=($!)
    done
    wait "${pids[@]}"
  done
  for ((k = 0; k < n; k++)); do worst=$(python3 -c "print(max($worst, $(cat "$work/t-$k")))"); done
  echo "$worst"
}
shard() { "$awq" quantize "${args[@]}" --shard "$1/$N" -o "$work/p$N-$1"; }
capture() { "$awq" quantize "${args[@]}" --capture "$1/$N" --shards "$N" -o "$work/act$N/$1"; }
handed() { "$awq" quantize "${args[@]}" --shard "$1/$N" --activations "$work/act$N" -o "$work/h$N-$1"; }

for N in "${@:-2 4}"; do
  for N in $N; do
    slow=$(pairs "$N" shard)
    t0=$(now); "$awq" merge "$work"/p"$N"-* -o "$work/m$N" -q >/dev/null; t1=$(now)
    merge=$(secs "$t0" "$t1")
    cap=$(pairs "$N" capture)
    slow_h=$(pairs "$N" handed)
    python3 - "$single" "$N" "$slow" "$merge" "$cap" "$slow_h" <<'PY'
import sys
single, n, slow, merge, cap, slow_h = map(float, sys.argv[1:])
path, path_h = slow + merge, cap + slow_h + merge
print(f"N={int(n)}: prefix recomputed: slowest shard {slow:.1f}s + merge {merge:.1f}s = "
      f"{path:.1f}s, speed-up {single / path:.2f}; handed over: capture {cap:.1f}s + "
      f"slowest shard {slow_h:.1f}s + merge {merge:.1f}s = {path_h:.1f}s, speed-up "
      f"{single / path_h:.2f}")
PY
    cmp "$work/single/model.safetensors" "$work/m$N/model.safetensors"
  done
done

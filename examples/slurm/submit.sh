#!/usr/bin/env bash
# Submits a split `awq quantize` to Slurm: an array of N shards, then the merge, which runs
# only when every shard succeeded (afterok; with SchedulerParameters=kill_invalid_depend a
# failed shard cancels it instead of leaving it pending).
#
#   MODEL=/shared/Llama-2-7b-hf OUT=/shared/llama-awq N=8 AWQ_ARGS="--group 128" \
#     bash examples/slurm/submit.sh
#
# `awq quantize --model "$MODEL" $AWQ_ARGS --dry-run --shards N` prints each shard's layers,
# seconds and memory first. WAIT=1 blocks until the merge ends and exits with its status.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
: "${MODEL:?}" "${OUT:?}"
N=${N:-4}
mkdir -p "$OUT/shards"
export MODEL OUT AWQ_ARGS AWQ_MERGE_ARGS AWQ
array=$(sbatch --parsable --chdir="$OUT" --array="0-$((N - 1))" --export=ALL \
  "$here/awq-shard.sbatch")
echo "shards: job array $array (0-$((N - 1)))"
wait_flag=()
[ "${WAIT:-0}" = 1 ] && wait_flag=(--wait)
merge=$(sbatch --parsable --chdir="$OUT" --dependency="afterok:$array" --export=ALL \
  "${wait_flag[@]}" "$here/awq-merge.sbatch")
echo "merge: job $merge (after $array)"

#!/usr/bin/env bash
# The quality matrix: SmolLM2-135M at group 64 and 32, plus a requantized copy (its linears
# first rounded to a group-32 RTN grid, as a model dequantized from an earlier 4-bit checkpoint
# is) and a k-quant copy (a Q4_K_M-like mixed grid, examples/kquant_grid.rs, as a model
# dequantized from a GGUF is), both quantized at group 64; each method on 32 x 512 blocks of
# wiki.valid.calib.txt, perplexity on the first 8192 tokens of wiki.valid.raw (windows of
# 2048). Prints one table: perplexity,
# % of the RTN -> fp16 gap closed, wall seconds, peak RSS.
#
#   AWQ_TEST_MODEL=... scripts/quality.sh [METHOD...]   # default: the methods in the README's table
#
# Methods: rtn (plain round-to-nearest: --no-search --no-clip --rounding rtn), awq (the default), noguard
# (--no-guard), sep (--clip-sides separate), keep3 (--keep-fp16 3), gptq (--rounding gptq),
# gptq-sep, gptq-keep3, gptq-sep-keep3; each also as fast-<method> with --fast (fast alone is
# the default with --fast). rtn is always run (the gap is measured from it).
set -euo pipefail
cd "$(dirname "$0")/.."
src=${AWQ_TEST_MODEL:?set AWQ_TEST_MODEL to the SmolLM2 test model}
data=data/wikitext-2-raw
bin=${AWQ_BIN:-./target/release/awq}
work=${QUALITY_DIR:-${TMPDIR:-/tmp}/awq-quality}
cargo build --release --quiet --bin awq --example rtn_grid --example kquant_grid
mkdir -p "$work"
requant=$work/smollm2-rtn32
[ -f "$requant/model.safetensors" ] || ./target/release/examples/rtn_grid "$src" "$requant" 32
kquant=$work/smollm2-kquant
[ -f "$kquant/model.safetensors" ] || ./target/release/examples/kquant_grid "$src" "$kquant"

methods=("$@")
[ ${#methods[@]} -gt 0 ] || methods=(awq gptq fast fast-sep fast-keep3 fast-gptq fast-gptq-sep fast-gptq-keep3 fast-gptq-sep-keep3)
flags() {
    local m=$1 fast=
    case $m in fast) m=awq fast=--fast ;; fast-*) m=${m#fast-} fast=--fast ;; esac
    case $m in
    rtn) echo "--no-search --no-clip --rounding rtn" ;;
    awq) echo "$fast" ;;
    noguard) echo "$fast --no-guard" ;;
    sep) echo "$fast --clip-sides separate" ;;
    keep3) echo "$fast --keep-fp16 3" ;;
    gptq) echo "$fast --rounding gptq" ;;
    gptq-sep) echo "$fast --rounding gptq --clip-sides separate" ;;
    gptq-keep3) echo "$fast --rounding gptq --keep-fp16 3" ;;
    gptq-sep-keep3) echo "$fast --rounding gptq --clip-sides separate --keep-fp16 3" ;;
    *) echo "unknown method $1" >&2; exit 2 ;;
    esac
}
ppl() {
    "$bin" eval -q --json --model "$1" --text "$data/wiki.valid.raw" --max-tokens 8192 |
        python3 -c 'import json,sys; print("%.4f" % json.load(sys.stdin)["perplexity"])'
}
printf '%-14s %-5s %-13s %9s %8s %8s %9s\n' model group method ppl gap% wall_s rss_MB
for case in "smollm2 64 $src" "smollm2 32 $src" "requant32 64 $requant" "kquant 64 $kquant"; do
    read -r name group model <<<"$case"
    fp=$(ppl "$model")
    printf '%-14s %-5s %-13s %9s %8s %8s %9s\n' "$name" "$group" fp16 "$fp" 100.0 - -
    rtn=
    for m in rtn "${methods[@]}"; do
        [ "$m" = rtn ] && [ -n "$rtn" ] && continue
        out=$work/$name-g$group-$m
        rm -rf "$out"
        # shellcheck disable=SC2046
        /usr/bin/time -f "%e %M" -o "$work/time" "$bin" quantize -q --model "$model" -o "$out" \
            --group "$group" --calib "$data/wiki.valid.calib.txt" --seqlen 512 --n-samples 1000 \
            --max-blocks 32 $(flags "$m") >/dev/null
        read -r wall rss <"$work/time"
        p=$(ppl "$out")
        [ "$m" = rtn ] && rtn=$p
        gap=$(python3 -c "print('%.1f' % (100 * ($rtn - $p) / ($rtn - $fp)))")
        printf '%-14s %-5s %-13s %9s %8s %8s %9s\n' "$name" "$group" "$m" "$p" "$gap" "$wall" "$((rss / 1024))"
    done
done

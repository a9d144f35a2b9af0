#!/usr/bin/env bash
# End-to-end quantize benchmark: prints wall time, the phase breakdown, the matmul work rate and
# peak RSS (awq measures and prints all of them; /usr/bin/time -v confirms RSS when present).
#
#   scripts/bench.sh smollm2 [awq quantize flags...]   # $AWQ_TEST_MODEL, group 64, 32 x 512 wikitext
#   scripts/bench.sh smollm2-2l [flags...]              # its first 2 layers, 32 x 512 (vs AutoAWQ)
#   scripts/bench.sh synth7b LAYERS [flags...]          # Llama-2-7B-shaped random model, 16 x 512
#   scripts/bench.sh synth-moe LAYERS [flags...]        # Qwen3-30B-A3B-shaped MoE, 16 x 512
#   scripts/bench.sh synth-dense LAYERS [flags...]      # its dense twin (same active parameters)
#   scripts/bench.sh synth-gemma3-4b LAYERS [flags...]  # Gemma 3 4B's wrapped text decoder, 16 x 512
#   scripts/bench.sh synth-deepseek-v3 LAYERS [flags...] # DeepSeek-V3's MoE layer, fp8 on disk, 16 x 512
#
# Extra flags are appended (e.g. --fast, --max-blocks 8). Threads: RAYON_NUM_THREADS.
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${1:?usage: scripts/bench.sh smollm2|smollm2-2l|synth7b|synth-moe|synth-dense|synth-gemma3-4b|synth-deepseek-v3 [LAYERS] [flags...]}
shift
data=data/wikitext-2-raw
# AWQ_BIN names a binary to measure instead of building this checkout's.
[ -n "${AWQ_BIN:-}" ] || cargo build --release --quiet --bin awq
case $kind in
smollm2)
    model=${AWQ_TEST_MODEL:?set AWQ_TEST_MODEL to the SmolLM2 test model}
    # 128 documents of wiki.valid.calib.txt give only 16 blocks; 1000 reach 32 x 512.
    args=(--group 64 --calib "$data/wiki.valid.calib.txt" --seqlen 512 --n-samples 1000 --max-blocks 32)
    ;;
smollm2-2l)
    # The side-by-side case of the performance issue: the first two decoder layers of SmolLM2
    # (their tensors copied into a smaller safetensors file; tokenizer files shared by symlink).
    src=${AWQ_TEST_MODEL:?set AWQ_TEST_MODEL to the SmolLM2 test model}
    model=${TMPDIR:-/tmp}/awq-smollm2-2l
    src=$(cd "$src" && pwd)
    # Rebuilt when it was cut from another model than $AWQ_TEST_MODEL.
    if [ ! -f "$model/model.safetensors" ] || [ "$(cat "$model/.source" 2>/dev/null)" != "$src" ]; then
        rm -rf "$model"
        mkdir -p "$model"
        for f in "$src"/*; do ln -sf "$(cd "$(dirname "$f")" && pwd)/$(basename "$f")" "$model/"; done
        rm -f "$model/config.json" "$model/model.safetensors"
        sed 's/"num_hidden_layers": *[0-9]*/"num_hidden_layers": 2/' "$src/config.json" >"$model/config.json"
        python3 - "$src/model.safetensors" "$model/model.safetensors" <<'PY'
import json, re, struct, sys
src, dst = sys.argv[1:]
with open(src, "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
    base = 8 + n
    keep = {k: v for k, v in header.items()
            if k != "__metadata__" and not (re.match(r"model\.layers\.(\d+)\.", k)
                                             and int(k.split(".")[2]) >= 2)}
    out, data, off = {}, [], 0
    for k, v in sorted(keep.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        a, b = v["data_offsets"]
        f.seek(base + a)
        data.append(f.read(b - a))
        out[k] = {**v, "data_offsets": [off, off + b - a]}
        off += b - a
text = json.dumps(out).encode()
text += b" " * (-len(text) % 8)
with open(dst, "wb") as g:
    g.write(struct.pack("<Q", len(text)) + text + b"".join(data))
PY
        echo "$src" >"$model/.source"
    fi
    args=(--group 64 --calib "$data/wiki.valid.calib.txt" --seqlen 512 --n-samples 1000 --max-blocks 32)
    ;;
synth7b)
    layers=${1:?LAYERS}
    shift
    model=${TMPDIR:-/tmp}/awq-synth7b-$layers
    if [ ! -f "$model/config.json" ]; then
        cargo run --release --quiet --example synth_model -- "$model" "$layers" \
            "${AWQ_TEST_MODEL:?set AWQ_TEST_MODEL (its tokenizer is reused)}"
    fi
    args=(--group 128 --calib "$data/wiki.valid.calib.txt" --seqlen 512 --max-blocks 16)
    ;;
synth-moe | synth-dense | synth-gemma3-4b | synth-deepseek-v3)
    layers=${1:?LAYERS}
    shift
    preset=${kind#synth-}
    case $kind in synth-moe | synth-dense) preset=qwen3-${kind#synth-} ;; esac
    model=${TMPDIR:-/tmp}/awq-$preset-$layers
    if [ ! -f "$model/config.json" ]; then
        cargo run --release --quiet --example synth_model -- "$model" "$layers" \
            "${AWQ_TEST_MODEL:?set AWQ_TEST_MODEL (its tokenizer is reused)}" "$preset"
    fi
    args=(--group 128 --calib "$data/wiki.valid.calib.txt" --seqlen 512 --max-blocks 16)
    ;;
*)
    echo "unknown benchmark $kind" >&2
    exit 2
    ;;
esac
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cmd=(${AWQ_BIN:-./target/release/awq} quantize --model "$model" -o "$out/q" -q "${args[@]}" "$@")
echo "+ ${cmd[*]}"
if [ -x /usr/bin/time ]; then
    /usr/bin/time -f "wall %e s, peak RSS %M KB (/usr/bin/time)" "${cmd[@]}"
else
    "${cmd[@]}"
fi

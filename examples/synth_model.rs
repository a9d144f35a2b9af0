//! Writes a random-weight checkpoint of a chosen depth for the memory and speed benchmarks of
//! `scripts/bench.sh`: Llama-2-7B-shaped (hidden 4096, intermediate 11008, 32 heads) by default,
//! or Qwen3-30B-A3B-shaped (`qwen3-moe`) and its dense twin (`qwen3-dense`), or Gemma 3 4B's
//! wrapped text decoder (`gemma3-4b`: the release's `text_config`, which leaves most fields to
//! the class defaults, plus a SigLIP-sized vision part that stays float), or DeepSeek-V3's MoE
//! layer (`deepseek-v3`: the release's dimensions, every layer MoE, linears stored as fp8 with
//! 128 × 128 block scales as the release ships them, and the release's 129 280-row embedding
//! and head). The tokenizer (and otherwise the vocabulary size) is copied from an existing
//! model directory. Safetensors shards plus an index, fp16 (or fp8).
//!
//! `cargo run --release --example synth_model -- OUT_DIR LAYERS TOKENIZER_DIR [PRESET [HIDDEN INTER HEADS]]`

use std::path::Path;

use awq::calib::SplitMix64;
use awq::io::writer::{write_file, OutTensor};
use rayon::prelude::*;

/// Weights uniform in ±`amp` (std ≈ 0.02 for amp 0.035), seeded per tensor.
fn random(n: usize, amp: f32, seed: u64) -> Vec<f32> {
    let mut v = vec![0f32; n];
    v.par_chunks_mut(1 << 16)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut rng = SplitMix64::new(seed.wrapping_mul(0x9E37_79B9) ^ c as u64);
            for x in chunk {
                let u = (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
                *x = (2.0 * u - 1.0) * amp;
            }
        });
    v
}

/// `config.json` of a preset: Llama-2-7B-shaped (`llama`, optionally with other
/// hidden/intermediate/heads), Qwen3-30B-A3B-shaped (`qwen3-moe`: 128 experts, top-8, expert
/// intermediate 768, 32 heads / 4 kv heads of 128) or its dense twin with the same active
/// parameters (`qwen3-dense`: intermediate 8 × 768 = 6144).
fn preset(name: &str, layers: usize, vocab: usize, dims: [usize; 3]) -> serde_json::Value {
    let [hidden, inter, heads] = dims;
    let mut c = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": heads, "vocab_size": vocab,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
        "tie_word_embeddings": false, "hidden_act": "silu", "torch_dtype": "float16"
    });
    let qwen3 = serde_json::json!({
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 2048,
        "intermediate_size": 6144, "num_attention_heads": 32, "num_key_value_heads": 4,
        "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0
    });
    let moe = serde_json::json!({
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_experts": 128,
        "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": true
    });
    if name == "deepseek-v3" {
        // deepseek-ai/DeepSeek-V3's config.json, with our depth, its vocabulary size (our
        // tokenizer's ids index the first rows) and no dense layers first (every layer is the
        // MoE layer measured).
        return serde_json::json!({
            "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
            "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
            "num_hidden_layers": layers, "num_attention_heads": 128, "num_key_value_heads": 128,
            "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
            "n_group": 8, "topk_group": 4, "first_k_dense_replace": 0, "norm_topk_prob": true,
            "routed_scaling_factor": 2.5, "q_lora_rank": 1536, "kv_lora_rank": 512,
            "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
            "vocab_size": vocab, "rms_norm_eps": 1e-06, "max_position_embeddings": 163840,
            "rope_theta": 10000, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
            "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                             "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                             "type": "yarn"},
            "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                                    "quant_method": "fp8", "weight_block_size": [128, 128]}
        });
    }
    if name == "gemma3-4b" {
        // google/gemma-3-4b-it's config.json, with our depth and vocabulary.
        return serde_json::json!({
            "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
            "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
                "model_type": "gemma3_text", "num_hidden_layers": layers,
                "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024,
                "vocab_size": vocab},
            "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                "model_type": "siglip_vision_model", "num_attention_heads": 16,
                "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": false},
            "mm_tokens_per_image": 256, "torch_dtype": "bfloat16"
        });
    }
    let overrides: Vec<&serde_json::Value> = match name {
        "llama" => vec![],
        "qwen3-dense" => vec![&qwen3],
        "qwen3-moe" => vec![&qwen3, &moe],
        other => {
            panic!("unknown preset {other} (llama, qwen3-dense, qwen3-moe, gemma3-4b, deepseek-v3)")
        }
    };
    for o in overrides {
        for (k, v) in o.as_object().unwrap() {
            c[k] = v.clone();
        }
    }
    c
}

/// `w: [rows, cols]` as DeepSeek-V3 stores it: float8_e4m3fn codes and a float32
/// `weight_scale_inv` per block (max |block| / 448).
fn fp8(name: String, [rows, cols]: [usize; 2], w: &[f32], block: [usize; 2]) -> [OutTensor; 2] {
    let [gr, gc] = awq::io::fp8::scale_shape([rows, cols], block);
    let mut scale = vec![0f32; gr * gc];
    for (r, row) in w.chunks_exact(cols).enumerate() {
        for (c, x) in row.iter().enumerate() {
            let s = &mut scale[(r / block[0]) * gc + c / block[1]];
            *s = s.max(x.abs() / 448.0);
        }
    }
    let codes: Vec<u8> = w
        .par_chunks(cols)
        .enumerate()
        .flat_map_iter(|(r, row)| {
            let scale = &scale;
            row.iter().enumerate().map(move |(c, x)| {
                let s = scale[(r / block[0]) * gc + c / block[1]];
                awq::io::fp8::f32_to_e4m3(if s > 0.0 { x / s } else { 0.0 })
            })
        })
        .collect();
    [
        OutTensor {
            name: name.clone(),
            dtype: safetensors::Dtype::F8_E4M3,
            shape: vec![rows, cols],
            data: codes,
        },
        OutTensor::f32_values(format!("{name}_scale_inv"), vec![gr, gc], &scale),
    ]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        eprintln!(
            "usage: synth_model OUT_DIR LAYERS TOKENIZER_DIR [llama [HIDDEN INTER HEADS] | qwen3-moe | qwen3-dense]"
        );
        std::process::exit(2);
    }
    let out = Path::new(&args[0]);
    let layers: usize = args[1].parse().expect("LAYERS");
    let tok_dir = Path::new(&args[2]);
    let kind = args.get(3).map_or("llama", |s| s.as_str());
    let num = |i: usize, d: usize| args.get(i).map_or(d, |s| s.parse().expect("number"));
    let dims = [num(4, 4096), num(5, 11008), num(6, 32)];
    std::fs::create_dir_all(out).unwrap();
    std::fs::copy(tok_dir.join("tokenizer.json"), out.join("tokenizer.json")).unwrap();
    let tok: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tok_dir.join("tokenizer.json")).unwrap()).unwrap();
    let mut vocab = tok["model"]["vocab"].as_object().map_or(32000, |v| v.len())
        + tok["added_tokens"].as_array().map_or(0, |a| a.len());
    if kind == "deepseek-v3" {
        // The release's 129 280 rows (the rows beyond the tokenizer's are never looked up), so
        // the embedding and head cost what they cost a real run.
        vocab = vocab.max(129_280);
    }
    let config = preset(kind, layers, vocab, dims);
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    // Every tensor name and shape comes from the spec, as the quantizer will read them.
    let spec = awq::model::load_spec(&out.join("config.json")).unwrap();
    let hidden = spec.hidden;

    let mut map = serde_json::Map::new();
    let mut shard = |name: &str, tensors: Vec<OutTensor>| {
        for t in &tensors {
            map.insert(t.name.clone(), name.into());
        }
        write_file(&out.join(name), &tensors).unwrap();
    };
    let ones = |n| vec![1f32; n];
    let mut seed = 1;
    let mut t = |name: String, shape: Vec<usize>| {
        seed += 1;
        OutTensor::f16(
            name,
            shape.clone(),
            &random(shape.iter().product(), 0.035, seed),
        )
    };
    let roots = &spec.roots;
    let mut head = vec![
        t(roots.embed(), vec![vocab, hidden]),
        OutTensor::f16(
            format!("{}.weight", roots.final_norm()),
            vec![hidden],
            &ones(hidden),
        ),
    ];
    if !spec.tied_embeddings {
        head.push(t(roots.head_weight(), vec![vocab, hidden]));
    }
    shard("model-head.safetensors", head);
    if spec.vision.is_some() {
        // One SigLIP-sized encoder layer's linears and the projector: copied, never quantized.
        let v = "vision_tower.vision_model";
        let mut ts = vec![t(
            "multi_modal_projector.mm_input_projection_weight".into(),
            vec![1152, hidden],
        )];
        for l in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            let name = format!("{v}.encoder.layers.0.self_attn.{l}.weight");
            ts.push(t(name, vec![1152, 1152]));
        }
        shard("model-vision.safetensors", ts);
    }
    // A shard holds at most this many bytes of linears (a DeepSeek-V3 layer is 11 GB in fp8).
    const SHARD_BYTES: usize = 2 << 30;
    for i in 0..layers {
        let p = roots.layer(i);
        let mut ts = Vec::new();
        let mut bytes = 0;
        let mut part = 0;
        for l in spec.linears() {
            let name = format!("{p}.{}.weight", l.name);
            let before = ts.len();
            match spec.fp8_block {
                Some(block) => {
                    // Seeds of their own, apart from `t`'s.
                    let seed = 1_000_000 + ts.len() as u64 + 1000 * (i * 100 + part) as u64;
                    let w = random(l.out * l.inp, 0.035, seed);
                    ts.extend(fp8(name, [l.out, l.inp], &w, block));
                }
                None => ts.push(t(name, vec![l.out, l.inp])),
            }
            bytes += ts[before..].iter().map(|t| t.data.len()).sum::<usize>();
            if bytes > SHARD_BYTES {
                shard(
                    &format!("model-layer-{i:03}-{part:02}.safetensors"),
                    std::mem::take(&mut ts),
                );
                (bytes, part) = (0, part + 1);
            }
        }
        for l in spec.router_linears() {
            ts.push(t(format!("{p}.{}.weight", l.name), vec![l.out, l.inp]));
        }
        for (name, width) in spec.layer_floats() {
            ts.push(OutTensor::f16(
                format!("{p}.{name}"),
                vec![width],
                &ones(width),
            ));
        }
        for (name, width) in spec.layer_verbatim() {
            ts.push(OutTensor::f32_values(
                format!("{p}.{name}"),
                vec![width],
                &vec![0.0; width],
            ));
        }
        shard(&format!("model-layer-{i:03}-{part:02}.safetensors"), ts);
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        out.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index).unwrap(),
    )
    .unwrap();
    eprintln!(
        "wrote {} ({kind}, {layers} layers, hidden {hidden}, vocab {vocab})",
        out.display()
    );
}

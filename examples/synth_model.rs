//! Writes a random-weight Llama checkpoint with the dimensions of Llama-2-7B (hidden 4096,
//! intermediate 11008, 32 heads) and a chosen depth, for the memory and speed benchmarks of
//! `scripts/bench.sh`. The tokenizer (and therefore the vocabulary size) is copied from an
//! existing model directory. One safetensors shard per layer plus an index, fp16.
//!
//! `cargo run --release --example synth_model -- OUT_DIR LAYERS TOKENIZER_DIR [HIDDEN INTER HEADS]`

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

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        eprintln!("usage: synth_model OUT_DIR LAYERS TOKENIZER_DIR [HIDDEN INTER HEADS]");
        std::process::exit(2);
    }
    let out = Path::new(&args[0]);
    let layers: usize = args[1].parse().expect("LAYERS");
    let tok_dir = Path::new(&args[2]);
    let num = |i: usize, d: usize| args.get(i).map_or(d, |s| s.parse().expect("number"));
    let (hidden, inter, heads) = (num(3, 4096), num(4, 11008), num(5, 32));
    std::fs::create_dir_all(out).unwrap();
    std::fs::copy(tok_dir.join("tokenizer.json"), out.join("tokenizer.json")).unwrap();
    let tok: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tok_dir.join("tokenizer.json")).unwrap()).unwrap();
    let vocab = tok["model"]["vocab"].as_object().map_or(32000, |v| v.len())
        + tok["added_tokens"].as_array().map_or(0, |a| a.len());
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": heads, "vocab_size": vocab,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
        "tie_word_embeddings": false, "hidden_act": "silu", "torch_dtype": "float16"
    });
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();

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
    let head = vec![
        t("model.embed_tokens.weight".into(), vec![vocab, hidden]),
        t("lm_head.weight".into(), vec![vocab, hidden]),
        OutTensor::f16("model.norm.weight".into(), vec![hidden], &ones(hidden)),
    ];
    shard("model-head.safetensors", head);
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        let mut ts = Vec::new();
        for (name, shape) in [
            ("self_attn.q_proj", [hidden, hidden]),
            ("self_attn.k_proj", [hidden, hidden]),
            ("self_attn.v_proj", [hidden, hidden]),
            ("self_attn.o_proj", [hidden, hidden]),
            ("mlp.gate_proj", [inter, hidden]),
            ("mlp.up_proj", [inter, hidden]),
            ("mlp.down_proj", [hidden, inter]),
        ] {
            ts.push(t(format!("{p}.{name}.weight"), shape.to_vec()));
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            ts.push(OutTensor::f16(
                format!("{p}.{norm}.weight"),
                vec![hidden],
                &ones(hidden),
            ));
        }
        shard(&format!("model-layer-{i:03}.safetensors"), ts);
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        out.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index).unwrap(),
    )
    .unwrap();
    eprintln!(
        "wrote {} ({layers} layers, hidden {hidden}, intermediate {inter}, vocab {vocab})",
        out.display()
    );
}

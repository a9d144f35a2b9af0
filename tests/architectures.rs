//! Every supported architecture on tiny random-weight models written by the test, checked
//! against the naive f64 reference in `common/tiny.rs` (no code shared with the crate):
//! biases, q/k norms, GQA, tied/untied heads, explicit head_dim, sliding window, sharded files,
//! f16/bf16/f32 storage.

mod common;

use awq::model::rope::Rope;
use awq::model::Model;
use common::tiny::{Store, Tiny};

fn check(t: Tiny) {
    let dir = tempfile::tempdir().unwrap();
    let w = t.write(dir.path());
    let ids: Vec<u32> = (0..12).map(|i| (i * 7 + 3) % t.vocab as u32).collect();
    let want = t.reference_logits(&w, &ids);

    let model = Model::open(dir.path()).unwrap();
    let spec = &model.spec;
    assert_eq!(spec.architecture, t.arch);
    let rope = Rope::new(spec, ids.len()).unwrap();
    let mut h = model.embed(&ids).unwrap();
    for i in 0..spec.layers {
        h = model
            .layer(i)
            .unwrap()
            .forward(spec, &rope, &h, ids.len(), false)
            .unwrap()
            .0;
    }
    let got = model
        .head()
        .unwrap()
        .logits(spec, &h)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let scale = want.iter().flatten().fold(0f64, |m, x| m.max(x.abs()));
    for (pos, (g, r)) in got.iter().zip(&want).enumerate() {
        for (a, b) in g.iter().zip(r) {
            assert!(
                ((*a as f64) - b).abs() <= 1e-4 * scale.max(1.0),
                "{} pos {pos}: {a} vs {b}",
                t.arch
            );
        }
    }
}

#[test]
fn llama_tied_f32() {
    check(Tiny::llama());
}

#[test]
fn llama_gqa_untied_bf16_sharded_with_bias() {
    check(Tiny {
        kv_heads: 2,
        tie: false,
        store: Store::BF16,
        shards: 3,
        qkv_bias: true,
        ..Tiny::llama()
    });
}

#[test]
fn mistral_f16_sliding_window() {
    check(Tiny {
        arch: "MistralForCausalLM",
        kv_heads: 1,
        store: Store::F16,
        sliding_window: Some(4),
        tie: false,
        ..Tiny::llama()
    });
}

#[test]
fn qwen2_qkv_bias_gqa() {
    check(Tiny {
        arch: "Qwen2ForCausalLM",
        kv_heads: 2,
        qkv_bias: true,
        ..Tiny::llama()
    });
}

#[test]
fn qwen3_qk_norm_explicit_head_dim_bf16() {
    check(Tiny {
        arch: "Qwen3ForCausalLM",
        kv_heads: 2,
        head_dim: 16, // != hidden / heads
        qk_norm: true,
        store: Store::BF16,
        tie: false,
        ..Tiny::llama()
    });
}

#[test]
fn batched_sequences_equal_single_runs() {
    let t = Tiny {
        kv_heads: 2,
        ..Tiny::llama()
    };
    let dir = tempfile::tempdir().unwrap();
    t.write(dir.path());
    let model = Model::open(dir.path()).unwrap();
    let spec = &model.spec;
    let rope = Rope::new(spec, 6).unwrap();
    let ids: Vec<u32> = (0..12).map(|i| (i * 5 + 1) % 64).collect();
    let layer = model.layer(0).unwrap();
    let both = layer
        .forward(spec, &rope, &model.embed(&ids).unwrap(), 6, false)
        .unwrap()
        .0;
    for s in 0..2 {
        let one = layer
            .forward(
                spec,
                &rope,
                &model.embed(&ids[s * 6..s * 6 + 6]).unwrap(),
                6,
                false,
            )
            .unwrap()
            .0;
        let a = both
            .narrow(0, s * 6, 6)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = one.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(common::max_abs_diff(&a, &b) < 1e-5);
    }
}

//! Micro-benchmarks of the quantizer's hot paths at SmolLM2-135M shapes (hidden 576,
//! intermediate 1536, group 64): RTN quantize, GEMM pack, one scale-grid step (naive forward
//! loss vs the Gram-matrix loss), the clip search, and one decoder layer forward.
//! `cargo bench --bench quant`; the end-to-end benchmark is `scripts/bench.sh`.

use awq::model::config::HfConfig;
use awq::model::layer::{LayerWeights, Linear};
use awq::model::rope::Rope;
use awq::quant::pack::{pack, Layout};
use awq::quant::{clip, reduce, rtn, search};
use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};

const HIDDEN: usize = 576;
const INTER: usize = 1536;
const GROUP: usize = 64;
const SEQLEN: usize = 512;
const TOKENS: usize = 2048;

fn randn(shape: (usize, usize), std: f64) -> Tensor {
    Tensor::randn(0f32, std as f32, shape, &Device::Cpu).unwrap()
}

fn linear(out: usize, inp: usize) -> Linear {
    Linear {
        weight: randn((out, inp), 0.02),
        bias: None,
    }
}

fn spec() -> awq::model::config::ModelSpec {
    let cfg: HfConfig = serde_json::from_value(serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": 1,
        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 2048
    }))
    .unwrap();
    awq::model::llama::spec(&cfg).unwrap()
}

fn layer(spec: &awq::model::config::ModelSpec) -> LayerWeights {
    let ones = |n| Tensor::ones(n, candle_core::DType::F32, &Device::Cpu).unwrap();
    LayerWeights {
        index: 0,
        norms: spec
            .layer_norms()
            .into_iter()
            .map(|(name, width)| {
                let norm = awq::model::layer::Norm {
                    weight: ones(width),
                    bias: None,
                };
                (name, norm)
            })
            .collect(),
        linears: spec
            .linears()
            .into_iter()
            .map(|l| (l.name, linear(l.out, l.inp)))
            .collect(),
        routers: Vec::new(),
        verbatim: Vec::new(),
        experts: None,
    }
}

fn benches(c: &mut Criterion) {
    let w = randn((INTER, HIDDEN), 0.02);
    let wv = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    c.bench_function("quantize_f16 1536x576 g64", |b| {
        b.iter(|| rtn::quantize_f16(&wv, INTER, HIDDEN, GROUP))
    });
    let q = rtn::quantize_f16(&wv, INTER, HIDDEN, GROUP);
    c.bench_function("pack gemm 1536x576 g64", |b| {
        b.iter(|| pack(&q, Layout::Gemm).unwrap())
    });

    // One grid step of a single-linear group (down_proj shape) over TOKENS tokens.
    let wd = randn((HIDDEN, INTER), 0.02);
    let x = randn((TOKENS, INTER), 1.0);
    let s: Vec<f32> = (0..INTER).map(|i| 0.5 + (i % 7) as f32 * 0.2).collect();
    let reference = x.matmul(&wd.t().unwrap()).unwrap();
    c.bench_function("grid step down_proj, forward loss, 2048 tokens", |b| {
        b.iter(|| {
            let cand = search::scaled_fake_quant(&wd, &s, GROUP).unwrap();
            reduce::mse(&reference, &x.matmul(&cand.t().unwrap()).unwrap()).unwrap()
        })
    });
    let gram = search::Gram::new(&x).unwrap();
    c.bench_function("grid step down_proj, Gram loss", |b| {
        b.iter(|| {
            let cand = search::scaled_fake_quant(&wd, &s, GROUP).unwrap();
            gram.loss(&wd, &cand).unwrap()
        })
    });

    let xs = clip::subsample(&randn((TOKENS, HIDDEN), 1.0)).unwrap();
    c.bench_function("clip search gate_proj 1536x576", |b| {
        b.iter(|| clip::search(&w, &xs, GROUP, clip::Cut::Symmetric).unwrap())
    });

    let spec = spec();
    let rope = Rope::new(&spec, SEQLEN).unwrap();
    let l = layer(&spec);
    let h = randn((TOKENS, HIDDEN), 1.0);
    let mut g = c.benchmark_group("decoder layer");
    g.sample_size(10);
    g.bench_function("forward 4x512 tokens with capture", |b| {
        b.iter(|| l.forward(&spec, &rope, &h, SEQLEN, true).unwrap())
    });
    g.bench_function("mlp candidate 4x512 tokens", |b| {
        let x = randn((TOKENS, HIDDEN), 1.0);
        b.iter(|| l.mlp(&spec, &x).unwrap())
    });
    g.finish();
    expert_benches(c);
}

/// One DeepSeek-V3 routed expert's finishing (hidden 7168, expert width 2048, group 128, the
/// 256 routed tokens an expert sees on average at 16 x 512 calibration tokens and top-8 of 256):
/// the pieces `scripts/bench.sh synth-deepseek-v3` spends its per-expert time in.
fn expert_benches(c: &mut Criterion) {
    const H: usize = 7168;
    const E: usize = 2048;
    const G: usize = 128;
    const T: usize = 256;
    let mut g = c.benchmark_group("deepseek-v3 expert");
    g.sample_size(10);
    let down = randn((H, E), 0.02);
    let x = randn((T, E), 1.0);
    let s: Vec<f32> = (0..E).map(|i| 0.5 + (i % 7) as f32 * 0.2).collect();
    g.bench_function("scaled_fake_quant down 7168x2048", |b| {
        b.iter(|| search::scaled_fake_quant(&down, &s, G).unwrap())
    });
    let reference = x.matmul(&down.t().unwrap()).unwrap();
    g.bench_function("down grid step, 256 tokens", |b| {
        b.iter(|| {
            let cand = search::scaled_fake_quant(&down, &s, G).unwrap();
            reduce::mse(&reference, &x.matmul(&cand.t().unwrap()).unwrap()).unwrap()
        })
    });
    let gate = randn((E, H), 0.02);
    let xg = randn((T, H), 1.0);
    g.bench_function("clip search gate 2048x7168, 256 tokens", |b| {
        b.iter(|| clip::search(&gate, &xg, G, clip::Cut::Symmetric).unwrap())
    });
    g.bench_function("clip search down 7168x2048, 256 tokens", |b| {
        b.iter(|| clip::search(&down, &x, G, clip::Cut::Symmetric).unwrap())
    });
    let wv = gate.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    g.bench_function("quantize_f16 + pack gate 2048x7168", |b| {
        b.iter(|| pack(&rtn::quantize_f16(&wv, E, H, G), Layout::Gemm).unwrap())
    });
    g.finish();
}

criterion_group!(quant, benches);
criterion_main!(quant);

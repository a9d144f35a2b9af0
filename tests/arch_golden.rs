//! Every family's forward against transformers' float32 forward on a tiny random model
//! (`../shared/golden/arch/<family>/`, copied into tests/fixtures/arch): every hidden state and
//! the logits within 1e-4 × max|ref| (golden.json's suggested tolerance), identical argmax.

mod common;

use awq::model::rope::Rope;
use awq::model::Model;
use common::*;

fn max_err(got: &candle_core::Tensor, want: &[f32]) -> (f32, f32) {
    let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(got.len(), want.len());
    (max_abs_diff(&got, want), max_abs(want))
}

fn check(family: &str) {
    let dir = fixture(&format!("arch/{family}"));
    let golden = std::fs::read(dir.join("golden.safetensors")).unwrap();
    let ids: Vec<u32> = read_i64(&golden, "input_ids")
        .iter()
        .map(|&i| i as u32)
        .collect();
    let model = Model::open(&dir).unwrap();
    let spec = &model.spec;
    let seq = 48;
    assert_eq!(ids.len(), 2 * seq);
    let rope = Rope::new(spec, seq).unwrap();
    let mut h = model.embed(&ids).unwrap();
    let check = |what: &str, t: &candle_core::Tensor, name: &str| {
        let (err, scale) = max_err(t, &read_f32(&golden, name).0);
        assert!(
            err <= 1e-4 * scale,
            "{family} {what}: max |diff| {err} vs max |ref| {scale}"
        );
        err / scale
    };
    let mut worst = check("embedding", &h, "hidden.0");
    for i in 0..spec.layers {
        h = model
            .layer(i)
            .unwrap()
            .forward(&spec.layer(i), &rope, &h, seq, false)
            .unwrap()
            .0;
        if i + 1 < spec.layers {
            worst = worst.max(check(
                &format!("layer {i}"),
                &h,
                &format!("hidden.{}", i + 1),
            ));
        }
    }
    let head = model.head().unwrap();
    let normed = head.norm.apply(spec, &h).unwrap();
    worst = worst.max(check(
        "final norm",
        &normed,
        &format!("hidden.{}", spec.layers),
    ));
    let logits = head.logits(spec, &h).unwrap();
    worst = worst.max(check("logits", &logits, "logits"));
    let (want, _) = read_f32(&golden, "logits");
    let vocab = spec.vocab;
    for (pos, row) in logits.to_vec2::<f32>().unwrap().iter().enumerate() {
        let argmax = |r: &[f32]| {
            r.iter()
                .enumerate()
                .fold(0, |b, (j, &x)| if x > r[b] { j } else { b })
        };
        assert_eq!(
            argmax(row),
            argmax(&want[pos * vocab..][..vocab]),
            "{family}: argmax at position {pos}"
        );
    }
    eprintln!("{family}: worst relative error {worst:.2e}");
}

family_tests!(check: llama, gemma, gemma2, gemma3, phi3, stablelm, starcoder2, cohere, granite,
    mixtral, qwen2_moe, qwen3_moe);

// DeepSeek-V3 (latent attention, grouped-sigmoid router, dense first layer), the same model
// stored as block-scaled fp8 (dequantized on load), and GLM-4.5.
family_tests!(check: deepseek_v3, deepseek_v3_fp8, glm4_moe);

// Vision-language wrappers: the text decoder's forward, in both weight layouts (transformers'
// module names, and the original Hub release's as `<family>_hub`).
family_tests!(check: gemma3_mm, gemma3_mm_hub, mistral3, mistral3_hub, qwen2_5_vl,
    qwen2_5_vl_hub, llava, llava_hub);

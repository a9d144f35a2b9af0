//! `--format compressed-tensors` against what the `compressed-tensors` package itself wrote
//! (`../shared/golden/compressed-tensors/llama-g32`, llm-compressor's AWQ of `arch/llama`,
//! copied into tests/fixtures): its packed tensors unpack and repack to the same bytes, and our
//! dequantization equals the package's. End to end, the same run written in both formats has
//! the same weights, so `awq eval` gives the same perplexity.

mod common;

use std::path::Path;

use assert_cmd::Command;
use awq::quant::pack::Packed;
use awq::quant::pack_quantized;
use common::*;

fn golden() -> std::path::PathBuf {
    fixture("compressed-tensors/llama-g32")
}

/// The quantized linears of the golden: `(module, [out, in])`.
fn linears(bytes: &[u8]) -> Vec<(String, [usize; 2])> {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let mut v: Vec<(String, [usize; 2])> = st
        .names()
        .iter()
        .filter_map(|n| n.strip_suffix(".weight_shape"))
        .map(|m| {
            let s = read_i64(bytes, &format!("{m}.weight_shape"));
            (m.to_string(), [s[0] as usize, s[1] as usize])
        })
        .collect();
    v.sort();
    v
}

#[test]
fn the_goldens_tensors_repack_to_the_same_bytes_and_dequantize_as_the_package_does() {
    let bytes = std::fs::read(golden().join("model.safetensors")).unwrap();
    let deq = std::fs::read(golden().join("dequantized.safetensors")).unwrap();
    let lin = linears(&bytes);
    assert_eq!(lin.len(), 14, "{lin:?}");
    for (m, [out, inp]) in lin {
        let [qw, qz, sc] = pack_quantized::shapes(out, inp, 32);
        let packed = Packed {
            qweight: read_i32(&bytes, &format!("{m}.weight_packed")),
            qweight_shape: qw,
            qzeros: read_i32(&bytes, &format!("{m}.weight_zero_point")),
            qzeros_shape: qz,
            scales: read_f16_bits(&bytes, &format!("{m}.weight_scale"))
                .into_iter()
                .map(half::f16::from_bits)
                .collect(),
            scales_shape: sc,
        };
        let q = pack_quantized::unpack(&packed, out, inp, 32).unwrap();
        assert_eq!(
            pack_quantized::pack(&q),
            packed,
            "{m}: repacked bytes differ"
        );
        // The package computes (q - z) · s in float16 (one rounding), then widens.
        let ours: Vec<f32> = q
            .dequantize()
            .into_iter()
            .map(|x| half::f16::from_f32(x).to_f32())
            .collect();
        let (want, shape) = read_f32(&deq, &format!("{m}.weight"));
        assert_eq!(shape, [out, inp]);
        assert_eq!(max_abs_diff(&ours, &want), 0.0, "{m}");
    }
}

fn awq(args: &[&str], paths: &[&Path]) -> std::process::Output {
    let mut c = Command::cargo_bin("awq").unwrap();
    c.args(args);
    for p in paths {
        c.arg(p);
    }
    c.output().unwrap()
}

fn ok(o: &std::process::Output) -> String {
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    text
}

#[test]
fn an_llm_compressor_checkpoint_reads_verifies_and_evaluates() {
    let text = ok(&awq(&["verify"], &[&golden()]));
    assert!(text.contains("vLLM compressed-tensors (Marlin)"), "{text}");
    let ppl = perplexity(&golden(), 128, 1024);
    assert!(ppl.is_finite() && ppl > 1.0, "{ppl}");
}

/// `awq quantize -q --calib wiki.valid.calib.txt --model MODEL -o OUT` plus `extra`, which
/// must succeed.
fn quantize(model: &Path, out: &Path, extra: &[&str]) {
    let mut c = Command::cargo_bin("awq").unwrap();
    c.args(["quantize", "-q", "--calib"])
        .arg(data("wikitext-2-raw/wiki.valid.calib.txt"))
        .arg("--model")
        .arg(model)
        .arg("-o")
        .arg(out)
        .args(extra);
    ok(&c.output().unwrap());
}

/// The `quantization_config` of the checkpoint in `dir`.
fn quantization_config(dir: &Path) -> serde_json::Value {
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    cfg["quantization_config"].clone()
}

/// Both formats from one set of options: the same weights, so the same perplexity; the
/// compressed-tensors config is the package's, and `verify` passes.
fn same_run_in_both_formats(model: &Path, extra: &[&str], max_tokens: usize) -> (f64, f64) {
    let tmp = tempfile::tempdir().unwrap();
    let run =
        |out: &Path, format: &str| quantize(model, out, &[&["--format", format], extra].concat());
    let (a, c) = (tmp.path().join("awq"), tmp.path().join("ct"));
    run(&a, "awq");
    run(&c, "compressed-tensors");
    let q = &quantization_config(&c);
    assert_eq!(q["quant_method"], "compressed-tensors");
    assert_eq!(q["format"], "pack-quantized");
    assert_eq!(q["config_groups"]["group_0"]["weights"]["symmetric"], false);
    assert!(!c.join("quant_config.json").exists());
    ok(&awq(&["verify"], &[&c]));
    (
        perplexity(&a, 128, max_tokens),
        perplexity(&c, 128, max_tokens),
    )
}

#[test]
fn the_same_run_in_both_formats_evaluates_the_same() {
    let extra = [
        "--group",
        "32",
        "--seqlen",
        "128",
        "--n-samples",
        "32",
        "--split-long",
    ];
    let (a, c) = same_run_in_both_formats(&fixture("arch/llama"), &extra, 1024);
    assert!(
        (a - c).abs() <= 1e-6 * a,
        "awq {a} vs compressed-tensors {c}"
    );
}

/// The real test model, round-to-nearest (the packing of every real linear; the search is the
/// same code in both formats and is covered on the tiny model above).
#[test]
fn the_test_model_in_both_formats_evaluates_the_same() {
    let Some(model) = test_model("the_test_model_in_both_formats_evaluates_the_same") else {
        return;
    };
    let extra = [
        "--group",
        "64",
        "--no-search",
        "--no-clip",
        "--rounding",
        "rtn",
        "--n-samples",
        "8",
        "--seqlen",
        "128",
        "--split-long",
    ];
    let (a, c) = same_run_in_both_formats(&model, &extra, 2048);
    eprintln!("SmolLM2 RTN g64: awq {a}, compressed-tensors {c}");
    assert!(
        (a - c).abs() <= 1e-6 * a,
        "awq {a} vs compressed-tensors {c}"
    );
}

/// MoE: vLLM loads asymmetric experts since its June 2026 change (a note says so);
/// transformers drops their zero points (refused for --for transformers).
#[test]
fn a_moe_model_in_compressed_tensors_verifies_for_vllm_with_a_note() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ct");
    let extra = [
        "--fast",
        "--format",
        "compressed-tensors",
        "--group",
        "32",
        "--seqlen",
        "64",
        "--n-samples",
        "16",
        "--split-long",
    ];
    quantize(&fixture("arch/qwen3_moe"), &out, &extra);
    let q = quantization_config(&out);
    let ignore = q["ignore"].as_array().unwrap();
    assert!(
        ignore.contains(&serde_json::json!(r"re:.*\.mlp\.gate$")),
        "{ignore:?}"
    );
    let text = ok(&awq(&["verify"], &[&out]));
    assert!(text.contains("vllm-project/vllm#44025"), "{text}");
    let t = awq(&["verify", "--for", "transformers"], &[&out]);
    assert_eq!(t.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&t.stdout).contains("#47430"));
}

#[test]
fn version_is_refused_with_compressed_tensors() {
    let o = Command::cargo_bin("awq")
        .unwrap()
        .args([
            "quantize",
            "--format",
            "compressed-tensors",
            "--version",
            "gemv",
        ])
        .args(["--model", "x", "-o", "y"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("drop --version"));
}

/// Regression: `--keep-fp16` linears are listed in `ignore` one by one; compressed-tensors
/// loaders expand vLLM's merged modules (`qkv_proj`) into them, so `verify` must not ask for the
/// merged name as it does for AutoAWQ's list.
#[test]
fn keep_fp16_in_compressed_tensors_lists_linears_that_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ct");
    let extra = [
        "--fast",
        "--format",
        "compressed-tensors",
        "--group",
        "32",
        "--seqlen",
        "128",
        "--n-samples",
        "16",
        "--split-long",
        "--keep-fp16",
        "15%",
    ];
    quantize(&fixture("arch/llama"), &out, &extra);
    let q = quantization_config(&out);
    let ignore = q["ignore"].as_array().unwrap();
    assert!(ignore.len() > 1, "nothing kept: {ignore:?}");
    for target in ["vllm", "transformers"] {
        ok(&awq(&["verify", "--for", target], &[&out]));
    }
}

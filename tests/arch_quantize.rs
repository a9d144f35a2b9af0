//! Every family end to end on its tiny golden model: `awq quantize` (group 32) → `awq verify` →
//! `awq eval`, and the output's logits are closer to the fp model's than plain
//! round-to-nearest's (mean KL divergence over held-out text: the first tokens of
//! `wiki.valid.raw`, which calibration never reads).

mod common;

use std::path::Path;

use assert_cmd::Command;
use awq::model::rope::Rope;
use awq::model::Model;
use common::*;

const SEQ: usize = 64;
const HELD_OUT_TOKENS: usize = 2048;

fn awq(args: &[&str], model: &Path) -> std::process::Output {
    Command::cargo_bin("awq")
        .unwrap()
        .args(args)
        .arg(model)
        .output()
        .unwrap()
}

fn quantize(model: &Path, out: &Path, extra: &[&str]) {
    let calib = data("wikitext-2-raw/wiki.valid.calib.txt");
    let o = Command::cargo_bin("awq")
        .unwrap()
        .args([
            "quantize",
            "-q",
            "--group",
            "32",
            "--seqlen",
            "128",
            "--n-samples",
            "64",
        ])
        .args(["--split-long", "--calib"])
        .arg(&calib)
        .arg("--model")
        .arg(model)
        .arg("-o")
        .arg(out)
        .args(extra)
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Log-probabilities `[tokens, vocab]` of `model` over `ids` (windows of [`SEQ`]).
fn log_probs(dir: &Path, ids: &[u32]) -> Vec<Vec<f64>> {
    let model = Model::open(dir).unwrap();
    let spec = &model.spec;
    let rope = Rope::new(spec, SEQ).unwrap();
    let mut h = model.embed(ids).unwrap();
    for i in 0..spec.layers {
        h = model
            .layer(i)
            .unwrap()
            .forward(spec, &rope, &h, SEQ, false)
            .unwrap()
            .0;
    }
    let logits = model.head().unwrap().logits(spec, &h).unwrap();
    logits
        .to_vec2::<f32>()
        .unwrap()
        .into_iter()
        .map(|row| {
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            row.iter().map(|&x| x as f64 - lse).collect()
        })
        .collect()
}

/// Mean KL(p ‖ q) per token.
fn kl(p: &[Vec<f64>], q: &[Vec<f64>]) -> f64 {
    let sum: f64 = p
        .iter()
        .zip(q)
        .map(|(lp, lq)| {
            lp.iter()
                .zip(lq)
                .map(|(a, b)| a.exp() * (a - b))
                .sum::<f64>()
        })
        .sum();
    sum / p.len() as f64
}

fn check(family: &str) {
    let model = fixture(&format!("arch/{family}"));
    let tmp = tempfile::tempdir().unwrap();
    let (out, rtn) = (tmp.path().join("awq"), tmp.path().join("rtn"));
    let start = std::time::Instant::now();
    quantize(&model, &out, &[]);
    let seconds = start.elapsed().as_secs_f64();
    quantize(&model, &rtn, &["--no-search", "--no-clip"]);

    let verify = awq(&["verify", "--json"], &out);
    let report: serde_json::Value = serde_json::from_slice(&verify.stdout).unwrap();
    assert_eq!(report["ok"], true, "{family}: {report:#}");
    assert_eq!(report["violations"], serde_json::json!([]), "{family}");

    let text = data("wikitext-2-raw/wiki.valid.raw");
    let eval = Command::cargo_bin("awq")
        .unwrap()
        .args([
            "eval",
            "-q",
            "--json",
            "--seqlen",
            "64",
            "--max-tokens",
            "1024",
            "--text",
        ])
        .arg(&text)
        .arg("--model")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(
        eval.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&eval.stderr)
    );
    let ppl: serde_json::Value = serde_json::from_slice(&eval.stdout).unwrap();
    assert!(ppl["perplexity"].as_f64().unwrap().is_finite(), "{family}");

    let tok = awq::tokenize::load(&model).unwrap();
    let raw = std::fs::read_to_string(&text).unwrap();
    let ids = awq::tokenize::encode(&tok, &raw[..40_000], false).unwrap();
    assert!(
        ids.len() >= HELD_OUT_TOKENS,
        "{family}: {} tokens",
        ids.len()
    );
    let ids = &ids[..HELD_OUT_TOKENS];
    let fp = log_probs(&model, ids);
    let (kl_awq, kl_rtn) = (
        kl(&fp, &log_probs(&out, ids)),
        kl(&fp, &log_probs(&rtn, ids)),
    );
    eprintln!("{family}: KL to fp: awq {kl_awq:.3e}, rtn {kl_rtn:.3e} ({:.1} % lower); quantize {seconds:.2} s",
        100.0 * (1.0 - kl_awq / kl_rtn));
    assert!(kl_awq < kl_rtn, "{family}: awq {kl_awq} vs rtn {kl_rtn}");
}

#[test]
fn llama() {
    check("llama");
}

#[test]
fn gemma() {
    check("gemma");
}

#[test]
fn gemma2() {
    check("gemma2");
}

#[test]
fn gemma3() {
    check("gemma3");
}

#[test]
fn phi3() {
    check("phi3");
}

#[test]
fn stablelm() {
    check("stablelm");
}

#[test]
fn starcoder2() {
    check("starcoder2");
}

#[test]
fn cohere() {
    check("cohere");
}

#[test]
fn granite() {
    check("granite");
}

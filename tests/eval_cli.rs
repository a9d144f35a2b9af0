//! `awq eval` on the real test model: the golden perplexity protocol end to end.

mod common;

use assert_cmd::Command;
use common::*;

#[test]
fn eval_reproduces_golden_perplexity() {
    let Some(dir) = test_model("eval_reproduces_golden_perplexity") else {
        return;
    };
    let text = data("wikitext-2-raw/wiki.valid.raw");

    // Token ids: the first 8192 equal the golden ones.
    let tok = awq::tokenize::load(&dir).unwrap();
    let ids = awq::tokenize::encode(&tok, &std::fs::read_to_string(&text).unwrap(), false).unwrap();
    assert_eq!(ids.len(), 266_981);
    let golden = std::fs::read(fixture("ppl-tokens.safetensors")).unwrap();
    let want: Vec<u32> = read_i64(&golden, "input_ids")
        .iter()
        .map(|&i| i as u32)
        .collect();
    assert_eq!(&ids[..8192], &want[..]);

    let out = Command::cargo_bin("awq")
        .unwrap()
        .args(["eval", "--model"])
        .arg(&dir)
        .arg("--text")
        .arg(&text)
        .args(["--max-tokens", "8192", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        stdout.lines().count(),
        1,
        "--json prints one object: {stdout}"
    );
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let ppl = json["perplexity"].as_f64().unwrap();
    let golden_ppl = 16.683040046726376;
    // Golden README: |diff| <= 1e-3 for a float32 forward (the issue asks for 0.5 %).
    assert!(
        (ppl - golden_ppl).abs() <= 1e-3,
        "perplexity {ppl} vs golden {golden_ppl}"
    );
    assert_eq!(json["predicted"], 8188);
    assert_eq!(json["windows"], 4);
}

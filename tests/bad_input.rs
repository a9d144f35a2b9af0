//! Bad input to `awq eval` gives a clear error naming the file or tensor and exit code 3.

mod common;

use std::path::Path;

use assert_cmd::Command;
use common::tiny::{words, Tiny};

/// Runs `awq eval` on `model` and returns (exit code, stderr).
fn eval(model: &Path, text: &str, seqlen: usize) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let text_path = dir.path().join("text.txt");
    std::fs::write(&text_path, text).unwrap();
    let out = Command::cargo_bin("awq")
        .unwrap()
        .args(["eval", "--model"])
        .arg(model)
        .arg("--text")
        .arg(&text_path)
        .args(["--seqlen", &seqlen.to_string(), "-q"])
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn tiny_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    Tiny::llama().write(dir.path());
    dir
}

fn assert_input_error(code: i32, stderr: &str, needles: &[&str]) {
    assert_eq!(code, 3, "stderr: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "expected {n:?} in: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn good_tiny_model_evaluates() {
    let dir = tiny_dir();
    let (code, err) = eval(dir.path(), &words(40, 64, 3), 8);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn missing_model_dir() {
    let (code, err) = eval(Path::new("/nonexistent/model-dir"), "w1 w2", 2);
    assert_input_error(code, &err, &["/nonexistent/model-dir", "does not exist"]);
}

#[test]
fn missing_config() {
    let dir = tiny_dir();
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let (code, err) = eval(dir.path(), &words(40, 64, 3), 8);
    assert_input_error(code, &err, &["config.json"]);
}

#[test]
fn config_not_json() {
    let dir = tiny_dir();
    std::fs::write(dir.path().join("config.json"), "{ not json").unwrap();
    let (code, err) = eval(dir.path(), &words(40, 64, 3), 8);
    assert_input_error(code, &err, &["config.json", "not valid JSON"]);
}

#[test]
fn config_missing_key() {
    let dir = tiny_dir();
    let mut cfg = Tiny::llama().config_json();
    cfg.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let (code, err) = eval(dir.path(), &words(40, 64, 3), 8);
    assert_input_error(code, &err, &["config.json", "hidden_size"]);
}

#[test]
fn unknown_architecture_lists_supported() {
    let dir = tiny_dir();
    let mut cfg = Tiny::llama().config_json();
    cfg["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let (code, err) = eval(dir.path(), &words(40, 64, 3), 8);
    assert_input_error(
        code,
        &err,
        &["GPT2LMHeadModel", "LlamaForCausalLM", "Qwen3ForCausalLM"],
    );
}

#[test]
fn missing_tokenizer() {
    let dir = tiny_dir();
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let (code, err) = eval(dir.path(), &words(40, 64, 3), 8);
    assert_input_error(code, &err, &["tokenizer.json"]);
}

#[test]
fn missing_weights() {
    let dir = tiny_dir();
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let (code, err) = eval(dir.path(), &words(40, 64, 3), 8);
    assert_input_error(code, &err, &["model.safetensors"]);
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tiny::llama();
    t.write(dir.path());
    // Rewrite the file without one tensor.
    let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != "model.layers.1.mlp.up_proj.weight")
        .collect();
    safetensors::serialize_to_file(kept, None, &dir.path().join("model.safetensors")).unwrap();
    let (code, err) = eval(dir.path(), &words(40, 64, 3), 8);
    assert_input_error(
        code,
        &err,
        &["model.layers.1.mlp.up_proj.weight", "missing"],
    );
}

#[test]
fn wrong_shape_is_named() {
    let dir = tiny_dir();
    let mut cfg = Tiny::llama().config_json();
    cfg["intermediate_size"] = serde_json::json!(96);
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let (code, err) = eval(dir.path(), &words(40, 64, 3), 8);
    assert_input_error(
        code,
        &err,
        &[
            "model.layers.0.mlp.gate_proj.weight",
            "[64, 32]",
            "[96, 32]",
        ],
    );
}

#[test]
fn truncated_weights_file() {
    let dir = tiny_dir();
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let (code, err) = eval(dir.path(), &words(40, 64, 3), 8);
    assert_input_error(
        code,
        &err,
        &["model.safetensors", "not a valid safetensors file"],
    );
}

#[test]
fn text_shorter_than_one_window() {
    let dir = tiny_dir();
    let (code, err) = eval(dir.path(), &words(5, 64, 3), 8);
    assert_input_error(code, &err, &["5 tokens", "fewer than one window of 8"]);
}

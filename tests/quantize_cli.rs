//! `awq quantize` on tiny random models: refusals with the right exit codes and nothing at the
//! output path, and a GEMV/GEMM round trip through `awq eval`.

mod common;

use std::path::Path;

use assert_cmd::Command;
use common::tiny::{words, Tiny};

fn setup(t: &Tiny) -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    t.write(&tmp.path().join("model"));
    let calib = tmp.path().join("calib.txt");
    let docs: Vec<String> = (0..40).map(|i| words(12, t.vocab, i)).collect();
    std::fs::write(&calib, docs.join("\n\n")).unwrap();
    (tmp, calib)
}

fn quantize(dir: &Path, calib: &Path, out: &Path, extra: &[&str]) -> (i32, String) {
    let o = Command::cargo_bin("awq")
        .unwrap()
        .args(["quantize", "-q", "--seqlen", "16", "--model"])
        .arg(dir.join("model"))
        .arg("--calib")
        .arg(calib)
        .arg("-o")
        .arg(out)
        .args(extra)
        .output()
        .unwrap();
    (
        o.status.code().unwrap(),
        String::from_utf8(o.stderr).unwrap(),
    )
}

#[test]
fn quantized_tiny_models_reload_in_eval() {
    for (t, version) in [
        (Tiny::llama64(), "gemm"),
        (
            Tiny {
                arch: "Qwen2ForCausalLM",
                hidden: 64,
                inter: 128,
                head_dim: 16,
                kv_heads: 2,
                qkv_bias: true,
                tie: false,
                ..Tiny::llama()
            },
            "gemv",
        ),
        (
            Tiny {
                arch: "Qwen3ForCausalLM",
                hidden: 64,
                inter: 128,
                head_dim: 16,
                kv_heads: 2,
                qk_norm: true,
                ..Tiny::llama()
            },
            "gemm",
        ),
    ] {
        let (tmp, calib) = setup(&t);
        let out = tmp.path().join("out");
        let (code, err) = quantize(
            tmp.path(),
            &calib,
            &out,
            &["--group", "32", "--version", version],
        );
        assert_eq!(code, 0, "{}: {err}", t.arch);
        let text = tmp.path().join("eval.txt");
        std::fs::write(&text, words(64, t.vocab, 99)).unwrap();
        let o = Command::cargo_bin("awq")
            .unwrap()
            .args(["eval", "-q", "--json", "--seqlen", "16", "--model"])
            .arg(&out)
            .arg("--text")
            .arg(&text)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{}: {}",
            t.arch,
            String::from_utf8_lossy(&o.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert!(v["perplexity"].as_f64().unwrap().is_finite());
        if !t.tie {
            let st_bytes = std::fs::read(out.join("model.safetensors")).unwrap();
            let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
            assert!(
                st.tensor("lm_head.weight").is_ok(),
                "untied lm_head is written"
            );
            if t.qkv_bias {
                assert!(st.tensor("model.layers.0.self_attn.q_proj.bias").is_ok());
            }
        }
    }
}

#[test]
fn group_not_dividing_names_the_tensor_and_suggests_groups() {
    let (tmp, calib) = setup(&Tiny::llama());
    let out = tmp.path().join("out");
    let (code, err) = quantize(tmp.path(), &calib, &out, &["--group", "24"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("model.layers.0.self_attn.q_proj.weight") && err.contains("--group 32"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn only_4_bit_is_packable() {
    let (tmp, calib) = setup(&Tiny::llama());
    let out = tmp.path().join("out");
    let (code, err) = quantize(tmp.path(), &calib, &out, &["--group", "32", "--w-bit", "3"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--w-bit 3"), "{err}");
    assert!(!out.exists());
}

#[test]
fn existing_output_needs_force() {
    let (tmp, calib) = setup(&Tiny::llama());
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep"), "x").unwrap();
    let (code, err) = quantize(tmp.path(), &calib, &out, &["--group", "32"]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("--force"), "{err}");
    assert!(out.join("keep").exists());
    // --force replaces only what awq wrote: someone's file is refused and kept.
    let (code, err) = quantize(tmp.path(), &calib, &out, &["--group", "32", "--force"]);
    assert_eq!(code, 4, "{err}");
    assert!(
        err.contains("--force replaces only") && out.join("keep").exists(),
        "{err}"
    );
    std::fs::remove_file(out.join("keep")).unwrap();
    for _ in 0..2 {
        // An empty directory, then our own earlier output.
        let (code, err) = quantize(tmp.path(), &calib, &out, &["--group", "32", "--force"]);
        assert_eq!(code, 0, "{err}");
        assert!(out.join("model.safetensors").exists());
    }
}

#[test]
fn too_little_calibration_leaves_nothing() {
    let (tmp, _) = setup(&Tiny::llama());
    let calib = tmp.path().join("short.txt");
    std::fs::write(&calib, "w1 w2 w3").unwrap();
    let out = tmp.path().join("out");
    let (code, err) = quantize(tmp.path(), &calib, &out, &["--group", "32"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("fewer than one block"), "{err}");
    assert!(!out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("staging"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn sharded_output_has_an_index() {
    let (tmp, calib) = setup(&Tiny::llama());
    let out = tmp.path().join("out");
    let (code, err) = quantize(
        tmp.path(),
        &calib,
        &out,
        &["--group", "32", "--shard-size", "5KB"],
    );
    assert_eq!(code, 0, "{err}");
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    assert!(index["metadata"]["total_size"].as_u64().unwrap() > 0);
    let files: std::collections::BTreeSet<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(files.len() > 1);
    for f in files {
        assert!(out.join(f).is_file(), "{f}");
    }
    // And it reads back.
    awq::model::Model::open(&out).unwrap();
}

//! Hub ids resolve from a cache laid out like huggingface_hub's, honouring HF_HUB_CACHE /
//! HF_HOME and HF_HUB_OFFLINE; a miss names the missing file. (Downloads need the network and
//! are not tested here.)

mod common;

use std::path::Path;

use assert_cmd::Command;
use common::tiny::{words, Tiny};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn lay_out_cache(hub: &Path) {
    let repo = hub.join("models--acme--tiny-llama");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
    Tiny::llama().write(&repo.join("snapshots").join(COMMIT));
}

fn eval_hub(envs: &[(&str, &Path)], revision: Option<&str>) -> std::process::Output {
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("t.txt");
    std::fs::write(&text, words(32, 64, 1)).unwrap();
    let mut cmd = Command::cargo_bin("awq").unwrap();
    cmd.env_remove("HF_HOME")
        .env_remove("HF_HUB_CACHE")
        .env("HF_HUB_OFFLINE", "1");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.args([
        "eval",
        "--model",
        "acme/tiny-llama",
        "--seqlen",
        "8",
        "-q",
        "--text",
    ])
    .arg(&text);
    if let Some(r) = revision {
        cmd.args(["--revision", r]);
    }
    cmd.output().unwrap()
}

#[test]
fn resolves_from_hf_hub_cache() {
    let hub = tempfile::tempdir().unwrap();
    lay_out_cache(hub.path());
    let out = eval_hub(&[("HF_HUB_CACHE", hub.path())], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A commit hash as revision works too.
    let out = eval_hub(&[("HF_HUB_CACHE", hub.path())], Some(COMMIT));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn resolves_from_hf_home() {
    let home = tempfile::tempdir().unwrap();
    lay_out_cache(&home.path().join("hub"));
    let out = eval_hub(&[("HF_HOME", home.path())], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn offline_miss_names_the_missing_file() {
    let hub = tempfile::tempdir().unwrap();
    lay_out_cache(hub.path());
    let snap = hub
        .path()
        .join("models--acme--tiny-llama/snapshots")
        .join(COMMIT);
    std::fs::remove_file(snap.join("tokenizer.json")).unwrap();
    let out = eval_hub(&[("HF_HUB_CACHE", hub.path())], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("tokenizer.json") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );

    let out = eval_hub(&[("HF_HUB_CACHE", hub.path())], Some("v2"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("no snapshot for revision v2"), "{err}");
}

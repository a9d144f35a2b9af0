//! A tiny model, a calibration file and an output path in one temporary directory, and the
//! `awq quantize` run on them that most CLI tests start from.

use std::path::{Path, PathBuf};

use assert_cmd::Command;

use super::tiny::{words, Tiny};

/// A model (Tiny::llama64), 40 calibration documents and an output path, in `tmp`.
pub struct Case {
    pub tmp: tempfile::TempDir,
    pub model: PathBuf,
    pub calib: PathBuf,
    pub out: PathBuf,
}

pub fn case() -> Case {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    Tiny::llama64().write(&model);
    let calib = tmp.path().join("calib.txt");
    let docs: Vec<String> = (0..40).map(|i| words(12, 64, i)).collect();
    std::fs::write(&calib, docs.join("\n\n")).unwrap();
    let out = tmp.path().join("out");
    Case {
        tmp,
        model,
        calib,
        out,
    }
}

pub fn quantize(c: &Case, extra: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::cargo_bin("awq").unwrap();
    cmd.args(["quantize", "-q", "--model"])
        .arg(&c.model)
        .arg("--calib")
        .arg(&c.calib)
        .arg("-o")
        .arg(&c.out)
        .args(extra);
    for (flag, default) in [("--group", "32"), ("--seqlen", "16")] {
        if !extra.contains(&flag) {
            cmd.args([flag, default]);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let o = cmd.output().unwrap();
    (
        o.status.code().unwrap(),
        String::from_utf8(o.stderr).unwrap(),
    )
}

/// Nothing at the output path and no staging directory beside it.
pub fn assert_nothing_written(c: &Case) {
    assert!(!c.out.exists(), "output exists");
    let staging: Vec<_> = std::fs::read_dir(c.tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("awq-staging"))
        .collect();
    assert!(staging.is_empty(), "staging left: {staging:?}");
}

/// `awq quantize` arguments for a tiny model (`--seqlen 16 --group 32`) writing to `out`.
pub fn quantize_args<'a>(model: &'a Path, calib: &'a Path, out: &'a Path) -> Vec<&'a str> {
    vec![
        "quantize",
        "--seqlen",
        "16",
        "--group",
        "32",
        "--model",
        model.to_str().unwrap(),
        "--calib",
        calib.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]
}

/// A finished `awq` run: its exit code and both streams.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Runs `cmd` to completion.
    pub fn of(cmd: &mut Command) -> Self {
        let o = cmd.output().unwrap();
        Run {
            code: o.status.code().unwrap(),
            stdout: String::from_utf8(o.stdout).unwrap(),
            stderr: String::from_utf8(o.stderr).unwrap(),
        }
    }
}

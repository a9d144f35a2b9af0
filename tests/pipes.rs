//! A closed stdout (`awq inspect DIR | head -1`) ends every command quietly with exit 0, as
//! ripgrep and cargo do, instead of a `println!` panic (exit 101). Each command runs twice: its
//! stdout read for one byte and then closed (`| head -c1`), and closed before it writes at all
//! (every write fails with EPIPE).

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::tiny::{words, Tiny};

struct Fixture {
    tmp: tempfile::TempDir,
    /// fp model with enough layers that `inspect` prints more than a pipe holds (64 KiB).
    deep: PathBuf,
    model: PathBuf,
    calib: PathBuf,
    text: PathBuf,
    awq: PathBuf,
}

fn awq_bin() -> Command {
    Command::new(assert_cmd::cargo::cargo_bin("awq"))
}

fn quantize_args<'a>(f: &'a Fixture, out: &'a Path) -> Vec<&'a str> {
    common::case::quantize_args(&f.model, &f.calib, out)
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let t = Tiny::llama64();
    let model = tmp.path().join("model");
    t.write(&model);
    let deep = tmp.path().join("deep");
    Tiny {
        layers: 400,
        ..Tiny::llama()
    }
    .write(&deep);
    let calib = tmp.path().join("calib.txt");
    let docs: Vec<String> = (0..40).map(|i| words(12, t.vocab, i)).collect();
    std::fs::write(&calib, docs.join("\n\n")).unwrap();
    let text = tmp.path().join("eval.txt");
    std::fs::write(&text, words(64, t.vocab, 7)).unwrap();
    let f = Fixture {
        awq: tmp.path().join("awq"),
        tmp,
        deep,
        model,
        calib,
        text,
    };
    let mut args = quantize_args(&f, &f.awq);
    args.push("-q");
    let o = awq_bin().args(&args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    f
}

#[derive(Clone, Copy, Debug)]
enum Close {
    /// Read one byte, then close (`| head -c1`).
    AfterOneByte,
    /// Close before the command writes anything.
    Immediately,
}

/// Runs `awq args` with stdout closed as `close` says; (exit code, stderr).
fn piped(args: &[&str], close: Close) -> (Option<i32>, String) {
    let mut child = awq_bin()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    if let Close::AfterOneByte = close {
        let mut byte = [0u8; 1];
        let _ = stdout.read(&mut byte).unwrap();
    }
    drop(stdout);
    let o = child.wait_with_output().unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn every_command_ends_quietly_when_stdout_closes() {
    let f = fixture();
    let (model, deep, awq) = (
        f.model.to_str().unwrap(),
        f.deep.to_str().unwrap(),
        f.awq.to_str().unwrap(),
    );
    let text = f.text.to_str().unwrap();
    let planned = f.tmp.path().join("planned");
    let mut dry = quantize_args(&f, &planned);
    dry.push("--dry-run");
    let mut dry_json = dry.clone();
    dry_json.push("--json");
    let commands: Vec<Vec<&str>> = vec![
        vec![
            "eval", "--model", model, "--text", text, "--seqlen", "16", "-q",
        ],
        vec![
            "eval", "--model", model, "--text", text, "--seqlen", "16", "-q", "--json",
        ],
        dry,
        dry_json,
        vec!["inspect", deep],
        vec!["inspect", "--json", deep],
        vec!["verify", awq],
        vec!["verify", "--json", awq],
        vec!["completions", "bash"],
        vec!["--help"],
        vec!["verify", "--help"],
    ];
    for args in &commands {
        for close in [Close::AfterOneByte, Close::Immediately] {
            let (code, stderr) = piped(args, close);
            assert_eq!(
                code,
                Some(0),
                "awq {} ({close:?}): {stderr}",
                args.join(" ")
            );
            assert!(
                !stderr.contains("panicked"),
                "awq {} ({close:?}): {stderr}",
                args.join(" ")
            );
            assert!(
                !stderr.contains("error"),
                "awq {} ({close:?}): {stderr}",
                args.join(" ")
            );
        }
    }
    assert!(!planned.exists());
}

/// `awq quantize --json | head -1`: the events are progress, the checkpoint is the result —
/// the run goes on without them, publishes the checkpoint and exits 0 (a failure would still
/// give its own exit code).
#[test]
fn quantize_json_finishes_when_stdout_closes() {
    let f = fixture();
    for close in [Close::AfterOneByte, Close::Immediately] {
        let out = f.tmp.path().join(format!("out-{close:?}"));
        let mut args = quantize_args(&f, &out);
        args.extend(["--json", "-q"]);
        let (code, stderr) = piped(&args, close);
        assert_eq!(code, Some(0), "{close:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{close:?}: {stderr}");
        assert!(
            out.join("model.safetensors").is_file(),
            "{close:?}: not published"
        );
    }
}

/// `set -o pipefail; awq verify DIR | head -1` must not pass a checkpoint that fails: verify's
/// exit status is its verdict, whoever reads (or stops reading) its report.
#[test]
fn verify_keeps_its_failing_verdict_when_stdout_closes() {
    let f = fixture();
    let broken = f.tmp.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    for entry in std::fs::read_dir(&f.awq).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, broken.join(path.file_name().unwrap())).unwrap();
    }
    // A group size the packed tensors do not have.
    let config = broken.join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let group = v["quantization_config"]["group_size"].as_u64().unwrap();
    v["quantization_config"]["group_size"] = (group * 2).into();
    std::fs::write(&config, v.to_string()).unwrap();
    let dir = broken.to_str().unwrap();
    for args in [vec!["verify", dir], vec!["verify", "--json", dir]] {
        for close in [Close::AfterOneByte, Close::Immediately] {
            let (code, stderr) = piped(&args, close);
            assert_eq!(
                code,
                Some(5),
                "awq {} ({close:?}): {stderr}",
                args.join(" ")
            );
            assert!(!stderr.contains("panicked"), "{stderr}");
        }
    }
}

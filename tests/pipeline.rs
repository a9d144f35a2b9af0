//! What a shell pipeline trips over, one kind of failure a test, on tiny random models: a full
//! disk, a stale owner, a restored model cache, a failed quality gate, a file for `--model`,
//! unsupported weight formats, network failures, a pre-created `-o`, `--skip-existing`, the
//! card's names and the progress a log shows.

mod common;

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use common::case::{assert_nothing_written, case, quantize, quantize_args, Case, Run};
use common::tiny::words;

fn awq(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::cargo_bin("awq").unwrap();
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Run::of(&mut cmd)
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every file under `dir` with its bytes, sorted by name.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).unwrap())
        })
        .collect();
    out.sort();
    out
}

/// The staging directory beside the case's output.
fn staging(c: &Case) -> PathBuf {
    c.tmp.path().join(".out.awq-staging")
}

/// The report's bytes without its timings (the rest of an output is deterministic).
fn without_timings(mut files: Vec<(String, Vec<u8>)>) -> Vec<(String, Vec<u8>)> {
    files.retain(|(n, _)| n != "quantization_report.json" && n != "README.md");
    files
}

/// A disk that fills up after the first layer keeps that layer, as SIGINT does, and says how to
/// continue; the rerun continues from it — from a copied, touched model directory, as a CI cache
/// restore gives it — to the same bytes as a run that was never stopped.
#[test]
fn a_full_disk_keeps_finished_layers_and_a_restored_model_resumes() {
    let c = case();
    // Past the fingerprint and layer 0 (its part and record, about 35 000 bytes), within layer
    // 1's part (28 000 bytes).
    let (code, err) = quantize(&c, &[], &[("AWQ_INJECT_ENOSPC_AFTER", "50000")]);
    eprintln!("disk full → {code}: {}", err.trim());
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(
        err.contains("finished layer(s) are kept in") && err.contains("rerun the same command"),
        "{err}"
    );
    assert!(err.contains("nothing was written there"), "{err}");
    assert!(!c.out.exists());
    let parts = staging(&c).join(".parts");
    assert!(parts.join("layer-00000.json").is_file(), "layer 0 lost");

    // The model restored elsewhere with new modification times: same contents, so it resumes.
    let restored = c.tmp.path().join("restored");
    std::fs::create_dir(&restored).unwrap();
    for (name, bytes) in files(&c.model) {
        std::fs::write(restored.join(name), bytes).unwrap();
    }
    let mut args = quantize_args(&restored, &c.calib, &c.out);
    args.insert(1, "--json");
    let r = awq(&args, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("resuming the interrupted run"),
        "{}",
        r.stdout
    );

    let fresh = case();
    let (code, err) = quantize(&fresh, &[], &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        without_timings(files(&c.out)),
        without_timings(files(&fresh.out))
    );
}

/// An older output at `-o` survives a run that dies of a full disk, and the message does not
/// claim the output path is empty.
#[test]
fn a_full_disk_never_touches_an_existing_output() {
    let c = case();
    assert_eq!(quantize(&c, &[], &[]).0, 0);
    let before = files(&c.out);
    let (code, err) = quantize(
        &c,
        &["--force", "--no-clip"],
        &[("AWQ_INJECT_ENOSPC_AFTER", "100")],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("what was there is unchanged"), "{err}");
    assert!(!err.contains("nothing is left"), "{err}");
    assert_eq!(files(&c.out), before);
}

/// Free space is measured before layer 1 against the output estimate (twice it: the parts and
/// the shards coexist) — in the dry run too — and a run that cannot fit is refused with the
/// numbers, nothing written.
#[test]
fn free_space_is_checked_before_layer_one_and_in_the_dry_run() {
    let c = case();
    for dry in [false, true] {
        let extra: &[&str] = if dry { &["--dry-run"] } else { &[] };
        let (code, err) = quantize(&c, extra, &[("AWQ_INJECT_FREE_BYTES", "1000")]);
        eprintln!("no space (dry run {dry}) → {code}: {}", err.trim());
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains("not enough free space") && err.contains("only 0.0 MB is free"),
            "{err}"
        );
        assert!(err.contains("twice the estimated output size"), "{err}");
        assert_nothing_written(&c);
    }
}

/// The dry run checks that the output location can be written.
#[test]
fn the_dry_run_checks_writability() {
    let c = case();
    let mut args = quantize_args(&c.model, &c.calib, Path::new("/proc/awq-out"));
    args.push("--dry-run");
    let r = awq(&args, &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("is not writable"), "{}", r.stderr);
}

/// A recorded owner pid that a live process reuses (another container sharing the volume)
/// does not block the output: only the lock of a running owner does. A killed run's staging
/// with such a pid is resumed or, with `--force`, replaced.
#[test]
fn a_stale_owner_pid_matching_a_live_process_does_not_block() {
    let c = case();
    let staging = staging(&c);
    std::fs::create_dir_all(staging.join(".parts")).unwrap();
    std::fs::write(staging.join("fingerprint.json"), r#"{"tool": "old"}"#).unwrap();
    std::fs::write(staging.join(".parts/layer-00000.json"), "{}").unwrap();
    // pid 1 always runs; this test's own pid runs too.
    for pid in [1, std::process::id()] {
        std::fs::write(staging.join("owner.pid"), format!("{pid} elsewhere")).unwrap();
        let (code, err) = quantize(&c, &[], &[]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("holds an interrupted run"), "{err}");
        assert!(!err.contains("another awq process"), "{err}");
    }
    let (code, err) = quantize(&c, &["--force"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(c.out.join("model.safetensors").is_file());
}

/// A failed quality gate publishes nothing at `-o` (an older output there is left alone): the
/// checkpoint is kept as `OUT.rejected`, named in the message and the JSON, and `verify` says
/// the gate failed rather than that the checkpoint is broken.
#[test]
fn a_failed_quality_gate_publishes_only_beside_the_output() {
    let c = case();
    let text = c.tmp.path().join("eval.txt");
    std::fs::write(&text, words(200, 64, 7)).unwrap();
    let gate = ["--eval-text", path(&text), "--eval-max-tokens", "160"];
    // This model's perplexity rises when quantized (deterministically): 0 % fails.
    let mut failing = gate.to_vec();
    failing.extend(["--max-ppl-increase", "0%", "--json"]);
    let rejected = c.tmp.path().join("out.rejected");
    for older in [false, true] {
        if older {
            assert_eq!(quantize(&c, &[], &[]).0, 0);
        }
        let before = c.out.exists().then(|| files(&c.out));
        let mut args = quantize_args(&c.model, &c.calib, &c.out);
        args.extend(&failing);
        if older {
            args.push("--force");
        }
        let r = awq(&args, &[]);
        eprintln!(
            "gate fails (older output {older}) → {}: {}",
            r.code,
            r.stderr.trim()
        );
        assert_eq!(r.code, 5, "{}", r.stderr);
        assert!(
            r.stderr.contains("quality gate failed")
                && r.stderr
                    .contains(&format!("kept for inspection at {}", rejected.display())),
            "{}",
            r.stderr
        );
        assert_eq!(c.out.exists().then(|| files(&c.out)), before, "-o touched");
        assert!(rejected.join("model.safetensors").is_file());
        let events: Vec<serde_json::Value> = r
            .stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let error = events.iter().find(|e| e["event"] == "error").unwrap();
        assert_eq!(error["exit_code"], 5);
        assert_eq!(error["rejected_output"], path(&rejected));
        let done = events.iter().find(|e| e["event"] == "done").unwrap();
        assert_eq!(done["output"], path(&rejected));

        let v = awq(&["verify", path(&rejected)], &[]);
        assert_eq!(v.code, 5, "{}", v.stdout);
        assert!(v.stdout.contains("QUALITY GATE FAILED"), "{}", v.stdout);
        assert!(
            v.stdout
                .trim_end()
                .ends_with("FAILED: quality gate failed (not for shipping)"),
            "{}",
            v.stdout
        );
        assert!(!v.stdout.contains("broken"), "{}", v.stdout);
    }
    // A gate that passes publishes at -o as before, and the stale OUT.rejected goes.
    let mut args = quantize_args(&c.model, &c.calib, &c.out);
    args.extend(&gate);
    args.extend(["--max-ppl-increase", "100000%", "--force"]);
    assert_eq!(awq(&args, &[]).code, 0);
    assert!(!rejected.exists());
}

/// A path that exists is never a Hub id: a weight file given as `--model` is refused saying
/// what it is and what `--model` wants, with no network.
#[test]
fn an_existing_file_as_model_is_not_a_hub_id() {
    let c = case();
    let gguf = c.tmp.path().join("x.gguf");
    std::fs::write(&gguf, b"GGUF").unwrap();
    let st = c.model.join("model.safetensors");
    // `model/model.safetensors` looks like `org/name`: relative, from the case directory.
    let mut cmd = Command::cargo_bin("awq").unwrap();
    cmd.current_dir(c.tmp.path())
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .args(["eval", "--model", "model/model.safetensors", "--text"])
        .arg(&c.calib);
    let r = Run::of(&mut cmd);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("is a safetensors weight file, not a model directory")
            && r.stderr.contains("perhaps model"),
        "{}",
        r.stderr
    );
    for (file, needle) in [(&gguf, "a GGUF file"), (&st, "safetensors weight file")] {
        let mut args = quantize_args(&c.model, &c.calib, &c.out);
        args[6] = path(file);
        let r = awq(&args, &[("HF_ENDPOINT", "http://127.0.0.1:9")]);
        assert_eq!(r.code, 3, "{}", r.stderr);
        assert!(r.stderr.contains(needle), "{}", r.stderr);
        assert!(!r.stderr.contains("download"), "{}", r.stderr);
    }
}

/// GGUF-only and PyTorch-only directories and a missing tokenizer.json are named, with how to
/// convert them.
#[test]
fn unsupported_weight_formats_and_a_missing_tokenizer_say_how_to_convert() {
    let c = case();
    let tok = std::fs::read(c.model.join("tokenizer.json")).unwrap();
    let gguf = c.tmp.path().join("gguf");
    std::fs::create_dir(&gguf).unwrap();
    std::fs::write(gguf.join("model-Q4_K_M.gguf"), b"GGUF").unwrap();
    let torch = c.tmp.path().join("torch");
    std::fs::create_dir(&torch).unwrap();
    std::fs::copy(c.model.join("config.json"), torch.join("config.json")).unwrap();
    std::fs::write(torch.join("tokenizer.json"), &tok).unwrap();
    std::fs::write(torch.join("pytorch_model.bin"), b"PK").unwrap();
    let no_tok = c.tmp.path().join("notok");
    std::fs::create_dir(&no_tok).unwrap();
    for (name, bytes) in files(&c.model) {
        if name != "tokenizer.json" {
            std::fs::write(no_tok.join(name), bytes).unwrap();
        }
    }
    std::fs::write(no_tok.join("tokenizer.model"), b"spm").unwrap();
    let mistral = c.tmp.path().join("mistral");
    std::fs::create_dir(&mistral).unwrap();
    std::fs::copy(c.model.join("config.json"), mistral.join("config.json")).unwrap();
    std::fs::copy(
        c.model.join("model.safetensors"),
        mistral.join("consolidated.safetensors"),
    )
    .unwrap();
    for (dir, needles) in [
        (
            &mistral,
            &["consolidated.safetensors", "not a transformers checkpoint"][..],
        ),
        (
            &gguf,
            &["GGUF weights (model-Q4_K_M.gguf)", "gguf_file="][..],
        ),
        (
            &torch,
            &["PyTorch weights (pytorch_model.bin)", "save_pretrained"][..],
        ),
        (
            &no_tok,
            &[
                "tokenizer.json is missing (only tokenizer.model",
                "AutoTokenizer",
            ][..],
        ),
    ] {
        let r = awq(&quantize_args(dir, &c.calib, &c.tmp.path().join("o")), &[]);
        eprintln!("{} → {}: {}", dir.display(), r.code, r.stderr.trim());
        assert_eq!(r.code, 3, "{}", r.stderr);
        for n in needles {
            assert!(r.stderr.contains(n), "{n:?} not in {}", r.stderr);
        }
    }
}

/// Network and Hub failures exit 6 (a job may retry them); "no such model" stays an input
/// error (3).
#[test]
fn network_failures_have_their_own_exit_code() {
    let c = case();
    let hub = c.tmp.path().join("hub");
    let fetch = |endpoint: &str| {
        let mut cmd = Command::cargo_bin("awq").unwrap();
        cmd.env("HF_HUB_CACHE", &hub)
            .env("HF_HUB_OFFLINE", "0")
            .env("HF_ENDPOINT", endpoint)
            .args(["eval", "--model", "acme/tiny", "--text"])
            .arg(&c.calib);
        Run::of(&mut cmd)
    };
    for (endpoint, code, needle) in [
        ("http://127.0.0.1:9".to_string(), 6, "retrying may help"),
        (
            common::fake_hub(4, |_| (503, "{}".into())),
            6,
            "retrying may help",
        ),
        (
            common::fake_hub(4, |_| (429, "{}".into())),
            6,
            "retrying may help",
        ),
        (common::fake_hub(4, |_| (404, "{}".into())), 3, "HTTP 404"),
        // A GGUF repository: no config.json, its listing names the GGUF file.
        (
            common::fake_hub(4, |path| {
                if path.starts_with("/api/models/") {
                    let body = r#"{"sha": "0", "siblings": [{"rfilename": "tiny-Q4_K_M.gguf"}]}"#;
                    (200, body.to_string())
                } else {
                    (404, "{}".into())
                }
            }),
            3,
            "is a GGUF repository (e.g. tiny-Q4_K_M.gguf)",
        ),
    ] {
        let r = fetch(&endpoint);
        eprintln!("{endpoint} → {}: {}", r.code, r.stderr.trim());
        assert_eq!(r.code, code, "{}", r.stderr);
        assert!(r.stderr.contains(needle), "{}", r.stderr);
    }
}

/// A pre-created empty `-o` (the `mktemp -d` pattern) is accepted without `--force`, and
/// missing parents are created.
#[test]
fn a_precreated_empty_output_and_missing_parents_are_accepted() {
    let c = case();
    std::fs::create_dir(&c.out).unwrap();
    assert_eq!(quantize(&c, &[], &[]).0, 0);
    assert!(c.out.join("model.safetensors").is_file());
    let deep = c.tmp.path().join("a/b/c/out");
    let r = awq(&quantize_args(&c.model, &c.calib, &deep), &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(deep.join("model.safetensors").is_file());
}

/// `--skip-existing` exits 0 without work when `-o` holds this run's checkpoint, and refuses
/// (exit 4, naming the difference) one of other settings.
#[test]
fn skip_existing_does_nothing_for_the_same_fingerprint() {
    let c = case();
    assert_eq!(quantize(&c, &[], &[]).0, 0);
    let before = files(&c.out);
    let mut args = quantize_args(&c.model, &c.calib, &c.out);
    args.extend(["--skip-existing", "--json"]);
    let r = awq(&args, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let done: serde_json::Value = serde_json::from_str(r.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(done["event"], "done");
    assert_eq!(done["skipped"], true);
    assert_eq!(files(&c.out), before);
    let (code, err) = quantize(&c, &["--skip-existing"], &[]);
    assert_eq!(code, 0, "{err}");
    let (code, err) = quantize(&c, &["--skip-existing", "--no-clip"], &[]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("options.clip (was true, now false)"), "{err}");
    assert_eq!(files(&c.out), before);
}

/// `--name` and `--base-model` set the card's title and `base_model`.
#[test]
fn the_card_takes_name_and_base_model() {
    let c = case();
    let (code, err) = quantize(
        &c,
        &["--name", "Tiny Chat", "--base-model", "acme/tiny-chat"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let card = std::fs::read_to_string(c.out.join("README.md")).unwrap();
    assert!(card.contains("base_model: acme/tiny-chat\n"), "{card}");
    // The title is the name given, as given.
    assert!(card.contains("\n# Tiny Chat\n"), "{card}");
}

/// Plain progress lines (a log) carry an ETA until the last layer; the dry run prints its time
/// estimate.
#[test]
fn progress_lines_carry_an_eta_and_the_dry_run_a_time_estimate() {
    let c = case();
    let r = awq(&quantize_args(&c.model, &c.calib, &c.out), &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let layers: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("[awq] layer "))
        .collect();
    assert_eq!(layers.len(), 2, "{}", r.stderr);
    assert!(layers[0].contains("  ETA "), "{}", layers[0]);
    assert!(!layers[1].contains("ETA"), "{}", layers[1]);
    let dry = c.tmp.path().join("dry");
    let mut args = quantize_args(&c.model, &c.calib, &dry);
    args.push("--dry-run");
    let r = awq(&args, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("time         about "), "{}", r.stdout);
}

/// `awq eval` says "1 window", and a text shorter than a window gets the fix that works.
#[test]
fn eval_wording_and_a_too_short_text() {
    let c = case();
    let text = c.tmp.path().join("short.txt");
    std::fs::write(&text, words(40, 64, 3)).unwrap();
    let eval = |extra: &[&str]| {
        let mut args = vec!["eval", "--model", path(&c.model), "--text", path(&text)];
        args.extend_from_slice(extra);
        awq(&args, &[])
    };
    let r = eval(&["--seqlen", "16", "--max-tokens", "16"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("(1 window of 16)"), "{}", r.stdout);
    let r = eval(&[]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("fewer than one window of 2048; pass --seqlen"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("larger --max-tokens"), "{}", r.stderr);
    let r = eval(&["--seqlen", "16", "--max-tokens", "8"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(
        r.stderr.contains("pass --max-tokens 16 or more"),
        "{}",
        r.stderr
    );
}

/// A `rope_scaling` that transformers refuses is refused before any work, naming the field.
#[test]
fn rope_scaling_that_transformers_refuses_is_an_input_error() {
    let c = case();
    let cfg_path = c.model.join("config.json");
    let original: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    for (rs, needle) in [
        (serde_json::json!({"factor": 8.0}), "no \"rope_type\""),
        (
            serde_json::json!({"rope_type": "llama3", "factor": 8.0}),
            "needs \"low_freq_factor\"",
        ),
        (
            serde_json::json!({"type": "linear", "factor": "2.0"}),
            "rope_scaling.factor is \"2.0\", not a number",
        ),
        (serde_json::json!({"rope_type": "yarn"}), "needs \"factor\""),
        (
            serde_json::json!(null),
            "rope_theta is \"10000\", not a number",
        ),
    ] {
        let mut cfg = original.clone();
        if rs.is_null() {
            cfg["rope_theta"] = "10000".into();
        }
        cfg["rope_scaling"] = rs;
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        let (code, err) = quantize(&c, &["--dry-run"], &[]);
        eprintln!("rope_scaling → {code}: {}", err.trim());
        assert_eq!(code, 3, "{err}");
        assert!(err.contains("config.json") && err.contains(needle), "{err}");
    }
}

/// On a terminal the bar starts with the plan line (not `layer 0/0 (ETA 0s)`), and each
/// layer's ratios are printed above it. `script` (util-linux) gives awq the terminal.
#[test]
fn a_terminal_shows_the_plan_first_and_each_layers_ratios() {
    let has_script = std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_script {
        eprintln!("skipped: no `script` (util-linux) to run awq on a terminal");
        return;
    }
    let c = case();
    let bin = assert_cmd::cargo::cargo_bin("awq");
    let cmdline = format!(
        "{} {}",
        bin.display(),
        quantize_args(&c.model, &c.calib, &c.out).join(" ")
    );
    let o = std::process::Command::new("script")
        .args(["-qec", &cmdline, "/dev/null"])
        .env("TERM", "xterm")
        .env_remove("NO_COLOR")
        .output()
        .unwrap();
    let screen = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{screen}");
    let plan = screen
        .find("plan: 2 layers of LlamaForCausalLM")
        .expect("plan line");
    let layer = screen.find("layer 1/2 ").expect("layer line");
    assert!(plan < layer, "{screen}");
    assert!(screen.contains("qkv r="), "{screen}");
    assert!(!screen.contains("layer 0/0"), "{screen}");
}

/// A disk that fills up after the shards are assembled (while the report, the last file, is
/// written) still keeps every finished layer, and the rerun continues from them.
#[test]
fn a_full_disk_at_the_very_end_keeps_every_layer() {
    let c = case();
    let run = |limit: u64| {
        let _ = std::fs::remove_dir_all(staging(&c));
        quantize(&c, &[], &[("AWQ_INJECT_ENOSPC_AFTER", &limit.to_string())])
    };
    // The largest limit that still fails fails on the last write (the report, ~8 KB).
    let (mut lo, mut hi) = (0u64, 4_000_000u64);
    assert_eq!(run(hi).0, 0);
    std::fs::remove_dir_all(&c.out).unwrap();
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if run(mid).0 == 0 {
            std::fs::remove_dir_all(&c.out).unwrap();
            hi = mid;
        } else {
            lo = mid;
        }
    }
    // The report's size varies by a few bytes (its timings): stay well inside its window.
    let (code, err) = run(lo - 1000);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("quantization_report.json"), "{err}");
    assert!(err.contains("2 finished layer(s) are kept"), "{err}");
    assert!(!c.out.exists());
    let (code, err) = quantize(&c, &["-v"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(c.out.join("model.safetensors").is_file());
}

/// `d/nosuch` where `d/` is a local directory is a mistyped path (exit 3), never a Hub id
/// retried as a network failure.
#[test]
fn a_mistyped_local_path_is_not_a_hub_id() {
    let c = case();
    let mut cmd = Command::cargo_bin("awq").unwrap();
    cmd.current_dir(c.tmp.path())
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .args(["eval", "--model", "model/nosuch", "--text"])
        .arg(&c.calib);
    let r = Run::of(&mut cmd);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(
        r.stderr.contains("model is a local directory"),
        "{}",
        r.stderr
    );
}

/// A download from a Hub that never answers ends on SIGTERM at once (exit 130): nothing is
/// staged yet, and the network read never reaches the cooperative check.
#[test]
fn sigterm_ends_a_stalled_download() {
    let c = case();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    // Accepts and never answers (held until the test ends); gives up after 20 s.
    listener.set_nonblocking(true).unwrap();
    let held = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            match listener.accept() {
                Ok((s, _)) => return Ok(s),
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                Err(e) => return Err(e),
            }
        }
    });
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("awq"))
        .env("HF_ENDPOINT", &endpoint)
        .env("HF_HUB_CACHE", c.tmp.path().join("hub"))
        .env("HF_HUB_OFFLINE", "0")
        .args(["eval", "--model", "acme/stalled", "--text"])
        .arg(&c.calib)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _stream = held.join().unwrap().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert_eq!(status.code(), Some(130));
            break;
        }
        if start.elapsed().as_secs() > 20 {
            child.kill().unwrap();
            panic!("SIGTERM did not end the download");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A pre-created `-o` keeps its permissions (`mktemp -d` makes it 0700); a dry run says what
/// it would remove instead of claiming it did.
#[test]
fn a_precreated_output_keeps_its_mode_and_the_dry_run_says_would() {
    use std::os::unix::fs::PermissionsExt;
    let c = case();
    std::fs::create_dir(&c.out).unwrap();
    std::fs::set_permissions(&c.out, std::fs::Permissions::from_mode(0o700)).unwrap();
    assert_eq!(quantize(&c, &[], &[]).0, 0);
    let mode = std::fs::metadata(&c.out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    let other = c.tmp.path().join("other");
    let staging = c.tmp.path().join(".other.awq-staging");
    std::fs::create_dir(&staging).unwrap();
    let mut args = quantize_args(&c.model, &c.calib, &other);
    args.extend(["--dry-run", "--json"]);
    let r = awq(&args, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let first: serde_json::Value = serde_json::from_str(r.stdout.lines().next().unwrap()).unwrap();
    assert_eq!(first["event"], "start", "{}", r.stdout);
    assert!(r.stdout.contains("would remove"), "{}", r.stdout);
    assert!(staging.is_dir());
}

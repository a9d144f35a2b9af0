//! `awq quantize` never leaves a half-written artifact: every bad input gets its message and exit
//! code with nothing at the output path (tiny random models); SIGINT exits 130 and cleans up;
//! a SIGKILLed run resumes to the same bytes; output does not depend on the thread count
//! (the last three on the real test model).

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};

use assert_cmd::Command;
use common::case::{assert_nothing_written, case, quantize, Case};
use common::tiny::{words, Tiny};
use common::{edit_header, poke_f32, rewrite_safetensors};

#[test]
fn bad_inputs_each_get_a_message_an_exit_code_and_no_output() {
    type Setup = Box<dyn Fn(&Case) -> Vec<String>>;
    let st = |c: &Case| c.model.join("model.safetensors");
    let cases: Vec<(&str, Setup, i32, &[&str])> = vec![
        (
            "missing model dir",
            Box::new(|c| {
                std::fs::remove_dir_all(&c.model).unwrap();
                vec![]
            }),
            3,
            &["does not exist"],
        ),
        (
            "config.json missing",
            Box::new(|c| {
                std::fs::remove_file(c.model.join("config.json")).unwrap();
                vec![]
            }),
            3,
            &["config.json"],
        ),
        (
            "config.json not JSON",
            Box::new(|c| {
                std::fs::write(c.model.join("config.json"), "{ not json").unwrap();
                vec![]
            }),
            3,
            &["config.json", "not valid JSON"],
        ),
        (
            "config.json missing keys",
            Box::new(|c| {
                std::fs::write(
                    c.model.join("config.json"),
                    r#"{"architectures": ["LlamaForCausalLM"]}"#,
                )
                .unwrap();
                vec![]
            }),
            3,
            &["config.json", "hidden_size"],
        ),
        (
            "tokenizer missing",
            Box::new(|c| {
                std::fs::remove_file(c.model.join("tokenizer.json")).unwrap();
                vec![]
            }),
            3,
            &["tokenizer.json"],
        ),
        (
            "tokenizer invalid",
            Box::new(|c| {
                std::fs::write(c.model.join("tokenizer.json"), "{}").unwrap();
                vec![]
            }),
            3,
            &["tokenizer.json", "not a valid tokenizer"],
        ),
        (
            "safetensors truncated",
            Box::new(move |c| {
                rewrite_safetensors(&st(c), |b| b.truncate(b.len() - 100));
                vec![]
            }),
            3,
            &["model.safetensors"],
        ),
        (
            "header length absurd",
            Box::new(move |c| {
                rewrite_safetensors(&st(c), |b| {
                    b[..8].copy_from_slice(&(1u64 << 60).to_le_bytes())
                });
                vec![]
            }),
            3,
            &["model.safetensors"],
        ),
        (
            "header not JSON",
            Box::new(move |c| {
                rewrite_safetensors(&st(c), |b| b[8] = b'#');
                vec![]
            }),
            3,
            &["model.safetensors"],
        ),
        (
            "offsets outside the file",
            Box::new(move |c| {
                edit_header(&st(c), |h| {
                    h["model.norm.weight"]["data_offsets"][1] = 1u64.into()
                });
                vec![]
            }),
            3,
            &["model.safetensors"],
        ),
        (
            "unsupported dtype",
            Box::new(move |c| {
                edit_header(&st(c), |h| h["model.norm.weight"]["dtype"] = "I64".into());
                vec![]
            }),
            3,
            &["model.norm.weight"],
        ),
        (
            "shape disagrees with config",
            Box::new(|c| {
                let mut cfg = Tiny::llama64().config_json();
                cfg["intermediate_size"] = 96.into();
                std::fs::write(c.model.join("config.json"), cfg.to_string()).unwrap();
                vec![]
            }),
            3,
            &["model.layers.0.mlp.gate_proj.weight", "[96, 64]"],
        ),
        (
            "NaN in a weight",
            Box::new(move |c| {
                poke_f32(
                    &st(c),
                    "model.layers.1.self_attn.v_proj.weight",
                    5,
                    f32::NAN,
                );
                vec![]
            }),
            3,
            &["model.layers.1.self_attn.v_proj.weight", "non-finite"],
        ),
        (
            "Inf in a weight",
            Box::new(move |c| {
                poke_f32(
                    &st(c),
                    "model.layers.0.mlp.down_proj.weight",
                    0,
                    f32::INFINITY,
                );
                vec![]
            }),
            3,
            &["model.layers.0.mlp.down_proj.weight", "non-finite"],
        ),
        (
            "calibration file empty",
            Box::new(|c| {
                std::fs::write(&c.calib, "\n\n").unwrap();
                vec![]
            }),
            3,
            &["calib.txt", "no documents"],
        ),
        (
            "every document longer than --seqlen",
            Box::new(|c| {
                std::fs::write(&c.calib, words(400, 64, 1)).unwrap();
                vec![]
            }),
            3,
            &["longer than --seqlen"],
        ),
        (
            "fewer tokens than one block",
            Box::new(|c| {
                std::fs::write(&c.calib, "one two").unwrap();
                vec![]
            }),
            3,
            &["fewer than one block"],
        ),
        (
            "group not dividing in_features",
            Box::new(|_| vec!["--group".into(), "24".into()]),
            2,
            &["self_attn.q_proj.weight", "--group 64 or 32"],
        ),
        (
            "output exists",
            Box::new(|c| {
                std::fs::create_dir(&c.out).unwrap();
                std::fs::write(c.out.join("notes.txt"), "mine").unwrap();
                vec![]
            }),
            4,
            &["already exists", "--force"],
        ),
        (
            "absurd --seqlen",
            Box::new(|_| vec!["--seqlen".into(), "100000000000".into()]),
            3,
            &["fewer than one block"],
        ),
    ];
    for (what, setup, code, needles) in cases {
        let c = case();
        let extra = setup(&c);
        let existed = c.out.exists();
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let (got, err) = quantize(&c, &extra, &[]);
        eprintln!("{what} → {got}: {}", err.trim());
        assert_eq!(got, code, "{what}: {err}");
        assert!(!err.contains("panicked"), "{what}: {err}");
        for n in needles {
            assert!(err.contains(n), "{what}: {err:?} lacks {n:?}");
        }
        if existed {
            let left: Vec<_> = std::fs::read_dir(&c.out).unwrap().collect();
            assert_eq!(left.len(), 1, "{what}: output touched");
        } else {
            assert_nothing_written(&c);
        }
    }
}

#[test]
fn output_not_writable_and_disk_full() {
    let c = case();
    // /proc refuses new directories even for root.
    let mut cmd = Command::cargo_bin("awq").unwrap();
    let o = cmd
        .args([
            "quantize", "-q", "--seqlen", "16", "--group", "32", "--model",
        ])
        .arg(&c.model)
        .arg("--calib")
        .arg(&c.calib)
        .args(["-o", "/proc/awq-out"])
        .output()
        .unwrap();
    let err = String::from_utf8(o.stderr).unwrap();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("/proc") && err.contains("writable"), "{err}");

    // The disk fills up while the shards are written.
    let (code, err) = quantize(&c, &[], &[("AWQ_INJECT_ENOSPC_AFTER", "20000")]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("No space left on device") && err.contains("free some space"),
        "{err}"
    );
    assert_nothing_written(&c);
}

#[test]
fn an_all_zero_weight_group_quantizes_to_finite_values() {
    let c = case();
    let st = c.model.join("model.safetensors");
    for i in 0..32 {
        poke_f32(&st, "model.layers.0.mlp.gate_proj.weight", i, 0.0);
        poke_f32(&st, "model.layers.1.self_attn.o_proj.weight", 64 + i, 0.0);
    }
    let (code, err) = quantize(&c, &[], &[]);
    assert_eq!(code, 0, "{err}");
    let v = Command::cargo_bin("awq")
        .unwrap()
        .arg("verify")
        .arg(&c.out)
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
}

// ---- On the real test model -------------------------------------------------------------

fn smollm2_args(model: &Path, out: &Path) -> Vec<String> {
    let calib = common::data("wikitext-2-raw/wiki.valid.calib.txt");
    [
        "quantize",
        "--model",
        model.to_str().unwrap(),
        "--group",
        "64",
        "--calib",
        calib.to_str().unwrap(),
        "--seqlen",
        "64",
        "--max-blocks",
        "2",
        "-o",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Starts `awq` with `args` and returns it once its stderr has shown `line`.
fn start_until(args: &[String], line: &str, env: &[(&str, &str)]) -> Child {
    let mut cmd = std::process::Command::new(assert_cmd::cargo::cargo_bin("awq"));
    cmd.args(args).stdout(Stdio::null()).stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.contains(line) => break,
            Some(_) => {}
            None => panic!("the run ended before {line:?}"),
        }
    }
    // Keep draining stderr so the child never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    child
}

fn signal(child: &Child, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

use common::files_but_report as files;

/// The end-to-end check runs on the finished parts after the last layer, whichever run
/// finished them: the resumed run's scores are the uninterrupted run's, to the bit (only the
/// seconds differ).
fn resumed_run_reports_the_end_to_end_check_of_the_uninterrupted_one(reference: &Path, out: &Path) {
    let check = |dir: &Path| {
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("quantization_report.json")).unwrap())
                .unwrap();
        let mut e = report["end_to_end"].clone();
        assert!(e.is_object(), "no end-to-end check in {}", dir.display());
        e.as_object_mut().unwrap().remove("seconds");
        e
    };
    assert_eq!(check(out), check(reference));
}

#[test]
fn sigint_cleans_up_and_sigkill_resumes_to_the_same_bytes() {
    let Some(model) = common::test_model("sigint_cleans_up_and_sigkill_resumes_to_the_same_bytes")
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let reference = tmp.path().join("reference");
    let run = |out: &Path, extra: &[&str]| {
        let mut args = smollm2_args(&model, out);
        args.extend(extra.iter().map(|s| s.to_string()));
        let o = std::process::Command::new(assert_cmd::cargo::cargo_bin("awq"))
            .args(&args)
            .output()
            .unwrap();
        (
            o.status.code().unwrap(),
            String::from_utf8(o.stderr).unwrap(),
        )
    };
    let (code, err) = run(&reference, &["-q"]);
    assert_eq!(code, 0, "{err}");

    // SIGINT in the middle of layer 3: exit 130, nothing at the output; the two finished
    // layers are kept for a rerun (the message, shown even with -q, says where).
    let out = tmp.path().join("interrupted");
    let args = smollm2_args(&model, &out);
    let mut child = start_until(&args, "layer 2/30", &[]);
    signal(&child, "-INT");
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert!(!out.exists());
    let staging = tmp.path().join(".interrupted.awq-staging");
    assert!(
        staging.join(".parts/layer-00001.json").is_file(),
        "finished layers lost"
    );
    std::fs::remove_dir_all(&staging).unwrap();

    // SIGKILL in the middle of layer 8: the staging directory stays; --resume finishes it.
    let out = tmp.path().join("killed");
    let mut child = start_until(&smollm2_args(&model, &out), "layer 7/30", &[]);
    signal(&child, "-KILL");
    child.wait().unwrap();
    assert!(!out.exists());
    let staging = tmp.path().join(".killed.awq-staging");
    assert!(staging.join(".parts/layer-00006.json").is_file());

    // A different calibration is refused, with or without --resume, naming the difference and
    // both ways out, and the staging directory (the finished layers) is kept.
    for extra in [&["--resume", "--seed", "7"][..], &["--seed", "7"]] {
        let (code, err) = run(&out, extra);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("calibration token ids"), "{err}");
        assert!(err.contains("--force"), "{err}");
        assert!(staging.exists());
    }

    // The same command continues by itself (no --resume needed) to the same bytes.
    let (code, err) = run(&out, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("resuming"), "{err}");
    assert!(!staging.exists());
    assert!(
        files(&out) == files(&reference),
        "resumed output differs from the uninterrupted run"
    );
    resumed_run_reports_the_end_to_end_check_of_the_uninterrupted_one(&reference, &out);

    // Only --force discards a killed run whose settings differ.
    let out2 = tmp.path().join("killed2");
    let mut child = start_until(&smollm2_args(&model, &out2), "layer 2/30", &[]);
    signal(&child, "-KILL");
    child.wait().unwrap();
    let (code, err) = run(&out2, &["--seed", "7", "--force"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("--force: removed"), "{err}");
}

#[test]
fn output_bytes_do_not_depend_on_the_thread_count() {
    let Some(model) = common::test_model("output_bytes_do_not_depend_on_the_thread_count") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut outputs = Vec::new();
    for threads in ["1", "2"] {
        let out = tmp.path().join(format!("t{threads}"));
        let mut args = smollm2_args(&model, &out);
        args.push("-q".into());
        let o = std::process::Command::new(assert_cmd::cargo::cargo_bin("awq"))
            .args(&args)
            .env("RAYON_NUM_THREADS", threads)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        outputs.push(files(&out));
    }
    assert!(
        outputs[0] == outputs[1],
        "RAYON_NUM_THREADS=1 and =2 wrote different bytes"
    );
}

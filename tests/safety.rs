//! Never destroy, never corrupt, never surprise (tiny random models, the binary run as a user
//! would): the output may not touch an input and `--force` replaces only what awq wrote; an
//! interrupted run is resumed or refused, never silently discarded; every input is checked
//! before layer 1 (in the dry run too); values beyond float16 are refused or handled by the
//! dtype rule; every numeric flag has a range; non-weight files travel with the output.

mod common;

use std::path::Path;

use assert_cmd::Command;
use common::case::{assert_nothing_written, case, quantize, Case, Run};
use common::poke_f32;

/// Every file under `dir` with its bytes, sorted by path.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().filter_map(|e| e.ok()) {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

fn awq(args: &[&str]) -> (i32, String, String) {
    let r = Run::of(Command::cargo_bin("awq").unwrap().args(args));
    (r.code, r.stdout, r.stderr)
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn output_on_or_around_an_input_is_refused_and_the_input_untouched() {
    let c = case();
    let sibling = c.tmp.path().join("sibling-model");
    std::fs::create_dir(&sibling).unwrap();
    std::fs::write(sibling.join("config.json"), "{}").unwrap();
    let gate = c.tmp.path().join("gate.txt");
    std::fs::write(&gate, common::tiny::words(400, 64, 9)).unwrap();
    let before = (snapshot(&c.model), snapshot(&sibling));
    let cases: Vec<(&str, std::path::PathBuf, &str)> = vec![
        ("-o is the model", c.model.clone(), "is the model directory"),
        (
            "-o is the model's parent",
            c.tmp.path().to_path_buf(),
            "contains the model directory",
        ),
        (
            "-o inside the model",
            c.model.join("awq"),
            "lies inside the model directory",
        ),
        (
            "-o is the calibration file",
            c.calib.clone(),
            "is the input file",
        ),
        ("-o is the gate text", gate.clone(), "is the input file"),
    ];
    for (what, out, needle) in cases {
        for dry in [false, true] {
            let mut args = vec![
                "quantize", "-q", "--group", "32", "--seqlen", "16", "--force",
            ];
            args.extend(["--model", path(&c.model), "--calib", path(&c.calib)]);
            args.extend(["--eval-text", path(&gate), "-o", path(&out)]);
            if dry {
                args.push("--dry-run");
            }
            let (code, _, err) = awq(&args);
            eprintln!("{what} (dry run {dry}) → {code}: {}", err.trim());
            assert_eq!(code, 2, "{what}: {err}");
            assert!(err.contains(needle), "{what}: {err}");
        }
    }
    assert!(
        before == (snapshot(&c.model), snapshot(&sibling)),
        "an input changed"
    );
    assert!(c.calib.is_file() && gate.is_file());
}

#[test]
fn force_replaces_only_an_earlier_awq_output_or_an_empty_directory() {
    let c = case();
    // Someone's directory: refused with what is there, untouched.
    std::fs::create_dir(&c.out).unwrap();
    std::fs::write(c.out.join("notes.txt"), "mine").unwrap();
    let (code, err) = quantize(&c, &["--force"], &[]);
    eprintln!("non-awq directory with --force → {code}: {}", err.trim());
    assert_eq!(code, 4, "{err}");
    assert!(
        err.contains("notes.txt") && err.contains("--force replaces only"),
        "{err}"
    );
    assert_eq!(std::fs::read(c.out.join("notes.txt")).unwrap(), b"mine");
    // An empty directory is replaced; then our own output is replaced again.
    std::fs::remove_file(c.out.join("notes.txt")).unwrap();
    let (code, err) = quantize(&c, &["--force"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(c.out.join("quantization_report.json").is_file());
    let (code, err) = quantize(&c, &["--force", "--no-clip"], &[]);
    assert_eq!(code, 0, "{err}");
    // Without --force an existing output is refused (exit 4).
    let (code, err) = quantize(&c, &[], &[]);
    assert_eq!(code, 4, "{err}");
    // A file someone added to our output is never deleted by --force.
    std::fs::write(c.out.join("my-notes.txt"), "keep me").unwrap();
    let (code, err) = quantize(&c, &["--force"], &[]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("my-notes.txt"), "{err}");
    assert_eq!(
        std::fs::read(c.out.join("my-notes.txt")).unwrap(),
        b"keep me"
    );
}

/// A staging directory as a killed run leaves it: a fingerprint and one finished layer record.
fn fake_killed_run(c: &Case, fingerprint: &str) -> std::path::PathBuf {
    let staging = c.tmp.path().join(".out.awq-staging");
    std::fs::create_dir_all(staging.join(".parts")).unwrap();
    std::fs::write(staging.join("fingerprint.json"), fingerprint).unwrap();
    std::fs::write(staging.join(".parts/layer-00000.json"), "{}").unwrap();
    std::fs::write(staging.join("owner.pid"), "999999999").unwrap();
    staging
}

#[test]
fn an_interrupted_run_is_never_discarded_silently() {
    let c = case();
    let staging = fake_killed_run(&c, r#"{"tool": "awq 0.0.1"}"#);
    for extra in [&[][..], &["--dry-run"], &["--resume"]] {
        let (code, err) = quantize(&c, extra, &[]);
        eprintln!(
            "stale staging of other settings {extra:?} → {code}: {}",
            err.trim()
        );
        assert_eq!(code, 2, "{err}");
        assert!(
            err.contains("1 finished layer") && err.contains("tool"),
            "{err}"
        );
        assert!(err.contains("--force"), "{err}");
        assert!(
            staging.join(".parts/layer-00000.json").is_file(),
            "work lost"
        );
    }
    // The dry run says what it found, even with -q hidden progress (the plan is on stdout).
    let (code, out, err) = awq(&[
        "quantize",
        "--dry-run",
        "--force",
        "--group",
        "32",
        "--seqlen",
        "16",
        "--model",
        path(&c.model),
        "--calib",
        path(&c.calib),
        "-o",
        path(&c.out),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        format!("{out}{err}").contains("--force: would remove"),
        "{out}{err}"
    );
    assert!(staging.exists(), "a dry run removed the staging directory");
    let (code, err) = quantize(&c, &["--force"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(!staging.exists());
}

#[test]
fn every_input_is_checked_before_layer_one_in_the_dry_run_too() {
    let c = case();
    let missing = c.tmp.path().join("nosuch.txt");
    for dry in [false, true] {
        let mut extra = vec!["--eval-text", path(&missing)];
        if dry {
            extra.push("--dry-run");
        }
        let (code, err) = quantize(&c, &extra, &[]);
        eprintln!(
            "--eval-text missing (dry run {dry}) → {code}: {}",
            err.trim()
        );
        assert_eq!(code, 3, "{err}");
        assert!(
            err.contains("--eval-text") && err.contains("nosuch.txt"),
            "{err}"
        );
        assert!(!err.contains("layer 1/"), "{err}");
        assert_nothing_written(&c);
    }
    let short = c.tmp.path().join("short.txt");
    std::fs::write(&short, "a b").unwrap();
    let (code, err) = quantize(&c, &["--eval-text", path(&short)], &[]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("short.txt"), "{err}");
    assert_nothing_written(&c);
}

#[test]
fn numeric_flags_out_of_range_are_usage_errors() {
    let c = case();
    for (flag, value) in [
        ("--seqlen", "0"),
        ("--max-blocks", "0"),
        ("--n-samples", "0"),
        ("--n-grid", "0"),
        ("--n-grid", "1"),
        ("--search-blocks", "0"),
        ("--group", "0"),
        ("--shard-size", "0"),
        ("--shard-size", "lots"),
        ("--max-ppl-increase", "=-1"),
        ("--eval-max-tokens", "1"),
        ("--dtype", "float8"),
    ] {
        let joined = format!("{flag}{value}");
        let mut extra = match value.strip_prefix('=') {
            Some(_) => vec![joined.as_str()],
            None => vec![flag, value],
        };
        if flag == "--max-ppl-increase" {
            extra.extend(["--eval-text", path(&c.calib)]);
        }
        let (code, err) = quantize(&c, &extra, &[]);
        eprintln!(
            "{flag} {value} → {code}: {}",
            err.lines().next().unwrap_or("")
        );
        assert_eq!(code, 2, "{flag} {value}: {err}");
        assert!(err.contains(flag), "{flag} {value}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert_nothing_written(&c);
    }
    let text = c.calib.to_str().unwrap();
    for (flag, value) in [
        ("--seqlen", "1"),
        ("--max-tokens", "0"),
        ("--dtype", "int8"),
    ] {
        let (code, _, err) = awq(&[
            "eval",
            "--model",
            path(&c.model),
            "--text",
            text,
            flag,
            value,
        ]);
        assert_eq!(code, 2, "eval {flag} {value}: {err}");
    }
}

#[test]
fn a_linear_weight_beyond_float16_is_refused_at_load() {
    let c = case();
    let name = "model.layers.1.mlp.down_proj.weight";
    poke_f32(&c.model.join("model.safetensors"), name, 5, 1e5);
    for dry in [false, true] {
        let extra: &[&str] = if dry { &["--dry-run"] } else { &[] };
        let (code, err) = quantize(&c, extra, &[]);
        eprintln!("linear weight 1e5 (dry run {dry}) → {code}: {}", err.trim());
        assert_eq!(code, 3, "{err}");
        assert!(err.contains(name) && err.contains("index 5"), "{err}");
        assert!(err.contains("float16"), "{err}");
        assert_nothing_written(&c);
    }
}

fn config(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap()
}

fn dtypes(dir: &Path) -> std::collections::BTreeMap<String, String> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, t)| (n, format!("{:?}", t.dtype())))
        .collect()
}

#[test]
fn an_unquantized_tensor_beyond_float16_makes_a_bfloat16_checkpoint() {
    let c = case();
    let norm = "model.layers.0.post_attention_layernorm.weight";
    poke_f32(&c.model.join("model.safetensors"), norm, 3, 1e5);
    let (code, err) = quantize(&c, &["--dtype", "float16"], &[]);
    eprintln!("norm 1e5 with --dtype float16 → {code}: {}", err.trim());
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains(norm) && err.contains("--dtype bfloat16"),
        "{err}"
    );
    assert_nothing_written(&c);

    let (code, err) = quantize(&c, &[], &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(config(&c.out)["torch_dtype"], "bfloat16");
    let d = dtypes(&c.out);
    assert_eq!(d[norm], "BF16");
    assert_eq!(d["model.embed_tokens.weight"], "BF16");
    assert_eq!(d["model.layers.0.mlp.down_proj.scales"], "F16");
    let (code, _, err) = awq(&["verify", path(&c.out), "--for", "transformers"]);
    assert_eq!(code, 0, "{err}");
}

/// Row 0 of every layer's down_proj at 30000 (inside float16) pushes the residual stream far
/// beyond 65504: the source's weights fit float16, its activations do not.
fn overflowing_activations(c: &Case) {
    let st = c.model.join("model.safetensors");
    for layer in 0..2 {
        for i in 0..128 {
            let name = format!("model.layers.{layer}.mlp.down_proj.weight");
            poke_f32(&st, &name, i, if i % 2 == 0 { 30000.0 } else { -30000.0 });
        }
    }
}

#[test]
fn activations_beyond_float16_are_recorded_and_choose_bfloat16() {
    let c = case();
    overflowing_activations(&c);
    let (code, err) = quantize(&c, &["--json"], &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(config(&c.out)["torch_dtype"], "bfloat16");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(c.out.join("quantization_report.json")).unwrap())
            .unwrap();
    let act = report["layers"][1]["max_abs_activation"].as_f64().unwrap();
    assert!(act > 65504.0, "{act}");
    assert_eq!(report["float_dtype"], "bfloat16");
    assert!(report["dtype_reason"]
        .as_str()
        .unwrap()
        .contains("activations"));

    // Forcing float16 writes it, with a warning that -q does not hide.
    let (code, err) = quantize(&c, &["--force", "--dtype", "float16"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("warning:") && err.contains("inf/NaN"), "{err}");
    assert_eq!(config(&c.out)["torch_dtype"], "float16");

    // What a float16 server sees: eval rounds activations and names the layer (exit 5).
    let text = common::tiny::words(200, 64, 3);
    let text_path = c.tmp.path().join("eval.txt");
    std::fs::write(&text_path, text).unwrap();
    let eval = |model: &Path, dtype: &str| {
        awq(&[
            "eval",
            "-q",
            "--model",
            path(model),
            "--text",
            path(&text_path),
            "--seqlen",
            "32",
            "--dtype",
            dtype,
        ])
    };
    let (code, out, err) = eval(&c.model, "float16");
    eprintln!("eval --dtype float16 → {code}: {}", err.trim());
    assert_eq!(code, 5, "{out}{err}");
    assert!(err.contains("layer 1") && err.contains("float16"), "{err}");
    assert!(!out.contains("NaN"), "{out}");
    for dtype in ["float32", "bfloat16"] {
        let (code, out, err) = eval(&c.model, dtype);
        assert_eq!(code, 0, "{dtype}: {err}");
        assert!(out.starts_with("perplexity "), "{out}");
    }
}

#[test]
fn companion_files_travel_verbatim_and_weights_do_not() {
    let c = case();
    let companions = [
        ("vocab.json", "{\"a\": 0}"),
        ("merges.txt", "#version: 0.2\na b\n"),
        ("added_tokens.json", "{}"),
        ("tokenizer.model", "\u{0}spm"),
        ("preprocessor_config.json", "{\"x\": 1}"),
        ("chat_template.jinja", "{{ messages }}"),
        ("LICENSE", "Apache-2.0"),
    ];
    for (name, body) in companions {
        std::fs::write(c.model.join(name), body).unwrap();
    }
    std::fs::write(c.model.join("pytorch_model.bin"), "weights").unwrap();
    std::fs::write(c.model.join("README.md"), "the source's card").unwrap();
    let (code, err) = quantize(&c, &[], &[]);
    assert_eq!(code, 0, "{err}");
    for (name, body) in companions {
        assert_eq!(
            std::fs::read(c.out.join(name)).unwrap(),
            body.as_bytes(),
            "{name}"
        );
    }
    assert!(!c.out.join("pytorch_model.bin").exists());
    let card = std::fs::read_to_string(c.out.join("README.md")).unwrap();
    assert!(card != "the source's card");
}

#[test]
fn a_single_file_wins_over_an_index_as_in_transformers() {
    let c = case();
    let index = serde_json::json!({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}});
    std::fs::write(
        c.model.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let (code, out, err) = awq(&["inspect", path(&c.model), "--json"]);
    assert_eq!(code, 0, "{err}");
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        summary["weights"].as_str().unwrap().contains("ignored"),
        "{summary}"
    );
    let (code, out, _) = awq(&["inspect", path(&c.model)]);
    assert_eq!(code, 0);
    assert!(out.contains("ignored"), "{out}");
    let (code, err) = quantize(&c, &[], &[]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn group_hints_divide_every_linear_of_the_model() {
    let Some(model) = common::test_model("group_hints_divide_every_linear_of_the_model") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let (code, _, err) = awq(&[
        "quantize",
        "--dry-run",
        "--model",
        path(&model),
        "--group",
        "576",
        "-o",
        path(&out),
    ]);
    assert_eq!(code, 2, "{err}");
    // hidden 576 and intermediate 1536: 128 and 256 do not divide 576.
    assert!(err.contains("use --group 64 or 32"), "{err}");
}

#[test]
fn a_group_that_is_not_a_multiple_of_32_is_flagged_for_vllm() {
    let c = case();
    let (code, err) = quantize(&c, &["--group", "16"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("warning:") && err.contains("not a multiple of 32"),
        "{err}"
    );
    let (code, out, _) = awq(&["verify", path(&c.out)]);
    assert_eq!(code, 5, "{out}");
    assert!(out.contains("awq_gemm"), "{out}");
    let (code, out, _) = awq(&["verify", path(&c.out), "--for", "transformers"]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn layers_beyond_num_hidden_layers_are_refused() {
    let c = case();
    let cfg_path = c.model.join("config.json");
    let mut cfg = config(&c.model);
    cfg["num_hidden_layers"] = 1.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let (code, err) = quantize(&c, &["--dry-run"], &[]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("model.layers.1") && err.contains("num_hidden_layers"),
        "{err}"
    );
}

#[test]
fn resume_insists_and_conflicts_with_force() {
    let c = case();
    let (code, err) = quantize(&c, &["--resume"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no interrupted run found"), "{err}");
    assert_nothing_written(&c);
    let (code, err) = quantize(&c, &["--resume", "--force"], &[]);
    assert_eq!(code, 2, "{err}");
    let (code, err) = quantize(&c, &["--max-ppl-increase", "5%"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("needs --eval-text"), "{err}");
}

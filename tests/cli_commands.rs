//! The pipeline-facing command line on tiny random models: `inspect`, `verify` (passing on our
//! output, failing with the tensor named on hand-broken copies), `completions`, JSON Lines
//! events, plain progress lines, `--dry-run`, the quality gate, `--version auto` with fake GPUs,
//! and the documented exit codes.

mod common;

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use common::case::Run;
use common::tiny::{words, Tiny};

struct Setup {
    tmp: tempfile::TempDir,
    model: PathBuf,
    calib: PathBuf,
}

fn setup() -> Setup {
    let t = Tiny::llama64();
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    t.write(&model);
    let calib = tmp.path().join("calib.txt");
    let docs: Vec<String> = (0..40).map(|i| words(12, t.vocab, i)).collect();
    std::fs::write(&calib, docs.join("\n\n")).unwrap();
    Setup { tmp, model, calib }
}

fn awq(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::cargo_bin("awq").unwrap();
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Run::of(&mut cmd)
}

fn quantize(s: &Setup, out: &Path, extra: &[&str]) -> Run {
    quantize_env(s, out, extra, &[])
}

fn quantize_env(s: &Setup, out: &Path, extra: &[&str], env: &[(&str, &str)]) -> Run {
    let mut args = common::case::quantize_args(&s.model, &s.calib, out);
    args.extend_from_slice(extra);
    awq(&args, env)
}

#[test]
fn json_events_progress_lines_and_inspect() {
    let s = setup();
    let out = s.tmp.path().join("out");
    let r = quantize(&s, &out, &["--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let events: Vec<serde_json::Value> = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    assert!(events.iter().all(|e| e["schema"] == 1));
    assert_eq!(events[0]["event"], "start");
    assert_eq!(events[0]["plan"]["layers"], 2);
    let layers: Vec<_> = events.iter().filter(|e| e["event"] == "layer").collect();
    assert_eq!(layers.len(), 2);
    assert!(layers[0]["groups"].as_array().unwrap().len() >= 3);
    // The guard's record rides along (the same object as the report's layers[i].guard).
    assert!(
        layers[0]["guard"]["tokens"].as_u64().unwrap() > 0,
        "{}",
        layers[0]
    );
    assert!(layers[0]["fp16_candidates"].is_null());
    let done = events.last().unwrap();
    assert_eq!(done["event"], "done");
    // `files` is everything written (what a job uploads), `weights` the shards.
    assert_eq!(done["weights"], serde_json::json!(["model.safetensors"]));
    let files: Vec<&str> = done["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    for f in [
        "model.safetensors",
        "config.json",
        "quant_config.json",
        "tokenizer.json",
        "README.md",
        "quantization_report.json",
    ] {
        assert!(files.contains(&f), "{f} not in {files:?}");
    }
    let mut on_disk: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    assert_eq!(files, on_disk);

    // Without a terminal, one plain line per layer with the groups' outcome.
    let out2 = s.tmp.path().join("out2");
    let r = quantize(&s, &out2, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("[awq] layer 1/2"), "{}", r.stderr);
    assert!(r.stderr.contains("[awq] layer 2/2"), "{}", r.stderr);
    assert!(r.stderr.contains("qkv "), "{}", r.stderr);
    assert!(r.stdout.contains("matmul:"), "{}", r.stdout);
    let r = quantize(&s, &s.tmp.path().join("out3"), &["--quiet"]);
    assert_eq!(r.code, 0);
    assert!(r.stderr.is_empty(), "{}", r.stderr);

    // inspect, on the fp source and the AWQ output.
    let r = awq(&["inspect", s.model.to_str().unwrap()], &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("quantization none"), "{}", r.stdout);
    let r = awq(&["inspect", "--json", out.to_str().unwrap()], &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["quantization_config"]["group_size"], 32);
    assert_eq!(v["architecture"], "LlamaForCausalLM");
    assert!(v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["name"] == "model.layers.1.mlp.down_proj.qweight" && t["dtype"] == "I32"));
    let r = awq(
        &["inspect", s.tmp.path().join("nope").to_str().unwrap()],
        &[],
    );
    assert_eq!(r.code, 3);
}

/// Rewrites `model.safetensors` of `dir` with `edit` applied to the tensor list.
fn edit_tensors(
    dir: &Path,
    edit: impl FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let data = safetensors::serialize(views, None).unwrap();
    std::fs::write(&path, data).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn verify_passes_our_output_and_names_what_is_broken() {
    let s = setup();
    let out = s.tmp.path().join("out");
    assert_eq!(quantize(&s, &out, &["-q"]).code, 0);
    let r = awq(&["verify", out.to_str().unwrap()], &[]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("tp 1: vLLM awq"), "{}", r.stdout);
    let r = awq(&["verify", "--json", out.to_str().unwrap()], &[]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["tensor_parallel"].as_array().unwrap().len(), 4);
    // 4 heads: tensor parallel 8 cannot split them.
    let r = awq(&["verify", "--tp", "8", out.to_str().unwrap()], &[]);
    assert_eq!(r.code, 5, "{}", r.stdout);

    let target = "model.layers.1.self_attn.k_proj";
    type Edit = Box<dyn FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "wrong shape",
            Box::new(move |ts| {
                let t = ts
                    .iter_mut()
                    .find(|t| t.0 == format!("{target}.qweight"))
                    .unwrap();
                t.2 = vec![t.2[1], t.2[0]];
            }),
            "k_proj.qweight: shape",
        ),
        (
            "wrong dtype",
            Box::new(move |ts| {
                let t = ts
                    .iter_mut()
                    .find(|t| t.0 == format!("{target}.scales"))
                    .unwrap();
                t.1 = safetensors::Dtype::BF16;
            }),
            "k_proj.scales: dtype",
        ),
        (
            "missing tensor",
            Box::new(move |ts| ts.retain(|t| t.0 != format!("{target}.qzeros"))),
            "k_proj.qzeros: missing",
        ),
        (
            "non-finite scale",
            Box::new(move |ts| {
                let t = ts
                    .iter_mut()
                    .find(|t| t.0 == format!("{target}.scales"))
                    .unwrap();
                t.3[2..4].copy_from_slice(&half::f16::INFINITY.to_le_bytes());
            }),
            "k_proj.scales: non-finite",
        ),
    ];
    for (what, edit, expect) in cases {
        let broken = s.tmp.path().join(what.replace(' ', "-"));
        copy_dir(&out, &broken);
        edit_tensors(&broken, edit);
        let r = awq(&["verify", broken.to_str().unwrap()], &[]);
        assert_eq!(r.code, 5, "{what}: {}\n{}", r.stdout, r.stderr);
        assert!(r.stdout.contains(expect), "{what}: {}", r.stdout);
    }

    // A group that does not divide in_features (config says 24, hidden is 64).
    let broken = s.tmp.path().join("group");
    copy_dir(&out, &broken);
    let cfg_path = broken.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["quantization_config"]["group_size"] = 24.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let r = awq(&["verify", broken.to_str().unwrap()], &[]);
    assert_eq!(r.code, 5, "{}", r.stdout);
    assert!(
        r.stdout
            .contains("q_proj: in_features 64 is not divisible by group_size 24"),
        "{}",
        r.stdout
    );

    // An fp checkpoint is not an AWQ checkpoint: an input error (3), not a failed check.
    let r = awq(&["verify", s.model.to_str().unwrap()], &[]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("not an AWQ checkpoint"), "{}", r.stderr);
}

#[test]
fn dry_run_writes_nothing_and_exit_codes() {
    let s = setup();
    let out = s.tmp.path().join("out");
    let r = quantize(&s, &out, &["--dry-run"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("dry run: nothing written"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("mlp.down_proj [64, 128]"), "{}", r.stdout);
    // Before any work: which linears `--rounding auto` will judge, and what the rest need.
    assert!(
        r.stdout.contains(
            "rounding     auto: error feedback judged on the held-out calibration blocks for"
        ),
        "{}",
        r.stdout
    );
    // `gptq` and `rtn` have their line too.
    let r = quantize(&s, &out, &["--dry-run", "--rounding", "gptq"]);
    assert!(
        r.stdout.contains("rounding     gptq: error feedback on "),
        "{}",
        r.stdout
    );
    let r = quantize(&s, &out, &["--dry-run", "--rounding", "rtn"]);
    assert!(
        r.stdout
            .contains("rounding     rtn: round to nearest on every linear"),
        "{}",
        r.stdout
    );
    assert!(!out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(s.tmp.path()).unwrap().collect();
    assert_eq!(leftovers.len(), 2, "only model/ and calib.txt");

    // 2: usage; 3: input; 4: output exists.
    assert_eq!(awq(&["quantize", "--no-such-flag"], &[]).code, 2);
    assert_eq!(quantize(&s, &out, &["--max-ppl-increase", "5%"]).code, 2);
    let missing = s.tmp.path().join("missing");
    let r = awq(
        &[
            "quantize",
            "--model",
            missing.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(r.code, 3, "{}", r.stderr);
    // An empty directory is taken as -o; one holding something else is refused.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let r = quantize(&s, &out, &["-q"]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    // --json reports the failure as an event too.
    let r = quantize(&s, &out, &["--json"]);
    assert_eq!(r.code, 4);
    let last: serde_json::Value = serde_json::from_str(r.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last["event"], "error");
    assert_eq!(last["exit_code"], 4);
}

#[test]
fn quality_gate_records_both_perplexities_and_fails_with_5() {
    let s = setup();
    let text = s.tmp.path().join("eval.txt");
    std::fs::write(&text, words(200, Tiny::llama64().vocab, 7)).unwrap();
    let out = s.tmp.path().join("out");
    let gate = [
        "--eval-text",
        text.to_str().unwrap(),
        "--eval-max-tokens",
        "160",
    ];
    let mut args = gate.to_vec();
    args.extend(["--max-ppl-increase", "1000%"]);
    let r = quantize(&s, &out, &args);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("quantization_report.json")).unwrap())
            .unwrap();
    let q = &report["quality"];
    assert!(q["fp_perplexity"].as_f64().unwrap() > 1.0);
    assert!(q["quantized_perplexity"].as_f64().unwrap() > 1.0);
    assert_eq!(q["passed"], true);

    // A limit below the measured increase fails with exit 5 (the checkpoint is kept as
    // out2.rejected for inspection; see tests/pipeline.rs).
    let increase = q["increase_pct"].as_f64().unwrap();
    let limit = format!("{}%", (increase - 0.5).max(0.0));
    let out2 = s.tmp.path().join("out2");
    let mut args = gate.to_vec();
    args.extend(["--max-ppl-increase", &limit]);
    let r = quantize(&s, &out2, &args);
    if increase > 0.5 {
        assert_eq!(r.code, 5, "{}", r.stderr);
        assert!(r.stderr.contains("quality gate failed"), "{}", r.stderr);
        assert!(!out2.exists());
        // `awq verify` does not let the kept checkpoint ship.
        let o = Command::cargo_bin("awq")
            .unwrap()
            .args(["verify", "--for", "transformers"])
            .arg(s.tmp.path().join("out2.rejected"))
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(5));
        assert!(String::from_utf8_lossy(&o.stdout).contains("quality gate failed"));
    } else {
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
}

/// A fake `nvidia-smi` printing `lines`.
fn fake_smi(dir: &Path, name: &str, lines: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\nprintf '{lines}'\n")).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    path
}

#[test]
fn version_auto_with_fake_gpus() {
    let s = setup();
    let out = s.tmp.path().join("out");
    let plan = |smi: &Path, workload: &str| -> Run {
        quantize_env(
            &s,
            &out,
            &[
                "--version",
                "auto",
                "--workload",
                workload,
                "--dry-run",
                "--json",
            ],
            &[("AWQ_NVIDIA_SMI", smi.to_str().unwrap())],
        )
    };
    let layout = |r: &Run| -> String {
        let start: serde_json::Value =
            serde_json::from_str(r.stdout.lines().next().unwrap()).unwrap();
        start["plan"]["layout"].as_str().unwrap().to_string()
    };
    let none = s.tmp.path().join("no-such-nvidia-smi");
    let r = plan(&none, "single");
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(layout(&r), "gemm");
    assert!(r.stderr.contains("no NVIDIA GPU"), "{}", r.stderr);
    assert!(!r.stderr.contains("warning"), "{}", r.stderr);

    // An nvidia-smi that is there but fails is not "no GPU": GEMM, with a warning.
    let broken = s.tmp.path().join("broken-smi");
    std::fs::write(&broken, "#!/bin/sh\nexit 9\n").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let r = plan(&broken, "single");
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(layout(&r), "gemm");
    assert!(
        r.stderr.contains("warning:") && r.stderr.contains("failed"),
        "{}",
        r.stderr
    );

    let p61 = fake_smi(s.tmp.path(), "smi61", "Tesla P4, 6.1\\n");
    let r = plan(&p61, "batch");
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("sm_75"), "{}", r.stderr);

    for (cap, name) in [
        ("7.5", "Tesla T4"),
        ("8.6", "NVIDIA RTX A6000"),
        ("9.0", "NVIDIA H100"),
    ] {
        let smi = fake_smi(
            s.tmp.path(),
            &format!("smi{cap}"),
            &format!("{name}, {cap}\\n"),
        );
        let r = plan(&smi, "batch");
        assert_eq!(r.code, 0, "{cap}: {}", r.stderr);
        assert_eq!(layout(&r), "gemm", "{cap}");
        let r = plan(&smi, "single");
        assert_eq!(r.code, 0, "{cap}: {}", r.stderr);
        assert_eq!(layout(&r), "gemv", "{cap}");
        assert!(r.stderr.contains("vLLM loads GEMM only"), "{}", r.stderr);
    }
}

#[test]
fn completions_for_every_shell() {
    for shell in ["bash", "zsh", "fish", "powershell", "elvish"] {
        let r = awq(&["completions", shell], &[]);
        assert_eq!(r.code, 0, "{shell}");
        assert!(
            r.stdout.contains("quantize") && r.stdout.contains("verify"),
            "{shell}"
        );
    }
    assert_eq!(awq(&["completions", "tcsh"], &[]).code, 2);
}

/// `--tp N` is analysed for any N ≥ 1 (0 is a usage error), the text verdict and the JSON `ok`
/// agree with the exit status, and every reason is printed.
#[test]
fn verify_any_tp_degree_and_the_verdict_matches_the_exit_status() {
    let s = setup();
    let out = s.tmp.path().join("out");
    assert_eq!(quantize(&s, &out, &["-q"]).code, 0);
    let dir = out.to_str().unwrap();
    let r = awq(&["verify", "--tp", "0", dir], &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);

    // llama64: 4 heads of 16 (4 key/value heads), hidden 64, intermediate 128, group 32.
    // tp 2 splits but is too narrow for the fused kernel; tp 3 splits nothing; tp 4 leaves o_proj 16 inputs (< one group); tp 8
    // splits no heads and leaves down_proj 16 inputs.
    for (tp, loadable, expect) in [
        ("1", true, vec![]),
        // Per rank q, k and v are 32 wide: the merged qkv_proj (96) is no multiple of 64,
        // which vLLM's fused awq_gemm kernel needs (AWQ-SPEC §10.1).
        (
            "2",
            false,
            vec!["self_attn.qkv_proj: output partition 96 must be a multiple of 64 and of group 32 (vLLM's awq_gemm kernel)"],
        ),
        (
            "3",
            false,
            vec![
                "4 attention heads do not split over 3 ranks",
                "4 key/value heads neither split over nor replicate to 3 ranks",
                "mlp.gate_proj: 128 outputs do not split over 3 ranks",
                "mlp.up_proj: 128 outputs do not split over 3 ranks",
                "mlp.down_proj: 128 inputs do not split over 3 ranks",
            ],
        ),
        (
            "4",
            false,
            vec![
                "self_attn.o_proj: input partition 16 is not divisible by group 32",
                "self_attn.qkv_proj: output partition 48 must be a multiple of 64 and of group 32 (vLLM's awq_gemm kernel)",
            ],
        ),
        (
            "8",
            false,
            vec![
                "4 attention heads do not split over 8 ranks",
                "mlp.down_proj: input partition 16 is not divisible by group 32",
                "self_attn.qkv_proj: output partition 32 must be a multiple of 64 and of group 32 (vLLM's awq_gemm kernel)",
                "mlp.gate_up_proj: output partition 32 must be a multiple of 64 and of group 32 (vLLM's awq_gemm kernel)",
            ],
        ),
    ] {
        let text = awq(&["verify", "--tp", tp, dir], &[]);
        let json = awq(&["verify", "--json", "--tp", tp, dir], &[]);
        let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
        let want = if loadable { 0 } else { 5 };
        assert_eq!(text.code, want, "tp {tp}: {}", text.stdout);
        assert_eq!(json.code, want, "tp {tp}");
        assert_eq!(v["ok"], loadable, "tp {tp}");
        assert_eq!(v["tp"], tp.parse::<u64>().unwrap());
        let last = text.stdout.lines().last().unwrap();
        let verdict = format!("loadable by vllm at tensor-parallel degree {tp}");
        if loadable {
            assert_eq!(last, format!("ok: {verdict}"));
        } else {
            assert_eq!(last, format!("FAILED: not {verdict}"));
            assert!(
                !text.stdout.lines().any(|l| l.trim() == "ok"),
                "{}",
                text.stdout
            );
            assert!(text.stderr.contains(expect[0]), "{}", text.stderr);
        }
        // 1, 2, 4, 8 and the requested degree.
        let degrees: Vec<u64> = v["tensor_parallel"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["tp"].as_u64().unwrap())
            .collect();
        let mut want_degrees = vec![1, 2, 4, 8, tp.parse().unwrap()];
        want_degrees.sort_unstable();
        want_degrees.dedup();
        assert_eq!(degrees, want_degrees, "tp {tp}");
        let entry = v["tensor_parallel"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["tp"].as_u64().unwrap().to_string() == tp)
            .unwrap();
        let reasons: Vec<&str> = entry["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap())
            .collect();
        assert_eq!(reasons, expect, "tp {tp}");
        // Every reason of every degree is printed (Marlin's when awq loads it): no truncation.
        for t in v["tensor_parallel"].as_array().unwrap() {
            let keys: &[&str] = if t["vllm_awq"] == true {
                &["reasons", "marlin_reasons"]
            } else {
                &["reasons"]
            };
            for key in keys {
                for r in t[key].as_array().unwrap() {
                    assert!(
                        text.stdout.contains(r.as_str().unwrap()),
                        "tp {tp}: {r} missing from\n{}",
                        text.stdout
                    );
                }
            }
        }
        let target = v["targets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["target"] == "vllm")
            .unwrap();
        assert_eq!(target["loadable"], loadable);
    }

    // TGI follows the same rules; transformers loads on one rank, so --tp > 1 is a usage error.
    assert_eq!(awq(&["verify", "--for", "tgi", dir], &[]).code, 0);
    assert_eq!(
        awq(&["verify", "--for", "tgi", "--tp", "3", dir], &[]).code,
        5
    );
    let r = awq(&["verify", "--for", "transformers", dir], &[]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert!(
        r.stdout.ends_with("ok: loadable by transformers\n"),
        "{}",
        r.stdout
    );
    let r = awq(&["verify", "--for", "transformers", "--tp", "2", dir], &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert_eq!(awq(&["verify", "--for", "sglang", dir], &[]).code, 2);
}

/// GEMV: vLLM and TGI load the GEMM layout only (exit 5 with what to do instead); transformers
/// (with autoawq) loads it. The model card says the same.
#[test]
fn verify_gemv_fails_for_vllm_and_tgi_and_passes_for_transformers() {
    let s = setup();
    let out = s.tmp.path().join("gemv");
    assert_eq!(quantize(&s, &out, &["-q", "--version", "gemv"]).code, 0);
    let dir = out.to_str().unwrap();
    for target in [None, Some("vllm"), Some("tgi")] {
        let mut args = vec!["verify", dir];
        if let Some(t) = target {
            args.extend(["--for", t]);
        }
        let r = awq(&args, &[]);
        assert_eq!(r.code, 5, "{target:?}: {}", r.stdout);
        for needle in [
            "vLLM and TGI load the GEMM layout only",
            "--for transformers",
            "--version gemm",
        ] {
            assert!(r.stdout.contains(needle), "{target:?}: {}", r.stdout);
            assert!(r.stderr.contains(needle), "{target:?}: {}", r.stderr);
        }
        assert!(r.stdout.lines().last().unwrap().starts_with("FAILED"));
    }
    let r = awq(&["verify", "--for", "transformers", dir], &[]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert!(r.stdout.contains("transformers: loadable"), "{}", r.stdout);
    assert!(
        r.stdout.contains("vllm (tp 1): not loadable"),
        "{}",
        r.stdout
    );
    let r = awq(&["verify", "--json", dir], &[]);
    assert_eq!(r.code, 5);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["target"], "vllm");
    let loadable: Vec<(String, bool)> = v["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["target"].as_str().unwrap().to_string(),
                t["loadable"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        loadable,
        [
            ("vllm".to_string(), false),
            ("tgi".to_string(), false),
            ("transformers".to_string(), true)
        ]
    );

    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("vLLM and TGI cannot load it"), "{card}");
    assert!(!card.contains("vllm serve"), "{card}");
    assert!(card.contains("pip install transformers autoawq"), "{card}");
    assert!(card.contains("--for transformers"), "{card}");
    assert!(card.contains("| layout (version) | GEMV |"), "{card}");
}

/// The model card: `base_model` only for a Hub source, plain words for the settings, how to load
/// it, and the measured perplexities when the quality gate ran.
#[test]
fn model_card_front_matter_loading_and_quality() {
    let s = setup();
    let text = s.tmp.path().join("eval.txt");
    std::fs::write(&text, words(200, Tiny::llama64().vocab, 7)).unwrap();
    let out = s.tmp.path().join("out");
    let r = quantize(
        &s,
        &out,
        &[
            "-q",
            "--eval-text",
            text.to_str().unwrap(),
            "--eval-max-tokens",
            "160",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.starts_with("---\nlibrary_name: transformers\n"),
        "{card}"
    );
    assert!(
        !card.contains("base_model"),
        "a local source has no base_model:\n{card}"
    );
    for needle in [
        "# model — AWQ INT4 (GEMM)",
        "| layout (version) | GEMM |",
        "| scale search | robust",
        "| clipping search | yes, ",
        "| group size | 32 |",
        "vllm serve path/to/this-directory\n",
        "pip install transformers autoawq",
        "AutoModelForCausalLM.from_pretrained(",
        "## Quality",
        "of `eval.txt`",
    ] {
        assert!(card.contains(needle), "{needle}:\n{card}");
    }
    for debug in ["Gemm", "Robust", "Some(", "None"] {
        assert!(!card.contains(debug), "{debug}:\n{card}");
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("quantization_report.json")).unwrap())
            .unwrap();
    let q = &report["quality"];
    for key in ["fp_perplexity", "quantized_perplexity"] {
        let value = format!("| {:.4} |", q[key].as_f64().unwrap());
        let value = value.trim_end_matches(" |");
        assert!(card.contains(value), "{key} {value}:\n{card}");
    }
    assert!(
        card.contains(&format!("first {} tokens", q["tokens"])),
        "{card}"
    );

    // A Hub id (from a Hugging Face cache, offline) is the card's base_model.
    let hub = s.tmp.path().join("hub");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = hub.join("models--acme--tiny-llama");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    Tiny::llama64().write(&repo.join("snapshots").join(commit));
    let out = s.tmp.path().join("from-hub");
    let r = awq(
        &[
            "quantize",
            "-q",
            "--seqlen",
            "16",
            "--group",
            "32",
            "--model",
            "acme/tiny-llama",
            "--calib",
            s.calib.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
        &[
            ("HF_HUB_CACHE", hub.to_str().unwrap()),
            ("HF_HUB_OFFLINE", "1"),
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.starts_with("---\nbase_model: acme/tiny-llama\nbase_model_relation: quantized\n"),
        "{card}"
    );
    assert!(
        card.contains("# acme/tiny-llama — AWQ INT4 (GEMM)"),
        "{card}"
    );
    assert!(!card.contains("## Quality"), "{card}");
}

/// `eval`, `inspect` and `verify` with `--json` print one JSON object even when they fail
/// before their result: the error, with the exit code (a pipeline's `jq` never reads nothing).
#[test]
fn json_commands_print_their_error_as_json() {
    let missing = "/nonexistent/awq-model";
    for args in [
        vec!["verify", "--json", missing],
        vec!["inspect", "--json", missing],
        vec![
            "eval",
            "--json",
            "--model",
            missing,
            "--text",
            "/nonexistent/t.txt",
        ],
    ] {
        let r = awq(&args, &[]);
        assert_eq!(r.code, 3, "{args:?}: {}", r.stderr);
        let v: serde_json::Value = serde_json::from_str(&r.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: not JSON: {:?}: {e}", r.stdout));
        assert_eq!(v["ok"], false);
        assert_eq!(v["exit_code"], 3);
        assert!(v["error"].as_str().unwrap().contains(missing), "{v}");
    }
    // A command line the parser refuses (exit 2) answers in JSON too.
    let r = awq(&["verify", "--json", "--tp", "0", missing], &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(v["error"].as_str().unwrap().contains("--tp"), "{v}");
    let r = awq(
        &[
            "quantize",
            "--json",
            "--keep-fp16",
            "abc",
            "--model",
            missing,
            "-o",
            missing,
        ],
        &[],
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["event"], "error", "{v}");
}

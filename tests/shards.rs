//! One job split over machines: shards quantized as parallel processes and merged are
//! byte-identical to a single run (the report aside: it holds timings), with the default
//! options, with `--keep-fp16 3% --rounding gptq` and with `--format compressed-tensors`, and
//! where the end-to-end check falls back; every wrong shard set is refused before anything is written; a shard killed with SIGKILL resumes;
//! the dry run plans N shards.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use assert_cmd::Command;
use common::case::Run;
use common::tiny::{words, Tiny};

/// A 6-layer tiny Llama (every linear divisible by group 32), a calibration file, in `tmp`.
struct Job {
    tmp: tempfile::TempDir,
    model: PathBuf,
    calib: PathBuf,
}

fn job() -> Job {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    Tiny {
        layers: 6,
        ..Tiny::llama64()
    }
    .write(&model);
    let calib = tmp.path().join("calib.txt");
    let docs: Vec<String> = (0..40).map(|i| words(12, 64, i)).collect();
    std::fs::write(&calib, docs.join("\n\n")).unwrap();
    Job { tmp, model, calib }
}

fn awq(args: &[&str]) -> Run {
    Run::of(Command::cargo_bin("awq").unwrap().args(args))
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

impl Job {
    fn dir(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// `awq quantize` of this job writing to `out`, with `extra`.
    fn args<'a>(&'a self, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
        let mut a = vec![
            "quantize",
            "-q",
            "--seqlen",
            "16",
            "--group",
            "32",
            "--model",
            path(&self.model),
            "--calib",
            path(&self.calib),
            "-o",
            path(out),
        ];
        a.extend_from_slice(extra);
        a
    }

    /// Shards `0/n` … `n-1/n` as parallel processes, into `shard-K` directories.
    fn shards(&self, n: usize, extra: &[&str]) -> Vec<PathBuf> {
        let dirs: Vec<PathBuf> = (0..n).map(|k| self.dir(&format!("shard-{k}"))).collect();
        let children: Vec<_> = dirs
            .iter()
            .enumerate()
            .map(|(k, d)| {
                let spec = format!("{k}/{n}");
                let mut args = self.args(d, extra);
                args.extend(["--shard", &spec]);
                std::process::Command::new(assert_cmd::cargo::cargo_bin("awq"))
                    .args(&args)
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for c in children {
            let o = c.wait_with_output().unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        dirs
    }
}

use common::files_but_report as files;

fn merge(shards: &[PathBuf], out: &Path, extra: &[&str]) -> Run {
    let mut args = vec!["merge"];
    args.extend(shards.iter().map(|d| path(d)));
    args.extend(["-o", path(out)]);
    args.extend_from_slice(extra);
    awq(&args)
}

fn report(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("quantization_report.json")).unwrap()).unwrap()
}

#[test]
fn three_shards_merge_to_the_bytes_of_a_single_run() {
    let extras = [
        &[][..],
        &["--keep-fp16", "3%", "--rounding", "gptq"][..],
        &["--format", "compressed-tensors"][..],
    ];
    for extra in extras {
        let j = job();
        let single = j.dir("single");
        let r = awq(&j.args(&single, extra));
        assert_eq!(r.code, 0, "{}", r.stderr);
        let shards = j.shards(3, extra);
        // Later shards stream through more layers first: never more layers than the first.
        let ranges: Vec<[u64; 2]> = shards
            .iter()
            .map(|d| {
                let m: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(d.join("manifest.json")).unwrap())
                        .unwrap();
                serde_json::from_value(m["layers"].clone()).unwrap()
            })
            .collect();
        assert_eq!(ranges[0][0], 0);
        assert_eq!(ranges[2][1], 6);
        let merged = j.dir("merged");
        // Any order on the command line.
        let mut given = shards.clone();
        given.reverse();
        let r = merge(&given, &merged, &["--json"]);
        assert_eq!(r.code, 0, "{extra:?}: {}", r.stderr);
        assert_eq!(files(&merged), files(&single), "{extra:?}");
        // The merge keeps the format the shards were made in.
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(merged.join("config.json")).unwrap()).unwrap();
        let method = match extra.contains(&"compressed-tensors") {
            true => "compressed-tensors",
            false => "awq",
        };
        assert_eq!(cfg["quantization_config"]["quant_method"], method);
        let rep = report(&merged);
        let layers = rep["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 6);
        for (i, l) in layers.iter().enumerate() {
            let k = l["shard"].as_u64().unwrap() as usize;
            let [a, b] = ranges[k];
            assert!((a..b).contains(&(i as u64)), "layer {i} from shard {k}");
        }
        assert_eq!(rep["shards"].as_array().unwrap().len(), 3);
        assert!(rep["shards"][2]["prefix_seconds"].as_f64().unwrap() >= 0.0);
        // Merging again is idempotent: nothing to do, the same bytes.
        let r = merge(&shards, &merged, &[]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert!(r.stdout.contains("up to date"), "{}", r.stdout);
        assert_eq!(files(&merged), files(&single));
    }
}

/// The merge runs the end-to-end check on the shards' parts as a single run does on its own: the
/// same scores to the bit, and a fallback (forced here: the fixture is too small for the check
/// to be sure) rewrites the layers to the single run's bytes.
#[test]
fn a_merge_checks_end_to_end_and_falls_back_as_the_single_run_does() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, calib) = (
        common::fixture("arch/gemma3"),
        common::data("wikitext-2-raw/wiki.valid.calib.txt"),
    );
    let force = [("AWQ_INJECT_FALLBACK", "rtn")];
    // `awq quantize` (a shard of it with `shard`), the fallback forced with `forced`.
    let run = |out: &Path, shard: Option<&str>, forced: bool| {
        let mut args = vec![
            "quantize",
            "-q",
            "--split-long",
            "--group",
            "64",
            "--seqlen",
            "16",
            "--n-samples",
            "8",
            "--model",
            path(&model),
            "--calib",
            path(&calib),
            "-o",
            path(out),
        ];
        args.extend(shard.map(|s| ["--shard", s]).into_iter().flatten());
        let mut cmd = Command::cargo_bin("awq").unwrap();
        let r = Run::of(
            cmd.args(&args)
                .envs(force[..forced as usize].iter().copied()),
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
    };
    let single = tmp.path().join("single");
    run(&single, None, true);
    let shards: Vec<PathBuf> = (0..2)
        .map(|k| tmp.path().join(format!("shard-{k}")))
        .collect();
    for (k, d) in shards.iter().enumerate() {
        run(d, Some(&format!("{k}/2")), false);
    }
    let merged = tmp.path().join("merged");
    let mut args = vec!["merge"];
    args.extend(shards.iter().map(|d| path(d)));
    args.extend(["-o", path(&merged)]);
    let mut cmd = Command::cargo_bin("awq").unwrap();
    let r = Run::of(cmd.args(&args).envs(force));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("written again: every layer as plain round-to-nearest"),
        "{}",
        r.stderr
    );
    assert_eq!(files(&merged), files(&single));
    // The summary's matmul line is the merge's own work (its check), named so and not "0".
    let line = r.stdout.lines().find(|l| l.starts_with("matmul")).unwrap();
    let gflop = line
        .strip_prefix("matmul (this merge's end-to-end check): ")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|g| g.parse::<f64>().ok());
    assert!(gflop.is_some_and(|g| g > 0.0), "{line}");
    let scores = |dir: &Path| {
        let mut e = report(dir)["end_to_end"].clone();
        e.as_object_mut().unwrap().remove("seconds");
        e
    };
    assert_eq!(scores(&single)["fallback"], "rtn");
    assert_eq!(scores(&merged), scores(&single));
    // Without the hook the merge keeps the shards' layers: the single run's bytes again.
    let (plain, merged_plain) = (tmp.path().join("plain"), tmp.path().join("merged-plain"));
    run(&plain, None, false);
    let r = merge(&shards, &merged_plain, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(files(&merged_plain), files(&plain));
    assert!(scores(&merged_plain)["fallback"].is_null());
}

#[test]
fn wrong_shard_sets_are_refused_before_anything_is_written() {
    let j = job();
    let shards = j.shards(3, &[]);
    let other = j.dir("other");
    let r = awq(&j.args(&other, &["--layers", "2..4", "--no-clip"]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let repeated = j.dir("repeated");
    let [a, b]: [u64; 2] = {
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(shards[1].join("manifest.json")).unwrap())
                .unwrap();
        serde_json::from_value(m["layers"].clone()).unwrap()
    };
    let range = format!("{a}..{b}");
    let r = awq(&j.args(&repeated, &["--layers", &range]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let unfinished = j.dir("unfinished");
    std::fs::create_dir(&unfinished).unwrap();
    let broken = j.dir("broken");
    let copy = |from: &Path, to: &Path| {
        std::fs::create_dir_all(to.join("layers")).unwrap();
        std::fs::copy(from.join("manifest.json"), to.join("manifest.json")).unwrap();
    };
    copy(&shards[0], &broken);
    let out = j.dir("out");
    let missing_needles = ["are in no shard given", range.as_str()];
    // What, the shard directories given, the output, the exit code, what the message says.
    type Case<'a> = (&'a str, Vec<PathBuf>, PathBuf, i32, &'a [&'a str]);
    let cases: Vec<Case> = vec![
        (
            "other settings",
            vec![shards[0].clone(), other.clone(), shards[2].clone()],
            out.clone(),
            2,
            &["shards of different runs", "options.clip"],
        ),
        (
            "missing layers",
            vec![shards[0].clone(), shards[2].clone()],
            out.clone(),
            2,
            &missing_needles,
        ),
        (
            "repeated layer",
            vec![
                shards[0].clone(),
                shards[1].clone(),
                repeated.clone(),
                shards[2].clone(),
            ],
            out.clone(),
            2,
            &["is in two shards"],
        ),
        (
            "the same directory twice",
            vec![shards[0].clone(), shards[0].clone()],
            out.clone(),
            2,
            &["given twice"],
        ),
        (
            "not a shard",
            vec![shards[0].clone(), unfinished.clone(), shards[2].clone()],
            out.clone(),
            3,
            &["is not a finished shard", "manifest.json"],
        ),
        (
            "unfinished shard",
            vec![broken.clone(), shards[1].clone(), shards[2].clone()],
            out.clone(),
            3,
            &[
                "is missing, so the shard is incomplete",
                "rerun its command",
            ],
        ),
        (
            "output inside a shard",
            shards.clone(),
            shards[1].join("merged"),
            2,
            &["overlaps the shard"],
        ),
    ];
    for (what, dirs, out, code, needles) in cases {
        let before: Vec<_> = dirs.iter().map(|d| files(&d.join("layers"))).collect();
        let r = merge(&dirs, &out, &[]);
        eprintln!("{what} → {}: {}", r.code, r.stderr.trim());
        assert_eq!(r.code, code, "{what}: {}", r.stderr);
        for n in needles {
            assert!(r.stderr.contains(n), "{what}: {n:?} not in {}", r.stderr);
        }
        assert!(!out.exists(), "{what}: output written");
        let after: Vec<_> = dirs.iter().map(|d| files(&d.join("layers"))).collect();
        assert_eq!(before, after, "{what}: a shard changed");
    }
    let staging: Vec<_> = std::fs::read_dir(j.tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("awq-staging"))
        .collect();
    assert!(staging.is_empty(), "{staging:?}");
}

#[test]
fn the_dry_run_plans_n_shards_and_auto_reads_the_scheduler() {
    let j = job();
    let out = j.dir("plan");
    let r = awq(&j.args(&out, &["--dry-run", "--shards", "3"]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let lines: Vec<&str> = r
        .stdout
        .lines()
        .filter(|l| l.starts_with("shard "))
        .collect();
    assert_eq!(lines.len(), 3, "{}", r.stdout);
    assert!(lines[0].contains("layers 0.."), "{}", lines[0]);
    assert!(
        lines[2].ends_with("MiB peak") && lines[2].contains("..6:"),
        "{}",
        lines[2]
    );
    let r = awq(&j.args(&out, &["--dry-run", "--shards", "7"]));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("use at most 6 shards"), "{}", r.stderr);

    // A shard's plan estimates its own range's time, not the whole model's (it did).
    let seconds = |extra: &[&str]| -> f64 {
        let mut args = vec!["--dry-run", "--json"];
        args.extend(extra);
        let r = awq(&j.args(&out, &args));
        assert_eq!(r.code, 0, "{}", r.stderr);
        (r.stdout.lines())
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find_map(|v| v.get("plan")?.get("seconds_estimate")?.as_f64())
            .unwrap_or_else(|| panic!("no plan in {}", r.stdout))
    };
    let (whole, first) = (seconds(&[]), seconds(&["--shard", "0/3"]));
    assert!(first < 0.7 * whole, "shard 0/3 {first} s, whole {whole} s");

    // --shard auto under a Slurm array (1-based indices) writes the shard of its task.
    let d = j.dir("auto");
    let o = std::process::Command::new(assert_cmd::cargo::cargo_bin("awq"))
        .args(j.args(&d, &["--shard", "auto"]))
        .env("SLURM_ARRAY_TASK_ID", "3")
        .env("SLURM_ARRAY_TASK_MIN", "1")
        .env("SLURM_ARRAY_TASK_COUNT", "3")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["layers"][1], 6);
    let r = awq(&j.args(&j.dir("x"), &["--shard", "auto"]));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("SLURM_ARRAY_TASK_ID"), "{}", r.stderr);
}

/// A shard killed with SIGKILL mid-range continues on rerun (the same command) to the bytes of
/// an uninterrupted shard; a second process never writes the same shard meanwhile.
#[test]
fn a_killed_shard_resumes_to_the_same_bytes() {
    let Some(model) = common::test_model("a_killed_shard_resumes_to_the_same_bytes") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let calib = common::data("wikitext-2-raw/wiki.valid.calib.txt");
    let args = |out: &Path| -> Vec<String> {
        [
            "quantize",
            "--model",
            path(&model),
            "--group",
            "64",
            "--calib",
            path(&calib),
            "--seqlen",
            "64",
            "--max-blocks",
            "2",
            "--layers",
            "2..12",
            "-o",
            path(out),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let reference = tmp.path().join("reference");
    let o = std::process::Command::new(assert_cmd::cargo::cargo_bin("awq"))
        .args(args(&reference))
        .arg("-q")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let out = tmp.path().join("killed");
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("awq"))
        .args(args(&out))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.contains("layer 4/30") => break,
            Some(_) => {}
            None => panic!("the shard ended before layer 4"),
        }
    }
    // While it runs, a second process for the same shard is refused.
    let r = Run::of(Command::cargo_bin("awq").unwrap().args(args(&out)));
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("another awq process"), "{}", r.stderr);
    child.kill().unwrap();
    child.wait().unwrap();
    let staging = tmp.path().join(".killed.awq-staging");
    assert!(staging.join(".parts/layer-00003.json").is_file());
    let r = Run::of(Command::cargo_bin("awq").unwrap().args(args(&out)));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("resuming"), "{}", r.stderr);
    // The parts, byte for byte (the records hold timings).
    let parts = |d: &Path| -> Vec<(String, Vec<u8>)> {
        files(&d.join("layers"))
            .into_iter()
            .filter(|(n, _)| n.ends_with(".safetensors"))
            .collect()
    };
    let (a, b) = (parts(&out), parts(&reference));
    assert_eq!(a.len(), 10);
    assert!(a == b, "the resumed shard's parts differ");
}

/// The activation hand-off: 2 capture jobs write the boundaries of 3 shards, the shards start
/// from them (no prefix forward), and the merge is still the single run's bytes. Captures made
/// for another shard count are refused, naming the mismatch.
#[test]
fn handed_over_activations_give_the_same_bytes() {
    let j = job();
    let single = j.dir("single");
    let r = awq(&j.args(&single, &[]));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let act = j.dir("act");
    for part in ["0/2", "1/2"] {
        let d = act.join(&part[..1]);
        let r = awq(&j.args(&d, &["--capture", part, "--shards", "3"]));
        assert_eq!(r.code, 0, "{}", r.stderr);
    }
    let shards: Vec<PathBuf> = (0..3).map(|k| j.dir(&format!("s{k}"))).collect();
    for (k, d) in shards.iter().enumerate() {
        let spec = format!("{k}/3");
        let r = awq(&j.args(d, &["--shard", &spec, "--activations", path(&act)]));
        assert_eq!(r.code, 0, "{}", r.stderr);
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.join("manifest.json")).unwrap()).unwrap();
        assert!(m["prefix_seconds"].as_f64().unwrap() < 0.01, "{m}");
    }
    let merged = j.dir("merged");
    let r = merge(&shards, &merged, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(files(&merged), files(&single));

    let r = awq(&j.args(
        &j.dir("x"),
        &["--shard", "1/2", "--activations", path(&act)],
    ));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("no boundary at layer 3"), "{}", r.stderr);
    assert!(r.stderr.contains("--shards 3"), "{}", r.stderr);
}

/// A shard's progress counts down to the end of its range: its last layer has no ETA.
#[test]
fn a_shards_eta_ends_with_its_range() {
    let j = job();
    let out = j.dir("s");
    let args: Vec<&str> = j
        .args(&out, &["--layers", "0..3"])
        .into_iter()
        .filter(|a| *a != "-q")
        .collect();
    let r = awq(&args);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let lines: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("[awq] layer "))
        .collect();
    assert_eq!(lines.len(), 3, "{}", r.stderr);
    assert!(lines[1].contains("ETA"), "{}", lines[1]);
    assert!(!lines[2].contains("ETA"), "{}", lines[2]);
}

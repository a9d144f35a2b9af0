//! The Slurm path for real: a one-node cluster (examples/slurm/cluster.sh: munge, slurmctld,
//! slurmd on this machine), the job array of 3 shards plus the merge submitted with
//! `--dependency=afterok` (examples/slurm/submit.sh), on the real test model; the merged
//! checkpoint is compared byte for byte with a single-process run. Skipped, saying so, where it
//! cannot run: not root, no apt-get and no Slurm, or no AWQ_TEST_MODEL.

mod common;

use std::path::Path;
use std::process::Command;

fn skip(why: &str) {
    eprintln!("slurm_array_and_merge_match_a_single_run: skipped ({why})");
}

fn has(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

use common::files_but_report as files;

#[test]
fn slurm_array_and_merge_match_a_single_run() {
    let Some(model) = common::test_model("slurm_array_and_merge_match_a_single_run") else {
        return;
    };
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        return skip("not root: the cluster needs munge and slurmd run as root");
    }
    if !has("sbatch") && !has("apt-get") {
        return skip("no Slurm and no apt-get to install it");
    }
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/slurm");
    let up = Command::new("timeout")
        .args(["600", "bash"])
        .arg(examples.join("cluster.sh"))
        .output()
        .unwrap();
    if !up.status.success() {
        return skip(&format!(
            "the one-node cluster did not come up: {}",
            String::from_utf8_lossy(&up.stderr)
        ));
    }
    let awq = assert_cmd::cargo::cargo_bin("awq");
    let calib = common::data("wikitext-2-raw/wiki.valid.calib.txt");
    let args = format!(
        "--group 64 --seqlen 64 --max-blocks 2 -q --calib {}",
        calib.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("job");
    // Bounded: a cluster that never schedules the jobs fails the test instead of hanging CI.
    let o = Command::new("timeout")
        .args(["900", "bash"])
        .arg(examples.join("submit.sh"))
        .env("AWQ", &awq)
        .env("MODEL", &model)
        .env("OUT", &out)
        .env("N", "3")
        .env("AWQ_ARGS", &args)
        .env("WAIT", "1")
        .output()
        .unwrap();
    let logs: String = std::fs::read_dir(&out)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
                .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        o.status.success(),
        "{}{}\n{logs}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let merged = out.join("model-awq");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(merged.join("quantization_report.json")).unwrap())
            .unwrap();
    assert_eq!(report["shards"].as_array().unwrap().len(), 3, "{logs}");

    let single = tmp.path().join("single");
    let mut cmd = Command::new(&awq);
    cmd.args(["quantize", "--model"])
        .arg(&model)
        .args(args.split(' '))
        .arg("-o")
        .arg(&single);
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(files(&merged) == files(&single), "merged != single run");
}

//! Where the output may go, checked before any work: never onto an input, never over something
//! we did not write.
//!
//! Why: `--force` used to replace whatever sat at `-o`, so `-o` equal to the model directory, or
//! to its parent, destroyed the source (and its siblings). The rules here are the whole contract:
//! the output must not equal, contain or lie inside the model directory, and must not equal or
//! contain any other input file (calibration, evaluation text; symlinks resolved, so a Hub
//! cache's blobs count); an existing output is replaced (with `--force`) only when it is empty
//! or was written by `awq` (it holds `quantization_report.json`, or a `config.json` with an AWQ
//! `quantization_config`).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// `path` made absolute with symlinks resolved, also when it (or its tail) does not exist yet:
/// the longest existing ancestor is canonicalized and the rest appended.
pub fn resolve(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    let mut tail = Vec::new();
    let mut cur = abs.as_path();
    loop {
        if let Ok(c) = cur.canonicalize() {
            let mut out = c;
            for part in tail.iter().rev() {
                out.push(part);
            }
            return out;
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                tail.push(name.to_os_string());
                cur = parent;
            }
            // `..` or the root: keep it as given.
            _ => return abs,
        }
    }
}

/// Refuses (exit 2) an output that equals, contains or lies inside `model_dir`, or that equals
/// or contains one of `inputs` (files; each is also checked through its symlink target).
pub fn check_location(output: &Path, model_dir: &Path, inputs: &[PathBuf]) -> Result<()> {
    let out = resolve(output);
    let model = resolve(model_dir);
    let refuse = |what: String| {
        Err(Error::Usage(format!(
            "refusing to write the output to {}: it {what}; choose an output directory outside the \
             model and the input files (e.g. {}-awq beside the model)",
            output.display(),
            model_dir
                .file_name()
                .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned())
        )))
    };
    if out == model {
        return refuse(format!("is the model directory {}", model_dir.display()));
    }
    if out.starts_with(&model) {
        return refuse(format!(
            "lies inside the model directory {}",
            model_dir.display()
        ));
    }
    if model.starts_with(&out) {
        return refuse(format!(
            "contains the model directory {}",
            model_dir.display()
        ));
    }
    for input in inputs {
        let real = resolve(input);
        if real.starts_with(&out) || input.starts_with(output) {
            let verb = if real == out { "is" } else { "contains" };
            return refuse(format!("{verb} the input file {}", input.display()));
        }
    }
    Ok(())
}

/// The regular files of `dir` (not recursive), for [`check_location`].
pub fn files_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default()
}

/// The report every awq output holds; its `output_files` lists what the run wrote.
pub const REPORT_FILE: &str = "quantization_report.json";

/// What an existing output path holds, for the decision to replace it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Existing {
    Absent,
    /// An empty directory.
    Empty,
    /// A directory written by `awq` (or another AWQ quantizer): safe to replace with `--force`.
    AwqOutput,
    /// Anything else, described for the message (a few entry names, or "a file").
    Other(String),
}

/// Classifies `output` (see [`Existing`]).
pub fn existing(output: &Path) -> Existing {
    let Ok(meta) = std::fs::symlink_metadata(output) else {
        return Existing::Absent;
    };
    if !meta.is_dir() {
        return Existing::Other(if meta.is_symlink() {
            "a symbolic link".into()
        } else {
            "a file".into()
        });
    }
    let mut names: Vec<String> = std::fs::read_dir(output)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    if names.is_empty() {
        return Existing::Empty;
    }
    if let Some(written) = files_written(output) {
        let extra: Vec<&String> = names.iter().filter(|n| !written.contains(n)).collect();
        if extra.is_empty() {
            return Existing::AwqOutput;
        }
        return Existing::Other(format!(
            "an earlier awq output with files it did not write: {}",
            extra
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if output.join(REPORT_FILE).is_file() || is_awq_config(output) || is_shard(output) {
        return Existing::AwqOutput;
    }
    names.sort();
    let shown: Vec<&str> = names.iter().take(5).map(String::as_str).collect();
    let more = names.len().saturating_sub(shown.len());
    Existing::Other(format!(
        "a directory holding {}{}",
        shown.join(", "),
        if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        }
    ))
}

/// Where a checkpoint that failed the quality gate is kept: `OUT.rejected` beside `-o`, so
/// that `-o` only ever holds what passed.
pub fn rejected_path(output: &Path) -> PathBuf {
    let mut name = output.as_os_str().to_owned();
    name.push(".rejected");
    PathBuf::from(name)
}

/// The resume fingerprint recorded in the report of the awq output at `dir` (`None` for
/// outputs of older versions, other tools, or anything else).
/// A shard directory's is its manifest's, with its layer range (as its staging recorded it).
pub fn recorded_fingerprint(dir: &Path) -> Option<serde_json::Value> {
    if let Some(manifest) = shard_manifest(dir) {
        let mut fp = manifest.get("fingerprint")?.clone();
        fp.as_object_mut()?
            .insert("layers".into(), manifest.get("layers")?.clone());
        return Some(fp);
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(REPORT_FILE)).ok()?).ok()?;
    report.get("fingerprint").cloned()
}

/// The manifest of a shard directory written by `awq quantize --shard` (`None` for anything
/// else).
fn shard_manifest(dir: &Path) -> Option<serde_json::Value> {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(crate::quantize::shard::MANIFEST)).ok()?)
            .ok()?;
    (m.get("kind")?.as_str()? == crate::quantize::shard::MANIFEST_KIND).then_some(m)
}

/// `output_files` of the report in `dir` (absent in outputs of older versions and other tools).
fn files_written(dir: &Path) -> Option<Vec<String>> {
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(REPORT_FILE)).ok()?).ok()?;
    report
        .get("output_files")?
        .as_array()?
        .iter()
        .map(|v| v.as_str().map(str::to_string))
        .collect()
}

/// A shard directory holds its manifest and its `layers/` only.
fn is_shard(dir: &Path) -> bool {
    let only_ours = std::fs::read_dir(dir).is_ok_and(|rd| {
        rd.filter_map(|e| e.ok()).all(|e| {
            let n = e.file_name();
            n == crate::quantize::shard::MANIFEST || n == crate::quantize::shard::LAYERS_DIR
        })
    });
    only_ours && shard_manifest(dir).is_some()
}

fn is_awq_config(dir: &Path) -> bool {
    std::fs::read(dir.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|c| {
            c.get("quantization_config")?
                .get("quant_method")?
                .as_str()
                .map(|m| m == "awq")
        })
        .unwrap_or(false)
}

/// What a run that did not publish left at `output`, for its message: an absent output stays
/// absent, an existing one is untouched.
pub fn untouched(output: &Path) -> &'static str {
    match existing(output) {
        Existing::Absent => "nothing was written there",
        _ => "what was there is unchanged",
    }
}

/// Refuses (exit 4) an existing output unless it is an empty directory (a pre-created `-o`,
/// the `mktemp -d` pattern) or `force` is given and [`existing`] says it is an earlier AWQ
/// output.
pub fn check_replaceable(output: &Path, force: bool) -> Result<()> {
    let found = existing(output);
    match (&found, force) {
        (Existing::Absent | Existing::Empty, _) => Ok(()),
        (Existing::AwqOutput, true) => Ok(()),
        (Existing::AwqOutput, false) => Err(Error::OutputExists(format!(
            "{} already exists; pass --force to replace it, or --skip-existing to keep it when \
             it was made from the same model, calibration and options",
            output.display()
        ))),
        (Existing::Other(what), _) => Err(Error::OutputExists(format!(
            "{} already exists and is {what}; --force replaces only an earlier awq output \
             holding just the files it wrote (an empty directory is used as is; it never deletes \
             anything else) — choose another -o, or move those files away",
            output.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_inside_equal_or_around_the_model_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let model = tmp.path().join("m");
        std::fs::create_dir(&model).unwrap();
        std::fs::write(model.join("config.json"), "{}").unwrap();
        let inputs = files_in(&model);
        for out in [model.clone(), model.join("q"), tmp.path().to_path_buf()] {
            let err = check_location(&out, &model, &inputs).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{}", out.display());
        }
        // A relative spelling of the same place is recognised.
        let rel = model.join("..").join("m");
        assert!(check_location(&rel, &model, &inputs).is_err());
        assert!(check_location(&tmp.path().join("m-awq"), &model, &inputs).is_ok());
    }

    #[test]
    fn output_equal_to_an_input_file_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let model = tmp.path().join("m");
        std::fs::create_dir(&model).unwrap();
        let calib = tmp.path().join("data").join("calib.txt");
        std::fs::create_dir(calib.parent().unwrap()).unwrap();
        std::fs::write(&calib, "x").unwrap();
        let inputs = [calib.clone()];
        assert!(check_location(&calib, &model, &inputs).is_err());
        assert!(check_location(calib.parent().unwrap(), &model, &inputs).is_err());
        assert!(check_location(&tmp.path().join("out"), &model, &inputs).is_ok());
    }

    #[test]
    fn force_replaces_only_empty_or_awq_outputs() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("o");
        assert!(check_replaceable(&out, false).is_ok());
        // A pre-created empty directory (`mktemp -d`) needs no --force.
        std::fs::create_dir(&out).unwrap();
        assert!(check_replaceable(&out, false).is_ok());
        assert!(check_replaceable(&out, true).is_ok());
        std::fs::write(out.join("notes.txt"), "mine").unwrap();
        let err = check_replaceable(&out, true).unwrap_err().to_string();
        assert!(
            err.contains("notes.txt") && err.contains("--force replaces only"),
            "{err}"
        );
        std::fs::write(
            out.join("config.json"),
            r#"{"quantization_config": {"quant_method": "awq"}}"#,
        )
        .unwrap();
        assert!(check_replaceable(&out, true).is_ok());
        // Our own output, plus a file the user added: refused, naming it.
        std::fs::remove_file(out.join("notes.txt")).unwrap();
        std::fs::write(
            out.join(REPORT_FILE),
            r#"{"output_files": ["config.json", "quantization_report.json"]}"#,
        )
        .unwrap();
        assert!(check_replaceable(&out, true).is_ok());
        // Without --force: both ways on are named (the new-user trial looked for the second).
        let err = check_replaceable(&out, false).unwrap_err().to_string();
        assert!(
            err.contains("--force") && err.contains("--skip-existing"),
            "{err}"
        );
        std::fs::write(out.join("my-notes.txt"), "keep me").unwrap();
        let err = check_replaceable(&out, true).unwrap_err().to_string();
        assert!(
            err.contains("files it did not write: my-notes.txt"),
            "{err}"
        );
    }
}

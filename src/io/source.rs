//! Where a model comes from: a local directory, or a Hugging Face Hub id resolved into the
//! standard cache. We honour `HF_HOME`, `HF_HUB_CACHE`, `HF_TOKEN`, `HF_ENDPOINT` and
//! `HF_HUB_OFFLINE` ourselves because hf-hub reads only some of them. Offline (or on a cache hit)
//! no network is touched: the cache layout is `models--org--name/{refs/REV, snapshots/COMMIT/}`.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::input_err;

/// Files the tool needs from a model repository.
pub const REQUIRED: [&str; 2] = ["config.json", "tokenizer.json"];
/// Files copied to the output when present (fetched by name when the repository listing fails;
/// the last three are a vision-language model's processor files).
pub const COMPANIONS: [&str; 9] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "tokenizer.model",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
];

/// Resolves `--model` to a local directory holding config, tokenizer and weights.
///
/// A path that exists is never a Hub id: a file (`dir/model.safetensors`, `x.gguf`) is refused
/// (exit 3) saying what it is and what `--model` wants, instead of being fetched online.
pub fn resolve(model: &str, revision: Option<&str>) -> Result<PathBuf> {
    let path = Path::new(model);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if path.exists() {
        return Err(not_a_model_dir(path));
    }
    let weight_file = [".safetensors", ".gguf", ".bin", ".pt", ".pth"]
        .iter()
        .any(|e| model.to_ascii_lowercase().ends_with(e));
    // `d/nosuch` where `d/` is a local directory: a mistyped path, not a Hub id (retrying a
    // download would never fix it).
    let local_parent = path
        .parent()
        .is_some_and(|p| p.is_dir() && p != Path::new(""));
    if local_parent && !weight_file {
        return Err(input_err!(
            "model directory {model} does not exist ({} is a local directory, so this is taken \
             as a path, not a Hub id); check the path",
            path.parent()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        ));
    }
    if !looks_like_hub_id(model) || weight_file {
        return Err(input_err!(
            "model directory {model} does not exist (pass a local directory holding config.json, \
             tokenizer.json and the safetensors weights, or a Hub id like org/name)"
        ));
    }
    let revision = revision.unwrap_or("main");
    let cache = hub_cache_dir();
    if let Some(dir) = cached_snapshot(&cache, model, revision)? {
        return Ok(dir);
    }
    if env_flag("HF_HUB_OFFLINE") {
        return Err(input_err!(
            "{model}@{revision} is not complete in the Hub cache {} and HF_HUB_OFFLINE is set; {}",
            cache.display(),
            missing_description(&cache, model, revision)
        ));
    }
    crate::interrupt::immediate(|| download(&cache, model, revision))
}

/// The error for an existing `--model` path that is not a directory.
fn not_a_model_dir(path: &Path) -> Error {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let what = match ext.as_str() {
        "safetensors" => "a safetensors weight file",
        "gguf" => {
            "a GGUF file (awq reads Hugging Face safetensors checkpoints; convert it to a \
                   transformers directory first, e.g. transformers' from_pretrained(..., \
                   gguf_file=...) then save_pretrained)"
        }
        "bin" | "pt" | "pth" => "a PyTorch weight file",
        "json" => "a JSON file",
        _ => "a file",
    };
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| ".".to_string(), |p| p.display().to_string());
    input_err!(
        "--model {} is {what}, not a model directory; --model wants the directory holding \
         config.json, tokenizer.json and the safetensors weights (here perhaps {parent}), or a \
         Hub id like org/name",
        path.display()
    )
}

fn looks_like_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

fn env_flag(name: &str) -> bool {
    std::env::var(name)
        .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn hub_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(home) = std::env::var_os("HF_HOME") {
        return PathBuf::from(home).join("hub");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache").join("huggingface").join("hub")
}

fn repo_dir(cache: &Path, model: &str) -> PathBuf {
    cache.join(format!("models--{}", model.replace('/', "--")))
}

/// The snapshot directory for `revision` (a branch/tag via `refs/`, or a commit hash).
fn snapshot_dir(cache: &Path, model: &str, revision: &str) -> Option<PathBuf> {
    snapshot_in(&repo_dir(cache, model), revision)
}

/// The snapshot directory of a cached repository (`models--…` or `datasets--…`) for `revision`.
fn snapshot_in(repo: &Path, revision: &str) -> Option<PathBuf> {
    let commit = if revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit()) {
        revision.to_string()
    } else {
        std::fs::read_to_string(repo.join("refs").join(revision))
            .ok()?
            .trim()
            .to_string()
    };
    let dir = repo.join("snapshots").join(commit);
    dir.is_dir().then_some(dir)
}

/// Files still missing from a snapshot for it to be usable (config, tokenizer, all shards).
fn missing_files(dir: &Path) -> Vec<String> {
    let mut missing: Vec<String> = REQUIRED
        .iter()
        .filter(|f| !dir.join(f).is_file())
        .map(|f| f.to_string())
        .collect();
    let index = dir.join(super::reader::INDEX_FILE);
    if index.is_file() {
        if let Ok(shards) = index_shards(&index) {
            missing.extend(shards.into_iter().filter(|s| !dir.join(s).is_file()));
        }
    } else if !dir.join(super::reader::SINGLE_FILE).is_file() {
        missing.push(format!(
            "{} (or {})",
            super::reader::SINGLE_FILE,
            super::reader::INDEX_FILE
        ));
    }
    missing
}

fn cached_snapshot(cache: &Path, model: &str, revision: &str) -> Result<Option<PathBuf>> {
    Ok(snapshot_dir(cache, model, revision).filter(|d| missing_files(d).is_empty()))
}

fn missing_description(cache: &Path, model: &str, revision: &str) -> String {
    match snapshot_dir(cache, model, revision) {
        None => format!(
            "no snapshot for revision {revision} under {}",
            repo_dir(cache, model).display()
        ),
        Some(dir) => format!(
            "missing in {}: {}",
            dir.display(),
            missing_files(&dir).join(", ")
        ),
    }
}

fn index_shards(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::input_io(index, e))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| input_err!("{} is not valid JSON: {e}", index.display()))?;
    let mut shards: Vec<String> = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.values()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    shards.sort();
    shards.dedup();
    Ok(shards)
}

/// A Hub client on `cache` with `HF_TOKEN` and `HF_ENDPOINT` applied.
fn hub_api(cache: &Path) -> Result<hf_hub::api::sync::Api> {
    let mut builder = hf_hub::api::sync::ApiBuilder::new()
        .with_cache_dir(cache.to_path_buf())
        .with_progress(false)
        .with_token(std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()));
    if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
        builder = builder.with_endpoint(endpoint);
    }
    builder
        .build()
        .map_err(|e| Error::Runtime(format!("cannot set up the Hub client: {e}")))
}

fn download(cache: &Path, model: &str, revision: &str) -> Result<PathBuf> {
    use hf_hub::{Repo, RepoType};
    let api = hub_api(cache)?;
    let repo = api.repo(Repo::with_revision(
        model.to_string(),
        RepoType::Model,
        revision.to_string(),
    ));
    let fetch = |file: &str| {
        repo.get(file).map_err(|e| {
            hub_error(
                e,
                &format!("cannot download {file} of {model}@{revision}"),
                "check the id and --revision, or set HF_TOKEN if it is private or gated",
            )
        })
    };
    let config = match fetch("config.json") {
        Err(Error::Input(m)) => {
            return Err(not_a_transformers_repo(&repo, model).unwrap_or(Error::Input(m)))
        }
        other => other?,
    };
    fetch("tokenizer.json")?;
    // transformers reads model.safetensors when it exists, the index only otherwise.
    if let Err(e) = fetch(super::reader::SINGLE_FILE) {
        if matches!(e, Error::Network(_)) {
            return Err(e);
        }
        let index = fetch(super::reader::INDEX_FILE)?;
        for shard in index_shards(&index)? {
            fetch(&shard)?;
        }
    }
    // Every top-level non-weight file (copied to the output verbatim); optional, so a failed
    // listing falls back to the well-known names.
    let listed: Vec<String> = repo
        .info()
        .map(|info| info.siblings.into_iter().map(|s| s.rfilename).collect())
        .unwrap_or_else(|_| COMPANIONS.iter().map(|s| s.to_string()).collect());
    for name in listed
        .iter()
        .filter(|n| !n.contains('/') && super::writer::is_companion(n))
    {
        let _ = repo.get(name);
    }
    Ok(config.parent().unwrap_or(cache).to_path_buf())
}

/// A Hub dataset named by `--calib`: `org/name`, `org/name:split` or `org/name:config/split`.
/// The split defaults to `train` (what AutoAWQ's `calib_data.py` loads when given a dataset name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetSpec {
    /// `org/name`.
    pub id: String,
    /// The configuration (subset) directory, when several configs have the split.
    pub config: Option<String>,
    /// The split, e.g. `train` or `validation`.
    pub split: String,
}

/// Revisions searched for a dataset's parquet files, in order: the repository itself, then the
/// Hub's automatic parquet conversion.
pub const DATASET_REVISIONS: [&str; 2] = ["main", "refs/convert/parquet"];

/// Extensions that make `org/name.ext` a (missing) file rather than a Hub dataset id.
const FILE_EXTENSIONS: [&str; 7] = [
    ".txt", ".json", ".jsonl", ".parquet", ".csv", ".md", ".text",
];

impl DatasetSpec {
    /// Parses a dataset id with an optional `:split` or `:config/split`; `None` when `s` does not
    /// look like one (then it is a file path).
    pub fn parse(s: &str) -> Option<Self> {
        let (id, rest) = match s.split_once(':') {
            Some((id, rest)) => (id, Some(rest)),
            None => (s, None),
        };
        let lower = id.to_ascii_lowercase();
        if !looks_like_hub_id(id) || FILE_EXTENSIONS.iter().any(|e| lower.ends_with(e)) {
            return None;
        }
        let (config, split) = match rest.map(|r| r.rsplit_once('/').unwrap_or(("", r))) {
            None => (None, "train"),
            Some(("", split)) => (None, split),
            Some((config, split)) => (Some(config.to_string()), split),
        };
        let valid = |p: &str| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        (valid(split) && config.as_deref().is_none_or(valid)).then(|| DatasetSpec {
            id: id.to_string(),
            config,
            split: split.to_string(),
        })
    }

    /// The parquet files of this split among `files` (paths relative to the repository, `/`
    /// separated), sorted; `Ok(None)` when there are none. Several configs with this split and
    /// no config chosen is an error naming them.
    pub fn pick(&self, files: &[String]) -> Result<Option<Vec<String>>> {
        let mut by_config: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for f in files {
            if let Some(config) = self.config_of(f) {
                by_config.entry(config).or_default().push(f.clone());
            }
        }
        if let Some(want) = &self.config {
            by_config.retain(|c, _| c == want || c.ends_with(&format!("/{want}")));
        }
        match by_config.len() {
            0 => Ok(None),
            1 => Ok(by_config.into_values().next()),
            _ => Err(input_err!(
                "{self}: several configs have a {split} split: {}; choose one with --calib {id}:CONFIG/{split}",
                by_config.keys().cloned().collect::<Vec<_>>().join(", "),
                split = self.split,
                id = self.id
            )),
        }
    }

    /// For a parquet file of this split, the path before the split marker (its config): the
    /// split is a directory (`default/train/0000.parquet`) or a file-name prefix
    /// (`data/train-00000-of-00001.parquet`, `train.parquet`).
    fn config_of(&self, file: &str) -> Option<String> {
        if !file.ends_with(".parquet") {
            return None;
        }
        let parts: Vec<&str> = file.split('/').collect();
        let (name, dirs) = parts.split_last()?;
        let stem = name.trim_end_matches(".parquet");
        let at = dirs.iter().position(|d| *d == self.split).or_else(|| {
            let rest = stem.strip_prefix(self.split.as_str())?;
            (rest.is_empty() || rest.starts_with(['-', '_', '.'])).then_some(dirs.len())
        })?;
        Some(dirs[..at].join("/"))
    }
}

impl std::fmt::Display for DatasetSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.config {
            Some(c) => write!(f, "{}:{c}/{}", self.id, self.split),
            None => write!(f, "{}:{}", self.id, self.split),
        }
    }
}

/// The local parquet files of a Hub dataset split, from the cache (`datasets--org--name/`, the
/// same layout and environment variables as models) or downloaded when online. Offline and not
/// cached is [`Error::Input`] naming what is missing.
pub fn resolve_dataset(spec: &DatasetSpec) -> Result<Vec<PathBuf>> {
    let cache = hub_cache_dir();
    let repo = cache.join(format!("datasets--{}", spec.id.replace('/', "--")));
    for revision in DATASET_REVISIONS {
        let Some(dir) = snapshot_in(&repo, revision) else {
            continue;
        };
        if let Some(files) = spec.pick(&relative_files(&dir))? {
            return Ok(files.iter().map(|f| dir.join(f)).collect());
        }
    }
    if env_flag("HF_HUB_OFFLINE") {
        return Err(input_err!(
            "{spec}: no such file, and the Hub dataset is not in the cache {} while HF_HUB_OFFLINE is set; \
             missing: parquet files of split {} in {}/snapshots (revision main or refs/convert/parquet)",
            cache.display(),
            spec.split,
            repo.display()
        ));
    }
    crate::interrupt::immediate(|| download_dataset(&cache, spec))
}

/// Every file under `dir` (following links, at most 8 levels), relative and `/` separated.
fn relative_files(dir: &Path) -> Vec<String> {
    fn walk(dir: &Path, prefix: &str, depth: usize, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let rel = format!("{prefix}{name}");
            let path = e.path();
            if path.is_dir() && depth < 8 {
                walk(&path, &format!("{rel}/"), depth + 1, out);
            } else if path.is_file() {
                out.push(rel);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, "", 0, &mut out);
    out.sort();
    out
}

/// The ways out of a Hub dataset that cannot be fetched, for error messages.
const DATASET_WAYS_OUT: &str = "set HF_HUB_OFFLINE=1 to use only the local Hub cache, \
     or pass a local file (--calib data.jsonl, .parquet, .txt)";

/// A failed Hub request as an error of the right kind: the Hub's "no such repository, file or
/// revision" and "not authorised" answers (HTTP 401, 403, 404) are [`Error::Input`] with
/// `fix`; a local failure (writing the cache, its lock) is [`Error::Runtime`]; everything else
/// — DNS, connection, TLS, timeouts, HTTP 429 and 5xx, a broken answer — is [`Error::Network`]
/// (exit 6), which a job may retry.
fn hub_error(e: hf_hub::api::sync::ApiError, what: &str, fix: &str) -> Error {
    use hf_hub::api::sync::ApiError;
    let text = e.to_string();
    let status = match e {
        ApiError::IoError(_) | ApiError::LockAcquisition(_) => {
            return Error::Runtime(format!(
                "{what}: {text} (writing the Hub cache {})",
                hub_cache_dir().display()
            ))
        }
        ApiError::RequestError(err) => (*err).into_response().map(|r| r.status()),
        _ => None,
    };
    match status {
        Some(s @ (401 | 403 | 404)) => input_err!("{what}: HTTP {s} ({text}); {fix}"),
        _ => Error::Network(format!(
            "{what}: {text}; the network or the Hub failed (exit 6: retrying may help; check \
             HF_ENDPOINT and proxies, or set HF_HUB_OFFLINE=1 to use only the local cache)"
        )),
    }
}

/// A repository without `config.json`: what its listing holds instead (GGUF, PyTorch `.bin`),
/// so the message says what the repository is rather than only "HTTP 404".
fn not_a_transformers_repo(repo: &hf_hub::api::sync::ApiRepo, model: &str) -> Option<Error> {
    let files: Vec<String> = repo
        .info()
        .ok()?
        .siblings
        .into_iter()
        .map(|s| s.rfilename)
        .collect();
    let gguf = files
        .iter()
        .find(|f| f.to_ascii_lowercase().ends_with(".gguf"))?;
    Some(input_err!(
        "{model} is a GGUF repository (e.g. {gguf}) without config.json; awq reads Hugging Face \
         safetensors checkpoints: quantize the original model's repository instead, or convert \
         the GGUF file to a transformers directory first (transformers' \
         from_pretrained(..., gguf_file=...) then save_pretrained)"
    ))
}

/// Why a dataset revision's file listing failed.
enum ListingError {
    /// HTTP 401 or 404: no such repository or revision (the Hub answers 401 for a repository
    /// that does not exist, or is private, without a token).
    NotFound(u16),
    /// Anything else (DNS, connection, TLS, another HTTP status, a bad answer), as text.
    Failed(String),
}

fn listing_error(e: hf_hub::api::sync::ApiError) -> ListingError {
    let text = e.to_string();
    match e {
        hf_hub::api::sync::ApiError::RequestError(err) => match (*err).into_response() {
            Some(r) if matches!(r.status(), 401 | 404) => ListingError::NotFound(r.status()),
            _ => ListingError::Failed(text),
        },
        _ => ListingError::Failed(text),
    }
}

/// Downloads the parquet files of a dataset split. A failed listing that is not "not found"
/// (no network, a Hub error) is reported as such; "no parquet files of split X" only when a
/// listing succeeded and had none.
fn download_dataset(cache: &Path, spec: &DatasetSpec) -> Result<Vec<PathBuf>> {
    use hf_hub::{Repo, RepoType};
    let api = hub_api(cache)?;
    let mut listed = Vec::new();
    let mut not_found = Vec::new();
    for revision in DATASET_REVISIONS {
        let repo = api.repo(Repo::with_revision(
            spec.id.clone(),
            RepoType::Dataset,
            revision.to_string(),
        ));
        let info = match repo.info().map_err(listing_error) {
            Ok(info) => info,
            Err(ListingError::NotFound(status)) => {
                not_found.push(format!("{revision}: HTTP {status}"));
                continue;
            }
            Err(ListingError::Failed(e)) => {
                return Err(Error::Network(format!(
                    "{spec}: no such file, and the Hub dataset {} could not be listed \
                     (revision {revision}): {e}; the network or the Hub failed (exit 6: \
                     retrying may help; check HF_ENDPOINT), or {DATASET_WAYS_OUT}",
                    spec.id
                )))
            }
        };
        listed.push(revision);
        let names: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
        if let Some(files) = spec.pick(&names)? {
            return files
                .iter()
                .map(|f| {
                    repo.get(f).map_err(|e| {
                        hub_error(
                            e,
                            &format!("cannot download {f} of dataset {}@{revision}", spec.id),
                            DATASET_WAYS_OUT,
                        )
                    })
                })
                .collect();
        }
    }
    if listed.is_empty() {
        return Err(input_err!(
            "{spec}: no such file, and the Hub has no dataset {} ({}): check the id, \
             or set HF_TOKEN if it is private or gated",
            spec.id,
            not_found.join(", ")
        ));
    }
    Err(input_err!(
        "{spec}: no such file, and the Hub dataset has no parquet files of split {} (looked at revision{} {}); \
         check the id and the split (org/name:split)",
        spec.split,
        if listed.len() > 1 { "s" } else { "" },
        listed.join(" and ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_recognised() {
        assert!(looks_like_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(!looks_like_hub_id("./model"));
        assert!(!looks_like_hub_id("/abs/path"));
        assert!(!looks_like_hub_id("a/b/c"));
        assert!(!looks_like_hub_id("model"));
    }

    #[test]
    fn dataset_specs_parse() {
        let s = DatasetSpec::parse("acme/data").unwrap();
        assert_eq!(
            (s.id.as_str(), s.config, s.split.as_str()),
            ("acme/data", None, "train")
        );
        let s = DatasetSpec::parse("acme/data:validation").unwrap();
        assert_eq!(s.split, "validation");
        let s = DatasetSpec::parse("acme/data:wiki-2/test").unwrap();
        assert_eq!(
            (s.config.as_deref(), s.split.as_str()),
            (Some("wiki-2"), "test")
        );
        assert_eq!(s.to_string(), "acme/data:wiki-2/test");
        for not in [
            "data/calib.txt",
            "a/b.jsonl",
            "./x",
            "x",
            "a/b:",
            "a/b:c d",
            "/a/b",
        ] {
            assert_eq!(DatasetSpec::parse(not), None, "{not}");
        }
    }

    #[test]
    fn dataset_split_files_are_picked() {
        let files: Vec<String> = [
            "README.md",
            "data/train-00000-of-00002.parquet",
            "data/train-00001-of-00002.parquet",
            "data/test-00000-of-00001.parquet",
            "data/training-notes.parquet",
        ]
        .map(String::from)
        .to_vec();
        let spec = DatasetSpec::parse("a/b").unwrap();
        let got = spec.pick(&files).unwrap().unwrap();
        assert_eq!(got, files[1..3].to_vec());
        let converted = vec!["default/train/0000.parquet".to_string()];
        assert_eq!(spec.pick(&converted).unwrap().unwrap(), converted);
        assert_eq!(
            DatasetSpec::parse("a/b:validation")
                .unwrap()
                .pick(&files)
                .unwrap(),
            None
        );
        let configs = vec![
            "x/train-0.parquet".to_string(),
            "y/train-0.parquet".to_string(),
        ];
        let err = spec.pick(&configs).unwrap_err().to_string();
        assert!(
            err.contains("x, y") && err.contains("a/b:CONFIG/train"),
            "{err}"
        );
        let y = DatasetSpec::parse("a/b:y/train")
            .unwrap()
            .pick(&configs)
            .unwrap()
            .unwrap();
        assert_eq!(y, vec!["y/train-0.parquet".to_string()]);
    }
}

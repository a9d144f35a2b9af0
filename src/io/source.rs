//! Where a model comes from: a local directory, or a Hugging Face Hub id resolved into the
//! standard cache. We honour `HF_HOME`, `HF_HUB_CACHE`, `HF_TOKEN`, `HF_ENDPOINT` and
//! `HF_HUB_OFFLINE` ourselves because hf-hub reads only some of them. Offline (or on a cache hit)
//! no network is touched: the cache layout is `models--org--name/{refs/REV, snapshots/COMMIT/}`.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::input_err;

/// Files the tool needs from a model repository.
pub const REQUIRED: [&str; 2] = ["config.json", "tokenizer.json"];
/// Files copied to the output when present.
pub const COMPANIONS: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "tokenizer.model",
];

/// Resolves `--model` to a local directory holding config, tokenizer and weights.
pub fn resolve(model: &str, revision: Option<&str>) -> Result<PathBuf> {
    let path = Path::new(model);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if !looks_like_hub_id(model) {
        return Err(input_err!(
            "model directory {model} does not exist (pass a local directory or a Hub id like org/name)"
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
    download(&cache, model, revision)
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
    let repo = repo_dir(cache, model);
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

fn download(cache: &Path, model: &str, revision: &str) -> Result<PathBuf> {
    use hf_hub::api::sync::ApiBuilder;
    use hf_hub::{Repo, RepoType};
    let mut builder = ApiBuilder::new()
        .with_cache_dir(cache.to_path_buf())
        .with_progress(false)
        .with_token(std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()));
    if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
        builder = builder.with_endpoint(endpoint);
    }
    let api = builder
        .build()
        .map_err(|e| Error::Runtime(format!("cannot set up the Hub client: {e}")))?;
    let repo = api.repo(Repo::with_revision(
        model.to_string(),
        RepoType::Model,
        revision.to_string(),
    ));
    let fetch = |file: &str| {
        repo.get(file)
            .map_err(|e| input_err!("cannot download {file} of {model}@{revision}: {e}"))
    };
    let config = fetch("config.json")?;
    fetch("tokenizer.json")?;
    match fetch(super::reader::INDEX_FILE) {
        Ok(index) => {
            for shard in index_shards(&index)? {
                fetch(&shard)?;
            }
        }
        Err(_) => {
            fetch(super::reader::SINGLE_FILE)?;
        }
    }
    for companion in COMPANIONS {
        // Optional files: absence on the Hub is normal.
        let _ = repo.get(companion);
    }
    Ok(config.parent().unwrap_or(cache).to_path_buf())
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
}

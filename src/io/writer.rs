//! Writing the output checkpoint: safetensors shards with `{"format": "pt"}` metadata and an
//! index when sharded, the patched config.json, companion files, and the staging directory that
//! is renamed into place only when everything is complete.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::Dtype;

use super::reader::{Checkpoint, INDEX_FILE, SINGLE_FILE};
use crate::error::{Error, Result};

/// One tensor ready to be written.
#[derive(Debug, Clone)]
pub struct OutTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl OutTensor {
    pub fn f16(name: String, shape: Vec<usize>, values: &[f32]) -> Self {
        let data = values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        Self {
            name,
            dtype: Dtype::F16,
            shape,
            data,
        }
    }
    pub fn f16_bits(name: String, shape: Vec<usize>, values: &[half::f16]) -> Self {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self {
            name,
            dtype: Dtype::F16,
            shape,
            data,
        }
    }
    pub fn i32(name: String, shape: Vec<usize>, values: &[i32]) -> Self {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self {
            name,
            dtype: Dtype::I32,
            shape,
            data,
        }
    }
}

/// Test hook: with `AWQ_INJECT_ENOSPC_AFTER=N`, writes fail with "no space left on device"
/// once more than N bytes were written — how the tests simulate a disk filling up.
pub const INJECT_ENOSPC_ENV: &str = "AWQ_INJECT_ENOSPC_AFTER";

fn inject_enospc(written: &Path) -> Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static TOTAL: AtomicU64 = AtomicU64::new(0);
    let Some(limit) = std::env::var(INJECT_ENOSPC_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return Ok(());
    };
    let size = std::fs::metadata(written).map_or(0, |m| m.len());
    if TOTAL.fetch_add(size, Ordering::Relaxed) + size > limit {
        return Err(write_err(
            written,
            std::io::Error::from_raw_os_error(28), // ENOSPC
        ));
    }
    Ok(())
}

fn write_err(path: &Path, e: impl std::fmt::Display) -> Error {
    let e = e.to_string();
    let hint = if e.contains("os error 28") {
        "; free some space and rerun (nothing is left at the output path)"
    } else {
        ""
    };
    Error::Runtime(format!("cannot write {}: {e}{hint}", path.display()))
}

fn pt_metadata() -> Option<HashMap<String, String>> {
    Some(HashMap::from([("format".to_string(), "pt".to_string())]))
}

/// Writes `tensors` as one safetensors file with `{"format": "pt"}`.
pub fn write_file(path: &Path, tensors: &[OutTensor]) -> Result<()> {
    let views = tensors
        .iter()
        .map(|t| {
            TensorView::new(t.dtype, t.shape.clone(), &t.data)
                .map(|v| (t.name.clone(), v))
                .map_err(|e| write_err(path, e))
        })
        .collect::<Result<Vec<_>>>()?;
    atomic(path, |tmp| {
        safetensors::serialize_to_file(views, pt_metadata(), tmp).map_err(|e| write_err(path, e))
    })
}

/// Writes through `write(tmp)` and renames `tmp` to `path`, so `path` is either absent or
/// complete even if the process dies mid-write (resume relies on it).
fn atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = PathBuf::from(tmp);
    let result = write(&tmp)
        .and_then(|()| inject_enospc(&tmp))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| write_err(path, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Copies the tensors `names` (in this order) from `parts` into shards of at most `shard_size`
/// bytes in `dir` (greedy, a tensor larger than the limit gets its own shard), plus
/// `model.safetensors.index.json` when there is more than one. Returns the file names.
pub fn write_shards(
    dir: &Path,
    parts: &Checkpoint,
    names: &[String],
    shard_size: u64,
) -> Result<Vec<String>> {
    let mut shards: Vec<Vec<&String>> = vec![Vec::new()];
    let mut current = 0u64;
    let mut total = 0u64;
    for name in names {
        let m = parts.meta(name)?;
        let size = (m.end - m.start) as u64;
        total += size;
        if current > 0 && current + size > shard_size {
            shards.push(Vec::new());
            current = 0;
        }
        shards.last_mut().expect("one shard").push(name);
        current += size;
    }
    let n = shards.len();
    let file_name = |k: usize| {
        if n == 1 {
            SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
        }
    };
    let mut weight_map = serde_json::Map::new();
    for (k, shard) in shards.iter().enumerate() {
        let path = dir.join(file_name(k));
        let views = shard
            .iter()
            .map(|name| {
                let m = parts.meta(name)?;
                let view = TensorView::new(m.dtype, m.shape.clone(), parts.bytes(name)?)
                    .map_err(|e| write_err(&path, e))?;
                Ok(((*name).clone(), view))
            })
            .collect::<Result<Vec<_>>>()?;
        safetensors::serialize_to_file(views, pt_metadata(), &path)
            .map_err(|e| write_err(&path, e))?;
        readable(&path)?;
        for name in shard {
            weight_map.insert((*name).clone(), file_name(k).into());
        }
    }
    if n > 1 {
        weight_map.sort_keys();
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let path = dir.join(INDEX_FILE);
        write_json(&path, &index)?;
    }
    Ok((0..n).map(file_name).collect())
}

/// safetensors creates files 0600; checkpoints are meant to be shared like the other files.
fn readable(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| write_err(path, e))?;
    }
    Ok(())
}

pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| write_err(path, e))?;
    text.push('\n');
    atomic(path, |tmp| {
        std::fs::write(tmp, text).map_err(|e| write_err(path, e))
    })
}

/// The source config.json with `quantization_config` set and `torch_dtype` float16, key order kept.
pub fn patch_config(
    source: &Path,
    quantization_config: serde_json::Value,
) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(source).map_err(|e| Error::input_io(source, e))?;
    let mut cfg: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Input(format!("{} is not valid JSON: {e}", source.display())))?;
    let obj = cfg
        .as_object_mut()
        .ok_or_else(|| Error::Input(format!("{} is not a JSON object", source.display())))?;
    obj.insert("quantization_config".into(), quantization_config);
    obj.insert("torch_dtype".into(), "float16".into());
    Ok(cfg)
}

/// Copies the companion files present in `src` byte for byte; returns their names.
pub fn copy_companions(src: &Path, dst: &Path) -> Result<Vec<String>> {
    let mut copied = Vec::new();
    for name in super::source::COMPANIONS {
        let from = src.join(name);
        if from.is_file() {
            let to = dst.join(name);
            std::fs::copy(&from, &to).map_err(|e| write_err(&to, e))?;
            copied.push(name.to_string());
        }
    }
    Ok(copied)
}

/// A directory beside the output that becomes the output by one rename. Dropped without
/// [`Staging::publish`], it removes itself: a failed run leaves nothing at the output path.
pub struct Staging {
    pub dir: PathBuf,
    target: PathBuf,
    /// Set once published, or when the directory must survive an error (a refused resume).
    keep: bool,
}

/// What [`Staging::open`] found beside the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// No earlier staging directory.
    Fresh,
    /// A staging directory left by a process that no longer runs (killed), removed.
    StaleRemoved(PathBuf),
    /// That directory, kept to resume from (`--resume`).
    Resumed,
}

const OWNER_FILE: &str = "owner.pid";

/// Whether process `pid` still runs (Linux `/proc`; elsewhere every earlier owner counts as
/// gone, which only matters for two concurrent runs on the same output).
fn alive(pid: u32) -> bool {
    pid != std::process::id() && Path::new("/proc").join(pid.to_string()).exists()
}

impl Staging {
    /// The staging directory `.NAME.awq-staging` beside `target`. One left by a killed run is
    /// resumed with `resume`, otherwise removed; one owned by a running process is refused.
    pub fn open(target: &Path, resume: bool) -> Result<(Self, Found)> {
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !parent.is_dir() {
            return Err(Error::Usage(format!(
                "the parent directory of the output, {}, does not exist",
                parent.display()
            )));
        }
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out".into());
        let dir = parent.join(format!(".{name}.awq-staging"));
        let mut found = Found::Fresh;
        if dir.exists() {
            let owner = std::fs::read_to_string(dir.join(OWNER_FILE))
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok());
            if let Some(pid) = owner.filter(|p| alive(*p)) {
                return Err(Error::Runtime(format!(
                    "another awq process (pid {pid}) is writing {}; wait for it, or remove {} if it is not awq",
                    target.display(),
                    dir.display()
                )));
            }
            if resume {
                found = Found::Resumed;
            } else {
                std::fs::remove_dir_all(&dir).map_err(|e| write_err(&dir, e))?;
                found = Found::StaleRemoved(dir.clone());
            }
        }
        if found != Found::Resumed {
            std::fs::create_dir(&dir).map_err(|e| {
                Error::Runtime(format!(
                    "cannot create {} (is the output location writable?): {e}",
                    dir.display()
                ))
            })?;
        }
        let staging = Self {
            dir,
            target: target.to_path_buf(),
            keep: false,
        };
        std::fs::write(staging.dir.join(OWNER_FILE), std::process::id().to_string())
            .map_err(|e| write_err(&staging.dir, e))?;
        Ok((staging, found))
    }

    /// Leaves the directory in place when this value is dropped without publishing.
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// Replaces the target (removed first when `force`) by the staging directory.
    pub fn publish(mut self, force: bool) -> Result<()> {
        if self.target.exists() {
            if !force {
                return Err(Error::OutputExists(format!(
                    "{} already exists; pass --force to replace it",
                    self.target.display()
                )));
            }
            std::fs::remove_dir_all(&self.target).map_err(|e| write_err(&self.target, e))?;
        }
        let owner = self.dir.join(OWNER_FILE);
        std::fs::remove_file(&owner).map_err(|e| write_err(&owner, e))?;
        std::fs::rename(&self.dir, &self.target).map_err(|e| write_err(&self.target, e))?;
        self.keep = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

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

fn write_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Runtime(format!("cannot write {}: {e}", path.display()))
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
    safetensors::serialize_to_file(views, pt_metadata(), path).map_err(|e| write_err(path, e))
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
    std::fs::write(path, text).map_err(|e| write_err(path, e))
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
    published: bool,
}

impl Staging {
    pub fn new(target: &Path) -> Result<Self> {
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
        let dir = parent.join(format!(".{name}.awq-staging-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| write_err(&dir, e))?;
        }
        std::fs::create_dir(&dir).map_err(|e| {
            Error::Runtime(format!(
                "cannot create {} (is the output location writable?): {e}",
                dir.display()
            ))
        })?;
        Ok(Self {
            dir,
            target: target.to_path_buf(),
            published: false,
        })
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
        std::fs::rename(&self.dir, &self.target).map_err(|e| write_err(&self.target, e))?;
        self.published = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.published {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

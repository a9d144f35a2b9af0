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

/// The float dtype of the tensors that stay unquantized (embeddings, norms, biases, head).
/// AWQ `scales` are float16 whatever this is: the loaders require it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FloatDtype {
    Float16,
    Bfloat16,
}

impl FloatDtype {
    /// The `torch_dtype` spelling in config.json.
    pub fn torch_name(self) -> &'static str {
        match self {
            FloatDtype::Float16 => "float16",
            FloatDtype::Bfloat16 => "bfloat16",
        }
    }

    fn safetensors(self) -> Dtype {
        match self {
            FloatDtype::Float16 => Dtype::F16,
            FloatDtype::Bfloat16 => Dtype::BF16,
        }
    }

    /// Little-endian bytes of `values` in this dtype; float16 refuses a value beyond its range
    /// (it would become `inf`), naming `name` and the index.
    pub fn encode(self, name: &str, values: &[f32]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.encode_into(name, values, 0, &mut out)?;
        Ok(out)
    }

    /// [`FloatDtype::encode`] appended to `out`, in parallel; `first_index` is the index of
    /// `values[0]` in the tensor (for the error).
    pub fn encode_into(
        self,
        name: &str,
        values: &[f32],
        first_index: usize,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        use rayon::prelude::*;
        const CHUNK: usize = 1 << 16;
        if self == FloatDtype::Float16 {
            if let Some(i) = values
                .iter()
                .position(|v| !v.is_finite() || v.abs() > crate::model::F16_MAX)
            {
                return Err(Error::Input(format!(
                    "{name}: value {:e} at index {} cannot be represented in float16; use \
                     --dtype bfloat16 (or auto)",
                    values[i],
                    first_index + i
                )));
            }
        }
        let start = out.len();
        out.resize(start + 2 * values.len(), 0);
        out[start..]
            .par_chunks_mut(2 * CHUNK)
            .zip(values.par_chunks(CHUNK))
            .for_each(|(dst, src)| {
                for (d, v) in dst.chunks_exact_mut(2).zip(src) {
                    d.copy_from_slice(&match self {
                        FloatDtype::Float16 => half::f16::from_f32(*v).to_le_bytes(),
                        FloatDtype::Bfloat16 => half::bf16::from_f32(*v).to_le_bytes(),
                    });
                }
            });
        Ok(())
    }
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
    /// `values` in `dtype` (see [`FloatDtype::encode`] for the range check).
    pub fn float(
        name: String,
        shape: Vec<usize>,
        values: &[f32],
        dtype: FloatDtype,
    ) -> Result<Self> {
        Ok(Self {
            data: dtype.encode(&name, values)?,
            name,
            dtype: dtype.safetensors(),
            shape,
        })
    }
    /// `values` as an F32 tensor (in a part, F32 means staged: see [`OutTensor::f32`]).
    pub fn f32_values(name: String, shape: Vec<usize>, values: &[f32]) -> Self {
        Self {
            name,
            dtype: Dtype::F32,
            shape,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
    /// A float tensor staged in f32, converted to the output dtype by [`write_shards`].
    pub fn f32(name: String, t: &candle_core::Tensor) -> Result<Self> {
        let values = t.flatten_all()?.to_vec1::<f32>()?;
        Ok(Self {
            name,
            dtype: Dtype::F32,
            shape: t.dims().to_vec(),
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        })
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
    pub fn i64(name: String, shape: Vec<usize>, values: &[i64]) -> Self {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self {
            name,
            dtype: Dtype::I64,
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

/// A failed write of `path`; "no space left on device" is [`Error::DiskFull`] (the caller says
/// what was kept and how to continue).
pub(super) fn write_err(path: &Path, e: impl std::fmt::Display) -> Error {
    let e = e.to_string();
    let message = format!("cannot write {}: {e}", path.display());
    if e.contains("os error 28") {
        Error::DiskFull(message)
    } else {
        Error::Runtime(message)
    }
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

/// A float matrix of a source checkpoint that [`write_file_with`] writes in `dtype`,
/// converting it only when the serializer reaches it.
pub struct SourceMatrix<'a> {
    pub ckpt: &'a Checkpoint,
    pub name: String,
    /// `[rows, cols]`.
    pub shape: [usize; 2],
    pub dtype: FloatDtype,
}

/// [`write_file`] plus `matrices`, each converted block by block
/// ([`Checkpoint::for_each_row_block`]) when the serializer asks for its bytes and dropped
/// after: writing the embedding and the head holds one of them in the output dtype rather than
/// both, twice, in f32 (which DeepSeek-V3's 129 280-token vocabulary made 7.4 GB per copy of
/// the pair). A conversion error (a non-finite value) fails the write.
pub fn write_file_with(
    path: &Path,
    tensors: &[OutTensor],
    matrices: &[SourceMatrix],
) -> Result<()> {
    let failed = std::cell::Cell::new(None);
    let mut views = tensors
        .iter()
        .map(|t| {
            TensorView::new(t.dtype, t.shape.clone(), &t.data)
                .map(|v| (t.name.clone(), FileView::Memory(v)))
                .map_err(|e| write_err(path, e))
        })
        .collect::<Result<Vec<_>>>()?;
    views.extend(matrices.iter().map(|m| {
        let view = FileView::Source {
            matrix: m,
            failed: &failed,
        };
        (m.name.clone(), view)
    }));
    atomic(path, |tmp| {
        safetensors::serialize_to_file(views, pt_metadata(), tmp)
            .map_err(|e| write_err(path, e))?;
        failed.take().map_or(Ok(()), Err)
    })
}

/// Writes through `write(tmp)` and renames `tmp` to `path`, so `path` is either absent or
/// complete even if the process dies mid-write (resume relies on it).
pub(super) fn atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
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

/// Bytes a staged tensor takes in the shards: the f32-staged float tensors are written in 16
/// bits.
pub fn written_size(m: &super::reader::TensorMeta) -> u64 {
    let bytes = (m.end - m.start) as u64;
    match m.dtype {
        Dtype::F32 => bytes / 2,
        _ => bytes,
    }
}

/// Copies the tensors `names` (in this order) from `parts` into shards of at most `shard_size`
/// bytes in `dir` (greedy, a tensor larger than the limit gets its own shard), plus
/// `model.safetensors.index.json` when there is more than one. Returns the file names.
///
/// Tensors staged as F32 (the small per-layer float tensors) are written in `float_dtype`. A
/// name that no part holds is copied from `verbatim` (the source checkpoint: a wrapper's vision
/// parts) with its dtype and bytes unchanged.
pub fn write_shards(
    dir: &Path,
    parts: &Checkpoint,
    verbatim: &Checkpoint,
    names: &[String],
    shard_size: u64,
    float_dtype: FloatDtype,
) -> Result<Vec<String>> {
    // Where a tensor comes from, and whether it is staged (an F32 one is converted).
    let source = |name: &str| {
        if parts.contains(name) {
            (parts, true)
        } else {
            (verbatim, false)
        }
    };
    let staged_f32 = |name: &str| {
        let (ckpt, staged) = source(name);
        staged && ckpt.meta(name).is_ok_and(|m| m.dtype == Dtype::F32)
    };
    let mut shards: Vec<Vec<&String>> = vec![Vec::new()];
    let mut current = 0u64;
    let mut total = 0u64;
    for name in names {
        let (ckpt, staged) = source(name);
        let m = ckpt.meta(name)?;
        let size = if staged {
            written_size(m)
        } else {
            (m.end - m.start) as u64
        };
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
        // Converted copies of the staged f32 tensors (small: norms and biases).
        let converted = shard
            .iter()
            .filter(|name| staged_f32(name))
            .map(|name| {
                let values: Vec<f32> = parts
                    .bytes(name)?
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                Ok(((*name).clone(), float_dtype.encode(name, &values)?))
            })
            .collect::<Result<HashMap<String, Vec<u8>>>>()?;
        let written = std::cell::Cell::new(None);
        let views = shard
            .iter()
            .map(|name| {
                let (ckpt, _) = source(name);
                let m = ckpt.meta(name)?;
                let view = match converted.get(*name) {
                    Some(bytes) => FileView::Memory(
                        TensorView::new(float_dtype.safetensors(), m.shape.clone(), bytes)
                            .map_err(|e| write_err(&path, e))?,
                    ),
                    None => FileView::Mapped {
                        ckpt,
                        name,
                        dtype: m.dtype,
                        shape: m.shape.clone(),
                        bytes: ckpt.bytes(name)?,
                        written: &written,
                    },
                };
                Ok(((*name).clone(), view))
            })
            .collect::<Result<Vec<_>>>()?;
        safetensors::serialize_to_file(views, pt_metadata(), &path)
            .map_err(|e| write_err(&path, e))?;
        if let Some((ckpt, name)) = written.take() {
            ckpt.release_tensor(name);
        }
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

/// The last mapped tensor handed to the serializer, whose pages are released when the next is
/// asked for.
type Written<'a> = std::cell::Cell<Option<(&'a Checkpoint, &'a str)>>;

/// A tensor of a file being written: bytes in memory, bytes of a mapped file, or a source
/// matrix converted on demand. A mapped tensor's pages are released once the serializer asks
/// for the next tensor (it writes them in order, each once), so writing a shard of several GB
/// holds about one tensor in memory rather than the whole shard: DeepSeek-V3's layer part (6 GB
/// of packed experts) took the run's peak RSS from 4 to 9 GB while it was copied.
enum FileView<'a> {
    Memory(TensorView<'a>),
    Mapped {
        ckpt: &'a Checkpoint,
        name: &'a str,
        dtype: Dtype,
        shape: Vec<usize>,
        bytes: &'a [u8],
        written: &'a Written<'a>,
    },
    Source {
        matrix: &'a SourceMatrix<'a>,
        failed: &'a std::cell::Cell<Option<Error>>,
    },
}

impl FileView<'_> {
    /// A [`FileView::Source`]'s bytes; on an error, the error is kept for the caller and the
    /// bytes are short (the file is discarded).
    fn convert(m: &SourceMatrix, failed: &std::cell::Cell<Option<Error>>) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 * m.shape[0] * m.shape[1]);
        let converted = m
            .ckpt
            .for_each_row_block(&m.name, &m.shape, |first, values| {
                m.dtype.encode_into(&m.name, values, first, &mut out)
            });
        if let Err(e) = converted {
            failed.set(Some(e));
        }
        out
    }
}

impl safetensors::View for FileView<'_> {
    fn dtype(&self) -> Dtype {
        match self {
            FileView::Memory(t) => t.dtype(),
            FileView::Mapped { dtype, .. } => *dtype,
            FileView::Source { matrix, .. } => matrix.dtype.safetensors(),
        }
    }

    fn shape(&self) -> &[usize] {
        match self {
            FileView::Memory(t) => t.shape(),
            FileView::Mapped { shape, .. } => shape,
            FileView::Source { matrix, .. } => &matrix.shape,
        }
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        match self {
            FileView::Memory(t) => t.data().into(),
            FileView::Mapped {
                ckpt,
                name,
                bytes,
                written,
                ..
            } => {
                if let Some((before, prev)) = written.replace(Some((*ckpt, *name))) {
                    before.release_tensor(prev);
                }
                (*bytes).into()
            }
            FileView::Source { matrix, failed } => Self::convert(matrix, failed).into(),
        }
    }

    fn data_len(&self) -> usize {
        match self {
            FileView::Memory(t) => t.data().len(),
            FileView::Mapped { bytes, .. } => bytes.len(),
            FileView::Source { matrix, .. } => 2 * matrix.shape[0] * matrix.shape[1],
        }
    }
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

/// The source config.json with `quantization_config` set and `torch_dtype` set to the output's
/// float dtype, key order kept.
pub fn patch_config(
    source: &Path,
    quantization_config: serde_json::Value,
    dtype: FloatDtype,
) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(source).map_err(|e| Error::input_io(source, e))?;
    let mut cfg: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Input(format!("{} is not valid JSON: {e}", source.display())))?;
    let obj = cfg
        .as_object_mut()
        .ok_or_else(|| Error::Input(format!("{} is not a JSON object", source.display())))?;
    obj.insert("quantization_config".into(), quantization_config);
    obj.insert("torch_dtype".into(), dtype.torch_name().into());
    // The multi-token-prediction layers are not written (DeepSeek-V3, GLM-4.5): a loader that
    // reads this count would look for them.
    if obj
        .get("num_nextn_predict_layers")
        .and_then(|n| n.as_u64())
        .is_some_and(|n| n > 0)
    {
        obj.insert("num_nextn_predict_layers".into(), 0.into());
    }
    // transformers 5 writes `dtype`, also inside a wrapper's `text_config`: every copy says
    // the same, or loaders would read the source's.
    if obj.contains_key("dtype") {
        obj.insert("dtype".into(), dtype.torch_name().into());
    }
    if let Some(text) = obj.get_mut("text_config").and_then(|t| t.as_object_mut()) {
        for key in ["dtype", "torch_dtype"] {
            if text.contains_key(key) {
                text.insert(key.into(), dtype.torch_name().into());
            }
        }
    }
    Ok(cfg)
}

/// Files of the source that [`copy_companions`] does not copy: weights in any format, and the
/// files the output writes itself.
const NOT_COMPANIONS: [&str; 5] = [
    "config.json",
    "README.md",
    "quant_config.json",
    "quantization_report.json",
    super::reader::INDEX_FILE,
];
const WEIGHT_EXTENSIONS: [&str; 10] = [
    "safetensors",
    "bin",
    "pt",
    "pth",
    "ckpt",
    "gguf",
    "h5",
    "msgpack",
    "onnx",
    "npz",
];

/// Whether a top-level file of a model repository is a companion to copy (not a weight file,
/// not hidden, not one the output writes itself).
pub fn is_companion(name: &str) -> bool {
    !(NOT_COMPANIONS.contains(&name)
        || name.starts_with('.')
        || Path::new(name)
            .extension()
            .is_some_and(|e| WEIGHT_EXTENSIONS.contains(&e.to_string_lossy().as_ref()))
        || name.ends_with(".index.json"))
}

/// Copies every other file of `src` byte for byte — tokenizer files in every flavour
/// (`tokenizer.json`, `vocab.json`, `merges.txt`, `tokenizer.model`, `added_tokens.json`, …),
/// chat templates, generation and preprocessor configs, licences — so slow-tokenizer and
/// processor users keep working. Weights, hidden files, sub-directories and the files the output
/// writes itself (config.json, README.md, …) are not copied. Returns the names, sorted.
pub fn copy_companions(src: &Path, dst: &Path) -> Result<Vec<String>> {
    let entries = std::fs::read_dir(src).map_err(|e| Error::input_io(src, e))?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| is_companion(n))
        .collect();
    names.sort();
    for name in &names {
        let (from, to) = (src.join(name), dst.join(name));
        std::fs::copy(&from, &to).map_err(|e| write_err(&to, e))?;
        readable(&to)?;
    }
    Ok(names)
}

/// A directory beside the output that becomes the output by one rename. Dropped without
/// [`Staging::publish`], it removes itself: a failed run leaves nothing at the output path.
pub struct Staging {
    pub dir: PathBuf,
    target: PathBuf,
    /// Set once published, or when an interrupted run's finished layers must survive.
    keep: bool,
    /// `owner.lock`, exclusively locked while this process owns the directory.
    _lock: std::fs::File,
}

/// What lies at the staging path of an output, found by [`Staging::probe`] without changing
/// anything (so a dry run can report it).
#[derive(Debug, Clone, PartialEq)]
pub enum Found {
    /// No earlier staging directory.
    Fresh,
    /// Left by a process that no longer runs (killed): its stored fingerprint (`None` when
    /// missing or unreadable) and how many layers it finished.
    Stale {
        fingerprint: Option<serde_json::Value>,
        layers_done: usize,
    },
    /// Owned by a running process (the pid it recorded, when readable).
    Busy { pid: Option<u32> },
}

/// What to do with the staging directory, decided by the caller from [`Found`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    /// Create it (nothing was there).
    Create,
    /// Remove the stale one, then create it.
    Replace,
    /// Keep the stale one and continue from its finished layers.
    Resume,
}

/// Who owns a staging directory, for messages: `pid host` (informative only; see [`LOCK_FILE`]).
const OWNER_FILE: &str = "owner.pid";
/// Held with an exclusive `flock` by the process that owns the staging directory, for its whole
/// run. The lock dies with the process (SIGKILL, a crashed container), and a recorded pid that
/// another process reuses — across containers or shared volumes — holds no lock, so only a
/// live owner blocks the output.
const LOCK_FILE: &str = "owner.lock";
/// Fingerprint of the run that owns a staging directory (see [`super::fingerprint`]).
pub const FINGERPRINT_FILE: &str = "fingerprint.json";
/// Finished layers' parts and records inside a staging directory.
pub const PARTS_DIR: &str = ".parts";

/// Whether a live process holds the lock of staging directory `dir`. A directory without the
/// lock file (written by an older version, or by a process that died at creation) has no owner.
fn locked(dir: &Path) -> bool {
    let Ok(file) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join(LOCK_FILE))
    else {
        return false;
    };
    // Taken and released at once (on drop) when free.
    matches!(file.try_lock(), Err(std::fs::TryLockError::WouldBlock))
}

/// The pid an owner recorded (`pid host`), for messages.
fn recorded_pid(dir: &Path) -> Option<u32> {
    std::fs::read_to_string(dir.join(OWNER_FILE))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// This machine's name, recorded beside the pid (a shared volume may be written from several).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// Layer records (`.parts/layer-N.json`, written after their part) in staging directory `dir`.
fn layers_done(dir: &Path) -> usize {
    std::fs::read_dir(dir.join(PARTS_DIR))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    n.starts_with("layer-") && n.ends_with(".json")
                })
                .count()
        })
        .unwrap_or(0)
}

/// `.NAME.awq-staging` beside `target` (its parent may not exist yet: [`Staging::open`]
/// creates it, as `mkdir -p` would).
pub fn staging_path(target: &Path) -> Result<PathBuf> {
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    Ok(parent.join(format!(".{name}.awq-staging")))
}

impl Staging {
    /// Looks at the staging directory of `target` and reports what an earlier run left there.
    pub fn probe(target: &Path) -> Result<(PathBuf, Found)> {
        let dir = staging_path(target)?;
        if !dir.exists() {
            return Ok((dir, Found::Fresh));
        }
        if locked(&dir) {
            let pid = recorded_pid(&dir);
            return Ok((dir, Found::Busy { pid }));
        }
        let fingerprint = std::fs::read(dir.join(FINGERPRINT_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let layers_done = layers_done(&dir);
        Ok((
            dir,
            Found::Stale {
                fingerprint,
                layers_done,
            },
        ))
    }

    /// Finished layers recorded in this staging directory.
    pub fn layers_done(&self) -> usize {
        layers_done(&self.dir)
    }

    /// Opens the staging directory of `target` as decided (`how`) and marks it as ours: its
    /// lock is held until this value is dropped. Missing parents of `target` are created.
    pub fn open(target: &Path, how: Open) -> Result<Self> {
        let dir = staging_path(target)?;
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent).map_err(|e| {
                Error::Runtime(format!(
                    "cannot create the output's parent directory {}: {e}",
                    parent.display()
                ))
            })?;
        }
        if how == Open::Replace && dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| write_err(&dir, e))?;
        }
        if how != Open::Resume {
            std::fs::create_dir(&dir).map_err(|e| {
                Error::Runtime(format!(
                    "cannot create {} (is the output location writable?): {e}",
                    dir.display()
                ))
            })?;
        }
        let lock_path = dir.join(LOCK_FILE);
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&lock_path)
            .map_err(|e| write_err(&lock_path, e))?;
        if let Err(e) = lock.try_lock() {
            return Err(Error::Runtime(format!(
                "another awq process is writing {} (its staging directory {} is locked: {e}); \
                 wait for it to finish",
                target.display(),
                dir.display()
            )));
        }
        let owner = format!("{} {}\n", std::process::id(), hostname());
        std::fs::write(dir.join(OWNER_FILE), owner).map_err(|e| write_err(&dir, e))?;
        Ok(Self {
            dir,
            target: target.to_path_buf(),
            keep: false,
            _lock: lock,
        })
    }

    /// Leaves the directory in place when this value is dropped without publishing (an
    /// interrupted run's finished layers, kept for the next run to continue).
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// Puts the staging directory at the target. An existing target (which the caller checked
    /// with [`super::output::check_replaceable`] before any work, and which is checked again
    /// here) is first renamed aside and removed only after the new output is in place, so a
    /// failure in between never leaves the path empty.
    pub fn publish(self, force: bool) -> Result<()> {
        let target = self.target.clone();
        self.publish_at(&target, force)
    }

    /// [`Staging::publish`] at `target` instead of the output it was opened for (a checkpoint
    /// that failed the quality gate goes to `OUT.rejected`, `-o` untouched).
    pub fn publish_at(mut self, target: &Path, force: bool) -> Result<()> {
        super::output::check_replaceable(target, force)?;
        for name in [OWNER_FILE, LOCK_FILE] {
            let owner = self.dir.join(name);
            std::fs::remove_file(&owner).map_err(|e| write_err(&owner, e))?;
        }
        let mut aside = None;
        if let Ok(meta) = std::fs::symlink_metadata(target) {
            // A pre-created empty directory (`mktemp -d`, 0700) keeps its permissions.
            if super::output::existing(target) == super::output::Existing::Empty {
                let _ = std::fs::set_permissions(&self.dir, meta.permissions());
            }
            let mut name = self.dir.as_os_str().to_owned();
            name.push(".replaced");
            let old = PathBuf::from(name);
            let _ = std::fs::remove_dir_all(&old);
            std::fs::rename(target, &old).map_err(|e| write_err(target, e))?;
            aside = Some(old);
        }
        if let Err(e) = std::fs::rename(&self.dir, target) {
            if let Some(old) = &aside {
                let _ = std::fs::rename(old, target);
            }
            return Err(write_err(target, e));
        }
        self.keep = true;
        if let Some(old) = aside {
            std::fs::remove_dir_all(&old).map_err(|e| write_err(&old, e))?;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A recorded pid that a live process reuses (another container, a shared volume) does
    /// not make the staging busy: only the lock of a live owner does, and it dies with it.
    #[test]
    fn a_stale_owner_pid_of_a_live_process_does_not_block() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("out");
        let staging = Staging::open(&target, Open::Create).unwrap();
        let (_, found) = Staging::probe(&target).unwrap();
        assert_eq!(
            found,
            Found::Busy {
                pid: Some(std::process::id())
            }
        );
        // A second owner is refused while the first holds the lock.
        assert!(Staging::open(&target, Open::Resume).is_err());
        let dir = staging.dir.clone();
        let mut staging = staging;
        staging.keep();
        drop(staging);
        // The owner is gone, but its pid file names a live process (this one, pid 1).
        for pid in [std::process::id(), 1] {
            std::fs::write(dir.join(OWNER_FILE), format!("{pid} otherhost")).unwrap();
            let (_, found) = Staging::probe(&target).unwrap();
            assert!(matches!(found, Found::Stale { .. }), "{found:?}");
        }
        // An older version's staging: a pid file and no lock file.
        std::fs::remove_file(dir.join(LOCK_FILE)).unwrap();
        let (_, found) = Staging::probe(&target).unwrap();
        assert!(matches!(found, Found::Stale { .. }), "{found:?}");
        Staging::open(&target, Open::Resume).unwrap();
    }
}

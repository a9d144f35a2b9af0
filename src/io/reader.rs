//! Memory-mapped, lazily converted access to a safetensors checkpoint (single file or sharded).
//!
//! Why mmap: a decoder layer is converted to f32 only when it is needed, so memory holds one
//! layer whatever the depth of the model, and the weights stay f16/bf16 in the page cache.
//! Every header is validated up front (offsets inside the file, known dtypes), so a truncated or
//! corrupt shard is reported by name before any work starts.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::input_err;

/// Element types we read as floating point weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatType {
    F16,
    BF16,
    F32,
}

#[derive(Debug, Clone)]
pub struct TensorMeta {
    pub shard: usize,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte range of the data inside the shard file.
    pub start: usize,
    pub end: usize,
}

pub struct Checkpoint {
    files: Vec<PathBuf>,
    maps: Vec<Mmap>,
    index: HashMap<String, TensorMeta>,
    /// A block-scaled fp8 source's block (`weight_block_size`): F8_E4M3 tensors are read
    /// dequantized with their `_scale_inv` ([`super::fp8`]).
    fp8_block: Option<[usize; 2]>,
}

pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const SINGLE_FILE: &str = "model.safetensors";

impl Checkpoint {
    /// Opens `model.safetensors`, or else the shards listed by `model.safetensors.index.json`.
    /// When both exist the single file wins and the index is ignored, as transformers'
    /// `from_pretrained` does (it looks for `model.safetensors` first); [`Checkpoint::weights_source`] says so.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        let files = if dir.join(SINGLE_FILE).is_file() {
            vec![dir.join(SINGLE_FILE)]
        } else if index_path.is_file() {
            shard_files(dir, &index_path)?
        } else {
            return Err(no_weights(dir));
        };
        Self::open_files(files)
    }

    /// Which weight files of `dir` [`Checkpoint::open_dir`] reads, in words (for `inspect`).
    pub fn weights_source(dir: &Path) -> String {
        let (single, index) = (
            dir.join(SINGLE_FILE).is_file(),
            dir.join(INDEX_FILE).is_file(),
        );
        match (single, index) {
            (true, true) => format!(
                "{SINGLE_FILE} ({INDEX_FILE} is also present and ignored, as transformers does)"
            ),
            (true, false) => SINGLE_FILE.to_string(),
            (false, true) => format!("the shards listed in {INDEX_FILE}"),
            (false, false) => "none".to_string(),
        }
    }

    pub fn open_files(files: Vec<PathBuf>) -> Result<Self> {
        let mut maps = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for (shard, path) in files.iter().enumerate() {
            let file = File::open(path).map_err(|e| Error::input_io(path, e))?;
            // SAFETY: the file is opened read-only; a checkpoint modified while we run is a user
            // error that at worst yields wrong numbers, which the header validation cannot prevent.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::input_io(path, e))?;
            let (header_len, meta) = SafeTensors::read_metadata(&map).map_err(|e| {
                let detail = diagnose(&map).unwrap_or_else(|| e.to_string());
                input_err!(
                    "{} is not a valid safetensors file ({detail}); re-download or re-convert it",
                    path.display()
                )
            })?;
            let base = 8 + header_len;
            for (name, info) in meta.tensors() {
                let meta = TensorMeta {
                    shard,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: base + info.data_offsets.0,
                    end: base + info.data_offsets.1,
                };
                if index.insert(name.clone(), meta).is_some() {
                    return Err(input_err!(
                        "tensor {name} appears in more than one shard (again in {})",
                        path.display()
                    ));
                }
            }
            maps.push(map);
        }
        Ok(Self {
            files,
            maps,
            index,
            fp8_block: None,
        })
    }

    /// Reads F8_E4M3 tensors as block-scaled fp8 with `[rows, cols]` blocks (see
    /// [`super::fp8`]); without it they are refused like any other non-float dtype.
    pub fn with_fp8_blocks(mut self, block: Option<[usize; 2]>) -> Self {
        self.fp8_block = block;
        self
    }

    /// Whether `name` is an fp8 weight that is read dequantized.
    fn is_fp8(&self, name: &str) -> bool {
        self.fp8_block.is_some() && self.meta(name).is_ok_and(|m| m.dtype == Dtype::F8_E4M3)
    }

    /// An fp8 weight `[rows, cols]` dequantized with `{name}_scale_inv`, in f32.
    fn fp8_f32(&self, name: &str) -> Result<Vec<f32>> {
        let block = self.fp8_block.expect("checked by is_fp8");
        let m = self.meta(name)?;
        let [rows, cols] = match m.shape[..] {
            [r, c] => [r, c],
            _ => {
                return Err(input_err!(
                    "tensor {name} in {} is F8_E4M3 with shape {:?}; block-scaled fp8 weights are \
                     matrices",
                    self.files[m.shard].display(),
                    m.shape
                ))
            }
        };
        let scale_name = format!("{name}_scale_inv");
        if !self.contains(&scale_name) {
            return Err(input_err!(
                "tensor {name} in {} is F8_E4M3 but {scale_name} is missing; an fp8 source \
                 needs each weight's block scales (re-download the checkpoint)",
                self.files[m.shard].display()
            ));
        }
        let grid = super::fp8::scale_shape([rows, cols], block);
        let found = &self.meta(&scale_name)?.shape;
        if found[..] != grid[..] {
            return Err(input_err!(
                "tensor {scale_name} in {} has shape {found:?}, but config.json's \
                 quantization_config.weight_block_size {block:?} implies {grid:?} for the \
                 [{rows}, {cols}] weight (one scale per block, ceil-divided); restore the \
                 release's weight_block_size",
                self.files[m.shard].display()
            ));
        }
        let scales = to_f32(self.bytes(&scale_name)?, self.float_type(&scale_name)?);
        Ok(super::fp8::dequantize(
            self.bytes(name)?,
            &scales,
            [rows, cols],
            block,
        ))
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Tensor names in a stable (sorted) order.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.index.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    pub fn meta(&self, name: &str) -> Result<&TensorMeta> {
        self.index.get(name).ok_or_else(|| {
            input_err!(
                "tensor {name} is missing from the checkpoint ({}); the weights do not match config.json",
                self.describe_files()
            )
        })
    }

    /// Drops the mapped pages of every tensor whose name starts with `prefix` from this process's
    /// resident memory, once they have been converted: file-backed pages count towards RSS and
    /// would otherwise pile up layer after layer, making peak RSS grow with depth. Best effort;
    /// a later read faults the pages back in from the file.
    pub fn release(&self, prefix: &str) {
        for m in self
            .index
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(_, m)| m)
        {
            self.drop_pages(m);
        }
    }

    /// [`Checkpoint::release`] for the tensors of one linear (`{prefix}.weight` and its fp8
    /// scales, or its packed tensors), found by name rather than by scanning every tensor: a
    /// MoE layer releases each expert after each read.
    pub fn release_linear(&self, prefix: &str) {
        const PARTS: [&str; 9] = [
            "weight",
            "weight_scale_inv",
            "qweight",
            "qzeros",
            "scales",
            "weight_packed",
            "weight_zero_point",
            "weight_scale",
            "weight_shape",
        ];
        for part in PARTS {
            if let Some(m) = self.index.get(&format!("{prefix}.{part}")) {
                self.drop_pages(m);
            }
        }
    }

    /// [`Checkpoint::release`] for one tensor, by its exact name.
    pub fn release_tensor(&self, name: &str) {
        if let Some(m) = self.index.get(name) {
            self.drop_pages(m);
        }
    }

    fn drop_pages(&self, m: &TensorMeta) {
        #[cfg(unix)]
        // SAFETY: the maps are read-only views of files this process does not modify, so
        // MADV_DONTNEED only discards clean pages; later accesses re-read the same bytes.
        unsafe {
            let _ = self.maps[m.shard].unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                m.start,
                m.end - m.start,
            );
        }
        #[cfg(not(unix))]
        let _ = m;
    }

    /// Raw little-endian bytes of a tensor, straight from the mmap.
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let m = self.meta(name)?;
        Ok(&self.maps[m.shard][m.start..m.end])
    }

    fn float_type(&self, name: &str) -> Result<FloatType> {
        let m = self.meta(name)?;
        match m.dtype {
            Dtype::F16 => Ok(FloatType::F16),
            Dtype::BF16 => Ok(FloatType::BF16),
            Dtype::F32 => Ok(FloatType::F32),
            Dtype::F8_E4M3 => Err(input_err!(
                "tensor {name} in {} has dtype F8_E4M3, but config.json has no fp8 \
                 quantization_config with weight_block_size; block-scaled fp8 (DeepSeek-V3's) is \
                 the only fp8 source awq reads",
                self.files[m.shard].display()
            )),
            other => Err(input_err!(
                "tensor {name} in {} has dtype {other:?}; only F16, BF16 and F32 weights are supported",
                self.files[m.shard].display()
            )),
        }
    }

    /// Checks that `name` has exactly `shape`.
    pub fn expect_shape(&self, name: &str, shape: &[usize]) -> Result<()> {
        let m = self.meta(name)?;
        if m.shape != shape {
            return Err(input_err!(
                "tensor {name} in {} has shape {:?}, but config.json implies {:?}",
                self.files[m.shard].display(),
                m.shape,
                shape
            ));
        }
        Ok(())
    }

    /// The tensor converted to f32, checked against `shape` and for NaN/Inf (a corrupt or
    /// overflowed checkpoint would otherwise poison every later layer silently).
    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.expect_shape(name, shape)?;
        let data = match self.is_fp8(name) {
            true => self.fp8_f32(name)?,
            false => to_f32(self.bytes(name)?, self.float_type(name)?),
        };
        if let Some(i) = first_non_finite(&data) {
            return Err(self.non_finite(name, i, data[i]));
        }
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
    }

    /// `name` (`[rows, cols]`) in f32 a block of rows at a time: `f(first_index, values)` for
    /// each block in order, `first_index` counting values from the tensor's start. A table too
    /// large to hold in f32 (DeepSeek-V3's 129 280 × 7168 embedding is 3.7 GB) costs one block
    /// of about 64 MB. Each block is checked for NaN/Inf as [`Checkpoint::f32`] checks the
    /// whole; the tensor's pages are released at the end. An fp8 tensor is dequantized whole
    /// first: its scales cover 128 × 128 blocks, and no release ships an fp8 embedding or head.
    pub fn for_each_row_block(
        &self,
        name: &str,
        shape: &[usize; 2],
        f: impl FnMut(usize, &[f32]) -> Result<()>,
    ) -> Result<()> {
        self.row_blocks(name, shape, 1 << 24, f)
    }

    /// [`Checkpoint::for_each_row_block`] with blocks of about `block_values` values.
    fn row_blocks(
        &self,
        name: &str,
        shape: &[usize; 2],
        block_values: usize,
        mut f: impl FnMut(usize, &[f32]) -> Result<()>,
    ) -> Result<()> {
        self.expect_shape(name, shape)?;
        let [rows, cols] = *shape;
        let step = (block_values / cols.max(1)).max(1);
        enum Source<'a> {
            Whole(Vec<f32>),
            Mapped(&'a [u8], FloatType),
        }
        let source = match self.is_fp8(name) {
            true => Source::Whole(self.fp8_f32(name)?),
            false => Source::Mapped(self.bytes(name)?, self.float_type(name)?),
        };
        let mut block = Vec::new();
        for start in (0..rows).step_by(step) {
            let end = (start + step).min(rows);
            let values = match &source {
                Source::Whole(whole) => &whole[start * cols..end * cols],
                Source::Mapped(bytes, ft) => {
                    let width = cols * elem_size(*ft);
                    block.resize((end - start) * cols, 0.0);
                    convert_par(&bytes[start * width..end * width], *ft, &mut block);
                    &block[..]
                }
            };
            if let Some(i) = first_non_finite(values) {
                return Err(self.non_finite(name, start * cols + i, values[i]));
            }
            f(start * cols, values)?;
        }
        self.release_tensor(name);
        Ok(())
    }

    fn non_finite(&self, name: &str, index: usize, value: f32) -> Error {
        let file = self.meta(name).map_or_else(
            |_| "?".into(),
            |m| self.files[m.shard].display().to_string(),
        );
        input_err!(
            "tensor {name} in {file} has a non-finite value ({value}) at index {index}; the \
             checkpoint is corrupt or overflowed when it was converted — re-export it"
        )
    }

    /// The first value of `name` that is non-finite or larger in magnitude than `limit`, as
    /// `(index, value)`; `None` when every value is finite and within ±`limit`. Scans the mapped
    /// bytes in parallel chunks without keeping the converted tensor, then releases its pages.
    pub fn first_out_of_range(&self, name: &str, limit: f32) -> Result<Option<(usize, f32)>> {
        const CHUNK: usize = 1 << 16;
        if self.is_fp8(name) {
            let data = self.fp8_f32(name)?;
            self.release(name);
            return Ok(first_beyond(&data, limit).map(|i| (i, data[i])));
        }
        let ft = self.float_type(name)?;
        let es = elem_size(ft);
        let found = self
            .bytes(name)?
            .par_chunks(CHUNK * es)
            .enumerate()
            .filter_map(|(c, bytes)| {
                let mut buf = vec![0f32; bytes.len() / es];
                convert_into(bytes, ft, &mut buf);
                first_beyond(&buf, limit).map(|i| (c * CHUNK + i, buf[i]))
            })
            .min_by_key(|(i, _)| *i);
        self.release(name);
        Ok(found)
    }

    /// The shard file that holds `name`.
    pub fn file_of(&self, name: &str) -> Result<&Path> {
        Ok(&self.files[self.meta(name)?.shard])
    }

    /// An I32 tensor's values (AWQ `qweight` / `qzeros`), checked against `shape`.
    pub fn i32s(&self, name: &str, shape: &[usize]) -> Result<Vec<i32>> {
        self.expect_dtype(name, Dtype::I32)?;
        self.expect_shape(name, shape)?;
        Ok(self
            .bytes(name)?
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    /// An F16 tensor's values (AWQ `scales`), checked against `shape`.
    pub fn f16s(&self, name: &str, shape: &[usize]) -> Result<Vec<f16>> {
        self.expect_dtype(name, Dtype::F16)?;
        self.expect_shape(name, shape)?;
        Ok(self
            .bytes(name)?
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]))
            .collect())
    }

    fn expect_dtype(&self, name: &str, dtype: Dtype) -> Result<()> {
        let m = self.meta(name)?;
        if m.dtype != dtype {
            return Err(input_err!(
                "tensor {name} in {} has dtype {:?}, expected {dtype:?}",
                self.files[m.shard].display(),
                m.dtype
            ));
        }
        Ok(())
    }

    /// Selected rows of a 2-D tensor (an embedding lookup) without converting the whole matrix.
    pub fn rows_f32(&self, name: &str, shape: &[usize; 2], ids: &[u32]) -> Result<Tensor> {
        self.expect_shape(name, shape)?;
        let ft = self.float_type(name)?;
        let bytes = self.bytes(name)?;
        let [rows, cols] = *shape;
        let width = cols * elem_size(ft);
        let mut out = vec![0f32; ids.len() * cols];
        for (dst, &id) in out.chunks_mut(cols).zip(ids) {
            let id = id as usize;
            if id >= rows {
                return Err(input_err!(
                    "token id {id} is outside the embedding table {name} ({rows} rows); tokenizer and model do not match"
                ));
            }
            convert_into(&bytes[id * width..(id + 1) * width], ft, dst);
        }
        Ok(Tensor::from_vec(out, (ids.len(), cols), &Device::Cpu)?)
    }

    fn describe_files(&self) -> String {
        match self.files.as_slice() {
            [one] => one.display().to_string(),
            many => format!(
                "{} shards in {}",
                many.len(),
                many[0].parent().unwrap_or(Path::new(".")).display()
            ),
        }
    }
}

/// The index of the first NaN or infinity in `data`.
fn first_non_finite(data: &[f32]) -> Option<usize> {
    first_beyond(data, f32::INFINITY)
}

/// The index of the first value of `data` that is non-finite or beyond ±`limit`. Chunks are
/// scanned in parallel with a branch-free fold (which vectorizes); a per-element
/// `position_first` is an order of magnitude slower and dominated reading a DeepSeek-V3 expert.
fn first_beyond(data: &[f32], limit: f32) -> Option<usize> {
    const CHUNK: usize = 1 << 16;
    let bad = |v: &f32| !v.is_finite() || v.abs() > limit;
    let any = |c: &[f32]| c.iter().fold(false, |a, v| a | bad(v));
    let chunk = data.par_chunks(CHUNK).position_first(any)?;
    let start = chunk * CHUNK;
    data[start..].iter().position(bad).map(|i| start + i)
}

fn elem_size(ft: FloatType) -> usize {
    match ft {
        FloatType::F16 | FloatType::BF16 => 2,
        FloatType::F32 => 4,
    }
}

/// Names what is wrong with a header that the safetensors crate rejected, when it can: the
/// header length against the file size, JSON validity, then each tensor's dtype, byte count
/// and offsets.
fn diagnose(bytes: &[u8]) -> Option<String> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    if n > bytes.len() as u64 - 8 {
        return Some(format!(
            "header length {n} exceeds the file size of {} bytes",
            bytes.len()
        ));
    }
    let header: serde_json::Value = match serde_json::from_slice(&bytes[8..8 + n as usize]) {
        Ok(h) => h,
        Err(e) => return Some(format!("the header is not JSON: {e}")),
    };
    let data_len = bytes.len() as u64 - 8 - n;
    for (name, info) in header.as_object()? {
        if name == "__metadata__" {
            continue;
        }
        let dtype = info.get("dtype").and_then(|d| d.as_str()).unwrap_or("?");
        let size = match dtype {
            "F64" | "I64" | "U64" => 8,
            "F32" | "I32" | "U32" => 4,
            "F16" | "BF16" | "I16" | "U16" => 2,
            "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
            other => return Some(format!("tensor {name} has unknown dtype {other:?}")),
        };
        let elems: Option<u64> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .map(|s| s.iter().map(|d| d.as_u64().unwrap_or(0)).product());
        let offsets: Option<(u64, u64)> = info
            .get("data_offsets")
            .and_then(|o| Some((o.get(0)?.as_u64()?, o.get(1)?.as_u64()?)));
        match (elems, offsets) {
            (Some(_), Some((a, b))) if b < a || b > data_len => {
                return Some(format!(
                    "tensor {name}: data offsets [{a}, {b}] lie outside the {data_len} data bytes"
                ))
            }
            (Some(e), Some((a, b))) if e * size != b - a => {
                return Some(format!(
                    "tensor {name}: {dtype} × {e} elements need {} bytes, its offsets span {}",
                    e * size,
                    b - a
                ))
            }
            (Some(_), Some(_)) => {}
            _ => return Some(format!("tensor {name} lacks a shape or data offsets")),
        }
    }
    None
}

fn convert_into(bytes: &[u8], ft: FloatType, dst: &mut [f32]) {
    match ft {
        FloatType::F16 => {
            for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(2)) {
                *d = f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        FloatType::BF16 => {
            for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(2)) {
                *d = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        FloatType::F32 => {
            for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
                *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
    }
}

/// Converts a whole tensor in parallel chunks (the mmap is not necessarily aligned, so we decode
/// byte pairs rather than reinterpret the slice).
fn to_f32(bytes: &[u8], ft: FloatType) -> Vec<f32> {
    let mut out = vec![0f32; bytes.len() / elem_size(ft)];
    convert_par(bytes, ft, &mut out);
    out
}

/// [`convert_into`] in parallel chunks.
fn convert_par(bytes: &[u8], ft: FloatType, dst: &mut [f32]) {
    const CHUNK: usize = 1 << 16;
    dst.par_chunks_mut(CHUNK)
        .zip(bytes.par_chunks(CHUNK * elem_size(ft)))
        .for_each(|(dst, src)| convert_into(src, ft, dst));
}

/// Shard file names from `model.safetensors.index.json`, in first-appearance order.
fn shard_files(dir: &Path, index_path: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index_path).map_err(|e| Error::input_io(index_path, e))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| input_err!("{} is not valid JSON: {e}", index_path.display()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| input_err!("{} has no \"weight_map\" object", index_path.display()))?;
    let mut files: Vec<PathBuf> = Vec::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            input_err!(
                "{}: weight_map entry for {tensor} is not a file name",
                index_path.display()
            )
        })?;
        if file.contains('/') || file.contains('\\') || file == ".." {
            return Err(input_err!(
                "{}: shard name {file:?} must be a plain file name",
                index_path.display()
            ));
        }
        let path = dir.join(file);
        if !files.contains(&path) {
            if !path.is_file() {
                return Err(input_err!(
                    "shard {} listed in {} is missing",
                    path.display(),
                    index_path.display()
                ));
            }
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(input_err!("{} lists no shards", index_path.display()));
    }
    Ok(files)
}

/// The error for a directory without safetensors weights, naming what it holds instead (GGUF,
/// PyTorch `.bin`/`.pt`) and how to convert it.
fn no_weights(dir: &Path) -> Error {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    let with = |exts: &[&str]| -> Vec<&str> {
        names
            .iter()
            .filter(|n| exts.iter().any(|e| n.to_ascii_lowercase().ends_with(e)))
            .map(String::as_str)
            .collect()
    };
    let (gguf, torch) = (with(&[".gguf"]), with(&[".bin", ".pt", ".pth"]));
    let other_st = with(&[".safetensors"]);
    let d = dir.display();
    let hint = if let Some(first) = other_st.first() {
        format!(
            "it holds {first} but neither of those: a safetensors file under another name (such \
             as Mistral's native consolidated.safetensors, which has its own tensor names and \
             params.json instead of config.json) is not a transformers checkpoint; use the \
             repository's transformers files (model.safetensors or model-0000N-of-0000M \
             shards with their index)"
        )
    } else if let Some(first) = gguf.first() {
        format!(
            "it holds GGUF weights ({first}{more}), which awq does not read; convert to a \
             transformers directory first: python -c \"from transformers import \
             AutoModelForCausalLM as M, AutoTokenizer as T; p='{d}'; f='{first}'; \
             M.from_pretrained(p, gguf_file=f).save_pretrained('OUT'); \
             T.from_pretrained(p, gguf_file=f).save_pretrained('OUT')\" (dequantizes to float)",
            more = if gguf.len() > 1 { ", …" } else { "" }
        )
    } else if let Some(first) = torch.first() {
        format!(
            "it holds PyTorch weights ({first}{more}), which awq does not read (they are pickles \
             that can run code); convert them to safetensors: python -c \"from transformers \
             import AutoModelForCausalLM as M; M.from_pretrained('{d}').save_pretrained('OUT')\" \
             (writes model.safetensors), then copy the tokenizer files",
            more = if torch.len() > 1 { ", …" } else { "" }
        )
    } else {
        "pass the directory that holds the weights".to_string()
    };
    input_err!("no weights in {d}: expected {SINGLE_FILE} or {INDEX_FILE} with its shards; {hint}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_beyond_finds_the_first_bad_value_across_chunks() {
        let mut v = vec![1f32; 3 << 16];
        assert_eq!(first_beyond(&v, 2.0), None);
        assert_eq!(first_non_finite(&v), None);
        v[(2 << 16) + 5] = f32::NAN;
        v[(1 << 16) + 7] = 3.0;
        assert_eq!(first_beyond(&v, 2.0), Some((1 << 16) + 7));
        assert_eq!(first_non_finite(&v), Some((2 << 16) + 5));
        v[3] = f32::NEG_INFINITY;
        assert_eq!(first_non_finite(&v), Some(3));
    }

    /// The head part is written block by block: the blocks must be the whole tensor, in order,
    /// and a bad value must be named by its index in the tensor, not in its block.
    #[test]
    fn row_blocks_cover_the_tensor_and_name_a_bad_value_by_its_tensor_index() {
        let dir = std::env::temp_dir().join(format!("awq-row-blocks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.safetensors");
        let mut values: Vec<f32> = (0..15).map(|i| i as f32 * 0.5).collect();
        let write = |values: &[f32]| {
            let t = crate::io::writer::OutTensor::f16("t".into(), vec![5, 3], values);
            crate::io::writer::write_file(&path, &[t]).unwrap();
            Checkpoint::open_files(vec![path.clone()]).unwrap()
        };
        let ckpt = write(&values);
        let mut seen = Vec::new();
        let mut firsts = Vec::new();
        ckpt.row_blocks("t", &[5, 3], 6, |first, block| {
            firsts.push(first);
            seen.extend_from_slice(block);
            Ok(())
        })
        .unwrap();
        assert_eq!(firsts, [0, 6, 12]);
        assert_eq!(seen, values);
        values[10] = f32::NAN;
        let err = write(&values)
            .row_blocks("t", &[5, 3], 6, |_, _| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("index 10") && err.contains("non-finite"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

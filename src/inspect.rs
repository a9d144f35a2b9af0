//! `awq inspect`: what a checkpoint directory holds — fp or AWQ, any architecture — read from
//! `config.json` and the safetensors headers only (no weights are loaded).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::input_err;
use crate::io::reader::Checkpoint;

#[derive(Debug, Clone, Serialize)]
pub struct TensorRow {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub bytes: usize,
    pub file: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub dir: String,
    pub architecture: Option<String>,
    pub layers: Option<u64>,
    pub hidden_size: Option<u64>,
    pub intermediate_size: Option<u64>,
    pub attention_heads: Option<u64>,
    pub key_value_heads: Option<u64>,
    pub vocab_size: Option<u64>,
    pub torch_dtype: Option<String>,
    pub tie_word_embeddings: Option<bool>,
    /// `quantization_config` as written, or `None` for an unquantized checkpoint.
    pub quantization_config: Option<serde_json::Value>,
    pub files: Vec<String>,
    /// Which weight files are read, in words (e.g. the single file wins over an index).
    pub weights: String,
    pub tensor_count: usize,
    pub total_bytes: usize,
    /// Bytes per dtype.
    pub bytes_by_dtype: BTreeMap<String, usize>,
    pub tensors: Vec<TensorRow>,
}

pub fn inspect(dir: &Path) -> Result<Summary> {
    if !dir.is_dir() {
        return Err(input_err!("{} is not a directory", dir.display()));
    }
    let config_path = dir.join("config.json");
    let text =
        std::fs::read_to_string(&config_path).map_err(|e| Error::input_io(&config_path, e))?;
    let cfg: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| input_err!("{} is not valid JSON: {e}", config_path.display()))?;
    let ckpt = Checkpoint::open_dir(dir)?;
    let file_name = |i: usize| {
        ckpt.files()[i]
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
    };
    let mut names: Vec<&str> = ckpt.names();
    names.sort_by_key(|n| natural_key(n));
    let mut tensors = Vec::with_capacity(names.len());
    let mut by_dtype = BTreeMap::new();
    for name in names {
        let m = ckpt.meta(name)?;
        let dtype = format!("{:?}", m.dtype);
        let bytes = m.end - m.start;
        *by_dtype.entry(dtype.clone()).or_insert(0) += bytes;
        tensors.push(TensorRow {
            name: name.to_string(),
            dtype,
            shape: m.shape.clone(),
            bytes,
            file: file_name(m.shard),
        });
    }
    let u = |k: &str| cfg.get(k).and_then(|v| v.as_u64());
    let s = |k: &str| cfg.get(k).and_then(|v| v.as_str()).map(str::to_string);
    Ok(Summary {
        dir: dir.display().to_string(),
        architecture: cfg
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str())
            .map(str::to_string),
        layers: u("num_hidden_layers"),
        hidden_size: u("hidden_size"),
        intermediate_size: u("intermediate_size"),
        attention_heads: u("num_attention_heads"),
        key_value_heads: u("num_key_value_heads"),
        vocab_size: u("vocab_size"),
        torch_dtype: s("torch_dtype"),
        tie_word_embeddings: cfg.get("tie_word_embeddings").and_then(|v| v.as_bool()),
        quantization_config: cfg.get("quantization_config").cloned(),
        files: (0..ckpt.files().len()).map(file_name).collect(),
        weights: Checkpoint::weights_source(dir),
        tensor_count: tensors.len(),
        total_bytes: tensors.iter().map(|t| t.bytes).sum(),
        bytes_by_dtype: by_dtype,
        tensors,
    })
}

/// Sorts `layers.10` after `layers.9`.
fn natural_key(name: &str) -> Vec<(u64, String)> {
    name.split('.')
        .map(|part| match part.parse::<u64>() {
            Ok(n) => (n, String::new()),
            Err(_) => (u64::MAX, part.to_string()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn natural_order() {
        let mut v = ["model.layers.10.a", "model.layers.9.a", "lm_head.weight"];
        v.sort_by_key(|n| super::natural_key(n));
        assert_eq!(
            v,
            ["lm_head.weight", "model.layers.9.a", "model.layers.10.a"]
        );
    }
}

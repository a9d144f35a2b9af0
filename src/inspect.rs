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
    /// A vision-language wrapper's text decoder: the causal-LM class whose rules it follows and
    /// the root its tensors live under (`None` for a causal LM or an unsupported config).
    pub text_decoder: Option<TextDecoder>,
    /// A wrapper's vision parts, per top-level module, with their sizes.
    pub vision: Option<crate::model::wrapped::VisionParts>,
    /// What `awq quantize` keeps float (its `modules_to_not_convert`, before `--keep-fp16`),
    /// for an unquantized checkpoint of a supported architecture.
    pub stays_float: Option<Vec<String>>,
    /// Why `awq quantize`/`eval` would refuse this directory (`None` when they read it).
    pub unsupported: Option<String>,
}

/// Where a wrapper's text decoder lives and what it is.
#[derive(Debug, Clone, Serialize)]
pub struct TextDecoder {
    /// e.g. `Gemma3ForCausalLM`.
    pub text_architecture: String,
    /// e.g. `language_model.model`.
    pub root: String,
    /// e.g. `language_model.lm_head` (tied heads have no tensor).
    pub head: String,
    pub tied_embeddings: bool,
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
    // What awq makes of it, when it reads the architecture (unsupported ones are still listed).
    let spec = crate::model::load_spec(&config_path).and_then(|mut s| {
        crate::model::locate(&mut s, &ckpt)?;
        Ok(s)
    });
    // Why awq would refuse it (the listing itself works for any architecture).
    let unsupported = spec.as_ref().err().map(|e| e.to_string());
    let spec = spec.ok();
    let text_decoder = spec
        .as_ref()
        .filter(|s| s.vision.is_some())
        .map(|s| TextDecoder {
            text_architecture: text_architecture(&cfg).unwrap_or_default(),
            root: s.roots.decoder.clone(),
            head: s.roots.head.clone(),
            tied_embeddings: s.tied_embeddings,
        });
    let vision = spec
        .as_ref()
        .and_then(|s| Some(crate::model::wrapped::parts(s.vision.as_ref()?, &ckpt)));
    let stays_float = spec.as_ref().filter(|s| s.awq.is_none()).map(|s| {
        let mut v: Vec<String> = s
            .modules_to_not_convert()
            .unwrap_or_default()
            .iter()
            .map(|e| e.to_string())
            .collect();
        // Routers no list needs to name (DeepSeek-V3's `mlp.gate`) and the tensors copied
        // byte for byte (its `e_score_correction_bias`) stay float all the same.
        let unlisted = (s.layer_kinds().into_iter())
            .flat_map(|(_, k)| {
                let routers = k.router_linears().into_iter().map(|l| l.name);
                let verbatim = k.layer_verbatim().into_iter().map(|(n, _)| n);
                routers.chain(verbatim).collect::<Vec<_>>()
            })
            .map(str::to_string);
        for name in unlisted {
            if !v.iter().any(|e| name.contains(e.as_str())) {
                v.push(name);
            }
        }
        v.push(crate::model::HEAD_MODULE.to_string());
        v
    });
    // A wrapper's text settings live in text_config.
    let from_spec =
        |f: fn(&crate::model::config::ModelSpec) -> usize| spec.as_ref().map(|s| f(s) as u64);
    let u = |k: &str| cfg.get(k).and_then(|v| v.as_u64());
    let s = |k: &str| cfg.get(k).and_then(|v| v.as_str()).map(str::to_string);
    Ok(Summary {
        dir: dir.display().to_string(),
        architecture: cfg
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str())
            .map(str::to_string),
        layers: u("num_hidden_layers").or(from_spec(|s| s.layers)),
        hidden_size: u("hidden_size").or(from_spec(|s| s.hidden)),
        intermediate_size: u("intermediate_size").or(from_spec(|s| s.intermediate)),
        attention_heads: u("num_attention_heads").or(from_spec(|s| s.heads)),
        key_value_heads: u("num_key_value_heads").or(from_spec(|s| s.kv_heads)),
        vocab_size: u("vocab_size").or(from_spec(|s| s.vocab)),
        torch_dtype: s("torch_dtype").or_else(|| s("dtype")),
        tie_word_embeddings: cfg.get("tie_word_embeddings").and_then(|v| v.as_bool()),
        quantization_config: cfg.get("quantization_config").cloned(),
        files: (0..ckpt.files().len()).map(file_name).collect(),
        weights: Checkpoint::weights_source(dir),
        tensor_count: tensors.len(),
        total_bytes: tensors.iter().map(|t| t.bytes).sum(),
        bytes_by_dtype: by_dtype,
        tensors,
        text_decoder,
        vision,
        stays_float,
        unsupported,
    })
}

/// The causal-LM class a wrapper's text config resolves to (what `load_spec` built it with).
fn text_architecture(cfg: &serde_json::Value) -> Option<String> {
    let w = crate::model::wrapped::find(
        cfg.get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str()),
        cfg.get("model_type").and_then(|t| t.as_str()),
    )?;
    let text = crate::model::wrapped::text_config(cfg, w, |_| None, &[]).ok()?;
    Some(text.get("architectures")?.get(0)?.as_str()?.to_string())
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

//! Model families and the layer-streaming model handle.
//!
//! A [`Model`] holds the resolved spec and the memory-mapped checkpoint, never the weights:
//! callers ask for the embedding of some ids, for decoder layer `i` (converted to f32 on demand
//! and dropped by the caller), and for the head. That is what keeps memory at one layer.

pub mod config;
pub mod groups;
pub mod layer;
pub mod llama;
pub mod mistral;
pub mod qwen2;
pub mod qwen3;
pub mod rope;

use std::path::{Path, PathBuf};

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::input_err;
use crate::io::reader::Checkpoint;
use config::{HfConfig, ModelSpec};
use layer::{layer_prefix, LayerWeights};

type SpecFn = fn(&HfConfig) -> Result<ModelSpec>;

/// Supported `architectures[0]` values and the family rules that resolve their spec.
const FAMILIES: [(&str, SpecFn); 4] = [
    (llama::ARCHITECTURE, llama::spec),
    (mistral::ARCHITECTURE, mistral::spec),
    (qwen2::ARCHITECTURE, qwen2::spec),
    (qwen3::ARCHITECTURE, qwen3::spec),
];

pub fn supported_architectures() -> Vec<&'static str> {
    FAMILIES.iter().map(|(name, _)| *name).collect()
}

/// Reads and resolves `config.json`.
pub fn load_spec(config_path: &Path) -> Result<ModelSpec> {
    let text = std::fs::read_to_string(config_path).map_err(|e| Error::input_io(config_path, e))?;
    let raw: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| input_err!("{} is not valid JSON: {e}", config_path.display()))?;
    let cfg: HfConfig =
        serde_json::from_value(raw).map_err(|e| input_err!("{}: {e}", config_path.display()))?;
    let arch = cfg.architectures.first().cloned().unwrap_or_default();
    let (_, spec_fn) = FAMILIES
        .iter()
        .find(|(name, _)| *name == arch)
        .ok_or_else(|| {
            input_err!(
                "{}: architecture {:?} is not supported; supported: {}",
                config_path.display(),
                arch,
                supported_architectures().join(", ")
            )
        })?;
    spec_fn(&cfg).map_err(|e| match e {
        Error::Input(msg) => Error::Input(format!("{}: {msg}", config_path.display())),
        other => other,
    })
}

pub struct Model {
    pub dir: PathBuf,
    pub spec: ModelSpec,
    pub ckpt: Checkpoint,
}

impl Model {
    /// Opens a model directory: parses config.json, maps the weights and checks every tensor the
    /// forward pass will need (name and shape) before any work starts.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(input_err!(
                "model directory {} does not exist",
                dir.display()
            ));
        }
        let spec = load_spec(&dir.join("config.json"))?;
        let ckpt = Checkpoint::open_dir(dir)?;
        let model = Self {
            dir: dir.to_path_buf(),
            spec,
            ckpt,
        };
        model.check_tensors()?;
        Ok(model)
    }

    fn check_tensors(&self) -> Result<()> {
        let s = &self.spec;
        self.ckpt.expect_shape(EMBED, &[s.vocab, s.hidden])?;
        self.ckpt.expect_shape(FINAL_NORM, &[s.hidden])?;
        if !s.tied_embeddings {
            self.ckpt.expect_shape(LM_HEAD, &[s.vocab, s.hidden])?;
        }
        for i in 0..s.layers {
            let p = layer_prefix(i);
            let expect =
                |name: &str, shape: &[usize]| self.ckpt.expect_shape(&format!("{p}.{name}"), shape);
            expect("input_layernorm.weight", &[s.hidden])?;
            expect("post_attention_layernorm.weight", &[s.hidden])?;
            for config::LinearShape {
                name,
                out,
                inp,
                bias,
            } in s.linears()
            {
                match s.awq {
                    None => expect(&format!("{name}.weight"), &[out, inp])?,
                    Some(fmt) => {
                        let shapes = layer::packed_shapes(out, inp, fmt)?;
                        for (t, shape) in ["qweight", "qzeros", "scales"].iter().zip(shapes) {
                            expect(&format!("{name}.{t}"), &shape)?;
                        }
                    }
                }
                if bias {
                    expect(&format!("{name}.bias"), &[out])?;
                }
            }
            if s.qk_norm {
                expect("self_attn.q_norm.weight", &[s.head_dim])?;
                expect("self_attn.k_norm.weight", &[s.head_dim])?;
            }
        }
        Ok(())
    }

    /// Embedding rows for `ids`: `[ids.len(), hidden]`.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        self.ckpt
            .rows_f32(EMBED, &[self.spec.vocab, self.spec.hidden], ids)
            .inspect(|_| self.ckpt.release(EMBED))
    }

    /// Decoder layer `i` converted to f32.
    pub fn layer(&self, i: usize) -> Result<LayerWeights> {
        let layer = LayerWeights::load(&self.ckpt, &self.spec, i)?;
        self.ckpt.release(&format!("{}.", layer_prefix(i)));
        Ok(layer)
    }

    pub fn final_norm(&self) -> Result<Tensor> {
        self.ckpt.f32(FINAL_NORM, &[self.spec.hidden])
    }

    /// The output projection `[vocab, hidden]` (the embedding matrix when tied).
    pub fn lm_head(&self) -> Result<Tensor> {
        let name = if self.spec.tied_embeddings {
            EMBED
        } else {
            LM_HEAD
        };
        self.ckpt.f32(name, &[self.spec.vocab, self.spec.hidden])
    }
}

pub const EMBED: &str = "model.embed_tokens.weight";
pub const FINAL_NORM: &str = "model.norm.weight";
pub const LM_HEAD: &str = "lm_head.weight";

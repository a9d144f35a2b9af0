//! Model families and the layer-streaming model handle.
//!
//! A [`Model`] holds the resolved spec and the memory-mapped checkpoint, never the weights:
//! callers ask for the embedding of some ids, for decoder layer `i` (converted to f32 on demand
//! and dropped by the caller), and for the head. That is what keeps memory at one layer.

pub mod attention;
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

/// `model_type` → the class transformers' `AutoModelForCausalLM` picks for it
/// (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`), for configs that have no `architectures`.
const MODEL_TYPES: [(&str, &str); 4] = [
    ("llama", llama::ARCHITECTURE),
    ("mistral", mistral::ARCHITECTURE),
    ("qwen2", qwen2::ARCHITECTURE),
    ("qwen3", qwen3::ARCHITECTURE),
];

/// The architecture a config names: `architectures[0]`, or, when `architectures` is missing or
/// empty, the class transformers maps `model_type` to (`None` for an unknown or absent
/// `model_type`).
pub fn resolve_architecture(cfg: &HfConfig) -> Option<String> {
    if let Some(arch) = cfg.architectures.first() {
        return Some(arch.clone());
    }
    let model_type = cfg.model_type.as_deref()?;
    MODEL_TYPES
        .iter()
        .find(|(t, _)| *t == model_type)
        .map(|(_, arch)| arch.to_string())
}

/// Reads and resolves `config.json`.
pub fn load_spec(config_path: &Path) -> Result<ModelSpec> {
    let text = std::fs::read_to_string(config_path).map_err(|e| Error::input_io(config_path, e))?;
    let raw: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| input_err!("{} is not valid JSON: {e}", config_path.display()))?;
    let cfg: HfConfig =
        serde_json::from_value(raw).map_err(|e| input_err!("{}: {e}", config_path.display()))?;
    let arch = resolve_architecture(&cfg);
    let family = arch
        .as_deref()
        .and_then(|a| FAMILIES.iter().find(|(name, _)| *name == a));
    let Some((_, spec_fn)) = family else {
        let supported = supported_architectures().join(", ");
        return Err(match (&arch, &cfg.model_type) {
            (Some(a), _) => input_err!(
                "{}: architecture {a:?} is not supported; supported: {supported}",
                config_path.display()
            ),
            (None, Some(t)) => input_err!(
                "{}: \"architectures\" is missing and model_type {t:?} is not supported; \
                 supported: {supported} (model_type {})",
                config_path.display(),
                MODEL_TYPES.map(|(t, _)| t).join(", ")
            ),
            (None, None) => input_err!(
                "{}: \"architectures\" and \"model_type\" are both missing; add \"architectures\" \
                 (supported: {supported})",
                config_path.display()
            ),
        });
    };
    let mut spec = spec_fn(&cfg).map_err(|e| match e {
        // The family rules say "config.json: …"; the full path replaces that prefix.
        Error::Input(msg) => Error::Input(format!(
            "{}: {}",
            config_path.display(),
            msg.strip_prefix("config.json: ").unwrap_or(&msg)
        )),
        other => other,
    })?;
    spec.architecture = arch.unwrap_or_default();
    Ok(spec)
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
        // A layer beyond num_hidden_layers would be dropped silently from the output.
        if let Some(extra) = self
            .ckpt
            .names()
            .iter()
            .filter_map(|n| {
                n.strip_prefix("model.layers.")?
                    .split('.')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .find(|i| *i >= s.layers)
        {
            return Err(input_err!(
                "{}: the weights hold model.layers.{extra}, but config.json says num_hidden_layers \
                 is {}; the config does not match the weights (fix num_hidden_layers)",
                self.dir.display(),
                s.layers
            ));
        }
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

    /// Every tensor the output is made from, with whether it is a linear weight that gets
    /// quantized (`true`) or a tensor written as a float (`false`).
    pub fn tensor_roles(&self) -> Vec<(String, bool)> {
        let s = &self.spec;
        let mut out = vec![(EMBED.to_string(), false), (FINAL_NORM.to_string(), false)];
        if !s.tied_embeddings {
            out.push((LM_HEAD.to_string(), false));
        }
        for i in 0..s.layers {
            let p = layer_prefix(i);
            let mut norms = vec!["input_layernorm", "post_attention_layernorm"];
            if s.qk_norm {
                norms.extend(["self_attn.q_norm", "self_attn.k_norm"]);
            }
            out.extend(norms.iter().map(|n| (format!("{p}.{n}.weight"), false)));
            for l in s.linears() {
                out.push((format!("{p}.{}.weight", l.name), true));
                if l.bias {
                    out.push((format!("{p}.{}.bias", l.name), false));
                }
            }
        }
        out
    }

    /// Checks every value of an fp checkpoint before any work: a non-finite value anywhere, or
    /// a linear weight beyond float16's range (AWQ stores and runs the linears in float16, so it
    /// would become `inf`), is an input error naming tensor, file and index. Unquantized
    /// tensors beyond float16 are allowed (a bf16/f32 source) and returned: the output dtype
    /// rule decides what to do with them (`--dtype`).
    pub fn check_ranges(&self) -> Result<Option<OutOfRange>> {
        let mut beyond = None;
        for (name, quantized) in self.tensor_roles() {
            let Some((index, value)) = self.ckpt.first_out_of_range(&name, F16_MAX)? else {
                continue;
            };
            let file = self.ckpt.file_of(&name)?.display().to_string();
            if !value.is_finite() {
                return Err(input_err!(
                    "tensor {name} in {file} has a non-finite value ({value}) at index {index}; the \
                     checkpoint is corrupt or overflowed when it was converted — re-export it"
                ));
            }
            if quantized {
                return Err(input_err!(
                    "tensor {name} in {file} holds {value:e} at index {index}, beyond float16's range \
                     (±{F16_MAX}); AWQ stores and runs the quantized linears in float16, so this \
                     weight cannot be represented — the checkpoint is unusual or corrupt"
                ));
            }
            if beyond.is_none() {
                beyond = Some(OutOfRange {
                    tensor: name,
                    index,
                    value,
                });
            }
        }
        Ok(beyond)
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

/// Largest finite float16 magnitude.
pub const F16_MAX: f32 = 65504.0;

/// A value of an unquantized tensor that float16 cannot hold (see [`Model::check_ranges`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct OutOfRange {
    pub tensor: String,
    pub index: usize,
    pub value: f32,
}

pub const EMBED: &str = "model.embed_tokens.weight";
pub const FINAL_NORM: &str = "model.norm.weight";
pub const LM_HEAD: &str = "lm_head.weight";

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_for(config: serde_json::Value) -> Result<ModelSpec> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let mut v = serde_json::json!({
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "vocab_size": 8
        });
        for (k, val) in config.as_object().unwrap() {
            v[k] = val.clone();
        }
        std::fs::write(&path, v.to_string()).unwrap();
        load_spec(&path)
    }

    #[test]
    fn missing_architectures_falls_back_to_model_type() {
        for (model_type, arch) in MODEL_TYPES {
            let spec = spec_for(serde_json::json!({"model_type": model_type})).unwrap();
            assert_eq!(spec.architecture, arch);
        }
        // The family rules apply, not just the name: Qwen2 has q/k/v biases, Qwen3 q/k norms.
        assert!(
            spec_for(serde_json::json!({"model_type": "qwen2"}))
                .unwrap()
                .qkv_bias
        );
        assert!(
            spec_for(serde_json::json!({"model_type": "qwen3"}))
                .unwrap()
                .qk_norm
        );
        // An empty list counts as missing, as in transformers.
        let empty = spec_for(serde_json::json!({"architectures": [], "model_type": "mistral"}));
        assert_eq!(empty.unwrap().architecture, "MistralForCausalLM");
    }

    #[test]
    fn architectures_wins_over_model_type() {
        let spec = spec_for(serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"], "model_type": "llama"
        }))
        .unwrap();
        assert_eq!(spec.architecture, "Qwen2ForCausalLM");
        assert!(spec.qkv_bias);
    }

    #[test]
    fn unknown_model_type_without_architectures_is_an_input_error() {
        let err = spec_for(serde_json::json!({"model_type": "gpt2"})).unwrap_err();
        assert!(matches!(err, Error::Input(_)));
        let msg = err.to_string();
        assert!(msg.contains("\"architectures\" is missing"), "{msg}");
        assert!(msg.contains("\"gpt2\""), "{msg}");
        assert!(
            msg.contains("LlamaForCausalLM") && msg.contains("Qwen3ForCausalLM"),
            "{msg}"
        );
        let neither = spec_for(serde_json::json!({})).unwrap_err().to_string();
        assert!(
            neither.contains("\"model_type\" are both missing"),
            "{neither}"
        );
    }

    #[test]
    fn unknown_architecture_is_still_reported_by_name() {
        let err = spec_for(serde_json::json!({"architectures": ["GPT2LMHeadModel"]}))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"GPT2LMHeadModel\" is not supported"),
            "{err}"
        );
    }
}

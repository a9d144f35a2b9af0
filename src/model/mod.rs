//! Model families and the layer-streaming model handle.
//!
//! A [`Model`] holds the resolved spec and the memory-mapped checkpoint, never the weights:
//! callers ask for the embedding of some ids, for decoder layer `i` (converted to f32 on demand
//! and dropped by the caller), and for the head. That is what keeps memory at one layer.

pub mod arch;
pub mod attention;
pub mod cohere;
pub mod compressed;
pub mod config;
pub mod deepseek_v3;
pub mod experts;
pub mod gemma;
pub mod gemma2;
pub mod gemma3;
pub mod glm4_moe;
pub mod granite;
pub mod groups;
pub mod layer;
pub mod llama;
pub mod mistral;
pub mod mixtral;
pub mod mlp;
pub mod phi3;
pub mod qwen2;
pub mod qwen2_moe;
pub mod qwen3;
pub mod qwen3_moe;
pub mod roots;
pub mod rope;
pub mod shapes;
pub mod stablelm;
pub mod starcoder2;
pub mod wrapped;

use std::path::{Path, PathBuf};

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::input_err;
use crate::io::reader::Checkpoint;
use config::{HfConfig, ModelSpec};
use layer::{LayerWeights, Norm};

type SpecFn = fn(&HfConfig) -> Result<ModelSpec>;

/// One supported family: `architectures[0]`, the `model_type` transformers'
/// `AutoModelForCausalLM` maps to it (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, for configs without
/// `architectures`), and the rules that resolve its spec.
struct Family {
    architecture: &'static str,
    model_type: &'static str,
    spec: SpecFn,
}

macro_rules! family {
    ($m:ident) => {
        Family {
            architecture: $m::ARCHITECTURE,
            model_type: $m::MODEL_TYPE,
            spec: $m::spec,
        }
    };
}

/// Every supported family: adding one is a file in this folder and a row here.
const FAMILIES: [Family; 17] = [
    family!(llama),
    family!(mistral),
    family!(qwen2),
    family!(qwen3),
    family!(gemma),
    family!(gemma2),
    family!(gemma3),
    family!(phi3),
    family!(stablelm),
    family!(starcoder2),
    family!(cohere),
    family!(granite),
    family!(mixtral),
    family!(qwen2_moe),
    family!(qwen3_moe),
    family!(deepseek_v3),
    family!(glm4_moe),
];

/// Every architecture `awq` reads: the causal LMs, then the vision-language wrappers.
pub fn supported_architectures() -> Vec<&'static str> {
    let families = FAMILIES.iter().map(|f| f.architecture);
    families.chain(wrapped::supported()).collect()
}

/// The causal-LM architecture transformers maps a text `model_type` to, if we support it.
fn family_of_model_type(model_type: &str) -> Option<&'static str> {
    FAMILIES
        .iter()
        .find(|f| f.model_type == model_type)
        .map(|f| f.architecture)
}

/// A family rule's error says "config.json: …"; the full path replaces that prefix.
fn at_path(config_path: &Path) -> impl Fn(Error) -> Error + '_ {
    move |e| match e {
        Error::Input(msg) => Error::Input(format!(
            "{}: {}",
            config_path.display(),
            msg.strip_prefix("config.json: ").unwrap_or(&msg)
        )),
        other => other,
    }
}

/// The architecture a config names: `architectures[0]`, or, when `architectures` is missing or
/// empty, the class transformers maps `model_type` to (`None` for an unknown or absent
/// `model_type`).
pub fn resolve_architecture(cfg: &HfConfig) -> Option<String> {
    if let Some(arch) = cfg.architectures.first() {
        return Some(arch.clone());
    }
    let model_type = cfg.model_type.as_deref()?;
    FAMILIES
        .iter()
        .find(|f| f.model_type == model_type)
        .map(|f| f.architecture.to_string())
}

/// Reads and resolves `config.json`.
pub fn load_spec(config_path: &Path) -> Result<ModelSpec> {
    let text = std::fs::read_to_string(config_path).map_err(|e| Error::input_io(config_path, e))?;
    let mut raw: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| input_err!("{} is not valid JSON: {e}", config_path.display()))?;
    let top_model_type = (raw.get("model_type").and_then(|t| t.as_str())).map(str::to_string);
    let wrapper = wrapped::find(
        raw.get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str()),
        raw.get("model_type").and_then(|t| t.as_str()),
    );
    if let Some(w) = wrapper {
        let families = FAMILIES.map(|f| f.model_type);
        raw = wrapped::text_config(&raw, w, family_of_model_type, &families)
            .map_err(at_path(config_path))?;
    }
    config::rope_parameters_as_scaling(&mut raw);
    config::check_rope_scaling(&raw).map_err(|e| input_err!("{}: {e}", config_path.display()))?;
    // The path of a mistyped field (`kv_lora_rank: "32"`), which serde_json's own message
    // leaves out for a parsed value.
    let cfg: HfConfig = serde_path_to_error::deserialize(raw)
        .map_err(|e| input_err!("{}: {}: {}", config_path.display(), e.path(), e.inner()))?;
    let arch = resolve_architecture(&cfg);
    let family = arch
        .as_deref()
        .and_then(|a| FAMILIES.iter().find(|f| f.architecture == a));
    let Some(Family { spec: spec_fn, .. }) = family else {
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
                FAMILIES.map(|f| f.model_type).join(", ")
            ),
            (None, None) => input_err!(
                "{}: \"architectures\" and \"model_type\" are both missing; add \"architectures\" \
                 (supported: {supported})",
                config_path.display()
            ),
        });
    };
    let mut spec = spec_fn(&cfg).map_err(at_path(config_path))?;
    spec.architecture = arch.unwrap_or_default();
    if let Some(w) = wrapper {
        (spec.roots, spec.vision) = {
            let (roots, vision) = wrapped::hub_layout(w);
            (roots, Some(vision))
        };
        spec.architecture = w.architecture.to_string();
    }
    spec.model_type = top_model_type;
    Ok(spec)
}

/// Moves a wrapped model's roots to the layout its weights use, and refuses tensors that belong
/// to neither part (see [`wrapped::locate`]); nothing to do for a causal LM.
pub fn locate(spec: &mut ModelSpec, ckpt: &Checkpoint) -> Result<()> {
    if let Some(vision) = &mut spec.vision {
        wrapped::locate(&mut spec.roots, vision, &ckpt.names())?;
    }
    Ok(())
}

pub struct Model {
    pub dir: PathBuf,
    pub spec: ModelSpec,
    pub ckpt: std::sync::Arc<Checkpoint>,
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
        if !dir.join("config.json").exists() {
            // A GGUF-only or PyTorch-only directory lacks config.json too: say what it holds
            // (and how to convert it) rather than only that config.json is missing.
            Checkpoint::open_dir(dir)?;
        }
        let mut spec = load_spec(&dir.join("config.json"))?;
        let ckpt = std::sync::Arc::new(Checkpoint::open_dir(dir)?.with_fp8_blocks(spec.fp8_block));
        locate(&mut spec, &ckpt)?;
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
        let r = &s.roots;
        if let Some(extra) = self
            .ckpt
            .names()
            .iter()
            .filter_map(|n| r.layer_of(n))
            .find(|i| *i >= s.layers + s.mtp_layers)
        {
            return Err(input_err!(
                "{}: the weights hold {}, but config.json says num_hidden_layers is {}; the \
                 config does not match the weights (fix num_hidden_layers)",
                self.dir.display(),
                r.layer(extra),
                s.layers
            ));
        }
        self.ckpt.expect_shape(&r.embed(), &[s.vocab, s.hidden])?;
        for name in self.final_norm_tensors() {
            self.ckpt.expect_shape(&name, &[s.hidden])?;
        }
        if !s.tied_embeddings {
            self.ckpt
                .expect_shape(&r.head_weight(), &[s.vocab, s.hidden])?;
        }
        for i in 0..self.spec.layers {
            let s = &*self.spec.layer(i);
            let p = r.layer(i);
            let expect =
                |name: &str, shape: &[usize]| self.ckpt.expect_shape(&format!("{p}.{name}"), shape);
            for (name, width) in s.layer_floats() {
                expect(&name, &[width])?;
            }
            for shapes::LinearShape {
                name,
                out,
                inp,
                bias,
                ..
            } in s.linears()
            {
                match s.packed(&format!("{p}.{name}")) {
                    None => expect(&format!("{name}.weight"), &[out, inp])?,
                    Some(fmt) => {
                        let shapes = layer::packed_shapes(out, inp, fmt)?;
                        for (t, shape) in fmt.layout.tensor_names().iter().zip(shapes) {
                            expect(&format!("{name}.{t}"), &shape)?;
                        }
                    }
                }
                if bias {
                    expect(&format!("{name}.bias"), &[out])?;
                }
            }
            for r in s.router_linears() {
                expect(&format!("{}.weight", r.name), &[r.out, r.inp])?;
            }
            for (name, width) in s.layer_verbatim() {
                expect(name, &[width])?;
            }
        }
        Ok(())
    }

    /// Every tensor the output is made from, with whether it is a linear weight that gets
    /// quantized (`true`) or a tensor written as a float (`false`).
    pub fn tensor_roles(&self) -> Vec<(String, bool)> {
        let s = &self.spec;
        let mut out = vec![(s.roots.embed(), false)];
        out.extend(self.final_norm_tensors().into_iter().map(|n| (n, false)));
        if !s.tied_embeddings {
            out.push((s.roots.head_weight(), false));
        }
        // The vision parts are copied, not quantized; their values are checked all the same.
        out.extend(self.vision_tensors().into_iter().map(|n| (n, false)));
        for i in 0..self.spec.layers {
            let s = &*self.spec.layer(i);
            let p = s.roots.layer(i);
            out.extend(
                s.layer_floats()
                    .into_iter()
                    .map(|(n, _)| (format!("{p}.{n}"), false)),
            );
            for r in s.router_linears() {
                out.push((format!("{p}.{}.weight", r.name), false));
            }
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
            crate::interrupt::check()?;
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

    /// Embedding rows for `ids`, times the family's embedding scale: `[ids.len(), hidden]`.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        let embed = self.spec.roots.embed();
        let rows = self
            .ckpt
            .rows_f32(&embed, &[self.spec.vocab, self.spec.hidden], ids)
            .inspect(|_| self.ckpt.release(&embed))?;
        Ok(match self.spec.embed_scale {
            Some(scale) => (rows * scale)?,
            None => rows,
        })
    }

    /// Decoder layer `i` converted to f32.
    pub fn layer(&self, i: usize) -> Result<LayerWeights> {
        let layer = LayerWeights::load(&self.ckpt, &self.spec.layer(i), i)?;
        self.ckpt.release(&format!("{}.", self.spec.roots.layer(i)));
        Ok(layer)
    }

    /// The final norm `model.norm` (weight, and bias for LayerNorms with bias).
    pub fn final_norm(&self) -> Result<Norm> {
        Norm::load(
            &self.ckpt,
            &self.spec.roots.final_norm(),
            self.spec.hidden,
            self.spec.norm_bias,
        )
    }

    /// The final norm's tensor names: `.weight`, and `.bias` for LayerNorms with bias.
    pub fn final_norm_tensors(&self) -> Vec<String> {
        final_norm_tensors(&self.spec)
    }

    /// The `modules_to_not_convert` entry that keeps the decoder module `module` (full name)
    /// float. A causal LM's is the full name. Inside a wrapper it is the name relative to the
    /// decoder root (`layers.3.mlp.down_proj`): the one form every loader matches whatever
    /// layout it names modules in (vLLM and transformers 4 match substrings of
    /// `language_model.model.layers.3…`, transformers 5 suffixes of
    /// `model.language_model.layers.3…`).
    pub fn keep_entry(&self, module: &str) -> String {
        let root = format!("{}.", self.spec.roots.decoder);
        match (&self.spec.vision, module.strip_prefix(&root)) {
            (Some(_), Some(relative)) => relative.to_string(),
            _ => module.to_string(),
        }
    }

    /// A `--keep-fp16` entry that would also name a vision module (a substring or a suffix of
    /// its name), with that module: such an entry cannot say which of the two it means.
    pub fn keep_entry_naming_vision(&self) -> Option<(String, String)> {
        let modules: Vec<String> = self
            .vision_tensors()
            .iter()
            .filter_map(|n| n.rsplit_once('.').map(|(m, _)| m.to_string()))
            .collect();
        for i in 0..self.spec.layers {
            for unit in self.spec.keep_units() {
                for name in std::iter::once(unit.name).chain(unit.linears.iter().copied()) {
                    let entry = self.keep_entry(&format!("{}.{name}", self.spec.roots.layer(i)));
                    if let Some(m) = modules.iter().find(|m| m.contains(&entry)) {
                        return Some((entry, m.clone()));
                    }
                }
            }
        }
        None
    }

    /// A wrapper's float parts, summarised (`None` for a causal LM).
    pub fn vision_parts(&self) -> Option<wrapped::VisionParts> {
        let vision = self.spec.vision.as_ref()?;
        Some(wrapped::parts(vision, &self.ckpt))
    }

    /// The tensors of the vision parts a wrapper carries (copied unchanged), in name order;
    /// empty for a causal LM.
    pub fn vision_tensors(&self) -> Vec<String> {
        let Some(v) = &self.spec.vision else {
            return Vec::new();
        };
        let mut names: Vec<String> = self
            .ckpt
            .names()
            .into_iter()
            .filter(|n| v.owns(n))
            .map(str::to_string)
            .collect();
        names.sort();
        names
    }

    /// The norm that reads decoder layer `i`'s output: layer `i + 1`'s `input_layernorm`, or the
    /// final norm after the last layer.
    pub fn next_norm(&self, i: usize) -> Result<Norm> {
        if i + 1 >= self.spec.layers {
            return self.final_norm();
        }
        let p = format!("{}.{}", self.spec.roots.layer(i + 1), shapes::INPUT_NORM);
        Norm::load(&self.ckpt, &p, self.spec.hidden, self.spec.norm_bias)
    }

    /// The final norm and the output projection, ready to turn hidden states into logits.
    pub fn head(&self) -> Result<Head> {
        Ok(Head {
            norm: self.final_norm()?,
            weight_t: self.lm_head()?.t()?,
        })
    }

    /// The output projection `[vocab, hidden]` (the embedding matrix when tied).
    pub fn lm_head(&self) -> Result<Tensor> {
        let r = &self.spec.roots;
        let name = if self.spec.tied_embeddings {
            r.embed()
        } else {
            r.head_weight()
        };
        self.ckpt.f32(&name, &[self.spec.vocab, self.spec.hidden])
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

/// The final norm and the transposed output projection `[hidden, vocab]`.
pub struct Head {
    pub norm: Norm,
    pub weight_t: Tensor,
}

impl Head {
    /// Logits `[tokens, vocab]` for hidden states `h: [tokens, hidden]`: final norm, projection,
    /// the family's logit multiplier (Cohere, Granite) and soft-capping (Gemma 2/3), each op
    /// rounded to `spec.serve_dtype` when set.
    pub fn logits(&self, spec: &ModelSpec, h: &Tensor) -> Result<Tensor> {
        let r = |t: Tensor| layer::round_to(t, spec.serve_dtype);
        let mut logits = r(r(self.norm.apply(spec, h)?)?.matmul(&self.weight_t)?)?;
        if spec.logit_mult != 1.0 {
            logits = r((logits * spec.logit_mult)?)?;
        }
        if let Some(cap) = spec.final_softcap {
            logits = r(((logits / cap)?.tanh()? * cap)?)?;
        }
        Ok(logits)
    }
}

/// The final norm's tensor names under `spec.roots`: `.weight`, and `.bias` for LayerNorms
/// with bias.
pub fn final_norm_tensors(spec: &ModelSpec) -> Vec<String> {
    let norm = spec.roots.final_norm();
    let mut names = vec![format!("{norm}.weight")];
    if spec.norm_bias {
        names.push(format!("{norm}.bias"));
    }
    names
}

/// The `modules_to_not_convert` entry that keeps the head float: loaders match entries as
/// substrings of module names, so it also covers a wrapper's `language_model.lm_head`.
pub const HEAD_MODULE: &str = "lm_head";

/// The spec of a complete `config.json` (tests of other modules use released configs).
#[cfg(test)]
pub(crate) fn test_spec(config: serde_json::Value) -> ModelSpec {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, config.to_string()).unwrap();
    load_spec(&path).unwrap()
}

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
        for f in FAMILIES {
            let spec = spec_for(serde_json::json!({"model_type": f.model_type})).unwrap();
            assert_eq!(spec.architecture, f.architecture);
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

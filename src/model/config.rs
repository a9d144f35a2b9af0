//! `config.json` as transformers writes it, for every supported family, and the resolved
//! [`ModelSpec`] every other module works from. Family files (llama.rs, gemma2.rs, phi3.rs, …)
//! turn the raw mirror into a spec, applying their own defaults and quirks; `shapes.rs` derives
//! the tensors of a layer from the spec.

use serde::Deserialize;

use super::arch::{Act, AttnProj, Block, Mlp, Moe, NormKind};
use crate::error::Result;
use crate::input_err;
use crate::quant::pack::Layout;

/// Serde mirror of the keys we read from `config.json`. Defaults follow transformers.
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: Option<usize>,
    /// Top-level pretraining context length in positions (Phi-3 style configs). For `yarn` and
    /// `longrope` it takes priority over `rope_scaling.original_max_position_embeddings`, as in
    /// transformers' `RotaryEmbeddingConfigMixin.standardize_rope_params`.
    pub original_max_position_embeddings: Option<usize>,
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    pub hidden_act: Option<String>,
    /// Gemma's name for the MLP activation (wins over `hidden_act` there).
    pub hidden_activation: Option<String>,
    #[serde(default)]
    pub quantization_config: Option<serde_json::Value>,
    /// LayerNorm epsilon (StableLM, Cohere).
    pub layer_norm_eps: Option<f64>,
    /// LayerNorm epsilon (Starcoder2).
    pub norm_epsilon: Option<f64>,
    /// Share of each head that rotary embedding covers (Phi-3, StableLM); 1 when absent.
    pub partial_rotary_factor: Option<f64>,
    /// StableLM: biases on q/k/v.
    pub use_qkv_bias: Option<bool>,
    /// StableLM: per-head LayerNorm on q and k (not supported).
    pub qk_layernorm: Option<bool>,
    /// StableLM: attention and MLP read the same norm's output.
    pub use_parallel_residual: Option<bool>,
    /// Starcoder2: biases on every linear.
    pub use_bias: Option<bool>,
    /// Cohere: logits are multiplied by this.
    pub logit_scale: Option<f64>,
    /// Cohere: per-head LayerNorm on q and k (not supported).
    pub use_qk_norm: Option<bool>,
    /// Granite: embeddings are multiplied by this.
    pub embedding_multiplier: Option<f64>,
    /// Granite: both residual branches are multiplied by this.
    pub residual_multiplier: Option<f64>,
    /// Granite: the attention scale (instead of head_dim^-0.5).
    pub attention_multiplier: Option<f64>,
    /// Granite: logits are divided by this.
    pub logits_scaling: Option<f64>,
    /// Gemma 2: attention scores become `cap · tanh(score / cap)`. Outer `None`: absent (the
    /// family default applies); `Some(None)`: an explicit null (off).
    #[serde(default, deserialize_with = "present")]
    pub attn_logit_softcapping: Option<Option<f64>>,
    /// Gemma 2/3: logits become `cap · tanh(logit / cap)` (absent vs null as above).
    #[serde(default, deserialize_with = "present")]
    pub final_logit_softcapping: Option<Option<f64>>,
    /// Gemma 2/3: the attention scale is `query_pre_attn_scalar^-0.5`.
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 3: every n-th layer is global, the others slide.
    pub sliding_window_pattern: Option<usize>,
    /// Gemma 3: rope base of the sliding layers (no scaling there).
    pub rope_local_base_freq: Option<f64>,
    /// Newer configs: `"sliding_attention"` / `"full_attention"` per layer.
    pub layer_types: Option<Vec<String>>,
    /// Mixtral: experts per layer.
    pub num_local_experts: Option<usize>,
    /// Qwen2-MoE, Qwen3-MoE: experts per layer.
    pub num_experts: Option<usize>,
    /// Experts each token is routed to.
    pub num_experts_per_tok: Option<usize>,
    /// Qwen MoE: each expert's intermediate size.
    pub moe_intermediate_size: Option<usize>,
    /// Qwen2-MoE: the shared expert's intermediate size.
    pub shared_expert_intermediate_size: Option<usize>,
    /// Qwen MoE: renormalise the top-k routing probabilities.
    pub norm_topk_prob: Option<bool>,
    /// Qwen MoE: every n-th layer is sparse.
    pub decoder_sparse_step: Option<usize>,
    /// Qwen MoE: layers with a dense MLP instead of experts.
    pub mlp_only_layers: Option<Vec<usize>>,
    /// DeepSeek-V3, GLM-4.5: routed experts per MoE layer.
    pub n_routed_experts: Option<usize>,
    /// DeepSeek-V3, GLM-4.5: shared experts (one MLP of `n × moe_intermediate_size`).
    pub n_shared_experts: Option<usize>,
    /// DeepSeek-V3, GLM-4.5: the first k layers have a dense MLP.
    pub first_k_dense_replace: Option<usize>,
    /// DeepSeek-V3, GLM-4.5: expert groups of the router, and how many groups stay.
    pub n_group: Option<usize>,
    pub topk_group: Option<usize>,
    /// DeepSeek-V3, GLM-4.5: multiplies the routed experts' weights.
    pub routed_scaling_factor: Option<f64>,
    /// DeepSeek-V3: rank of the q projection (`null`: one `q_proj`, no low-rank q).
    #[serde(default, deserialize_with = "present_usize")]
    pub q_lora_rank: Option<Option<usize>>,
    /// DeepSeek-V3: rank of the compressed kv latent.
    pub kv_lora_rank: Option<usize>,
    /// DeepSeek-V3: per-head q/k features without and with rope, and v's.
    pub qk_nope_head_dim: Option<usize>,
    pub qk_rope_head_dim: Option<usize>,
    pub v_head_dim: Option<usize>,
    /// DeepSeek-V3: rope pairs `(2i, 2i+1)` (default true).
    pub rope_interleave: Option<bool>,
    /// DeepSeek-V3, GLM-4.5: multi-token-prediction layers stored after the decoder layers.
    pub num_nextn_predict_layers: Option<usize>,
}

/// A key that is present (possibly null), as opposed to absent.
fn present_usize<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Option<usize>>, D::Error> {
    Option::<usize>::deserialize(d).map(Some)
}

/// A key that is present (possibly null), as opposed to absent.
fn present<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Option<f64>>, D::Error> {
    Option::<f64>::deserialize(d).map(Some)
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
}

/// transformers 5 saves the rope settings as `rope_parameters` (with `rope_theta` inside)
/// instead of `rope_scaling` and a top-level `rope_theta`. A flat `rope_parameters` (one that
/// names its `rope_type`) stands in for both when they are absent; per-layer-type dicts are
/// left alone.
pub fn rope_parameters_as_scaling(raw: &mut serde_json::Value) {
    let Some(obj) = raw.as_object_mut() else {
        return;
    };
    per_layer_type_rope(obj);
    let Some(params) = obj
        .get("rope_parameters")
        .filter(|p| p.get("rope_type").is_some_and(|t| t.is_string()))
        .cloned()
    else {
        return;
    };
    if !obj.contains_key("rope_theta") {
        if let Some(theta) = params.get("rope_theta") {
            obj.insert("rope_theta".into(), theta.clone());
        }
    }
    if obj.get("rope_scaling").is_none_or(|v| v.is_null()) {
        obj.insert("rope_scaling".into(), params);
    }
}

/// transformers 5's Gemma 3 keys `rope_parameters` by layer type: `full_attention` holds the
/// global layers' base and scaling, `sliding_attention` the local base
/// (`rope_local_base_freq` in 4.x). Absent 4.x keys are filled from them.
fn per_layer_type_rope(obj: &mut serde_json::Map<String, serde_json::Value>) {
    let Some(params) = obj.get("rope_parameters").cloned() else {
        return;
    };
    if let Some(full) = params.get("full_attention").filter(|f| f.is_object()) {
        if let Some(theta) = full.get("rope_theta") {
            obj.entry("rope_theta").or_insert(theta.clone());
        }
        if obj.get("rope_scaling").is_none_or(|v| v.is_null()) {
            obj.insert("rope_scaling".into(), full.clone());
        }
    }
    if let Some(theta) = params
        .get("sliding_attention")
        .and_then(|s| s.get("rope_theta"))
    {
        obj.entry("rope_local_base_freq").or_insert(theta.clone());
    }
}

/// Top-level config fields that must be numbers: a string there is named (serde's own message
/// does not say which field).
const CONFIG_NUMBERS: [&str; 14] = [
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "rope_theta",
    "rms_norm_eps",
    "layer_norm_eps",
    "partial_rotary_factor",
    "sliding_window",
    "original_max_position_embeddings",
];

fn check_numbers(raw: &serde_json::Value) -> Result<()> {
    for key in CONFIG_NUMBERS {
        match raw.get(key) {
            Some(v) if !v.is_number() && !v.is_null() => {
                return Err(input_err!(
                    "{key} is {v}, not a number; write it without quotes"
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Fields of `rope_scaling` that transformers computes with as numbers.
const ROPE_NUMBERS: [&str; 9] = [
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
    "attention_factor",
];

/// Refuses a `rope_scaling` that transformers refuses, naming the field (`modeling_rope_utils`:
/// `rope_config_validation` raises `KeyError` for missing required keys in 4.4x;
/// `_validate_llama3_parameters` in 4.4x and 5.x):
/// - neither `rope_type` nor `type`: 4.4x raises; 5.x silently drops the scaling, so the model
///   would run unscaled — either way not what the file meant;
/// - a required key missing: `factor` (linear, dynamic, yarn, llama3), `low_freq_factor` and
///   `high_freq_factor` (llama3), `short_factor` and `long_factor` (longrope);
/// - a number given as a string (`"factor": "8.0"`): validation only warns, but the rope
///   computation then fails on it.
///
/// Defaults transformers fills are used as it does (`RopeKind` resolution): yarn's `beta_fast`
/// 32, `beta_slow` 1 and derived `attention_factor`; `original_max_position_embeddings` from
/// `max_position_embeddings` (5.x `standardize_rope_params`, also for llama3).
pub fn check_rope_scaling(raw: &serde_json::Value) -> Result<()> {
    check_numbers(raw)?;
    let Some(rs) = raw.get("rope_scaling").filter(|v| !v.is_null()) else {
        return Ok(());
    };
    let Some(map) = rs.as_object() else {
        return Err(input_err!(
            "rope_scaling must be an object like {{\"rope_type\": \"linear\", \"factor\": 2.0}}, found {rs}"
        ));
    };
    for key in ROPE_NUMBERS {
        match map.get(key) {
            Some(v) if !v.is_number() && !v.is_null() => {
                return Err(input_err!(
                    "rope_scaling.{key} is {v}, not a number; transformers computes with it as a \
                     number and fails — write it without quotes"
                ))
            }
            _ => {}
        }
    }
    let kind = match (map.get("rope_type"), map.get("type")) {
        (Some(serde_json::Value::String(t)), _) | (None, Some(serde_json::Value::String(t))) => t,
        (None, None) => {
            let keys: Vec<&str> = map.keys().map(String::as_str).collect();
            return Err(input_err!(
                "rope_scaling has no \"rope_type\" (or legacy \"type\"); keys: {}. transformers \
                 4.x refuses it and 5.x ignores the scaling; add the type, e.g. \"rope_type\": \
                 \"linear\" (or dynamic, yarn, llama3, longrope, default)",
                keys.join(", ")
            ));
        }
        (Some(t), _) | (None, Some(t)) => {
            return Err(input_err!("rope_scaling's type is {t}, not a string"))
        }
    };
    let required: &[&str] = match kind.as_str() {
        "linear" | "dynamic" | "yarn" => &["factor"],
        "llama3" => &["factor", "low_freq_factor", "high_freq_factor"],
        "longrope" => &["short_factor", "long_factor"],
        _ => &[],
    };
    match required
        .iter()
        .find(|k| map.get(**k).is_none_or(|v| v.is_null()))
    {
        Some(missing) => Err(input_err!(
            "rope_scaling of type {kind:?} needs \"{missing}\" (transformers raises KeyError \
             without it); required for {kind}: {}",
            required.join(", ")
        )),
        None => Ok(()),
    }
}

/// Serde mirror of `rope_scaling` (transformers' `rope_parameters`); unknown keys are ignored.
/// Read the scaling type with [`RopeScaling::kind`], never from the two type fields directly.
#[derive(Debug, Clone, Deserialize)]
pub struct RopeScaling {
    /// `rope_type`, the current key.
    pub rope_type: Option<String>,
    /// `type`, the legacy key. transformers writes both keys when it re-saves an old config.
    #[serde(rename = "type")]
    pub legacy_type: Option<String>,
    pub factor: Option<f64>,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    /// Pretraining context length in positions (`llama3`, `yarn`, `longrope`).
    pub original_max_position_embeddings: Option<usize>,
    /// `yarn`: rotations per original context above which a dimension is left alone (default 32).
    pub beta_fast: Option<f64>,
    /// `yarn`: rotations per original context below which a dimension is fully interpolated
    /// (default 1).
    pub beta_slow: Option<f64>,
    /// `yarn` (DeepSeek style): numerator weight of the derived attention factor.
    pub mscale: Option<f64>,
    /// `yarn` (DeepSeek style): denominator weight of the derived attention factor.
    pub mscale_all_dim: Option<f64>,
    /// `yarn`, `longrope`: explicit multiplier of cos and sin; derived from `factor` when absent.
    pub attention_factor: Option<f64>,
    /// `yarn`: round the correction range outward to whole dimensions (default true).
    pub truncate: Option<bool>,
    /// `longrope`: per-frequency divisors (`head_dim / 2` of them) for sequences that fit the
    /// original context.
    pub short_factor: Option<Vec<f64>>,
    /// `longrope`: per-frequency divisors (`head_dim / 2` of them) for longer sequences.
    pub long_factor: Option<Vec<f64>>,
    /// Multimodal rope (Qwen2-VL, Qwen2.5-VL): how many of the `rotary_dim / 2` frequencies
    /// read the temporal, height and width position streams, in that order.
    pub mrope_section: Option<Vec<usize>>,
}

impl RopeScaling {
    /// The scaling type: `rope_type`, else the legacy `type`, else `"default"` (transformers'
    /// `standardize_rope_params`). Both keys may be present when they agree; when they differ the
    /// config is ambiguous and this is an input error naming both values.
    pub fn kind(&self) -> Result<&str> {
        match (self.rope_type.as_deref(), self.legacy_type.as_deref()) {
            (Some(a), Some(b)) if a != b => Err(input_err!(
                "config.json: rope_scaling has \"rope_type\": {a:?} and \"type\": {b:?}, which disagree; \
                 keep one of them (or make them equal)"
            )),
            (Some(a), _) | (None, Some(a)) => Ok(a),
            (None, None) => Ok("default"),
        }
    }
}

/// How rotary frequencies are adjusted (transformers' `rope_type`, `modeling_rope_utils`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeKind {
    Default,
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max: usize,
    },
    /// YaRN (transformers `_compute_yarn_parameters`): frequencies that turn fewer than
    /// `beta_slow` times over the original context are divided by `factor`, those that turn more
    /// than `beta_fast` times are kept, with a linear ramp over the dimensions in between.
    Yarn {
        /// Context extension ratio (dimensionless).
        factor: f64,
        /// Pretraining context length in positions the correction range is measured against.
        original_max: usize,
        /// Rotation counts bounding the ramp (defaults 32 and 1).
        beta_fast: f64,
        beta_slow: f64,
        /// Round the correction range outward to whole dimensions (default true).
        truncate: bool,
        /// Resolved multiplier of cos and sin (transformers' `attention_scaling`).
        attention_factor: f64,
    },
    /// Dynamic NTK (transformers `_compute_dynamic_ntk_parameters`): the base grows with the
    /// sequence length once it exceeds `max_position_embeddings`; see [`crate::model::rope`].
    Dynamic {
        factor: f64,
        /// `max_position_embeddings` of config.json, in positions.
        max_position_embeddings: usize,
    },
    /// LongRoPE, Phi-3 style (transformers `_compute_longrope_parameters`): each frequency is
    /// divided by its own factor, from `long_factor` when the sequence is longer than
    /// `original_max` positions and from `short_factor` otherwise.
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        /// Pretraining context length in positions.
        original_max: usize,
        /// Resolved multiplier of cos and sin (transformers' `attention_scaling`).
        attention_factor: f64,
    },
    /// Multimodal rope (Qwen2-VL, Qwen2.5-VL `mrope_section`): default frequencies, each
    /// reading one of three position streams (temporal, height, width) by section. See
    /// [`crate::model::rope::mrope_angles`] for what text-only input makes of it.
    Multimodal {
        /// Frequencies per stream; they sum to `rotary_dim / 2`.
        section: Vec<usize>,
    },
}

/// Everything the forward pass and the quantizer need to know about a model, resolved. The
/// component fields (`norm`, `block`, `attn_proj`, `mlp`, `act`, …) are what a family chooses;
/// see `arch.rs`.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// `architectures[0]` of config.json, e.g. `LlamaForCausalLM`.
    pub architecture: String,
    /// config.json's top-level `model_type` (a wrapper's, e.g. `qwen2_5_vl`; Kimi K2's
    /// `kimi_k2` on the DeepSeek-V3 architecture): what TGI dispatches on.
    pub model_type: Option<String>,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    /// Epsilon of every norm of the model.
    pub norm_eps: f64,
    pub norm: NormKind,
    /// LayerNorms carry a bias (`.bias` next to every norm `.weight`).
    pub norm_bias: bool,
    pub block: Block,
    pub attn_proj: AttnProj,
    pub mlp: Mlp,
    pub act: Act,
    pub rope_theta: f64,
    pub rope: RopeKind,
    /// Rotated features per head: `head_dim × partial_rotary_factor` (even).
    pub rotary_dim: usize,
    /// Rotary pairs are interleaved (Cohere) instead of split in halves.
    pub rope_interleaved: bool,
    /// Multiplies q·kᵀ: head_dim^-0.5, Gemma 2/3 `query_pre_attn_scalar^-0.5`, Granite
    /// `attention_multiplier`.
    pub attn_scale: f64,
    /// Attention-score soft-capping (Gemma 2).
    pub attn_softcap: Option<f64>,
    /// Final-logit soft-capping (Gemma 2/3), applied after `logit_mult`.
    pub final_softcap: Option<f64>,
    /// Multiplies the embedding rows: Gemma √hidden, Granite `embedding_multiplier`.
    pub embed_scale: Option<f64>,
    /// Multiplies both residual branches (Granite).
    pub residual_mult: f64,
    /// Multiplies the logits: Cohere `logit_scale`, Granite `1 / logits_scaling`.
    pub logit_mult: f64,
    /// Which layers use `sliding_window` (`None`: all of them, when a window is set).
    pub sliding_layers: Option<Vec<bool>>,
    /// Rope base of the sliding layers, unscaled (Gemma 3 `rope_local_base_freq`).
    pub local_rope_theta: Option<f64>,
    /// The experts when `mlp` is [`Mlp::Moe`].
    pub moe: Option<Moe>,
    /// Per layer, in a MoE model: `true` where the layer has a dense gated MLP of
    /// `intermediate` instead of experts (DeepSeek-V3's `first_k_dense_replace`, Qwen MoE's
    /// `mlp_only_layers`). Empty: every layer is as `mlp` says. See [`ModelSpec::layer`].
    pub dense: Vec<bool>,
    /// The latent attention's ranks and head sizes when `attn_proj` is [`AttnProj::Latent`].
    pub mla: Option<super::attention::mla::Mla>,
    /// An fp8 source (`quantization_config.quant_method` "fp8"): the `[rows, cols]` block of
    /// each `weight_scale_inv` entry; the linears are dequantized on load.
    pub fp8_block: Option<[usize; 2]>,
    /// Multi-token-prediction layers stored after the decoder layers (`layers.{layers + k}`),
    /// which the output leaves out (see the README).
    pub mtp_layers: usize,
    pub tied_embeddings: bool,
    /// Biases on q/k/v (Qwen2, or Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama `attention_bias`).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Per-head RMSNorm on q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Tokens further back than this are not attended to (Mistral; per layer with
    /// `sliding_layers`); `None` = full causal.
    pub sliding_window: Option<usize>,
    /// Set when the checkpoint is already AWQ-packed: linears are read by dequantizing.
    pub awq: Option<AwqFormat>,
    /// An AWQ checkpoint's `quantization_config.modules_to_not_convert`: a linear whose module
    /// name contains one of these is stored unquantized (`.weight`), as transformers and vLLM
    /// read it (substring match). `None` when absent or `null` (and for an unquantized
    /// checkpoint): transformers treats a null list differently from any list, even an empty
    /// one (it then adds the head itself; see `verify`).
    pub not_converted: Option<Vec<String>>,
    /// Not from config.json: when set (`awq eval --dtype`), the forward rounds every
    /// activation to this dtype after each op, as a server running in it would (f32 math in
    /// between). `None`: plain f32.
    pub serve_dtype: Option<candle_core::DType>,
    /// `max_position_embeddings`: the longest sequence the model was trained for, if given.
    pub max_positions: Option<usize>,
    /// Where the decoder's tensors live: `model.*` and `lm_head` for a causal LM, another root
    /// inside a vision-language wrapper.
    pub roots: super::roots::Roots,
    /// A vision-language wrapper's float parts (`None` for a causal LM).
    pub vision: Option<super::wrapped::Vision>,
}

/// The packed format of an AWQ checkpoint (`quantization_config`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AwqFormat {
    pub group: usize,
    pub layout: Layout,
}

impl HfConfig {
    /// The spec shared by the whole family; family files adjust the fields that differ.
    pub fn base_spec(&self, tie_default: bool) -> Result<ModelSpec> {
        let heads = self.num_attention_heads;
        if heads == 0 || self.hidden_size == 0 || self.num_hidden_layers == 0 {
            return Err(input_err!(
                "config.json: hidden_size, num_hidden_layers and num_attention_heads must be positive"
            ));
        }
        let kv_heads = self.num_key_value_heads.unwrap_or(heads);
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(input_err!(
                "config.json: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
            ));
        }
        let head_dim = self.head_dim.unwrap_or(self.hidden_size / heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(input_err!(
                "config.json: head_dim {head_dim} must be even and positive"
            ));
        }
        let rotary_dim = self.rotary_dim(head_dim)?;
        Ok(ModelSpec {
            architecture: self.architectures.first().cloned().unwrap_or_default(),
            model_type: self.model_type.clone(),
            hidden: self.hidden_size,
            intermediate: self.intermediate_size,
            layers: self.num_hidden_layers,
            heads,
            kv_heads,
            head_dim,
            vocab: self.vocab_size,
            norm_eps: self.rms_norm_eps,
            norm: NormKind::Rms,
            norm_bias: false,
            block: Block::Sequential,
            attn_proj: AttnProj::Separate,
            mlp: Mlp::Gated,
            act: Act::parse(self.hidden_act.as_deref().unwrap_or("silu"))?,
            rope_theta: self.rope_theta,
            rope: self.rope_kind(rotary_dim)?,
            rotary_dim,
            rope_interleaved: false,
            attn_scale: 1.0 / (head_dim as f64).sqrt(),
            attn_softcap: None,
            final_softcap: None,
            embed_scale: None,
            residual_mult: 1.0,
            logit_mult: 1.0,
            sliding_layers: None,
            local_rope_theta: None,
            moe: None,
            dense: Vec::new(),
            mla: None,
            fp8_block: self.fp8_block()?,
            mtp_layers: self.num_nextn_predict_layers.unwrap_or(0),
            tied_embeddings: self.tie_word_embeddings.unwrap_or(tie_default),
            qkv_bias: self.attention_bias,
            o_bias: self.attention_bias,
            mlp_bias: self.mlp_bias,
            qk_norm: false,
            sliding_window: None,
            awq: self.awq_format()?,
            not_converted: self.not_converted()?,
            serve_dtype: None,
            max_positions: self.max_position_embeddings,
            roots: Default::default(),
            vision: None,
        })
    }

    /// `head_dim × partial_rotary_factor`, truncated as transformers' `int()` does; must be even.
    fn rotary_dim(&self, head_dim: usize) -> Result<usize> {
        let factor = self.partial_rotary_factor.unwrap_or(1.0);
        if !(factor > 0.0 && factor <= 1.0) {
            return Err(input_err!(
                "config.json: partial_rotary_factor {factor} must be in (0, 1]"
            ));
        }
        let dim = (head_dim as f64 * factor) as usize;
        if dim == 0 || !dim.is_multiple_of(2) {
            return Err(input_err!(
                "config.json: partial_rotary_factor {factor} of head_dim {head_dim} gives {dim} \
                 rotary features; it must be even and positive"
            ));
        }
        Ok(dim)
    }

    /// The LayerNorm epsilon under whichever key the family uses (default 1e-5).
    pub fn layer_norm_eps(&self) -> f64 {
        self.layer_norm_eps.or(self.norm_epsilon).unwrap_or(1e-5)
    }

    /// `sliding_window`, refused when zero.
    pub fn window(&self) -> Result<Option<usize>> {
        match self.sliding_window {
            Some(0) => Err(input_err!(
                "config.json: sliding_window 0 would hide every token; use null for none"
            )),
            w => Ok(w),
        }
    }

    /// Qwen MoE: which layers have a dense MLP (transformers: a layer is sparse unless it is in
    /// `mlp_only_layers` or `(i + 1)` is not a multiple of `decoder_sparse_step`).
    pub fn qwen_dense_layers(&self) -> Result<Vec<bool>> {
        let step = self.decoder_sparse_step.unwrap_or(1);
        if step == 0 {
            return Err(input_err!(
                "config.json: decoder_sparse_step must be positive"
            ));
        }
        let only = self.mlp_only_layers.clone().unwrap_or_default();
        let dense: Vec<bool> = (0..self.num_hidden_layers)
            .map(|i| only.contains(&i) || !(i + 1).is_multiple_of(step))
            .collect();
        Ok(if dense.iter().any(|&d| d) {
            dense
        } else {
            Vec::new()
        })
    }

    /// Per-layer sliding flags from `layer_types`, when the config has them.
    pub fn sliding_from_layer_types(&self) -> Result<Option<Vec<bool>>> {
        let Some(types) = &self.layer_types else {
            return Ok(None);
        };
        if types.len() != self.num_hidden_layers {
            return Err(input_err!(
                "config.json: layer_types has {} entries for {} layers",
                types.len(),
                self.num_hidden_layers
            ));
        }
        types
            .iter()
            .map(|t| match t.as_str() {
                "sliding_attention" => Ok(true),
                "full_attention" => Ok(false),
                other => Err(input_err!(
                    "config.json: layer_types entry {other:?} is not supported (sliding_attention, full_attention)"
                )),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// `modules_to_not_convert`: absent or `null` is `None`; anything but a list of strings is
    /// refused (Python loaders would iterate a string character by character, matching every
    /// module).
    fn not_converted(&self) -> Result<Option<Vec<String>>> {
        let q = self.quantization_config.as_ref();
        if q.and_then(|q| q.get("quant_method"))
            .and_then(|m| m.as_str())
            == Some("compressed-tensors")
        {
            return super::compressed::ignore(q.expect("checked")).map(Some);
        }
        let entries = q.and_then(|q| q.get("modules_to_not_convert"));
        let Some(entries) = entries.filter(|e| !e.is_null()) else {
            return Ok(None);
        };
        entries
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|e| e.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
            })
            .map(Some)
            .ok_or_else(|| {
                input_err!(
                    "config.json: quantization_config.modules_to_not_convert must be a list of \
                     strings (module names), found {entries}"
                )
            })
    }

    /// An fp8 source's block size: `quantization_config` with `quant_method` "fp8", `fmt`
    /// "e4m3" (or absent) and a two-number `weight_block_size` (DeepSeek-V3, Kimi K2); `None`
    /// for any other config.
    fn fp8_block(&self) -> Result<Option<[usize; 2]>> {
        let Some(q) = &self.quantization_config else {
            return Ok(None);
        };
        if q.get("quant_method").and_then(|m| m.as_str()) != Some("fp8") {
            return Ok(None);
        }
        let fmt = q.get("fmt").and_then(|f| f.as_str()).unwrap_or("e4m3");
        let block: Option<Vec<usize>> = q
            .get("weight_block_size")
            .and_then(|b| serde_json::from_value(b.clone()).ok());
        match block.as_deref() {
            Some(&[r, c]) if r > 0 && c > 0 && fmt == "e4m3" => Ok(Some([r, c])),
            _ if fmt != "e4m3" => Err(input_err!(
                "config.json: quantization_config.fmt {fmt:?} is not supported; awq reads \
                 block-scaled fp8 in \"e4m3\" (DeepSeek-V3's and Kimi K2's)"
            )),
            _ => Err(input_err!(
                "config.json: quantization_config.weight_block_size is missing or not two \
                 positive numbers (got {}); a block-scaled fp8 source names its scale blocks, \
                 e.g. [128, 128] in DeepSeek-V3's release — restore the release's config.json",
                q.get("weight_block_size")
                    .map_or("nothing".to_string(), |b| b.to_string())
            )),
        }
    }

    fn awq_format(&self) -> Result<Option<AwqFormat>> {
        let Some(q) = &self.quantization_config else {
            return Ok(None);
        };
        let method = q.get("quant_method").and_then(|m| m.as_str()).unwrap_or("");
        if method == "fp8" {
            return Ok(None);
        }
        if method == "compressed-tensors" {
            return super::compressed::format(q).map(Some);
        }
        if method != "awq" {
            return Err(input_err!(
                "config.json: quantization_config.quant_method {method:?} is not supported: awq \
                 reads unquantized checkpoints, block-scaled \"fp8\" sources (DeepSeek-V3's, Kimi \
                 K2's), and \"awq\" or \"compressed-tensors\" pack-quantized checkpoints"
            ));
        }
        let bits = q
            .get("bits")
            .or_else(|| q.get("w_bit"))
            .and_then(|b| b.as_u64())
            .unwrap_or(4);
        let group = q
            .get("group_size")
            .or_else(|| q.get("q_group_size"))
            .and_then(|g| g.as_u64());
        let version = q
            .get("version")
            .and_then(|v| v.as_str())
            .unwrap_or("gemm")
            .to_ascii_lowercase();
        let layout = match version.as_str() {
            "gemm" => Layout::Gemm,
            "gemv" => Layout::Gemv,
            other => {
                return Err(input_err!(
                    "config.json: AWQ version {other:?} is not supported (gemm, gemv)"
                ))
            }
        };
        match (bits, group) {
            (4, Some(g)) if g > 0 => Ok(Some(AwqFormat {
                group: g as usize,
                layout,
            })),
            _ => Err(input_err!(
                "config.json: AWQ checkpoints need bits 4 and a positive group_size"
            )),
        }
    }

    /// Multimodal rope: transformers 4.x writes `"type": "mrope"`, 5.x `"rope_type": "default"`
    /// beside `"type": "mrope"`; either way the frequencies are the default ones, and the
    /// sections must cover them.
    fn mrope(rs: &RopeScaling, section: &[usize], rotary_dim: usize) -> Result<RopeKind> {
        match rs.rope_type.as_deref() {
            None | Some("default") | Some("mrope") => {}
            Some(other) => {
                return Err(input_err!(
                    "config.json: rope_scaling combines mrope_section with rope_type {other:?}; \
                     only unscaled multimodal rope is supported"
                ))
            }
        }
        if section.len() != 3 || section.iter().sum::<usize>() != rotary_dim / 2 {
            return Err(input_err!(
                "config.json: rope_scaling.mrope_section {section:?} must have three entries \
                 summing to head_dim / 2 = {}",
                rotary_dim / 2
            ));
        }
        Ok(RopeKind::Multimodal {
            section: section.to_vec(),
        })
    }

    /// The rope scaling; `head_dim` here is the rotated width (`rotary_dim`).
    fn rope_kind(&self, head_dim: usize) -> Result<RopeKind> {
        let Some(rs) = &self.rope_scaling else {
            return Ok(RopeKind::Default);
        };
        if let Some(section) = &rs.mrope_section {
            return Self::mrope(rs, section, head_dim);
        }
        let kind = rs.kind()?;
        let positive = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(v)
            } else {
                Err(input_err!(
                    "config.json: rope_scaling {kind:?} needs a positive \"{name}\", got {v}"
                ))
            }
        };
        let factor = || {
            let f = rs
                .factor
                .ok_or_else(|| input_err!("config.json: rope_scaling {kind:?} needs \"factor\""))?;
            positive("factor", f)
        };
        let max_pos = || {
            self.max_position_embeddings.filter(|&m| m > 0).ok_or_else(|| {
                input_err!(
                    "config.json: rope_scaling {kind:?} needs a positive \"max_position_embeddings\""
                )
            })
        };
        // yarn and longrope: the top-level value (Phi-3) wins over rope_scaling's, and
        // max_position_embeddings is the fallback (transformers' standardize_rope_params).
        let original_max = || -> Result<usize> {
            match self
                .original_max_position_embeddings
                .or(rs.original_max_position_embeddings)
            {
                Some(0) => Err(input_err!(
                    "config.json: rope_scaling {kind:?} needs a positive \"original_max_position_embeddings\""
                )),
                Some(m) => Ok(m),
                None => max_pos(),
            }
        };
        // When `factor` is absent, yarn and longrope use max_position_embeddings / original max.
        let factor_or_ratio = |original: usize| -> Result<f64> {
            match rs.factor {
                Some(f) => positive("factor", f),
                None => Ok(max_pos()? as f64 / original as f64),
            }
        };
        match kind {
            "default" => Ok(RopeKind::Default),
            "linear" => Ok(RopeKind::Linear { factor: factor()? }),
            // Required keys were checked by `check_rope_scaling`; the original context defaults
            // to max_position_embeddings as transformers 5 fills it.
            "llama3" => Ok(RopeKind::Llama3 {
                factor: factor()?,
                low_freq_factor: positive("low_freq_factor", rs.low_freq_factor.unwrap_or(0.0))?,
                high_freq_factor: positive(
                    "high_freq_factor",
                    rs.high_freq_factor.unwrap_or(0.0),
                )?,
                original_max: match rs.original_max_position_embeddings {
                    Some(m) if m > 0 => m,
                    _ => max_pos()?,
                },
            }),
            "yarn" => {
                let original_max = original_max()?;
                let factor = factor_or_ratio(original_max)?;
                // transformers' get_mscale: 1 for scale <= 1, else 0.1 * m * ln(scale) + 1.
                let mscale = |m: f64| {
                    if factor <= 1.0 {
                        1.0
                    } else {
                        0.1 * m * factor.ln() + 1.0
                    }
                };
                let attention_factor = match (rs.attention_factor, rs.mscale, rs.mscale_all_dim) {
                    (Some(a), _, _) => a,
                    // Python truthiness: both present and non-zero.
                    (None, Some(m), Some(m_all)) if m != 0.0 && m_all != 0.0 => {
                        mscale(m) / mscale(m_all)
                    }
                    _ => mscale(1.0),
                };
                // `beta or default` in Python: 0 also means the default.
                let beta = |v: Option<f64>, default: f64| v.filter(|&b| b != 0.0).unwrap_or(default);
                Ok(RopeKind::Yarn {
                    factor,
                    original_max,
                    beta_fast: beta(rs.beta_fast, 32.0),
                    beta_slow: beta(rs.beta_slow, 1.0),
                    truncate: rs.truncate.unwrap_or(true),
                    attention_factor,
                })
            }
            "dynamic" => {
                if head_dim <= 2 {
                    return Err(input_err!(
                        "config.json: rope_scaling \"dynamic\" needs head_dim > 2, got {head_dim}"
                    ));
                }
                Ok(RopeKind::Dynamic {
                    factor: factor()?,
                    max_position_embeddings: max_pos()?,
                })
            }
            "longrope" => {
                let list = |name: &str, v: &Option<Vec<f64>>| -> Result<Vec<f64>> {
                    let v = v.as_ref().ok_or_else(|| {
                        input_err!("config.json: rope_scaling \"longrope\" needs \"{name}\"")
                    })?;
                    if v.len() != head_dim / 2 {
                        return Err(input_err!(
                            "config.json: rope_scaling.{name} has {} values; it needs head_dim / 2 = {}",
                            v.len(),
                            head_dim / 2
                        ));
                    }
                    for &f in v {
                        positive(name, f)?;
                    }
                    Ok(v.clone())
                };
                let original_max = original_max()?;
                let factor = factor_or_ratio(original_max)?;
                let attention_factor = match rs.attention_factor {
                    Some(a) => a,
                    None if factor <= 1.0 => 1.0,
                    None => (1.0 + factor.ln() / (original_max as f64).ln()).sqrt(),
                };
                Ok(RopeKind::LongRope {
                    short_factor: list("short_factor", &rs.short_factor)?,
                    long_factor: list("long_factor", &rs.long_factor)?,
                    original_max,
                    attention_factor,
                })
            }
            other => Err(input_err!(
                "config.json: rope_scaling type {other:?} is not supported (supported: default, linear, llama3, yarn, dynamic, longrope)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rope_of(rope_scaling: serde_json::Value) -> Result<RopeKind> {
        let cfg: HfConfig = serde_json::from_value(serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 8,
            "max_position_embeddings": 4096, "rope_scaling": rope_scaling
        }))
        .expect("config parses");
        cfg.base_spec(false).map(|s| s.rope)
    }

    #[test]
    fn rope_type_and_legacy_type_may_both_be_present_when_they_agree() {
        let kind =
            rope_of(serde_json::json!({"type": "linear", "rope_type": "linear", "factor": 2.0}));
        assert_eq!(kind.unwrap(), RopeKind::Linear { factor: 2.0 });
        // Either key alone still works.
        let legacy = rope_of(serde_json::json!({"type": "linear", "factor": 3.0}));
        assert_eq!(legacy.unwrap(), RopeKind::Linear { factor: 3.0 });
    }

    #[test]
    fn rope_type_and_legacy_type_that_disagree_are_an_input_error() {
        let err =
            rope_of(serde_json::json!({"type": "linear", "rope_type": "yarn", "factor": 2.0}))
                .unwrap_err();
        assert!(matches!(err, crate::error::Error::Input(_)));
        let msg = err.to_string();
        assert!(
            msg.contains("\"linear\"") && msg.contains("\"yarn\"") && msg.contains("rope_scaling"),
            "{msg}"
        );
    }

    #[test]
    fn yarn_defaults_follow_transformers() {
        let kind = rope_of(serde_json::json!({"rope_type": "yarn", "factor": 4.0, "beta_fast": 0}));
        assert_eq!(
            kind.unwrap(),
            RopeKind::Yarn {
                factor: 4.0,
                original_max: 4096,
                beta_fast: 32.0,
                beta_slow: 1.0,
                truncate: true,
                // 0.1 * ln(4) + 1 (python3 math)
                attention_factor: 0.1 * 4f64.ln() + 1.0,
            }
        );
        // Explicit attention_factor wins over the mscale rule.
        let explicit = rope_of(serde_json::json!({"rope_type": "yarn", "factor": 4.0,
            "attention_factor": 1.5, "mscale": 1.0, "mscale_all_dim": 1.0}));
        assert!(
            matches!(explicit.unwrap(), RopeKind::Yarn { attention_factor, .. } if attention_factor == 1.5)
        );
    }

    #[test]
    fn longrope_factor_lists_must_cover_half_the_head_dim() {
        let err = rope_of(serde_json::json!({"rope_type": "longrope",
            "short_factor": [1.0, 1.0], "long_factor": [1.0, 1.0]}))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("short_factor") && err.contains("head_dim / 2 = 8"),
            "{err}"
        );
        let missing = rope_of(serde_json::json!({"rope_type": "longrope"})).unwrap_err();
        assert!(missing.to_string().contains("short_factor"), "{missing}");
    }

    #[test]
    fn dynamic_needs_max_position_embeddings() {
        let cfg: HfConfig = serde_json::from_value(serde_json::json!({
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "vocab_size": 8,
            "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}
        }))
        .unwrap();
        let err = cfg.base_spec(false).unwrap_err().to_string();
        assert!(err.contains("max_position_embeddings"), "{err}");
    }
}

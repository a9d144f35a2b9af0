//! `config.json` as transformers writes it for the Llama family, and the resolved [`ModelSpec`]
//! every other module works from. Family files (llama.rs, mistral.rs, qwen2.rs, qwen3.rs) turn
//! the raw mirror into a spec, applying their own defaults and quirks.

use serde::Deserialize;

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
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub quantization_config: Option<serde_json::Value>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
}

#[derive(Debug, Clone, Deserialize)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: Option<String>,
    pub factor: Option<f64>,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    pub original_max_position_embeddings: Option<usize>,
}

/// How rotary frequencies are adjusted (transformers' `rope_type`).
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
}

/// Everything the forward pass and the quantizer need to know about a model, resolved.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// `architectures[0]` of config.json, e.g. `LlamaForCausalLM`.
    pub architecture: String,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub rms_eps: f64,
    pub rope_theta: f64,
    pub rope: RopeKind,
    pub tied_embeddings: bool,
    /// Biases on q/k/v (Qwen2, or Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama `attention_bias`).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Per-head RMSNorm on q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Tokens further back than this are not attended to (Mistral); `None` = full causal.
    pub sliding_window: Option<usize>,
    /// Set when the checkpoint is already AWQ-packed: linears are read by dequantizing.
    pub awq: Option<AwqFormat>,
}

/// One linear of a decoder layer: name relative to the layer, `[out, in]`, whether it has a bias.
#[derive(Debug, Clone, Copy)]
pub struct LinearShape {
    pub name: &'static str,
    pub out: usize,
    pub inp: usize,
    pub bias: bool,
}

impl ModelSpec {
    /// The seven linears of every decoder layer, in checkpoint order.
    pub fn linears(&self) -> [LinearShape; 7] {
        let (qd, kvd) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
        let l = |name, out, inp, bias| LinearShape {
            name,
            out,
            inp,
            bias,
        };
        use super::layer::LINEARS as N;
        [
            l(N[0], qd, self.hidden, self.qkv_bias),
            l(N[1], kvd, self.hidden, self.qkv_bias),
            l(N[2], kvd, self.hidden, self.qkv_bias),
            l(N[3], self.hidden, qd, self.o_bias),
            l(N[4], self.intermediate, self.hidden, self.mlp_bias),
            l(N[5], self.intermediate, self.hidden, self.mlp_bias),
            l(N[6], self.hidden, self.intermediate, self.mlp_bias),
        ]
    }
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
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(input_err!(
                    "config.json: hidden_act {act:?} is not supported (only \"silu\")"
                ));
            }
        }
        Ok(ModelSpec {
            architecture: self.architectures.first().cloned().unwrap_or_default(),
            hidden: self.hidden_size,
            intermediate: self.intermediate_size,
            layers: self.num_hidden_layers,
            heads,
            kv_heads,
            head_dim,
            vocab: self.vocab_size,
            rms_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            rope: self.rope_kind()?,
            tied_embeddings: self.tie_word_embeddings.unwrap_or(tie_default),
            qkv_bias: self.attention_bias,
            o_bias: self.attention_bias,
            mlp_bias: self.mlp_bias,
            qk_norm: false,
            sliding_window: None,
            awq: self.awq_format()?,
        })
    }

    fn awq_format(&self) -> Result<Option<AwqFormat>> {
        let Some(q) = &self.quantization_config else {
            return Ok(None);
        };
        let method = q.get("quant_method").and_then(|m| m.as_str()).unwrap_or("");
        if method != "awq" {
            return Err(input_err!(
                "config.json: quantization_config.quant_method {method:?} is not supported (only unquantized or \"awq\" checkpoints)"
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

    fn rope_kind(&self) -> Result<RopeKind> {
        let Some(rs) = &self.rope_scaling else {
            return Ok(RopeKind::Default);
        };
        let kind = rs.rope_type.as_deref().unwrap_or("default");
        let factor = || {
            rs.factor
                .ok_or_else(|| input_err!("config.json: rope_scaling {kind:?} needs \"factor\""))
        };
        match kind {
            "default" => Ok(RopeKind::Default),
            "linear" => Ok(RopeKind::Linear { factor: factor()? }),
            "llama3" => Ok(RopeKind::Llama3 {
                factor: factor()?,
                low_freq_factor: rs.low_freq_factor.unwrap_or(1.0),
                high_freq_factor: rs.high_freq_factor.unwrap_or(4.0),
                original_max: rs.original_max_position_embeddings.unwrap_or(8192),
            }),
            other => Err(input_err!(
                "config.json: rope_scaling type {other:?} is not supported (supported: default, linear, llama3)"
            )),
        }
    }
}

//! `Starcoder2ForCausalLM`: LayerNorms with bias, biases on every linear (`use_bias`), a
//! non-gated MLP `c_proj(gelu_tanh(c_fc(x)))` and a sliding window on every layer
//! (transformers `modeling_starcoder2.py`).

use super::arch::{Mlp, NormKind};
use super::config::{HfConfig, ModelSpec};
use crate::error::Result;

pub const ARCHITECTURE: &str = "Starcoder2ForCausalLM";
pub const MODEL_TYPE: &str = "starcoder2";

pub fn spec(cfg: &HfConfig) -> Result<ModelSpec> {
    let mut cfg = cfg.clone();
    cfg.hidden_act = cfg.hidden_act.or(Some("gelu_pytorch_tanh".into()));
    // Starcoder2Config leaves tie_word_embeddings to PretrainedConfig's default: tied.
    let mut spec = cfg.base_spec(true)?;
    spec.norm = NormKind::Layer;
    spec.norm_bias = true;
    spec.norm_eps = cfg.layer_norm_eps();
    spec.mlp = Mlp::Plain;
    let bias = cfg.use_bias.unwrap_or(true);
    (spec.qkv_bias, spec.o_bias, spec.mlp_bias) = (bias, bias, bias);
    spec.sliding_window = cfg.window()?;
    Ok(spec)
}

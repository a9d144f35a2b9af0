//! `GraniteForCausalLM`: the Llama block with four multipliers — embeddings, both residual
//! branches, the attention scale and the logits (divided) (transformers `modeling_granite.py`).

use super::config::{HfConfig, ModelSpec};
use crate::error::Result;

pub const ARCHITECTURE: &str = "GraniteForCausalLM";
pub const MODEL_TYPE: &str = "granite";

pub fn spec(cfg: &HfConfig) -> Result<ModelSpec> {
    let mut spec = cfg.base_spec(false)?;
    spec.embed_scale = Some(cfg.embedding_multiplier.unwrap_or(1.0));
    spec.residual_mult = cfg.residual_multiplier.unwrap_or(1.0);
    spec.attn_scale = cfg.attention_multiplier.unwrap_or(1.0);
    spec.logit_mult = 1.0 / cfg.logits_scaling.unwrap_or(1.0);
    Ok(spec)
}

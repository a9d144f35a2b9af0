//! `Gemma2ForCausalLM`: Gemma with a norm after attention and around the MLP (the "sandwich"),
//! attention-logit and final-logit soft-capping, the attention scale `query_pre_attn_scalar^-0.5`
//! and a sliding window on even layers (transformers `modeling_gemma2.py`).

use super::arch::Block;
use super::config::{HfConfig, ModelSpec};
use crate::error::Result;

pub const ARCHITECTURE: &str = "Gemma2ForCausalLM";
pub const MODEL_TYPE: &str = "gemma2";

pub fn spec(cfg: &HfConfig) -> Result<ModelSpec> {
    let mut spec = super::gemma::gemma_base(cfg)?;
    spec.block = Block::Sandwich;
    spec.attn_scale = cfg.query_pre_attn_scalar.unwrap_or(256.0).powf(-0.5);
    // Gemma2Config defaults: 50 and 30 (null turns them off).
    spec.attn_softcap = cfg.attn_logit_softcapping.unwrap_or(Some(50.0));
    spec.final_softcap = cfg.final_logit_softcapping.unwrap_or(Some(30.0));
    spec.sliding_window = cfg.window()?.or(Some(4096));
    spec.sliding_layers = Some(match cfg.sliding_from_layer_types()? {
        Some(layers) => layers,
        // `is_sliding = not bool(layer_idx % 2)`: layers 0, 2, 4, … slide.
        None => (0..spec.layers).map(|i| i % 2 == 0).collect(),
    });
    Ok(spec)
}

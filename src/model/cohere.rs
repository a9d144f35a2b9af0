//! `CohereForCausalLM` (Command-R): a parallel block where one bias-free LayerNorm feeds
//! attention and MLP, rotary on interleaved pairs, and logits multiplied by `logit_scale`
//! (transformers `modeling_cohere.py`).

use super::arch::{Block, NormKind};
use super::config::{HfConfig, ModelSpec};
use crate::error::Result;
use crate::input_err;

pub const ARCHITECTURE: &str = "CohereForCausalLM";
pub const MODEL_TYPE: &str = "cohere";

pub fn spec(cfg: &HfConfig) -> Result<ModelSpec> {
    if cfg.use_qk_norm == Some(true) {
        return Err(input_err!(
            "config.json: use_qk_norm (Command-R+'s per-head q/k LayerNorms) is not supported"
        ));
    }
    // CohereConfig defaults: tied head, logit_scale 0.0625.
    let mut spec = cfg.base_spec(true)?;
    spec.norm = NormKind::Layer;
    spec.norm_eps = cfg.layer_norm_eps();
    spec.block = Block::Parallel;
    spec.rope_interleaved = true;
    spec.logit_mult = cfg.logit_scale.unwrap_or(0.0625);
    spec.mlp_bias = false;
    Ok(spec)
}

//! `StableLmForCausalLM`: the Llama block with LayerNorms that carry a bias, optional q/k/v
//! biases, rotary on the first `partial_rotary_factor` of each head, and optionally a parallel
//! block (transformers `modeling_stablelm.py`).

use super::arch::{Block, NormKind};
use super::config::{HfConfig, ModelSpec};
use crate::error::Result;
use crate::input_err;

pub const ARCHITECTURE: &str = "StableLmForCausalLM";
pub const MODEL_TYPE: &str = "stablelm";

pub fn spec(cfg: &HfConfig) -> Result<ModelSpec> {
    if cfg.qk_layernorm == Some(true) {
        return Err(input_err!(
            "config.json: qk_layernorm (StableLM 2 12B's per-head q/k LayerNorms) is not supported"
        ));
    }
    let mut cfg = cfg.clone();
    // StableLmConfig defaults: partial_rotary_factor 0.25, silu, untied.
    cfg.partial_rotary_factor = cfg.partial_rotary_factor.or(Some(0.25));
    let mut spec = cfg.base_spec(false)?;
    spec.norm = NormKind::Layer;
    spec.norm_bias = true;
    spec.norm_eps = cfg.layer_norm_eps();
    spec.qkv_bias = cfg.use_qkv_bias.unwrap_or(false);
    spec.o_bias = false;
    spec.mlp_bias = false;
    if cfg.use_parallel_residual == Some(true) {
        spec.block = Block::Parallel;
    }
    Ok(spec)
}

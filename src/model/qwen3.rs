//! `Qwen3ForCausalLM`: Llama block with a per-head RMSNorm on q and k (`q_norm`, `k_norm`)
//! applied after the projection and before RoPE; `attention_bias` covers q/k/v/o.

use super::config::{HfConfig, ModelSpec};
use crate::error::Result;

pub const ARCHITECTURE: &str = "Qwen3ForCausalLM";
pub const MODEL_TYPE: &str = "qwen3";

pub fn spec(cfg: &HfConfig) -> Result<ModelSpec> {
    let mut spec = cfg.base_spec(false)?;
    spec.qk_norm = true;
    spec.mlp_bias = false;
    spec.sliding_window = if cfg.use_sliding_window == Some(true) {
        cfg.sliding_window
    } else {
        None
    };
    Ok(spec)
}

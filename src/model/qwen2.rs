//! `Qwen2ForCausalLM`: Llama block with biases on q/k/v (never on o_proj or the MLP).

use super::config::{HfConfig, ModelSpec};
use crate::error::Result;

pub const ARCHITECTURE: &str = "Qwen2ForCausalLM";
pub const MODEL_TYPE: &str = "qwen2";

pub fn spec(cfg: &HfConfig) -> Result<ModelSpec> {
    let mut spec = cfg.base_spec(false)?;
    spec.qkv_bias = true;
    spec.o_bias = false;
    spec.mlp_bias = false;
    // Qwen2 only slides when use_sliding_window is set (off in released checkpoints).
    spec.sliding_window = if cfg.use_sliding_window == Some(true) {
        cfg.sliding_window
    } else {
        None
    };
    Ok(spec)
}

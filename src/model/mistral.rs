//! `MistralForCausalLM`: Llama block plus an optional sliding attention window.

use super::config::{HfConfig, ModelSpec};
use crate::error::Result;

pub const ARCHITECTURE: &str = "MistralForCausalLM";
pub const MODEL_TYPE: &str = "mistral";

pub fn spec(cfg: &HfConfig) -> Result<ModelSpec> {
    let mut spec = cfg.base_spec(false)?;
    // MistralConfig has no attention_bias / mlp_bias: every linear is bias-free.
    spec.qkv_bias = false;
    spec.o_bias = false;
    spec.mlp_bias = false;
    spec.sliding_window = cfg.window()?;
    Ok(spec)
}

//! `MistralForCausalLM`: Llama block plus an optional sliding attention window.

use super::config::{HfConfig, ModelSpec};
use crate::error::Result;

pub const ARCHITECTURE: &str = "MistralForCausalLM";
pub const MODEL_TYPE: &str = "mistral";

/// transformers `MistralConfig.__init__` defaults for the keys we read (a wrapped model's
/// `text_config` may leave them out).
pub const CONFIG_DEFAULTS: &str = r#"{
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": false
}"#;

pub fn spec(cfg: &HfConfig) -> Result<ModelSpec> {
    let mut spec = cfg.base_spec(false)?;
    // MistralConfig has no attention_bias / mlp_bias: every linear is bias-free.
    spec.qkv_bias = false;
    spec.o_bias = false;
    spec.mlp_bias = false;
    spec.sliding_window = cfg.window()?;
    Ok(spec)
}

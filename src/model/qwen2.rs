//! `Qwen2ForCausalLM`: Llama block with biases on q/k/v (never on o_proj or the MLP).

use super::config::{HfConfig, ModelSpec};
use crate::error::Result;

pub const ARCHITECTURE: &str = "Qwen2ForCausalLM";
pub const MODEL_TYPE: &str = "qwen2";

/// transformers `Qwen2Config.__init__` defaults for the keys we read (a wrapped model's
/// `text_config` may leave them out).
pub const CONFIG_DEFAULTS: &str = r#"{
    "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
    "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0, "use_sliding_window": false, "sliding_window": 4096,
    "tie_word_embeddings": false
}"#;

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

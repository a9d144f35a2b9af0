//! `LlamaForCausalLM`: Llama 1/2/3/3.1 (incl. `llama3` rope scaling), SmolLM, TinyLlama.
//! The decoder block itself lives in `layer.rs`; this file only states the family's config rules.

use super::config::{HfConfig, ModelSpec};
use crate::error::Result;

pub const ARCHITECTURE: &str = "LlamaForCausalLM";
pub const MODEL_TYPE: &str = "llama";

/// transformers `LlamaConfig.__init__` defaults for the keys we read (LLaVA-1.5's
/// `text_config` names little more than `vocab_size`).
pub const CONFIG_DEFAULTS: &str = r#"{
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "hidden_act": "silu",
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
    "attention_bias": false, "mlp_bias": false, "tie_word_embeddings": false
}"#;

pub fn spec(cfg: &HfConfig) -> Result<ModelSpec> {
    // transformers' LlamaConfig: tie_word_embeddings defaults to false; attention_bias covers
    // q/k/v/o together; mlp_bias covers gate/up/down.
    cfg.base_spec(false)
}

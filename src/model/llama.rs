//! `LlamaForCausalLM`: Llama 1/2/3/3.1 (incl. `llama3` rope scaling), SmolLM, TinyLlama.
//! The decoder block itself lives in `layer.rs`; this file only states the family's config rules.

use super::config::{HfConfig, ModelSpec};
use crate::error::Result;

pub const ARCHITECTURE: &str = "LlamaForCausalLM";
pub const MODEL_TYPE: &str = "llama";

pub fn spec(cfg: &HfConfig) -> Result<ModelSpec> {
    // transformers' LlamaConfig: tie_word_embeddings defaults to false; attention_bias covers
    // q/k/v/o together; mlp_bias covers gate/up/down.
    cfg.base_spec(false)
}

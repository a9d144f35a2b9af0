//! `Glm4MoeForCausalLM`: GLM-4.5, GLM-4.5-Air, GLM-4.6. Grouped-query attention with q/k/v
//! biases, optional per-head q/k norms (`use_qk_norm`) and rope on the first half of each head
//! (`partial_rotary_factor` 0.5, rotate-half pairs); the first `first_k_dense_replace` layers
//! dense, the others DeepSeek-V3's router and shared experts (transformers
//! `modeling_glm4_moe.py`, `configuration_glm4_moe.py`).

use super::config::{HfConfig, ModelSpec};
use crate::error::Result;

pub const ARCHITECTURE: &str = "Glm4MoeForCausalLM";
pub const MODEL_TYPE: &str = "glm4_moe";

pub fn spec(cfg: &HfConfig) -> Result<ModelSpec> {
    // `Glm4MoeConfig.__init__` defaults: head_dim 128, partial_rotary_factor 0.5.
    let cfg = HfConfig {
        head_dim: cfg.head_dim.or(Some(128)),
        partial_rotary_factor: cfg.partial_rotary_factor.or(Some(0.5)),
        ..cfg.clone()
    };
    let mut spec = cfg.base_spec(false)?;
    spec.qkv_bias = cfg.attention_bias;
    spec.o_bias = false;
    spec.mlp_bias = false;
    spec.qk_norm = cfg.use_qk_norm.unwrap_or(false);
    super::deepseek_v3::set_sigmoid_moe(&mut spec, &cfg, 128, 1408, 8, 1, 1, 1, 1.0)?;
    Ok(spec)
}

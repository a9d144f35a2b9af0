//! `Phi3ForCausalLM` (Phi-3, Phi-3.5, Phi-4-mini): the Llama block with fused `qkv_proj`
//! (`[q; k; v]` rows) and `gate_up_proj` (`[gate; up]` rows), rotary on the first
//! `partial_rotary_factor` of each head and `longrope` scaling (transformers `modeling_phi3.py`).

use super::arch::{AttnProj, Mlp};
use super::config::{HfConfig, ModelSpec};
use crate::error::Result;

pub const ARCHITECTURE: &str = "Phi3ForCausalLM";
pub const MODEL_TYPE: &str = "phi3";

pub fn spec(cfg: &HfConfig) -> Result<ModelSpec> {
    let mut spec = cfg.base_spec(false)?;
    spec.attn_proj = AttnProj::Fused;
    spec.mlp = Mlp::FusedGated;
    spec.qkv_bias = false;
    spec.o_bias = false;
    spec.mlp_bias = false;
    spec.sliding_window = cfg.window()?;
    Ok(spec)
}

//! `Phi3ForCausalLM` (Phi-3, Phi-3.5, Phi-4-mini): the Llama block with fused `qkv_proj`
//! (`[q; k; v]` rows) and `gate_up_proj` (`[gate; up]` rows), rotary on the first
//! `partial_rotary_factor` of each head and `longrope` scaling (transformers `modeling_phi3.py`).

use super::arch::{AttnProj, Mlp};
use super::config::{HfConfig, ModelSpec};
use crate::error::Result;

pub const ARCHITECTURE: &str = "Phi3ForCausalLM";
pub const MODEL_TYPE: &str = "phi3";

pub fn spec(cfg: &HfConfig) -> Result<ModelSpec> {
    let mut cfg = cfg.clone();
    // Phi3Config renames the early names of its scaling, "su" and "yarn", to "longrope"
    // (`_rope_scaling_adjustment`): their factor lists are LongRoPE's.
    if let Some(rs) = cfg.rope_scaling.as_mut() {
        if matches!(rs.kind()?, "su" | "yarn") {
            rs.rope_type = Some("longrope".into());
            rs.legacy_type = None;
        }
    }
    let mut spec = cfg.base_spec(false)?;
    spec.attn_proj = AttnProj::Fused;
    spec.mlp = Mlp::FusedGated;
    spec.qkv_bias = false;
    spec.o_bias = false;
    spec.mlp_bias = false;
    spec.sliding_window = cfg.window()?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::RopeKind;

    #[test]
    fn early_scaling_names_su_and_yarn_are_longrope() {
        for name in ["su", "yarn", "longrope"] {
            let cfg: HfConfig = serde_json::from_value(serde_json::json!({
                "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                "num_attention_heads": 4, "vocab_size": 8, "max_position_embeddings": 128,
                "original_max_position_embeddings": 32,
                "rope_scaling": {"type": name, "short_factor": vec![1.0; 8], "long_factor": vec![2.0; 8]}
            }))
            .unwrap();
            let spec = spec(&cfg).unwrap();
            assert!(matches!(spec.rope, RopeKind::LongRope { .. }), "{name}");
        }
    }
}

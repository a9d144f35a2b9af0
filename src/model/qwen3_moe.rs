//! `Qwen3MoeForCausalLM`: the Qwen3 block (per-head q/k norms) with a sparse MoE MLP — router
//! `mlp.gate` (top-k, renormalised when `norm_topk_prob`, as released checkpoints set it), experts
//! `mlp.experts.{e}.gate_proj/up_proj/down_proj`, no shared expert
//! (transformers `modeling_qwen3_moe.py`).

use super::arch::{Mlp, Moe, Scoring};
use super::config::{HfConfig, ModelSpec};
use crate::error::Result;

pub const ARCHITECTURE: &str = "Qwen3MoeForCausalLM";
pub const MODEL_TYPE: &str = "qwen3_moe";

pub fn spec(cfg: &HfConfig) -> Result<ModelSpec> {
    let mut spec = super::qwen3::spec(cfg)?;
    spec.mlp = Mlp::Moe;
    spec.moe = Some(
        Moe {
            experts: cfg.num_experts.unwrap_or(128),
            top_k: cfg.num_experts_per_tok.unwrap_or(8),
            intermediate: cfg.moe_intermediate_size.unwrap_or(768),
            norm_topk: cfg.norm_topk_prob.unwrap_or(false),
            scoring: Scoring::Softmax,
            shared: None,
            router: "mlp.gate",
            router_listed: true,
            experts_prefix: "mlp.experts",
            leaves: ["gate_proj", "up_proj", "down_proj"],
        }
        .checked()?,
    );
    spec.dense = cfg.qwen_dense_layers()?;
    Ok(spec)
}

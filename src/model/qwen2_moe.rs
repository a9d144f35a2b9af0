//! `Qwen2MoeForCausalLM`: the Qwen2 block (q/k/v biases) with a sparse MoE MLP — router
//! `mlp.gate` (top-k, not renormalised unless `norm_topk_prob`), experts
//! `mlp.experts.{e}.gate_proj/up_proj/down_proj`, plus `mlp.shared_expert` scaled by
//! `sigmoid(mlp.shared_expert_gate(x))` (transformers `modeling_qwen2_moe.py`).

use super::arch::{Mlp, Moe, Scoring, Shared};
use super::config::{HfConfig, ModelSpec};
use crate::error::Result;

pub const ARCHITECTURE: &str = "Qwen2MoeForCausalLM";
pub const MODEL_TYPE: &str = "qwen2_moe";

pub fn spec(cfg: &HfConfig) -> Result<ModelSpec> {
    let mut spec = super::qwen2::spec(cfg)?;
    spec.mlp = Mlp::Moe;
    spec.moe = Some(
        Moe {
            experts: cfg.num_experts.unwrap_or(60),
            top_k: cfg.num_experts_per_tok.unwrap_or(4),
            intermediate: cfg.moe_intermediate_size.unwrap_or(1408),
            norm_topk: cfg.norm_topk_prob.unwrap_or(false),
            scoring: Scoring::Softmax,
            shared: Some(Shared {
                intermediate: cfg.shared_expert_intermediate_size.unwrap_or(5632),
                prefix: "mlp.shared_expert",
                gate: Some("mlp.shared_expert_gate"),
            }),
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

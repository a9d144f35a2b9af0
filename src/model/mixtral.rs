//! `MixtralForCausalLM`: the Mistral block with a sparse MoE MLP `block_sparse_moe` — router
//! `gate`, experts `experts.{e}.w1/w3/w2` (gate/up/down), softmax over all experts, top-k,
//! renormalised (transformers `modeling_mixtral.py`).

use super::arch::{Mlp, Moe, Scoring};
use super::config::{HfConfig, ModelSpec};
use crate::error::Result;

pub const ARCHITECTURE: &str = "MixtralForCausalLM";
pub const MODEL_TYPE: &str = "mixtral";

pub fn spec(cfg: &HfConfig) -> Result<ModelSpec> {
    let mut spec = super::mistral::spec(cfg)?;
    spec.mlp = Mlp::Moe;
    spec.moe = Some(
        Moe {
            experts: cfg.num_local_experts.unwrap_or(8),
            top_k: cfg.num_experts_per_tok.unwrap_or(2),
            intermediate: cfg.intermediate_size,
            norm_topk: true,
            scoring: Scoring::Softmax,
            shared: None,
            router: "block_sparse_moe.gate",
            router_listed: true,
            experts_prefix: "block_sparse_moe.experts",
            leaves: ["w1", "w3", "w2"],
        }
        .checked()?,
    );
    Ok(spec)
}

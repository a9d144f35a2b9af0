//! `GemmaForCausalLM` (Gemma 1): the Llama block with `(1 + w)` RMSNorms, embeddings multiplied
//! by √hidden, a GeLU-tanh gated MLP and a tied head (transformers `modeling_gemma.py`).

use super::arch::{Act, NormKind};
use super::config::{HfConfig, ModelSpec};
use crate::error::Result;

pub const ARCHITECTURE: &str = "GemmaForCausalLM";
pub const MODEL_TYPE: &str = "gemma";

pub fn spec(cfg: &HfConfig) -> Result<ModelSpec> {
    let mut spec = gemma_base(cfg)?;
    spec.sliding_window = None;
    Ok(spec)
}

/// What Gemma 1/2/3 share: GemmaConfig's defaults (head_dim 256, tied head, GeLU-tanh from
/// `hidden_activation`), `(1 + w)` norms and the √hidden embedding scale. Checkpoints are bf16;
/// the forward runs f32 and the embedding scale is exact (transformers rounds it to the
/// activation dtype, a relative 1e-3 at most in bf16).
pub(super) fn gemma_base(cfg: &HfConfig) -> Result<ModelSpec> {
    let mut cfg = cfg.clone();
    cfg.head_dim = cfg.head_dim.or(Some(256));
    // GemmaMLP reads hidden_activation; hidden_act is a legacy key it ignores.
    let act = cfg
        .hidden_activation
        .clone()
        .unwrap_or_else(|| "gelu_pytorch_tanh".into());
    cfg.hidden_act = None;
    let mut spec = cfg.base_spec(true)?;
    spec.act = Act::parse(&act)?;
    spec.norm = NormKind::RmsOnePlus;
    spec.embed_scale = Some((spec.hidden as f64).sqrt());
    spec.mlp_bias = false;
    Ok(spec)
}

//! `DeepseekV3ForCausalLM`: DeepSeek-V3, R1, V3.1 and Kimi K2 (`model_type` `kimi_k2`, the same
//! class). Multi-head latent attention ([`super::attention::mla`]); the first `first_k_dense_replace`
//! layers have a dense gated MLP, the others `n_routed_experts` experts behind a grouped
//! sigmoid router with `e_score_correction_bias` ([`Scoring::GroupedSigmoid`]) plus shared
//! experts; yarn rope on the rope features, in interleaved pairs (transformers
//! `modeling_deepseek_v3.py`, `configuration_deepseek_v3.py`).

use super::arch::{AttnProj, Mlp, Moe, Scoring, Shared};
use super::attention::mla::Mla;
use super::config::{HfConfig, ModelSpec};
use crate::error::Result;
use crate::input_err;

pub const ARCHITECTURE: &str = "DeepseekV3ForCausalLM";
pub const MODEL_TYPE: &str = "deepseek_v3";

pub fn spec(cfg: &HfConfig) -> Result<ModelSpec> {
    // `DeepseekV3Config.__init__` defaults.
    let mla = Mla {
        q_lora: cfg.q_lora_rank.unwrap_or(Some(1536)),
        kv_lora: cfg.kv_lora_rank.unwrap_or(512),
        nope: cfg.qk_nope_head_dim.unwrap_or(128),
        rope: cfg.qk_rope_head_dim.unwrap_or(64),
        v: cfg.v_head_dim.unwrap_or(128),
        bias: cfg.attention_bias,
    };
    if [mla.kv_lora, mla.nope, mla.v].contains(&0)
        || mla.q_lora == Some(0)
        || !mla.rope.is_multiple_of(2)
    {
        return Err(input_err!(
            "config.json: kv_lora_rank, q_lora_rank, qk_nope_head_dim and v_head_dim must be \
             positive and qk_rope_head_dim even (got {mla:?})"
        ));
    }
    // The config class sets `head_dim = qk_rope_head_dim`: the rotary tables (and yarn's
    // ramp) are built for the rope features only.
    let rope_cfg = HfConfig {
        head_dim: Some(mla.rope),
        partial_rotary_factor: None,
        num_key_value_heads: None,
        ..cfg.clone()
    };
    let mut spec = rope_cfg.base_spec(false)?;
    spec.head_dim = mla.qk();
    spec.kv_heads = spec.heads;
    spec.attn_proj = AttnProj::Latent;
    spec.mla = Some(mla);
    spec.rope_interleaved = cfg.rope_interleave.unwrap_or(true);
    spec.attn_scale = attention_scale(cfg, mla.qk())?;
    spec.qkv_bias = false;
    spec.o_bias = cfg.attention_bias;
    spec.mlp_bias = false;
    set_sigmoid_moe(&mut spec, cfg, 256, 2048, 8, 8, 4, 3, 2.5)?;
    Ok(spec)
}

/// `qk_head_dim^-0.5`, times `mscale²` under a scaled rope with `mscale_all_dim`
/// (`DeepseekV3Attention.__init__`: `yarn_get_mscale(factor, mscale_all_dim)`).
fn attention_scale(cfg: &HfConfig, qk: usize) -> Result<f64> {
    let base = (qk as f64).powf(-0.5);
    let Some(rs) = &cfg.rope_scaling else {
        return Ok(base);
    };
    let mscale_all_dim = rs.mscale_all_dim.unwrap_or(0.0);
    if rs.kind()? == "default" || mscale_all_dim == 0.0 {
        return Ok(base);
    }
    let factor = rs.factor.unwrap_or(1.0);
    let m = if factor <= 1.0 {
        1.0
    } else {
        0.1 * mscale_all_dim * factor.ln() + 1.0
    };
    Ok(base * m * m)
}

/// The grouped-sigmoid MoE of DeepSeek-V3 and GLM-4.5, with the config class's defaults:
/// routed experts, their intermediate size, top-k, groups, groups kept, dense layers first
/// and `routed_scaling_factor`. Shared experts are one MLP of `n_shared_experts ×
/// moe_intermediate_size` (none when 0).
#[allow(clippy::too_many_arguments)]
pub fn set_sigmoid_moe(
    spec: &mut ModelSpec,
    cfg: &HfConfig,
    experts: usize,
    intermediate: usize,
    top_k: usize,
    groups: usize,
    topk_groups: usize,
    dense_first: usize,
    scale: f64,
) -> Result<()> {
    let intermediate = cfg.moe_intermediate_size.unwrap_or(intermediate);
    let shared = cfg.n_shared_experts.unwrap_or(1);
    spec.mlp = Mlp::Moe;
    spec.moe = Some(
        Moe {
            experts: cfg.n_routed_experts.unwrap_or(experts),
            top_k: cfg.num_experts_per_tok.unwrap_or(top_k),
            intermediate,
            norm_topk: cfg.norm_topk_prob.unwrap_or(true),
            scoring: Scoring::GroupedSigmoid {
                groups: cfg.n_group.unwrap_or(groups),
                topk_groups: cfg.topk_group.unwrap_or(topk_groups),
                scale: cfg.routed_scaling_factor.unwrap_or(scale),
            },
            shared: (shared > 0).then_some(Shared {
                intermediate: shared * intermediate,
                prefix: "mlp.shared_experts",
                gate: None,
            }),
            router: "mlp.gate",
            router_listed: false,
            experts_prefix: "mlp.experts",
            leaves: ["gate_proj", "up_proj", "down_proj"],
        }
        .checked()?,
    );
    let first = cfg.first_k_dense_replace.unwrap_or(dense_first);
    spec.dense = (0..spec.layers).map(|i| i < first).collect();
    Ok(())
}

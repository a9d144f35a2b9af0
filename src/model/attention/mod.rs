//! The attention components. Each owns its facts in its own file: its linears (with vLLM's
//! split rules), its norms, its scale groups and its forward. The decoder asks [`of`] for the
//! spec's component and never matches on which one it is.
//!
//! - [`mha`]: separate `q_proj`, `k_proj`, `v_proj` (grouped-query heads, optional q/k norms);
//! - [`fused_qkv`]: one `qkv_proj` (Phi-3);
//! - [`mla`]: multi-head latent attention (DeepSeek-V3).
//!
//! They share [`kernel`], the fused causal attention.

pub mod fused_qkv;
pub mod kernel;
pub mod mha;
pub mod mla;

use candle_core::{Device, Tensor};

use super::arch::AttnProj;
use super::config::ModelSpec;
use super::groups::ScaleGroup;
use super::layer::{round_to, LayerWeights, LinearInputs};
use super::rope::Rope;
use super::shapes::{LinearShape, K_NORM, Q_NORM};
use crate::error::Result;
use kernel::{Kernel, Rotary, Rounding};

/// What an attention component owns.
pub trait Attention: Sync {
    /// Its linears in checkpoint order, `o_proj` last.
    fn linears(&self, spec: &ModelSpec) -> Vec<LinearShape>;

    /// Its norms (beyond the layer's), with their widths.
    fn norms(&self, spec: &ModelSpec) -> Vec<(&'static str, usize)>;

    /// The linears that read `input_layernorm`'s output: the first scale group's.
    fn input_linears(&self, spec: &ModelSpec) -> Vec<&'static str>;

    /// Its scale groups after the first (v → o; a latent attention's q_b and kv_b).
    fn inner_groups(&self, spec: &ModelSpec) -> Vec<ScaleGroup>;

    /// The context (the input of `o_proj`, `[tokens, o_proj.in]`) for `x = input_layernorm(h)`;
    /// with `capture`, the inputs of its inner linears.
    fn context(
        &self,
        layer: &LayerWeights,
        spec: &ModelSpec,
        rope: &Rope,
        x: &Tensor,
        seq_len: usize,
        capture: bool,
    ) -> Result<(Tensor, LinearInputs)>;
}

/// The attention component of `spec`.
pub fn of(spec: &ModelSpec) -> &'static dyn Attention {
    match spec.attn_proj {
        AttnProj::Separate => &mha::Mha,
        AttnProj::Fused => &fused_qkv::FusedQkv,
        AttnProj::Latent => &mla::Latent,
    }
}

/// The per-head q/k norms of a grouped-query attention, when the spec has them (Qwen3,
/// Gemma 3, GLM-4.5 with `use_qk_norm`).
fn head_norms(spec: &ModelSpec) -> Vec<(&'static str, usize)> {
    match spec.qk_norm {
        true => vec![(Q_NORM, spec.head_dim), (K_NORM, spec.head_dim)],
        false => Vec::new(),
    }
}

/// Grouped-query attention's context from the projections' outputs `q, k, v` (`[tokens,
/// heads · head_dim]`, rope not applied): the optional per-head q/k norms, then the kernel
/// (rope, causal softmax, this layer's sliding window, soft-capping) without materialised
/// scores.
fn grouped_context(
    layer: &LayerWeights,
    spec: &ModelSpec,
    rope: &Rope,
    [q, k, v]: [Tensor; 3],
    seq_len: usize,
) -> Result<Tensor> {
    let tokens = q.dim(0)?;
    let (h, hd) = (spec.heads, spec.head_dim);
    let r = |t: Tensor| round_to(t, spec.serve_dtype);
    let head_norm = |t: Tensor, norm: &str| -> Result<Tensor> {
        let t = r(t)?;
        if !spec.qk_norm {
            return Ok(t);
        }
        let width = t.dim(1)?;
        let rows = t.contiguous()?.reshape((tokens * width / hd, hd))?;
        r(layer
            .norm(norm)
            .apply(spec, &rows)?
            .reshape((tokens, width))?)
    };
    let [q, k, v] = [head_norm(q, Q_NORM)?, head_norm(k, K_NORM)?, r(v)?].map(flat);
    let (cos, sin) = rope.tables(spec.local_rope(layer.index));
    let kernel = Kernel {
        seq_len,
        heads: h,
        kv_heads: spec.kv_heads,
        head_dim: hd,
        scale: spec.attn_scale as f32,
        window: spec.window(layer.index),
        softcap: spec.attn_softcap.map(|c| c as f32),
        rotary: Rotary {
            cos,
            sin,
            dim: spec.rotary_dim,
            interleaved: spec.rope_interleaved,
        },
        round: Rounding::from_dtype(spec.serve_dtype),
    };
    let ctx = timed(&kernel, &q?, &k?, &v?, tokens);
    Ok(Tensor::from_vec(ctx, (tokens, h * hd), &Device::Cpu)?)
}

/// A tensor's values, row-major.
fn flat(t: Tensor) -> Result<Vec<f32>> {
    Ok(t.contiguous()?.flatten_all()?.to_vec1()?)
}

/// Runs the kernel and records its FLOPs with the matmuls'.
fn timed(kernel: &Kernel, q: &[f32], k: &[f32], v: &[f32], tokens: usize) -> Vec<f32> {
    let start = std::time::Instant::now();
    let ctx = kernel.forward(q, k, v);
    crate::ops::record_matmul(kernel.flop(tokens), start.elapsed());
    ctx
}

//! The MLP components. Each owns its facts in its own file: its linears (with vLLM's merged
//! modules), its unquantized routers, its scale groups after the one its norm leads, and its
//! forward. The decoder asks [`of`] for the spec's component and never matches on which it is.
//!
//! - [`gated`]: `down(act(gate(x)) · up(x))`, with separate or fused gate/up;
//! - [`plain`]: `c_proj(act(c_fc(x)))` (Starcoder2);
//! - [`moe`]: routed experts behind a router, with shared experts (Mixtral, Qwen MoE,
//!   DeepSeek-V3, GLM-4.5).

pub mod gated;
pub mod moe;
pub mod plain;

use candle_core::Tensor;

use super::arch::{Act, Input, Mlp as Kind};
use super::config::ModelSpec;
use super::groups::ScaleGroup;
use super::layer::{round_to, LayerWeights, Linear, LinearInputs};
use super::shapes::LinearShape;
use crate::error::Result;

/// What an MLP component owns.
pub trait Mlp: Sync {
    /// Its linears in checkpoint order; `input` is what its first linears read (the MLP
    /// norm's output, or `input_layernorm`'s in a parallel block).
    fn linears(&self, spec: &ModelSpec, input: Input) -> Vec<LinearShape>;

    /// The name of the group that scales its input linears from the norm before them.
    fn input_group(&self) -> &'static str {
        "gate_up"
    }

    /// Linears that stay unquantized (a router, Qwen2-MoE's `shared_expert_gate`): float
    /// weights, no bias, reading the MLP's input.
    fn routers(&self, _spec: &ModelSpec) -> Vec<LinearShape> {
        Vec::new()
    }

    /// Float tensors the quantizer never changes, copied to the output byte for byte, with
    /// their widths (a grouped-sigmoid router's `e_score_correction_bias`).
    fn verbatim(&self, _spec: &ModelSpec) -> Vec<(&'static str, usize)> {
        Vec::new()
    }

    /// Its scale groups after the one from its norm (each down projection against the linear
    /// before it).
    fn inner_groups(&self, spec: &ModelSpec) -> Vec<ScaleGroup>;

    /// Its output for its input `x`; with `capture`, the inputs of its inner linears (and a
    /// MoE block's routing).
    fn forward(
        &self,
        layer: &LayerWeights,
        spec: &ModelSpec,
        x: &Tensor,
        capture: bool,
    ) -> Result<(Tensor, LinearInputs)>;
}

/// The MLP component of `spec`.
pub fn of(spec: &ModelSpec) -> &'static dyn Mlp {
    match spec.mlp {
        Kind::Gated => &gated::Gated,
        Kind::FusedGated => &gated::FusedGated,
        Kind::Plain => &plain::Plain,
        Kind::Moe => &moe::MoeBlock,
    }
}

/// The MLP activation of `spec` applied to `t`.
fn act(spec: &ModelSpec, t: &Tensor) -> Result<Tensor> {
    Ok(match spec.act {
        Act::Silu => candle_nn::ops::silu(t)?,
        Act::GeluTanh => t.gelu()?,
        Act::Gelu => t.gelu_erf()?,
    })
}

/// `act(gate) · up`; with a serving dtype each op is rounded on its own, as a server does.
fn gate_product(spec: &ModelSpec, gate: Tensor, up: Tensor) -> Result<Tensor> {
    let r = |t: Tensor| round_to(t, spec.serve_dtype);
    match (spec.act, spec.serve_dtype) {
        (Act::Silu, None) => crate::ops::silu_mul(&gate, &up),
        _ => r((r(act(spec, &r(gate)?)?)? * r(up)?)?),
    }
}

/// `act(gate(x)) · up(x)`: a gated MLP's hidden activation (a dense layer's, an expert's, the
/// shared experts').
fn gated_hidden(spec: &ModelSpec, gate: &Linear, up: &Linear, x: &Tensor) -> Result<Tensor> {
    gate_product(spec, gate.forward(x)?, up.forward(x)?)
}

/// A down projection's output for its `hidden` input, rounded, and the captured input.
fn down(
    layer: &LayerWeights,
    spec: &ModelSpec,
    name: &str,
    hidden: Tensor,
    capture: bool,
) -> Result<(Tensor, LinearInputs)> {
    let out = round_to(layer.linear(name).forward(&hidden)?, spec.serve_dtype)?;
    let mut captured = LinearInputs::default();
    if capture {
        captured.set(Input::Down, hidden);
    }
    Ok((out, captured))
}

/// The group `up → down` of a down projection reading `input`.
fn down_group(
    name: &'static str,
    up: &'static str,
    down: &'static str,
    input: Input,
) -> ScaleGroup {
    ScaleGroup {
        name,
        prev: super::groups::PrevOp::Linear(up),
        linears: vec![down],
        input,
        inspect: super::groups::Inspect::Linear,
        compensate: Vec::new(),
    }
}

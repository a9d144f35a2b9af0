//! The one decoder layer every family runs: the layer's weights, and the block that composes
//! the spec's components (norm kind; sequential / sandwich / parallel block; the attention
//! component of [`super::attention`] and the MLP component of [`super::mlp`], which own their
//! tensors and forwards). It is written so that AWQ can see inside it: the input of every linear
//! can be captured, and the attention block and the MLP can be run on their own (AWQ's "modules
//! to inspect").
//!
//! Activations are 2-D `[tokens, features]` (all sequences of a batch stacked, each `seq_len`
//! long); only attention reshapes per sequence. Everything is f32.

use candle_core::{Device, Tensor};

use super::arch::{Block, Input, NormKind};
use super::config::{AwqFormat, ModelSpec};
use super::rope::Rope;
use super::shapes as names;
use super::{attention, mlp};
use crate::quant::pack::{gemv_zeros_width, unpack, Layout, Packed};
use crate::quant::rtn::Quantized;

use std::sync::Arc;

use super::experts::{Expert, Experts};
use crate::error::Result;
use crate::io::reader::Checkpoint;

#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`, f32.
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// The linear `prefix` (`.weight`, or the packed tensors the spec says, dequantized) as
    /// f32 `[out, in]`, with its `.bias` when `bias`.
    pub fn load(
        ckpt: &Checkpoint,
        spec: &ModelSpec,
        prefix: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = match spec.packed(prefix) {
            None => ckpt.f32(&format!("{prefix}.weight"), &[out, inp])?,
            Some(fmt) => {
                let q = read_packed(ckpt, prefix, out, inp, fmt)?;
                Tensor::from_vec(q.dequantize(), (out, inp), &Device::Cpu)?
            }
        };
        let bias = if bias {
            Some(ckpt.f32(&format!("{prefix}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// `x · Wᵀ + b` for `x: [tokens, in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = crate::ops::matmul(x, &self.weight.t()?)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }
}

/// Shapes of the packed tensors of an `[out, in]` linear: (qweight, qzeros, scales).
pub fn packed_shapes(out: usize, inp: usize, fmt: AwqFormat) -> Result<[[usize; 2]; 3]> {
    let g = inp / fmt.group;
    Ok(match fmt.layout {
        Layout::Gemm => [[inp, out / 8], [g, out / 8], [g, out]],
        Layout::Gemv => {
            let zw = gemv_zeros_width(inp, fmt.group)?;
            [[out, inp / 8], [out, zw], [out, 8 * zw]]
        }
        Layout::PackQuantized => crate::quant::pack_quantized::shapes(out, inp, fmt.group),
    })
}

/// Reads and unpacks the AWQ tensors of one linear.
fn read_packed(
    ckpt: &Checkpoint,
    prefix: &str,
    out: usize,
    inp: usize,
    fmt: AwqFormat,
) -> Result<Quantized> {
    if !inp.is_multiple_of(fmt.group) || !out.is_multiple_of(8) {
        return Err(crate::input_err!(
            "{prefix}: shape [{out}, {inp}] does not fit AWQ group {}",
            fmt.group
        ));
    }
    let packed = read_packed_tensors(ckpt, prefix, fmt.layout, packed_shapes(out, inp, fmt)?)?;
    unpack(&packed, fmt.layout, fmt.group)
}

/// The codes, zero points and scales of the linear `prefix` (`qweight`, `qzeros`, `scales`;
/// compressed-tensors' `weight_packed`, `weight_zero_point`, `weight_scale`), checked against
/// `shapes`. AWQ scales are float16; compressed-tensors' are in the model's float dtype and
/// are read as float16 (exact, unless a bfloat16 scale lies below float16's normal range).
pub fn read_packed_tensors(
    ckpt: &Checkpoint,
    prefix: &str,
    layout: Layout,
    [qw, qz, sc]: [[usize; 2]; 3],
) -> Result<Packed> {
    let [w, z, s] = layout.tensor_names().map(|t| format!("{prefix}.{t}"));
    let scales = match layout {
        Layout::PackQuantized => ckpt
            .f32(&s, &sc)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(half::f16::from_f32)
            .collect(),
        _ => ckpt.f16s(&s, &sc)?,
    };
    Ok(Packed {
        qweight: ckpt.i32s(&w, &qw)?,
        qweight_shape: qw,
        qzeros: ckpt.i32s(&z, &qz)?,
        qzeros_shape: qz,
        scales,
        scales_shape: sc,
    })
}

pub use super::mlp::moe::Routing;

/// The input of every linear of one layer forward, `[tokens, in]` each, by [`Input`] kind
/// (a parallel block has no separate MLP input; an expert's down input holds only the tokens
/// routed to it), and the routing of a MoE layer.
#[derive(Debug, Default)]
pub struct LinearInputs {
    slots: Vec<(Input, Tensor)>,
    /// Which tokens each expert saw (MoE layers).
    pub routing: Option<Routing>,
}

impl LinearInputs {
    pub fn get(&self, input: Input) -> &Tensor {
        self.find(input)
            .expect("the layer captures every input its linears read")
    }

    pub fn find(&self, input: Input) -> Option<&Tensor> {
        self.slots.iter().find(|(k, _)| *k == input).map(|(_, t)| t)
    }

    pub fn get_mut(&mut self, input: Input) -> &mut Tensor {
        let slot = self.slots.iter_mut().find(|(k, _)| *k == input);
        &mut slot
            .expect("the layer captures every input its linears read")
            .1
    }

    /// Removes and returns one input (dropping it frees its memory).
    pub fn take(&mut self, input: Input) -> Option<Tensor> {
        let at = self.slots.iter().position(|(k, _)| *k == input)?;
        Some(self.slots.remove(at).1)
    }

    pub fn set(&mut self, input: Input, t: Tensor) {
        match self.slots.iter_mut().find(|(k, _)| *k == input) {
            Some(slot) => slot.1 = t,
            None => self.slots.push((input, t)),
        }
    }

    /// Moves every input (and the routing) of `other` into `self`.
    pub fn absorb(&mut self, other: LinearInputs) {
        for (k, t) in other.slots {
            self.set(k, t);
        }
        if other.routing.is_some() {
            self.routing = other.routing;
        }
    }

    /// The captured inputs with their kinds.
    pub fn iter(&self) -> impl Iterator<Item = (Input, &Tensor)> {
        self.slots.iter().map(|(k, t)| (*k, t))
    }
}

/// A norm's parameters: `weight: [width]` and, for LayerNorms with bias, `bias: [width]`.
#[derive(Debug, Clone)]
pub struct Norm {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Norm {
    /// `{prefix}.weight` (and `{prefix}.bias` when `bias`), `[width]` each, as f32.
    pub fn load(ckpt: &Checkpoint, prefix: &str, width: usize, bias: bool) -> Result<Self> {
        let t = |part: &str| ckpt.f32(&format!("{prefix}.{part}"), &[width]);
        Ok(Self {
            weight: t("weight")?,
            bias: if bias { Some(t("bias")?) } else { None },
        })
    }

    /// Normalises each row of `x: [rows, width]` the way `spec.norm` says, in f32.
    pub fn apply(&self, spec: &ModelSpec, x: &Tensor) -> Result<Tensor> {
        let eps = spec.norm_eps as f32;
        Ok(match spec.norm {
            NormKind::Rms => candle_nn::ops::rms_norm(x, &self.weight, eps)?,
            NormKind::RmsOnePlus => candle_nn::ops::rms_norm(x, &(&self.weight + 1.0)?, eps)?,
            NormKind::Layer => {
                let bias = match &self.bias {
                    Some(b) => b.clone(),
                    None => self.weight.zeros_like()?,
                };
                candle_nn::ops::layer_norm(x, &self.weight, &bias, eps)?
            }
        })
    }

    /// Folds `1/s` into the norm so that its output columns are divided by `s` (AWQ-SPEC §5):
    /// `w/s` (and `b/s`); for `(1 + w)` norms `(1 + w)/s − 1`.
    pub fn divide(&mut self, kind: NormKind, s: &Tensor) -> Result<()> {
        self.weight = match kind {
            NormKind::RmsOnePlus => ((&self.weight + 1.0)?.broadcast_div(s)? - 1.0)?,
            NormKind::Rms | NormKind::Layer => self.weight.broadcast_div(s)?,
        };
        if let Some(b) = &self.bias {
            self.bias = Some(b.broadcast_div(s)?);
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct LayerWeights {
    /// Decoder layer index (its window and rope base depend on it).
    pub index: usize,
    /// Norms by name relative to the layer, in [`ModelSpec::layer_norms`] order.
    pub norms: Vec<(&'static str, Norm)>,
    /// Linears by name relative to the layer, in [`ModelSpec::linears`] order.
    pub linears: Vec<(&'static str, Linear)>,
    /// Unquantized linears (a MoE router, `shared_expert_gate`), in
    /// [`ModelSpec::router_linears`] order.
    pub routers: Vec<(&'static str, Linear)>,
    /// Float tensors copied to the output unchanged ([`ModelSpec::layer_verbatim`]).
    pub verbatim: Vec<(&'static str, Tensor)>,
    /// A MoE layer's routed experts, read one at a time ([`super::experts`]); they are then
    /// not in `linears`. `None`: every linear is in `linears` (a layer built in memory).
    pub experts: Option<Experts>,
}

impl LayerWeights {
    pub fn load(ckpt: &Arc<Checkpoint>, spec: &ModelSpec, i: usize) -> Result<Self> {
        let p = spec.roots.layer(i);
        let experts = spec
            .moe
            .as_ref()
            .map(|_| Experts::new(ckpt.clone(), spec, p.clone()));
        let norms = spec
            .layer_norms()
            .into_iter()
            .map(|(name, width)| {
                let norm = Norm::load(
                    ckpt,
                    &format!("{p}.{name}"),
                    width,
                    spec.norm_has_bias(name),
                )?;
                Ok((name, norm))
            })
            .collect::<Result<_>>()?;
        let linears = spec
            .linears()
            .into_iter()
            .filter(|l| l.expert.is_none())
            .map(|l| {
                let lin =
                    Linear::load(ckpt, spec, &format!("{p}.{}", l.name), l.out, l.inp, l.bias)?;
                Ok((l.name, lin))
            })
            .collect::<Result<_>>()?;
        let routers = spec
            .router_linears()
            .into_iter()
            .map(|l| {
                let weight = ckpt.f32(&format!("{p}.{}.weight", l.name), &[l.out, l.inp])?;
                Ok((l.name, Linear { weight, bias: None }))
            })
            .collect::<Result<_>>()?;
        let verbatim = spec
            .layer_verbatim()
            .into_iter()
            .map(|(name, width)| Ok((name, ckpt.f32(&format!("{p}.{name}"), &[width])?)))
            .collect::<Result<_>>()?;
        Ok(Self {
            index: i,
            norms,
            linears,
            routers,
            verbatim,
            experts,
        })
    }

    /// Routed expert `e`'s gate, up and down projections, in f32: read from the checkpoint
    /// (see [`super::experts`]), or copied from `linears` for a layer built in memory.
    pub fn expert(&self, spec: &ModelSpec, e: usize) -> Result<Expert> {
        match &self.experts {
            Some(experts) => experts.get(e),
            None => Ok(spec.expert_linears(e).map(|n| self.linear(n).clone())),
        }
    }

    /// The verbatim float tensor `name` (a router's correction bias). Panics for a name the
    /// spec does not list.
    pub fn verbatim(&self, name: &str) -> &Tensor {
        named(&self.verbatim, name, "tensor")
    }

    /// The unquantized linear `name` (a router). Panics for a name the spec does not list.
    pub fn router(&self, name: &str) -> &Linear {
        named(&self.routers, name, "router")
    }

    pub fn router_mut(&mut self, name: &str) -> &mut Linear {
        named_mut(&mut self.routers, name, "router")
    }

    /// The linear `name` (relative to the layer). Panics for a name the spec does not list.
    pub fn linear(&self, name: &str) -> &Linear {
        named(&self.linears, name, "linear")
    }

    pub fn linear_mut(&mut self, name: &str) -> &mut Linear {
        named_mut(&mut self.linears, name, "linear")
    }

    /// The norm `name` (relative to the layer). Panics for a name the spec does not list.
    pub fn norm(&self, name: &str) -> &Norm {
        named(&self.norms, name, "norm")
    }

    pub fn norm_mut(&mut self, name: &str) -> &mut Norm {
        named_mut(&mut self.norms, name, "norm")
    }

    /// Attention context (the input of `o_proj`) for `x = input_layernorm(h)`, by the spec's
    /// attention component ([`attention::of`]).
    pub fn attention_context(
        &self,
        spec: &ModelSpec,
        rope: &Rope,
        x: &Tensor,
        seq_len: usize,
    ) -> Result<Tensor> {
        let spec = &*spec.layer(self.index);
        Ok(attention::of(spec)
            .context(self, spec, rope, x, seq_len, false)?
            .0)
    }

    /// `o_proj(attention(x))` for `x = input_layernorm(h)`: AWQ's inspected attention module.
    /// Like every entry point here it takes the model's spec or this layer's
    /// ([`ModelSpec::layer`]): a dense layer of a MoE model runs as dense either way.
    pub fn self_attn(
        &self,
        spec: &ModelSpec,
        rope: &Rope,
        x: &Tensor,
        seq_len: usize,
    ) -> Result<Tensor> {
        let spec = &*spec.layer(self.index);
        self.linear(names::O_PROJ)
            .forward(&self.attention_context(spec, rope, x, seq_len)?)
    }

    /// The whole MLP (or MoE block) for its input `x`: AWQ's inspected MLP module.
    pub fn mlp(&self, spec: &ModelSpec, x: &Tensor) -> Result<Tensor> {
        let spec = &*spec.layer(self.index);
        Ok(mlp::of(spec).forward(self, spec, x, false)?.0)
    }

    /// The full layer for `h: [tokens, hidden]`. With `capture`, also the input of every linear.
    pub fn forward(
        &self,
        spec: &ModelSpec,
        rope: &Rope,
        h: &Tensor,
        seq_len: usize,
        capture: bool,
    ) -> Result<(Tensor, Option<LinearInputs>)> {
        let half = self.attention_half(spec, rope, h, seq_len, capture)?;
        self.mlp_half(spec, half, capture)
    }

    /// The layer up to the MLP's input: attention and its residual. Its rows are the tokens of
    /// `h`, so halves of whole sequences concatenate ([`AttentionHalf::cat`]) into the half of
    /// all of them: a MoE layer runs attention piece by piece and its experts once.
    pub fn attention_half(
        &self,
        spec: &ModelSpec,
        rope: &Rope,
        h: &Tensor,
        seq_len: usize,
        capture: bool,
    ) -> Result<AttentionHalf> {
        let spec = &*spec.layer(self.index);
        let r = |t: Tensor| round_to(t, spec.serve_dtype);
        let x = r(self.norm(names::INPUT_NORM).apply(spec, h)?)?;
        let (ctx, mut inputs) =
            attention::of(spec).context(self, spec, rope, &x, seq_len, capture)?;
        let attn = r(self.linear(names::O_PROJ).forward(&ctx)?)?;
        let attn = match spec.block {
            Block::Sandwich => r(self.norm(names::POST_ATTN_NORM).apply(spec, &attn)?)?,
            Block::Sequential | Block::Parallel => attn,
        };
        let resid = r((h + residual(spec, attn)?)?)?;
        let mlp_in = match spec.block {
            Block::Parallel => x.clone(),
            Block::Sequential | Block::Sandwich => {
                let norm = spec.mlp_norm().expect("sequential blocks have one");
                r(self.norm(norm).apply(spec, &resid)?)?
            }
        };
        inputs.set(Input::Attn, x);
        inputs.set(Input::O, ctx);
        Ok(AttentionHalf {
            resid,
            mlp_in,
            inputs,
        })
    }

    /// The rest of the layer: the MLP on `half.mlp_in`, added to the residual. With `capture`,
    /// also the input of every linear (the attention's from `half`).
    pub fn mlp_half(
        &self,
        spec: &ModelSpec,
        half: AttentionHalf,
        capture: bool,
    ) -> Result<(Tensor, Option<LinearInputs>)> {
        let spec = &*spec.layer(self.index);
        let r = |t: Tensor| round_to(t, spec.serve_dtype);
        let AttentionHalf {
            resid,
            mlp_in,
            mut inputs,
        } = half;
        let (mlp, captured) = mlp::of(spec).forward(self, spec, &mlp_in, capture)?;
        let mlp = match spec.block {
            Block::Sandwich => r(self.norm(names::POST_FFN_NORM).apply(spec, &mlp)?)?,
            Block::Sequential | Block::Parallel => mlp,
        };
        let out = r((resid + residual(spec, mlp)?)?)?;
        if spec.block != Block::Parallel {
            inputs.set(Input::Mlp, mlp_in);
        }
        inputs.absorb(captured);
        Ok((out, capture.then_some(inputs)))
    }
}

/// A layer's state between attention and MLP ([`LayerWeights::attention_half`]), rows = tokens.
pub struct AttentionHalf {
    /// `h + attention(h)`: what the MLP's output is added to.
    pub resid: Tensor,
    /// The MLP's input.
    pub mlp_in: Tensor,
    /// The attention linears' inputs.
    pub inputs: LinearInputs,
}

impl AttentionHalf {
    /// The halves of consecutive pieces of whole sequences as one, rows in order.
    pub fn cat(halves: Vec<AttentionHalf>) -> Result<AttentionHalf> {
        let rows = |f: &dyn Fn(&AttentionHalf) -> Tensor| -> Result<Tensor> {
            let parts: Vec<Tensor> = halves.iter().map(f).collect();
            Ok(Tensor::cat(&parts, 0)?)
        };
        let mut inputs = LinearInputs::default();
        for (kind, _) in halves[0].inputs.iter() {
            inputs.set(kind, rows(&|h| h.inputs.get(kind).clone())?);
        }
        Ok(AttentionHalf {
            resid: rows(&|h| h.resid.clone())?,
            mlp_in: rows(&|h| h.mlp_in.clone())?,
            inputs,
        })
    }
}

/// `t` scaled by the spec's residual multiplier (Granite), rounded as a server stores it.
fn residual(spec: &ModelSpec, t: Tensor) -> Result<Tensor> {
    if spec.residual_mult == 1.0 {
        return Ok(t);
    }
    round_to((t * spec.residual_mult)?, spec.serve_dtype)
}

/// The entry `name` of a layer's named list. Panics for a name the spec does not list (callers
/// take names from the spec).
fn named<'a, T>(list: &'a [(&'static str, T)], name: &str, kind: &str) -> &'a T {
    let found = list.iter().find(|(n, _)| *n == name);
    &found.unwrap_or_else(|| panic!("no {kind} {name}")).1
}

fn named_mut<'a, T>(list: &'a mut [(&'static str, T)], name: &str, kind: &str) -> &'a mut T {
    let found = list.iter_mut().find(|(n, _)| *n == name);
    &mut found.unwrap_or_else(|| panic!("no {kind} {name}")).1
}

/// `t` rounded to `dtype` and back to f32 (`None`: unchanged) — how a float16/bfloat16 server
/// stores each activation (see [`ModelSpec::serve_dtype`]); values beyond float16 become inf.
pub fn round_to(t: Tensor, dtype: Option<candle_core::DType>) -> Result<Tensor> {
    Ok(match dtype {
        Some(dt) => t.to_dtype(dt)?.to_dtype(candle_core::DType::F32)?,
        None => t,
    })
}

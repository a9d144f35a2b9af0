//! The one decoder layer every family runs, built from the components the spec chooses
//! (`arch.rs`): norm kind, sequential / sandwich / parallel block, separate or fused projections,
//! gated or plain MLP. It is written so that AWQ can see inside it: the input of every linear
//! can be captured, and the attention block and the MLP can be run on their own (AWQ's "modules
//! to inspect").
//!
//! Activations are 2-D `[tokens, features]` (all sequences of a batch stacked, each `seq_len`
//! long); only attention reshapes per sequence. Everything is f32.

use candle_core::{Device, Tensor};

use super::arch::{Act, AttnProj, Block, Input, Mlp, Moe, NormKind, Scoring};
use super::attention::{Attention, Rotary, Rounding};
use super::config::{AwqFormat, ModelSpec};
use super::rope::Rope;
use super::shapes as names;
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

/// A MoE layer's routing: for each expert, the tokens routed to it (ascending) and their
/// routing weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub experts: Vec<Vec<(u32, f32)>>,
}

impl Routing {
    /// Tokens per expert.
    pub fn tokens(&self) -> Vec<usize> {
        self.experts.iter().map(Vec::len).collect()
    }

    /// The token indices routed to expert `e`, as a `u32` index tensor.
    pub fn index(&self, e: usize) -> Result<Tensor> {
        let ids: Vec<u32> = self.experts[e].iter().map(|(t, _)| *t).collect();
        let n = ids.len();
        Ok(Tensor::from_vec(ids, n, &Device::Cpu)?)
    }

    /// Routes every row of `logits: [tokens, experts]`: softmax over all experts, the `top_k`
    /// most probable (ties to the lower index), weights renormalised to sum 1 when `norm_topk`
    /// (transformers' Mixtral / Qwen MoE blocks, in f32).
    pub fn from_logits(logits: &[Vec<f32>], experts: usize, top_k: usize, norm_topk: bool) -> Self {
        let mut routed = vec![Vec::new(); experts];
        for (t, row) in logits.iter().enumerate() {
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let exp: Vec<f32> = row.iter().map(|&x| (x - m).exp()).collect();
            let z: f32 = exp.iter().sum();
            let mut order: Vec<usize> = (0..experts).collect();
            order.sort_by(|&a, &b| exp[b].total_cmp(&exp[a]).then(a.cmp(&b)));
            let top = &order[..top_k];
            let sum: f32 = top.iter().map(|&e| exp[e] / z).sum();
            for &e in top {
                let p = exp[e] / z;
                routed[e].push((t as u32, if norm_topk { p / sum } else { p }));
            }
        }
        Self { experts: routed }
    }

    /// Routes every row of `logits: [tokens, experts]` as DeepSeek-V3's `noaux_tc` router does
    /// (transformers' `DeepseekV3MoE.route_tokens_to_experts`, `Glm4MoeMoE`; see
    /// [`Scoring::GroupedSigmoid`]), in f32. The groups outside the best `topk_group` have their
    /// biased scores set to 0 (not −∞, as `masked_fill(…, 0.0)`), and ties go to the lower
    /// index.
    pub fn grouped_sigmoid(logits: &[Vec<f32>], bias: &[f32], moe: &Moe) -> Self {
        let Scoring::GroupedSigmoid {
            groups,
            topk_groups,
            scale,
        } = moe.scoring
        else {
            unreachable!("called for a grouped-sigmoid router")
        };
        let per_group = moe.experts / groups;
        let by_score = |v: &[f32]| {
            let mut order: Vec<usize> = (0..v.len()).collect();
            order.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
            order
        };
        let mut routed = vec![Vec::new(); moe.experts];
        for (t, row) in logits.iter().enumerate() {
            let scores: Vec<f32> = row.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect();
            let mut choice: Vec<f32> = scores.iter().zip(bias).map(|(s, b)| s + b).collect();
            let group_scores: Vec<f32> = choice
                .chunks_exact(per_group)
                .map(|g| by_score(g).iter().take(2).map(|&e| g[e]).sum())
                .collect();
            let kept = &by_score(&group_scores)[..topk_groups];
            for (g, chunk) in choice.chunks_exact_mut(per_group).enumerate() {
                if !kept.contains(&g) {
                    chunk.fill(0.0);
                }
            }
            let top = &by_score(&choice)[..moe.top_k];
            let sum: f32 = top.iter().map(|&e| scores[e]).sum::<f32>() + 1e-20;
            for &e in top {
                let w = if moe.norm_topk {
                    scores[e] / sum
                } else {
                    scores[e]
                };
                routed[e].push((t as u32, w * scale as f32));
            }
        }
        Self { experts: routed }
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

    /// q, k and v `[tokens, heads · head_dim]` row-major (rope not applied), after the optional
    /// per-head q/k norms.
    fn qkv(&self, spec: &ModelSpec, x: &Tensor) -> Result<[Vec<f32>; 3]> {
        let tokens = x.dim(0)?;
        let (hd, qd, kvd) = (
            spec.head_dim,
            spec.heads * spec.head_dim,
            spec.kv_heads * spec.head_dim,
        );
        let r = |t: Tensor| round_to(t, spec.serve_dtype);
        let [q, k, v] = match spec.attn_proj {
            AttnProj::Separate => {
                [names::Q_PROJ, names::K_PROJ, names::V_PROJ].map(|n| self.linear(n).forward(x))
            }
            AttnProj::Fused => {
                let y = self.linear(names::QKV_PROJ).forward(x)?;
                [(0, qd), (qd, kvd), (qd + kvd, kvd)].map(|(at, len)| Ok(y.narrow(1, at, len)?))
            }
            AttnProj::Latent => unreachable!("latent attention has its own forward"),
        };
        let head_norm = |t: Tensor, norm: &str| -> Result<Tensor> {
            let t = r(t)?;
            if !spec.qk_norm {
                return Ok(t);
            }
            let width = t.dim(1)?;
            let rows = t.contiguous()?.reshape((tokens * width / hd, hd))?;
            r(self
                .norm(norm)
                .apply(spec, &rows)?
                .reshape((tokens, width))?)
        };
        let flat =
            |t: Tensor| -> Result<Vec<f32>> { Ok(t.contiguous()?.flatten_all()?.to_vec1()?) };
        Ok([
            flat(head_norm(q?, names::Q_NORM)?)?,
            flat(head_norm(k?, names::K_NORM)?)?,
            flat(r(v?)?)?,
        ])
    }

    /// Attention context (the input of `o_proj`) for `x = input_layernorm(h)`: the
    /// projections, the optional per-head q/k norms, then [`Attention`] (rope, causal softmax,
    /// grouped-query heads, this layer's sliding window, soft-capping) without materialised
    /// scores.
    pub fn attention_context(
        &self,
        spec: &ModelSpec,
        rope: &Rope,
        x: &Tensor,
        seq_len: usize,
    ) -> Result<Tensor> {
        let spec = &*spec.layer(self.index);
        Ok(self.attention_captured(spec, rope, x, seq_len, false)?.0)
    }

    /// [`Self::attention_context`] and, with `capture`, the inputs of the attention's inner
    /// linears (a latent attention's `q_b_proj` and `kv_b_proj`).
    fn attention_captured(
        &self,
        spec: &ModelSpec,
        rope: &Rope,
        x: &Tensor,
        seq_len: usize,
        capture: bool,
    ) -> Result<(Tensor, LinearInputs)> {
        if spec.attn_proj == AttnProj::Latent {
            return self.latent_attention(spec, rope, x, seq_len, capture);
        }
        let tokens = x.dim(0)?;
        let (h, hd) = (spec.heads, spec.head_dim);
        let [q, k, v] = self.qkv(spec, x)?;
        let (cos, sin) = rope.tables(spec.local_rope(self.index));
        let attention = Attention {
            seq_len,
            heads: h,
            kv_heads: spec.kv_heads,
            head_dim: hd,
            scale: spec.attn_scale as f32,
            window: spec.window(self.index),
            softcap: spec.attn_softcap.map(|c| c as f32),
            rotary: Rotary {
                cos,
                sin,
                dim: spec.rotary_dim,
                interleaved: spec.rope_interleaved,
            },
            round: Rounding::from_dtype(spec.serve_dtype),
        };
        let ctx = timed_attention(&attention, &q, &k, &v, tokens);
        let ctx = Tensor::from_vec(ctx, (tokens, h * hd), &Device::Cpu)?;
        Ok((ctx, LinearInputs::default()))
    }

    /// Multi-head latent attention ([`super::mla`]): the low-rank projections and their norms,
    /// then the fused kernel on q/k/v rearranged to one head size.
    fn latent_attention(
        &self,
        spec: &ModelSpec,
        rope: &Rope,
        x: &Tensor,
        seq_len: usize,
        capture: bool,
    ) -> Result<(Tensor, LinearInputs)> {
        use super::mla::{KV_A_NORM, KV_A_PROJ, KV_B_PROJ, Q_A_NORM, Q_A_PROJ, Q_B_PROJ};
        let mla = spec.latent();
        let (tokens, h) = (x.dim(0)?, spec.heads);
        let r = |t: Tensor| round_to(t, spec.serve_dtype);
        let norm = |name: &str, t: &Tensor| r(self.norm(name).apply(spec, t)?);
        let mut captured = LinearInputs::default();
        let q = match mla.q_lora {
            Some(_) => {
                let q_latent = norm(Q_A_NORM, &r(self.linear(Q_A_PROJ).forward(x)?)?)?;
                let q = r(self.linear(Q_B_PROJ).forward(&q_latent)?)?;
                if capture {
                    captured.set(Input::QLatent, q_latent);
                }
                q
            }
            None => r(self.linear(names::Q_PROJ).forward(x)?)?,
        };
        let kv_a = r(self.linear(KV_A_PROJ).forward(x)?)?;
        let kv_latent = norm(KV_A_NORM, &kv_a.narrow(1, 0, mla.kv_lora)?.contiguous()?)?;
        let k_rope = kv_a.narrow(1, mla.kv_lora, mla.rope)?;
        let kv = r(self.linear(KV_B_PROJ).forward(&kv_latent)?)?;
        if capture {
            captured.set(Input::KvLatent, kv_latent);
        }
        let flat =
            |t: &Tensor| -> Result<Vec<f32>> { Ok(t.contiguous()?.flatten_all()?.to_vec1()?) };
        let q = mla.q_for_kernel(&flat(&q)?, tokens, h);
        let (k, v) = mla.kv_for_kernel(&flat(&kv)?, &flat(&k_rope)?, tokens, h);
        let (cos, sin) = rope.tables(false);
        let attention = Attention {
            seq_len,
            heads: h,
            kv_heads: h,
            head_dim: mla.kernel_head(),
            scale: spec.attn_scale as f32,
            window: None,
            softcap: None,
            rotary: Rotary {
                cos,
                sin,
                dim: mla.rope,
                interleaved: spec.rope_interleaved,
            },
            round: Rounding::from_dtype(spec.serve_dtype),
        };
        let ctx = timed_attention(&attention, &q, &k, &v, tokens);
        Ok((mla.context_from_kernel(&ctx, tokens, h)?, captured))
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

    /// The MLP's hidden activation (the input of `down_proj` / `c_proj`) for its input `x`
    /// (dense MLPs).
    pub fn mlp_hidden(&self, spec: &ModelSpec, x: &Tensor) -> Result<Tensor> {
        let r = |t: Tensor| round_to(t, spec.serve_dtype);
        match spec.mlp {
            Mlp::Plain => r(act(spec, &r(self.linear(names::C_FC).forward(x)?)?)?),
            Mlp::Gated => self.gated(spec, names::GATE_PROJ, names::UP_PROJ, x),
            Mlp::FusedGated => {
                let y = self.linear(names::GATE_UP_PROJ).forward(x)?;
                let i = y.dim(1)? / 2;
                let (gate, up) = (
                    y.narrow(1, 0, i)?.contiguous()?,
                    y.narrow(1, i, i)?.contiguous()?,
                );
                gate_product(spec, gate, up)
            }
            Mlp::Moe => unreachable!("a MoE layer has no single hidden activation"),
        }
    }

    /// `act(gate(x)) · up(x)` for the linears `gate` and `up`.
    fn gated(&self, spec: &ModelSpec, gate: &str, up: &str, x: &Tensor) -> Result<Tensor> {
        gate_product(
            spec,
            self.linear(gate).forward(x)?,
            self.linear(up).forward(x)?,
        )
    }

    /// The MLP's output projection (`down_proj` / `c_proj`) of a dense MLP.
    pub fn mlp_out(&self, spec: &ModelSpec) -> &Linear {
        self.linear(match spec.mlp {
            Mlp::Plain => names::C_PROJ,
            _ => names::DOWN_PROJ,
        })
    }

    /// The whole MLP (or MoE block) for its input `x`: AWQ's inspected MLP module.
    pub fn mlp(&self, spec: &ModelSpec, x: &Tensor) -> Result<Tensor> {
        let spec = &*spec.layer(self.index);
        Ok(self.mlp_captured(spec, x, false)?.0)
    }

    /// The MLP's output for its input `x` and (with `capture`) the inputs of its output
    /// projections, with a MoE block's routing.
    fn mlp_captured(
        &self,
        spec: &ModelSpec,
        x: &Tensor,
        capture: bool,
    ) -> Result<(Tensor, LinearInputs)> {
        if spec.mlp == Mlp::Moe {
            return self.moe(spec, x, capture);
        }
        let hidden = self.mlp_hidden(spec, x)?;
        let out = round_to(self.mlp_out(spec).forward(&hidden)?, spec.serve_dtype)?;
        let mut captured = LinearInputs::default();
        if capture {
            captured.set(Input::Down, hidden);
        }
        Ok((out, captured))
    }

    /// A MoE block: route every token, run each expert on the tokens routed to it only (cost
    /// grows with routed tokens, not experts × tokens), add the weighted outputs in expert order
    /// (transformers' `index_add_`), then the gated shared expert.
    fn moe(&self, spec: &ModelSpec, x: &Tensor, capture: bool) -> Result<(Tensor, LinearInputs)> {
        let moe = spec.moe.as_ref().expect("a MoE spec has experts");
        let r = |t: Tensor| round_to(t, spec.serve_dtype);
        let logits = self.router(moe.router).forward(x)?.to_vec2::<f32>()?;
        let routing = match moe.scoring {
            Scoring::Softmax => {
                Routing::from_logits(&logits, moe.experts, moe.top_k, moe.norm_topk)
            }
            Scoring::GroupedSigmoid { .. } => {
                let bias = self.verbatim(moe.correction_bias().expect("a grouped router has one"));
                Routing::grouped_sigmoid(&logits, &bias.to_vec1::<f32>()?, moe)
            }
        };
        let (tokens, d) = x.dims2()?;
        let mut out = vec![0f32; tokens * d];
        let mut captured = LinearInputs::default();
        for (e, routed) in routing.experts.iter().enumerate() {
            let hidden = if routed.is_empty() {
                Tensor::zeros((0, moe.intermediate), candle_core::DType::F32, &Device::Cpu)?
            } else {
                let xe = x.index_select(&routing.index(e)?, 0)?;
                let [gate, up, down] = self.expert(spec, e)?;
                let hidden = gate_product(spec, gate.forward(&xe)?, up.forward(&xe)?)?;
                let y = r(down.forward(&hidden)?)?.to_vec2::<f32>()?;
                for ((t, w), row) in routed.iter().zip(&y) {
                    let dst = &mut out[*t as usize * d..][..d];
                    dst.iter_mut().zip(row).for_each(|(o, v)| *o += w * v);
                }
                hidden
            };
            if capture {
                captured.set(Input::Expert(e), hidden);
            }
        }
        let mut out = Tensor::from_vec(out, (tokens, d), &Device::Cpu)?;
        if let Some(shared) = &moe.shared {
            let [gate, up, down] = shared.linears();
            let hidden = self.gated(spec, gate, up, x)?;
            let y = r(self.linear(down).forward(&hidden)?)?;
            out = match shared.gate {
                Some(g) => {
                    let g = candle_nn::ops::sigmoid(&self.router(g).forward(x)?)?;
                    (out + y.broadcast_mul(&g)?)?
                }
                None => (out + y)?,
            };
            if capture {
                captured.set(Input::SharedDown, hidden);
            }
        }
        captured.routing = Some(routing);
        Ok((r(out)?, captured))
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
        let spec = &*spec.layer(self.index);
        let r = |t: Tensor| round_to(t, spec.serve_dtype);
        let residual = |t: Tensor| -> Result<Tensor> {
            if spec.residual_mult == 1.0 {
                return Ok(t);
            }
            r((t * spec.residual_mult)?)
        };
        let norm = |name: &str, t: &Tensor| r(self.norm(name).apply(spec, t)?);
        let x = norm(names::INPUT_NORM, h)?;
        let (ctx, mut inputs) = self.attention_captured(spec, rope, &x, seq_len, capture)?;
        let attn = r(self.linear(names::O_PROJ).forward(&ctx)?)?;
        let out = match spec.block {
            Block::Parallel => {
                let (mlp, captured) = self.mlp_captured(spec, &x, capture)?;
                inputs.absorb(captured);
                r((r((h + residual(attn)?)?)? + residual(mlp)?)?)?
            }
            Block::Sequential | Block::Sandwich => {
                let sandwich = spec.block == Block::Sandwich;
                let attn = match sandwich {
                    true => norm(names::POST_ATTN_NORM, &attn)?,
                    false => attn,
                };
                let h = r((h + residual(attn)?)?)?;
                let mlp_in = norm(spec.mlp_norm().expect("sequential blocks have one"), &h)?;
                let (mlp, captured) = self.mlp_captured(spec, &mlp_in, capture)?;
                let mlp = match sandwich {
                    true => norm(names::POST_FFN_NORM, &mlp)?,
                    false => mlp,
                };
                inputs.set(Input::Mlp, mlp_in);
                inputs.absorb(captured);
                r((h + residual(mlp)?)?)?
            }
        };
        inputs.set(Input::Attn, x);
        inputs.set(Input::O, ctx);
        Ok((out, capture.then_some(inputs)))
    }
}

/// Runs the fused attention kernel and records its FLOPs with the matmuls'.
fn timed_attention(
    attention: &Attention,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    tokens: usize,
) -> Vec<f32> {
    let start = std::time::Instant::now();
    let ctx = attention.forward(q, k, v);
    crate::ops::record_matmul(attention.flop(tokens), start.elapsed());
    ctx
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

/// `t` rounded to `dtype` and back to f32 (`None`: unchanged) — how a float16/bfloat16 server
/// stores each activation (see [`ModelSpec::serve_dtype`]); values beyond float16 become inf.
pub fn round_to(t: Tensor, dtype: Option<candle_core::DType>) -> Result<Tensor> {
    Ok(match dtype {
        Some(dt) => t.to_dtype(dt)?.to_dtype(candle_core::DType::F32)?,
        None => t,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_picks_top_k_by_softmax_and_renormalises_on_request() {
        // Token 0 prefers experts 2 then 0; token 1 ties experts 1 and 3 (the lower index wins).
        let logits = vec![vec![1.0, 0.0, 2.0, -1.0], vec![0.0, 1.0, 0.0, 1.0]];
        let raw = Routing::from_logits(&logits, 4, 2, false);
        let z0: f32 = logits[0].iter().map(|x| x.exp()).sum();
        assert_eq!(raw.tokens(), vec![1, 1, 1, 1]);
        assert_eq!(raw.experts[2][0].0, 0);
        assert!((raw.experts[2][0].1 - 2f32.exp() / z0).abs() < 1e-6);
        assert_eq!(raw.experts[1][0].0, 1);
        assert_eq!(raw.experts[3][0].0, 1);
        let norm = Routing::from_logits(&logits, 4, 2, true);
        let (a, b) = (norm.experts[2][0].1, norm.experts[0][0].1);
        assert!((a + b - 1.0).abs() < 1e-6 && (a / b - 1f32.exp()).abs() < 1e-5);
    }

    fn sigmoid_moe(groups: usize, topk_groups: usize, norm_topk: bool) -> Moe {
        Moe {
            experts: 4,
            top_k: 2,
            intermediate: 8,
            norm_topk,
            scoring: Scoring::GroupedSigmoid {
                groups,
                topk_groups,
                scale: 2.5,
            },
            shared: None,
            router: "mlp.gate",
            router_listed: false,
            experts_prefix: "mlp.experts",
            leaves: ["gate_proj", "up_proj", "down_proj"],
        }
    }

    #[test]
    fn grouped_sigmoid_routing_chooses_with_the_bias_and_weighs_without_it() {
        let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
        // Experts {0, 1} and {2, 3}. Unbiased, group 0 would win (2.0 + 1.0); the bias on
        // expert 2 makes group 1 win (its top-2 biased sum), and expert 2 outranks 3.
        let logits = vec![vec![2.0, 1.0, 0.0, 0.5]];
        let bias = [0.0, 0.0, 0.9, 0.0];
        let r = Routing::grouped_sigmoid(&logits, &bias, &sigmoid_moe(2, 1, true));
        assert_eq!(r.tokens(), vec![0, 0, 1, 1]);
        let (w2, w3) = (r.experts[2][0].1, r.experts[3][0].1);
        // Weights: the unbiased scores renormalised, times routed_scaling_factor.
        let sum = sig(0.0) + sig(0.5);
        assert!((w2 - 2.5 * sig(0.0) / sum).abs() < 1e-6, "{w2}");
        assert!((w3 - 2.5 * sig(0.5) / sum).abs() < 1e-6, "{w3}");
        // Without renormalisation the weights are the scores times the factor.
        let r = Routing::grouped_sigmoid(&logits, &bias, &sigmoid_moe(2, 1, false));
        assert!((r.experts[2][0].1 - 2.5 * sig(0.0)).abs() < 1e-6);
    }

    #[test]
    fn grouped_sigmoid_routing_masks_dropped_groups_to_zero_not_minus_infinity() {
        // A negative bias pushes every kept expert's biased score below 0: the masked experts
        // (0.0, transformers' masked_fill) then rank above them, as in transformers.
        let logits = vec![vec![0.0, 0.0, 3.0, 3.0]];
        let bias = [-2.0, -2.0, -1.5, -1.6];
        let r = Routing::grouped_sigmoid(&logits, &bias, &sigmoid_moe(2, 1, true));
        // Biased scores: group 0 −1.5 and −1.5 (sum −3), group 1 −0.55 and −0.65 (sum −1.2),
        // so group 1 is kept; group 0's experts, masked to 0.0, still outrank it.
        assert_eq!(r.tokens(), vec![1, 1, 0, 0]);
    }
}

//! The Llama-family decoder layer on candle ops, written so that AWQ can see inside it: the input
//! of every linear can be captured, and the attention block and the MLP can be run on their own
//! (they are AWQ's "modules to inspect").
//!
//! Activations are 2-D `[tokens, features]` (all sequences of a batch stacked, each `seq_len`
//! long); only attention reshapes per sequence. Everything is f32.

use candle_core::{Device, Tensor};

use super::attention::{Attention, Rounding};
use super::config::{AwqFormat, ModelSpec};
use super::rope::Rope;
use crate::quant::pack::{gemv_zeros_width, unpack, Layout, Packed};
use crate::quant::rtn::Quantized;

use crate::error::Result;
use crate::io::reader::Checkpoint;

/// Tensor names of decoder layer `i`, built from prefixes in one place.
pub fn layer_prefix(i: usize) -> String {
    format!("model.layers.{i}")
}

/// The seven projections of a Llama-family layer, in AWQ/checkpoint order.
pub const LINEARS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`, f32.
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    fn load(
        ckpt: &Checkpoint,
        spec: &ModelSpec,
        prefix: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = match spec.awq {
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
    let packed = read_packed_tensors(ckpt, prefix, packed_shapes(out, inp, fmt)?)?;
    unpack(&packed, fmt.layout, fmt.group)
}

/// The `qweight`, `qzeros` and `scales` of the linear `prefix`, checked against `shapes`.
pub fn read_packed_tensors(
    ckpt: &Checkpoint,
    prefix: &str,
    [qw, qz, sc]: [[usize; 2]; 3],
) -> Result<Packed> {
    Ok(Packed {
        qweight: ckpt.i32s(&format!("{prefix}.qweight"), &qw)?,
        qweight_shape: qw,
        qzeros: ckpt.i32s(&format!("{prefix}.qzeros"), &qz)?,
        qzeros_shape: qz,
        scales: ckpt.f16s(&format!("{prefix}.scales"), &sc)?,
        scales_shape: sc,
    })
}

/// Inputs of every linear of one layer forward, `[tokens, in]` each.
#[derive(Debug)]
pub struct LinearInputs {
    /// `input_layernorm` output: the input of q/k/v (and of the attention block).
    pub attn: Tensor,
    /// Attention context: the input of `o_proj`.
    pub o: Tensor,
    /// `post_attention_layernorm` output: the input of gate/up (and of the MLP).
    pub mlp: Tensor,
    /// `silu(gate) * up`: the input of `down_proj`.
    pub down: Tensor,
}

#[derive(Debug, Clone)]
pub struct LayerWeights {
    pub input_norm: Tensor,
    pub post_norm: Tensor,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
}

impl LayerWeights {
    pub fn load(ckpt: &Checkpoint, spec: &ModelSpec, i: usize) -> Result<Self> {
        let p = layer_prefix(i);
        let (d, hd) = (spec.hidden, spec.head_dim);
        let (qd, kvd) = (spec.heads * hd, spec.kv_heads * hd);
        let lin = |name: &str, out, inp, bias| {
            Linear::load(ckpt, spec, &format!("{p}.{name}"), out, inp, bias)
        };
        let norm = |name: &str, n| ckpt.f32(&format!("{p}.{name}.weight"), &[n]);
        Ok(Self {
            input_norm: norm("input_layernorm", d)?,
            post_norm: norm("post_attention_layernorm", d)?,
            q: lin("self_attn.q_proj", qd, d, spec.qkv_bias)?,
            k: lin("self_attn.k_proj", kvd, d, spec.qkv_bias)?,
            v: lin("self_attn.v_proj", kvd, d, spec.qkv_bias)?,
            o: lin("self_attn.o_proj", d, qd, spec.o_bias)?,
            gate: lin("mlp.gate_proj", spec.intermediate, d, spec.mlp_bias)?,
            up: lin("mlp.up_proj", spec.intermediate, d, spec.mlp_bias)?,
            down: lin("mlp.down_proj", d, spec.intermediate, spec.mlp_bias)?,
            q_norm: if spec.qk_norm {
                Some(norm("self_attn.q_norm", hd)?)
            } else {
                None
            },
            k_norm: if spec.qk_norm {
                Some(norm("self_attn.k_norm", hd)?)
            } else {
                None
            },
        })
    }

    /// The linears with their names relative to the layer, in [`LINEARS`] order.
    pub fn linears(&self) -> [(&'static str, &Linear); 7] {
        [
            (LINEARS[0], &self.q),
            (LINEARS[1], &self.k),
            (LINEARS[2], &self.v),
            (LINEARS[3], &self.o),
            (LINEARS[4], &self.gate),
            (LINEARS[5], &self.up),
            (LINEARS[6], &self.down),
        ]
    }

    pub fn linears_mut(&mut self) -> [(&'static str, &mut Linear); 7] {
        [
            (LINEARS[0], &mut self.q),
            (LINEARS[1], &mut self.k),
            (LINEARS[2], &mut self.v),
            (LINEARS[3], &mut self.o),
            (LINEARS[4], &mut self.gate),
            (LINEARS[5], &mut self.up),
            (LINEARS[6], &mut self.down),
        ]
    }

    /// Attention context (the input of `o_proj`) for `x = input_layernorm(h)`: the
    /// projections, the optional per-head q/k norms, then [`Attention`] (rope, causal softmax,
    /// grouped-query heads, sliding window) without materialised scores.
    pub fn attention_context(
        &self,
        spec: &ModelSpec,
        rope: &Rope,
        x: &Tensor,
        seq_len: usize,
    ) -> Result<Tensor> {
        let tokens = x.dim(0)?;
        let (h, kvh, hd) = (spec.heads, spec.kv_heads, spec.head_dim);
        let r = |t: Tensor| round_to(t, spec.serve_dtype);
        let project = |lin: &Linear, nh: usize, norm: &Option<Tensor>| -> Result<Vec<f32>> {
            let t = r(lin.forward(x)?)?;
            let t = match norm {
                Some(w) => r(candle_nn::ops::rms_norm(
                    &t.reshape((tokens * nh, hd))?,
                    w,
                    spec.rms_eps as f32,
                )?)?,
                None => t,
            };
            Ok(t.flatten_all()?.to_vec1::<f32>()?)
        };
        let q = project(&self.q, h, &self.q_norm)?;
        let k = project(&self.k, kvh, &self.k_norm)?;
        let v = project(&self.v, kvh, &None)?;
        let attention = Attention {
            seq_len,
            heads: h,
            kv_heads: kvh,
            head_dim: hd,
            scale: 1.0 / (hd as f32).sqrt(),
            window: spec.sliding_window,
            softcap: None,
            cos: &rope.cos,
            sin: &rope.sin,
            round: Rounding::from_dtype(spec.serve_dtype),
        };
        let start = std::time::Instant::now();
        let ctx = attention.forward(&q, &k, &v);
        crate::ops::record_matmul(attention.flop(tokens), start.elapsed());
        Ok(Tensor::from_vec(ctx, (tokens, h * hd), &Device::Cpu)?)
    }

    /// `o_proj(attention(x))` for `x = input_layernorm(h)`: AWQ's inspected attention module.
    pub fn self_attn(
        &self,
        spec: &ModelSpec,
        rope: &Rope,
        x: &Tensor,
        seq_len: usize,
    ) -> Result<Tensor> {
        self.o
            .forward(&self.attention_context(spec, rope, x, seq_len)?)
    }

    /// Input of `down_proj` for `x = post_attention_layernorm(h)`.
    pub fn mlp_hidden(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::silu_mul(&self.gate.forward(x)?, &self.up.forward(x)?)
    }

    /// `down(silu(gate(x)) * up(x))`: AWQ's inspected MLP module.
    pub fn mlp(&self, x: &Tensor) -> Result<Tensor> {
        self.down.forward(&self.mlp_hidden(x)?)
    }

    /// The full layer: `h + attn(norm(h))`, then `+ mlp(norm(·))`. With `capture`, also the input
    /// of every linear.
    pub fn forward(
        &self,
        spec: &ModelSpec,
        rope: &Rope,
        h: &Tensor,
        seq_len: usize,
        capture: bool,
    ) -> Result<(Tensor, Option<LinearInputs>)> {
        let eps = spec.rms_eps as f32;
        let r = |t: Tensor| round_to(t, spec.serve_dtype);
        let attn_in = r(candle_nn::ops::rms_norm(h, &self.input_norm, eps)?)?;
        let ctx = self.attention_context(spec, rope, &attn_in, seq_len)?;
        let h = r((h + r(self.o.forward(&ctx)?)?)?)?;
        let mlp_in = r(candle_nn::ops::rms_norm(&h, &self.post_norm, eps)?)?;
        let down_in = match spec.serve_dtype {
            None => self.mlp_hidden(&mlp_in)?,
            // Each op rounded on its own, as a server does: silu(gate), then the product.
            Some(_) => {
                let gate = r(self.gate.forward(&mlp_in)?)?;
                let up = r(self.up.forward(&mlp_in)?)?;
                r((r(candle_nn::ops::silu(&gate)?)? * up)?)?
            }
        };
        let out = r((h + r(self.down.forward(&down_in)?)?)?)?;
        let inputs = capture.then_some(LinearInputs {
            attn: attn_in,
            o: ctx,
            mlp: mlp_in,
            down: down_in,
        });
        Ok((out, inputs))
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

/// Final RMSNorm helper shared by the model head.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(candle_nn::ops::rms_norm(x, w, eps as f32)?)
}

//! The steps applied to one decoder layer: the scale search of each group against its inspected
//! module, applying the chosen scales (AWQ-SPEC §5), and quantizing and packing the result.

use candle_core::Tensor;

use super::QuantizeOptions;
use crate::error::{Error, Result};
use crate::io::writer::OutTensor;
use crate::model::groups::{Input, Inspect, PrevOp, ScaleGroup, LLAMA_GROUPS};
use crate::model::layer::{layer_prefix, LayerWeights, Linear, LinearInputs};
use crate::model::rope::Rope;
use crate::quant::pack::pack;
use crate::quant::search::{self, Gram, Grid, ScaleChoice};
use crate::quant::{reduce, rtn};

/// Which captured activation feeds a linear: the same as the group that scales it.
pub(super) fn input_of(linear: &str) -> Input {
    LLAMA_GROUPS
        .iter()
        .find(|g| g.linears.contains(&linear))
        .map_or(Input::Attn, |g| g.input)
}

fn group_input(inputs: &LinearInputs, input: Input) -> &Tensor {
    match input {
        Input::Attn => &inputs.attn,
        Input::O => &inputs.o,
        Input::Mlp => &inputs.mlp,
        Input::Down => &inputs.down,
    }
}

fn linear<'a>(layer: &'a LayerWeights, name: &str) -> &'a Linear {
    layer
        .linears()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, l)| l)
        .expect("linear from the group table")
}

fn linear_mut<'a>(layer: &'a mut LayerWeights, name: &str) -> &'a mut Linear {
    layer
        .linears_mut()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, l)| l)
        .expect("linear from the group table")
}

fn inspect(
    layer: &LayerWeights,
    g: &ScaleGroup,
    x: &Tensor,
    spec: &crate::model::config::ModelSpec,
    rope: &Rope,
    seqlen: usize,
) -> Result<Tensor> {
    match g.inspect {
        Inspect::SelfAttn => layer.self_attn(spec, rope, x, seqlen),
        Inspect::Mlp => layer.mlp(x),
        Inspect::Linear => linear(layer, g.linears[0]).forward(x),
    }
}

pub(super) fn search_group(
    layer: &LayerWeights,
    g: &ScaleGroup,
    inputs: &LinearInputs,
    spec: &crate::model::config::ModelSpec,
    rope: &Rope,
    seqlen: usize,
    opts: &QuantizeOptions,
) -> Result<ScaleChoice> {
    let x_all = group_input(inputs, g.input);
    let weights: Vec<&Tensor> = g.linears.iter().map(|n| &linear(layer, n).weight).collect();
    let x_mean = search::x_mean(x_all)?;
    let subset = match opts.search_blocks {
        Some(n) => Some(search_subset(x_all, seqlen, n)?),
        None => None,
    };
    let x = subset.as_ref().unwrap_or(x_all);
    let w_mean = search::w_mean(&weights, opts.group)?;
    // A candidate whose scaled weights leave float16 is rejected (infinite loss).
    let col_absmax = search::col_absmax(&weights)?;
    let fits = |s: &[f32]| search::fits_f16(&col_absmax, s);
    let n_grid = if opts.no_search { 0 } else { opts.n_grid };
    let grid = if opts.no_search {
        Grid::Robust
    } else {
        opts.grid
    };
    if g.inspect == Inspect::Linear {
        let w = weights[0];
        let (out, inp) = w.dims2()?;
        if Gram::pays_off(x.dim(0)?, inp, out, n_grid + 1) {
            let gram = Gram::new(x)?;
            let loss = |s: &[f32]| {
                crate::interrupt::check()?;
                if !fits(s) {
                    return Ok(f64::INFINITY);
                }
                gram.loss(w, &search::scaled_fake_quant(w, s, opts.group)?)
            };
            return search::search(&x_mean, &w_mean, grid, n_grid, loss);
        }
    }
    // The module runs on pieces of whole sequences: the candidates' intermediates (the MLP's
    // gate/up/product, attention's q/k/v) then stay at piece size whatever the number of
    // calibration tokens. The loss is the same sum of squares, divided once.
    let pieces = pieces(x, seqlen)?;
    let reference = pieces
        .iter()
        .map(|p| inspect(layer, g, p, spec, rope, seqlen))
        .collect::<Result<Vec<_>>>()?;
    let elements: usize = reference.iter().map(|r| r.elem_count()).sum();
    let mut scratch = layer.clone(); // shares every tensor until a candidate replaces it
    let loss = |s: &[f32]| -> Result<f64> {
        crate::interrupt::check()?;
        if !fits(s) {
            return Ok(f64::INFINITY);
        }
        for n in g.linears {
            linear_mut(&mut scratch, n).weight =
                search::scaled_fake_quant(&linear(layer, n).weight, s, opts.group)?;
        }
        let mut sum = 0f64;
        for (p, r) in pieces.iter().zip(&reference) {
            let out = inspect(&scratch, g, p, spec, rope, seqlen)?;
            sum += reduce::with_slice(r, |r| reduce::with_slice(&out, |o| reduce::sq_diff(r, o)))??;
        }
        Ok(sum / elements as f64)
    };
    search::search(&x_mean, &w_mean, grid, n_grid, loss)
}

/// Tokens per piece of the capturing forward and of the search's module runs (rounded to whole
/// sequences).
pub(super) const PIECE_TOKENS: usize = 4096;

/// `x: [blocks·seqlen, d]` as views of whole sequences, about [`PIECE_TOKENS`] tokens each.
pub(super) fn pieces(x: &Tensor, seqlen: usize) -> Result<Vec<Tensor>> {
    let tokens = x.dim(0)?;
    let step = (PIECE_TOKENS / seqlen).max(1) * seqlen;
    (0..tokens)
        .step_by(step)
        .map(|t0| Ok(x.narrow(0, t0, step.min(tokens - t0))?))
        .collect()
}

/// Blocks `0, k, 2k, …` of `x: [blocks·seqlen, d]`, at most `n` of them (`--search-blocks`):
/// whole blocks, so attention still sees complete sequences.
fn search_subset(x: &Tensor, seqlen: usize, n: usize) -> Result<Tensor> {
    let blocks = x.dim(0)? / seqlen;
    if n >= blocks {
        return Ok(x.clone());
    }
    let stride = blocks.div_ceil(n.max(1));
    let picked: Vec<Tensor> = (0..blocks)
        .step_by(stride)
        .map(|b| x.narrow(0, b * seqlen, seqlen))
        .collect::<candle_core::Result<_>>()?;
    Ok(Tensor::cat(&picked, 0)?)
}

/// AWQ-SPEC §5: prev op ÷ s, scaled linears' input columns × s, cached inputs ÷ s.
pub(super) fn apply_scales(
    layer: &mut LayerWeights,
    inputs: &mut LinearInputs,
    g: &ScaleGroup,
    s: &[f32],
) -> Result<()> {
    if s.iter().all(|v| *v == 1.0) {
        return Ok(());
    }
    let n = s.len();
    let st = Tensor::from_slice(s, n, &candle_core::Device::Cpu)?;
    match g.prev {
        PrevOp::InputNorm => layer.input_norm = layer.input_norm.broadcast_div(&st)?,
        PrevOp::PostNorm => layer.post_norm = layer.post_norm.broadcast_div(&st)?,
        PrevOp::Linear(name) => {
            let prev = linear_mut(layer, name);
            // The last `n` output rows (all of them for v_proj / up_proj).
            let rows = prev.out_features();
            let col = st.reshape((n, 1))?;
            let head = prev.weight.narrow(0, 0, rows - n)?;
            let tail = prev.weight.narrow(0, rows - n, n)?.broadcast_div(&col)?;
            prev.weight = Tensor::cat(&[head, tail], 0)?;
            if let Some(b) = &prev.bias {
                let head = b.narrow(0, 0, rows - n)?;
                prev.bias = Some(Tensor::cat(
                    &[head, b.narrow(0, rows - n, n)?.broadcast_div(&st)?],
                    0,
                )?);
            }
        }
    }
    for name in g.linears {
        let lin = linear_mut(layer, name);
        lin.weight = lin.weight.broadcast_mul(&st)?;
    }
    let x = match g.input {
        Input::Attn => &mut inputs.attn,
        Input::O => &mut inputs.o,
        Input::Mlp => &mut inputs.mlp,
        Input::Down => &mut inputs.down,
    };
    *x = x.broadcast_div(&st)?;
    Ok(())
}

pub(super) fn group_absmax(w: &Tensor, group: usize) -> Result<Vec<f32>> {
    Ok(w.flatten_all()?
        .to_vec1::<f32>()?
        .chunks(group)
        .map(|g| g.iter().fold(0f32, |a, x| a.max(x.abs())))
        .collect())
}

/// The layer's output tensors in checkpoint order: packed linears (+bias), q/k norms, norms.
/// Float tensors are staged in f32 and converted to the output dtype when the shards are
/// written (the dtype is decided once every layer's activations are known: `--dtype auto`).
/// A non-finite weight or `scales` value after scaling is refused here, never written.
pub(super) fn layer_tensors(
    layer: &LayerWeights,
    i: usize,
    opts: &QuantizeOptions,
) -> Result<Vec<OutTensor>> {
    let p = layer_prefix(i);
    let mut out = Vec::new();
    for (name, lin) in layer.linears() {
        let (rows, cols) = lin.weight.dims2()?;
        let w = lin.weight.flatten_all()?.to_vec1::<f32>()?;
        if let Some(bad) = w.iter().position(|v| !v.is_finite()) {
            return Err(Error::Runtime(format!(
                "{p}.{name}.weight has a non-finite value at index {bad} after scaling; nothing was \
                 written — rerun with --no-search to quantize without AWQ scales"
            )));
        }
        let q = rtn::quantize_f16(&w, rows, cols, opts.group);
        let packed = pack(&q, opts.layout)?;
        let prefix = format!("{p}.{name}");
        if let Some(bad) = packed.scales.iter().position(|v| !v.is_finite()) {
            return Err(Error::Runtime(format!(
                "{prefix}.scales: group scale {bad} is not finite in float16 (the weights exceed \
                 float16's range after scaling); nothing was written — rerun with --no-search"
            )));
        }
        out.push(OutTensor::i32(
            format!("{prefix}.qweight"),
            packed.qweight_shape.to_vec(),
            &packed.qweight,
        ));
        out.push(OutTensor::i32(
            format!("{prefix}.qzeros"),
            packed.qzeros_shape.to_vec(),
            &packed.qzeros,
        ));
        out.push(OutTensor::f16_bits(
            format!("{prefix}.scales"),
            packed.scales_shape.to_vec(),
            &packed.scales,
        ));
        if let Some(b) = &lin.bias {
            out.push(OutTensor::f32(format!("{prefix}.bias"), b)?);
        }
    }
    for (name, t) in [
        ("self_attn.q_norm", &layer.q_norm),
        ("self_attn.k_norm", &layer.k_norm),
        ("input_layernorm", &Some(layer.input_norm.clone())),
        ("post_attention_layernorm", &Some(layer.post_norm.clone())),
    ] {
        if let Some(t) = t {
            out.push(OutTensor::f32(format!("{p}.{name}.weight"), t)?);
        }
    }
    Ok(out)
}

//! The steps applied to one decoder layer: the scale search of each group against its inspected
//! module, applying the chosen scales (AWQ-SPEC §5), and quantizing and packing the result.

use candle_core::Tensor;

use super::QuantizeOptions;
use crate::error::{Error, Result};
use crate::io::writer::OutTensor;
use crate::model::config::ModelSpec;
use crate::model::groups::{Inspect, PrevOp, ScaleGroup};
use crate::model::layer::{LayerWeights, Linear, LinearInputs};
use crate::model::rope::Rope;
use crate::quant::pack::pack;
use crate::quant::search::{self, Gram, ScaleChoice};
use crate::quant::{reduce, rtn};

fn inspect(
    layer: &LayerWeights,
    g: &ScaleGroup,
    x: &Tensor,
    spec: &ModelSpec,
    rope: &Rope,
    seqlen: usize,
) -> Result<Tensor> {
    match g.inspect {
        Inspect::SelfAttn => layer.self_attn(spec, rope, x, seqlen),
        Inspect::Mlp => layer.mlp(spec, x),
        Inspect::Block => Ok((layer.self_attn(spec, rope, x, seqlen)? + layer.mlp(spec, x)?)?),
        Inspect::Linear => layer.linear(g.linears[0]).forward(x),
    }
}

pub(super) fn search_group(
    layer: &LayerWeights,
    g: &ScaleGroup,
    inputs: &LinearInputs,
    spec: &ModelSpec,
    rope: &Rope,
    seqlen: usize,
    opts: &QuantizeOptions,
) -> Result<ScaleChoice> {
    let x_all = inputs.get(g.input);
    let x_mean = search::x_mean(x_all)?;
    let subset = match opts.search_blocks {
        Some(n) => Some(search_subset(x_all, seqlen, n)?),
        None => None,
    };
    let x = subset.as_ref().unwrap_or(x_all);
    let (w_mean, col_absmax) = weight_stats(layer, spec, g, opts.group)?;
    // A candidate whose scaled weights leave float16 is rejected (infinite loss).
    let fits = |s: &[f32]| search::fits_f16(&col_absmax, s);
    let (n_grid, grid) = (opts.n_grid, opts.grid);
    if g.inspect == Inspect::Linear {
        let w = &layer.linear(g.linears[0]).weight;
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
    // calibration tokens. The loss is the same sum of squares, divided once. Streamed experts
    // run on all tokens at once: each is read once per candidate, and its intermediates are
    // its routed tokens' only.
    let streamed = streamed_experts(layer, g);
    let pieces = match streamed {
        true => vec![x.clone()],
        false => pieces(x, seqlen)?,
    };
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
        for n in g.linears.iter().filter(|n| !is_streamed(layer, n)) {
            scratch.linear_mut(n).weight =
                search::scaled_fake_quant(&layer.linear(n).weight, s, opts.group)?;
        }
        if let Some(experts) = scratch.experts.as_mut().filter(|_| streamed) {
            experts.set_candidate(Some((s, opts.group)));
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

/// Whether the linear `name` is one of the layer's streamed experts ([`crate::model::experts`]).
fn is_streamed(layer: &LayerWeights, name: &str) -> bool {
    layer
        .experts
        .as_ref()
        .is_some_and(|x| x.find(name).is_some())
}

/// Whether group `g` holds streamed experts (the MoE layer's gate/up group).
fn streamed_experts(layer: &LayerWeights, g: &ScaleGroup) -> bool {
    g.linears.iter().any(|n| is_streamed(layer, n))
}

/// The group's normalised weight magnitude per input column ([`search::w_mean`]) and each
/// column's largest |weight|, over its linears in order; streamed experts are read one at a
/// time (gate and up of one expert from one read).
fn weight_stats(
    layer: &LayerWeights,
    spec: &ModelSpec,
    g: &ScaleGroup,
    group: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let first = g.linears[0];
    let cols = match layer.experts.as_ref().and_then(|x| x.find(first)) {
        Some(_) => spec.hidden,
        None => layer.linear(first).weight.dim(1)?,
    };
    let mut w_mean = search::WMean::new(cols, group);
    let mut absmax = vec![0f32; cols];
    let mut held: Option<(usize, crate::model::experts::Expert)> = None;
    for n in &g.linears {
        crate::interrupt::check()?;
        let found = layer.experts.as_ref().and_then(|x| x.find(n));
        let w = match found {
            Some((e, k)) => {
                if held.as_ref().is_none_or(|(h, _)| *h != e) {
                    held = Some((e, layer.expert(spec, e)?));
                }
                &held.as_ref().expect("read above").1[k].weight
            }
            None => &layer.linear(n).weight,
        };
        w_mean.add(w)?;
        search::col_absmax_into(&mut absmax, w)?;
    }
    Ok((w_mean.finish(), absmax))
}

/// An expert that sees fewer calibration tokens than this keeps the identity scale for its down
/// group and is not clipped: plain round-to-nearest, named in the report. A handful of tokens
/// would fit the scales and clip values to noise (and none would divide by zero).
pub(super) const MIN_EXPERT_TOKENS: usize = 16;

/// Tokens per piece of the capturing forward and of the search's module runs (rounded to whole
/// sequences). The capture's last piece tops a layer's memory (its intermediates on top of the
/// full capture buffers): 2048 rather than 4096 took the 2-layer SmolLM2 case from 445 to
/// 410 MB peak at the same wall time, and the 7B-shaped layer's phases did not move.
pub(super) const PIECE_TOKENS: usize = 2048;

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
    let picked: Vec<usize> = (0..blocks).step_by(stride).collect();
    crate::calib::held_out::select(x, seqlen, &picked)
}

/// AWQ-SPEC §5: prev op ÷ s, scaled linears' input columns × s (the captured input is divided
/// by [`scaled_input`]).
pub(super) fn apply_scales(
    spec: &ModelSpec,
    layer: &mut LayerWeights,
    g: &ScaleGroup,
    s: &[f32],
) -> Result<()> {
    if s.iter().all(|v| *v == 1.0) {
        return Ok(());
    }
    let n = s.len();
    let st = Tensor::from_slice(s, n, &candle_core::Device::Cpu)?;
    match g.prev {
        PrevOp::Norm(name) => {
            layer.norm_mut(name).divide(spec.norm, &st)?;
            for router in &g.compensate {
                let r = layer.router_mut(router);
                r.weight = r.weight.broadcast_mul(&st)?;
            }
        }
        PrevOp::Linear(name) => {
            let prev = layer.linear_mut(name);
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
    let streamed = streamed_experts(layer, g);
    let held: Vec<&str> = (g.linears.iter().copied())
        .filter(|n| !is_streamed(layer, n))
        .collect();
    for name in held {
        let lin = layer.linear_mut(name);
        lin.weight = lin.weight.broadcast_mul(&st)?;
    }
    if let Some(experts) = layer.experts.as_mut().filter(|_| streamed) {
        experts.scale_inputs(s);
    }
    Ok(())
}

/// A captured input `x: [tokens, in]` as the scaled linears see it: `x ÷ s` per column
/// (AWQ-SPEC §5). Elementwise, so dividing some rows gives the same bits as dividing all.
pub(super) fn scaled_input(x: &Tensor, s: &[f32]) -> Result<Tensor> {
    if s.iter().all(|v| *v == 1.0) {
        return Ok(x.clone());
    }
    let st = Tensor::from_slice(s, s.len(), &candle_core::Device::Cpu)?;
    Ok(x.broadcast_div(&st)?)
}

pub(super) fn group_absmax(w: &Tensor, group: usize) -> Result<Vec<f32>> {
    Ok(w.flatten_all()?
        .to_vec1::<f32>()?
        .chunks(group)
        .map(|g| g.iter().fold(0f32, |a, x| a.max(x.abs())))
        .collect())
}

/// One linear's packed tensors (+bias): from `codes` (error-feedback rounding) when given,
/// else by round-to-nearest. A non-finite weight or `scales` value after scaling is refused
/// here, never written. Biases (like every float tensor) are staged in f32 and converted to
/// the output dtype when the shards are written (`--dtype auto` decides once every layer's
/// activations are known).
pub(super) fn linear_tensors(
    name: &str,
    lin: &Linear,
    p: &str,
    opts: &QuantizeOptions,
    codes: Option<rtn::Quantized>,
) -> Result<Vec<OutTensor>> {
    let mut out = Vec::new();

    let (rows, cols) = lin.weight.dims2()?;
    let w = lin.weight.flatten_all()?.to_vec1::<f32>()?;
    if let Some(bad) = w.iter().position(|v| !v.is_finite()) {
        return Err(Error::Runtime(format!(
            "{p}.{name}.weight has a non-finite value at index {bad} after scaling; nothing was \
                 written — rerun with --no-search to quantize without AWQ scales"
        )));
    }
    let q = match codes {
        Some(q) => q,
        None => rtn::quantize_f16(&w, rows, cols, opts.group),
    };
    let packed = pack(&q, opts.layout)?;
    let prefix = format!("{p}.{name}");
    if let Some(bad) = packed.scales.iter().position(|v| !v.is_finite()) {
        return Err(Error::Runtime(format!(
            "{prefix}.scales: group scale {bad} is not finite in float16 (the weights exceed \
                 float16's range after scaling); nothing was written — rerun with --no-search"
        )));
    }
    let [w, z, s] = opts.layout.tensor_names().map(|t| format!("{prefix}.{t}"));
    out.push(OutTensor::i32(
        w,
        packed.qweight_shape.to_vec(),
        &packed.qweight,
    ));
    out.push(OutTensor::i32(
        z,
        packed.qzeros_shape.to_vec(),
        &packed.qzeros,
    ));
    if opts.layout.is_awq() {
        out.push(OutTensor::f16_bits(
            s,
            packed.scales_shape.to_vec(),
            &packed.scales,
        ));
    } else {
        // compressed-tensors keeps the scales in the model's float dtype: staged in f32
        // (the float16 values exactly), written in the dtype chosen at the end.
        let values: Vec<f32> = packed.scales.iter().map(|v| v.to_f32()).collect();
        let t = candle_core::Tensor::from_vec(
            values,
            packed.scales_shape.to_vec(),
            &candle_core::Device::Cpu,
        )?;
        out.push(OutTensor::f32(s, &t)?);
        let shape = [rows as i64, cols as i64];
        out.push(OutTensor::i64(
            format!("{prefix}.{}", crate::quant::pack_quantized::SHAPE_TENSOR),
            vec![2],
            &shape,
        ));
    }
    if let Some(b) = &lin.bias {
        out.push(OutTensor::f32(format!("{prefix}.bias"), b)?);
    }
    Ok(out)
}

/// The layer's float tensors: routers, then norms.
pub(super) fn float_tensors(layer: &LayerWeights, p: &str) -> Result<Vec<OutTensor>> {
    let mut out = Vec::new();
    for (name, router) in &layer.routers {
        out.push(OutTensor::f32(
            format!("{p}.{name}.weight"),
            &router.weight,
        )?);
    }
    for (name, norm) in &layer.norms {
        out.push(OutTensor::f32(format!("{p}.{name}.weight"), &norm.weight)?);
        if let Some(b) = &norm.bias {
            out.push(OutTensor::f32(format!("{p}.{name}.bias"), b)?);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::groups::scale_groups;
    use crate::model::layer::{Linear, Norm};
    use candle_core::Device;

    fn random(n: usize, rng: &mut crate::calib::SplitMix64, center: f32) -> Tensor {
        let v: Vec<f32> = (0..n)
            .map(|_| center + ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.4)
            .collect();
        Tensor::from_vec(v, n, &Device::Cpu).unwrap()
    }

    /// A layer of `spec` with random weights, biases and norm parameters (norm weights around
    /// 1, or around 0 for `(1 + w)` norms).
    fn random_layer(spec: &ModelSpec, seed: u64) -> LayerWeights {
        let mut rng = crate::calib::SplitMix64::new(seed);
        let center = match spec.norm {
            crate::model::arch::NormKind::RmsOnePlus => 0.0,
            _ => 1.0,
        };
        let norms = spec
            .layer_norms()
            .into_iter()
            .map(|(name, w)| {
                let weight = random(w, &mut rng, center);
                let bias = spec.norm_has_bias(name).then(|| random(w, &mut rng, 0.0));
                (name, Norm { weight, bias })
            })
            .collect();
        let linears = spec
            .linears()
            .into_iter()
            .map(|l| {
                let weight = random(l.out * l.inp, &mut rng, 0.0)
                    .reshape((l.out, l.inp))
                    .unwrap();
                let bias = l.bias.then(|| random(l.out, &mut rng, 0.0));
                (l.name, Linear { weight, bias })
            })
            .collect();
        let routers = spec
            .router_linears()
            .into_iter()
            .map(|l| {
                let weight = random(l.out * l.inp, &mut rng, 0.0)
                    .reshape((l.out, l.inp))
                    .unwrap();
                (l.name, Linear { weight, bias: None })
            })
            .collect();
        let verbatim = spec
            .layer_verbatim()
            .into_iter()
            .map(|(name, w)| (name, random(w, &mut rng, 0.0)))
            .collect();
        LayerWeights {
            index: 0,
            norms,
            linears,
            routers,
            verbatim,
            experts: None,
        }
    }

    fn spec_of(arch: &str, extra: serde_json::Value) -> ModelSpec {
        let mut v = serde_json::json!({
            "architectures": [arch], "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 8, "head_dim": 16,
            "max_position_embeddings": 64
        });
        for (k, val) in extra.as_object().unwrap() {
            v[k] = val.clone();
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, v.to_string()).unwrap();
        crate::model::load_spec(&path).unwrap()
    }

    /// AWQ-SPEC §5: folding any positive scales into every group leaves the layer's function
    /// unchanged, for every family — `(1 + w)` norms, LayerNorms with bias, biased v rows of
    /// q/k/v or a fused qkv, the up rows of a fused gate_up, a parallel block, and MoE routers
    /// (the routing stays the same only because the routers absorb the scales too).
    #[test]
    fn folding_scales_keeps_every_family_exact() {
        for (arch, extra) in [
            (
                "LlamaForCausalLM",
                serde_json::json!({"attention_bias": true, "mlp_bias": true}),
            ),
            ("Qwen3ForCausalLM", serde_json::json!({})),
            ("GemmaForCausalLM", serde_json::json!({})),
            (
                "Gemma2ForCausalLM",
                serde_json::json!({"sliding_window": 8}),
            ),
            ("Gemma3ForCausalLM", serde_json::json!({})),
            ("Phi3ForCausalLM", serde_json::json!({})),
            (
                "StableLmForCausalLM",
                serde_json::json!({"use_qkv_bias": true}),
            ),
            (
                "StableLmForCausalLM",
                serde_json::json!({"use_parallel_residual": true}),
            ),
            ("Starcoder2ForCausalLM", serde_json::json!({})),
            ("CohereForCausalLM", serde_json::json!({})),
            (
                "GraniteForCausalLM",
                serde_json::json!({"residual_multiplier": 0.3}),
            ),
        ] {
            let spec = spec_of(arch, extra);
            let groups = scale_groups(&spec);
            assert!(
                groups.iter().any(|g| g.name == "o"),
                "{arch}: MHA has the v→o group"
            );
            let mut layer = random_layer(&spec, 7);
            let rope = Rope::new(&spec, 16).unwrap();
            let h = random(32 * 64, &mut crate::calib::SplitMix64::new(3), 0.0)
                .reshape((32, 64))
                .unwrap();
            let (before, inputs) = layer.forward(&spec, &rope, &h, 16, true).unwrap();
            let mut inputs = inputs.unwrap();
            let mut rng = crate::calib::SplitMix64::new(11);
            for g in &groups {
                let n = layer.linear(g.linears[0]).weight.dim(1).unwrap();
                let s: Vec<f32> = random(n, &mut rng, 1.0)
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.powi(4)) // 0.4 .. 2.1
                    .collect();
                apply_scales(&spec, &mut layer, g, &s).unwrap();
                let x = scaled_input(inputs.get(g.input), &s).unwrap();
                inputs.set(g.input, x);
            }
            let (after, scaled) = layer.forward(&spec, &rope, &h, 16, true).unwrap();
            let scaled = scaled.unwrap();
            assert_eq!(scaled.routing, inputs.routing, "{arch}: routing changed");
            let diff = (&after - &before)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            let scale = before.abs().unwrap().max_all().unwrap();
            let (diff, scale) = (
                diff.to_scalar::<f32>().unwrap(),
                scale.to_scalar::<f32>().unwrap(),
            );
            assert!(
                diff <= 1e-5 * scale,
                "{arch}: output moved by {diff} (max {scale})"
            );
            // The cached inputs were divided like the linears' inputs.
            for (kind, x) in scaled.iter() {
                let d = (x - inputs.get(kind))
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap();
                assert!(
                    d.to_scalar::<f32>().unwrap() < 1e-4,
                    "{arch}: {kind:?} input"
                );
            }
        }
    }
}

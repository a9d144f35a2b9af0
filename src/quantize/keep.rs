//! `--keep-fp16 PCT`: an fp16 budget for the linears whose quantization hurts most.
//!
//! Why measured, not guessed: "keep the salient 1 % in fp16" is AWQ's motivation, but the format
//! can only keep whole modules, and loaders honour that through `modules_to_not_convert`. So each
//! dense layer measures, on the guard's blocks and through the next norm (the guard's measure),
//! how much the layer's output error drops when one unit (vLLM's merged `qkv_proj` or
//! `gate_up_proj`, or a single linear) stays in float while the rest is quantized as it will be
//! written. At the end the units with the largest drop per extra byte are kept until the
//! checkpoint has grown by the budget, a percentage of the all-quantized checkpoint's size
//! (greedy by drop per byte, skipping a unit that no longer fits).
//!
//! Nothing is held back for this while the layers stream: a kept unit's float weight is the
//! source weight with the layer's chosen AWQ scales folded (the previous op was divided by
//! them) and without clipping, so the part files store each layer's applied scales and the
//! weight is rebuilt from the checkpoint at the end.

use std::path::PathBuf;

use candle_core::Tensor;

use super::guard::{quantized, Guard};
use super::layer::apply_scales;
use super::report::LayerReport;
use crate::error::{Error, Result};
use crate::io::reader::Checkpoint;
use crate::io::writer::{self, OutTensor};
use crate::model::config::AwqFormat;
use crate::model::groups::scale_groups;
use crate::model::layer::{packed_shapes, LayerWeights};
use crate::model::Model;
use crate::quant::pack::Layout;

/// One unit of a layer, measured.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Fp16Candidate {
    /// The unit's module name relative to the layer (`self_attn.qkv_proj`, `mlp.down_proj`).
    pub unit: String,
    /// How much the layer's output error (the guard's measure: mean squared error through the
    /// next norm) drops when this unit alone stays in float.
    pub error_drop: f64,
    /// Bytes the checkpoint grows by when it is kept: float16 weights minus packed tensors.
    pub extra_bytes: u64,
}

/// What the budget kept, for the report and the card.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeptFp16 {
    /// `--keep-fp16`, percent of the all-quantized checkpoint.
    pub budget_pct: f64,
    /// The all-quantized checkpoint's tensor bytes, and the budget in bytes.
    pub quantized_bytes: u64,
    pub budget_bytes: u64,
    /// Bytes the kept units add.
    pub extra_bytes: u64,
    /// Kept units, full names in checkpoint order: a merged unit by vLLM's merged name
    /// (`model.layers.23.self_attn.qkv_proj`, whose linears are q/k/v_proj in a Llama
    /// checkpoint), any other by its linear's (`model.layers.29.mlp.down_proj`).
    pub units: Vec<String>,
    /// The kept linears, full names.
    pub linears: Vec<String>,
    /// The `modules_to_not_convert` entries written for them: each linear, plus the merged
    /// module's name for older vLLM, which matches entries against the merged module only.
    pub entries: Vec<String>,
}

/// Name of the part tensor holding scale group `k`'s applied scales (absent when the group's
/// scales were not applied: the guard reverted it).
fn scales_tensor(i: usize, k: usize) -> String {
    // A name inside the part files only (never written to the shards), so it needs no root.
    format!("model.layers.{i}.awq_search_scales.{k}")
}

/// The part tensors that carry a layer's applied scales to the end of the run (never copied
/// into the shards: those hold only the names the layer lists).
pub(super) fn scales_tensors(
    i: usize,
    scales: &[Vec<f32>],
    applied: &[bool],
) -> Result<Vec<OutTensor>> {
    scales
        .iter()
        .zip(applied)
        .enumerate()
        .filter(|(_, (_, on))| **on)
        .map(|(k, (s, _))| {
            let t = Tensor::from_slice(s, s.len(), &candle_core::Device::Cpu)?;
            OutTensor::f32(scales_tensor(i, k), &t)
        })
        .collect()
}

/// Measures every unit of a dense layer: `layer` is what will be written (scaled and clipped,
/// before quantization), `float` the same layer scaled but unclipped (what a kept unit holds).
/// `base` is `layer`'s own error when the guard already measured it (its `chosen`).
pub(super) fn measure(
    guard: &Guard,
    fmt: AwqFormat,
    layer: &LayerWeights,
    float: &LayerWeights,
    base: Option<f64>,
) -> Result<Vec<Fp16Candidate>> {
    let all = quantized(layer.clone(), fmt.group)?;
    // Absolute, as the next layer reads it. Measured on SmolLM2 (group 64, --fast, 3 %):
    // relative to the output's mean square, the ranking moved to early layers and the
    // perplexity was 19.05 instead of 18.95.
    let base = match base {
        Some(e) => e,
        None => guard.error(&all)?,
    };
    guard
        .spec
        .keep_units()
        .into_iter()
        .map(|unit| {
            let mut v = all.clone();
            let mut extra = 0;
            for name in &unit.linears {
                let w = float.linear(name).weight.clone();
                let (out, inp) = w.dims2()?;
                extra += extra_bytes(out, inp, fmt)?;
                v.linear_mut(name).weight = w;
            }
            Ok(Fp16Candidate {
                unit: unit.name.to_string(),
                error_drop: (base - guard.error(&v)?).max(0.0),
                extra_bytes: extra,
            })
        })
        .collect()
}

/// float16 bytes of an `[out, in]` weight minus its packed tensors' bytes.
fn extra_bytes(out: usize, inp: usize, fmt: AwqFormat) -> Result<u64> {
    let [qw, qz, sc] = packed_shapes(out, inp, fmt)?;
    let packed = 4 * qw[0] * qw[1] + 4 * qz[0] * qz[1] + 2 * sc[0] * sc[1];
    Ok((2 * out * inp).saturating_sub(packed) as u64)
}

/// The units to keep: greedy by error drop per extra byte (ties: checkpoint order), skipping a
/// unit that no longer fits in `budget` bytes or does not lower the error. Returns
/// `(layer, candidate)` pairs in checkpoint order.
pub fn select(layers: &[(usize, Vec<Fp16Candidate>)], budget: u64) -> Vec<(usize, &Fp16Candidate)> {
    // (layer, position in the layer, candidate): checkpoint order.
    let mut all: Vec<(usize, usize, &Fp16Candidate)> = layers
        .iter()
        .flat_map(|(i, c)| c.iter().enumerate().map(move |(k, c)| (*i, k, c)))
        .filter(|(_, _, c)| c.error_drop > 0.0 && c.extra_bytes > 0)
        .collect();
    let per_byte = |c: &Fp16Candidate| c.error_drop / c.extra_bytes as f64;
    // A stable sort keeps checkpoint order among equal ratios.
    all.sort_by(|a, b| per_byte(b.2).total_cmp(&per_byte(a.2)));
    let mut used = 0;
    let mut kept = Vec::new();
    for (i, k, c) in all {
        if used + c.extra_bytes <= budget {
            used += c.extra_bytes;
            kept.push((i, k, c));
        }
    }
    kept.sort_by_key(|(i, k, _)| (*i, *k));
    kept.into_iter().map(|(i, _, c)| (i, c)).collect()
}

/// Applies the budget at the end of the run: selects the units, writes their float weights
/// (staged in f32 like every float tensor) to a part of their own, and replaces their packed
/// tensors by `.weight` in `names`. `parts` gains the new part.
pub(super) fn apply(
    pct: f64,
    layout: Layout,
    model: &Model,
    reports: &[LayerReport],
    staged_parts: &std::path::Path,
    parts: &mut Vec<PathBuf>,
    names: &mut Vec<String>,
) -> Result<KeptFp16> {
    let ckpt = Checkpoint::open_files(parts.clone())?;
    let quantized_bytes = names
        .iter()
        .map(|n| Ok(writer::written_size(ckpt.meta(n)?)))
        .sum::<Result<u64>>()?;
    let budget_bytes = (quantized_bytes as f64 * pct / 100.0) as u64;
    let measured: Vec<(usize, Vec<Fp16Candidate>)> = reports
        .iter()
        .filter_map(|r| Some((r.layer, r.fp16_candidates.clone()?)))
        .collect();
    let units = model.spec.keep_units();
    let mut kept = KeptFp16 {
        budget_pct: pct,
        quantized_bytes,
        budget_bytes,
        extra_bytes: 0,
        units: Vec::new(),
        linears: Vec::new(),
        entries: Vec::new(),
    };
    let mut tensors = Vec::new();
    // The selection is in checkpoint order: a layer with several kept units is rebuilt once.
    let mut layer: Option<(usize, LayerWeights)> = None;
    for (i, c) in select(&measured, budget_bytes) {
        let unit = units
            .iter()
            .find(|u| u.name == c.unit)
            .ok_or_else(|| Error::Runtime(format!("unknown unit {} in a layer record", c.unit)))?;
        if layer.as_ref().is_none_or(|(at, _)| *at != i) {
            layer = Some((i, scaled_layer(model, &ckpt, i)?));
        }
        let layer = &layer.as_ref().expect("just built").1;
        let p = model.spec.roots.layer(i);
        for lin in &unit.linears {
            let prefix = format!("{p}.{lin}");
            unpacked(names, &prefix, layout)?;
            tensors.push(OutTensor::f32(
                format!("{prefix}.weight"),
                &layer.linear(lin).weight,
            )?);
            kept.entries.push(model.keep_entry(&prefix));
            kept.linears.push(prefix);
        }
        if unit.linears.len() > 1 {
            kept.entries
                .push(model.keep_entry(&format!("{p}.{}", unit.name)));
        }
        kept.units.push(format!("{p}.{}", unit.name));
        kept.extra_bytes += c.extra_bytes;
    }
    drop(ckpt);
    if !tensors.is_empty() {
        let part = staged_parts.join("keep-fp16.safetensors");
        writer::write_file(&part, &tensors)?;
        parts.push(part);
    }
    Ok(kept)
}

/// Layer `i` from the checkpoint with the scales its part recorded folded in (unclipped).
fn scaled_layer(model: &Model, parts: &Checkpoint, i: usize) -> Result<LayerWeights> {
    let mut layer = model.layer(i)?;
    for (k, g) in scale_groups(&model.spec).iter().enumerate() {
        let name = scales_tensor(i, k);
        if let Ok(m) = parts.meta(&name) {
            let s = parts.f32(&name, &m.shape)?.to_vec1()?;
            apply_scales(&model.spec, &mut layer, g, &s)?;
        }
    }
    Ok(layer)
}

/// In the output's tensor list, linear `prefix`'s packed tensors become its `.weight`.
fn unpacked(names: &mut Vec<String>, prefix: &str, layout: Layout) -> Result<()> {
    let [w, z, s] = layout.tensor_names().map(|t| format!("{prefix}.{t}"));
    let shape = format!("{prefix}.{}", crate::quant::pack_quantized::SHAPE_TENSOR);
    let at = names
        .iter()
        .position(|n| *n == w)
        .ok_or_else(|| Error::Runtime(format!("{w} is not in the parts")))?;
    names[at] = format!("{prefix}.weight");
    names.retain(|n| *n != z && *n != s && *n != shape);
    Ok(())
}

/// A warning when the budget kept nothing, with the smallest unit's size (the budget that
/// would keep one).
pub(super) fn nothing_kept(kept: &KeptFp16, reports: &[LayerReport]) -> Option<String> {
    if !kept.units.is_empty() {
        return None;
    }
    let smallest = reports
        .iter()
        .flat_map(|r| r.fp16_candidates.iter().flatten())
        .filter(|c| c.error_drop > 0.0)
        .map(|c| c.extra_bytes)
        .min();
    Some(match smallest {
        Some(b) => format!(
            "--keep-fp16 {}%: nothing was kept — the budget is {:.2} MB and the smallest unit \
             adds {:.2} MB ({:.2}% of the checkpoint); every linear is quantized",
            kept.budget_pct,
            kept.budget_bytes as f64 / 1e6,
            b as f64 / 1e6,
            100.0 * b as f64 / kept.quantized_bytes.max(1) as f64
        ),
        None => format!(
            "--keep-fp16 {}%: nothing was kept — no unit lowered its layer's output error",
            kept.budget_pct
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(unit: &str, drop: f64, bytes: u64) -> Fp16Candidate {
        Fp16Candidate {
            unit: unit.into(),
            error_drop: drop,
            extra_bytes: bytes,
        }
    }

    #[test]
    fn select_takes_the_largest_drop_per_byte_that_fits() {
        let layers = vec![
            (0, vec![c("a", 10.0, 10), c("b", 1.0, 10)]),
            (1, vec![c("c", 30.0, 20), c("d", 0.0, 1), c("e", 5.0, 2)]),
        ];
        let units = |budget| -> Vec<(usize, String)> {
            select(&layers, budget)
                .into_iter()
                .map(|(i, c)| (i, c.unit.clone()))
                .collect()
        };
        // Per byte: e 2.5, c 1.5, a 1.0, b 0.1; d lowers nothing.
        assert_eq!(units(22), vec![(1, "c".into()), (1, "e".into())]);
        // c does not fit in 12: e, then a.
        assert_eq!(units(12), vec![(0, "a".into()), (1, "e".into())]);
        assert!(units(1).is_empty());
        assert_eq!(units(1000).len(), 4);
    }
}

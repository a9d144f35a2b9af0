//! `--rounding gptq`: error-feedback codes for the layer that the scales, clipping and guard
//! chose (see `quant::gptq`). Each linear's `H = XᵀX` comes from its captured input after
//! scaling; where the guard reverted a group, the linear saw `X·diag(s)` and H becomes
//! `diag(s)·H·diag(s)`. Per linear, error feedback is kept only when its calibration loss is
//! lower than round-to-nearest's: never worse than today's codes on the linear's own input.
//! Experts of a MoE layer keep round-to-nearest (a Gram matrix per expert would cost more
//! memory than the layer).

use std::collections::HashMap;

use candle_core::Tensor;

use super::guard::Searched;
use crate::error::Result;
use crate::model::arch::Input;
use crate::model::config::ModelSpec;
use crate::model::layer::LayerWeights;
use crate::quant::gptq;
use crate::quant::rtn::{quantize_f16, Quantized};

/// Per linear: the calibration loss `Σ (w − ŵ) H (w − ŵ)ᵀ` of both roundings and which was kept.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RoundingReport {
    pub linear: String,
    pub rtn_loss: f64,
    pub gptq_loss: f64,
    pub gptq_kept: bool,
}

/// `XᵀX` (f64, `[in, in]` row-major) of the scaled captured input `x` of kind `input`, when a
/// non-expert linear reads it (`None` otherwise).
pub(super) fn gram(spec: &ModelSpec, input: Input, x: &Tensor) -> Result<Option<Vec<f64>>> {
    let dense = spec
        .linears()
        .iter()
        .any(|l| l.input == input && l.expert.is_none());
    match dense {
        true => Ok(Some(crate::quant::search::Gram::new(x)?.to_f64()?)),
        false => Ok(None),
    }
}

/// The codes of the non-expert linears of `layer`: error feedback where it beats
/// round-to-nearest, round-to-nearest elsewhere.
/// `applied[k]` says whether group `k`'s scales (of `searched`) are in `layer` (the guard may
/// revert some).
pub(super) fn gptq_codes(
    spec: &ModelSpec,
    layer: &LayerWeights,
    grams: &[(Input, Vec<f64>)],
    searched: &Searched,
    applied: &[bool],
    group: usize,
) -> Result<(HashMap<&'static str, Quantized>, Vec<RoundingReport>)> {
    let mut codes = HashMap::new();
    let mut reports = Vec::new();
    // Linears that read the same input under the same scales share H and its factor.
    let mut factors: Vec<(FactorKey, Vec<f64>, gptq::Factor)> = Vec::new();
    for l in spec.linears().iter().filter(|l| l.expert.is_none()) {
        let Some((_, h)) = grams.iter().find(|(k, _)| *k == l.input) else {
            continue;
        };
        let reverted = searched
            .groups
            .iter()
            .zip(applied)
            .position(|(g, on)| !on && g.linears.contains(&l.name));
        let key = (l.input, reverted);
        if !factors.iter().any(|(k, _, _)| *k == key) {
            let h = match reverted {
                Some(k) => rescaled(h, &searched.scales[k]),
                None => h.clone(),
            };
            let f = gptq::Factor::new(&h, l.inp)?;
            factors.push((key, h, f));
        }
        let (_, h, factor) = factors
            .iter()
            .find(|(k, _, _)| *k == key)
            .expect("just added");
        let w = layer
            .linear(l.name)
            .weight
            .flatten_all()?
            .to_vec1::<f32>()?;
        let rtn = quantize_f16(&w, l.out, l.inp, group);
        let q = gptq::quantize(&w, l.out, l.inp, group, factor)?;
        let rtn_loss = gptq::loss(&w, &rtn.dequantize(), l.out, l.inp, h)?;
        let gptq_loss = gptq::loss(&w, &q.dequantize(), l.out, l.inp, h)?;
        let kept = gptq_loss < rtn_loss;
        // Either way the codes are final: packing does not round this linear again.
        codes.insert(l.name, if kept { q } else { rtn });
        reports.push(RoundingReport {
            linear: l.name.to_string(),
            rtn_loss,
            gptq_loss,
            gptq_kept: kept,
        });
    }
    Ok((codes, reports))
}

/// A linear's input kind and the scale group the guard reverted on it, if any: linears with
/// the same key share H.
type FactorKey = (Input, Option<usize>);

/// `diag(s)·H·diag(s)`.
fn rescaled(h: &[f64], s: &[f32]) -> Vec<f64> {
    let n = s.len();
    let mut out = h.to_vec();
    for i in 0..n {
        for j in 0..n {
            out[i * n + j] *= s[i] as f64 * s[j] as f64;
        }
    }
    out
}

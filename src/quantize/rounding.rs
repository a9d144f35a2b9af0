//! `--rounding auto|gptq`: error-feedback codes for the layer that the scales, clipping and
//! guard chose (see `quant::gptq`). Each linear's `H = XᵀX` comes from its captured input after
//! scaling; where the guard reverted a group, the linear saw `X·diag(s)` and H becomes
//! `diag(s)·H·diag(s)`.
//!
//! What the codes approximate is the scaled weight *before* clipping: the clip is part of the
//! quantization error, and the loss `Σ (w − ŵ) H (w − ŵ)ᵀ` is measured against that weight. Error
//! feedback walks from it onto the clipped weights' grid (group scales and zero points,
//! round-to-nearest's of the clipped weights, fixed before the walk), so a clipped weight's error
//! is fed back like a rounding error while the clip search's finer range stays. Measured on
//! SmolLM2 (group 64, WikiText-2 perplexity; docs/quality.md): walking from the clipped weights,
//! as before, fed no clip error back (layer 0's o_proj: held-out loss 7.58 against 2.27 from the
//! unclipped weights; 10.55 rounded to nearest). Walking onto the unclipped weights' own grid
//! instead (the clip dropped) gained more with WikiText-2 calibration but lost badly with the
//! embedded corpus (19.466 against 18.781), where the clipped grid gained (18.703). With few
//! calibration tokens the walk still starts from the clipped weights
//! ([`MIN_TOKENS_FROM_UNCLIPPED`]).
//!
//! `gptq` keeps error feedback where its loss on every calibration block is lower than
//! round-to-nearest's, which it nearly always is: it minimises that loss, and with few tokens
//! it fits their noise. `auto` asks whether it generalises ([`crate::calib::held_out`]): error
//! feedback fitted on the fit blocks' `H` must score lower on the held-out blocks' `H` than
//! round-to-nearest (by [`AUTO_MARGIN`]), and the linear must have [`MIN_TOKENS_PER_INPUT`]
//! calibration tokens per input dimension; where both hold, the codes written are fitted on
//! every block. Experts of a MoE layer keep round-to-nearest (a Gram matrix per expert would
//! cost more memory than the layer).

use std::collections::HashMap;

use candle_core::Tensor;

use super::guard::Searched;
use super::Rounding;
use crate::error::Result;
use crate::model::arch::Input;
use crate::model::config::ModelSpec;
use crate::model::layer::LayerWeights;
use crate::model::shapes::LinearShape;
use crate::quant::gptq;
use crate::quant::rtn::{quantize_f16, Quantized};

/// `--rounding auto` considers error feedback only for a linear whose calibration holds at
/// least this many tokens per input dimension (`--rounding gptq` warns below it, for the widest
/// linear). Below it `XᵀX` is rank-deficient or nearly so, and the held-out blocks, drawn from
/// the same calibration text, do not see the overfit: on SmolLM2 with 8 × 128 calibration
/// tokens (768 fit, 256 held out), a first `auto` without this rule (and with the searches on
/// the fit blocks only) kept error feedback on 107 of 210 linears, lowered the held-out KL of
/// the end-to-end check (0.218 → 0.189) and raised the WikiText-2 perplexity from 19.73 to
/// 20.74. 16 384 tokens (10.7 per dimension of the widest input) lowered it on every cell of
/// the README's matrix.
pub const MIN_TOKENS_PER_INPUT: usize = 4;

/// Whether `auto` judges a linear of input `width` with `tokens` calibration tokens (every
/// block's): [`MIN_TOKENS_PER_INPUT`] per input dimension. Only then are the held-out blocks'
/// Gram matrices made ([`InputGram::held`]).
pub fn judges(tokens: usize, width: usize) -> bool {
    tokens >= MIN_TOKENS_PER_INPUT * width
}

/// Whether `auto` judges a linear of input `width` in a layer of `layer` before a run, as the
/// run will: in a dense layer (the held-out split is made for those only), with held-out
/// blocks (`split`) and [`judges`]'s tokens.
pub fn auto_judges(layer: &ModelSpec, split: bool, tokens: usize, width: usize) -> bool {
    layer.moe.is_none() && split && judges(tokens, width)
}

/// Error feedback walks from the unclipped weights only where the calibration holds at least
/// this many tokens (every block's, whatever the linear's width), and from the clipped ones
/// below (the loss is measured against the unclipped weights either way). Feeding a clip's
/// error back spreads it, larger than a rounding error, along the calibration's `XᵀX`; with
/// little text from another domain than the evaluation's, that fits the calibration. Measured
/// on SmolLM2 (group 64, `--fast`, WikiText-2 perplexity; docs/quality.md): with the embedded
/// corpus's 13 blocks of 512 (6656 tokens; `--n-samples 32`, the README's first run) walking
/// from the unclipped weights raised it on two of three draws of documents (`--seed` 42:
/// 18.955 → 19.349; 1: 18.998 → 19.242; 2: 19.270 → 19.207); with 32 blocks of the same corpus
/// (16 384 tokens) it lowered it (18.952 → 18.886), with 56 too (18.781 → 18.703), and on
/// every cell of the README's matrix (32 blocks of WikiText-2). What separates them is the
/// calibration's size, not its tokens per input dimension: 1536-wide inputs at 10.7 tokens per
/// dimension gained where 576-wide ones at 11.6 lost. 13 blocks of WikiText-2 text, evaluated
/// on WikiText-2, gained (18.540 → 18.306): in the evaluation's domain even little text
/// generalises, which a user's calibration cannot promise. Above the threshold one cell lost on
/// the 8192-token evaluation, the embedded corpus's 56 blocks with the exact search (18.685 →
/// 18.728), and gained on its first 65 536 tokens (23.392 → 23.261).
pub const MIN_TOKENS_FROM_UNCLIPPED: usize = 16_384;

/// Whether error feedback walks from the weights before clipping with `tokens` calibration
/// tokens ([`MIN_TOKENS_FROM_UNCLIPPED`]): the run's choice, the plan's and the report's.
pub fn walks_from_unclipped(tokens: usize) -> bool {
    tokens >= MIN_TOKENS_FROM_UNCLIPPED
}

/// Where the walk starts, in the plan's and the summary's words ([`walks_from_unclipped`]).
pub fn start_words(from_unclipped: bool) -> String {
    match from_unclipped {
        true => "the weights before clipping".into(),
        false => format!(
            "the clipped weights (fewer than {MIN_TOKENS_FROM_UNCLIPPED} calibration tokens)"
        ),
    }
}

/// Where error feedback's walk starts, as the resume fingerprint records it (see
/// [`MIN_TOKENS_FROM_UNCLIPPED`]).
pub fn start() -> String {
    format!("unclipped from {MIN_TOKENS_FROM_UNCLIPPED} calibration tokens")
}

/// How much lower error feedback's held-out loss must be than round-to-nearest's for
/// `--rounding auto` to keep it (a share of round-to-nearest's).
pub const AUTO_MARGIN: f64 = 0.0;

/// Per linear: the loss `Σ (w − ŵ) H (w − ŵ)ᵀ` (`w` the scaled weight before clipping) of both
/// roundings on every calibration block, and for `auto` on the held-out blocks, error feedback
/// fitted without them (`None` where it was not judged: other methods, no split, too few
/// tokens); and which was kept.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RoundingReport {
    /// The linear's name within its layer (`mlp.down_proj`).
    pub linear: String,
    /// `null` where `auto` did not judge the linear: it makes no `XᵀX` there.
    pub rtn_loss: Option<f64>,
    /// `null` where error feedback was not fitted on every block (`auto`, where the held-out
    /// blocks did not choose it or it was not judged).
    pub gptq_loss: Option<f64>,
    /// Round-to-nearest's loss on the held-out blocks (`auto`, where it judged).
    #[serde(default)]
    pub held_out_rtn_loss: Option<f64>,
    /// Error feedback's, fitted without them (`auto`, where it judged).
    #[serde(default)]
    pub held_out_gptq_loss: Option<f64>,
    /// Whether the codes written are error feedback's.
    pub gptq_kept: bool,
}

/// The Gram matrices `XᵀX` (f64, `[in, in]` row-major) of one scaled captured input: of every
/// block, and for `auto` of the held-out blocks. `auto` makes them only for an input it judges
/// (the calibration was split and holds [`MIN_TOKENS_PER_INPUT`] tokens per input dimension).
#[derive(Clone)]
pub(super) struct InputGram {
    pub input: Input,
    pub all: Vec<f64>,
    pub held: Option<Vec<f64>>,
    /// Calibration tokens (rows) of every block that `all` sums over.
    pub tokens: usize,
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

/// The codes of the non-expert linears of `layer` (scaled and clipped): error feedback where
/// `rounding` keeps it (see the module doc), round-to-nearest elsewhere; `unclipped` is the
/// same layer before clipping (`None` where nothing was clipped), where error feedback starts.
/// `applied[k]` says whether group `k`'s scales (of `searched`) are in `layer` (the guard may
/// revert some). One input's matrices at a time: the Gram matrices of an input are moved in
/// (copied only where two keys read the same input), and each key's are dropped once its
/// linears are done, so a 7B-shaped down_proj (11 008 wide, 0.97 GB per f64 matrix) holds
/// at most about four of them.
#[allow(clippy::too_many_arguments)]
pub(super) fn gptq_codes(
    spec: &ModelSpec,
    layer: &LayerWeights,
    unclipped: Option<&LayerWeights>,
    grams: Vec<InputGram>,
    searched: &Searched,
    applied: &[bool],
    group: usize,
    rounding: Rounding,
) -> Result<(HashMap<&'static str, Quantized>, Vec<RoundingReport>)> {
    let shapes = spec.linears();
    let linears: Vec<&LinearShape> = shapes
        .iter()
        .filter(|l| l.expert.is_none() && grams.iter().any(|g| g.input == l.input))
        .collect();
    // Linears that read the same input under the same scales share H and its factors.
    let key_of = |l: &LinearShape| -> FactorKey {
        let reverted = (searched.groups.iter().zip(applied))
            .position(|(g, on)| !on && g.linears.contains(&l.name));
        (l.input, reverted)
    };
    let keys: Vec<FactorKey> = linears.iter().map(|l| key_of(l)).collect();
    let mut grams: Vec<Option<InputGram>> = grams.into_iter().map(Some).collect();
    let mut done: Vec<Option<(Quantized, RoundingReport)>> =
        (0..linears.len()).map(|_| None).collect();
    for (first, key) in keys.iter().enumerate() {
        if keys[..first].contains(key) {
            continue;
        }
        let members: Vec<usize> = (first..keys.len()).filter(|&k| keys[k] == *key).collect();
        let slot = (grams.iter())
            .position(|g| g.as_ref().is_some_and(|g| g.input == key.0))
            .expect("an input with a linear has its Gram matrices");
        // The last key of this input to be done takes its matrices; an earlier one copies them.
        let later = |k: &FactorKey| !keys[..=first].contains(k);
        let last = !keys[first + 1..].iter().any(|k| k.0 == key.0 && later(k));
        let g = match last {
            true => grams[slot].take().expect("present"),
            false => grams[slot].as_ref().expect("present").clone(),
        };
        let scales = key.1.map(|k| searched.scales[k].as_slice());
        let shapes: Vec<&LinearShape> = members.iter().map(|&k| linears[k]).collect();
        let results = key_codes(&shapes, layer, unclipped, g, scales, group, rounding)?;
        for (k, r) in members.into_iter().zip(results) {
            done[k] = Some(r);
        }
    }
    let mut codes = HashMap::new();
    let mut reports = Vec::new();
    let mut done = linears.iter().zip(done).peekable();
    for l in shapes.iter().filter(|l| l.expert.is_none()) {
        match done.next_if(|(m, _)| m.name == l.name) {
            Some((_, r)) => {
                let (q, report) = r.expect("every key was done");
                codes.insert(l.name, q);
                reports.push(report);
            }
            // `auto` made no matrix for an input it does not judge.
            None if rounding == Rounding::Auto => reports.push(RoundingReport::unjudged(l.name)),
            None => {}
        }
    }
    Ok((codes, reports))
}

impl RoundingReport {
    /// The record of a linear `auto` did not judge: round-to-nearest, nothing measured.
    fn unjudged(linear: &str) -> Self {
        RoundingReport {
            linear: linear.to_string(),
            rtn_loss: None,
            gptq_loss: None,
            held_out_rtn_loss: None,
            held_out_gptq_loss: None,
            gptq_kept: false,
        }
    }
}

/// The codes and reports of `linears`, which read one input under one set of scales (the
/// reverted group's `scales`, if any), from that input's Gram matrices `g`. `layer` holds the
/// weights as clipped, `unclipped` (where a clip was applied in this layer) the same scaled
/// weights before clipping: error feedback walks from those onto the clipped weights' grid, so
/// the clip's own error is fed back too (from the clipped weights below
/// [`MIN_TOKENS_FROM_UNCLIPPED`] calibration tokens), and every loss is measured
/// against them. `auto` first
/// judges each linear with error feedback fitted without the held-out blocks, and drops the
/// held-out matrix and that factor before it factors every block's `H` for the codes written.
fn key_codes(
    linears: &[&LinearShape],
    layer: &LayerWeights,
    unclipped: Option<&LayerWeights>,
    g: InputGram,
    scales: Option<&[f32]>,
    group: usize,
    rounding: Rounding,
) -> Result<Vec<(Quantized, RoundingReport)>> {
    let n = linears[0].inp;
    let under = |h: Vec<f64>| match scales {
        Some(s) => rescaled(h, s),
        None => h,
    };
    let all = under(g.all);
    // Present only where `auto` judges this input ([`judges`]).
    let held = g.held.map(under);
    let from_unclipped = walks_from_unclipped(g.tokens);
    let c = Targets::new(linears, layer, unclipped, from_unclipped, group)?;
    // `auto` wants error feedback where the held-out blocks choose it (both losses kept for the
    // report), `gptq` everywhere.
    let (wanted, held_losses): (Vec<bool>, Vec<Option<(f64, f64)>>) = match (rounding, held) {
        (Rounding::Auto, Some(h)) => {
            let fit = gptq::Factor::of(n, |i, j| all[i * n + j] - h[i * n + j])?;
            let judged = (0..linears.len())
                .map(|k| c.judge(k, &fit, &h, AUTO_MARGIN))
                .collect::<Result<Vec<_>>>()?;
            judged.iter().map(|j| (j.0, Some((j.1, j.2)))).unzip()
        }
        (Rounding::Gptq, _) => (vec![true; linears.len()], vec![None; linears.len()]),
        _ => (vec![false; linears.len()], vec![None; linears.len()]),
    };
    let factor = match wanted.contains(&true) {
        true => Some(gptq::Factor::new(&all, n)?),
        false => None,
    };
    let mut out = Vec::with_capacity(linears.len());
    for (k, choice) in wanted.into_iter().enumerate() {
        let rtn_loss = c.loss(k, &c.rtn[k], &all)?;
        let q = match (choice, &factor) {
            (true, Some(f)) => Some(c.feedback(k, f)?),
            _ => None,
        };
        let gptq_loss = q.as_ref().map(|q| c.loss(k, q, &all)).transpose()?;
        let kept = gptq_loss.is_some_and(|g| g < rtn_loss);
        let held = held_losses[k];
        // Either way the codes are final: packing does not round this linear again.
        out.push((
            q.filter(|_| kept).unwrap_or_else(|| c.rtn[k].clone()),
            RoundingReport {
                linear: linears[k].name.to_string(),
                rtn_loss: Some(rtn_loss),
                gptq_loss,
                held_out_rtn_loss: held.map(|h| h.0),
                held_out_gptq_loss: held.map(|h| h.1),
                gptq_kept: kept,
            },
        ));
    }
    Ok(out)
}

/// One input's linears, what their codes approximate (the unclipped weights) and
/// round-to-nearest's codes of the clipped ones.
struct Targets<'a> {
    linears: &'a [&'a LinearShape],
    /// Each linear's scaled weight before clipping (`[out, in]` row-major).
    targets: Vec<Vec<f32>>,
    /// The clipped weights, where error feedback walks from them instead (too few tokens,
    /// [`MIN_TOKENS_FROM_UNCLIPPED`]).
    starts: Option<Vec<Vec<f32>>>,
    /// Round-to-nearest of the clipped weights: AutoAWQ's codes, and the clipped grid.
    rtn: Vec<Quantized>,
    group: usize,
}

impl<'a> Targets<'a> {
    /// `unclipped`: the layer before clipping, if anything was clipped; `from_unclipped`:
    /// whether error feedback walks from it.
    fn new(
        linears: &'a [&'a LinearShape],
        layer: &LayerWeights,
        unclipped: Option<&LayerWeights>,
        from_unclipped: bool,
        group: usize,
    ) -> Result<Self> {
        let weight = |w: &LayerWeights, name: &str| -> Result<Vec<f32>> {
            Ok(w.linear(name).weight.flatten_all()?.to_vec1::<f32>()?)
        };
        let (mut targets, mut rtn, mut clipped) = (Vec::new(), Vec::new(), Vec::new());
        for l in linears {
            let w = weight(layer, l.name)?;
            rtn.push(quantize_f16(&w, l.out, l.inp, group));
            match unclipped {
                Some(u) => {
                    targets.push(weight(u, l.name)?);
                    // Kept only where the walk starts from it.
                    if !from_unclipped {
                        clipped.push(w);
                    }
                }
                None => targets.push(w),
            }
        }
        let starts = (unclipped.is_some() && !from_unclipped).then_some(clipped);
        Ok(Targets {
            linears,
            targets,
            starts,
            rtn,
            group,
        })
    }

    /// `Σ (w − ŵ) H (w − ŵ)ᵀ` of linear `k`'s codes `q`, with `w` its unclipped weight.
    fn loss(&self, k: usize, q: &Quantized, h: &[f64]) -> Result<f64> {
        let l = self.linears[k];
        gptq::loss(&self.targets[k], &q.dequantize(), l.out, l.inp, h)
    }

    /// Error feedback's codes for linear `k`: walked from its unclipped weight (or, with too
    /// few tokens, its clipped one), onto the clipped weight's grid.
    fn feedback(&self, k: usize, f: &gptq::Factor) -> Result<Quantized> {
        let l = self.linears[k];
        let grid = self.rtn[k].clone();
        let from = self.starts.as_ref().map_or(&self.targets[k], |s| &s[k]);
        gptq::quantize_on(from, grid, l.out, l.inp, self.group, f)
    }

    /// Whether linear `k`'s error feedback (fitted with `f`) has a loss on `h` lower than
    /// round-to-nearest's by `margin` (a share of it); and both losses.
    fn judge(
        &self,
        k: usize,
        f: &gptq::Factor,
        h: &[f64],
        margin: f64,
    ) -> Result<(bool, f64, f64)> {
        let rtn = self.loss(k, &self.rtn[k], h)?;
        let feedback = self.loss(k, &self.feedback(k, f)?, h)?;
        Ok((feedback < rtn * (1.0 - margin), rtn, feedback))
    }
}

/// A linear's input kind and the scale group the guard reverted on it, if any: linears with
/// the same key share H.
type FactorKey = (Input, Option<usize>);

/// `diag(s)·H·diag(s)`, in place.
fn rescaled(mut h: Vec<f64>, s: &[f32]) -> Vec<f64> {
    let n = s.len();
    for i in 0..n {
        for j in 0..n {
            h[i * n + j] *= s[i] as f64 * s[j] as f64;
        }
    }
    h
}

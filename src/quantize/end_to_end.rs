//! The end-to-end check: the guard's calibration blocks run through the quantized model as a
//! whole, each quantized layer fed by the quantized layers before it, and scored at the end by
//! their next-token loss and their KL divergence from the float model.
//!
//! Why: the guard and the searches each measure one layer on the float model's input. An error
//! that is small in one layer but points the same way in every layer (clipping shrinks the
//! largest weights of every group toward zero) adds up through the residual stream, and a
//! layer-local measure cannot see it: on a model dequantized from a k-quant GGUF the guard said
//! AWQ beat round-to-nearest on every layer while the whole model came out worse.
//!
//! It runs once every layer is finished, from the parts: four streams go through the layers one
//! at a time, the float model, the layers as written (read back from their parts, so error
//! feedback's codes count), AWQ's scales without clipping, and plain round-to-nearest, the last
//! two rebuilt from the checkpoint and the searched scales each part carries. A fifth, the
//! per-layer choice, takes at each layer the version whose output (fed by the choices before
//! it) comes closest to the float model's there, by the guard's measure and margin: where the
//! loss builds up in a few layers only, it keeps AWQ elsewhere, for two more forwards per layer
//! instead of a forward of every later layer per candidate. It is scored at the end like the
//! others, so it is written only where it clearly wins there too. So the check
//! needs nothing from the run that quantized the layers: `awq merge` runs it on the shards'
//! parts as a single run does on its own, and the two decide the same fallback
//! ([`super::fallback`]); a resumed run runs it as the uninterrupted one. Dense models only (a
//! MoE layer has no room for a second copy, see the guard).

use std::path::PathBuf;

use candle_core::Tensor;

use super::guard::{guard_block_indices, normed_sq_diff, quantized, FALLBACK_MARGIN};
use super::layer::pieces;
use super::report::LayerReport;
use super::QuantizeOptions;
use crate::error::Result;
use crate::eval::LogProbs;
use crate::io::reader::Checkpoint;
use crate::model::config::{AwqFormat, ModelSpec};
use crate::model::layer::{LayerWeights, Linear, Norm};
use crate::model::rope::Rope;
use crate::model::Model;

/// Tokens the streams carry, at most (whole guard blocks, at least one): each stream costs a
/// forward of every layer on them, and the head's logits `tokens × vocab × hidden` at the end
/// (SmolLM2: 0.12 TFLOP per stream for 2048 tokens).
pub(super) const CHECK_TOKENS: usize = 2048;

/// Rows of logits materialised at once (`rows × vocab` f32).
pub(super) const HEAD_ROWS: usize = 512;

/// Whether a run of `opts` on a model of `spec` has the check: the guard runs, something is
/// searched or clipped, every layer is dense and a block has a next token to predict. (A
/// shard's parts then carry the searched scales, so that the merge can run it.)
pub(super) fn applies(opts: &QuantizeOptions, spec: &ModelSpec) -> bool {
    let moe = (0..spec.layers).any(|i| spec.layer(i).moe.is_some());
    why_not(opts, moe).is_none()
}

/// Why a run of `opts` has no check, in words (the model card), or `None` where it has one;
/// `moe`: whether the model has a MoE layer.
pub(super) fn why_not(opts: &QuantizeOptions, moe: bool) -> Option<String> {
    if super::plain_rtn(opts.no_search, opts.clip, opts.rounding) {
        Some("nothing was searched or clipped (plain round-to-nearest)".into())
    } else if !opts.guard {
        Some("--no-guard".into())
    } else if moe {
        Some(format!(
            "the MoE layers are {}",
            super::report::MOE_UNGUARDED
        ))
    } else if opts.calib.seqlen < 2 {
        Some("blocks of one token have no next token to predict".into())
    } else {
        None
    }
}

/// How many guard blocks of `seqlen` tokens the check carries, at most.
fn check_blocks(seqlen: usize) -> usize {
    (CHECK_TOKENS / seqlen).max(1)
}

/// The tokens of the check's blocks, out of the calibration's `ids` (block after block): the
/// first guard blocks, about [`CHECK_TOKENS`] tokens.
pub(super) fn ids(all: &[u32], seqlen: usize) -> Vec<u32> {
    guard_block_indices(all.len() / seqlen)
        .into_iter()
        .take(check_blocks(seqlen))
        .flat_map(|b| all[b * seqlen..(b + 1) * seqlen].iter().copied())
        .collect()
}

/// How close one version of the model comes to the float model on the check's blocks, per
/// next-token prediction (nats).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Scores {
    /// Mean negative log-likelihood of the next token.
    pub loss: f64,
    /// Mean KL divergence of the version's next-token distribution from the float model's:
    /// zero for the float model itself, and less noisy than a difference of losses (every
    /// token of the vocabulary counts, not the one that came next).
    pub kl: f64,
    /// For an alternative to what was written: the standard error of its mean KL gain (the
    /// written version's KL minus this one's, prediction by prediction), which a fallback must
    /// exceed twice ([`super::fallback::choose`]). Absent for the written version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl_gain_se: Option<f64>,
}

/// Running sums of one alternative's per-prediction KL gain over the written version.
#[derive(Default, Clone, Copy)]
struct Gain {
    sum: f64,
    sq: f64,
}

impl Gain {
    /// The standard error of the mean gain over `n` predictions (0 for fewer than 2).
    fn se(self, n: f64) -> f64 {
        if n < 2.0 {
            return 0.0;
        }
        let mean = self.sum / n;
        ((self.sq / n - mean * mean).max(0.0) * n / (n - 1.0) / n).sqrt()
    }
}

/// One version of a layer that the check carries (its discriminant indexes [`VERSIONS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Version {
    /// As the layer loop wrote it (read back from its part).
    Written = 0,
    /// AWQ's searched scales on every scale group, no clipping, round-to-nearest codes.
    ScalesOnly = 1,
    /// Plain round-to-nearest: no scales, no clipping.
    Rtn = 2,
}

impl Version {
    /// The version in words (the warning, the model card).
    pub fn words(self) -> &'static str {
        match self {
            Version::Written => "the layers as quantized",
            Version::ScalesOnly => "AWQ's scales without clipping",
            Version::Rtn => "plain round-to-nearest",
        }
    }
}

/// Every version, in the order of the report's scores.
const VERSIONS: [Version; 3] = [Version::Written, Version::ScalesOnly, Version::Rtn];

/// The per-layer choice: one [`Version`] per layer, each the one whose output, fed by the
/// choices before it, came closest to the float model's after that layer (an alternative only
/// where it is [`FALLBACK_MARGIN`] closer than the written one).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PerLayer {
    /// The chosen version of every layer, in layer order.
    pub versions: Vec<Version>,
    /// Its scores where it chose another version anywhere (`None`: it is what was written).
    pub scores: Option<Scores>,
}

/// The end-to-end check's result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EndToEndReport {
    /// Calibration blocks the streams ran on, and next-token predictions the scores average.
    pub blocks: usize,
    pub predictions: usize,
    /// The float model's loss.
    pub fp_loss: f64,
    /// The layers as written (the guard's choice, error feedback's codes; before `--keep-fp16`
    /// keeps any unit in float), AWQ's scales without clipping, and plain round-to-nearest.
    pub written: Scores,
    pub scales_only: Scores,
    pub rtn: Scores,
    /// The per-layer choice and, where it departs from `written`, its scores.
    pub per_layer: PerLayer,
    /// What the layers were written again as, where scales-only, round-to-nearest or the
    /// per-layer choice came closer to the float model (by KL) than `written`
    /// ([`super::fallback`]); `None` when `written` is what the output holds.
    pub fallback: Option<super::fallback::Fallback>,
    /// Whether the test hook [`super::fallback::INJECT_FALLBACK_ENV`] forced the fallback (or
    /// the per-layer choice) instead of the scores.
    pub forced: bool,
    /// The version each layer of the output holds, in layer order: `written` everywhere unless
    /// a fallback wrote layers again.
    pub output_versions: Vec<Version>,
    /// Seconds of the check (the streams' forwards and the head) and of a fallback's rewrite.
    pub seconds: f64,
}

impl EndToEndReport {
    /// The scores of what the output holds: `written`, or the fallback's version.
    pub fn output(&self) -> Scores {
        match self.fallback {
            None => self.written,
            Some(super::fallback::Fallback::ScalesOnly) => self.scales_only,
            Some(super::fallback::Fallback::Rtn) => self.rtn,
            Some(super::fallback::Fallback::PerLayer) => {
                self.per_layer.scores.unwrap_or(self.written)
            }
        }
    }
}

/// Each version's mean squared difference from the float model's output after one layer, read
/// through the norm that reads it next (the guard's measure, on the check's blocks and fed by
/// the quantized layers before): where the versions part.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StreamErrors {
    /// Each version's own stream (the report's `written`, `scales_only`, `rtn`).
    #[serde(flatten)]
    pub streams: VersionErrors,
    /// The same for each version of this layer fed by the per-layer choice's stream (the
    /// written one until the choice departs from it): what the choice compared.
    pub per_layer: VersionErrors,
}

/// One error per version of a layer, in [`VERSIONS`] order (see [`StreamErrors`]).
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct VersionErrors {
    pub written: f64,
    pub scales_only: f64,
    pub rtn: f64,
}

impl From<[f64; 3]> for VersionErrors {
    fn from([written, scales_only, rtn]: [f64; 3]) -> Self {
        VersionErrors {
            written,
            scales_only,
            rtn,
        }
    }
}

/// The hidden states of the check's blocks, `[blocks·seqlen, hidden]`: the float model's and
/// each version's.
struct Streams {
    fp: Tensor,
    written: Tensor,
    scales_only: Tensor,
    rtn: Tensor,
    /// The per-layer choice's, from the first layer where it took another version than
    /// `written` (before, it is `written`).
    per_layer: Option<Tensor>,
}

impl Streams {
    /// The stream of version `v`.
    fn of(&mut self, v: Version) -> &mut Tensor {
        match v {
            Version::Written => &mut self.written,
            Version::ScalesOnly => &mut self.scales_only,
            Version::Rtn => &mut self.rtn,
        }
    }
}

/// What the check reads: the model, the run's options and the finished layers' parts.
pub(super) struct Check<'a> {
    pub model: &'a Model,
    pub opts: &'a QuantizeOptions,
    /// Every layer's part, in layer order (they hold each layer's packed linears, norms and
    /// searched scales).
    pub parts: &'a [PathBuf],
    /// The per-layer choice to carry instead of choosing it (the tests' hook: one version per
    /// layer, repeated from the start where shorter).
    pub forced: Option<&'a [Version]>,
}

impl Check<'_> {
    /// Runs the check on the calibration's check blocks (out of `all`, every calibration
    /// token) and records each version's [`StreamErrors`] in the guard report of each layer of
    /// `reports` that has one.
    pub fn run(&self, all: &[u32], reports: &mut [LayerReport]) -> Result<EndToEndReport> {
        let (spec, seqlen) = (&self.model.spec, self.opts.calib.seqlen);
        let rope = Rope::new(spec, seqlen)?;
        let parts = Checkpoint::open_files(self.parts.to_vec())?;
        let ids = ids(all, seqlen);
        let x = self.model.embed(&ids)?;
        let mut s = Streams {
            fp: x.clone(),
            written: x.clone(),
            scales_only: x.clone(),
            rtn: x,
            per_layer: None,
        };
        let mut versions = Vec::with_capacity(reports.len());
        for (i, report) in reports.iter_mut().enumerate() {
            crate::interrupt::check()?;
            let (errors, version) = self.layer(i, &parts, &rope, &mut s)?;
            versions.push(version);
            if let Some(g) = report.guard.as_mut() {
                g.streams = Some(errors);
            }
        }
        losses(self.model, &s, &ids, seqlen, versions)
    }

    /// Advances every stream through its version of layer `i`, and the per-layer choice's
    /// through the version it chooses there (returned). The versions are built one at a time:
    /// one quantized copy of the layer beside the float one, as in the guard.
    fn layer(
        &self,
        i: usize,
        parts: &Checkpoint,
        rope: &Rope,
        s: &mut Streams,
    ) -> Result<(StreamErrors, Version)> {
        let spec = self.model.spec.layer(i);
        let float = self.model.layer(i)?;
        let go = |l: &LayerWeights, x: &Tensor| advance(l, &spec, rope, x, self.opts.calib.seqlen);
        let next_norm = self.model.next_norm(i)?;
        s.fp = go(&float, &s.fp)?;
        let reference = next_norm.apply(&spec, &s.fp)?;
        let n = reference.elem_count().max(1) as f64;
        let e = |x: &Tensor| {
            Ok::<_, crate::error::Error>(normed_sq_diff(&spec, &next_norm, x, &reference)? / n)
        };
        // The per-layer choice's input: `written`'s until it first departs from it (its output
        // through the written layer is then the written stream's).
        let departed = s.per_layer.is_some();
        let input = s.per_layer.clone().unwrap_or_else(|| s.written.clone());
        let (mut own, mut fed, mut candidates) = ([0.0; 3], [0.0; 3], Vec::with_capacity(3));
        for v in VERSIONS {
            let layer = self.version(v, &float, parts, &spec)?;
            let stream = s.of(v);
            *stream = go(&layer, stream)?;
            own[v as usize] = e(stream)?;
            let (candidate, error) = match (v, departed) {
                (Version::Written, false) => (stream.clone(), own[v as usize]),
                _ => {
                    let candidate = go(&layer, &input)?;
                    let error = e(&candidate)?;
                    (candidate, error)
                }
            };
            fed[v as usize] = error;
            candidates.push(candidate);
        }
        let version = match self.forced {
            Some(f) if !f.is_empty() => f[i % f.len()],
            _ => closest(fed),
        };
        if departed || version != Version::Written {
            s.per_layer = Some(candidates.swap_remove(version as usize));
        }
        let errors = StreamErrors {
            streams: own.into(),
            per_layer: fed.into(),
        };
        Ok((errors, version))
    }

    /// Layer `float` (the checkpoint's layer of `spec`) as version `v`: read back from its part,
    /// or rebuilt with the searched scales the part carries, or without them.
    fn version(
        &self,
        v: Version,
        float: &LayerWeights,
        parts: &Checkpoint,
        spec: &ModelSpec,
    ) -> Result<LayerWeights> {
        let group = self.opts.group;
        match v {
            Version::Written => {
                let fmt = AwqFormat {
                    group,
                    layout: self.opts.layout,
                };
                written(float.clone(), parts, spec, fmt)
            }
            Version::ScalesOnly => {
                let mut scaled = float.clone();
                super::fallback::apply_searched_scales(&mut scaled, parts, spec)?;
                quantized(scaled, group)
            }
            Version::Rtn => quantized(float.clone(), group),
        }
    }
}

/// The per-layer choice at one layer, from the errors of the written, scales-only and
/// round-to-nearest versions on the same input: an alternative only where it is
/// [`FALLBACK_MARGIN`] lower than the written one (the lower of the two where both are; ties
/// keep scales-only), `Written` otherwise.
pub(super) fn closest([written, scales_only, rtn]: [f64; 3]) -> Version {
    let bar = written * (1.0 - FALLBACK_MARGIN);
    match (scales_only < bar, rtn < bar) {
        (true, true) if rtn < scales_only => Version::Rtn,
        (true, _) => Version::ScalesOnly,
        (false, true) => Version::Rtn,
        (false, false) => Version::Written,
    }
}

/// Layer `i` as its part holds it: `float` (the checkpoint's) with every linear's weight
/// replaced by what its packed form dequantizes to, and its bias and norms by the part's
/// (scaled) ones. The rest (rope, verbatim tensors) is the checkpoint's, as the shards copy it.
fn written(
    mut float: LayerWeights,
    parts: &Checkpoint,
    spec: &ModelSpec,
    fmt: AwqFormat,
) -> Result<LayerWeights> {
    let p = spec.roots.layer(float.index);
    let mut packed = spec.clone();
    (packed.awq, packed.not_converted) = (Some(fmt), None);
    for (name, lin) in float.linears.iter_mut() {
        let (out, inp) = lin.weight.dims2()?;
        let prefix = format!("{p}.{name}");
        *lin = Linear::load(parts, &packed, &prefix, out, inp, lin.bias.is_some())?;
    }
    for (name, norm) in float.norms.iter_mut() {
        let width = norm.weight.dim(0)?;
        *norm = Norm::load(parts, &format!("{p}.{name}"), width, norm.bias.is_some())?;
    }
    Ok(float)
}

/// `x` through `layer` (already quantized), whole sequences at a time.
fn advance(
    layer: &LayerWeights,
    spec: &ModelSpec,
    rope: &Rope,
    x: &Tensor,
    seqlen: usize,
) -> Result<Tensor> {
    let outs = pieces(x, seqlen)?
        .iter()
        .map(|p| Ok(layer.forward(spec, rope, p, seqlen, false)?.0))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&outs, 0)?)
}

/// The scores of every version against the float model, with `ids` the check blocks' tokens
/// (see [`ids`]).
fn losses(
    model: &Model,
    s: &Streams,
    ids: &[u32],
    seqlen: usize,
    per_layer: Vec<Version>,
) -> Result<EndToEndReport> {
    let head = model.head()?;
    let blocks = ids.len() / seqlen;
    // The per-layer choice's stream is scored only where it departs from `written`.
    let mut versions = vec![&s.written, &s.scales_only, &s.rtn];
    versions.extend(s.per_layer.as_ref());
    let k = versions.len();
    let (mut fp_loss, mut sums) = (0f64, vec![Scores::default(); k]);
    let mut gains = vec![Gain::default(); k];
    // Positions 0..seqlen-1 of each block predict tokens 1..seqlen, `HEAD_ROWS` rows of logits
    // at a time (a 150k vocabulary makes 0.3 GB of them per version).
    for b in 0..blocks {
        for row in (0..seqlen - 1).step_by(HEAD_ROWS) {
            let (at, rows) = (b * seqlen + row, HEAD_ROWS.min(seqlen - 1 - row));
            let targets = &ids[at + 1..at + 1 + rows];
            let logits = |h: &Tensor| -> Result<Vec<f32>> {
                let l = head.logits(&model.spec, &h.narrow(0, at, rows)?)?;
                Ok(l.flatten_all()?.to_vec1::<f32>()?)
            };
            let reference = LogProbs::new(logits(&s.fp)?, rows);
            fp_loss += reference.nll(targets);
            let mut kls = Vec::with_capacity(k);
            for (sum, h) in sums.iter_mut().zip(&versions) {
                let version = LogProbs::new(logits(h)?, rows);
                sum.loss += version.nll(targets);
                kls.push(reference.kl_rows(&version));
            }
            // Summed in row order: the same bits whatever the thread count.
            for (k, kl) in kls.iter().enumerate() {
                sums[k].kl += kl.iter().sum::<f64>();
                for (w, v) in kls[0].iter().zip(kl) {
                    gains[k].sum += w - v;
                    gains[k].sq += (w - v) * (w - v);
                }
            }
        }
    }
    let n = (blocks * (seqlen - 1)) as f64;
    let mean = |k: usize| Scores {
        loss: sums[k].loss / n,
        kl: sums[k].kl / n,
        kl_gain_se: (k > 0).then(|| gains[k].se(n)),
    };
    Ok(EndToEndReport {
        blocks,
        predictions: blocks * (seqlen - 1),
        fp_loss: fp_loss / n,
        written: mean(0),
        scales_only: mean(1),
        rtn: mean(2),
        output_versions: vec![Version::Written; per_layer.len()],
        per_layer: PerLayer {
            versions: per_layer,
            scores: (k > 3).then(|| mean(3)),
        },
        fallback: None,
        forced: false,
        seconds: 0.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-layer choice leaves the written version only for one FALLBACK_MARGIN closer,
    /// and then for the closest.
    #[test]
    fn the_per_layer_choice_takes_an_alternative_only_when_clearly_closer() {
        assert_eq!(closest([1.0, 0.95, 0.91]), Version::Written);
        assert_eq!(closest([1.0, 0.85, 0.95]), Version::ScalesOnly);
        assert_eq!(closest([1.0, 0.95, 0.85]), Version::Rtn);
        assert_eq!(closest([1.0, 0.80, 0.70]), Version::Rtn);
        assert_eq!(closest([1.0, 0.70, 0.70]), Version::ScalesOnly);
        assert_eq!(closest([0.0, 0.0, 0.0]), Version::Written);
    }

    /// The check reads whole guard blocks, in order, about [`CHECK_TOKENS`] tokens (at least
    /// one block), whatever the block count.
    #[test]
    fn check_ids_are_whole_guard_blocks() {
        for (blocks, seqlen) in [(10, 2), (3, 4), (40, 512), (1, 8)] {
            let all: Vec<u32> = (0..(blocks * seqlen) as u32).collect();
            let picked = ids(&all, seqlen);
            assert!(!picked.is_empty() && picked.len().is_multiple_of(seqlen));
            assert!(picked.len() <= CHECK_TOKENS.max(seqlen));
            for block in picked.chunks(seqlen) {
                let b = block[0] as usize / seqlen;
                assert!(
                    guard_block_indices(blocks).contains(&b),
                    "{blocks} × {seqlen}"
                );
                assert_eq!(block, &all[b * seqlen..(b + 1) * seqlen]);
            }
        }
    }
}

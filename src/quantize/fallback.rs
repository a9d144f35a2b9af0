//! The end-to-end fallback: when the end-to-end check ([`super::end_to_end`]) finds that plain
//! round-to-nearest, or AWQ's scales without clipping, brings the whole quantized model closer
//! to the float one than what the layer loop wrote, every layer is written again as that
//! version.
//!
//! Why the whole model: the loss this guards against is the one no layer-local measure sees
//! (clipping shrinks every group's largest weights the same way, and the error adds up through
//! the residual stream), so the choice is made where it shows, after the last layer, among the
//! versions the check carried all the way. A finer, per-layer choice would need a forward of
//! every later layer per candidate: not built.
//!
//! Why a margin: the check's blocks are calibration blocks the searches saw, so small
//! differences say little (the guard's reason for its [`FALLBACK_MARGIN`], kept here), and on a
//! model whose quantized versions all stay near the float one the KL's differences are the
//! numerical noise of float32 logits (tiny random models: 5·10⁻⁸ against 6·10⁻⁸); a small
//! calibration gives the check few predictions, whose mean is itself noisy. A fallback
//! therefore needs a KL [`FALLBACK_MARGIN`] lower than what was written, at least
//! [`MIN_KL_GAIN`] lower, and a gain of at least twice its standard error over the check's
//! predictions. On every real model measured so far the written version led by a wide
//! margin (SmolLM2's embedded-corpus run: 0.117 written, 0.133 scales only, 0.251
//! round-to-nearest). With a few calibration blocks AWQ sometimes lost within the check's noise
//! (the gemma3 fixture, 4 blocks of 16 tokens: 0.0103 written, 0.0051 round-to-nearest over 15
//! predictions, a gain of 1.5 standard errors), and on SmolLM2 such fallbacks helped once and
//! hurt once (`docs/quality.md`).
//!
//! The rewrite rebuilds each layer from the checkpoint: round-to-nearest needs nothing else,
//! scales-only the searched scales, which every layer's part carries when the check runs
//! ([`searched_scales_tensors`]; never copied into the shards). The new parts replace the old
//! ones in the list the shards are written from; the old ones stay in staging, so a resumed
//! run decides and rewrites again, the same way.

use std::path::Path;
use std::time::Instant;

use candle_core::Tensor;

use super::end_to_end::{Check, EndToEndReport, Scores};
use super::keep;
use super::layer::apply_scales;
use super::layers::{write_part, Layers};
use super::prepare::Prepared;
use super::report::{Timings, Work};
use super::QuantizeOptions;
use crate::error::Result;
use crate::events::{Event, Sink};
use crate::io::reader::Checkpoint;
use crate::io::writer::OutTensor;
use crate::model::config::ModelSpec;
use crate::model::groups::scale_groups;
use crate::model::layer::LayerWeights;
use crate::model::rope::Rope;
use crate::model::Model;

/// The version every layer is written as after a fallback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    /// AWQ's searched scales on every scale group, no clipping, round-to-nearest codes.
    ScalesOnly,
    /// Plain round-to-nearest: no scales, no clipping.
    Rtn,
}

impl Fallback {
    /// The version's name in words (the run's summary, the model card).
    pub fn words(self) -> &'static str {
        match self {
            Fallback::ScalesOnly => "AWQ's scales without clipping",
            Fallback::Rtn => "plain round-to-nearest",
        }
    }
}

/// Runs the end-to-end check on the finished layers of `done` (the run's own, or the shards'
/// in `awq merge`) and, where another version scores better, rewrites every layer as that
/// version into `parts_dir` ([`rewrite`]); the result goes into `done.end_to_end`, its seconds
/// into `work`.
pub(super) fn check(
    opts: &QuantizeOptions,
    prep: &Prepared,
    parts_dir: &Path,
    done: &mut Layers,
    events: Sink,
    work: &mut Work,
) -> Result<()> {
    events(&Event::Phase {
        name: "end-to-end check",
    });
    let clock = Instant::now();
    let check = Check {
        model: &prep.model,
        opts,
        parts: &done.parts,
    };
    let mut report = check.run(&prep.cal.ids, &mut done.reports)?;
    report.fallback = injected().or_else(|| choose(&report));
    if let Some(f) = report.fallback {
        rewrite(opts, &prep.model, f, parts_dir, done)?;
        events(&Event::Warning {
            message: message(&report, f),
        });
    }
    report.seconds = clock.elapsed().as_secs_f64();
    work.seconds.end_to_end += report.seconds;
    done.end_to_end = Some(report);
    Ok(())
}

/// Test hook: with `AWQ_INJECT_FALLBACK=rtn` (or `scales_only`) the end-to-end check falls back
/// to that version whatever the scores — how the tests exercise the rewrite on models too small
/// for the check to tell the versions apart beyond its noise.
pub const INJECT_FALLBACK_ENV: &str = "AWQ_INJECT_FALLBACK";

fn injected() -> Option<Fallback> {
    match std::env::var(INJECT_FALLBACK_ENV).ok()?.as_str() {
        "rtn" => Some(Fallback::Rtn),
        "scales_only" => Some(Fallback::ScalesOnly),
        _ => None,
    }
}

/// How much lower (relative) an alternative's KL must be than the written version's: the
/// guard's margin ([`super::guard::FALLBACK_MARGIN`]), for the same reason.
pub const FALLBACK_MARGIN: f64 = super::guard::FALLBACK_MARGIN;

/// How much lower an alternative's KL must be, at least, in nats per prediction: below it the
/// difference is float32 noise or changes a perplexity by less than 0.01 %.
pub const MIN_KL_GAIN: f64 = 1e-4;

/// The version with the lowest KL divergence from the float model on the check's blocks among
/// those that beat what was written by [`FALLBACK_MARGIN`], by [`MIN_KL_GAIN`] and by twice the
/// standard error of the gain; `None` when none does (ties between the two keep scales-only).
pub fn choose(r: &EndToEndReport) -> Option<Fallback> {
    let w = r.written.kl;
    let clearly_lower = |s: &Scores| {
        let gain = w - s.kl;
        s.kl < w * (1.0 - FALLBACK_MARGIN)
            && gain >= MIN_KL_GAIN
            && gain >= 2.0 * s.kl_gain_se.unwrap_or(0.0)
    };
    [
        (r.scales_only, Fallback::ScalesOnly),
        (r.rtn, Fallback::Rtn),
    ]
    .into_iter()
    .filter(|(s, _)| clearly_lower(s))
    // `min_by` keeps the first of equal ones: scales-only.
    .min_by(|a, b| a.0.kl.total_cmp(&b.0.kl))
    .map(|(_, f)| f)
}

/// The run's warning after a fallback: the scores that decided it and what was written.
pub(super) fn message(r: &EndToEndReport, f: Fallback) -> String {
    format!(
        "end-to-end check: {} came closer to the float model than the layers as quantized (KL \
         {:.4} against {:.4} over {} next-token predictions on calibration blocks); every layer \
         was written again as {} (end_to_end in the report)",
        f.words(),
        r.output().kl,
        r.written.kl,
        r.predictions,
        f.words()
    )
}

/// Name of the part tensor holding layer `i`'s searched scales of scale group `k` (every group,
/// whether the guard kept it or not: the scales-only version has them all).
fn searched_scales_tensor(i: usize, k: usize) -> String {
    // Inside the part files only (never written to the shards), so it needs no root.
    format!("model.layers.{i}.awq_searched_scales.{k}")
}

/// The part tensors that carry layer `i`'s searched `scales` (one per scale group, in
/// [`scale_groups`] order) to the end of the run.
pub(super) fn searched_scales_tensors(i: usize, scales: &[Vec<f32>]) -> Result<Vec<OutTensor>> {
    (scales.iter().enumerate())
        .map(|(k, s)| {
            let t = Tensor::from_slice(s, s.len(), &candle_core::Device::Cpu)?;
            OutTensor::f32(searched_scales_tensor(i, k), &t)
        })
        .collect()
}

/// Writes every layer of `done` again as `fallback`, each to `fallback-NNNNN.safetensors` in
/// `parts_dir`, and points `done.parts` at the new parts (and each report's
/// `max_abs_float_weight` at the new part's, which decides the float dtype). With
/// `--keep-fp16`, a scales-only part carries its scales as the layer loop's parts do, so a kept
/// unit holds the weights the fallback scaled.
pub(super) fn rewrite(
    opts: &QuantizeOptions,
    model: &Model,
    fallback: Fallback,
    parts_dir: &Path,
    done: &mut Layers,
) -> Result<()> {
    let parts = Checkpoint::open_files(done.parts.clone())?;
    // Only a MoE layer's experts read the rope, and a model with the check has none.
    let rope = Rope::new(&model.spec, opts.calib.seqlen)?;
    for i in 0..done.parts.len() {
        crate::interrupt::check()?;
        let mut layer = model.layer(i)?;
        let spec = model.spec.layer(i);
        let scales = match fallback {
            Fallback::ScalesOnly => apply_searched_scales(&mut layer, &parts, &spec)?,
            Fallback::Rtn => Vec::new(),
        };
        let path = parts_dir.join(format!("fallback-{i:05}.safetensors"));
        let (mut part, _) = write_part(
            opts,
            &spec,
            &rope,
            &layer,
            None,
            &mut Default::default(),
            &path,
            &mut Timings::default(),
        )?;
        done.reports[i].max_abs_float_weight = part.max_abs_f32();
        if opts.keep_fp16.is_some() {
            for t in keep::scales_tensors(i, &scales, &vec![true; scales.len()])? {
                part.push(t)?;
            }
        }
        part.finish()?;
        done.parts[i] = path;
    }
    Ok(())
}

/// Folds into `layer` (a layer of `spec`, as in the checkpoint) the searched scales its part
/// carries in `parts` (its part, or every part), every scale group's; returns them, one vector
/// per group in [`scale_groups`] order.
pub(super) fn apply_searched_scales(
    layer: &mut LayerWeights,
    parts: &Checkpoint,
    spec: &ModelSpec,
) -> Result<Vec<Vec<f32>>> {
    let groups = scale_groups(spec);
    let mut scales = Vec::with_capacity(groups.len());
    for (k, g) in groups.iter().enumerate() {
        let name = searched_scales_tensor(layer.index, k);
        let shape = parts.meta(&name)?.shape.clone();
        let s: Vec<f32> = parts.f32(&name, &shape)?.to_vec1()?;
        apply_scales(spec, layer, g, &s)?;
        scales.push(s);
    }
    Ok(scales)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(written: f64, scales_only: f64, rtn: f64) -> EndToEndReport {
        let s = |kl| Scores {
            loss: 1.0,
            kl,
            kl_gain_se: Some(0.0),
        };
        EndToEndReport {
            blocks: 1,
            predictions: 1,
            fp_loss: 1.0,
            scales_only: s(scales_only),
            rtn: s(rtn),
            written: s(written),
            fallback: None,
            seconds: 0.0,
        }
    }

    /// The lowest KL decides among the versions clearly below what was written.
    #[test]
    fn a_version_clearly_closer_to_the_float_model_end_to_end_is_written() {
        assert_eq!(choose(&report(0.10, 0.13, 0.25)), None);
        assert_eq!(choose(&report(0.10, 0.10, 0.10)), None);
        assert_eq!(choose(&report(0.0103, 0.0072, 0.0051)), Some(Fallback::Rtn));
        assert_eq!(
            choose(&report(0.10, 0.05, 0.05)),
            Some(Fallback::ScalesOnly)
        );
        assert_eq!(
            choose(&report(0.10, 0.08, 0.25)),
            Some(Fallback::ScalesOnly)
        );
    }

    /// A gain within twice its standard error is noise: nothing falls back.
    #[test]
    fn a_kl_gain_within_twice_its_standard_error_keeps_what_was_written() {
        let mut r = report(0.20, 0.16, 0.58);
        r.scales_only.kl_gain_se = Some(0.021);
        assert_eq!(choose(&r), None);
        r.scales_only.kl_gain_se = Some(0.019);
        assert_eq!(choose(&r), Some(Fallback::ScalesOnly));
    }

    /// Within the relative margin, or within the absolute floor, nothing falls back.
    #[test]
    fn small_or_numerically_insignificant_kl_differences_keep_what_was_written() {
        assert_eq!(choose(&report(0.10, 0.0905, 0.095)), None);
        assert_eq!(choose(&report(6.5e-8, 8.5e-8, 5.3e-8)), None);
        assert_eq!(
            choose(&report(5e-4, 3e-4, 4.5e-4)),
            Some(Fallback::ScalesOnly)
        );
        assert_eq!(choose(&report(1.5e-4, 0.6e-4, 1e-4)), None);
    }
}

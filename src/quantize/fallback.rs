//! The end-to-end fallback: when the end-to-end check ([`super::end_to_end`]) finds that plain
//! round-to-nearest, AWQ's scales without clipping, or the check's per-layer choice among the
//! three brings the whole quantized model closer to the float one than what the layer loop
//! wrote, the layers are written again as that version (every layer, or those where the
//! per-layer choice differs).
//!
//! Why decided at the end: the loss this guards against is the one no layer-local measure sees
//! (clipping shrinks every group's largest weights the same way, and the error adds up through
//! the residual stream), so the choice is made where it shows, after the last layer, among the
//! versions the check carried all the way. The per-layer choice is greedy (each layer measured
//! on the choices before it, not on the logits; scoring every candidate at the logits would
//! take a forward of every later layer per candidate), so it too must win at the logits.
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

use super::end_to_end::{Check, EndToEndReport, Scores, Version};
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
    /// The check's per-layer choice (`end_to_end.per_layer.versions`): the layers where it is
    /// not the written version are written again as the version it chose.
    PerLayer,
}

impl Fallback {
    /// The version's name in words (the run's summary, the model card).
    pub fn words(self) -> &'static str {
        match self {
            Fallback::ScalesOnly => Version::ScalesOnly.words(),
            Fallback::Rtn => Version::Rtn.words(),
            Fallback::PerLayer => "the per-layer choice",
        }
    }

    /// The version of every layer after this fallback, given the check's report `r` (whose
    /// per-layer choice has one version per layer).
    pub fn versions(self, r: &EndToEndReport) -> Vec<Version> {
        let layers = r.per_layer.versions.len();
        match self {
            Fallback::ScalesOnly => vec![Version::ScalesOnly; layers],
            Fallback::Rtn => vec![Version::Rtn; layers],
            Fallback::PerLayer => r.per_layer.versions.clone(),
        }
    }
}

/// The layers written again by a fallback, in words: "every layer", or which ones as what
/// ("layers 3, 7 as plain round-to-nearest; layer 5 as AWQ's scales without clipping").
pub fn rewritten_words(versions: &[Version]) -> String {
    if let Some(&first) = versions.first() {
        if first != Version::Written && versions.iter().all(|&v| v == first) {
            return format!("every layer as {}", first.words());
        }
    }
    [Version::ScalesOnly, Version::Rtn]
        .into_iter()
        .filter_map(|v| {
            let at: Vec<String> = (versions.iter().enumerate())
                .filter(|(_, &w)| w == v)
                .map(|(i, _)| i.to_string())
                .collect();
            let noun = if at.len() == 1 { "layer" } else { "layers" };
            (!at.is_empty()).then(|| format!("{noun} {} as {}", at.join(", "), v.words()))
        })
        .collect::<Vec<_>>()
        .join("; ")
        + " (layers counted from 0, as in the tensor names)"
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
    let forced = match injected() {
        Ok(forced) => forced,
        Err(value) => {
            events(&Event::Warning {
                message: format!(
                    "{INJECT_FALLBACK_ENV}={value:?} is not understood (rtn, scales_only, or \
                     per_layer:V,V,… with each V written, scales_only or rtn); ignored"
                ),
            });
            None
        }
    };
    let check = Check {
        model: &prep.model,
        opts,
        parts: &done.parts,
        forced: match &forced {
            Some(Injected::PerLayer(v)) => Some(v),
            _ => None,
        },
    };
    let mut report = check.run(&prep.cal.ids, &mut done.reports)?;
    report.forced = forced.is_some();
    report.fallback = match forced {
        Some(Injected::Whole(f)) => Some(f),
        Some(Injected::PerLayer(_)) => report.per_layer.scores.map(|_| Fallback::PerLayer),
        None => choose(&report),
    };
    if let Some(f) = report.fallback {
        report.output_versions = f.versions(&report);
        rewrite(opts, &prep.model, &report.output_versions, parts_dir, done)?;
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
/// to that version whatever the scores, and with `per_layer:V,V,…` (each `written`,
/// `scales_only` or `rtn`, repeated from the first layer where shorter) to that per-layer
/// choice — how the tests exercise the rewrite on models too small for the check to tell the
/// versions apart beyond its noise.
pub const INJECT_FALLBACK_ENV: &str = "AWQ_INJECT_FALLBACK";

/// The fingerprint key under which an output whose check the hook decided records the hook's
/// value, so that `--skip-existing` never takes it for the output of a run without the hook
/// (or with another value): its bytes are not what such a run writes.
pub const HOOK_KEY: &str = "inject_fallback";

/// `fingerprint` with the hook's value under [`HOOK_KEY`] where the hook is set, understood and
/// decides a check (`checked`: the run's end-to-end check runs, or ran); else a copy.
pub fn with_hook(fingerprint: &serde_json::Value, checked: bool) -> serde_json::Value {
    let mut fp = fingerprint.clone();
    let value = std::env::var(INJECT_FALLBACK_ENV).ok();
    let understood = value.filter(|v| parse_hook(v).is_some());
    if let (true, Some(v), Some(obj)) = (checked, understood, fp.as_object_mut()) {
        obj.insert(HOOK_KEY.into(), v.into());
    }
    fp
}

/// A fallback forced by [`INJECT_FALLBACK_ENV`].
enum Injected {
    Whole(Fallback),
    PerLayer(Vec<Version>),
}

/// The fallback [`INJECT_FALLBACK_ENV`] forces (`None` where it is unset); the value where it is
/// not understood.
fn injected() -> std::result::Result<Option<Injected>, String> {
    let Ok(value) = std::env::var(INJECT_FALLBACK_ENV) else {
        return Ok(None);
    };
    parse_hook(&value).map(Some).ok_or(value)
}

/// The fallback a value of [`INJECT_FALLBACK_ENV`] forces; `None` where it is not understood.
fn parse_hook(value: &str) -> Option<Injected> {
    let version = |v: &str| match v {
        "written" => Some(Version::Written),
        "scales_only" => Some(Version::ScalesOnly),
        "rtn" => Some(Version::Rtn),
        _ => None,
    };
    match value {
        "rtn" => Some(Injected::Whole(Fallback::Rtn)),
        "scales_only" => Some(Injected::Whole(Fallback::ScalesOnly)),
        v => (v.strip_prefix("per_layer:"))
            .and_then(|list| list.split(',').map(version).collect::<Option<Vec<_>>>())
            .map(Injected::PerLayer),
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
/// standard error of the gain (scales-only, round-to-nearest, and the per-layer choice where it
/// departs from what was written); `None` when none does (ties keep the first of them).
pub fn choose(r: &EndToEndReport) -> Option<Fallback> {
    let w = r.written.kl;
    let clearly_lower = |s: &Scores| {
        let gain = w - s.kl;
        s.kl < w * (1.0 - FALLBACK_MARGIN)
            && gain >= MIN_KL_GAIN
            && gain >= 2.0 * s.kl_gain_se.unwrap_or(0.0)
    };
    [
        Some((r.scales_only, Fallback::ScalesOnly)),
        Some((r.rtn, Fallback::Rtn)),
        r.per_layer.scores.map(|s| (s, Fallback::PerLayer)),
    ]
    .into_iter()
    .flatten()
    .filter(|(s, _)| clearly_lower(s))
    // `min_by` keeps the first of equal ones: scales-only.
    .min_by(|a, b| a.0.kl.total_cmp(&b.0.kl))
    .map(|(_, f)| f)
}

/// The run's warning after a fallback: the scores that decided it (or the test hook that forced
/// it) and what was written again.
pub(super) fn message(r: &EndToEndReport, f: Fallback) -> String {
    let why = match r.forced {
        true => format!(
            "{} was forced by {INJECT_FALLBACK_ENV} (a test hook)",
            f.words()
        ),
        false => format!(
            "{} came closer to the float model than the layers as quantized",
            f.words()
        ),
    };
    format!(
        "end-to-end check: {why} (KL {:.4} against {:.4} over {} next-token predictions on \
         calibration blocks); written again: {} (end_to_end in the report)",
        r.output().kl,
        r.written.kl,
        r.predictions,
        rewritten_words(&r.output_versions)
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

/// Writes each layer `i` of `done` again as `versions[i]` (those that are not
/// [`Version::Written`]), each to `fallback-NNNNN.safetensors` in `parts_dir`, and points its
/// entry of `done.parts` at the new part (and its report's `max_abs_float_weight` at the new
/// part's, which decides the float dtype). With `--keep-fp16`, a scales-only part carries its
/// scales as the layer loop's parts do, so a kept unit holds the weights the fallback scaled.
pub(super) fn rewrite(
    opts: &QuantizeOptions,
    model: &Model,
    versions: &[Version],
    parts_dir: &Path,
    done: &mut Layers,
) -> Result<()> {
    let parts = Checkpoint::open_files(done.parts.clone())?;
    // Only a MoE layer's experts read the rope, and a model with the check has none.
    let rope = Rope::new(&model.spec, opts.calib.seqlen)?;
    for (i, &version) in versions.iter().enumerate() {
        crate::interrupt::check()?;
        let mut layer = model.layer(i)?;
        let spec = model.spec.layer(i);
        let scales = match version {
            Version::Written => continue,
            Version::ScalesOnly => apply_searched_scales(&mut layer, &parts, &spec)?,
            Version::Rtn => Vec::new(),
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
            per_layer: super::super::end_to_end::PerLayer {
                versions: vec![Version::Written; 2],
                scores: None,
            },
            fallback: None,
            forced: false,
            output_versions: vec![Version::Written; 2],
            seconds: 0.0,
        }
    }

    /// The per-layer choice competes as a fourth version where it departs from what was
    /// written, under the same rule; its rewrite touches only the layers it changed.
    #[test]
    fn a_per_layer_choice_clearly_closer_end_to_end_is_written_where_it_departs() {
        let mut r = report(0.10, 0.095, 0.25);
        assert_eq!(choose(&r), None);
        r.per_layer.versions = vec![Version::Written, Version::Rtn];
        r.per_layer.scores = Some(Scores {
            loss: 1.0,
            kl: 0.07,
            kl_gain_se: Some(0.01),
        });
        assert_eq!(choose(&r), Some(Fallback::PerLayer));
        assert_eq!(
            Fallback::PerLayer.versions(&r),
            [Version::Written, Version::Rtn]
        );
        r.fallback = choose(&r);
        assert_eq!(r.output().kl, 0.07);
        r.per_layer.scores.as_mut().unwrap().kl_gain_se = Some(0.02);
        assert_eq!(choose(&r), None);
        r.rtn.kl = 0.05;
        assert_eq!(choose(&r), Some(Fallback::Rtn));
    }

    /// What a fallback wrote again, in words: every layer, or which layers as what.
    #[test]
    fn the_rewritten_layers_are_named() {
        use Version::{Rtn, ScalesOnly, Written};
        assert_eq!(
            rewritten_words(&[Rtn, Rtn]),
            "every layer as plain round-to-nearest"
        );
        assert_eq!(
            rewritten_words(&[Written, Rtn, ScalesOnly, Rtn]),
            "layer 2 as AWQ's scales without clipping; layers 1, 3 as plain round-to-nearest \
             (layers counted from 0, as in the tensor names)"
        );
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

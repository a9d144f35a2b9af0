//! Resuming a killed run: the finished layers' records, the fingerprint a resumed run must
//! match, and the decision what to do with a staging directory an earlier run left.
//!
//! Why automatic: a rerun used to delete a killed run's finished layers unless `--resume` was
//! given (hours of work, with the note hidden by `-q`). Now a matching run always continues, a
//! different one is refused naming the difference, and only `--force` discards the work.

use super::report::LayerReport;
use super::{QuantizeOptions, TOOL};
use crate::error::{Error, Result};
use crate::io::fingerprint;
use crate::io::writer::{Found, Open};
use crate::model::Model;

/// A finished layer as persisted in the staging directory for `--resume`.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct LayerRecord {
    pub report: LayerReport,
    /// The part's tensor names in checkpoint order.
    pub tensors: Vec<String>,
}

/// The first field where `stored` and `current` fingerprints differ
/// ([`fingerprint::first_difference`]), with the flag that sets it where an option does: the
/// fields are named as this file writes them (`options.search_blocks`), which a user who ran
/// `--fast` would not recognise.
pub(super) fn difference(
    stored: &serde_json::Value,
    current: &serde_json::Value,
) -> Option<String> {
    let field = fingerprint::first_difference(stored, current)?;
    let key = field
        .strip_prefix("options.")
        .map(|k| k.split([' ', '.']).next().unwrap_or(k));
    Some(match key.and_then(option_flag) {
        Some(flag) => format!("{field}, set by {flag},"),
        None => field,
    })
}

/// The flag that sets fingerprint option `key` (`None` for what the binary's version decides).
fn option_flag(key: &str) -> Option<&'static str> {
    Some(match key {
        "w_bit" => "--w-bit",
        "group" => "--group",
        "layout" => "--format and --version",
        "grid" => "--grid",
        "n_grid" => "--n-grid",
        "clip" => "--no-clip",
        "clip_sides" => "--clip-sides",
        "guard" => "--no-guard",
        "rounding" => "--rounding",
        "keep_fp16" => "--keep-fp16",
        "no_search" => "--no-search",
        "search_blocks" => "--search-blocks (--fast sets 4)",
        "seqlen" => "--seqlen",
        _ => return None,
    })
}

/// Everything the output bytes depend on (see [`crate::io::fingerprint`]).
pub(super) fn fingerprint(
    opts: &QuantizeOptions,
    model: &Model,
    ids: &[u32],
) -> Result<serde_json::Value> {
    let files = model
        .ckpt
        .files()
        .iter()
        .map(|f| fingerprint::file_identity(f))
        .collect::<Result<Vec<_>>>()?;
    let config = model.dir.join("config.json");
    let config = std::fs::read(&config).map_err(|e| Error::input_io(&config, e))?;
    let id_bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
    let mut v = serde_json::json!({
        "tool": TOOL,
        "model files": files,
        "config.json": format!("{:016x}", fingerprint::fnv1a(&config)),
        "calibration token ids": {"count": ids.len(), "fnv1a": format!("{:016x}", fingerprint::fnv1a(&id_bytes))},
        "options": {
            "w_bit": opts.w_bit, "group": opts.group, "layout": opts.layout, "grid": opts.grid,
            "n_grid": opts.n_grid, "clip": opts.clip, "clip_sides": opts.clip_sides, "guard": opts.guard, "rounding": opts.rounding, "keep_fp16": opts.keep_fp16, "no_search": opts.no_search,
            "search_blocks": opts.search_blocks, "seqlen": opts.calib.seqlen,
        },
        "card": {"name": opts.name, "base_model": opts.base_model},
    });
    // Error feedback's dampening changed between versions of the same number (0.01 → 0.3), and
    // so did its column order (natural → activation order) and where its walk starts (the
    // clipped weights → the unclipped ones, with enough calibration tokens).
    if opts.rounding != super::Rounding::Rtn {
        v["options"]["gptq_damp"] = crate::quant::gptq::DAMP.into();
        v["options"]["gptq_order"] = crate::quant::gptq::ORDER.into();
        v["options"]["gptq_start"] = super::rounding::start().into();
    }
    // The end-to-end check reads the searched scales from the parts, which parts staged before
    // its fallback existed lack.
    if super::end_to_end::applies(opts, &model.spec) {
        v["options"]["end_to_end_fallback"] = true.into();
    }
    // The held-out split shapes the bytes only where a choice is judged on it.
    if opts.judges_held_out() {
        let blocks = ids.len() / opts.calib.seqlen.max(1);
        v["options"]["held_out"] = crate::calib::held_out::describe(blocks).into();
    }
    Ok(v)
}

/// What to do with what [`crate::io::writer::Staging::probe`] found at `dir`, and a sentence
/// for the plan and the notices.
///
/// - nothing there: create it (with `--resume`: refuse, exit 2 — a mistyped `-o` must not
///   restart a long run silently);
/// - a running owner: refuse (exit 1), naming the pid;
/// - left by a killed run with no finished layer, or without a fingerprint and no layer:
///   replace it (nothing is lost);
/// - same fingerprint: resume (whatever `--resume` says);
/// - different fingerprint: with `--force` replace it, else refuse (exit 2) naming the first
///   difference and the two ways out.
pub(super) fn decide(
    opts: &QuantizeOptions,
    dir: &std::path::Path,
    found: &Found,
    current: &serde_json::Value,
) -> Result<(Open, Option<String>)> {
    let d = dir.display();
    // A dry run changes nothing: it says what the run would do.
    let (removed, resuming) = match opts.dry_run {
        true => ("would remove", "would resume"),
        false => ("removed", "resuming"),
    };
    match found {
        Found::Fresh if opts.resume => Err(Error::Usage(format!(
            "--resume: no interrupted run found for {} (its staging directory {d} does not \
             exist); check -o, or drop --resume to start from layer 1",
            opts.output.display()
        ))),
        Found::Fresh => Ok((Open::Create, None)),
        Found::Busy { pid } => Err(Error::Runtime(format!(
            "another awq process{} is writing {} (it holds the lock of {d}); wait for it to finish",
            pid.map_or_else(String::new, |p| format!(" (pid {p})")),
            opts.output.display()
        ))),
        Found::Stale { layers_done: 0, .. } => Ok((
            Open::Replace,
            Some(format!(
                "{removed} {d}, left by an interrupted run that had not finished a layer"
            )),
        )),
        Found::Stale {
            fingerprint: stored,
            layers_done,
        } => {
            let diff = match stored {
                Some(stored) => difference(stored, current),
                None => Some("fingerprint (missing or unreadable)".into()),
            };
            match diff {
                None => Ok((
                    Open::Resume,
                    Some(format!(
                        "{resuming} the interrupted run in {d}: {layers_done} layer(s) already done"
                    )),
                )),
                Some(_) if opts.force => Ok((
                    Open::Replace,
                    Some(format!(
                        "--force: {removed} {d}, an interrupted run with {layers_done} finished layer(s) and other settings"
                    )),
                )),
                Some(field) => Err(Error::Usage(format!(
                    "{d} holds an interrupted run with {layers_done} finished layer(s), but its {field} \
                     differ(s) from this run's; to continue it, rerun with the same model, \
                     calibration and options (it resumes by itself; --resume only insists); to \
                     discard it and start over, pass --force"
                ))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// A resumed layer's report is read back from its JSON record: every f64 must come back
    /// bit for bit, or a resumed run's report differs from an uninterrupted one's in the last
    /// digit (serde_json parses exactly only with its `float_roundtrip` feature).
    #[test]
    fn record_floats_round_trip_exactly() {
        let mut rng = crate::calib::SplitMix64::new(5);
        let mut values = vec![9.147214486467583e-05, 1.5752633226343917, 0.1, 1e-300];
        values.extend((0..10_000).map(|_| {
            let x = f64::from_bits(rng.next_u64() >> 2);
            if x.is_finite() {
                x
            } else {
                0.5
            }
        }));
        for x in values {
            let text = serde_json::to_string(&x).unwrap();
            let back: f64 = serde_json::from_str(&text).unwrap();
            assert_eq!(back.to_bits(), x.to_bits(), "{text}");
        }
    }

    /// A refused resume or `--skip-existing` names the flag behind an option field (the
    /// new-user trial read `options.search_blocks (was 4, now null)` after leaving out
    /// `--fast`), and other fields as before.
    #[test]
    fn a_difference_names_the_flag_that_sets_it() {
        let fp = |blocks: serde_json::Value, files: &str| {
            let options = serde_json::json!({"group": 64, "search_blocks": blocks});
            serde_json::json!({"model files": files, "options": options})
        };
        let d = super::difference(&fp(4.into(), "a"), &fp(serde_json::Value::Null, "a")).unwrap();
        assert_eq!(
            d,
            "options.search_blocks (was 4, now null), set by --search-blocks (--fast sets 4),"
        );
        let d = super::difference(&fp(4.into(), "a"), &fp(4.into(), "b")).unwrap();
        assert_eq!(d, "model files (was \"a\", now \"b\")");
        assert_eq!(
            super::difference(&fp(4.into(), "a"), &fp(4.into(), "a")),
            None
        );
    }
}

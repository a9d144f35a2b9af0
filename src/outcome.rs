//! What `awq quantize` and `awq merge` print when they return: the plan of a dry run, "up to
//! date", a shard's summary, or the checkpoint's — and the quality gate's verdict as the error
//! to exit with.

use std::io::Write;
use std::path::Path;

use awq::error::{Error, Result};
use awq::quantize::{Outcome, Report};
use serde_json::json;

use crate::progress::Progress;
use crate::{render, to_stdout};

/// Renders `outcome` (JSON `done` event or text on stdout); a failed quality gate becomes
/// [`Error::GateFailed`] naming where the checkpoint was kept.
pub fn show(outcome: Outcome, output: &Path, progress: &Progress, json_events: bool) -> Result<()> {
    let report = match outcome {
        Outcome::DryRun(plan) => {
            if json_events {
                progress.emit("done", json!({"dry_run": true}));
                return Ok(());
            }
            return to_stdout(|w| render::plan(w, &plan));
        }
        Outcome::UpToDate => {
            if json_events {
                progress.emit("done", json!({"output": output, "skipped": true}));
                return Ok(());
            }
            return to_stdout(|w| writeln!(w, "up to date: {}", output.display()));
        }
        Outcome::Shard(done) => {
            if json_events {
                progress.emit("done", json!({"shard": done, "skipped": false}));
                return Ok(());
            }
            return to_stdout(|w| render::shard(w, &done));
        }
        Outcome::Capture(done) => {
            if json_events {
                progress.emit("done", json!({"capture": done, "skipped": false}));
                return Ok(());
            }
            return to_stdout(|w| {
                writeln!(
                    w,
                    "wrote capture part {}/{} (blocks {}..{}, boundaries at layers {:?}) to {} in {:.1}s",
                    done.part[0],
                    done.part[1],
                    done.blocks[0],
                    done.blocks[1],
                    done.boundaries,
                    done.output.display(),
                    done.seconds
                )
            });
        }
        Outcome::Done(report) => report,
    };
    let written_to = report.rejected_output.as_deref().unwrap_or(output);
    if json_events {
        progress.emit(
            "done",
            json!({
                "output": written_to,
                "rejected_output": report.rejected_output,
                "skipped": false,
                "files": report.output_files,
                "weights": report.files,
                "calibration": report.calibration,
                "seconds": report.seconds_total,
                "work": report.work,
                "quality": report.quality,
                "kept_fp16": report.kept_fp16,
                "end_to_end": report.end_to_end,
                "rounding": report.rounding_counts(),
                "shards": report.shards,
            }),
        );
    } else {
        to_stdout(|w| render::summary(w, &report, written_to))?;
    }
    gate_verdict(&report, output)
}

/// The quality gate's failure as the error to exit with (5), or `Ok`.
fn gate_verdict(report: &Report, output: &Path) -> Result<()> {
    let (Some(q), Some(rejected)) = (&report.quality, &report.rejected_output) else {
        return Ok(());
    };
    let there = awq::io::output::untouched(output);
    Err(Error::GateFailed {
        message: format!(
            "quality gate failed: perplexity rose {:.2}% (from {:.4} to {:.4}), more than \
             --max-ppl-increase {}%; the checkpoint was not published at {} ({there}) and is \
             kept for inspection at {}",
            q.increase_pct,
            q.fp_perplexity,
            q.quantized_perplexity,
            q.max_increase_pct,
            output.display(),
            rejected.display()
        ),
        rejected_output: rejected.clone(),
    })
}

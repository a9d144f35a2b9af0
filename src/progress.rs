//! Rendering the library's events: an indicatif bar on a terminal, one plain line per layer in
//! logs (stderr not a terminal, `NO_COLOR` or `TERM=dumb`), JSON Lines on stdout with `--json`,
//! nothing with `--quiet`.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use awq::events::Event;
use awq::quantize::GroupReport;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;

/// Version of the JSON Lines event schema (README, "JSON events").
pub const SCHEMA: u32 = 1;

/// Set after the first failed write of a JSON event (other than a closed stdout).
static EMIT_FAILED: AtomicBool = AtomicBool::new(false);

pub struct Progress {
    quiet: bool,
    json: bool,
    verbose: bool,
    bar: Option<ProgressBar>,
    /// Seconds and count of the layers reported so far (for the ETA of plain lines).
    layer_seconds: std::sync::Mutex<(f64, usize)>,
    /// One past the last layer this run quantizes (a shard's range end; 0: every layer).
    last_layer: std::sync::atomic::AtomicUsize,
}

/// Whether stderr gets a live bar rather than plain lines.
fn fancy_terminal() -> bool {
    std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none()
        && std::env::var("TERM").map_or(true, |t| t != "dumb")
}

impl Progress {
    pub fn new(quiet: bool, json: bool, verbose: bool) -> Self {
        Self {
            quiet,
            json,
            verbose,
            bar: None,
            layer_seconds: std::sync::Mutex::new((0.0, 0)),
            last_layer: std::sync::atomic::AtomicUsize::new(0),
        }
        .with_bar()
    }

    fn with_bar(mut self) -> Self {
        if !self.quiet && fancy_terminal() {
            // Until the plan says how many layers there are: a spinner and the phase (not
            // `layer 0/0 (ETA 0s)`).
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                    .expect("static template"),
            );
            bar.set_message("preparing: model, calibration, checks");
            bar.enable_steady_tick(Duration::from_millis(200));
            self.bar = Some(bar);
        }
        self
    }

    /// A JSON Lines record on stdout, flushed. Once stdout's reader has gone away (EPIPE,
    /// `awq quantize --json | head -1`) nothing more is written there and the run goes on to
    /// completion: the checkpoint is its result, the events only report progress (see
    /// `stdout_error` in main; tests/pipes.rs checks it). Another write error is reported once
    /// on stderr.
    pub fn emit(&self, event: &str, body: serde_json::Value) {
        if crate::stdout_closed() {
            return;
        }
        let mut obj = json!({"schema": SCHEMA, "event": event});
        if let (Some(o), serde_json::Value::Object(b)) = (obj.as_object_mut(), body) {
            o.extend(b);
        }
        let mut out = std::io::stdout().lock();
        if let Err(e) = writeln!(out, "{obj}").and_then(|()| out.flush()) {
            let e = crate::stdout_error(e);
            if !crate::stdout_closed() && !EMIT_FAILED.swap(true, Ordering::Relaxed) {
                eprintln!("warning: JSON events lost: {e}");
            }
        }
    }

    pub fn handle(&self, ev: &Event) {
        if self.json {
            match ev {
                Event::Plan(plan) => self.emit("start", json!({ "plan": plan })),
                Event::Phase { name } => self.emit("phase", json!({ "name": name })),
                Event::Notice { message } => self.emit("notice", json!({ "message": message })),
                Event::Warning { message } => self.emit("warning", json!({ "message": message })),
                Event::Layer {
                    index,
                    total,
                    seconds,
                    report,
                } => self.emit(
                    "layer",
                    json!({
                        "index": index,
                        "total": total,
                        "seconds": seconds,
                        "groups": report.map_or(&[][..], |r| &r.groups),
                        "guard": report.and_then(|r| r.guard.as_ref()),
                        "rounding": report.and_then(|r| r.rounding.as_ref()),
                        "fp16_candidates": report.and_then(|r| r.fp16_candidates.as_ref()),
                    }),
                ),
            }
        }
        if let Event::Warning { message } = ev {
            // Shown even with --quiet: it describes the output, not the progress.
            match &self.bar {
                Some(bar) => bar.println(format!("warning: {message}")),
                None => eprintln!("warning: {message}"),
            }
            return;
        }
        if let Event::Plan(plan) = ev {
            let end = plan.layer_range.map_or(0, |r| r[1]);
            self.last_layer.store(end, Ordering::Relaxed);
        }
        if self.quiet {
            return;
        }
        match (&self.bar, ev) {
            (Some(bar), Event::Plan(plan)) => {
                bar.println(plan_line(plan));
                layer_style(bar, plan.layers);
            }
            (Some(bar), Event::Phase { name }) => bar.set_message(name.to_string()),
            (
                Some(bar),
                Event::Layer {
                    index,
                    total,
                    seconds,
                    report,
                },
            ) => {
                if bar.length() != Some(*total as u64) {
                    layer_style(bar, *total);
                }
                if let Some(r) = report {
                    bar.println(self.layer_line(*index, *total, *seconds, r));
                }
                bar.set_position(*index as u64 + 1);
                bar.set_message(String::new());
                if index + 1 == *total {
                    bar.finish_and_clear();
                }
            }
            (None, Event::Plan(plan)) if !self.json => eprintln!("[awq] {}", plan_line(plan)),
            (None, Event::Phase { name }) => eprintln!("[awq] {name}"),
            (_, Event::Notice { message }) => match &self.bar {
                Some(bar) => bar.println(format!("note: {message}")),
                None => eprintln!("[awq] note: {message}"),
            },
            (
                None,
                Event::Layer {
                    index,
                    total,
                    seconds,
                    report,
                },
            ) => {
                let line = match report {
                    Some(r) => self.layer_line(*index, *total, *seconds, r),
                    None => format!("layer {}/{total} {seconds:.1}s", index + 1),
                };
                let took = layer_time(*seconds, *report);
                eprintln!("[awq] {line}{}", self.eta(*index, *total, took));
            }
            _ => {}
        }
    }

    /// `layer 3/30 14.9s  qkv r=0.25 -31.0%  …`: what a finished layer chose.
    fn layer_line(
        &self,
        index: usize,
        total: usize,
        seconds: f64,
        report: &awq::quantize::LayerReport,
    ) -> String {
        format!(
            "layer {}/{total} {seconds:.1}s{}",
            index + 1,
            group_summary(&report.groups, self.verbose)
        )
    }

    /// `  ETA 7m12s` from the mean time of the layers seen so far (resumed layers count with
    /// the time they took), empty after the last layer.
    fn eta(&self, index: usize, total: usize, seconds: f64) -> String {
        let mut seen = self.layer_seconds.lock().unwrap_or_else(|e| e.into_inner());
        seen.0 += seconds;
        seen.1 += 1;
        let end = match self.last_layer.load(Ordering::Relaxed) {
            0 => total,
            end => end,
        };
        let left = end.saturating_sub(index + 1);
        if left == 0 {
            return String::new();
        }
        let mean = seen.0 / seen.1 as f64;
        format!("  ETA {}", crate::render::duration(mean * left as f64))
    }
}

/// What a finished layer took, for the ETA: a layer resumed from staging reports 0 s for this
/// run (it was only replayed), so its recorded time counts instead; averaging the replays' 0 s
/// made the ETA of a resumed run far too short.
fn layer_time(seconds: f64, report: Option<&awq::quantize::LayerReport>) -> f64 {
    match report {
        Some(r) if seconds == 0.0 => r.seconds.total(),
        _ => seconds,
    }
}

/// `plan: 30 layers of LlamaForCausalLM, 16 calibration blocks of 512 tokens, gemm group 64;
/// estimated 4m47s, 960 MiB peak`: the dry run's estimates too, so that a run shows them
/// without a second command.
fn plan_line(plan: &awq::quantize::Plan) -> String {
    format!(
        "plan: {} layers of {}, {} calibration blocks of {} tokens, {} group {}; estimated {}, \
         {:.0} MiB peak",
        plan.layers,
        plan.architecture,
        plan.calibration.blocks,
        plan.calibration.seqlen,
        plan.layout.name(),
        plan.group,
        crate::render::duration(plan.seconds_estimate),
        plan.peak_memory_estimate_mb
    )
}

/// The bar once the number of layers is known (before it: a spinner and the phase).
fn layer_style(bar: &ProgressBar, layers: usize) {
    bar.set_length(layers as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} layer {pos}/{len} {msg} (ETA {eta})",
        )
        .expect("static template"),
    );
}

/// `  experts.*.down ×128 mean r=0.32 -11.0% (2 s=1)`.
fn experts_summary(experts: &[&GroupReport]) -> String {
    let searched: Vec<&&GroupReport> = experts.iter().filter(|g| g.ratio.is_some()).collect();
    if searched.is_empty() {
        return format!("  experts.*.down ×{} s=1", experts.len());
    }
    let n = searched.len() as f64;
    let ratio = searched.iter().filter_map(|g| g.ratio).sum::<f64>() / n;
    let change = searched
        .iter()
        .filter(|g| g.identity_loss > 0.0)
        .map(|g| 100.0 * (g.loss / g.identity_loss - 1.0))
        .sum::<f64>()
        / n;
    let mut out = format!(
        "  experts.*.down ×{} mean r={ratio:.2} {change:+.1}%",
        experts.len()
    );
    if searched.len() < experts.len() {
        out += &format!(" ({} s=1)", experts.len() - searched.len());
    }
    out
}

/// `  qkv r=0.45 -12.3%  o s=1` — the chosen ratio and the loss reduction against plain
/// round-to-nearest (s = 1) per group.
/// A MoE layer's per-expert down groups are summarised in one entry where the first of them
/// stands: their count, mean ratio and mean loss change, and how many kept s = 1.
fn group_summary(groups: &[GroupReport], verbose: bool) -> String {
    let mut out = String::new();
    let is_expert = |g: &GroupReport| g.group.starts_with("experts.");
    let experts: Vec<&GroupReport> = groups.iter().filter(|g| is_expert(g)).collect();
    let mut experts_done = false;
    for g in groups {
        if is_expert(g) {
            if !experts_done {
                out += &experts_summary(&experts);
                experts_done = true;
            }
            continue;
        }
        let change = if g.identity_loss > 0.0 {
            100.0 * (g.loss / g.identity_loss - 1.0)
        } else {
            0.0
        };
        match g.ratio {
            Some(r) => out += &format!("  {} r={r:.2} {change:+.1}%", g.group),
            None => out += &format!("  {} s=1", g.group),
        }
        if verbose {
            out += &format!(" ({:.1}s, loss {:.3e})", g.seconds, g.loss);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resumed run's ETA counts the replayed layers with the time they took when quantized.
    #[test]
    fn the_eta_of_a_resumed_run_counts_the_replayed_layers_recorded_time() {
        let progress = Progress::new(true, false, false);
        let report: awq::quantize::LayerReport = serde_json::from_value(serde_json::json!({
            "layer": 0, "groups": [], "clip_mean_shrink": [], "max_abs_activation": 1.0,
            "max_abs_float_weight": 1.0,
            "seconds": {"load": 0.0, "forward": 2.0, "search": 8.0, "clip": 0.0, "guard": 0.0,
                        "fp16_budget": 0.0, "end_to_end": 0.0, "quantize": 0.0, "write": 0.0}
        }))
        .unwrap();
        assert_eq!(layer_time(0.0, Some(&report)), 10.0);
        assert_eq!(layer_time(4.0, Some(&report)), 4.0);
        assert_eq!(layer_time(0.0, None), 0.0);
        // Two replayed layers of 10 s, then one of 10 s: 7 left of 10.
        for i in 0..3 {
            let eta = progress.eta(i, 10, layer_time(0.0, Some(&report)));
            assert_eq!(
                eta,
                format!("  ETA {}", crate::render::duration(10.0 * (9 - i) as f64))
            );
        }
    }
}

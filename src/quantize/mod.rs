//! `awq quantize`: the per-layer AWQ pipeline (AWQ-SPEC §2, §14.2).
//!
//! Stages: [`prepare`] resolves and validates every input (model, value ranges, calibration,
//! quality-gate text, output location, an earlier run's staging) before layer 1, so nothing
//! fails after hours of work for a reason that was knowable at the start. Then, for each decoder
//! layer ([`layers`]): run it on the cached activations while capturing every linear's input
//! (the output, computed with the original weights, feeds the next layer: AutoAWQ semantics);
//! search the scales of every group on the original weights; apply them; search and apply
//! clipping; quantize (AutoAWQ's f16 recipe) and pack; write the layer's tensors to a part file
//! in the staging directory; drop the layer. At the end ([`write`]) the float dtype is chosen,
//! the parts become shards and the staging directory is renamed into place.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Instant;

use crate::calib::CalibOptions;
use crate::error::{Error, Result};
use crate::events::{Event, Sink};
use crate::io::writer::{self, Open, Staging, FINGERPRINT_FILE, PARTS_DIR};
use crate::model::Model;
use crate::quant::pack::Layout;
use crate::quant::search::Grid;

mod capture;
mod ct_config;
mod end_to_end;
mod experts;
mod fallback;
mod guard;
mod keep;
mod layer;
mod layers;
mod merge;
mod prepare;
mod report;
mod resume;
mod rounding;
pub mod shard;
mod write;

pub use capture::{parse_part, CaptureDone};
pub use merge::{merge, MergeOptions};
use report::{model_card, peak_rss_mb};
pub use report::{GroupReport, LayerReport, Plan, Quality, Report, RoundingPlan, Timings, Work};

/// `--fast`: score the scale search on this many evenly spaced blocks (see README for its
/// measured quality cost).
pub const FAST_SEARCH_BLOCKS: usize = 4;

/// `--rounding`: how the integer codes are chosen once scales and clipping are fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rounding {
    /// Round-to-nearest, AutoAWQ's.
    Rtn,
    /// Error feedback (GPTQ) with the same group scales and zero points; per linear, kept only
    /// where its calibration loss is lower than round-to-nearest's (`quant::gptq`).
    Gptq,
    /// Error feedback kept per linear only where its loss on the held-out calibration blocks
    /// is lower than round-to-nearest's ([`held_out`]); round-to-nearest without a split.
    Auto,
}

impl FromStr for Rounding {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "rtn" => Ok(Self::Rtn),
            "gptq" => Ok(Self::Gptq),
            "auto" => Ok(Self::Auto),
            _ => Err(format!("{s:?} is not one of auto, rtn, gptq")),
        }
    }
}

/// `--clip-sides`: how the clipping search cuts a group's range (`quant::clip::search`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClipSides {
    /// AutoAWQ's: one shrink of the abs-max, `±max_val`.
    Symmetric,
    /// AutoAWQ's, then the upper and the lower bound refined one at a time.
    Separate,
    /// Separate bounds kept per row and group only where they lower the clip objective on the
    /// held-out calibration blocks; symmetric elsewhere, and without a split.
    Auto,
}

impl FromStr for ClipSides {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "symmetric" => Ok(Self::Symmetric),
            "separate" => Ok(Self::Separate),
            "auto" => Ok(Self::Auto),
            _ => Err(format!("{s:?} is not one of auto, symmetric, separate")),
        }
    }
}

/// `--dtype`: the float dtype of the tensors that stay unquantized (embeddings, norms, biases,
/// head) and of `torch_dtype`. AWQ `scales` are float16 in every case (the loaders' kernels
/// require it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DtypeChoice {
    /// float16, unless a value or a calibration activation exceeds float16's range (±65504):
    /// then bfloat16, with a notice.
    Auto,
    /// float16 whatever happens (a loud warning when activations overflow it).
    Float16,
    Bfloat16,
}

impl FromStr for DtypeChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "float16" | "fp16" | "f16" | "half" => Ok(Self::Float16),
            "bfloat16" | "bf16" => Ok(Self::Bfloat16),
            _ => Err(format!("{s:?} is not one of auto, float16, bfloat16")),
        }
    }
}

/// Everything a run needs, resolved from the command line; stored in a shard's manifest so that
/// `awq merge` runs with the same options.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct QuantizeOptions {
    pub model: String,
    pub revision: Option<String>,
    pub output: PathBuf,
    pub w_bit: u8,
    pub group: usize,
    pub layout: Layout,
    pub calib: CalibOptions,
    pub grid: Grid,
    /// Ratios in the scale grid (≥ 2: ratio 0 alone is the identity).
    pub n_grid: usize,
    pub clip: bool,
    /// How the clipping search cuts each group's range.
    pub clip_sides: ClipSides,
    /// Run the layer-output guard (never worse than round-to-nearest on each layer's output).
    pub guard: bool,
    /// How the codes are chosen once scales and clipping are fixed.
    pub rounding: Rounding,
    /// `--keep-fp16`: keep the most damaging dense linears in float until the checkpoint has
    /// grown by this percentage of its all-quantized size (`keep`); `None`: quantize all.
    pub keep_fp16: Option<f64>,
    /// Skip the scale search (plain round-to-nearest, still clipped unless `clip` is false).
    pub no_search: bool,
    /// Score search candidates on at most this many evenly spaced calibration blocks (the
    /// activation statistics still use every block). `None`: all blocks, the exact objective.
    pub search_blocks: Option<usize>,
    /// Largest shard in bytes.
    pub shard_size: u64,
    /// Replace an existing output that is empty or an earlier AWQ output, or discard an
    /// interrupted run's staging whose settings differ.
    pub force: bool,
    /// Resolve and report the plan; write nothing.
    pub dry_run: bool,
    /// Insist on resuming (a matching interrupted run is resumed in any case).
    pub resume: bool,
    /// Do nothing (exit 0) when the output already holds an awq output of this run's
    /// fingerprint.
    pub skip_existing: bool,
    /// The model card's title (`None`: the Hub id, else the model directory's name).
    pub name: Option<String>,
    /// The model card's `base_model` (`None`: the Hub id of the source, if it has one).
    pub base_model: Option<String>,
    /// Float dtype of the unquantized tensors.
    pub dtype: DtypeChoice,
    /// How `--version auto` chose the layout (`None` when the layout was given; not read back
    /// from a shard's manifest).
    #[serde(skip_deserializing)]
    pub layout_choice: Option<crate::gpu::LayoutChoice>,
    /// Perplexity gate run on the finished checkpoint before it is published.
    pub quality_gate: Option<QualityGate>,
    /// `--shard K/N` / `--layers A..B`: quantize these layers only, into a shard directory
    /// for `awq merge` (`None`: the whole model into a checkpoint).
    #[serde(default)]
    pub shard: Option<shard::ShardSpec>,
    /// `--dry-run --shards N`: plan N shards (ranges, seconds, memory); with `capture`, the
    /// shard count the boundaries are written for.
    #[serde(default)]
    pub plan_shards: Option<usize>,
    /// `--capture J/M`: capture job `J` of `M` (the float forward of its slice of the
    /// calibration blocks, written at every shard boundary) instead of quantizing.
    #[serde(default)]
    pub capture: Option<(usize, usize)>,
    /// `--activations DIR`: a shard's input, handed over by the capture jobs under `DIR`
    /// (ranges then balanced without a prefix to pay).
    #[serde(default)]
    pub activations: Option<PathBuf>,
}

/// Whether a run writes plain round-to-nearest: no scale search (`no_search`), no clip, and
/// round-to-nearest codes. Such a run has nothing to guard or check end to end; the CLI turns
/// its guard off and the end-to-end check names it as the reason.
pub fn plain_rtn(no_search: bool, clip: bool, rounding: Rounding) -> bool {
    no_search && !clip && rounding == Rounding::Rtn
}

impl QuantizeOptions {
    /// Whether a choice is judged on the held-out calibration blocks
    /// ([`crate::calib::held_out`]): `--rounding auto` or `--clip-sides auto`.
    pub fn judges_held_out(&self) -> bool {
        self.rounding == Rounding::Auto || self.clip_sides == ClipSides::Auto
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct QualityGate {
    pub text: PathBuf,
    /// Largest accepted increase of the quantized over the fp perplexity, in percent.
    pub max_increase_pct: f64,
    pub max_tokens: usize,
}

pub enum Outcome {
    DryRun(Box<Plan>),
    /// The checkpoint was written: at the output, or — when the quality gate failed — at
    /// [`Report::rejected_output`].
    Done(Box<Report>),
    /// `--skip-existing`: the output already holds this run's checkpoint; nothing was done.
    UpToDate,
    /// A shard run (`--shard`, `--layers`) wrote its shard directory.
    Shard(Box<ShardDone>),
    /// A capture job (`--capture`) wrote its boundary activations.
    Capture(Box<capture::CaptureDone>),
}

pub const TOOL: &str = concat!("awq ", env!("CARGO_PKG_VERSION"));
/// The model card written into the output.
const CARD: &str = "README.md";
/// The run's report, written last; also how an earlier awq output is recognised.
pub const REPORT: &str = crate::io::output::REPORT_FILE;

/// Quantizes `opts.model` into `opts.output` (or, with `dry_run`, validates and plans only).
///
/// Errors: usage (exit 2: bad options, output on an input, a staging that does not match),
/// input (3: model, calibration or gate text missing or invalid, values beyond float16),
/// output exists (4), quality gate (5, raised by the caller from the report's
/// `rejected_output`), network (6), interrupted (130), runtime (1, also a full disk).
/// Nothing is left at the output path unless the run succeeds and passes its quality gate; an
/// interrupted or disk-full run keeps its finished layers in the staging directory.
pub fn run(opts: &QuantizeOptions, events: Sink) -> Result<Outcome> {
    let start = Instant::now();
    let (flop0, mm0) = crate::ops::matmul_totals();
    let prep = match prepare::prepare(opts)? {
        prepare::Prepare::Work(prep) => *prep,
        prepare::Prepare::UpToDate => {
            events(&Event::Notice {
                message: format!(
                    "--skip-existing: {} already holds this run's checkpoint (same model \
                     contents, calibration and options); nothing to do",
                    opts.output.display()
                ),
            });
            return Ok(Outcome::UpToDate);
        }
    };
    // The plan first, so `--json | head -1` is the start event; then what it warns of, and the
    // staging note (the plan carries the same sentence).
    events(&Event::Plan(&prep.plan));
    for message in prepare::warnings(opts, &prep) {
        events(&Event::Warning { message });
    }
    if let Some(note) = &prep.plan.staging {
        events(&Event::Notice {
            message: note.clone(),
        });
    }
    if opts.dry_run {
        return Ok(Outcome::DryRun(Box::new(prep.plan)));
    }
    let mut staging = Staging::open(&opts.output, prep.open)?;
    if let (Some(part), Some(shards)) = (opts.capture, opts.plan_shards) {
        let done = capture::run(opts, &prep, part, shards, &staging.dir, events)
            .map_err(|e| stopped(e, &mut staging, opts, events))?;
        staging.publish(opts.force)?;
        return Ok(Outcome::Capture(Box::new(done)));
    }
    if let Some(range) = prep.range.clone() {
        let done = match produce_shard(opts, prep, &staging, events, start, range) {
            Err(e) => return Err(stopped(e, &mut staging, opts, events)),
            Ok(done) => done,
        };
        staging.publish(opts.force)?;
        return Ok(Outcome::Shard(Box::new(done)));
    }
    finish(
        opts,
        prep,
        staging,
        events,
        Source::Run,
        (start, flop0, mm0),
    )
}

/// The error a run that stopped early exits with: an interrupted or disk-full run keeps its
/// finished layers for a rerun.
fn stopped(e: Error, staging: &mut Staging, opts: &QuantizeOptions, events: Sink) -> Error {
    match e {
        Error::Interrupted => keep_finished_layers(staging, events),
        Error::DiskFull(why) => disk_full(staging, opts, why),
        other => other,
    }
}

/// Produces the checkpoint in `staging` from `source` and publishes it: at the output, or at
/// `OUT.rejected` when the quality gate failed.
fn finish(
    opts: &QuantizeOptions,
    prep: prepare::Prepared,
    mut staging: Staging,
    events: Sink,
    source: Source,
    clocks: (Instant, f64, f64),
) -> Result<Outcome> {
    let report = match produce(opts, prep, &staging, events, source, clocks) {
        Err(e) => return Err(stopped(e, &mut staging, opts, events)),
        Ok(report) => report,
    };
    match &report.rejected_output {
        // Replaces only an earlier rejected awq output (never anything else).
        Some(rejected) => staging.publish_at(rejected, true)?,
        None => {
            staging.publish(opts.force)?;
            remove_stale_rejected(opts)?;
        }
    }
    Ok(Outcome::Done(Box::new(report)))
}

/// After a gated run passed: an `OUT.rejected` an earlier failed gate left (an awq output,
/// nothing else) no longer describes `-o`, so it is removed.
fn remove_stale_rejected(opts: &QuantizeOptions) -> Result<()> {
    use crate::io::output::{existing, rejected_path, Existing};
    let rejected = rejected_path(&opts.output);
    if opts.quality_gate.is_some() && existing(&rejected) == Existing::AwqOutput {
        std::fs::remove_dir_all(&rejected)
            .map_err(|e| Error::Runtime(format!("cannot remove {}: {e}", rejected.display())))?;
    }
    Ok(())
}

/// Where a checkpoint's finished layers come from.
enum Source<'a> {
    /// Quantized by this run, every layer.
    Run,
    /// Finished by the shards of one job (`awq merge`), in layer order.
    Shards(&'a [merge::Shard]),
}

/// What a shard run wrote: its range, the wall time and the shard directory's files.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ShardDone {
    pub output: PathBuf,
    pub layers: [usize; 2],
    pub total_layers: usize,
    pub seconds: f64,
    pub prefix_seconds: f64,
}

/// A shard run: the float forward through the layers before `range`, its layers quantized into
/// the staging directory's parts, which become `layers/` beside `manifest.json`.
fn produce_shard(
    opts: &QuantizeOptions,
    prep: prepare::Prepared,
    staging: &Staging,
    events: Sink,
    start: Instant,
    range: std::ops::Range<usize>,
) -> Result<ShardDone> {
    let parts_dir = open_parts(&prep, staging)?;
    let mut work = Work::default();
    let input = match (&opts.activations, range.start) {
        (Some(dir), start) if start > 0 => {
            Some(capture::load(dir, start, &prep, opts.calib.seqlen)?)
        }
        _ => None,
    };
    let done = layers::run_layers(
        opts,
        &prep,
        range.clone(),
        input,
        &parts_dir,
        events,
        &mut work,
    )?;
    events(&Event::Phase { name: "write" });
    let done = ShardDone {
        output: opts.output.clone(),
        layers: [range.start, range.end],
        total_layers: prep.model.spec.layers,
        seconds: start.elapsed().as_secs_f64(),
        prefix_seconds: done.prefix_seconds,
    };
    let manifest = shard::Manifest {
        kind: shard::MANIFEST_KIND.into(),
        version: 1,
        tool: TOOL.into(),
        fingerprint: prep.fingerprint,
        options: opts.clone(),
        layers: done.layers,
        total_layers: done.total_layers,
        seconds: done.seconds,
        prefix_seconds: done.prefix_seconds,
        host: writer::hostname(),
    };
    let layers_dir = staging.dir.join(shard::LAYERS_DIR);
    std::fs::rename(&parts_dir, &layers_dir)
        .map_err(|e| Error::Runtime(format!("cannot rename {}: {e}", parts_dir.display())))?;
    std::fs::remove_file(staging.dir.join(FINGERPRINT_FILE))
        .map_err(|e| Error::Runtime(format!("cannot remove the staged fingerprint: {e}")))?;
    let json = serde_json::to_value(&manifest).map_err(|e| Error::Runtime(e.to_string()))?;
    writer::write_json(&staging.dir.join(shard::MANIFEST), &json)?;
    Ok(done)
}

/// The staging directory's parts directory, with the run's fingerprint beside it (a resumed
/// run keeps the one it found).
fn open_parts(prep: &prepare::Prepared, staging: &Staging) -> Result<PathBuf> {
    if prep.open != Open::Resume {
        writer::write_json(
            &staging.dir.join(FINGERPRINT_FILE),
            &prep.staged_fingerprint,
        )?;
    }
    let parts_dir = staging.dir.join(PARTS_DIR);
    std::fs::create_dir_all(&parts_dir)
        .map_err(|e| Error::Runtime(format!("cannot create {}: {e}", parts_dir.display())))?;
    Ok(parts_dir)
}

/// Everything from the first layer to the report, written into `staging` (published by the
/// caller): the layers (quantized, or gathered from shards), the head and shards, the quality
/// gate, the card and the report.
fn produce(
    opts: &QuantizeOptions,
    prep: prepare::Prepared,
    staging: &Staging,
    events: Sink,
    source: Source,
    (start, flop0, mm0): (Instant, f64, f64),
) -> Result<Report> {
    let parts_dir = open_parts(&prep, staging)?;
    let mut work = Work {
        calibration_seconds: prep.calibration_seconds,
        ..Work::default()
    };
    let layers = 0..prep.model.spec.layers;
    let (done, shards) = match source {
        Source::Run => {
            let done =
                layers::run_layers(opts, &prep, layers, None, &parts_dir, events, &mut work)?;
            (done, None)
        }
        Source::Shards(shards) => {
            let done = merge::gather(shards, layers, events, &mut work)?;
            (
                done,
                Some(shards.iter().map(merge::Shard::report).collect()),
            )
        }
    };

    let mut done = done;
    if end_to_end::applies(opts, &prep.model.spec) {
        fallback::check(opts, &prep, &parts_dir, &mut done, events, &mut work)?;
    }
    if let Some(message) = report::expert_tokens(&done.reports) {
        events(&Event::Notice { message });
    }
    if let Some(message) = report::quiet_experts(&done.reports) {
        events(&Event::Warning { message });
    }
    events(&Event::Phase { name: "write" });
    let clock = Instant::now();
    let (float_dtype, dtype_reason) =
        write::choose_dtype(opts.dtype, prep.beyond_f16.as_ref(), &done.reports, events);
    write::check_space_for_head(opts, &prep.model, &parts_dir)?;
    let written = write::write_checkpoint(
        opts,
        &prep.model,
        &staging.dir,
        &done.reports,
        done.parts,
        done.names,
        float_dtype,
    )?;
    let mut output_files = written.files;
    if let Some(message) = written
        .kept_fp16
        .as_ref()
        .and_then(|k| keep::nothing_kept(k, &done.reports))
    {
        events(&Event::Warning { message });
    }
    work.seconds.write += clock.elapsed().as_secs_f64();
    let quality = match (&opts.quality_gate, &prep.gate_ids) {
        (Some(gate), Some(ids)) => {
            events(&Event::Phase { name: "quality" });
            Some(quality_gate(gate, ids, &prep.model, &staging.dir)?)
        }
        _ => None,
    };
    let seconds_total = start.elapsed().as_secs_f64();
    let (flop1, mm1) = crate::ops::matmul_totals();
    work.matmul_gflop = flop1 - flop0;
    work.matmul_seconds = mm1 - mm0;
    work.matmul_gflops = work.matmul_gflop / work.matmul_seconds.max(1e-9);
    work.matmul_share = work.matmul_seconds / seconds_total;
    work.peak_rss_mb = peak_rss_mb();
    let rejected_output = quality
        .as_ref()
        .filter(|q| !q.passed)
        .map(|_| crate::io::output::rejected_path(&opts.output));
    let checked = done.end_to_end.is_some();
    let report = Report {
        tool: TOOL.into(),
        options: opts.clone(),
        architecture: prep.model.spec.architecture.clone(),
        source_dir: prep.dir,
        calibration: prep.cal.summary,
        plan: prep.plan,
        quality,
        float_dtype,
        dtype_reason,
        layers: done.reports,
        end_to_end: done.end_to_end,
        kept_fp16: written.kept_fp16,
        files: written.shards,
        output_files: {
            output_files.extend([CARD.to_string(), REPORT.to_string()]);
            output_files.sort();
            output_files
        },
        seconds_total,
        work,
        fingerprint: fallback::with_hook(&prep.fingerprint, checked),
        rejected_output,
        shards,
    };
    std::fs::write(staging.dir.join(CARD), model_card(&report))
        .map_err(|e| Error::Runtime(format!("cannot write the model card: {e}")))?;
    let json = serde_json::to_value(&report).map_err(|e| Error::Runtime(e.to_string()))?;
    writer::write_json(&staging.dir.join(REPORT), &json)?;
    write::remove_parts(&staging.dir)?;
    Ok(report)
}

/// On SIGINT/SIGTERM: finished layers are work that a rerun of the same command continues
/// from, so the staging directory is kept when it holds any (and said so even with `-q`);
/// with none it is removed. Returns the error to exit with (130).
fn keep_finished_layers(staging: &mut Staging, events: Sink) -> Error {
    let done = staging.layers_done();
    if done > 0 {
        staging.keep();
        events(&Event::Warning {
            message: format!(
                "interrupted: {done} finished layer(s) are kept in {d}; rerun the same command to \
                 continue, or remove {d}",
                d = staging.dir.display()
            ),
        });
    }
    Error::Interrupted
}

/// On a full disk: as on an interruption, finished layers are work that the same command
/// continues from once space is freed, so the staging directory is kept when it holds any.
/// Returns the error to exit with (1), saying what was kept and what to do.
fn disk_full(staging: &mut Staging, opts: &QuantizeOptions, why: String) -> Error {
    let done = staging.layers_done();
    let output = crate::io::output::untouched(&opts.output);
    let kept = if done > 0 {
        staging.keep();
        format!(
            "{done} finished layer(s) are kept in {}; free some space and rerun the same command \
             to continue from them",
            staging.dir.display()
        )
    } else {
        "no layer had finished; free some space and rerun".to_string()
    };
    Error::DiskFull(format!(
        "{why}: the disk is full. {kept} (the output path {}: {output})",
        opts.output.display()
    ))
}

/// Perplexity of the source and of the finished (staged) checkpoint on the gate's tokens
/// (already cut into windows by [`prepare`]), with `awq eval`'s protocol.
fn quality_gate(
    gate: &QualityGate,
    ids: &[u32],
    fp: &Model,
    staged: &std::path::Path,
) -> Result<Quality> {
    let seqlen = prepare::gate_seqlen(gate);
    let fp_ppl = crate::eval::perplexity(fp, ids, seqlen, &|_| {})?.perplexity;
    let quantized = Model::open(staged)?;
    let q_ppl = crate::eval::perplexity(&quantized, ids, seqlen, &|_| {})?.perplexity;
    let increase_pct = 100.0 * (q_ppl / fp_ppl - 1.0);
    Ok(Quality {
        text: gate.text.clone(),
        tokens: ids.len(),
        fp_perplexity: fp_ppl,
        quantized_perplexity: q_ppl,
        increase_pct,
        max_increase_pct: gate.max_increase_pct,
        passed: increase_pct <= gate.max_increase_pct,
    })
}

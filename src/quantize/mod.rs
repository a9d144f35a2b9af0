//! `awq quantize`: the per-layer AWQ pipeline (AWQ-SPEC §2, §14.2).
//!
//! For each decoder layer: run it on the cached activations while capturing every linear's input
//! (the output, computed with the original weights, feeds the next layer: AutoAWQ semantics);
//! search the scales of every group on the original weights; apply them; search and apply
//! clipping; quantize (AutoAWQ's f16 recipe) and pack; write the layer's tensors to a part file
//! in the staging directory; drop the layer. At the end the parts become shards and the staging
//! directory is renamed into place.

use std::path::PathBuf;
use std::time::Instant;

use crate::calib::{self, CalibOptions};
use crate::error::{Error, Result};
use crate::events::{Event, Sink};
use crate::io::fingerprint;
use crate::io::reader::Checkpoint;
use crate::io::writer::{self, Found, OutTensor, Staging};
use crate::model::groups::{clipped, scale_groups};
use crate::model::layer::layer_prefix;
use crate::model::rope::Rope;
use crate::model::{Model, EMBED, FINAL_NORM, LM_HEAD};
use crate::quant::clip;
use crate::quant::pack::{check_shape, Layout};
use crate::quant::search::Grid;

mod layer;
mod report;
mod resume;

use layer::{apply_scales, group_absmax, layer_tensors, linear_input, search_group};
use report::{make_plan, model_card, peak_rss_mb};
pub use report::{GroupReport, LayerReport, Plan, Quality, Report, Timings, Work};
use resume::{fingerprint, LayerRecord, FINGERPRINT_FILE};

/// `--fast`: score the scale search on this many evenly spaced blocks (see README for its
/// measured quality cost).
pub const FAST_SEARCH_BLOCKS: usize = 4;

#[derive(Debug, Clone, serde::Serialize)]
pub struct QuantizeOptions {
    pub model: String,
    pub revision: Option<String>,
    pub output: PathBuf,
    pub w_bit: u8,
    pub group: usize,
    pub layout: Layout,
    pub calib: CalibOptions,
    pub grid: Grid,
    pub n_grid: usize,
    pub clip: bool,
    /// Skip the scale search (plain round-to-nearest, still clipped unless `clip` is false).
    pub no_search: bool,
    /// Score search candidates on at most this many evenly spaced calibration blocks (the
    /// activation statistics still use every block). `None`: all blocks, the exact objective.
    pub search_blocks: Option<usize>,
    pub shard_size: u64,
    pub force: bool,
    /// Resolve and report the plan; write nothing.
    pub dry_run: bool,
    /// Continue an interrupted (killed) run from its staging directory.
    pub resume: bool,
    /// How `--version auto` chose the layout (`None` when the layout was given).
    pub layout_choice: Option<crate::gpu::LayoutChoice>,
    /// Perplexity gate run on the finished checkpoint before it is published.
    pub quality_gate: Option<QualityGate>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct QualityGate {
    pub text: PathBuf,
    /// Largest accepted increase of the quantized over the fp perplexity, in percent.
    pub max_increase_pct: f64,
    pub max_tokens: usize,
}

pub enum Outcome {
    DryRun(Box<Plan>),
    Done(Box<Report>),
}

pub const TOOL: &str = concat!("awq ", env!("CARGO_PKG_VERSION"));

/// Refuses unsupported settings and shapes before any work (AWQ-SPEC §8, §10).
fn check(opts: &QuantizeOptions, model: &Model) -> Result<()> {
    if opts.w_bit != 4 {
        return Err(Error::Usage(format!(
            "--w-bit {} is not supported: the packed AWQ layouts (GEMM, GEMV) hold 4-bit codes only",
            opts.w_bit
        )));
    }
    if opts.group == 0 {
        return Err(Error::Usage("--group must be positive".into()));
    }
    let s = &model.spec;
    for l in s.linears() {
        check_shape(
            &format!("{}.{}.weight", layer_prefix(0), l.name),
            l.out,
            l.inp,
            opts.group,
        )?;
    }
    if opts.layout == Layout::Gemv {
        crate::quant::pack::gemv_zeros_width(s.hidden, opts.group)?;
    }
    if opts.output.exists() && !opts.force {
        return Err(Error::OutputExists(format!(
            "{} already exists; pass --force to replace it",
            opts.output.display()
        )));
    }
    Ok(())
}

pub fn run(opts: &QuantizeOptions, events: Sink) -> Result<Outcome> {
    let start = Instant::now();
    let dir = crate::io::source::resolve(&opts.model, opts.revision.as_deref())?;
    let model = Model::open(&dir)?;
    if model.spec.awq.is_some() {
        return Err(Error::Input(format!(
            "{} is already AWQ-quantized",
            dir.display()
        )));
    }
    check(opts, &model)?;
    let tok = crate::tokenize::load(&dir)?;
    let (flop0, mm0) = crate::ops::matmul_totals();
    let clock = Instant::now();
    let cal = calib::build(&tok, &opts.calib)?;
    let mut work = Work {
        calibration_seconds: clock.elapsed().as_secs_f64(),
        ..Work::default()
    };
    let plan = make_plan(opts, &dir, &model.spec, &cal.summary);
    events(&Event::Plan(&plan));
    if opts.dry_run {
        return Ok(Outcome::DryRun(Box::new(plan)));
    }
    let (mut staging, found) = Staging::open(&opts.output, opts.resume)?;
    match &found {
        Found::StaleRemoved(old) => events(&Event::Notice {
            message: format!(
                "removed {}, left by an interrupted run (pass --resume to continue such a run instead)",
                old.display()
            ),
        }),
        Found::Fresh if opts.resume => events(&Event::Notice {
            message: "--resume: no interrupted run to resume; starting from layer 1".into(),
        }),
        _ => {}
    }
    let fp = fingerprint(opts, &model, &cal.ids)?;
    let fp_path = staging.dir.join(FINGERPRINT_FILE);
    let resumed = found == Found::Resumed;
    if resumed {
        let stored: Option<serde_json::Value> = std::fs::read(&fp_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let diff = match &stored {
            Some(stored) => fingerprint::first_difference(stored, &fp),
            None => Some("fingerprint (missing or unreadable)".into()),
        };
        if let Some(field) = diff {
            staging.keep();
            return Err(Error::Usage(format!(
                "cannot resume {}: the {field} differ(s) from the interrupted run's; rerun with the \
                 same model, calibration and options, or without --resume to start over",
                staging.dir.display()
            )));
        }
    } else {
        writer::write_json(&fp_path, &fp)?;
    }
    let parts_dir = staging.dir.join(".parts");
    std::fs::create_dir_all(&parts_dir)
        .map_err(|e| Error::Runtime(format!("cannot create {}: {e}", parts_dir.display())))?;

    let spec = &model.spec;
    let seqlen = opts.calib.seqlen;
    let rope = Rope::new(spec, seqlen)?;
    let mut hidden = model.embed(&cal.ids)?;
    let mut parts = Vec::new();
    let mut names = vec![EMBED.to_string()];
    let mut layers = Vec::new();
    for i in 0..spec.layers {
        crate::interrupt::check()?;
        let part = parts_dir.join(format!("layer-{i:05}.safetensors"));
        let record_path = parts_dir.join(format!("layer-{i:05}.json"));
        if resumed && record_path.is_file() {
            // Done before the interruption: keep its part, recompute only the original layer's
            // output that feeds the next one.
            let record: LayerRecord = std::fs::read(&record_path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .ok_or_else(|| {
                    Error::Runtime(format!(
                        "{} is unreadable; remove {} and start over",
                        record_path.display(),
                        staging.dir.display()
                    ))
                })?;
            let layer = model.layer(i)?;
            hidden = layer.forward(spec, &rope, &hidden, seqlen, false)?.0;
            events(&Event::Layer {
                index: i,
                total: spec.layers,
                seconds: 0.0,
                groups: &record.report.groups,
            });
            names.extend(record.tensors);
            parts.push(part);
            layers.push(record.report);
            continue;
        }
        let mut t = Timings::default();
        let clock = Instant::now();
        let mut layer = model.layer(i)?;
        t.load = clock.elapsed().as_secs_f64();
        let clock = Instant::now();
        let (out, inputs) = layer.forward(spec, &rope, &hidden, seqlen, true)?;
        let mut inputs = inputs.expect("captured");
        t.forward = clock.elapsed().as_secs_f64();

        let clock = Instant::now();
        let mut groups = Vec::new();
        let mut choices = Vec::new();
        for g in scale_groups(spec) {
            let clock = Instant::now();
            let choice = search_group(&layer, g, &inputs, spec, &rope, seqlen, opts)?;
            groups.push(GroupReport {
                group: g.name.to_string(),
                // k / n_grid, kept short in JSON (an f32 would print as 0.10000000149…).
                ratio: choice.ratio.map(|r| (r as f64 * 1e6).round() / 1e6),
                loss: choice.loss,
                identity_loss: choice.identity_loss,
                seconds: clock.elapsed().as_secs_f64(),
            });
            choices.push((g, choice));
        }
        for (g, choice) in &choices {
            apply_scales(&mut layer, &mut inputs, g, &choice.scales)?;
        }
        t.search = clock.elapsed().as_secs_f64();

        let clock = Instant::now();
        let mut clip_mean_shrink = Vec::new();
        if opts.clip {
            for (name, lin) in layer.linears_mut() {
                if !clipped(name) {
                    continue;
                }
                let x = clip::subsample(linear_input(&inputs, name))?;
                let max_val = clip::search(&lin.weight, &x, opts.group)?;
                let absmax = group_absmax(&lin.weight, opts.group)?;
                let shrink = max_val
                    .iter()
                    .zip(&absmax)
                    .map(|(m, a)| if *a > 0.0 { m / a } else { 1.0 })
                    .sum::<f32>()
                    / max_val.len() as f32;
                clip_mean_shrink.push((name.to_string(), shrink));
                lin.weight = clip::apply(&lin.weight, &max_val, opts.group)?;
            }
        }
        t.clip = clock.elapsed().as_secs_f64();

        let clock = Instant::now();
        let tensors = layer_tensors(&layer, i, opts)?;
        t.quantize = clock.elapsed().as_secs_f64();
        let clock = Instant::now();
        writer::write_file(&part, &tensors)?;
        let tensor_names: Vec<String> = tensors.iter().map(|t| t.name.clone()).collect();
        names.extend(tensor_names.iter().cloned());
        parts.push(part);
        t.write = clock.elapsed().as_secs_f64();

        hidden = out;
        work.seconds.add(&t);
        let report = LayerReport {
            layer: i,
            groups,
            clip_mean_shrink,
            seconds: t,
        };
        // Written after the part: a layer counts as done for --resume only with both.
        let record = LayerRecord {
            report,
            tensors: tensor_names,
        };
        writer::write_json(
            &record_path,
            &serde_json::to_value(&record).map_err(|e| Error::Runtime(e.to_string()))?,
        )?;
        events(&Event::Layer {
            index: i,
            total: spec.layers,
            seconds: record.report.seconds.total(),
            groups: &record.report.groups,
        });
        layers.push(record.report);
    }
    drop(hidden);

    events(&Event::Phase { name: "write" });
    let clock = Instant::now();
    let mut head = vec![
        OutTensor::f16(
            EMBED.into(),
            vec![spec.vocab, spec.hidden],
            &model
                .ckpt
                .f32(EMBED, &[spec.vocab, spec.hidden])?
                .flatten_all()?
                .to_vec1()?,
        ),
        OutTensor::f16(
            FINAL_NORM.into(),
            vec![spec.hidden],
            &model.final_norm()?.to_vec1()?,
        ),
    ];
    names.push(FINAL_NORM.into());
    if !spec.tied_embeddings {
        head.push(OutTensor::f16(
            LM_HEAD.into(),
            vec![spec.vocab, spec.hidden],
            &model.lm_head()?.flatten_all()?.to_vec1()?,
        ));
        names.push(LM_HEAD.into());
    }
    let head_part = parts_dir.join("head.safetensors");
    writer::write_file(&head_part, &head)?;
    drop(head);
    parts.push(head_part);
    let part_ckpt = Checkpoint::open_files(parts)?;
    let files = writer::write_shards(&staging.dir, &part_ckpt, &names, opts.shard_size)?;
    work.seconds.write += clock.elapsed().as_secs_f64();
    drop(part_ckpt);
    std::fs::remove_dir_all(&parts_dir)
        .map_err(|e| Error::Runtime(format!("cannot remove {}: {e}", parts_dir.display())))?;
    std::fs::remove_file(&fp_path)
        .map_err(|e| Error::Runtime(format!("cannot remove {}: {e}", fp_path.display())))?;

    let version = opts.layout.name();
    let qcfg = serde_json::json!({
        "quant_method": "awq",
        "zero_point": true,
        "group_size": opts.group,
        "bits": opts.w_bit,
        "version": version,
        "modules_to_not_convert": null,
    });
    writer::write_json(
        &staging.dir.join("config.json"),
        &writer::patch_config(&dir.join("config.json"), qcfg)?,
    )?;
    writer::write_json(
        &staging.dir.join("quant_config.json"),
        &serde_json::json!({"zero_point": true, "q_group_size": opts.group, "w_bit": opts.w_bit, "version": version.to_uppercase()}),
    )?;
    writer::copy_companions(&dir, &staging.dir)?;
    let quality = match &opts.quality_gate {
        Some(gate) => {
            events(&Event::Phase { name: "quality" });
            Some(quality_gate(gate, &model, &staging.dir, &tok)?)
        }
        None => None,
    };
    let seconds_total = start.elapsed().as_secs_f64();
    let (flop1, mm1) = crate::ops::matmul_totals();
    work.matmul_gflop = flop1 - flop0;
    work.matmul_seconds = mm1 - mm0;
    work.matmul_gflops = work.matmul_gflop / work.matmul_seconds.max(1e-9);
    work.matmul_share = work.matmul_seconds / seconds_total;
    work.peak_rss_mb = peak_rss_mb();
    let report = Report {
        tool: TOOL.into(),
        options: opts.clone(),
        plan,
        quality,
        source_dir: dir.clone(),
        architecture: spec.architecture.clone(),
        calibration: cal.summary,
        layers,
        files,
        seconds_total,
        work,
    };
    std::fs::write(staging.dir.join("README.md"), model_card(&report))
        .map_err(|e| Error::Runtime(format!("cannot write the model card: {e}")))?;
    let json = serde_json::to_value(&report).map_err(|e| Error::Runtime(e.to_string()))?;
    writer::write_json(&staging.dir.join("quantization_report.json"), &json)?;
    staging.publish(opts.force)?;
    Ok(Outcome::Done(Box::new(report)))
}

/// Perplexity of the source and of the finished (staged) checkpoint on the gate's text, with
/// `awq eval`'s protocol (windows of 2048 over the first `max_tokens` tokens).
fn quality_gate(
    gate: &QualityGate,
    fp: &Model,
    staged: &std::path::Path,
    tok: &tokenizers::Tokenizer,
) -> Result<Quality> {
    let bytes = std::fs::read(&gate.text).map_err(|e| Error::input_io(&gate.text, e))?;
    let text = String::from_utf8(bytes)
        .map_err(|e| crate::input_err!("{} is not UTF-8: {e}", gate.text.display()))?;
    let ids = crate::tokenize::encode(tok, &text, false)?;
    let eval_opts = crate::eval::EvalOptions {
        seqlen: crate::eval::DEFAULT_SEQLEN.min(gate.max_tokens),
        max_tokens: Some(gate.max_tokens),
    };
    let ids = crate::eval::windows(&ids, &eval_opts)?;
    let fp_ppl = crate::eval::perplexity(fp, &ids, eval_opts.seqlen, &|_| {})?.perplexity;
    let quantized = Model::open(staged)?;
    let q_ppl = crate::eval::perplexity(&quantized, &ids, eval_opts.seqlen, &|_| {})?.perplexity;
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

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

use candle_core::Tensor;

use crate::calib::{self, CalibOptions, CalibSummary};
use crate::error::{Error, Result};
use crate::events::{Event, Sink};
use crate::io::fingerprint;
use crate::io::reader::Checkpoint;
use crate::io::writer::{self, Found, OutTensor, Staging};
use crate::model::groups::{clipped, Input, Inspect, PrevOp, ScaleGroup, LLAMA_GROUPS};
use crate::model::layer::{layer_prefix, LayerWeights, Linear, LinearInputs};
use crate::model::rope::Rope;
use crate::model::{Model, EMBED, FINAL_NORM, LM_HEAD};
use crate::quant::pack::{check_shape, pack, Layout};
use crate::quant::search::{self, Gram, Grid, ScaleChoice};
use crate::quant::{clip, reduce, rtn};

/// `--fast`: score the scale search on this many evenly spaced blocks (see README for its
/// measured quality cost).
pub const FAST_SEARCH_BLOCKS: usize = 8;

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

#[derive(Debug, Clone, serde::Serialize)]
pub struct Quality {
    pub text: PathBuf,
    pub tokens: usize,
    pub fp_perplexity: f64,
    pub quantized_perplexity: f64,
    pub increase_pct: f64,
    pub max_increase_pct: f64,
    pub passed: bool,
}

/// Everything resolved before the first layer: what `--dry-run` prints and the JSON `start`
/// event carries.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    pub model_dir: PathBuf,
    pub architecture: String,
    pub layers: usize,
    /// The linears quantized in every layer, `[out, in]`.
    pub linears: Vec<(String, [usize; 2])>,
    /// Scale groups searched in every layer (AWQ-SPEC §4.3) and the module each inspects.
    pub scale_groups: Vec<(String, Vec<String>, String)>,
    pub calibration: CalibSummary,
    pub w_bit: u8,
    pub group: usize,
    pub layout: Layout,
    pub layout_reason: Option<String>,
    pub output: PathBuf,
    pub output_bytes_estimate: u64,
    pub peak_memory_estimate_mb: f64,
}

pub enum Outcome {
    DryRun(Box<Plan>),
    Done(Box<Report>),
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct GroupReport {
    pub group: String,
    pub ratio: Option<f32>,
    pub loss: f64,
    pub identity_loss: f64,
    pub seconds: f64,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LayerReport {
    pub layer: usize,
    pub groups: Vec<GroupReport>,
    /// Mean clip shrink (clip value / abs-max) per clipped linear.
    pub clip_mean_shrink: Vec<(String, f32)>,
    pub seconds: Timings,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Timings {
    pub load: f64,
    pub forward: f64,
    pub search: f64,
    pub clip: f64,
    pub quantize: f64,
    pub write: f64,
}

impl Timings {
    pub fn total(&self) -> f64 {
        self.load + self.forward + self.search + self.clip + self.quantize + self.write
    }

    fn add(&mut self, o: &Timings) {
        self.load += o.load;
        self.forward += o.forward;
        self.search += o.search;
        self.clip += o.clip;
        self.quantize += o.quantize;
        self.write += o.write;
    }
}

/// Where the time went, over the whole run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Work {
    /// Per phase, summed over layers (`write` includes the final shards).
    pub seconds: Timings,
    /// Calibration: reading and tokenizing documents.
    pub calibration_seconds: f64,
    pub matmul_gflop: f64,
    pub matmul_seconds: f64,
    /// Achieved matmul rate.
    pub matmul_gflops: f64,
    /// Fraction of the wall time spent in matmuls.
    pub matmul_share: f64,
    /// Peak resident set size of the process (Linux `VmHWM`), when known.
    pub peak_rss_mb: Option<f64>,
}

/// The process's peak RSS in MB, from `/proc/self/status` (Linux only).
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub tool: String,
    pub options: QuantizeOptions,
    pub plan: Plan,
    pub quality: Option<Quality>,
    pub source_dir: PathBuf,
    pub architecture: String,
    pub calibration: CalibSummary,
    pub layers: Vec<LayerReport>,
    pub files: Vec<String>,
    pub seconds_total: f64,
    pub work: Work,
}

/// A finished layer as persisted in the staging directory for `--resume`.
#[derive(serde::Serialize, serde::Deserialize)]
struct LayerRecord {
    report: LayerReport,
    /// The part's tensor names in checkpoint order.
    tensors: Vec<String>,
}

const FINGERPRINT_FILE: &str = "fingerprint.json";

/// Everything the output bytes depend on (see [`crate::io::fingerprint`]).
fn fingerprint(opts: &QuantizeOptions, model: &Model, ids: &[u32]) -> Result<serde_json::Value> {
    let files = model
        .ckpt
        .files()
        .iter()
        .map(|f| fingerprint::file_identity(f))
        .collect::<Result<Vec<_>>>()?;
    let config = model.dir.join("config.json");
    let config = std::fs::read(&config).map_err(|e| Error::input_io(&config, e))?;
    let id_bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
    Ok(serde_json::json!({
        "tool": TOOL,
        "model files": files,
        "config.json": format!("{:016x}", fingerprint::fnv1a(&config)),
        "calibration token ids": {"count": ids.len(), "fnv1a": format!("{:016x}", fingerprint::fnv1a(&id_bytes))},
        "options": {
            "w_bit": opts.w_bit, "group": opts.group, "layout": opts.layout, "grid": opts.grid,
            "n_grid": opts.n_grid, "clip": opts.clip, "no_search": opts.no_search,
            "search_blocks": opts.search_blocks, "seqlen": opts.calib.seqlen,
        },
    }))
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
        for g in LLAMA_GROUPS
            .iter()
            .filter(|g| !g.needs_v_o_match || layer.v.weight.dims() == layer.o.weight.dims())
        {
            let clock = Instant::now();
            let choice = search_group(&layer, g, &inputs, spec, &rope, seqlen, opts)?;
            groups.push(GroupReport {
                group: g.name.to_string(),
                ratio: choice.ratio,
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

fn make_plan(
    opts: &QuantizeOptions,
    dir: &std::path::Path,
    spec: &crate::model::config::ModelSpec,
    cal: &CalibSummary,
) -> Plan {
    let linears = spec.linears();
    let v_o_match = spec.kv_heads == spec.heads && spec.heads * spec.head_dim == spec.hidden;
    let scale_groups = LLAMA_GROUPS
        .iter()
        .filter(|g| !g.needs_v_o_match || v_o_match)
        .map(|g| {
            (
                g.name.to_string(),
                g.linears.iter().map(|l| l.to_string()).collect(),
                format!("{:?}", g.inspect).to_lowercase(),
            )
        })
        .collect();
    // Packed linears (4-bit codes, int32 zeros per 8 outputs, f16 scales per group) plus the
    // fp16 tensors that stay unquantized.
    let g = opts.group.max(1);
    let per_layer: usize = linears
        .iter()
        .map(|l| {
            l.out * l.inp / 2
                + (l.inp / g) * (l.out / 8) * 4
                + (l.inp / g) * l.out * 2
                + if l.bias { l.out * 2 } else { 0 }
        })
        .sum::<usize>()
        + 2 * spec.hidden * 2;
    let heads = if spec.tied_embeddings { 1 } else { 2 };
    let output = spec.layers * per_layer + heads * spec.vocab * spec.hidden * 2 + spec.hidden * 2;
    // One layer in f32 three times (weights, the search's scratch copy, a candidate), the
    // captured activations and the MLP intermediates of one candidate, plus a fixed overhead
    // (tokenizer, embedding rows, runtime) measured on SmolLM2.
    let layer_params: usize = linears.iter().map(|l| l.out * l.inp).sum();
    let t = cal.tokens;
    let activations = t * (5 * spec.hidden + 4 * spec.intermediate);
    let peak = 4 * (3 * layer_params + activations) + 4 * t * spec.hidden + 250 * (1 << 20);
    Plan {
        model_dir: dir.to_path_buf(),
        architecture: spec.architecture.clone(),
        layers: spec.layers,
        linears: linears
            .iter()
            .map(|l| (l.name.to_string(), [l.out, l.inp]))
            .collect(),
        scale_groups,
        calibration: cal.clone(),
        w_bit: opts.w_bit,
        group: opts.group,
        layout: opts.layout,
        layout_reason: opts.layout_choice.as_ref().map(|c| c.reason.clone()),
        output: opts.output.clone(),
        output_bytes_estimate: output as u64,
        peak_memory_estimate_mb: peak as f64 / (1 << 20) as f64,
    }
}

/// The captured input of a linear: the same activation as the group that scales it.
fn linear_input<'a>(inputs: &'a LinearInputs, linear: &str) -> &'a Tensor {
    let input = LLAMA_GROUPS
        .iter()
        .find(|g| g.linears.contains(&linear))
        .map_or(Input::Attn, |g| g.input);
    group_input(inputs, input)
}

fn group_input(inputs: &LinearInputs, input: Input) -> &Tensor {
    match input {
        Input::Attn => &inputs.attn,
        Input::O => &inputs.o,
        Input::Mlp => &inputs.mlp,
        Input::Down => &inputs.down,
    }
}

fn linear<'a>(layer: &'a LayerWeights, name: &str) -> &'a Linear {
    layer
        .linears()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, l)| l)
        .expect("linear from the group table")
}

fn linear_mut<'a>(layer: &'a mut LayerWeights, name: &str) -> &'a mut Linear {
    layer
        .linears_mut()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, l)| l)
        .expect("linear from the group table")
}

fn inspect(
    layer: &LayerWeights,
    g: &ScaleGroup,
    x: &Tensor,
    spec: &crate::model::config::ModelSpec,
    rope: &Rope,
    seqlen: usize,
) -> Result<Tensor> {
    match g.inspect {
        Inspect::SelfAttn => layer.self_attn(spec, rope, x, seqlen),
        Inspect::Mlp => layer.mlp(x),
        Inspect::Linear => linear(layer, g.linears[0]).forward(x),
    }
}

fn search_group(
    layer: &LayerWeights,
    g: &ScaleGroup,
    inputs: &LinearInputs,
    spec: &crate::model::config::ModelSpec,
    rope: &Rope,
    seqlen: usize,
    opts: &QuantizeOptions,
) -> Result<ScaleChoice> {
    let x_all = group_input(inputs, g.input);
    let weights: Vec<&Tensor> = g.linears.iter().map(|n| &linear(layer, n).weight).collect();
    let x_mean = search::x_mean(x_all)?;
    let subset = match opts.search_blocks {
        Some(n) => Some(search_subset(x_all, seqlen, n)?),
        None => None,
    };
    let x = subset.as_ref().unwrap_or(x_all);
    let w_mean = search::w_mean(&weights, opts.group)?;
    let n_grid = if opts.no_search { 0 } else { opts.n_grid };
    let grid = if opts.no_search {
        Grid::Robust
    } else {
        opts.grid
    };
    if g.inspect == Inspect::Linear {
        let w = weights[0];
        let (out, inp) = w.dims2()?;
        if Gram::pays_off(x.dim(0)?, inp, out, n_grid + 1) {
            let gram = Gram::new(x)?;
            let loss = |s: &[f32]| {
                crate::interrupt::check()?;
                gram.loss(w, &search::scaled_fake_quant(w, s, opts.group)?)
            };
            return search::search(&x_mean, &w_mean, grid, n_grid, loss);
        }
    }
    let reference = inspect(layer, g, x, spec, rope, seqlen)?;
    let mut scratch = layer.clone();
    let loss = |s: &[f32]| -> Result<f64> {
        crate::interrupt::check()?;
        for n in g.linears {
            linear_mut(&mut scratch, n).weight =
                search::scaled_fake_quant(&linear(layer, n).weight, s, opts.group)?;
        }
        reduce::mse(&reference, &inspect(&scratch, g, x, spec, rope, seqlen)?)
    };
    search::search(&x_mean, &w_mean, grid, n_grid, loss)
}

/// Blocks `0, k, 2k, …` of `x: [blocks·seqlen, d]`, at most `n` of them (`--search-blocks`):
/// whole blocks, so attention still sees complete sequences.
fn search_subset(x: &Tensor, seqlen: usize, n: usize) -> Result<Tensor> {
    let blocks = x.dim(0)? / seqlen;
    if n >= blocks {
        return Ok(x.clone());
    }
    let stride = blocks.div_ceil(n.max(1));
    let picked: Vec<Tensor> = (0..blocks)
        .step_by(stride)
        .map(|b| x.narrow(0, b * seqlen, seqlen))
        .collect::<candle_core::Result<_>>()?;
    Ok(Tensor::cat(&picked, 0)?)
}

/// AWQ-SPEC §5: prev op ÷ s, scaled linears' input columns × s, cached inputs ÷ s.
fn apply_scales(
    layer: &mut LayerWeights,
    inputs: &mut LinearInputs,
    g: &ScaleGroup,
    s: &[f32],
) -> Result<()> {
    if s.iter().all(|v| *v == 1.0) {
        return Ok(());
    }
    let n = s.len();
    let st = Tensor::from_slice(s, n, &candle_core::Device::Cpu)?;
    match g.prev {
        PrevOp::InputNorm => layer.input_norm = layer.input_norm.broadcast_div(&st)?,
        PrevOp::PostNorm => layer.post_norm = layer.post_norm.broadcast_div(&st)?,
        PrevOp::Linear(name) => {
            let prev = linear_mut(layer, name);
            // The last `n` output rows (all of them for v_proj / up_proj).
            let rows = prev.out_features();
            let col = st.reshape((n, 1))?;
            let head = prev.weight.narrow(0, 0, rows - n)?;
            let tail = prev.weight.narrow(0, rows - n, n)?.broadcast_div(&col)?;
            prev.weight = Tensor::cat(&[head, tail], 0)?;
            if let Some(b) = &prev.bias {
                let head = b.narrow(0, 0, rows - n)?;
                prev.bias = Some(Tensor::cat(
                    &[head, b.narrow(0, rows - n, n)?.broadcast_div(&st)?],
                    0,
                )?);
            }
        }
    }
    for name in g.linears {
        let lin = linear_mut(layer, name);
        lin.weight = lin.weight.broadcast_mul(&st)?;
    }
    let x = match g.input {
        Input::Attn => &mut inputs.attn,
        Input::O => &mut inputs.o,
        Input::Mlp => &mut inputs.mlp,
        Input::Down => &mut inputs.down,
    };
    *x = x.broadcast_div(&st)?;
    Ok(())
}

fn group_absmax(w: &Tensor, group: usize) -> Result<Vec<f32>> {
    Ok(w.flatten_all()?
        .to_vec1::<f32>()?
        .chunks(group)
        .map(|g| g.iter().fold(0f32, |a, x| a.max(x.abs())))
        .collect())
}

/// The layer's output tensors in checkpoint order: packed linears (+bias), q/k norms, norms.
fn layer_tensors(layer: &LayerWeights, i: usize, opts: &QuantizeOptions) -> Result<Vec<OutTensor>> {
    let p = layer_prefix(i);
    let mut out = Vec::new();
    for (name, lin) in layer.linears() {
        let (rows, cols) = lin.weight.dims2()?;
        let w = lin.weight.flatten_all()?.to_vec1::<f32>()?;
        if let Some(bad) = w.iter().position(|v| !v.is_finite()) {
            return Err(Error::Input(format!(
                "{p}.{name}.weight has a non-finite value at index {bad} (after scaling); the checkpoint may be corrupt"
            )));
        }
        let q = rtn::quantize_f16(&w, rows, cols, opts.group);
        let packed = pack(&q, opts.layout)?;
        let prefix = format!("{p}.{name}");
        out.push(OutTensor::i32(
            format!("{prefix}.qweight"),
            packed.qweight_shape.to_vec(),
            &packed.qweight,
        ));
        out.push(OutTensor::i32(
            format!("{prefix}.qzeros"),
            packed.qzeros_shape.to_vec(),
            &packed.qzeros,
        ));
        out.push(OutTensor::f16_bits(
            format!("{prefix}.scales"),
            packed.scales_shape.to_vec(),
            &packed.scales,
        ));
        if let Some(b) = &lin.bias {
            out.push(OutTensor::f16(
                format!("{prefix}.bias"),
                vec![rows],
                &b.to_vec1()?,
            ));
        }
    }
    for (name, t) in [
        ("self_attn.q_norm", &layer.q_norm),
        ("self_attn.k_norm", &layer.k_norm),
    ] {
        if let Some(t) = t {
            out.push(OutTensor::f16(
                format!("{p}.{name}.weight"),
                t.dims().to_vec(),
                &t.to_vec1()?,
            ));
        }
    }
    out.push(OutTensor::f16(
        format!("{p}.input_layernorm.weight"),
        layer.input_norm.dims().to_vec(),
        &layer.input_norm.to_vec1()?,
    ));
    out.push(OutTensor::f16(
        format!("{p}.post_attention_layernorm.weight"),
        layer.post_norm.dims().to_vec(),
        &layer.post_norm.to_vec1()?,
    ));
    Ok(out)
}

fn model_card(r: &Report) -> String {
    let o = &r.options;
    format!(
        "---\nbase_model: {base}\nlibrary_name: transformers\ntags:\n- awq\n- 4-bit\n---\n\n# {base} — AWQ INT4\n\n\
         Quantized with `{tool}` (activation-aware weight quantization).\n\n\
         | setting | value |\n|---|---|\n| method | AWQ (scale search {grid:?}, clipping {clip}) |\n\
         | bits | {bits} |\n| group size | {group} |\n| zero point | true |\n| version | {version} |\n\
         | calibration | {files} |\n| samples / blocks / seqlen | {ns} / {blocks} / {seqlen} |\n| seed | {seed} |\n\n\
         Loads in vLLM (`quantization=\"awq\"`, GEMM only), transformers and TGI. See `quantization_report.json`.\n",
        base = o.model,
        tool = r.tool,
        grid = o.grid,
        clip = o.clip,
        bits = o.w_bit,
        group = o.group,
        version = o.layout.name(),
        files = r.calibration.source,
        ns = o.calib.n_samples,
        blocks = r.calibration.blocks,
        seqlen = o.calib.seqlen,
        seed = o.calib.seed,
    )
}

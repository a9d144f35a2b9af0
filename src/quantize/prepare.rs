//! Everything resolved and checked before layer 1, in the dry run too: the model and its value
//! ranges, the options against its shapes, where the output goes, the calibration tokens, the
//! quality-gate text, and what an earlier run left in the staging directory.

use std::path::PathBuf;
use std::time::Instant;

use tokenizers::Tokenizer;

use super::report::make_plan;
use super::resume::{decide, fingerprint};
use super::shard;
use super::{DtypeChoice, Plan, QualityGate, QuantizeOptions};
use crate::calib::{self, Calibration};
use crate::error::{Error, Result};
use crate::io::output;
use crate::io::writer::{Open, Staging};
use crate::model::shapes::LinearShape;
use crate::model::{Model, OutOfRange};
use crate::quant::pack::{check_shape, group_hints, Layout};

pub(super) struct Prepared {
    /// The resolved model directory (a Hub id's snapshot).
    pub dir: PathBuf,
    pub model: Model,
    pub cal: Calibration,
    pub calibration_seconds: f64,
    /// The quality gate's tokens, cut into windows.
    pub gate_ids: Option<Vec<u32>>,
    /// What the bytes depend on (the report's, a shard manifest's: without the range).
    pub fingerprint: serde_json::Value,
    /// What the staging directory records and a resume must match: [`Prepared::fingerprint`],
    /// plus the layer range of a shard run.
    pub staged_fingerprint: serde_json::Value,
    /// A shard run's layers (`None`: every layer, into a checkpoint).
    pub range: Option<std::ops::Range<usize>>,
    /// What to do with the staging directory.
    pub open: Open,
    /// The first unquantized value beyond float16, if any (a bf16/f32 source).
    pub beyond_f16: Option<OutOfRange>,
    pub plan: Plan,
}

/// What [`prepare`] found: the work to do, or (`--skip-existing`) that the output is already
/// this run's.
pub(super) enum Prepare {
    Work(Box<Prepared>),
    UpToDate,
}

pub(super) fn prepare(opts: &QuantizeOptions) -> Result<Prepare> {
    let dir = crate::io::source::resolve(&opts.model, opts.revision.as_deref())?;
    let model = Model::open(&dir)?;
    if model.spec.awq.is_some() {
        return Err(Error::Input(format!(
            "{} is already AWQ-quantized",
            dir.display()
        )));
    }
    check_options(opts, &model)?;
    check_location(opts, &dir)?;
    let tok = crate::tokenize::load(&dir)?;
    let clock = Instant::now();
    let cal = calib::build(&tok, &opts.calib, Some(&dir))?;
    let calibration_seconds = clock.elapsed().as_secs_f64();
    let fingerprint = fingerprint(opts, &model, &cal.ids)?;
    let mut costs = shard::layer_costs(opts, &model.spec, &cal.summary);
    if opts.activations.is_some() {
        costs = super::capture::without_prefix(&costs);
    }
    let range = opts
        .shard
        .as_ref()
        .map(|s| shard::resolve(s, model.spec.layers, &costs))
        .transpose()?;
    let mut staged_fingerprint = fingerprint.clone();
    if let Some(obj) = staged_fingerprint.as_object_mut() {
        if let Some(r) = &range {
            obj.insert("layers".into(), serde_json::json!([r.start, r.end]));
        }
        if let Some((j, m)) = opts.capture {
            obj.insert(
                "capture".into(),
                serde_json::json!([j, m, opts.plan_shards]),
            );
        }
    }
    let checked = opts.shard.is_none() && super::end_to_end::applies(opts, &model.spec);
    let output_fingerprint = super::fallback::with_hook(&staged_fingerprint, checked);
    if opts.skip_existing && up_to_date(opts, &output_fingerprint)? {
        return Ok(Prepare::UpToDate);
    }
    output::check_replaceable(&opts.output, opts.force)?;
    let beyond_f16 = model.check_ranges()?;
    if let (Some(b), DtypeChoice::Float16) = (&beyond_f16, opts.dtype) {
        return Err(Error::Input(format!(
            "tensor {} holds {:e} at index {}, which float16 cannot represent; --dtype float16 \
             was given — use --dtype bfloat16 or auto",
            b.tensor, b.value, b.index
        )));
    }
    let gate_ids = opts
        .quality_gate
        .as_ref()
        .map(|g| gate_tokens(g, &tok))
        .transpose()?;
    let (staging_dir, found) = Staging::probe(&opts.output)?;
    let (open, staging_note) = decide(opts, &staging_dir, &found, &staged_fingerprint)?;
    let mut plan = make_plan(opts, &dir, &model.spec, &cal.summary, model.vision_parts());
    plan.staging = staging_note;
    plan.layer_range = range.as_ref().map(|r| [r.start, r.end]);
    // A shard's time is its range's and the float forward before it, not the whole model's.
    if let Some(r) = &range {
        plan.seconds_estimate = shard::range_seconds(&costs, r).1;
    }
    if let (Some(n), None) = (opts.plan_shards, opts.capture) {
        plan.shards = Some(shard::plan(&costs, n, plan.peak_memory_estimate_mb)?);
    }
    check_space(opts, &plan, &staging_dir, open)?;
    Ok(Prepare::Work(Box::new(Prepared {
        dir,
        model,
        cal,
        calibration_seconds,
        gate_ids,
        fingerprint,
        staged_fingerprint,
        range,
        open,
        beyond_f16,
        plan,
    })))
}

/// `--skip-existing`: whether `-o` holds an awq output whose recorded fingerprint is this
/// run's. An awq output of other settings is refused (exit 4) naming the first difference.
fn up_to_date(opts: &QuantizeOptions, current: &serde_json::Value) -> Result<bool> {
    let Some(stored) = output::recorded_fingerprint(&opts.output) else {
        return Ok(false);
    };
    match super::resume::difference(&stored, current) {
        None => Ok(true),
        Some(field) => Err(Error::OutputExists(format!(
            "--skip-existing: {} holds an awq output of other settings (its {field} differs \
             from this run's); pass --force instead of --skip-existing to rebuild it",
            opts.output.display()
        ))),
    }
}

/// The output location must be writable, and hold what the staging directory still needs: the
/// layer parts and the shards assembled from them coexist at the end (2× the output estimate),
/// less the parts an interrupted run left.
fn check_space(
    opts: &QuantizeOptions,
    plan: &Plan,
    staging: &std::path::Path,
    open: Open,
) -> Result<()> {
    crate::io::space::check_writable(&opts.output)?;
    let staged = match open {
        Open::Resume => crate::io::space::bytes_under(staging),
        _ => 0,
    };
    let needed = (2 * plan.output_bytes_estimate).saturating_sub(staged);
    crate::io::space::check(
        &opts.output,
        needed,
        &format!(
            "the run (twice the estimated output size of {}, for the layer parts and the \
             shards built from them{})",
            crate::io::space::human(plan.output_bytes_estimate),
            if staged > 0 {
                format!(", less {} already staged", crate::io::space::human(staged))
            } else {
                String::new()
            }
        ),
    )
}

/// Refuses unsupported settings and shapes (AWQ-SPEC §8, §10).
fn check_options(opts: &QuantizeOptions, model: &Model) -> Result<()> {
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
    // Every kind of layer (a MoE model's dense layers have their own MLP width), each named by
    // its first layer.
    let kinds: Vec<(usize, Vec<LinearShape>)> = (s.layer_kinds().into_iter())
        .map(|(i, k)| (i, k.linears()))
        .collect();
    let inputs: Vec<usize> = kinds
        .iter()
        .flat_map(|(_, ls)| ls.iter().map(|l| l.inp))
        .collect();
    let hints = group_hints(&inputs);
    for (i, linears) in &kinds {
        for l in linears {
            check_shape(
                &format!("{}.{}.weight", s.roots.layer(*i), l.name),
                l.out,
                l.inp,
                opts.group,
                &hints,
            )?;
        }
    }
    if opts.layout == Layout::Gemv {
        crate::quant::pack::gemv_zeros_width(s.hidden, opts.group)?;
    }
    if let (Some(_), Some(_)) = (opts.keep_fp16, &s.moe) {
        return Err(Error::Usage(format!(
            "--keep-fp16 is not supported for {} (a MoE model): measuring what each module's \
             quantization costs needs a second copy of the layer, which the one-layer memory \
             bound of MoE layers has no room for; drop --keep-fp16",
            s.architecture
        )));
    }
    if let (Some(_), Some((entry, module))) = (opts.keep_fp16, model.keep_entry_naming_vision()) {
        return Err(Error::Usage(format!(
            "--keep-fp16 is not supported for {}: a module it may keep would be listed in \
             modules_to_not_convert as {entry:?} (relative to the decoder, the one form vLLM, \
             transformers 4 and transformers 5 all match), and that entry also names the vision \
             module {module}, so the list could not say which one it keeps; drop --keep-fp16",
            s.architecture
        )));
    }
    Ok(())
}

/// The output (and, with a quality gate, where a rejected checkpoint is kept) must not touch
/// an input.
fn check_location(opts: &QuantizeOptions, model_dir: &std::path::Path) -> Result<()> {
    let mut inputs = output::files_in(model_dir);
    inputs.extend(opts.calib.files.iter().cloned());
    inputs.extend(opts.quality_gate.iter().map(|g| g.text.clone()));
    output::check_location(&opts.output, model_dir, &inputs)?;
    if opts.quality_gate.is_some() {
        output::check_location(&output::rejected_path(&opts.output), model_dir, &inputs)?;
    }
    Ok(())
}

/// Window length of the quality gate: `awq eval`'s, or the whole budget when it is shorter.
pub(super) fn gate_seqlen(gate: &QualityGate) -> usize {
    crate::eval::DEFAULT_SEQLEN.min(gate.max_tokens)
}

/// Reads, tokenizes and windows the quality gate's text (so a missing or too short file fails
/// before layer 1, not after the whole run).
fn gate_tokens(gate: &QualityGate, tok: &Tokenizer) -> Result<Vec<u32>> {
    let bytes = std::fs::read(&gate.text).map_err(|e| {
        Error::Input(format!(
            "--eval-text {}: cannot read it: {e}",
            gate.text.display()
        ))
    })?;
    let text = String::from_utf8(bytes)
        .map_err(|e| crate::input_err!("--eval-text {} is not UTF-8: {e}", gate.text.display()))?;
    let ids = crate::tokenize::encode(tok, &text, false)?;
    let seqlen = gate_seqlen(gate);
    if ids.len() < seqlen.max(2) {
        // The gate's window is derived (min(2048, --eval-max-tokens)), so the fix is a
        // budget no longer than the text, not awq eval's --seqlen.
        return Err(crate::input_err!(
            "--eval-text {} has {} tokens, fewer than the quality gate's window of {seqlen}; \
             pass --eval-max-tokens {} (the window then shrinks to fit), or a longer text",
            gate.text.display(),
            ids.len(),
            ids.len().max(2)
        ));
    }
    let opts = crate::eval::EvalOptions {
        seqlen,
        max_tokens: Some(gate.max_tokens),
    };
    crate::eval::windows(&ids, &opts)
        .map_err(|e| crate::input_err!("--eval-text {}: {e}", gate.text.display()))
}

/// `--rounding gptq` warns below this many calibration tokens per input dimension of the
/// widest linear (see [`super::rounding::MIN_TOKENS_PER_INPUT`]).
pub const GPTQ_TOKENS_PER_INPUT: usize = super::rounding::MIN_TOKENS_PER_INPUT;

/// Settings that work but that the user should hear about (shown even with `-q`): a block
/// longer than the model was trained for, error feedback on too few calibration tokens, a shard
/// size that makes a crowd of files, a group size vLLM and TGI cannot run.
pub(super) fn warnings(opts: &QuantizeOptions, prep: &Prepared) -> Vec<String> {
    let mut out = Vec::new();
    let spec = &prep.model.spec;
    if spec.mtp_layers > 0 {
        let first = spec.roots.layer(spec.layers);
        out.push(format!(
            "the {} multi-token-prediction layer(s) from {first} on are left out and \
             num_nextn_predict_layers is set to 0: transformers ignores them, and vLLM and \
             SGLang would run them with the AWQ config, which needs them quantized with their \
             own calibration; serve without MTP speculative decoding (see the README)",
            spec.mtp_layers
        ));
    }
    if let Some(max) = prep
        .model
        .spec
        .max_positions
        .filter(|m| opts.calib.seqlen > *m)
    {
        out.push(format!(
            "--seqlen {} is longer than the model's max_position_embeddings {max}: positions \
             beyond it were never trained, so the calibration does not look like real use",
            opts.calib.seqlen
        ));
    }
    // Error feedback fits each linear's XᵀX: with few tokens per input dimension it fits the
    // calibration text, not the model (measured below).
    let widest = prep
        .model
        .spec
        .linears()
        .iter()
        .filter(|l| l.expert.is_none())
        .map(|l| l.inp)
        .max()
        .unwrap_or(0);
    let tokens = prep.cal.ids.len();
    if opts.rounding == super::Rounding::Gptq && tokens < GPTQ_TOKENS_PER_INPUT * widest {
        out.push(format!(
            "--rounding gptq with {tokens} calibration tokens, fewer than {GPTQ_TOKENS_PER_INPUT} \
             per input dimension of the widest linear ({widest}): error feedback then fits the \
             calibration text (SmolLM2 with 1024 tokens: perplexity 19.96 against 19.81 with \
             --rounding rtn); use more calibration (--n-samples, a longer --seqlen) or --rounding auto"
        ));
    }
    let bytes = prep.plan.output_bytes_estimate;
    let shards = bytes / opts.shard_size.max(1);
    if shards > 100 {
        out.push(format!(
            "--shard-size {} bytes splits the about {:.0} MB output into about {shards} files; \
             Hub checkpoints use 5GB (the default)",
            opts.shard_size,
            bytes as f64 / 1e6
        ));
    }
    if !opts.group.is_multiple_of(32) {
        out.push(format!(
            "group {} is not a multiple of 32: vLLM and TGI cannot run it (their awq kernel \
             needs one; Marlin takes 32, 64, 128), only transformers with autoawq can — \
             prefer 128, 64 or 32",
            opts.group
        ));
    } else if opts.layout != Layout::Gemv {
        let t = crate::verify::vllm_support(spec, opts.group, opts.layout, 1);
        if !(t.vllm_awq || t.vllm_awq_marlin) {
            let why: Vec<&str> = (t.reasons.iter().chain(&t.marlin_reasons))
                .map(String::as_str)
                .collect();
            out.push(format!(
                "vLLM will not load the output at tensor-parallel 1 ({}); transformers will \
                 (`awq verify` gives every degree) — another --group may fit",
                why.join("; ")
            ));
        }
    }
    out
}

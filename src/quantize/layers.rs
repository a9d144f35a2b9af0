//! The layer loop: each decoder layer is quantized (or, when resuming, its finished part is
//! kept and only its original output recomputed), written to a part file with a record, and
//! dropped before the next one.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;

use super::end_to_end::EndToEndReport;
use super::experts::{finish_expert, ExpertInputs, Finished};
use super::fallback;
use super::guard::{self, guard_blocks, Guard, Searched};
use super::keep;
use super::layer::{
    apply_scales, float_tensors, group_absmax, linear_tensors, pieces, scaled_input, search_group,
    MIN_EXPERT_TOKENS,
};
use super::prepare::Prepared;
use super::report::{ExpertReport, GroupReport, LayerReport, Timings, Work};
use super::resume::LayerRecord;
use super::rounding;
use super::{ClipSides, QuantizeOptions, Rounding};
use crate::calib::held_out;
use crate::error::{Error, Result};
use crate::events::{Event, Sink};
use crate::io::part::PartWriter;
use crate::io::writer;
use crate::model::arch::Input;
use crate::model::config::AwqFormat;
use crate::model::groups::{clipped, ScaleGroup};
use crate::model::layer::{AttentionHalf, LayerWeights, LinearInputs, Routing};
use crate::model::rope::Rope;
use crate::quant::clip;
use crate::quant::search::ScaleChoice;

/// What the loop produced: per-layer reports, the part files and the tensor names in
/// checkpoint order (starting with the embedding, which the head part holds).
pub(super) struct Layers {
    pub reports: Vec<LayerReport>,
    pub parts: Vec<PathBuf>,
    pub names: Vec<String>,
    /// Seconds of the float forward through the layers before the range (a shard's prefix).
    pub prefix_seconds: f64,
    /// The end-to-end check (`None` where it does not run, see [`end_to_end`]).
    pub end_to_end: Option<EndToEndReport>,
}

impl Layers {
    /// Nothing yet (the head part's names, the embedding first, are added when the checkpoint
    /// is written).
    pub fn new() -> Self {
        Layers {
            reports: Vec::new(),
            parts: Vec::new(),
            names: Vec::new(),
            prefix_seconds: 0.0,
            end_to_end: None,
        }
    }

    /// Appends a finished layer: its part file and record.
    pub fn push(&mut self, part: PathBuf, record: LayerRecord) {
        self.names.extend(record.tensors);
        self.parts.push(part);
        self.reports.push(record.report);
    }
}

/// Quantizes the layers of `range` (a shard's, or every layer), each fed the original model's
/// output of the layers before it: `input` when handed over (the input of `range.start`),
/// else those before the range run their float forward only.
pub(super) fn run_layers(
    opts: &QuantizeOptions,
    prep: &Prepared,
    range: std::ops::Range<usize>,
    input: Option<Tensor>,
    parts_dir: &Path,
    events: Sink,
    work: &mut Work,
) -> Result<Layers> {
    let model = &prep.model;
    let spec = &model.spec;
    let seqlen = opts.calib.seqlen;
    let rope = Rope::new(spec, seqlen)?;
    let handed_over = input.is_some();
    let mut hidden = match input {
        Some(h) => h,
        None => model.embed(&prep.cal.ids)?,
    };
    let mut done = Layers::new();
    // The searched scales go into the parts where the end-to-end check will read them.
    let carries_scales = super::end_to_end::applies(opts, spec);
    let clock = Instant::now();
    for i in (0..range.start).filter(|_| !handed_over) {
        crate::interrupt::check()?;
        hidden = model
            .layer(i)?
            .forward(&spec.layer(i), &rope, &hidden, seqlen, false)?
            .0;
    }
    done.prefix_seconds = clock.elapsed().as_secs_f64();
    for i in range.clone() {
        crate::interrupt::check()?;
        let part = parts_dir.join(format!("layer-{i:05}.safetensors"));
        let record_path = parts_dir.join(format!("layer-{i:05}.json"));
        let (record, seconds) = if record_path.is_file() {
            // Finished before an interruption (the fingerprint matched): keep its part and
            // recompute only the original layer's output that feeds the next one.
            let record = read_record(&record_path)?;
            hidden = model
                .layer(i)?
                .forward(&spec.layer(i), &rope, &hidden, seqlen, false)?
                .0;
            (record, 0.0)
        } else {
            let (record, out) =
                quantize_layer(opts, prep, &rope, &hidden, i, &part, carries_scales)?;
            hidden = out;
            work.seconds.add(&record.report.seconds);
            // Written after the part: a layer counts as done for a resume only with both.
            writer::write_json(
                &record_path,
                &serde_json::to_value(&record).map_err(|e| Error::Runtime(e.to_string()))?,
            )?;
            let seconds = record.report.seconds.total();
            (record, seconds)
        };
        events(&Event::Layer {
            index: i,
            total: spec.layers,
            seconds,
            report: Some(&record.report),
        });
        done.push(part, record);
    }
    Ok(done)
}

pub(super) fn read_record(path: &Path) -> Result<LayerRecord> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| {
            Error::Runtime(format!(
                "{} is unreadable; rerun with --force to start over",
                path.display()
            ))
        })
}

/// Quantizes decoder layer `i` fed with `hidden`, writes its part, and returns its record and
/// the original layer's output (the next layer's input). With `carries_scales` the part also
/// holds the searched scales, for the end-to-end check and its fallback.
fn quantize_layer(
    opts: &QuantizeOptions,
    prep: &Prepared,
    rope: &Rope,
    hidden: &Tensor,
    i: usize,
    part: &Path,
    carries_scales: bool,
) -> Result<(LayerRecord, Tensor)> {
    let (model, seqlen) = (&prep.model, opts.calib.seqlen);
    let layer_spec = model.spec.layer(i);
    let spec = &*layer_spec;
    let mut t = Timings::default();
    let clock = Instant::now();
    let mut layer = model.layer(i)?;
    t.load = clock.elapsed().as_secs_f64();

    let clock = Instant::now();
    let (out, mut inputs) = forward_captured(&layer, spec, rope, hidden, seqlen)?;
    let max_abs_activation = max_abs_activations(&out, &inputs)?;
    let dense = inputs.routing.is_none() && layer.experts.is_none();
    let split = match opts.judges_held_out() && dense {
        true => held_out::Split::of(hidden.dim(0)?, seqlen),
        false => None,
    };
    t.forward = clock.elapsed().as_secs_f64();

    let clock = Instant::now();
    let (groups, searched, ends) =
        search_layer(opts, spec, rope, &mut layer, &mut inputs, split.as_ref())?;
    let (grams, judge) = (ends.grams, ends.judge);
    t.search = clock.elapsed().as_secs_f64();
    // The guard compares on every 4th block (the held-out ones) of the layer's input and output.
    // It holds a second copy of the layer, which a MoE layer's memory bound has no room for: MoE
    // layers are not guarded.
    let guard = match (opts.guard || opts.keep_fp16.is_some()) && spec.moe.is_none() {
        true => {
            let next_norm = model.next_norm(i)?;
            let reference = next_norm.apply(spec, &guard_blocks(&out, seqlen)?)?;
            Some((guard_blocks(hidden, seqlen)?, reference, next_norm))
        }
        false => None,
    };
    let experts = inputs.routing.as_ref().map(expert_reports);
    // Streamed experts are finished one by one when the layer is written.
    let expert_inputs = (layer.experts.is_some()).then(|| ExpertInputs::take(spec, &mut inputs));

    let clock = Instant::now();
    let clips = match opts.clip {
        true => clip_layer(spec, &mut layer, inputs, judge, opts.group, opts.clip_sides)?,
        false => Vec::new(),
    };
    let clip_separate = (opts.clip_sides == ClipSides::Auto).then(|| separate_groups(&clips));
    let clip_mean_shrink: Vec<(String, f32)> = clips
        .iter()
        .map(|(name, _, shrink)| (name.to_string(), *shrink))
        .collect();
    let searched = Searched {
        clips: clips.into_iter().map(|(n, v, _)| (n, v)).collect(),
        ..searched
    };
    t.clip = clock.elapsed().as_secs_f64();

    let load = || model.layer(i);
    let guard = guard.map(|(input, reference, next_norm)| Guard {
        spec,
        rope,
        seqlen,
        group: opts.group,
        input,
        reference,
        next_norm,
        load: &load,
    });
    let (layer, mut checked) = check_layer(opts, guard.as_ref(), &searched, layer, &mut t)?;
    let applied = checked.applied;

    let clock = Instant::now();
    let (mut codes, rounding) = match grams {
        Some(grams) => {
            // Error feedback starts from the weights before clipping: `--keep-fp16`'s, or
            // rebuilt from the checkpoint (the searched copies are gone by now).
            let unclipped = match (searched.clips.is_empty(), checked.unclipped.take()) {
                (true, _) => None,
                (false, Some(u)) => Some(u),
                (false, None) => Some(guard::unclipped(spec, &load, &searched, &applied)?),
            };
            let (codes, reports) = rounding::gptq_codes(
                spec,
                &layer,
                unclipped.as_ref(),
                grams,
                &searched,
                &applied,
                opts.group,
                opts.rounding,
            )?;
            (codes, Some(reports))
        }
        None => Default::default(),
    };
    t.quantize = clock.elapsed().as_secs_f64();
    let (part, finished) = write_part(
        opts,
        spec,
        rope,
        &layer,
        expert_inputs.as_ref(),
        &mut codes,
        part,
        &mut t,
    )?;
    let clock = Instant::now();
    // The verbatim tensors are named for the shards, which copy them from the source.
    let prefix = spec.roots.layer(i);
    let verbatim = spec.layer_verbatim().into_iter();
    let names = (part.names().into_iter())
        .chain(verbatim.map(|(n, _)| format!("{prefix}.{n}")))
        .collect();
    let max_abs_float_weight = part.max_abs_f32();
    let mut part = part;
    // Not listed in the record: the end of the run reads them, the shards never hold them.
    if opts.keep_fp16.is_some() {
        for tensor in keep::scales_tensors(i, &searched.scales, &applied)? {
            part.push(tensor)?;
        }
    }
    if carries_scales {
        for tensor in fallback::searched_scales_tensors(i, &searched.scales)? {
            part.push(tensor)?;
        }
    }
    part.finish()?;
    t.write += clock.elapsed().as_secs_f64();
    let groups = merge_reports(spec, groups, finished.reports);
    let clip_mean_shrink = (clip_mean_shrink.into_iter())
        .chain(finished.shrinks.iter().map(|(n, s)| (n.to_string(), *s)))
        .collect();
    let record = LayerRecord {
        report: LayerReport {
            layer: i,
            groups,
            clip_mean_shrink,
            clip_separate,
            max_abs_activation,
            experts,
            guard: checked.guard,
            rounding,
            fp16_candidates: checked.fp16_candidates,
            max_abs_float_weight,
            seconds: t,
            shard: None,
        },
        tensors: names,
    };
    Ok((record, out))
}

/// Writes the layer's part in checkpoint order: each linear packed (a streamed expert finished
/// when its gate comes up, see [`super::experts`]), then routers and norms. Returns the part,
/// still open (the caller adds what the record does not list), and what the experts reported.
#[allow(clippy::too_many_arguments)]
pub(super) fn write_part(
    opts: &QuantizeOptions,
    spec: &crate::model::config::ModelSpec,
    rope: &Rope,
    layer: &LayerWeights,
    expert_inputs: Option<&ExpertInputs>,
    codes: &mut std::collections::HashMap<&'static str, crate::quant::rtn::Quantized>,
    path: &Path,
    t: &mut Timings,
) -> Result<(PartWriter, Finished)> {
    let mut part = PartWriter::create(path)?;
    let mut finished = Finished::default();
    let p = spec.roots.layer(layer.index);
    for l in spec.linears() {
        let expert = layer.experts.as_ref().and_then(|x| x.find(l.name));
        match (expert, expert_inputs) {
            (Some((e, 0)), Some(inputs)) => {
                crate::interrupt::check()?;
                let done = &mut finished;
                finish_expert(opts, spec, rope, layer, e, inputs, &p, &mut part, done, t)?;
            }
            // An expert's up and down are written with its gate.
            (Some(_), _) => {}
            (None, _) => {
                let clock = Instant::now();
                let lin = layer.linear(l.name);
                for tensor in linear_tensors(l.name, lin, &p, opts, codes.remove(l.name))? {
                    part.push(tensor)?;
                }
                t.quantize += clock.elapsed().as_secs_f64();
            }
        }
    }
    for tensor in float_tensors(layer, &p)? {
        part.push(tensor)?;
    }
    Ok((part, finished))
}

/// The layer's group reports in group order: the layer-wide groups' (searched first) with the
/// streamed experts' down groups (searched when written) in their places.
fn merge_reports(
    spec: &crate::model::config::ModelSpec,
    layer_wide: Vec<GroupReport>,
    experts: Vec<GroupReport>,
) -> Vec<GroupReport> {
    if experts.is_empty() {
        return layer_wide;
    }
    let (mut wide, mut per_expert) = (layer_wide.into_iter(), experts.into_iter());
    (crate::model::groups::scale_groups(spec).iter())
        .filter_map(|g| match g.input {
            Input::Expert(_) => per_expert.next(),
            _ => wide.next(),
        })
        .collect()
}

/// What the layer-output checks decided.
struct Checked {
    /// Which scale groups' scales the written layer holds.
    applied: Vec<bool>,
    guard: Option<super::guard::GuardReport>,
    fp16_candidates: Option<Vec<keep::Fp16Candidate>>,
    /// The layer with the applied scales and no clip, where `--keep-fp16` built it for its
    /// measure: error feedback starts from the same weights.
    unclipped: Option<LayerWeights>,
}

/// The guard (unless `--no-guard`) chooses the layer to write from `layer` (AWQ as searched);
/// with `--keep-fp16` every unit's error drop is measured on it. Both need
/// `guard` (a dense layer); without it `layer` is written as searched.
fn check_layer(
    opts: &QuantizeOptions,
    guard: Option<&Guard>,
    searched: &Searched,
    mut layer: LayerWeights,
    t: &mut Timings,
) -> Result<(LayerWeights, Checked)> {
    let mut checked = Checked {
        applied: vec![true; searched.groups.len()],
        guard: None,
        fp16_candidates: None,
        unclipped: None,
    };
    let Some(guard) = guard else {
        return Ok((layer, checked));
    };
    let clock = Instant::now();
    if opts.guard {
        let (chosen, report, on) = guard.choose(searched, layer)?;
        (layer, checked.guard, checked.applied) = (chosen, Some(report), on);
    }
    t.guard = clock.elapsed().as_secs_f64();
    let clock = Instant::now();
    if opts.keep_fp16.is_some() {
        let float = guard.scaled(searched, &checked.applied)?;
        let fmt = AwqFormat {
            group: opts.group,
            layout: opts.layout,
        };
        let base = checked.guard.as_ref().map(|g| g.chosen);
        checked.fp16_candidates = Some(keep::measure(guard, fmt, &layer, &float, base)?);
        checked.unclipped = Some(float);
    }
    t.fp16_budget = clock.elapsed().as_secs_f64();
    Ok((layer, checked))
}

/// Searches every scale group of the layer, then folds the chosen scales into `layer` (AutoAWQ
/// searches all groups before applying any). With `--no-search`, and for an expert with too
/// few routed tokens, the group keeps the identity unscored. Returns the reports (in group
/// order), the choices and what the ends of the inputs left ([`Ends`]): for error feedback, each
/// input's Gram matrices (of every block and, with a `split`, of the held-out ones), and the
/// clip samples `--clip-sides auto` judges on.
///
/// Every search reads the unscaled layer and inputs, so their order changes no result: they run
/// largest input first, and each captured input is finished ([`finish_input`]) as soon as the
/// last group that reads it is searched. On a Llama-shaped layer the MLP's down input, the
/// widest, is then gone before the attention and MLP groups run their candidates.
fn search_layer<'a>(
    opts: &QuantizeOptions,
    spec: &crate::model::config::ModelSpec,
    rope: &Rope,
    layer: &mut LayerWeights,
    inputs: &mut LinearInputs,
    split: Option<&'a held_out::Split>,
) -> Result<(Vec<GroupReport>, Searched, Ends<'a>)> {
    // Streamed experts' down groups are searched expert by expert when the layer is written
    // (`super::experts`); their inputs stay as captured until then.
    let streamed = layer.experts.is_some();
    let per_expert = |input: Input| streamed && matches!(input, Input::Expert(_));
    let groups: Vec<ScaleGroup> = (crate::model::groups::scale_groups(spec).into_iter())
        .filter(|g| !per_expert(g.input))
        .collect();
    let mut ends = Ends {
        split,
        grams: (opts.rounding != Rounding::Rtn).then(Vec::new),
        held_grams: opts.rounding == Rounding::Auto,
        judge: ClipJudge::new(split, opts.clip && opts.clip_sides == ClipSides::Auto),
    };
    // An input no group scales (o_proj's under grouped-query attention) is final already.
    for input in spec.inputs().into_iter().filter(|i| !per_expert(*i)) {
        if !groups.iter().any(|g| g.input == input) {
            finish_input(spec, inputs, input, &[], &mut ends)?;
        }
    }
    let mut order: Vec<usize> = (0..groups.len()).collect();
    order.sort_by_key(|&k| std::cmp::Reverse(inputs.get(groups[k].input).elem_count()));
    let mut done: Vec<Option<(GroupReport, Vec<f32>)>> = vec![None; groups.len()];
    for k in order {
        let g = &groups[k];
        done[k] = Some(search_one(opts, spec, rope, layer, g, inputs)?);
        let readers = || groups.iter().zip(&done).filter(|(h, _)| h.input == g.input);
        if readers().all(|(_, d)| d.is_some()) {
            let scales: Vec<&[f32]> = readers()
                .filter_map(|(_, d)| d.as_ref().map(|(_, s)| s.as_slice()))
                .collect();
            finish_input(spec, inputs, g.input, &scales, &mut ends)?;
        }
    }
    let (reports, scales): (Vec<_>, Vec<_>) = done.into_iter().flatten().unzip();
    for (g, s) in groups.iter().zip(&scales) {
        apply_scales(spec, layer, g, s)?;
    }
    let searched = Searched {
        groups,
        scales,
        clips: Vec::new(),
    };
    Ok((reports, searched, ends))
}

/// One group's search (or its identity, unscored): the report and the chosen scales.
pub(super) fn search_one(
    opts: &QuantizeOptions,
    spec: &crate::model::config::ModelSpec,
    rope: &Rope,
    layer: &LayerWeights,
    g: &ScaleGroup,
    inputs: &LinearInputs,
) -> Result<(GroupReport, Vec<f32>)> {
    let clock = Instant::now();
    let x = inputs.get(g.input);
    let quiet = matches!(g.input, Input::Expert(_)) && x.dim(0)? < MIN_EXPERT_TOKENS;
    // --no-search: nothing to compare, so no module runs at all.
    let choice = if quiet || opts.no_search {
        ScaleChoice::identity(x.dim(1)?)
    } else {
        search_group(layer, g, inputs, spec, rope, opts.calib.seqlen, opts)?
    };
    let report = GroupReport {
        group: g.name.to_string(),
        // k / n_grid, kept short in JSON (an f32 would print as 0.10000000149…).
        ratio: choice.ratio.map(|r| (r as f64 * 1e6).round() / 1e6),
        loss: choice.loss,
        identity_loss: choice.identity_loss,
        seconds: clock.elapsed().as_secs_f64(),
    };
    Ok((report, choice.scales))
}

/// Per captured input a non-expert linear reads, its scaled `XᵀX` (error-feedback rounding).
type Grams = Vec<rounding::InputGram>;

/// What [`finish_input`] takes from each input besides the clip sample, where asked.
pub(super) struct Ends<'a> {
    split: Option<&'a held_out::Split>,
    /// Gram matrices: of every block (`--rounding gptq`), or with `held_grams` (`--rounding
    /// auto`) of every block and of the held-out ones, only for an input it judges (a `split`
    /// and [`rounding::judges`]).
    grams: Option<Grams>,
    held_grams: bool,
    /// The fit and held-out blocks' clip samples (`--clip-sides auto`, with a `split`).
    judge: Option<ClipJudge>,
}

/// The clip samples of the fit and of the held-out blocks, per input: `--clip-sides auto`
/// fits separate bounds on the first and judges them on the second.
pub(super) struct ClipJudge {
    fit: LinearInputs,
    held: LinearInputs,
}

impl ClipJudge {
    /// Only where `--clip-sides auto` clips (`wanted`) a split calibration.
    fn new(split: Option<&held_out::Split>, wanted: bool) -> Option<Self> {
        (wanted && split.is_some()).then(|| ClipJudge {
            fit: LinearInputs::default(),
            held: LinearInputs::default(),
        })
    }
}

/// The end of a captured input's part in the search: divided by the scales of the groups that
/// read it (`scales`, in group order; AWQ-SPEC §5), what `ends` asks for taken from it, then cut
/// to the rows the clip search reads ([`clip::subsample`]). Picking rows
/// after the division gives the clip search the bits it would get from the whole input. A MoE
/// layer's MLP input stays whole: each expert's gate/up is clipped on its own routed rows.
fn finish_input(
    spec: &crate::model::config::ModelSpec,
    inputs: &mut LinearInputs,
    input: Input,
    scales: &[&[f32]],
    ends: &mut Ends,
) -> Result<()> {
    let routed = input == Input::Mlp && inputs.routing.is_some();
    let Some(x) = inputs.find(input) else {
        return Ok(());
    };
    let mut x = x.clone();
    for s in scales {
        x = scaled_input(&x, s)?;
    }
    // `auto` makes no matrix where it does not judge: those linears round to nearest.
    let judged = ends.split.is_some() && rounding::judges(x.dim(0)?, x.dim(1)?);
    match ends.grams.as_mut() {
        Some(grams) if judged || !ends.held_grams => {
            if let Some(all) = rounding::gram(spec, input, &x)? {
                let held = match ends.split.filter(|_| ends.held_grams) {
                    Some(s) => {
                        rounding::gram(spec, input, &held_out::select(&x, s.seqlen, &s.held)?)?
                    }
                    None => None,
                };
                let tokens = x.dim(0)?;
                grams.push(rounding::InputGram {
                    input,
                    all,
                    held,
                    tokens,
                });
            }
        }
        _ => {}
    }
    if let (Some(s), Some(j)) = (ends.split, ends.judge.as_mut()) {
        j.fit.set(input, held_out::sample(&x, s.seqlen, &s.fit)?);
        j.held.set(input, held_out::sample(&x, s.seqlen, &s.held)?);
    }
    let x = match routed {
        true => x,
        false => clip::subsample(&x)?,
    };
    inputs.set(input, x);
    Ok(())
}

/// Calibration tokens per expert of a MoE layer.
fn expert_reports(routing: &Routing) -> Vec<ExpertReport> {
    routing
        .tokens()
        .into_iter()
        .enumerate()
        .map(|(expert, tokens)| ExpertReport {
            expert,
            tokens,
            round_to_nearest: tokens < MIN_EXPERT_TOKENS,
        })
        .collect()
}

/// The layer's output and every linear's input over all calibration tokens, computed piece by
/// piece (whole sequences, see [`pieces`]) into buffers of the final size: the MLP's gate/up
/// intermediates exist for one piece at a time, and nothing is held twice. A MoE layer's
/// routing is merged across pieces (token indices offset by each piece's start), so each
/// expert's captured rows stay in the order of its routed tokens. A layer with streamed experts
/// runs only its attention in pieces ([`LayerWeights::attention_half`]).
fn forward_captured(
    layer: &LayerWeights,
    spec: &crate::model::config::ModelSpec,
    rope: &Rope,
    hidden: &Tensor,
    seqlen: usize,
) -> Result<(Tensor, LinearInputs)> {
    if layer.experts.is_some() {
        // Streamed experts: attention piece by piece, the MoE block once over all tokens, so
        // each expert is read (and converted to f32) once and multiplies all its routed rows.
        let halves = (pieces(hidden, seqlen)?.iter())
            .map(|p| layer.attention_half(spec, rope, p, seqlen, true))
            .collect::<Result<Vec<_>>>()?;
        let (out, inputs) = layer.mlp_half(spec, AttentionHalf::cat(halves)?, true)?;
        return Ok((out, inputs.expect("captured")));
    }
    let tokens = hidden.dim(0)?;
    // Slot 0 is the output, then one per captured input kind.
    let mut bufs: Vec<(Option<Input>, Vec<f32>, usize)> = Vec::new();
    let mut routing: Option<Routing> = None;
    let mut start = 0u32;
    for piece in pieces(hidden, seqlen)? {
        let (out, inputs) = layer.forward(spec, rope, &piece, seqlen, true)?;
        let inputs = inputs.expect("captured");
        let parts = std::iter::once((None, &out)).chain(inputs.iter().map(|(k, t)| (Some(k), t)));
        for (n, (kind, t)) in parts.enumerate() {
            if bufs.len() == n {
                let width = t.dim(1)?;
                let rows = if matches!(kind, Some(Input::Expert(_))) {
                    0
                } else {
                    tokens
                };
                bufs.push((kind, Vec::with_capacity(rows * width), width));
            }
            crate::quant::reduce::with_slice(t, |v| bufs[n].1.extend_from_slice(v))?;
        }
        if let Some(piece_routing) = inputs.routing {
            let merged = routing.get_or_insert_with(|| Routing {
                experts: vec![Vec::new(); piece_routing.experts.len()],
            });
            for (all, part) in merged.experts.iter_mut().zip(piece_routing.experts) {
                all.extend(part.into_iter().map(|(t, w)| (t + start, w)));
            }
        }
        start += piece.dim(0)? as u32;
    }
    let mut captured = LinearInputs::default();
    captured.routing = routing;
    let mut out = None;
    for (kind, buf, width) in bufs {
        let rows = buf.len() / width;
        let t = Tensor::from_vec(buf, (rows, width), &candle_core::Device::Cpu)?;
        match kind {
            Some(k) => captured.set(k, t),
            None => out = Some(t),
        }
    }
    Ok((out.expect("the layer output"), captured))
}

/// Searches and applies the clipping of every clipped linear; returns per linear its clip
/// values and mean shrink (clip value / abs-max). Consumes the scaled inputs (clip samples, or a
/// MoE layer's whole MLP input; see [`finish_input`]): each is dropped as soon as the last
/// linear that reads it is clipped. An expert's gate/up are clipped against the
/// tokens routed to it (AutoAWQ hooks the expert's own linears), and an expert with fewer than
/// [`MIN_EXPERT_TOKENS`] tokens is not clipped.
fn clip_layer(
    spec: &crate::model::config::ModelSpec,
    layer: &mut LayerWeights,
    mut inputs: LinearInputs,
    judge: Option<ClipJudge>,
    group: usize,
    sides: ClipSides,
) -> Result<Vec<(&'static str, Vec<clip::Bounds>, f32)>> {
    let linears = spec.linears();
    let mut shrinks = Vec::new();
    for input in spec.inputs() {
        let Some(x) = inputs.take(input) else {
            continue;
        };
        let streamed = |name: &str| {
            layer
                .experts
                .as_ref()
                .is_some_and(|x| x.find(name).is_some())
        };
        let mine: Vec<&crate::model::shapes::LinearShape> = (linears.iter())
            .filter(|l| l.input == input && clipped(l.name) && !streamed(l.name))
            .collect();
        for l in mine {
            let routed;
            let x = match (l.expert, &inputs.routing) {
                (Some(e), Some(routing)) if input == Input::Mlp => {
                    routed = x.index_select(&routing.index(e)?, 0)?;
                    &routed
                }
                _ => &x,
            };
            if l.expert.is_some() && x.dim(0)? < MIN_EXPERT_TOKENS {
                continue;
            }
            let judged = (judge.as_ref().filter(|_| l.expert.is_none()))
                .and_then(|j| j.fit.find(input).zip(j.held.find(input)));
            let lin = layer.linear_mut(l.name);
            let (bounds, shrink) = clip_linear(lin, x, judged, group, sides)?;
            shrinks.push((l.name, bounds, shrink));
        }
        drop(x);
    }
    Ok(shrinks)
}

/// Of the groups in `clips`, how many have separate bounds (`lo ≠ −hi`), and how many there are.
fn separate_groups(clips: &[(&'static str, Vec<clip::Bounds>, f32)]) -> [usize; 2] {
    let all = clips.iter().flat_map(|(_, b, _)| b);
    [
        all.clone().filter(|[lo, hi]| *lo != -*hi).count(),
        all.count(),
    ]
}

/// Clips one linear against its input `x` (subsampled here): the bounds and the mean shrink of
/// the group maxima. `--clip-sides auto` judges separate bounds with `judged` (the fit and
/// held-out blocks' clip samples) and is symmetric without it.
pub(super) fn clip_linear(
    lin: &mut crate::model::layer::Linear,
    x: &Tensor,
    judged: Option<(&Tensor, &Tensor)>,
    group: usize,
    sides: ClipSides,
) -> Result<(Vec<clip::Bounds>, f32)> {
    let cut = match (sides, judged) {
        (ClipSides::Symmetric, _) | (ClipSides::Auto, None) => clip::Cut::Symmetric,
        (ClipSides::Separate, _) => clip::Cut::Separate,
        (ClipSides::Auto, Some((fit, held))) => clip::Cut::Judged { fit, held },
    };
    let bounds = clip::search(&lin.weight, &clip::subsample(x)?, group, cut)?;
    let absmax = group_absmax(&lin.weight, group)?;
    let shrink = bounds
        .iter()
        .zip(&absmax)
        .map(|([lo, hi], a)| match *a > 0.0 {
            true => lo.abs().max(*hi) / a,
            false => 1.0,
        })
        .sum::<f32>()
        / bounds.len() as f32;
    lin.weight = clip::apply(&lin.weight, &bounds, group)?;
    Ok((bounds, shrink))
}

/// Largest |value| of the layer's output and of every linear's input (what a float16 server
/// would have to hold).
fn max_abs_activations(out: &Tensor, inputs: &LinearInputs) -> Result<f32> {
    let mut m = 0f32;
    for t in std::iter::once(out).chain(inputs.iter().map(|(_, t)| t)) {
        // Read in place: an `abs()` tensor would double the largest activation for a moment.
        m = m.max(crate::quant::reduce::with_slice(t, |v| {
            v.iter().fold(0f32, |a, x| a.max(x.abs()))
        })?);
    }
    Ok(m)
}

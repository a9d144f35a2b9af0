//! A MoE layer's routed experts, finished one at a time ([`crate::model::experts`]). Once the
//! layer-wide groups are searched and applied (the MLP group's scales land on every expert's
//! gate/up as data), each expert is read once more: its down group searched against its own
//! up on its routed tokens, its projections clipped, packed and streamed to the part. So the
//! layer never holds more than one expert in f32, nor more than one expert's packed codes.

use std::time::Instant;

use candle_core::Tensor;

use super::layer::{apply_scales, linear_tensors, scaled_input, MIN_EXPERT_TOKENS};
use super::layers::{clip_linear, search_one};
use super::report::{GroupReport, Timings};
use super::QuantizeOptions;
use crate::error::Result;
use crate::io::part::PartWriter;
use crate::model::arch::Input;
use crate::model::config::ModelSpec;
use crate::model::groups::{clipped, scale_groups, ScaleGroup};
use crate::model::layer::{LayerWeights, LinearInputs, Routing};
use crate::model::rope::Rope;

/// What the experts read, taken from the captured inputs once the layer-wide groups are done.
pub(super) struct ExpertInputs {
    /// The MLP's input over all tokens, divided by the MLP group's scales.
    mlp: Tensor,
    /// Per expert, its hidden activation on its routed tokens, as captured.
    hidden: Vec<Tensor>,
    routing: Routing,
    /// Each expert's down group.
    groups: Vec<ScaleGroup>,
}

impl ExpertInputs {
    pub(super) fn take(spec: &ModelSpec, inputs: &mut LinearInputs) -> Self {
        let experts = spec.moe.as_ref().map_or(0, |m| m.experts);
        let groups: Vec<ScaleGroup> = (scale_groups(spec).into_iter())
            .filter(|g| matches!(g.input, Input::Expert(_)))
            .collect();
        Self {
            mlp: inputs.get(Input::Mlp).clone(),
            hidden: (0..experts)
                .map(|e| inputs.take(Input::Expert(e)).expect("captured"))
                .collect(),
            routing: inputs.routing.clone().expect("a MoE layer routes"),
            groups,
        }
    }
}

/// What finishing the experts reported: each down group's report (by expert) and each clipped
/// projection's mean shrink.
#[derive(Default)]
pub(super) struct Finished {
    pub reports: Vec<GroupReport>,
    pub shrinks: Vec<(&'static str, f32)>,
}

/// Finishes expert `e` of `layer` (prefix `p`) and pushes its packed tensors to `part`.
#[allow(clippy::too_many_arguments)]
pub(super) fn finish_expert(
    opts: &QuantizeOptions,
    spec: &ModelSpec,
    rope: &Rope,
    layer: &LayerWeights,
    e: usize,
    inputs: &ExpertInputs,
    p: &str,
    part: &mut PartWriter,
    done: &mut Finished,
    t: &mut Timings,
) -> Result<()> {
    let clock = Instant::now();
    let names = spec.expert_linears(e);
    let mut one = LayerWeights {
        index: layer.index,
        norms: Vec::new(),
        linears: names.into_iter().zip(layer.expert(spec, e)?).collect(),
        routers: Vec::new(),
        verbatim: Vec::new(),
        experts: None,
    };
    t.load += clock.elapsed().as_secs_f64();

    let clock = Instant::now();
    let g = &inputs.groups[e];
    let mut captured = LinearInputs::default();
    captured.set(g.input, inputs.hidden[e].clone());
    let (report, s) = search_one(opts, spec, rope, &one, g, &captured)?;
    apply_scales(spec, &mut one, g, &s)?;
    done.reports.push(report);
    t.search += clock.elapsed().as_secs_f64();

    let clock = Instant::now();
    let tokens = inputs.routing.experts[e].len();
    if opts.clip && tokens >= MIN_EXPERT_TOKENS {
        let rows = inputs.mlp.index_select(&inputs.routing.index(e)?, 0)?;
        let hidden = scaled_input(&inputs.hidden[e], &s)?;
        for (name, x) in names.into_iter().zip([&rows, &rows, &hidden]) {
            if clipped(name) {
                let (_, shrink) =
                    clip_linear(one.linear_mut(name), x, None, opts.group, opts.clip_sides)?;
                done.shrinks.push((name, shrink));
            }
        }
    }
    t.clip += clock.elapsed().as_secs_f64();

    let clock = Instant::now();
    for (name, lin) in &one.linears {
        for tensor in linear_tensors(name, lin, p, opts, None)? {
            part.push(tensor)?;
        }
    }
    t.quantize += clock.elapsed().as_secs_f64();
    Ok(())
}

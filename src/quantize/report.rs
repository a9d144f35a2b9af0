//! What a quantize run reports: the plan resolved before the first layer (`--dry-run`, the JSON
//! `start` event), per-layer outcomes and timings, the work rate, the quality gate, and the
//! model card written beside the weights.

use std::path::PathBuf;

use super::QuantizeOptions;
use crate::calib::CalibSummary;
use crate::model::arch::Input;
use crate::model::groups::scale_groups;
use crate::quant::pack::Layout;

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
    /// config.json's top-level `model_type` (what TGI dispatches on).
    #[serde(default)]
    pub model_type: Option<String>,
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
    /// The all-quantized output's size; `--keep-fp16` may add up to `keep_fp16_budget_bytes`.
    pub output_bytes_estimate: u64,
    pub keep_fp16_budget_bytes: Option<u64>,
    pub peak_memory_estimate_mb: f64,
    /// Rough wall time of the run on this machine's threads (see [`seconds_estimate`]).
    pub seconds_estimate: f64,
    /// `--dtype` as given (`auto` is decided after the last layer).
    pub dtype: super::DtypeChoice,
    /// What an earlier run left beside the output and what happens to it (resume, replace).
    pub staging: Option<String>,
    /// A shard run's layers: first and one past the last (`None`: every layer).
    pub layer_range: Option<[usize; 2]>,
    /// `--dry-run --shards N`: each shard's range and estimates.
    pub shards: Option<Vec<super::shard::ShardPlan>>,
    /// A vision-language wrapper's float parts, copied unchanged (`None` for a causal LM).
    pub vision: Option<crate::model::wrapped::VisionParts>,
    /// Multi-token-prediction layers of the source left out of the output (DeepSeek-V3,
    /// GLM-4.5: `num_nextn_predict_layers`, set to 0 in the output).
    #[serde(default)]
    pub mtp_layers_left_out: usize,
    /// An fp8 source's `weight_block_size` (`[rows, cols]` per `weight_scale_inv` entry): its
    /// linears are dequantized on load and the output keeps no trace of fp8.
    #[serde(default)]
    pub fp8_block: Option<[usize; 2]>,
    /// A MoE model's routed experts and what each sees of the calibration.
    #[serde(default)]
    pub experts: Option<ExpertPlan>,
    /// How the codes will be chosen (`None` only in plans written before `rtn` and `gptq` had
    /// one).
    #[serde(default)]
    pub rounding: Option<RoundingPlan>,
}

/// How `--rounding` will choose the codes, before it runs: for `auto`, which linears it judges
/// on the held-out blocks, counted over every layer (the rest round to nearest; see
/// [`super::rounding::judges`]); for `gptq`, the linears it tries error feedback on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RoundingPlan {
    /// `--rounding`. Plans written while only `auto` had one lack it.
    #[serde(default = "auto_method")]
    pub method: super::Rounding,
    /// Linears of dense layers that `auto` judges; for `gptq`, every linear but the routed
    /// experts' (each keeps error feedback where it lowers the calibration loss).
    pub judged: usize,
    /// Linears of dense layers it does not judge: the calibration has no held-out blocks, or
    /// fewer than [`super::rounding::MIN_TOKENS_PER_INPUT`] tokens per input dimension.
    pub too_few_tokens: usize,
    /// Linears of MoE layers (attention and shared experts too): not judged.
    pub in_moe_layers: usize,
    /// Calibration tokens that would judge every linear of the dense layers (with held-out
    /// blocks): [`super::rounding::MIN_TOKENS_PER_INPUT`] per dimension of the widest input.
    pub tokens_for_all: usize,
    /// Whether error feedback walks from the weights before clipping, so that the clips' errors
    /// are fed back too: the calibration holds
    /// [`super::rounding::MIN_TOKENS_FROM_UNCLIPPED`] tokens. Below, it walks from the clipped
    /// weights; `None` with `--no-clip`.
    #[serde(default)]
    pub from_unclipped: Option<bool>,
}

/// The method of a plan written while only `auto` had one.
fn auto_method() -> super::Rounding {
    super::Rounding::Auto
}

impl RoundingPlan {
    /// `method`'s plan for `tokens` calibration tokens, `split` whether there are held-out
    /// blocks, `clip` whether the weights are clipped.
    pub fn of(
        method: super::Rounding,
        spec: &crate::model::config::ModelSpec,
        tokens: usize,
        split: bool,
        clip: bool,
    ) -> Self {
        let feedback = method != super::Rounding::Rtn;
        let mut p = RoundingPlan {
            method,
            judged: 0,
            too_few_tokens: 0,
            in_moe_layers: 0,
            tokens_for_all: 0,
            from_unclipped: (feedback && clip)
                .then(|| super::rounding::walks_from_unclipped(tokens)),
        };
        match method {
            super::Rounding::Rtn => {}
            super::Rounding::Gptq => {
                p.judged = (0..spec.layers)
                    .map(|i| {
                        spec.layer(i)
                            .linears()
                            .iter()
                            .filter(|l| l.expert.is_none())
                            .count()
                    })
                    .sum();
            }
            super::Rounding::Auto => p.count_auto(spec, tokens, split),
        }
        p
    }

    /// `auto`'s counts: which linears it judges, and the tokens that would judge them all.
    fn count_auto(&mut self, spec: &crate::model::config::ModelSpec, tokens: usize, split: bool) {
        let p = self;
        for i in 0..spec.layers {
            let layer = spec.layer(i);
            for l in layer.linears().iter().filter(|l| l.expert.is_none()) {
                let judged = super::rounding::auto_judges(&layer, split, tokens, l.inp);
                match (layer.moe.is_some(), judged) {
                    (true, _) => p.in_moe_layers += 1,
                    (false, true) => p.judged += 1,
                    (false, false) => p.too_few_tokens += 1,
                }
                if layer.moe.is_none() {
                    let needed = super::rounding::MIN_TOKENS_PER_INPUT * l.inp;
                    p.tokens_for_all = p.tokens_for_all.max(needed);
                }
            }
        }
    }

    /// The plan's `rounding` line: for `auto`, which linears it judges, and what the others
    /// need; for `gptq`, where the walk starts too (`moe`: the model has routed experts, which
    /// round to nearest).
    pub fn words(&self, cal: &crate::calib::CalibSummary, moe: bool) -> String {
        let walk = match self.from_unclipped.filter(|_| self.judged > 0) {
            Some(from) => format!(", walking from {}", super::rounding::start_words(from)),
            None => String::new(),
        };
        match self.method {
            super::Rounding::Rtn => "rtn: round to nearest on every linear".into(),
            super::Rounding::Gptq => format!(
                "gptq: error feedback on {} linears, kept on each where it lowers the \
                 calibration loss{walk}{}",
                self.judged,
                match moe {
                    true => "; routed experts round to nearest",
                    false => "",
                }
            ),
            super::Rounding::Auto => self.auto_words(cal, &walk),
        }
    }

    /// `auto`'s line, `walk` where its walk starts.
    fn auto_words(&self, cal: &crate::calib::CalibSummary, walk: &str) -> String {
        let total = self.judged + self.too_few_tokens + self.in_moe_layers;
        let mut line = format!(
            "auto: error feedback judged on the held-out calibration blocks for {} of {total} \
             linears",
            self.judged
        );
        line += walk;
        if self.too_few_tokens > 0 {
            let why = dense_unjudged_why(cal, Some(self.tokens_for_all));
            line += &format!("; {} round to nearest ({why})", self.too_few_tokens);
        }
        if self.in_moe_layers > 0 {
            line += &format!(
                "; {} in MoE layers round to nearest (auto judges dense layers only)",
                self.in_moe_layers
            );
        }
        line
    }
}

/// What the routed experts of a MoE model see of the calibration, before it runs.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ExpertPlan {
    /// Layers with routed experts.
    pub moe_layers: usize,
    /// Routed experts per MoE layer.
    pub experts: usize,
    /// Experts each token is routed to.
    pub top_k: usize,
    /// Calibration tokens an expert sees on average (`tokens × top_k / experts`); the router
    /// decides the actual spread, reported at the end of the run.
    pub mean_tokens: f64,
    /// Below this many tokens an expert keeps round-to-nearest (no search, no clipping).
    pub min_tokens: usize,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct GroupReport {
    pub group: String,
    pub ratio: Option<f64>,
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
    /// `--clip-sides auto`: of the dense linears' clipped groups (rows × groups), how many
    /// kept separate bounds (the rest are symmetric): `[separate, all]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_separate: Option<[usize; 2]>,
    /// Largest |activation| seen in this layer during calibration (its output and every
    /// linear's input, f32): above 65504 the model overflows when served in float16.
    pub max_abs_activation: f32,
    /// MoE layers: calibration tokens routed to each expert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experts: Option<Vec<ExpertReport>>,
    /// The layer-output guard (`None` with `--no-guard`).
    #[serde(default)]
    pub guard: Option<super::guard::GuardReport>,
    /// `--rounding gptq|auto`: per linear, the losses of both roundings and which was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rounding: Option<Vec<super::rounding::RoundingReport>>,
    /// `--keep-fp16`: each unit's measured error drop when kept in float (`None` without the
    /// flag).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fp16_candidates: Option<Vec<super::keep::Fp16Candidate>>,
    /// Largest |value| of the layer's float tensors (norms, biases) after scaling.
    pub max_abs_float_weight: f32,
    pub seconds: Timings,
    /// `awq merge`: the index of the shard (in the report's `shards`) that quantized it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<usize>,
}

/// One expert of a MoE layer in the report.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ExpertReport {
    pub expert: usize,
    /// Calibration tokens routed to it.
    pub tokens: usize,
    /// Too few tokens to search or clip: identity scale for its down projection and plain
    /// round-to-nearest (see `MIN_EXPERT_TOKENS`).
    pub round_to_nearest: bool,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Timings {
    pub load: f64,
    pub forward: f64,
    pub search: f64,
    pub clip: f64,
    #[serde(default)]
    pub guard: f64,
    /// `--keep-fp16`'s per-unit measurement.
    #[serde(default)]
    pub fp16_budget: f64,
    /// The end-to-end check and its fallback (`end_to_end`): in the run's total only, as it
    /// runs after the last layer (0 for each layer).
    #[serde(default)]
    pub end_to_end: f64,
    pub quantize: f64,
    pub write: f64,
}

impl Timings {
    pub fn total(&self) -> f64 {
        self.load
            + self.forward
            + self.search
            + self.clip
            + self.guard
            + self.fp16_budget
            + self.end_to_end
            + self.quantize
            + self.write
    }

    pub(super) fn add(&mut self, o: &Timings) {
        self.load += o.load;
        self.forward += o.forward;
        self.search += o.search;
        self.clip += o.clip;
        self.guard += o.guard;
        self.fp16_budget += o.fp16_budget;
        self.end_to_end += o.end_to_end;
        self.quantize += o.quantize;
        self.write += o.write;
    }
}

/// The distribution of calibration tokens over a MoE model's experts: per expert and layer,
/// the fewest, the median and the most, and how many fell below the search threshold; `None`
/// for a dense model. Each expert's scale search and clipping see only its routed tokens, so
/// this says how much of the calibration each expert got.
pub(super) fn expert_tokens(layers: &[LayerReport]) -> Option<String> {
    let mut tokens: Vec<usize> = (layers.iter())
        .flat_map(|l| l.experts.iter().flatten().map(|e| e.tokens))
        .collect();
    if tokens.is_empty() {
        return None;
    }
    tokens.sort_unstable();
    let quiet = tokens
        .iter()
        .filter(|&&t| t < super::layer::MIN_EXPERT_TOKENS)
        .count();
    let moe_layers = layers.iter().filter(|l| l.experts.is_some()).count();
    Some(format!(
        "calibration tokens per expert over {moe_layers} MoE layer(s): fewest {}, median {}, \
         most {}; {quiet} of {} expert-layers below {} (round-to-nearest)",
        tokens[0],
        tokens[tokens.len() / 2],
        tokens[tokens.len() - 1],
        tokens.len(),
        super::layer::MIN_EXPERT_TOKENS
    ))
}

/// A warning naming the MoE experts that saw too few calibration tokens to search or clip
/// (plain round-to-nearest), per layer; `None` when every expert had enough.
pub(super) fn quiet_experts(layers: &[LayerReport]) -> Option<String> {
    let per_layer: Vec<String> = layers
        .iter()
        .filter_map(|l| {
            let quiet: Vec<String> = l
                .experts
                .as_ref()?
                .iter()
                .filter(|e| e.round_to_nearest)
                .map(|e| match e.tokens {
                    1 => format!("{} (1 token)", e.expert),
                    n => format!("{} ({n} tokens)", e.expert),
                })
                .collect();
            // Indices as in the tensor names (0-based; the progress line counts from 1).
            (!quiet.is_empty()).then(|| format!("layers.{}: experts {}", l.layer, quiet.join(", ")))
        })
        .collect();
    (!per_layer.is_empty()).then(|| {
        format!(
            "{} saw fewer than {} calibration tokens and were quantized with plain \
             round-to-nearest (no scale search, no clipping); more calibration tokens (--n-samples, \
             --max-blocks, --seqlen) or more varied text (--calib) reach more experts",
            per_layer.join("; "),
            super::layer::MIN_EXPERT_TOKENS
        )
    })
}

/// The model card's row for the end-to-end check: the versions' KL divergence from the float
/// model and what is written, or why the check did not run. A merged run computes the same
/// scores, so its card is still a single run's.
fn end_to_end_row(r: &Report) -> String {
    let Some(e) = r.end_to_end.as_ref() else {
        let moe = r.layers.iter().any(|l| l.experts.is_some());
        return match super::end_to_end::why_not(&r.options, moe) {
            Some(why) => format!("| end-to-end check | no: {why} |\n"),
            // A shard's card: its merge runs the check.
            None => String::new(),
        };
    };
    let per_layer = match e.per_layer.scores {
        Some(s) => format!(", {:.4} with the per-layer choice", s.kl),
        None => String::new(),
    };
    // Without a search the scales are 1: "scales-only" is round-to-nearest, and without
    // clipping either, only the codes differ.
    let scales_only = match (r.options.no_search, r.options.clip) {
        (true, false) => String::new(),
        (true, true) => format!(
            "{:.4} without clipping (no scales searched), ",
            e.scales_only.kl
        ),
        (false, _) => format!(
            "{:.4} with AWQ's scales without clipping, ",
            e.scales_only.kl
        ),
    };
    let scores = format!(
        "mean KL divergence from the float model's next-token distribution {:.4} as quantized, \
         {scales_only}{:.4} with plain round-to-nearest{per_layer} ({} predictions on \
         calibration blocks)",
        e.written.kl, e.rtn.kl, e.predictions
    );
    let Some(f) = e.fallback else {
        use super::fallback::{FALLBACK_MARGIN, MIN_KL_GAIN};
        return format!(
            "| end-to-end check | {scores}: written as quantized (no other version closer by {} %, \
             {MIN_KL_GAIN:e} nats and twice the standard error of its gain) |\n",
            FALLBACK_MARGIN * 100.0
        );
    };
    let why = match e.forced {
        true => format!(
            "was forced by {} (a test hook)",
            super::fallback::INJECT_FALLBACK_ENV
        ),
        false => "came clearly closer".into(),
    };
    format!(
        "| end-to-end check | {scores}: {} {why}; written again: {} (the scale search, clipping \
         and guard rows describe the layers before it) |\n",
        f.words(),
        super::fallback::rewritten_words(&e.output_versions)
    )
}

/// Why the guard skips MoE layers, in both of the card's guard rows and its end-to-end row.
pub(super) const MOE_UNGUARDED: &str =
    "not guarded: a second copy of the layer would break the one-layer memory bound";

/// The model card's guard row: off, or how many layers it checked and changed, and how.
fn guard_summary(r: &Report) -> String {
    let guarded = r.layers.iter().filter(|l| l.guard.is_some()).count();
    if guarded == 0 {
        return match r.options.guard && r.layers.iter().any(|l| l.experts.is_some()) {
            true => format!("no (MoE layers are {MOE_UNGUARDED})"),
            false => "no".into(),
        };
    }
    let moe = r.layers.iter().filter(|l| l.experts.is_some()).count();
    let unguarded = match moe {
        0 => String::new(),
        n => format!(" (the {n} MoE layers are {MOE_UNGUARDED})"),
    };
    let changed: Vec<String> = r
        .layers
        .iter()
        .filter_map(|l| {
            let g = l.guard.as_ref()?;
            (!g.fallbacks.is_empty())
                .then(|| format!("layer {}: {}", l.layer, g.fallbacks.join(", ")))
        })
        .collect();
    // Without scales or clips the guard's versions are all round-to-nearest: only error
    // feedback's codes differ from it, and the end-to-end check judges those.
    let kept = match r.options.no_search && !r.options.clip {
        true => {
            "nothing was searched or clipped, so there was nothing to fall back from (the \
                 end-to-end check compares the codes with round-to-nearest's)"
        }
        false => "AWQ as searched was kept on every one",
    };
    match changed.len() {
        0 => format!(
            "yes, {guarded} of {} layers checked{unguarded}; {kept}",
            r.layers.len()
        ),
        n => format!(
            "yes, {guarded} of {} layers checked{unguarded}; {n} moved toward round-to-nearest where AWQ's choice was clearly worse on the layer's output ({})",
            r.layers.len(),
            changed.join("; ")
        ),
    }
}

/// The model card's fp16-budget row.
fn kept_summary(r: &Report) -> String {
    let Some(k) = &r.kept_fp16 else {
        return "no".into();
    };
    let mb = |b: u64| b as f64 / 1e6;
    match k.units.len() {
        0 => super::keep::nothing_kept(k, &r.layers).unwrap_or_default(),
        n => format!(
            "{n} unit(s), {} linears, in {}: +{:.2} MB of a {}% budget ({:.2} MB): {} (listed in modules_to_not_convert; vLLM and transformers honour it, TGI and AutoAWQ's own loader do not)",
            k.linears.len(),
            r.float_dtype.torch_name(),
            mb(k.extra_bytes),
            k.budget_pct,
            mb(k.budget_bytes),
            k.units.join(", ")
        ),
    }
}

impl Report {
    /// How the codes were chosen, in words: the model card's rounding row and the run's
    /// summary. For `--rounding auto`, the linears it did not judge and why (they round to
    /// nearest).
    pub fn rounding_words(&self) -> String {
        let c = self.rounding_counts();
        if c.linears == 0 {
            return "round-to-nearest".into();
        }
        let auto = c.method == super::Rounding::Auto;
        let unjudged = match auto {
            true => not_judged(&self.calibration, &c),
            false => String::new(),
        };
        format!(
            "error feedback (GPTQ){} with round-to-nearest's scales and zero points, kept on {} of {} linears where it lowered the {} loss{unjudged}{}",
            self.walk_words(),
            c.error_feedback,
            c.linears,
            match auto {
                true => "held-out calibration blocks'",
                false => "calibration",
            },
            match self.layers.iter().any(|l| l.experts.is_some()) {
                true => "; MoE experts round to nearest",
                false => "",
            }
        )
    }

    /// Where error feedback walked from ([`super::rounding::walks_from_unclipped`]); nothing to
    /// say without clipping.
    fn walk_words(&self) -> String {
        match self.options.clip {
            true => {
                let from = super::rounding::walks_from_unclipped(self.calibration.tokens);
                format!(" from {}", super::rounding::start_words(from))
            }
            false => String::new(),
        }
    }

    /// Every layer's rounding record of a quantized linear (those `--keep-fp16` kept float have
    /// no codes), each with whether its layer is a MoE layer.
    fn rounding_records(&self) -> Vec<(bool, &super::rounding::RoundingReport)> {
        let kept = |l: &LayerReport, linear: &str| {
            self.kept_fp16.as_ref().is_some_and(|k| {
                let tail = format!(".layers.{}.{linear}", l.layer);
                k.linears.iter().any(|n| n.ends_with(&tail))
            })
        };
        (self.layers.iter())
            .flat_map(|l| {
                (l.rounding.iter().flatten())
                    .filter(move |x| !kept(l, &x.linear))
                    .map(move |x| (l.experts.is_some(), x))
            })
            .collect()
    }

    /// The rounding row's counts, for `--json`'s `done` event.
    pub fn rounding_counts(&self) -> RoundingCounts {
        let records = self.rounding_records();
        let unjudged = |moe: bool| {
            (records.iter())
                .filter(|(m, x)| *m == moe && x.held_out_rtn_loss.is_none())
                .count()
        };
        let auto = self.options.rounding == super::Rounding::Auto;
        RoundingCounts {
            method: self.options.rounding,
            linears: records.len(),
            error_feedback: records.iter().filter(|(_, x)| x.gptq_kept).count(),
            not_judged: if auto { unjudged(false) } else { 0 },
            in_moe_layers: if auto { unjudged(true) } else { 0 },
        }
    }
}

/// How the codes of the run's linears were chosen, counted (MoE experts, which round to
/// nearest, and linears kept float are not counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RoundingCounts {
    /// `--rounding`.
    pub method: super::Rounding,
    /// Linears with a rounding record: the dense linears `auto` or `gptq` considered (0 with
    /// `rtn`).
    pub linears: usize,
    /// Of them, those written with error feedback's codes.
    pub error_feedback: usize,
    /// `auto`: linears of dense layers it did not judge (too few tokens, no held-out blocks).
    pub not_judged: usize,
    /// `auto`: linears of MoE layers (not judged: dense layers only).
    pub in_moe_layers: usize,
}

/// `--rounding auto`'s linears that were not judged (`c`), by why (empty where none): in a MoE
/// layer (held-out judging is for dense layers), without held-out blocks, or with too few
/// calibration tokens for the linear's input width.
fn not_judged(cal: &crate::calib::CalibSummary, c: &RoundingCounts) -> String {
    let mut out = String::new();
    for (n, why) in [
        (c.not_judged, dense_unjudged_why(cal, None)),
        (
            c.in_moe_layers,
            "in MoE layers: auto judges dense layers only".into(),
        ),
    ] {
        if n > 0 {
            out += &format!("; {n} not judged ({why}), so round to nearest");
        }
    }
    out
}

/// Why `--rounding auto` does not judge linears of a dense layer with calibration `cal`, in
/// words (the plan, the card, the summary): no held-out blocks, or too few tokens for the
/// input's width; with `tokens_for_all`, how many would judge every linear.
fn dense_unjudged_why(cal: &crate::calib::CalibSummary, tokens_for_all: Option<usize>) -> String {
    match cal.held_out_blocks {
        0 => format!(
            "no held-out blocks: fewer than {} calibration blocks",
            crate::calib::held_out::EVERY
        ),
        _ => format!(
            "fewer than {} calibration tokens per input dimension, {} tokens here{}: more \
             --n-samples or a longer --seqlen",
            super::rounding::MIN_TOKENS_PER_INPUT,
            cal.tokens,
            tokens_for_all.map_or(String::new(), |n| format!(" ({n} judge every linear)"))
        ),
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
    /// Peak resident set size of the process in MiB (Linux `VmHWM` / 1024), when known.
    pub peak_rss_mb: Option<f64>,
}

/// The process's peak RSS in MiB, from `/proc/self/status` (Linux only).
pub(super) fn peak_rss_mb() -> Option<f64> {
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
    /// The dtype of the unquantized tensors and `torch_dtype`.
    pub float_dtype: crate::io::writer::FloatDtype,
    /// Why that dtype (see `--dtype`).
    pub dtype_reason: String,
    pub source_dir: PathBuf,
    pub architecture: String,
    pub calibration: CalibSummary,
    pub layers: Vec<LayerReport>,
    /// The end-to-end check on the guard's calibration blocks, and its fallback (`null` where
    /// it does not run: `--no-guard`, plain round-to-nearest, MoE models, `--seqlen 1`; a
    /// shard writes no report, its merge runs the check).
    pub end_to_end: Option<super::end_to_end::EndToEndReport>,
    /// `--keep-fp16`: the budget and the units it kept (`null` without the flag).
    pub kept_fp16: Option<super::keep::KeptFp16>,
    /// The shard files.
    pub files: Vec<String>,
    /// Every file written into the output directory, sorted: `--force` replaces an earlier
    /// output only while it holds nothing else.
    pub output_files: Vec<String>,
    pub seconds_total: f64,
    pub work: Work,
    /// What the bytes depend on (model contents, calibration tokens, options): what
    /// `--skip-existing` compares and a resumed run must match.
    pub fingerprint: serde_json::Value,
    /// Where the checkpoint was kept because it failed the quality gate (`OUT.rejected`;
    /// `None` when it passed or there was no gate).
    pub rejected_output: Option<PathBuf>,
    /// `awq merge`: the shards whose layers this checkpoint holds (`layers[i].shard` indexes
    /// them). Their wall times do not add up to a single run's: each also ran the float
    /// forward of the layers before its range.
    pub shards: Option<Vec<ShardReport>>,
}

/// One shard of a merged checkpoint.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ShardReport {
    pub dir: PathBuf,
    /// First layer and one past the last.
    pub layers: [usize; 2],
    /// Wall seconds of the shard run, and of its prefix forward.
    pub seconds: f64,
    pub prefix_seconds: f64,
    pub host: String,
}

/// Bytes of one layer of `spec` in the output: packed linears (4-bit codes, int32 zeros per 8
/// outputs, f16 scales per group) plus the fp16 tensors that stay unquantized.
fn layer_bytes(spec: &crate::model::config::ModelSpec, group: usize) -> usize {
    let g = group.max(1);
    let linears: usize = spec
        .linears()
        .iter()
        .map(|l| {
            l.out * l.inp / 2
                + (l.inp / g) * (l.out / 8) * 4
                + (l.inp / g) * l.out * 2
                + if l.bias { l.out * 2 } else { 0 }
        })
        .sum();
    let floats: usize = spec.layer_floats().iter().map(|(_, w)| w * 2).sum();
    let routers: usize = spec
        .router_linears()
        .iter()
        .map(|l| l.out * l.inp * 2)
        .sum();
    let verbatim: usize = spec.layer_verbatim().iter().map(|(_, w)| w * 4).sum();
    linears + floats + routers + verbatim
}

pub(super) fn make_plan(
    opts: &QuantizeOptions,
    dir: &std::path::Path,
    spec: &crate::model::config::ModelSpec,
    cal: &CalibSummary,
    vision: Option<crate::model::wrapped::VisionParts>,
) -> Plan {
    // Every kind of layer's groups (a MoE model's dense layers too), once each.
    let scale_groups = (spec.layer_kinds().iter())
        .flat_map(|(_, k)| scale_groups(k))
        .map(|g| {
            (
                g.name.to_string(),
                g.linears.iter().map(|l| l.to_string()).collect::<Vec<_>>(),
                g.inspect.name().to_string(),
            )
        })
        .fold(Vec::new(), |mut v, g| {
            if !v.contains(&g) {
                v.push(g);
            }
            v
        });
    let per_layer: usize = (0..spec.layers)
        .map(|i| layer_bytes(&spec.layer(i), opts.group))
        .sum();
    let heads = if spec.tied_embeddings { 1 } else { 2 };
    let output = per_layer
        + heads * spec.vocab * spec.hidden * 2
        + spec.hidden * 2
        + vision.as_ref().map_or(0, |v| v.bytes() as usize);
    let t = cal.tokens;
    let rounding = rounding_bytes(opts.rounding, spec, t, cal.held_out_blocks > 0);
    let peak = (layer_peak_bytes(spec, t, cal.seqlen) + rounding).max(check_peak_bytes(opts, spec));
    let moe: Vec<_> = (0..spec.layers)
        .filter_map(|i| spec.layer(i).moe.clone())
        .collect();
    let experts = moe.first().map(|m| ExpertPlan {
        moe_layers: moe.len(),
        experts: m.experts,
        top_k: m.top_k,
        mean_tokens: (t * m.top_k) as f64 / m.experts as f64,
        min_tokens: super::layer::MIN_EXPERT_TOKENS,
    });
    Plan {
        model_dir: dir.to_path_buf(),
        architecture: spec.architecture.clone(),
        model_type: spec.model_type.clone(),
        layers: spec.layers,
        // Every kind of layer's linears (a MoE model's dense layers too), once each.
        linears: (spec.layer_kinds().iter())
            .flat_map(|(_, k)| k.linears())
            .fold(Vec::new(), |mut v: Vec<(String, [usize; 2])>, l| {
                if !v.iter().any(|(n, _)| n == l.name) {
                    v.push((l.name.to_string(), [l.out, l.inp]));
                }
                v
            }),
        scale_groups,
        calibration: cal.clone(),
        w_bit: opts.w_bit,
        group: opts.group,
        layout: opts.layout,
        layout_reason: opts.layout_choice.as_ref().map(|c| c.reason.clone()),
        output: opts.output.clone(),
        output_bytes_estimate: output as u64,
        keep_fp16_budget_bytes: opts
            .keep_fp16
            .map(|pct| (output as f64 * pct / 100.0) as u64),
        peak_memory_estimate_mb: peak as f64 / (1 << 20) as f64,
        seconds_estimate: seconds_estimate(opts, spec, cal),
        dtype: opts.dtype,
        staging: None,
        layer_range: None,
        vision,
        mtp_layers_left_out: spec.mtp_layers,
        shards: None,
        fp8_block: spec.fp8_block,
        experts,
        rounding: Some(RoundingPlan::of(
            opts.rounding,
            spec,
            t,
            cal.held_out_blocks > 0,
            opts.clip,
        )),
    }
}

/// Seconds per (layer parameter × calibration token) outside the scale search (forward,
/// capture, guard, packing), per (parameter × candidate) in it (each candidate quantizes the
/// group's weights, whatever the token count), and per (parameter × candidate × scored token),
/// on the fitting machine (see [`machine_scale`]). Fitted to four full SmolLM2-135M runs with
/// `--group 64`, 20 candidates: 32 × 512 tokens exact (376 s) and `--fast` (92 s) there, and
/// `--fast` with 13 × 512 (282 s) and 7 × 128 tokens (83.8 s) on a machine 4.3× slower: all
/// four within 1 %; the Llama-2-7B-shaped layer (97 s) comes out at 75 s.
const SECONDS_PER_PARAM_TOKEN: f64 = 2.56e-11;
const SEARCH_SECONDS_PER_PARAM: f64 = 3.3e-9;
const SEARCH_SECONDS_PER_PARAM_TOKEN: f64 = 9.3e-12;
/// The float forward alone (a shard's prefix): the 7B-shaped layer's forward, 10.0 s for
/// 202 M parameters × 8192 tokens on 2 cores.
const FORWARD_SECONDS_PER_PARAM_TOKEN: f64 = 6.0e-12;
/// The threads the constants were measured with.
const FITTED_THREADS: f64 = 2.0;

/// A rough estimate of the run's wall time (±50 %): see [`layer_seconds_estimate`].
fn seconds_estimate(
    opts: &QuantizeOptions,
    spec: &crate::model::config::ModelSpec,
    cal: &CalibSummary,
) -> f64 {
    layer_seconds_estimate(opts, spec, cal).0 * spec.layers as f64 * machine_scale()
}

/// How much slower (or faster) this machine runs than the one the estimates were fitted on:
/// a 512³ f32 matmul (the work that dominates a run), best of 3, against the rate the same
/// product reached there. Measured once per process (~30 ms).
pub(super) fn machine_scale() -> f64 {
    static SCALE: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *SCALE.get_or_init(|| {
        let measured = matmul_gflops().filter(|g| *g > 0.0);
        match measured {
            Some(g) => FITTED_MATMUL_GFLOPS / g,
            None => FITTED_THREADS / (rayon::current_num_threads() as f64).max(1.0),
        }
    })
}

/// What the run holds besides the tokenizer, embedding rows and runtime (a fixed overhead
/// measured on SmolLM2: about 210 MiB before layer 1).
const FIXED_BYTES: usize = 250 << 20;

/// Peak bytes while a layer is quantized, for `t` calibration tokens in sequences of `seqlen`:
/// one layer in f32 three times (weights, the search's scratch copy, a candidate), the
/// captured activations of every token, and the MLP intermediates of one piece of
/// [`super::layer::PIECE_TOKENS`] (the capture and the search's module runs go piece by piece).
/// A MoE layer's routed experts are read one at a time (`model::experts`): one of them counts.
fn layer_peak_bytes(spec: &crate::model::config::ModelSpec, t: usize, seqlen: usize) -> usize {
    let linears = spec.linears();
    let one_expert: usize = spec
        .moe
        .as_ref()
        .map_or(0, |m| 3 * m.intermediate * spec.hidden);
    let layer_params = dense_params(spec) + one_expert;
    let mlp_width = match &spec.moe {
        Some(m) => m.top_k * m.intermediate + m.shared.as_ref().map_or(0, |s| s.intermediate),
        None => spec.intermediate,
    };
    // Per token: the layer's input and output and every captured input (an expert's only for
    // the tokens routed to it).
    let captured: usize = spec
        .inputs()
        .iter()
        .map(|input| {
            let l = linears
                .iter()
                .find(|l| l.input == *input)
                .expect("read by a linear");
            match (input, &spec.moe) {
                (Input::Expert(_), Some(m)) => l.inp * m.top_k / m.experts,
                _ => l.inp,
            }
        })
        .sum();
    let piece = ((super::layer::PIECE_TOKENS / seqlen.max(1)).max(1) * seqlen).min(t);
    let activations = t * (2 * spec.hidden + captured) + piece * 3 * mlp_width;
    4 * (3 * layer_params + activations) + 4 * t * spec.hidden + FIXED_BYTES
}

/// Peak bytes of the end-to-end check after the last layer, where it runs: the head in f32,
/// three `rows × vocab` buffers of logits (the float model's, a version's, and its copy), the
/// streams and two copies of a layer in f32. On SmolLM2 this phase tops the run below about
/// 20 000 calibration tokens (its 49 152-token vocabulary): 673 MiB measured with 6656.
fn check_peak_bytes(opts: &QuantizeOptions, spec: &crate::model::config::ModelSpec) -> usize {
    if !super::end_to_end::applies(opts, spec) {
        return 0;
    }
    let logits = 3 * super::end_to_end::HEAD_ROWS * spec.vocab;
    let streams = 5 * super::end_to_end::CHECK_TOKENS * spec.hidden;
    4 * (spec.vocab * spec.hidden + logits + streams + 2 * dense_params(spec)) + FIXED_BYTES
}

/// Weights of the linears of a layer of `spec` other than its routed experts'.
fn dense_params(spec: &crate::model::config::ModelSpec) -> usize {
    (spec.linears().iter().filter(|l| l.expert.is_none()))
        .map(|l| l.out * l.inp)
        .sum()
}

/// Error feedback's f64 Gram matrices (`quantize::rounding`): each dense input's `XᵀX` of
/// every block, held from the search to the codes, plus about two more of the widest input's
/// while its factors are made; the most any kind of layer of `spec` holds. `auto` makes them only
/// in a dense layer, for an input it judges (a calibration `split` into held-out blocks, and
/// enough `tokens`), with the held-out blocks' `XᵀX` beside them. 0 for `rtn`.
fn rounding_bytes(
    rounding: super::Rounding,
    spec: &crate::model::config::ModelSpec,
    tokens: usize,
    split: bool,
) -> usize {
    (spec.layer_kinds().iter())
        .map(|(_, kind)| {
            let copies = |n: usize| match rounding {
                super::Rounding::Rtn => 0,
                super::Rounding::Gptq => 1,
                super::Rounding::Auto => {
                    2 * super::rounding::auto_judges(kind, split, tokens, n) as usize
                }
            };
            let linears = kind.linears();
            let widths: Vec<usize> = (kind.inputs().iter())
                .filter_map(|i| linears.iter().find(|l| l.input == *i && l.expert.is_none()))
                .map(|l| l.inp)
                .filter(|&n| copies(n) > 0)
                .collect();
            let kept: usize = widths.iter().map(|&n| copies(n) * n * n).sum();
            let widest = widths.iter().max().copied().unwrap_or(0);
            8 * (kept + 2 * widest * widest)
        })
        .max()
        .unwrap_or(0)
}

/// What the fitting machine's 2 cores reached on [`matmul_gflops`]'s product (AVX-512; its
/// SmolLM2 runs' matmuls averaged 285 GFLOP/s): derived from a 2-core AVX2 machine measuring
/// 68 GFLOP/s there while its runs averaged 66 GFLOP/s, scaled by the runs' ratio.
const FITTED_MATMUL_GFLOPS: f64 = 68.0 * 285.0 / 66.0;

/// GFLOP/s of a 512 × 512 × 512 f32 matmul on this machine's threads, best of 3.
fn matmul_gflops() -> Option<f64> {
    use candle_core::{Device, Tensor};
    let a = Tensor::ones((512, 512), candle_core::DType::F32, &Device::Cpu).ok()?;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = std::time::Instant::now();
        a.matmul(&a).ok()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Some(2.0 * 512f64.powi(3) / best / 1e9)
}

/// Rough seconds (±50 %) to quantize one layer, and to run one layer's float forward, on the 2
/// threads the constants were fitted on ([`machine_scale`] converts): the parameters a token
/// passes through (an expert's share by its routing) × calibration tokens, plus the search's
/// candidates × scored tokens. Independent of this machine, so that every shard of a job
/// computes the same ranges.
pub(super) fn layer_seconds_estimate(
    opts: &QuantizeOptions,
    spec: &crate::model::config::ModelSpec,
    cal: &CalibSummary,
) -> (f64, f64) {
    let per_token: f64 = spec
        .linears()
        .iter()
        .map(|l| {
            let share = match (&spec.moe, l.expert) {
                (Some(m), Some(_)) => m.top_k as f64 / m.experts as f64,
                _ => 1.0,
            };
            (l.out * l.inp) as f64 * share
        })
        .sum::<f64>();
    let tokens = cal.tokens as f64;
    let scored = opts
        .search_blocks
        .map_or(tokens, |b| (b.min(cal.blocks) * cal.seqlen) as f64);
    let candidates = if opts.no_search {
        0.0
    } else {
        opts.n_grid as f64
    };
    let search = candidates * (SEARCH_SECONDS_PER_PARAM + scored * SEARCH_SECONDS_PER_PARAM_TOKEN);
    let quantize = per_token * (tokens * SECONDS_PER_PARAM_TOKEN + search);
    let forward = per_token * tokens * FORWARD_SECONDS_PER_PARAM_TOKEN;
    (quantize, forward)
}

/// The Hub id of the source: `--model` as `org/name` (not an existing local path), or the id
/// a Hub cache snapshot path encodes (`…/models--org--name/snapshots/COMMIT`). A local
/// directory has no id the Hub would recognise.
fn hub_id(model: &str) -> Option<String> {
    let path = std::path::Path::new(model);
    if path.exists() {
        return snapshot_id(path);
    }
    let part = |p: &str| {
        !p.is_empty()
            && !p.starts_with(['.', '-'])
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    match model.split_once('/') {
        Some((org, name)) if part(org) && part(name) => Some(model.to_string()),
        _ => None,
    }
}

/// `org/name` of a Hub cache snapshot directory `…/models--org--name/snapshots/COMMIT`.
fn snapshot_id(path: &std::path::Path) -> Option<String> {
    let path = crate::io::output::resolve(path);
    let snapshots = path.parent()?;
    if snapshots.file_name()? != "snapshots" {
        return None;
    }
    let repo = snapshots.parent()?.file_name()?.to_str()?;
    let (org, name) = repo.strip_prefix("models--")?.split_once("--")?;
    Some(format!("{org}/{name}"))
}

/// The card's title and `base_model`: `--name` and `--base-model` when given, else the Hub id
/// (from `--model` or a cache snapshot path), else the model directory's name (no
/// `base_model`).
fn card_names(o: &QuantizeOptions) -> (String, Option<String>) {
    let hub = o.base_model.clone().or_else(|| hub_id(&o.model));
    let name = o.name.clone().or_else(|| hub.clone()).unwrap_or_else(|| {
        std::path::Path::new(&o.model)
            .file_name()
            .map_or_else(|| o.model.clone(), |n| n.to_string_lossy().into_owned())
    });
    (name, hub)
}

/// `README.md` of the output: Hub front matter (`base_model` only for a Hub source), the
/// settings in plain words, the measured perplexities when the quality gate ran, and how to
/// load it — vLLM and TGI for GEMM only, transformers (with `autoawq`) for both layouts.
pub(super) fn model_card(r: &Report) -> String {
    use std::fmt::Write;
    let o = &r.options;
    let (name, hub) = card_names(o);
    let hub = hub.as_deref();
    let ct = o.layout == Layout::PackQuantized;
    let layout = match ct {
        true => "compressed-tensors".to_string(),
        false => o.layout.name().to_uppercase(),
    };
    let written_as = match ct {
        true => "in compressed-tensors' pack-quantized format (what llm-compressor writes)".into(),
        false => format!("in AutoAWQ's {layout} layout"),
    };
    // Not the output path: the card travels with the directory (and must not change the bytes
    // of the same run written elsewhere).
    let dir = "path/to/this-directory";
    let mut c = String::from("---\n");
    if let Some(id) = hub {
        let _ = write!(c, "base_model: {id}\nbase_model_relation: quantized\n");
    }
    let vision = r.plan.vision.as_ref();
    let pipeline = match vision {
        Some(_) => "image-text-to-text",
        None => "text-generation",
    };
    let _ = write!(
        c,
        "library_name: transformers\npipeline_tag: {pipeline}\ntags:\n- awq\n- 4-bit\n- quantized\n---\n\n"
    );
    match &o.name {
        Some(title) => {
            let _ = writeln!(c, "# {title}\n");
        }
        None => {
            let _ = writeln!(c, "# {name} — AWQ INT4 ({layout})\n");
        }
    }
    let source = match (hub_id(&o.model), &o.revision) {
        (Some(id), Some(rev)) => format!("`{id}` (Hub, revision `{rev}`)"),
        (Some(id), None) => format!("`{id}` (Hub)"),
        (None, _) => format!(
            "local directory `{}`",
            std::path::Path::new(&o.model)
                .file_name()
                .map_or_else(|| o.model.clone(), |n| n.to_string_lossy().into_owned())
        ),
    };
    let search = if o.no_search {
        "none (round-to-nearest scales)".to_string()
    } else {
        let grid = match o.grid {
            crate::quant::search::Grid::Robust => "robust: the identity first, then AutoAWQ's",
            crate::quant::search::Grid::Autoawq => "AutoAWQ's",
        };
        let blocks = o.search_blocks.map_or(String::new(), |n| {
            format!(", scored on {n} calibration blocks")
        });
        format!("{grid} {} ratios{blocks}", o.n_grid)
    };
    let _ = write!(
        c,
        "Quantized from {source} to 4-bit weights with activation-aware weight quantization (AWQ) \
         by `{tool}`, {written_as}.\n\n\
         | setting | value |\n|---|---|\n\
         | bits | {bits} |\n| group size | {group} |\n| zero point | yes |\n| layout (version) | {layout} |\n\
         {source_weights}{parts}{mtp}{experts}| scale search | {search} |\n| clipping search | {clip} |\n| layer-output guard | {guard} |\n{end_to_end}| rounding | {rounding} |\n| kept unquantized (--keep-fp16) | {kept} |\n\
         | unquantized tensors | {dtype} ({why}) |\n\
         | calibration | {files} |\n| samples (documents, or pieces with --split-long) / blocks × seqlen | {docs} / {blocks} × {seqlen} |\n| seed | {seed} |\n\n",
        dtype = r.float_dtype.torch_name(),
        why = r.dtype_reason,
        parts = vision.map_or(String::new(), |v| format!(
            "| parts | text decoder quantized, vision tower in float ({}: {} tensors, {:.1} MB, \
             copied unchanged) |\n",
            v.modules.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", "),
            v.modules.iter().map(|m| m.tensors).sum::<usize>(),
            v.bytes() as f64 / 1e6
        )),
        source_weights = r.plan.fp8_block.map_or(String::new(), |[rows, cols]| format!(
            "| source weights | fp8 (e4m3, one scale per {rows}×{cols} block), dequantized on load |\n"
        )),
        experts = expert_tokens(&r.layers).map_or(String::new(), |t| format!(
            "| routed experts | {t} |\n"
        )),
        mtp = match r.plan.mtp_layers_left_out {
            0 => String::new(),
            n => format!(
                "| multi-token-prediction layers | {n} left out (`num_nextn_predict_layers` set to \
                 0): serve without MTP speculative decoding |\n"
            ),
        },
        tool = r.tool,
        bits = o.w_bit,
        group = o.group,
        clip = match (o.clip, o.clip_sides) {
            (false, _) => "no".to_string(),
            (true, super::ClipSides::Symmetric) => "yes, symmetric (AutoAWQ's)".to_string(),
            (true, super::ClipSides::Separate) => "yes, upper and lower bound each refined".into(),
            (true, super::ClipSides::Auto) => {
                let [sep, all] = (r.layers.iter().filter_map(|l| l.clip_separate))
                    .fold([0, 0], |[a, b], [c, d]| [a + c, b + d]);
                format!(
                    "yes, upper and lower bound each refined on {sep} of {all} groups, where that \
                     lowered the clip objective on held-out calibration blocks; symmetric \
                     (AutoAWQ's) elsewhere"
                )
            }
        },
        guard = guard_summary(r),
        end_to_end = end_to_end_row(r),
        rounding = r.rounding_words(),
        kept = kept_summary(r),
        files = r.calibration.source,
        docs = r.calibration.documents_used,
        blocks = r.calibration.blocks,
        seqlen = r.calibration.seqlen,
        seed = o.calib.seed,
    );
    if let Some(q) = &r.quality {
        let text = q.text.file_name().map_or_else(
            || q.text.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let _ = write!(
            c,
            "## Quality\n\nPerplexity measured on the first {tokens} tokens of `{text}`:\n\n\
             | model | perplexity |\n|---|---|\n| original | {fp:.4} |\n| AWQ INT4 | {q:.4} ({inc:+.2}%) |\n\n",
            tokens = q.tokens,
            fp = q.fp_perplexity,
            q = q.quantized_perplexity,
            inc = q.increase_pct,
        );
        if q.max_increase_pct.is_finite() {
            let _ = write!(
                c,
                "Quality gate: at most {}% increase — {}.\n\n",
                q.max_increase_pct,
                if q.passed { "passed" } else { "FAILED" }
            );
        }
    }
    c += "## Use\n\nReplace `path/to/this-directory` with where this directory is (or its Hub id \
          once uploaded).\n\n";
    let kept = r.kept_fp16.as_ref().is_some_and(|k| !k.units.is_empty());
    if ct {
        let moe = r.layers.iter().any(|l| l.experts.is_some());
        return c + &compressed_tensors_use(dir, vision.is_some(), moe);
    }
    if kept {
        c += "Some linears are kept unquantized (`--keep-fp16`, listed in \
              `modules_to_not_convert`): vLLM and transformers honour that; AutoAWQ's own loader \
              (`from_quantized`) matches entries against names inside a layer and does not.\n\n";
    }
    match o.layout {
        Layout::Gemm if r.float_dtype == crate::io::writer::FloatDtype::Bfloat16 => {
            let _ = write!(
                c,
                "The unquantized tensors are bfloat16 ({why}). vLLM serves that with its \
                 `awq_marlin` kernels only (compute capability 8.0+, chosen by itself; \
                 `awq verify {dir}` says whether Marlin applies to this model); vLLM's `awq` \
                 kernels and TGI run float16 only:\n\n```sh\nvllm serve {dir} --dtype bfloat16\n```\n\n",
                why = r.dtype_reason
            );
        }
        Layout::Gemm if kept => {
            let _ = write!(
                c,
                "vLLM (it picks its faster `awq_marlin` kernels by itself where they apply; \
                 `--quantization awq` would force the slower ones):\n\n```sh\nvllm serve {dir}\n```\n\n\
                 TGI cannot load it: it reads no `modules_to_not_convert`, and some linears are \
                 kept unquantized (`--keep-fp16`).\n\n"
            );
        }
        Layout::Gemm => match crate::verify::tgi_refuses(r.plan.model_type.as_deref()) {
            None => {
                let _ = write!(
                    c,
                    "vLLM (it picks its faster `awq_marlin` kernels by itself where they apply; \
                     `--quantization awq` would force the slower ones), or TGI:\n\n```sh\nvllm serve {dir}\n\
                     text-generation-launcher --model-id {dir} --quantize awq\n```\n\n"
                );
            }
            Some(why) => {
                let _ = write!(
                    c,
                    "vLLM (it picks its faster `awq_marlin` kernels by itself where they apply; \
                     `--quantization awq` would force the slower ones):\n\n```sh\nvllm serve {dir}\n```\n\n\
                     TGI cannot serve it: {why}.\n\n"
                );
            }
        },
        // Written by `compressed_tensors_use` above.
        Layout::PackQuantized => {}
        Layout::Gemv => {
            c += "vLLM and TGI cannot load it: they load the GEMM layout only. GEMV loads in \
                  transformers (with the `autoawq` package) and AutoAWQ; re-quantize with \
                  `awq quantize --version gemm` to serve it with vLLM or TGI.\n\n";
        }
    }
    let load = match vision {
        Some(_) => format!(
            "from transformers import AutoModelForImageTextToText, AutoProcessor\n\n\
             processor = AutoProcessor.from_pretrained(\"{dir}\")\n\
             model = AutoModelForImageTextToText.from_pretrained(\"{dir}\", device_map=\"auto\")"
        ),
        None => format!(
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n\
             tokenizer = AutoTokenizer.from_pretrained(\"{dir}\")\n\
             model = AutoModelForCausalLM.from_pretrained(\"{dir}\", device_map=\"auto\")"
        ),
    };
    let _ = write!(
        c,
        "transformers (needs the `autoawq` package):\n\n```sh\npip install transformers autoawq\n```\n\n\
         ```python\n{load}\n```\n\n\
         Check it before shipping: `awq verify {dir}{for_}`. Per-layer details: \
         `quantization_report.json`.\n",
        for_ = match o.layout {
            Layout::Gemm | Layout::PackQuantized => "",
            Layout::Gemv => " --for transformers",
        },
    );
    c
}

/// The card's "Use" section for `--format compressed-tensors`.
///
/// transformers: the decompress-on-load form, because transformers 5.25's default compressed
/// mode fails on asymmetric zero points on the CPU (measured, llm-compressor's own checkpoint
/// too); a MoE does not load at all (its fused experts lose their zero points).
fn compressed_tensors_use(dir: &str, vision: bool, moe: bool) -> String {
    let auto = match vision {
        true => "AutoModelForImageTextToText",
        false => "AutoModelForCausalLM",
    };
    let vllm = format!(
        "vLLM reads the format from config.json (its compressed-tensors W4A16 scheme, Marlin \
         kernels where they apply):\n\n```sh\nvllm serve {dir}\n```\n\n"
    );
    let transformers = match moe {
        true => "transformers cannot load it: it passes the fused experts to the decompressor \
                 without their zero points (huggingface/transformers#47430); serve it with vLLM.\n\n"
            .to_string(),
        false => format!(
            "transformers (needs the `compressed-tensors` package; decompressed on load):\n\n\
             ```sh\npip install transformers compressed-tensors\n```\n\n```python\n\
             from transformers import {auto}, CompressedTensorsConfig\n\n\
             model = {auto}.from_pretrained(\"{dir}\", device_map=\"auto\",\n    \
             quantization_config=CompressedTensorsConfig(dequantize=True))\n```\n\n"
        ),
    };
    format!(
        "{vllm}{transformers}Check it before shipping: `awq verify {dir}`. Per-layer details: \
         `quantization_report.json`.\n"
    )
}

#[cfg(test)]
mod tests {
    use super::{hub_id, rounding_bytes};
    use crate::quantize::Rounding;

    /// A one-layer Llama, hidden 64 and intermediate 96.
    fn tiny_llama() -> crate::model::config::ModelSpec {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let config = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 8,
            "max_position_embeddings": 64
        });
        std::fs::write(&path, config.to_string()).unwrap();
        crate::model::load_spec(&path).unwrap()
    }

    /// A calibration of `tokens` embedded-corpus tokens in blocks of 512.
    fn cal(tokens: usize, held_out_blocks: usize) -> crate::calib::CalibSummary {
        crate::calib::CalibSummary {
            source: "embedded corpus".into(),
            documents_read: 1,
            documents_skipped: 0,
            documents_used: 1,
            documents_too_long: 0,
            documents_split: 0,
            blocks: tokens / 512,
            seqlen: 512,
            tokens,
            held_out_blocks,
        }
    }

    /// The plan's peak counts error feedback's f64 matrices: one per dense input (q/k/v's, o's,
    /// gate/up's, down's) with `gptq`, two for each input `auto` can judge with these tokens
    /// and none for the others, and two of the widest such input's for its factor.
    #[test]
    fn the_peak_estimate_counts_the_rounding_matrices() {
        let spec = tiny_llama();
        let bytes = |r, tokens| rounding_bytes(r, &spec, tokens, true);
        let (h, i) = (64 * 64, 96 * 96);
        assert_eq!(bytes(Rounding::Rtn, 1000), 0);
        assert_eq!(bytes(Rounding::Gptq, 1000), 8 * (3 * h + i + 2 * i));
        // 300 tokens: 4 per dimension of the 64-wide inputs, not of the 96-wide one, which
        // `auto` rounds to nearest without a matrix.
        assert_eq!(bytes(Rounding::Auto, 300), 8 * (6 * h + 2 * h));
        assert_eq!(bytes(Rounding::Auto, 384), 8 * (6 * h + 2 * i + 2 * i));
        // Without held-out blocks `auto` judges nothing.
        assert_eq!(rounding_bytes(Rounding::Auto, &spec, 384, false), 0);
    }

    /// The capture and the search's module runs go piece by piece, so calibration tokens
    /// beyond one piece add their captured inputs and the layer's input and output, not MLP
    /// intermediates (counted for every token, the README's first command was estimated at
    /// 1428 MB against 812 MiB measured).
    #[test]
    fn the_peak_estimate_counts_mlp_intermediates_of_one_piece() {
        let spec = tiny_llama();
        let piece = super::super::layer::PIECE_TOKENS;
        let peak = |tokens| super::layer_peak_bytes(&spec, tokens, 512);
        // Per token: input and output (2 × 64), the captured inputs of q/k/v, o, gate/up (64
        // each) and down (96), and the layer's output held for the next (64).
        let per_token = 4 * (2 * 64 + 3 * 64 + 96 + 64);
        assert_eq!(peak(piece + 512) - peak(piece), 512 * per_token);
        // Within one piece the intermediates grow with the tokens (3 × 96 per token).
        assert_eq!(
            peak(piece) - peak(piece - 512),
            512 * (per_token + 4 * 3 * 96)
        );
    }

    /// `auto` judges dense layers only: a MoE model's estimate counts its dense layers'
    /// matrices (GLM-4.5's first layer), and none where every layer is MoE (Mixtral), where
    /// `gptq` still makes the attention's.
    #[test]
    fn the_peak_estimate_counts_no_auto_matrix_in_moe_layers() {
        let fixture = |name: &str| {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/arch");
            crate::model::load_spec(&dir.join(name).join("config.json")).unwrap()
        };
        let glm = fixture("glm4_moe");
        // The dense layer: q/k/v and gate/up read 128 wide, o and down 256 wide.
        let (h, o) = (128 * 128, 256 * 256);
        let dense_auto = 8 * (2 * (2 * h + 2 * o) + 2 * o);
        assert_eq!(
            rounding_bytes(Rounding::Auto, &glm, 100_000, true),
            dense_auto
        );
        let mixtral = fixture("mixtral");
        assert_eq!(rounding_bytes(Rounding::Auto, &mixtral, 100_000, true), 0);
        assert!(rounding_bytes(Rounding::Gptq, &mixtral, 100_000, true) > 0);
    }

    /// The plan says where error feedback will walk from: the clipped weights below
    /// `MIN_TOKENS_FROM_UNCLIPPED` calibration tokens, whatever the width, the weights before
    /// clipping from it (the README's first run, 6656 tokens, walks from the clipped ones).
    #[test]
    fn the_plan_says_where_error_feedback_walks_from() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/arch");
        let llama = crate::model::load_spec(&dir.join("llama/config.json")).unwrap();
        let at = super::super::rounding::MIN_TOKENS_FROM_UNCLIPPED;
        let cal = |tokens| cal(tokens, tokens / 2048);
        let plan =
            |tokens, clip| super::RoundingPlan::of(Rounding::Auto, &llama, tokens, true, clip);
        let (below, from) = (plan(at - 512, true), plan(at, true));
        assert_eq!(
            (below.from_unclipped, from.from_unclipped),
            (Some(false), Some(true))
        );
        assert!(below.judged > 0 && from.judged > 0);
        assert!(below.words(&cal(at - 512), false).contains(&format!(
            "walking from the clipped weights (fewer than {at}"
        )));
        assert!(from
            .words(&cal(at), false)
            .contains("walking from the weights before clipping"));
        // With `--no-clip` there is nothing to say.
        let no_clip = plan(at, false);
        assert_eq!(no_clip.from_unclipped, None);
        assert!(!no_clip.words(&cal(at), false).contains("walking"));
    }

    /// Every `--rounding` has a plan line (the new-user trial found none for `gptq` and
    /// `rtn`, so gptq's start was not shown before the run): `gptq` tries every linear but the
    /// routed experts', and says where its walk starts.
    #[test]
    fn the_plan_says_how_every_rounding_chooses_the_codes() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/arch");
        let llama = crate::model::load_spec(&dir.join("llama/config.json")).unwrap();
        let linears = llama.layers * llama.layer(0).linears().len();
        let cal = cal(1024, 0);
        let gptq = super::RoundingPlan::of(Rounding::Gptq, &llama, 1024, false, true);
        assert_eq!((gptq.judged, gptq.from_unclipped), (linears, Some(false)));
        assert_eq!(
            gptq.words(&cal, true),
            format!(
                "gptq: error feedback on {linears} linears, kept on each where it lowers the \
                 calibration loss, walking from the clipped weights (fewer than 16384 \
                 calibration tokens); routed experts round to nearest"
            )
        );
        let rtn = super::RoundingPlan::of(Rounding::Rtn, &llama, 100_000, true, true);
        assert_eq!((rtn.judged, rtn.from_unclipped), (0, None));
        assert_eq!(
            rtn.words(&cal, false),
            "rtn: round to nearest on every linear"
        );
        // A plan from before `method` existed was `auto`'s.
        let old: super::RoundingPlan = serde_json::from_str(
            r#"{"judged": 1, "too_few_tokens": 0, "in_moe_layers": 0, "tokens_for_all": 1}"#,
        )
        .unwrap();
        assert_eq!(old.method, Rounding::Auto);
    }

    #[test]
    fn only_hub_ids_are_base_models() {
        assert_eq!(
            hub_id("HuggingFaceTB/SmolLM2-135M").as_deref(),
            Some("HuggingFaceTB/SmolLM2-135M")
        );
        assert_eq!(
            hub_id("acme/tiny.llama_2").as_deref(),
            Some("acme/tiny.llama_2")
        );
        for local in [
            ".",
            "src",
            "./models/x",
            "/abs/path",
            "a/b/c",
            "name",
            "../x",
            "org/",
            "a b/c",
        ] {
            assert_eq!(hub_id(local), None, "{local}");
        }
    }

    /// A model loaded from a Hub cache snapshot is titled by its id, not by the commit hash
    /// that names the snapshot directory.
    #[test]
    fn a_hub_snapshot_path_is_titled_by_its_id() {
        let tmp = tempfile::tempdir().unwrap();
        let snap = tmp
            .path()
            .join("models--HuggingFaceTB--SmolLM2-135M/snapshots/0123456789abcdef");
        std::fs::create_dir_all(&snap).unwrap();
        assert_eq!(
            hub_id(snap.to_str().unwrap()).as_deref(),
            Some("HuggingFaceTB/SmolLM2-135M")
        );
    }
}

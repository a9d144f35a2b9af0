//! What a quantize run reports: the plan resolved before the first layer (`--dry-run`, the JSON
//! `start` event), per-layer outcomes and timings, the work rate, the quality gate, and the
//! model card written beside the weights.

use std::path::PathBuf;

use super::QuantizeOptions;
use crate::calib::CalibSummary;
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

    pub(super) fn add(&mut self, o: &Timings) {
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
    pub source_dir: PathBuf,
    pub architecture: String,
    pub calibration: CalibSummary,
    pub layers: Vec<LayerReport>,
    pub files: Vec<String>,
    pub seconds_total: f64,
    pub work: Work,
}

pub(super) fn make_plan(
    opts: &QuantizeOptions,
    dir: &std::path::Path,
    spec: &crate::model::config::ModelSpec,
    cal: &CalibSummary,
) -> Plan {
    let linears = spec.linears();
    let scale_groups = scale_groups(spec)
        .map(|g| {
            (
                g.name.to_string(),
                g.linears.iter().map(|l| l.to_string()).collect(),
                match g.inspect {
                    crate::model::groups::Inspect::SelfAttn => "self_attn",
                    crate::model::groups::Inspect::Mlp => "mlp",
                    crate::model::groups::Inspect::Linear => "linear",
                }
                .to_string(),
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

pub(super) fn model_card(r: &Report) -> String {
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

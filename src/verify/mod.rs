//! `awq verify`: checks an AWQ checkpoint against what its loaders require (AWQ-SPEC §10) before
//! it ships. Every linear of every layer is checked for presence, dtype and packed shape, every
//! packed tensor is dequantized and checked for finite values, and each tensor-parallel degree
//! is checked against vLLM's per-partition rules (`awq` and `awq_marlin`), which TGI shares.
//!
//! The verdict is per loader ([`Target`]): vLLM and TGI load the GEMM layout only, at a
//! tensor-parallel degree whose partitions satisfy the rules; transformers (with the `autoawq`
//! package) and AutoAWQ load GEMM and GEMV on one rank. A missing, mistyped or non-finite
//! tensor makes the checkpoint loadable by none of them. [`VerifyReport::ok`] is the verdict for
//! the requested target at the requested degree, and the CLI exits 5 exactly when it is false.

mod vision;

pub use vision::VisionCheck;

use std::path::Path;

use safetensors::Dtype;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::input_err;
use crate::io::reader::Checkpoint;
use crate::model::config::{AwqFormat, ModelSpec};
use crate::model::layer::{packed_shapes, read_packed_tensors};
use crate::model::shapes::{LinearShape, Split};
use crate::model::{final_norm_tensors, load_spec, locate, HEAD_MODULE};
use crate::quant::pack::{unpack, Layout};

/// Tensor-parallel degrees always reported (a `--tp N` outside them is added).
pub const TP_DEGREES: [usize; 4] = [1, 2, 4, 8];

/// Group sizes the Marlin kernels accept (−1 = per channel).
const MARLIN_GROUPS: [usize; 3] = [32, 64, 128];

/// Why vLLM and TGI refuse a GEMV checkpoint, and what to do instead (README, model card).
/// The `model_type`s TGI implements itself (text-generation-inference,
/// `server/text_generation_server/models/__init__.py`, `ModelType`, at its last development in
/// January 2026). Any other goes to its transformers fallback, which refuses AWQ ("awq
/// quantization is not supported for AutoModel").
const TGI_MODEL_TYPES: [&str; 39] = [
    "deepseek_v2",
    "deepseek_v3",
    "idefics2",
    "idefics3",
    "llava_next",
    "llama",
    "llama4",
    "phi3",
    "granite",
    "gemma",
    "paligemma",
    "gemma2",
    "gemma3",
    "gemma3_text",
    "cohere",
    "dbrx",
    "mamba",
    "mistral",
    "mixtral",
    "gpt_bigcode",
    "phi",
    "phimoe",
    "baichuan",
    "falcon",
    "starcoder2",
    "qwen2",
    "qwen2_vl",
    "qwen2_5_vl",
    "opt",
    "t5",
    "galactica",
    "santacoder",
    "bloom",
    "mpt",
    "gpt2",
    "gpt_neox",
    "gptj",
    "idefics",
    "mllama",
];

/// Why TGI cannot serve a model of `model_type` with AWQ, if it cannot.
pub fn tgi_refuses(model_type: Option<&str>) -> Option<String> {
    match model_type {
        Some(t) if TGI_MODEL_TYPES.contains(&t) => None,
        Some(t) => Some(format!(
            "TGI implements no model_type {t:?}; its transformers fallback refuses AWQ (\"awq \
             quantization is not supported for AutoModel\")"
        )),
        None => Some("config.json has no model_type, which TGI dispatches on".to_string()),
    }
}

pub const GEMV_NOT_SERVABLE: &str = "the GEMV layout: vLLM and TGI load the GEMM layout only; \
     GEMV loads in transformers (with the autoawq package) and AutoAWQ \
     (check it with --for transformers), or re-quantize with --version gemm";

/// A loader the checkpoint must load in (`awq verify --for`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// vLLM (`awq`, `awq_marlin`): GEMM only, tensor parallel.
    Vllm,
    /// Text Generation Inference: GEMM only, tensor parallel with vLLM's rules.
    Tgi,
    /// transformers with the `autoawq` package (and AutoAWQ itself): GEMM and GEMV, one rank.
    Transformers,
}

impl Target {
    /// Every target, in report order.
    pub const ALL: [Target; 3] = [Target::Vllm, Target::Tgi, Target::Transformers];

    /// The name used on the command line and in the JSON report.
    pub fn name(self) -> &'static str {
        match self {
            Target::Vllm => "vllm",
            Target::Tgi => "tgi",
            Target::Transformers => "transformers",
        }
    }

    /// Whether the loader splits linears across tensor-parallel ranks (and `--tp` applies).
    pub fn tensor_parallel(self) -> bool {
        self != Target::Transformers
    }
}

/// What `awq verify` is asked to require.
#[derive(Debug, Clone, Copy)]
pub struct VerifyOptions {
    /// Tensor-parallel degree the target must load at (`None`: 1).
    pub tp: Option<usize>,
    /// The loader whose verdict decides [`VerifyReport::ok`].
    pub target: Target,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        Self {
            tp: None,
            target: Target::Vllm,
        }
    }
}

/// vLLM's verdict at one tensor-parallel degree.
#[derive(Debug, Clone, Serialize)]
pub struct TpSupport {
    /// The tensor-parallel degree.
    pub tp: usize,
    /// vLLM's `awq` kernels (and TGI) can load the model at this degree; for a
    /// compressed-tensors checkpoint, vLLM's `CompressedTensorsWNA16` scheme can.
    pub vllm_awq: bool,
    /// vLLM's faster `awq_marlin` path (compute capability 8.0+, vLLM's default there) applies
    /// to every linear at this degree; for a compressed-tensors checkpoint, its Marlin kernels
    /// do. Independent of the `awq_gemm` kernel's rules: a model can load through Marlin only.
    pub vllm_awq_marlin: bool,
    /// Why `awq` cannot load it (empty when `vllm_awq`).
    pub reasons: Vec<String>,
    /// Why `awq_marlin` does not apply (beyond the tensor-parallel split rules in `reasons`).
    pub marlin_reasons: Vec<String>,
}

impl TpSupport {
    /// The support of a model whose layers are of several kinds (dense and MoE): each kind's,
    /// combined.
    fn all(kinds: impl Iterator<Item = TpSupport>) -> TpSupport {
        kinds
            .reduce(|mut a, b| {
                a.vllm_awq &= b.vllm_awq;
                a.vllm_awq_marlin &= b.vllm_awq_marlin;
                a.reasons.extend(b.reasons);
                a.marlin_reasons.extend(b.marlin_reasons);
                dedup_in_order(&mut a.reasons);
                dedup_in_order(&mut a.marlin_reasons);
                a
            })
            .expect("a model has a layer")
    }
}

/// Whether one loader can load the checkpoint, and why not.
#[derive(Debug, Clone, Serialize)]
pub struct TargetSupport {
    /// The loader.
    pub target: Target,
    /// The tensor-parallel degree checked (1 for transformers).
    pub tp: usize,
    /// The loader can load the checkpoint at `tp`.
    pub loadable: bool,
    /// Why not, when `loadable` is false.
    pub reasons: Vec<String>,
}

/// Everything `awq verify` found.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// The checkpoint directory.
    pub dir: String,
    /// The verdict: `target` loads the checkpoint at degree `tp` (the CLI exits 5 when false).
    pub ok: bool,
    /// The loader the verdict is for (`--for`).
    pub target: Target,
    /// The tensor-parallel degree the verdict is for (`--tp`, default 1).
    pub tp: usize,
    /// `architectures[0]` of config.json.
    pub architecture: String,
    /// Decoder layers.
    pub layers: usize,
    /// Quantization group size.
    pub group: usize,
    /// Packed layout, `gemm` or `gemv`.
    pub version: String,
    /// Linears checked over all layers.
    pub linears_checked: usize,
    /// What is broken in the checkpoint itself (every loader fails on it).
    pub violations: Vec<String>,
    /// Why the checkpoint is not for shipping although it loads: the quality gate of the run
    /// that wrote it failed (`awq quantize` kept it as `OUT.rejected`). `ok` is false.
    pub quality_gate_failed: Option<String>,
    /// vLLM's verdict per tensor-parallel degree (1, 2, 4, 8 and `--tp`).
    pub tensor_parallel: Vec<TpSupport>,
    /// Per loader: loadable or not, and why.
    pub targets: Vec<TargetSupport>,
    /// Which loaders accept the layout (GEMV is not loadable by vLLM or TGI).
    pub loaders: Vec<String>,
    /// A vision-language wrapper's float parts as found (`None` for a causal LM).
    pub vision: Option<VisionCheck>,
    /// What holds for some versions of a loader only (not part of the verdict).
    pub notes: Vec<String>,
}

impl VerifyReport {
    /// The verdict's entry of [`VerifyReport::targets`].
    pub fn verdict(&self) -> Option<&TargetSupport> {
        self.targets.iter().find(|t| t.target == self.target)
    }

    /// Why the verdict is negative, in one line (`None` when `ok`).
    pub fn failure(&self) -> Option<String> {
        if self.ok {
            return None;
        }
        if let Some(why) = &self.quality_gate_failed {
            return Some(format!("{}: quality gate failed: {why}", self.dir));
        }
        let reasons = self
            .verdict()
            .map_or_else(String::new, |t| t.reasons.join("; "));
        Some(format!(
            "{}: not loadable by {} at tensor-parallel degree {}: {reasons}",
            self.dir,
            self.target.name(),
            self.tp
        ))
    }
}

/// Checks the AWQ checkpoint in `dir` and decides whether `opts.target` loads it at degree
/// `opts.tp`. `Err` when it is not an AWQ checkpoint (or cannot be read); a checkpoint that
/// fails the checks is an `Ok` report with `ok` false.
pub fn verify(dir: &Path, opts: &VerifyOptions) -> Result<VerifyReport> {
    let tp = opts.tp.unwrap_or(1);
    if tp == 0 {
        return Err(Error::Usage(
            "--tp must be at least 1 (the number of tensor-parallel ranks)".into(),
        ));
    }
    if tp > 1 && !opts.target.tensor_parallel() {
        return Err(Error::Usage(format!(
            "--tp {tp} with --for {}: it loads an AWQ checkpoint on one rank; \
             tensor-parallel splits are checked for --for vllm and tgi",
            opts.target.name()
        )));
    }
    if !dir.is_dir() {
        return Err(input_err!("{} is not a directory", dir.display()));
    }
    let mut spec = load_spec(&dir.join("config.json"))?;
    let Some(fmt) = spec.awq else {
        return Err(input_err!(
            "{}: config.json has no AWQ quantization_config, so this is not an AWQ checkpoint; \
             awq verify checks the output of awq quantize (or another AWQ quantizer)",
            dir.display()
        ));
    };
    let ckpt = Checkpoint::open_dir(dir)?;
    locate(&mut spec, &ckpt)?;
    let mut v = Vec::new();
    let float_dtype = float_dtype(dir)?;
    let quality_gate_failed = failed_quality_gate(dir);
    v.extend(not_converted(&spec));
    if fmt.layout == Layout::PackQuantized && !spec.not_converted_matches(&spec.roots.head) {
        v.push(format!(
            "{}: quantization_config.ignore does not name the head, so vLLM and transformers \
             expect it packed (the config group targets every Linear); add \"lm_head\"",
            spec.roots.head
        ));
    }
    let mut notes = Vec::new();
    if fmt.layout == Layout::PackQuantized && spec.moe.is_some() {
        notes.push(
            "asymmetric experts load in vLLM releases with compressed-tensors' asymmetric MoE \
             support (vllm-project/vllm#44025, merged June 2026); older releases assert \
             \"Only symmetric quantization is supported for MoE\""
                .to_string(),
        );
    }

    let float = |name: &str, shape: &[usize], v: &mut Vec<String>| {
        if !ckpt.contains(name) {
            v.push(format!("{name}: missing"));
            return;
        }
        match ckpt.meta(name) {
            Ok(m) if m.shape != shape => {
                v.push(format!("{name}: shape {:?}, expected {shape:?}", m.shape))
            }
            Ok(m) if m.dtype != float_dtype => v.push(format!(
                "{name}: dtype {:?}, but config.json's torch_dtype says {float_dtype:?}",
                m.dtype
            )),
            // Converts and checks every value for NaN/Inf (the error names the index).
            Ok(_) => {
                if let Err(e) = ckpt.f32(name, shape) {
                    v.push(format!("{name}: {e}"));
                }
            }
            Err(e) => v.push(format!("{name}: {e}")),
        }
    };
    let roots = &spec.roots;
    float(&roots.embed(), &[spec.vocab, spec.hidden], &mut v);
    for name in final_norm_tensors(&spec) {
        float(&name, &[spec.hidden], &mut v);
    }
    let head = roots.head_weight();
    if spec.tied_embeddings {
        if ckpt.contains(&head) {
            v.push(format!(
                "{head}: present although tie_word_embeddings is true (some loaders fail on it)"
            ));
        }
    } else {
        float(&head, &[spec.vocab, spec.hidden], &mut v);
    }
    let vision = vision::check(&spec, &ckpt, float_dtype, &mut v);

    let [codes, _, _] = fmt.layout.tensor_names();
    let list = match fmt.layout {
        Layout::PackQuantized => "ignore",
        _ => "modules_to_not_convert",
    };
    let mut checked = 0;
    let mut float_linears = Vec::new();
    // Per linear name, the layers that have it and those that store it float.
    let mut float_layers: std::collections::HashMap<&str, [usize; 2]> = Default::default();
    for i in 0..spec.layers {
        let layer_spec = spec.layer(i);
        let p = spec.roots.layer(i);
        for (name, width) in layer_spec.layer_floats() {
            float(&format!("{p}.{name}"), &[width], &mut v);
        }
        for r in layer_spec.router_linears() {
            float(&format!("{p}.{}.weight", r.name), &[r.out, r.inp], &mut v);
        }
        for (name, width) in layer_spec.layer_verbatim() {
            verbatim(&ckpt, &format!("{p}.{name}"), width, &mut v);
        }
        for l in &layer_spec.linears() {
            let prefix = format!("{p}.{}", l.name);
            let packed = spec.packed(&prefix);
            let count = float_layers.entry(l.name).or_default();
            count[0] += 1;
            if packed.is_none() {
                float_linears.push(prefix.clone());
                count[1] += 1;
            }
            match packed {
                Some(fmt) => check_linear(&ckpt, &prefix, l, fmt, float_dtype, &mut v),
                None if ckpt.contains(&format!("{prefix}.{codes}")) => v.push(format!(
                    "{prefix}: a {list} entry matches it, so loaders expect a float \
                     {prefix}.weight, but it holds {codes} (an entry too broad?)"
                )),
                None => float(&format!("{prefix}.weight"), &[l.out, l.inp], &mut v),
            }
            if l.bias {
                float(&format!("{prefix}.bias"), &[l.out], &mut v);
            }
            checked += 1;
        }
    }

    // Linear kinds stored float in every layer that has them (`--keep-fp16` everywhere): no
    // kernel rule.
    let float_everywhere: Vec<&str> = float_layers
        .iter()
        .filter(|(_, [has, float])| has == float)
        .map(|(name, _)| *name)
        .collect();
    let mut degrees = TP_DEGREES.to_vec();
    if !degrees.contains(&tp) {
        degrees.push(tp);
        degrees.sort_unstable();
    }
    let kinds = spec.layer_kinds();
    let tensor_parallel: Vec<TpSupport> = degrees
        .iter()
        .map(|&d| {
            let each = kinds
                .iter()
                .map(|(_, k)| tp_support(k, &k.linears(), &float_everywhere, fmt, d));
            TpSupport::all(each)
        })
        .collect();
    let at_tp = tensor_parallel
        .iter()
        .find(|t| t.tp == tp)
        .expect("the requested degree is analysed");
    let found = Found {
        violations: &v,
        float_dtype,
        float_linears: &float_linears,
        head_in_int4: head_quantized_by_transformers(&spec).filter(|_| fmt.layout.is_awq()),
        vision_in_int4: vision.as_ref().and_then(|c| c.transformers5.clone()),
        awq: fmt.layout.is_awq(),
        tgi_model: tgi_refuses(spec.model_type.as_deref()),
        moe_zero_points: (!fmt.layout.is_awq() && spec.moe.is_some()).then(|| {
            "transformers 5 passes the fused experts of a compressed-tensors MoE to the \
             decompressor without their weight_zero_point and fails to load asymmetric experts \
             (\"Asymmetric quant requires zero-point values\"; measured with transformers \
             5.25 and compressed-tensors 0.20.1; huggingface/transformers#47430, open)"
                .to_string()
        }),
    };
    let targets: Vec<TargetSupport> = Target::ALL
        .iter()
        .map(|&target| target_support(target, tp, &found, at_tp))
        .collect();
    let ok = quality_gate_failed.is_none()
        && targets
            .iter()
            .any(|t| t.target == opts.target && t.loadable);
    let mut loaders: Vec<String> = match fmt.layout {
        Layout::PackQuantized => vec![
            "vllm (compressed-tensors)".into(),
            "transformers (with compressed-tensors)".into(),
        ],
        Layout::Gemm => vec![
            "vllm (awq, awq_marlin)".into(),
            "tgi".into(),
            "transformers (with autoawq)".into(),
            "autoawq".into(),
        ],
        Layout::Gemv => vec!["transformers (with autoawq)".into(), "autoawq".into()],
    };
    if found.tgi_model.is_some() {
        loaders.retain(|l| l != "tgi");
    }
    if !float_linears.is_empty() {
        // TGI reads no modules_to_not_convert; AutoAWQ's loader matches entries against names
        // relative to the layer, so per-layer entries do not reach it.
        loaders.retain(|l| l != "tgi" && l != "autoawq");
    }
    Ok(VerifyReport {
        dir: dir.display().to_string(),
        ok,
        target: opts.target,
        tp,
        architecture: spec.architecture.clone(),
        layers: spec.layers,
        group: fmt.group,
        version: fmt.layout.name().into(),
        linears_checked: checked,
        violations: v,
        quality_gate_failed,
        tensor_parallel,
        targets,
        loaders,
        vision,
        notes,
    })
}

/// What [`target_support`] decides from, found once per checkpoint.
struct Found<'a> {
    /// What is broken for every loader.
    violations: &'a [String],
    /// config.json's `torch_dtype`.
    float_dtype: Dtype,
    /// Linears stored float (listed in `modules_to_not_convert`).
    float_linears: &'a [String],
    /// Why transformers would build an int4 head ([`head_quantized_by_transformers`]).
    head_in_int4: Option<String>,
    /// Why transformers 5 would build int4 layers in the vision parts ([`vision::check`]).
    vision_in_int4: Option<String>,
    /// An AWQ layout (`false`: compressed-tensors).
    awq: bool,
    /// Why TGI does not implement the model ([`tgi_refuses`]).
    tgi_model: Option<String>,
    /// Why transformers drops the experts' zero points (compressed-tensors MoE).
    moe_zero_points: Option<String>,
}

/// Whether `target` loads the checkpoint: no violation, and for vLLM and TGI the GEMM layout
/// split by vLLM's rules at degree `tp` (`at_tp`; transformers runs on one rank).
///
/// A bfloat16 checkpoint (`awq quantize --dtype`, chosen when activations overflow float16):
/// vLLM's `awq` kernels run float16 only, `awq_marlin` (compute capability 8.0+) runs bfloat16,
/// so vLLM needs Marlin at that degree; TGI's AWQ path runs float16; transformers loads it.
fn target_support(target: Target, tp: usize, found: &Found, at_tp: &TpSupport) -> TargetSupport {
    let mut reasons = Vec::new();
    if let Some(first) = found.violations.first() {
        reasons.push(format!(
            "the checkpoint is broken: {} violation(s), first: {first}",
            found.violations.len()
        ));
    }
    if let (Target::Tgi, Some(why)) = (target, &found.tgi_model) {
        reasons.push(why.clone());
    }
    if let (Target::Tgi, Some(first)) = (target, found.float_linears.first()) {
        reasons.push(format!(
            "TGI reads no modules_to_not_convert and expects qweight for every linear; {} \
             linear(s) are float (e.g. {first})",
            found.float_linears.len()
        ));
    }
    if let (Target::Transformers, Some(why)) = (target, &found.vision_in_int4) {
        reasons.push(why.clone());
    }
    if let (Target::Transformers, Some(why)) = (target, &found.head_in_int4) {
        reasons.push(why.clone());
    }
    let tp = if target.tensor_parallel() { tp } else { 1 };
    // vLLM loads through either kernel path (awq_marlin on Ampere or newer); TGI through awq.
    let splits = match target {
        Target::Vllm => at_tp.vllm_awq || at_tp.vllm_awq_marlin,
        _ => at_tp.vllm_awq,
    };
    if target.tensor_parallel() && !splits {
        reasons.extend(at_tp.reasons.iter().cloned());
        if target == Target::Vllm {
            reasons.extend(at_tp.marlin_reasons.iter().cloned());
        }
    }
    if let (Target::Tgi, false) = (target, found.awq) {
        reasons.push(
            "awq verify checks TGI's rules for the AWQ layouts only, not for compressed-tensors \
             (check it with --for vllm or --for transformers)"
                .into(),
        );
    }
    if let (Target::Transformers, Some(why)) = (target, &found.moe_zero_points) {
        reasons.push(why.clone());
    }
    if found.float_dtype == Dtype::BF16 && reasons.is_empty() && found.awq {
        match target {
            Target::Vllm if !at_tp.vllm_awq_marlin => {
                reasons.push(
                    "torch_dtype bfloat16: vLLM's awq kernels run float16 only and awq_marlin \
                     (which runs bfloat16) does not apply here"
                        .into(),
                );
                reasons.extend(at_tp.marlin_reasons.iter().cloned());
            }
            Target::Tgi => {
                reasons.push("torch_dtype bfloat16: TGI's AWQ kernels run float16".into())
            }
            _ => {}
        }
    }
    TargetSupport {
        target,
        tp,
        loadable: reasons.is_empty(),
        reasons,
    }
}

/// transformers 4.50–4.51 add the head to their AWQ skip list only when
/// `modules_to_not_convert` is null (`quantizers/base.py`, `get_modules_to_not_convert`: `if
/// skip_modules is None: get_keys_to_not_convert(model) else: skip_modules`; 4.52 restored the
/// default skips with `add_default_skips=True`). Given a list — even `[]` — that no entry of
/// matches `lm_head`, those versions replace the head with an int4 `WQLinear`: garbage on a
/// GPU, an assertion on a CPU. Checkpoints of awq before this rule (MoE routers or
/// `--keep-fp16` listed without `lm_head`) fail here.
fn head_quantized_by_transformers(spec: &ModelSpec) -> Option<String> {
    let list = spec.not_converted.as_ref()?;
    (!spec.not_converted_matches(HEAD_MODULE)).then(|| {
        format!(
            "modules_to_not_convert is a list ({} entries) without \"{HEAD_MODULE}\": transformers \
             4.50–4.51 add the head to their skip list only when the list is null, so they would \
             load {HEAD_MODULE} as an int4 layer and leave {HEAD_MODULE}.weight unused; add \
             \"{HEAD_MODULE}\" to quantization_config.modules_to_not_convert in config.json \
             (awq quantize writes it)",
            list.len()
        )
    })
}

/// A quality gate that failed when `awq quantize` wrote `dir` (the checkpoint is kept for
/// inspection, not for shipping), from its `quantization_report.json`.
fn failed_quality_gate(dir: &Path) -> Option<String> {
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(crate::io::output::REPORT_FILE)).ok()?)
            .ok()?;
    let q = report.get("quality")?;
    (!q.get("passed")?.as_bool()?).then(|| {
        format!(
            "perplexity rose {:.2}% when this was quantized, more than the allowed {}% \
             (quantization_report.json); the checkpoint loads, but it is kept for inspection, \
             not for shipping",
            q.get("increase_pct")
                .and_then(|v| v.as_f64())
                .unwrap_or(f64::NAN),
            q.get("max_increase_pct")
                .and_then(|v| v.as_f64())
                .unwrap_or(f64::NAN)
        )
    })
}

/// A verbatim float tensor (a router's `e_score_correction_bias`, copied from the source with
/// its dtype): present and `[width]`.
fn verbatim(ckpt: &Checkpoint, name: &str, width: usize, v: &mut Vec<String>) {
    match ckpt.meta(name) {
        Err(_) => v.push(format!("{name}: missing")),
        Ok(m) if m.shape != [width] => {
            v.push(format!("{name}: shape {:?}, expected [{width}]", m.shape))
        }
        Ok(_) => {}
    }
}

/// Drops repeated lines, keeping the first of each.
fn dedup_in_order(lines: &mut Vec<String>) {
    let mut seen = std::collections::HashSet::new();
    lines.retain(|l| seen.insert(l.clone()));
}

/// transformers and vLLM keep a linear unquantized when a `modules_to_not_convert` entry is a
/// substring of its module name: every unquantized router (a MoE layer's) must be matched, and
/// the linears vLLM merges into one module (q/k/v, gate/up) must be all matched or none
/// (`quant_utils.is_layer_skipped` refuses a mix). A matched linear is checked as a float
/// weight, so an entry too broad (`gate` also catches every `gate_proj`) shows up there.
fn not_converted(spec: &ModelSpec) -> Vec<String> {
    let mut v = Vec::new();
    for i in 0..spec.layers {
        let p = spec.roots.layer(i);
        let units = spec.layer(i).keep_units();
        for r in spec.layer(i).listed_routers() {
            let module = format!("{p}.{}", r.name);
            if !spec.not_converted_matches(&module) {
                v.push(format!(
                    "{module}: stays unquantized, but no modules_to_not_convert entry matches it \
                     (loaders would build a quantized linear and find no qweight)"
                ));
            }
        }
        for unit in &units {
            let n = unit
                .linears
                .iter()
                .filter(|l| spec.packed(&format!("{p}.{l}")).is_none())
                .count();
            let merged = format!("{p}.{}", unit.name);
            if n != 0 && n != unit.linears.len() {
                v.push(format!(
                    "{merged}: modules_to_not_convert matches {n} of its {} linears; vLLM merges \
                     them into one module and refuses a mix of float and quantized",
                    unit.linears.len()
                ));
            }
            // compressed-tensors loaders expand a merged module into its linears
            // (`should_ignore_layer`): the merged name is never matched on its own.
            let ct = spec.awq.is_some_and(|f| !f.layout.is_awq());
            if unit.linears.len() < 2 || ct {
                continue;
            }
            // vLLM versions that match entries against the merged module's name only
            // (`is_layer_skipped_awq`) must read the same as the per-linear rule.
            let matched = spec.not_converted_matches(&merged);
            match (matched, n == unit.linears.len()) {
                (true, false) if n == 0 => v.push(format!(
                    "{merged}: a modules_to_not_convert entry matches the merged module, but its \
                     linears are quantized (vLLM versions matching merged names would expect \
                     float weights)"
                )),
                (false, true) => v.push(format!(
                    "{merged}: its linears are float, but no modules_to_not_convert entry \
                     matches the merged name (vLLM versions matching merged names would expect \
                     qweight); add \"{merged}\""
                )),
                _ => {}
            }
        }
    }
    v
}

/// The dtype config.json's `torch_dtype` gives the unquantized tensors (float16 when absent).
fn float_dtype(dir: &Path) -> Result<Dtype> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::input_io(&path, e))?;
    let cfg: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| input_err!("{} is not valid JSON: {e}", path.display()))?;
    match cfg.get("torch_dtype").and_then(|d| d.as_str()) {
        None | Some("float16") => Ok(Dtype::F16),
        Some("bfloat16") => Ok(Dtype::BF16),
        Some(other) => Err(input_err!(
            "{}: torch_dtype {other:?} is not one an AWQ checkpoint uses (float16, bfloat16)",
            path.display()
        )),
    }
}

/// Presence, dtype and shape of qweight/qzeros/scales, then dequantization and finiteness.
fn check_linear(
    ckpt: &Checkpoint,
    prefix: &str,
    l: &LinearShape,
    fmt: AwqFormat,
    float_dtype: Dtype,
    v: &mut Vec<String>,
) {
    if !l.inp.is_multiple_of(fmt.group) {
        v.push(format!(
            "{prefix}: in_features {} is not divisible by group_size {}",
            l.inp, fmt.group
        ));
        return;
    }
    if !l.out.is_multiple_of(8) {
        v.push(format!(
            "{prefix}: out_features {} is not divisible by 8 (the int32 pack factor)",
            l.out
        ));
        return;
    }
    let shapes = match packed_shapes(l.out, l.inp, fmt) {
        Ok(s) => s,
        Err(e) => {
            v.push(format!("{prefix}: {e}"));
            return;
        }
    };
    let before = v.len();
    // AWQ scales are float16; compressed-tensors' are in the model's float dtype.
    let scale_dtype = match fmt.layout {
        Layout::PackQuantized => float_dtype,
        _ => Dtype::F16,
    };
    let names = fmt.layout.tensor_names();
    for ((part, dtype), shape) in names
        .into_iter()
        .zip([Dtype::I32, Dtype::I32, scale_dtype])
        .zip(shapes)
    {
        let name = format!("{prefix}.{part}");
        match ckpt.meta(&name) {
            Err(_) => v.push(format!("{name}: missing")),
            Ok(m) if m.dtype != dtype => {
                v.push(format!("{name}: dtype {:?}, expected {dtype:?}", m.dtype))
            }
            Ok(m) if m.shape != shape => v.push(format!(
                "{name}: shape {:?}, expected {shape:?} for [{}, {}] with group {} ({})",
                m.shape,
                l.out,
                l.inp,
                fmt.group,
                fmt.layout.name()
            )),
            Ok(_) => {}
        }
    }
    if fmt.layout == Layout::PackQuantized {
        let name = format!("{prefix}.{}", crate::quant::pack_quantized::SHAPE_TENSOR);
        let want = [l.out as i64, l.inp as i64];
        match ckpt.meta(&name) {
            Err(_) => v.push(format!("{name}: missing")),
            Ok(m) if m.dtype != Dtype::I64 || m.shape != [2] => v.push(format!(
                "{name}: {:?} {:?}, expected I64 [2]",
                m.dtype, m.shape
            )),
            Ok(_) => {
                let got: Vec<i64> = ckpt
                    .bytes(&name)
                    .map(|b| {
                        b.chunks_exact(8)
                            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                            .collect()
                    })
                    .unwrap_or_default();
                if got != want {
                    v.push(format!("{name}: {got:?}, expected {want:?}"));
                }
            }
        }
    }
    if v.len() > before {
        return;
    }
    let packed = match read_packed_tensors(ckpt, prefix, fmt.layout, shapes) {
        Ok(p) => p,
        Err(e) => {
            v.push(format!("{prefix}: {e}"));
            return;
        }
    };
    if let Some(i) = packed.scales.iter().position(|s| !s.is_finite()) {
        v.push(format!("{prefix}.scales: non-finite value at index {i}"));
        return;
    }
    match unpack(&packed, fmt.layout, fmt.group) {
        Ok(q) => {
            if let Some(i) = q.dequantize().iter().position(|x| !x.is_finite()) {
                v.push(format!(
                    "{prefix}: dequantized weight is non-finite at index {i}"
                ));
            }
        }
        Err(e) => v.push(format!("{prefix}: {e}")),
    }
}

/// vLLM's rules at tensor-parallel degree `tp`, any `tp` ≥ 1 (AWQ-SPEC §10.1, §10.2): the
/// attention heads split across ranks (key/value heads split, or replicate when fewer than
/// ranks); q/k/v/gate/up split their outputs (column parallel), o/down their inputs (row
/// parallel). Per partition the `awq` kernels need `in % group == 0` and `out % 8 == 0` (the
/// int32 pack factor), and their fused GEMM `group % 32 == 0`, `out % 64 == 0` and
/// `out % group == 0` over the merged modules; Marlin also needs `out % 64 == 0` over the merged qkv and gate_up
/// projections, `in % 128 == 0` and a group in {32, 64, 128}. GEMV is not loadable at all.
/// vLLM's verdict on a model `spec` would be written as (`group`, `layout`, every linear
/// packed) at degree `tp`: what `awq verify` will say, known before layer 1.
pub fn vllm_support(spec: &ModelSpec, group: usize, layout: Layout, tp: usize) -> TpSupport {
    let fmt = AwqFormat { group, layout };
    let kinds = spec.layer_kinds();
    TpSupport::all(
        kinds
            .iter()
            .map(|(_, k)| tp_support(k, &k.linears(), &[], fmt, tp)),
    )
}

fn tp_support(
    spec: &ModelSpec,
    linears: &[LinearShape],
    float: &[&str],
    fmt: AwqFormat,
    tp: usize,
) -> TpSupport {
    let mut awq = Vec::new();
    let mut marlin = Vec::new();
    if fmt.layout == Layout::Gemv {
        return TpSupport {
            tp,
            vllm_awq: false,
            vllm_awq_marlin: false,
            reasons: vec![GEMV_NOT_SERVABLE.to_string()],
            marlin_reasons: Vec::new(),
        };
    }
    let heads_split = spec.heads.is_multiple_of(tp);
    if !heads_split {
        awq.push(format!(
            "{} attention heads do not split over {tp} ranks",
            spec.heads
        ));
    }
    let kv_per_rank = if spec.kv_heads.is_multiple_of(tp) {
        Some(spec.kv_heads / tp)
    } else if tp.is_multiple_of(spec.kv_heads) {
        Some(1)
    } else {
        awq.push(format!(
            "{} key/value heads neither split over nor replicate to {tp} ranks",
            spec.kv_heads
        ));
        None
    };
    // Marlin checks the merged modules vLLM builds: (name, summed out, in) per rank.
    let mut merged: Vec<(&str, usize, usize)> = Vec::new();
    for l in linears {
        // Experts share their shapes: one line per kind of expert linear, not per expert.
        let shown = crate::model::arch::expert_pattern(l.name);
        let row_parallel = l.row_parallel();
        let split = match l.split {
            // Reported above when the key/value heads do not split.
            Split::Heads { per_head, kv: true } => kv_per_rank.map(|h| h * per_head),
            Split::Heads {
                per_head,
                kv: false,
            }
            | Split::RowHeads { per_head } => heads_split.then(|| spec.heads / tp * per_head),
            // vLLM's QKVParallelLinear: this rank's q heads plus its k and v heads.
            Split::QkvHeads { per_head } => kv_per_rank
                .filter(|_| heads_split)
                .map(|kv| (spec.heads / tp + 2 * kv) * per_head),
            Split::Replicated => Some(if row_parallel { l.inp } else { l.out }),
            Split::Column | Split::Row => {
                let whole = if row_parallel { l.inp } else { l.out };
                if !whole.is_multiple_of(tp) {
                    awq.push(format!(
                        "{}: {whole} {} do not split over {tp} ranks",
                        shown,
                        if row_parallel { "inputs" } else { "outputs" }
                    ));
                }
                whole.is_multiple_of(tp).then(|| whole / tp)
            }
        };
        let Some(split) = split else { continue };
        // A linear kept float in every layer splits like any linear; the kernels' rules below
        // are for packed ones.
        if float.contains(&l.name) {
            continue;
        }
        let (out, inp) = if row_parallel {
            (l.out, split)
        } else {
            (split, l.inp)
        };
        if !inp.is_multiple_of(fmt.group) {
            awq.push(format!(
                "{}: input partition {inp} is not divisible by group {}",
                shown, fmt.group
            ));
        }
        if !out.is_multiple_of(8) {
            awq.push(format!(
                "{}: output partition {out} is not divisible by 8",
                shown
            ));
        }
        // vLLM runs experts in its fused-MoE kernels (moe_wna16 / Marlin MoE), not awq_gemm:
        // only the per-rank partition rules above apply to them.
        if l.expert.is_some() {
            continue;
        }
        let module = l.merged;
        match merged.iter_mut().find(|m| m.0 == module) {
            Some(m) => m.1 += out,
            None => merged.push((module, out, inp)),
        }
    }
    // The fused awq_gemm kernel (every step below 256 tokens, i.e. all of decoding) runs on the
    // merged modules and throws unless g % 32 == 0, out % 64 == 0 and out % g == 0
    // (AWQ-SPEC §10.1). compressed-tensors runs other kernels (see the end).
    let awq_gemm = fmt.layout.is_awq();
    // vLLM's awq_marlin (the default on compute capability 8.0+) runs each linear on Marlin
    // when Marlin takes it and falls back to the awq kernels per linear otherwise
    // (`AWQMarlinConfig.get_quant_method`), so the awq_gemm rules bind only the `awq` path.
    let mut kernel = Vec::new();
    if awq_gemm && !fmt.group.is_multiple_of(32) {
        kernel.push(format!(
            "group {} is not a multiple of 32, which vLLM's awq_gemm kernel requires",
            fmt.group
        ));
    }
    for &(module, out, _) in merged.iter().filter(|_| awq_gemm) {
        if !out.is_multiple_of(64) || !out.is_multiple_of(fmt.group) {
            kernel.push(format!(
                "{module}: output partition {out} must be a multiple of 64 and of group {} \
                 (vLLM's awq_gemm kernel)",
                fmt.group
            ));
        }
    }
    for (module, out, inp) in merged {
        if !out.is_multiple_of(64) {
            marlin.push(format!(
                "{module}: output partition {out} is not divisible by 64 (Marlin)"
            ));
        }
        if !inp.is_multiple_of(128) {
            marlin.push(format!(
                "{module}: input partition {inp} is not divisible by 128 (Marlin)"
            ));
        }
    }
    if !MARLIN_GROUPS.contains(&fmt.group) {
        marlin.push(format!(
            "group {} is not one of Marlin's 32, 64, 128",
            fmt.group
        ));
    }
    // compressed-tensors W4A16 with zero points (vLLM `CompressedTensorsWNA16`,
    // `choose_mp_linear_kernel`): Marlin takes uint4 with zero points under the rules above;
    // else only Machete (Hopper, groups 64 and 128) does — AllSpark, BitBLAS and CUTLASS
    // refuse zero points.
    if !awq_gemm && !marlin.is_empty() && ![64, 128].contains(&fmt.group) {
        awq.push(format!(
            "no vLLM kernel for zero points applies: Marlin does not ({}), and Machete (Hopper \
             only) takes groups 64 and 128, not {}",
            marlin.join("; "),
            fmt.group
        ));
    }
    let splits = awq.is_empty();
    let vllm_awq_marlin = splits && marlin.is_empty();
    awq.extend(kernel);
    dedup_in_order(&mut awq);
    dedup_in_order(&mut marlin);
    TpSupport {
        tp,
        vllm_awq: awq.is_empty(),
        vllm_awq_marlin,
        reasons: awq,
        marlin_reasons: marlin,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::HfConfig;

    /// SmolLM2-135M's shape: hidden 576, 9 heads (3 key/value) of 64, intermediate 1536.
    fn smollm2() -> ModelSpec {
        serde_json::from_value::<HfConfig>(serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 1, "num_attention_heads": 9, "num_key_value_heads": 3,
            "vocab_size": 49152
        }))
        .unwrap()
        .base_spec(true)
        .unwrap()
    }

    fn found(violations: &[String], float_dtype: Dtype) -> Found<'_> {
        Found {
            violations,
            float_dtype,
            float_linears: &[],
            head_in_int4: None,
            vision_in_int4: None,
            awq: true,
            tgi_model: None,
            moe_zero_points: None,
        }
    }

    fn at(tp: usize, layout: Layout) -> TpSupport {
        let spec = smollm2();
        let fmt = AwqFormat { group: 64, layout };
        tp_support(&spec, &spec.linears(), &[], fmt, tp)
    }

    #[test]
    fn any_degree_is_analysed() {
        // tp 1: awq, not Marlin (576 inputs are not a multiple of 128).
        let t = at(1, Layout::Gemm);
        assert!(t.vllm_awq && !t.vllm_awq_marlin, "{t:?}");
        assert!(
            t.marlin_reasons
                .iter()
                .any(|r| r.contains("input partition 576 is not divisible by 128")),
            "{t:?}"
        );
        // The merged qkv projection (576 + 192 + 192) is what Marlin checks for % 64.
        assert!(
            !t.marlin_reasons.iter().any(|r| r.contains("k_proj")),
            "{t:?}"
        );
        // tp 3: 9 heads and 3 key/value heads split; every partition is aligned.
        let t = at(3, Layout::Gemm);
        assert!(t.vllm_awq, "{t:?}");
        // tp 9: heads split and key/value heads replicate (one per rank), but the 1536
        // intermediate features do not split.
        let t = at(9, Layout::Gemm);
        assert_eq!(t.reasons.len(), 3, "{t:?}");
        assert!(t.reasons.iter().all(|r| r.contains("1536")), "{t:?}");
        // tp 2, 4, 5, 6: 9 heads do not split.
        for tp in [2, 4, 5, 6] {
            let t = at(tp, Layout::Gemm);
            assert!(!t.vllm_awq, "{tp}");
            assert!(
                t.reasons[0].contains("9 attention heads do not split over"),
                "{t:?}"
            );
        }
        // tp 18: heads do not split; key/value heads replicate (18 % 3 == 0): not a reason.
        let t = at(18, Layout::Gemm);
        assert!(t.reasons[0].contains("9 attention heads"), "{t:?}");
        assert!(!t.reasons.iter().any(|r| r.contains("key/value")), "{t:?}");
    }

    #[test]
    fn gemv_is_not_loadable_by_vllm_at_any_degree() {
        for tp in [1, 3] {
            let t = at(tp, Layout::Gemv);
            assert!(!t.vllm_awq && !t.vllm_awq_marlin);
            assert_eq!(t.reasons, [GEMV_NOT_SERVABLE]);
        }
        let t = at(1, Layout::Gemv);
        let vllm = target_support(Target::Vllm, 1, &found(&[], Dtype::F16), &t);
        let tgi = target_support(Target::Tgi, 1, &found(&[], Dtype::F16), &t);
        let hf = target_support(Target::Transformers, 1, &found(&[], Dtype::F16), &t);
        assert!(!vllm.loadable && !tgi.loadable && hf.loadable);
        assert!(vllm.reasons[0].contains("--for transformers"));
        assert!(vllm.reasons[0].contains("--version gemm"));
    }

    #[test]
    fn bfloat16_needs_marlin_in_vllm_and_is_refused_by_tgi() {
        // SmolLM2 at tp 1: awq loads, Marlin does not (576 % 128 ≠ 0).
        let t = at(1, Layout::Gemm);
        let vllm = target_support(Target::Vllm, 1, &found(&[], Dtype::BF16), &t);
        let tgi = target_support(Target::Tgi, 1, &found(&[], Dtype::BF16), &t);
        let hf = target_support(Target::Transformers, 1, &found(&[], Dtype::BF16), &t);
        assert!(
            !vllm.loadable && vllm.reasons[0].contains("awq_marlin"),
            "{vllm:?}"
        );
        assert!(!tgi.loadable && hf.loadable);
    }

    #[test]
    fn a_violation_fails_every_target() {
        let t = at(1, Layout::Gemm);
        let v = ["model.layers.0.self_attn.q_proj.qweight: missing".to_string()];
        for target in Target::ALL {
            let s = target_support(target, 1, &found(&v, Dtype::F16), &t);
            assert!(!s.loadable);
            assert!(s.reasons[0].contains("q_proj.qweight: missing"));
        }
    }

    /// A list without `lm_head` makes transformers load the head as int4: only a null list,
    /// or a list with an entry matching the head, keeps it float.
    #[test]
    fn modules_to_not_convert_list_without_lm_head_fails_transformers() {
        let mut spec = smollm2();
        assert_eq!(head_quantized_by_transformers(&spec), None);
        spec.not_converted = Some(vec![]);
        let why = head_quantized_by_transformers(&spec).expect("empty list");
        assert!(why.contains("without \"lm_head\""), "{why}");
        spec.not_converted = Some(vec!["block_sparse_moe.gate".into()]);
        let why = head_quantized_by_transformers(&spec);
        let t = at(1, Layout::Gemm);
        let v: Vec<String> = vec![];
        let f = Found {
            head_in_int4: why,
            vision_in_int4: None,
            awq: true,
            moe_zero_points: None,
            ..found(&v, Dtype::F16)
        };
        assert!(!target_support(Target::Transformers, 1, &f, &t).loadable);
        assert!(target_support(Target::Vllm, 1, &f, &t).loadable);
        spec.not_converted = Some(vec!["block_sparse_moe.gate".into(), "lm_head".into()]);
        assert_eq!(head_quantized_by_transformers(&spec), None);
    }

    /// DeepSeek-V3's released config.json (the keys the spec reads).
    pub(crate) fn deepseek_v3() -> ModelSpec {
        crate::model::test_spec(serde_json::json!({
            "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
            "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
            "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
            "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
            "n_group": 8, "topk_group": 4, "first_k_dense_replace": 3, "norm_topk_prob": true,
            "routed_scaling_factor": 2.5, "q_lora_rank": 1536, "kv_lora_rank": 512,
            "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
            "num_nextn_predict_layers": 1, "vocab_size": 129280, "rms_norm_eps": 1e-06,
            "max_position_embeddings": 163840, "rope_theta": 10000,
            "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                             "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                             "type": "yarn"},
            "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                                    "quant_method": "fp8", "weight_block_size": [128, 128]}
        }))
    }

    fn model_at(spec: &ModelSpec, group: usize, tp: usize) -> TpSupport {
        vllm_support(spec, group, Layout::Gemm, tp)
    }

    /// DeepSeek-V3 in vLLM: q_b/kv_b split by heads, o by its input heads, q_a and kv_a one
    /// replicated `fused_qkv_a_proj` of 1536 + 576 outputs. At group 64 every degree up to 8
    /// takes both kernels; at group 128 the fused projection's 2112 outputs are not a multiple
    /// of the group, which awq_gemm refuses and Marlin accepts.
    #[test]
    fn deepseek_v3_splits_latent_attention_as_vllm_does() {
        let spec = deepseek_v3();
        assert_eq!(spec.fp8_block, Some([128, 128]));
        assert_eq!((spec.mtp_layers, spec.layer_kinds().len()), (1, 2));
        for tp in [1, 2, 4, 8] {
            let t = model_at(&spec, 64, tp);
            assert!(t.vllm_awq && t.vllm_awq_marlin, "tp {tp}: {t:?}");
        }
        let t = model_at(&spec, 128, 8);
        assert!(!t.vllm_awq && t.vllm_awq_marlin, "{t:?}");
        assert!(t.marlin_reasons.is_empty(), "{t:?}");
        assert_eq!(
            t.reasons,
            vec![
                "self_attn.fused_qkv_a_proj: output partition 2112 must be a multiple of 64 \
                  and of group 128 (vLLM's awq_gemm kernel)"
            ]
        );
        // 128 heads do not split over 3 ranks: neither kernel path loads it.
        let t = model_at(&spec, 64, 3);
        assert!(!t.vllm_awq && !t.vllm_awq_marlin, "{t:?}");
    }

    /// TGI serves AWQ for the model types it implements only: GLM-4.5 and Kimi K2 (the
    /// DeepSeek-V3 architecture under `model_type` `kimi_k2`) go to its transformers fallback,
    /// which refuses AWQ.
    #[test]
    fn tgi_refuses_model_types_it_does_not_implement() {
        for t in [
            "llama",
            "qwen2",
            "deepseek_v3",
            "gemma3",
            "mixtral",
            "qwen2_5_vl",
        ] {
            assert_eq!(tgi_refuses(Some(t)), None, "{t}");
        }
        for t in [
            "glm4_moe",
            "kimi_k2",
            "qwen3",
            "qwen3_moe",
            "qwen2_moe",
            "mistral3",
        ] {
            assert!(tgi_refuses(Some(t)).is_some_and(|w| w.contains(t)), "{t}");
        }
        let at_tp = model_at(&deepseek_v3(), 64, 1);
        let mut kimi = found(&[], Dtype::F16);
        kimi.tgi_model = tgi_refuses(Some("kimi_k2"));
        assert!(!target_support(Target::Tgi, 1, &kimi, &at_tp).loadable);
        assert!(target_support(Target::Vllm, 1, &kimi, &at_tp).loadable);
    }

    /// vLLM's awq_marlin falls back to the awq kernels per linear and back again, so a model
    /// that only Marlin takes loads in vLLM (Ampere or newer); TGI runs the awq kernels.
    #[test]
    fn marlin_only_model_loads_in_vllm_not_in_tgi() {
        let at_tp = model_at(&deepseek_v3(), 128, 1);
        let found = found(&[], Dtype::F16);
        let vllm = target_support(Target::Vllm, 1, &found, &at_tp);
        assert!(vllm.loadable, "{vllm:?}");
        let tgi = target_support(Target::Tgi, 1, &found, &at_tp);
        assert!(
            !tgi.loadable && tgi.reasons[0].contains("awq_gemm"),
            "{tgi:?}"
        );
    }

    /// GLM-4.5-Air's released config: 96 heads of 128 over 8 key/value heads, q/k/v biases,
    /// 128 experts of 1408 and one shared expert, the first layer dense.
    #[test]
    fn glm4_5_air_splits_like_a_gqa_moe() {
        let spec = crate::model::test_spec(serde_json::json!({
            "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe",
            "hidden_size": 4096, "intermediate_size": 10944, "moe_intermediate_size": 1408,
            "num_hidden_layers": 46, "num_attention_heads": 96, "num_key_value_heads": 8,
            "head_dim": 128, "partial_rotary_factor": 0.5, "attention_bias": true,
            "n_routed_experts": 128, "n_shared_experts": 1, "num_experts_per_tok": 8,
            "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "norm_topk_prob": true,
            "routed_scaling_factor": 1.0, "use_qk_norm": false, "num_nextn_predict_layers": 1,
            "vocab_size": 151552, "rms_norm_eps": 1e-05, "rope_theta": 1000000,
            "max_position_embeddings": 131072
        }));
        assert_eq!(
            (spec.rotary_dim, spec.qk_norm, spec.qkv_bias),
            (64, false, true)
        );
        // The dense layer's 10944 inputs of down_proj take group 64 (171 groups), not 128; split
        // over 2 ranks they are 5472, which group 64 does not divide either.
        let t = model_at(&spec, 128, 1);
        assert_eq!(
            t.reasons,
            vec!["mlp.down_proj: input partition 10944 is not divisible by group 128"]
        );
        assert!(model_at(&spec, 64, 1).vllm_awq);
        let t = model_at(&spec, 64, 2);
        assert_eq!(
            t.reasons,
            vec!["mlp.down_proj: input partition 5472 is not divisible by group 64"]
        );
    }
}

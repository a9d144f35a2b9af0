//! `awq verify`: checks an AWQ checkpoint against what its loaders require (AWQ-SPEC §10) before
//! it ships. Every linear of every layer is checked for presence, dtype and packed shape, every
//! packed tensor is dequantized and checked for finite values, and each tensor-parallel degree
//! is checked against vLLM's per-partition rules (`awq` and `awq_marlin`), which TGI and
//! transformers share for the GEMM layout.
//!
//! A violation at tensor-parallel degree 1 (or a missing, mistyped or non-finite tensor) means
//! the checkpoint is broken: `ok` is false and the CLI exits 5. A degree > 1 that a loader
//! cannot split is reported, not a failure, unless the caller requires it (`--tp`).

use std::path::Path;

use safetensors::Dtype;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::input_err;
use crate::io::reader::Checkpoint;
use crate::model::config::{AwqFormat, LinearShape};
use crate::model::layer::{layer_prefix, packed_shapes, read_packed_tensors};
use crate::model::{load_spec, EMBED, FINAL_NORM, LM_HEAD};
use crate::quant::pack::{unpack, Layout};

pub const TP_DEGREES: [usize; 4] = [1, 2, 4, 8];

/// Group sizes the Marlin kernels accept (−1 = per channel).
const MARLIN_GROUPS: [usize; 3] = [32, 64, 128];

#[derive(Debug, Clone, Serialize)]
pub struct TpSupport {
    pub tp: usize,
    /// vLLM's `awq` kernels (and TGI) can load the model at this degree.
    pub vllm_awq: bool,
    /// vLLM's faster `awq_marlin` path applies to every linear at this degree.
    pub vllm_awq_marlin: bool,
    /// Why not, when either is false.
    pub reasons: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub dir: String,
    pub ok: bool,
    pub architecture: String,
    pub layers: usize,
    pub group: usize,
    pub version: String,
    pub linears_checked: usize,
    pub violations: Vec<String>,
    pub tensor_parallel: Vec<TpSupport>,
    /// Which loaders accept the layout (GEMV is not loadable by vLLM).
    pub loaders: Vec<String>,
}

pub fn verify(dir: &Path) -> Result<VerifyReport> {
    if !dir.is_dir() {
        return Err(input_err!("{} is not a directory", dir.display()));
    }
    let spec = load_spec(&dir.join("config.json"))?;
    let Some(fmt) = spec.awq else {
        return Err(Error::Quality(format!(
            "{}: config.json has no AWQ quantization_config; this is not an AWQ checkpoint",
            dir.display()
        )));
    };
    let ckpt = Checkpoint::open_dir(dir)?;
    let mut v = Vec::new();

    let float = |name: &str, shape: &[usize], v: &mut Vec<String>| {
        if !ckpt.contains(name) {
            v.push(format!("{name}: missing"));
            return;
        }
        match ckpt.meta(name) {
            Ok(m) if m.shape != shape => {
                v.push(format!("{name}: shape {:?}, expected {shape:?}", m.shape))
            }
            Ok(m) if m.dtype != Dtype::F16 => v.push(format!(
                "{name}: dtype {:?}, expected F16 (vLLM's AWQ kernels run in float16)",
                m.dtype
            )),
            Ok(_) => match ckpt.f16s(name, shape) {
                Ok(vals) => {
                    if let Some(i) = vals.iter().position(|x| !x.is_finite()) {
                        v.push(format!("{name}: non-finite value at index {i}"));
                    }
                }
                Err(e) => v.push(format!("{name}: {e}")),
            },
            Err(e) => v.push(format!("{name}: {e}")),
        }
    };
    float(EMBED, &[spec.vocab, spec.hidden], &mut v);
    float(FINAL_NORM, &[spec.hidden], &mut v);
    if spec.tied_embeddings {
        if ckpt.contains(LM_HEAD) {
            v.push(format!(
                "{LM_HEAD}: present although tie_word_embeddings is true (some loaders fail on it)"
            ));
        }
    } else {
        float(LM_HEAD, &[spec.vocab, spec.hidden], &mut v);
    }

    let linears = spec.linears();
    let mut checked = 0;
    for i in 0..spec.layers {
        let p = layer_prefix(i);
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            float(&format!("{p}.{norm}.weight"), &[spec.hidden], &mut v);
        }
        if spec.qk_norm {
            for norm in ["self_attn.q_norm", "self_attn.k_norm"] {
                float(&format!("{p}.{norm}.weight"), &[spec.head_dim], &mut v);
            }
        }
        for l in &linears {
            let prefix = format!("{p}.{}", l.name);
            check_linear(&ckpt, &prefix, l, fmt, &mut v);
            if l.bias {
                float(&format!("{prefix}.bias"), &[l.out], &mut v);
            }
            checked += 1;
        }
    }

    let tensor_parallel: Vec<TpSupport> = TP_DEGREES
        .iter()
        .map(|&tp| tp_support(&spec, &linears, fmt, tp))
        .collect();
    if let Some(tp1) = tensor_parallel.first() {
        if !tp1.vllm_awq && fmt.layout == Layout::Gemm {
            v.extend(
                tp1.reasons
                    .iter()
                    .map(|r| format!("tensor parallel 1: {r}")),
            );
        }
    }
    let loaders = match fmt.layout {
        Layout::Gemm => vec![
            "vllm (awq, awq_marlin)".into(),
            "tgi".into(),
            "transformers".into(),
        ],
        Layout::Gemv => vec!["transformers (WQLinear_GEMV)".into(), "autoawq".into()],
    };
    Ok(VerifyReport {
        dir: dir.display().to_string(),
        ok: v.is_empty(),
        architecture: spec.architecture.clone(),
        layers: spec.layers,
        group: fmt.group,
        version: fmt.layout.name().into(),
        linears_checked: checked,
        violations: v,
        tensor_parallel,
        loaders,
    })
}

/// Presence, dtype and shape of qweight/qzeros/scales, then dequantization and finiteness.
fn check_linear(
    ckpt: &Checkpoint,
    prefix: &str,
    l: &LinearShape,
    fmt: AwqFormat,
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
    for ((part, dtype), shape) in [
        ("qweight", Dtype::I32),
        ("qzeros", Dtype::I32),
        ("scales", Dtype::F16),
    ]
    .into_iter()
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
    if v.len() > before {
        return;
    }
    let packed = match read_packed_tensors(ckpt, prefix, shapes) {
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

/// vLLM's rules at tensor-parallel degree `tp` (AWQ-SPEC §10.1, §10.2): attention heads split
/// across ranks; q/k/v/gate/up split their outputs (column parallel), o/down their inputs (row
/// parallel); per partition `in % group == 0` and `out % 8 == 0`; Marlin also needs
/// `out % 64 == 0`, `in % 128 == 0` and a group in {32, 64, 128}.
fn tp_support(
    spec: &crate::model::config::ModelSpec,
    linears: &[LinearShape],
    fmt: AwqFormat,
    tp: usize,
) -> TpSupport {
    let mut awq = Vec::new();
    let mut marlin = Vec::new();
    if fmt.layout == Layout::Gemv {
        awq.push("vLLM and TGI load the GEMM layout only".to_string());
    }
    if !spec.heads.is_multiple_of(tp) {
        awq.push(format!(
            "{} attention heads do not split over {tp} ranks",
            spec.heads
        ));
    }
    if !(spec.kv_heads.is_multiple_of(tp) || tp.is_multiple_of(spec.kv_heads)) {
        awq.push(format!(
            "{} key/value heads neither split over nor replicate to {tp} ranks",
            spec.kv_heads
        ));
    }
    for l in linears {
        let row_parallel = l.name.ends_with("o_proj") || l.name.ends_with("down_proj");
        let (out, inp) = if row_parallel {
            (l.out, l.inp / tp)
        } else {
            (l.out / tp, l.inp)
        };
        let split = if row_parallel { l.inp } else { l.out };
        if !split.is_multiple_of(tp) {
            awq.push(format!(
                "{}: {split} does not split over {tp} ranks",
                l.name
            ));
            continue;
        }
        if !inp.is_multiple_of(fmt.group) {
            awq.push(format!(
                "{}: input partition {inp} is not divisible by group {}",
                l.name, fmt.group
            ));
        }
        if !out.is_multiple_of(8) {
            awq.push(format!(
                "{}: output partition {out} is not divisible by 8",
                l.name
            ));
        }
        if !out.is_multiple_of(64) {
            marlin.push(format!(
                "{}: output partition {out} is not divisible by 64 (Marlin)",
                l.name
            ));
        }
        if !inp.is_multiple_of(128) {
            marlin.push(format!(
                "{}: input partition {inp} is not divisible by 128 (Marlin)",
                l.name
            ));
        }
    }
    if !MARLIN_GROUPS.contains(&fmt.group) {
        marlin.push(format!(
            "group {} is not one of Marlin's 32, 64, 128",
            fmt.group
        ));
    }
    let vllm_awq = awq.is_empty();
    let vllm_awq_marlin = vllm_awq && marlin.is_empty();
    awq.extend(marlin);
    TpSupport {
        tp,
        vllm_awq,
        vllm_awq_marlin,
        reasons: awq,
    }
}

//! A vision-language checkpoint's float parts, checked in both directions: every vision and
//! projector module is matched by a `modules_to_not_convert` entry and holds float weights (the
//! decoder loop checks the other direction: no quantized linear is matched).
//!
//! Loaders match entries in two ways. vLLM (`is_layer_skipped`, substring of the module
//! prefix) and transformers 4.x (`replace_with_awq_linear`) take any substring. transformers 5
//! (`should_convert_module`) takes an entry only at the start of a module name (followed by `.`
//! or the end) or at its end, and names the modules `model.vision_tower.*` / `model.visual.*`
//! whatever the layout on disk (its checkpoint conversion mapping renames on load). So
//! `vision_tower` alone serves vLLM and transformers 4, and `model.vision_tower` transformers 5.

use safetensors::Dtype;
use serde::Serialize;

use crate::io::reader::Checkpoint;
use crate::model::config::ModelSpec;
use crate::model::wrapped::{self, VisionParts};

/// What `verify` found in the vision parts.
#[derive(Debug, Clone, Serialize)]
pub struct VisionCheck {
    /// The parts, per top-level module.
    pub parts: VisionParts,
    /// Vision tensors stored in another float dtype than `torch_dtype` (copied unchanged from
    /// the source; loaders cast them on load), when there are any.
    pub dtype_note: Option<String>,
    /// Why transformers 5 would build int4 layers for vision modules (a list matched by
    /// substring only); a reason against `--for transformers`, not a violation.
    #[serde(skip)]
    pub transformers5: Option<String>,
}

/// transformers 5's rule: `entry` at the start of `module` (then `.` or the end), or at its
/// end.
fn matches_at_start_or_end(entry: &str, module: &str) -> bool {
    module.ends_with(entry)
        || module
            .strip_prefix(entry)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

/// Checks the vision parts of `spec` in `ckpt`, pushing what breaks every loader onto `v`;
/// `None` for a causal LM.
pub fn check(
    spec: &ModelSpec,
    ckpt: &Checkpoint,
    float_dtype: Dtype,
    v: &mut Vec<String>,
) -> Option<VisionCheck> {
    let vision = spec.vision.as_ref()?;
    let parts = wrapped::parts(vision, ckpt);
    let mut names: Vec<&str> = ckpt
        .names()
        .into_iter()
        .filter(|n| vision.owns(n))
        .collect();
    names.sort_unstable();
    let mut other_dtype = Vec::new();
    let mut t5_misses = Vec::new();
    for name in names {
        let Ok(meta) = ckpt.meta(name) else { continue };
        if name.ends_with(".qweight") {
            v.push(format!(
                "{name}: the vision parts must stay float, but this module is packed"
            ));
            continue;
        }
        if let Some(module) = name.strip_suffix(".weight") {
            if !spec.not_converted_matches(module) {
                v.push(format!(
                    "{module}: a vision module that no modules_to_not_convert (or ignore) entry \
                     matches (loaders would build a quantized linear and find no packed \
                     weights); add \"{}\"",
                    vision.entries.join("\", \"")
                ));
            }
            // transformers 5 names it under `model.` whatever the layout on disk.
            let t5 = match module.starts_with("model.") {
                true => module.to_string(),
                false => format!("model.{module}"),
            };
            // compressed-tensors' `ignore` is matched alike by every loader.
            let awq = spec.awq.is_none_or(|f| f.layout.is_awq());
            let entries = spec.not_converted.iter().flatten();
            if awq && !entries.clone().any(|e| matches_at_start_or_end(e, &t5)) {
                t5_misses.push(t5);
            }
        }
        if matches!(meta.dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32) {
            if meta.dtype != float_dtype {
                other_dtype.push(format!("{:?}", meta.dtype));
            }
            if let Err(e) = ckpt.f32(name, &meta.shape) {
                v.push(format!("{name}: {e}"));
            }
        }
    }
    let differing = other_dtype.len();
    let dtype_note = (!other_dtype.is_empty()).then(|| {
        other_dtype.sort();
        other_dtype.dedup();
        format!(
            "{} vision tensors are {} while torch_dtype is {}: copied unchanged \
             from the source; loaders cast them when they load",
            differing,
            other_dtype.join("/"),
            match float_dtype {
                Dtype::BF16 => "bfloat16",
                _ => "float16",
            }
        )
    });
    let transformers5 = t5_misses.first().map(|m| {
        format!(
            "transformers 5 matches modules_to_not_convert entries only at the start or the end \
             of a module name, and no entry matches {m} ({} vision modules in all); add \"{}\"",
            t5_misses.len(),
            vision
                .entries
                .iter()
                .map(|e| format!("model.{e}"))
                .collect::<Vec<_>>()
                .join("\", \"")
        )
    });
    Some(VisionCheck {
        parts,
        dtype_note,
        transformers5,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transformers5_matches_at_the_start_or_the_end_only() {
        let m = "model.visual.blocks.0.attn.qkv";
        assert!(matches_at_start_or_end("model.visual", m));
        assert!(!matches_at_start_or_end("visual", m));
        assert!(matches_at_start_or_end("attn.qkv", m));
        assert!(!matches_at_start_or_end("model.vis", m));
    }
}

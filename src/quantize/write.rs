//! The end of a run: the float dtype of the unquantized tensors is chosen from what every layer
//! saw, the head is written, the parts become shards, and the configs and companion files join
//! them in the staging directory.

use std::path::{Path, PathBuf};

use super::keep::{self, KeptFp16};
use super::report::LayerReport;
use super::{DtypeChoice, QuantizeOptions};
use crate::error::Result;
use crate::events::{Event, Sink};
use crate::io::reader::Checkpoint;
use crate::io::writer::{self, FloatDtype, OutTensor, SourceMatrix, PARTS_DIR};
use crate::model::{Model, OutOfRange, F16_MAX, HEAD_MODULE};

/// The output's float dtype and why (for the report and the card).
///
/// `auto` picks bfloat16 when an unquantized source value (`beyond`), a scaled norm or bias, or
/// a calibration activation exceeds float16's range — such a model overflows when served in
/// float16 — and float16 otherwise (what AutoAWQ writes and vLLM's `awq` kernels require).
/// A forced float16 with overflowing activations is written as asked, with a warning.
pub(super) fn choose_dtype(
    choice: DtypeChoice,
    beyond: Option<&OutOfRange>,
    layers: &[LayerReport],
    events: Sink,
) -> (FloatDtype, String) {
    let act = layers
        .iter()
        .max_by(|a, b| a.max_abs_activation.total_cmp(&b.max_abs_activation));
    let weight = layers.iter().find(|l| l.max_abs_float_weight > F16_MAX);
    let overflow = match (beyond, weight, act) {
        (Some(b), _, _) => Some(format!(
            "tensor {} holds {:e} (index {})",
            b.tensor, b.value, b.index
        )),
        (_, Some(l), _) => Some(format!(
            "a norm or bias of layer {} reaches {:e} after scaling",
            l.layer, l.max_abs_float_weight
        )),
        (_, _, Some(l)) if l.max_abs_activation > F16_MAX => Some(format!(
            "calibration activations reach {:e} in layer {}",
            l.max_abs_activation, l.layer
        )),
        _ => None,
    };
    match (choice, overflow) {
        (DtypeChoice::Bfloat16, _) => (FloatDtype::Bfloat16, "--dtype bfloat16".into()),
        (DtypeChoice::Float16, None) | (DtypeChoice::Auto, None) => (
            FloatDtype::Float16,
            "every value and calibration activation fits float16".into(),
        ),
        (DtypeChoice::Float16, Some(why)) => {
            events(&Event::Warning {
                message: format!(
                    "{why}, beyond float16's ±{F16_MAX}; --dtype float16 was given, so the model \
                     will produce inf/NaN when served in float16 — use --dtype auto or bfloat16"
                ),
            });
            (FloatDtype::Float16, format!("--dtype float16 ({why})"))
        }
        (DtypeChoice::Auto, Some(why)) => {
            let reason = format!(
                "{why}, beyond float16's ±{F16_MAX}: unquantized tensors and torch_dtype are \
                 bfloat16 (AWQ scales stay float16); serve it in bfloat16 (vLLM: awq_marlin)"
            );
            events(&Event::Notice {
                message: reason.clone(),
            });
            (FloatDtype::Bfloat16, reason)
        }
    }
}

/// Checks, before the head is written, that the filesystem holds what is still to come: the
/// head part, and shards as large as the layer parts plus the head (the parts are removed only
/// after the shards are written).
pub(super) fn check_space_for_head(
    opts: &QuantizeOptions,
    model: &Model,
    parts: &Path,
) -> Result<()> {
    let spec = &model.spec;
    let copies = if spec.tied_embeddings { 1 } else { 2 };
    let head = (copies * spec.vocab * spec.hidden * 2) as u64;
    let layers = crate::io::space::bytes_under(parts);
    // A wrapper's vision parts are copied straight into the shards.
    let vision = model.vision_parts().map_or(0, |v| v.bytes());
    crate::io::space::check(
        &opts.output,
        2 * head + layers + vision,
        &format!(
            "writing the head and the shards ({} of layer parts to assemble, {} of embedding \
             and head, {} of vision parts)",
            crate::io::space::human(layers),
            crate::io::space::human(head),
            crate::io::space::human(vision)
        ),
    )
}

/// What [`write_checkpoint`] wrote.
pub(super) struct Written {
    /// The shard file names.
    pub shards: Vec<String>,
    /// Every file name written (shards, index, configs, companions; the caller adds the card
    /// and the report).
    pub files: Vec<String>,
    /// `--keep-fp16`: what the budget kept.
    pub kept_fp16: Option<KeptFp16>,
}

/// Writes the head part, applies `--keep-fp16`, writes the shards (from the parts),
/// config.json, quant_config.json and the companion files into `staged`. The parts stay until
/// [`remove_parts`]: a disk that fills up before the end keeps the finished layers.
pub(super) fn write_checkpoint(
    opts: &QuantizeOptions,
    model: &Model,
    staged: &Path,
    reports: &[LayerReport],
    mut parts: Vec<PathBuf>,
    mut names: Vec<String>,
    dtype: FloatDtype,
) -> Result<Written> {
    let parts_dir = staged.join(PARTS_DIR);
    let head_part = parts_dir.join("head.safetensors");
    let (small, matrices) = head_tensors(model, dtype, &mut names)?;
    writer::write_file_with(&head_part, &small, &matrices)?;
    parts.push(head_part);
    let kept_fp16 = match opts.keep_fp16 {
        Some(pct) => {
            let (dir, parts, names) = (&parts_dir, &mut parts, &mut names);
            Some(keep::apply(
                pct,
                opts.layout,
                model,
                reports,
                dir,
                parts,
                names,
            )?)
        }
        None => None,
    };
    // A wrapper's vision parts go last, copied from the source unchanged.
    names.extend(model.vision_tensors());
    let part_ckpt = Checkpoint::open_files(parts)?;
    let files = writer::write_shards(
        staged,
        &part_ckpt,
        &model.ckpt,
        &names,
        opts.shard_size,
        dtype,
    )?;
    drop(part_ckpt);

    let version = opts.layout.name();
    let qcfg = match opts.layout.is_awq() {
        true => serde_json::json!({
            "quant_method": "awq",
            "zero_point": true,
            "group_size": opts.group,
            "bits": opts.w_bit,
            "version": version,
            "modules_to_not_convert": not_converted(model, kept_fp16.as_ref()),
        }),
        false => {
            let ignore = super::ct_config::ignore(model, kept_fp16.as_ref());
            super::ct_config::config(opts.group, ignore)
        }
    };
    writer::write_json(
        &staged.join("config.json"),
        &writer::patch_config(&model.dir.join("config.json"), qcfg, dtype)?,
    )?;
    let mut written = files.clone();
    if files.len() > 1 {
        written.push(crate::io::reader::INDEX_FILE.to_string());
    }
    written.push("config.json".to_string());
    // AutoAWQ's own file: compressed-tensors has none.
    if opts.layout.is_awq() {
        writer::write_json(
            &staged.join("quant_config.json"),
            &serde_json::json!({"zero_point": true, "q_group_size": opts.group, "w_bit": opts.w_bit, "version": version.to_uppercase()}),
        )?;
        written.push("quant_config.json".to_string());
    }
    let companions = writer::copy_companions(&model.dir, staged)?;
    written.extend(companions);
    Ok(Written {
        shards: files,
        files: written,
        kept_fp16,
    })
}

/// Removes the staged parts and fingerprint once every other file of the output is written.
pub(super) fn remove_parts(staged: &Path) -> Result<()> {
    let remove = |p: &Path| {
        std::fs::remove_dir_all(p)
            .or_else(|_| std::fs::remove_file(p))
            .map_err(|e| {
                crate::error::Error::Runtime(format!("cannot remove {}: {e}", p.display()))
            })
    };
    remove(&staged.join(PARTS_DIR))?;
    remove(&staged.join(writer::FINGERPRINT_FILE))
}

/// `modules_to_not_convert`: the routers' entries and the kept units', plus `lm_head`
/// whenever there is a list at all (`null` when none).
///
/// Why `lm_head`: transformers 4.50–4.51 (`AwqQuantizer._process_model_before_weight_loading`
/// → `HfQuantizer.get_modules_to_not_convert` in `quantizers/base.py`: `if skip_modules is
/// None: get_keys_to_not_convert(model) else: skip_modules`) puts the head in its skip list
/// only when the config's list is null; given any list it replaces `lm_head` with an int4
/// `WQLinear` and leaves `lm_head.weight` unused. 4.45–4.49 and 4.52+ (`add_default_skips`),
/// and 5.x, add the head themselves, and every version matches entries as substrings of module
/// names (`replace_with_awq_linear`), so the entry keeps the head float in all of them. vLLM
/// (`is_layer_skipped_awq`, substring of the prefix) never quantizes its `ParallelLMHead`
/// unless the config says `"lm_head": true`; TGI loads the head from `.weight` whatever the
/// list says; AutoAWQ's loader applies entries inside decoder layers only. So the entry changes
/// nothing else.
fn not_converted(model: &Model, kept: Option<&KeptFp16>) -> Option<Vec<String>> {
    let routers = model.spec.modules_to_not_convert().unwrap_or_default();
    let mut entries: Vec<String> = routers
        .into_iter()
        .map(str::to_string)
        .chain(kept.iter().flat_map(|k| k.entries.iter().cloned()))
        .collect();
    if entries.is_empty() {
        return None;
    }
    entries.push(HEAD_MODULE.to_string());
    Some(entries)
}

/// Embedding, final norm and (untied) head in `dtype`; the embedding's name goes first in
/// `names`, the others after the layers'. The embedding and the head are converted as the part
/// is written ([`writer::write_file_with`]), a block of rows at a time.
fn head_tensors<'a>(
    model: &'a Model,
    dtype: FloatDtype,
    names: &mut Vec<String>,
) -> Result<(Vec<OutTensor>, Vec<SourceMatrix<'a>>)> {
    let spec = &model.spec;
    let matrix = |name: String| SourceMatrix {
        ckpt: &model.ckpt,
        name,
        shape: [spec.vocab, spec.hidden],
        dtype,
    };
    let embed_name = spec.roots.embed();
    names.insert(0, embed_name.clone());
    let mut matrices = vec![matrix(embed_name)];
    let norm = model.final_norm()?;
    let final_norm = [Some(norm.weight), norm.bias].into_iter().flatten();
    let mut small = Vec::new();
    for (name, t) in model.final_norm_tensors().into_iter().zip(final_norm) {
        small.push(OutTensor::float(
            name.clone(),
            vec![spec.hidden],
            &t.to_vec1()?,
            dtype,
        )?);
        names.push(name);
    }
    if !spec.tied_embeddings {
        let name = spec.roots.head_weight();
        names.push(name.clone());
        matrices.push(matrix(name));
    }
    Ok((small, matrices))
}

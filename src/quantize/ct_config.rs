//! `quantization_config` for `--format compressed-tensors`: what the `compressed-tensors`
//! package writes for 4-bit asymmetric group quantization (`pack-quantized`), as in
//! `../shared/golden/compressed-tensors/llama-g32/config.json` (llm-compressor 0.14,
//! compressed-tensors 0.19).
//!
//! Two keys of the golden are left out: `scale_dtype` and `zp_dtype` inside `weights`
//! (compressed-tensors 0.13 added them, and `QuantizationArgs` forbids unknown keys, so vLLM
//! builds pinned to 0.12 refuse a config that has them; both default to what we store).
//!
//! `ignore` names what stays float, since the one config group targets every `Linear`: the
//! head, the MoE routers, the `--keep-fp16` linears and a wrapper's vision parts. vLLM
//! (`compressed_tensors/utils.py`, `_is_equal_or_regex_match`) and transformers take an entry as
//! an exact module name or, after `re:`, a regular expression matched at the start of the name;
//! the patterns here are anchored at the end too and name modules by their path inside the
//! decoder, so they hold whatever root a loader names the decoder by.

use crate::model::Model;

use super::keep::KeptFp16;

/// The compressed-tensors version whose format this is (the golden's).
const FORMAT_VERSION: &str = "0.19.0";

/// `re:` entry matching a module whose name ends with `tail` (a dotted path).
fn ends_with(tail: &str) -> String {
    format!("re:.*{}$", tail.replace('.', r"\."))
}

/// The `ignore` list (see the module docs), in a stable order.
pub(super) fn ignore(model: &Model, kept: Option<&KeptFp16>) -> Vec<String> {
    let spec = &model.spec;
    let mut list = Vec::new();
    for r in spec.router_linears() {
        list.push(ends_with(&format!(".{}", r.name)));
    }
    if let Some(k) = kept {
        let root = format!("{}.", spec.roots.decoder);
        for linear in &k.linears {
            let relative = linear.strip_prefix(&root).unwrap_or(linear);
            list.push(ends_with(relative));
        }
    }
    if let Some(v) = &spec.vision {
        list.extend(v.entries.iter().map(|e| format!("re:.*{e}.*")));
    }
    list.push(match spec.vision {
        Some(_) => ends_with("lm_head"),
        None => crate::model::HEAD_MODULE.to_string(),
    });
    list
}

/// The whole `quantization_config` for group size `group`.
pub(super) fn config(group: usize, ignore: Vec<String>) -> serde_json::Value {
    serde_json::json!({
        "config_groups": {"group_0": {
            "format": "pack-quantized",
            "input_activations": null,
            "output_activations": null,
            "targets": ["Linear"],
            "weights": {
                "actorder": null, "block_structure": null, "dynamic": false,
                "group_size": group, "num_bits": 4, "observer": "minmax",
                "observer_kwargs": {}, "strategy": "group", "symmetric": false, "type": "int"
            }
        }},
        "format": "pack-quantized",
        "global_compression_ratio": null,
        "ignore": ignore,
        "kv_cache_scheme": null,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": FORMAT_VERSION
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_anchored_and_escaped() {
        assert_eq!(ends_with(".mlp.gate"), r"re:.*\.mlp\.gate$");
        assert_eq!(
            ends_with("layers.3.self_attn.q_proj"),
            r"re:.*layers\.3\.self_attn\.q_proj$"
        );
    }

    /// The golden's config, less the two keys older packages refuse, is what we write.
    #[test]
    fn config_matches_the_golden_but_for_the_dtype_keys() {
        let golden: serde_json::Value = serde_json::from_str(include_str!(
            "../../tests/fixtures/compressed-tensors/llama-g32/config.json"
        ))
        .unwrap();
        let mut want = golden["quantization_config"].clone();
        let weights = &mut want["config_groups"]["group_0"]["weights"];
        let w = weights.as_object_mut().unwrap();
        w.remove("scale_dtype");
        w.remove("zp_dtype");
        // llm-compressor names its observer; ours is the plain min-max it replaces.
        w.insert("observer".into(), "minmax".into());
        assert_eq!(config(32, vec!["lm_head".into()]), want);
    }
}

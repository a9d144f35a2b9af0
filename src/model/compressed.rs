//! Reading a compressed-tensors checkpoint's `quantization_config` (ours, or llm-compressor's):
//! the one shape we read, `pack-quantized` 4-bit asymmetric group quantization of the weights
//! only (W4A16), and the `ignore` list with the matching rule vLLM and transformers apply.

use serde_json::Value;

use super::config::AwqFormat;
use crate::error::Result;
use crate::input_err;
use crate::quant::pack::Layout;

/// The packed format of a compressed-tensors config, refusing what awq does not read (another
/// format, several config groups, other bit widths or strategies, symmetric weights without
/// zero points, quantized activations), each named.
pub fn format(q: &Value) -> Result<AwqFormat> {
    let refuse = |what: String| {
        input_err!(
            "config.json: compressed-tensors {what}; awq reads pack-quantized 4-bit asymmetric \
             group quantization of the weights (W4A16 asymmetric, what awq quantize \
             --format compressed-tensors and llm-compressor's AWQ write)"
        )
    };
    let groups = q
        .get("config_groups")
        .and_then(Value::as_object)
        .ok_or_else(|| refuse("without config_groups".into()))?;
    let [(name, group)] = groups.iter().collect::<Vec<_>>()[..] else {
        return Err(refuse(format!("with {} config groups", groups.len())));
    };
    let format = group
        .get("format")
        .or_else(|| q.get("format"))
        .and_then(Value::as_str)
        .unwrap_or("");
    if format != "pack-quantized" {
        return Err(refuse(format!("format {format:?}")));
    }
    if group.get("input_activations").is_some_and(|a| !a.is_null()) {
        return Err(refuse(format!("{name} quantizes activations")));
    }
    let targets = group.get("targets").and_then(Value::as_array);
    if !targets.is_some_and(|t| t.iter().any(|t| t.as_str() == Some("Linear"))) {
        return Err(refuse(format!("{name} does not target \"Linear\"")));
    }
    let w = group
        .get("weights")
        .ok_or_else(|| refuse(format!("{name} without weights")))?;
    let field = |k: &str| w.get(k).cloned().unwrap_or(Value::Null);
    if field("num_bits") != 4 || field("type") != "int" || field("strategy") != "group" {
        return Err(refuse(format!(
            "weights of num_bits {}, type {}, strategy {}",
            field("num_bits"),
            field("type"),
            field("strategy")
        )));
    }
    if !field("actorder").is_null() {
        return Err(refuse(format!(
            "act-order weights (actorder {}, a weight_g_idx per linear)",
            field("actorder")
        )));
    }
    if field("symmetric") != false {
        return Err(refuse("symmetric weights (no weight_zero_point)".into()));
    }
    match field("group_size").as_u64() {
        Some(g) if g > 0 => Ok(AwqFormat {
            group: g as usize,
            layout: Layout::PackQuantized,
        }),
        _ => Err(refuse(format!("group_size {}", field("group_size")))),
    }
}

/// The `ignore` list (absent: empty), refusing anything but a list of strings.
pub fn ignore(q: &Value) -> Result<Vec<String>> {
    let Some(list) = q.get("ignore").filter(|l| !l.is_null()) else {
        return Ok(Vec::new());
    };
    list.as_array()
        .and_then(|a| a.iter().map(|e| e.as_str().map(str::to_string)).collect())
        .ok_or_else(|| {
            input_err!(
                "config.json: quantization_config.ignore must be a list of strings, found {list}"
            )
        })
}

/// Whether an `ignore` entry names `module`: an exact name, or after `re:` a regular expression
/// matched at the start of the name (Python's `re.match`, as vLLM's
/// `_is_equal_or_regex_match` and compressed-tensors' `is_match` apply it). An entry that is
/// not a valid expression matches nothing.
pub fn ignores(entry: &str, module: &str) -> bool {
    match entry.strip_prefix("re:") {
        Some(pattern) => compiled(pattern).is_some_and(|re| re.is_match(module)),
        None => entry == module,
    }
}

/// `pattern` anchored at the start and compiled once per process (`None`: not a valid
/// expression). The loaders ask per module and tensor: thousands of times on a MoE model.
fn compiled(pattern: &str) -> Option<regex::Regex> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static CACHE: OnceLock<Mutex<HashMap<String, Option<regex::Regex>>>> = OnceLock::new();
    let mut cache = (CACHE.get_or_init(Default::default).lock())
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let entry = cache.entry(pattern.to_string());
    (entry.or_insert_with(|| regex::Regex::new(&format!("^(?:{pattern})")).ok())).clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_goldens_config_reads_and_others_are_refused_by_name() {
        let golden: Value = serde_json::from_str(include_str!(
            "../../tests/fixtures/compressed-tensors/llama-g32/config.json"
        ))
        .unwrap();
        let q = &golden["quantization_config"];
        let f = format(q).unwrap();
        assert_eq!((f.group, f.layout), (32, Layout::PackQuantized));
        assert_eq!(ignore(q).unwrap(), ["lm_head"]);
        let mut sym = q.clone();
        sym["config_groups"]["group_0"]["weights"]["symmetric"] = true.into();
        assert!(format(&sym).unwrap_err().to_string().contains("symmetric"));
        let mut act = q.clone();
        act["config_groups"]["group_0"]["weights"]["actorder"] = "group".into();
        assert!(format(&act).unwrap_err().to_string().contains("act-order"));
        let mut fp8 = q.clone();
        fp8["config_groups"]["group_0"]["format"] = "float-quantized".into();
        assert!(format(&fp8)
            .unwrap_err()
            .to_string()
            .contains("float-quantized"));
    }

    #[test]
    fn entries_match_exactly_or_as_anchored_patterns() {
        assert!(ignores("lm_head", "lm_head"));
        assert!(!ignores("lm_head", "language_model.lm_head"));
        assert!(ignores(r"re:.*lm_head$", "language_model.lm_head"));
        assert!(ignores(r"re:.*\.mlp\.gate$", "model.layers.3.mlp.gate"));
        assert!(!ignores(
            r"re:.*\.mlp\.gate$",
            "model.layers.3.mlp.gate_proj"
        ));
        assert!(ignores(
            "re:.*vision_tower.*",
            "model.vision_tower.encoder.layers.0.fc1"
        ));
        // re.match anchors at the start only.
        assert!(!ignores("re:vision_tower", "model.vision_tower.x"));
        assert!(!ignores("re:(", "anything"));
    }
}

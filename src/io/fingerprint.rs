//! What a resumed run must share with the interrupted one: the model files (size, modification
//! time, first MiB), config.json, the calibration token ids and the options that shape the
//! output. Stored as JSON in the staging directory; compared field by field on `--resume`.

use std::io::Read;
use std::path::Path;

use serde_json::{json, Value};

use crate::error::{Error, Result};

/// FNV-1a, 64 bit: stable across platforms and Rust versions (unlike `DefaultHasher`).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Size, modification time and a digest of the first MiB (the safetensors header and more).
pub fn file_identity(path: &Path) -> Result<Value> {
    let meta = std::fs::metadata(path).map_err(|e| Error::input_io(path, e))?;
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64);
    let mut head = Vec::with_capacity(1 << 20);
    std::fs::File::open(path)
        .and_then(|f| f.take(1 << 20).read_to_end(&mut head))
        .map_err(|e| Error::input_io(path, e))?;
    Ok(json!({
        "file": path.file_name().map(|n| n.to_string_lossy().into_owned()),
        "size": meta.len(),
        "modified_ns": modified,
        "head_fnv1a": format!("{:016x}", fnv1a(&head)),
    }))
}

/// The first field where `stored` and `current` differ, as a dotted path with the two values
/// when they are short scalars, e.g. `options.group (was 64, now 128)`; `None` when equal.
pub fn first_difference(stored: &Value, current: &Value) -> Option<String> {
    difference("", stored, current)
}

fn difference(path: &str, a: &Value, b: &Value) -> Option<String> {
    let join = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    match (a.as_object(), b.as_object()) {
        (Some(a), Some(b)) => b
            .iter()
            .find_map(|(k, vb)| match a.get(k) {
                Some(va) => difference(&join(k), va, vb),
                None => Some(join(k)),
            })
            .or_else(|| a.keys().find(|k| !b.contains_key(*k)).map(|k| join(k))),
        _ if a == b => None,
        _ if short(a) && short(b) => Some(format!(
            "{} (was {a}, now {b})",
            if path.is_empty() { "fingerprint" } else { path }
        )),
        _ => Some(if path.is_empty() {
            "fingerprint".to_string()
        } else {
            path.to_string()
        }),
    }
}

/// A value worth showing in a message (not a digest or a list).
fn short(v: &Value) -> bool {
    match v {
        Value::String(s) => s.len() <= 12,
        Value::Array(_) | Value::Object(_) => false,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_reference_values() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn names_the_differing_field() {
        let a = json!({"model": 1, "options": {"group": 64}});
        let b = json!({"model": 1, "options": {"group": 128}});
        assert_eq!(first_difference(&a, &a), None);
        assert_eq!(
            first_difference(&a, &b).as_deref(),
            Some("options.group (was 64, now 128)")
        );
        let digest = |d: &str| json!({"ids": {"count": 8, "fnv1a": d}});
        assert_eq!(
            first_difference(&digest("0123456789abcdef"), &digest("fedcba9876543210")).as_deref(),
            Some("ids.fnv1a")
        );
    }
}

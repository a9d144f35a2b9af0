//! What a resumed run must share with the interrupted one: the model files (size and a hash of
//! their whole contents), config.json, the calibration token ids and the options that shape the
//! output. Stored as JSON in the staging directory (and in the output's report, for
//! `--skip-existing`); compared field by field.
//!
//! Why content and not modification time: CI jobs restore models from caches, and `touch`,
//! `cp -r` and `rsync` change the time of identical files, which refused a resume.

use std::path::Path;

use serde_json::{json, Value};

use crate::error::{Error, Result};

/// FNV-1a, 64 bit: stable across platforms and Rust versions (unlike `DefaultHasher`).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The file name, its size and the XXH3-64 hash of its whole contents, read in chunks (the
/// page cache serves them; a checkpoint is read at disk speed once, ~0.1 s per GB when cached).
/// Not through a memory map: the mapped pages of a whole shard (an 11 GB DeepSeek-V3 layer)
/// would count in this process's resident memory until the hash ends.
pub fn file_identity(path: &Path) -> Result<Value> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| Error::input_io(path, e))?;
    let size = file.metadata().map_err(|e| Error::input_io(path, e))?.len();
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 8 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::input_io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let hash = hasher.digest();
    Ok(json!({
        "file": path.file_name().map(|n| n.to_string_lossy().into_owned()),
        "size": size,
        "xxh3": format!("{hash:016x}"),
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

    /// `touch`, `cp` and a cache restore keep the identity; a changed byte anywhere does not.
    #[test]
    fn resume_fingerprint_ignores_mtime_and_sees_every_byte() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("model.safetensors");
        let mut bytes = vec![7u8; 3 << 20];
        std::fs::write(&a, &bytes).unwrap();
        let id = file_identity(&a).unwrap();
        let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        std::fs::File::options()
            .write(true)
            .open(&a)
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert_eq!(file_identity(&a).unwrap(), id);
        let copy = tmp.path().join("copy");
        std::fs::create_dir(&copy).unwrap();
        std::fs::copy(&a, copy.join("model.safetensors")).unwrap();
        assert_eq!(file_identity(&copy.join("model.safetensors")).unwrap(), id);
        // A byte past the first MiB (the old fingerprint read only the head).
        bytes[2 << 20] = 8;
        std::fs::write(&a, &bytes).unwrap();
        assert_ne!(file_identity(&a).unwrap(), id);
    }

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

//! Calibration data: documents from `.txt` / `.jsonl` files, selected and blocked exactly as
//! AutoAWQ does (AWQ-SPEC §1.3): shuffle (seeded, portable), strip, encode with special tokens,
//! drop documents longer than `seqlen` or empty, keep the first `n_samples`, concatenate, cut into
//! blocks of `seqlen` (tail discarded).

use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::input_err;

pub mod corpus;

#[derive(Debug, Clone, serde::Serialize)]
pub struct CalibOptions {
    pub files: Vec<PathBuf>,
    pub text_column: String,
    pub n_samples: usize,
    pub seqlen: usize,
    pub seed: u64,
    /// Keep at most this many blocks (None: all).
    pub max_blocks: Option<usize>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CalibSummary {
    /// The files, or "embedded corpus".
    pub source: String,
    pub documents_read: usize,
    pub documents_used: usize,
    pub documents_too_long: usize,
    pub blocks: usize,
    pub seqlen: usize,
    pub tokens: usize,
}

/// Token blocks `[blocks × seqlen]` (flattened) and what was used.
pub struct Calibration {
    pub ids: Vec<u32>,
    pub summary: CalibSummary,
}

/// Reads all documents of the calibration files, in file order.
/// With no files, the embedded corpus.
pub fn read_documents(opts: &CalibOptions) -> Result<Vec<String>> {
    if opts.files.is_empty() {
        return Ok(corpus::documents().into_iter().map(|(_, d)| d).collect());
    }
    let mut docs = Vec::new();
    for path in &opts.files {
        let text = std::fs::read_to_string(path).map_err(|e| Error::input_io(path, e))?;
        let is_jsonl = path
            .extension()
            .is_some_and(|e| e == "jsonl" || e == "json");
        let before = docs.len();
        if is_jsonl {
            docs.extend(jsonl_documents(path, &text, &opts.text_column)?);
        } else {
            docs.extend(txt_documents(&text));
        }
        if docs.len() == before {
            return Err(input_err!(
                "calibration file {} holds no documents",
                path.display()
            ));
        }
    }
    Ok(docs)
}

/// Documents separated by blank (whitespace-only) lines.
pub fn txt_documents(text: &str) -> Vec<String> {
    let mut docs = Vec::new();
    let mut cur: Vec<&str> = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            if !cur.is_empty() {
                docs.push(cur.join("\n"));
                cur.clear();
            }
        } else {
            cur.push(line);
        }
    }
    if !cur.is_empty() {
        docs.push(cur.join("\n"));
    }
    docs
}

fn jsonl_documents(path: &Path, text: &str, column: &str) -> Result<Vec<String>> {
    let mut docs = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| input_err!("{}:{}: not valid JSON: {e}", path.display(), n + 1))?;
        let doc = v.get(column).and_then(|t| t.as_str()).ok_or_else(|| {
            input_err!(
                "{}:{}: no string field {column:?} (choose the field with --text-column)",
                path.display(),
                n + 1
            )
        })?;
        docs.push(doc.to_string());
    }
    Ok(docs)
}

/// SplitMix64: a tiny portable generator, so a seed selects the same documents everywhere.
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (rejection sampling, no modulo bias).
    pub fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }
}

/// Fisher–Yates with [`SplitMix64`].
pub fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut rng = SplitMix64::new(seed);
    for i in (1..items.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        items.swap(i, j);
    }
}

/// What the calibration came from, for reports and the model card.
pub fn source_label(opts: &CalibOptions) -> String {
    if opts.files.is_empty() {
        return format!("embedded corpus (awq {})", env!("CARGO_PKG_VERSION"));
    }
    let names: Vec<String> = opts
        .files
        .iter()
        .map(|p| {
            p.file_name()
                .map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into())
        })
        .collect();
    names.join(", ")
}

pub fn build(tok: &Tokenizer, opts: &CalibOptions) -> Result<Calibration> {
    let mut docs = read_documents(opts)?;
    let documents_read = docs.len();
    shuffle(&mut docs, opts.seed);
    let l = opts.seqlen;
    let mut stream = Vec::new();
    let (mut used, mut too_long) = (0, 0);
    for doc in &docs {
        let ids = crate::tokenize::encode(tok, doc.trim(), true)?;
        if ids.len() > l {
            too_long += 1;
            continue;
        }
        if ids.is_empty() {
            continue;
        }
        stream.extend_from_slice(&ids);
        used += 1;
        if used == opts.n_samples {
            break;
        }
    }
    let mut blocks = stream.len() / l;
    if let Some(max) = opts.max_blocks {
        blocks = blocks.min(max);
    }
    if blocks == 0 {
        return Err(input_err!(
            "calibration gave {} tokens from {used} documents ({too_long} longer than --seqlen {l} were dropped): \
             fewer than one block of {l}; give more text (--calib), a larger --n-samples or a smaller --seqlen",
            stream.len()
        ));
    }
    stream.truncate(blocks * l);
    Ok(Calibration {
        summary: CalibSummary {
            source: source_label(opts),
            documents_read,
            documents_used: used,
            documents_too_long: too_long,
            blocks,
            seqlen: l,
            tokens: stream.len(),
        },
        ids: stream,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txt_splits_on_whitespace_only_lines() {
        let docs = txt_documents("a\nb\n \n\nc\n\t\nd");
        assert_eq!(docs, vec!["a\nb", "c", "d"]);
    }

    #[test]
    fn shuffle_is_portable_and_seeded() {
        let mut v: Vec<u32> = (0..10).collect();
        shuffle(&mut v, 42);
        // Fixed expectation: the same on every machine and thread count.
        let mut again: Vec<u32> = (0..10).collect();
        shuffle(&mut again, 42);
        assert_eq!(v, again);
        let mut sorted = v.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_ne!(v, (0..10).collect::<Vec<_>>());
        assert_eq!(SplitMix64::new(0).next_u64(), 0xE220_A839_7B1D_CDAF);
    }
}

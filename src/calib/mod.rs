//! Calibration data: documents from files ([`formats`]: text, JSON, JSON lines, parquet, chat
//! conversations rendered with the model's template) or Hub datasets (`org/name[:split]`),
//! selected and blocked exactly as AutoAWQ does (AWQ-SPEC §1.3, AutoAWQ `calib_data.py`):
//! shuffle (seeded, portable), strip, encode with special tokens, drop documents longer than
//! `seqlen` (or cut them into pieces with `split_long`) or empty, keep the first `n_samples`,
//! concatenate, cut into blocks of `seqlen` (tail discarded).

use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;

use crate::error::Result;
use crate::input_err;
use crate::io::source::{self, DatasetSpec};

pub mod chat;
pub mod corpus;
pub mod formats;
pub mod held_out;

pub use formats::{txt_documents, Record, SUPPORTED};

/// How calibration data is read and selected.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CalibOptions {
    /// Calibration files or Hub dataset ids (`org/name[:split]`); empty: the embedded corpus.
    pub files: Vec<PathBuf>,
    /// Field holding the text in JSON, JSON lines and parquet records.
    pub text_column: String,
    /// Samples (documents, or pieces with `split_long`) to keep: AutoAWQ's `max_calib_samples`.
    pub n_samples: usize,
    /// Block length in tokens: AutoAWQ's `max_calib_seq_len`.
    pub seqlen: usize,
    /// Shuffle seed ([`shuffle`]).
    pub seed: u64,
    /// Keep at most this many blocks (None: all).
    pub max_blocks: Option<usize>,
    /// Cut documents longer than `seqlen` tokens into pieces of at most `seqlen` (each piece
    /// counts as a sample) instead of dropping them as AutoAWQ does.
    pub split_long: bool,
}

/// What calibration used, for the plan, the report and the model card.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CalibSummary {
    /// The files, or "embedded corpus".
    pub source: String,
    /// Documents read from every input (records skipped as null not included).
    pub documents_read: usize,
    /// Records skipped because their text field was `null` (see [`formats`]).
    pub documents_skipped: usize,
    /// Samples concatenated: documents, or with `--split-long` pieces of documents (so it may
    /// exceed `documents_read`).
    pub documents_used: usize,
    /// Documents dropped as longer than `seqlen` (AutoAWQ's rule).
    pub documents_too_long: usize,
    /// Documents longer than `seqlen` cut into pieces (`--split-long`).
    pub documents_split: usize,
    /// Blocks of `seqlen` tokens kept.
    pub blocks: usize,
    /// Block length in tokens.
    pub seqlen: usize,
    /// `blocks × seqlen`.
    pub tokens: usize,
    /// Blocks held out to judge `--rounding auto` and `--clip-sides auto` ([`held_out`]):
    /// every 4th from block 3; none below 4 blocks.
    pub held_out_blocks: usize,
}

/// Token blocks `[blocks × seqlen]` (flattened) and what was used.
pub struct Calibration {
    /// The token ids, block after block.
    pub ids: Vec<u32>,
    /// What was used.
    pub summary: CalibSummary,
}

/// A document ready for the tokenizer.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub text: String,
    /// Rendered by a chat template: encoded as is, without added special tokens (the template
    /// writes them), as transformers' `apply_chat_template` does.
    pub chat: bool,
}

/// The records of all calibration inputs, in input order. A path that exists is a file; a
/// value that does not and looks like `org/name[:split]` is a Hub dataset; anything else is an
/// [`crate::error::Error::Input`] naming it. With no inputs, the embedded corpus. Records whose
/// text field is null come back as [`Record::Skipped`] (an input of nothing else is an error).
pub fn read_records(opts: &CalibOptions) -> Result<Vec<Record>> {
    if opts.files.is_empty() {
        return Ok(corpus::documents()
            .into_iter()
            .map(|(_, d)| Record::Text(d))
            .collect());
    }
    let mut records = Vec::new();
    for input in &opts.files {
        let before = records.len();
        for file in input_files(input)? {
            records.extend(formats::read_file(&file, &opts.text_column)?);
        }
        let added = &records[before..];
        if added.iter().all(|r| *r == Record::Skipped) {
            let nulls = match added.len() {
                0 => String::new(),
                1 => format!(" (1 record with a null {:?} field)", opts.text_column),
                n => format!(" ({n} records with a null {:?} field)", opts.text_column),
            };
            return Err(input_err!(
                "calibration input {} holds no documents{nulls}",
                input.display()
            ));
        }
    }
    Ok(records)
}

/// The local files behind one `--calib` value.
fn input_files(input: &Path) -> Result<Vec<PathBuf>> {
    if input.exists() {
        return Ok(vec![input.to_path_buf()]);
    }
    match input.to_str().and_then(DatasetSpec::parse) {
        Some(spec) => source::resolve_dataset(&spec),
        None => Err(input_err!(
            "calibration file {} does not exist; --calib takes {SUPPORTED}",
            input.display()
        )),
    }
}

/// All documents, conversations rendered with the chat template of the model in `model_dir`
/// (loaded only when a conversation is present); records skipped as null are left out.
pub fn load_documents(opts: &CalibOptions, model_dir: Option<&Path>) -> Result<Vec<Document>> {
    Ok(documents_and_skipped(opts, model_dir)?.0)
}

/// [`load_documents`] and the number of records skipped as null.
fn documents_and_skipped(
    opts: &CalibOptions,
    model_dir: Option<&Path>,
) -> Result<(Vec<Document>, usize)> {
    let mut template: Option<chat::ChatTemplate> = None;
    let (mut docs, mut skipped) = (Vec::new(), 0);
    for record in read_records(opts)? {
        docs.push(match record {
            Record::Skipped => {
                skipped += 1;
                continue;
            }
            Record::Text(text) => Document { text, chat: false },
            Record::Chat { messages, origin } => {
                let t = match &template {
                    Some(t) => t,
                    None => template.insert(chat::ChatTemplate::require(model_dir, &origin)?),
                };
                Document {
                    text: t.render(&messages, &origin)?,
                    chat: true,
                }
            }
        });
    }
    Ok((docs, skipped))
}

/// The documents' texts without a model (conversations are an error: they need its template).
pub fn read_documents(opts: &CalibOptions) -> Result<Vec<String>> {
    Ok(load_documents(opts, None)?
        .into_iter()
        .map(|d| d.text)
        .collect())
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
        .map(|p| match p.to_str().and_then(DatasetSpec::parse) {
            Some(spec) if !p.exists() => spec.to_string(),
            _ => p
                .file_name()
                .map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into()),
        })
        .collect();
    names.join(", ")
}

/// Documents picked for calibration and their concatenated tokens.
#[derive(Default)]
struct Selection {
    stream: Vec<u32>,
    used: usize,
    too_long: usize,
    split: usize,
}

/// Reads, shuffles, selects and blocks the calibration documents (AutoAWQ `calib_data.py`).
/// `model_dir` supplies the chat template for conversations.
pub fn build(
    tok: &Tokenizer,
    opts: &CalibOptions,
    model_dir: Option<&Path>,
) -> Result<Calibration> {
    if opts.seqlen == 0 {
        return Err(crate::error::Error::Usage(
            "--seqlen must be at least 1".into(),
        ));
    }
    let (mut docs, documents_skipped) = documents_and_skipped(opts, model_dir)?;
    let documents_read = docs.len();
    shuffle(&mut docs, opts.seed);
    let Selection {
        mut stream,
        used,
        too_long,
        split,
    } = select(tok, &docs, opts)?;
    let l = opts.seqlen;
    let mut blocks = stream.len() / l;
    if let Some(max) = opts.max_blocks {
        blocks = blocks.min(max);
    }
    if blocks == 0 {
        return Err(too_little(stream.len(), used, too_long, opts));
    }
    stream.truncate(blocks * l);
    Ok(Calibration {
        summary: CalibSummary {
            source: source_label(opts),
            documents_read,
            documents_skipped,
            documents_used: used,
            documents_too_long: too_long,
            documents_split: split,
            blocks,
            seqlen: l,
            tokens: stream.len(),
            held_out_blocks: held_out::blocks(blocks).len(),
        },
        ids: stream,
    })
}

/// The first `n_samples` non-empty documents (or pieces) of at most `seqlen` tokens.
fn select(tok: &Tokenizer, docs: &[Document], opts: &CalibOptions) -> Result<Selection> {
    let (l, mut s) = (opts.seqlen, Selection::default());
    for doc in docs {
        let ids = if doc.chat {
            crate::tokenize::encode(tok, &doc.text, false)?
        } else {
            crate::tokenize::encode(tok, doc.text.trim(), true)?
        };
        if ids.len() > l && !opts.split_long {
            s.too_long += 1;
            continue;
        }
        s.split += usize::from(ids.len() > l);
        for piece in ids.chunks(l) {
            s.stream.extend_from_slice(piece);
            s.used += 1;
            if s.used == opts.n_samples {
                return Ok(s);
            }
        }
    }
    Ok(s)
}

/// The error for calibration text that fills no block, with the fix that applies.
fn too_little(
    tokens: usize,
    used: usize,
    too_long: usize,
    opts: &CalibOptions,
) -> crate::error::Error {
    let l = opts.seqlen;
    if used == 0 && too_long > 0 {
        return input_err!(
            "all {too_long} calibration documents are longer than --seqlen {l} tokens and were dropped \
             (AutoAWQ drops long documents); pass a larger --seqlen, or --split-long to cut them into pieces"
        );
    }
    let fix = if too_long > 0 {
        "--split-long to keep the long documents"
    } else {
        "a smaller --seqlen"
    };
    input_err!(
        "calibration gave {tokens} tokens from {used} documents ({too_long} longer than --seqlen {l} were dropped): \
         fewer than one block of {l}; give more text (--calib), a larger --n-samples, or {fix}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txt_splits_on_whitespace_only_lines() {
        let docs = txt_documents("a\nb\n \n\nc\n\t\nd");
        assert_eq!(docs, vec!["a\nb", "c", "d"]);
    }

    fn word_tokenizer() -> Tokenizer {
        let vocab: serde_json::Map<String, serde_json::Value> =
            (0..8).map(|i| (format!("w{i}"), i.into())).collect();
        let json = serde_json::json!({"version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [], "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}});
        json.to_string().parse().unwrap()
    }

    fn options(file: PathBuf, split_long: bool) -> CalibOptions {
        CalibOptions {
            files: vec![file],
            text_column: "text".into(),
            n_samples: 128,
            seqlen: 4,
            seed: 1,
            max_blocks: None,
            split_long,
        }
    }

    #[test]
    fn long_documents_are_dropped_or_split() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.txt");
        std::fs::write(&file, "w1 w2 w3 w4 w5 w6\n\nw1 w2 w3 w4 w5 w6 w7").unwrap();
        let tok = word_tokenizer();
        let err = build(&tok, &options(file.clone(), false), None)
            .err()
            .unwrap();
        let msg = err.to_string();
        assert!(matches!(err, crate::error::Error::Input(_)));
        assert!(
            msg.contains("all 2")
                && msg.contains("larger --seqlen")
                && msg.contains("--split-long"),
            "{msg}"
        );
        let cal = build(&tok, &options(file, true), None).unwrap();
        let s = &cal.summary;
        assert_eq!(
            (s.documents_split, s.documents_used, s.tokens, s.blocks),
            (2, 4, 12, 3)
        );
    }

    #[test]
    fn missing_inputs_are_named() {
        let err = read_documents(&options("/no/such/calib.jsonl".into(), false)).unwrap_err();
        assert!(
            err.to_string()
                .contains("/no/such/calib.jsonl does not exist"),
            "{err}"
        );
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

//! Loading `tokenizer.json` and encoding text with clear errors.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::error::Result;
use crate::input_err;

pub fn load(dir: &Path) -> Result<Tokenizer> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        return Err(missing_tokenizer(dir));
    }
    Tokenizer::from_file(&path)
        .map_err(|e| input_err!("{} is not a valid tokenizer: {e}", path.display()))
}

/// The error for a model directory without `tokenizer.json`: what it has instead and how to
/// get the fast tokenizer (transformers converts a slow one when it loads it).
fn missing_tokenizer(dir: &Path) -> crate::error::Error {
    let slow: Vec<&str> = [
        "tokenizer.model",
        "vocab.json",
        "tiktoken.model",
        "vocab.txt",
    ]
    .into_iter()
    .filter(|f| dir.join(f).is_file())
    .collect();
    let found = if slow.is_empty() {
        "no tokenizer file at all".to_string()
    } else {
        format!("only {} (a slow tokenizer)", slow.join(", "))
    };
    input_err!(
        "{} is missing ({found}); awq needs the fast tokenizer tokenizer.json. Write it with \
         transformers: python -c \"from transformers import AutoTokenizer as T; \
         T.from_pretrained('{d}').save_pretrained('{d}')\" (it converts a slow tokenizer), \
         or copy tokenizer.json from the base model's repository",
        dir.join("tokenizer.json").display(),
        d = dir.display()
    )
}

/// Token ids of `text`; `special` adds the tokenizer's special tokens (BOS etc.) as
/// transformers' `encode(..., add_special_tokens=True)` would.
pub fn encode(tok: &Tokenizer, text: &str, special: bool) -> Result<Vec<u32>> {
    let enc = tok
        .encode_fast(text, special)
        .map_err(|e| crate::error::Error::Runtime(format!("tokenization failed: {e}")))?;
    Ok(enc.get_ids().to_vec())
}

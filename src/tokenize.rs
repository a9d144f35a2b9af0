//! Loading `tokenizer.json` and encoding text with clear errors.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::error::Result;
use crate::input_err;

pub fn load(dir: &Path) -> Result<Tokenizer> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        return Err(input_err!(
            "{} is missing; the model directory needs a fast tokenizer (tokenizer.json)",
            path.display()
        ));
    }
    Tokenizer::from_file(&path)
        .map_err(|e| input_err!("{} is not a valid tokenizer: {e}", path.display()))
}

/// Token ids of `text`; `special` adds the tokenizer's special tokens (BOS etc.) as
/// transformers' `encode(..., add_special_tokens=True)` would.
pub fn encode(tok: &Tokenizer, text: &str, special: bool) -> Result<Vec<u32>> {
    let enc = tok
        .encode_fast(text, special)
        .map_err(|e| crate::error::Error::Runtime(format!("tokenization failed: {e}")))?;
    Ok(enc.get_ids().to_vec())
}

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
    if dir.join("tiktoken.model").is_file() {
        return tiktoken_only(dir);
    }
    let slow: Vec<&str> = [
        "tokenizer.model",
        "vocab.json",
        "tiktoken.model",
        "vocab.txt",
    ]
    .into_iter()
    .filter(|f| dir.join(f).is_file())
    .collect();
    if slow.is_empty() {
        return input_err!(
            "{} is missing and {d} holds no tokenizer file at all; awq needs the fast tokenizer \
             tokenizer.json: copy it (with tokenizer_config.json) from the base model's \
             repository into {d}",
            dir.join("tokenizer.json").display(),
            d = dir.display()
        );
    }
    let found = format!("only {} (a slow tokenizer)", slow.join(", "));
    input_err!(
        "{} is missing ({found}); awq needs the fast tokenizer tokenizer.json. Convert it once \
         with transformers into a scratch directory and copy only tokenizer.json into {d} \
         (saving into {d} itself would rewrite its tokenizer_config.json): python -c \"from \
         transformers import AutoTokenizer as T; \
         T.from_pretrained('{d}').save_pretrained('/tmp/awq-tokenizer')\" && cp \
         /tmp/awq-tokenizer/tokenizer.json {d}/ — or copy tokenizer.json from the base \
         model's repository",
        dir.join("tokenizer.json").display(),
        d = dir.display()
    )
}

/// Kimi K2 ships a tiktoken vocabulary with a remote-code tokenizer class (`tokenization_kimi.py`)
/// and no `tokenizer.json`; transformers' generic conversion would use the wrong split pattern
/// and special-token ids, and awq runs no remote code. The fix: convert it once with
/// transformers' `TikTokenConverter`, keeping the class's own pattern and special tokens.
fn tiktoken_only(dir: &Path) -> crate::error::Error {
    input_err!(
        "{} is missing: {d} has only tiktoken.model, a tiktoken tokenizer that transformers reads \
         only with remote code (Kimi K2's tokenization_kimi.py); awq runs no remote code and \
         needs tokenizer.json. Convert it once into a scratch directory, keeping the model's own \
         split pattern and special tokens, then copy only tokenizer.json into {d} (saving into \
         {d} itself would rewrite its tokenizer_config.json). With transformers 4.x and \
         tiktoken installed (this runs the model's code: read it first): python -c \"from \
         transformers import AutoTokenizer as A, PreTrainedTokenizerFast as F; from \
         transformers.convert_slow_tokenizer import TikTokenConverter as C; s = \
         A.from_pretrained('{d}', trust_remote_code=True); sp = [t for t, _ in \
         sorted(s.special_tokens.items(), key=lambda x: x[1])]; \
         F(tokenizer_object=C(vocab_file=s.vocab_file, pattern=s.pat_str, \
         additional_special_tokens=sp).converted()).save_pretrained('/tmp/kimi-tokenizer')\" && \
         cp /tmp/kimi-tokenizer/tokenizer.json {d}/ — then compare its ids with s.encode on a \
         mixed-language text before quantizing",
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

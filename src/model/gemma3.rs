//! `Gemma3ForCausalLM` (the text model): Gemma 2's layout plus `(1 + w)` RMSNorms on each q and
//! k head; every `sliding_window_pattern`-th layer is global and uses `rope_theta` with
//! `rope_scaling`, the others slide and use `rope_local_base_freq` unscaled
//! (transformers `modeling_gemma3.py`).

use super::arch::Block;
use super::config::{HfConfig, ModelSpec};
use crate::error::Result;
use crate::input_err;

pub const ARCHITECTURE: &str = "Gemma3ForCausalLM";
pub const MODEL_TYPE: &str = "gemma3_text";

/// transformers `Gemma3TextConfig.__init__` defaults for the keys we read: what a wrapped
/// model's `text_config` may leave out (Gemma 3 4B's omits heads, `head_dim`, `vocab_size` and
/// `rope_theta`), read as transformers reads it.
pub const CONFIG_DEFAULTS: &str = r#"{
    "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216,
    "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
    "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0, "query_pre_attn_scalar": 256, "sliding_window": 4096,
    "sliding_window_pattern": 6, "final_logit_softcapping": null,
    "attn_logit_softcapping": null, "attention_bias": false, "tie_word_embeddings": true
}"#;

pub fn spec(cfg: &HfConfig) -> Result<ModelSpec> {
    let mut spec = super::gemma::gemma_base(cfg)?;
    spec.block = Block::Sandwich;
    spec.qk_norm = true;
    spec.attn_scale = cfg.query_pre_attn_scalar.unwrap_or(256.0).powf(-0.5);
    spec.attn_softcap = cfg.attn_logit_softcapping.flatten();
    spec.final_softcap = cfg.final_logit_softcapping.flatten();
    spec.sliding_window = cfg.window()?.or(Some(4096));
    spec.local_rope_theta = Some(cfg.rope_local_base_freq.unwrap_or(10_000.0));
    spec.sliding_layers = Some(match cfg.sliding_from_layer_types()? {
        Some(layers) => layers,
        None => {
            let pattern = cfg.sliding_window_pattern.unwrap_or(6);
            if pattern == 0 {
                return Err(input_err!(
                    "config.json: sliding_window_pattern must be positive"
                ));
            }
            // `is_sliding = bool((layer_idx + 1) % sliding_window_pattern)`.
            (0..spec.layers).map(|i| (i + 1) % pattern != 0).collect()
        }
    });
    Ok(spec)
}

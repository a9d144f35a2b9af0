//! Where the text decoder's tensors live in a checkpoint.
//!
//! A causal LM stores `model.embed_tokens`, `model.layers.N.*`, `model.norm` and `lm_head`. The
//! same decoder inside a vision-language wrapper sits under another root:
//! `language_model.model.*` and `language_model.lm_head` in the original Hub releases, or
//! `model.language_model.*` and `lm_head` under transformers' own module names. Every tensor
//! name is composed from these two roots (as candle's `vb.pp("model.layers")` composes them),
//! so a wrapped model is a different root, not a second set of literals.

/// The two prefixes every text-decoder tensor name is built from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Roots {
    /// Prefix of `embed_tokens`, `layers.N` and `norm`: `model`, `language_model.model` or
    /// `model.language_model`.
    pub decoder: String,
    /// The output head's module: `lm_head` or `language_model.lm_head`.
    pub head: String,
}

impl Default for Roots {
    /// A causal LM's: `model.*` and `lm_head`.
    fn default() -> Self {
        Self::new("model", "lm_head")
    }
}

impl Roots {
    pub fn new(decoder: &str, head: &str) -> Self {
        Self {
            decoder: decoder.to_string(),
            head: head.to_string(),
        }
    }

    /// Decoder layer `i`'s module, e.g. `model.layers.3`.
    pub fn layer(&self, i: usize) -> String {
        format!("{}.layers.{i}", self.decoder)
    }

    /// The decoder layer index a tensor name belongs to, if any (`model.layers.3.mlp…` → 3).
    pub fn layer_of(&self, name: &str) -> Option<usize> {
        name.strip_prefix(&self.decoder)?
            .strip_prefix(".layers.")?
            .split('.')
            .next()?
            .parse()
            .ok()
    }

    /// The token embedding `[vocab, hidden]`.
    pub fn embed(&self) -> String {
        format!("{}.embed_tokens.weight", self.decoder)
    }

    /// The final norm's module (its tensors are `.weight` and, for LayerNorms, `.bias`).
    pub fn final_norm(&self) -> String {
        format!("{}.norm", self.decoder)
    }

    /// The untied head's weight `[vocab, hidden]`.
    pub fn head_weight(&self) -> String {
        format!("{}.weight", self.head)
    }

    /// Whether `name` is a text-decoder tensor (under the decoder root, or the head's).
    pub fn owns(&self, name: &str) -> bool {
        let under = |root: &str| {
            name.strip_prefix(root)
                .is_some_and(|rest| rest.starts_with('.'))
        };
        under(&self.decoder) || under(&self.head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_compose_from_the_roots() {
        let hub = Roots::new("language_model.model", "language_model.lm_head");
        assert_eq!(hub.layer(2), "language_model.model.layers.2");
        assert_eq!(hub.embed(), "language_model.model.embed_tokens.weight");
        assert_eq!(hub.final_norm(), "language_model.model.norm");
        assert_eq!(hub.head_weight(), "language_model.lm_head.weight");
        assert_eq!(
            hub.layer_of("language_model.model.layers.12.mlp.up_proj.weight"),
            Some(12)
        );
        assert_eq!(hub.layer_of("model.layers.12.mlp.up_proj.weight"), None);
        assert!(hub.owns("language_model.lm_head.weight"));
        assert!(!hub.owns("vision_tower.vision_model.post_layernorm.weight"));
        let plain = Roots::default();
        assert_eq!(plain.layer(0), "model.layers.0");
        assert!(plain.owns("model.norm.weight"));
        // `model.language_model…` is not under `model.layers…`-style ownership by accident:
        // it is under `model`, which is why a wrapped module layout has its own root.
        assert!(!plain.owns("modelx.norm.weight"));
    }
}

//! Rotary position tables, computed in f32 the way transformers does (`inv_freq` in f32, angle =
//! position × inv_freq in f32), so positions match the reference to the last bits that matter.

use candle_core::{Device, Tensor};

use super::config::{ModelSpec, RopeKind};
use crate::error::Result;

pub struct Rope {
    /// `[max_len, head_dim / 2]`
    pub cos: Tensor,
    pub sin: Tensor,
}

/// Inverse frequencies, adjusted by the configured scaling (transformers' `rope_init_fn`s).
pub fn inv_freq(spec: &ModelSpec) -> Vec<f32> {
    let dim = spec.head_dim;
    let base = spec.rope_theta as f32;
    let raw = (0..dim / 2).map(|i| 1.0f32 / base.powf((2 * i) as f32 / dim as f32));
    match spec.rope {
        RopeKind::Default => raw.collect(),
        RopeKind::Linear { factor } => raw.map(|f| f / factor as f32).collect(),
        RopeKind::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max,
        } => {
            let old = original_max as f64;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            raw.map(|f| {
                let f = f as f64;
                let wavelen = 2.0 * std::f64::consts::PI / f;
                let adjusted = if wavelen < high_wavelen {
                    f
                } else if wavelen > low_wavelen {
                    f / factor
                } else {
                    let smooth =
                        (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * f / factor + smooth * f
                };
                adjusted as f32
            })
            .collect()
        }
    }
}

impl Rope {
    pub fn new(spec: &ModelSpec, max_len: usize) -> Result<Self> {
        let inv = inv_freq(spec);
        let half = inv.len();
        let mut cos = Vec::with_capacity(max_len * half);
        let mut sin = Vec::with_capacity(max_len * half);
        for pos in 0..max_len {
            for &f in &inv {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (max_len, half), &Device::Cpu)?,
            sin: Tensor::from_vec(sin, (max_len, half), &Device::Cpu)?,
        })
    }

    /// Tables for the first `len` positions.
    pub fn prefix(&self, len: usize) -> Result<(Tensor, Tensor)> {
        Ok((
            self.cos.narrow(0, 0, len)?.contiguous()?,
            self.sin.narrow(0, 0, len)?.contiguous()?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::HfConfig;

    fn spec(rope_scaling: serde_json::Value) -> ModelSpec {
        let cfg: HfConfig = serde_json::from_value(serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 512,
            "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 8,
            "rope_theta": 500000.0, "rope_scaling": rope_scaling
        }))
        .unwrap();
        cfg.base_spec(false).unwrap()
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let plain = inv_freq(&spec(serde_json::Value::Null));
        let scaled = inv_freq(&spec(serde_json::json!({
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192
        })));
        // Wavelength below 8192/4 = 2048: unchanged.
        assert_eq!(plain[0], scaled[0]);
        // Wavelength above 8192: divided by the factor.
        let last = plain.len() - 1;
        assert!((scaled[last] - plain[last] / 8.0).abs() <= 1e-6 * plain[last]);
        // In between: strictly between the two.
        for (p, s) in plain.iter().zip(&scaled) {
            assert!(*s <= *p && *s >= p / 8.0 * (1.0 - 1e-6));
        }
    }

    #[test]
    fn unknown_rope_type_is_an_input_error() {
        let cfg: HfConfig = serde_json::from_value(serde_json::json!({
            "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "vocab_size": 8, "rope_scaling": {"type": "yarn", "factor": 2.0}
        }))
        .unwrap();
        let err = cfg.base_spec(false).unwrap_err().to_string();
        assert!(err.contains("yarn"), "{err}");
    }
}

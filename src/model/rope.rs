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
                    let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
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

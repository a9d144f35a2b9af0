//! Rotary position tables, computed in f32 the way transformers does (`inv_freq` in f32, angle =
//! position × inv_freq in f32), so positions match the reference to the last bits that matter.

use super::config::{ModelSpec, RopeKind};
use crate::error::Result;

pub struct Rope {
    /// `[max_len, rotary_dim / 2]` row-major, already multiplied by [`attention_scaling`].
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    /// The tables of the sliding layers when they use their own base (Gemma 3's
    /// `rope_local_base_freq`, unscaled).
    pub local: Option<Box<Rope>>,
}

/// `theta^(2i / dim)` for `i < dim / 2`, in f32 as transformers computes it (positions per radian).
fn wavelength_terms(theta: f64, dim: usize) -> impl Iterator<Item = f32> {
    let base = theta as f32;
    (0..dim / 2).map(move |i| base.powf((2 * i) as f32 / dim as f32))
}

/// Inverse frequencies in radians per position, adjusted by the configured scaling
/// (transformers' `rope_init_fn`s in `modeling_rope_utils`), for sequences of `seq_len` positions.
///
/// Only `dynamic` and `longrope` depend on `seq_len`. transformers re-derives their frequencies
/// from the longest position it has seen; every sequence we run has the length the tables are
/// built for, so `seq_len` is that length ([`Rope::new`]'s `max_len`).
pub fn inv_freq(spec: &ModelSpec, seq_len: usize) -> Vec<f32> {
    let dim = spec.rotary_dim;
    let raw = wavelength_terms(spec.rope_theta, dim).map(|p| 1.0f32 / p);
    match &spec.rope {
        RopeKind::Default | RopeKind::Multimodal { .. } => raw.collect(),
        RopeKind::Linear { factor } => raw.map(|f| f / *factor as f32).collect(),
        &RopeKind::Llama3 {
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
        &RopeKind::Yarn {
            factor,
            original_max,
            beta_fast,
            beta_slow,
            truncate,
            ..
        } => {
            // The dimension (fractional) at which a frequency turns `rotations` times over the
            // original context (transformers' find_correction_dim), in f64 as Python does.
            let dim_f = dim as f64;
            let correction_dim = |rotations: f64| {
                dim_f * (original_max as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln()
                    / (2.0 * spec.rope_theta.ln())
            };
            let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
            if truncate {
                (low, high) = (low.floor(), high.ceil());
            }
            let low = low.max(0.0);
            let mut high = high.min(dim_f - 1.0);
            if low == high {
                high += 0.001; // transformers' guard against a zero-width ramp
            }
            let (low32, span32) = (low as f32, (high - low) as f32);
            wavelength_terms(spec.rope_theta, dim)
                .enumerate()
                .map(|(i, p)| {
                    let extrapolated = 1.0 / p;
                    let interpolated = 1.0 / (factor as f32 * p);
                    let ramp = ((i as f32 - low32) / span32).clamp(0.0, 1.0);
                    let keep = 1.0 - ramp;
                    interpolated * (1.0 - keep) + extrapolated * keep
                })
                .collect()
        }
        &RopeKind::Dynamic {
            factor,
            max_position_embeddings,
        } => {
            // transformers: seq_len = max(seq_len, max_position_embeddings), then
            // base * (factor * seq_len / max - (factor - 1)) ^ (dim / (dim - 2)), in f64.
            let max = max_position_embeddings as f64;
            let len = (seq_len as f64).max(max);
            let dim_f = dim as f64;
            let base =
                spec.rope_theta * (factor * len / max - (factor - 1.0)).powf(dim_f / (dim_f - 2.0));
            wavelength_terms(base, dim).map(|p| 1.0 / p).collect()
        }
        RopeKind::LongRope {
            short_factor,
            long_factor,
            original_max,
            ..
        } => {
            let ext = if seq_len > *original_max {
                long_factor
            } else {
                short_factor
            };
            wavelength_terms(spec.rope_theta, dim)
                .zip(ext)
                .map(|(p, &e)| 1.0 / (e as f32 * p))
                .collect()
        }
    }
}

/// transformers' `attention_scaling`, the factor cos and sin are multiplied by: the resolved
/// `attention_factor` for `yarn` and `longrope`, 1 for every other type.
pub fn attention_scaling(spec: &ModelSpec) -> f32 {
    match spec.rope {
        RopeKind::Yarn {
            attention_factor, ..
        }
        | RopeKind::LongRope {
            attention_factor, ..
        } => attention_factor as f32,
        _ => 1.0,
    }
}

/// `position × inv_freq` in f32, `[positions, inv.len()]` row-major (transformers'
/// `inv_freq_expanded @ position_ids_expanded`).
fn angles(positions: &[f32], inv: &[f32]) -> Vec<f32> {
    positions
        .iter()
        .flat_map(|&p| inv.iter().map(move |&f| p * f))
        .collect()
}

/// Multimodal rope angles (transformers `Qwen2_5_VLRotaryEmbedding` and
/// `apply_multimodal_rotary_pos_emb`): the angles are computed for each of the three position
/// streams (temporal, height, width), and frequency `j` takes stream `k`'s angle when `j` falls
/// in the `k`-th run of `section` (`[16, 24, 24]` in Qwen2.5-VL 7B; the same split applies to
/// both halves of the rotated features).
///
/// With text alone the three streams are the same positions, so every frequency reads the same
/// angle it would in plain rope and the tables equal plain rope's bit for bit (unit test
/// `mrope_on_text_is_plain_rope`; the golden forward of `arch/qwen2_5_vl`). That is all this
/// implementation claims: image and video positions are never fed to it.
pub fn mrope_angles(streams: [&[f32]; 3], inv: &[f32], section: &[usize]) -> Vec<f32> {
    let per_stream = streams.map(|s| angles(s, inv));
    let stream_of: Vec<usize> = section
        .iter()
        .enumerate()
        .flat_map(|(k, &n)| std::iter::repeat_n(k, n))
        .collect();
    let half = inv.len();
    (0..streams[0].len() * half)
        .map(|i| per_stream[stream_of[i % half]][i])
        .collect()
}

impl Rope {
    /// cos and sin tables for positions `0..max_len`, scaled by [`attention_scaling`]. The
    /// sequence-length-dependent types (`dynamic`, `longrope`) are resolved for `max_len`.
    pub fn new(spec: &ModelSpec, max_len: usize) -> Result<Self> {
        let inv = inv_freq(spec, max_len);
        let scale = attention_scaling(spec);
        let positions: Vec<f32> = (0..max_len).map(|p| p as f32).collect();
        let angles = match &spec.rope {
            // Text only: the temporal, height and width streams are all the token position.
            RopeKind::Multimodal { section } => {
                mrope_angles([&positions, &positions, &positions], &inv, section)
            }
            _ => angles(&positions, &inv),
        };
        // × 1.0 is exact, so unscaled types keep their tables bit for bit.
        let cos = angles.iter().map(|a| a.cos() * scale).collect();
        let sin = angles.iter().map(|a| a.sin() * scale).collect();
        let local = match spec.local_rope_theta {
            Some(theta) => {
                let local_spec = ModelSpec {
                    rope_theta: theta,
                    rope: RopeKind::Default,
                    local_rope_theta: None,
                    ..spec.clone()
                };
                Some(Box::new(Self::new(&local_spec, max_len)?))
            }
            None => None,
        };
        Ok(Self { cos, sin, local })
    }

    /// The (cos, sin) tables for a global layer, or for a sliding layer that uses the local base.
    pub fn tables(&self, local: bool) -> (&[f32], &[f32]) {
        match (&self.local, local) {
            (Some(l), true) => (&l.cos, &l.sin),
            _ => (&self.cos, &self.sin),
        }
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
    fn mrope_on_text_is_plain_rope() {
        let mut mrope = spec(serde_json::json!({"type": "mrope", "mrope_section": [16, 24, 24]}));
        assert_eq!(
            mrope.rope,
            RopeKind::Multimodal {
                section: vec![16, 24, 24]
            }
        );
        let plain = Rope::new(&spec(serde_json::Value::Null), 300).unwrap();
        let text = Rope::new(&mrope, 300).unwrap();
        assert_eq!(plain.cos, text.cos);
        assert_eq!(plain.sin, text.sin);
        // The streams do matter when they differ: the section decides which one a frequency
        // reads.
        let inv = inv_freq(&mrope, 4);
        let (t, h, w) = ([0.0, 1.0], [0.0, 2.0], [0.0, 3.0]);
        let a = mrope_angles([&t, &h, &w], &inv, &[16, 24, 24]);
        assert_eq!(a[64 + 15], inv[15]);
        assert_eq!(a[64 + 16], 2.0 * inv[16]);
        assert_eq!(a[64 + 63], 3.0 * inv[63]);
        // transformers 5 writes rope_type "default" beside type "mrope".
        mrope = spec(serde_json::json!({"rope_type": "default", "type": "mrope",
            "mrope_section": [16, 24, 24]}));
        assert!(matches!(mrope.rope, RopeKind::Multimodal { .. }));
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let plain = inv_freq(&spec(serde_json::Value::Null), 0);
        let scaled = inv_freq(
            &spec(serde_json::json!({
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192
            })),
            0,
        );
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
            "num_attention_heads": 2, "vocab_size": 8, "rope_scaling": {"type": "proportional", "factor": 2.0}
        }))
        .unwrap();
        let err = cfg.base_spec(false).unwrap_err().to_string();
        assert!(err.contains("proportional"), "{err}");
    }

    /// What transformers refuses is refused, naming the field: no type, a required key
    /// missing, a number written as a string. Where transformers fills a default, so do we.
    #[test]
    fn rope_scaling_that_transformers_refuses_is_refused_naming_the_field() {
        use crate::model::config::check_rope_scaling;
        let check = |rs: serde_json::Value| {
            check_rope_scaling(&serde_json::json!({ "rope_scaling": rs }))
                .map_err(|e| e.to_string())
        };
        for (rs, needle) in [
            (serde_json::json!({"factor": 8.0}), "no \"rope_type\""),
            (serde_json::json!({}), "no \"rope_type\""),
            (
                serde_json::json!({"rope_type": "llama3", "factor": 8.0}),
                "needs \"low_freq_factor\"",
            ),
            (
                serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}),
                "needs \"high_freq_factor\"",
            ),
            (serde_json::json!({"type": "linear"}), "needs \"factor\""),
            (
                serde_json::json!({"type": "linear", "factor": "2.0"}),
                "rope_scaling.factor is \"2.0\", not a number",
            ),
            (
                serde_json::json!({"rope_type": "longrope", "short_factor": [1.0]}),
                "needs \"long_factor\"",
            ),
            (serde_json::json!("linear"), "must be an object"),
        ] {
            let err = check(rs.clone()).expect_err(&rs.to_string());
            assert!(err.contains(needle), "{rs}: {err}");
        }
        assert!(check(serde_json::json!({"rope_type": "yarn", "factor": 4.0})).is_ok());
        assert!(check_rope_scaling(&serde_json::json!({"rope_scaling": null})).is_ok());
        // llama3 without original_max_position_embeddings: max_position_embeddings, as
        // transformers 5 fills it.
        let filled = small_spec(serde_json::json!({"max_position_embeddings": 4096,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0}}));
        let given = small_spec(serde_json::json!({"max_position_embeddings": 4096,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 4096}}));
        assert_eq!(filled.rope, given.rope);
    }

    /// transformers 5 writes `rope_parameters` (theta inside) instead of `rope_scaling`.
    #[test]
    fn a_flat_rope_parameters_stands_in_for_rope_scaling_and_theta() {
        let mut raw = serde_json::json!({"rope_parameters":
            {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0}});
        crate::model::config::rope_parameters_as_scaling(&mut raw);
        assert_eq!(raw["rope_theta"], 50000.0);
        assert_eq!(raw["rope_scaling"]["rope_type"], "linear");
        // Per-layer-type dicts (Gemma 3 in transformers 5): the global layers' settings and
        // the sliding layers' base; explicit top-level values win.
        let mut raw = serde_json::json!({"rope_theta": 1.0, "rope_parameters":
            {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 7.0},
             "sliding_attention": {"rope_type": "default", "rope_theta": 3.0}}});
        crate::model::config::rope_parameters_as_scaling(&mut raw);
        assert_eq!(raw["rope_theta"], 1.0);
        assert_eq!(raw["rope_scaling"]["factor"], 8.0);
        assert_eq!(raw["rope_local_base_freq"], 3.0);
    }

    /// head_dim 16 (8 frequencies), theta 10000, plus `extra` top-level keys.
    fn small_spec(extra: serde_json::Value) -> ModelSpec {
        let mut v = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 8,
            "rope_theta": 10000.0
        });
        for (k, val) in extra.as_object().unwrap() {
            v[k] = val.clone();
        }
        serde_json::from_value::<HfConfig>(v)
            .unwrap()
            .base_spec(false)
            .unwrap()
    }

    fn assert_close(got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let rel = ((*g as f64) - w).abs() / w.abs();
            assert!(rel <= 2e-6, "index {i}: got {g}, want {w}");
        }
    }

    /// 10000^(-2i/16), i = 0..8: the unscaled frequencies (python3 math, float64).
    const PLAIN: [f64; 8] = [
        1.0,
        0.31622776601683794,
        0.1,
        0.03162277660168379,
        0.01,
        0.0031622776601683794,
        0.001,
        0.00031622776601683794,
    ];

    #[test]
    fn yarn_ramps_between_kept_and_interpolated_frequencies() {
        let spec = small_spec(serde_json::json!({
            "max_position_embeddings": 8192,
            "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                             "original_max_position_embeddings": 2048}
        }));
        // Expected values: transformers' _compute_yarn_parameters re-done in python3 float64 with
        // the math module: correction range floor(2.016) = 2 .. ceil(5.026) = 6 for beta 32 / 1,
        // ramp (i - 2) / 4 clamped to [0, 1], inv = interp * ramp + extrap * (1 - ramp);
        // attention factor 0.1 * ln(4) + 1.
        let want = [
            1.0,
            0.31622776601683794,
            0.1,
            0.02569350598886808,
            0.00625,
            0.0013834964763236657,
            0.00025,
            7.905694150420948e-05,
        ];
        assert_close(&inv_freq(&spec, 16), &want);
        let af = 1.138629436111989;
        assert!((attention_scaling(&spec) as f64 - af).abs() < 1e-6);
        // cos and sin carry the attention factor: position 0 is (af, 0), position 1 is
        // af * (cos 1, sin 1) for the first frequency.
        let rope = Rope::new(&spec, 2).unwrap();
        let half = rope.cos.len() / 2; // two positions
        let row = |t: &[f32], p: usize| t[p * half..][..half].to_vec();
        let cos = [row(&rope.cos, 0), row(&rope.cos, 1)];
        let sin = [row(&rope.sin, 0), row(&rope.sin, 1)];
        assert!((cos[0][3] as f64 - af).abs() < 1e-6 && sin[0][3] == 0.0);
        assert!((cos[1][0] as f64 - af * 1f64.cos()).abs() < 1e-6);
        assert!((sin[1][0] as f64 - af * 1f64.sin()).abs() < 1e-6);
    }

    #[test]
    fn yarn_untruncated_range_and_mscale_attention_factor() {
        // No original_max_position_embeddings in rope_scaling: falls back to
        // max_position_embeddings (2048).
        let spec = small_spec(serde_json::json!({
            "max_position_embeddings": 2048,
            "rope_scaling": {"type": "yarn", "factor": 4.0, "truncate": false,
                             "mscale": 1.0, "mscale_all_dim": 0.5}
        }));
        // python3 float64: range 2.0160002112515443 .. 5.026300167891356 (not rounded);
        // attention factor (0.1 * 1.0 * ln 4 + 1) / (0.1 * 0.5 * ln 4 + 1).
        let want = [
            1.0,
            0.31622776601683794,
            0.1,
            0.023870192321736323,
            0.005056971521129435,
            0.0008112903817014309,
            0.00025,
            7.905694150420948e-05,
        ];
        assert_close(&inv_freq(&spec, 16), &want);
        assert!((attention_scaling(&spec) as f64 - 1.0648216253695715).abs() < 1e-6);
    }

    #[test]
    fn dynamic_ntk_grows_the_base_beyond_max_position_embeddings() {
        let spec = small_spec(serde_json::json!({
            "max_position_embeddings": 1024,
            "rope_scaling": {"type": "dynamic", "factor": 2.0}
        }));
        // Up to max_position_embeddings the frequencies are the plain ones.
        assert_close(&inv_freq(&spec, 1024), &PLAIN);
        // seq_len 4096: base = 10000 * (2 * 4096 / 1024 - 1) ^ (16 / 14) = 92432.84734292865,
        // inv = base^(-2i/16) (python3 math, float64).
        let want = [
            1.0,
            0.2394813560059838,
            0.05735131987446476,
            0.013734571852269752,
            0.003289173891343177,
            0.0007876958236383426,
            0.00018863846396516057,
            4.517539514526257e-05,
        ];
        assert_close(&inv_freq(&spec, 4096), &want);
        assert_eq!(attention_scaling(&spec), 1.0);
    }

    #[test]
    fn longrope_picks_short_or_long_factors_by_sequence_length() {
        // Phi-3 layout: original_max_position_embeddings at the top level, no factor.
        let spec = small_spec(serde_json::json!({
            "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
            "rope_scaling": {"type": "longrope",
                "short_factor": [1.0, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0],
                "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 24.0, 32.0, 48.0]}
        }));
        // python3 float64: inv = 1 / (ext_i * 10000^(2i/16)); attention factor
        // sqrt(1 + ln(131072 / 4096) / ln(4096)).
        let short = [
            1.0,
            0.31622776601683794,
            0.08,
            0.021081851067789197,
            0.005,
            0.0012649110640673518,
            0.0003333333333333333,
            7.905694150420948e-05,
        ];
        let long = [
            1.0,
            0.15811388300841897,
            0.025,
            0.003952847075210474,
            0.000625,
            0.00013176156917368246,
            3.125e-05,
            6.588078458684123e-06,
        ];
        assert_close(&inv_freq(&spec, 4096), &short);
        assert_close(&inv_freq(&spec, 4097), &long);
        assert!((attention_scaling(&spec) as f64 - 1.1902380714238083).abs() < 1e-6);
        let rope = Rope::new(&spec, 1).unwrap();
        let cos0 = rope.cos[0] as f64;
        assert!((cos0 - 1.1902380714238083).abs() < 1e-6);
    }

    #[test]
    fn longrope_explicit_factor_wins_over_the_length_ratio() {
        // Current transformers keeps a configured `factor`: sqrt(1 + ln 8 / ln 4096)
        // = 1.118033988749895 (python3 math).
        let spec = small_spec(serde_json::json!({
            "max_position_embeddings": 131072,
            "rope_scaling": {"rope_type": "longrope", "factor": 8.0,
                "original_max_position_embeddings": 4096,
                "short_factor": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                "long_factor": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]}
        }));
        assert!((attention_scaling(&spec) as f64 - 1.118033988749895).abs() < 1e-6);
        assert_close(&inv_freq(&spec, 16), &PLAIN);
    }
}

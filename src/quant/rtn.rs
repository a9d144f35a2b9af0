//! Round-to-nearest asymmetric INT4 quantization with a zero point per group (AWQ-SPEC §7.1).
//!
//! [`quantize_f16`] reproduces AutoAWQ bit for bit: AutoAWQ computes scales, zeros and codes in
//! float16 tensors, and torch evaluates each float16 op in f32 and rounds the result to f16, so
//! we do exactly that (golden/README.md, "Reproducing AutoAWQ's quantization bit-exactly").
//! [`fake_quantize`] is the f32 quantize→dequantize used inside the searches.
//!
//! All loops are plain slices: 4–6× faster here than chained tensor ops.

use half::f16;
use rayon::prelude::*;

/// 2^4 − 1.
pub const QMAX: f32 = 15.0;

/// Codes, zeros and scales of one linear, `[out, in]` / `[out, in/g]` row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized {
    pub rows: usize,
    pub cols: usize,
    pub group: usize,
    pub codes: Vec<u8>,
    pub zeros: Vec<u8>,
    pub scales: Vec<f16>,
}

impl Quantized {
    /// All codes, zero points and scales zero, for an unpacker to fill: `[rows, cols]` in
    /// groups of `group` (which divides `cols`).
    pub fn zeroed(rows: usize, cols: usize, group: usize) -> Self {
        let gs = cols / group;
        Quantized {
            rows,
            cols,
            group,
            codes: vec![0; rows * cols],
            zeros: vec![0; rows * gs],
            scales: vec![f16::ZERO; rows * gs],
        }
    }

    pub fn groups(&self) -> usize {
        self.cols / self.group
    }

    /// `(q − z) · s` in f32 from the f16 scale: what a loader computes when it dequantizes.
    pub fn dequantize(&self) -> Vec<f32> {
        let g = self.group;
        let gs = self.groups();
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols)
            .enumerate()
            .for_each(|(r, row)| {
                for (k, chunk) in row.chunks_mut(g).enumerate() {
                    let s = self.scales[r * gs + k].to_f32();
                    let z = self.zeros[r * gs + k] as f32;
                    let codes = &self.codes[r * self.cols + k * g..][..g];
                    for (o, &q) in chunk.iter_mut().zip(codes) {
                        *o = (q as f32 - z) * s;
                    }
                }
            });
        out
    }
}

/// Round half to even (torch's `round`) for values that are clamped to the code range [0, 15]
/// afterwards. `f32::round_ties_even` is a libm call on baseline x86-64 (no SSE4.1), which stops
/// the quantizer loops from vectorizing. Adding and removing 1.5·2²³ rounds in the FPU's default
/// ties-to-even mode, exactly for |x| ≤ 2²²; larger inputs saturate to ±2²², which changes
/// nothing once the caller clamps to the code range. `magic` must come from [`magic`].
#[inline(always)]
pub fn rne(x: f32, magic: f32) -> f32 {
    const LIMIT: f32 = 4_194_304.0;
    (x.clamp(-LIMIT, LIMIT) + magic) - magic
}

/// 1.5·2²³, hidden from the optimizer: LLVM recognizes `(x + C) − C` for this constant and
/// turns it back into the `rintf` call. Read it once per loop, not per element.
#[inline(always)]
pub fn magic() -> f32 {
    std::hint::black_box(12_582_912.0)
}

#[inline]
fn h(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// AutoAWQ's `pseudo_quantize_tensor` on f16 weights (values are rounded to f16 first, as
/// AutoAWQ's `.half()` does), in f16 arithmetic. `w` is `[rows, cols]`, `cols % group == 0`.
pub fn quantize_f16(w: &[f32], rows: usize, cols: usize, group: usize) -> Quantized {
    assert_eq!(w.len(), rows * cols);
    assert!(group > 0 && cols.is_multiple_of(group));
    let gs = cols / group;
    let mut codes = vec![0u8; rows * cols];
    let mut zeros = vec![0u8; rows * gs];
    let mut scales = vec![f16::ZERO; rows * gs];
    let min_range = h(1e-5);
    codes
        .par_chunks_mut(cols)
        .zip(zeros.par_chunks_mut(gs))
        .zip(scales.par_chunks_mut(gs))
        .enumerate()
        .for_each(|(r, ((code_row, zero_row), scale_row))| {
            let m = magic();
            let row = &w[r * cols..(r + 1) * cols];
            // The f16 roundings of a whole group at once: half's slice conversions use the
            // vector instructions, the same values as `h` one element at a time.
            let (mut x16, mut grp) = (vec![f16::ZERO; group], vec![0f32; group]);
            for k in 0..gs {
                grp.copy_from_slice(&row[k * group..(k + 1) * group]);
                round_f16(&mut grp, &mut x16);
                let (mn, mx) = grp
                    .iter()
                    .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| {
                        (a.min(x), b.max(x))
                    });
                let s = group_scale(mx - mn, min_range);
                let z = (-rne(h(mn / s), m)).clamp(0.0, QMAX);
                grp.iter_mut().for_each(|x| *x /= s);
                round_f16(&mut grp, &mut x16);
                for (c, &v) in code_row[k * group..(k + 1) * group].iter_mut().zip(&grp) {
                    *c = (rne(v, m) + z).clamp(0.0, QMAX) as u8;
                }
                zero_row[k] = z as u8;
                scale_row[k] = f16::from_f32(s);
            }
        });
    Quantized {
        rows,
        cols,
        group,
        codes,
        zeros,
        scales,
    }
}

/// `v = h(v)` element-wise through the scratch `x16` (the same length).
fn round_f16(v: &mut [f32], x16: &mut [f16]) {
    use half::slice::HalfFloatSliceExt;
    x16.convert_from_f32_slice(v);
    x16.convert_to_f32_slice(v);
}

/// The f16 scale of a group whose values span `span = max − min`. AutoAWQ rounds the span to
/// f16 first (`h(span)`), which overflows to `inf` when the span exceeds 65504 (weights of
/// ±32760 and more) and writes an infinite scale; there we divide the f32 span instead. Below
/// that the result is AutoAWQ's bit for bit.
fn group_scale(span: f32, min_range: f32) -> f32 {
    let range = h(span).max(min_range);
    if range.is_finite() {
        h(range / QMAX)
    } else {
        h(span / QMAX)
    }
}

/// In-place quantize→dequantize of each group of `w` (f32 math, scale rounded to f16 as it will
/// be stored). Used for every candidate of the scale and clip searches.
pub fn fake_quantize(w: &mut [f32], group: usize) {
    let m = magic();
    for grp in w.chunks_mut(group) {
        let (mn, mx) = grp
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| {
                (a.min(x), b.max(x))
            });
        let s = h((mx - mn).max(1e-5) / QMAX);
        let z = (-rne(mn / s, m)).clamp(0.0, QMAX);
        for x in grp.iter_mut() {
            let q = (rne(*x / s, m) + z).clamp(0.0, QMAX);
            *x = (q - z) * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rne_is_round_half_to_even() {
        for x in [
            0.5f32, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, 7.5, 14.5, 15.5, -3.2, 4194303.5,
        ] {
            assert_eq!(rne(x, magic()), x.round_ties_even(), "{x}");
        }
        assert_eq!(rne(1e9, magic()), 4_194_304.0);
        assert_eq!(rne(f32::NEG_INFINITY, magic()), -4_194_304.0);
        assert!(rne(f32::NAN, magic()).is_nan());
    }

    proptest! {
        #[test]
        fn rne_matches_round_ties_even(x in -4_194_304f32..4_194_304.0) {
            prop_assert_eq!(rne(x, magic()), x.round_ties_even());
        }
    }

    #[test]
    fn a_span_beyond_float16_still_gets_a_finite_scale() {
        // max − min = 60000 + 30000 overflows f16 (AutoAWQ: inf); 90000 / 15 = 6000 fits.
        let w = [-30000.0, 60000.0, 0.0, 1.0];
        let q = quantize_f16(&w, 1, 4, 4);
        assert_eq!(q.scales[0].to_f32(), 6000.0);
        assert_eq!(q.codes, vec![0, 15, 5, 5]);
    }

    #[test]
    fn spec_worked_example() {
        // AWQ-SPEC §7.3 with g = 8 (scale 0.05 is not exact in f16; codes and zero are).
        let w = [-0.25, -0.10, 0.00, 0.05, 0.12, 0.20, 0.30, 0.50];
        let q = quantize_f16(&w, 1, 8, 8);
        assert_eq!(q.zeros, vec![5]);
        assert_eq!(q.codes, vec![0, 3, 5, 6, 7, 9, 11, 15]);
    }

    #[test]
    fn constant_and_zero_groups_stay_finite() {
        let w = [0.0f32; 16];
        let q = quantize_f16(&w, 1, 16, 8);
        assert!(q.dequantize().iter().all(|x| *x == 0.0));
        let mut f = [0.0f32; 16];
        fake_quantize(&mut f, 8);
        assert!(f.iter().all(|x| *x == 0.0));
    }

    proptest! {
        #[test]
        fn codes_and_zeros_within_bounds(vals in proptest::collection::vec(-100f32..100.0, 64)) {
            let q = quantize_f16(&vals, 2, 32, 16);
            prop_assert!(q.codes.iter().all(|&c| c <= 15));
            prop_assert!(q.zeros.iter().all(|&z| z <= 15));
            prop_assert!(q.scales.iter().all(|s| s.to_f32() > 0.0 && s.is_finite()));
            // Dequantized values stay within one step of the group range.
            let dq = q.dequantize();
            for (k, grp) in vals.chunks(16).enumerate() {
                let s = q.scales[k].to_f32();
                let (mn, mx) = grp.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
                for &d in &dq[k * 16..(k + 1) * 16] {
                    prop_assert!(d >= mn - s * 1.01 && d <= mx + s * 1.01);
                }
            }
        }

        #[test]
        fn fake_quantize_error_is_at_most_half_a_step_inside_the_range(vals in proptest::collection::vec(-1f32..1.0, 32)) {
            let mut f = vals.clone();
            fake_quantize(&mut f, 32);
            let (mn, mx) = vals.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
            let s = h((mx - mn).max(1e-5) / QMAX);
            // Zero-point rounding can shift the grid by up to half a step at the ends.
            for (a, b) in vals.iter().zip(&f) {
                prop_assert!((a - b).abs() <= s * 1.0 + 1e-6);
            }
        }
    }
}

//! Block-scaled fp8 sources (DeepSeek-V3, Kimi K2): each linear weight is `float8_e4m3fn` with a
//! float32 `<name>_scale_inv` of shape `[⌈rows / br⌉, ⌈cols / bc⌉]`, one factor per
//! `[br, bc]` block (`quantization_config.weight_block_size`). The weight is
//! `f32(fp8) × scale_inv[r / br][c / bc]`; blocks on the last row or column may be partial and
//! use their block's factor. That is DeepSeek's `inference/fp8_cast_bf16.py` with
//! `kernel.py::weight_dequant` (a grid of `cdiv(M, 128) × cdiv(N, 128)` masked tiles), and
//! transformers' `integrations/finegrained_fp8.py` for shapes the block divides. We keep the
//! result in f32, without their final rounding to bfloat16: it feeds our f32 math directly.

use rayon::prelude::*;

/// `float8_e4m3fn` to f32: 1 sign, 4 exponent (bias 7) and 3 mantissa bits, subnormals at
/// exponent 0, no infinities, and NaN for `S.1111.111`.
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let (exp, man) = ((b >> 3) & 0x0f, b & 0x07);
    if exp == 0x0f && man == 0x07 {
        return f32::NAN;
    }
    let magnitude = match exp {
        0 => man as f32 / 8.0 * 2f32.powi(-6),
        e => (1.0 + man as f32 / 8.0) * 2f32.powi(e as i32 - 7),
    };
    sign * magnitude
}

/// f32 to the nearest `float8_e4m3fn` (ties to the even code), saturating at ±448 as
/// DeepSeek's and PyTorch's casts of already-scaled blocks never exceed it. For writing
/// fp8 test and benchmark checkpoints.
pub fn f32_to_e4m3(x: f32) -> u8 {
    static POSITIVE: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    // The positive finite codes 0x00..=0x7e increase with their value.
    let table = POSITIVE.get_or_init(|| (0..=0x7e).map(e4m3_to_f32).collect());
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs().min(448.0);
    let hi = table.partition_point(|&v| v < a).min(0x7e);
    if hi == 0 || table[hi] == a {
        return sign | hi as u8;
    }
    let lo = hi - 1;
    let (dl, dh) = (a - table[lo], table[hi] - a);
    let code = match dl.partial_cmp(&dh) {
        Some(std::cmp::Ordering::Less) => lo,
        Some(std::cmp::Ordering::Greater) => hi,
        _ if lo % 2 == 0 => lo,
        _ => hi,
    };
    sign | code as u8
}

/// The scale grid's shape for a `[rows, cols]` weight and `[br, bc]` blocks.
pub fn scale_shape([rows, cols]: [usize; 2], [br, bc]: [usize; 2]) -> [usize; 2] {
    [rows.div_ceil(br), cols.div_ceil(bc)]
}

/// Dequantizes a `[rows, cols]` fp8 weight (`codes`, row-major) with its `scale_inv` grid
/// (row-major, [`scale_shape`]), in f32.
pub fn dequantize(
    codes: &[u8],
    scale_inv: &[f32],
    [rows, cols]: [usize; 2],
    block: [usize; 2],
) -> Vec<f32> {
    let lut: Vec<f32> = (0..=255u8).map(e4m3_to_f32).collect();
    let [_, grid_cols] = scale_shape([rows, cols], block);
    let mut out = vec![0f32; rows * cols];
    out.par_chunks_mut(cols.max(1))
        .zip(codes.par_chunks(cols.max(1)))
        .enumerate()
        .for_each(|(r, (dst, src))| {
            let scales = &scale_inv[(r / block[0]) * grid_cols..][..grid_cols];
            // Block by block: one factor per run of columns, no division per element.
            let runs = dst.chunks_mut(block[1]).zip(src.chunks(block[1]));
            for ((d, b), &scale) in runs.zip(scales) {
                d.iter_mut()
                    .zip(b)
                    .for_each(|(d, &b)| *d = lut[b as usize] * scale);
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_decodes_normals_subnormals_and_nan() {
        assert_eq!(e4m3_to_f32(0x00), 0.0);
        assert_eq!(e4m3_to_f32(0x38), 1.0); // exponent 7, mantissa 0
        assert_eq!(e4m3_to_f32(0xb8), -1.0);
        assert_eq!(e4m3_to_f32(0x7e), 448.0); // the largest finite value
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9)); // the smallest subnormal
        assert_eq!(e4m3_to_f32(0x3c), 1.5);
        assert!(e4m3_to_f32(0x7f).is_nan() && e4m3_to_f32(0xff).is_nan());
    }

    #[test]
    fn encoding_rounds_to_the_nearest_code_and_decodes_back() {
        for code in (0u8..=0x7e).chain(0x80..=0xfe) {
            assert_eq!(f32_to_e4m3(e4m3_to_f32(code)), code, "{code:#x}");
        }
        // 1.0 is 0x38, 1.125 is 0x39, 1.25 is 0x3a: halfway goes to the even code.
        assert_eq!(f32_to_e4m3(1.0625), 0x38);
        assert_eq!(f32_to_e4m3(1.1875), 0x3a);
        assert_eq!(f32_to_e4m3(1.07), 0x39);
        assert_eq!(f32_to_e4m3(1000.0), 0x7e);
    }

    #[test]
    fn partial_blocks_use_their_blocks_factor() {
        // 3 × 3 weight, 2 × 2 blocks: a 2 × 2 grid, the last row and column partial.
        let one = 0x38;
        let codes = [one; 9];
        let scale = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(scale_shape([3, 3], [2, 2]), [2, 2]);
        let w = dequantize(&codes, &scale, [3, 3], [2, 2]);
        assert_eq!(w, vec![1., 1., 2., 1., 1., 2., 3., 3., 4.]);
    }
}

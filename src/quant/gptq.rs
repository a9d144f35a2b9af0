//! Error-feedback rounding (GPTQ/OPTQ, Frantar et al. 2022) inside the AWQ format.
//!
//! Round-to-nearest rounds every weight on its own. GPTQ rounds the input columns of a linear
//! one at a time and pushes each column's rounding error onto the columns not yet rounded,
//! weighted by the inverse of `H = XᵀX` of the linear's calibration input, so that the errors
//! cancel on the calibration data instead of adding up. Here the group parameters (scale, zero
//! point) are those round-to-nearest computes from the same weights (AutoAWQ's recipe), fixed
//! before the column walk: only the integer codes change, so the output is the AutoAWQ layout
//! byte for byte in shape and semantics. Because the group parameters are fixed first, the
//! columns can go in any order without changing a column's group: they go in activation order
//! (decreasing `H` diagonal, GPTQ's `act_order` with its "static groups"), in blocks of 128 with
//! the lazy batch update of the paper.
//!
//! [`loss`] measures `Σ_rows (w − ŵ) H (w − ŵ)ᵀ`, the calibration loss both roundings are judged
//! by: callers keep whichever is lower, so error feedback is never worse than round-to-nearest
//! on the linear's own calibration input.

use candle_core::{Device, Tensor};

use super::rtn::{magic, quantize_f16, rne, Quantized, QMAX};
use crate::error::{Error, Result};

/// Columns per block of the lazy batch update.
const BLOCK: usize = 128;

/// Dampening added to H's diagonal, as a share of its mean (GPTQ's `percdamp`). GPTQ's 0.01
/// fitted the calibration too closely. Measured on SmolLM2, group 64, WikiText-2 perplexity
/// (docs/quality.md, "Damping"), `--rounding gptq --clip-sides symmetric`:
///
/// | damp | WikiText-2 32 × 512, `--fast` | embedded corpus, `--fast` | WikiText-2 8 × 128 |
/// |---|---|---|---|
/// | 0.01 | 18.830 | 19.567 | 21.202 |
/// | 0.1 | 18.636 | 19.199 | 20.260 |
/// | 0.3 | 18.631 | 19.090 | 19.963 |
/// | 1 | 18.785 | 19.206 | 19.425 |
/// | round to nearest | 19.269 | 19.337 | 19.814 |
///
/// 0.3 is the lowest on the first two. Only 1 beat round to nearest on the third (whose linears
/// `--rounding auto`'s token rule leaves to round to nearest), and it kept less of the gain on
/// the first two. With `--rounding auto
/// --clip-sides auto` the cells move by up to 0.25 between neighbouring settings, and not in
/// one direction (32 × 512: 18.657, 18.846, 18.624 for 0.01, 0.1, 0.3).
pub const DAMP: f64 = 0.3;

/// The order the column walk visits the input columns in, and the upper Cholesky factor of the
/// dampened inverse of `H = XᵀX` in that order (see [`inverse_factor`]): what the walk needs,
/// shared by every linear that reads the same input.
pub struct Factor {
    u: Vec<f64>,
    n: usize,
    /// `order[k]`: the input column the walk rounds `k`-th.
    order: Vec<usize>,
}

impl Factor {
    /// For `h: [n, n]` row-major. Fails only when H is not positive definite even after
    /// dampening (a calibration input with NaN), naming the input column.
    pub fn new(h: &[f64], n: usize) -> Result<Self> {
        Self::of(n, |i, j| h[i * n + j])
    }

    /// For the `[n, n]` matrix whose element `(i, j)` is `h(i, j)`: the caller's `H` can be a
    /// difference of two (every block's minus the held-out ones') without a third matrix of
    /// that size. Besides the factor, this holds one reordered copy while it factors.
    pub fn of(n: usize, h: impl Fn(usize, usize) -> f64) -> Result<Self> {
        let order = walk_order(n, |i| h(i, i));
        let in_order: Vec<f64> = (0..n * n).map(|k| h(order[k / n], order[k % n])).collect();
        Ok(Self {
            u: inverse_factor(in_order, n, &order)?,
            n,
            order,
        })
    }
}

/// The walk's column order, as the resume fingerprint records it.
pub const ORDER: &str = "activation";

/// The input columns by decreasing `H` diagonal (their calibration input's energy; ties by
/// column): GPTQ's activation order. The columns rounded first are those whose errors cost
/// most, while the most columns remain to absorb them. The group parameters are fixed before
/// the walk, so each column keeps its group's scale and zero point in any order (GPTQ's
/// "static groups"), and the layout is unchanged.
fn walk_order(n: usize, diagonal: impl Fn(usize) -> f64) -> Vec<usize> {
    let d: Vec<f64> = (0..n).map(diagonal).collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| d[b].total_cmp(&d[a]).then(a.cmp(&b)));
    order
}

/// GPTQ codes for `w: [rows, cols]` row-major with the group parameters of
/// [`quantize_f16`]`(w)`, given the [`Factor`] of the linear's `H = XᵀX` (`cols` wide).
pub fn quantize(
    w: &[f32],
    rows: usize,
    cols: usize,
    group: usize,
    f: &Factor,
) -> Result<Quantized> {
    quantize_on(w, quantize_f16(w, rows, cols, group), rows, cols, group, f)
}

/// [`quantize`] onto the group scales and zero points of `grid` (its codes are replaced), which
/// need not be `w`'s own: walked from an unclipped weight onto its clipped weight's grid, the
/// codes clamp where `w` lies outside it and that error is fed back like a rounding error.
pub fn quantize_on(
    w: &[f32],
    grid: Quantized,
    rows: usize,
    cols: usize,
    group: usize,
    f: &Factor,
) -> Result<Quantized> {
    assert_eq!(f.n, cols);
    let mut q = grid;
    let (u, order) = (&f.u, &f.order);
    let gs = cols / group;
    // Wᵀ in walk order: the column being rounded is contiguous, and so is every update.
    let mut wt = vec![0f32; rows * cols];
    for r in 0..rows {
        for (k, &c) in order.iter().enumerate() {
            wt[k * rows + r] = w[r * cols + c];
        }
    }
    let m = magic();
    for i1 in (0..cols).step_by(BLOCK) {
        let i2 = (i1 + BLOCK).min(cols);
        let mut errs = vec![0f32; (i2 - i1) * rows];
        for i in i1..i2 {
            let (d, c) = (u[i * cols + i] as f32, order[i]);
            let (done, rest) = wt.split_at_mut((i + 1) * rows);
            let col = &done[i * rows..];
            let err = &mut errs[(i - i1) * rows..][..rows];
            for r in 0..rows {
                let s = q.scales[r * gs + c / group].to_f32();
                let z = q.zeros[r * gs + c / group] as f32;
                let code = (rne(col[r] / s, m) + z).clamp(0.0, QMAX);
                q.codes[r * cols + c] = code as u8;
                err[r] = (col[r] - (code - z) * s) / d;
            }
            for j in i + 1..i2 {
                let f = u[i * cols + j] as f32;
                let target = &mut rest[(j - i - 1) * rows..][..rows];
                target
                    .iter_mut()
                    .zip(err.iter())
                    .for_each(|(t, e)| *t -= f * e);
            }
        }
        if i2 < cols {
            // W[:, i2..] -= Err · U[i1..i2, i2..], as Wᵀ[i2.., :] -= U[i1..i2, i2..]ᵀ · Errᵀ.
            let n = i2 - i1;
            let ub: Vec<f32> = (i1..i2)
                .flat_map(|i| u[i * cols + i2..(i + 1) * cols].iter().map(|&x| x as f32))
                .collect();
            let ub = Tensor::from_vec(ub, (n, cols - i2), &Device::Cpu)?;
            let e = Tensor::from_vec(errs, (n, rows), &Device::Cpu)?;
            let update = crate::ops::matmul(&ub.t()?.contiguous()?, &e)?;
            let update = update.flatten_all()?.to_vec1::<f32>()?;
            wt[i2 * rows..]
                .iter_mut()
                .zip(update)
                .for_each(|(w, u)| *w -= u);
        }
    }
    Ok(q)
}

/// `Σ_rows (w − ŵ) H (w − ŵ)ᵀ` for `w, w_hat: [rows, cols]` and `h: [cols, cols]`.
pub fn loss(w: &[f32], w_hat: &[f32], rows: usize, cols: usize, h: &[f64]) -> Result<f64> {
    let e: Vec<f32> = w.iter().zip(w_hat).map(|(a, b)| a - b).collect();
    let hf: Vec<f32> = h.iter().map(|&x| x as f32).collect();
    let e_t = Tensor::from_vec(e.clone(), (rows, cols), &Device::Cpu)?;
    let h_t = Tensor::from_vec(hf, (cols, cols), &Device::Cpu)?;
    let eh = crate::ops::matmul(&e_t, &h_t)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(eh.iter().zip(&e).map(|(a, b)| *a as f64 * *b as f64).sum())
}

/// The upper Cholesky factor `U` of `(H + λI)⁻¹` (so `(H + λI)⁻¹ = UᵀU`), row-major, for `a`
/// holding `H`, with λ = [`DAMP`] × mean(diag H) and dead inputs (zero diagonal) set to 1;
/// `columns[i]`: the input column of `a`'s row `i`, for the error message.
fn inverse_factor(mut a: Vec<f64>, n: usize, columns: &[usize]) -> Result<Vec<f64>> {
    let mean = (0..n).map(|i| a[i * n + i]).sum::<f64>() / n as f64;
    let damp = DAMP * if mean > 0.0 { mean } else { 1.0 };
    for i in 0..n {
        if a[i * n + i] == 0.0 {
            a[i * n + i] = 1.0;
        }
        a[i * n + i] += damp;
    }
    // With P the order-reversing permutation, chol(P·A·P) = L' gives A = V·Vᵀ for the upper
    // triangular V = P·L'·P, so A⁻¹ = V⁻ᵀ·V⁻¹ and U = V⁻¹ = P·L'⁻¹·P: one factorization and one
    // triangular inverse instead of inverting A and factoring the inverse.
    // Reversing a row-major matrix's elements is P·A·P, and reversing L'⁻¹'s gives U.
    a.reverse();
    let reversed: Vec<usize> = columns.iter().rev().copied().collect();
    let mut u = inverse_cholesky(a, n, &reversed)?;
    u.reverse();
    Ok(u)
}

/// Below this width [`inverse_cholesky`] factors and inverts element by element.
const BASE: usize = 128;

/// `L⁻¹` for the lower Cholesky factor `L` of a symmetric positive definite `a: [n, n]`
/// (row-major), recursively on halves so that almost all of the n³/3 multiply-adds are matrix
/// products at the machine's GEMM rate: with `A = [[A₁₁, ·], [A₂₁, A₂₂]]` and `X = L⁻¹`,
/// `L₂₁ = A₂₁·X₁₁ᵀ`, `L₂₂` factors `A₂₂ − L₂₁·L₂₁ᵀ` and `X₂₁ = −X₂₂·L₂₁·X₁₁`. `columns[i]`
/// is the input column of row `i`, for the error message.
fn inverse_cholesky(a: Vec<f64>, n: usize, columns: &[usize]) -> Result<Vec<f64>> {
    if n <= BASE {
        return Ok(inverse_lower(&cholesky(&a, n, columns)?, n));
    }
    let h = n / 2;
    let m = n - h;
    let block = |r0: usize, c0: usize, rows: usize, cols: usize| -> Vec<f64> {
        (r0..r0 + rows)
            .flat_map(|r| a[r * n + c0..r * n + c0 + cols].iter().copied())
            .collect()
    };
    let mat =
        |v: Vec<f64>, rows: usize, cols: usize| Tensor::from_vec(v, (rows, cols), &Device::Cpu);
    let (a11, a21, a22) = (block(0, 0, h, h), block(h, 0, m, h), block(h, h, m, m));
    drop(a);
    let x11 = mat(inverse_cholesky(a11, h, &columns[..h])?, h, h)?;
    let l21 = crate::ops::matmul(&mat(a21, m, h)?, &x11.t()?)?;
    let s = (mat(a22, m, m)? - crate::ops::matmul(&l21, &l21.t()?)?)?;
    let x22 = mat(
        inverse_cholesky(s.flatten_all()?.to_vec1()?, m, &columns[h..])?,
        m,
        m,
    )?;
    let x21 = crate::ops::matmul(&x22, &crate::ops::matmul(&l21, &x11)?)?.neg()?;
    let (x11, x21, x22) = (
        x11.to_vec2::<f64>()?,
        x21.to_vec2::<f64>()?,
        x22.to_vec2::<f64>()?,
    );
    let mut x = vec![0f64; n * n];
    for r in 0..h {
        x[r * n..r * n + h].copy_from_slice(&x11[r]);
    }
    for r in 0..m {
        x[(h + r) * n..(h + r) * n + h].copy_from_slice(&x21[r]);
        x[(h + r) * n + h..(h + r + 1) * n].copy_from_slice(&x22[r]);
    }
    Ok(x)
}

/// Lower Cholesky factor of a symmetric positive definite `a: [n, n]`; `columns` as in
/// [`inverse_cholesky`].
fn cholesky(a: &[f64], n: usize, columns: &[usize]) -> Result<Vec<f64>> {
    let mut l = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let dot: f64 = (0..j).map(|k| l[i * n + k] * l[j * n + k]).sum();
            if i == j {
                let d = a[i * n + i] - dot;
                if d.is_nan() || d <= 0.0 {
                    return Err(Error::Runtime(format!(
                        "GPTQ: the calibration input's Gram matrix is not positive definite at \
                         input column {} (a non-finite activation?); rerun with --rounding rtn",
                        columns[i]
                    )));
                }
                l[i * n + i] = d.sqrt();
            } else {
                l[i * n + j] = (a[i * n + j] - dot) / l[j * n + j];
            }
        }
    }
    Ok(l)
}

/// `L⁻¹` for a lower-triangular `l: [n, n]`, by forward substitution of `L x = e_j` for each
/// column `j` (written as row `j` of the transpose, so the inner loop reads contiguously).
fn inverse_lower(l: &[f64], n: usize) -> Vec<f64> {
    let mut t = vec![0f64; n * n];
    for (j, x) in t.chunks_mut(n).enumerate() {
        x[j] = 1.0 / l[j * n + j];
        for i in j + 1..n {
            let s: f64 = (j..i).map(|k| l[i * n + k] * x[k]).sum();
            x[i] = -s / l[i * n + i];
        }
    }
    (0..n * n).map(|k| t[(k % n) * n + k / n]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn values(n: usize, seed: u64, amp: f32) -> Vec<f32> {
        let mut rng = crate::calib::SplitMix64::new(seed);
        (0..n)
            .map(|_| ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp)
            .collect()
    }

    /// XᵀX of `x: [tokens, cols]` with correlated columns (a shared component), as real
    /// activations have.
    fn gram(tokens: usize, cols: usize, seed: u64) -> (Vec<f32>, Vec<f64>) {
        let base = values(tokens, seed, 1.0);
        let noise = values(tokens * cols, seed + 1, 1.0);
        let x: Vec<f32> = (0..tokens * cols)
            .map(|i| base[i / cols] * (1.0 + (i % cols) as f32 / cols as f32) + 0.3 * noise[i])
            .collect();
        let mut h = vec![0f64; cols * cols];
        for t in 0..tokens {
            let row = &x[t * cols..][..cols];
            for i in 0..cols {
                for j in 0..cols {
                    h[i * cols + j] += row[i] as f64 * row[j] as f64;
                }
            }
        }
        (x, h)
    }

    #[test]
    fn the_inverse_factor_inverts() {
        let (_, h) = gram(64, 12, 5);
        let u = inverse_factor(h.clone(), 12, &(0..12).collect::<Vec<_>>()).unwrap();
        // UᵀU (H + λI) = I.
        let mean = (0..12).map(|i| h[i * 12 + i]).sum::<f64>() / 12.0;
        for i in 0..12 {
            for j in 0..12 {
                let mut s = 0.0;
                for k in 0..12 {
                    let uu: f64 = (0..12).map(|m| u[m * 12 + i] * u[m * 12 + k]).sum();
                    let hk = h[k * 12 + j] + if k == j { DAMP * mean } else { 0.0 };
                    s += uu * hk;
                }
                assert!(
                    (s - if i == j { 1.0 } else { 0.0 }).abs() < 1e-9,
                    "{i},{j}: {s}"
                );
            }
        }
    }

    #[test]
    fn the_blocked_inverse_factor_equals_the_element_by_element_one() {
        // 300 splits into 150 | 150 and then 75 | 75: both the recursion and the base case run.
        let n = 300;
        let (_, mut h) = gram(400, n, 11);
        for i in 0..n {
            h[i * n + i] += 1e-3;
        }
        let columns: Vec<usize> = (0..n).collect();
        let blocked = inverse_cholesky(h.clone(), n, &columns).unwrap();
        let direct = inverse_lower(&cholesky(&h, n, &columns).unwrap(), n);
        let scale = direct.iter().fold(0f64, |m, v| m.max(v.abs()));
        for (k, (b, d)) in blocked.iter().zip(&direct).enumerate() {
            assert!(
                (b - d).abs() <= 1e-9 * scale,
                "{}, {}: {b} vs {d}",
                k / n,
                k % n
            );
        }
    }

    #[test]
    fn a_gram_matrix_that_is_not_positive_definite_names_its_input_column() {
        // Column 5 of 300: past the first split of the reversed order, so the message's column
        // goes through both the reversal and the recursion's offsets.
        let n = 300;
        let (_, mut h) = gram(400, n, 3);
        h[5 * n + 5] = -1e4;
        let e = Factor::new(&h, n).err().expect("not positive definite");
        assert!(e.to_string().contains("input column 5 "), "{e}");
    }

    /// With a diagonal `H` no error feeds forward, so the codes are the same in any walk order:
    /// each code lands at its own column.
    #[test]
    fn uncorrelated_inputs_get_the_same_codes_in_any_walk_order() {
        let (rows, cols, group) = (8, 64, 32);
        let w = values(rows * cols, 3, 0.05);
        let mut h = vec![0f64; cols * cols];
        for i in 0..cols {
            h[i * cols + i] = 1.0 + ((i * 37) % cols) as f64;
        }
        let f = Factor::new(&h, cols).unwrap();
        assert_eq!(
            f.order[0],
            (0..cols).max_by_key(|i| (i * 37) % cols).unwrap()
        );
        assert!(f
            .order
            .windows(2)
            .all(|p| h[p[0] * cols + p[0]] >= h[p[1] * cols + p[1]]));
        let natural: Vec<usize> = (0..cols).collect();
        let in_order = Factor {
            u: inverse_factor(h.clone(), cols, &natural).unwrap(),
            n: cols,
            order: natural,
        };
        let g = quantize(&w, rows, cols, group, &f).unwrap();
        assert_eq!(
            g.codes,
            quantize(&w, rows, cols, group, &in_order).unwrap().codes
        );
    }

    /// A clip is part of the quantization error: walked from the unclipped weight onto the
    /// clipped weight's grid, error feedback feeds the clip's error back with the rounding
    /// errors, and comes closer to the unclipped weight's output than walked from the clipped
    /// weight (which ignores the clip) or rounded to nearest.
    #[test]
    fn walking_from_the_unclipped_weight_feeds_the_clip_error_back() {
        let (rows, cols, group) = (16, 64, 32);
        let w = values(rows * cols, 9, 0.05);
        // Every weight beyond 70 % of its group's abs-max clipped, as the clip search does.
        let clipped: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let (r, g) = (i / cols, (i % cols) / group);
                let m = (0..group)
                    .map(|j| w[r * cols + g * group + j].abs())
                    .fold(0f32, f32::max);
                w[i].clamp(-0.7 * m, 0.7 * m)
            })
            .collect();
        let (_, h) = gram(256, cols, 4);
        let f = Factor::new(&h, cols).unwrap();
        let grid = quantize_f16(&clipped, rows, cols, group);
        let loss_of = |q: &Quantized| loss(&w, &q.dequantize(), rows, cols, &h).unwrap();
        let from_unclipped = quantize_on(&w, grid.clone(), rows, cols, group, &f).unwrap();
        let from_clipped = quantize(&clipped, rows, cols, group, &f).unwrap();
        assert_eq!(from_unclipped.scales, grid.scales);
        assert_eq!(from_unclipped.zeros, grid.zeros);
        let (u, c, r) = (
            loss_of(&from_unclipped),
            loss_of(&from_clipped),
            loss_of(&grid),
        );
        assert!(
            u < c && c < r,
            "from unclipped {u}, from clipped {c}, rtn {r}"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Error feedback lowers the calibration loss against round-to-nearest, keeps RTN's
        /// scales and zero points, and every code stays in 0..=15.
        #[test]
        fn error_feedback_beats_round_to_nearest(
            rows in 16usize..40, groups in 1usize..4, seed in 0u64..500,
        ) {
            let (group, tokens) = (32, 256);
            let cols = groups * group;
            let w = values(rows * cols, seed, 0.05);
            let (_, h) = gram(tokens, cols, seed + 7);
            let rtn = quantize_f16(&w, rows, cols, group);
            let g = quantize(&w, rows, cols, group, &Factor::new(&h, cols).unwrap()).unwrap();
            prop_assert_eq!(&g.scales, &rtn.scales);
            prop_assert_eq!(&g.zeros, &rtn.zeros);
            prop_assert!(g.codes.iter().all(|&c| c <= 15));
            let l_rtn = loss(&w, &rtn.dequantize(), rows, cols, &h).unwrap();
            let l_gptq = loss(&w, &g.dequantize(), rows, cols, &h).unwrap();
            prop_assert!(l_gptq < l_rtn, "gptq {} vs rtn {}", l_gptq, l_rtn);
        }
    }
}

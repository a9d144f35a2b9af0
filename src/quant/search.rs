//! The AWQ per-channel scale search (AWQ-SPEC §3, §4), with a true snapshot of the weights:
//! every candidate is computed into scratch tensors and the originals never change.
//!
//! Candidates are AutoAWQ's (duo scaling, ratios k/n_grid, normalised by the geometric midpoint)
//! plus, by default, the identity s = 1 evaluated first: with the strict `<` rule the chosen loss
//! can never exceed plain round-to-nearest's. The identity's loss is always recorded.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::reduce;
use super::rtn::fake_quantize;
use crate::error::{Error, Result};
use crate::ops::matmul;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Grid {
    /// Identity first, then AutoAWQ's candidates (the default).
    Robust,
    /// Exactly AutoAWQ's candidates, for comparison.
    Autoawq,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ScaleChoice {
    /// `None` when the identity won.
    pub ratio: Option<f32>,
    pub loss: f64,
    pub identity_loss: f64,
    #[serde(skip)]
    pub scales: Vec<f32>,
}

impl ScaleChoice {
    /// No search: the identity scale over `n` input channels (an expert without enough
    /// calibration tokens).
    pub fn identity(n: usize) -> Self {
        Self {
            ratio: None,
            loss: 0.0,
            identity_loss: 0.0,
            scales: vec![1.0; n],
        }
    }
}

/// `mean_t |X[t, c]|` per input channel of `x: [T, in]`, read in place (an `abs()` tensor would
/// hold a second copy of the layer's widest input). The bits are candle's `x.abs().mean(0)`:
/// each column summed row by row in f32, then multiplied by `1/T` rounded to f32.
pub fn x_mean(x: &Tensor) -> Result<Vec<f32>> {
    let (t, n) = x.dims2()?;
    let mut sum = vec![0f32; n];
    reduce::with_slice(x, |v| {
        for row in v.chunks_exact(n) {
            sum.iter_mut().zip(row).for_each(|(s, x)| *s += x.abs());
        }
    })?;
    let scale = (1.0 / t as f64) as f32;
    Ok(sum.into_iter().map(|s| s * scale).collect())
}

/// AutoAWQ's normalised weight magnitude per input channel: every group of each row scaled to
/// [0, 1] by its abs-max (+1e-6), then averaged over all rows of all linears.
pub fn w_mean(weights: &[&Tensor], group: usize) -> Result<Vec<f32>> {
    let mut acc = WMean::new(weights[0].dim(1)?, group);
    for w in weights {
        acc.add(w)?;
    }
    Ok(acc.finish())
}

/// [`w_mean`] accumulated one weight at a time (a MoE layer's experts are read one by one),
/// with the same sums in the same order.
pub struct WMean {
    sum: Vec<f64>,
    rows: usize,
    group: usize,
}

impl WMean {
    pub fn new(cols: usize, group: usize) -> Self {
        Self {
            sum: vec![0f64; cols],
            rows: 0,
            group,
        }
    }

    /// Adds the rows of `w: [out, cols]`. Each column's sum runs over the rows in order, so the
    /// result is the same however the columns are split over threads.
    pub fn add(&mut self, w: &Tensor) -> Result<()> {
        let (cols, group) = (self.sum.len(), self.group);
        reduce::with_slice(w, |v| {
            self.sum
                .par_chunks_mut(group)
                .enumerate()
                .for_each(|(k, sum)| {
                    for row in v.chunks_exact(cols) {
                        let grp = &row[k * group..][..sum.len()];
                        let m = grp.iter().fold(0f32, |a, x| a.max(x.abs())) + 1e-6;
                        for (s, x) in sum.iter_mut().zip(grp) {
                            *s += (x.abs() / m) as f64;
                        }
                    }
                });
        })?;
        self.rows += w.dim(0)?;
        Ok(())
    }

    pub fn finish(self) -> Vec<f32> {
        let rows = self.rows as f64;
        self.sum.into_iter().map(|s| (s / rows) as f32).collect()
    }
}

/// Candidate scales for `ratio` (duo scaling), normalised so that sqrt(max·min) = 1.
pub fn candidate(x_mean: &[f32], w_mean: &[f32], ratio: f32) -> Vec<f32> {
    let mut s: Vec<f32> = x_mean
        .iter()
        .zip(w_mean)
        .map(|(&x, &w)| (x.powf(ratio) / (w.powf(1.0 - ratio) + 1e-4)).max(1e-4))
        .collect();
    let (mn, mx) = s
        .iter()
        .fold((f32::INFINITY, 0f32), |(a, b), &v| (a.min(v), b.max(v)));
    let norm = (mx * mn).sqrt();
    for v in &mut s {
        *v /= norm;
        if !v.is_finite() {
            *v = 1.0;
        }
    }
    s
}

/// Largest |w| per input column over all `weights` (`[out, in]` each, same `in`).
pub fn col_absmax(weights: &[&Tensor]) -> Result<Vec<f32>> {
    let mut m = vec![0f32; weights[0].dim(1)?];
    for w in weights {
        col_absmax_into(&mut m, w)?;
    }
    Ok(m)
}

/// Raises `m` to each column's largest |value| of `w` (a maximum: exact in any order, so
/// rows are split over threads).
pub fn col_absmax_into(m: &mut [f32], w: &Tensor) -> Result<()> {
    const ROWS: usize = 64;
    let cols = m.len();
    let fold = |mut a: Vec<f32>, rows: &[f32]| {
        for row in rows.chunks_exact(cols) {
            a.iter_mut().zip(row).for_each(|(a, x)| *a = a.max(x.abs()));
        }
        a
    };
    let found = reduce::with_slice(w, |v| {
        v.par_chunks(cols * ROWS)
            .fold(|| vec![0f32; cols], fold)
            .reduce(|| vec![0f32; cols], |a, b| fold(a, &b))
    })?;
    m.iter_mut().zip(found).for_each(|(a, c)| *a = a.max(c));
    Ok(())
}

/// Whether the scaled weights `W · diag(s)` stay within float16's range. AutoAWQ scales and
/// quantizes in float16, where such a candidate becomes `inf` and is never chosen; our f32
/// search must reject it explicitly, or the written `scales` would be `inf`.
pub fn fits_f16(col_absmax: &[f32], s: &[f32]) -> bool {
    col_absmax
        .iter()
        .zip(s)
        .all(|(m, s)| m * s <= crate::model::F16_MAX)
}

/// `Q(W · diag(s)) · diag(s)⁻¹`: the weight a candidate produces, as a new tensor.
pub fn scaled_fake_quant(w: &Tensor, s: &[f32], group: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let mut v = w.flatten_all()?.to_vec1::<f32>()?;
    v.par_chunks_mut(inp).for_each(|row| {
        row.iter_mut().zip(s).for_each(|(x, s)| *x *= s);
        fake_quantize(row, group);
        row.iter_mut().zip(s).for_each(|(x, s)| *x /= s);
    });
    Ok(Tensor::from_vec(v, (out, inp), &Device::Cpu)?)
}

/// The loss of a single inspected linear `y = x·Wᵀ` as a quadratic form: with `E = W' − W`,
/// `mean((x·W'ᵀ − x·Wᵀ)²) = Σ_o e_o·G·e_oᵀ / (T·out)` where `G = xᵀx`. Same objective as running
/// the linear on every token; [`Gram::pays_off`] says when it is cheaper.
pub struct Gram {
    g: Tensor,
    tokens: usize,
}

impl Gram {
    pub fn new(x: &Tensor) -> Result<Self> {
        Ok(Self {
            g: matmul(&x.t()?, x)?,
            tokens: x.dim(0)?,
        })
    }

    /// Whether forming `G` once (T·in²) and `candidates` forms (out·in² each) costs less than
    /// `candidates` forward passes (T·in·out each).
    pub fn pays_off(tokens: usize, inp: usize, out: usize, candidates: usize) -> bool {
        let (t, i, o, c) = (tokens as f64, inp as f64, out as f64, candidates as f64);
        t * i * i + c * o * i * i < c * t * i * o
    }

    /// `XᵀX` as f64, `[in, in]` row-major (the Hessian error-feedback rounding needs).
    pub fn to_f64(&self) -> Result<Vec<f64>> {
        Ok(self
            .g
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .map(|&v| v as f64)
            .collect())
    }

    /// `mean((x·w_newᵀ − x·wᵀ)²)`.
    pub fn loss(&self, w: &Tensor, w_new: &Tensor) -> Result<f64> {
        let e = (w_new - w)?;
        let eg = matmul(&e, &self.g)?;
        let sum = reduce::with_slice(&e, |e| reduce::with_slice(&eg, |eg| reduce::dot(e, eg)))??;
        Ok(sum / (self.tokens * w.dim(0)?) as f64)
    }
}

/// Runs the grid. `loss(s)` returns the inspected module's MSE with the group's weights replaced
/// by their candidate for `s`.
pub fn search(
    x_mean: &[f32],
    w_mean: &[f32],
    grid: Grid,
    n_grid: usize,
    mut loss: impl FnMut(&[f32]) -> Result<f64>,
) -> Result<ScaleChoice> {
    let ones = vec![1f32; x_mean.len()];
    let identity_loss = loss(&ones)?;
    let mut best: Option<ScaleChoice> = match grid {
        Grid::Robust if identity_loss.is_finite() => Some(ScaleChoice {
            ratio: None,
            loss: identity_loss,
            identity_loss,
            scales: ones,
        }),
        _ => None,
    };
    for k in 0..n_grid {
        let ratio = k as f32 / n_grid as f32;
        let s = candidate(x_mean, w_mean, ratio);
        let l = loss(&s)?;
        if l.is_finite() && best.as_ref().is_none_or(|b| l < b.loss) {
            best = Some(ScaleChoice {
                ratio: Some(ratio),
                loss: l,
                identity_loss,
                scales: s,
            });
        }
    }
    best.ok_or_else(|| Error::Runtime("no scale candidate gave a finite loss".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The in-place mean is candle's `abs().mean(0)` bit for bit (the CI ratio fixture was
    /// recorded with the latter).
    #[test]
    fn x_mean_equals_candles_abs_mean() {
        let mut rng = crate::calib::SplitMix64::new(9);
        for (t, n) in [(1, 5), (7, 3), (1000, 64), (3333, 17), (4096, 33)] {
            let v: Vec<f32> = (0..t * n)
                .map(|_| (rng.next_u64() >> 40) as f32 / 1e5 - 80.0)
                .collect();
            let x = Tensor::from_vec(v, (t, n), &Device::Cpu).unwrap();
            let want = x.abs().unwrap().mean(0).unwrap().to_vec1::<f32>().unwrap();
            let got = x_mean(&x).unwrap();
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{t} x {n}"
            );
        }
    }

    /// The column-parallel `w_mean` and the row-parallel column maxima are the plain
    /// row-by-row loops bit for bit (the search's choices, and so the output bytes, follow them).
    #[test]
    fn parallel_weight_statistics_equal_the_sequential_loops() {
        let mut rng = crate::calib::SplitMix64::new(3);
        for (rows, cols, group) in [(1, 8, 8), (3, 64, 32), (200, 256, 128), (517, 384, 64)] {
            let v: Vec<f32> = (0..rows * cols)
                .map(|_| (rng.next_u64() >> 40) as f32 / 1e5 - 80.0)
                .collect();
            let w = Tensor::from_vec(v.clone(), (rows, cols), &Device::Cpu).unwrap();
            let mut sum = vec![0f64; cols];
            let mut absmax = vec![0f32; cols];
            for row in v.chunks(cols) {
                for (k, grp) in row.chunks(group).enumerate() {
                    let m = grp.iter().fold(0f32, |a, x| a.max(x.abs())) + 1e-6;
                    for (j, x) in grp.iter().enumerate() {
                        sum[k * group + j] += (x.abs() / m) as f64;
                        absmax[k * group + j] = absmax[k * group + j].max(x.abs());
                    }
                }
            }
            let want: Vec<u32> = (sum.iter())
                .map(|s| ((s / rows as f64) as f32).to_bits())
                .collect();
            let got = w_mean(&[&w], group).unwrap();
            assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want);
            assert_eq!(col_absmax(&[&w]).unwrap(), absmax, "{rows} x {cols}");
        }
    }

    #[test]
    fn a_candidate_that_overflows_float16_does_not_fit() {
        let w = Tensor::from_vec(vec![30000f32, -1.0, 2.0, 40000.0], (2, 2), &Device::Cpu).unwrap();
        let m = col_absmax(&[&w]).unwrap();
        assert_eq!(m, vec![30000.0, 40000.0]);
        assert!(fits_f16(&m, &[1.0, 1.0]));
        assert!(!fits_f16(&m, &[2.5, 1.0]));
        assert!(!fits_f16(&m, &[1.0, 1.7]));
    }

    #[test]
    fn candidate_is_normalised_and_finite() {
        let s = candidate(&[0.1, 1.0, 10.0], &[0.5, 0.5, 0.5], 0.5);
        let (mn, mx) = s
            .iter()
            .fold((f32::INFINITY, 0f32), |(a, b), &v| (a.min(v), b.max(v)));
        assert!(((mn * mx).sqrt() - 1.0).abs() < 1e-5);
        let z = candidate(&[0.0, 0.0], &[0.0, 0.0], 0.0);
        assert!(z.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn robust_grid_never_beats_identity_by_losing() {
        // A loss landscape where every scaled candidate is worse than the identity.
        let x = vec![1.0, 2.0, 3.0, 4.0];
        let w = vec![0.5; 4];
        let c = search(&x, &w, Grid::Robust, 20, |s| {
            Ok(1.0 + s.iter().map(|v| (v - 1.0).abs() as f64).sum::<f64>())
        })
        .unwrap();
        assert_eq!(c.ratio, None);
        assert!(c.loss <= c.identity_loss);
        let c = search(&x, &w, Grid::Autoawq, 20, |s| {
            Ok(1.0 + s.iter().map(|v| (v - 1.0).abs() as f64).sum::<f64>())
        })
        .unwrap();
        assert!(c.ratio.is_some());
    }
}

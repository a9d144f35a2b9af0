//! AWQ's clipping search (AWQ-SPEC §6.2): per output row and group, try shrinking the abs-max
//! to 1.00, 0.95, …, 0.55 and keep the one whose fake-quantized group reproduces the group's
//! partial dot products with the (subsampled) calibration input best.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::rtn::fake_quantize;
use crate::error::Result;
use crate::ops::matmul;

pub const N_GRID: usize = 20;
pub const MAX_SHRINK: f32 = 0.5;
pub const N_SAMPLE_TOKENS: usize = 512;

/// Every `max(1, T / 512)`-th token of `x: [T, in]` (AutoAWQ's `n_sample_token`). Idempotent:
/// a sample has at most 1023 rows, of which it keeps every one (the layer loop samples each
/// input once its search is done, and the clip search samples again).
pub fn subsample(x: &Tensor) -> Result<Tensor> {
    let t = x.dim(0)?;
    let step = (t / N_SAMPLE_TOKENS).max(1);
    if step == 1 {
        return Ok(x.clone());
    }
    let idx: Vec<u32> = (0..t).step_by(step).map(|i| i as u32).collect();
    let idx = Tensor::from_vec(idx.clone(), idx.len(), &Device::Cpu)?;
    Ok(x.index_select(&idx, 0)?)
}

/// The clamp bounds `[lo, hi]` of one group.
pub type Bounds = [f32; 2];

/// Best clamp bounds `[out·G]` (row-major) for `w: [out, in]` given the subsampled input
/// `x: [T', in]`.
///
/// AutoAWQ's search (`separate == false`) shrinks the group's abs-max `m0` symmetrically:
/// `±m0·(1 − i/20)`, `i < 10`. With `separate`, that result is refined one side at a time:
/// the upper bound over `max·(1 − i/20)` with the lower one fixed, then the lower bound over
/// `min·(1 − i/20)`, each kept only where it lowers the error further (zero-point quantization
/// has its own range on each side of zero, so a group's two tails can want different cuts).
///
/// The error of a candidate for row `o` and group `k` is AutoAWQ's `mean_t (x_tk·(q − w_ok))²`,
/// computed as the quadratic form `dᵀ·G_k·d / T'` with `d = q − w_ok` and `G_k = x_kᵀx_k`
/// (group × group, formed once per group): the same objective at `group` instead of `T'`
/// multiply-adds per element and candidate.
pub fn search(w: &Tensor, x: &Tensor, group: usize, separate: bool) -> Result<Vec<Bounds>> {
    let (out, inp) = w.dims2()?;
    let gs = inp / group;
    let tokens = x.dim(0)? as f32;
    let grams: Vec<Vec<f32>> = (0..gs)
        .map(|k| -> Result<Vec<f32>> {
            let xk = x.narrow(1, k * group, group)?.contiguous()?;
            Ok(matmul(&xk.t()?, &xk)?.flatten_all()?.to_vec1::<f32>()?)
        })
        .collect::<Result<_>>()?;
    let wv = w.flatten_all()?.to_vec1::<f32>()?;
    let steps = (MAX_SHRINK * N_GRID as f32) as usize;
    let factor = |i: usize| 1.0 - i as f32 / N_GRID as f32;
    let mut best = vec![[0f32; 2]; out * gs];
    best.par_chunks_mut(gs)
        .zip(wv.par_chunks(inp))
        .for_each(|(best_row, w_row)| {
            let mut scratch = Scratch::new(group);
            for (k, (best, wk)) in best_row.iter_mut().zip(w_row.chunks(group)).enumerate() {
                let mut err = |b: Bounds| scratch.error(wk, &grams[k], b, group) / tokens;
                let m0 = wk.iter().fold(0f32, |a, x| a.max(x.abs()));
                let mut best_err = 1e9f32;
                *best = [-m0, m0];
                for i in 0..steps {
                    let m = m0 * factor(i);
                    let e = err([-m, m]);
                    if e < best_err {
                        best_err = e;
                        *best = [-m, m];
                    }
                }
                if separate {
                    let (mn, mx) = wk
                        .iter()
                        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| {
                            (a.min(x), b.max(x))
                        });
                    for side in [1, 0] {
                        let end = if side == 1 { mx } else { mn };
                        for i in 0..steps {
                            let mut b = *best;
                            b[side] = end * factor(i);
                            let e = err(b);
                            if e < best_err {
                                best_err = e;
                                *best = b;
                            }
                        }
                    }
                }
            }
        });
    Ok(best)
}

/// Buffers for one row's candidate errors.
struct Scratch {
    q: Vec<f32>,
    d: Vec<f32>,
    gd: Vec<f32>,
}

impl Scratch {
    fn new(group: usize) -> Self {
        Self {
            q: vec![0.0; group],
            d: vec![0.0; group],
            gd: vec![0.0; group],
        }
    }

    /// `dᵀ·G·d` for the group `wk` clamped to `[lo, hi]` and fake-quantized.
    fn error(&mut self, wk: &[f32], g: &[f32], [lo, hi]: Bounds, group: usize) -> f32 {
        let Self { q, d, gd } = self;
        q.iter_mut().zip(wk).for_each(|(q, v)| *q = v.clamp(lo, hi));
        fake_quantize(q, group);
        d.iter_mut()
            .zip(q.iter().zip(wk))
            .for_each(|(d, (q, v))| *d = q - v);
        // G·d as a sum of G's rows (G is symmetric), which vectorizes.
        gd.fill(0.0);
        for (dj, g_row) in d.iter().zip(g.chunks(group)) {
            gd.iter_mut().zip(g_row).for_each(|(a, g)| *a += dj * g);
        }
        d.iter().zip(gd.iter()).map(|(a, b)| a * b).sum::<f32>()
    }
}

/// Clamps each group of `w: [out, in]` to its bounds.
pub fn apply(w: &Tensor, bounds: &[Bounds], group: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let mut v = w.flatten_all()?.to_vec1::<f32>()?;
    // Groups are consecutive in row-major order, so group index = position in `bounds`.
    v.par_chunks_mut(group).enumerate().for_each(|(idx, grp)| {
        let [lo, hi] = bounds[idx];
        grp.iter_mut().for_each(|x| *x = x.clamp(lo, hi));
    });
    Ok(Tensor::from_vec(v, (out, inp), &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calib::SplitMix64;

    fn random(rows: usize, cols: usize, rng: &mut SplitMix64, shift: f32) -> Tensor {
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| (rng.next_u64() % 2001) as f32 / 1000.0 - 1.0 + shift)
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    /// The layer loop samples an input once its search is done and the clip search samples
    /// again: the second must keep every row.
    #[test]
    fn subsample_of_a_subsample_is_itself() {
        for t in [
            1, 511, 512, 1023, 1024, 1025, 1535, 1536, 2047, 4096, 16384, 20000, 65537,
        ] {
            let x = Tensor::arange(0u32, t as u32, &Device::Cpu)
                .unwrap()
                .reshape((t, 1))
                .unwrap();
            let once = subsample(&x).unwrap();
            let twice = subsample(&once).unwrap();
            assert!(once.dim(0).unwrap() < 1024, "{t}");
            assert_eq!(
                once.flatten_all().unwrap().to_vec1::<u32>().unwrap(),
                twice.flatten_all().unwrap().to_vec1::<u32>().unwrap(),
                "{t}"
            );
        }
    }

    /// The summed objective of `bounds` over every row and group.
    fn total_error(w: &Tensor, x: &Tensor, bounds: &[Bounds], group: usize) -> f64 {
        let q = apply(w, bounds, group).unwrap();
        let (rows, cols) = q.dims2().unwrap();
        let mut qv = q.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for row in qv.chunks_mut(cols) {
            fake_quantize(row, group);
        }
        let q = Tensor::from_vec(qv, (rows, cols), &Device::Cpu).unwrap();
        // Per group: the partial dot products (the objective has no cross-group terms).
        (0..cols / group)
            .map(|k| {
                let part =
                    |t: &Tensor| t.narrow(1, k * group, group).unwrap().contiguous().unwrap();
                let xk = part(x);
                let y = |t: &Tensor| matmul(&xk, &part(t).t().unwrap()).unwrap();
                let d = (y(&q) - y(w)).unwrap();
                d.sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap() as f64
            })
            .sum()
    }

    /// Symmetric bounds are AutoAWQ's `±max_val`; refining each side separately never raises
    /// the objective (each side keeps a change only where it lowers it).
    #[test]
    fn separate_bounds_never_raise_the_clip_objective() {
        let mut rng = SplitMix64::new(7);
        for (shift, group) in [(0.0, 32), (0.4, 32), (-0.3, 64)] {
            let w = random(16, 128, &mut rng, shift);
            let x = random(96, 128, &mut rng, 0.0);
            let sym = search(&w, &x, group, false).unwrap();
            assert!(sym.iter().all(|[lo, hi]| *lo == -*hi && *hi > 0.0));
            let sep = search(&w, &x, group, true).unwrap();
            let (e_sym, e_sep) = (
                total_error(&w, &x, &sym, group),
                total_error(&w, &x, &sep, group),
            );
            assert!(e_sep <= e_sym * (1.0 + 1e-5), "{e_sep} vs {e_sym}");
        }
    }
}

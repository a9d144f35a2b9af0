//! AWQ's clipping search (AWQ-SPEC §6.2): per output row and group, try shrinking the abs-max
//! to 1.00, 0.95, …, 0.55 and keep the one whose fake-quantized group reproduces the group's
//! partial dot products with the (subsampled) calibration input best.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::rtn::fake_quantize;
use crate::error::Result;
use crate::ops::matmul;
use crate::quant::reduce;

pub const N_GRID: usize = 20;
pub const MAX_SHRINK: f32 = 0.5;
pub const N_SAMPLE_TOKENS: usize = 512;

/// Every `max(1, T / 512)`-th token of `x: [T, in]` (AutoAWQ's `n_sample_token`). Idempotent:
/// a sample has at most 1023 rows, of which it keeps every one (the layer loop samples each
/// input once its search is done, and the clip search samples again).
pub fn subsample(x: &Tensor) -> Result<Tensor> {
    let t = x.dim(0)?;
    let step = sample_step(t);
    if step == 1 {
        return Ok(x.clone());
    }
    let idx: Vec<u32> = (0..t).step_by(step).map(|i| i as u32).collect();
    let idx = Tensor::from_vec(idx.clone(), idx.len(), &Device::Cpu)?;
    Ok(x.index_select(&idx, 0)?)
}

/// [`subsample`] keeps every this-many-th of `rows` rows.
pub fn sample_step(rows: usize) -> usize {
    (rows / N_SAMPLE_TOKENS).max(1)
}

/// The clamp bounds `[lo, hi]` of one group.
pub type Bounds = [f32; 2];

/// How [`search`] cuts each group's range.
#[derive(Debug, Clone, Copy)]
pub enum Cut<'a> {
    /// AutoAWQ's: `±m0·(1 − i/20)`.
    Symmetric,
    /// Symmetric, then each side refined on its own.
    Separate,
    /// Separate where it generalises, symmetric elsewhere: both are searched on `fit` (a
    /// subsampled input, `[T'', in]`) and scored on `held` (another, of tokens `fit` lacks);
    /// where the separate bounds score lower for a row and group, that row and group gets the
    /// separate bounds searched on the input `x` (which may hold both), else the symmetric ones.
    Judged { fit: &'a Tensor, held: &'a Tensor },
}

/// Best clamp bounds `[out·G]` (row-major) for `w: [out, in]` given the subsampled input
/// `x: [T', in]`.
///
/// AutoAWQ's search ([`Cut::Symmetric`]) shrinks the group's abs-max `m0` symmetrically:
/// `±m0·(1 − i/20)`, `i < 10`. With [`Cut::Separate`], that result is refined one side at a time:
/// the upper bound over `max·(1 − i/20)` with the lower one fixed, then the lower bound over
/// `min·(1 − i/20)`, each kept only where it lowers the error further (zero-point quantization
/// has its own range on each side of zero, so a group's two tails can want different cuts).
///
/// The error of a candidate for row `o` and group `k` is AutoAWQ's `mean_t (x_tk·(q − w_ok))²`,
/// computed as the quadratic form `dᵀ·G_k·d / T'` with `d = q − w_ok` and `G_k = x_kᵀx_k`
/// (group × group, formed once per group): the same objective at `group` instead of `T'`
/// multiply-adds per element and candidate. A pass's candidates of every row are stacked as
/// one matrix `D` and multiplied by `G_k` at once (a GEMM, not one `G·d` per candidate).
pub fn search(w: &Tensor, x: &Tensor, group: usize, cut: Cut) -> Result<Vec<Bounds>> {
    let (out, inp) = w.dims2()?;
    let gs = inp / group;
    let wv = w.flatten_all()?.to_vec1::<f32>()?;
    let mut best = vec![[0f32; 2]; out * gs];
    for k in 0..gs {
        let pass = Pass::new(&wv, inp, k, group, x)?;
        let (symmetric, separate) = pass.cut(!matches!(cut, Cut::Symmetric))?;
        let chosen = match (cut, separate) {
            (Cut::Judged { fit, held }, Some(separate)) => {
                let wins = generalises(&wv, inp, k, group, fit, held)?;
                (wins.iter().zip(separate).zip(symmetric))
                    .map(|((yes, sep), sym)| if *yes { sep } else { sym })
                    .collect()
            }
            (_, Some(separate)) => separate,
            (_, None) => symmetric,
        };
        for (o, b) in chosen.into_iter().enumerate() {
            best[o * gs + k] = b;
        }
    }
    Ok(best)
}

/// Per row of group `k` of `w: [out, inp]`: whether separate bounds searched on `fit` score
/// lower on `held` than the symmetric bounds searched on `fit`.
fn generalises(
    w: &[f32],
    inp: usize,
    k: usize,
    group: usize,
    fit: &Tensor,
    held: &Tensor,
) -> Result<Vec<bool>> {
    let (symmetric, separate) = Pass::new(w, inp, k, group, fit)?.cut(true)?;
    let separate = separate.expect("asked for");
    let judge = Pass::new(w, inp, k, group, held)?;
    let (e_sym, e_sep) = (judge.errors_of(&symmetric)?, judge.errors_of(&separate)?);
    Ok(e_sep.iter().zip(&e_sym).map(|(a, b)| a < b).collect())
}

/// Shrink steps: `1 − i/20` for `i < 10`.
const STEPS: usize = (MAX_SHRINK * N_GRID as f32) as usize;

fn factor(i: usize) -> f32 {
    1.0 - i as f32 / N_GRID as f32
}

/// Rows at most per GEMM: bounds `D` at `ROWS × STEPS × group` floats (21 MB at group 128).
const ROWS: usize = 4096;

/// One group's search: the weights' column block `k` and its Gram matrix.
struct Pass<'a> {
    w: &'a [f32],
    inp: usize,
    k: usize,
    group: usize,
    gram: Tensor,
    tokens: f32,
}

impl<'a> Pass<'a> {
    /// Group `k` of `w: [out, inp]` (row-major) against the input `x: [T', inp]`.
    fn new(w: &'a [f32], inp: usize, k: usize, group: usize, x: &Tensor) -> Result<Self> {
        let xk = x.narrow(1, k * group, group)?.contiguous()?;
        Ok(Pass {
            w,
            inp,
            k,
            group,
            gram: matmul(&xk.t()?, &xk)?,
            tokens: x.dim(0)? as f32,
        })
    }

    /// Each row's symmetric bounds and, with `separate`, the separate ones refined from them.
    fn cut(&self, separate: bool) -> Result<(Vec<Bounds>, Option<Vec<Bounds>>)> {
        let (symmetric, err) = self.symmetric()?;
        if !separate {
            return Ok((symmetric, None));
        }
        let (mut refined, mut refined_err) = (symmetric.clone(), err);
        for side in [1, 0] {
            self.refine(side, &mut refined, &mut refined_err)?;
        }
        Ok((symmetric, Some(refined)))
    }

    /// The error of one bound per row (`bounds: [out]`).
    fn errors_of(&self, bounds: &[Bounds]) -> Result<Vec<f32>> {
        self.errors(1, |o, c| c[0] = bounds[o])
    }

    /// Row `o`'s weights of this group.
    fn row(&self, o: usize) -> &[f32] {
        &self.w[o * self.inp + self.k * self.group..][..self.group]
    }

    fn rows(&self) -> usize {
        self.w.len() / self.inp
    }

    /// AutoAWQ's symmetric search: each row's first best of `±m0·factor(i)` (error below 1e9).
    fn symmetric(&self) -> Result<(Vec<Bounds>, Vec<f32>)> {
        let cands = |o: usize, c: &mut [Bounds]| {
            let m0 = self.row(o).iter().fold(0f32, |a, x| a.max(x.abs()));
            for (i, b) in c.iter_mut().enumerate() {
                *b = [-m0 * factor(i), m0 * factor(i)];
            }
        };
        let errs = self.errors(STEPS, cands)?;
        let mut best = Vec::with_capacity(self.rows());
        let mut best_err = Vec::with_capacity(self.rows());
        for (o, e_row) in errs.chunks(STEPS).enumerate() {
            let m0 = self.row(o).iter().fold(0f32, |a, x| a.max(x.abs()));
            let (mut b, mut be) = ([-m0, m0], 1e9f32);
            for (i, &e) in e_row.iter().enumerate() {
                if e < be {
                    (b, be) = ([-m0 * factor(i), m0 * factor(i)], e);
                }
            }
            best.push(b);
            best_err.push(be);
        }
        Ok((best, best_err))
    }

    /// Moves one side (`1`: upper, `0`: lower) of each row's bounds over `end·factor(i)`,
    /// keeping a step only where it lowers the error (`best` and `best_err` are `[out]`).
    fn refine(&self, side: usize, best: &mut [Bounds], best_err: &mut [f32]) -> Result<()> {
        let end = |o: usize| {
            let r = self.row(o).iter();
            match side {
                1 => r.fold(f32::NEG_INFINITY, |a, &x| a.max(x)),
                _ => r.fold(f32::INFINITY, |a, &x| a.min(x)),
            }
        };
        let step = |base: Bounds, o: usize, i: usize| {
            let mut b = base;
            b[side] = end(o) * factor(i);
            b
        };
        let errs = self.errors(STEPS, |o, c| {
            for (i, b) in c.iter_mut().enumerate() {
                *b = step(best[o], o, i);
            }
        })?;
        for (o, e_row) in errs.chunks(STEPS).enumerate() {
            let base = best[o];
            let (mut b, mut be) = (base, best_err[o]);
            for (i, &e) in e_row.iter().enumerate() {
                if e < be {
                    (b, be) = (step(base, o, i), e);
                }
            }
            best[o] = b;
            best_err[o] = be;
        }
        Ok(())
    }

    /// `dᵀ·G·d / T'` of every row's `n ≤ STEPS` candidates (`[out, n]` row-major), where
    /// `cands(o, c)` fills row `o`'s candidate bounds and `d` is the group clamped to a
    /// candidate, fake-quantized, minus the group.
    fn errors(&self, n: usize, cands: impl Fn(usize, &mut [Bounds]) + Sync) -> Result<Vec<f32>> {
        let (rows, group) = (self.rows(), self.group);
        let mut errs = vec![0f32; rows * n];
        for (c, errs) in errs.chunks_mut(ROWS * n).enumerate() {
            let first = c * ROWS;
            let mut d = vec![0f32; errs.len() * group];
            d.par_chunks_mut(n * group)
                .enumerate()
                .for_each(|(r, d_row)| {
                    let (o, mut bounds) = (first + r, [[0f32; 2]; STEPS]);
                    let bounds = &mut bounds[..n];
                    cands(o, bounds);
                    let wk = self.row(o);
                    for (d, &[lo, hi]) in d_row.chunks_mut(group).zip(bounds.iter()) {
                        d.iter_mut().zip(wk).for_each(|(d, v)| *d = v.clamp(lo, hi));
                        fake_quantize(d, group);
                        d.iter_mut().zip(wk).for_each(|(d, v)| *d -= v);
                    }
                });
            let n = errs.len();
            let d = Tensor::from_vec(d, (n, group), &Device::Cpu)?;
            let gd = matmul(&d, &self.gram)?;
            let tokens = self.tokens;
            reduce::with_slice(&d, |d| {
                reduce::with_slice(&gd, |gd| {
                    errs.par_iter_mut()
                        .zip(d.par_chunks(group).zip(gd.par_chunks(group)))
                        .for_each(|(e, (d, gd))| {
                            *e = d.iter().zip(gd).map(|(a, b)| a * b).sum::<f32>() / tokens
                        })
                })
            })??;
        }
        Ok(errs)
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
            let sym = search(&w, &x, group, Cut::Symmetric).unwrap();
            assert!(sym.iter().all(|[lo, hi]| *lo == -*hi && *hi > 0.0));
            let sep = search(&w, &x, group, Cut::Separate).unwrap();
            let (e_sym, e_sep) = (
                total_error(&w, &x, &sym, group),
                total_error(&w, &x, &sep, group),
            );
            assert!(e_sep <= e_sym * (1.0 + 1e-5), "{e_sep} vs {e_sym}");
        }
    }

    /// `Cut::Judged` with `fit` the whole input takes, per row and group, the symmetric or the
    /// separate bounds, whichever is lower on the held-out input: never worse there than
    /// either alone.
    #[test]
    fn judged_bounds_are_the_better_side_on_the_held_out_input() {
        let mut rng = SplitMix64::new(11);
        for (shift, group) in [(0.0, 32), (0.4, 32), (-0.3, 64)] {
            let w = random(16, 128, &mut rng, shift);
            let (x, held) = (
                random(96, 128, &mut rng, 0.0),
                random(40, 128, &mut rng, 0.1),
            );
            let sym = search(&w, &x, group, Cut::Symmetric).unwrap();
            let sep = search(&w, &x, group, Cut::Separate).unwrap();
            let cut = Cut::Judged {
                fit: &x,
                held: &held,
            };
            let judged = search(&w, &x, group, cut).unwrap();
            for ((j, a), b) in judged.iter().zip(&sym).zip(&sep) {
                assert!(j == a || j == b, "{j:?} is neither {a:?} nor {b:?}");
            }
            let on_held = |b: &[Bounds]| total_error(&w, &held, b, group);
            let (e_j, e_sym, e_sep) = (on_held(&judged), on_held(&sym), on_held(&sep));
            assert!(
                e_j <= e_sym.min(e_sep) * (1.0 + 1e-4),
                "{e_j} vs {e_sym}, {e_sep}"
            );
        }
    }
}

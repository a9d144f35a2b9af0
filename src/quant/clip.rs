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

/// Every `max(1, T / 512)`-th token of `x: [T, in]`.
pub fn subsample(x: &Tensor) -> Result<Tensor> {
    let t = x.dim(0)?;
    let step = (t / N_SAMPLE_TOKENS).max(1);
    let idx: Vec<u32> = (0..t).step_by(step).map(|i| i as u32).collect();
    let idx = Tensor::from_vec(idx.clone(), idx.len(), &Device::Cpu)?;
    Ok(x.index_select(&idx, 0)?)
}

/// Best clip value `[out, G]` for `w: [out, in]` given the subsampled input `x: [T', in]`.
///
/// The error of a candidate for row `o` and group `k` is AutoAWQ's `mean_t (x_tk·(q − w_ok))²`,
/// computed as the quadratic form `dᵀ·G_k·d / T'` with `d = q − w_ok` and `G_k = x_kᵀx_k`
/// (group × group, formed once per group): the same objective at `group` instead of `T'`
/// multiply-adds per element and candidate.
pub fn search(w: &Tensor, x: &Tensor, group: usize) -> Result<Vec<f32>> {
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
    let mut best_max = vec![0f32; out * gs];
    best_max
        .par_chunks_mut(gs)
        .zip(wv.par_chunks(inp))
        .for_each(|(best_row, w_row)| {
            let (mut q, mut d, mut gd) = (vec![0f32; group], vec![0f32; group], vec![0f32; group]);
            for (k, (best, wk)) in best_row.iter_mut().zip(w_row.chunks(group)).enumerate() {
                let g = &grams[k];
                let m0 = wk.iter().fold(0f32, |a, x| a.max(x.abs()));
                let mut best_err = 1e9f32;
                *best = m0;
                for i in 0..steps {
                    let factor = 1.0 - i as f32 / N_GRID as f32;
                    let m = m0 * factor;
                    q.iter_mut().zip(wk).for_each(|(q, v)| *q = v.clamp(-m, m));
                    fake_quantize(&mut q, group);
                    d.iter_mut()
                        .zip(q.iter().zip(wk))
                        .for_each(|(d, (q, v))| *d = q - v);
                    // G·d as a sum of G's rows (G is symmetric), which vectorizes.
                    gd.fill(0.0);
                    for (dj, g_row) in d.iter().zip(g.chunks(group)) {
                        gd.iter_mut().zip(g_row).for_each(|(a, g)| *a += dj * g);
                    }
                    let err = d.iter().zip(&gd).map(|(a, b)| a * b).sum::<f32>() / tokens;
                    if err < best_err {
                        best_err = err;
                        *best = m;
                    }
                }
            }
        });
    Ok(best_max)
}

/// Clamps each group of `w: [out, in]` to ±its clip value.
pub fn apply(w: &Tensor, max_val: &[f32], group: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let mut v = w.flatten_all()?.to_vec1::<f32>()?;
    // Groups are consecutive in row-major order, so group index = position in `max_val`.
    v.par_chunks_mut(group).enumerate().for_each(|(idx, grp)| {
        let m = max_val[idx];
        grp.iter_mut().for_each(|x| *x = x.clamp(-m, m));
    });
    Ok(Tensor::from_vec(v, (out, inp), &Device::Cpu)?)
}

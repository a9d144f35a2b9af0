//! AWQ's clipping search (AWQ-SPEC §6.2): per output row and group, try shrinking the abs-max
//! to 1.00, 0.95, …, 0.55 and keep the one whose fake-quantized group reproduces the group's
//! partial dot products with the (subsampled) calibration input best.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::rtn::fake_quantize;
use crate::error::Result;

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
pub fn search(w: &Tensor, x: &Tensor, group: usize) -> Result<Vec<f32>> {
    let (out, inp) = w.dims2()?;
    let gs = inp / group;
    let wv = w.to_vec2::<f32>()?;
    let mut best_max = vec![0f32; out * gs];
    for k in 0..gs {
        let xk = x.narrow(1, k * group, group)?.contiguous()?;
        let wk: Vec<f32> = wv
            .iter()
            .flat_map(|r| r[k * group..(k + 1) * group].iter().copied())
            .collect();
        let m0: Vec<f32> = wk
            .chunks(group)
            .map(|g| g.iter().fold(0f32, |a, x| a.max(x.abs())))
            .collect();
        let wk_t = Tensor::from_vec(wk.clone(), (out, group), &Device::Cpu)?;
        let reference = xk.matmul(&wk_t.t()?)?;
        let mut best_err = vec![1e9f32; out];
        let mut best = m0.clone();
        for i in 0..(MAX_SHRINK * N_GRID as f32) as usize {
            let factor = 1.0 - i as f32 / N_GRID as f32;
            let mut wq = wk.clone();
            wq.par_chunks_mut(group).zip(&m0).for_each(|(row, &m)| {
                let m = m * factor;
                row.iter_mut().for_each(|v| *v = v.clamp(-m, m));
                fake_quantize(row, group);
            });
            let wq = Tensor::from_vec(wq, (out, group), &Device::Cpu)?;
            let err = (xk.matmul(&wq.t()?)? - &reference)?
                .sqr()?
                .mean(0)?
                .to_vec1::<f32>()?;
            for o in 0..out {
                if err[o] < best_err[o] {
                    best_err[o] = err[o];
                    best[o] = m0[o] * factor;
                }
            }
        }
        for o in 0..out {
            best_max[o * gs + k] = best[o];
        }
    }
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

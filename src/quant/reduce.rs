//! Deterministic f64 reductions over f32 data: fixed-size chunks are summed in parallel and the
//! partial sums added in order, so a loss — and therefore every choice made from it — does not
//! depend on `RAYON_NUM_THREADS`. Also the zero-copy view of a CPU tensor they run on.

use candle_core::{Storage, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};

const CHUNK: usize = 1 << 14;

fn chunked(n: usize, f: impl Fn(std::ops::Range<usize>) -> f64 + Sync) -> f64 {
    let parts: Vec<f64> = (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| f(c * CHUNK..((c + 1) * CHUNK).min(n)))
        .collect();
    parts.into_iter().sum()
}

/// `Σ a·b`.
pub fn dot(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    chunked(a.len(), |r| {
        a[r.clone()]
            .iter()
            .zip(&b[r])
            .map(|(x, y)| (x * y) as f64)
            .sum()
    })
}

/// `Σ (a − b)²`.
pub fn sq_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    chunked(a.len(), |r| {
        a[r.clone()]
            .iter()
            .zip(&b[r])
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum()
    })
}

/// Runs `f` on the elements of an f32 CPU tensor in row-major order, without copying when the
/// tensor is already contiguous.
pub fn with_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => {
            let all = cpu.as_slice::<f32>()?;
            let start = layout.start_offset();
            Ok(f(&all[start..start + t.elem_count()]))
        }
        _ => Err(Error::Runtime("expected an f32 tensor on the CPU".into())),
    }
}

/// Mean of `(a − b)²` over all elements.
pub fn mse(a: &Tensor, b: &Tensor) -> Result<f64> {
    let n = a.elem_count() as f64;
    with_slice(a, |a| with_slice(b, |b| sq_diff(a, b) / n))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reductions_match_a_plain_sum() {
        let a: Vec<f32> = (0..100_000)
            .map(|i| ((i * 7919) % 1000) as f32 / 999.0)
            .collect();
        let b: Vec<f32> = a.iter().map(|x| 1.0 - x).collect();
        let plain: f64 = a.iter().zip(&b).map(|(x, y)| (x * y) as f64).sum();
        assert!((dot(&a, &b) - plain).abs() < 1e-9 * plain.abs());
        let ta = Tensor::from_slice(&a, (1000, 100), &candle_core::Device::Cpu).unwrap();
        let tb = Tensor::from_slice(&b, (1000, 100), &candle_core::Device::Cpu).unwrap();
        let plain: f64 = a
            .iter()
            .zip(&b)
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum::<f64>()
            / a.len() as f64;
        assert!((mse(&ta, &tb).unwrap() - plain).abs() < 1e-12);
        // A strided view is read in row-major order too.
        let t = ta.t().unwrap();
        let copy = t.contiguous().unwrap();
        assert_eq!(mse(&t, &copy).unwrap(), 0.0);
    }
}

//! The counted matmul every hot path uses, and fused CPU kernels for the hot elementwise steps of the scale search. The MLP candidate loop
//! evaluates `silu(gate)·up` over every calibration token 21 times per layer; candle runs `silu`
//! and `mul` as two single-threaded passes with a temporary, this runs one parallel pass.
//! Elementwise only (no reductions), so results are the same bits for any thread count and
//! identical to candle's `x / (1 + exp(−x)) · y`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::Result;

struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (Some((a0, a1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            bail!("silu-mul needs contiguous inputs")
        };
        if l1.shape() != l2.shape() {
            bail!(
                "silu-mul shapes differ: {:?} vs {:?}",
                l1.shape(),
                l2.shape()
            )
        }
        let (a, b) = (
            &s1.as_slice::<f32>()?[a0..a1],
            &s2.as_slice::<f32>()?[b0..b1],
        );
        let mut out = vec![0f32; a.len()];
        const CHUNK: usize = 1 << 14;
        out.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
            .for_each(|(o, (a, b))| {
                for ((o, &x), &y) in o.iter_mut().zip(a).zip(b) {
                    *o = x / ((-x).exp() + 1.0) * y;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `silu(gate) · up` for two f32 tensors of the same shape.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok(gate
        .contiguous()?
        .apply_op2_no_bwd(&up.contiguous()?, &SiluMul)?)
}

/// Matmul FLOPs and wall time since start, for the report's work rate: every matmul of the
/// forward pass, the search and the clip goes through [`matmul`].
static MATMUL_FLOP: AtomicU64 = AtomicU64::new(0);
static MATMUL_NANOS: AtomicU64 = AtomicU64::new(0);

/// `a · b` (batched like candle's `matmul`), counted.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let start = Instant::now();
    let y = a.matmul(b)?;
    let dims = a.dims();
    let k = dims[dims.len() - 1] as u64;
    MATMUL_FLOP.fetch_add(2 * k * y.elem_count() as u64, Ordering::Relaxed);
    MATMUL_NANOS.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    Ok(y)
}

/// Adds work done outside [`matmul`] (the fused attention's block products) to the totals.
pub fn record_matmul(flop: u64, elapsed: std::time::Duration) {
    MATMUL_FLOP.fetch_add(flop, Ordering::Relaxed);
    MATMUL_NANOS.fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
}

/// `(GFLOP, seconds)` spent in [`matmul`] so far.
pub fn matmul_totals() -> (f64, f64) {
    (
        MATMUL_FLOP.load(Ordering::Relaxed) as f64 / 1e9,
        MATMUL_NANOS.load(Ordering::Relaxed) as f64 / 1e9,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn equals_candle_silu_times_up() {
        let g = Tensor::randn(0f32, 3.0, (37, 100), &Device::Cpu).unwrap();
        let u = Tensor::randn(0f32, 1.0, (37, 100), &Device::Cpu).unwrap();
        let want = (g.silu().unwrap() * &u).unwrap();
        let got = silu_mul(&g, &u).unwrap();
        assert_eq!(
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
}

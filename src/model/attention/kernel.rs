//! Fused causal attention for the CPU forward: the layer forward, every candidate of the
//! attention group's scale search, and `awq eval` all run it.
//!
//! Why fused: the unfused path materialised scores and probabilities for a batch of sequences ×
//! heads × query block × keys, applied the mask and the softmax as separate passes, and copied
//! q/k/v for rope and the head layout — memory traffic that dominated the search on small and
//! mid shapes. Here each task (sequence, key/value head, block of queries) gathers its keys and
//! values once, applies rope while gathering, and walks the visible key blocks with the online
//! softmax of FlashAttention (Dao et al. 2022): a running maximum and sum per query row, so no
//! `[seq × seq]` tensor is ever allocated. Grouped-query heads share their key/value head's
//! gathered rows instead of repeating them. Block products go through the `gemm` crate (its
//! runtime-selected AVX2/AVX-512 kernels). f32 throughout; each task is computed serially, so
//! results do not depend on the thread count.

use gemm::Parallelism;
use rayon::prelude::*;

/// Queries per task.
const BLOCK_Q: usize = 128;
/// Keys per step of the online softmax.
const BLOCK_K: usize = 128;

/// How activations are rounded to a serving dtype (see
/// [`super::config::ModelSpec::serve_dtype`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rounding {
    F16,
    BF16,
}

impl Rounding {
    /// From the spec's `serve_dtype` (`None`: f32, no rounding).
    pub fn from_dtype(dtype: Option<candle_core::DType>) -> Option<Self> {
        match dtype {
            Some(candle_core::DType::F16) => Some(Rounding::F16),
            Some(candle_core::DType::BF16) => Some(Rounding::BF16),
            _ => None,
        }
    }

    fn apply(self, x: f32) -> f32 {
        match self {
            Rounding::F16 => half::f16::from_f32(x).to_f32(),
            Rounding::BF16 => half::bf16::from_f32(x).to_f32(),
        }
    }
}

/// Rotary position embedding of q and k: tables `[positions ≥ seq_len, dim / 2]`, row-major,
/// applied to the first `dim` features of every head (`partial_rotary_factor`: Phi-3, StableLM),
/// the rest passing unchanged.
#[derive(Debug, Clone, Copy)]
pub struct Rotary<'a> {
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    /// Rotated features per head (even, ≤ head_dim).
    pub dim: usize,
    /// Pairs `(2i, 2i+1)` rotate together (Cohere's `rotate_half` over even/odd features)
    /// instead of `(i, i + dim/2)` (transformers' and candle's default "rotate half").
    pub interleaved: bool,
}

impl Rotary<'_> {
    /// `row` ← `src` rotated to position `p`.
    fn apply(&self, src: &[f32], row: &mut [f32], p: usize) {
        let half = self.dim / 2;
        let (cos, sin) = (&self.cos[p * half..][..half], &self.sin[p * half..][..half]);
        if self.interleaved {
            for i in 0..half {
                let (x1, x2) = (src[2 * i], src[2 * i + 1]);
                row[2 * i] = x1 * cos[i] - x2 * sin[i];
                row[2 * i + 1] = x2 * cos[i] + x1 * sin[i];
            }
        } else {
            for i in 0..half {
                let (x1, x2) = (src[i], src[i + half]);
                // candle's `rope`, operation for operation.
                row[i] = x1 * cos[i] - x2 * sin[i];
                row[i + half] = x1 * sin[i] + x2 * cos[i];
            }
        }
        row[self.dim..].copy_from_slice(&src[self.dim..]);
    }
}

/// One causal self-attention over `n` sequences of `seq_len` tokens.
#[derive(Debug, Clone, Copy)]
pub struct Kernel<'a> {
    pub seq_len: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies the queries before q·kᵀ (1/√head_dim for the Llama family).
    pub scale: f32,
    /// A query at position i sees keys j with `i − j < window` (Mistral's sliding window).
    pub window: Option<usize>,
    /// Logit soft-capping: scores become `cap · tanh(score / cap)` (Gemma 2).
    pub softcap: Option<f32>,
    /// Rotary position embedding applied to q and k.
    pub rotary: Rotary<'a>,
    /// Round q and k after rope, the scores and the output (`awq eval --dtype`).
    pub round: Option<Rounding>,
}

impl Kernel<'_> {
    /// Attention context `[tokens, heads · head_dim]` (row-major) for `q: [tokens, heads ·
    /// head_dim]` and `k`, `v: [tokens, kv_heads · head_dim]`, where `tokens = n · seq_len`
    /// and rope is not yet applied to `q` and `k`. Panics when the shapes disagree (callers
    /// build them from the same spec).
    pub fn forward(&self, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
        let (hd, h, kvh, l) = (self.head_dim, self.heads, self.kv_heads, self.seq_len);
        let rot = self.rotary.dim;
        assert!(h % kvh == 0 && rot.is_multiple_of(2) && rot <= hd && l > 0);
        let tokens = q.len() / (h * hd);
        assert_eq!(q.len(), tokens * h * hd);
        assert_eq!(k.len(), tokens * kvh * hd);
        assert_eq!(v.len(), tokens * kvh * hd);
        assert!(self.rotary.cos.len() >= l * rot / 2 && self.rotary.sin.len() >= l * rot / 2);
        let n = tokens / l;
        let q_blocks = l.div_ceil(BLOCK_Q);
        let tasks: Vec<(usize, usize, usize)> = (0..n)
            .flat_map(|s| (0..kvh).flat_map(move |g| (0..q_blocks).map(move |b| (s, g, b))))
            .collect();
        let results: Vec<Vec<f32>> = tasks
            .par_iter()
            .map(|&(s, g, b)| self.task(q, k, v, s, g, b))
            .collect();
        let rep = h / kvh;
        let mut out = vec![0f32; q.len()];
        for (&(s, g, b), res) in tasks.iter().zip(&results) {
            let r0 = b * BLOCK_Q;
            let rows = BLOCK_Q.min(l - r0);
            for (local, head) in (g * rep..(g + 1) * rep).enumerate() {
                for i in 0..rows {
                    let src = &res[(local * rows + i) * hd..][..hd];
                    let t = s * l + r0 + i;
                    out[(t * h + head) * hd..][..hd].copy_from_slice(src);
                }
            }
        }
        out
    }

    /// Multiply–accumulate count of [`Kernel::forward`] (q·kᵀ and p·v over the visible
    /// blocks), for the work report.
    pub fn flop(&self, tokens: usize) -> u64 {
        let per_seq: usize = (0..self.seq_len.div_ceil(BLOCK_Q))
            .map(|b| {
                let r0 = b * BLOCK_Q;
                let r1 = (r0 + BLOCK_Q).min(self.seq_len);
                (r1 - r0) * (r1 - self.first_key(r0))
            })
            .sum();
        (4 * per_seq * self.head_dim * self.heads * (tokens / self.seq_len)) as u64
    }

    /// The first key any query of a block starting at `r0` can see.
    fn first_key(&self, r0: usize) -> usize {
        self.window.map_or(0, |w| (r0 + 1).saturating_sub(w))
    }

    /// Queries `b·BLOCK_Q..` of sequence `s` for every head of key/value head `g`:
    /// `[rep, rows, head_dim]`.
    fn task(&self, q: &[f32], k: &[f32], v: &[f32], s: usize, g: usize, b: usize) -> Vec<f32> {
        let (hd, l) = (self.head_dim, self.seq_len);
        let rep = self.heads / self.kv_heads;
        let r0 = b * BLOCK_Q;
        let r1 = (r0 + BLOCK_Q).min(l);
        let k0 = self.first_key(r0);
        let keys = self.gather(k, self.kv_heads, s, g, k0..r1, 1.0);
        let values = self.gather_plain(v, s, g, k0..r1);
        let mut out = Vec::with_capacity(rep * (r1 - r0) * hd);
        for head in g * rep..(g + 1) * rep {
            let queries = self.gather(q, self.heads, s, head, r0..r1, self.scale);
            out.extend(self.block(&queries, &keys, &values, r0, k0));
        }
        out
    }

    /// Rows `pos` of head `head` of sequence `s` from `x: [tokens, n_heads · head_dim]`, with
    /// rope applied at their positions, then multiplied by `scale` and rounded.
    fn gather(
        &self,
        x: &[f32],
        n_heads: usize,
        s: usize,
        head: usize,
        pos: std::ops::Range<usize>,
        scale: f32,
    ) -> Vec<f32> {
        let hd = self.head_dim;
        let mut out = vec![0f32; pos.len() * hd];
        for (row, p) in out.chunks_exact_mut(hd).zip(pos) {
            let src = &x[((s * self.seq_len + p) * n_heads + head) * hd..][..hd];
            self.rotary.apply(src, row, p);
            if let Some(r) = self.round {
                row.iter_mut().for_each(|x| *x = r.apply(*x));
            }
            if scale != 1.0 {
                row.iter_mut().for_each(|x| *x *= scale);
            }
        }
        out
    }

    /// Rows `pos` of key/value head `g` of sequence `s` from `v`, as they are.
    fn gather_plain(&self, v: &[f32], s: usize, g: usize, pos: std::ops::Range<usize>) -> Vec<f32> {
        let hd = self.head_dim;
        let mut out = Vec::with_capacity(pos.len() * hd);
        for p in pos {
            out.extend_from_slice(&v[((s * self.seq_len + p) * self.kv_heads + g) * hd..][..hd]);
        }
        out
    }

    /// Attention of `queries` (positions `r0..`) over `keys`/`values` (positions `k0..`):
    /// `[rows, head_dim]`. Rows whose visible keys fit one step of [`BLOCK_K`] keys take the
    /// two-pass softmax ([`Kernel::single_step`]); longer ones the online recurrence.
    fn block(
        &self,
        queries: &[f32],
        keys: &[f32],
        values: &[f32],
        r0: usize,
        k0: usize,
    ) -> Vec<f32> {
        if keys.len() / self.head_dim <= BLOCK_K {
            return self.single_step(queries, keys, values, r0, k0);
        }
        let hd = self.head_dim;
        let rows = queries.len() / hd;
        let n_keys = keys.len() / hd;
        let mut max = vec![f32::NEG_INFINITY; rows];
        let mut sum = vec![0f32; rows];
        let mut acc = vec![0f32; rows * hd];
        let mut scores = vec![0f32; rows * BLOCK_K];
        for kb in (0..n_keys).step_by(BLOCK_K) {
            let width = BLOCK_K.min(n_keys - kb);
            let sc = &mut scores[..rows * width];
            self.scores(sc, queries, &keys[kb * hd..][..width * hd]);
            for i in 0..rows {
                let row = &mut sc[i * width..][..width];
                let m_new = self.mask_and_max(row, r0 + i, k0 + kb).max(max[i]);
                if m_new == f32::NEG_INFINITY {
                    // Nothing visible yet in this row.
                    row.iter_mut().for_each(|x| *x = 0.0);
                    continue;
                }
                let correction = (max[i] - m_new).exp();
                sum[i] = sum[i] * correction + exp_shifted(row, m_new);
                max[i] = m_new;
                if correction != 1.0 {
                    acc[i * hd..][..hd]
                        .iter_mut()
                        .for_each(|a| *a *= correction);
                }
            }
            self.weighted_values(&mut acc, sc, &values[kb * hd..][..width * hd], true);
        }
        for (row, s) in acc.chunks_exact_mut(hd).zip(&sum) {
            for a in row.iter_mut() {
                *a /= s;
                if let Some(r) = self.round {
                    *a = r.apply(*a);
                }
            }
        }
        acc
    }

    /// [`Kernel::block`] when every row's visible keys fit one step: the unfused softmax,
    /// operation for operation as candle's `softmax_last_dim` (the libm exponential, its
    /// summation order, probabilities normalised before the value product), so sequences of
    /// up to [`BLOCK_K`] tokens give the unfused path's results bit for bit on x86-64 and the
    /// CI ratio fixture (recorded before the fused kernel) still holds. The online recurrence
    /// cannot: rescaling and deferred normalisation round differently, and a near-tie of the
    /// scale search can flip on such a difference.
    fn single_step(
        &self,
        queries: &[f32],
        keys: &[f32],
        values: &[f32],
        r0: usize,
        k0: usize,
    ) -> Vec<f32> {
        let hd = self.head_dim;
        let (rows, width) = (queries.len() / hd, keys.len() / hd);
        let mut probs = vec![0f32; rows * width];
        self.scores(&mut probs, queries, keys);
        for (i, row) in probs.chunks_exact_mut(width).enumerate() {
            let m = self.mask_and_max(row, r0 + i, k0);
            if m == f32::NEG_INFINITY {
                row.iter_mut().for_each(|x| *x = 0.0);
                continue;
            }
            row.iter_mut().for_each(|x| *x = (*x - m).exp());
            let sum = candle_sum(row);
            for p in row.iter_mut() {
                *p /= sum;
                if let Some(r) = self.round {
                    *p = r.apply(*p);
                }
            }
        }
        let mut out = vec![0f32; rows * hd];
        self.weighted_values(&mut out, &probs, values, false);
        if let Some(r) = self.round {
            out.iter_mut().for_each(|a| *a = r.apply(*a));
        }
        out
    }

    /// `scores[rows × width] = queries[rows × hd] · keys[width × hd]ᵀ` (row-major).
    fn scores(&self, scores: &mut [f32], queries: &[f32], keys: &[f32]) {
        // keys read as a [hd × width] view: element (c, j) at j·hd + c.
        product(
            scores,
            queries,
            keys,
            self.head_dim,
            (1, self.head_dim),
            false,
        );
    }

    /// `out[rows × hd] (+)= probs[rows × width] · values[width × hd]` (row-major); adds to
    /// `out` when `accumulate`, overwrites it otherwise.
    fn weighted_values(&self, out: &mut [f32], probs: &[f32], values: &[f32], accumulate: bool) {
        let width = values.len() / self.head_dim;
        product(out, probs, values, width, (self.head_dim, 1), accumulate);
    }

    /// Rounds, soft-caps and masks one row of scores (keys from position `kpos0`) for the query
    /// at `qpos`; returns the row's maximum (−∞ when nothing is visible). Only the keys after the
    /// query or outside the window are masked; a row that sees all its keys skips the checks.
    fn mask_and_max(&self, row: &mut [f32], qpos: usize, kpos0: usize) -> f32 {
        // Visible keys: lo..=qpos (lo from the window).
        let lo = self.window.map_or(0, |w| (qpos + 1).saturating_sub(w));
        let first = lo.saturating_sub(kpos0).min(row.len());
        let end = (qpos + 1).saturating_sub(kpos0).min(row.len()).max(first);
        row[..first].iter_mut().for_each(|x| *x = f32::NEG_INFINITY);
        row[end..].iter_mut().for_each(|x| *x = f32::NEG_INFINITY);
        let visible = &mut row[first..end];
        if let Some(r) = self.round {
            visible.iter_mut().for_each(|x| *x = r.apply(*x));
        }
        if let Some(cap) = self.softcap {
            visible
                .iter_mut()
                .for_each(|x| *x = cap * (*x / cap).tanh());
        }
        visible.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x))
    }
}

/// `out[m × n] (+)= lhs[m × k] · rhs` through the `gemm` crate (its runtime-selected AVX2 /
/// AVX-512 kernels), `out` and `lhs` row-major, `rhs` element `(c, j)` at `c·rs + j·cs` for
/// `(rs, cs) = rhs_strides`; adds to `out` when `accumulate`, overwrites it otherwise. Panics
/// when a slice is too short for its shape.
fn product(
    out: &mut [f32],
    lhs: &[f32],
    rhs: &[f32],
    k: usize,
    (rs, cs): (usize, usize),
    accumulate: bool,
) {
    let m = lhs.len() / k;
    let n = out.len() / m;
    assert!(lhs.len() == m * k && out.len() == m * n);
    assert!(rhs.len() > (k - 1) * rs + (n - 1) * cs);
    // SAFETY: the asserts above keep every element the strides address inside its slice.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            cs as isize,
            rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// The sum of `row` in the order of candle's `vec_reduce_sum` for f32 (what the unfused
/// softmax used) on x86-64: with AVX2, four 8-lane accumulators over 32-element steps, folded
/// pairwise, then the tail added one by one; without it, left to right. (On ARM candle folds
/// NEON lanes in another order, so the bits there may differ from its unfused path's.)
fn candle_sum(row: &[f32]) -> f32 {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    if std::is_x86_feature_detected!("avx2") {
        let mut acc = [[0f32; 8]; 4];
        let mut steps = row.chunks_exact(32);
        for step in &mut steps {
            for (a, lanes) in acc.iter_mut().zip(step.chunks_exact(8)) {
                for (l, x) in a.iter_mut().zip(lanes) {
                    *l += x;
                }
            }
        }
        // candle's `vec_reduce`: (a0 + a1) + (a2 + a3) per lane, the two 128-bit halves added,
        // then two horizontal adds.
        let x: [f32; 8] =
            std::array::from_fn(|l| (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]));
        let t: [f32; 4] = std::array::from_fn(|l| x[l] + x[l + 4]);
        let mut sum = (t[0] + t[1]) + (t[2] + t[3]);
        for x in steps.remainder() {
            sum += x;
        }
        return sum;
    }
    row.iter().fold(0.0, |s, x| s + x)
}

/// `row[j] = exp(row[j] − m)` in place (−∞ gives 0); returns the row's sum. The exponential is
/// evaluated by [`exp`] so the loop vectorizes.
fn exp_shifted(row: &mut [f32], m: f32) -> f32 {
    for x in row.iter_mut() {
        *x = exp(*x - m);
    }
    // Eight running sums: a fixed order (deterministic) that vectorizes.
    let mut lanes = [0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (l, x) in lanes.iter_mut().zip(c) {
            *l += x;
        }
    }
    let tail: f32 = chunks.remainder().iter().sum();
    lanes.iter().sum::<f32>() + tail
}

/// `e^x` for `x ≤ 0` to within 2 ulp (Cephes `expf`: `x = n·ln 2 + r`, a degree-6 polynomial in
/// `r`, `2^n` from the exponent bits), branch-free and call-free so loops of it vectorize; below
/// −87 (including −∞) it returns 0.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Round to nearest by the 1.5·2^23 trick (no call to `round`).
    const SHIFT: f32 = 12_582_912.0;
    let underflow = x < -87.0;
    let x = x.max(-87.0);
    let n = (x * LOG2E + SHIFT) - SHIFT;
    let r = x - n * LN2_HI - n * LN2_LO;
    let r2 = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e = p * r2 + r + 1.0;
    let two_n = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if underflow {
        0.0
    } else {
        e * two_n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Straightforward attention in f64: rope, scores, mask, softmax, weighted values.
    fn naive(a: &Kernel, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f64> {
        let (hd, h, kvh, l) = (a.head_dim, a.heads, a.kv_heads, a.seq_len);
        let r = a.rotary;
        let half = r.dim / 2;
        let tokens = q.len() / (h * hd);
        let rope = |x: &[f32], p: usize| -> Vec<f64> {
            let mut out: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            for i in 0..half {
                let (c, s) = (r.cos[p * half + i] as f64, r.sin[p * half + i] as f64);
                let (a, b) = if r.interleaved {
                    (2 * i, 2 * i + 1)
                } else {
                    (i, i + half)
                };
                out[a] = x[a] as f64 * c - x[b] as f64 * s;
                out[b] = x[a] as f64 * s + x[b] as f64 * c;
            }
            out
        };
        let mut out = vec![0f64; q.len()];
        for t in 0..tokens {
            let (s, i) = (t / l, t % l);
            for head in 0..h {
                let g = head / (h / kvh);
                let qi = rope(&q[(t * h + head) * hd..][..hd], i);
                let mut scores = Vec::new();
                for j in 0..=i {
                    if a.window.is_some_and(|w| i - j >= w) {
                        continue;
                    }
                    let tk = s * l + j;
                    let kj = rope(&k[(tk * kvh + g) * hd..][..hd], j);
                    let mut d: f64 = qi.iter().zip(&kj).map(|(x, y)| x * y).sum::<f64>();
                    d *= a.scale as f64;
                    if let Some(cap) = a.softcap {
                        d = cap as f64 * (d / cap as f64).tanh();
                    }
                    scores.push((tk, d));
                }
                let m = scores.iter().fold(f64::NEG_INFINITY, |m, (_, d)| m.max(*d));
                let z: f64 = scores.iter().map(|(_, d)| (d - m).exp()).sum();
                for (tk, d) in scores {
                    let p = (d - m).exp() / z;
                    for c in 0..hd {
                        out[(t * h + head) * hd + c] += p * v[(tk * kvh + g) * hd + c] as f64;
                    }
                }
            }
        }
        out
    }

    fn tables(len: usize, hd: usize) -> (Vec<f32>, Vec<f32>) {
        let half = hd / 2;
        let mut cos = Vec::new();
        let mut sin = Vec::new();
        for p in 0..len {
            for i in 0..half {
                let angle = p as f32 / 10000f32.powf(2.0 * i as f32 / hd as f32);
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        (cos, sin)
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::calib::SplitMix64::new(seed);
        (0..n)
            .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0)
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]
        #[test]
        fn matches_a_naive_reference(
            n in 1usize..3, seq_len in 1usize..300, kvh in 1usize..3, rep in 1usize..4,
            half in 1usize..9, window in proptest::option::of(1usize..200),
            softcap in proptest::option::of(5f32..50.0), seed in 0u64..1000,
            unrotated in 0usize..3, interleaved: bool,
        ) {
            let (hd, h) = (2 * half + 2 * unrotated, kvh * rep);
            let (cos, sin) = tables(seq_len, 2 * half);
            let a = Kernel {
                seq_len, heads: h, kv_heads: kvh, head_dim: hd,
                scale: 1.0 / (hd as f32).sqrt(), window, softcap,
                rotary: Rotary { cos: &cos, sin: &sin, dim: 2 * half, interleaved },
                round: None,
            };
            let tokens = n * seq_len;
            let q = values(tokens * h * hd, seed);
            let k = values(tokens * kvh * hd, seed + 1);
            let v = values(tokens * kvh * hd, seed + 2);
            let got = a.forward(&q, &k, &v);
            let want = naive(&a, &q, &k, &v);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                prop_assert!((*g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()), "{i}: {g} vs {w}");
            }
        }
    }

    /// What the fused kernel replaced (candle's rope, batched matmuls over repeated k/v heads,
    /// an additive causal mask and `softmax_last_dim`) gives the same bits wherever the keys fit
    /// one step: the CI ratio fixture was recorded on that path (x86-64, see [`candle_sum`]).
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    #[test]
    fn short_sequences_equal_the_unfused_path_bit_for_bit() {
        use candle_core::{Device, Tensor};
        let dev = Device::Cpu;
        for (seed, (seq_len, kvh, rep, hd)) in [(128, 3, 3, 64), (77, 1, 2, 64), (5, 2, 1, 32)]
            .into_iter()
            .enumerate()
        {
            let (n, h) = (2, kvh * rep);
            let (cos, sin) = tables(seq_len, hd);
            let a = Kernel {
                seq_len,
                heads: h,
                kv_heads: kvh,
                head_dim: hd,
                scale: (1.0 / (hd as f64).sqrt()) as f32,
                window: None,
                softcap: None,
                rotary: Rotary {
                    cos: &cos,
                    sin: &sin,
                    dim: hd,
                    interleaved: false,
                },
                round: None,
            };
            let tokens = n * seq_len;
            let seed = 10 * seed as u64;
            let q = values(tokens * h * hd, seed);
            let k = values(tokens * kvh * hd, seed + 1);
            let v = values(tokens * kvh * hd, seed + 2);
            let got = a.forward(&q, &k, &v);

            let heads = |x: &[f32], nh: usize| {
                Tensor::from_slice(x, (n, seq_len, nh, hd), &dev)
                    .and_then(|t| t.transpose(1, 2)?.contiguous())
                    .unwrap()
            };
            let repeat = |t: Tensor| {
                t.unsqueeze(2)
                    .and_then(|t| t.expand((n, kvh, rep, seq_len, hd)))
                    .and_then(|t| t.reshape((n, h, seq_len, hd)))
                    .unwrap()
            };
            let table = |x: &[f32]| Tensor::from_slice(x, (seq_len, hd / 2), &dev).unwrap();
            let (cos_t, sin_t) = (table(&cos), table(&sin));
            let rope = |t: Tensor| candle_nn::rotary_emb::rope(&t, &cos_t, &sin_t).unwrap();
            let qt = (rope(heads(&q, h)) * (1.0 / (hd as f64).sqrt())).unwrap();
            let kt = repeat(rope(heads(&k, kvh)));
            let vt = repeat(heads(&v, kvh));
            let mask: Vec<f32> = (0..seq_len * seq_len)
                .map(|i| {
                    if i % seq_len > i / seq_len {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
                .collect();
            let mask = Tensor::from_slice(&mask, (seq_len, seq_len), &dev).unwrap();
            let scores = qt
                .matmul(&kt.t().unwrap())
                .and_then(|s| s.broadcast_add(&mask))
                .unwrap();
            let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
            let want: Vec<f32> = probs
                .matmul(&vt)
                .and_then(|c| c.transpose(1, 2)?.flatten_all()?.to_vec1())
                .unwrap();
            let differ = got.iter().zip(&want).filter(|(g, w)| g != w).count();
            assert_eq!(differ, 0, "seq {seq_len} kvh {kvh} rep {rep} hd {hd}");
        }
    }

    #[test]
    fn exp_is_within_two_ulp() {
        let mut x = -87.0f32;
        while x <= 0.0 {
            let (got, want) = (exp(x), (x as f64).exp());
            assert!(
                ((got as f64 - want) / want).abs() < 2.5e-7,
                "{x}: {got} vs {want}"
            );
            x += 0.0137;
        }
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn flop_counts_the_visible_blocks() {
        let (cos, sin) = tables(256, 4);
        let a = Kernel {
            seq_len: 256,
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
            scale: 1.0,
            window: None,
            softcap: None,
            rotary: Rotary {
                cos: &cos,
                sin: &sin,
                dim: 4,
                interleaved: false,
            },
            round: None,
        };
        // Blocks of 128 queries: 128·128 + 128·256 score entries per head and sequence.
        assert_eq!(a.flop(256), 4 * (128 * 128 + 128 * 256) * 4 * 2);
    }
}

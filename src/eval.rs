//! Perplexity with the goldens' protocol (AWQ-SPEC §11.2, golden/smollm2/README.md): tokenize the
//! text once without special tokens, keep the first `max_tokens`, cut non-overlapping windows of
//! `seqlen` (tail dropped), evaluate each window from position 0, and average the next-token NLL
//! over all `windows × (seqlen − 1)` predictions (summed in f64).
//!
//! The model runs layer by layer across *all* windows, so memory holds one layer plus the hidden
//! states of the evaluated tokens, whatever the depth.
//!
//! With [`ModelSpec::serve_dtype`](crate::model::config::ModelSpec::serve_dtype) set
//! (`awq eval --dtype float16|bfloat16`), every activation is rounded to that dtype after each op,
//! so the perplexity is what a server running in it would see. A non-finite hidden state or
//! perplexity is an error (exit 5) naming the first layer where it appeared — never a
//! `perplexity NaN` with exit 0.

use std::time::Instant;

use candle_core::Tensor;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::events::{Event, Sink};
use crate::input_err;
use crate::model::layer::round_to;
use crate::model::rope::Rope;
use crate::model::Model;

/// Window length of the goldens' protocol (and `awq eval`'s default).
pub const DEFAULT_SEQLEN: usize = 2048;

/// `awq eval --dtype`: the dtype a server would run the activations in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ServeDtype {
    Float32,
    Float16,
    Bfloat16,
}

impl ServeDtype {
    /// What [`crate::model::config::ModelSpec::serve_dtype`] takes (`None` for float32).
    pub fn rounding(self) -> Option<candle_core::DType> {
        match self {
            ServeDtype::Float32 => None,
            ServeDtype::Float16 => Some(candle_core::DType::F16),
            ServeDtype::Bfloat16 => Some(candle_core::DType::BF16),
        }
    }
}

impl std::str::FromStr for ServeDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "float32" | "fp32" | "f32" => Ok(Self::Float32),
            "float16" | "fp16" | "f16" | "half" => Ok(Self::Float16),
            "bfloat16" | "bf16" => Ok(Self::Bfloat16),
            _ => Err(format!("{s:?} is not one of float32, float16, bfloat16")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub seqlen: usize,
    pub max_tokens: Option<usize>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalResult {
    pub perplexity: f64,
    /// Mean NLL per window.
    pub window_nll: Vec<f64>,
    /// Tokens inside the evaluated windows.
    pub tokens: usize,
    /// Next-token predictions scored.
    pub predicted: usize,
    pub seqlen: usize,
    pub seconds: f64,
}

/// Tokens per forward chunk: bounds the MLP intermediates whatever the number of windows.
const CHUNK_TOKENS: usize = 8192;
/// Rows of logits materialised at once (`rows × vocab` f32).
const HEAD_ROWS: usize = 512;

pub fn windows(ids: &[u32], opts: &EvalOptions) -> Result<Vec<u32>> {
    let ids = match opts.max_tokens {
        Some(n) => &ids[..ids.len().min(n)],
        None => ids,
    };
    if opts.seqlen < 2 {
        return Err(Error::Usage("--seqlen must be at least 2".into()));
    }
    let n = ids.len() / opts.seqlen;
    if n == 0 {
        // Name the limit that bit and the fix that works: a larger --max-tokens cannot help a
        // text that is itself shorter than a window.
        let (len, s) = (ids.len(), opts.seqlen);
        return Err(match opts.max_tokens {
            Some(m) if m == len => input_err!(
                "--max-tokens {m} keeps fewer tokens than one window of {s}; pass --max-tokens \
                 {s} or more, or --seqlen {m} or less"
            ),
            _ if len < 2 => input_err!(
                "the evaluation text has {len} token(s); perplexity needs at least 2: use a longer text"
            ),
            _ => input_err!(
                "the evaluation text has {len} tokens, fewer than one window of {s}; pass \
                 --seqlen {len} or less, or use a longer text"
            ),
        });
    }
    Ok(ids[..n * opts.seqlen].to_vec())
}

/// Perplexity of `model` over `ids` (already cut into windows by [`windows`]).
pub fn perplexity(model: &Model, ids: &[u32], seqlen: usize, events: Sink) -> Result<EvalResult> {
    let start = Instant::now();
    let spec = &model.spec;
    let rope = Rope::new(spec, seqlen)?;
    let r = |t: Tensor| round_to(t, spec.serve_dtype);
    events(&Event::Phase { name: "embed" });
    let mut hidden = r(model.embed(ids)?)?;
    let per_chunk = (CHUNK_TOKENS / seqlen).max(1) * seqlen;
    for i in 0..spec.layers {
        let t = Instant::now();
        let layer = model.layer(i)?;
        let mut outs = Vec::new();
        let mut off = 0;
        while off < ids.len() {
            let len = per_chunk.min(ids.len() - off);
            let (out, _) = layer.forward(
                &spec.layer(i),
                &rope,
                &hidden.narrow(0, off, len)?,
                seqlen,
                false,
            )?;
            outs.push(out);
            off += len;
        }
        hidden = Tensor::cat(&outs, 0)?;
        check_finite(&hidden, i, seqlen, spec.serve_dtype)?;
        crate::interrupt::check()?;
        events(&Event::Layer {
            index: i,
            total: spec.layers,
            seconds: t.elapsed().as_secs_f64(),
            report: None,
        });
    }
    events(&Event::Phase { name: "head" });
    let head = model.head()?;
    let n_windows = ids.len() / seqlen;
    let mut window_nll = Vec::with_capacity(n_windows);
    for w in 0..n_windows {
        let mut sum = 0f64;
        // Positions 0..seqlen-1 predict tokens 1..seqlen.
        let mut row = 0;
        while row < seqlen - 1 {
            let rows = HEAD_ROWS.min(seqlen - 1 - row);
            let h = hidden.narrow(0, w * seqlen + row, rows)?;
            let logits = head.logits(spec, &h)?;
            let targets = &ids[w * seqlen + row + 1..w * seqlen + row + 1 + rows];
            sum += nll_sum(&logits, targets)?;
            row += rows;
        }
        window_nll.push(sum / (seqlen - 1) as f64);
    }
    let mean = window_nll.iter().sum::<f64>() / n_windows as f64;
    if !mean.is_finite() {
        return Err(Error::Quality(format!(
            "the perplexity is not finite: the logits overflowed{} although every layer's output \
             was finite; the head (final norm, lm_head) produced inf/NaN",
            dtype_note(spec.serve_dtype)
        )));
    }
    Ok(EvalResult {
        perplexity: mean.exp(),
        window_nll,
        tokens: ids.len(),
        predicted: n_windows * (seqlen - 1),
        seqlen,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Refuses a non-finite hidden state after layer `layer` (0-based), naming the layer, the window
/// and position of the first bad value.
fn check_finite(
    hidden: &Tensor,
    layer: usize,
    seqlen: usize,
    dtype: Option<candle_core::DType>,
) -> Result<()> {
    let cols = hidden.dim(1)?;
    let values = hidden.flatten_all()?.to_vec1::<f32>()?;
    let Some(i) = values.iter().position(|v| !v.is_finite()) else {
        return Ok(());
    };
    let token = i / cols;
    Err(Error::Quality(format!(
        "the output of layer {} (model.layers.{layer}) is not finite ({} at window {}, position {}, \
         feature {}){}",
        layer + 1,
        values[i],
        token / seqlen,
        token % seqlen,
        i % cols,
        dtype_note(dtype)
    )))
}

fn dtype_note(dtype: Option<candle_core::DType>) -> String {
    match dtype {
        Some(candle_core::DType::F16) => {
            "; activations overflow float16 (±65504): serve this model \
             in bfloat16 (awq quantize --dtype bfloat16) and evaluate with --dtype bfloat16"
                .into()
        }
        Some(dt) => format!(" with activations rounded to {dt:?}"),
        None => "; the weights are probably corrupt (re-export the checkpoint)".into(),
    }
}

/// Σ −log_softmax(logits[r])[targets[r]] in f64 (`logits: [rows, vocab]`), summed in row order.
pub fn nll_sum(logits: &Tensor, targets: &[u32]) -> Result<f64> {
    let rows = logits.dim(0)?;
    let values = logits.flatten_all()?.to_vec1::<f32>()?;
    Ok(LogProbs::new(values, rows).nll(targets))
}

/// Rows of logits with each row's log-sum-exp (f64): log-probabilities without a second copy.
pub(crate) struct LogProbs {
    logits: Vec<f32>,
    vocab: usize,
    lse: Vec<f64>,
}

impl LogProbs {
    pub(crate) fn new(logits: Vec<f32>, rows: usize) -> Self {
        let vocab = logits.len() / rows.max(1);
        let lse = logits
            .par_chunks(vocab)
            .map(|row| {
                let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
                max + row
                    .iter()
                    .map(|&x| (x as f64 - max).exp())
                    .sum::<f64>()
                    .ln()
            })
            .collect();
        LogProbs { logits, vocab, lse }
    }

    fn rows(&self) -> impl IndexedParallelIterator<Item = (&[f32], f64)> {
        self.logits
            .par_chunks(self.vocab)
            .zip(self.lse.par_iter().copied())
    }

    /// Σ over rows of −log p(target).
    pub(crate) fn nll(&self, targets: &[u32]) -> f64 {
        let per_row: Vec<f64> = (self.rows().zip(targets.par_iter()))
            .map(|((row, lse), &t)| lse - row[t as usize] as f64)
            .collect();
        per_row.iter().sum()
    }

    /// Per row, KL(self ‖ other) = Σ_v p(v)·(log p(v) − log q(v)).
    pub(crate) fn kl_rows(&self, other: &LogProbs) -> Vec<f64> {
        (self.rows().zip(other.rows()))
            .map(|((p, lse_p), (q, lse_q))| {
                (p.iter().zip(q))
                    .map(|(&a, &b)| {
                        let lp = a as f64 - lse_p;
                        lp.exp() * (lp - (b as f64 - lse_q))
                    })
                    .sum::<f64>()
            })
            .collect()
    }
}

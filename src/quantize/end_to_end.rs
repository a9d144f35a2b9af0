//! The end-to-end check: the guard's calibration blocks run through the quantized model as a
//! whole, each quantized layer fed by the quantized layers before it, and scored at the end by
//! their next-token loss.
//!
//! Why: the guard and the searches each measure one layer on the float model's input. An error
//! that is small in one layer but points the same way in every layer (clipping shrinks the
//! largest weights of every group toward zero) adds up through the residual stream, and a
//! layer-local measure cannot see it: on a model dequantized from a k-quant GGUF the guard said
//! AWQ beat round-to-nearest on every layer while the whole model came out worse.
//!
//! Four streams are carried from layer to layer, each through its own version of every layer
//! with the weights as they are packed (quantized and dequantized): AWQ as searched, scales
//! without clipping, plain round-to-nearest, and what is written. The float model's own output
//! on the same blocks is the run's hidden state already. Dense models only (the MoE layers hold
//! no second copy, see the guard), and only in a run that quantizes every layer itself: a shard
//! lacks the quantized layers before its first. A resumed run goes on from the streams saved
//! with the last finished layer ([`Streams::save`]).

use std::path::{Path, PathBuf};

use candle_core::Tensor;

use super::guard::{guard_block_indices, guard_blocks_upto};
use super::layer::pieces;
use crate::error::Result;
use crate::eval::LogProbs;
use crate::io::reader::Checkpoint;
use crate::io::writer::{self, OutTensor};
use crate::model::config::ModelSpec;
use crate::model::layer::LayerWeights;
use crate::model::rope::Rope;
use crate::model::Model;

/// Tokens the streams carry, at most (whole guard blocks, at least one): each stream costs a
/// forward of every layer on them, and the head's logits `tokens × vocab × hidden` at the end
/// (SmolLM2: 0.12 TFLOP per stream for 2048 tokens).
const CHECK_TOKENS: usize = 2048;

/// Rows of logits materialised at once (`rows × vocab` f32).
const HEAD_ROWS: usize = 512;

/// The check's blocks of `x: [blocks·seqlen, d]`: the first guard blocks, about
/// [`CHECK_TOKENS`] tokens.
pub(super) fn rows(x: &Tensor, seqlen: usize) -> Result<Tensor> {
    guard_blocks_upto(x, seqlen, check_blocks(seqlen))
}

/// How many guard blocks of `seqlen` tokens the check carries, at most.
fn check_blocks(seqlen: usize) -> usize {
    (CHECK_TOKENS / seqlen).max(1)
}

/// The tokens of the check's blocks, out of the calibration's `ids` (block after block).
pub(super) fn ids(all: &[u32], seqlen: usize) -> Vec<u32> {
    guard_block_indices(all.len() / seqlen)
        .into_iter()
        .take(check_blocks(seqlen))
        .flat_map(|b| all[b * seqlen..(b + 1) * seqlen].iter().copied())
        .collect()
}

/// The hidden states of the check's blocks, `[blocks·seqlen, hidden]` each.
pub(super) struct Streams {
    pub awq: Tensor,
    pub scales_only: Tensor,
    pub rtn: Tensor,
    pub written: Tensor,
}

const STREAM_NAMES: [&str; 4] = ["awq", "scales_only", "rtn", "written"];

impl Streams {
    /// Every stream starts as the embedding of the check's blocks.
    pub fn new(embedded: Tensor) -> Self {
        Streams {
            awq: embedded.clone(),
            scales_only: embedded.clone(),
            rtn: embedded.clone(),
            written: embedded,
        }
    }

    fn all(&self) -> [&Tensor; 4] {
        [&self.awq, &self.scales_only, &self.rtn, &self.written]
    }

    /// The streams after layer `layer`, beside the layer parts in `dir`: a resumed run goes on
    /// from the last finished layer's streams and scores as the uninterrupted run does (f32,
    /// exactly). Written atomically before the layer's record; the file of the layer before is
    /// removed once this layer's record is written ([`Streams::forget`]).
    pub fn save(&self, dir: &Path, layer: usize) -> Result<()> {
        let tensors = (STREAM_NAMES.iter().zip(self.all()))
            .map(|(name, t)| OutTensor::f32(name.to_string(), t))
            .collect::<Result<Vec<_>>>()?;
        writer::write_file(&stream_file(dir, layer), &tensors)
    }

    /// The streams saved after layer `layer`, if they were (`None` when that layer ran in a
    /// run without the check, or was killed between its streams and its record).
    pub fn load(dir: &Path, layer: usize) -> Result<Option<Streams>> {
        let path = stream_file(dir, layer);
        if !path.is_file() {
            return Ok(None);
        }
        let ckpt = Checkpoint::open_files(vec![path])?;
        let read = |name: &str| -> Result<Tensor> {
            let shape = ckpt.meta(name)?.shape.clone();
            ckpt.f32(name, &shape)
        };
        Ok(Some(Streams {
            awq: read(STREAM_NAMES[0])?,
            scales_only: read(STREAM_NAMES[1])?,
            rtn: read(STREAM_NAMES[2])?,
            written: read(STREAM_NAMES[3])?,
        }))
    }

    /// Removes the streams saved after layer `layer` (no longer needed once the next layer's
    /// are saved and its record written).
    pub fn forget(dir: &Path, layer: usize) {
        let _ = std::fs::remove_file(stream_file(dir, layer));
    }
}

fn stream_file(dir: &Path, layer: usize) -> PathBuf {
    dir.join(format!("streams-{layer:05}.safetensors"))
}

/// How close one version of the model comes to the float model on the check's blocks, per
/// next-token prediction (nats).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Scores {
    /// Mean negative log-likelihood of the next token.
    pub loss: f64,
    /// Mean KL divergence of the version's next-token distribution from the float model's:
    /// zero for the float model itself, and less noisy than a difference of losses (every
    /// token of the vocabulary counts, not the one that came next).
    pub kl: f64,
}

/// The end-to-end check's result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EndToEndReport {
    /// Calibration blocks the streams ran on, and next-token predictions the scores average.
    pub blocks: usize,
    pub predictions: usize,
    /// The float model's loss.
    pub fp_loss: f64,
    /// AWQ as searched, scales without clipping, plain round-to-nearest, and the checkpoint as
    /// written (before `--keep-fp16` keeps any unit in float).
    pub awq: Scores,
    pub scales_only: Scores,
    pub rtn: Scores,
    pub written: Scores,
    /// Seconds of the layers' stream forwards and of the head.
    pub seconds: f64,
}

/// Each stream's mean squared difference from the float model's output after one layer, read
/// through the norm that reads it next (the guard's measure, on the check's blocks and fed by
/// the quantized layers before): where the versions part.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StreamErrors {
    pub awq: f64,
    pub scales_only: f64,
    pub rtn: f64,
    pub written: f64,
}

/// The streams' [`StreamErrors`], measured as `guard` measures. The check's blocks are the
/// first of the guard's, so the float layer's output on them, through the next norm, is the
/// head of the guard's `reference`.
pub(super) fn stream_errors(
    guard: &super::guard::Guard,
    streams: &Streams,
) -> Result<StreamErrors> {
    let reference = guard.reference.narrow(0, 0, streams.awq.dim(0)?)?;
    let e = |x: &Tensor| guard.deviation(x, &reference);
    Ok(StreamErrors {
        awq: e(&streams.awq)?,
        scales_only: e(&streams.scales_only)?,
        rtn: e(&streams.rtn)?,
        written: e(&streams.written)?,
    })
}

/// `x` through `layer` (already quantized), whole sequences at a time.
pub(super) fn advance(
    layer: &LayerWeights,
    spec: &ModelSpec,
    rope: &Rope,
    x: &Tensor,
    seqlen: usize,
) -> Result<Tensor> {
    let outs = pieces(x, seqlen)?
        .iter()
        .map(|p| Ok(layer.forward(spec, rope, p, seqlen, false)?.0))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&outs, 0)?)
}

/// The scores of every stream against the float model's `fp` (its output of the last layer on
/// the same blocks), with `ids` the blocks' tokens (see [`ids`]). `layer_seconds`: what the
/// streams' forwards cost in the layers.
pub(super) fn losses(
    model: &Model,
    streams: &Streams,
    fp: &Tensor,
    ids: &[u32],
    seqlen: usize,
    layer_seconds: f64,
) -> Result<EndToEndReport> {
    let clock = std::time::Instant::now();
    let head = model.head()?;
    let blocks = ids.len() / seqlen;
    let versions = streams.all();
    let (mut fp_loss, mut sums) = (0f64, [Scores::default(); 4]);
    // Positions 0..seqlen-1 of each block predict tokens 1..seqlen, `HEAD_ROWS` rows of logits
    // at a time (a 150k vocabulary makes 0.3 GB of them per version).
    for b in 0..blocks {
        for row in (0..seqlen - 1).step_by(HEAD_ROWS) {
            let (at, rows) = (b * seqlen + row, HEAD_ROWS.min(seqlen - 1 - row));
            let targets = &ids[at + 1..at + 1 + rows];
            let logits = |h: &Tensor| -> Result<Vec<f32>> {
                let l = head.logits(&model.spec, &h.narrow(0, at, rows)?)?;
                Ok(l.flatten_all()?.to_vec1::<f32>()?)
            };
            let reference = LogProbs::new(logits(fp)?, rows);
            fp_loss += reference.nll(targets);
            for (sum, h) in sums.iter_mut().zip(versions) {
                let version = LogProbs::new(logits(h)?, rows);
                sum.loss += version.nll(targets);
                sum.kl += reference.kl_to(&version);
            }
        }
    }
    let n = (blocks * (seqlen - 1)) as f64;
    let mean = |s: Scores| Scores {
        loss: s.loss / n,
        kl: s.kl / n,
    };
    Ok(EndToEndReport {
        blocks,
        predictions: blocks * (seqlen - 1),
        fp_loss: fp_loss / n,
        awq: mean(sums[0]),
        scales_only: mean(sums[1]),
        rtn: mean(sums[2]),
        written: mean(sums[3]),
        seconds: layer_seconds + clock.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The check's tokens are the tokens of the hidden states it carries: the same blocks, in
    /// the same order, whatever the block count.
    #[test]
    fn check_ids_are_the_tokens_of_the_check_rows() {
        for (blocks, seqlen) in [(10, 2), (3, 4), (40, 512), (1, 8)] {
            let n = blocks * seqlen;
            let all: Vec<u32> = (0..n as u32).collect();
            let x = Tensor::from_vec(
                (0..n).map(|v| v as f32).collect::<Vec<_>>(),
                (n, 1),
                &candle_core::Device::Cpu,
            )
            .unwrap();
            let from_rows: Vec<u32> = (rows(&x, seqlen).unwrap().flatten_all().unwrap())
                .to_vec1::<f32>()
                .unwrap()
                .into_iter()
                .map(|v| v as u32)
                .collect();
            let picked = ids(&all, seqlen);
            assert_eq!(from_rows, picked, "{blocks} × {seqlen}");
            assert!(!picked.is_empty() && picked.len().is_multiple_of(seqlen));
            assert!(picked.len() <= CHECK_TOKENS.max(seqlen));
        }
    }
}

//! Activation hand-off between the jobs of a split run: a *capture* job runs the float forward
//! of a slice of the calibration blocks through the model and writes, at every shard boundary,
//! those blocks' hidden states (exact f32) into a directory the shards share. A shard given
//! `--activations` then starts at its first layer from the boundary every capture job wrote,
//! instead of streaming the float forward through all the layers before it.
//!
//! Why: with the prefix recomputed, the last shard pays almost the whole model's forward, which
//! caps the speed-up (about 20× on a 7B); the forward is independent per block, so M capture
//! jobs split it M ways. The result is the bytes of a single run: the forward of a token depends
//! only on its own block, and the matmul of a row does not depend on the other rows given (a
//! test compares the hand-off's shards with a single run's bytes).

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::prepare::Prepared;
use super::resume::difference;
use super::shard::{balanced_ranges, LayerCosts};
use super::{QuantizeOptions, TOOL};
use crate::error::{Error, Result};
use crate::events::{Event, Sink};
use crate::input_err;
use crate::io::writer::{self, OutTensor};
use crate::model::rope::Rope;

/// The manifest of a capture directory.
pub const CAPTURE_MANIFEST: &str = "capture.json";
const CAPTURE_KIND: &str = "awq-activations";
/// The tensor a boundary file holds: `[tokens, hidden]`, f32.
const HIDDEN: &str = "hidden";

/// `capture.json`: which blocks a capture job ran and the boundaries it wrote.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaptureManifest {
    pub kind: String,
    pub version: u32,
    pub tool: String,
    /// The run's fingerprint (as a shard's manifest holds it).
    pub fingerprint: serde_json::Value,
    /// This job's part and the number of parts: `[j, m]`.
    pub part: [usize; 2],
    /// The calibration blocks it ran: first and one past the last.
    pub blocks: [usize; 2],
    /// The shard count and the first layer of every shard but the first: a boundary file each.
    pub shards: usize,
    pub boundaries: Vec<usize>,
    pub seconds: f64,
}

/// What a capture job wrote.
#[derive(Debug, Clone, Serialize)]
pub struct CaptureDone {
    pub output: PathBuf,
    pub part: [usize; 2],
    pub blocks: [usize; 2],
    pub boundaries: Vec<usize>,
    pub seconds: f64,
}

/// The costs shards balance on when their input is handed over: no prefix to pay.
pub(super) fn without_prefix(costs: &LayerCosts) -> LayerCosts {
    LayerCosts {
        quantize: costs.quantize.clone(),
        forward: 0.0,
    }
}

fn boundary_file(dir: &Path, layer: usize) -> PathBuf {
    dir.join(format!("boundary-{layer:05}.safetensors"))
}

/// Blocks `j*B/m .. (j+1)*B/m` of `blocks`.
fn block_range(j: usize, m: usize, blocks: usize) -> [usize; 2] {
    [j * blocks / m, (j + 1) * blocks / m]
}

/// Runs capture job `j` of `m` for `shards` shards: the float forward of its blocks through the
/// layers before the last boundary, writing each boundary's hidden states into `dir`.
pub(super) fn run(
    opts: &QuantizeOptions,
    prep: &Prepared,
    (j, m): (usize, usize),
    shards: usize,
    dir: &Path,
    events: Sink,
) -> Result<CaptureDone> {
    let clock = std::time::Instant::now();
    let spec = &prep.model.spec;
    let seqlen = opts.calib.seqlen;
    let blocks = prep.cal.ids.len() / seqlen;
    if m > blocks {
        return Err(Error::Usage(format!(
            "--capture {j}/{m}: {m} capture jobs for {blocks} calibration blocks; use at most \
             {blocks} (a job runs whole blocks)"
        )));
    }
    let costs = without_prefix(&super::shard::layer_costs(opts, spec, &prep.cal.summary));
    let boundaries: Vec<usize> = balanced_ranges(&costs, shards)?
        .iter()
        .skip(1)
        .map(|r| r.start)
        .collect();
    let range = block_range(j, m, blocks);
    let ids = &prep.cal.ids[range[0] * seqlen..range[1] * seqlen];
    let rope = Rope::new(spec, seqlen)?;
    let mut hidden = prep.model.embed(ids)?;
    events(&Event::Phase { name: "capture" });
    let last = boundaries.last().copied().unwrap_or(0);
    for i in 0..last {
        crate::interrupt::check()?;
        if boundaries.contains(&i) {
            write_boundary(dir, i, &hidden)?;
        }
        hidden = prep
            .model
            .layer(i)?
            .forward(spec, &rope, &hidden, seqlen, false)?
            .0;
    }
    if last > 0 {
        write_boundary(dir, last, &hidden)?;
    }
    let manifest = CaptureManifest {
        kind: CAPTURE_KIND.into(),
        version: 1,
        tool: TOOL.into(),
        fingerprint: prep.fingerprint.clone(),
        part: [j, m],
        blocks: range,
        shards,
        boundaries: boundaries.clone(),
        seconds: clock.elapsed().as_secs_f64(),
    };
    let json = serde_json::to_value(&manifest).map_err(|e| Error::Runtime(e.to_string()))?;
    writer::write_json(&dir.join(CAPTURE_MANIFEST), &json)?;
    Ok(CaptureDone {
        output: opts.output.clone(),
        part: [j, m],
        blocks: range,
        boundaries,
        seconds: manifest.seconds,
    })
}

fn write_boundary(dir: &Path, layer: usize, hidden: &Tensor) -> Result<()> {
    let t = OutTensor::f32(HIDDEN.into(), hidden)?;
    writer::write_file(&boundary_file(dir, layer), &[t])
}

/// The input of layer `start` for every calibration block, assembled from the capture jobs'
/// directories under `root` (one sub-directory each). Refused, naming the directory, when a job
/// belongs to another run, the jobs do not cover every block exactly once, or the boundary is
/// missing (the captures were run for another shard count).
pub(super) fn load(root: &Path, start: usize, prep: &Prepared, seqlen: usize) -> Result<Tensor> {
    let mut parts = read_parts(root)?;
    parts.sort_by_key(|(_, m)| m.blocks);
    let blocks = prep.cal.ids.len() / seqlen;
    let mut next = 0;
    for (dir, m) in &parts {
        if let Some(field) = difference(&m.fingerprint, &prep.fingerprint) {
            return Err(Error::Usage(format!(
                "--activations: {} was captured for another run: its {field} differ(s) from \
                 this shard's; capture with the same model, calibration and options",
                dir.display()
            )));
        }
        if m.blocks[0] != next {
            return Err(Error::Usage(format!(
                "--activations {}: the capture jobs cover blocks up to {next}, then {} starts \
                 at block {}; every block must be captured exactly once (all --capture J/M \
                 jobs of one M)",
                root.display(),
                dir.display(),
                m.blocks[0]
            )));
        }
        next = m.blocks[1];
    }
    if next != blocks {
        return Err(Error::Usage(format!(
            "--activations {}: the capture jobs cover {next} of {blocks} calibration blocks; \
             run the missing --capture jobs",
            root.display()
        )));
    }
    let pieces = parts
        .iter()
        .map(|(dir, m)| {
            let file = boundary_file(dir, start);
            if !file.is_file() {
                return Err(Error::Usage(format!(
                    "--activations: {} has no boundary at layer {start} (it has {:?}): the \
                     captures were run for --shards {}, not this shard's count",
                    dir.display(),
                    m.boundaries,
                    m.shards
                )));
            }
            let ckpt = crate::io::reader::Checkpoint::open_files(vec![file])?;
            let rows = (m.blocks[1] - m.blocks[0]) * seqlen;
            ckpt.f32(HIDDEN, &[rows, prep.model.spec.hidden])
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&pieces, 0)?)
}

/// The capture directories under `root` with their manifests.
fn read_parts(root: &Path) -> Result<Vec<(PathBuf, CaptureManifest)>> {
    let entries = std::fs::read_dir(root).map_err(|e| Error::input_io(root, e))?;
    let mut parts = Vec::new();
    for e in entries.filter_map(|e| e.ok()) {
        let dir = e.path();
        let path = dir.join(CAPTURE_MANIFEST);
        if !path.is_file() {
            continue;
        }
        let bytes = std::fs::read(&path).map_err(|e| Error::input_io(&path, e))?;
        let m: CaptureManifest = serde_json::from_slice(&bytes)
            .map_err(|e| input_err!("{}: not a capture manifest: {e}", path.display()))?;
        if m.kind != CAPTURE_KIND {
            return Err(input_err!("{}: not a capture manifest", path.display()));
        }
        parts.push((dir, m));
    }
    if parts.is_empty() {
        return Err(input_err!(
            "--activations {}: no capture directory (with {CAPTURE_MANIFEST}) under it; run \
             the --capture J/M jobs into sub-directories of it first",
            root.display()
        ));
    }
    Ok(parts)
}

/// `--capture J/M`.
pub fn parse_part(s: &str) -> std::result::Result<(usize, usize), String> {
    match s.parse::<super::shard::ShardSpec>()? {
        super::shard::ShardSpec::Index { k, n } => Ok((k, n)),
        _ => unreachable!("K/N parses as an index"),
    }
}

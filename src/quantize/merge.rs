//! `awq merge`: the shard directories of one job become the checkpoint a single run would have
//! written, byte for byte — the same staging, end-to-end check and fallback, head,
//! `--keep-fp16` selection (over every layer), quality gate and atomic publish, with the layers
//! read from the shards instead of quantized.
//!
//! A shard set is checked before anything is written: every manifest must carry the same
//! fingerprint (model contents, calibration tokens, options), every layer must be in exactly
//! one shard and finished, and the output must not overlap a shard.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::layers::{read_record, Layers};
use super::report::ShardReport;
use super::resume::difference;
use super::shard::Manifest;
use super::{prepare, Outcome, QualityGate, Source};
use crate::error::{Error, Result};
use crate::events::{Event, Sink};
use crate::input_err;
use crate::io::writer::Staging;

/// What `awq merge` is asked to do.
#[derive(Debug, Clone)]
pub struct MergeOptions {
    /// The shard directories, in any order.
    pub shards: Vec<PathBuf>,
    pub output: PathBuf,
    /// Replace an earlier awq output of other settings.
    pub force: bool,
    /// Where the source model is on this machine, when not where the shards recorded it (its
    /// contents must match their fingerprint).
    pub model: Option<String>,
    /// Perplexity gate on the merged checkpoint.
    pub quality_gate: Option<QualityGate>,
}

/// A shard directory and its manifest.
#[derive(Debug, Clone)]
pub struct Shard {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Shard {
    fn range(&self) -> std::ops::Range<usize> {
        self.manifest.layers[0]..self.manifest.layers[1]
    }

    /// The shard in the merged report.
    pub(super) fn report(&self) -> ShardReport {
        ShardReport {
            dir: self.dir.clone(),
            layers: self.manifest.layers,
            seconds: self.manifest.seconds,
            prefix_seconds: self.manifest.prefix_seconds,
            host: self.manifest.host.clone(),
        }
    }
}

/// Merges `opts.shards` into `opts.output`. Errors before anything is written: a directory
/// that is not a finished shard (exit 3), shards of different runs, a layer missing or in two
/// shards, an output overlapping a shard (exit 2); then as `awq quantize` (an output of other
/// settings: 4 without `--force`). An output already holding this merge's checkpoint is up to
/// date (exit 0): merging again is idempotent.
pub fn merge(opts: &MergeOptions, events: Sink) -> Result<Outcome> {
    let clocks = (Instant::now(), crate::ops::matmul_totals());
    let shards = read_shards(&opts.shards)?;
    check_set(&shards)?;
    check_output(&opts.output, &shards)?;
    let first = &shards[0].manifest;
    let mut q = first.options.clone();
    q.output = opts.output.clone();
    q.force = opts.force;
    q.skip_existing = !opts.force;
    q.shard = None;
    q.plan_shards = None;
    q.dry_run = false;
    q.resume = false;
    q.quality_gate = opts.quality_gate.clone();
    if let Some(model) = &opts.model {
        q.model = model.clone();
    }
    let prep = match prepare::prepare(&q)? {
        prepare::Prepare::UpToDate => {
            events(&Event::Notice {
                message: format!(
                    "{} already holds the checkpoint of these shards; nothing to do",
                    opts.output.display()
                ),
            });
            return Ok(Outcome::UpToDate);
        }
        prepare::Prepare::Work(prep) => *prep,
    };
    if let Some(field) = difference(&first.fingerprint, &prep.fingerprint) {
        return Err(Error::Usage(format!(
            "the model or calibration found now differs from what the shards were quantized \
             from: {field} (model {}); merge where the same model and calibration files are \
             (--model DIR when the model moved)",
            q.model
        )));
    }
    events(&Event::Plan(&prep.plan));
    let staging = Staging::open(&q.output, prep.open)?;
    let (start, (flop0, mm0)) = clocks;
    super::finish(
        &q,
        prep,
        staging,
        events,
        Source::Shards(&shards),
        (start, flop0, mm0),
    )
}

/// The manifests of `dirs`, sorted by their first layer; a directory given twice is refused.
fn read_shards(dirs: &[PathBuf]) -> Result<Vec<Shard>> {
    if dirs.is_empty() {
        return Err(Error::Usage(
            "awq merge needs the shard directories (SHARD_DIR…)".into(),
        ));
    }
    let mut seen = Vec::new();
    let mut shards = Vec::with_capacity(dirs.len());
    for dir in dirs {
        let real = crate::io::output::resolve(dir);
        if seen.contains(&real) {
            return Err(Error::Usage(format!(
                "{} is given twice; pass each shard directory once",
                dir.display()
            )));
        }
        seen.push(real);
        shards.push(Shard {
            dir: dir.clone(),
            manifest: Manifest::read(dir)?,
        });
    }
    shards.sort_by_key(|s| s.manifest.layers);
    Ok(shards)
}

/// One run's shards, every layer exactly once, every layer finished.
fn check_set(shards: &[Shard]) -> Result<()> {
    let first = &shards[0];
    for s in &shards[1..] {
        let field =
            difference(&first.manifest.fingerprint, &s.manifest.fingerprint).or_else(|| {
                (s.manifest.total_layers != first.manifest.total_layers)
                    .then(|| "number of layers".to_string())
            });
        if let Some(field) = field {
            return Err(Error::Usage(format!(
                "{} and {} are shards of different runs: their {field} differ(s); merge the \
                 shards of one job (the same model, calibration and options)",
                first.dir.display(),
                s.dir.display()
            )));
        }
    }
    let total = first.manifest.total_layers;
    let mut owner: Vec<Option<&Shard>> = vec![None; total];
    for s in shards {
        for i in s.range() {
            match owner.get(i) {
                None => {
                    return Err(input_err!(
                        "{}: its manifest names layer {i}, beyond the model's {total}",
                        s.dir.display()
                    ))
                }
                Some(Some(other)) => {
                    return Err(Error::Usage(format!(
                        "layer {i} is in two shards: {} (layers {}..{}) and {} (layers {}..{}); \
                         pass each layer's shard once",
                        other.dir.display(),
                        other.manifest.layers[0],
                        other.manifest.layers[1],
                        s.dir.display(),
                        s.manifest.layers[0],
                        s.manifest.layers[1]
                    )))
                }
                Some(None) => owner[i] = Some(s),
            }
        }
    }
    let missing: Vec<usize> = (0..total).filter(|&i| owner[i].is_none()).collect();
    if !missing.is_empty() {
        return Err(Error::Usage(format!(
            "layer(s) {} of {total} are in no shard given; run the missing shard(s) and pass \
             their directories too",
            spans(&missing)
        )));
    }
    for s in shards {
        for i in s.range() {
            let (part, record) = Manifest::layer_files(&s.dir, i);
            let missing = [part, record].into_iter().find(|f| !f.is_file());
            if let Some(f) = missing {
                return Err(input_err!(
                    "{}: {} is missing, so the shard is incomplete; rerun its command to \
                     finish it",
                    s.dir.display(),
                    f.display()
                ));
            }
        }
    }
    Ok(())
}

/// `3..5, 9` for [3, 4, 9] (end excluded, as `--layers` takes them).
fn spans(layers: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < layers.len() {
        let mut j = i;
        while j + 1 < layers.len() && layers[j + 1] == layers[j] + 1 {
            j += 1;
        }
        out.push(match j > i {
            true => format!("{}..{}", layers[i], layers[j] + 1),
            false => layers[i].to_string(),
        });
        i = j + 1;
    }
    out.join(", ")
}

/// The output may not be, hold, or lie inside a shard directory (exit 2).
fn check_output(output: &Path, shards: &[Shard]) -> Result<()> {
    let out = crate::io::output::resolve(output);
    for s in shards {
        let dir = crate::io::output::resolve(&s.dir);
        if out == dir || out.starts_with(&dir) || dir.starts_with(&out) {
            return Err(Error::Usage(format!(
                "refusing to write the merged checkpoint to {}: it overlaps the shard {}; \
                 choose an output outside every shard directory",
                output.display(),
                s.dir.display()
            )));
        }
    }
    Ok(())
}

/// The layers of `range`, read from the shards (sorted by range) in layer order.
pub(super) fn gather(
    shards: &[Shard],
    range: std::ops::Range<usize>,
    events: Sink,
    work: &mut super::Work,
) -> Result<Layers> {
    let total = range.end;
    let mut done = Layers::new();
    for i in range {
        let (k, s) = shards
            .iter()
            .enumerate()
            .find(|(_, s)| s.range().contains(&i))
            .expect("checked: every layer is in a shard");
        let (part, record) = Manifest::layer_files(&s.dir, i);
        let mut record = read_record(&record)?;
        record.report.shard = Some(k);
        work.seconds.add(&record.report.seconds);
        events(&Event::Layer {
            index: i,
            total,
            seconds: record.report.seconds.total(),
            report: Some(&record.report),
        });
        done.push(part, record);
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    #[test]
    fn missing_layers_are_named_as_ranges() {
        assert_eq!(super::spans(&[3, 4, 9, 11, 12, 13]), "3..5, 9, 11..14");
    }
}

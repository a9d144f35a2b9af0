//! One quantize job split over many machines: which layers a shard quantizes, how the ranges
//! are balanced, and the manifest a shard directory carries for `awq merge`.
//!
//! Why layers are independent units: every layer is searched on the *original* model's
//! previous-layer output (AutoAWQ semantics, AWQ-SPEC §2.2), so a layer's input is the plain
//! float forward of the layers before it. A shard streams that float forward through the layers
//! before its range (the "prefix", cheap next to the search) and quantizes its range exactly as
//! a single run would: the merged checkpoint is byte-identical.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::QuantizeOptions;
use crate::error::{Error, Result};
use crate::model::config::ModelSpec;

/// `--shard` / `--layers`: which layers this run quantizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShardSpec {
    /// Shard `k` (0-based) of `n`, ranges balanced by estimated cost ([`balanced_ranges`]).
    Index { k: usize, n: usize },
    /// Layers `start..end` (0-based, end excluded).
    Layers { start: usize, end: usize },
}

impl FromStr for ShardSpec {
    type Err = String;
    /// `K/N` (0 ≤ K < N). `auto` and `auto/N` are resolved by [`ShardSpec::from_env`] first.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (k, n) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not K/N (e.g. 0/4), auto or auto/N"))?;
        let parse = |v: &str, what: &str| {
            v.trim()
                .parse::<usize>()
                .map_err(|_| format!("{s:?}: {what} {v:?} is not a whole number"))
        };
        let (k, n) = (parse(k, "shard index")?, parse(n, "shard count")?);
        if n == 0 || k >= n {
            return Err(format!(
                "{s:?}: the index must be below the count (0-based: 0/{n} … {}/{n})",
                n.max(1) - 1
            ));
        }
        Ok(ShardSpec::Index { k, n })
    }
}

/// `--layers A..B`: 0-based, `B` excluded.
pub fn parse_layers(s: &str) -> std::result::Result<ShardSpec, String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("{s:?} is not A..B (0-based, B excluded, e.g. 0..8)"))?;
    let parse = |v: &str| {
        v.trim()
            .parse::<usize>()
            .map_err(|_| format!("{s:?}: {v:?} is not a layer index"))
    };
    let (start, end) = (parse(a)?, parse(b)?);
    if start >= end {
        return Err(format!("{s:?}: the range is empty (A must be below B)"));
    }
    Ok(ShardSpec::Layers { start, end })
}

/// Environment variables `--shard auto` reads, in order: Slurm job arrays, Kubernetes Indexed
/// Jobs (which give the index only: the count comes from `auto/N` or `AWQ_SHARD_COUNT`), and an
/// explicit pair for anything else.
pub const SHARD_ENV: [(&str, &str); 3] = [
    ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"),
    ("JOB_COMPLETION_INDEX", "AWQ_SHARD_COUNT"),
    ("AWQ_SHARD_INDEX", "AWQ_SHARD_COUNT"),
];

impl ShardSpec {
    /// `auto` or `auto/N` from the scheduler's environment (`env` looks a variable up). Slurm's
    /// index is made 0-based with `SLURM_ARRAY_TASK_MIN` (`--array=1-4` works as `0-3`).
    pub fn from_env(
        arg: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> std::result::Result<Self, String> {
        let count = match arg.strip_prefix("auto") {
            Some("") => None,
            Some(rest) => Some(rest.strip_prefix('/').unwrap_or(rest).to_string()),
            None => return arg.parse(),
        };
        for (index_var, count_var) in SHARD_ENV {
            let Some(index) = env(index_var) else {
                continue;
            };
            let min = match index_var {
                "SLURM_ARRAY_TASK_ID" => env("SLURM_ARRAY_TASK_MIN"),
                _ => None,
            };
            let n = count.clone().or_else(|| env(count_var)).ok_or_else(|| {
                format!(
                    "--shard auto: {index_var} is set but not the shard count; pass --shard \
                     auto/N or set {count_var}"
                )
            })?;
            let k = index
                .trim()
                .parse::<usize>()
                .ok()
                .zip(min.map_or(Some(0), |m| m.trim().parse::<usize>().ok()))
                .and_then(|(i, m)| i.checked_sub(m))
                .ok_or_else(|| format!("--shard auto: {index_var}={index:?} is not an index"))?;
            return format!("{k}/{n}")
                .parse()
                .map_err(|e| format!("--shard auto ({index_var}): {e}"));
        }
        Err(format!(
            "--shard auto: none of {} is set; pass --shard K/N (a CI matrix's index and count)",
            SHARD_ENV
                .iter()
                .map(|(i, _)| *i)
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }
}

/// Estimated seconds of each layer's quantization and of one layer's float forward (the
/// prefix a later shard streams through), on the estimates' reference 2 threads (see
/// `report::layer_seconds_estimate`): the same on every machine of a job.
pub(super) struct LayerCosts {
    pub quantize: Vec<f64>,
    pub forward: f64,
}

/// `n` contiguous ranges covering every layer, chosen so that the slowest shard — its prefix
/// forward plus its own layers — is as fast as possible: later shards, which stream through
/// more layers first, get fewer. Refused when there are more shards than layers.
pub(super) fn balanced_ranges(costs: &LayerCosts, n: usize) -> Result<Vec<Range<usize>>> {
    let layers = costs.quantize.len();
    if n == 0 || n > layers {
        return Err(Error::Usage(format!(
            "{n} shards for {layers} layers: a shard quantizes at least one layer; use at most \
             {layers} shards"
        )));
    }
    let greedy = |limit: f64| -> Option<Vec<Range<usize>>> {
        let mut ranges = Vec::with_capacity(n);
        let mut start = 0;
        while start < layers {
            if ranges.len() == n {
                return None;
            }
            let mut cost = start as f64 * costs.forward;
            let mut end = start;
            // Leave at least one layer for each shard still to come.
            let last = layers - (n - ranges.len() - 1);
            while end < last && (end == start || cost + costs.quantize[end] <= limit) {
                cost += costs.quantize[end];
                end += 1;
            }
            ranges.push(start..end);
            start = end;
        }
        (ranges.len() == n).then_some(ranges)
    };
    let total = costs.quantize.iter().sum::<f64>() + layers as f64 * costs.forward;
    let (mut lo, mut hi) = (0.0, total.max(1e-9));
    let mut best = greedy(hi).unwrap_or_else(|| even_ranges(layers, n));
    for _ in 0..60 {
        let mid = (lo + hi) / 2.0;
        match greedy(mid) {
            Some(r) => {
                best = r;
                hi = mid;
            }
            None => lo = mid,
        }
    }
    Ok(best)
}

/// `n` ranges of (nearly) equal layer counts: the fallback of [`balanced_ranges`].
fn even_ranges(layers: usize, n: usize) -> Vec<Range<usize>> {
    (0..n)
        .map(|k| k * layers / n..(k + 1) * layers / n)
        .collect()
}

/// The layer range a shard run quantizes, checked against the model.
pub(super) fn resolve(spec: &ShardSpec, layers: usize, costs: &LayerCosts) -> Result<Range<usize>> {
    match *spec {
        ShardSpec::Index { k, n } => Ok(balanced_ranges(costs, n)?[k].clone()),
        ShardSpec::Layers { start, end } if end <= layers => Ok(start..end),
        ShardSpec::Layers { end, .. } => Err(Error::Usage(format!(
            "--layers ends at {end}, but the model has {layers} layers (0..{layers})"
        ))),
    }
}

/// One shard of a `--dry-run --shards N` plan.
#[derive(Debug, Clone, Serialize)]
pub struct ShardPlan {
    /// 0-based shard index.
    pub shard: usize,
    /// First layer and one past the last.
    pub layers: [usize; 2],
    /// Estimated seconds of the float forward through the layers before the range.
    pub prefix_seconds: f64,
    /// Estimated seconds of the shard as a whole (prefix and its layers).
    pub seconds: f64,
    /// Estimated peak memory (MiB): one layer in f32 and the activations, as a single run.
    pub peak_memory_mb: f64,
}

/// Estimated seconds of layers `range` on this machine, with the float forward through the
/// layers before it: `(prefix, whole)`.
pub(super) fn range_seconds(costs: &LayerCosts, range: &Range<usize>) -> (f64, f64) {
    let scale = super::report::machine_scale();
    let prefix = range.start as f64 * costs.forward;
    let whole = prefix + costs.quantize[range.clone()].iter().sum::<f64>();
    (prefix * scale, whole * scale)
}

/// The plan of `n` shards on this machine: ranges, estimated seconds and memory.
pub(super) fn plan(costs: &LayerCosts, n: usize, peak_memory_mb: f64) -> Result<Vec<ShardPlan>> {
    Ok(balanced_ranges(costs, n)?
        .into_iter()
        .enumerate()
        .map(|(k, r)| {
            let (prefix_seconds, seconds) = range_seconds(costs, &r);
            ShardPlan {
                shard: k,
                layers: [r.start, r.end],
                prefix_seconds,
                seconds,
                peak_memory_mb,
            }
        })
        .collect())
}

/// The file that makes a directory a shard: what `awq merge` needs and checks.
pub const MANIFEST: &str = "manifest.json";
/// The finished layers' parts and records inside a shard directory (not hidden: artifact
/// uploaders skip dot-directories by default).
pub const LAYERS_DIR: &str = "layers";
/// Identifies the manifest format.
pub const MANIFEST_KIND: &str = "awq-shard";

/// `manifest.json` of a shard directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`MANIFEST_KIND`].
    pub kind: String,
    /// Manifest format version (1).
    pub version: u32,
    /// The awq that wrote it.
    pub tool: String,
    /// What the bytes depend on, without the range: equal across the shards of one job.
    pub fingerprint: serde_json::Value,
    /// The options of the run (output and shard fields are the shard's own).
    pub options: QuantizeOptions,
    /// First layer and one past the last.
    pub layers: [usize; 2],
    /// Decoder layers of the model.
    pub total_layers: usize,
    /// Wall seconds of the shard run, and of its prefix forward.
    pub seconds: f64,
    pub prefix_seconds: f64,
    /// Where it ran (hostname), for the merged report.
    pub host: String,
}

impl Manifest {
    /// Reads `dir/manifest.json`: exit 3 naming the directory when it is absent or unreadable
    /// (with a hint when an unfinished run's staging lies beside it).
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let Ok(bytes) = std::fs::read(&path) else {
            let staging = crate::io::writer::staging_path(dir)?;
            let hint = if staging.is_dir() {
                format!(
                    "; its run has not finished ({} is still there): rerun that shard's command \
                     to finish it",
                    staging.display()
                )
            } else {
                String::new()
            };
            return Err(crate::input_err!(
                "{} is not a finished shard: it has no {MANIFEST}{hint}",
                dir.display()
            ));
        };
        let m: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| crate::input_err!("{}: not an awq shard manifest: {e}", path.display()))?;
        if m.kind != MANIFEST_KIND || m.version != 1 {
            return Err(crate::input_err!(
                "{}: a manifest of kind {:?} version {}, not {MANIFEST_KIND} 1",
                path.display(),
                m.kind,
                m.version
            ));
        }
        Ok(m)
    }

    /// The part file and record of layer `i` in shard directory `dir`.
    pub fn layer_files(dir: &Path, i: usize) -> (PathBuf, PathBuf) {
        let d = dir.join(LAYERS_DIR);
        (
            d.join(format!("layer-{i:05}.safetensors")),
            d.join(format!("layer-{i:05}.json")),
        )
    }
}

/// Per-layer cost estimates for `spec` under `opts` (seconds on this machine).
pub(super) fn layer_costs(
    opts: &QuantizeOptions,
    spec: &ModelSpec,
    cal: &crate::calib::CalibSummary,
) -> LayerCosts {
    let (quantize, forward) = super::report::layer_seconds_estimate(opts, spec, cal);
    LayerCosts {
        quantize: vec![quantize; spec.layers],
        forward,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_specs_parse_and_refuse() {
        assert_eq!("1/4".parse(), Ok(ShardSpec::Index { k: 1, n: 4 }));
        for bad in ["4/4", "0/0", "x/2", "3"] {
            assert!(bad.parse::<ShardSpec>().is_err(), "{bad}");
        }
        assert_eq!(
            parse_layers("2..5"),
            Ok(ShardSpec::Layers { start: 2, end: 5 })
        );
        assert!(parse_layers("5..5").is_err());
    }

    #[test]
    fn auto_reads_slurm_kubernetes_and_explicit_variables() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let slurm = env(&[
            ("SLURM_ARRAY_TASK_ID", "3"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
        ]);
        assert_eq!(
            ShardSpec::from_env("auto", slurm),
            Ok(ShardSpec::Index { k: 2, n: 3 })
        );
        let k8s = env(&[("JOB_COMPLETION_INDEX", "1")]);
        assert_eq!(
            ShardSpec::from_env("auto/4", k8s),
            Ok(ShardSpec::Index { k: 1, n: 4 })
        );
        assert!(ShardSpec::from_env("auto", k8s)
            .unwrap_err()
            .contains("auto/N"));
        assert!(ShardSpec::from_env("auto", env(&[]))
            .unwrap_err()
            .contains("SLURM_ARRAY_TASK_ID"));
        assert_eq!(
            ShardSpec::from_env("0/2", env(&[])),
            Ok(ShardSpec::Index { k: 0, n: 2 })
        );
    }

    #[test]
    fn ranges_cover_every_layer_once_and_later_shards_get_fewer() {
        let costs = LayerCosts {
            quantize: vec![20.0; 32],
            forward: 1.0,
        };
        for n in 1..=32 {
            let r = balanced_ranges(&costs, n).unwrap();
            assert_eq!(r.len(), n);
            assert_eq!(r[0].start, 0);
            assert_eq!(r[n - 1].end, 32);
            assert!(r
                .windows(2)
                .all(|w| w[0].end == w[1].start && !w[1].is_empty()));
        }
        let r = balanced_ranges(&costs, 4).unwrap();
        assert!(r[0].len() >= r[3].len(), "{r:?}");
        // The slowest shard is no slower than with equal counts.
        let cost = |r: &Range<usize>| r.start as f64 + 20.0 * r.len() as f64;
        let worst = r.iter().map(cost).fold(0.0, f64::max);
        let even = even_ranges(32, 4).iter().map(cost).fold(0.0, f64::max);
        assert!(worst <= even, "{worst} > {even}");
        assert!(balanced_ranges(&costs, 33).is_err());
    }
}

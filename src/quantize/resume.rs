//! What `--resume` needs from the staging directory: the finished layers' records and the
//! fingerprint a resumed run must match.

use super::report::LayerReport;
use super::{QuantizeOptions, TOOL};
use crate::error::{Error, Result};
use crate::io::fingerprint;
use crate::model::Model;

/// A finished layer as persisted in the staging directory for `--resume`.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct LayerRecord {
    pub report: LayerReport,
    /// The part's tensor names in checkpoint order.
    pub tensors: Vec<String>,
}

pub(super) const FINGERPRINT_FILE: &str = "fingerprint.json";

/// Everything the output bytes depend on (see [`crate::io::fingerprint`]).
pub(super) fn fingerprint(
    opts: &QuantizeOptions,
    model: &Model,
    ids: &[u32],
) -> Result<serde_json::Value> {
    let files = model
        .ckpt
        .files()
        .iter()
        .map(|f| fingerprint::file_identity(f))
        .collect::<Result<Vec<_>>>()?;
    let config = model.dir.join("config.json");
    let config = std::fs::read(&config).map_err(|e| Error::input_io(&config, e))?;
    let id_bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
    Ok(serde_json::json!({
        "tool": TOOL,
        "model files": files,
        "config.json": format!("{:016x}", fingerprint::fnv1a(&config)),
        "calibration token ids": {"count": ids.len(), "fnv1a": format!("{:016x}", fingerprint::fnv1a(&id_bytes))},
        "options": {
            "w_bit": opts.w_bit, "group": opts.group, "layout": opts.layout, "grid": opts.grid,
            "n_grid": opts.n_grid, "clip": opts.clip, "no_search": opts.no_search,
            "search_blocks": opts.search_blocks, "seqlen": opts.calib.seqlen,
        },
    }))
}

//! The routed experts of a MoE layer, read one at a time. A DeepSeek-V3 MoE layer holds 11.3 G
//! expert parameters, 45 GB in f32: more than a machine that quantizes it should need. So the
//! experts stay in the checkpoint (mmap'd, in their source dtype, fp8 included) and each one is
//! converted to f32 when the forward, the scale search or the packing reaches it, then dropped.
//! What the quantizer changes in them is kept as data applied on every read: the MLP group's
//! input scales (gate/up columns × s) and, while that group is searched, a candidate's
//! fake quantization. The memory bound of a MoE layer is then its attention and shared parts,
//! one expert, and the activations.

use std::sync::Arc;

use candle_core::Tensor;

use super::config::ModelSpec;
use super::layer::Linear;
use crate::error::Result;
use crate::io::reader::Checkpoint;

/// Expert `e`'s gate, up and down projections, in f32.
pub type Expert = [Linear; 3];

/// A layer's routed experts, read from the checkpoint on demand.
#[derive(Clone)]
pub struct Experts {
    ckpt: Arc<Checkpoint>,
    spec: Arc<ModelSpec>,
    /// The layer's tensor prefix (`model.layers.5`).
    prefix: String,
    /// Gate/up input columns × these (the MLP group's scales, once applied).
    input_scales: Option<Arc<Vec<f32>>>,
    /// While the MLP group is searched: gate/up replaced by `Q(W·diag(s))·diag(s)⁻¹` for this
    /// candidate `s` and group size.
    candidate: Option<(Arc<Vec<f32>>, usize)>,
}

impl std::fmt::Debug for Experts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Experts")
            .field("prefix", &self.prefix)
            .field("scaled", &self.input_scales.is_some())
            .field("candidate", &self.candidate.is_some())
            .finish()
    }
}

impl Experts {
    pub fn new(ckpt: Arc<Checkpoint>, spec: &ModelSpec, prefix: String) -> Self {
        Self {
            ckpt,
            spec: Arc::new(spec.clone()),
            prefix,
            input_scales: None,
            candidate: None,
        }
    }

    /// Number of routed experts.
    pub fn len(&self) -> usize {
        self.spec.moe.as_ref().map_or(0, |m| m.experts)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Which expert and which of its projections (0 gate, 1 up, 2 down) the linear `name`
    /// (relative to the layer) is, if it is a routed expert's.
    pub fn find(&self, name: &str) -> Option<(usize, usize)> {
        let moe = self.spec.moe.as_ref()?;
        let rest = name.strip_prefix(moe.experts_prefix)?.strip_prefix('.')?;
        let (e, leaf) = rest.split_once('.')?;
        let k = moe.leaves.iter().position(|l| *l == leaf)?;
        Some((e.parse().ok()?, k))
    }

    /// Expert `e` in f32, with the applied input scales and the current candidate.
    pub fn get(&self, e: usize) -> Result<Expert> {
        let moe = self
            .spec
            .moe
            .as_ref()
            .expect("experts belong to a MoE spec");
        let (d, n) = (self.spec.hidden, moe.intermediate);
        let names = self.spec.expert_linears(e);
        let shapes = [(n, d), (n, d), (d, n)];
        let load = |k: usize| {
            let (out, inp) = shapes[k];
            let prefix = format!("{}.{}", self.prefix, names[k]);
            Linear::load(&self.ckpt, &self.spec, &prefix, out, inp, false)
        };
        let (mut gate, mut up, down) = (load(0)?, load(1)?, load(2)?);
        gate.weight = self.gate_up_weight(gate.weight)?;
        up.weight = self.gate_up_weight(up.weight)?;
        // The source pages of this expert are not needed again until the next pass.
        for name in names {
            self.ckpt.release_linear(&format!("{}.{name}", self.prefix));
        }
        Ok([gate, up, down])
    }

    /// A gate/up weight as the layer now holds it.
    fn gate_up_weight(&self, w: Tensor) -> Result<Tensor> {
        let w = match &self.input_scales {
            Some(s) => w.broadcast_mul(&Tensor::from_slice(s, s.len(), w.device())?)?,
            None => w,
        };
        Ok(match &self.candidate {
            Some((s, group)) => crate::quant::search::scaled_fake_quant(&w, s, *group)?,
            None => w,
        })
    }

    /// Multiplies every expert's gate/up input columns by `s` (AWQ-SPEC §5), on top of any
    /// scales applied before.
    pub fn scale_inputs(&mut self, s: &[f32]) {
        let s: Vec<f32> = match &self.input_scales {
            Some(prev) => prev.iter().zip(s).map(|(a, b)| a * b).collect(),
            None => s.to_vec(),
        };
        self.input_scales = Some(Arc::new(s));
    }

    /// Reads gate/up as candidate `s` would quantize them (`None`: as they are).
    pub fn set_candidate(&mut self, candidate: Option<(&[f32], usize)>) {
        self.candidate = candidate.map(|(s, g)| (Arc::new(s.to_vec()), g));
    }
}

//! Grouped-query attention with separate `q_proj`, `k_proj`, `v_proj` (Llama and most
//! families): vLLM merges them into one `qkv_proj` split by heads; the v → o group exists only
//! where v's rows match o's inputs (AutoAWQ's `v_proj.weight.shape == o_proj.weight.shape`).

use candle_core::Tensor;

use super::{grouped_context, head_norms, Attention};
use crate::error::Result;
use crate::model::arch::Input;
use crate::model::config::ModelSpec;
use crate::model::groups::{Inspect, PrevOp, ScaleGroup};
use crate::model::layer::{LayerWeights, LinearInputs};
use crate::model::rope::Rope;
use crate::model::shapes::{LinearShape, Split, K_PROJ, O_PROJ, QKV_PROJ, Q_PROJ, V_PROJ};

pub struct Mha;

impl Attention for Mha {
    fn linears(&self, spec: &ModelSpec) -> Vec<LinearShape> {
        let (d, hd) = (spec.hidden, spec.head_dim);
        let (qd, kvd) = (spec.heads * hd, spec.kv_heads * hd);
        let qkv = |name, out, kv| {
            LinearShape::new(name, [out, d], spec.qkv_bias, Input::Attn)
                .split(Split::Heads { per_head: hd, kv })
                .merged(QKV_PROJ)
        };
        vec![
            qkv(Q_PROJ, qd, false),
            qkv(K_PROJ, kvd, true),
            qkv(V_PROJ, kvd, true),
            o_proj(spec),
        ]
    }

    fn norms(&self, spec: &ModelSpec) -> Vec<(&'static str, usize)> {
        head_norms(spec)
    }

    fn input_linears(&self, _: &ModelSpec) -> Vec<&'static str> {
        vec![Q_PROJ, K_PROJ, V_PROJ]
    }

    fn inner_groups(&self, spec: &ModelSpec) -> Vec<ScaleGroup> {
        v_to_o(spec, V_PROJ)
    }

    fn context(
        &self,
        layer: &LayerWeights,
        spec: &ModelSpec,
        rope: &Rope,
        x: &Tensor,
        seq_len: usize,
        _capture: bool,
    ) -> Result<(Tensor, LinearInputs)> {
        let [q, k, v] = [Q_PROJ, K_PROJ, V_PROJ].map(|n| layer.linear(n).forward(x));
        let ctx = grouped_context(layer, spec, rope, [q?, k?, v?], seq_len)?;
        Ok((ctx, LinearInputs::default()))
    }
}

/// `o_proj`: row parallel by q heads.
pub(super) fn o_proj(spec: &ModelSpec) -> LinearShape {
    let (hd, qd) = (spec.head_dim, spec.heads * spec.head_dim);
    LinearShape::new(O_PROJ, [spec.hidden, qd], spec.o_bias, Input::O)
        .split(Split::RowHeads { per_head: hd })
}

/// The v → o group when v's rows (the last rows of `v`) match o's inputs one to one: no
/// grouped-query sharing and `hidden == heads · head_dim`.
pub(super) fn v_to_o(spec: &ModelSpec, v: &'static str) -> Vec<ScaleGroup> {
    let (qd, kvd) = (spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim);
    if kvd != qd || spec.hidden != qd {
        return Vec::new();
    }
    vec![ScaleGroup {
        name: "o",
        prev: PrevOp::Linear(v),
        linears: vec![O_PROJ],
        input: Input::O,
        inspect: Inspect::Linear,
        compensate: Vec::new(),
    }]
}

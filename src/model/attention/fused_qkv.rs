//! Grouped-query attention with one `qkv_proj` whose output rows are `[q; k; v]` (Phi-3), which
//! vLLM splits as its `QKVParallelLinear`. The v → o group scales only the v rows. (AutoAWQ's
//! phi3.py adds it unconditionally, which with grouped-query attention would divide k and q
//! rows; we do not.)

use candle_core::Tensor;

use super::mha::{o_proj, v_to_o};
use super::{grouped_context, head_norms, Attention};
use crate::error::Result;
use crate::model::arch::Input;
use crate::model::config::ModelSpec;
use crate::model::groups::ScaleGroup;
use crate::model::layer::{LayerWeights, LinearInputs};
use crate::model::rope::Rope;
use crate::model::shapes::{LinearShape, Split, QKV_PROJ};

pub struct FusedQkv;

impl Attention for FusedQkv {
    fn linears(&self, spec: &ModelSpec) -> Vec<LinearShape> {
        let hd = spec.head_dim;
        let out = (spec.heads + 2 * spec.kv_heads) * hd;
        vec![
            LinearShape::new(QKV_PROJ, [out, spec.hidden], spec.qkv_bias, Input::Attn)
                .split(Split::QkvHeads { per_head: hd }),
            o_proj(spec),
        ]
    }

    fn norms(&self, spec: &ModelSpec) -> Vec<(&'static str, usize)> {
        head_norms(spec)
    }

    fn input_linears(&self, _: &ModelSpec) -> Vec<&'static str> {
        vec![QKV_PROJ]
    }

    fn inner_groups(&self, spec: &ModelSpec) -> Vec<ScaleGroup> {
        v_to_o(spec, QKV_PROJ)
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
        let (qd, kvd) = (spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim);
        let y = layer.linear(QKV_PROJ).forward(x)?;
        let [q, k, v] = [(0, qd), (qd, kvd), (qd + kvd, kvd)].map(|(at, len)| y.narrow(1, at, len));
        let ctx = grouped_context(layer, spec, rope, [q?, k?, v?], seq_len)?;
        Ok((ctx, LinearInputs::default()))
    }
}

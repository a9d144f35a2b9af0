//! The gated MLP `down_proj(act(gate_proj(x)) · up_proj(x))` (Llama and most families), which
//! vLLM runs with gate/up merged into `gate_up_proj`; and Phi-3's, which stores that merged
//! `gate_up_proj` (output rows `[gate; up]`). The down group scales up's rows (the up half of
//! the fused one).

use candle_core::Tensor;

use super::{down, down_group, gate_product, gated_hidden, Mlp};
use crate::error::Result;
use crate::model::arch::Input;
use crate::model::config::ModelSpec;
use crate::model::groups::ScaleGroup;
use crate::model::layer::{LayerWeights, LinearInputs};
use crate::model::shapes::{LinearShape, DOWN_PROJ, GATE_PROJ, GATE_UP_PROJ, UP_PROJ};

pub struct Gated;

impl Mlp for Gated {
    fn linears(&self, spec: &ModelSpec, input: Input) -> Vec<LinearShape> {
        let (d, i, b) = (spec.hidden, spec.intermediate, spec.mlp_bias);
        vec![
            LinearShape::new(GATE_PROJ, [i, d], b, input).merged(GATE_UP_PROJ),
            LinearShape::new(UP_PROJ, [i, d], b, input).merged(GATE_UP_PROJ),
            LinearShape::new(DOWN_PROJ, [d, i], b, Input::Down),
        ]
    }

    fn inner_groups(&self, _: &ModelSpec) -> Vec<ScaleGroup> {
        vec![down_group("down", UP_PROJ, DOWN_PROJ, Input::Down)]
    }

    fn forward(
        &self,
        layer: &LayerWeights,
        spec: &ModelSpec,
        x: &Tensor,
        capture: bool,
    ) -> Result<(Tensor, LinearInputs)> {
        let (gate, up) = (layer.linear(GATE_PROJ), layer.linear(UP_PROJ));
        let hidden = gated_hidden(spec, gate, up, x)?;
        down(layer, spec, DOWN_PROJ, hidden, capture)
    }
}

pub struct FusedGated;

impl Mlp for FusedGated {
    fn linears(&self, spec: &ModelSpec, input: Input) -> Vec<LinearShape> {
        let (d, i, b) = (spec.hidden, spec.intermediate, spec.mlp_bias);
        vec![
            LinearShape::new(GATE_UP_PROJ, [2 * i, d], b, input),
            LinearShape::new(DOWN_PROJ, [d, i], b, Input::Down),
        ]
    }

    fn inner_groups(&self, _: &ModelSpec) -> Vec<ScaleGroup> {
        vec![down_group("down", GATE_UP_PROJ, DOWN_PROJ, Input::Down)]
    }

    fn forward(
        &self,
        layer: &LayerWeights,
        spec: &ModelSpec,
        x: &Tensor,
        capture: bool,
    ) -> Result<(Tensor, LinearInputs)> {
        let y = layer.linear(GATE_UP_PROJ).forward(x)?;
        let i = y.dim(1)? / 2;
        let (gate, up) = (
            y.narrow(1, 0, i)?.contiguous()?,
            y.narrow(1, i, i)?.contiguous()?,
        );
        down(
            layer,
            spec,
            DOWN_PROJ,
            gate_product(spec, gate, up)?,
            capture,
        )
    }
}

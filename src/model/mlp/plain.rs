//! Starcoder2's MLP `c_proj(act(c_fc(x)))`. An activation sits between the linears, so no linear
//! directly precedes `c_proj`: AutoAWQ folds into the activation instead and stores
//! `mlp.act.scales`, which not every loader reads. We leave that pair unscaled (`c_proj` is
//! still clipped and quantized), so the checkpoint is plain AWQ for every loader.

use candle_core::Tensor;

use super::{act, down, Mlp};
use crate::error::Result;
use crate::model::arch::Input;
use crate::model::config::ModelSpec;
use crate::model::groups::ScaleGroup;
use crate::model::layer::{round_to, LayerWeights, LinearInputs};
use crate::model::shapes::{LinearShape, C_FC, C_PROJ};

pub struct Plain;

impl Mlp for Plain {
    fn linears(&self, spec: &ModelSpec, input: Input) -> Vec<LinearShape> {
        let (d, i, b) = (spec.hidden, spec.intermediate, spec.mlp_bias);
        vec![
            LinearShape::new(C_FC, [i, d], b, input),
            LinearShape::new(C_PROJ, [d, i], b, Input::Down),
        ]
    }

    fn input_group(&self) -> &'static str {
        "fc"
    }

    fn inner_groups(&self, _: &ModelSpec) -> Vec<ScaleGroup> {
        Vec::new()
    }

    fn forward(
        &self,
        layer: &LayerWeights,
        spec: &ModelSpec,
        x: &Tensor,
        capture: bool,
    ) -> Result<(Tensor, LinearInputs)> {
        let r = |t: Tensor| round_to(t, spec.serve_dtype);
        let hidden = r(act(spec, &r(layer.linear(C_FC).forward(x)?)?)?)?;
        down(layer, spec, C_PROJ, hidden, capture)
    }
}

//! The mixture-of-experts block: a router (a linear `hidden → experts`, kept unquantized) picks
//! `top_k` experts per token ([`Scoring`]: softmax for Mixtral and Qwen MoE, DeepSeek-V3's
//! grouped sigmoid with `e_score_correction_bias`); each expert is a gated MLP run on the tokens
//! routed to it only (cost grows with routed tokens, not experts × tokens), read one at a time
//! ([`crate::model::experts`]); shared experts see every token (Qwen2-MoE's scaled by
//! `sigmoid(shared_expert_gate(x))`).
//!
//! Scale groups as AutoAWQ's `mixtral.py` / `qwen3_moe.py` / `deepseek_v3.py`: every expert's
//! gate and up (and the shared experts') in one group from the MLP norm, inspected over the
//! whole block, with the router's columns compensated; each expert's down against its own up,
//! on the tokens routed to it.

use candle_core::{Device, Tensor};

use super::{down_group, gated_hidden, Mlp};
use crate::error::Result;
use crate::model::arch::{intern, Input, Moe, Scoring};
use crate::model::config::ModelSpec;
use crate::model::groups::ScaleGroup;
use crate::model::layer::{round_to, LayerWeights, LinearInputs};
use crate::model::shapes::{LinearShape, Split};

pub struct MoeBlock;

/// The spec's experts.
fn moe(spec: &ModelSpec) -> &Moe {
    spec.moe.as_ref().expect("a MoE spec has experts")
}

impl Mlp for MoeBlock {
    fn linears(&self, spec: &ModelSpec, input: Input) -> Vec<LinearShape> {
        let (moe, d) = (moe(spec), spec.hidden);
        let l = |name, out, inp, input| LinearShape::new(name, [out, inp], false, input);
        let mut v = Vec::new();
        for e in 0..moe.experts {
            let [gate, up, down] = spec.expert_linears(e);
            let n = moe.intermediate;
            let routed = |l: LinearShape| LinearShape {
                expert: Some(e),
                ..l
            };
            v.extend([
                routed(l(gate, n, d, input)),
                routed(l(up, n, d, input)),
                routed(l(down, d, n, Input::Expert(e))),
            ]);
        }
        if let Some(shared) = &moe.shared {
            let [gate, up, down] = shared.linears();
            let n = shared.intermediate;
            let merged = intern(format!("{}.gate_up_proj", shared.prefix));
            v.extend([
                l(gate, n, d, input).merged(merged),
                l(up, n, d, input).merged(merged),
                l(down, d, n, Input::SharedDown),
            ]);
        }
        v
    }

    fn routers(&self, spec: &ModelSpec) -> Vec<LinearShape> {
        let moe = moe(spec);
        let l = |name, out| {
            LinearShape::new(name, [out, spec.hidden], false, Input::Mlp).split(Split::Replicated)
        };
        let mut v = vec![l(moe.router, moe.experts)];
        if let Some(gate) = moe.shared.as_ref().and_then(|s| s.gate) {
            v.push(l(gate, 1));
        }
        v
    }

    fn verbatim(&self, spec: &ModelSpec) -> Vec<(&'static str, usize)> {
        let moe = moe(spec);
        moe.correction_bias()
            .map(|b| (b, moe.experts))
            .into_iter()
            .collect()
    }

    fn inner_groups(&self, spec: &ModelSpec) -> Vec<ScaleGroup> {
        let moe = moe(spec);
        let mut groups = Vec::new();
        for e in 0..moe.experts {
            let [_, up, dn] = spec.expert_linears(e);
            let name = intern(format!("experts.{e}.down"));
            groups.push(down_group(name, up, dn, Input::Expert(e)));
        }
        if let Some(shared) = &moe.shared {
            let [_, up, dn] = shared.linears();
            let leaf = shared.prefix.trim_start_matches("mlp.");
            let name = intern(format!("{leaf}.down"));
            groups.push(down_group(name, up, dn, Input::SharedDown));
        }
        groups
    }

    /// Routes every token, runs each expert on its tokens, adds the weighted outputs in expert
    /// order (transformers' `index_add_`), then the shared experts.
    fn forward(
        &self,
        layer: &LayerWeights,
        spec: &ModelSpec,
        x: &Tensor,
        capture: bool,
    ) -> Result<(Tensor, LinearInputs)> {
        let moe = moe(spec);
        let r = |t: Tensor| round_to(t, spec.serve_dtype);
        let routing = route(layer, moe, x)?;
        let (tokens, d) = x.dims2()?;
        let mut out = vec![0f32; tokens * d];
        let mut captured = LinearInputs::default();
        for (e, routed) in routing.experts.iter().enumerate() {
            crate::interrupt::check()?;
            let hidden = if routed.is_empty() {
                Tensor::zeros((0, moe.intermediate), candle_core::DType::F32, &Device::Cpu)?
            } else {
                let xe = x.index_select(&routing.index(e)?, 0)?;
                let [gate, up, down] = layer.expert(spec, e)?;
                let hidden = gated_hidden(spec, &gate, &up, &xe)?;
                let y = r(down.forward(&hidden)?)?.to_vec2::<f32>()?;
                for ((t, w), row) in routed.iter().zip(&y) {
                    let dst = &mut out[*t as usize * d..][..d];
                    dst.iter_mut().zip(row).for_each(|(o, v)| *o += w * v);
                }
                hidden
            };
            if capture {
                captured.set(Input::Expert(e), hidden);
            }
        }
        let mut out = Tensor::from_vec(out, (tokens, d), &Device::Cpu)?;
        if let Some(shared) = &moe.shared {
            let [gate, up, down] = shared.linears();
            let hidden = gated_hidden(spec, layer.linear(gate), layer.linear(up), x)?;
            let y = r(layer.linear(down).forward(&hidden)?)?;
            out = match shared.gate {
                Some(g) => {
                    let g = candle_nn::ops::sigmoid(&layer.router(g).forward(x)?)?;
                    (out + y.broadcast_mul(&g)?)?
                }
                None => (out + y)?,
            };
            if capture {
                captured.set(Input::SharedDown, hidden);
            }
        }
        captured.routing = Some(routing);
        Ok((r(out)?, captured))
    }
}

/// The router's choice for every token of `x`.
fn route(layer: &LayerWeights, moe: &Moe, x: &Tensor) -> Result<Routing> {
    let logits = layer.router(moe.router).forward(x)?.to_vec2::<f32>()?;
    Ok(match moe.scoring {
        Scoring::Softmax => Routing::from_logits(&logits, moe.experts, moe.top_k, moe.norm_topk),
        Scoring::GroupedSigmoid { .. } => {
            let bias = layer.verbatim(moe.correction_bias().expect("a grouped router has one"));
            Routing::grouped_sigmoid(&logits, &bias.to_vec1::<f32>()?, moe)
        }
    })
}

/// A MoE layer's routing: for each expert, the tokens routed to it (ascending) and their
/// routing weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub experts: Vec<Vec<(u32, f32)>>,
}

impl Routing {
    /// Tokens per expert.
    pub fn tokens(&self) -> Vec<usize> {
        self.experts.iter().map(Vec::len).collect()
    }

    /// The token indices routed to expert `e`, as a `u32` index tensor.
    pub fn index(&self, e: usize) -> Result<Tensor> {
        let ids: Vec<u32> = self.experts[e].iter().map(|(t, _)| *t).collect();
        let n = ids.len();
        Ok(Tensor::from_vec(ids, n, &Device::Cpu)?)
    }

    /// Routes every row of `logits: [tokens, experts]`: softmax over all experts, the `top_k`
    /// most probable (ties to the lower index), weights renormalised to sum 1 when `norm_topk`
    /// (transformers' Mixtral / Qwen MoE blocks, in f32).
    pub fn from_logits(logits: &[Vec<f32>], experts: usize, top_k: usize, norm_topk: bool) -> Self {
        let mut routed = vec![Vec::new(); experts];
        for (t, row) in logits.iter().enumerate() {
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let exp: Vec<f32> = row.iter().map(|&x| (x - m).exp()).collect();
            let z: f32 = exp.iter().sum();
            let mut order: Vec<usize> = (0..experts).collect();
            order.sort_by(|&a, &b| exp[b].total_cmp(&exp[a]).then(a.cmp(&b)));
            let top = &order[..top_k];
            let sum: f32 = top.iter().map(|&e| exp[e] / z).sum();
            for &e in top {
                let p = exp[e] / z;
                routed[e].push((t as u32, if norm_topk { p / sum } else { p }));
            }
        }
        Self { experts: routed }
    }

    /// Routes every row of `logits: [tokens, experts]` as DeepSeek-V3's `noaux_tc` router does
    /// (transformers' `DeepseekV3MoE.route_tokens_to_experts`, `Glm4MoeMoE`; see
    /// [`Scoring::GroupedSigmoid`]), in f32. The groups outside the best `topk_group` have their
    /// biased scores set to 0 (not −∞, as `masked_fill(…, 0.0)`), and ties go to the lower
    /// index.
    pub fn grouped_sigmoid(logits: &[Vec<f32>], bias: &[f32], moe: &Moe) -> Self {
        let Scoring::GroupedSigmoid {
            groups,
            topk_groups,
            scale,
        } = moe.scoring
        else {
            unreachable!("called for a grouped-sigmoid router")
        };
        let per_group = moe.experts / groups;
        let by_score = |v: &[f32]| {
            let mut order: Vec<usize> = (0..v.len()).collect();
            order.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
            order
        };
        let mut routed = vec![Vec::new(); moe.experts];
        for (t, row) in logits.iter().enumerate() {
            let scores: Vec<f32> = row.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect();
            let mut choice: Vec<f32> = scores.iter().zip(bias).map(|(s, b)| s + b).collect();
            let group_scores: Vec<f32> = choice
                .chunks_exact(per_group)
                .map(|g| by_score(g).iter().take(2).map(|&e| g[e]).sum())
                .collect();
            let kept = &by_score(&group_scores)[..topk_groups];
            for (g, chunk) in choice.chunks_exact_mut(per_group).enumerate() {
                if !kept.contains(&g) {
                    chunk.fill(0.0);
                }
            }
            let top = &by_score(&choice)[..moe.top_k];
            let sum: f32 = top.iter().map(|&e| scores[e]).sum::<f32>() + 1e-20;
            for &e in top {
                let w = if moe.norm_topk {
                    scores[e] / sum
                } else {
                    scores[e]
                };
                routed[e].push((t as u32, w * scale as f32));
            }
        }
        Self { experts: routed }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::arch::Moe;

    #[test]
    fn routing_picks_top_k_by_softmax_and_renormalises_on_request() {
        // Token 0 prefers experts 2 then 0; token 1 ties experts 1 and 3 (the lower index wins).
        let logits = vec![vec![1.0, 0.0, 2.0, -1.0], vec![0.0, 1.0, 0.0, 1.0]];
        let raw = Routing::from_logits(&logits, 4, 2, false);
        let z0: f32 = logits[0].iter().map(|x| x.exp()).sum();
        assert_eq!(raw.tokens(), vec![1, 1, 1, 1]);
        assert_eq!(raw.experts[2][0].0, 0);
        assert!((raw.experts[2][0].1 - 2f32.exp() / z0).abs() < 1e-6);
        assert_eq!(raw.experts[1][0].0, 1);
        assert_eq!(raw.experts[3][0].0, 1);
        let norm = Routing::from_logits(&logits, 4, 2, true);
        let (a, b) = (norm.experts[2][0].1, norm.experts[0][0].1);
        assert!((a + b - 1.0).abs() < 1e-6 && (a / b - 1f32.exp()).abs() < 1e-5);
    }

    fn sigmoid_moe(groups: usize, topk_groups: usize, norm_topk: bool) -> Moe {
        Moe {
            experts: 4,
            top_k: 2,
            intermediate: 8,
            norm_topk,
            scoring: Scoring::GroupedSigmoid {
                groups,
                topk_groups,
                scale: 2.5,
            },
            shared: None,
            router: "mlp.gate",
            router_listed: false,
            experts_prefix: "mlp.experts",
            leaves: ["gate_proj", "up_proj", "down_proj"],
        }
    }

    #[test]
    fn grouped_sigmoid_routing_chooses_with_the_bias_and_weighs_without_it() {
        let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
        // Experts {0, 1} and {2, 3}. Unbiased, group 0 would win (2.0 + 1.0); the bias on
        // expert 2 makes group 1 win (its top-2 biased sum), and expert 2 outranks 3.
        let logits = vec![vec![2.0, 1.0, 0.0, 0.5]];
        let bias = [0.0, 0.0, 0.9, 0.0];
        let r = Routing::grouped_sigmoid(&logits, &bias, &sigmoid_moe(2, 1, true));
        assert_eq!(r.tokens(), vec![0, 0, 1, 1]);
        let (w2, w3) = (r.experts[2][0].1, r.experts[3][0].1);
        // Weights: the unbiased scores renormalised, times routed_scaling_factor.
        let sum = sig(0.0) + sig(0.5);
        assert!((w2 - 2.5 * sig(0.0) / sum).abs() < 1e-6, "{w2}");
        assert!((w3 - 2.5 * sig(0.5) / sum).abs() < 1e-6, "{w3}");
        // Without renormalisation the weights are the scores times the factor.
        let r = Routing::grouped_sigmoid(&logits, &bias, &sigmoid_moe(2, 1, false));
        assert!((r.experts[2][0].1 - 2.5 * sig(0.0)).abs() < 1e-6);
    }

    #[test]
    fn grouped_sigmoid_routing_masks_dropped_groups_to_zero_not_minus_infinity() {
        // A negative bias pushes every kept expert's biased score below 0: the masked experts
        // (0.0, transformers' masked_fill) then rank above them, as in transformers.
        let logits = vec![vec![0.0, 0.0, 3.0, 3.0]];
        let bias = [-2.0, -2.0, -1.5, -1.6];
        let r = Routing::grouped_sigmoid(&logits, &bias, &sigmoid_moe(2, 1, true));
        // Biased scores: group 0 −1.5 and −1.5 (sum −3), group 1 −0.55 and −0.65 (sum −1.2),
        // so group 1 is kept; group 0's experts, masked to 0.0, still outrank it.
        assert_eq!(r.tokens(), vec![1, 1, 0, 0]);
    }
}

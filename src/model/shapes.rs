//! What tensors a decoder layer of a [`ModelSpec`] holds: the linears (with their shapes,
//! biases and the captured activation each reads), the unquantized routers, the norms, and the
//! per-layer attention window — derived from the family's components, so that the loader, the
//! writer, `verify` and the plan all agree on one list.

use super::arch::{intern, Block, Input, Mlp};
use super::config::ModelSpec;

/// One linear of a decoder layer: name relative to the layer, `[out, in]`, whether it has a
/// bias, and which captured activation is its input.
#[derive(Debug, Clone, Copy)]
pub struct LinearShape {
    pub name: &'static str,
    pub out: usize,
    pub inp: usize,
    pub bias: bool,
    pub input: Input,
    /// Expert `e`'s gate/up/down: the linear only sees the tokens routed to that expert.
    pub expert: Option<usize>,
    /// How vLLM splits it over tensor-parallel ranks.
    pub split: Split,
    /// The module vLLM packs it into (`self_attn.qkv_proj` for q/k/v, `mlp.gate_up_proj` for
    /// gate/up, `self_attn.fused_qkv_a_proj` for a latent attention's q_a/kv_a), or its own
    /// name. Linears merged into one module must be all quantized or all float.
    pub merged: &'static str,
}

/// How vLLM splits a linear over tensor-parallel ranks (`ColumnParallelLinear`,
/// `RowParallelLinear`, `QKVParallelLinear`, `ReplicatedLinear`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Outputs divided evenly over the ranks.
    Column,
    /// Inputs divided evenly over the ranks.
    Row,
    /// Outputs by attention heads of `per_head` features: q heads split over the ranks; with
    /// `kv`, key/value heads split, or replicate when fewer than the ranks.
    Heads { per_head: usize, kv: bool },
    /// vLLM's `QKVParallelLinear` over one fused `qkv_proj`: each rank's q heads plus its k and
    /// v heads, `per_head` features each.
    QkvHeads { per_head: usize },
    /// Inputs by q heads of `per_head` features (o_proj).
    RowHeads { per_head: usize },
    /// Not split (vLLM `disable_tp`: a latent attention's q_a/kv_a projections).
    Replicated,
}

impl LinearShape {
    /// A linear split as its input suggests (the layer's inputs: column parallel; anything
    /// read inside the block: row parallel), merged with nothing.
    pub fn new(name: &'static str, [out, inp]: [usize; 2], bias: bool, input: Input) -> Self {
        let split = match input {
            Input::Attn | Input::Mlp => Split::Column,
            _ => Split::Row,
        };
        Self {
            name,
            out,
            inp,
            bias,
            input,
            expert: None,
            split,
            merged: name,
        }
    }

    pub fn split(self, split: Split) -> Self {
        Self { split, ..self }
    }

    pub fn merged(self, merged: &'static str) -> Self {
        Self { merged, ..self }
    }

    /// Whether vLLM splits its inputs (row parallel) rather than its outputs.
    pub fn row_parallel(&self) -> bool {
        matches!(self.split, Split::Row | Split::RowHeads { .. })
    }
}

/// Linears kept or quantized together by `--keep-fp16` ([`ModelSpec::keep_units`]).
#[derive(Debug, Clone, PartialEq)]
pub struct KeepUnit {
    /// The merged module's name relative to the layer (`self_attn.qkv_proj`), or the linear's.
    pub name: &'static str,
    /// Its linears, relative to the layer.
    pub linears: Vec<&'static str>,
}

pub const Q_PROJ: &str = "self_attn.q_proj";
pub const K_PROJ: &str = "self_attn.k_proj";
pub const V_PROJ: &str = "self_attn.v_proj";
pub const QKV_PROJ: &str = "self_attn.qkv_proj";
pub const O_PROJ: &str = "self_attn.o_proj";
pub const GATE_PROJ: &str = "mlp.gate_proj";
pub const UP_PROJ: &str = "mlp.up_proj";
pub const GATE_UP_PROJ: &str = "mlp.gate_up_proj";
pub const DOWN_PROJ: &str = "mlp.down_proj";
pub const C_FC: &str = "mlp.c_fc";
pub const C_PROJ: &str = "mlp.c_proj";
pub const INPUT_NORM: &str = "input_layernorm";
pub const POST_ATTN_NORM: &str = "post_attention_layernorm";
pub const PRE_FFN_NORM: &str = "pre_feedforward_layernorm";
pub const POST_FFN_NORM: &str = "post_feedforward_layernorm";
pub const Q_NORM: &str = "self_attn.q_norm";
pub const K_NORM: &str = "self_attn.k_norm";

impl ModelSpec {
    /// The linears of every decoder layer, in checkpoint order: the attention component's,
    /// then the MLP component's ([`super::attention`], [`super::mlp`]).
    pub fn linears(&self) -> Vec<LinearShape> {
        let mlp_in = match self.block {
            Block::Parallel => Input::Attn,
            _ => Input::Mlp,
        };
        let mut v = super::attention::of(self).linears(self);
        v.extend(super::mlp::of(self).linears(self, mlp_in));
        v
    }

    /// Expert `e`'s gate, up and down projections (names relative to the layer).
    pub fn expert_linears(&self, e: usize) -> [&'static str; 3] {
        let moe = self.moe.as_ref().expect("a MoE spec has experts");
        moe.leaves
            .map(|leaf| intern(format!("{}.{e}.{leaf}", moe.experts_prefix)))
    }

    /// Linears that stay unquantized (float weights, no bias): a MoE layer's router and
    /// Qwen2-MoE's `shared_expert_gate`. Their names, as module names, are what
    /// `modules_to_not_convert` must match (see [`ModelSpec::listed_routers`]).
    pub fn router_linears(&self) -> Vec<LinearShape> {
        super::mlp::of(self).routers(self)
    }

    /// The unquantized linears that `modules_to_not_convert` must name (see
    /// [`super::arch::Moe::router_listed`]).
    pub fn listed_routers(&self) -> Vec<LinearShape> {
        match &self.moe {
            Some(m) if m.router_listed => self.router_linears(),
            _ => Vec::new(),
        }
    }

    /// Float tensors of a layer that the quantizer never changes and the output copies from
    /// the source with their dtype and bytes (a grouped-sigmoid router's float32
    /// `e_score_correction_bias`), with their widths.
    pub fn layer_verbatim(&self) -> Vec<(&'static str, usize)> {
        super::mlp::of(self).verbatim(self)
    }

    /// The latent attention's sizes. Panics unless `attn_proj` is [`AttnProj::Latent`] (the
    /// family sets both).
    pub fn latent(&self) -> super::attention::mla::Mla {
        self.mla.expect("a latent attention spec has its ranks")
    }

    /// The spec of decoder layer `i`: this one, or, for a dense layer of a MoE model
    /// ([`ModelSpec::dense`]), the same with a gated MLP of `intermediate` and no experts.
    pub fn layer(&self, i: usize) -> std::borrow::Cow<'_, ModelSpec> {
        use std::borrow::Cow;
        match self.dense.get(i) {
            Some(true) => Cow::Owned(ModelSpec {
                mlp: Mlp::Gated,
                moe: None,
                dense: Vec::new(),
                ..self.clone()
            }),
            _ => Cow::Borrowed(self),
        }
    }

    /// The distinct layer specs of the model (one, or a MoE layer and a dense one), each with
    /// the first layer of its kind, for checks that hold for every layer.
    pub fn layer_kinds(&self) -> Vec<(usize, std::borrow::Cow<'_, ModelSpec>)> {
        let first_sparse = self.dense.iter().position(|d| !d).unwrap_or(0);
        let mut v = vec![(first_sparse, self.layer(first_sparse))];
        if let Some(i) = self.dense.iter().position(|&d| d) {
            v.insert(0, (i, self.layer(i)));
        }
        v
    }

    /// `quantization_config.modules_to_not_convert`: substrings that match the unquantized
    /// linears' module names and no quantized one (transformers and vLLM match by substring,
    /// so `gate` alone would also catch every `gate_proj`): the routers', and a wrapper's
    /// vision parts (`vision_tower`, `multi_modal_projector`, `visual`).
    pub fn modules_to_not_convert(&self) -> Option<Vec<&'static str>> {
        // Each vision entry twice: `vision_tower` for the loaders that match substrings (vLLM,
        // transformers 4), `model.vision_tower` for transformers 5, which matches at the start
        // of its own module names (see `verify::vision`).
        let vision = self.vision.iter().flat_map(|v| {
            let t5 = v
                .entries
                .iter()
                .map(|e| super::arch::intern(format!("model.{e}")));
            v.entries.iter().copied().chain(t5)
        });
        let entries: Vec<&'static str> = (self.listed_routers().into_iter().map(|l| l.name))
            .chain(vision)
            .collect();
        (!entries.is_empty()).then_some(entries)
    }

    /// The packed format the linear `module` (full name, `model.layers.3.mlp.down_proj`) is
    /// stored in: `None` in an unquantized checkpoint, and for a linear that a
    /// `modules_to_not_convert` entry matches (transformers' and vLLM's substring rule), which
    /// is stored as a float `.weight`.
    pub fn packed(&self, module: &str) -> Option<super::config::AwqFormat> {
        self.awq.filter(|_| !self.not_converted_matches(module))
    }

    /// Whether a `modules_to_not_convert` entry matches the module name `module` (a linear's,
    /// a router's or a merged module's): an entry that is a substring of it, the rule
    /// transformers and vLLM apply; in a compressed-tensors checkpoint, an `ignore` entry that
    /// names it exactly or as a `re:` pattern.
    pub fn not_converted_matches(&self, module: &str) -> bool {
        let entries = self.not_converted.iter().flatten();
        match self.awq.map(|f| f.layout) {
            // compressed-tensors' `ignore`: exact names or `re:` patterns.
            Some(crate::quant::pack::Layout::PackQuantized) => entries
                .into_iter()
                .any(|e| super::compressed::ignores(e, module)),
            _ => entries.into_iter().any(|e| module.contains(e.as_str())),
        }
    }

    /// What `--keep-fp16` keeps or quantizes as one: the linears a loader merges into one
    /// module (vLLM's `qkv_proj` and `gate_up_proj` refuse a mix of quantized and float
    /// shards, `quant_utils.is_layer_skipped`), named as vLLM names the merged module; every
    /// other dense linear alone. Experts and shared experts are not units (`--keep-fp16` is
    /// refused on MoE models).
    pub fn keep_units(&self) -> Vec<KeepUnit> {
        let mut units: Vec<KeepUnit> = Vec::new();
        for l in self.linears().into_iter().filter(|l| l.expert.is_none()) {
            let merged = l.merged;
            match units.iter_mut().find(|u| u.name == merged) {
                Some(u) => u.linears.push(l.name),
                None => units.push(KeepUnit {
                    name: merged,
                    linears: vec![l.name],
                }),
            }
        }
        units
    }

    /// Every captured activation kind the layer's linears read, in clipping order.
    pub fn inputs(&self) -> Vec<Input> {
        let mut v: Vec<Input> = Vec::new();
        for l in self.linears() {
            if !v.contains(&l.input) {
                v.push(l.input);
            }
        }
        v
    }

    /// The norm whose output feeds the MLP (`None` in a parallel block).
    pub fn mlp_norm(&self) -> Option<&'static str> {
        match self.block {
            Block::Sequential => Some(POST_ATTN_NORM),
            Block::Sandwich => Some(PRE_FFN_NORM),
            Block::Parallel => None,
        }
    }

    /// The norms of every decoder layer with their width, in checkpoint order.
    pub fn layer_norms(&self) -> Vec<(&'static str, usize)> {
        let d = self.hidden;
        let mut v = vec![(INPUT_NORM, d)];
        match self.block {
            Block::Sequential => v.push((POST_ATTN_NORM, d)),
            Block::Sandwich => {
                v.extend([(POST_ATTN_NORM, d), (PRE_FFN_NORM, d), (POST_FFN_NORM, d)])
            }
            Block::Parallel => {}
        }
        v.extend(super::attention::of(self).norms(self));
        v
    }

    /// Whether a norm named `name` (relative to its layer) carries a bias: LayerNorms with bias,
    /// never the per-head q/k norms.
    pub fn norm_has_bias(&self, name: &str) -> bool {
        self.norm_bias && name != Q_NORM && name != K_NORM
    }

    /// The float tensors of every decoder layer (norm weights and biases) with their shapes,
    /// names relative to the layer.
    pub fn layer_floats(&self) -> Vec<(String, usize)> {
        let mut v = Vec::new();
        for (name, width) in self.layer_norms() {
            v.push((format!("{name}.weight"), width));
            if self.norm_has_bias(name) {
                v.push((format!("{name}.bias"), width));
            }
        }
        v
    }

    /// The sliding window of layer `i` (`None`: full causal attention).
    pub fn window(&self, i: usize) -> Option<usize> {
        match &self.sliding_layers {
            Some(layers) if !layers.get(i).copied().unwrap_or(false) => None,
            _ => self.sliding_window,
        }
    }

    /// Whether layer `i` uses the local rope base (Gemma 3's sliding layers).
    pub fn local_rope(&self, i: usize) -> bool {
        self.local_rope_theta.is_some() && self.window(i).is_some()
    }
}

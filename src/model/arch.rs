//! The components a decoder layer is built from. A family (one small file per architecture) is a
//! choice of these plus its config defaults; each attention and MLP kind is implemented once in
//! `attention/` and `mlp/`, and the one decoder in `layer.rs` composes them, so adding a family
//! is data, not a copy of the forward.

use crate::error::Result;
use crate::input_err;

/// How a norm normalises (`input_layernorm`, the final `model.norm`, q/k norms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// `x / rms(x) · w` (Llama, Qwen, Mistral, Phi-3, Granite).
    Rms,
    /// `x / rms(x) · (1 + w)` (Gemma 1/2/3): folding a scale `s` stores `(1 + w)/s − 1`.
    RmsOnePlus,
    /// `(x − mean) / std · w (+ b)` (StableLM and Starcoder2 with bias, Cohere without).
    Layer,
}

/// How a layer combines attention and MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Block {
    /// `h += attn(input_layernorm(h))`; `h += mlp(post_attention_layernorm(h))`.
    Sequential,
    /// Gemma 2/3: `h += post_attention_layernorm(attn(input_layernorm(h)))`;
    /// `h += post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))`.
    Sandwich,
    /// Cohere (and StableLM with `use_parallel_residual`): one norm feeds both,
    /// `h + attn(x) + mlp(x)` with `x = input_layernorm(h)`.
    Parallel,
}

/// The attention projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnProj {
    /// `q_proj`, `k_proj`, `v_proj`.
    Separate,
    /// One `qkv_proj` whose output rows are `[q; k; v]` (Phi-3).
    Fused,
    /// Multi-head latent attention (DeepSeek-V3): low-rank q and kv projections with their
    /// own norms; see [`super::attention::mla::Mla`], which owns its tensors, groups and forward.
    Latent,
}

/// The MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mlp {
    /// `down_proj(act(gate_proj(x)) · up_proj(x))`.
    Gated,
    /// Phi-3: one `gate_up_proj` whose output rows are `[gate; up]`, then as [`Mlp::Gated`].
    FusedGated,
    /// Starcoder2: `c_proj(act(c_fc(x)))`.
    Plain,
    /// A sparse mixture of gated experts behind a router (Mixtral, Qwen2-MoE, Qwen3-MoE); see
    /// [`Moe`].
    Moe,
}

/// The mixture-of-experts block: a router (a linear `hidden → experts`, kept unquantized) picks
/// `top_k` experts per token ([`Scoring`]); each expert is a gated MLP; Qwen2-MoE, DeepSeek-V3
/// and GLM-4.5 add shared experts that see every token ([`Shared`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Moe {
    pub experts: usize,
    pub top_k: usize,
    /// Each expert's intermediate size.
    pub intermediate: usize,
    /// Renormalise the top-k weights to sum to 1 (Mixtral, Qwen3-MoE, DeepSeek-V3).
    pub norm_topk: bool,
    /// How the router's logits choose and weigh the experts.
    pub scoring: Scoring,
    /// The shared experts (Qwen2-MoE, DeepSeek-V3, GLM-4.5).
    pub shared: Option<Shared>,
    /// The router's name relative to the layer (`block_sparse_moe.gate`, `mlp.gate`).
    pub router: &'static str,
    /// Whether `modules_to_not_convert` must name the router. Mixtral's and Qwen MoE's are an
    /// `nn.Linear` that loaders would quantize otherwise. DeepSeek-V3's and GLM-4.5's are a
    /// module of their own (transformers' `DeepseekV3TopkRouter`, vLLM's `GateLinear` without
    /// a quant config) and must not be named: `mlp.gate` would also match the dense layers'
    /// `mlp.gate_proj` (vLLM `quant_utils.is_layer_skipped` matches substrings).
    pub router_listed: bool,
    /// Expert `e`'s linears are `{experts}.{e}.{gate|up|down}`.
    pub experts_prefix: &'static str,
    /// Leaf names of an expert's gate, up and down projections (`w1`, `w3`, `w2` in Mixtral).
    pub leaves: [&'static str; 3],
}

/// How a router turns its logits into the chosen experts and their weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scoring {
    /// Softmax over all experts, the `top_k` most probable (Mixtral, Qwen MoE).
    Softmax,
    /// DeepSeek-V3 / GLM-4.5 (`noaux_tc`): sigmoid scores; the router's
    /// `e_score_correction_bias` is added for choosing only: experts in `groups` equal groups,
    /// a group's score is the sum of its two best biased scores, the best `topk_groups` groups
    /// stay, then the `top_k` best biased scores among them. The weights are the unbiased
    /// scores (renormalised when `norm_topk`) times `scale` (`routed_scaling_factor`).
    GroupedSigmoid {
        groups: usize,
        topk_groups: usize,
        scale: f64,
    },
}

/// Experts every token goes through, added to the routed experts' output.
#[derive(Debug, Clone, PartialEq)]
pub struct Shared {
    /// Their intermediate size (DeepSeek-V3: `moe_intermediate_size × n_shared_experts`).
    pub intermediate: usize,
    /// Module of their gate/up/down projections (`mlp.shared_expert`, `mlp.shared_experts`).
    pub prefix: &'static str,
    /// Qwen2-MoE's `mlp.shared_expert_gate`: a `hidden → 1` linear (kept unquantized) whose
    /// sigmoid scales the shared output; `None`: added as is.
    pub gate: Option<&'static str>,
}

impl Shared {
    /// The shared gate, up and down projections (names relative to the layer).
    pub fn linears(&self) -> [&'static str; 3] {
        ["gate_proj", "up_proj", "down_proj"].map(|leaf| intern(format!("{}.{leaf}", self.prefix)))
    }
}

impl Moe {
    /// Refuses counts the router cannot work with.
    pub fn checked(self) -> Result<Self> {
        if self.experts == 0
            || self.top_k == 0
            || self.top_k > self.experts
            || self.intermediate == 0
        {
            return Err(input_err!(
                "config.json: a mixture of experts needs 1 ≤ num_experts_per_tok ({}) ≤ experts ({}) \
                 and a positive expert intermediate size",
                self.top_k,
                self.experts
            ));
        }
        if let Scoring::GroupedSigmoid {
            groups,
            topk_groups,
            ..
        } = self.scoring
        {
            let per_group = self.experts / groups.max(1);
            if groups == 0
                || !self.experts.is_multiple_of(groups)
                || per_group < 2
                || topk_groups == 0
                || topk_groups > groups
                || self.top_k > topk_groups * per_group
            {
                let fitting: Vec<String> = (1..=self.experts / 2)
                    .filter(|g| self.experts.is_multiple_of(*g))
                    .map(|g| g.to_string())
                    .collect();
                return Err(input_err!(
                    "config.json: n_group ({groups}) must divide n_routed_experts ({}) into groups \
                     of at least 2 (n_group {} fit), with 1 ≤ topk_group ({topk_groups}) ≤ n_group \
                     and num_experts_per_tok ({}) ≤ topk_group × experts per group; the released \
                     config.json has values that do",
                    self.experts,
                    fitting.join(", "),
                    self.top_k
                ));
            }
        }
        Ok(self)
    }

    /// The router's `e_score_correction_bias` (relative to the layer) for a grouped-sigmoid
    /// router: a float32 `[experts]` tensor copied to the output unchanged.
    pub fn correction_bias(&self) -> Option<&'static str> {
        match self.scoring {
            Scoring::GroupedSigmoid { .. } => {
                Some(intern(format!("{}.e_score_correction_bias", self.router)))
            }
            Scoring::Softmax => None,
        }
    }
}

/// `name` with an expert index replaced by `*` (`mlp.experts.7.down_proj` →
/// `mlp.experts.*.down_proj`), for messages that would otherwise repeat once per expert.
pub fn expert_pattern(name: &str) -> String {
    match name.split_once("experts.") {
        Some((head, tail)) => match tail.split_once('.') {
            Some((index, rest)) if index.parse::<usize>().is_ok() => {
                format!("{head}experts.*.{rest}")
            }
            _ => name.to_string(),
        },
        None => name.to_string(),
    }
}

/// Interns a name built at run time (an expert's linear) so that it can be used where the
/// static names are: each distinct name is allocated once per process.
pub fn intern(name: String) -> &'static str {
    use std::collections::HashSet;
    use std::sync::{Mutex, OnceLock};
    static NAMES: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut names = NAMES
        .get_or_init(Default::default)
        .lock()
        .expect("intern lock");
    if let Some(&s) = names.get(name.as_str()) {
        return s;
    }
    let s: &'static str = Box::leak(name.into_boxed_str());
    names.insert(s);
    s
}

/// The MLP activation (`hidden_act` / `hidden_activation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    Silu,
    /// `gelu_pytorch_tanh`, `gelu_new`: the tanh approximation.
    GeluTanh,
    /// `gelu`: the exact erf form.
    Gelu,
}

impl Act {
    /// transformers' `ACT2FN` names we support.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "silu" | "swish" => Ok(Act::Silu),
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Ok(Act::GeluTanh),
            "gelu" => Ok(Act::Gelu),
            other => Err(input_err!(
                "config.json: activation {other:?} is not supported (silu, gelu, gelu_pytorch_tanh, gelu_new)"
            )),
        }
    }
}

/// Which captured activation a linear reads (the quantizer captures one tensor per kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// `input_layernorm` output: q/k/v (and, in a parallel block, the MLP's input linears).
    Attn,
    /// Attention context: `o_proj`.
    O,
    /// The MLP norm's output: gate/up, gate_up or c_fc.
    Mlp,
    /// The MLP's hidden activation: down_proj or c_proj.
    Down,
    /// Expert `e`'s hidden activation on the tokens routed to it: its down projection.
    Expert(usize),
    /// The shared experts' hidden activation: their down projection.
    SharedDown,
    /// Latent attention: `q_a_layernorm`'s output, the input of `q_b_proj`.
    QLatent,
    /// Latent attention: `kv_a_layernorm`'s output, the input of `kv_b_proj`.
    KvLatent,
}

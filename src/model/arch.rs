//! The components a decoder layer is built from. A family (one small file per architecture) is a
//! choice of these plus its config defaults; the one decoder in `layer.rs` reads the choice, so
//! adding a family is data, not a copy of the forward.

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
/// `top_k` experts per token by softmax probability; each expert is a gated SiLU MLP; Qwen2-MoE
/// adds a shared expert scaled by `sigmoid(shared_expert_gate(x))`.
#[derive(Debug, Clone, PartialEq)]
pub struct Moe {
    pub experts: usize,
    pub top_k: usize,
    /// Each expert's intermediate size.
    pub intermediate: usize,
    /// Renormalise the top-k probabilities to sum to 1 (Mixtral, Qwen3-MoE).
    pub norm_topk: bool,
    /// The shared expert's intermediate size (Qwen2-MoE).
    pub shared: Option<usize>,
    /// The router's name relative to the layer (`block_sparse_moe.gate`, `mlp.gate`).
    pub router: &'static str,
    /// Expert `e`'s linears are `{experts}.{e}.{gate|up|down}`.
    pub experts_prefix: &'static str,
    /// Leaf names of an expert's gate, up and down projections (`w1`, `w3`, `w2` in Mixtral).
    pub leaves: [&'static str; 3],
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
        Ok(self)
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
    /// The shared expert's hidden activation (Qwen2-MoE): its down projection.
    SharedDown,
}

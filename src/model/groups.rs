//! AWQ scale groups as data (AWQ-SPEC §4.3, §12.2): which op absorbs 1/s, which linears get ·s
//! on their input columns, whose captured input is X, and which module's output the search
//! compares.
//!
//! The groups follow from a family's components by AutoAWQ's rule (`get_layers_for_scaling` in
//! `awq/models/<family>.py`): a norm or a linear directly before a set of linears that share its
//! output. So they are derived here from the spec rather than listed per family; the tests pin
//! each family's table against AutoAWQ's. Biases need no entry (norm scaling leaves them alone;
//! a scaled previous linear divides its bias rows too) and q/k norms sit inside the inspected
//! attention.

use super::arch::{Block, Input};
use super::config::ModelSpec;
use super::shapes as names;

/// The op before the scaled linears, which absorbs `1/s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrevOp {
    /// A norm of the layer, by name (`input_layernorm`, …).
    Norm(&'static str),
    /// A linear whose last `s.len()` output rows (and bias entries) are divided by `s`: all of
    /// `v_proj` / `up_proj`, the v rows of a fused `qkv_proj`, the up rows of `gate_up_proj`.
    Linear(&'static str),
}

/// The module whose output the scale search compares against the original.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inspect {
    SelfAttn,
    Mlp,
    /// Attention plus MLP on the same input (a parallel block: AutoAWQ inspects the layer).
    Block,
    /// The single scaled linear itself.
    Linear,
}

impl Inspect {
    pub fn name(self) -> &'static str {
        match self {
            Inspect::SelfAttn => "self_attn",
            Inspect::Mlp => "mlp",
            Inspect::Block => "layer",
            Inspect::Linear => "linear",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ScaleGroup {
    pub name: &'static str,
    pub prev: PrevOp,
    pub linears: Vec<&'static str>,
    pub input: Input,
    pub inspect: Inspect,
    /// Unquantized linears that read the same norm output (a MoE router, `shared_expert_gate`):
    /// when the norm absorbs `1/s`, their input columns are multiplied by `s` so that they
    /// compute exactly what they did (AutoAWQ 0.2.9 omits this and changes the routing).
    pub compensate: Vec<&'static str>,
}

/// The groups searched for a layer, in AutoAWQ's order: the norm before the attention → the
/// attention's input linears (in a parallel block, and the MLP's: AutoAWQ inspects the whole
/// layer); the attention's inner groups; the MLP norm → the MLP's input linears, with the
/// routers that read that norm compensated; the MLP's inner groups. What each component
/// scales and how is its own ([`super::attention`], [`super::mlp`]); which norm feeds which is
/// the layer's.
pub fn scale_groups(spec: &ModelSpec) -> Vec<ScaleGroup> {
    let (attention, mlp) = (super::attention::of(spec), super::mlp::of(spec));
    let mlp_inputs = |input| -> Vec<&'static str> {
        (mlp.linears(spec, input).into_iter())
            .filter(|l| l.input == input)
            .map(|l| l.name)
            .collect()
    };
    let first = |name, linears, inspect| ScaleGroup {
        name,
        prev: PrevOp::Norm(names::INPUT_NORM),
        linears,
        input: Input::Attn,
        inspect,
        compensate: Vec::new(),
    };
    let attn_in = attention.input_linears(spec);
    let mut groups = vec![match spec.block {
        Block::Parallel => first(
            "qkv_mlp",
            [attn_in, mlp_inputs(Input::Attn)].concat(),
            Inspect::Block,
        ),
        _ => first("qkv", attn_in, Inspect::SelfAttn),
    }];
    groups.extend(attention.inner_groups(spec));
    if let Some(norm) = spec.mlp_norm() {
        groups.push(ScaleGroup {
            name: mlp.input_group(),
            prev: PrevOp::Norm(norm),
            linears: mlp_inputs(Input::Mlp),
            input: Input::Mlp,
            inspect: Inspect::Mlp,
            compensate: mlp.routers(spec).iter().map(|l| l.name).collect(),
        });
    }
    groups.extend(mlp.inner_groups(spec));
    groups
}

/// Linears excluded from clipping: names containing these substrings (AWQ-SPEC §6.1).
pub const NO_CLIP: [&str; 5] = ["q_", "k_", "query", "key", "Wqkv"];

pub fn clipped(linear: &str) -> bool {
    let leaf = linear.rsplit('.').next().unwrap_or(linear);
    !NO_CLIP.iter().any(|s| leaf.contains(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_rule_matches_autoawq() {
        assert!(!clipped("self_attn.q_proj"));
        assert!(!clipped("self_attn.k_proj"));
        assert!(clipped("self_attn.v_proj"));
        assert!(clipped("self_attn.o_proj"));
        assert!(clipped("mlp.down_proj"));
        assert!(clipped("mlp.gate_proj"));
        // AutoAWQ's substrings miss the fused and Starcoder2 names: they are clipped.
        assert!(clipped("self_attn.qkv_proj"));
        assert!(clipped("mlp.c_fc"));
    }

    fn spec(arch: &str, extra: serde_json::Value) -> ModelSpec {
        let mut v = serde_json::json!({
            "architectures": [arch], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 8, "head_dim": 16
        });
        for (k, val) in extra.as_object().unwrap() {
            v[k] = val.clone();
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, v.to_string()).unwrap();
        super::super::load_spec(&path).unwrap()
    }

    /// (name, prev, linears, inspect) of each group, for comparing with AutoAWQ's tables.
    fn table(spec: &ModelSpec) -> Vec<(&'static str, PrevOp, Vec<&'static str>, Inspect)> {
        scale_groups(spec)
            .into_iter()
            .map(|g| (g.name, g.prev, g.linears, g.inspect))
            .collect()
    }

    #[test]
    fn llama_like_families_match_autoawq() {
        // awq/models/{llama,gemma,gemma2,stablelm}.py; Granite and Gemma 3 by the same rule.
        for (arch, mlp_norm) in [
            ("LlamaForCausalLM", "post_attention_layernorm"),
            ("GemmaForCausalLM", "post_attention_layernorm"),
            ("StableLmForCausalLM", "post_attention_layernorm"),
            ("GraniteForCausalLM", "post_attention_layernorm"),
            ("Gemma2ForCausalLM", "pre_feedforward_layernorm"),
            ("Gemma3ForCausalLM", "pre_feedforward_layernorm"),
        ] {
            let mha = spec(arch, serde_json::json!({}));
            assert_eq!(
                table(&mha),
                vec![
                    (
                        "qkv",
                        PrevOp::Norm("input_layernorm"),
                        vec!["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                        Inspect::SelfAttn
                    ),
                    (
                        "o",
                        PrevOp::Linear("self_attn.v_proj"),
                        vec!["self_attn.o_proj"],
                        Inspect::Linear
                    ),
                    (
                        "gate_up",
                        PrevOp::Norm(mlp_norm),
                        vec!["mlp.gate_proj", "mlp.up_proj"],
                        Inspect::Mlp
                    ),
                    (
                        "down",
                        PrevOp::Linear("mlp.up_proj"),
                        vec!["mlp.down_proj"],
                        Inspect::Linear
                    ),
                ],
                "{arch}"
            );
            // Grouped-query attention: no v→o group.
            let gqa = spec(arch, serde_json::json!({"num_key_value_heads": 2}));
            assert!(scale_groups(&gqa).iter().all(|g| g.name != "o"), "{arch}");
        }
    }

    #[test]
    fn phi3_fused_groups_scale_only_the_v_and_up_rows() {
        // awq/models/phi3.py, with the qkv→o group only where v's rows match o (MHA).
        let mha = spec("Phi3ForCausalLM", serde_json::json!({}));
        assert_eq!(
            table(&mha),
            vec![
                (
                    "qkv",
                    PrevOp::Norm("input_layernorm"),
                    vec!["self_attn.qkv_proj"],
                    Inspect::SelfAttn
                ),
                (
                    "o",
                    PrevOp::Linear("self_attn.qkv_proj"),
                    vec!["self_attn.o_proj"],
                    Inspect::Linear
                ),
                (
                    "gate_up",
                    PrevOp::Norm("post_attention_layernorm"),
                    vec!["mlp.gate_up_proj"],
                    Inspect::Mlp
                ),
                (
                    "down",
                    PrevOp::Linear("mlp.gate_up_proj"),
                    vec!["mlp.down_proj"],
                    Inspect::Linear
                ),
            ]
        );
        let gqa = spec(
            "Phi3ForCausalLM",
            serde_json::json!({"num_key_value_heads": 2}),
        );
        assert!(scale_groups(&gqa).iter().all(|g| g.name != "o"));
    }

    #[test]
    fn starcoder2_leaves_the_activation_pair_unscaled() {
        let s = spec("Starcoder2ForCausalLM", serde_json::json!({}));
        assert_eq!(
            table(&s),
            vec![
                (
                    "qkv",
                    PrevOp::Norm("input_layernorm"),
                    vec!["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                    Inspect::SelfAttn
                ),
                (
                    "o",
                    PrevOp::Linear("self_attn.v_proj"),
                    vec!["self_attn.o_proj"],
                    Inspect::Linear
                ),
                (
                    "fc",
                    PrevOp::Norm("post_attention_layernorm"),
                    vec!["mlp.c_fc"],
                    Inspect::Mlp
                ),
            ]
        );
    }

    #[test]
    fn cohere_parallel_block_scales_attention_and_mlp_inputs_together() {
        // awq/models/cohere.py: one group from input_layernorm over q/k/v/gate/up, inspecting
        // the whole layer.
        let s = spec("CohereForCausalLM", serde_json::json!({}));
        assert_eq!(
            table(&s),
            vec![
                (
                    "qkv_mlp",
                    PrevOp::Norm("input_layernorm"),
                    vec![
                        "self_attn.q_proj",
                        "self_attn.k_proj",
                        "self_attn.v_proj",
                        "mlp.gate_proj",
                        "mlp.up_proj"
                    ],
                    Inspect::Block
                ),
                (
                    "o",
                    PrevOp::Linear("self_attn.v_proj"),
                    vec!["self_attn.o_proj"],
                    Inspect::Linear
                ),
                (
                    "down",
                    PrevOp::Linear("mlp.up_proj"),
                    vec!["mlp.down_proj"],
                    Inspect::Linear
                ),
            ]
        );
    }

    #[test]
    fn moe_groups_span_every_expert_and_compensate_the_routers() {
        // awq/models/mixtral.py and qwen3_moe.py: every expert's gate/up in one group from
        // post_attention_layernorm over the whole block; each expert's down against its up.
        let s = spec(
            "Qwen2MoeForCausalLM",
            serde_json::json!({"num_experts": 2,
            "num_experts_per_tok": 1, "num_key_value_heads": 2}),
        );
        let groups = scale_groups(&s);
        let names: Vec<_> = groups.iter().map(|g| g.name).collect();
        assert_eq!(
            names,
            [
                "qkv",
                "gate_up",
                "experts.0.down",
                "experts.1.down",
                "shared_expert.down"
            ]
        );
        let gate_up = &groups[1];
        assert_eq!(
            gate_up.linears,
            [
                "mlp.experts.0.gate_proj",
                "mlp.experts.0.up_proj",
                "mlp.experts.1.gate_proj",
                "mlp.experts.1.up_proj",
                "mlp.shared_expert.gate_proj",
                "mlp.shared_expert.up_proj"
            ]
        );
        assert_eq!(gate_up.compensate, ["mlp.gate", "mlp.shared_expert_gate"]);
        assert_eq!(groups[3].prev, PrevOp::Linear("mlp.experts.1.up_proj"));
        assert_eq!(groups[3].input, Input::Expert(1));
        let mixtral = spec(
            "MixtralForCausalLM",
            serde_json::json!({"num_local_experts": 2}),
        );
        let g = scale_groups(&mixtral);
        assert_eq!(
            g[2].linears[..2],
            [
                "block_sparse_moe.experts.0.w1",
                "block_sparse_moe.experts.0.w3"
            ]
        );
        assert_eq!(g[2].compensate, ["block_sparse_moe.gate"]);
        assert_eq!(g[3].prev, PrevOp::Linear("block_sparse_moe.experts.0.w3"));
    }
}

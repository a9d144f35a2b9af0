//! AWQ scale groups of the Llama family as data (AWQ-SPEC §4.3, §12.2): which op absorbs 1/s,
//! which linears get ·s on their input columns, whose captured input is X, and which module's
//! output the search compares. Qwen2 biases and Qwen3 q/k norms need no entry: biases are
//! untouched by norm scaling and q/k norms sit inside the inspected attention block.

/// The op before the scaled linears, which absorbs `1/s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrevOp {
    InputNorm,
    PostNorm,
    /// A linear whose output rows are divided by `s` (and its bias, if any).
    Linear(&'static str),
}

/// The module whose output the scale search compares against the original.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inspect {
    SelfAttn,
    Mlp,
    /// The single scaled linear itself.
    Linear,
}

/// Which captured activation is X (the input of the group's first linear).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    Attn,
    O,
    Mlp,
    Down,
}

#[derive(Debug, Clone, Copy)]
pub struct ScaleGroup {
    pub name: &'static str,
    pub prev: PrevOp,
    pub linears: &'static [&'static str],
    pub input: Input,
    pub inspect: Inspect,
    /// Only when `v_proj` and `o_proj` weights have the same shape (MHA): the v→o group.
    pub needs_v_o_match: bool,
}

pub const LLAMA_GROUPS: [ScaleGroup; 4] = [
    ScaleGroup {
        name: "qkv",
        prev: PrevOp::InputNorm,
        linears: &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        input: Input::Attn,
        inspect: Inspect::SelfAttn,
        needs_v_o_match: false,
    },
    ScaleGroup {
        name: "o",
        prev: PrevOp::Linear("self_attn.v_proj"),
        linears: &["self_attn.o_proj"],
        input: Input::O,
        inspect: Inspect::Linear,
        needs_v_o_match: true,
    },
    ScaleGroup {
        name: "gate_up",
        prev: PrevOp::PostNorm,
        linears: &["mlp.gate_proj", "mlp.up_proj"],
        input: Input::Mlp,
        inspect: Inspect::Mlp,
        needs_v_o_match: false,
    },
    ScaleGroup {
        name: "down",
        prev: PrevOp::Linear("mlp.up_proj"),
        linears: &["mlp.down_proj"],
        input: Input::Down,
        inspect: Inspect::Linear,
        needs_v_o_match: false,
    },
];

/// The groups searched for a model: the v→o group only when v_proj and o_proj have the same
/// shape (no grouped-query attention), as AutoAWQ does.
pub fn scale_groups(spec: &super::config::ModelSpec) -> impl Iterator<Item = &'static ScaleGroup> {
    let [_, _, v, o, ..] = spec.linears();
    let v_o_match = (v.out, v.inp) == (o.out, o.inp);
    LLAMA_GROUPS
        .iter()
        .filter(move |g| !g.needs_v_o_match || v_o_match)
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
    }
}

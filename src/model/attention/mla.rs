//! Multi-head latent attention (DeepSeek-V3, Kimi K2; transformers `modeling_deepseek_v3.py`,
//! `DeepseekV3Attention`): [`Mla`] holds the ranks and sizes the config gives, [`Latent`] is the
//! component (its tensors, vLLM's split rules, its scale groups and its forward).
//!
//! - q: `q_b_proj(q_a_layernorm(q_a_proj(x)))` (or one `q_proj` when `q_lora_rank` is null),
//!   per head `[nope | rope]`.
//! - kv: `kv_a_proj_with_mqa(x)` is `[latent (kv_lora) | k_rope]`; the latent goes through
//!   `kv_a_layernorm` and `kv_b_proj`, per head `[k_nope | v]`; `k_rope` is one head shared by
//!   all heads.
//! - rope on the `rope` features of q and k only, softmax scale from `qk_head_dim` (set by the
//!   family, with yarn's `mscale`).
//!
//! The fused kernel takes one head size for q, k and v. Two exact rewrites let it run MLA: q and
//! k are stored per head as `[rope | nope]` (a dot product does not depend on the order of the
//! features, as long as q and k share it), so the kernel's partial rope on the first features
//! is MLA's rope; and the shorter of (q/k, v) is padded with zero features, which add nothing to
//! a score or to the context.

use candle_core::{Device, Tensor};

use super::kernel::{Kernel, Rotary, Rounding};
use super::{flat, timed, Attention};
use crate::error::Result;
use crate::model::arch::Input;
use crate::model::config::ModelSpec;
use crate::model::groups::{Inspect, PrevOp, ScaleGroup};
use crate::model::layer::{round_to, LayerWeights, LinearInputs};
use crate::model::rope::Rope;
use crate::model::shapes::{LinearShape, Split, O_PROJ, Q_PROJ};

pub const Q_A_PROJ: &str = "self_attn.q_a_proj";
pub const Q_A_NORM: &str = "self_attn.q_a_layernorm";
pub const Q_B_PROJ: &str = "self_attn.q_b_proj";
pub const KV_A_PROJ: &str = "self_attn.kv_a_proj_with_mqa";
pub const KV_A_NORM: &str = "self_attn.kv_a_layernorm";
pub const KV_B_PROJ: &str = "self_attn.kv_b_proj";
/// vLLM's module for q_a and kv_a together.
pub const FUSED_QKV_A_PROJ: &str = "self_attn.fused_qkv_a_proj";

/// The ranks and per-head sizes of a latent attention (config.json names in brackets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mla {
    /// `q_lora_rank`; `None`: q is one `q_proj`.
    pub q_lora: Option<usize>,
    /// `kv_lora_rank`.
    pub kv_lora: usize,
    /// `qk_nope_head_dim`.
    pub nope: usize,
    /// `qk_rope_head_dim`.
    pub rope: usize,
    /// `v_head_dim`.
    pub v: usize,
    /// `attention_bias`: biases on `q_a_proj`, `kv_a_proj_with_mqa` and `o_proj`.
    pub bias: bool,
}

impl Mla {
    /// q/k features per head (`qk_head_dim`).
    pub fn qk(&self) -> usize {
        self.nope + self.rope
    }

    /// The attention's linears for `heads` heads and model width `hidden`, in checkpoint
    /// order, `o_proj` last.
    pub fn linears(&self, heads: usize, hidden: usize) -> Vec<LinearShape> {
        let l = |name, out, inp, bias, input| LinearShape::new(name, [out, inp], bias, input);
        let heads_of = |per_head| Split::Heads {
            per_head,
            kv: false,
        };
        let q_out = heads * self.qk();
        let kv_a = l(
            KV_A_PROJ,
            self.kv_lora + self.rope,
            hidden,
            self.bias,
            Input::Attn,
        )
        .split(Split::Replicated);
        // vLLM (`deepseek_v2.py`) runs q_a and kv_a as one replicated `fused_qkv_a_proj`; q_b
        // and kv_b split by heads, o by the heads of its input.
        let mut v = match self.q_lora {
            Some(r) => vec![
                l(Q_A_PROJ, r, hidden, self.bias, Input::Attn)
                    .split(Split::Replicated)
                    .merged(FUSED_QKV_A_PROJ),
                l(Q_B_PROJ, q_out, r, false, Input::QLatent).split(heads_of(self.qk())),
                kv_a.merged(FUSED_QKV_A_PROJ),
            ],
            None => vec![
                l(Q_PROJ, q_out, hidden, false, Input::Attn).split(heads_of(self.qk())),
                kv_a,
            ],
        };
        let kv_out = heads * (self.nope + self.v);
        v.extend([
            l(KV_B_PROJ, kv_out, self.kv_lora, false, Input::KvLatent)
                .split(heads_of(self.nope + self.v)),
            l(O_PROJ, hidden, heads * self.v, self.bias, Input::O)
                .split(Split::RowHeads { per_head: self.v }),
        ]);
        v
    }

    /// Its norms with their widths.
    pub fn norms(&self) -> Vec<(&'static str, usize)> {
        let q = self.q_lora.map(|r| (Q_A_NORM, r));
        q.into_iter().chain([(KV_A_NORM, self.kv_lora)]).collect()
    }

    /// The linears that read `input_layernorm`'s output: the q and kv down-projections.
    pub fn input_linears(&self) -> Vec<&'static str> {
        match self.q_lora {
            Some(_) => vec![Q_A_PROJ, KV_A_PROJ],
            None => vec![Q_PROJ, KV_A_PROJ],
        }
    }

    /// Its groups after the first, as AutoAWQ's `deepseek_v3.py` and llm-compressor's
    /// DeepseekV3 mapping have them: `q_a_layernorm` → `q_b_proj`; `kv_a_layernorm` →
    /// `kv_b_proj` (the first, from `input_layernorm`, scales [`Mla::input_linears`] and inspects
    /// the whole attention). There is no v→o group: o reads the attention over all heads, not
    /// one linear's rows.
    pub fn inner_groups(&self) -> Vec<ScaleGroup> {
        let group = |name, prev, linear, input| ScaleGroup {
            name,
            prev: PrevOp::Norm(prev),
            linears: vec![linear],
            input,
            inspect: Inspect::Linear,
            compensate: Vec::new(),
        };
        let q = (self.q_lora.is_some()).then(|| group("q_b", Q_A_NORM, Q_B_PROJ, Input::QLatent));
        let kv = group("kv_b", KV_A_NORM, KV_B_PROJ, Input::KvLatent);
        q.into_iter().chain([kv]).collect()
    }

    /// Features per head in the kernel: q/k and v padded to one size.
    pub fn kernel_head(&self) -> usize {
        self.qk().max(self.v)
    }

    /// Per-head kernel layout of q `[tokens, heads · qk]` (`[nope | rope]` per head): `[rope |
    /// nope | zeros]`, `[tokens, heads · kernel_head]`.
    pub fn q_for_kernel(&self, q: &[f32], tokens: usize, heads: usize) -> Vec<f32> {
        let (hd, qk) = (self.kernel_head(), self.qk());
        let mut out = vec![0f32; tokens * heads * hd];
        for (src, dst) in q.chunks_exact(qk).zip(out.chunks_exact_mut(hd)) {
            dst[..self.rope].copy_from_slice(&src[self.nope..]);
            dst[self.rope..qk].copy_from_slice(&src[..self.nope]);
        }
        out
    }

    /// k and v in the kernel layout from `kv_b_proj`'s output (`[k_nope | v]` per head) and the
    /// shared `k_rope` `[tokens, rope]`: k per head `[k_rope | k_nope | zeros]`, v `[v | zeros]`.
    pub fn kv_for_kernel(
        &self,
        kv: &[f32],
        k_rope: &[f32],
        tokens: usize,
        heads: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let hd = self.kernel_head();
        let (mut k, mut v) = (
            vec![0f32; tokens * heads * hd],
            vec![0f32; tokens * heads * hd],
        );
        let per_head = self.nope + self.v;
        for t in 0..tokens {
            let rope = &k_rope[t * self.rope..][..self.rope];
            for h in 0..heads {
                let src = &kv[(t * heads + h) * per_head..][..per_head];
                let at = (t * heads + h) * hd;
                k[at..at + self.rope].copy_from_slice(rope);
                k[at + self.rope..at + self.qk()].copy_from_slice(&src[..self.nope]);
                v[at..at + self.v].copy_from_slice(&src[self.nope..]);
            }
        }
        (k, v)
    }

    /// The context `[tokens, heads · v]` from the kernel's `[tokens, heads · kernel_head]`.
    pub fn context_from_kernel(
        &self,
        ctx: &[f32],
        tokens: usize,
        heads: usize,
    ) -> candle_core::Result<Tensor> {
        let hd = self.kernel_head();
        let out: Vec<f32> = ctx
            .chunks_exact(hd)
            .flat_map(|head| head[..self.v].iter().copied())
            .collect();
        Tensor::from_vec(out, (tokens, heads * self.v), &Device::Cpu)
    }
}

/// The latent attention component; its sizes are the spec's ([`ModelSpec::latent`]).
pub struct Latent;

impl Attention for Latent {
    fn linears(&self, spec: &ModelSpec) -> Vec<LinearShape> {
        spec.latent().linears(spec.heads, spec.hidden)
    }

    fn norms(&self, spec: &ModelSpec) -> Vec<(&'static str, usize)> {
        spec.latent().norms()
    }

    fn input_linears(&self, spec: &ModelSpec) -> Vec<&'static str> {
        spec.latent().input_linears()
    }

    fn inner_groups(&self, spec: &ModelSpec) -> Vec<ScaleGroup> {
        spec.latent().inner_groups()
    }

    /// The low-rank projections and their norms, then the kernel on q/k/v rearranged to one
    /// head size (see the module docs).
    fn context(
        &self,
        layer: &LayerWeights,
        spec: &ModelSpec,
        rope: &Rope,
        x: &Tensor,
        seq_len: usize,
        capture: bool,
    ) -> Result<(Tensor, LinearInputs)> {
        let mla = spec.latent();
        let (tokens, h) = (x.dim(0)?, spec.heads);
        let r = |t: Tensor| round_to(t, spec.serve_dtype);
        let norm = |name: &str, t: &Tensor| r(layer.norm(name).apply(spec, t)?);
        let mut captured = LinearInputs::default();
        let q = match mla.q_lora {
            Some(_) => {
                let q_latent = norm(Q_A_NORM, &r(layer.linear(Q_A_PROJ).forward(x)?)?)?;
                let q = r(layer.linear(Q_B_PROJ).forward(&q_latent)?)?;
                if capture {
                    captured.set(Input::QLatent, q_latent);
                }
                q
            }
            None => r(layer.linear(Q_PROJ).forward(x)?)?,
        };
        let kv_a = r(layer.linear(KV_A_PROJ).forward(x)?)?;
        let kv_latent = norm(KV_A_NORM, &kv_a.narrow(1, 0, mla.kv_lora)?.contiguous()?)?;
        let k_rope = kv_a.narrow(1, mla.kv_lora, mla.rope)?;
        let kv = r(layer.linear(KV_B_PROJ).forward(&kv_latent)?)?;
        if capture {
            captured.set(Input::KvLatent, kv_latent);
        }
        let q = mla.q_for_kernel(&flat(q)?, tokens, h);
        let (k, v) = mla.kv_for_kernel(&flat(kv)?, &flat(k_rope)?, tokens, h);
        let (cos, sin) = rope.tables(false);
        let kernel = Kernel {
            seq_len,
            heads: h,
            kv_heads: h,
            head_dim: mla.kernel_head(),
            scale: spec.attn_scale as f32,
            window: None,
            softcap: None,
            rotary: Rotary {
                cos,
                sin,
                dim: mla.rope,
                interleaved: spec.rope_interleaved,
            },
            round: Rounding::from_dtype(spec.serve_dtype),
        };
        let ctx = timed(&kernel, &q, &k, &v, tokens);
        Ok((mla.context_from_kernel(&ctx, tokens, h)?, captured))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MLA: Mla = Mla {
        q_lora: Some(6),
        kv_lora: 4,
        nope: 3,
        rope: 2,
        v: 4,
        bias: false,
    };

    #[test]
    fn kernel_layout_puts_rope_first_and_pads_with_zeros() {
        // One token, two heads; q per head [n n n r r].
        let q = [1., 2., 3., 10., 11., 4., 5., 6., 12., 13.];
        let kq = MLA.q_for_kernel(&q, 1, 2);
        assert_eq!(kq, vec![10., 11., 1., 2., 3., 12., 13., 4., 5., 6.]);
        // kv per head [k_nope ×3 | v ×4]; one shared k_rope.
        let kv = [1., 2., 3., 7., 8., 9., 0.5, 4., 5., 6., 7.5, 8.5, 9.5, 0.25];
        let (k, v) = MLA.kv_for_kernel(&kv, &[20., 21.], 1, 2);
        assert_eq!(k, vec![20., 21., 1., 2., 3., 20., 21., 4., 5., 6.]);
        assert_eq!(v, vec![7., 8., 9., 0.5, 0., 7.5, 8.5, 9.5, 0.25, 0.]);
        let ctx = MLA.context_from_kernel(&v, 1, 2).unwrap();
        assert_eq!(
            ctx.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![7., 8., 9., 0.5, 7.5, 8.5, 9.5, 0.25]
        );
    }

    #[test]
    fn scale_groups_follow_autoawq_deepseek_v3() {
        assert_eq!(MLA.input_linears(), vec![Q_A_PROJ, KV_A_PROJ]);
        let names: Vec<_> = (MLA.inner_groups().iter())
            .map(|g| (g.name, g.prev, g.linears.clone()))
            .collect();
        assert_eq!(
            names,
            vec![
                ("q_b", PrevOp::Norm(Q_A_NORM), vec![Q_B_PROJ]),
                ("kv_b", PrevOp::Norm(KV_A_NORM), vec![KV_B_PROJ]),
            ]
        );
        let no_lora = Mla {
            q_lora: None,
            ..MLA
        };
        assert_eq!(no_lora.input_linears(), vec![Q_PROJ, KV_A_PROJ]);
        assert_eq!(no_lora.inner_groups().len(), 1);
    }
}

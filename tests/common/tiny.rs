//! Tiny random-weight Llama-family models written by the tests (config.json, tokenizer.json,
//! safetensors in f32/f16/bf16, optionally sharded), plus a naive f64 reference forward pass that
//! shares no code with the crate: the independent path the architecture tests compare against.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::Dtype;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Store {
    F32,
    F16,
    BF16,
}

#[derive(Clone, Debug)]
pub struct Tiny {
    pub arch: &'static str,
    pub hidden: usize,
    pub inter: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub tie: bool,
    pub qkv_bias: bool,
    pub qk_norm: bool,
    pub sliding_window: Option<usize>,
    pub store: Store,
    pub shards: usize,
    pub seed: u64,
}

impl Tiny {
    /// A Llama twice as wide as [`Tiny::llama`]: every linear divisible by group 32.
    pub fn llama64() -> Self {
        Tiny {
            hidden: 64,
            inter: 128,
            heads: 4,
            head_dim: 16,
            ..Tiny::llama()
        }
    }

    pub fn llama() -> Self {
        Tiny {
            arch: "LlamaForCausalLM",
            hidden: 32,
            inter: 64,
            layers: 2,
            heads: 4,
            kv_heads: 4,
            head_dim: 8,
            vocab: 64,
            tie: true,
            qkv_bias: false,
            qk_norm: false,
            sliding_window: None,
            store: Store::F32,
            shards: 1,
            seed: 1,
        }
    }
}

/// Deterministic xorshift normal-ish values in [-1, 1) scaled.
pub struct Rng(u64);
impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1)
    }
    pub fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next_f32() * scale).collect()
    }
}

pub type Weights = BTreeMap<String, (Vec<f32>, Vec<usize>)>;

fn round_to(store: Store, v: f32) -> f32 {
    match store {
        Store::F32 => v,
        Store::F16 => half::f16::from_f32(v).to_f32(),
        Store::BF16 => half::bf16::from_f32(v).to_f32(),
    }
}

fn encode(store: Store, v: &[f32]) -> Vec<u8> {
    match store {
        Store::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Store::F16 => v
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
        Store::BF16 => v
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect(),
    }
}

impl Tiny {
    /// What a real config.json of this architecture names itself (TGI dispatches on it).
    fn model_type(&self) -> &'static str {
        match self.arch {
            "LlamaForCausalLM" => "llama",
            "MistralForCausalLM" => "mistral",
            "Qwen2ForCausalLM" => "qwen2",
            "Qwen3ForCausalLM" => "qwen3",
            other => panic!("no model_type for {other}"),
        }
    }

    pub fn config_json(&self) -> serde_json::Value {
        let mut c = serde_json::json!({
            "architectures": [self.arch],
            "model_type": self.model_type(),
            "hidden_size": self.hidden,
            "intermediate_size": self.inter,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": self.tie,
            "hidden_act": "silu",
            "torch_dtype": "float16",
        });
        if self.o_bias() || self.arch == "LlamaForCausalLM" {
            c["attention_bias"] = serde_json::json!(self.qkv_bias);
        }
        if let Some(w) = self.sliding_window {
            c["sliding_window"] = serde_json::json!(w);
        }
        c
    }

    /// transformers' `attention_bias` covers o_proj in Llama and Qwen3; Qwen2 biases only q/k/v.
    fn o_bias(&self) -> bool {
        self.qkv_bias && matches!(self.arch, "LlamaForCausalLM" | "Qwen3ForCausalLM")
    }

    /// All tensors with their values already rounded to the storage dtype.
    pub fn weights(&self) -> Weights {
        let mut rng = Rng::new(self.seed);
        let mut w = Weights::new();
        let mut put = |name: String, shape: Vec<usize>, scale: f32, offset: f32| {
            let n = shape.iter().product();
            let v = rng
                .vec(n, scale)
                .into_iter()
                .map(|x| round_to(self.store, x + offset))
                .collect();
            w.insert(name, (v, shape));
        };
        let (d, hd) = (self.hidden, self.head_dim);
        put(
            "model.embed_tokens.weight".into(),
            vec![self.vocab, d],
            1.0,
            0.0,
        );
        put("model.norm.weight".into(), vec![d], 0.2, 1.0);
        if !self.tie {
            put("lm_head.weight".into(), vec![self.vocab, d], 0.3, 0.0);
        }
        for i in 0..self.layers {
            let p = format!("model.layers.{i}");
            put(format!("{p}.input_layernorm.weight"), vec![d], 0.2, 1.0);
            put(
                format!("{p}.post_attention_layernorm.weight"),
                vec![d],
                0.2,
                1.0,
            );
            let lin = [
                ("self_attn.q_proj", self.heads * hd, d, self.qkv_bias),
                ("self_attn.k_proj", self.kv_heads * hd, d, self.qkv_bias),
                ("self_attn.v_proj", self.kv_heads * hd, d, self.qkv_bias),
                ("self_attn.o_proj", d, self.heads * hd, self.o_bias()),
                ("mlp.gate_proj", self.inter, d, false),
                ("mlp.up_proj", self.inter, d, false),
                ("mlp.down_proj", d, self.inter, false),
            ];
            for (name, out, inp, bias) in lin {
                put(
                    format!("{p}.{name}.weight"),
                    vec![out, inp],
                    1.0 / (inp as f32).sqrt(),
                    0.0,
                );
                if bias {
                    put(format!("{p}.{name}.bias"), vec![out], 0.5, 0.0);
                }
            }
            if self.qk_norm {
                put(format!("{p}.self_attn.q_norm.weight"), vec![hd], 0.2, 1.0);
                put(format!("{p}.self_attn.k_norm.weight"), vec![hd], 0.2, 1.0);
            }
        }
        w
    }

    /// Writes config.json, tokenizer.json and the weights into `dir`; returns the weights.
    pub fn write(&self, dir: &Path) -> Weights {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_string_pretty(&self.config_json()).unwrap(),
        )
        .unwrap();
        write_tokenizer(dir, self.vocab);
        let w = self.weights();
        let dtype = match self.store {
            Store::F32 => Dtype::F32,
            Store::F16 => Dtype::F16,
            Store::BF16 => Dtype::BF16,
        };
        let encoded: Vec<(String, Vec<u8>, Vec<usize>)> = w
            .iter()
            .map(|(n, (v, s))| (n.clone(), encode(self.store, v), s.clone()))
            .collect();
        let per = encoded.len().div_ceil(self.shards);
        let mut weight_map = serde_json::Map::new();
        for (k, chunk) in encoded.chunks(per).enumerate() {
            let file = if self.shards == 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", k + 1, self.shards)
            };
            let views: Vec<(String, TensorView)> = chunk
                .iter()
                .map(|(n, b, s)| (n.clone(), TensorView::new(dtype, s.clone(), b).unwrap()))
                .collect();
            safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
            for (n, _, _) in chunk {
                weight_map.insert(n.clone(), file.clone().into());
            }
        }
        if self.shards > 1 {
            let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
            std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
        }
        w
    }

    /// Naive f64 forward pass: logits `[ids.len()][vocab]`.
    pub fn reference_logits(&self, w: &Weights, ids: &[u32]) -> Vec<Vec<f64>> {
        let get = |n: &str| -> Vec<f64> { w[n].0.iter().map(|&x| x as f64).collect() };
        let (d, hd, t) = (self.hidden, self.head_dim, ids.len());
        let emb = get("model.embed_tokens.weight");
        let mut h: Vec<Vec<f64>> = ids
            .iter()
            .map(|&i| emb[i as usize * d..(i as usize + 1) * d].to_vec())
            .collect();
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            let lw = |n: &str| get(&format!("{p}.{n}"));
            let bias = |n: &str| {
                w.get(&format!("{p}.{n}.bias"))
                    .map(|(v, _)| v.iter().map(|&x| x as f64).collect::<Vec<_>>())
            };
            let x: Vec<Vec<f64>> = h
                .iter()
                .map(|r| rms(r, &lw("input_layernorm.weight")))
                .collect();
            let proj = |name: &str, rows: &[Vec<f64>]| -> Vec<Vec<f64>> {
                let wt = lw(&format!("{name}.weight"));
                let b = bias(name);
                rows.iter().map(|r| matvec(&wt, r, b.as_deref())).collect()
            };
            let mut q = proj("self_attn.q_proj", &x);
            let mut k = proj("self_attn.k_proj", &x);
            let v = proj("self_attn.v_proj", &x);
            for (rows, nh, norm) in [
                (&mut q, self.heads, "q_norm"),
                (&mut k, self.kv_heads, "k_norm"),
            ] {
                for (pos, r) in rows.iter_mut().enumerate() {
                    for head in 0..nh {
                        let s = &mut r[head * hd..(head + 1) * hd];
                        if self.qk_norm {
                            let n = rms(s, &lw(&format!("self_attn.{norm}.weight")));
                            s.copy_from_slice(&n);
                        }
                        rotate(s, pos);
                    }
                }
            }
            let rep = self.heads / self.kv_heads;
            let mut ctx = vec![vec![0f64; self.heads * hd]; t];
            for head in 0..self.heads {
                let kvh = head / rep;
                for i in 0..t {
                    let visible: Vec<usize> = (0..=i)
                        .filter(|&j| self.sliding_window.is_none_or(|win| i - j < win))
                        .collect();
                    let scores: Vec<f64> = visible
                        .iter()
                        .map(|&j| {
                            dot(
                                &q[i][head * hd..(head + 1) * hd],
                                &k[j][kvh * hd..(kvh + 1) * hd],
                            ) / (hd as f64).sqrt()
                        })
                        .collect();
                    let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for (jj, &j) in visible.iter().enumerate() {
                        for c in 0..hd {
                            ctx[i][head * hd + c] += e[jj] / z * v[j][kvh * hd + c];
                        }
                    }
                }
            }
            let o = proj("self_attn.o_proj", &ctx);
            for (hr, or) in h.iter_mut().zip(&o) {
                hr.iter_mut().zip(or).for_each(|(a, b)| *a += b);
            }
            let x2: Vec<Vec<f64>> = h
                .iter()
                .map(|r| rms(r, &lw("post_attention_layernorm.weight")))
                .collect();
            let g = proj("mlp.gate_proj", &x2);
            let u = proj("mlp.up_proj", &x2);
            let act: Vec<Vec<f64>> = g
                .iter()
                .zip(&u)
                .map(|(gr, ur)| {
                    gr.iter()
                        .zip(ur)
                        .map(|(a, b)| a / (1.0 + (-a).exp()) * b)
                        .collect()
                })
                .collect();
            let dn = proj("mlp.down_proj", &act);
            for (hr, dr) in h.iter_mut().zip(&dn) {
                hr.iter_mut().zip(dr).for_each(|(a, b)| *a += b);
            }
        }
        let norm = get("model.norm.weight");
        let head = if self.tie { emb } else { get("lm_head.weight") };
        h.iter()
            .map(|r| matvec(&head, &rms(r, &norm), None))
            .collect()
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn matvec(w: &[f64], x: &[f64], b: Option<&[f64]>) -> Vec<f64> {
    let n = x.len();
    (0..w.len() / n)
        .map(|o| dot(&w[o * n..(o + 1) * n], x) + b.map_or(0.0, |b| b[o]))
        .collect()
}

fn rms(x: &[f64], w: &[f64]) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + 1e-5).sqrt();
    x.iter().zip(w).map(|(v, g)| v * r * g).collect()
}

/// Rotate-half RoPE with theta 10000.
fn rotate(s: &mut [f64], pos: usize) {
    let half = s.len() / 2;
    for i in 0..half {
        let f = 10000f64.powf(-((2 * i) as f64) / s.len() as f64);
        let (c, sn) = ((pos as f64 * f).cos(), (pos as f64 * f).sin());
        let (a, b) = (s[i], s[i + half]);
        s[i] = a * c - b * sn;
        s[i + half] = b * c + a * sn;
    }
}

/// A word-level tokenizer over `w0 .. w{vocab-1}` split on whitespace.
pub fn write_tokenizer(dir: &Path, vocab: usize) {
    let words: serde_json::Map<String, serde_json::Value> = (0..vocab)
        .map(|i| (format!("w{i}"), serde_json::json!(i)))
        .collect();
    let tok = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": words, "unk_token": "w0"}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
}

/// Text of `n` tokens for the word-level tokenizer.
pub fn words(n: usize, vocab: usize, seed: u64) -> String {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            format!(
                "w{}",
                ((rng.next_f32() + 1.0) * 0.5 * vocab as f32) as usize % vocab
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

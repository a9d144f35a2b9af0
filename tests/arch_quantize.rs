//! Every family end to end on its tiny golden model: `awq quantize` (group 32) → `awq verify` →
//! `awq eval`, and the output's logits are closer to the fp model's than plain
//! round-to-nearest's (mean KL divergence over held-out text: the first tokens of
//! `wiki.valid.raw`, which calibration never reads).

mod common;

use std::path::Path;

use assert_cmd::Command;
use awq::model::rope::Rope;
use awq::model::Model;
use common::*;

const SEQ: usize = 64;
const HELD_OUT_TOKENS: usize = 2048;

/// `awq verify --json` of `out` says it is loadable (`ok`).
fn assert_verifies(out: &Path) {
    let verify = awq(&["verify", "--json"], out);
    let v: serde_json::Value = serde_json::from_slice(&verify.stdout).unwrap();
    assert_eq!(v["ok"], true, "{v:#}");
}

fn awq(args: &[&str], model: &Path) -> std::process::Output {
    Command::cargo_bin("awq")
        .unwrap()
        .args(args)
        .arg(model)
        .output()
        .unwrap()
}

fn quantize(model: &Path, out: &Path, extra: &[&str]) {
    let calib = data("wikitext-2-raw/wiki.valid.calib.txt");
    let mut cmd = Command::cargo_bin("awq").unwrap();
    cmd.args([
        "quantize",
        "-q",
        "--group",
        "32",
        "--n-samples",
        "64",
        "--split-long",
    ])
    .arg("--calib")
    .arg(&calib)
    .arg("--model")
    .arg(model)
    .arg("-o")
    .arg(out)
    .args(extra);
    if !extra.contains(&"--seqlen") {
        cmd.args(["--seqlen", "128"]);
    }
    let o = cmd.output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Log-probabilities `[tokens, vocab]` of `model` over `ids` (windows of [`SEQ`]).
fn log_probs(dir: &Path, ids: &[u32]) -> Vec<Vec<f64>> {
    let model = Model::open(dir).unwrap();
    let spec = &model.spec;
    let rope = Rope::new(spec, SEQ).unwrap();
    let mut h = model.embed(ids).unwrap();
    for i in 0..spec.layers {
        h = model
            .layer(i)
            .unwrap()
            .forward(spec, &rope, &h, SEQ, false)
            .unwrap()
            .0;
    }
    let logits = model.head().unwrap().logits(spec, &h).unwrap();
    logits
        .to_vec2::<f32>()
        .unwrap()
        .into_iter()
        .map(|row| {
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            row.iter().map(|&x| x as f64 - lse).collect()
        })
        .collect()
}

/// Mean KL(p ‖ q) per token.
fn kl(p: &[Vec<f64>], q: &[Vec<f64>]) -> f64 {
    let sum: f64 = p
        .iter()
        .zip(q)
        .map(|(lp, lq)| {
            lp.iter()
                .zip(lq)
                .map(|(a, b)| a.exp() * (a - b))
                .sum::<f64>()
        })
        .sum();
    sum / p.len() as f64
}

fn check(family: &str) {
    checked(family);
}

/// [`check`], keeping the output (in the returned directory, at `awq`).
fn checked(family: &str) -> tempfile::TempDir {
    checked_for(family, &[])
}

/// [`checked`] with `verify_args` for `awq verify` (a tiny model whose shapes no vLLM kernel
/// takes is verified for transformers).
fn checked_for(family: &str, verify_args: &[&str]) -> tempfile::TempDir {
    let model = fixture(&format!("arch/{family}"));
    let tmp = tempfile::tempdir().unwrap();
    let (out, rtn) = (tmp.path().join("awq"), tmp.path().join("rtn"));
    let start = std::time::Instant::now();
    quantize(&model, &out, &[]);
    let seconds = start.elapsed().as_secs_f64();
    quantize(
        &model,
        &rtn,
        &["--no-search", "--no-clip", "--rounding", "rtn"],
    );

    let verify = awq(&[&["verify", "--json"], verify_args].concat(), &out);
    let report: serde_json::Value = serde_json::from_slice(&verify.stdout).unwrap();
    assert_eq!(report["ok"], true, "{family}: {report:#}");
    assert_eq!(report["violations"], serde_json::json!([]), "{family}");
    never_worse_than_rtn_on_each_layer(&out);

    let text = data("wikitext-2-raw/wiki.valid.raw");
    assert!(perplexity(&out, 64, 1024).is_finite(), "{family}");

    let tok = awq::tokenize::load(&model).unwrap();
    let raw = std::fs::read_to_string(&text).unwrap();
    let ids = awq::tokenize::encode(&tok, &raw[..40_000], false).unwrap();
    assert!(
        ids.len() >= HELD_OUT_TOKENS,
        "{family}: {} tokens",
        ids.len()
    );
    let ids = &ids[..HELD_OUT_TOKENS];
    let fp = log_probs(&model, ids);
    let (kl_awq, kl_rtn) = (
        kl(&fp, &log_probs(&out, ids)),
        kl(&fp, &log_probs(&rtn, ids)),
    );
    eprintln!("{family}: KL to fp: awq {kl_awq:.3e}, rtn {kl_rtn:.3e} ({:.1} % lower); quantize {seconds:.2} s",
        100.0 * (1.0 - kl_awq / kl_rtn));
    assert!(kl_awq < kl_rtn, "{family}: awq {kl_awq} vs rtn {kl_rtn}");
    tmp
}

family_tests!(check: llama, gemma, gemma2, gemma3, phi3, stablelm, starcoder2, cohere, granite);

/// A vision-language wrapper: [`check`] on its text decoder, then the vision parts: every
/// source tensor outside the decoder comes out with the same name, dtype, shape and bytes;
/// the decoder keeps the source's layout; `modules_to_not_convert` names the vision parts for
/// both matching rules; `quantization_config` sits at the top level.
fn wrapped(family: &str) {
    let tmp = checked(family);
    let (model, out) = (fixture(&format!("arch/{family}")), tmp.path().join("awq"));
    let src = std::fs::read(model.join("model.safetensors")).unwrap();
    let got = std::fs::read(out.join("model.safetensors")).unwrap();
    let src_t = safetensors::SafeTensors::deserialize(&src).unwrap();
    let got_t = safetensors::SafeTensors::deserialize(&got).unwrap();
    let spec = Model::open(&model).unwrap().spec;
    let vision: Vec<String> = src_t
        .names()
        .into_iter()
        .filter(|n| !spec.roots.owns(n))
        .map(str::to_string)
        .collect();
    assert!(vision.len() > 10, "{family}: {vision:?}");
    for name in &vision {
        let (a, b) = (src_t.tensor(name).unwrap(), got_t.tensor(name).unwrap());
        assert_eq!(a.dtype(), b.dtype(), "{family} {name}");
        assert_eq!(a.shape(), b.shape(), "{family} {name}");
        assert!(a.data() == b.data(), "{family} {name}: bytes changed");
    }
    // The decoder under the source's root, packed.
    let q = format!("{}.self_attn.q_proj.qweight", spec.roots.layer(0));
    assert!(got_t.names().contains(&q.as_str()), "{family}: no {q}");
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    let list: Vec<&str> = cfg["quantization_config"]["modules_to_not_convert"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    for entry in spec.vision.as_ref().unwrap().entries {
        assert!(list.contains(entry), "{family}: {list:?}");
        assert!(
            list.contains(&format!("model.{entry}").as_str()),
            "{family}: {list:?}"
        );
    }
    assert!(list.contains(&"lm_head"), "{family}: {list:?}");
    assert!(cfg["text_config"].get("quantization_config").is_none());
    let card = card_of(&out);
    assert!(
        card.contains("text decoder quantized, vision tower in float"),
        "{card}"
    );
}

family_tests!(wrapped: gemma3_mm, gemma3_mm_hub, mistral3, mistral3_hub, qwen2_5_vl,
    qwen2_5_vl_hub, llava, llava_hub);

#[test]
fn mixtral() {
    check("mixtral");
    router_reads_what_it_read("mixtral", &["block_sparse_moe.gate"]);
}

#[test]
fn qwen2_moe() {
    let tmp = checked("qwen2_moe");
    // `auto` judges dense layers only, and says so rather than blaming the calibration.
    let card = card_of(tmp.path().join("awq"));
    assert!(
        card.contains("14 not judged (in MoE layers: auto judges dense layers only)"),
        "{card}"
    );
    router_reads_what_it_read("qwen2_moe", &["mlp.gate", "mlp.shared_expert_gate"]);
}

/// DeepSeek-V3: latent attention, a dense first layer, the grouped-sigmoid router. Its tiny
/// shapes (q_b 96 outputs, fused q_a/kv_a 104) fit no vLLM kernel, so it is verified for
/// transformers; `verify`'s vLLM rules for the real shapes are unit tests.
#[test]
fn deepseek_v3() {
    let tmp = checked_for("deepseek_v3", &["--for", "transformers"]);
    sigmoid_router_reads_what_it_read("deepseek_v3", &tmp.path().join("awq"));
}

/// The same model stored as block-scaled fp8: dequantized on load; the output carries no trace
/// of the fp8 config, the scales or the fp8 dtype.
#[test]
fn deepseek_v3_fp8() {
    let tmp = checked_for("deepseek_v3_fp8", &["--for", "transformers"]);
    let out = tmp.path().join("awq");
    sigmoid_router_reads_what_it_read("deepseek_v3_fp8", &out);
    let config = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(
        !config.contains("fp8") && !config.contains("weight_block_size"),
        "{config}"
    );
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let t = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(t.names().iter().all(|n| !n.ends_with("_scale_inv")));
    assert!(t
        .tensors()
        .iter()
        .all(|(_, v)| v.dtype() != safetensors::Dtype::F8_E4M3));
}

/// A checkpoint with a multi-token-prediction layer (`num_nextn_predict_layers` 1, the layer
/// stored as `model.layers.3.*` after the 3 decoder layers, as DeepSeek-V3 stores layer 61):
/// quantized with a warning, the layer left out, the count set to 0 in the output config.
/// Without the count, the same tensors are refused as a config that does not match the
/// weights.
#[test]
fn mtp_layers_are_left_out_with_a_warning() {
    let src = fixture("arch/deepseek_v3");
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json", "config.json"] {
        std::fs::copy(src.join(f), model.join(f)).unwrap();
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::tensor::TensorView)> = st.tensors();
    let mtp: Vec<_> = tensors
        .iter()
        .filter(|(n, _)| n.starts_with("model.layers.2."))
        .map(|(n, v)| (n.replace("layers.2.", "layers.3."), v.clone()))
        .collect();
    tensors.extend(mtp);
    safetensors::serialize_to_file(tensors, None, &model.join("model.safetensors")).unwrap();
    let run = |out: &Path| {
        Command::cargo_bin("awq")
            .unwrap()
            .args([
                "quantize",
                "--group",
                "32",
                "--n-samples",
                "8",
                "--seqlen",
                "64",
            ])
            .arg("--calib")
            .arg(data("wikitext-2-raw/wiki.valid.calib.txt"))
            .arg("--model")
            .arg(&model)
            .arg("-o")
            .arg(out)
            .output()
            .unwrap()
    };
    let refused = run(&tmp.path().join("refused"));
    assert_eq!(refused.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("num_hidden_layers"));
    assert!(!tmp.path().join("refused").exists());

    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("config.json")).unwrap()).unwrap();
    config["num_nextn_predict_layers"] = 1.into();
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    let out = tmp.path().join("out");
    let o = run(&out);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("multi-token-prediction layer(s) from model.layers.3 on are left out"),
        "{stderr}"
    );
    let written = std::fs::read(out.join("model.safetensors")).unwrap();
    let written = safetensors::SafeTensors::deserialize(&written).unwrap();
    assert!(written
        .names()
        .iter()
        .all(|n| !n.starts_with("model.layers.3.")));
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["num_nextn_predict_layers"], 0);
    let card = card_of(&out);
    assert!(
        card.contains("| multi-token-prediction layers | 1 left out"),
        "{card}"
    );
    let report: serde_json::Value = report_of(&out);
    assert_eq!(report["plan"]["mtp_layers_left_out"], 1);
    // The plan lists the dense first layer's MLP beside the experts'.
    let linears = report["plan"]["linears"].to_string();
    assert!(linears.contains("mlp.gate_proj") && linears.contains("mlp.experts.7.down_proj"));
}

#[test]
fn glm4_moe() {
    let tmp = checked("glm4_moe");
    sigmoid_router_reads_what_it_read("glm4_moe", &tmp.path().join("awq"));
}

#[test]
fn qwen3_moe() {
    check("qwen3_moe");
    router_reads_what_it_read("qwen3_moe", &["mlp.gate"]);
}

/// The guard's record of every dense layer: what was written is no worse than plain
/// round-to-nearest (nor than AWQ as searched) on the layer's output.
fn never_worse_than_rtn_on_each_layer(out: &Path) {
    let report: serde_json::Value = report_of(out);
    for layer in report["layers"].as_array().unwrap() {
        let g = &layer["guard"];
        if layer.get("experts").is_some() {
            // MoE layers are not guarded (a second copy of the layer breaks the memory bound).
            assert!(g.is_null(), "{g}");
            continue;
        }
        let f = |k: &str| g[k].as_f64().unwrap();
        assert!(f("tokens") > 0.0, "{g}");
        assert!(f("chosen") <= f("rtn") && f("chosen") <= f("awq"), "{g}");
    }
    end_to_end_check_on_dense_models_only(out, &report);
}

/// The end-to-end check ran on a dense model (finite losses for the float model and every
/// version) and not on a model with MoE layers.
fn end_to_end_check_on_dense_models_only(out: &Path, report: &serde_json::Value) {
    let e2e = &report["end_to_end"];
    let layers = report["layers"].as_array().unwrap();
    let card = card_of(out);
    if layers.iter().any(|l| l.get("experts").is_some()) {
        assert!(e2e.is_null(), "{e2e}");
        assert!(
            card.contains("| end-to-end check | no: the MoE layers are not guarded"),
            "{card}"
        );
        return;
    }
    assert!(card.contains("| end-to-end check | mean KL"), "{card}");
    assert!(e2e["predictions"].as_u64().unwrap() > 0, "{e2e}");
    assert!(e2e["fp_loss"].as_f64().unwrap() > 0.0, "{e2e}");
    for k in ["written", "scales_only", "rtn"] {
        let (loss, kl) = (
            e2e[k]["loss"].as_f64().unwrap(),
            e2e[k]["kl"].as_f64().unwrap(),
        );
        assert!(loss.is_finite() && loss > 0.0, "{k}: {e2e}");
        // A divergence, and a quantized model is not the float one.
        assert!(kl.is_finite() && kl > 0.0, "{k}: {e2e}");
    }
}

/// `--rounding gptq` keeps error feedback only where it lowers a linear's calibration loss, and
/// the packed output stays valid AWQ.
#[test]
fn gptq_rounding_is_kept_where_it_helps_and_verifies() {
    let model = fixture("arch/phi3");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    quantize(&model, &out, &["--rounding", "gptq"]);
    assert_verifies(&out);
    let report: serde_json::Value = report_of(&out);
    assert_eq!(report["options"]["rounding"], "gptq");
    let mut kept = 0;
    for layer in report["layers"].as_array().unwrap() {
        let rounding = layer["rounding"].as_array().unwrap();
        assert_eq!(
            rounding.len(),
            4,
            "qkv_proj, o_proj, gate_up_proj, down_proj: {layer:#}"
        );
        for r in rounding {
            let (rtn, gptq) = (
                r["rtn_loss"].as_f64().unwrap(),
                r["gptq_loss"].as_f64().unwrap(),
            );
            assert_eq!(r["gptq_kept"], gptq < rtn, "{r}");
            kept += (gptq < rtn) as usize;
        }
    }
    assert!(kept > 0);
    // Same model, round-to-nearest codes: the outputs differ only where error feedback was kept.
    let rtn = tmp.path().join("rtn");
    quantize(&model, &rtn, &["--rounding", "rtn"]);
    let ids = {
        let tok = awq::tokenize::load(&model).unwrap();
        let raw = std::fs::read_to_string(data("wikitext-2-raw/wiki.valid.raw")).unwrap();
        awq::tokenize::encode(&tok, &raw[..40_000], false).unwrap()[..HELD_OUT_TOKENS].to_vec()
    };
    let fp = log_probs(&model, &ids);
    let (kl_gptq, kl_rtn) = (
        kl(&fp, &log_probs(&out, &ids)),
        kl(&fp, &log_probs(&rtn, &ids)),
    );
    eprintln!("phi3: KL to fp: gptq {kl_gptq:.3e}, rtn rounding {kl_rtn:.3e}");
}

/// `--rounding auto`, the default, judges error feedback on the held-out calibration blocks:
/// every record holds both held-out losses and keeps error feedback exactly where its held-out loss (fitted
/// without those blocks) and its loss on every block (fitted on them) are the lower. A
/// calibration too short to split has no held-out loss, and `auto` rounds to nearest.
/// `--clip-sides auto`, the default too, keeps separate bounds on some groups, and none without
/// a split.
#[test]
fn auto_rounding_keeps_error_feedback_only_where_it_wins_on_held_out_blocks() {
    let model = fixture("arch/phi3");
    let tmp = tempfile::tempdir().unwrap();
    let report = |out: &Path| -> serde_json::Value { report_of(out) };
    let out = tmp.path().join("auto");
    let auto = ["--rounding", "auto", "--clip-sides", "auto"];
    // The defaults, without naming them.
    quantize(&model, &out, &[]);
    let r = report(&out);
    assert_eq!(r["options"]["rounding"], "auto");
    assert_eq!(r["options"]["clip_sides"], "auto");
    // --clip-sides auto: separate bounds on some of the clipped groups, symmetric on the rest.
    let clip = |r: &serde_json::Value| {
        (r["layers"].as_array().unwrap().iter())
            .map(|l| serde_json::from_value::<[usize; 2]>(l["clip_separate"].clone()).unwrap())
            .fold([0, 0], |[a, b], [c, d]| [a + c, b + d])
    };
    let [separate, groups] = clip(&r);
    assert!(0 < separate && separate < groups, "{separate} of {groups}");
    let card = card_of(&out);
    assert!(card.contains(&format!("refined on {separate} of {groups} groups")));
    let held = r["calibration"]["held_out_blocks"].as_u64().unwrap();
    let blocks = r["calibration"]["blocks"].as_u64().unwrap();
    assert_eq!(held, blocks / 4, "{}", r["calibration"]);
    assert!(held > 0);
    let records: Vec<&serde_json::Value> = (r["layers"].as_array().unwrap().iter())
        .flat_map(|l| l["rounding"].as_array().unwrap())
        .collect();
    assert!(!records.is_empty());
    for x in &records {
        let held = |k: &str| x[format!("held_out_{k}_loss")].as_f64().unwrap();
        let chosen = held("gptq") < held("rtn");
        // Fitted on every block only where the held-out blocks chose it.
        assert_eq!(x["gptq_loss"].is_null(), !chosen, "{x}");
        let wins = chosen && x["gptq_loss"].as_f64() < x["rtn_loss"].as_f64();
        assert_eq!(x["gptq_kept"], wins, "{x}");
    }
    assert_verifies(&out);

    // 6 blocks of 128: 768 tokens, 4 per input dimension of every linear but down_proj's 256.
    let few = tmp.path().join("few");
    quantize(&model, &few, &["--rounding", "auto", "--max-blocks", "6"]);
    for l in report(&few)["layers"].as_array().unwrap() {
        for x in l["rounding"].as_array().unwrap() {
            let down = x["linear"] == "mlp.down_proj";
            assert_eq!(x["held_out_rtn_loss"].is_null(), down, "{x}");
            // Nothing measured where it does not judge: it makes no XᵀX there.
            assert_eq!(x["rtn_loss"].is_null(), down, "{x}");
            if down {
                assert_eq!(x["gptq_kept"], false, "{x}");
                assert!(x["gptq_loss"].is_null(), "{x}");
            }
        }
    }

    let short = tmp.path().join("short");
    quantize(
        &model,
        &short,
        &[&auto[..], &["--max-blocks", "3"]].concat(),
    );
    let r = report(&short);
    assert_eq!(r["calibration"]["held_out_blocks"], 0);
    assert_eq!(clip(&r)[0], 0, "no split: symmetric bounds only");
    for l in r["layers"].as_array().unwrap() {
        for x in l["rounding"].as_array().unwrap() {
            assert!(x["held_out_rtn_loss"].is_null(), "{x}");
            assert_eq!(x["gptq_kept"], false, "{x}");
        }
    }
    let card = card_of(&short);
    assert!(card.contains("kept on 0 of"), "{card}");
    assert!(
        card.contains("not judged (no held-out blocks: fewer than 4 calibration blocks)"),
        "{card}"
    );
}

/// A tensor of a model directory's single safetensors file as f32.
fn tensor(dir: &Path, name: &str) -> Vec<f32> {
    read_f32(&std::fs::read(dir.join("model.safetensors")).unwrap(), name).0
}

/// The router invariant: folding the experts' gate/up scales into post_attention_layernorm
/// multiplies the routers' columns by the same scales, so router weight × norm weight is
/// unchanged (to float16 rounding) and every token is routed as before. The routers stay float
/// and `modules_to_not_convert` lists exactly them, plus `lm_head` (see
/// [`lm_head_is_listed_so_transformers_keeps_the_head_float`]).
fn router_reads_what_it_read(family: &str, routers: &[&str]) {
    let model = fixture(&format!("arch/{family}"));
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    quantize(&model, &out, &[]);
    let mut listed = routers.to_vec();
    listed.push("lm_head");
    assert_eq!(modules_to_not_convert(&out), serde_json::json!(listed));
    lm_head_is_listed_so_transformers_keeps_the_head_float(&out);
    router_columns_scaled_with_the_norm(family, &model, &out, routers);
}

fn modules_to_not_convert(out: &Path) -> serde_json::Value {
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    config["quantization_config"]["modules_to_not_convert"].clone()
}

/// DeepSeek-V3's and GLM-4.5's router (`mlp.gate`, its own module in transformers and vLLM):
/// its columns are scaled with the norm as in [`router_reads_what_it_read`], its float32
/// `e_score_correction_bias` is copied byte for byte, and `modules_to_not_convert` stays null
/// (no entry: `mlp.gate` would also match the dense layer's `mlp.gate_proj`).
fn sigmoid_router_reads_what_it_read(family: &str, out: &Path) {
    let model = fixture(&format!("arch/{family}"));
    assert_eq!(modules_to_not_convert(out), serde_json::Value::Null);
    router_columns_scaled_with_the_norm(family, &model, out, &["mlp.gate"]);
    let raw = |dir: &Path| std::fs::read(dir.join("model.safetensors")).unwrap();
    let (src, dst) = (raw(&model), raw(out));
    let (src, dst) = (
        safetensors::SafeTensors::deserialize(&src).unwrap(),
        safetensors::SafeTensors::deserialize(&dst).unwrap(),
    );
    for layer in 1..3 {
        let name = format!("model.layers.{layer}.mlp.gate.e_score_correction_bias");
        let (a, b) = (src.tensor(&name).unwrap(), dst.tensor(&name).unwrap());
        assert_eq!(b.dtype(), safetensors::Dtype::F32, "{family} {name}");
        assert_eq!(
            (a.shape(), a.data()),
            (b.shape(), b.data()),
            "{family} {name}"
        );
    }
    let layer0 = |t: &safetensors::SafeTensors| {
        t.names()
            .iter()
            .any(|n| n.starts_with("model.layers.0.mlp.gate."))
    };
    assert!(!layer0(&src) && !layer0(&dst), "{family}: layer 0 is dense");
    // The dense layer's gate_proj is packed like every other linear.
    assert!(
        dst.tensor("model.layers.0.mlp.gate_proj.qweight").is_ok(),
        "{family}"
    );
}

/// Router weight × norm weight unchanged in every layer that has a router.
fn router_columns_scaled_with_the_norm(family: &str, model: &Path, out: &Path, routers: &[&str]) {
    let bytes = std::fs::read(model.join("model.safetensors")).unwrap();
    let source = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for layer in 0..3 {
        let p = format!("model.layers.{layer}");
        let has = |r: &&&str| source.tensor(&format!("{p}.{r}.weight")).is_ok();
        let routers: Vec<&&str> = routers.iter().filter(has).collect();
        if routers.is_empty() {
            continue;
        }
        let norm = |dir: &Path| tensor(dir, &format!("{p}.post_attention_layernorm.weight"));
        let (n0, n1) = (norm(model), norm(out));
        assert!(
            n0.iter().zip(&n1).any(|(a, b)| (a - b).abs() > 1e-3),
            "{family}: scaled"
        );
        for router in routers {
            let name = format!("{p}.{router}.weight");
            let (r0, r1) = (tensor(model, &name), tensor(out, &name));
            let hidden = n0.len();
            let mut worst = 0f32;
            for (i, (a, b)) in r0.iter().zip(&r1).enumerate() {
                let (before, after) = (a * n0[i % hidden], b * n1[i % hidden]);
                worst = worst.max((before - after).abs() / before.abs().max(1e-3));
            }
            assert!(worst < 2e-3, "{family} {name}: relative change {worst}");
        }
    }
}

/// transformers adds the head to its skip list only when `modules_to_not_convert` is null:
/// every list awq writes names `lm_head`, `verify --for transformers` passes it, and fails
/// the same checkpoint written the old way (the list without `lm_head`), naming the reason;
/// vLLM, which never quantizes its head, is not affected.
fn lm_head_is_listed_so_transformers_keeps_the_head_float(out: &Path) {
    let verdict = |target: &str| {
        let o = awq(&["verify", "--json", "--for", target], out);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        (o.status.code(), v)
    };
    let (code, v) = verdict("transformers");
    assert_eq!(code, Some(0), "{v:#}");
    let cfg = out.join("config.json");
    let original = std::fs::read_to_string(&cfg).unwrap();
    let mut old: serde_json::Value = serde_json::from_str(&original).unwrap();
    old["quantization_config"]["modules_to_not_convert"]
        .as_array_mut()
        .unwrap()
        .retain(|e| e != "lm_head");
    std::fs::write(&cfg, old.to_string()).unwrap();
    let (code, v) = verdict("transformers");
    assert_eq!(code, Some(5), "{v:#}");
    assert!(
        v["targets"].to_string().contains("without \\\"lm_head\\\""),
        "{v:#}"
    );
    assert_eq!(verdict("vllm").0, Some(0));
    std::fs::write(&cfg, original).unwrap();
}

/// One calibration token routed to 2 of 4 experts: the other two get no token, yet a defined
/// result (identity scale, plain round-to-nearest), named in the report with their count.
#[test]
fn an_expert_without_calibration_tokens_gets_round_to_nearest() {
    let model = fixture("arch/qwen3_moe");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    quantize(&model, &out, &["--seqlen", "1", "--max-blocks", "1"]);
    let report: serde_json::Value = report_of(&out);
    for layer in report["layers"].as_array().unwrap() {
        let experts = layer["experts"].as_array().unwrap();
        let idle: Vec<_> = experts.iter().filter(|e| e["tokens"] == 0).collect();
        assert_eq!(idle.len(), 2, "{layer:#}");
        for e in &idle {
            assert_eq!(e["round_to_nearest"], true);
            let group = format!("experts.{}.down", e["expert"]);
            let g = layer["groups"]
                .as_array()
                .unwrap()
                .iter()
                .find(|g| g["group"] == group.as_str())
                .unwrap();
            assert!(g["ratio"].is_null(), "{g}");
        }
    }
    assert_verifies(&out);
}

/// Gemma checkpoints are bf16 and their activations can leave float16 while every weight fits
/// it: the dtype rule (largest |activation| per layer, bf16 output under `--dtype auto`) holds.
#[test]
fn gemma3_activations_beyond_float16_choose_bfloat16() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    copy_dir(&fixture("arch/gemma3"), &model);
    // (1 + w) ≈ 60000 on a few features of the norm after the MLP: inside float16 as a weight,
    // far beyond it once it multiplies the normalised MLP output.
    for i in 0..8 {
        let name = "model.layers.0.post_feedforward_layernorm.weight";
        poke_bf16(&model.join("model.safetensors"), name, i, 60000.0);
    }
    let out = tmp.path().join("out");
    quantize(&model, &out, &[]);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");
    let report: serde_json::Value = report_of(&out);
    let act = report["layers"][0]["max_abs_activation"].as_f64().unwrap();
    assert!(act > 65504.0, "{act}");
    assert!(report["dtype_reason"]
        .as_str()
        .unwrap()
        .contains("activations"));
    assert_verifies(&out);

    let text = data("wikitext-2-raw/wiki.valid.raw");
    let eval = |dir: &Path, dtype: &str| {
        Command::cargo_bin("awq")
            .unwrap()
            .args([
                "eval",
                "-q",
                "--seqlen",
                "64",
                "--max-tokens",
                "512",
                "--dtype",
                dtype,
            ])
            .arg("--text")
            .arg(&text)
            .arg("--model")
            .arg(dir)
            .output()
            .unwrap()
    };
    let f16 = eval(&model, "float16");
    assert_eq!(
        f16.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&f16.stderr)
    );
    let bf16 = eval(&out, "bfloat16");
    assert_eq!(
        bf16.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&bf16.stderr)
    );
}

/// `awq verify` checks `modules_to_not_convert` exactly: an entry that also matches quantized
/// linears (`gate` catches every `gate_proj`) and a router no entry matches are both violations.
#[test]
fn verify_checks_modules_to_not_convert_against_routers() {
    let model = fixture("arch/qwen3_moe");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    quantize(&model, &out, &[]);
    let config_path = out.join("config.json");
    let original = std::fs::read_to_string(&config_path).unwrap();
    for (entries, expect) in [
        (serde_json::json!(["gate"]), "but it holds qweight"),
        (
            serde_json::json!(null),
            "no modules_to_not_convert entry matches it",
        ),
    ] {
        let mut config: serde_json::Value = serde_json::from_str(&original).unwrap();
        config["quantization_config"]["modules_to_not_convert"] = entries;
        std::fs::write(&config_path, config.to_string()).unwrap();
        let o = awq(&["verify"], &out);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(o.status.code(), Some(5), "{text}");
        assert!(text.contains(expect), "{text}");
    }
}

/// `--keep-fp16`: whole units (q/k/v together, as vLLM merges them) are written as float16
/// weights within the budget, listed in `modules_to_not_convert` (each linear and the merged
/// name), read back by `verify` and the loader, and the output is closer to the fp model's.
#[test]
fn keep_fp16_writes_whole_units_that_verify_and_load() {
    let model = fixture("arch/llama");
    let tmp = tempfile::tempdir().unwrap();
    let (out, plain) = (tmp.path().join("keep"), tmp.path().join("plain"));
    quantize(&model, &out, &["--keep-fp16", "40%"]);
    quantize(&model, &plain, &[]);
    let report: serde_json::Value = report_of(&out);
    let kept = &report["kept_fp16"];
    let modules = kept["units"].as_array().unwrap();
    assert!(!modules.is_empty(), "{kept:#}");
    assert!(kept["extra_bytes"].as_u64() <= kept["budget_bytes"].as_u64());
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    let entries = &config["quantization_config"]["modules_to_not_convert"];
    let mut expected = kept["entries"].as_array().unwrap().clone();
    expected.push("lm_head".into());
    assert_eq!(entries, &serde_json::json!(expected));
    lm_head_is_listed_so_transformers_keeps_the_head_float(&out);
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let header: serde_json::Value =
        serde_json::from_slice(&bytes[8..8 + header_len(&bytes)]).unwrap();
    for m in modules {
        let m = m.as_str().unwrap();
        let linears: Vec<String> = match m.strip_suffix("qkv_proj") {
            Some(p) => ["q_proj", "k_proj", "v_proj"]
                .iter()
                .map(|l| format!("{p}{l}"))
                .collect(),
            None => vec![m.to_string()],
        };
        for l in &linears {
            assert_eq!(header[format!("{l}.weight")]["dtype"], "F16", "{l}");
            assert!(header.get(format!("{l}.qweight")).is_none(), "{l}");
            assert!(entries.as_array().unwrap().contains(&l.as_str().into()));
        }
        if linears.len() > 1 {
            assert!(entries.as_array().unwrap().contains(&m.into()), "{m}");
        }
    }
    let card = card_of(&out);
    assert!(
        card.contains("| kept unquantized (--keep-fp16) |"),
        "{card}"
    );

    assert_verifies(&out);
    let ids = {
        let tok = awq::tokenize::load(&model).unwrap();
        let raw = std::fs::read_to_string(data("wikitext-2-raw/wiki.valid.raw")).unwrap();
        awq::tokenize::encode(&tok, &raw[..40_000], false).unwrap()[..HELD_OUT_TOKENS].to_vec()
    };
    let fp = log_probs(&model, &ids);
    let (kl_keep, kl_plain) = (
        kl(&fp, &log_probs(&out, &ids)),
        kl(&fp, &log_probs(&plain, &ids)),
    );
    eprintln!("llama: KL to fp: --keep-fp16 40% {kl_keep:.3e}, all quantized {kl_plain:.3e}");
    assert!(kl_keep < kl_plain, "{kl_keep} vs {kl_plain}");

    // verify reads modules_to_not_convert as the loaders do: a merged module half listed, or an
    // entry that also catches quantized linears, is refused.
    let qkv = modules
        .iter()
        .filter_map(|m| m.as_str()?.strip_suffix("qkv_proj"))
        .next()
        .map(|p| p.to_string());
    let cfg = out.join("config.json");
    let mut edited = config.clone();
    let list = edited["quantization_config"]["modules_to_not_convert"]
        .as_array_mut()
        .unwrap();
    match &qkv {
        Some(p) => list.retain(|e| *e != format!("{p}q_proj").as_str()),
        None => list.push("model.layers.0.self_attn.q_proj".into()),
    }
    std::fs::write(&cfg, serde_json::to_vec(&edited).unwrap()).unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&awq(&["verify", "--json"], &out).stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert!(
        v["violations"].to_string().contains("refuses a mix"),
        "{v:#}"
    );
    let mut edited = config.clone();
    edited["quantization_config"]["modules_to_not_convert"] = serde_json::json!(["mlp"]);
    std::fs::write(&cfg, serde_json::to_vec(&edited).unwrap()).unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&awq(&["verify", "--json"], &out).stdout).unwrap();
    assert!(
        v["violations"].to_string().contains("holds qweight"),
        "{v:#}"
    );
    // A merged name must be listed exactly when its linears are float (vLLM versions that
    // match entries against the merged module only).
    let layers = (0..2).map(|i| format!("model.layers.{i}.self_attn.qkv_proj"));
    let mut edited = config.clone();
    let list = edited["quantization_config"]["modules_to_not_convert"]
        .as_array_mut()
        .unwrap();
    match &qkv {
        Some(p) => list.retain(|e| *e != format!("{p}qkv_proj").as_str()),
        None => list.extend(layers.map(serde_json::Value::from)),
    }
    std::fs::write(&cfg, serde_json::to_vec(&edited).unwrap()).unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&awq(&["verify", "--json"], &out).stdout).unwrap();
    let expected = match qkv {
        Some(_) => "no modules_to_not_convert entry matches the merged name",
        None => "matches the merged module, but its linears are quantized",
    };
    assert!(v["violations"].to_string().contains(expected), "{v:#}");
    // TGI reads no modules_to_not_convert.
    std::fs::write(&cfg, serde_json::to_vec(&config).unwrap()).unwrap();
    let tgi = awq(&["verify", "--json", "--for", "tgi"], &out);
    let v: serde_json::Value = serde_json::from_slice(&tgi.stdout).unwrap();
    assert_eq!(v["ok"], false, "{v:#}");
    assert!(
        v.to_string()
            .contains("TGI reads no modules_to_not_convert"),
        "{v:#}"
    );
    assert!(!v["loaders"].to_string().contains("autoawq\""), "{v:#}");
}

/// `--keep-fp16` is refused on a MoE model (exit 2) before any layer, and out-of-range budgets
/// by the parser.
#[test]
fn keep_fp16_refuses_moe_models_and_bad_budgets() {
    let tmp = tempfile::tempdir().unwrap();
    for (model, budget, says) in [
        ("arch/mixtral", "3%", "MoE model"),
        ("arch/llama", "0", "above 0%"),
        ("arch/llama", "101%", "at most 100%"),
    ] {
        let o = Command::cargo_bin("awq")
            .unwrap()
            .args(["quantize", "-q", "--keep-fp16", budget, "--model"])
            .arg(fixture(model))
            .arg("-o")
            .arg(tmp.path().join("out"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{model} {budget}: {err}");
        assert!(err.contains(says), "{err}");
        assert!(!tmp.path().join("out").exists());
    }
}

/// `--clip-sides`: `separate` writes a valid checkpoint that differs from AutoAWQ's symmetric
/// clipping, and the report and card say which was used.
#[test]
fn clip_sides_are_recorded_and_both_verify() {
    let model = fixture("arch/granite");
    let tmp = tempfile::tempdir().unwrap();
    let mut bytes = Vec::new();
    for sides in ["symmetric", "separate"] {
        let out = tmp.path().join(sides);
        quantize(&model, &out, &["--clip-sides", sides, "--no-guard"]);
        let v: serde_json::Value =
            serde_json::from_slice(&awq(&["verify", "--json"], &out).stdout).unwrap();
        assert_eq!(v["ok"], true, "{v:#}");
        let report: serde_json::Value = report_of(&out);
        assert_eq!(report["options"]["clip_sides"], sides);
        let card = card_of(&out);
        let row = match sides {
            "symmetric" => "| clipping search | yes, symmetric (AutoAWQ's) |",
            _ => "| clipping search | yes, upper and lower bound each refined |",
        };
        assert!(card.contains(row), "{card}");
        bytes.push(std::fs::read(out.join("model.safetensors")).unwrap());
    }
    assert_ne!(bytes[0], bytes[1], "separate bounds changed nothing");
}

/// `--rounding gptq` with fewer calibration tokens than it can fit warns before any work (on
/// SmolLM2, 1024 tokens made error feedback worse than round-to-nearest).
#[test]
fn gptq_with_few_calibration_tokens_warns() {
    let tmp = tempfile::tempdir().unwrap();
    let o = Command::cargo_bin("awq")
        .unwrap()
        .args([
            "quantize",
            "-q",
            "--dry-run",
            "--rounding",
            "gptq",
            "--group",
            "32",
        ])
        .args([
            "--seqlen",
            "16",
            "--max-blocks",
            "1",
            "--split-long",
            "--calib",
        ])
        .arg(data("wikitext-2-raw/wiki.valid.calib.txt"))
        .arg("--model")
        .arg(fixture("arch/llama"))
        .arg("-o")
        .arg(tmp.path().join("out"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("--rounding gptq with 16 calibration tokens"),
        "{err}"
    );
}

/// A linear kept float in every layer is not held to the packed kernels' split rules: with
/// `--keep-fp16 100%` the llama fixture loads in vLLM at tensor-parallel 4, where its packed
/// q/k/v would not (output partition 96 is not a multiple of 64).
#[test]
fn verify_applies_kernel_rules_to_packed_linears_only() {
    let model = fixture("arch/llama");
    let tmp = tempfile::tempdir().unwrap();
    let (all_float, packed) = (tmp.path().join("float"), tmp.path().join("packed"));
    quantize(&model, &all_float, &["--keep-fp16", "100%"]);
    quantize(&model, &packed, &[]);
    let tp4 = |dir: &Path| -> serde_json::Value {
        serde_json::from_slice(&awq(&["verify", "--json", "--tp", "4"], dir).stdout).unwrap()
    };
    assert_eq!(tp4(&all_float)["ok"], true, "{:#}", tp4(&all_float));
    assert_eq!(tp4(&packed)["ok"], false, "{:#}", tp4(&packed));
}

/// The dry run of a MoE fp8 source says what a run will do with it before any work: the fp8
/// dequantization, the MTP layers left out, both layer kinds' scale groups (dense and MoE) and
/// how many calibration tokens an expert sees on average.
#[test]
fn dry_run_plans_fp8_sources_experts_and_dense_layers() {
    let tmp = tempfile::tempdir().unwrap();
    let o = Command::cargo_bin("awq")
        .unwrap()
        .args(["quantize", "-q", "--dry-run", "--json", "--group", "32"])
        .args([
            "--seqlen",
            "16",
            "--max-blocks",
            "4",
            "--split-long",
            "--calib",
        ])
        .arg(data("wikitext-2-raw/wiki.valid.calib.txt"))
        .arg("--model")
        .arg(fixture("arch/deepseek_v3_fp8"))
        .arg("-o")
        .arg(tmp.path().join("out"))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let plan: serde_json::Value = (out.lines())
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v.get("plan").cloned())
        .expect("a start event with the plan");
    assert_eq!(plan["fp8_block"], serde_json::json!([16, 16]), "{plan}");
    let e = &plan["experts"];
    assert_eq!(
        (e["experts"].as_u64(), e["top_k"].as_u64()),
        (Some(8), Some(2)),
        "{e}"
    );
    assert_eq!(e["moe_layers"].as_u64(), Some(2), "{e}");
    // 4 blocks of 16 tokens, each routed to 2 of 8 experts.
    assert_eq!(e["mean_tokens"].as_f64(), Some(16.0), "{e}");
    // `--rounding auto` judges dense layers only, and none of the dense layer's 8 linears with
    // 64 tokens: its widest input, down_proj's, needs 4 × 256.
    assert_eq!(
        plan["rounding"],
        serde_json::json!({"method": "auto", "judged": 0, "too_few_tokens": 8, "in_moe_layers": 16,
            "tokens_for_all": 1024, "from_unclipped": false}),
        "{plan}"
    );
    let groups: Vec<String> = (plan["scale_groups"].as_array().unwrap().iter())
        .map(|g| format!("{}: {}", g[0].as_str().unwrap(), g[1]))
        .collect();
    assert!(
        groups.iter().any(|g| g.contains("mlp.gate_proj")),
        "{groups:?}"
    );
    assert!(
        groups.iter().any(|g| g.contains("mlp.experts.0.gate_proj")),
        "{groups:?}"
    );
}

/// `awq quantize` of the gemma3 fixture with `cfg` (a small calibration of `wiki.valid.calib.txt`)
/// into `out`, with `env`, asserting success; returns stderr, then stdout (the summary).
fn quantize_gemma3(out: &Path, cfg: &[&str], env: &[(&str, &str)]) -> String {
    let (code, text) = run_gemma3(out, cfg, env);
    assert_eq!(code, Some(0), "{text}");
    text
}

/// `awq quantize` on the gemma3 fixture as [`quantize_gemma3`] runs it: the exit code, and the
/// stderr followed by the stdout.
fn run_gemma3(out: &Path, cfg: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let o = Command::cargo_bin("awq")
        .unwrap()
        .args(["quantize", "--split-long", "--calib"])
        .arg(data("wikitext-2-raw/wiki.valid.calib.txt"))
        .arg("--model")
        .arg(fixture("arch/gemma3"))
        .arg("-o")
        .arg(out)
        .args(cfg)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    (
        o.status.code(),
        stderr + &String::from_utf8_lossy(&o.stdout),
    )
}

/// The report an `awq quantize` run wrote into `out`.
fn report_of(out: impl AsRef<Path>) -> serde_json::Value {
    let path = out.as_ref().join("quantization_report.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The model card an `awq quantize` run wrote into `out`.
fn card_of(out: impl AsRef<Path>) -> String {
    std::fs::read_to_string(out.as_ref().join("README.md")).unwrap()
}

/// The end-to-end check's `fallback`, and each version's KL with (for the alternatives) the
/// standard error of its gain.
fn end_to_end_of(out: &Path) -> (serde_json::Value, [f64; 3], [f64; 2]) {
    let report: serde_json::Value = report_of(out);
    let e = &report["end_to_end"];
    let kl = |k: &str| e[k]["kl"].as_f64().unwrap();
    let se = |k: &str| e[k]["kl_gain_se"].as_f64().unwrap();
    (
        e["fallback"].clone(),
        [kl("written"), kl("scales_only"), kl("rtn")],
        [se("scales_only"), se("rtn")],
    )
}

/// The gemma3 fixture with 4 blocks of 16 tokens at group 64: round-to-nearest's KL from the
/// float model is half AWQ's (0.0051 against 0.0103), but over the check's 15 predictions that
/// gain is within twice its standard error, so what was searched is kept.
#[test]
fn an_end_to_end_loss_within_the_checks_noise_keeps_what_was_written() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("awq");
    let cfg = [
        "--group",
        "64",
        "--seqlen",
        "16",
        "--n-samples",
        "4",
        "--max-blocks",
        "4",
    ];
    let stderr = quantize_gemma3(&out, &cfg, &[]);
    let (fallback, [written, _, rtn], [_, rtn_se]) = end_to_end_of(&out);
    assert!(fallback.is_null(), "{stderr}");
    assert!(rtn < 0.6 * written, "{rtn} {written}");
    assert!(written - rtn < 2.0 * rtn_se, "{written} {rtn} {rtn_se}");
    assert!(!stderr.contains("written again"), "{stderr}");
}

/// The summary says where error feedback walked from: the weights before clipping from 16 384
/// calibration tokens, nothing about clipping with `--no-clip` (it said "from the unclipped
/// weights" whatever the calibration, also where the walk started from the clipped ones).
#[test]
fn the_summary_says_where_error_feedback_walked_from() {
    let tmp = tempfile::tempdir().unwrap();
    let big = [
        "--seqlen",
        "128",
        "--n-samples",
        "400",
        "--max-blocks",
        "128",
    ];
    let text = quantize_gemma3(
        &tmp.path().join("big"),
        &[&big[..], &["--group", "64", "--fast"]].concat(),
        &[],
    );
    let walked = "rounding: error feedback (GPTQ) from the weights before clipping with";
    assert!(text.contains(walked), "{text}");
    let cfg = [
        "--seqlen",
        "16",
        "--n-samples",
        "4",
        "--group",
        "64",
        "--no-clip",
    ];
    let text = quantize_gemma3(&tmp.path().join("no-clip"), &cfg, &[]);
    assert!(
        text.contains("rounding: error feedback (GPTQ) with round-to-nearest's"),
        "{text}"
    );
}

/// The default rounding (`auto`) says in the run's summary, as in the card, on how many linears
/// it kept error feedback and how many it could not judge for want of calibration tokens (4 per
/// input dimension): every one with 4 blocks of 16 tokens, down_proj's alone with 15 of 64.
#[test]
fn the_summary_says_where_error_feedback_was_kept_and_what_was_not_judged() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, cfg) in [
        ["--seqlen", "16", "--n-samples", "4"],
        ["--seqlen", "64", "--n-samples", "16"],
    ]
    .iter()
    .enumerate()
    {
        let out = tmp.path().join(i.to_string());
        let text = quantize_gemma3(&out, &[&cfg[..], &["--group", "64"]].concat(), &[]);
        let report = report_of(&out);
        let records: Vec<&serde_json::Value> = (report["layers"].as_array().unwrap().iter())
            .flat_map(|l| l["rounding"].as_array().unwrap())
            .collect();
        let kept = records.iter().filter(|x| x["gptq_kept"] == true).count();
        let unjudged = records.iter().filter(|x| x["held_out_rtn_loss"].is_null());
        let unjudged: Vec<_> = unjudged.map(|x| x["linear"].as_str().unwrap()).collect();
        match i {
            0 => assert_eq!(unjudged.len(), records.len()),
            _ => assert!(unjudged.iter().all(|l| *l == "mlp.down_proj") && kept > 0),
        }
        let words = format!(
            "kept on {kept} of {} linears where it lowered the held-out calibration blocks' loss; \
             {} not judged (fewer than 4 calibration tokens per input dimension, {} tokens here: \
             more --n-samples or a longer --seqlen), so round to nearest",
            records.len(),
            unjudged.len(),
            report["calibration"]["tokens"]
        );
        assert!(text.contains(&format!("rounding: error feedback (GPTQ) from the clipped weights (fewer than 16384 calibration tokens) with round-to-nearest's scales and zero points, {words}")), "{text}");
        assert!(card_of(&out).contains(&words));
        // `--json`'s done event counts the same.
        let json = quantize_gemma3(
            &tmp.path().join(format!("{i}-json")),
            &[&cfg[..], &["--group", "64", "--json"]].concat(),
            &[],
        );
        let done = (json.lines())
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["event"] == "done")
            .expect("a done event");
        assert_eq!(
            done["rounding"],
            serde_json::json!({"method": "auto", "linears": records.len(), "error_feedback": kept,
                "not_judged": unjudged.len(), "in_moe_layers": 0}),
            "{done}"
        );
    }
}

/// A fallback to round-to-nearest (forced: the fixtures are too small for the check to be
/// sure) writes round-to-nearest's bytes, warns, puts a row in the card, and the summary scores
/// what was written.
#[test]
fn an_end_to_end_fallback_to_round_to_nearest_writes_its_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, rtn) = (tmp.path().join("awq"), tmp.path().join("rtn"));
    let cfg = ["--group", "64", "--seqlen", "16", "--n-samples", "4"];
    let stderr = quantize_gemma3(&out, &cfg, &[("AWQ_INJECT_FALLBACK", "rtn")]);
    let (fallback, [written, _, rtn_kl], _) = end_to_end_of(&out);
    assert_eq!(fallback, "rtn", "{stderr}");
    assert!(
        stderr.contains("written again: every layer as plain round-to-nearest"),
        "{stderr}"
    );
    let summary = format!("KL from the float model {rtn_kl:.4} as written");
    assert!(stderr.contains(&summary) && rtn_kl != written, "{stderr}");
    quantize_gemma3(
        &rtn,
        &[&cfg[..], &["--no-search", "--no-clip", "--rounding", "rtn"]].concat(),
        &[],
    );
    let bytes = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert!(bytes(&out) == bytes(&rtn), "not round-to-nearest's bytes");
    let rtn_card = card_of(&rtn);
    assert!(
        rtn_card.contains("| end-to-end check | no: nothing was searched or clipped"),
        "{rtn_card}"
    );
    // Without --rounding rtn the codes may be error feedback's, so the check runs.
    let unsearched = tmp.path().join("unsearched");
    quantize_gemma3(
        &unsearched,
        &[&cfg[..], &["--no-search", "--no-clip"]].concat(),
        &[],
    );
    assert!(report_of(&unsearched)["end_to_end"].is_object());
    // Its guard has nothing to fall back from, and its check no scales-only version.
    let unsearched_card = card_of(&unsearched);
    assert!(
        unsearched_card
            .contains("nothing was searched or clipped, so there was nothing to fall back from")
            && !unsearched_card.contains("AWQ as searched was kept")
            && !unsearched_card.contains("without clipping (no scales searched)"),
        "{unsearched_card}"
    );
    let card = card_of(&out);
    assert!(
        card.contains(
            "plain round-to-nearest was forced by AWQ_INJECT_FALLBACK (a test hook); written \
             again: every layer as plain round-to-nearest"
        ),
        "{card}"
    );
    assert_verifies(&out);
}

/// An output whose fallback the test hook forced holds other bytes than a run without the
/// hook writes: `--skip-existing` without the hook refuses it (exit 4) naming the hook, and
/// with the same value takes it as up to date.
#[test]
fn skip_existing_does_not_take_a_hook_forced_output_for_an_unforced_one() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("forced");
    let cfg = ["--group", "64", "--seqlen", "16", "--n-samples", "4"];
    let hook = [("AWQ_INJECT_FALLBACK", "rtn")];
    quantize_gemma3(&out, &cfg, &hook);
    let before = std::fs::read(out.join("model.safetensors")).unwrap();
    let skip = [&cfg[..], &["--skip-existing"]].concat();
    let (code, text) = run_gemma3(&out, &skip, &[]);
    assert_eq!(code, Some(4), "{text}");
    assert!(text.contains("inject_fallback"), "{text}");
    let (code, text) = run_gemma3(&out, &skip, &hook);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("up to date"), "{text}");
    assert!(std::fs::read(out.join("model.safetensors")).unwrap() == before);
}

/// A per-layer fallback (forced: layer 0 as round-to-nearest, layer 1 as quantized) writes
/// layer 0's tensors as a round-to-nearest run does and layer 1's as the run without a
/// fallback does, scores the choice it carried, and names the layer in the card.
#[test]
fn a_per_layer_fallback_rewrites_only_the_layers_it_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = ["mixed", "plain", "rtn"].map(|d| tmp.path().join(d));
    let cfg = ["--group", "64", "--seqlen", "16", "--n-samples", "4"];
    let force = [("AWQ_INJECT_FALLBACK", "per_layer:rtn,written")];
    let stderr = quantize_gemma3(&dirs[0], &cfg, &force);
    quantize_gemma3(&dirs[1], &cfg, &[]);
    let rtn_cfg = [&cfg[..], &["--no-search", "--no-clip", "--rounding", "rtn"]].concat();
    quantize_gemma3(&dirs[2], &rtn_cfg, &[]);
    let report: serde_json::Value = report_of(&dirs[0]);
    let e = &report["end_to_end"];
    assert_eq!(e["fallback"], "per_layer", "{stderr}");
    assert_eq!(e["forced"], true);
    for k in ["versions", "output_versions"] {
        let v = if k == "versions" {
            &e["per_layer"][k]
        } else {
            &e[k]
        };
        assert_eq!(v, &serde_json::json!(["rtn", "written"]), "{k}");
    }
    let kl = e["per_layer"]["scores"]["kl"].as_f64().unwrap();
    assert!(
        stderr.contains(&format!("KL from the float model {kl:.4} as written")),
        "{stderr}"
    );
    assert!(
        stderr.contains("written again: layer 0 as plain round-to-nearest"),
        "{stderr}"
    );
    let bytes = dirs
        .each_ref()
        .map(|d| std::fs::read(d.join("model.safetensors")).unwrap());
    let [mixed, plain, rtn] = bytes
        .each_ref()
        .map(|b| safetensors::SafeTensors::deserialize(b).unwrap());
    let layer = |t: &safetensors::SafeTensors, i: usize| {
        let mut names: Vec<String> = (t.names().into_iter())
            .filter(|n| n.starts_with(&format!("model.layers.{i}.")))
            .map(|n| n.to_string())
            .collect();
        names.sort();
        assert!(!names.is_empty());
        names
            .into_iter()
            .map(|n| (t.tensor(&n).unwrap().data().to_vec(), n))
            .collect::<Vec<_>>()
    };
    assert!(
        layer(&mixed, 0) == layer(&rtn, 0),
        "layer 0 is not round-to-nearest's"
    );
    assert!(
        layer(&mixed, 1) == layer(&plain, 1),
        "layer 1 is not as quantized"
    );
    assert!(layer(&mixed, 0) != layer(&plain, 0));
    let card = card_of(&dirs[0]);
    assert!(card.contains("with the per-layer choice"), "{card}");
    assert_verifies(&dirs[0]);
}

/// The test hook names a value it does not understand and ignores it; a forced per-layer choice
/// that keeps every layer as written is no fallback.
#[test]
fn a_fallback_hook_value_not_understood_is_named_and_ignored() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = ["typo", "all-written", "plain"].map(|d| tmp.path().join(d));
    let cfg = ["--group", "64", "--seqlen", "16", "--n-samples", "4"];
    let stderr = quantize_gemma3(
        &dirs[0],
        &cfg,
        &[("AWQ_INJECT_FALLBACK", "per_layer:rtn, written")],
    );
    assert!(
        stderr.contains("AWQ_INJECT_FALLBACK=\"per_layer:rtn, written\" is not understood"),
        "{stderr}"
    );
    let force = [("AWQ_INJECT_FALLBACK", "per_layer:written")];
    let stderr = quantize_gemma3(&dirs[1], &cfg, &force);
    quantize_gemma3(&dirs[2], &cfg, &[]);
    for d in &dirs[..2] {
        let (fallback, ..) = end_to_end_of(d);
        assert!(fallback.is_null(), "{stderr}");
    }
    let bytes = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert!(bytes(&dirs[0]) == bytes(&dirs[2]) && bytes(&dirs[1]) == bytes(&dirs[2]));
}

/// A fallback to scales-only (forced) writes byte for byte what a run without clipping or
/// guard writes: the same searched scales, round-to-nearest codes. With `--keep-fp16` the kept
/// units hold the fallback's scaled weights, and the output still verifies.
#[test]
fn an_end_to_end_fallback_to_scales_only_writes_the_unclipped_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, unclipped) = (tmp.path().join("awq"), tmp.path().join("unclipped"));
    let cfg = ["--group", "32", "--seqlen", "32", "--n-samples", "8"];
    let force = [("AWQ_INJECT_FALLBACK", "scales_only")];
    let stderr = quantize_gemma3(&out, &cfg, &force);
    let (fallback, ..) = end_to_end_of(&out);
    assert_eq!(fallback, "scales_only", "{stderr}");
    quantize_gemma3(
        &unclipped,
        &[&cfg[..], &["--no-clip", "--no-guard", "--rounding", "rtn"]].concat(),
        &[],
    );
    let bytes = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert!(bytes(&out) == bytes(&unclipped), "not the unclipped bytes");
    let card = card_of(&unclipped);
    assert!(
        card.contains("| end-to-end check | no: --no-guard |"),
        "{card}"
    );

    let kept = tmp.path().join("kept");
    quantize_gemma3(&kept, &[&cfg[..], &["--keep-fp16", "20"]].concat(), &force);
    assert_verifies(&kept);
}

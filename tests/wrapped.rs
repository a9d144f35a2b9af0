//! Vision-language wrappers through the CLI: what is refused (with the exit code, a message
//! naming the cause, and nothing written), and what a processor brings along (its files are
//! copied, its chat template renders conversations). The forward and the end-to-end quantization
//! of each wrapper are in `arch_golden.rs` and `arch_quantize.rs`.

mod common;

use std::path::Path;

use assert_cmd::Command;
use common::*;

fn quantize(model: &Path, out: &Path, calib: &Path, extra: &[&str]) -> std::process::Output {
    Command::cargo_bin("awq")
        .unwrap()
        .args([
            "quantize",
            "-q",
            "--fast",
            "--group",
            "32",
            "--n-samples",
            "16",
        ])
        .args(["--seqlen", "64", "--split-long", "--calib"])
        .arg(calib)
        .arg("--model")
        .arg(model)
        .arg("-o")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

fn wiki() -> std::path::PathBuf {
    data("wikitext-2-raw/wiki.valid.calib.txt")
}

/// Nothing beside the model directory: no output, no staging, no rejected copy.
fn nothing_written(tmp: &Path) {
    let left: Vec<String> = std::fs::read_dir(tmp)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "model")
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_wrapped_text_model_we_do_not_support_is_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    copy_dir(&fixture("arch/llava_hub"), &model);
    let path = model.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    cfg["text_config"]["model_type"] = "opt".into();
    std::fs::write(&path, cfg.to_string()).unwrap();
    let o = quantize(&model, &tmp.path().join("out"), &wiki(), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(
        err.contains("LlavaForConditionalGeneration wraps a text model of model_type \"opt\""),
        "{err}"
    );
    assert!(err.contains("supported text models"), "{err}");
    nothing_written(tmp.path());
}

#[test]
fn keep_fp16_that_would_name_a_vision_module_is_refused() {
    // Gemma 3's SigLIP tower has `encoder.layers.N.self_attn.q_proj`: the decoder-relative
    // entry `layers.N.self_attn.q_proj` would name it too.
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    copy_dir(&fixture("arch/gemma3_mm"), &model);
    let o = quantize(
        &model,
        &tmp.path().join("out"),
        &wiki(),
        &["--keep-fp16", "5%"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("also names the vision module model.vision_tower.encoder.layers.0"),
        "{err}"
    );
    nothing_written(tmp.path());
}

#[test]
fn keep_fp16_in_a_wrapper_lists_decoder_relative_entries_that_verify() {
    // Pixtral's modules (`transformer.layers.N.attention.q_proj`) share no entry with the
    // decoder's, so Mistral 3 can keep units float.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = quantize(
        &fixture("arch/mistral3_hub"),
        &out,
        &wiki(),
        &["--keep-fp16", "10%"],
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    let list = cfg["quantization_config"]["modules_to_not_convert"]
        .as_array()
        .unwrap()
        .clone();
    let kept: Vec<&str> = list
        .iter()
        .filter_map(|e| e.as_str())
        .filter(|e| e.starts_with("layers."))
        .collect();
    assert!(!kept.is_empty(), "{list:?}");
    let verify = Command::cargo_bin("awq")
        .unwrap()
        .args(["verify", "--for", "transformers"])
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(
        verify.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
}

/// A processor's files (the goldens have none, so the test lays them out): copied byte for
/// byte, and `chat_template.json` is the template conversations are rendered with.
#[test]
fn processor_files_are_copied_and_its_chat_template_renders_conversations() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    copy_dir(&fixture("arch/qwen2_5_vl_hub"), &model);
    let companions = [
        (
            "preprocessor_config.json",
            r#"{"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 14}"#,
        ),
        (
            "processor_config.json",
            r#"{"processor_class": "Qwen2_5_VLProcessor"}"#,
        ),
        (
            "chat_template.json",
            r#"{"chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"}"#,
        ),
    ];
    for (name, text) in companions {
        std::fs::write(model.join(name), text).unwrap();
    }
    let calib = tmp.path().join("chat.jsonl");
    let line = |i: usize| {
        let text = format!("Tell me about the history of the valley number {i}. ").repeat(8);
        serde_json::json!({"messages": [
            {"role": "user", "content": text},
            {"role": "assistant", "content": "It was settled long ago by farmers and traders."}
        ]})
        .to_string()
    };
    std::fs::write(&calib, (0..24).map(line).collect::<Vec<_>>().join("\n")).unwrap();
    let out = tmp.path().join("out");
    let o = quantize(&model, &out, &calib, &[]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for (name, text) in companions {
        assert_eq!(
            std::fs::read_to_string(out.join(name)).unwrap(),
            text,
            "{name}"
        );
    }

    // The processor's template is the one rendered: one that raises says so, naming its file.
    std::fs::write(
        model.join("chat_template.json"),
        r#"{"chat_template": "{{ raise_exception('the processor template ran') }}"}"#,
    )
    .unwrap();
    let o = quantize(&model, &tmp.path().join("out2"), &calib, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(
        err.contains("the processor template ran") && err.contains("chat_template.json"),
        "{err}"
    );
}

//! Vision-language checkpoints: a text decoder we support, wrapped with a vision tower and a
//! projector (Gemma 3 from 4B up, Mistral Small 3.1/3.2, LLaVA, Qwen2-VL and Qwen2.5-VL).
//!
//! Why only the decoder is quantized: the AWQ checkpoints of these models on the Hub, and what
//! both peers write (AutoAWQ for Qwen2-VL/2.5-VL and LLaVA, llm-compressor for all four), keep
//! the vision parts in float and list them in `modules_to_not_convert`; vLLM serves that. The
//! decoder is one of our families under another root ([`Roots`]); the vision tensors are copied
//! with their bytes unchanged, and calibration and eval run the decoder on text alone.
//!
//! Two weight layouts exist for each wrapper, and the output keeps the source's, so every loader
//! that read the source reads the output: the original Hub releases
//! (`language_model.model.layers.*`, `vision_tower.*`; Qwen2.5-VL `model.layers.*`, `visual.*`)
//! and transformers' own module names (`model.language_model.layers.*`,
//! `model.vision_tower.*`, `lm_head`).

use serde_json::Value;

use super::roots::Roots;
use crate::error::Result;
use crate::input_err;

/// One vision-language wrapper: its class, where its parts live, and its text model.
pub struct Wrapper {
    /// `architectures[0]`, e.g. `Gemma3ForConditionalGeneration`.
    pub architecture: &'static str,
    /// The top-level `model_type`, for configs without `architectures`.
    pub model_type: &'static str,
    /// The text model's `model_type` when `text_config` names none (the wrapper config class's
    /// default: `LlavaConfig` builds a Llama text config, `Mistral3Config` a Mistral one).
    default_text: &'static str,
    /// The float parts' top-level modules in the Hub layout; they are also the
    /// `modules_to_not_convert` entries (loaders match entries as substrings of module names).
    vision: &'static [&'static str],
    /// The decoder and head roots of the Hub layout.
    hub: (&'static str, &'static str),
    /// The text keys sit at the top level of config.json, beside the vision ones (the
    /// Qwen2-VL and Qwen2.5-VL releases); transformers 5 nests them in `text_config`.
    flat_text: bool,
}

/// The vision parts of the Llama-style wrappers (Gemma 3, Mistral 3, LLaVA).
const TOWER_AND_PROJECTOR: &[&str] = &["vision_tower", "multi_modal_projector"];
const LANGUAGE_MODEL: (&str, &str) = ("language_model.model", "language_model.lm_head");

/// Every supported wrapper: adding one is a row here (and its text model in [`TEXT_MODELS`]).
pub const WRAPPERS: [Wrapper; 5] = [
    Wrapper {
        architecture: "Gemma3ForConditionalGeneration",
        model_type: "gemma3",
        default_text: "gemma3_text",
        vision: TOWER_AND_PROJECTOR,
        hub: LANGUAGE_MODEL,
        flat_text: false,
    },
    Wrapper {
        architecture: "Mistral3ForConditionalGeneration",
        model_type: "mistral3",
        default_text: "mistral",
        vision: TOWER_AND_PROJECTOR,
        hub: LANGUAGE_MODEL,
        flat_text: false,
    },
    Wrapper {
        architecture: "LlavaForConditionalGeneration",
        model_type: "llava",
        default_text: "llama",
        vision: TOWER_AND_PROJECTOR,
        hub: LANGUAGE_MODEL,
        flat_text: false,
    },
    Wrapper {
        architecture: "Qwen2_5_VLForConditionalGeneration",
        model_type: "qwen2_5_vl",
        default_text: "qwen2_5_vl_text",
        vision: &["visual"],
        hub: ("model", "lm_head"),
        flat_text: true,
    },
    Wrapper {
        architecture: "Qwen2VLForConditionalGeneration",
        model_type: "qwen2_vl",
        default_text: "qwen2_vl_text",
        vision: &["visual"],
        hub: ("model", "lm_head"),
        flat_text: true,
    },
];

/// transformers' own module names, for every wrapper: the decoder under
/// `model.language_model`, the head `lm_head`, the vision parts under `model.`.
const MODULE_LAYOUT: (&str, &str) = ("model.language_model", "lm_head");

/// A text model a wrapper may hold: its `model_type`, the causal-LM class whose rules build its
/// spec, and the defaults of its config class for the keys a `text_config` may leave out
/// (transformers fills them from the class; Gemma 3 4B's `text_config` omits the head counts,
/// `head_dim`, `vocab_size` and `rope_theta`).
struct TextModel {
    model_type: &'static str,
    architecture: &'static str,
    defaults: &'static str,
}

/// The text models with config-class defaults; any other supported family may sit in a LLaVA
/// wrapper too, read as written.
const TEXT_MODELS: [TextModel; 6] = [
    TextModel {
        model_type: "gemma3_text",
        architecture: super::gemma3::ARCHITECTURE,
        defaults: super::gemma3::CONFIG_DEFAULTS,
    },
    TextModel {
        model_type: "mistral",
        architecture: super::mistral::ARCHITECTURE,
        defaults: super::mistral::CONFIG_DEFAULTS,
    },
    TextModel {
        model_type: "llama",
        architecture: super::llama::ARCHITECTURE,
        defaults: super::llama::CONFIG_DEFAULTS,
    },
    TextModel {
        model_type: "qwen2",
        architecture: super::qwen2::ARCHITECTURE,
        defaults: super::qwen2::CONFIG_DEFAULTS,
    },
    // Qwen2.5-VL's and Qwen2-VL's decoders are Qwen2's (q/k/v biases) with multimodal rope;
    // their own text config classes have other defaults (transformers
    // `Qwen2_5_VLTextConfig`, `Qwen2VLTextConfig`).
    TextModel {
        model_type: "qwen2_5_vl_text",
        architecture: super::qwen2::ARCHITECTURE,
        defaults: QWEN2_5_VL_TEXT_DEFAULTS,
    },
    TextModel {
        model_type: "qwen2_vl_text",
        architecture: super::qwen2::ARCHITECTURE,
        defaults: QWEN2_VL_TEXT_DEFAULTS,
    },
];

/// transformers `Qwen2_5_VLTextConfig.__init__` defaults (keys we read).
const QWEN2_5_VL_TEXT_DEFAULTS: &str = r#"{
    "vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 29568,
    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
    "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0, "use_sliding_window": false, "sliding_window": 4096,
    "tie_word_embeddings": false
}"#;

/// transformers `Qwen2VLTextConfig.__init__` defaults (keys we read).
const QWEN2_VL_TEXT_DEFAULTS: &str = QWEN2_5_VL_TEXT_DEFAULTS;

/// The wrapper a config names, by `architectures[0]` or (without it) `model_type`.
pub fn find(architecture: Option<&str>, model_type: Option<&str>) -> Option<&'static Wrapper> {
    WRAPPERS.iter().find(|w| match architecture {
        Some(a) => w.architecture == a,
        None => model_type == Some(w.model_type),
    })
}

/// The supported wrappers' architectures, for messages.
pub fn supported() -> Vec<&'static str> {
    WRAPPERS.iter().map(|w| w.architecture).collect()
}

/// The float parts of a wrapped checkpoint: what is copied unchanged and kept out of
/// quantization.
#[derive(Debug, Clone, PartialEq)]
pub struct Vision {
    /// The wrapper's architecture, e.g. `Gemma3ForConditionalGeneration`.
    pub wrapper: &'static str,
    /// The `modules_to_not_convert` entries that keep every vision and projector module float
    /// (`vision_tower`, `multi_modal_projector`, or `visual`).
    pub entries: &'static [&'static str],
    /// The float parts' module prefixes in this checkpoint's layout (`vision_tower` or
    /// `model.vision_tower`).
    pub modules: Vec<String>,
}

impl Vision {
    /// Whether the tensor `name` belongs to the vision parts.
    pub fn owns(&self, name: &str) -> bool {
        self.modules.iter().any(|m| {
            name.strip_prefix(m.as_str())
                .is_some_and(|rest| rest.starts_with('.'))
        })
    }
}

/// A wrapper's float parts, summarised for the plan, the report, the card and `inspect`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VisionParts {
    /// The wrapper's architecture.
    pub wrapper: String,
    /// Each top-level vision module as the checkpoint names it.
    pub modules: Vec<VisionModule>,
    /// The `modules_to_not_convert` entries that keep them float.
    pub entries: Vec<String>,
}

/// One top-level vision module (`vision_tower`, `multi_modal_projector`, `visual`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VisionModule {
    pub name: String,
    pub tensors: usize,
    pub parameters: u64,
    /// Bytes on disk, copied unchanged into the output.
    pub bytes: u64,
    /// The tensors' dtypes, as safetensors names them (`BF16`, `F16`, `F32`).
    pub dtypes: Vec<String>,
}

impl VisionParts {
    /// Every vision tensor's bytes.
    pub fn bytes(&self) -> u64 {
        self.modules.iter().map(|m| m.bytes).sum()
    }

    /// Every vision parameter.
    pub fn parameters(&self) -> u64 {
        self.modules.iter().map(|m| m.parameters).sum()
    }
}

/// Sums the vision tensors of `ckpt` per top-level module.
pub fn parts(vision: &Vision, ckpt: &crate::io::reader::Checkpoint) -> VisionParts {
    let names = ckpt.names();
    let modules = vision
        .modules
        .iter()
        .map(|module| {
            let mut m = VisionModule {
                name: module.clone(),
                tensors: 0,
                parameters: 0,
                bytes: 0,
                dtypes: Vec::new(),
            };
            let mine = names.iter().filter(|n| {
                n.strip_prefix(module.as_str())
                    .is_some_and(|r| r.starts_with('.'))
            });
            for meta in mine.filter_map(|n| ckpt.meta(n).ok()) {
                m.tensors += 1;
                m.parameters += meta.shape.iter().product::<usize>() as u64;
                m.bytes += (meta.end - meta.start) as u64;
                let dtype = format!("{:?}", meta.dtype);
                if !m.dtypes.contains(&dtype) {
                    m.dtypes.push(dtype);
                }
            }
            m
        })
        .collect();
    VisionParts {
        wrapper: vision.wrapper.to_string(),
        modules,
        entries: vision.entries.iter().map(|e| e.to_string()).collect(),
    }
}

/// The text decoder's config as a causal LM's: `text_config` (or, for the flat Qwen releases,
/// the top level), the text config class's defaults for absent keys, `architectures` naming
/// the causal-LM class whose rules apply, and the top level's `quantization_config` (where the
/// Hub's AWQ VLMs keep it). `family_of` maps a text `model_type` to a supported causal-LM
/// architecture; `families` lists those model types for the message that refuses a text model
/// we do not support.
pub fn text_config(
    raw: &Value,
    w: &Wrapper,
    family_of: impl Fn(&str) -> Option<&'static str>,
    families: &[&str],
) -> Result<Value> {
    let nested = raw.get("text_config").filter(|t| t.is_object());
    let mut text = match nested {
        Some(t) => t.clone(),
        None if w.flat_text => {
            let mut t = raw.clone();
            if let Some(o) = t.as_object_mut() {
                o.remove("vision_config");
                o.remove("model_type");
                o.remove("architectures");
            }
            t
        }
        None => Value::Object(Default::default()),
    };
    let model_type = text
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or(w.default_text)
        .to_string();
    let known = TEXT_MODELS.iter().find(|t| t.model_type == model_type);
    let Some(architecture) = known
        .map(|t| t.architecture)
        .or_else(|| family_of(&model_type))
    else {
        let mut supported: Vec<&str> = TEXT_MODELS.iter().map(|t| t.model_type).collect();
        for f in families {
            if !supported.contains(f) {
                supported.push(f);
            }
        }
        return Err(input_err!(
            "config.json: {} wraps a text model of model_type {model_type:?}, which awq does not \
             support; supported text models: {}",
            w.architecture,
            supported.join(", ")
        ));
    };
    // transformers 5's `rope_parameters` carry rope_theta: read them before the class default
    // of rope_theta could stand in for it.
    super::config::rope_parameters_as_scaling(&mut text);
    let obj = text
        .as_object_mut()
        .ok_or_else(|| input_err!("config.json: text_config must be an object"))?;
    if let Some(defaults) = known.map(|t| t.defaults) {
        let defaults: serde_json::Map<String, Value> =
            serde_json::from_str(defaults).expect("the defaults tables are valid JSON");
        for (k, v) in defaults {
            // A key that is absent takes the class default; an explicit null stays null.
            obj.entry(k).or_insert(v);
        }
    }
    obj.insert("architectures".into(), Value::from(vec![architecture]));
    obj.insert("model_type".into(), Value::from(model_type));
    for key in ["quantization_config", "tie_word_embeddings"] {
        if let Some(v) = raw.get(key) {
            if nested.is_some() && !obj.contains_key(key) {
                obj.insert(key.into(), v.clone());
            }
        }
    }
    Ok(text)
}

/// The roots and float parts of `w` in the Hub layout; [`locate`] moves them to the module
/// layout when the weights say so.
pub fn hub_layout(w: &Wrapper) -> (Roots, Vision) {
    let roots = Roots::new(w.hub.0, w.hub.1);
    let vision = Vision {
        wrapper: w.architecture,
        entries: w.vision,
        modules: w.vision.iter().map(|m| m.to_string()).collect(),
    };
    (roots, vision)
}

/// Picks the layout the weights use (transformers' module names when
/// `model.language_model.layers.*` is present, the Hub release's otherwise) and checks that
/// every tensor belongs to the text decoder or to the vision parts: anything else would be
/// dropped from the output silently, so it is refused, named.
pub fn locate(roots: &mut Roots, vision: &mut Vision, names: &[&str]) -> Result<()> {
    let module = Roots::new(MODULE_LAYOUT.0, MODULE_LAYOUT.1);
    if names.iter().any(|n| module.layer_of(n).is_some()) {
        *roots = module;
        vision.modules = vision
            .entries
            .iter()
            .map(|m| format!("model.{m}"))
            .collect();
    }
    let mut stray: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| !roots.owns(n) && !vision.owns(n))
        .collect();
    if stray.is_empty() {
        return Ok(());
    }
    stray.sort_unstable();
    let more = match stray.len() {
        n if n > 3 => format!(" and {} more", n - 3),
        _ => String::new(),
    };
    Err(input_err!(
        "{} checkpoint: tensor {}{more} belongs neither to the text decoder (under {}.* and {}) \
         nor to the vision parts ({}); the weights do not match config.json's architecture",
        vision.wrapper,
        stray[..stray.len().min(3)].join(", "),
        roots.decoder,
        roots.head,
        vision.modules.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn family_of(mt: &str) -> Option<&'static str> {
        (mt == "qwen3").then_some("Qwen3ForCausalLM")
    }

    #[test]
    fn text_config_takes_the_text_class_defaults_for_absent_keys() {
        // Gemma 3 4B's text_config as released: most fields are left to Gemma3TextConfig.
        let raw = serde_json::json!({
            "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
            "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
                "model_type": "gemma3_text", "num_hidden_layers": 34,
                "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024,
                "final_logit_softcapping": null},
            "quantization_config": {"quant_method": "awq"}
        });
        let w = find(Some("Gemma3ForConditionalGeneration"), None).unwrap();
        let t = text_config(&raw, w, family_of, &["qwen3"]).unwrap();
        assert_eq!(t["architectures"][0], "Gemma3ForCausalLM");
        assert_eq!(t["num_attention_heads"], 8);
        assert_eq!(t["num_key_value_heads"], 4);
        assert_eq!(t["head_dim"], 256);
        assert_eq!(t["vocab_size"], 262208);
        assert_eq!(t["rope_theta"], 1000000.0);
        assert_eq!(t["sliding_window"], 1024);
        assert!(t["final_logit_softcapping"].is_null());
        assert_eq!(t["quantization_config"]["quant_method"], "awq");
    }

    #[test]
    fn an_unsupported_text_model_is_refused_naming_it() {
        let raw = serde_json::json!({"architectures": ["LlavaForConditionalGeneration"],
            "text_config": {"model_type": "opt"}});
        let w = find(Some("LlavaForConditionalGeneration"), None).unwrap();
        let err = text_config(&raw, w, family_of, &["qwen3"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"opt\"") && err.contains("LlavaForConditionalGeneration"),
            "{err}"
        );
        // Any supported family may sit in a LLaVA wrapper, read as written.
        let raw = serde_json::json!({"text_config": {"model_type": "qwen3"}});
        let t = text_config(&raw, w, family_of, &["qwen3"]).unwrap();
        assert_eq!(t["architectures"][0], "Qwen3ForCausalLM");
    }

    #[test]
    fn the_layout_follows_the_weights_and_stray_tensors_are_refused() {
        let w = find(None, Some("llava")).unwrap();
        let (mut roots, mut vision) = hub_layout(w);
        let module = [
            "model.language_model.layers.0.mlp.up_proj.weight",
            "model.vision_tower.embeddings.patch_embedding.weight",
            "lm_head.weight",
        ];
        locate(&mut roots, &mut vision, &module).unwrap();
        assert_eq!(roots.layer(0), "model.language_model.layers.0");
        assert!(vision.owns("model.multi_modal_projector.linear_1.weight"));
        assert!(!vision.owns("model.language_model.norm.weight"));

        let (mut roots, mut vision) = hub_layout(w);
        let stray = [
            "language_model.model.layers.0.mlp.up_proj.weight",
            "image_newline",
        ];
        let err = locate(&mut roots, &mut vision, &stray)
            .unwrap_err()
            .to_string();
        assert!(err.contains("image_newline"), "{err}");
    }
}

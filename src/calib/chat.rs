//! Conversations (`messages`: a list of `{role, content}`) rendered with the model's own chat
//! template, as transformers' `apply_chat_template(messages, tokenize=False,
//! add_generation_prompt=False)` does: Jinja with `trim_blocks` and `lstrip_blocks`, Python string
//! and dict methods (`.strip()`, `.items()`, ...), `raise_exception`, `bos_token`/`eos_token` from
//! `tokenizer_config.json`, `tools`/`documents` none. `strftime_now` returns a fixed date
//! (2024-07-26) so the calibration tokens, and thus the output, do not depend on the day.

use std::path::{Path, PathBuf};

use minijinja::value::Value as JValue;
use minijinja::{Environment, ErrorKind};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::input_err;

/// The chat template file transformers writes beside the tokenizer (preferred when present).
pub const TEMPLATE_FILE: &str = "chat_template.jinja";
/// A processor's chat template (vision-language models: `{"chat_template": "…"}`), which
/// transformers' processors read when there is no `chat_template.jinja`.
pub const PROCESSOR_TEMPLATE: &str = "chat_template.json";
/// The tokenizer configuration holding `chat_template`, `bos_token` and `eos_token`.
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";

const NAME: &str = "chat_template";

/// A model's chat template, compiled once.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
    /// Where the template came from, for error messages.
    pub source: PathBuf,
}

impl ChatTemplate {
    /// Loads the template of the model in `dir`: `chat_template.jinja`, else the processor's
    /// `chat_template.json` (vision-language models), else `chat_template` of
    /// `tokenizer_config.json` (a string, or a list of `{name, template}` whose `default` entry is
    /// used). `Ok(None)` when the model has none; a template that does not parse is an error.
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let config_path = dir.join(TOKENIZER_CONFIG);
        let config: Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| input_err!("{} is not valid JSON: {e}", config_path.display()))?,
            Err(_) => Value::Null,
        };
        let file = dir.join(TEMPLATE_FILE);
        let processor = dir.join(PROCESSOR_TEMPLATE);
        let (source, text) = if file.is_file() {
            let text = std::fs::read_to_string(&file).map_err(|e| Error::input_io(&file, e))?;
            (file, text)
        } else if processor.is_file() {
            let text =
                std::fs::read_to_string(&processor).map_err(|e| Error::input_io(&processor, e))?;
            let json: Value = serde_json::from_str(&text)
                .map_err(|e| input_err!("{} is not valid JSON: {e}", processor.display()))?;
            match config_template(&json, &processor)? {
                Some(text) => (processor, text),
                None => {
                    return Err(input_err!(
                        "{} has no \"chat_template\" string",
                        processor.display()
                    ))
                }
            }
        } else {
            match config_template(&config, &config_path)? {
                Some(text) => (config_path, text),
                None => return Ok(None),
            }
        };
        let env = environment(text).map_err(|e| {
            input_err!(
                "{}: the chat template does not parse: {e}",
                source.display()
            )
        })?;
        Ok(Some(ChatTemplate {
            env,
            bos: token(&config, "bos_token"),
            eos: token(&config, "eos_token"),
            source,
        }))
    }

    /// The template of the model in `dir`, or an error at `origin` (the first conversation)
    /// saying that conversations need one.
    pub fn require(dir: Option<&Path>, origin: &str) -> Result<Self> {
        let missing = |what: String| {
            input_err!(
                "{origin}: a conversation (\"messages\") needs the model's chat template, but {what}; \
                 give plain text instead (--text-column FIELD)"
            )
        };
        let Some(dir) = dir else {
            return Err(missing("no model directory was given".into()));
        };
        Self::load(dir)?.ok_or_else(|| {
            missing(format!(
                "{} has no {TEMPLATE_FILE}, no {PROCESSOR_TEMPLATE} and no chat_template in \
                 {TOKENIZER_CONFIG}",
                dir.display()
            ))
        })
    }

    /// Renders one conversation without a generation prompt.
    pub fn render(&self, messages: &Value, origin: &str) -> Result<String> {
        let ctx = minijinja::context! {
            messages => JValue::from(minijinja::value::Serde(messages)),
            bos_token => self.bos.clone(),
            eos_token => self.eos.clone(),
            add_generation_prompt => false,
            tools => JValue::from(()),
            documents => JValue::from(()),
        };
        self.env
            .get_template(NAME)
            .and_then(|t| t.render(ctx))
            .map_err(|e| {
                input_err!(
                    "{origin}: the chat template ({}) failed on this conversation: {e}",
                    self.source.display()
                )
            })
    }
}

/// `chat_template` of a tokenizer config: a string, or the `default` of a named list.
fn config_template(config: &Value, path: &Path) -> Result<Option<String>> {
    match config.get(NAME) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(list)) => {
            let named = |n: &str| {
                list.iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some(n))
                    .and_then(|t| t.get("template").and_then(Value::as_str))
            };
            named("default")
                .map(|t| Some(t.to_string()))
                .ok_or_else(|| {
                    input_err!(
                    "{}: chat_template is a list without a \"default\" entry ({{name, template}})",
                    path.display()
                )
                })
        }
        Some(_) => Err(input_err!(
            "{}: chat_template must be a string or a list of {{name, template}}",
            path.display()
        )),
    }
}

/// A conversation checked before any template sees it, so a malformed record is an input error
/// naming it rather than a Jinja error. Every message must be an object with a string `role` and
/// a `content`; other keys (`name`, `tool_calls`, ...) are passed through. `content` is a string,
/// or an OpenAI-style list of parts `{"type": "text", "text": "..."}`, which is **joined** into
/// one string (parts separated by a newline, as vLLM does) because transformers' chat templates
/// mostly expect a string; a part of any other type (`image_url`, `input_audio`, ...) is refused,
/// calibration being text only. ShareGPT's `{from, value}` messages are read as
/// `{role, content}` ([`sharegpt_role`]).
pub fn conversation(messages: &[Value], origin: &str) -> Result<Value> {
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| message(m, origin, i + 1).map(Value::Object))
        .collect::<Result<Vec<Value>>>()
        .map(Value::Array)
}

/// Message `n` (1-based) of a conversation at `origin`, its content a string.
fn message(m: &Value, origin: &str, n: usize) -> Result<serde_json::Map<String, Value>> {
    use super::formats::{key_list, kind};
    let Value::Object(map) = m else {
        return Err(input_err!(
            "{origin}: message {n} is {}; expected an object {{\"role\": ..., \"content\": ...}}",
            kind(m)
        ));
    };
    if !map.contains_key("role") && map.contains_key("from") && map.contains_key("value") {
        return message(&from_sharegpt(map, origin, n)?, origin, n);
    }
    if !map.contains_key("role") || !map.contains_key("content") {
        let keys = match key_list(map) {
            k if k.is_empty() => "no keys".to_string(),
            k => format!("keys {k}"),
        };
        return Err(input_err!(
            "{origin}: message {n} has {keys}; expected \"role\" and \"content\" (or \
             ShareGPT's \"from\" and \"value\")"
        ));
    }
    if !map["role"].is_string() {
        return Err(input_err!(
            "{origin}: message {n}: \"role\" is {}, not a string",
            kind(&map["role"])
        ));
    }
    let content = match &map["content"] {
        Value::String(_) => return Ok(map.clone()),
        Value::Array(parts) => text_parts(parts, origin, n)?,
        other => {
            return Err(input_err!(
                "{origin}: message {n}: \"content\" is {}; expected a string or a list of \
                 {{\"type\": \"text\", \"text\": ...}} parts",
                kind(other)
            ))
        }
    };
    let mut map = map.clone();
    map.insert("content".into(), Value::String(content));
    Ok(map)
}

/// The chat role of a ShareGPT speaker (`from`), as FastChat's and Axolotl's ShareGPT readers
/// map them: `human`/`user` → `user`, `gpt`/`assistant`/`chatgpt`/`bard`/`bing`/`model` →
/// `assistant`, `system` → `system`, `tool`/`function_response`/`observation` → `tool`.
pub fn sharegpt_role(from: &str) -> Option<&'static str> {
    Some(match from.to_ascii_lowercase().as_str() {
        "human" | "user" => "user",
        "gpt" | "assistant" | "chatgpt" | "bard" | "bing" | "model" => "assistant",
        "system" => "system",
        "tool" | "function_response" | "observation" => "tool",
        _ => return None,
    })
}

/// A ShareGPT message `{from, value, …}` as `{role, content, …}`.
fn from_sharegpt(map: &serde_json::Map<String, Value>, origin: &str, n: usize) -> Result<Value> {
    let from = map["from"].as_str().unwrap_or_default();
    let role = sharegpt_role(from).ok_or_else(|| {
        input_err!(
            "{origin}: message {n}: ShareGPT speaker \"from\": {} is not one of human, user, \
             gpt, assistant, system, tool",
            map["from"]
        )
    })?;
    let mut out = serde_json::Map::new();
    for (k, v) in map {
        match k.as_str() {
            "from" => out.insert("role".into(), Value::String(role.into())),
            "value" => out.insert("content".into(), v.clone()),
            _ => out.insert(k.clone(), v.clone()),
        };
    }
    Ok(Value::Object(out))
}

/// The text parts of an OpenAI-style content list, joined by newlines.
fn text_parts(parts: &[Value], origin: &str, n: usize) -> Result<String> {
    let mut texts = Vec::with_capacity(parts.len());
    for (j, part) in parts.iter().enumerate() {
        let at = || format!("{origin}: message {n}, content part {}", j + 1);
        match (part.get("type").and_then(Value::as_str), part.get("text")) {
            (Some("text"), Some(Value::String(t))) => texts.push(t.as_str()),
            (Some("text"), _) => {
                return Err(input_err!(
                    "{}: a \"text\" part needs a string \"text\"",
                    at()
                ))
            }
            (Some(other), _) => {
                return Err(input_err!(
                    "{}: a part of type {other:?}; only {{\"type\": \"text\", \"text\": ...}} \
                     parts are read (calibration is text only)",
                    at()
                ))
            }
            (None, _) => {
                return Err(input_err!(
                    "{}: expected an object {{\"type\": \"text\", \"text\": ...}}",
                    at()
                ))
            }
        }
    }
    Ok(texts.join("\n"))
}

/// A special token of the tokenizer config: a string or an added-token object `{content}`.
fn token(config: &Value, key: &str) -> String {
    match config.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(obj) => obj
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        None => String::new(),
    }
}

fn environment(template: String) -> std::result::Result<Environment<'static>, minijinja::Error> {
    let mut env = Environment::new();
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()?,
    );
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<JValue, _> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_function("strftime_now", |fmt: String| fixed_date(&fmt));
    env.add_template_owned(NAME, template)?;
    Ok(env)
}

/// `strftime` of the fixed date Friday 2024-07-26 00:00:00 (the common directives).
fn fixed_date(fmt: &str) -> String {
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        out.push_str(match chars.next() {
            Some('d') => "26",
            Some('m') => "07",
            Some('Y') => "2024",
            Some('y') => "24",
            Some('b') => "Jul",
            Some('B') => "July",
            Some('a') => "Fri",
            Some('A') => "Friday",
            Some('H' | 'M' | 'S') => "00",
            Some('%') => "%",
            _ => "",
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_dir(config: Value, jinja: Option<&str>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(TOKENIZER_CONFIG), config.to_string()).unwrap();
        if let Some(t) = jinja {
            std::fs::write(dir.path().join(TEMPLATE_FILE), t).unwrap();
        }
        dir
    }

    const TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m.content.strip() }}{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";

    #[test]
    fn a_processors_chat_template_json_is_used_before_the_tokenizers() {
        let dir = model_dir(
            serde_json::json!({"chat_template": "tokenizer", "bos_token": "<s>"}),
            None,
        );
        let processor = serde_json::json!({ "chat_template": TEMPLATE });
        std::fs::write(dir.path().join(PROCESSOR_TEMPLATE), processor.to_string()).unwrap();
        let t = ChatTemplate::load(dir.path()).unwrap().unwrap();
        assert!(t.source.ends_with(PROCESSOR_TEMPLATE));
        let text = t
            .render(&serde_json::json!([{"role": "user", "content": "hi"}]), "x")
            .unwrap();
        assert_eq!(text, "<s><|user|>\nhi\n");
    }

    #[test]
    fn renders_string_template_with_special_tokens() {
        let dir = model_dir(
            serde_json::json!({"chat_template": TEMPLATE, "bos_token": "<s>", "eos_token": {"content": "</s>"}}),
            None,
        );
        let t = ChatTemplate::load(dir.path()).unwrap().unwrap();
        let msgs = serde_json::json!([{"role": "user", "content": " hi "}, {"role": "assistant", "content": "yo"}]);
        assert_eq!(
            t.render(&msgs, "x").unwrap(),
            "<s><|user|>\nhi</s>\n<|assistant|>\nyo</s>\n"
        );
    }

    #[test]
    fn jinja_file_wins_and_named_list_uses_default() {
        let config = serde_json::json!({"chat_template": [
            {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ messages|length }}"}]});
        let dir = model_dir(config.clone(), None);
        let t = ChatTemplate::load(dir.path()).unwrap().unwrap();
        assert_eq!(t.render(&serde_json::json!([]), "x").unwrap(), "D0");
        let dir = model_dir(
            config,
            Some("J{% for k, v in messages[0].items() %}{{ k }}{% endfor %}"),
        );
        let t = ChatTemplate::load(dir.path()).unwrap().unwrap();
        assert_eq!(
            t.render(&serde_json::json!([{"role": "u"}]), "x").unwrap(),
            "Jrole"
        );
    }

    #[test]
    fn raise_exception_and_missing_template_are_input_errors() {
        let dir = model_dir(
            serde_json::json!({"chat_template": "{{ raise_exception('roles must alternate') }}"}),
            None,
        );
        let t = ChatTemplate::load(dir.path()).unwrap().unwrap();
        let err = t
            .render(&serde_json::json!([]), "c.jsonl:2")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("c.jsonl:2") && err.contains("roles must alternate"),
            "{err}"
        );
        let none = model_dir(serde_json::json!({}), None);
        assert!(ChatTemplate::load(none.path()).unwrap().is_none());
        let err = ChatTemplate::require(Some(none.path()), "c.jsonl:1")
            .err()
            .unwrap();
        assert!(matches!(err, Error::Input(_)) && err.to_string().contains("chat_template"));
        let broken = model_dir(serde_json::json!({"chat_template": "{% for %}"}), None);
        assert!(ChatTemplate::load(broken.path()).is_err());
    }

    #[test]
    fn conversations_are_checked_and_text_parts_joined() {
        let check = |v: Value| conversation(v.as_array().unwrap(), "c.jsonl:3");
        let ok = check(serde_json::json!([
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": "c", "name": "x"}
        ]))
        .unwrap();
        assert_eq!(
            ok,
            serde_json::json!([{"role": "user", "content": "a\nb"},
                {"role": "assistant", "content": "c", "name": "x"}])
        );
        let err = |v: Value| check(v).unwrap_err().to_string();
        // ShareGPT's speaker and text, read as role and content.
        assert_eq!(
            check(serde_json::json!([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]))
                .unwrap(),
            serde_json::json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
        );
        assert_eq!(
            err(serde_json::json!([{"speaker": "human", "text": "hi"}])),
            "c.jsonl:3: message 1 has keys \"speaker\", \"text\"; expected \"role\" and \
             \"content\" (or ShareGPT's \"from\" and \"value\")"
        );
        let e = err(serde_json::json!([{"role": "user", "content": "a"}, "b"]));
        assert!(e.contains("message 2 is a string"), "{e}");
        let e = err(serde_json::json!([{"role": 1, "content": "a"}]));
        assert!(e.contains("\"role\" is a number"), "{e}");
        let e = err(serde_json::json!([{"role": "user", "content": null}]));
        assert!(e.contains("\"content\" is null"), "{e}");
        let e = err(serde_json::json!([{"role": "user", "content": [{"type": "image_url"}]}]));
        assert!(
            e.contains("message 1, content part 1") && e.contains("\"image_url\""),
            "{e}"
        );
        let e = err(serde_json::json!([{"role": "user", "content": ["x"]}]));
        assert!(e.contains("content part 1: expected an object"), "{e}");
    }

    #[test]
    fn strftime_now_is_fixed() {
        assert_eq!(fixed_date("%d %b %Y"), "26 Jul 2024");
    }
}

//! Calibration input people have: JSON arrays, JSON lines, parquet (written here with the
//! parquet crate), chat conversations rendered with the model's template, sniffed extensions,
//! Hub datasets from a laid-out cache, and the errors for what cannot be used. Each test runs
//! `awq quantize --dry-run --json` on a tiny model and reads the plan's calibration summary.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use assert_cmd::Command;
use common::case::Run;
use common::tiny::{words, Tiny};
use parquet::basic::{BrotliLevel, Compression, GzipLevel, ZstdLevel};
use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use serde_json::{json, Value};

const COMMIT: &str = "89abcdef0123456789abcdef0123456789abcdef";

struct Setup {
    tmp: tempfile::TempDir,
    model: PathBuf,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    Tiny::llama64().write(&model);
    Setup { tmp, model }
}

impl Setup {
    fn file(&self, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
        let p = self.tmp.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

/// What the calibration tests read from a run.
trait CalibRun {
    fn calibration(&self) -> Value;
    fn fails(&self, needles: &[&str]) {
        self.fails_with(3, needles)
    }
    fn fails_with(&self, code: i32, needles: &[&str]);
}

impl CalibRun for Run {
    /// The calibration summary of the plan (the JSON `start` event).
    fn calibration(&self) -> Value {
        assert_eq!(self.code, 0, "{}", self.stderr);
        self.stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find_map(|ev| ev.get("plan").map(|p| p["calibration"].clone()))
            .unwrap_or_else(|| panic!("no plan event in {}", self.stdout))
    }

    fn fails_with(&self, code: i32, needles: &[&str]) {
        assert_eq!(
            self.code, code,
            "stdout {}\nstderr {}",
            self.stdout, self.stderr
        );
        for n in needles {
            assert!(self.stderr.contains(n), "{n:?} not in: {}", self.stderr);
        }
    }
}

fn quantize(s: &Setup, calib: &[&Path], extra: &[&str], env: &[(&str, &Path)]) -> Run {
    let mut args = vec!["--json"];
    args.extend_from_slice(extra);
    quantize_human(s, calib, &args, env)
}

/// `awq quantize --dry-run` without `--json` unless `extra` has it: the human plan on stdout.
fn quantize_human(s: &Setup, calib: &[&Path], extra: &[&str], env: &[(&str, &Path)]) -> Run {
    let mut cmd = Command::cargo_bin("awq").unwrap();
    cmd.env_remove("HF_HOME")
        .env_remove("HF_HUB_CACHE")
        .env("HF_HUB_OFFLINE", "1")
        .args(["quantize", "--seqlen", "16", "--group", "32", "--dry-run"])
        .arg("--model")
        .arg(&s.model)
        .arg("-o")
        .arg(s.tmp.path().join("out"));
    for c in calib {
        cmd.arg("--calib").arg(c);
    }
    cmd.args(extra);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Run::of(&mut cmd)
}

fn docs(n: usize, len: usize) -> Vec<String> {
    (0..n as u64).map(|i| words(len, 64, i)).collect()
}

fn jsonl(rows: &[Value]) -> String {
    rows.iter().map(|r| r.to_string() + "\n").collect()
}

/// A parquet file with a UTF-8 `text` column and an INT64 `id` column.
fn write_parquet(path: &Path, texts: &[String], compression: Compression) {
    let schema = parquet::schema::parser::parse_message_type(
        "message m { REQUIRED BYTE_ARRAY text (UTF8); REQUIRED INT64 id; }",
    )
    .unwrap();
    let props = WriterProperties::builder()
        .set_compression(compression)
        .build();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut w = SerializedFileWriter::new(file, Arc::new(schema), Arc::new(props)).unwrap();
    let mut rg = w.next_row_group().unwrap();
    let values: Vec<ByteArray> = texts.iter().map(|t| ByteArray::from(t.as_str())).collect();
    let mut col = rg.next_column().unwrap().unwrap();
    col.typed::<ByteArrayType>()
        .write_batch(&values, None, None)
        .unwrap();
    col.close().unwrap();
    let ids: Vec<i64> = (0..texts.len() as i64).collect();
    let mut col = rg.next_column().unwrap().unwrap();
    col.typed::<Int64Type>()
        .write_batch(&ids, None, None)
        .unwrap();
    col.close().unwrap();
    rg.close().unwrap();
    w.close().unwrap();
}

/// A parquet file with a `messages` column: list<struct<role, content>>.
fn write_chat_parquet(path: &Path, convs: &[Vec<(&str, String)>]) {
    let schema = parquet::schema::parser::parse_message_type(
        "message m { REQUIRED group messages (LIST) { REPEATED group list { \
         REQUIRED group element { REQUIRED BYTE_ARRAY role (UTF8); \
         REQUIRED BYTE_ARRAY content (UTF8); } } } }",
    )
    .unwrap();
    let file = std::fs::File::create(path).unwrap();
    let props = Arc::new(WriterProperties::builder().build());
    let mut w = SerializedFileWriter::new(file, Arc::new(schema), props).unwrap();
    let mut rg = w.next_row_group().unwrap();
    let rep: Vec<i16> = convs
        .iter()
        .flat_map(|c| (0..c.len()).map(|i| i16::from(i > 0)))
        .collect();
    let def = vec![1i16; rep.len()];
    for pick in [0, 1] {
        let values: Vec<ByteArray> = convs
            .iter()
            .flatten()
            .map(|(role, content)| {
                ByteArray::from(if pick == 0 { *role } else { content.as_str() })
            })
            .collect();
        let mut col = rg.next_column().unwrap().unwrap();
        col.typed::<ByteArrayType>()
            .write_batch(&values, Some(&def), Some(&rep))
            .unwrap();
        col.close().unwrap();
    }
    rg.close().unwrap();
    w.close().unwrap();
}

fn set_chat_template(model: &Path) {
    let config = json!({
        "bos_token": "w1",
        "eos_token": {"content": "w2", "lstrip": false},
        "chat_template": "{{ bos_token }} {% for m in messages %}{% if m['role'] == 'user' %}w3 {% else %}w4 {% endif %}{{ m.content.strip() }} {{ eos_token }} {% endfor %}"
    });
    std::fs::write(model.join("tokenizer_config.json"), config.to_string()).unwrap();
}

#[test]
fn json_array_of_strings_and_of_objects() {
    let s = setup();
    let d = docs(20, 12);
    let strings = s.file("strings.json", serde_json::to_string(&d).unwrap());
    let cal = quantize(&s, &[&strings], &[], &[]).calibration();
    assert_eq!(cal["documents_read"], 20, "{cal}");
    assert_eq!(cal["documents_used"], 20);

    let objects: Vec<Value> = d.iter().map(|t| json!({"id": 1, "content": t})).collect();
    let objects = s.file("objects.json", Value::from(objects).to_string());
    let cal = quantize(&s, &[&objects], &["--text-column", "content"], &[]).calibration();
    assert_eq!(cal["documents_read"], 20, "{cal}");
    // Both files at once: documents of every input.
    let cal = quantize(
        &s,
        &[&strings, &objects],
        &["--text-column", "content"],
        &[],
    )
    .calibration();
    assert_eq!(cal["documents_read"], 40, "{cal}");
    assert_eq!(cal["source"], "strings.json, objects.json");
}

#[test]
fn jsonl_and_missing_field_lists_found_keys() {
    let s = setup();
    let rows: Vec<Value> = docs(15, 12).iter().map(|t| json!({"text": t})).collect();
    let p = s.file("calib.jsonl", jsonl(&rows));
    assert_eq!(
        quantize(&s, &[&p], &[], &[]).calibration()["documents_read"],
        15
    );

    let rows = [
        json!({"text": "w1 w2"}),
        json!({"text": "w3"}),
        json!({"content": "w4", "id": 3}),
    ];
    let p = s.file("calib.jsonl", jsonl(&rows));
    quantize(&s, &[&p], &[], &[]).fails(&[
        "calib.jsonl:3:",
        "no string field \"text\"",
        "found keys: \"content\", \"id\"",
        "--text-column",
    ]);
    let p = s.file(
        "array.json",
        json!([{"text": "w1"}, {"body": "w2"}]).to_string(),
    );
    quantize(&s, &[&p], &[], &[]).fails(&["array.json: record 2", "found keys: \"body\""]);
}

#[test]
fn parquet_snappy_and_zstd() {
    let s = setup();
    let snappy = s.tmp.path().join("snappy.parquet");
    write_parquet(&snappy, &docs(25, 12), Compression::SNAPPY);
    let cal = quantize(&s, &[&snappy], &[], &[]).calibration();
    assert_eq!(cal["documents_read"], 25, "{cal}");
    let zstd = s.tmp.path().join("zstd.parquet");
    write_parquet(
        &zstd,
        &docs(7, 12),
        Compression::ZSTD(ZstdLevel::try_new(3).unwrap()),
    );
    let cal = quantize(&s, &[&zstd], &[], &[]).calibration();
    assert_eq!(cal["documents_read"], 7, "{cal}");
    quantize(&s, &[&zstd], &["--text-column", "body"], &[])
        .fails(&["zstd.parquet: row 1", "found keys: \"text\", \"id\""]);
}

#[test]
fn parquet_gzip_lz4_and_brotli() {
    let s = setup();
    for (name, codec, n) in [
        ("gzip", Compression::GZIP(GzipLevel::default()), 9),
        ("lz4", Compression::LZ4_RAW, 8),
        ("brotli", Compression::BROTLI(BrotliLevel::default()), 6),
    ] {
        let p = s.tmp.path().join(format!("{name}.parquet"));
        write_parquet(&p, &docs(n, 12), codec);
        let cal = quantize(&s, &[&p], &[], &[]).calibration();
        assert_eq!(cal["documents_read"], n, "{name}: {cal}");
    }
}

#[test]
fn null_text_is_skipped_and_counted_and_messages_column_wording() {
    let s = setup();
    let mut rows: Vec<Value> = docs(10, 12).iter().map(|t| json!({"text": t})).collect();
    rows.insert(2, json!({"text": null}));
    rows.push(json!({"text": null, "id": 7}));
    let p = s.file("nulls.jsonl", jsonl(&rows));
    let cal = quantize(&s, &[&p], &[], &[]).calibration();
    assert_eq!(cal["documents_read"], 10, "{cal}");
    assert_eq!(cal["documents_skipped"], 2, "{cal}");
    let plan = quantize_human(&s, &[&p], &[], &[]);
    assert_eq!(plan.code, 0, "{}", plan.stderr);
    assert!(
        plan.stdout
            .contains("10 of 10 documents, 2 null records skipped"),
        "{}",
        plan.stdout
    );
    // Only nulls: no documents, said so.
    let p = s.file("allnull.jsonl", jsonl(&[json!({"text": null})]));
    quantize(&s, &[&p], &[], &[])
        .fails(&["allnull.jsonl holds no documents", "1 record with a null"]);

    // --text-column messages on a file without it: no "string field" wording.
    let p = s.file("plain.jsonl", jsonl(&[json!({"text": "w1", "id": 1})]));
    let run = quantize(&s, &[&p], &["--text-column", "messages"], &[]);
    run.fails(&["plain.jsonl:1: no \"messages\" (or ShareGPT \"conversations\") list; found keys: \"text\", \"id\""]);
    assert!(!run.stderr.contains("string field"), "{}", run.stderr);
}

#[test]
fn malformed_chat_messages_are_named() {
    let s = setup();
    set_chat_template(&s.model);
    let good = json!({"messages": [{"role": "user", "content": "w1 w2"}]});
    let rows = [
        good.clone(),
        good.clone(),
        json!({"messages": [{"speaker": "human", "text": "hi"}]}),
    ];
    let p = s.file("calib.jsonl", jsonl(&rows));
    quantize(&s, &[&p], &[], &[]).fails(&[
        "calib.jsonl:3: message 1 has keys \"speaker\", \"text\"; expected \"role\" and \
         \"content\" (or ShareGPT's \"from\" and \"value\")",
    ]);
    let p = s.file(
        "who.jsonl",
        jsonl(&[json!({"conversations": [{"from": "narrator", "value": "hi"}]})]),
    );
    quantize(&s, &[&p], &[], &[]).fails(&["who.jsonl:1: message 1", "\"narrator\""]);
    let p = s.file(
        "image.jsonl",
        jsonl(&[json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})]),
    );
    quantize(&s, &[&p], &[], &[]).fails(&[
        "image.jsonl:1: message 1, content part 1",
        "\"image_url\"",
        "text",
    ]);

    // OpenAI-style content lists of text parts are joined: the same tokens as plain strings.
    let conv = |i: u64, parts: bool| {
        let (u, a) = (words(5, 64, i), words(5, 64, i + 100));
        let content = |t: String| {
            if parts {
                json!([{"type": "text", "text": t}])
            } else {
                json!(t)
            }
        };
        json!({"messages": [
            {"role": "user", "content": content(u)},
            {"role": "assistant", "content": content(a)},
        ]})
    };
    let strings: Vec<Value> = (0..12).map(|i| conv(i, false)).collect();
    let parts: Vec<Value> = (0..12).map(|i| conv(i, true)).collect();
    let a = quantize(&s, &[&s.file("strings.jsonl", jsonl(&strings))], &[], &[]).calibration();
    let b = quantize(&s, &[&s.file("parts.jsonl", jsonl(&parts))], &[], &[]).calibration();
    assert_eq!(b["documents_read"], 12, "{b}");
    assert_eq!(
        (a["tokens"].clone(), a["blocks"].clone()),
        (b["tokens"].clone(), b["blocks"].clone())
    );
}

#[test]
fn chat_messages_use_the_model_template() {
    let s = setup();
    let conv = |i: u64| {
        json!({"messages": [
            {"role": "user", "content": format!(" {} ", words(5, 64, i))},
            {"role": "assistant", "content": words(5, 64, i + 100)},
        ]})
    };
    let rows: Vec<Value> = (0..12).map(conv).collect();
    let p = s.file("chat.jsonl", jsonl(&rows));
    // No template in the model: refused, naming the first conversation.
    quantize(&s, &[&p], &[], &[]).fails(&["chat.jsonl:1", "chat template"]);

    set_chat_template(&s.model);
    let cal = quantize(&s, &[&p], &[], &[]).calibration();
    assert_eq!(cal["documents_read"], 12, "{cal}");
    // bos + 2 × (role + 5 words + eos) = 15 tokens a conversation, all used.
    assert_eq!(cal["documents_used"], 12, "{cal}");
    assert_eq!(cal["tokens"], 12 * 15 / 16 * 16, "{cal}");

    // The same conversations from parquet (list<struct<role, content>>).
    let convs: Vec<Vec<(&str, String)>> = (0..12)
        .map(|i| {
            vec![
                ("user", words(5, 64, i)),
                ("assistant", words(5, 64, i + 100)),
            ]
        })
        .collect();
    let pq = s.tmp.path().join("chat.parquet");
    write_chat_parquet(&pq, &convs);
    let cal2 = quantize(&s, &[&pq], &[], &[]).calibration();
    assert_eq!(cal2["tokens"], cal["tokens"], "{cal2}");

    // chat_template.jinja wins over tokenizer_config.json.
    std::fs::write(
        s.model.join("chat_template.jinja"),
        "{{ raise_exception('no chat here') }}",
    )
    .unwrap();
    quantize(&s, &[&p], &[], &[]).fails(&["chat.jsonl", "no chat here"]);
}

/// ShareGPT records (`conversations` of `{from, value}`) are read as chat: the same tokens as
/// the `messages` form of the same conversations.
#[test]
fn sharegpt_conversations_are_read_as_chat() {
    let s = setup();
    set_chat_template(&s.model);
    let rows = |sharegpt: bool| -> Vec<Value> {
        (0..12)
            .map(|i| {
                let (u, a) = (words(5, 64, i), words(5, 64, i + 100));
                if sharegpt {
                    json!({"id": i, "conversations": [
                        {"from": "human", "value": u},
                        {"from": "gpt", "value": a},
                    ]})
                } else {
                    json!({"messages": [
                        {"role": "user", "content": u},
                        {"role": "assistant", "content": a},
                    ]})
                }
            })
            .collect()
    };
    let chat = quantize(&s, &[&s.file("m.jsonl", jsonl(&rows(false)))], &[], &[]).calibration();
    let share = quantize(&s, &[&s.file("s.jsonl", jsonl(&rows(true)))], &[], &[]).calibration();
    assert_eq!(share["documents_read"], 12, "{share}");
    assert_eq!(share["tokens"], chat["tokens"], "{share}");
}

/// `.txt.gz`, `.jsonl.gz` and `.json.gz` read as their uncompressed twins.
#[test]
fn gzipped_calibration_files_are_read() {
    use std::io::Write;
    let s = setup();
    let texts = docs(20, 12);
    let gz = |name: &str, text: &str| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(text.as_bytes()).unwrap();
        s.file(name, e.finish().unwrap())
    };
    let rows: Vec<Value> = texts.iter().map(|t| json!({"text": t})).collect();
    let txt = texts.join("\n\n");
    let plain = quantize(&s, &[&s.file("c.txt", &txt)], &[], &[]).calibration();
    for (name, text) in [
        ("c.txt.gz", txt.clone()),
        ("c.jsonl.gz", jsonl(&rows)),
        ("c.json.gz", serde_json::to_string(&rows).unwrap()),
    ] {
        let cal = quantize(&s, &[&gz(name, &text)], &[], &[]).calibration();
        assert_eq!(cal["documents_read"], 20, "{name}: {cal}");
        assert_eq!(cal["tokens"], plain["tokens"], "{name}: {cal}");
    }
    // Not gzip inside: named.
    let bad = s.file("bad.txt.gz", [0x1f, 0x8b, 0, 1, 2, 3]);
    quantize(&s, &[&bad], &[], &[]).fails(&["bad.txt.gz", "gzip"]);
}

#[test]
fn unknown_extensions_are_sniffed_or_refused() {
    let s = setup();
    let rows: Vec<Value> = docs(9, 12).iter().map(|t| json!({"text": t})).collect();
    let lines = s.file("calib.data", jsonl(&rows));
    assert_eq!(
        quantize(&s, &[&lines], &[], &[]).calibration()["documents_read"],
        9
    );
    let array = s.file("calib.dump", serde_json::to_string(&docs(6, 12)).unwrap());
    assert_eq!(
        quantize(&s, &[&array], &[], &[]).calibration()["documents_read"],
        6
    );
    let text = s.file("calib.md", docs(5, 12).join("\n\n"));
    assert_eq!(
        quantize(&s, &[&text], &[], &[]).calibration()["documents_read"],
        5
    );
    let pq = s.tmp.path().join("calib.bin");
    write_parquet(&pq, &docs(4, 12), Compression::SNAPPY);
    assert_eq!(
        quantize(&s, &[&pq], &[], &[]).calibration()["documents_read"],
        4
    );

    let binary = s.file(
        "calib.bin",
        [0xff, 0xfe, 0x08, 0x00, 0xff, 0xfe, 0x00, 0x41],
    );
    quantize(&s, &[&binary], &[], &[]).fails(&[
        "calib.bin",
        "not UTF-8",
        ".txt",
        ".parquet",
        "org/name",
    ]);
    // A truncated gzip stream: named as gzip, with the formats read.
    let gz = s.file("calib.gz", [0x1f, 0x8b, 0x08, 0x00, 0xff, 0xfe, 0x00, 0x41]);
    quantize(&s, &[&gz], &[], &[]).fails(&["calib.gz", "not a readable gzip file", ".jsonl"]);
    let nul = s.file("calib.raw", b"w1 w2\0w3");
    quantize(&s, &[&nul], &[], &[]).fails(&["calib.raw", "binary"]);
    let broken = s.file("broken.parquet", b"PAR1 definitely not parquet PAR1");
    quantize(&s, &[&broken], &[], &[]).fails(&["broken.parquet", "parquet"]);
}

#[test]
fn too_long_documents_and_split_long() {
    let s = setup();
    let p = s.file("long.txt", docs(6, 40).join("\n\n"));
    quantize(&s, &[&p], &[], &[]).fails(&[
        "all 6",
        "longer than --seqlen 16",
        "larger --seqlen",
        "--split-long",
    ]);
    let cal = quantize(&s, &[&p], &["--split-long"], &[]).calibration();
    assert_eq!(cal["documents_split"], 6, "{cal}");
    assert_eq!(cal["documents_too_long"], 0, "{cal}");
    // 40 tokens → pieces of 16, 16, 8: three samples a document.
    assert_eq!(cal["documents_used"], 18, "{cal}");
    assert_eq!(cal["tokens"], 240 / 16 * 16, "{cal}");
    let cal = quantize(&s, &[&p], &["--split-long", "--n-samples", "4"], &[]).calibration();
    assert_eq!(cal["documents_used"], 4, "{cal}");
    // The human plan says pieces, not "18 of 6 documents".
    let plan = quantize_human(&s, &[&p], &["--split-long"], &[]);
    assert_eq!(plan.code, 0, "{}", plan.stderr);
    assert!(
        plan.stdout
            .contains("18 pieces from 6 documents, 6 split by --split-long"),
        "{}",
        plan.stdout
    );
}

#[test]
fn missing_file_exits_3_naming_it() {
    let s = setup();
    let missing = s.tmp.path().join("data/no-such-calib.txt");
    quantize(&s, &[&missing], &[], &[]).fails(&["no-such-calib.txt", "does not exist"]);
}

fn lay_out_dataset(hub: &Path, name: &str, revision_ref: &str, files: &[(&str, usize)]) {
    let repo = hub.join(format!("datasets--acme--{name}"));
    let refs = repo.join("refs").join(revision_ref);
    std::fs::create_dir_all(refs.parent().unwrap()).unwrap();
    std::fs::write(refs, COMMIT).unwrap();
    let snap = repo.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::write(snap.join("README.md"), "# dataset").unwrap();
    for (i, (file, n)) in files.iter().enumerate() {
        let texts: Vec<String> = (0..*n as u64)
            .map(|j| words(12, 64, 1000 * i as u64 + j))
            .collect();
        write_parquet(&snap.join(file), &texts, Compression::SNAPPY);
    }
}

#[test]
fn hub_dataset_from_the_cache_offline() {
    let s = setup();
    let hub = s.tmp.path().join("hub");
    lay_out_dataset(
        &hub,
        "calib",
        "main",
        &[
            ("data/train-00000-of-00002.parquet", 10),
            ("data/train-00001-of-00002.parquet", 5),
            ("data/validation-00000-of-00001.parquet", 8),
        ],
    );
    let env = [("HF_HUB_CACHE", hub.as_path())];
    let cal = quantize(&s, &[Path::new("acme/calib")], &[], &env).calibration();
    assert_eq!(cal["documents_read"], 15, "{cal}");
    assert_eq!(cal["source"], "acme/calib:train");
    let cal = quantize(&s, &[Path::new("acme/calib:validation")], &[], &env).calibration();
    assert_eq!(cal["documents_read"], 8, "{cal}");

    // Only the Hub's parquet conversion has the files; found through HF_HOME too.
    let home = s.tmp.path().join("hf-home");
    lay_out_dataset(
        &home.join("hub"),
        "converted",
        "refs/convert/parquet",
        &[("default/train/0000.parquet", 11)],
    );
    let env = [("HF_HOME", home.as_path())];
    let cal = quantize(&s, &[Path::new("acme/converted")], &[], &env).calibration();
    assert_eq!(cal["documents_read"], 11, "{cal}");

    // Offline and not cached: exit 3 naming the dataset, the split and HF_HUB_OFFLINE.
    quantize(&s, &[Path::new("acme/absent:test")], &[], &env).fails(&[
        "acme/absent:test",
        "HF_HUB_OFFLINE",
        "split test",
        "datasets--acme--absent",
    ]);
    quantize(
        &s,
        &[Path::new("acme/calib:test")],
        &[],
        &[("HF_HUB_CACHE", hub.as_path())],
    )
    .fails(&["acme/calib:test", "HF_HUB_OFFLINE"]);
}

#[test]
fn hub_dataset_network_errors_are_reported_as_such() {
    let s = setup();
    let hub = s.tmp.path().join("hub");
    std::fs::create_dir_all(&hub).unwrap();
    let online = |endpoint: &str, spec: &str| {
        quantize(
            &s,
            &[Path::new(spec)],
            &[],
            &[
                ("HF_HUB_OFFLINE", Path::new("0")),
                ("HF_HUB_CACHE", hub.as_path()),
                ("HF_ENDPOINT", Path::new(endpoint)),
            ],
        )
    };
    // Nothing listens on port 9 (discard): a connection error, not "no parquet files".
    let run = online(
        "http://127.0.0.1:9",
        "mit-han-lab/pile-val-backup:validation",
    );
    // A transient failure: exit 6, so that a job can retry exactly these.
    run.fails_with(
        6,
        &[
            "mit-han-lab/pile-val-backup:validation",
            "could not be listed",
            "Connection",
            "HF_HUB_OFFLINE=1",
            "local file",
        ],
    );
    assert!(!run.stderr.contains("no parquet files"), "{}", run.stderr);

    // The listing works but has no such split: then, and only then, "no parquet files".
    let endpoint = common::fake_hub(2, |path| {
        if path.ends_with("/revision/main") {
            let body = r#"{"sha": "0", "siblings": [{"rfilename": "data/train-0.parquet"}]}"#;
            (200, body.to_string())
        } else {
            (404, r#"{"error": "Revision not found"}"#.to_string())
        }
    });
    online(&endpoint, "acme/data:validation").fails(&[
        "acme/data:validation",
        "no parquet files of split validation",
    ]);
    // No such dataset: 404 (or 401) at every revision.
    let endpoint = common::fake_hub(2, |_| (404, r#"{"error": "Repository not found"}"#.into()));
    online(&endpoint, "acme/none").fails(&["Hub has no dataset acme/none", "HTTP 404", "HF_TOKEN"]);
    // A Hub failure is an error of its own, with its status.
    let endpoint = common::fake_hub(1, |_| (500, "{}".into()));
    online(&endpoint, "acme/data")
        .fails_with(6, &["could not be listed", "500", "HF_HUB_OFFLINE=1"]);
}

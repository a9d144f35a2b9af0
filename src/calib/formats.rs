//! Calibration file formats. Each reader turns a file into [`Record`]s, in file order:
//!
//! | format | detected by | a record is |
//! |---|---|---|
//! | plain text | `.txt`, or UTF-8 content that is not JSON | a block of lines ended by a blank line |
//! | JSON array | `.json` starting with `[` | a string, or an object (see below) |
//! | JSON lines | `.jsonl`/`.ndjson`, `.json` not starting with `[` | one object (or string) per line |
//! | parquet | `.parquet` or the `PAR1` magic | one row |
//!
//! An object's text is its `--text-column` field, a string. A `null` there (a missing value, as
//! parquet and pandas write it) makes the record [`Record::Skipped`]: it is not a document and is
//! counted apart (`documents_skipped`); an empty string is a document (AutoAWQ encodes it as the
//! tokenizer's special tokens alone); any other type is an error. When that field is absent and a
//! `messages` list (`{role, content}`, checked by [`super::chat::conversation`]) is present, or
//! the field *is* `messages`, the record is a conversation rendered later with the model's chat
//! template. Other extensions are sniffed; binary content is refused with the list of supported
//! formats. Every error is [`Error::Input`] naming the file and the line, record or row.

use std::io::Read;
use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::input_err;

/// What `--calib` accepts, for error messages and help.
pub const SUPPORTED: &str =
    ".txt (documents separated by blank lines), .json (an array of strings \
     or objects), .jsonl (one object per line), each also gzipped (.gz), .parquet, or a Hub \
     dataset id org/name[:split]";

/// The field holding a conversation (a list of `{role, content}` objects).
pub const MESSAGES: &str = "messages";
/// ShareGPT's field for a conversation (a list of `{from, value}` objects).
pub const CONVERSATIONS: &str = "conversations";

/// One calibration record before tokenization.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// Plain text, encoded as is (stripped, with the tokenizer's special tokens).
    Text(String),
    /// A conversation, rendered with the model's chat template; `origin` (`file:line` or
    /// `file: record N`) locates it in error messages.
    Chat { messages: Value, origin: String },
    /// A record whose text field is `null`: read, but not a document.
    Skipped,
}

/// A calibration file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Documents separated by blank (whitespace-only) lines.
    Text,
    /// One JSON array of strings or objects.
    JsonArray,
    /// One JSON value (an object, or a string) per non-blank line.
    JsonLines,
    /// Apache Parquet, one record per row.
    Parquet,
}

/// Reads the records of one calibration file, the format chosen by extension or content. A
/// gzip file (`.txt.gz`, `.jsonl.gz`, `.json.gz`, or the gzip magic) is decompressed in memory
/// and read by the extension under `.gz`.
pub fn read_file(path: &Path, column: &str) -> Result<Vec<Record>> {
    let head = read_head(path)?;
    if extension(path) == "parquet" || head.starts_with(b"PAR1") {
        return parquet_records(path, column);
    }
    let bytes = std::fs::read(path).map_err(|e| Error::input_io(path, e))?;
    let (bytes, inner) = if head.starts_with(&GZIP_MAGIC) {
        (gunzip(path, &bytes)?, path.with_extension(""))
    } else if extension(path) == "gz" {
        return Err(input_err!(
            "{} is named .gz but is not gzip data; rename it without .gz, or compress it",
            path.display()
        ));
    } else {
        (bytes, path.to_path_buf())
    };
    let text = utf8(path, &bytes)?;
    let name = path.display().to_string();
    match detect(&inner, text) {
        Format::Text => Ok(txt_documents(text).into_iter().map(Record::Text).collect()),
        Format::JsonArray => json_array_records(&name, text, column),
        Format::JsonLines => jsonl_records(&name, text, column),
        Format::Parquet => parquet_records(path, column),
    }
}

/// The first bytes of a gzip stream (RFC 1952).
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// The decompressed bytes of a gzip file (all members, as `zcat` reads them).
fn gunzip(path: &Path, bytes: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(bytes)
        .read_to_end(&mut out)
        .map_err(|e| {
            input_err!(
                "{}: not a readable gzip file: {e}; supported: {SUPPORTED}",
                path.display()
            )
        })?;
    Ok(out)
}

fn read_head(path: &Path) -> Result<Vec<u8>> {
    let mut head = Vec::with_capacity(4);
    std::fs::File::open(path)
        .and_then(|f| f.take(4).read_to_end(&mut head))
        .map_err(|e| Error::input_io(path, e))?;
    Ok(head)
}

fn extension(path: &Path) -> String {
    path.extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default()
}

/// The text of a non-parquet file (a UTF-8 byte-order mark dropped); binary content is refused
/// with the supported formats.
fn utf8<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a str> {
    let refuse = |why: String| {
        input_err!(
            "{} is not a supported calibration file ({why}); supported: {SUPPORTED}",
            path.display()
        )
    };
    let text = std::str::from_utf8(bytes)
        .map_err(|e| refuse(format!("not UTF-8 text at byte {}", e.valid_up_to())))?;
    match text.find('\0') {
        Some(at) => Err(refuse(format!("binary content: a NUL byte at {at}"))),
        None => Ok(text.strip_prefix('\u{feff}').unwrap_or(text)),
    }
}

/// The format of a UTF-8 file: by extension, else sniffed from the content.
pub fn detect(path: &Path, text: &str) -> Format {
    let starts_array = text.trim_start().starts_with('[');
    match extension(path).as_str() {
        "txt" => Format::Text,
        "jsonl" | "ndjson" => Format::JsonLines,
        "json" if starts_array => Format::JsonArray,
        "json" => Format::JsonLines,
        _ if starts_array && serde_json::from_str::<Vec<Value>>(text).is_ok() => Format::JsonArray,
        _ => {
            let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            match serde_json::from_str::<Value>(first) {
                Ok(Value::Object(_)) => Format::JsonLines,
                _ => Format::Text,
            }
        }
    }
}

/// Documents separated by blank (whitespace-only) lines.
pub fn txt_documents(text: &str) -> Vec<String> {
    let mut docs = Vec::new();
    let mut cur: Vec<&str> = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            if !cur.is_empty() {
                docs.push(cur.join("\n"));
                cur.clear();
            }
        } else {
            cur.push(line);
        }
    }
    if !cur.is_empty() {
        docs.push(cur.join("\n"));
    }
    docs
}

/// One record per non-blank line; errors name `name:line`.
pub fn jsonl_records(name: &str, text: &str, column: &str) -> Result<Vec<Record>> {
    let mut records = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let origin = || format!("{name}:{}", n + 1);
        let v: Value = serde_json::from_str(line).map_err(|e| {
            input_err!(
                "{}: not valid JSON ({e}); expected one object per line",
                origin()
            )
        })?;
        records.push(record(&v, column, &origin)?);
    }
    Ok(records)
}

/// One record per element of a JSON array; errors name `name: record N` (1-based).
pub fn json_array_records(name: &str, text: &str, column: &str) -> Result<Vec<Record>> {
    let items: Vec<Value> = serde_json::from_str(text).map_err(|e| {
        input_err!("{name}: not a valid JSON array ({e}); expected [\"text\", ...] or [{{\"{column}\": \"text\"}}, ...]")
    })?;
    items
        .iter()
        .enumerate()
        .map(|(i, v)| record(v, column, &|| format!("{name}: record {}", i + 1)))
        .collect()
}

/// A string, or an object's `column` field, or its `messages` conversation (validated, OpenAI
/// content lists joined); a `null` field is [`Record::Skipped`].
pub fn record(v: &Value, column: &str, origin: &dyn Fn() -> String) -> Result<Record> {
    match v {
        Value::String(s) => Ok(Record::Text(s.clone())),
        Value::Object(map) => object_record(map, column, origin),
        other => Err(input_err!(
            "{}: expected an object or a string, found {}",
            origin(),
            kind(other)
        )),
    }
}

fn object_record(
    map: &Map<String, Value>,
    column: &str,
    origin: &dyn Fn() -> String,
) -> Result<Record> {
    match map.get(column) {
        Some(Value::String(s)) => return Ok(Record::Text(s.clone())),
        Some(Value::Null) => return Ok(Record::Skipped),
        Some(Value::Array(_)) if column == MESSAGES => {}
        Some(other) => {
            return Err(input_err!(
            "{}: field {column:?} is {}, not a string (choose the text field with --text-column)",
            origin(),
            kind(other)
        ))
        }
        None => {}
    }
    match map.get(MESSAGES).or_else(|| map.get(CONVERSATIONS)) {
        Some(Value::Array(list)) => {
            let origin = origin();
            Ok(Record::Chat {
                messages: super::chat::conversation(list, &origin)?,
                origin,
            })
        }
        _ => {
            let found = match key_list(map) {
                keys if keys.is_empty() => "no keys".to_string(),
                keys => format!("keys: {keys}"),
            };
            let missing = if column == MESSAGES {
                format!("no {MESSAGES:?} (or ShareGPT {CONVERSATIONS:?}) list")
            } else {
                format!(
                    "no string field {column:?} and no {MESSAGES:?} (or ShareGPT \
                     {CONVERSATIONS:?}) list"
                )
            };
            Err(input_err!(
                "{}: {missing}; found {found} (choose with --text-column)",
                origin()
            ))
        }
    }
}

/// The keys of an object, quoted and comma separated, in file order (empty when none).
pub fn key_list(map: &Map<String, Value>) -> String {
    let keys: Vec<String> = map.keys().map(|k| format!("{k:?}")).collect();
    keys.join(", ")
}

/// The JSON type of a value, with its article, for error messages ("a number", "null").
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The parquet compression codecs this build reads.
pub const PARQUET_CODECS: &str = "uncompressed, snappy, gzip, lz4, zstd and brotli";

/// One record per row of a parquet file (any codec of [`PARQUET_CODECS`]; LZO or a codec of a
/// newer format is an error naming the file and the supported codecs). A malformed file is an
/// error, never a panic (the reader runs under `catch_unwind`).
pub fn parquet_records(path: &Path, column: &str) -> Result<Vec<Record>> {
    let read = std::panic::AssertUnwindSafe(|| parquet_rows(path, column));
    std::panic::catch_unwind(read).unwrap_or_else(|_| {
        Err(input_err!(
            "{}: not a readable parquet file (the reader failed on malformed data)",
            path.display()
        ))
    })
}

fn parquet_rows(path: &Path, column: &str) -> Result<Vec<Record>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let bad = |e| parquet_error(path, e);
    let file = std::fs::File::open(path).map_err(|e| Error::input_io(path, e))?;
    let reader = SerializedFileReader::new(file).map_err(bad)?;
    let name = path.display().to_string();
    let mut records = Vec::new();
    for (i, row) in reader.get_row_iter(None).map_err(bad)?.enumerate() {
        let row = row.map_err(bad)?;
        let object = Value::Object(row_object(&row, &[column, MESSAGES, CONVERSATIONS]));
        records.push(record(&object, column, &|| {
            format!("{name}: row {}", i + 1)
        })?);
    }
    Ok(records)
}

/// A parquet reader error as an input error naming the file; a codec this build lacks (LZO, or
/// a feature left out) names the supported codecs.
fn parquet_error(path: &Path, e: parquet::errors::ParquetError) -> Error {
    let msg = e.to_string();
    if msg.contains("Disabled feature") || msg.contains("codec") {
        input_err!(
            "{}: the parquet file uses a compression codec this build cannot read ({msg}); \
             supported: {PARQUET_CODECS}; rewrite it with one of them \
             (e.g. pyarrow.parquet.write_table(table, path, compression=\"zstd\"))",
            path.display()
        )
    } else {
        input_err!("{}: not a readable parquet file: {msg}", path.display())
    }
}

/// A row as a JSON object: every column's key, values only for `wanted` columns (others null).
fn row_object(row: &parquet::record::Row, wanted: &[&str]) -> Map<String, Value> {
    row.get_column_iter()
        .map(|(k, f)| {
            let v = if wanted.contains(&k.as_str()) {
                field_json(f)
            } else {
                Value::Null
            };
            (k.clone(), v)
        })
        .collect()
}

fn field_json(f: &parquet::record::Field) -> Value {
    use parquet::record::Field as F;
    match f {
        F::Null => Value::Null,
        F::Str(s) => Value::String(s.clone()),
        F::Bytes(b) => std::str::from_utf8(b.data()).map_or(Value::Null, |s| s.into()),
        F::Bool(b) => Value::Bool(*b),
        F::Group(row) => Value::Object(
            row.get_column_iter()
                .map(|(k, f)| (k.clone(), field_json(f)))
                .collect(),
        ),
        F::ListInternal(list) => Value::Array(list.elements().iter().map(field_json).collect()),
        F::MapInternal(map) => Value::Object(
            map.entries()
                .iter()
                .map(|(k, v)| (field_text(k), field_json(v)))
                .collect(),
        ),
        F::Byte(_) | F::Short(_) | F::Int(_) | F::Long(_) | F::UByte(_) | F::UShort(_) => number(f),
        F::UInt(_) | F::ULong(_) | F::Float(_) | F::Double(_) => number(f),
        other => Value::String(other.to_string()),
    }
}

fn number(f: &parquet::record::Field) -> Value {
    serde_json::from_str(&f.to_string()).unwrap_or(Value::Null)
}

fn field_text(f: &parquet::record::Field) -> String {
    match f {
        parquet::record::Field::Str(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_detected_by_extension_then_content() {
        let p = Path::new;
        assert_eq!(detect(p("a.txt"), "{\"text\": 1}"), Format::Text);
        assert_eq!(detect(p("a.json"), " [\"x\"]"), Format::JsonArray);
        assert_eq!(detect(p("a.json"), "{\"text\": \"x\"}"), Format::JsonLines);
        assert_eq!(detect(p("a.dat"), "[\"x\", {}]"), Format::JsonArray);
        assert_eq!(
            detect(p("a.dat"), "\n{\"a\": 1}\n{\"a\": 2}"),
            Format::JsonLines
        );
        assert_eq!(detect(p("a"), "[not json] words"), Format::Text);
        assert_eq!(detect(p("a.md"), "# title\n\nbody"), Format::Text);
    }

    #[test]
    fn records_take_the_column_or_the_messages() {
        let origin = || "f:1".to_string();
        let text = |v: Value| record(&v, "body", &origin).unwrap();
        assert_eq!(text(serde_json::json!("s")), Record::Text("s".into()));
        assert_eq!(
            text(serde_json::json!({"body": "b", "messages": []})),
            Record::Text("b".into())
        );
        assert_eq!(text(serde_json::json!({"body": null})), Record::Skipped);
        assert_eq!(
            text(serde_json::json!({"body": ""})),
            Record::Text(String::new())
        );
        // --text-column messages: the conversation, or an error without the string-field part.
        let chat = record(
            &serde_json::json!({"messages": [{"role": "user", "content": "hi"}]}),
            MESSAGES,
            &origin,
        )
        .unwrap();
        assert!(matches!(chat, Record::Chat { .. }));
        let err = record(&serde_json::json!({"text": "t"}), MESSAGES, &origin).unwrap_err();
        assert_eq!(
            err.to_string(),
            "f:1: no \"messages\" (or ShareGPT \"conversations\") list; found keys: \"text\" (choose with --text-column)"
        );
        let chat = text(serde_json::json!({"messages": [{"role": "user", "content": "hi"}]}));
        assert!(matches!(chat, Record::Chat { ref origin, .. } if origin == "f:1"));
        let err = record(&serde_json::json!({"b": 1, "a": 2}), "body", &origin).unwrap_err();
        assert!(
            err.to_string().contains("found keys: \"b\", \"a\""),
            "{err}"
        );
        let err = record(&serde_json::json!({"body": 3}), "body", &origin).unwrap_err();
        assert!(err.to_string().contains("is a number"), "{err}");
        assert!(record(&serde_json::json!(3), "body", &origin).is_err());
        let err = record(&serde_json::json!({}), "body", &origin).unwrap_err();
        assert!(err.to_string().contains("found no keys"), "{err}");
    }

    #[test]
    fn unsupported_parquet_codecs_name_the_supported_ones() {
        use parquet::errors::ParquetError;
        for e in [
            ParquetError::NYI("The codec type LZO is not supported yet".into()),
            ParquetError::General("Disabled feature at compile time: flate2".into()),
        ] {
            let err = parquet_error(Path::new("d/x.parquet"), e);
            let msg = err.to_string();
            assert!(matches!(err, Error::Input(_)), "{msg}");
            assert!(
                msg.starts_with("d/x.parquet: the parquet file uses a compression codec")
                    && msg.contains(PARQUET_CODECS),
                "{msg}"
            );
        }
        let msg = parquet_error(Path::new("x.parquet"), ParquetError::EOF("short".into()));
        assert!(msg.to_string().contains("not a readable parquet file"));
    }

    #[test]
    fn json_errors_name_line_or_record() {
        let err = jsonl_records("c.jsonl", "{\"text\": \"a\"}\n\n{oops", "text").unwrap_err();
        assert!(
            err.to_string().starts_with("c.jsonl:3: not valid JSON"),
            "{err}"
        );
        let err = json_array_records("c.json", "[\"a\", 7]", "text").unwrap_err();
        assert!(err.to_string().starts_with("c.json: record 2"), "{err}");
        let docs = json_array_records("c.json", "[\"a\", {\"text\": \"b\"}]", "text").unwrap();
        assert_eq!(
            docs,
            vec![Record::Text("a".into()), Record::Text("b".into())]
        );
    }
}

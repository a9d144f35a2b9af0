//! Shared helpers for integration tests: the real test model's path, fixture loading, and tiny
//! random-weight model directories written by the tests themselves.
#![allow(dead_code)]

/// `family_tests!(check: llama, gemma, …)`: one `#[test]` per family, each calling
/// `check("<family>")` on the fixture of that name.
#[macro_export]
macro_rules! family_tests {
    ($check:ident: $($family:ident),* $(,)?) => {
        $(
            #[test]
            fn $family() {
                $check(stringify!($family));
            }
        )*
    };
}

pub mod case;
pub mod tiny;

use std::path::{Path, PathBuf};

/// `AWQ_TEST_MODEL`, or `None` after saying that the test is skipped.
pub fn test_model(test: &str) -> Option<PathBuf> {
    match std::env::var_os("AWQ_TEST_MODEL") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            eprintln!("{test}: skipped (set AWQ_TEST_MODEL to the SmolLM2 test model directory)");
            None
        }
    }
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A data file vendored in the repository's `data/` (WikiText-2 validation text).
pub fn data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data").join(rel)
}

/// `awq eval --json` of `model` on the first `max_tokens` tokens of `wiki.valid.raw` in windows
/// of `seqlen`: the perplexity (the command must succeed).
pub fn perplexity(model: &Path, seqlen: usize, max_tokens: usize) -> f64 {
    let o = std::process::Command::new(assert_cmd::cargo::cargo_bin("awq"))
        .args(["eval", "-q", "--json", "--seqlen", &seqlen.to_string()])
        .args(["--max-tokens", &max_tokens.to_string(), "--text"])
        .arg(data("wikitext-2-raw/wiki.valid.raw"))
        .arg("--model")
        .arg(model)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["perplexity"].as_f64().unwrap()
}

/// A tensor of a safetensors file as f32 (F32/F16/BF16) or as i64 values (I64/I32), with its shape.
pub fn read_f32(bytes: &[u8], name: &str) -> (Vec<f32>, Vec<usize>) {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let t = st
        .tensor(name)
        .unwrap_or_else(|_| panic!("fixture tensor {name}"));
    let data = t.data();
    let v = match t.dtype() {
        safetensors::Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        safetensors::Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        safetensors::Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        d => panic!("{name}: unexpected dtype {d:?}"),
    };
    (v, t.shape().to_vec())
}

pub fn read_i64(bytes: &[u8], name: &str) -> Vec<i64> {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let t = st.tensor(name).unwrap();
    match t.dtype() {
        safetensors::Dtype::I64 => t
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        safetensors::Dtype::I32 => t
            .data()
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as i64)
            .collect(),
        d => panic!("{name}: unexpected dtype {d:?}"),
    }
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn max_abs(a: &[f32]) -> f32 {
    a.iter().fold(0.0, |m, x| m.max(x.abs()))
}

/// Raw bytes, shape and dtype of a fixture tensor.
pub fn raw(bytes: &[u8], name: &str) -> (Vec<u8>, Vec<usize>, safetensors::Dtype) {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let t = st
        .tensor(name)
        .unwrap_or_else(|_| panic!("fixture tensor {name}"));
    (t.data().to_vec(), t.shape().to_vec(), t.dtype())
}

pub fn read_i32(bytes: &[u8], name: &str) -> Vec<i32> {
    raw(bytes, name)
        .0
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

pub fn read_f16_bits(bytes: &[u8], name: &str) -> Vec<u16> {
    raw(bytes, name)
        .0
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect()
}

/// Rewrites a file's bytes in place.
pub fn rewrite_safetensors(path: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = std::fs::read(path).unwrap();
    f(&mut bytes);
    std::fs::write(path, bytes).unwrap();
}

pub fn header_len(bytes: &[u8]) -> usize {
    u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
}

/// Replaces the JSON header of a safetensors file (padding with spaces keeps offsets valid).
pub fn edit_header(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    rewrite_safetensors(path, |bytes| {
        let n = header_len(bytes);
        let mut h: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        f(&mut h);
        let mut text = h.to_string().into_bytes();
        assert!(text.len() <= n, "edited header grew");
        text.resize(n, b' ');
        bytes[8..8 + n].copy_from_slice(&text);
    });
}

/// Sets element `index` of tensor `name` (F32 in the tiny model) to `value`.
pub fn poke_f32(path: &Path, name: &str, index: usize, value: f32) {
    rewrite_safetensors(path, |bytes| {
        let n = header_len(bytes);
        let h: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        let start = h[name]["data_offsets"][0].as_u64().unwrap() as usize + 8 + n + 4 * index;
        bytes[start..start + 4].copy_from_slice(&value.to_le_bytes());
    });
}

/// Sets element `index` of tensor `name` (BF16, as the Gemma goldens store it) to `value`.
pub fn poke_bf16(path: &Path, name: &str, index: usize, value: f32) {
    rewrite_safetensors(path, |bytes| {
        let n = header_len(bytes);
        let h: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        assert_eq!(h[name]["dtype"], "BF16", "{name}");
        let start = h[name]["data_offsets"][0].as_u64().unwrap() as usize + 8 + n + 2 * index;
        let bits = half::bf16::from_f32(value).to_bits();
        bytes[start..start + 2].copy_from_slice(&bits.to_le_bytes());
    });
}

/// A copy of a directory's files (one level) in `dst`.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

/// A loopback stand-in for the Hub API: answers each request with `answer(path)` (status, JSON
/// body) until `count` requests or 60 seconds, whichever comes first. Returns its endpoint.
pub fn fake_hub(count: usize, answer: fn(&str) -> (u16, String)) -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut served = 0;
        while served < count && std::time::Instant::now() < deadline {
            let Ok((stream, _)) = listener.accept() else {
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            };
            served += 1;
            stream.set_nonblocking(false).unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            reader.read_line(&mut request).unwrap();
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 2 {
                line.clear();
            }
            let path = request.split_whitespace().nth(1).unwrap_or("").to_string();
            let (status, body) = answer(&path);
            let mut stream = stream;
            let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    url
}

/// Every file of `dir` but the report (it holds timings), with its bytes, sorted by name;
/// none when `dir` is absent. What "the same checkpoint" compares.
pub fn files_but_report(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<(String, Vec<u8>)> = entries
        .map(|e| e.unwrap())
        .filter(|e| e.file_name() != "quantization_report.json")
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).unwrap())
        })
        .collect();
    v.sort();
    v
}

//! Parsers under stress: random and mutated bytes fed to the config, calibration
//! (txt/json/jsonl/parquet/sniffed) and safetensors header readers never panic; invalid input is
//! an error.

mod common;

use std::path::PathBuf;

use awq::calib::{read_documents, CalibOptions};
use awq::io::reader::Checkpoint;
use proptest::prelude::*;

fn write_tmp(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn valid_model() -> (tempfile::TempDir, Vec<u8>, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    common::tiny::Tiny::llama().write(dir.path());
    let st = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let cfg = std::fs::read(dir.path().join("config.json")).unwrap();
    (dir, st, cfg)
}

/// Applies `edits` (position, byte) to a copy of `base`, positions taken modulo `limit`.
fn mutate(base: &[u8], edits: &[(usize, u8)], limit: usize) -> Vec<u8> {
    let mut b = base.to_vec();
    for &(pos, byte) in edits {
        let i = pos % limit.min(b.len()).max(1);
        b[i] = byte;
    }
    b
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn config_reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400),
                                  edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6)) {
        let (dir, _, cfg) = valid_model();
        let p = write_tmp(&dir, "config.json", &bytes);
        prop_assert!(awq::model::load_spec(&p).is_err() || !bytes.is_empty());
        let p = write_tmp(&dir, "config.json", &mutate(&cfg, &edits, cfg.len()));
        let _ = awq::model::load_spec(&p);
    }

    #[test]
    fn calibration_readers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let dir = tempfile::tempdir().unwrap();
        let mut parquetish = b"PAR1".to_vec();
        parquetish.extend_from_slice(&bytes);
        parquetish.extend_from_slice(b"PAR1");
        for (name, content) in [("c.txt", &bytes), ("c.jsonl", &bytes), ("c.json", &bytes),
                                ("c.dat", &bytes), ("c.parquet", &bytes), ("p.dat", &parquetish)] {
            let p = write_tmp(&dir, name, content);
            let opts = CalibOptions {
                files: vec![p],
                text_column: "text".into(),
                n_samples: 128,
                seqlen: 512,
                seed: 42,
                max_blocks: None,
                split_long: false,
            };
            if let Ok(docs) = read_documents(&opts) {
                prop_assert!(!docs.is_empty());
            }
        }
    }

    #[test]
    fn safetensors_reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300),
                                       edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let (dir, st, _) = valid_model();
        let p = write_tmp(&dir, "random.safetensors", &bytes);
        prop_assert!(Checkpoint::open_files(vec![p]).is_err() || bytes.len() >= 8);
        // Mutations inside the length prefix and the JSON header.
        let header_end = 8 + u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
        let p = write_tmp(&dir, "mutated.safetensors", &mutate(&st, &edits, header_end));
        if let Ok(ckpt) = Checkpoint::open_files(vec![p]) {
            // Whatever was accepted reads back without panicking.
            for name in ckpt.names() {
                let m = ckpt.meta(name).unwrap().clone();
                let _ = ckpt.f32(name, &m.shape);
            }
        }
    }
}

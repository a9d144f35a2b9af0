//! The embedded default corpus against the floor, measured with the test model's
//! tokenizer: ≥ 150 documents, ≥ 40 000 tokens, every category present, and every document
//! short enough for the default --seqlen 512 (so AutoAWQ's selection drops none).

mod common;

use awq::calib::{self, corpus, CalibOptions};

#[test]
fn default_corpus_size_and_coverage() {
    let Some(model) = common::test_model("default_corpus_size_and_coverage") else {
        return;
    };
    let tok = awq::tokenize::load(&model).unwrap();
    let docs = corpus::documents();
    assert!(docs.len() >= 150, "{} documents", docs.len());
    let mut per_category = std::collections::BTreeMap::<&str, (usize, usize)>::new();
    let mut total = 0;
    let mut too_long = Vec::new();
    for (cat, doc) in &docs {
        let n = awq::tokenize::encode(&tok, doc.trim(), true).unwrap().len();
        if n > 512 {
            too_long.push(format!("{cat} ({n} tokens): {:.40}", doc));
        }
        let e = per_category.entry(cat).or_default();
        e.0 += 1;
        e.1 += n;
        total += n;
    }
    eprintln!("{} documents, {total} tokens: {per_category:?}", docs.len());
    assert!(too_long.is_empty(), "longer than 512 tokens: {too_long:#?}");
    assert!(total >= 40_000, "{total} tokens");
    for cat in [
        "prose",
        "dialogue",
        "techdocs",
        "code",
        "math",
        "multilingual",
        "generated",
    ] {
        assert!(per_category.contains_key(cat), "{cat}");
    }

    // With no --calib the corpus is what calibration builds from, with AutoAWQ's defaults.
    let opts = CalibOptions {
        files: vec![],
        text_column: "text".into(),
        n_samples: 128,
        seqlen: 512,
        seed: 42,
        max_blocks: None,
        split_long: false,
    };
    let cal = calib::build(&tok, &opts, None).unwrap();
    assert_eq!(cal.summary.documents_read, docs.len());
    assert_eq!(cal.summary.documents_used, 128);
    assert_eq!(cal.summary.documents_too_long, 0);
    assert!(cal.summary.source.starts_with("embedded corpus"));
    eprintln!("defaults: {:?}", cal.summary);
}

//! The forward pass on the real test model against transformers' float32 forward
//! (`../shared/golden/smollm2/forward.safetensors`, copied into tests/fixtures), with the
//! tolerances of golden/smollm2/README.md.

mod common;

use awq::model::rope::Rope;
use awq::model::Model;
use common::*;

#[test]
fn forward_matches_transformers() {
    let Some(dir) = test_model("forward_matches_transformers") else {
        return;
    };
    let golden = std::fs::read(fixture("forward.safetensors")).unwrap();
    let ids: Vec<u32> = read_i64(&golden, "input_ids")
        .iter()
        .map(|&i| i as u32)
        .collect();
    assert_eq!(ids.len(), 20);

    // The tokenizer reproduces the golden ids for the documented prompt.
    let tok = awq::tokenize::load(&dir).unwrap();
    let prompt = "The small town library opened a new reading room last spring, and students now study there every afternoon.";
    assert_eq!(awq::tokenize::encode(&tok, prompt, false).unwrap(), ids);

    let model = Model::open(&dir).unwrap();
    let spec = &model.spec;
    let rope = Rope::new(spec, ids.len()).unwrap();
    let mut h = model.embed(&ids).unwrap();
    let (want, _) = read_f32(&golden, "hidden.embed");
    assert_eq!(
        h.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        want,
        "embedding must be bit-exact"
    );

    for i in 0..spec.layers {
        let layer = model.layer(i).unwrap();
        h = layer.forward(spec, &rope, &h, ids.len(), false).unwrap().0;
        let got = h.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (want, _) = read_f32(&golden, &format!("hidden.layer.{i}"));
        let diff = max_abs_diff(&got, &want);
        assert!(
            diff <= 1e-4 * max_abs(&want),
            "layer {i}: max |diff| {diff} vs max |ref| {}",
            max_abs(&want)
        );
    }

    let norm = model.final_norm().unwrap().apply(spec, &h).unwrap();
    let (want, _) = read_f32(&golden, "hidden.final_norm");
    let got = norm.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(
        max_abs_diff(&got, &want) <= 1e-3,
        "final norm diff {}",
        max_abs_diff(&got, &want)
    );

    let logits = norm.matmul(&model.lm_head().unwrap().t().unwrap()).unwrap();
    let rows = logits.to_vec2::<f32>().unwrap();
    let (last, _) = read_f32(&golden, "logits.last");
    assert!(
        max_abs_diff(&rows[19], &last) <= 1e-3,
        "last logits diff {}",
        max_abs_diff(&rows[19], &last)
    );

    let (top_vals, _) = read_f32(&golden, "logits.top20.values");
    let top_ids = read_i64(&golden, "logits.top20.ids");
    for (pos, row) in rows.iter().enumerate() {
        let argmax = row
            .iter()
            .enumerate()
            .fold(0, |b, (j, &x)| if x > row[b] { j } else { b });
        assert_eq!(argmax as i64, top_ids[pos * 20], "argmax at position {pos}");
        for k in 0..20 {
            let id = top_ids[pos * 20 + k] as usize;
            assert!(
                (row[id] - top_vals[pos * 20 + k]).abs() <= 1e-3,
                "logit {id} at position {pos}"
            );
        }
    }

    // Next-token NLL per position.
    let (want_nll, _) = read_f32(&golden, "nll.next_token");
    for t in 0..19 {
        let nll = awq::eval::nll_sum(&logits.narrow(0, t, 1).unwrap(), &ids[t + 1..t + 2]).unwrap();
        assert!(
            (nll as f32 - want_nll[t]).abs() <= 1e-4,
            "nll at {t}: {nll} vs {}",
            want_nll[t]
        );
    }
}

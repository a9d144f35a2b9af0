//! Shared by the examples that write a "requantized" copy of a model: every tensor read as f32,
//! the decoder linears passed through a rounding, all stored back as float16 beside the
//! source's other files (config, tokenizer).

use std::path::Path;

use awq::io::writer::{write_file, OutTensor};
use awq::model::Model;

/// Writes `out/model.safetensors` from the model at `src`, with each quantized linear's
/// `[rows, cols]` weight (row-major f32) passed through `round(name, cols, weight)` first,
/// and copies the source's non-weight files.
pub fn rewrite_linears(src: &Path, out: &Path, mut round: impl FnMut(&str, usize, &mut [f32])) {
    let model = Model::open(src).unwrap();
    std::fs::create_dir_all(out).unwrap();
    let mut tensors = Vec::new();
    for (name, quantized) in model.tensor_roles() {
        let shape = model.ckpt.meta(&name).unwrap().shape.clone();
        let mut w = model
            .ckpt
            .f32(&name, &shape)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        if quantized {
            round(&name, shape[1], &mut w);
        }
        tensors.push(OutTensor::f16(name, shape, &w));
    }
    write_file(&out.join("model.safetensors"), &tensors).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !name.ends_with(".safetensors") && !name.ends_with(".index.json") && path.is_file() {
            std::fs::copy(&path, out.join(&name)).unwrap();
        }
    }
}

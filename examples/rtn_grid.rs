//! Writes a copy of a model whose decoder linears have been rounded to a round-to-nearest grid
//! (4-bit, zero point, the given group size) and stored back as float16: a "requantized" model,
//! like one dequantized from a GGUF or an earlier AWQ checkpoint. The quality matrix
//! (`scripts/quality.sh`) quantizes such a copy again to check that the result is never worse
//! than round-to-nearest.
//!
//! `cargo run --release --example rtn_grid -- MODEL_DIR OUT_DIR GROUP`

use std::path::Path;

use awq::io::writer::{write_file, OutTensor};
use awq::model::Model;
use awq::quant::rtn;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 3 {
        eprintln!("usage: rtn_grid MODEL_DIR OUT_DIR GROUP");
        std::process::exit(2);
    }
    let (src, out) = (Path::new(&args[0]), Path::new(&args[1]));
    let group: usize = args[2].parse().expect("GROUP");
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
            let (rows, cols) = (shape[0], shape[1]);
            w = rtn::quantize_f16(&w, rows, cols, group).dequantize();
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
    eprintln!(
        "wrote {} (linears on a group-{group} RTN grid)",
        out.display()
    );
}

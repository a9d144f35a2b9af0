//! Writes a copy of a model whose decoder linears have been rounded to a round-to-nearest grid
//! (4-bit, zero point, the given group size) and stored back as float16: a "requantized" model,
//! like one dequantized from a GGUF or an earlier AWQ checkpoint. The quality matrix
//! (`scripts/quality.sh`) quantizes such a copy again to check that the result is never worse
//! than round-to-nearest.
//!
//! `cargo run --release --example rtn_grid -- MODEL_DIR OUT_DIR GROUP`

use std::path::Path;

use awq::quant::rtn;

mod common;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 3 {
        eprintln!("usage: rtn_grid MODEL_DIR OUT_DIR GROUP");
        std::process::exit(2);
    }
    let (src, out) = (Path::new(&args[0]), Path::new(&args[1]));
    let group: usize = args[2].parse().expect("GROUP");
    common::rewrite_linears(src, out, |_, cols, w| {
        let rows = w.len() / cols;
        let q = rtn::quantize_f16(w, rows, cols, group).dequantize();
        w.copy_from_slice(&q);
    });
    eprintln!(
        "wrote {} (linears on a group-{group} RTN grid)",
        out.display()
    );
}

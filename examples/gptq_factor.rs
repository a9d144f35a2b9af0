//! Times error feedback's pieces at a given input width: the factor of `H = XᵀX` (one per
//! input and `--rounding gptq`, two for `--rounding auto`) and the column walk of one linear.
//!
//!   cargo run --release --example gptq_factor -- IN [OUT] [TOKENS]
//!
//! e.g. `11008 4096 8192` for a Llama-2-7B down_proj (random X and W; the timings do not
//! depend on the values).

use std::time::Instant;

use awq::quant::gptq;
use candle_core::{Device, Tensor};

fn main() -> awq::error::Result<()> {
    let arg = |i: usize, d: usize| {
        std::env::args()
            .nth(i)
            .map_or(d, |s| s.parse().expect("a number"))
    };
    let (inp, out, tokens) = (arg(1, 4096), arg(2, 4096), arg(3, 8192));
    let x = Tensor::randn(0f32, 1.0, (tokens, inp), &Device::Cpu)?;
    let clock = Instant::now();
    let h = awq::quant::search::Gram::new(&x)?.to_f64()?;
    let gram = clock.elapsed().as_secs_f64();
    let clock = Instant::now();
    let f = gptq::Factor::new(&h, inp)?;
    let factor = clock.elapsed().as_secs_f64();
    let w: Vec<f32> = Tensor::randn(0f32, 0.02, (out, inp), &Device::Cpu)?
        .flatten_all()?
        .to_vec1()?;
    let clock = Instant::now();
    gptq::quantize(&w, out, inp, 128, &f)?;
    let walk = clock.elapsed().as_secs_f64();
    println!(
        "in {inp}, out {out}, {tokens} tokens: XᵀX {gram:.1} s, factor {factor:.1} s, column walk {walk:.1} s"
    );
    Ok(())
}

//! Writes a copy of a model whose decoder linears have been rounded to a k-quant-like mixed grid
//! and stored back as float16: a model "dequantized from a Q4_K_M GGUF", the kind of checkpoint
//! on which AWQ's clipping was measured worse than plain round-to-nearest end to end. The
//! quality matrix quantizes such a copy again.
//!
//! The grid follows llama.cpp's reference quantizers (`ggml-quants.c`), re-derived here:
//! - Q4_K (`quantize_row_q4_K_ref`): sub-blocks of 32 with their own scale and minimum, each
//!   fitted by a weighted least-squares search over 21 candidate scales (`make_qkx2_quants`),
//!   then the sub-blocks' scales and minimums of a super-block rounded to 6 bits against two
//!   float16 super-scales. Codes 0..15.
//! - Q6_K (`quantize_row_q6_K_ref`): sub-blocks of 16, symmetric, a scale per sub-block fitted
//!   over 19 candidates (`make_qx_quants`, weights x²), rounded to int8 against a float16
//!   super-scale. Codes −32..31.
//! - Which linear gets which (`llama_tensor_get_type`, Q4_K_M): `v_proj` and `down_proj` take
//!   Q6_K in the first and last eighth of the layers and every third layer between, Q4_K
//!   elsewhere; every other linear Q4_K.
//!
//! llama.cpp's super-block is 256 columns; a row that 256 does not divide (SmolLM2's 576) is
//! split into super-blocks of at most 256 here, where llama.cpp would switch that tensor to
//! another type. Near enough for the purpose: a structured non-uniform grid, not AWQ's.
//!
//! A narrower Q4_K sub-block (third argument, e.g. 16) puts more of the source's scales and
//! minimums inside one of AWQ's groups: on SmolLM2, whose 576 columns allow groups of 64 at
//! most, sub-blocks of 16 mimic a group of 128 over llama.cpp's sub-blocks of 32 on a larger
//! model.
//!
//! `cargo run --release --example kquant_grid -- MODEL_DIR OUT_DIR [Q4_K_SUB_BLOCK]`

use std::path::Path;

use half::f16;

mod common;

const SUPER: usize = 256;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !(2..=3).contains(&args.len()) {
        eprintln!("usage: kquant_grid MODEL_DIR OUT_DIR [Q4_K_SUB_BLOCK (default 32)]");
        std::process::exit(2);
    }
    let (src, out) = (Path::new(&args[0]), Path::new(&args[1]));
    let sub: usize = args
        .get(2)
        .map_or(32, |s| s.parse().expect("a sub-block width"));
    let layers = awq::model::load_spec(&src.join("config.json"))
        .unwrap()
        .layers;
    let (mut q4, mut q6) = (0, 0);
    common::rewrite_linears(src, out, |name, cols, w| {
        let six = more_bits(name, layers);
        for sb in w.chunks_mut(cols).flat_map(|row| row.chunks_mut(SUPER)) {
            match six {
                true => q6_k(sb),
                false => q4_k(sb, sub),
            }
        }
        match six {
            true => q6 += 1,
            false => q4 += 1,
        }
    });
    eprintln!(
        "wrote {} ({q4} linears on a Q4_K-like grid, {q6} on Q6_K)",
        out.display()
    );
}

/// Q4_K_M's rule: `v_proj` and `down_proj` of layer `i` of `n` take Q6_K when
/// `i < n/8 || i >= 7n/8 || (i − n/8) % 3 == 2`.
fn more_bits(name: &str, n: usize) -> bool {
    if !(name.contains("v_proj") || name.contains("down_proj")) {
        return false;
    }
    let i: usize = (name.split('.'))
        .skip_while(|p| *p != "layers")
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("a decoder linear's name holds its layer");
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

fn h(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// Q4_K on one super-block, in place.
fn q4_k(x: &mut [f32], sub: usize) {
    let av = (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32).sqrt();
    let fits: Vec<(f32, f32)> = x.chunks(sub).map(|s| fit_scale_min(s, av)).collect();
    let max_scale = fits.iter().fold(0f32, |a, f| a.max(f.0));
    let max_min = fits.iter().fold(0f32, |a, f| a.max(f.1));
    let (d, dmin) = (h(max_scale / 63.0), h(max_min / 63.0));
    let six = |v: f32, m: f32| match m > 0.0 {
        true => (v * 63.0 / m).round().min(63.0),
        false => 0.0,
    };
    for (s, (scale, min)) in x.chunks_mut(sub).zip(fits) {
        let (dl, dm) = (d * six(scale, max_scale), dmin * six(min, max_min));
        for v in s.iter_mut() {
            let l = match dl > 0.0 {
                true => ((*v + dm) / dl).round().clamp(0.0, 15.0),
                false => 0.0,
            };
            *v = dl * l - dm;
        }
    }
}

/// `make_qkx2_quants(32, 15, …, rmin −1, rdelta 0.1, nstep 20)`: the sub-block's scale and
/// (positive) minimum minimising `Σ w·(scale·l − min − x)²` with `w = av + |x|`.
fn fit_scale_min(x: &[f32], av: f32) -> (f32, f32) {
    let w: Vec<f32> = x.iter().map(|v| av + v.abs()).collect();
    let mut min = x.iter().fold(f32::INFINITY, |a, &v| a.min(v)).min(0.0);
    let max = x.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    if max == min {
        return (0.0, -min);
    }
    let codes = |iscale: f32, min: f32| -> Vec<f32> {
        (x.iter())
            .map(|v| (iscale * (v - min)).round().clamp(0.0, 15.0))
            .collect()
    };
    let error = |l: &[f32], scale: f32, min: f32| -> f32 {
        (l.iter().zip(x).zip(&w))
            .map(|((l, v), w)| w * (scale * l + min - v).powi(2))
            .sum()
    };
    let mut scale = (max - min) / 15.0;
    let mut best = error(&codes(1.0 / scale, min), scale, min);
    let (sum_w, sum_x) = (
        w.iter().sum::<f32>(),
        (w.iter().zip(x)).map(|(w, v)| w * v).sum::<f32>(),
    );
    for step in 0..=20 {
        let l = codes((-1.0 + 0.1 * step as f32 + 15.0) / (max - min), min);
        let sum_l: f32 = (l.iter().zip(&w)).map(|(l, w)| w * l).sum();
        let sum_l2: f32 = (l.iter().zip(&w)).map(|(l, w)| w * l * l).sum();
        let sum_xl: f32 = (l.iter().zip(&w).zip(x)).map(|((l, w), v)| w * l * v).sum();
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det <= 0.0 {
            continue;
        }
        let (mut s, mut m) = (
            (sum_w * sum_xl - sum_x * sum_l) / det,
            (sum_l2 * sum_x - sum_l * sum_xl) / det,
        );
        if m > 0.0 {
            (s, m) = (sum_xl / sum_l2, 0.0);
        }
        let e = error(&l, s, m);
        if e < best {
            (best, scale, min) = (e, s, m);
        }
    }
    (scale, -min)
}

/// Q6_K on one super-block, in place.
fn q6_k(x: &mut [f32]) {
    let scales: Vec<f32> = x.chunks(16).map(fit_symmetric).collect();
    let max_scale = scales.iter().fold(0f32, |a, &s| match s.abs() > a.abs() {
        true => s,
        false => a,
    });
    if max_scale == 0.0 {
        x.fill(0.0);
        return;
    }
    let iscale = -128.0 / max_scale;
    let d = h(1.0 / iscale);
    for (s, scale) in x.chunks_mut(16).zip(scales) {
        let dl = d * (iscale * scale).round().min(127.0);
        for v in s.iter_mut() {
            let l = match dl != 0.0 {
                true => (*v / dl).round().clamp(-32.0, 31.0),
                false => 0.0,
            };
            *v = dl * l;
        }
    }
}

/// `make_qx_quants(16, 32, …, rmse_type 1)`: the symmetric scale minimising
/// `Σ x²·(scale·l − x)²` over 19 candidate inverse scales around `−32 / max`.
fn fit_symmetric(x: &[f32]) -> f32 {
    let max = x
        .iter()
        .fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
    if max.abs() < 1e-30 {
        return 0.0;
    }
    let sums = |iscale: f32| {
        x.iter().fold((0f32, 0f32), |(lx, l2), &v| {
            let l = (iscale * v).round().clamp(-32.0, 31.0);
            let w = v * v;
            (lx + w * v * l, l2 + w * l * l)
        })
    };
    let (lx, l2) = sums(-32.0 / max);
    let mut scale = if l2 > 0.0 { lx / l2 } else { 0.0 };
    let mut best = scale * lx;
    for is in (-9..=9).filter(|&i| i != 0) {
        let (lx, l2) = sums(-(32.0 + 0.1 * is as f32) / max);
        if l2 > 0.0 && lx * lx > best * l2 {
            scale = lx / l2;
            best = scale * lx;
        }
    }
    scale
}

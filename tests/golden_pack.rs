//! AutoAWQ quantization and GEMM/GEMV packing, bit for bit, against `../shared/golden/pack`
//! (copied into tests/fixtures) and the real-weight `rtn-g64-layer0` golden.

mod common;

use awq::quant::pack::{pack, unpack, Layout, Packed};
use awq::quant::rtn::{quantize_f16, Quantized};
use common::*;
use half::f16;

fn check_quantization(golden: &[u8], prefix: &str, q: &Quantized) {
    let scales = read_f16_bits(golden, &format!("{prefix}scales"));
    let got: Vec<u16> = q.scales.iter().map(|s| s.to_bits()).collect();
    assert_eq!(got, scales, "{prefix}scales");
    let (zeros, _) = read_f32(golden, &format!("{prefix}zeros"));
    let got: Vec<f32> = q.zeros.iter().map(|&z| z as f32).collect();
    assert_eq!(got, zeros, "{prefix}zeros (by value)");
}

fn check_packed(golden: &[u8], prefix: &str, p: &Packed) {
    assert_eq!(
        p.qweight,
        read_i32(golden, &format!("{prefix}qweight")),
        "{prefix}qweight"
    );
    assert_eq!(
        p.qzeros,
        read_i32(golden, &format!("{prefix}qzeros")),
        "{prefix}qzeros"
    );
    let scales: Vec<u16> = p.scales.iter().map(|s| s.to_bits()).collect();
    assert_eq!(
        scales,
        read_f16_bits(golden, &format!("{prefix}scales")),
        "{prefix}scales"
    );
    for (t, shape) in [
        ("qweight", p.qweight_shape),
        ("qzeros", p.qzeros_shape),
        ("scales", p.scales_shape),
    ] {
        assert_eq!(
            raw(golden, &format!("{prefix}{t}")).1,
            shape.to_vec(),
            "{prefix}{t} shape"
        );
    }
}

fn case(file: &str, group: usize) {
    let golden = std::fs::read(fixture(file)).unwrap();
    let (w, shape) = read_f32(&golden, "weight");
    let (out, inp) = (shape[0], shape[1]);
    let q = quantize_f16(&w, out, inp, group);
    check_quantization(&golden, "", &q);
    assert_eq!(q.codes, raw(&golden, "q").0, "codes");
    // (q − z)·s rounded to f16 is AutoAWQ's fake-quantized weight, bit for bit.
    let fake: Vec<u16> = q
        .dequantize()
        .iter()
        .map(|&x| f16::from_f32(x).to_bits())
        .collect();
    assert_eq!(fake, read_f16_bits(&golden, "fake_weight"), "fake_weight");

    for (layout, prefix) in [(Layout::Gemm, "gemm."), (Layout::Gemv, "gemv.")] {
        if raw_exists(&golden, &format!("{prefix}qweight")) {
            let p = pack(&q, layout).unwrap();
            check_packed(&golden, prefix, &p);
            assert_eq!(unpack(&p, layout, group).unwrap(), q, "{prefix} unpack");
            if layout == Layout::Gemm {
                // AutoAWQ's own dequantization of the GEMM buffers is fake_weight transposed.
                let deq = read_f16_bits(&golden, "gemm.dequant");
                for o in 0..out {
                    for i in 0..inp {
                        assert_eq!(deq[i * out + o], fake[o * inp + i]);
                    }
                }
            }
        }
    }
}

fn raw_exists(golden: &[u8], name: &str) -> bool {
    safetensors::SafeTensors::deserialize(golden)
        .unwrap()
        .tensor(name)
        .is_ok()
}

#[test]
fn pack_in512_out256_g128() {
    case("gemm-gemv-in512-out256-g128.safetensors", 128);
}

#[test]
fn pack_in576_out192_g64() {
    case("gemm-gemv-in576-out192-g64.safetensors", 64);
}

#[test]
fn pack_in256_out128_single_group() {
    case("gemm-gemv-in256-out128-g256-single-group.safetensors", 256);
}

#[test]
fn fakequant_edge_cases() {
    case("fakequant-edge-in128-out32-g64.safetensors", 64);
}

#[test]
fn real_weights_rtn_g64_layer0() {
    let Some(dir) = test_model("real_weights_rtn_g64_layer0") else {
        return;
    };
    let golden = std::fs::read(fixture("rtn-g64-layer0.safetensors")).unwrap();
    let ckpt = awq::io::reader::Checkpoint::open_dir(&dir).unwrap();
    for (name, out, inp) in [
        ("model.layers.0.self_attn.q_proj", 576, 576),
        ("model.layers.0.mlp.down_proj", 576, 1536),
    ] {
        let w = ckpt.f32(&format!("{name}.weight"), &[out, inp]).unwrap();
        let w = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let q = quantize_f16(&w, out, inp, 64);
        check_quantization(&golden, &format!("{name}."), &q);
        check_packed(
            &golden,
            &format!("{name}.gemm."),
            &pack(&q, Layout::Gemm).unwrap(),
        );
        check_packed(
            &golden,
            &format!("{name}.gemv."),
            &pack(&q, Layout::Gemv).unwrap(),
        );
    }
}

//! compressed-tensors' `pack-quantized` format, byte for byte as the `compressed-tensors`
//! package writes it for 4-bit asymmetric group quantization (what llm-compressor's AWQ
//! writes, and what vLLM's `CompressedTensorsWNA16` scheme loads).
//!
//! The package (`compressors/pack_quantized/helpers.py`, `pack_to_int32`) stores signed codes
//! `q_s ∈ [-8, 7]` offset by 8, eight per int32 along the packed dimension, element `i` in bits
//! `4·(i mod 8)` of word `i / 8`; its dequantization (`quantization/lifecycle/forward.py`,
//! `_dequantize`) is `(q_s − z_s) · s`. Our unsigned codes and zero points are exactly
//! `q_u = q_s + 8` and `z_u = z_s + 8`, so the stored nibbles are ours unchanged and
//! `(q_u − z_u) · s` is the same product:
//!
//! - `weight_packed` `[out, ⌈in/8⌉]` int32: the codes along the input dimension (GEMV's order);
//! - `weight_zero_point` `[⌈out/8⌉, in/group]` int32: the zero points packed along the *output*
//!   dimension (`pack_to_int32(zp, packed_dim=0)` for the group strategy);
//! - `weight_scale` `[out, in/group]`: the group scales, in the model's float dtype;
//! - `weight_shape` `[2]` int64: `[out, in]`.

use super::pack::Packed;
use super::rtn::Quantized;
use crate::error::{Error, Result};

/// The tensor names of one linear, after its module name.
pub const TENSORS: [&str; 3] = ["weight_packed", "weight_zero_point", "weight_scale"];
/// The `[out, in]` tensor beside them.
pub const SHAPE_TENSOR: &str = "weight_shape";

/// The shapes of `weight_packed`, `weight_zero_point` and `weight_scale` for an `[out, in]`
/// linear in groups of `group`.
pub fn shapes(out: usize, inp: usize, group: usize) -> [[usize; 2]; 3] {
    let g = inp / group;
    [[out, inp.div_ceil(8)], [out.div_ceil(8), g], [out, g]]
}

/// Packs codes, zero points and scales (see the module docs).
pub fn pack(q: &Quantized) -> Packed {
    let (out, inp, gs) = (q.rows, q.cols, q.groups());
    let [qw, qz, sc] = shapes(out, inp, q.group);
    let mut qweight = vec![0i32; qw[0] * qw[1]];
    for o in 0..out {
        for i in 0..inp {
            let word = &mut qweight[o * qw[1] + i / 8];
            *word |= ((q.codes[o * inp + i] as u32) << (4 * (i % 8))) as i32;
        }
    }
    let mut qzeros = vec![0i32; qz[0] * qz[1]];
    for o in 0..out {
        for k in 0..gs {
            let word = &mut qzeros[(o / 8) * gs + k];
            *word |= ((q.zeros[o * gs + k] as u32) << (4 * (o % 8))) as i32;
        }
    }
    Packed {
        qweight,
        qweight_shape: qw,
        qzeros,
        qzeros_shape: qz,
        scales: q.scales.clone(),
        scales_shape: sc,
    }
}

#[inline]
fn nibble(word: i32, slot: usize) -> u8 {
    ((word as u32 >> (4 * slot)) & 0xF) as u8
}

/// Inverse of [`pack`] for an `[out, in]` linear (from `weight_shape`).
pub fn unpack(p: &Packed, out: usize, inp: usize, group: usize) -> Result<Quantized> {
    if group == 0 || !inp.is_multiple_of(group) {
        return Err(Error::Input(format!(
            "pack-quantized: group {group} does not divide in_features {inp}"
        )));
    }
    let [qw, qz, sc] = shapes(out, inp, group);
    if p.qweight_shape != qw || p.qzeros_shape != qz || p.scales_shape != sc {
        return Err(Error::Input(format!(
            "pack-quantized tensors of shapes {:?}, {:?}, {:?} do not fit [{out}, {inp}] in \
             groups of {group} (expected {qw:?}, {qz:?}, {sc:?})",
            p.qweight_shape, p.qzeros_shape, p.scales_shape
        )));
    }
    let gs = inp / group;
    let mut q = Quantized::zeroed(out, inp, group);
    q.scales.clone_from(&p.scales);
    for o in 0..out {
        for i in 0..inp {
            q.codes[o * inp + i] = nibble(p.qweight[o * qw[1] + i / 8], i % 8);
        }
        for k in 0..gs {
            q.zeros[o * gs + k] = nibble(p.qzeros[(o / 8) * gs + k], o % 8);
        }
    }
    Ok(q)
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    /// Codes 0..15 along a row land in consecutive nibbles; zero points of rows 0..7 share a
    /// word (the package's `packed_dim=0`).
    #[test]
    fn nibbles_follow_the_package_order_and_round_trip() {
        let (out, inp, group) = (16, 64, 32);
        let q = Quantized {
            rows: out,
            cols: inp,
            group,
            codes: (0..out * inp).map(|i| (i % 16) as u8).collect(),
            zeros: (0..out * 2).map(|i| ((i / 2) % 16) as u8).collect(),
            scales: (0..out * 2)
                .map(|i| f16::from_f32(0.01 * i as f32))
                .collect(),
        };
        let p = pack(&q);
        assert_eq!(p.qweight[0] as u32, 0x7654_3210);
        assert_eq!(p.qweight[1] as u32, 0xFEDC_BA98);
        // Group 0 of rows 0..7 has zero points 0..7.
        assert_eq!(p.qzeros[0] as u32, 0x7654_3210);
        assert_eq!(unpack(&p, out, inp, group).unwrap(), q);
    }
}

//! AutoAWQ's packed layouts, byte for byte (AWQ-SPEC §8, golden/README.md "Layouts").
//!
//! GEMM (the layout vLLM loads): codes packed 8 per u32 along the *output* dimension in the
//! interleaved nibble order `[0, 2, 4, 6, 1, 3, 5, 7]`, scales transposed to `[in/g, out]`.
//! GEMV: codes packed along the *input* dimension in natural order, zeros and scales padded to
//! a width that depends on the group size.

use half::f16;
use rayon::prelude::*;

use super::rtn::Quantized;
use crate::error::{Error, Result};

/// Output column `8c + AWQ_ORDER[slot]` lives in nibble `slot` of a GEMM word.
pub const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    Gemm,
    Gemv,
    /// compressed-tensors' `pack-quantized` (`--format compressed-tensors`; see
    /// [`super::pack_quantized`]): not an AutoAWQ version, a format of its own.
    #[serde(rename = "pack-quantized")]
    PackQuantized,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::Gemm => "gemm",
            Layout::Gemv => "gemv",
            Layout::PackQuantized => "pack-quantized",
        }
    }

    /// The names of a packed linear's codes, zero points and scales, after its module name.
    pub fn tensor_names(self) -> [&'static str; 3] {
        match self {
            Layout::Gemm | Layout::Gemv => ["qweight", "qzeros", "scales"],
            Layout::PackQuantized => super::pack_quantized::TENSORS,
        }
    }

    /// Whether this is one of AutoAWQ's layouts (`quant_method: awq`), rather than
    /// compressed-tensors.
    pub fn is_awq(self) -> bool {
        self != Layout::PackQuantized
    }
}

/// The tensors of one packed linear (bias handled by the caller).
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    pub qweight: Vec<i32>,
    pub qweight_shape: [usize; 2],
    pub qzeros: Vec<i32>,
    pub qzeros_shape: [usize; 2],
    pub scales: Vec<f16>,
    pub scales_shape: [usize; 2],
}

/// GEMV zero-point width in words: `ceil(ceil(G / 8) / m) · m`, m = 1 (g ≥ 128), 2 (64), 4 (32).
pub fn gemv_zeros_width(in_features: usize, group: usize) -> Result<usize> {
    let mult = match group {
        g if g >= 128 => 1,
        64 => 2,
        32 => 4,
        g => {
            return Err(Error::Usage(format!(
                "the GEMV layout supports group sizes 32, 64 and >= 128, not {g}"
            )))
        }
    };
    let base = (in_features / group).div_ceil(8);
    Ok(base.div_ceil(mult) * mult)
}

/// Group sizes worth suggesting: AutoAWQ's default 128 and the sizes the kernels handle best.
pub const GROUP_HINTS: [usize; 4] = [128, 64, 32, 256];

/// The sizes of [`GROUP_HINTS`] that divide every one of `in_features` (so a hint never fails
/// on another linear of the model).
pub fn group_hints(in_features: &[usize]) -> Vec<usize> {
    GROUP_HINTS
        .into_iter()
        .filter(|g| in_features.iter().all(|i| i.is_multiple_of(*g)))
        .collect()
}

/// Checks the shape rules shared by both layouts; `hints` are group sizes that fit the whole
/// model (see [`group_hints`]), offered when `group` does not divide `inp`.
pub fn check_shape(
    name: &str,
    out: usize,
    inp: usize,
    group: usize,
    hints: &[usize],
) -> Result<()> {
    if !inp.is_multiple_of(group) {
        let fix = match hints {
            [] => {
                "no common size (32, 64, 128, 256) divides every linear of this model".to_string()
            }
            [one] => {
                format!("use --group {one} (the size that divides every linear of this model)")
            }
            _ => format!(
                "use --group {} (the sizes that divide every linear of this model)",
                hints
                    .iter()
                    .map(|g| g.to_string())
                    .collect::<Vec<_>>()
                    .join(" or ")
            ),
        };
        return Err(Error::Usage(format!(
            "{name}: in_features {inp} is not divisible by the group size {group}; {fix}"
        )));
    }
    if !out.is_multiple_of(8) {
        return Err(Error::Usage(format!(
            "{name}: out_features {out} is not a multiple of 8, which the packed AWQ layouts require"
        )));
    }
    Ok(())
}

pub fn pack(q: &Quantized, layout: Layout) -> Result<Packed> {
    match layout {
        Layout::Gemm => Ok(pack_gemm(q)),
        Layout::Gemv => pack_gemv(q),
        Layout::PackQuantized => Ok(super::pack_quantized::pack(q)),
    }
}

fn pack_gemm(q: &Quantized) -> Packed {
    let (out, inp, gs) = (q.rows, q.cols, q.groups());
    let words = out / 8;
    let mut qweight = vec![0i32; inp * words];
    // Blocks of input columns in parallel; within one, each word's eight source rows are read
    // along the block (a column-by-column walk of `codes` missed the cache on every read).
    const BLOCK: usize = 64;
    qweight
        .par_chunks_mut(words * BLOCK)
        .enumerate()
        .for_each(|(b, chunk)| {
            let (i0, n) = (b * BLOCK, chunk.len() / words);
            for c in 0..words {
                let rows = AWQ_ORDER.map(|j| &q.codes[(8 * c + j) * inp + i0..][..n]);
                for di in 0..n {
                    let mut word = 0u32;
                    for (slot, row) in rows.iter().enumerate() {
                        word |= (row[di] as u32) << (4 * slot);
                    }
                    chunk[di * words + c] = word as i32;
                }
            }
        });
    let mut qzeros = vec![0i32; gs * words];
    let mut scales = vec![f16::ZERO; gs * out];
    for k in 0..gs {
        for c in 0..words {
            let mut word = 0u32;
            for (slot, &j) in AWQ_ORDER.iter().enumerate() {
                word |= (q.zeros[(8 * c + j) * gs + k] as u32) << (4 * slot);
            }
            qzeros[k * words + c] = word as i32;
        }
        for o in 0..out {
            scales[k * out + o] = q.scales[o * gs + k];
        }
    }
    Packed {
        qweight,
        qweight_shape: [inp, words],
        qzeros,
        qzeros_shape: [gs, words],
        scales,
        scales_shape: [gs, out],
    }
}

fn pack_gemv(q: &Quantized) -> Result<Packed> {
    let (out, inp, gs) = (q.rows, q.cols, q.groups());
    let zw = gemv_zeros_width(inp, q.group)?;
    let words = inp / 8;
    let mut qweight = vec![0i32; out * words];
    let mut qzeros = vec![0i32; out * zw];
    let mut scales = vec![f16::ZERO; out * 8 * zw];
    for o in 0..out {
        for c in 0..words {
            let mut word = 0u32;
            for t in 0..8 {
                word |= (q.codes[o * inp + 8 * c + t] as u32) << (4 * t);
            }
            qweight[o * words + c] = word as i32;
        }
        for k in 0..gs {
            qzeros[o * zw + k / 8] |= ((q.zeros[o * gs + k] as u32) << (4 * (k % 8))) as i32;
            scales[o * 8 * zw + k] = q.scales[o * gs + k];
        }
    }
    Ok(Packed {
        qweight,
        qweight_shape: [out, words],
        qzeros,
        qzeros_shape: [out, zw],
        scales,
        scales_shape: [out, 8 * zw],
    })
}

#[inline]
fn nibble(word: i32, slot: usize) -> u8 {
    ((word as u32 >> (4 * slot)) & 0xF) as u8
}

/// Inverse of [`pack`]: codes, zeros and scales in the `[out, in]` / `[out, G]` layout.
pub fn unpack(p: &Packed, layout: Layout, group: usize) -> Result<Quantized> {
    let bad =
        |what: &str| Error::Input(format!("packed tensors have inconsistent shapes ({what})"));
    let (out, inp) = match layout {
        Layout::Gemm => (p.scales_shape[1], p.qweight_shape[0]),
        Layout::Gemv => (p.qweight_shape[0], p.qweight_shape[1] * 8),
        Layout::PackQuantized => {
            let (out, inp) = (p.qweight_shape[0], p.scales_shape[1] * group);
            return super::pack_quantized::unpack(p, out, inp, group);
        }
    };
    if group == 0 || inp % group != 0 || out % 8 != 0 {
        return Err(bad("group"));
    }
    let gs = inp / group;
    let mut q = Quantized::zeroed(out, inp, group);
    match layout {
        Layout::Gemm => {
            let words = out / 8;
            if p.qweight_shape != [inp, words]
                || p.qzeros_shape != [gs, words]
                || p.scales_shape != [gs, out]
            {
                return Err(bad("gemm"));
            }
            for i in 0..inp {
                for c in 0..words {
                    let w = p.qweight[i * words + c];
                    for (slot, &j) in AWQ_ORDER.iter().enumerate() {
                        q.codes[(8 * c + j) * inp + i] = nibble(w, slot);
                    }
                }
            }
            for k in 0..gs {
                for c in 0..words {
                    let w = p.qzeros[k * words + c];
                    for (slot, &j) in AWQ_ORDER.iter().enumerate() {
                        q.zeros[(8 * c + j) * gs + k] = nibble(w, slot);
                    }
                }
                for o in 0..out {
                    q.scales[o * gs + k] = p.scales[k * out + o];
                }
            }
        }
        Layout::Gemv => {
            let zw = gemv_zeros_width(inp, group)?;
            if p.qzeros_shape != [out, zw] || p.scales_shape != [out, 8 * zw] {
                return Err(bad("gemv"));
            }
            let words = inp / 8;
            for o in 0..out {
                for c in 0..words {
                    let w = p.qweight[o * words + c];
                    for t in 0..8 {
                        q.codes[o * inp + 8 * c + t] = nibble(w, t);
                    }
                }
                for k in 0..gs {
                    q.zeros[o * gs + k] = nibble(p.qzeros[o * zw + k / 8], k % 8);
                    q.scales[o * gs + k] = p.scales[o * 8 * zw + k];
                }
            }
        }
        Layout::PackQuantized => unreachable!("returned above"),
    }
    Ok(q)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_hints_fit_every_input_width() {
        // SmolLM2-135M: hidden 576, intermediate 1536.
        assert_eq!(group_hints(&[576, 1536]), vec![64, 32]);
        assert_eq!(group_hints(&[4096, 11008]), vec![128, 64, 32, 256]);
        assert!(group_hints(&[100]).is_empty());
    }
    use proptest::prelude::*;

    fn codes_for_word(codes: [u8; 8]) -> Quantized {
        // One input column, 8 output rows, group 1.
        Quantized {
            rows: 8,
            cols: 1,
            group: 1,
            codes: codes.to_vec(),
            zeros: vec![8; 8],
            scales: vec![f16::ONE; 8],
        }
    }

    #[test]
    fn spec_example_words() {
        let p = pack_gemm(&codes_for_word([1, 2, 3, 4, 5, 6, 7, 8]));
        assert_eq!(p.qweight[0] as u32, 0x86427531);
        assert_eq!(p.qweight[0], -2042464975);
        assert_eq!(p.qzeros[0] as u32, 0x88888888);
        let p = pack_gemm(&codes_for_word([15, 0, 9, 3, 12, 7, 1, 8]));
        assert_eq!(p.qweight[0] as u32, 0x87301C9F);
    }

    #[test]
    fn gemv_zero_widths() {
        assert_eq!(gemv_zeros_width(4096, 128).unwrap(), 4);
        assert_eq!(gemv_zeros_width(11008, 128).unwrap(), 11);
        assert_eq!(gemv_zeros_width(4096, 64).unwrap(), 8);
        assert_eq!(gemv_zeros_width(576, 64).unwrap(), 2);
        assert_eq!(gemv_zeros_width(1536, 64).unwrap(), 4);
        assert!(gemv_zeros_width(4096, 96).is_err());
    }

    fn quantized() -> impl Strategy<Value = (Quantized, Layout)> {
        (
            1usize..4,
            1usize..5,
            prop_oneof![Just(32usize), Just(64), Just(128)],
            any::<bool>(),
        )
            .prop_flat_map(|(o8, gs, group, gemv)| {
                let (rows, cols) = (o8 * 8, gs * group);
                (
                    proptest::collection::vec(0u8..16, rows * cols),
                    proptest::collection::vec(0u8..16, rows * gs),
                    proptest::collection::vec(1u16..0x7bff, rows * gs),
                )
                    .prop_map(move |(codes, zeros, scales)| {
                        let q = Quantized {
                            rows,
                            cols,
                            group,
                            codes,
                            zeros,
                            scales: scales.into_iter().map(f16::from_bits).collect(),
                        };
                        (q, if gemv { Layout::Gemv } else { Layout::Gemm })
                    })
            })
    }

    proptest! {
        #[test]
        fn unpack_inverts_pack((q, layout) in quantized()) {
            let p = pack(&q, layout).unwrap();
            prop_assert_eq!(unpack(&p, layout, q.group).unwrap(), q);
        }
    }
}

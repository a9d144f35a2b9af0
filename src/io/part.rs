//! A layer's part file written tensor by tensor. A MoE layer's packed experts are produced one
//! expert at a time and would not fit in memory together (DeepSeek-V3: 5.6 GB of int4 codes a
//! layer), so each tensor's bytes go to a side file as they come, and [`PartWriter::finish`]
//! writes the safetensors header (whose offsets need every size) followed by those bytes. The
//! part appears whole or not at all, like every file `io` writes.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use safetensors::Dtype;

use super::writer::{atomic, write_err, OutTensor};
use crate::error::Result;

/// One tensor already in the side file.
struct Entry {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    start: u64,
    end: u64,
}

pub struct PartWriter {
    path: PathBuf,
    side: PathBuf,
    out: BufWriter<File>,
    entries: Vec<Entry>,
    offset: u64,
    max_abs_f32: f32,
}

impl PartWriter {
    /// Starts the part `path` (nothing appears there before [`PartWriter::finish`]).
    pub fn create(path: &Path) -> Result<Self> {
        let mut side = path.as_os_str().to_owned();
        side.push(".data");
        let side = PathBuf::from(side);
        let file = File::create(&side).map_err(|e| write_err(&side, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
            side,
            entries: Vec::new(),
            offset: 0,
            max_abs_f32: 0.0,
        })
    }

    pub fn push(&mut self, t: OutTensor) -> Result<()> {
        if t.dtype == Dtype::F32 {
            let m = (t.data.chunks_exact(4))
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]).abs())
                .fold(0f32, f32::max);
            self.max_abs_f32 = self.max_abs_f32.max(m);
        }
        self.out
            .write_all(&t.data)
            .map_err(|e| write_err(&self.side, e))?;
        let end = self.offset + t.data.len() as u64;
        self.entries.push(Entry {
            name: t.name,
            dtype: t.dtype,
            shape: t.shape,
            start: self.offset,
            end,
        });
        self.offset = end;
        Ok(())
    }

    /// The names pushed so far, in order.
    pub fn names(&self) -> Vec<String> {
        self.entries.iter().map(|e| e.name.clone()).collect()
    }

    /// The largest |value| of the F32 (staged float) tensors pushed so far.
    pub fn max_abs_f32(&self) -> f32 {
        self.max_abs_f32
    }

    /// Writes the header and the bytes to the part, atomically, and removes the side file.
    pub fn finish(self) -> Result<()> {
        let Self {
            path,
            side,
            out,
            entries,
            ..
        } = self;
        out.into_inner()
            .map_err(|e| write_err(&side, e.error()))?
            .sync_all()
            .map_err(|e| write_err(&side, e))?;
        let header = header(&entries)?;
        let result = atomic(&path, |tmp| {
            let mut file = BufWriter::new(File::create(tmp).map_err(|e| write_err(tmp, e))?);
            let mut data = File::open(&side).map_err(|e| write_err(&side, e))?;
            file.write_all(&(header.len() as u64).to_le_bytes())
                .and_then(|()| file.write_all(&header))
                .and_then(|()| std::io::copy(&mut data, &mut file).map(|_| ()))
                .and_then(|()| file.flush())
                .map_err(|e| write_err(tmp, e))
        });
        let _ = std::fs::remove_file(&side);
        result
    }
}

/// The safetensors header for `entries`, padded with spaces to 8 bytes.
fn header(entries: &[Entry]) -> Result<Vec<u8>> {
    let mut map = serde_json::Map::new();
    map.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    for e in entries {
        let dtype = serde_json::to_value(e.dtype)
            .map_err(|err| crate::error::Error::Runtime(err.to_string()))?;
        map.insert(
            e.name.clone(),
            serde_json::json!({ "dtype": dtype, "shape": e.shape, "data_offsets": [e.start, e.end] }),
        );
    }
    let mut bytes = serde_json::to_vec(&map).expect("a JSON map serialises");
    bytes.resize(bytes.len().div_ceil(8) * 8, b' ');
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streamed_part_reads_back_like_any_safetensors_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("layer.safetensors");
        let mut w = PartWriter::create(&path).unwrap();
        w.push(OutTensor::i32(
            "a.qweight".into(),
            vec![2, 2],
            &[1, -2, 3, 4],
        ))
        .unwrap();
        let t = candle_core::Tensor::new(&[0.5f32, -7.0, 2.0], &candle_core::Device::Cpu).unwrap();
        w.push(OutTensor::f32("a.bias".into(), &t).unwrap())
            .unwrap();
        assert_eq!(w.names(), vec!["a.qweight", "a.bias"]);
        assert_eq!(w.max_abs_f32(), 7.0);
        assert!(!path.exists());
        w.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let q = st.tensor("a.qweight").unwrap();
        assert_eq!((q.dtype(), q.shape()), (Dtype::I32, &[2, 2][..]));
        assert_eq!(&q.data()[4..8], &(-2i32).to_le_bytes());
        assert_eq!(st.tensor("a.bias").unwrap().data().len(), 12);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no side file left"
        );
    }
}

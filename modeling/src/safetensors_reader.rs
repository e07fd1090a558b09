//! Reading a safetensors file one tensor at a time: the JSON header, then each
//! tensor's bytes read straight into the buffer the tensor keeps, converted to the
//! dtype the model wants as it arrives. A model in memory costs its tensors and
//! one tensor more, never the whole file a second time (reading the file into
//! memory first, as `candle_core::safetensors::load` does, doubles the peak).

use candle_core::{DType, Device, Tensor};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// One entry of the header.
struct Entry {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    /// Its byte range within the data section.
    start: u64,
    end: u64,
}

/// The header is JSON of at most this size (the format's own limit is 100 MB).
const MAX_HEADER: u64 = 100_000_000;

fn dtype_of(name: &str) -> Result<DType, String> {
    Ok(match name {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        "I64" => DType::I64,
        "U32" => DType::U32,
        "U8" => DType::U8,
        other => return Err(format!("tensor dtype {other} is not supported")),
    })
}

/// The header as JSON, and where the data section starts.
fn header_json(file: &mut std::fs::File, len: u64) -> Result<(serde_json::Value, u64), String> {
    let mut size = [0u8; 8];
    file.read_exact(&mut size)
        .map_err(|e| format!("no safetensors header: {e}"))?;
    let n = u64::from_le_bytes(size);
    if n > MAX_HEADER || 8 + n > len {
        return Err(format!("header of {n} bytes in a {len}-byte file"));
    }
    let mut json = vec![0u8; n as usize];
    file.read_exact(&mut json)
        .map_err(|e| format!("truncated header: {e}"))?;
    let value: serde_json::Value =
        serde_json::from_slice(&json).map_err(|e| format!("header is not JSON: {e}"))?;
    Ok((value, 8 + n))
}

fn header(file: &mut std::fs::File, len: u64) -> Result<(Vec<Entry>, u64), String> {
    let (value, data_start) = header_json(file, len)?;
    let map = value.as_object().ok_or("header is not a JSON object")?;
    let mut entries = Vec::with_capacity(map.len());
    for (name, info) in map {
        if name == "__metadata__" {
            continue;
        }
        let bad = || format!("tensor {name}: malformed header entry");
        let dtype = dtype_of(info["dtype"].as_str().ok_or_else(bad)?)
            .map_err(|e| format!("tensor {name}: {e}"))?;
        let shape = info["shape"]
            .as_array()
            .ok_or_else(bad)?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize).ok_or_else(bad))
            .collect::<Result<Vec<_>, _>>()?;
        let offsets = info["data_offsets"].as_array().ok_or_else(bad)?;
        let (start, end) = match offsets.as_slice() {
            [a, b] => (a.as_u64().ok_or_else(bad)?, b.as_u64().ok_or_else(bad)?),
            _ => return Err(bad()),
        };
        // Checked: a crafted header must not wrap these around.
        let want = shape
            .iter()
            .try_fold(dtype.size_in_bytes(), |n, &d| n.checked_mul(d));
        let fits = data_start.checked_add(end).is_some_and(|e| e <= len);
        if end < start || want != Some((end - start) as usize) || !fits {
            return Err(format!(
                "tensor {name}: its bytes {start}..{end} do not hold {shape:?} {dtype:?} within the file"
            ));
        }
        entries.push(Entry {
            name: name.clone(),
            dtype,
            shape,
            start,
            end,
        });
    }
    // In file order: one forward pass over the file.
    entries.sort_by_key(|e| e.start);
    // Two tensors over the same bytes would be two owners of one mapped buffer.
    for pair in entries.windows(2) {
        if pair[1].start < pair[0].end {
            return Err(format!(
                "tensors {} and {} overlap in the file",
                pair[0].name, pair[1].name
            ));
        }
    }
    Ok((entries, data_start))
}

/// Where tensors' bytes come from: the file mapped where the process allows it
/// (see [`crate::mapped`]), else read.
struct Source {
    file: std::fs::File,
    mapping: Option<crate::mapped::Mapping>,
    data_start: u64,
}

impl Source {
    /// `n` elements of `T` at `e`: a vector over the mapping when there is one
    /// and they are aligned for `T`, else read into a vector of their own.
    fn vec<T: crate::mapped::Plain + Default>(
        &mut self,
        e: &Entry,
        n: usize,
    ) -> std::io::Result<Vec<T>> {
        if cfg!(target_endian = "big") {
            return Err(std::io::Error::other(
                "safetensors are little-endian; this machine is not",
            ));
        }
        let offset = self.data_start + e.start;
        if let Some(v) = self
            .mapping
            .as_ref()
            .and_then(|m| m.vec::<T>(usize::try_from(offset).ok()?, n))
        {
            return Ok(v);
        }
        self.file.seek(SeekFrom::Start(offset))?;
        let mut v = vec![T::default(); n];
        // SAFETY: the vector's memory is n initialised elements of a plain-data type
        // (floats and integers), viewed as bytes only to be overwritten.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(
                v.as_mut_ptr().cast::<u8>(),
                n * std::mem::size_of::<T>(),
            )
        };
        self.file.read_exact(bytes)?;
        Ok(v)
    }

    fn tensor(&mut self, e: &Entry) -> Result<Tensor, String> {
        let n = e.shape.iter().product::<usize>();
        let io = |err: std::io::Error| format!("tensor {}: {err}", e.name);
        let shape = e.shape.as_slice();
        let cpu = &Device::Cpu;
        let t = match e.dtype {
            DType::F32 => Tensor::from_vec(self.vec::<f32>(e, n).map_err(io)?, shape, cpu),
            DType::F16 => Tensor::from_vec(self.vec::<half::f16>(e, n).map_err(io)?, shape, cpu),
            DType::BF16 => Tensor::from_vec(self.vec::<half::bf16>(e, n).map_err(io)?, shape, cpu),
            DType::F64 => Tensor::from_vec(self.vec::<f64>(e, n).map_err(io)?, shape, cpu),
            DType::I64 => Tensor::from_vec(self.vec::<i64>(e, n).map_err(io)?, shape, cpu),
            DType::U32 => Tensor::from_vec(self.vec::<u32>(e, n).map_err(io)?, shape, cpu),
            DType::U8 => Tensor::from_vec(self.vec::<u8>(e, n).map_err(io)?, shape, cpu),
            other => {
                return Err(format!(
                    "tensor {}: dtype {other:?} is not supported",
                    e.name
                ))
            }
        };
        t.map_err(|err| format!("tensor {}: {err}", e.name))
    }
}

/// The header's `__metadata__` (string to string), empty when it has none.
pub fn metadata(path: &Path) -> Result<std::collections::BTreeMap<String, String>, String> {
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    let (value, _) = header_json(&mut file, len)?;
    Ok(value
        .get("__metadata__")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default())
}

/// Each tensor's name, stored dtype and element count, from the header alone
/// (checked against the file's length like a full read).
pub fn tensor_sizes(path: &Path) -> Result<Vec<(String, DType, usize)>, String> {
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    let (entries, _) = header(&mut file, len)?;
    Ok(entries
        .into_iter()
        .map(|e| {
            let n = e.shape.iter().product();
            (e.name, e.dtype, n)
        })
        .collect())
}

/// Every tensor of `path`, each handed to `take(name, tensor)` as soon as it is
/// read (on the CPU, in the file's dtype): `take` converts and keeps it. Where
/// the process maps weights ([`crate::mapped`]), a tensor kept as it is stays
/// in the mapped file; one converted is read from the mapping once.
pub fn for_each_tensor(
    path: &Path,
    mut take: impl FnMut(String, Tensor) -> Result<(), String>,
) -> Result<(), String> {
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    let (entries, data_start) = header(&mut file, len)?;
    let mapping = crate::mapped::Mapping::new(&file, len);
    let mut source = Source {
        file,
        mapping,
        data_start,
    };
    for e in entries {
        let t = source.tensor(&e)?;
        take(e.name, t)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Whatever candle writes reads back equal, every dtype, header metadata ignored.
    #[test]
    fn reads_what_candle_writes() {
        let dev = Device::Cpu;
        let a = Tensor::arange(0f32, 24., &dev)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap();
        let tensors: HashMap<String, Tensor> = [
            ("a.f32".to_string(), a.clone()),
            ("b.f16".to_string(), a.to_dtype(DType::F16).unwrap()),
            ("c.bf16".to_string(), a.to_dtype(DType::BF16).unwrap()),
            ("d.i64".to_string(), Tensor::new(&[3i64, -7], &dev).unwrap()),
            ("e.scalar".to_string(), Tensor::new(2.5f32, &dev).unwrap()),
        ]
        .into_iter()
        .collect();
        let dir = std::env::temp_dir().join(format!("pixart-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.safetensors");
        candle_core::safetensors::save(&tensors, &path).unwrap();
        let mut read = HashMap::new();
        for_each_tensor(&path, |name, t| {
            read.insert(name, t);
            Ok(())
        })
        .unwrap();
        assert_eq!(read.len(), tensors.len());
        for (name, want) in &tensors {
            let got = &read[name];
            assert_eq!(got.dtype(), want.dtype(), "{name}");
            assert_eq!(got.dims(), want.dims(), "{name}");
            let diff = (got.to_dtype(DType::F64).unwrap() - want.to_dtype(DType::F64).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert_eq!(diff, 0.0, "{name}");
        }
        // A truncated file is an error naming what is missing, not a panic.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        let err = for_each_tensor(&path, |_, _| Ok(())).unwrap_err();
        assert!(err.contains("within the file"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Two tensors over the same bytes are refused by name, not read twice.
    #[test]
    fn overlapping_tensors_are_refused() {
        let header = br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[0u8; 12]);
        let path =
            std::env::temp_dir().join(format!("pixart-overlap-{}.safetensors", std::process::id()));
        std::fs::write(&path, &bytes).unwrap();
        let err = for_each_tensor(&path, |_, _| Ok(())).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(err.contains("a and b overlap"), "{err}");
    }
}

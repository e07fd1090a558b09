//! Reading checkpoints: safetensors files (single or sharded with an index) and
//! PyTorch `.pth` pickles, into named tensors of the requested dtype and device.
//! Every failure names the file and, where there is one, the tensor.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{what} in {location}: {message}")]
    Model {
        what: String,
        location: String,
        message: String,
    },
}

impl LoadError {
    pub fn file(path: &Path, message: impl std::fmt::Display) -> LoadError {
        LoadError::File {
            path: path.to_path_buf(),
            message: message.to_string(),
        }
    }
}

/// Named tensors from one or more files, already in the target dtype and device.
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    files: Vec<PathBuf>,
    dtype: DType,
    device: Device,
}

impl Weights {
    /// The safetensors weights of a component folder: `<stem>.safetensors`, or the
    /// shards listed in `<stem>.safetensors.index.json`.
    pub fn from_folder(
        dir: &Path,
        stems: &[&str],
        dtype: DType,
        device: &Device,
    ) -> Result<Weights, LoadError> {
        Weights::from_folder_choosing(dir, stems, dtype, device, |_, _| Keep::as_is(dtype))
    }

    /// As [`Weights::from_folder`], but each floating-point tensor is kept as
    /// `choose(name, stored dtype)` says (layers a half-precision model keeps in
    /// f32, weights narrower than the arithmetic, weights transposed for the
    /// products); `dtype` is the model's.
    pub fn from_folder_choosing(
        dir: &Path,
        stems: &[&str],
        dtype: DType,
        device: &Device,
        choose: impl Fn(&str, DType) -> Keep,
    ) -> Result<Weights, LoadError> {
        for stem in stems {
            let single = dir.join(format!("{stem}.safetensors"));
            if single.is_file() {
                return Weights::read_safetensors(&[single], dtype, device, &choose);
            }
            let index = dir.join(format!("{stem}.safetensors.index.json"));
            if index.is_file() {
                return Weights::read_safetensors(&shards(&index)?, dtype, device, &choose);
            }
        }
        Err(LoadError::file(
            dir,
            format!(
                "no weights: expected {}",
                stems
                    .iter()
                    .map(|s| format!("{s}.safetensors or {s}.safetensors.index.json"))
                    .collect::<Vec<_>>()
                    .join(", or ")
            ),
        ))
    }

    pub fn from_safetensors(
        files: &[PathBuf],
        dtype: DType,
        device: &Device,
    ) -> Result<Weights, LoadError> {
        Weights::read_safetensors(files, dtype, device, &|_, _| Keep::as_is(dtype))
    }

    fn read_safetensors(
        files: &[PathBuf],
        dtype: DType,
        device: &Device,
        choose: &dyn Fn(&str, DType) -> Keep,
    ) -> Result<Weights, LoadError> {
        let mut tensors = HashMap::new();
        for file in files {
            // Tensor by tensor: each converted as it is read, never the whole file twice.
            crate::safetensors_reader::for_each_tensor(file, |name, t| {
                let keep = choose(&name, t.dtype());
                // U8 for a float weight: 8-bit, quantized from its f32 values.
                let int8 = keep.dtype == DType::U8 && t.dtype().is_float();
                let as_dtype = if int8 { DType::F32 } else { keep.dtype };
                let t = convert(t, as_dtype, device)
                    .and_then(|t| {
                        if keep.transposed {
                            transposed(&t)
                        } else {
                            Ok(t)
                        }
                    })
                    .map_err(|e| format!("tensor {name}: {e}"))?;
                if int8 {
                    let (q, scales) = quantize_int8(&t, keep.transposed)
                        .map_err(|e| format!("tensor {name}: {e}"))?;
                    tensors.insert(format!("{name}{INT8_SCALE_SUFFIX}"), scales);
                    tensors.insert(name, q);
                } else {
                    tensors.insert(name, t);
                }
                Ok(())
            })
            .map_err(|e| LoadError::file(file, format!("not a readable safetensors file: {e}")))?;
        }
        Ok(Weights {
            tensors,
            files: files.to_vec(),
            dtype,
            device: device.clone(),
        })
    }

    /// A PyTorch checkpoint; tensors under `key` (e.g. `state_dict`) when present.
    pub fn from_pth(
        file: &Path,
        key: Option<&str>,
        dtype: DType,
        device: &Device,
    ) -> Result<Weights, LoadError> {
        let read = |k| candle_core::pickle::read_all_with_key(file, k);
        let list = match key {
            Some(k) => read(Some(k)).or_else(|_| read(None)),
            None => read(None),
        }
        .map_err(|e| LoadError::file(file, format!("not a readable PyTorch checkpoint: {e}")))?;
        if list.is_empty() {
            return Err(LoadError::file(file, "the checkpoint holds no tensors"));
        }
        let mut tensors = HashMap::new();
        for (name, t) in list {
            let t = convert(t, dtype, device)
                .map_err(|e| LoadError::file(file, format!("tensor {name}: {e}")))?;
            tensors.insert(name, t);
        }
        Ok(Weights {
            tensors,
            files: vec![file.to_path_buf()],
            dtype,
            device: device.clone(),
        })
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The same tensors under new names; those `rename` maps to `None` are dropped.
    pub fn renamed(self, rename: impl Fn(&str) -> Option<String>) -> Weights {
        let tensors = self
            .tensors
            .into_iter()
            .filter_map(|(name, t)| rename(&name).map(|new| (new, t)))
            .collect();
        Weights { tensors, ..self }
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The memory the tensors hold, in bytes: what a model built on them costs.
    pub fn bytes(&self) -> usize {
        self.tensors
            .values()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    pub fn remove(&mut self, name: &str) -> Option<Tensor> {
        self.tensors.remove(name)
    }

    pub fn insert(&mut self, name: impl Into<String>, t: Tensor) {
        self.tensors.insert(name.into(), t);
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Where the tensors came from, for messages.
    pub fn location(&self) -> String {
        match self.files.as_slice() {
            [one] => one.display().to_string(),
            many => {
                let dir = many
                    .first()
                    .and_then(|f| f.parent())
                    .map(|d| d.display().to_string())
                    .unwrap_or_default();
                format!("{dir} ({} files)", many.len())
            }
        }
    }

    /// A VarBuilder over these tensors; shape mismatches and missing names become
    /// candle errors that [`Weights::model_error`] puts in context.
    pub fn var_builder(&self) -> VarBuilder<'static> {
        VarBuilder::from_tensors(self.tensors.clone(), self.dtype, &self.device)
    }

    pub fn model_error(&self, what: &str, e: candle_core::Error) -> LoadError {
        LoadError::Model {
            what: what.to_string(),
            location: self.location(),
            message: e.to_string(),
        }
    }
}

/// How the loader keeps one tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keep {
    /// Its dtype (integer tensors keep theirs). `U8` for a float 2-D weight
    /// means 8-bit: see [`quantize_int8`].
    pub dtype: DType,
    /// A 2-D weight `[out, in]` stored as `[in, out]`: the layout the CPU's
    /// products read fastest when few rows go through (a model that asks for it
    /// knows its weights come this way).
    pub transposed: bool,
}

impl Keep {
    pub fn as_is(dtype: DType) -> Keep {
        Keep {
            dtype,
            transposed: false,
        }
    }
}

/// Where an 8-bit weight `NAME` keeps its scales: `NAME_scale`.
pub const INT8_SCALE_SUFFIX: &str = "_scale";

/// Inputs that share one 8-bit scale: 32, as GGUF's Q8_0; a whole row where the
/// input width does not divide by it.
pub fn int8_block(inputs: usize) -> usize {
    if inputs.is_multiple_of(32) {
        32
    } else {
        inputs.max(1)
    }
}

/// The shape of an 8-bit weight's scales: one per (output, block of
/// [`int8_block`] inputs), laid out like the weight (`[out, in/block]`, or
/// `[in/block, out]` for a transposed `[in, out]` weight).
pub fn int8_scales_shape(inputs: usize, outputs: usize, transposed: bool) -> (usize, usize) {
    let blocks = inputs / int8_block(inputs);
    if transposed {
        (blocks, outputs)
    } else {
        (outputs, blocks)
    }
}

/// A 2-D float weight as 8-bit integers: symmetric, `w ≈ (q − 128)·scale`, `q` a
/// u8 (candle has no i8), one f32 scale per output and block of [`int8_block`]
/// inputs, the block's largest |w| / 127, so every weight errs by at most half a
/// step of its block's range (a per-output scale would let one large weight
/// coarsen a whole row). Outputs are rows of `[out, in]`, columns of a transposed
/// `[in, out]`. Returns (`q` in `w`'s layout, the scales, [`int8_scales_shape`]).
pub fn quantize_int8(w: &Tensor, transposed: bool) -> candle_core::Result<(Tensor, Tensor)> {
    let (r, c) = w.dims2()?;
    let values = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let (inputs, outputs) = if transposed { (r, c) } else { (c, r) };
    let block = int8_block(inputs);
    let shape = int8_scales_shape(inputs, outputs, transposed);
    // The scale of weight (row i, column j) of the stored layout.
    let at = |i: usize, j: usize| {
        if transposed {
            (i / block) * c + j
        } else {
            i * shape.1 + j / block
        }
    };
    let mut largest = vec![0f32; shape.0 * shape.1];
    for (i, row) in values.chunks(c).enumerate() {
        for (j, v) in row.iter().enumerate() {
            let m = &mut largest[at(i, j)];
            *m = m.max(v.abs());
        }
    }
    let scales: Vec<f32> = largest
        .iter()
        .map(|m| if *m > 0.0 { m / 127.0 } else { 1.0 })
        .collect();
    let inverse: Vec<f32> = scales.iter().map(|s| 1.0 / s).collect();
    let mut q = vec![0u8; values.len()];
    for (i, (dst, row)) in q.chunks_mut(c).zip(values.chunks(c)).enumerate() {
        for (j, (d, v)) in dst.iter_mut().zip(row).enumerate() {
            *d = ((v * inverse[at(i, j)]).round().clamp(-127.0, 127.0) + 128.0) as u8;
        }
    }
    let device = w.device();
    Ok((
        Tensor::from_vec(q, (r, c), device)?,
        Tensor::from_vec(scales, shape, device)?,
    ))
}

/// `t` `[r, c]` as a contiguous `[c, r]`: on the CPU straight from the tensor's
/// buffer into the new one, in tiles that stay in cache, split over rayon's
/// threads (candle's strided copy goes element by element through an index
/// iterator).
pub fn transposed(t: &Tensor) -> candle_core::Result<Tensor> {
    use candle_core::{CpuStorage, Storage};
    let (r, c) = t.dims2()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        drop(storage);
        return t.t()?.contiguous();
    };
    let Some((a, b)) = layout.contiguous_offsets() else {
        drop(storage);
        return t.t()?.contiguous();
    };
    let shape = (c, r);
    match cpu {
        CpuStorage::F32(v) => Tensor::from_vec(transpose(&v[a..b], r, c), shape, &Device::Cpu),
        CpuStorage::BF16(v) => Tensor::from_vec(transpose(&v[a..b], r, c), shape, &Device::Cpu),
        CpuStorage::F16(v) => Tensor::from_vec(transpose(&v[a..b], r, c), shape, &Device::Cpu),
        _ => {
            drop(storage);
            t.t()?.contiguous()
        }
    }
}

/// `src` `[r, c]` row-major → `[c, r]`, a band of destination rows per task.
fn transpose<T: Copy + Send + Sync + Default>(src: &[T], r: usize, c: usize) -> Vec<T> {
    use rayon::prelude::*;
    const TILE: usize = 64;
    let mut dst = vec![T::default(); src.len()];
    // Each task fills TILE destination rows (source columns j0..j0+TILE).
    dst.par_chunks_mut(TILE * r)
        .enumerate()
        .for_each(|(band, out)| {
            let j0 = band * TILE;
            let cols = out.len() / r;
            for i0 in (0..r).step_by(TILE) {
                let rows = TILE.min(r - i0);
                for dj in 0..cols {
                    let row = &mut out[dj * r + i0..dj * r + i0 + rows];
                    for (di, d) in row.iter_mut().enumerate() {
                        *d = src[(i0 + di) * c + j0 + dj];
                    }
                }
            }
        });
    dst
}

fn convert(t: Tensor, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
    // Integer buffers (position ids and the like) keep their type.
    let t = if t.dtype().is_float() {
        t.to_dtype(dtype)?
    } else {
        t
    };
    t.to_device(device)
}

/// The shard files named by a `*.safetensors.index.json` (`weight_map`).
fn shards(index: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let text = std::fs::read_to_string(index).map_err(|e| LoadError::file(index, e))?;
    let json: serde_json::Value = parse_json(index, &text)?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| LoadError::file(index, "no `weight_map` object"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files = Vec::new();
    for name in map.values().filter_map(|v| v.as_str()) {
        // Shards lie beside their index: a name with folders, `..` or a root
        // would read files the folder check never saw.
        let plain = matches!(
            Path::new(name).components().collect::<Vec<_>>().as_slice(),
            [std::path::Component::Normal(_)]
        );
        if !plain {
            return Err(LoadError::file(
                index,
                format!("shard {name:?} is not a file name beside the index"),
            ));
        }
        files.push(dir.join(name));
    }
    files.sort();
    files.dedup();
    if let Some(missing) = files.iter().find(|f| !f.is_file()) {
        return Err(LoadError::file(
            index,
            format!("lists {} which does not exist", missing.display()),
        ));
    }
    Ok(files)
}

/// Reads a component's `config.json` into its config struct.
pub fn read_config<T: serde::de::DeserializeOwned>(dir: &Path) -> Result<T, LoadError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| LoadError::file(&path, e))?;
    parse_json(&path, &text)
}

/// JSON as diffusers writes it: `Infinity`, `-Infinity` and `NaN` are accepted
/// (they are not JSON, but diffusers' configs contain them).
pub fn parse_json<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, LoadError> {
    let cleaned = replace_non_json_numbers(text);
    serde_json::from_str(&cleaned)
        .map_err(|e| LoadError::file(path, format!("invalid config: {e}")))
}

fn replace_non_json_numbers(text: &str) -> String {
    // Outside strings only: the tokens become large finite numbers or null.
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_string = true;
        }
        let replaced = [
            ("-Infinity", "-1e308"),
            ("Infinity", "1e308"),
            ("NaN", "null"),
        ]
        .iter()
        .find(|(token, _)| rest.starts_with(token));
        match replaced {
            Some((token, with)) => {
                out.push_str(with);
                rest = &rest[token.len()..];
            }
            None => {
                out.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    out
}

/// Bytes the weights at `path` (a weight file, or a folder of them) take once
/// loaded, read off the safetensors headers alone: each tensor at the dtype
/// `keep(name, stored dtype)` gives it (8-bit weights with their scales). A
/// folder counts its `*.safetensors` files (shards and variants alike: more,
/// never less); one without them counts its PyTorch checkpoints (`.bin`, `.pth`,
/// `.pt`, `.ckpt`) from their pickles. Any other file is read as a checkpoint.
/// For memory budgets, before anything is loaded.
pub fn loaded_bytes(path: &Path, keep: impl Fn(&str, DType) -> Keep) -> Result<u64, LoadError> {
    let is_safetensors = |p: &Path| p.extension().is_some_and(|e| e == "safetensors");
    let is_pickle = |p: &Path| {
        p.extension()
            .is_some_and(|e| ["bin", "pth", "pt", "ckpt"].iter().any(|x| e == *x))
    };
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut listed: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| LoadError::file(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        listed.sort();
        if listed.iter().any(|p| is_safetensors(p)) {
            listed.retain(|p| is_safetensors(p));
        } else {
            listed.retain(|p| is_pickle(p));
        }
        listed
    } else {
        vec![path.to_path_buf()]
    };
    let mut total = 0u64;
    for file in files {
        let sizes = if is_safetensors(&file) {
            crate::safetensors_reader::tensor_sizes(&file).map_err(|e| {
                LoadError::file(&file, format!("not a readable safetensors file: {e}"))
            })?
        } else {
            pickle_sizes(&file)?
        };
        for (name, stored, n) in sizes {
            let kept = if stored.is_float() {
                keep(&name, stored).dtype
            } else {
                stored
            };
            let n = n as u64;
            let bytes = match kept {
                // One byte an element and an f32 scale per block of inputs.
                DType::U8 if stored.is_float() => n.saturating_add(n / 8),
                other => n.saturating_mul(other.size_in_bytes() as u64),
            };
            total = total.saturating_add(bytes);
        }
    }
    Ok(total)
}

/// A PyTorch checkpoint's tensors (name, dtype, elements) from its pickle
/// alone, at the top level or under `state_dict` as official checkpoints keep them.
fn pickle_sizes(file: &Path) -> Result<Vec<(String, DType, usize)>, LoadError> {
    let read = |key| {
        candle_core::pickle::read_pth_tensor_info(file, false, key)
            .map_err(|e| LoadError::file(file, format!("not a readable PyTorch checkpoint: {e}")))
    };
    let mut infos = read(None)?;
    if infos.is_empty() {
        infos = read(Some("state_dict"))?;
    }
    Ok(infos
        .into_iter()
        .map(|i| (i.name, i.dtype, i.layout.shape().elem_count()))
        .collect())
}

/// Elements of the parameters a model asks its `VarBuilder` for, counted
/// without making them (each is a broadcast zero): what a model of some config
/// will take, before it is made. Buffers a constructor makes itself (a layer
/// norm's ones, sized by one width) are not counted: bound the config's sizes
/// first, as `Config::check_sizes` does.
pub fn count_parameters<T>(
    dtype: DType,
    build: impl FnOnce(VarBuilder) -> candle_core::Result<T>,
) -> candle_core::Result<u64> {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    struct Counting(Arc<AtomicU64>);
    impl candle_nn::var_builder::SimpleBackend for Counting {
        fn get(
            &self,
            s: candle_core::Shape,
            _name: &str,
            _h: candle_nn::Init,
            dtype: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            self.0.fetch_add(s.elem_count() as u64, Ordering::Relaxed);
            Tensor::zeros((), dtype, dev)?.broadcast_as(s)
        }
        fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
            candle_core::bail!("{name}: a model being counted has no stored tensors")
        }
        fn contains_tensor(&self, _name: &str) -> bool {
            false
        }
    }
    let count = Arc::new(AtomicU64::new(0));
    let vb = VarBuilder::from_backend(Box::new(Counting(count.clone())), dtype, Device::Cpu);
    build(vb)?;
    Ok(count.load(Ordering::Relaxed))
}

/// A config size checked against a bound far beyond the real models', before
/// anything is sized by it.
pub fn check_size(what: &str, value: usize, max: usize) -> Result<(), String> {
    if value > max {
        Err(format!(
            "`{what}` is {value}; this loader takes at most {max}"
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pixart_config(heads: usize, head_dim: usize, layers: usize) -> crate::pixart::Config {
        serde_json::from_value(serde_json::json!({
            "num_attention_heads": heads, "attention_head_dim": head_dim, "num_layers": layers,
            "sample_size": 8, "in_channels": 4, "out_channels": 8, "caption_channels": 32,
            "kv_compress_config": {"sampling": "conv", "scale_factor": 2, "kv_compress_layer": [1]},
        }))
        .unwrap()
    }

    /// The count equals what building the model really allocates, and a model
    /// far too large to make is counted without being made.
    #[test]
    fn parameters_are_counted_as_a_model_would_allocate_them() {
        let cfg = pixart_config(2, 8, 2);
        let counted = count_parameters(DType::F32, |vb| {
            crate::pixart::PixArtTransformer::new(vb, &cfg)
        })
        .unwrap();
        let varmap = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        crate::pixart::PixArtTransformer::new(vb, &cfg).unwrap();
        let made: usize = varmap
            .all_vars()
            .iter()
            .map(|v| v.as_tensor().elem_count())
            .sum();
        assert_eq!(counted, made as u64);
        let huge = pixart_config(16, 1024, 256);
        let started = std::time::Instant::now();
        let counted = count_parameters(DType::F32, |vb| {
            crate::pixart::PixArtTransformer::new(vb, &huge)
        })
        .unwrap();
        assert!(counted > 256 * 12 * 16384 * 16384, "{counted}");
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
        let mut wide = pixart_config(16, 1024, 2);
        wide.attention_head_dim = 1 << 40;
        let refused = wide.check().unwrap_err();
        assert!(refused.contains("attention_head_dim"), "{refused}");
    }

    #[test]
    fn loaded_bytes_follow_the_headers_and_the_kept_dtype() {
        let dir = std::env::temp_dir().join(format!("loaded-bytes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let w = Tensor::zeros((64, 32), DType::BF16, &Device::Cpu).unwrap();
        let ids = Tensor::zeros(10, DType::I64, &Device::Cpu).unwrap();
        candle_core::safetensors::save(
            &HashMap::from([("w".to_string(), w), ("ids".to_string(), ids)]),
            dir.join("model.safetensors"),
        )
        .unwrap();
        std::fs::write(dir.join("pytorch_model.bin"), vec![0u8; 1000]).unwrap();
        // Integers keep their dtype; floats take the kept one; pickles beside
        // safetensors are not counted.
        let f32 = loaded_bytes(&dir, |_, _| Keep::as_is(DType::F32)).unwrap();
        assert_eq!(f32, 64 * 32 * 4 + 80);
        let int8 = loaded_bytes(&dir, |_, _| Keep::as_is(DType::U8)).unwrap();
        assert_eq!(int8, 64 * 32 + 64 * 32 / 8 + 80);
        std::fs::remove_file(dir.join("model.safetensors")).unwrap();
        // A pickle counts its tensors' elements, not its file's length.
        assert!(loaded_bytes(&dir, |_, _| Keep::as_is(DType::F32)).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        let f32 = |p: &Path| loaded_bytes(p, |_, _| Keep::as_is(DType::F32)).unwrap();
        let pth = f32(&fixtures.join("tiny-pixart-official.pth"));
        let folder = f32(&fixtures.join("tiny-pixart/transformer"));
        // The official file adds its pos_embed table and null caption.
        assert!(pth > folder && pth < folder * 2, "{pth} {folder}");
    }

    #[test]
    fn diffusers_non_json_numbers_are_read() {
        #[derive(serde::Deserialize)]
        struct C {
            lambda_min_clipped: f64,
            name: String,
        }
        let c: C = parse_json(
            Path::new("x"),
            r#"{"lambda_min_clipped": -Infinity, "name": "NaN -Infinity"}"#,
        )
        .unwrap();
        assert!(c.lambda_min_clipped < -1e300);
        assert_eq!(c.name, "NaN -Infinity");
    }

    /// Tensors the loader keeps transposed equal candle's transpose, in every
    /// float dtype and for sizes that do not fill the tiles.
    #[test]
    fn transposed_weights_equal_candle_transpose() {
        let dir = std::env::temp_dir().join(format!("pixart-keep-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let v: Vec<f32> = (0..70 * 45).map(|i| i as f32 * 0.25 - 3.0).collect();
        let w = Tensor::from_vec(v, (70, 45), &Device::Cpu).unwrap();
        let b = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap();
        let tensors: HashMap<String, Tensor> =
            [("w".to_string(), w.clone()), ("b".into(), b)].into();
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let loaded =
                Weights::from_folder_choosing(&dir, &["model"], dtype, &Device::Cpu, |n, _| Keep {
                    dtype,
                    transposed: n == "w",
                })
                .unwrap();
            let want = w
                .to_dtype(dtype)
                .unwrap()
                .t()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let got = loaded.get("w").unwrap();
            assert_eq!(got.dims(), [45, 70]);
            let diff = (got.to_dtype(DType::F32).unwrap() - want)
                .unwrap()
                .abs()
                .unwrap();
            assert_eq!(diff.max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
            assert_eq!(loaded.get("b").unwrap().dims(), [3]);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

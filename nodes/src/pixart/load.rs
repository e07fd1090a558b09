//! Loading PixArt-α components from the layouts real checkpoints come in: a
//! diffusers pipeline folder (`model_index.json` + component folders), a single
//! component folder, or an official `.pth` transformer checkpoint. Loaded models go
//! through the shared model cache.

use super::denoiser::{Denoiser, DEFAULT_VAE_SCALE, NULL_CAPTION};
use crate::device::{check_dtype_device, TextWeights};
use crate::model_cache::{self as cache, key};
use candle_core::{DType, Device, Tensor};
use pixart_models::pixart::{self, PixArtTransformer};
use pixart_models::schedulers::SchedulerConfig;
use pixart_models::t5::{self, Projections, T5Encoder};
use pixart_models::tokenizer::T5Tokenizer;
use pixart_models::vae::{self, AutoencoderKl};
use pixart_models::weights::{read_config, Keep, LoadError, Weights};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A scheduler configuration with the sampler chosen to run it.
#[derive(Clone, Debug)]
pub struct SchedulerChoice {
    pub config: SchedulerConfig,
    pub sampler: String,
}

/// The downsampling factor of the VAE next to a pipeline's `transformer/`
/// folder (2^(levels − 1), as diffusers computes it).
fn sibling_vae_scale(transformer_dir: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(transformer_dir.parent()?.join("vae/config.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    let levels = json.get("block_out_channels")?.as_array()?.len();
    (levels >= 1).then(|| 1 << (levels - 1))
}

/// The null caption our trainer stores next to a diffusers transformer
/// (`null_caption.safetensors`, tensor `y_embedding`), if there is one.
fn read_null_caption(
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<Option<Tensor>, LoadError> {
    let file = path.join(NULL_CAPTION);
    if !path.is_dir() || !file.is_file() {
        return Ok(None);
    }
    let mut t =
        candle_core::safetensors::load(&file, device).map_err(|e| LoadError::file(&file, e))?;
    match t.remove("y_embedding") {
        Some(y) => Ok(Some(
            y.to_dtype(dtype).map_err(|e| LoadError::file(&file, e))?,
        )),
        None => Err(LoadError::file(&file, "no tensor `y_embedding`")),
    }
}

/// The component folders of a diffusers pipeline folder (`model_index.json`).
pub struct PipelineFolder {
    pub root: PathBuf,
}

impl PipelineFolder {
    /// The component folders a PixArt-α or PixArt-Σ pipeline folder holds.
    pub const PARTS: [&str; 5] = [
        "tokenizer",
        "text_encoder",
        "transformer",
        "vae",
        "scheduler",
    ];

    pub fn open(root: &Path) -> Result<PipelineFolder, LoadError> {
        let index = root.join("model_index.json");
        if !index.is_file() {
            return Err(LoadError::file(
                root,
                "not a diffusers pipeline folder (no model_index.json); load components with their own nodes",
            ));
        }
        let text = std::fs::read_to_string(&index).map_err(|e| LoadError::file(&index, e))?;
        let json: serde_json::Value = pixart_models::weights::parse_json(&index, &text)?;
        let class = json
            .get("_class_name")
            .and_then(|c| c.as_str())
            .unwrap_or("");
        if !class.starts_with("PixArt") {
            return Err(LoadError::file(
                &index,
                format!("a {class:?} pipeline, not PixArt-α or PixArt-Σ"),
            ));
        }
        for part in PipelineFolder::PARTS {
            if json.get(part).is_none() || !root.join(part).is_dir() {
                return Err(LoadError::file(
                    &index,
                    format!("the pipeline has no `{part}` component folder"),
                ));
            }
        }
        Ok(PipelineFolder {
            root: root.to_path_buf(),
        })
    }

    pub fn part(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

pub fn tokenizer(dir: &Path) -> Result<Arc<T5Tokenizer>, LoadError> {
    cache::get_or_load(&key("tokenizer", dir, DType::U8, &Device::Cpu), || {
        let length = sequence_length(dir);
        T5Tokenizer::from_folder(dir).map(|t| (t.with_sequence_length(length), 1 << 20))
    })
}

/// The prompt length of the pipeline a tokenizer folder belongs to: 300 tokens
/// in a `PixArtSigmaPipeline` folder, else PixArt-α's 120.
fn sequence_length(tokenizer_dir: &Path) -> usize {
    let class = tokenizer_dir
        .parent()
        .map(|root| root.join("model_index.json"))
        .and_then(|index| std::fs::read_to_string(index).ok())
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|json| json.get("_class_name")?.as_str().map(str::to_string));
    match class.as_deref() {
        Some("PixArtSigmaPipeline") => pixart_models::tokenizer::SIGMA_SEQUENCE_LENGTH,
        _ => pixart_models::tokenizer::ALPHA_SEQUENCE_LENGTH,
    }
}

/// A T5 encoder folder, through the model cache (shared by every node and run
/// that loads the same folder the same way).
pub fn text_encoder(
    dir: &Path,
    dtype: DType,
    weights: TextWeights,
    device: &Device,
) -> Result<Arc<T5Encoder>, LoadError> {
    let kind = format!("t5-{}", weights.name());
    cache::get_or_load(&key(&kind, dir, dtype, device), || {
        read_text_encoder(dir, dtype, weights, device)
    })
}

/// bf16 projection weights widen inside the CPU's f32 products only.
pub fn check_text_weights(
    dir: &Path,
    dtype: DType,
    weights: TextWeights,
    device: &Device,
) -> Result<(), LoadError> {
    if weights != TextWeights::Auto && !(device.is_cpu() && dtype == DType::F32) {
        return Err(LoadError::file(
            dir,
            format!(
                "{} text encoder weights are for f32 on the CPU; elsewhere choose dtype bf16",
                weights.name()
            ),
        ));
    }
    Ok(())
}

/// Whether a T5 weight is one of the projections the CPU keeps narrow and transposed.
fn is_projection(name: &str) -> bool {
    name.starts_with("encoder.block.")
        && (name.contains(".SelfAttention.") || name.contains(".DenseReluDense."))
        && !name.contains("relative_attention_bias")
}

/// How the T5 loader keeps each tensor (by name and stored dtype), for the
/// model's `dtype` and the `weights` choice.
pub fn text_encoder_keep(
    dtype: DType,
    weights: TextWeights,
    device: &Device,
) -> impl Fn(&str, DType) -> Keep {
    let narrow = device.is_cpu() && dtype == DType::F32;
    move |name: &str, stored: DType| {
        if !is_projection(name) {
            return Keep::as_is(dtype);
        }
        // On the CPU in f32 the products read the projections transposed, the
        // layout gemm streams fastest with T5's few rows.
        let kept = if dtype == DType::F16 && name.ends_with("DenseReluDense.wo.weight") {
            // transformers keeps T5's `wo` in f32 in half precision.
            DType::F32
        } else if narrow && weights == TextWeights::Int8 {
            DType::U8
        } else if narrow && (weights == TextWeights::Bf16 || stored == DType::BF16) {
            DType::BF16
        } else {
            dtype
        };
        // Transposed here only where quantizing needs it: the others are
        // transposed at their first product (`Projections::late`).
        Keep {
            dtype: kept,
            transposed: narrow && weights == TextWeights::Int8,
        }
    }
}

/// A T5 encoder folder read afresh (no model cache), with its size in bytes.
pub fn read_text_encoder(
    dir: &Path,
    dtype: DType,
    weights: TextWeights,
    device: &Device,
) -> Result<(T5Encoder, usize), LoadError> {
    check_text_weights(dir, dtype, weights, device)?;
    let narrow = device.is_cpu() && dtype == DType::F32;
    let cfg: t5::Config = read_config(dir)?;
    let choose = text_encoder_keep(dtype, weights, device);
    let w = Weights::from_folder_choosing(dir, &["model", "pytorch_model"], dtype, device, choose)?;
    // One dtype for every projection: bf16 only where all are (a checkpoint
    // mixing bf16 and f32 ones computes them all from f32, widened exactly).
    let all_bf16 = w
        .names()
        .filter(|n| is_projection(n))
        .all(|n| w.get(n).is_some_and(|t| t.dtype() == DType::BF16));
    let proj = Projections {
        dtype: if narrow && weights == TextWeights::Int8 {
            DType::U8
        } else if narrow && all_bf16 {
            DType::BF16
        } else {
            dtype
        },
        transposed: narrow,
        late: narrow && weights != TextWeights::Int8,
    };
    let model = T5Encoder::with_projections(w.var_builder(), &cfg, proj)
        .map_err(|e| w.model_error("T5 encoder", e))?;
    Ok((model, w.bytes()))
}

pub fn vae(dir: &Path, dtype: DType, device: &Device) -> Result<Arc<AutoencoderKl>, LoadError> {
    check_dtype_device(dir, dtype, device)?;
    cache::get_or_load(&key("vae", dir, dtype, device), || {
        let cfg: vae::Config = read_config(dir)?;
        let w = Weights::from_folder(dir, &["diffusion_pytorch_model", "model"], dtype, device)?;
        let model =
            AutoencoderKl::new(w.var_builder(), &cfg).map_err(|e| w.model_error("VAE", e))?;
        Ok((model, w.bytes()))
    })
}

pub fn scheduler(dir: &Path) -> Result<SchedulerChoice, LoadError> {
    let path = dir.join("scheduler_config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| LoadError::file(&path, e))?;
    let config: SchedulerConfig = pixart_models::weights::parse_json(&path, &text)?;
    config.check().map_err(|e| LoadError::file(&path, e))?;
    Ok(SchedulerChoice {
        sampler: config.default_sampler().to_string(),
        config,
    })
}

/// A transformer from a diffusers folder, a `.safetensors` file, or an official
/// `.pth` checkpoint (its `config.json`, if any, sits next to it).
pub fn transformer(path: &Path, dtype: DType, device: &Device) -> Result<Arc<Denoiser>, LoadError> {
    check_dtype_device(path, dtype, device)?;
    cache::get_or_load(&key("transformer", path, dtype, device), || {
        let (mut w, config_dir) = if path.is_dir() {
            let w =
                Weights::from_folder(path, &["diffusion_pytorch_model", "model"], dtype, device)?;
            (w, Some(path.to_path_buf()))
        } else if path.is_file() {
            let w = match path.extension().and_then(|e| e.to_str()) {
                Some("safetensors") => {
                    Weights::from_safetensors(&[path.to_path_buf()], dtype, device)?
                }
                _ => Weights::from_pth(path, Some("state_dict"), dtype, device)?,
            };
            (
                w,
                path.parent()
                    .map(Path::to_path_buf)
                    .filter(|d| d.join("config.json").is_file()),
            )
        } else {
            return Err(LoadError::file(path, "no such file or folder"));
        };
        let official = w.contains("x_embedder.proj.weight");
        let pos_tokens = w
            .get("pos_embed")
            .map(|t| t.elem_count() / t.dims().last().copied().unwrap_or(1));
        let null_caption = if official {
            pixart::convert_official(&mut w)?
        } else {
            read_null_caption(path, dtype, device)?
        };
        let mut cfg: pixart::Config = match &config_dir {
            Some(dir) => read_config(dir)?,
            None => pixart::infer_official_config(&w, pos_tokens)
                .map_err(|e| LoadError::file(path, e))?,
        };
        if cfg.kv_compress_config.is_none() {
            // An official KV-compressed checkpoint beside a config without the field.
            cfg.kv_compress_config = pixart::infer_kv_compress(&w);
        }
        let model = PixArtTransformer::new(w.var_builder(), &cfg)
            .map_err(|e| w.model_error("PixArt transformer", e))?;
        let bytes = w.bytes();
        let weights = w
            .names()
            .filter_map(|n| Some((n.to_string(), w.get(n)?.clone())))
            .collect();
        Ok((
            Denoiser {
                model: Arc::new(model),
                control: None,
                null_caption,
                weights,
                vae_scale_factor: config_dir
                    .as_deref()
                    .and_then(sibling_vae_scale)
                    .unwrap_or(DEFAULT_VAE_SCALE),
            },
            bytes,
        ))
    })
}

//! `train.precompute`: encodes a dataset once — VAE posterior (mean, std) of each
//! centre-cropped image and T5 features (embeddings, mask) of its caption — into
//! a safetensors cache on disk, as the official recipe does, so training never
//! holds T5 or the VAE. A cache whose index matches the dataset is reused.

use super::buckets;
use super::dataset::Dataset;
use crate::fsutil::atomic_write;
use candle_core::{DType, Device, Tensor};
use pixart_models::t5::T5Encoder;
use pixart_models::tokenizer::T5Tokenizer;
use pixart_models::vae::AutoencoderKl;
use pixart_runtime::{
    Handle, InputSpec, Inputs, Node, NodeContext, NodeError, NodeSpec, Outputs, PortType, Value,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// An on-disk feature cache: `item-NNNNNN.safetensors` files with `vae_mean`,
/// `vae_std` `[C, h, w]`, `text` `[L, D]`, `mask` `[L]`, and in the metadata the
/// caption, class label and micro-conditions of the image.
#[derive(Clone, Debug)]
pub struct Features {
    pub dir: PathBuf,
    pub files: Vec<PathBuf>,
    pub resolution: usize,
    pub max_length: usize,
    /// The VAE's `scaling_factor` (0.18215 for SD's): latents = posterior × it.
    pub scaling_factor: f64,
    /// Pixels per latent cell of that VAE.
    pub vae_scale: usize,
    /// Identifies the data the cache was made from.
    pub key: String,
    /// Every item has a control latent (made with `control`).
    pub control: bool,
}

/// One cached item.
pub struct FeatureItem {
    pub vae_mean: Tensor,
    pub vae_std: Tensor,
    pub text: Tensor,
    pub mask: Tensor,
    pub caption: String,
    /// The class label (stage 1): the dataset's label, or the caption without one.
    pub label: String,
    /// Micro-conditions: the original image size (height, width) and the ratio of
    /// the aspect bin it was cropped to (1 for square crops).
    pub hw: (f32, f32),
    pub ratio: f32,
    /// The control image's VAE posterior mean `[C, h, w]` (ControlNet training).
    pub control: Option<Tensor>,
}

impl FeatureItem {
    pub fn read(path: &Path, device: &Device) -> Result<FeatureItem, NodeError> {
        let bytes = std::fs::read(path).map_err(|e| NodeError::io(path, e))?;
        let bad = |e: String| NodeError::msg(format!("{}: {e}", path.display()));
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let meta = meta.metadata().clone().unwrap_or_default();
        let tensors = candle_core::safetensors::load_buffer(&bytes, device)?;
        let get = |k: &str| {
            tensors
                .get(k)
                .cloned()
                .ok_or_else(|| bad(format!("no tensor `{k}` (re-run train.precompute)")))
        };
        let num =
            |k: &str, default: f32| meta.get(k).and_then(|v| v.parse().ok()).unwrap_or(default);
        let caption = meta.get("caption").cloned().unwrap_or_default();
        Ok(FeatureItem {
            vae_mean: get("vae_mean")?,
            vae_std: get("vae_std")?,
            text: get("text")?,
            mask: get("mask")?,
            label: meta
                .get("label")
                .cloned()
                .unwrap_or_else(|| caption.clone()),
            caption,
            hw: (num("height", 0.0), num("width", 0.0)),
            ratio: num("ratio", 1.0),
            control: tensors.get("control").cloned(),
        })
    }
}

fn decode(path: &Path) -> Result<image::RgbImage, NodeError> {
    Ok(image::ImageReader::open(path)
        .map_err(|e| NodeError::io(path, e))?
        .with_guessed_format()
        .map_err(|e| NodeError::io(path, e))?
        .decode()
        .map_err(|e| NodeError::msg(format!("{}: cannot decode the image: {e}", path.display())))?
        .to_rgb8())
}

/// Resizes so the image covers `height`×`width` (bilinear with antialiasing, as
/// PIL) keeping its aspect, and crops the centre; `[1, 3, height, width]` in −1..1.
fn cover_crop(
    img: &image::RgbImage,
    height: usize,
    width: usize,
    device: &Device,
) -> Result<Tensor, NodeError> {
    let (w, h) = (img.width() as f64, img.height() as f64);
    let scale = (height as f64 / h).max(width as f64 / w);
    let (nw, nh) = (
        ((w * scale).round() as u32).max(width as u32),
        ((h * scale).round() as u32).max(height as u32),
    );
    let resized = image::imageops::resize(img, nw, nh, image::imageops::FilterType::Triangle);
    let (left, top) = ((nw - width as u32) / 2, (nh - height as u32) / 2);
    let crop =
        image::imageops::crop_imm(&resized, left, top, width as u32, height as u32).to_image();
    let data: Vec<f32> = crop
        .into_raw()
        .iter()
        .map(|&b| b as f32 / 127.5 - 1.0)
        .collect();
    Ok(Tensor::from_vec(data, (1, height, width, 3), &Device::Cpu)?
        .permute((0, 3, 1, 2))?
        .contiguous()?
        .to_device(device)?)
}

/// Resizes the shorter side to `size` and crops the centre square; returns
/// `[1, 3, size, size]` in −1..1 and the original (height, width).
pub fn load_square(
    path: &Path,
    size: usize,
    device: &Device,
) -> Result<(Tensor, (u32, u32)), NodeError> {
    let img = decode(path)?;
    Ok((
        cover_crop(&img, size, size, device)?,
        (img.height(), img.width()),
    ))
}

/// The image cropped for training: to the nearest aspect bucket when the
/// dataset is bucketed, else the centre square. Returns the pixels, the
/// original (height, width) and the bucket's ratio.
fn load_for_training(
    path: &Path,
    ds: &Dataset,
    device: &Device,
) -> Result<(Tensor, (u32, u32), f64), NodeError> {
    let img = decode(path)?;
    let original = (img.height(), img.width());
    let (h, w, ratio) = if ds.buckets {
        let bin = buckets::closest(
            original.0 as usize,
            original.1 as usize,
            &buckets::bins(ds.resolution),
        );
        (bin.height, bin.width, bin.ratio)
    } else {
        (ds.resolution, ds.resolution, 1.0)
    };
    Ok((cover_crop(&img, h, w, device)?, original, ratio))
}

/// The control image of `image`: the file of the same name in `dir`.
fn control_file(dir: &Path, image: &Path) -> PathBuf {
    dir.join(image.file_name().unwrap_or_default())
}

/// A control image, cropped as its training image (`original` (height, width))
/// is to `height`×`width`; it must have that image's aspect, or the crops
/// would show different parts.
fn load_control(
    path: &Path,
    original: (u32, u32),
    height: usize,
    width: usize,
    device: &Device,
) -> Result<Tensor, NodeError> {
    let img = decode(path)?;
    let aspect = |h: u32, w: u32| f64::from(w) / f64::from(h.max(1));
    let (want, got) = (
        aspect(original.0, original.1),
        aspect(img.height(), img.width()),
    );
    if (got - want).abs() > 0.01 * want {
        return Err(NodeError::input(
            "control",
            format!(
                "{} is {}×{}, its image {}×{}: a control image must have its image's aspect",
                path.display(),
                img.width(),
                img.height(),
                original.1,
                original.0
            ),
        ));
    }
    cover_crop(&img, height, width, device)
}

/// What the cache was made from: images (path, size, mtime), captions, resolution
/// and text length. A different dataset gives a different index.
fn dataset_key(ds: &Dataset, max_length: usize, control: Option<&Path>) -> String {
    let stamp = |path: &Path| {
        let meta = std::fs::metadata(path).ok();
        let time = meta
            .as_ref()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        format!("{}|{}|{time}", path.display(), meta.map_or(0, |m| m.len()))
    };
    let mut h = blake3::Hasher::new();
    h.update(format!("{}|{}|{max_length}|", ds.resolution, ds.buckets).as_bytes());
    for item in &ds.items {
        h.update(format!("{}|{}|{:?}\n", stamp(&item.image), item.caption, item.label).as_bytes());
        // Only with control images, so caches made without stay valid.
        if let Some(dir) = control {
            h.update(format!("control {}\n", stamp(&control_file(dir, &item.image))).as_bytes());
        }
    }
    h.finalize().to_hex().to_string()
}

/// What the features are computed with: the tokenizer, text encoder and VAE,
/// identified by what they make of a fixed probe (the first caption, a fixed
/// pattern image), rounded so that summation order cannot change it. A retrained
/// VAE or another encoder gives another key, so stale features are never reused.
fn models_key(
    ds: &Dataset,
    tok: &T5Tokenizer,
    enc: &T5Encoder,
    vae: &AutoencoderKl,
    max_length: usize,
) -> Result<String, NodeError> {
    let device = enc.device().clone();
    let caption = ds.items.first().map_or("", |i| i.caption.as_str());
    let e = tok
        .encode(caption, max_length)
        .map_err(|e| NodeError::input("dataset", e))?;
    let ids = Tensor::from_vec(e.ids.clone(), (1, max_length), &device)?;
    let mask = Tensor::from_vec(e.mask, (1, max_length), &device)?.to_dtype(DType::F32)?;
    let text = enc.forward(&ids, &mask)?;
    let side = vae.config().scale_factor() * 4;
    let pattern: Vec<f32> = (0..3 * side * side)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let pixels = Tensor::from_vec(pattern, (1, 3, side, side), &device)?;
    let latents = vae.encode(&pixels)?.mean;
    let mut h = blake3::Hasher::new();
    h.update(format!("{:?}|", e.ids).as_bytes());
    for t in [text, latents] {
        for v in t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()? {
            h.update(format!("{v:.3e}|").as_bytes());
        }
    }
    Ok(h.finalize().to_hex()[..16].to_string())
}

pub struct Precompute {
    spec: NodeSpec,
}

impl Precompute {
    fn new() -> Self {
        Precompute {
            spec: NodeSpec::new("train.precompute", 1)
                .category("training")
                .describe(
                    "Encodes a dataset once into an on-disk cache (relative paths under the output \
                     directory): the VAE posterior mean and std of each centre-cropped image and the T5 \
                     features of its caption. A cache made from the same images, captions, resolution and \
                     length is reused; set `recompute` after changing the VAE or T5.",
                )
                .input(InputSpec::new("dataset", PortType::Dataset))
                .input(InputSpec::new("tokenizer", PortType::Tokenizer))
                .input(InputSpec::new("encoder", PortType::TextEncoder))
                .input(InputSpec::new("vae", PortType::Vae))
                .input(InputSpec::new("path", PortType::Path).describe("The cache folder."))
                .input(InputSpec::new("max_length", PortType::Int).default(120).min(1.0).max(512.0))
                .input(InputSpec::new("recompute", PortType::Bool).default(false))
                .input(
                    InputSpec::new("control", PortType::Path).optional().describe(
                        "A folder of control images (edge maps, depth, …) named as the dataset's \
                         images: each is cropped as its image and encoded (VAE mean) beside it, for \
                         ControlNet training (train.pixart `controlnet_blocks`).",
                    ),
                )
                .output("features", PortType::Features, "the feature cache")
                .output("computed", PortType::Int, "items encoded by this run (0 when the cache was reused)"),
        }
    }
}

impl Node for Precompute {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn run(&self, ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        let ds = inputs.handle::<Dataset>("dataset")?;
        let tok = inputs.handle::<T5Tokenizer>("tokenizer")?;
        let encoder = crate::pixart::text_encoder::from_input(&inputs, "encoder")?;
        let enc = &*encoder;
        let vae = inputs.handle::<AutoencoderKl>("vae")?;
        let dir = ctx.output_path(inputs.path("path")?)?;
        let max_length = inputs.int("max_length")? as usize;
        let control = match inputs.get("control") {
            Some(_) => Some(ctx.input_path(inputs.path("control")?)?),
            None => None,
        };
        if let Some(dir) = &control {
            let mut names: Vec<&std::ffi::OsStr> = ds
                .items
                .iter()
                .filter_map(|i| i.image.file_name())
                .collect();
            names.sort();
            if let Some(twice) = names.windows(2).find(|w| w[0] == w[1]) {
                return Err(NodeError::input(
                    "control",
                    format!(
                        "two images are named {}: control images are found by name, so the \
                         dataset's image names must differ",
                        twice[0].to_string_lossy()
                    ),
                ));
            }
            let missing: Vec<String> = ds
                .items
                .iter()
                .map(|i| control_file(dir, &i.image))
                .filter(|f| !f.is_file())
                .map(|f| f.display().to_string())
                .collect();
            if !missing.is_empty() {
                return Err(NodeError::input(
                    "control",
                    format!(
                        "{} of {} images have no control image of the same name: {}{}",
                        missing.len(),
                        ds.items.len(),
                        missing
                            .iter()
                            .take(3)
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", "),
                        if missing.len() > 3 { ", …" } else { "" }
                    ),
                ));
            }
        }
        let key = format!(
            "{}-{}",
            dataset_key(ds, max_length, control.as_deref()),
            models_key(ds, tok, enc, vae, max_length)?
        );
        let index_path = dir.join("index.json");
        let files: Vec<PathBuf> = (0..ds.items.len())
            .map(|i| dir.join(format!("item-{i:06}.safetensors")))
            .collect();
        let reusable = !inputs.bool("recompute")?
            && std::fs::read_to_string(&index_path)
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .is_some_and(|j| j["key"] == key.as_str())
            && files.iter().all(|f| f.is_file());
        let features = Features {
            dir: dir.clone(),
            files: files.clone(),
            resolution: ds.resolution,
            max_length,
            scaling_factor: vae.config().scaling_factor,
            vae_scale: vae.config().scale_factor(),
            key: key.clone(),
            control: control.is_some(),
        };
        let handle =
            |f: Features| Value::Handle(Handle::new(PortType::Features, f.files.len() * 64, f));
        // Across MPI ranks, rank 0 makes the cache and the others use it where
        // they can read it (one machine, or a shared filesystem).
        let world = crate::distributed::world_for(ctx.node_id());
        let mut cache_turn = world.map(|w| CacheTurn::new(w, ctx.node_id()));
        if let Some(turn) = cache_turn.as_mut().filter(|t| t.world.rank() != 0) {
            if let Some(dir) = turn.wait_for_rank0()? {
                if let Some(shared) = rank0_cache(&dir, &key, &features) {
                    eprintln!(
                        "rank {}: `{}` uses rank 0's feature cache at {}",
                        turn.world.rank(),
                        ctx.node_id(),
                        dir.display()
                    );
                    return Ok(
                        Outputs::one("features", handle(shared)).with("computed", Value::Int(0))
                    );
                }
                eprintln!(
                    "rank {}: rank 0's feature cache at {} cannot be read here (no shared \
                     filesystem?): this rank makes its own",
                    turn.world.rank(),
                    dir.display()
                );
            }
            cache_turn = None;
        }
        if reusable {
            if let Some(turn) = &mut cache_turn {
                turn.announce(&dir)?;
            }
            return Ok(Outputs::one("features", handle(features)).with("computed", Value::Int(0)));
        }
        let device = enc.device().clone();
        let n = ds.items.len();
        for (i, (item, file)) in ds.items.iter().zip(&files).enumerate() {
            ctx.check_cancelled()?;
            let (pixels, original, ratio) = load_for_training(&item.image, ds, &device)?;
            let post = vae.encode(&pixels)?;
            let control_mean = match &control {
                Some(dir) => {
                    let (_, _, h, w) = pixels.dims4()?;
                    let file = control_file(dir, &item.image);
                    let c = load_control(&file, original, h, w, &device)?;
                    Some(vae.encode(&c)?.mean.squeeze(0)?.to_dtype(DType::F32)?)
                }
                None => None,
            };
            let e = tok
                .encode(&item.caption, max_length)
                .map_err(|e| NodeError::input("dataset", e))?;
            let ids = Tensor::from_vec(e.ids, (1, max_length), &device)?;
            let mask = Tensor::from_vec(e.mask, (1, max_length), &device)?.to_dtype(DType::F32)?;
            let text = enc.forward(&ids, &mask)?;
            let mut tensors: HashMap<&str, Tensor> = HashMap::from([
                ("vae_mean", post.mean.squeeze(0)?.to_dtype(DType::F32)?),
                ("vae_std", post.std()?.squeeze(0)?.to_dtype(DType::F32)?),
                ("text", text.squeeze(0)?.to_dtype(DType::F32)?),
                ("mask", mask.squeeze(0)?),
            ]);
            if let Some(c) = control_mean {
                tensors.insert("control", c);
            }
            let mut meta = HashMap::from([
                ("caption".to_string(), item.caption.clone()),
                ("height".to_string(), original.0.to_string()),
                ("width".to_string(), original.1.to_string()),
                ("ratio".to_string(), ratio.to_string()),
            ]);
            if let Some(label) = &item.label {
                meta.insert("label".to_string(), label.clone());
            }
            let bytes = safetensors::serialize(tensors.iter().map(|(k, t)| (*k, t)), Some(meta))
                .map_err(|e| NodeError::msg(format!("cannot serialise features: {e}")))?;
            atomic_write(ctx, file, &bytes)?;
            ctx.progress(i as u64 + 1, n as u64);
            if let Some(turn) = &mut cache_turn {
                turn.still_working()?;
            }
        }
        let index = serde_json::json!({ "key": key, "count": n, "resolution": ds.resolution, "max_length": max_length });
        atomic_write(ctx, &index_path, index.to_string().as_bytes())?;
        if let Some(turn) = &mut cache_turn {
            turn.announce(&dir)?;
        }
        Ok(Outputs::one("features", handle(features)).with("computed", Value::Int(n as i64)))
    }
}

/// Rank 0 making the feature cache while the other ranks wait for it. Rank 0
/// says "still working" every few seconds (so that the others' wait, one
/// collective at a time, stays under the collective timeout however long the
/// cache takes), then "done" and where the cache is.
struct CacheTurn {
    world: &'static crate::distributed::World,
    what: String,
    last: std::time::Instant,
}

/// How often rank 0 tells the others it is still making the cache.
const STILL_WORKING_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

impl CacheTurn {
    fn new(world: &'static crate::distributed::World, node: &str) -> CacheTurn {
        CacheTurn {
            world,
            what: format!("waiting for rank 0's feature cache (`{node}`)"),
            last: std::time::Instant::now(),
        }
    }

    fn fail(&self, e: String) -> NodeError {
        NodeError::msg(e)
    }

    /// Rank 0, between items.
    fn still_working(&mut self) -> Result<(), NodeError> {
        if self.last.elapsed() >= STILL_WORKING_EVERY {
            self.world
                .broadcast_u64(0, &self.what)
                .map_err(|e| self.fail(e))?;
            self.last = std::time::Instant::now();
        }
        Ok(())
    }

    /// Rank 0, with the cache complete in `dir`.
    fn announce(&mut self, dir: &Path) -> Result<(), NodeError> {
        self.world
            .broadcast_u64(1, &self.what)
            .map_err(|e| self.fail(e))?;
        let resolved = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
        let mut bytes = resolved.to_string_lossy().into_owned().into_bytes();
        self.world
            .broadcast_bytes(&mut bytes, &self.what)
            .map_err(|e| self.fail(e))
    }

    /// The other ranks: waits until rank 0 is done; where its cache is.
    fn wait_for_rank0(&mut self) -> Result<Option<PathBuf>, NodeError> {
        while self
            .world
            .broadcast_u64(0, &self.what)
            .map_err(|e| self.fail(e))?
            == 0
        {}
        let mut bytes = Vec::new();
        self.world
            .broadcast_bytes(&mut bytes, &self.what)
            .map_err(|e| self.fail(e))?;
        Ok(String::from_utf8(bytes).ok().map(PathBuf::from))
    }
}

/// Rank 0's cache at `dir` as this rank's features, when this rank can read it
/// and it was made from the same data and models (its key is this rank's).
fn rank0_cache(dir: &Path, key: &str, own: &Features) -> Option<Features> {
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("index.json")).ok()?).ok()?;
    if index["key"] != key {
        return None;
    }
    let files: Vec<PathBuf> = (0..own.files.len())
        .map(|i| dir.join(format!("item-{i:06}.safetensors")))
        .collect();
    if !files.iter().all(|f| f.is_file()) {
        return None;
    }
    Some(Features {
        dir: dir.to_path_buf(),
        files,
        resolution: own.resolution,
        max_length: own.max_length,
        scaling_factor: own.scaling_factor,
        vae_scale: own.vae_scale,
        key: own.key.clone(),
        control: own.control,
    })
}

pub fn nodes() -> Vec<Arc<dyn Node>> {
    vec![Arc::new(Precompute::new())]
}

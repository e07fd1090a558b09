//! `train.vae`: trains an `AutoencoderKL` (Stable Diffusion's VAE family) from
//! scratch with the first stage of latent diffusion's objective — an L1
//! reconstruction of a posterior sample plus a weighted KL to the unit
//! Gaussian (without its LPIPS and adversarial terms) — then sets the latent
//! `scaling_factor` to 1/std of the latents, as SD's 0.18215 was found.

use super::dataset::Dataset;
use super::model_folder;
use super::optim::AdamW;
use super::precompute::load_square;
use super::rng::{Stream, TrainRng};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use pixart_models::vae::{AutoencoderKl, Config};
use pixart_runtime::{
    Handle, InputSpec, Inputs, Node, NodeContext, NodeError, NodeSpec, Outputs, PortType, Value,
};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";
/// What the folder was trained with, so an identical request reuses it.
const RECORD: &str = "training.json";

/// The training images, as a count and a hash of their paths and sizes (a list
/// of every path would make the record as big as the weights).
fn images_key(ds: &Dataset) -> serde_json::Value {
    let mut h = blake3::Hasher::new();
    for item in &ds.items {
        let len = std::fs::metadata(&item.image).map_or(0, |m| m.len());
        h.update(format!("{}|{len}\n", item.image.display()).as_bytes());
    }
    json!({"count": ds.items.len(), "hash": h.finalize().to_hex().to_string()})
}

pub struct Settings {
    pub steps: u64,
    pub batch: usize,
    pub lr: f64,
    pub kl_weight: f64,
    pub seed: u64,
    pub loss: Reconstruction,
    /// Side of the random crops trained on (the whole image when it is the resolution).
    pub crop: usize,
}

/// PyTorch's default initialisation, seeded per parameter: weights of convs
/// and linears (and their biases) uniform in ±1/√fan_in, norms one and zero.
fn initialise(vars: &[(String, Var)], seed: u64) -> candle_core::Result<()> {
    let shapes: HashMap<&str, Vec<usize>> = vars
        .iter()
        .map(|(n, v)| (n.as_str(), v.dims().to_vec()))
        .collect();
    for (k, (name, var)) in vars.iter().enumerate() {
        let weight_name = name.strip_suffix(".bias").map(|p| format!("{p}.weight"));
        let weight_shape = match &weight_name {
            Some(w) => shapes.get(w.as_str()).cloned().unwrap_or_default(),
            None => var.dims().to_vec(),
        };
        let n = var.elem_count();
        let values: Vec<f32> = if weight_shape.len() <= 1 {
            let fill = if weight_name.is_some() { 0.0 } else { 1.0 };
            vec![fill; n]
        } else {
            let fan_in: usize = weight_shape[1..].iter().product();
            let bound = 1.0 / (fan_in as f64).sqrt();
            let mut rng = TrainRng::new(seed, Stream::Init, k as u64);
            (0..n)
                .map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32)
                .collect()
        };
        var.set(&Tensor::from_vec(values, var.dims(), var.device())?)?;
    }
    Ok(())
}

/// The learning rate of step `step` of `steps`: a linear warm-up over the
/// first 5% (at most 100 steps), then a cosine decay to zero — with an L1 loss
/// Adam's steps never shrink by themselves, and a constant rate leaves the
/// weights (and the decoded colours) jittering at the end.
pub fn cosine_lr(lr: f64, step: u64, steps: u64) -> f64 {
    let warmup = (steps / 20).clamp(1, 100);
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let t = (step - warmup) as f64 / (steps - warmup).max(1) as f64;
    lr * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
}

/// How reconstructions are compared with the images.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Reconstruction {
    /// Latent diffusion's choice (with LPIPS, which we leave out).
    L1,
    /// Squared error: on flat-coloured images it fixes wrong colours much
    /// sooner (measured in BENCHMARKS.md), as large errors weigh more.
    Mse,
}

/// Reconstruction error (summed per image) and KL (summed per image), batch means.
pub fn losses(
    vae: &AutoencoderKl,
    x: &Tensor,
    noise: &Tensor,
    loss: Reconstruction,
) -> candle_core::Result<(Tensor, Tensor)> {
    let b = x.dim(0)? as f64;
    let posterior = vae.encode(x)?;
    let z = posterior.sample(noise)?;
    let diff = (vae.decode(&z)? - x)?;
    let rec = match loss {
        Reconstruction::L1 => diff.abs()?,
        Reconstruction::Mse => diff.sqr()?,
    }
    .sum_all()?
    .affine(1.0 / b, 0.0)?;
    let var = posterior.logvar.exp()?;
    let kl = ((posterior.mean.sqr()? + var)? - 1.0)?
        .sub(&posterior.logvar)?
        .sum_all()?
        .affine(0.5 / b, 0.0)?;
    Ok((rec, kl))
}

/// The diffusers `config.json` of a trained VAE: the given config with the
/// block types filled in and the measured scaling factor.
fn diffusers_config(given: &serde_json::Value, cfg: &Config, scaling: f64) -> serde_json::Value {
    let mut c = given.clone();
    let n = cfg.block_out_channels.len();
    let set = |c: &mut serde_json::Value, k: &str, v: serde_json::Value| {
        if let Some(map) = c.as_object_mut() {
            map.insert(k.to_string(), v);
        }
    };
    set(&mut c, "_class_name", json!("AutoencoderKL"));
    set(
        &mut c,
        "down_block_types",
        json!(vec!["DownEncoderBlock2D"; n]),
    );
    set(&mut c, "up_block_types", json!(vec!["UpDecoderBlock2D"; n]));
    set(&mut c, "act_fn", json!("silu"));
    set(
        &mut c,
        "scaling_factor",
        json!((scaling * 1e5).round() / 1e5),
    );
    c
}

pub struct TrainVae {
    spec: NodeSpec,
}

impl TrainVae {
    fn new() -> Self {
        TrainVae {
            spec: NodeSpec::new("train.vae", 1)
                .category("training")
                .describe(
                    "Trains an AutoencoderKL from scratch on a dataset's images (centre crops at its \
                     resolution): reconstruction error (L1 or MSE) of a posterior sample + kl_weight × KL, Adam with a \
                     warm-up and cosine decay, seeded. \
                     Sets scaling_factor to 1/std of the latents and writes a diffusers VAE folder. A \
                     folder already trained with the same settings and data is reused.",
                )
                .input(InputSpec::new("dataset", PortType::Dataset))
                .input(
                    InputSpec::new("config", PortType::Path)
                        .describe("An AutoencoderKL config.json (block_out_channels, latent_channels, …)."),
                )
                .input(InputSpec::new("steps", PortType::Int).default(2000).min(1.0).max(1e9))
                .input(InputSpec::new("batch", PortType::Int).default(16).min(1.0).max(65536.0))
                .input(InputSpec::new("lr", PortType::Float).default(5e-4).min(0.0).max(1.0))
                .input(
                    InputSpec::new("loss", PortType::enum_of(&["l1", "mse"]))
                        .default("l1")
                        .describe("Reconstruction error: l1 (latent diffusion's) or mse."),
                )
                .input(InputSpec::new("kl_weight", PortType::Float).default(1e-6).min(0.0).max(1e3))
                .input(InputSpec::new("seed", PortType::Int).default(0).min(0.0))
                .input(
                    InputSpec::new("crop", PortType::Int)
                        .optional()
                        .min(8.0)
                        .max(4096.0)
                        .describe(
                            "Train on random square crops of this side (a multiple of the VAE's \
                             downsampling; the convolutions then cost a fraction); default: whole images.",
                        ),
                )
                .input(InputSpec::new("out", PortType::Path).describe("The VAE folder to write."))
                .output("vae", PortType::Vae, "the trained VAE")
                .output("path", PortType::Path, "its folder")
                .output("loss", PortType::Float, "mean reconstruction error (the chosen loss) per pixel value over the last 50 steps")
                .output("psnr", PortType::Float, "PSNR (dB) of whole images decoded from their mean latents"),
        }
    }
}

impl Node for TrainVae {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn run(&self, ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        let ds = inputs.handle::<Dataset>("dataset")?;
        let config_path = ctx.input_path(inputs.path("config")?)?;
        let out = ctx.output_path(inputs.path("out")?)?;
        let text =
            std::fs::read_to_string(&config_path).map_err(|e| NodeError::io(&config_path, e))?;
        let given: serde_json::Value = pixart_models::weights::parse_json(&config_path, &text)
            .map_err(|e| NodeError::input("config", e))?;
        let cfg: Config = serde_json::from_value(given.clone())
            .map_err(|e| NodeError::input("config", format!("{}: {e}", config_path.display())))?;
        cfg.check()
            .map_err(|e| NodeError::input("config", format!("{}: {e}", config_path.display())))?;
        let s = Settings {
            steps: inputs.int("steps")? as u64,
            batch: inputs.int("batch")? as usize,
            lr: inputs.float("lr")?,
            kl_weight: inputs.float("kl_weight")?,
            seed: inputs.int("seed")? as u64,
            loss: if inputs.str("loss")? == "mse" {
                Reconstruction::Mse
            } else {
                Reconstruction::L1
            },
            crop: match inputs.get("crop") {
                Some(_) => inputs.int("crop")? as usize,
                None => ds.resolution,
            },
        };
        let f = cfg.scale_factor();
        if s.crop > ds.resolution || !s.crop.is_multiple_of(f) {
            return Err(NodeError::input(
                "crop",
                format!(
                    "{} must be at most the resolution {} and a multiple of {f}",
                    s.crop, ds.resolution
                ),
            ));
        }
        let fingerprint = json!({
            "config": given,
            "steps": s.steps, "batch": s.batch, "crop": s.crop, "loss": format!("{:?}", s.loss), "lr": s.lr, "kl_weight": s.kl_weight, "seed": s.seed,
            "resolution": ds.resolution,
            "images": images_key(ds),
        });
        let reuse = std::fs::read_to_string(out.join(RECORD))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .filter(|r| r.get("fingerprint") == Some(&fingerprint) && out.join(WEIGHTS).is_file());
        let record = match reuse {
            Some(record) => record,
            None => train(ctx, ds, &given, &cfg, &s, &out, &fingerprint)?,
        };
        let number = |k: &str| record.get(k).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
        let vae =
            crate::pixart::load::vae(&out, DType::F32, &Device::Cpu).map_err(NodeError::msg)?;
        Ok(
            Outputs::one("vae", Value::Handle(Handle::shared(PortType::Vae, 0, vae)))
                .with("path", Value::Path(out))
                .with("loss", Value::Float(number("loss")))
                .with("psnr", Value::Float(number("psnr"))),
        )
    }
}

fn train(
    ctx: &NodeContext,
    ds: &Dataset,
    given: &serde_json::Value,
    cfg: &Config,
    s: &Settings,
    out: &Path,
    fingerprint: &serde_json::Value,
) -> Result<serde_json::Value, NodeError> {
    let device = Device::Cpu;
    // Counted before anything is made: a config or dataset sized past the
    // run's memory fails here, not by exhausting the machine.
    let params =
        pixart_models::weights::count_parameters(DType::F32, |vb| AutoencoderKl::new(vb, cfg))?;
    let pixels = (ds.items.len() as u64).saturating_mul((ds.resolution as u64).pow(2));
    // A batch keeps at least a few feature maps of the first level's width at
    // full crop size for the backward pass: a lower bound, so a legitimate run
    // is never refused by it.
    let activations = (s.batch as u64)
        .saturating_mul((s.crop as u64).pow(2))
        .saturating_mul(cfg.block_out_channels[0] as u64)
        .saturating_mul(16);
    let _memory = ctx.reserve_memory(
        params
            .saturating_mul(16)
            .saturating_add(pixels.saturating_mul(12))
            .saturating_add(activations),
        "training this VAE (f32 weights, gradients and Adam moments; the images in f32; a batch's \
         activations)",
    )?;
    let images = ds
        .items
        .iter()
        .map(|item| Ok(load_square(&item.image, ds.resolution, &device)?.0))
        .collect::<Result<Vec<_>, NodeError>>()?;
    let images = Tensor::cat(&images, 0)?;
    let n = images.dim(0)? as u64;
    let varmap = VarMap::new();
    let vae = AutoencoderKl::new(VarBuilder::from_varmap(&varmap, DType::F32, &device), cfg)?;
    let mut named: Vec<(String, Var)> = varmap
        .data()
        .lock()
        .map_err(|_| NodeError::msg("VAE parameters are poisoned"))?
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    initialise(&named, s.seed)?;
    let vars: Vec<Var> = named.iter().map(|(_, v)| v.clone()).collect();
    let mut adam = AdamW::new(&vars, 0.9, 0.999, 1e-8, 0.0)?;
    let latent = |x: &Tensor| -> candle_core::Result<Vec<usize>> {
        let f = cfg.scale_factor();
        let (_, _, h, w) = x.dims4()?;
        Ok(vec![cfg.latent_channels, h / f, w / f])
    };
    let mut recent = Vec::new();
    for step in 0..s.steps {
        ctx.check_cancelled()?;
        let mut rng = TrainRng::new(s.seed, Stream::Step, step);
        let idx: Vec<u32> = (0..s.batch).map(|_| rng.below(n) as u32).collect();
        let mut x = images.index_select(&Tensor::new(idx.as_slice(), &device)?, 0)?;
        if s.crop < ds.resolution {
            // One crop position per batch keeps the batch a single tensor.
            let room = (ds.resolution - s.crop) as u64 + 1;
            let (top, left) = (rng.below(room) as usize, rng.below(room) as usize);
            x = x
                .narrow(2, top, s.crop)?
                .narrow(3, left, s.crop)?
                .contiguous()?;
        }
        let mut shape = vec![s.batch];
        shape.extend(latent(&x)?);
        let noise = Tensor::from_vec(rng.normals(shape.iter().product()), shape, &device)?;
        let (rec, kl) = losses(&vae, &x, &noise, s.loss)?;
        let loss = (&rec + (&kl * s.kl_weight)?)?;
        let grads = loss.backward()?;
        adam.step(&vars, &grads, cosine_lr(s.lr, step, s.steps))?;
        let per_value = rec.to_scalar::<f32>()? as f64 / (x.elem_count() / s.batch) as f64;
        recent.push(per_value);
        if recent.len() > 50 {
            recent.remove(0);
        }
        ctx.progress_detail(step + 1, s.steps, &format!("{:?} {per_value:.4}", s.loss));
    }
    let loss = recent.iter().sum::<f64>() / recent.len().max(1) as f64;

    // The latents' spread over (up to) 512 images sets the scaling factor.
    let take = n.min(512) as usize;
    let mut zs = Vec::new();
    let (mut squared_error, mut values) = (0f64, 0usize);
    for start in (0..take).step_by(8) {
        let x = images.narrow(0, start, 8.min(take - start))?;
        let p = vae.encode(&x)?;
        let noise = Tensor::from_vec(
            TrainRng::new(s.seed, Stream::Step, u64::MAX - start as u64)
                .normals(p.mean.elem_count()),
            p.mean.dims(),
            &device,
        )?;
        // Detached: the weights are variables, and a kept graph would hold every activation.
        zs.push(p.sample(&noise)?.flatten_all()?.detach());
        let back = vae.decode(&p.mean)?.detach();
        squared_error += (back - &x)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        values += x.elem_count();
    }
    // Pixels span 2 (−1..1): PSNR = 10·log10(2² / MSE) of whole images from their mean latents.
    let psnr = 10.0 * (4.0 / (squared_error / values.max(1) as f64)).log10();
    let z = Tensor::cat(&zs, 0)?;
    let mean = z.mean_all()?.to_scalar::<f32>()? as f64;
    let std = (z
        .affine(1.0, -mean)?
        .sqr()?
        .mean_all()?
        .to_scalar::<f32>()? as f64)
        .sqrt();
    let scaling = if std > 0.0 { 1.0 / std } else { 1.0 };

    let tensors: Vec<(String, Tensor)> = named
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let weights = model_folder::safetensors_bytes(&tensors).map_err(|e| NodeError::io(out, e))?;
    let config = serde_json::to_string_pretty(&diffusers_config(given, cfg, scaling))
        .map_err(NodeError::msg)?;
    let record = json!({"fingerprint": fingerprint, "loss": loss, "latent_std": std, "psnr": psnr});
    model_folder::write(
        ctx,
        out,
        &[
            ("config.json", config.into_bytes()),
            (WEIGHTS, weights),
            (RECORD, record.to_string().into_bytes()),
        ],
    )
    .map_err(|e| NodeError::io(out, e))?;
    Ok(record)
}

pub fn nodes() -> Vec<Arc<dyn Node>> {
    vec![Arc::new(TrainVae::new())]
}

//! The PixArt-α nodes: loading, text encoding, sampling, VAE decoding and
//! encoding, sampler choice.

use super::binning::resize_and_crop;
use super::latents;
use super::load::{self, SchedulerChoice};
use super::sample::{plan, sample, Init, Request, Step};
use super::text_encoder::{self, TextEncoder};
use super::Denoiser;
use crate::device::{
    check_dtype_device, device_input, dtype_device, dtype_input, low_memory, memory_input,
    text_weights, text_weights_input,
};
use crate::fsutil::input_file_fingerprint;
use crate::noise::gaussian;
use candle_core::{DType, Device, Tensor};
use pixart_models::schedulers::{SchedulerConfig, DMD_TIMESTEP, SAMPLER_NAMES};
use pixart_models::t5::T5Encoder;
use pixart_models::tokenizer::T5Tokenizer;
use pixart_models::vae::AutoencoderKl;
use pixart_models::weights::Keep;
use pixart_runtime::{
    Conditioning, Handle, InputSpec, Inputs, Latents, Node, NodeContext, NodeError, NodeSpec,
    Outputs, PortType, Value,
};
use std::path::PathBuf;
use std::sync::Arc;

fn load_err(e: impl std::fmt::Display) -> NodeError {
    NodeError::msg(e)
}

/// A handle to a model held by the model cache; its memory is accounted there,
/// so the output cache counts it as free.
fn handle<T: Send + Sync + 'static>(kind: PortType, bytes: usize, model: Arc<T>) -> Value {
    Value::Handle(Handle::shared(kind, bytes, model))
}

/// Counts a model about to be loaded from `path` against the run's model
/// budget, as its weight files' headers tell (`keep`: how each tensor is held).
/// Weight files that cannot be counted are refused: what cannot be counted is
/// not loaded.
pub(crate) fn take_model(
    ctx: &NodeContext,
    what: &str,
    path: &std::path::Path,
    keep: impl Fn(&str, DType) -> Keep,
) -> Result<(), NodeError> {
    if !path.exists() {
        return Ok(()); // the loader says what is missing
    }
    let bytes = pixart_models::weights::loaded_bytes(path, keep).map_err(load_err)?;
    ctx.take_model_memory(bytes, &format!("loading the {what}"))
}

/// A node that loads model components from a path: the declaration plus the one
/// function that differs between loaders.
struct ComponentLoader {
    spec: NodeSpec,
    load: fn(&NodeContext, &Inputs, DType, &Device) -> Result<Outputs, NodeError>,
}

impl Node for ComponentLoader {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    /// Every path input counts (a loader may read several: model and tokenizer).
    fn fingerprint(&self, ctx: &NodeContext, inputs: &Inputs) -> Option<String> {
        let parts: Vec<String> = self
            .spec
            .inputs
            .iter()
            .filter(|i| i.ty == PortType::Path)
            .filter_map(|i| input_file_fingerprint(ctx, inputs, &i.name))
            .collect();
        Some(parts.join("|"))
    }

    fn run(&self, ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        let (dtype, device) = dtype_device(&inputs)?;
        (self.load)(ctx, &inputs, dtype, &device)
    }
}

fn loader(name: &str, description: &str) -> NodeSpec {
    NodeSpec::new(name, 1)
        .category("pixart")
        .describe(description)
        .input(InputSpec::new("path", PortType::Path))
        .input(dtype_input())
        .input(device_input())
}

fn load_pipeline(
    ctx: &NodeContext,
    inputs: &Inputs,
    dtype: DType,
    device: &Device,
) -> Result<Outputs, NodeError> {
    let root = ctx.input_path(inputs.path("path")?)?;
    let folder = load::PipelineFolder::open(&root).map_err(load_err)?;
    let low = low_memory(inputs)?;
    ctx.progress(0, 4);
    let tok = load::tokenizer(&folder.part("tokenizer")).map_err(load_err)?;
    let enc = load_text_encoder(ctx, inputs, &folder.part("text_encoder"), dtype, device)?;
    ctx.check_cancelled()?;
    ctx.progress(1, 4);
    let transformer_path = match inputs.get("transformer") {
        Some(Value::Path(p)) => ctx.input_path(p)?,
        _ => folder.part("transformer"),
    };
    let den = transformer_value(ctx, transformer_path, dtype, device, low)?;
    ctx.check_cancelled()?;
    ctx.progress(2, 4);
    let vae = vae_value(ctx, folder.part("vae"), dtype, device, low)?;
    ctx.progress(3, 4);
    let sched = load::scheduler(&folder.part("scheduler")).map_err(load_err)?;
    ctx.progress(4, 4);
    Ok(
        Outputs::one("tokenizer", handle(PortType::Tokenizer, 1 << 20, tok))
            .with("text_encoder", enc.into_value())
            .with("transformer", den)
            .with("vae", vae)
            .with(
                "scheduler",
                Value::Handle(Handle::new(PortType::Scheduler, 1024, sched)),
            ),
    )
}

/// The transformer, loaded now, or with `lazy` when a node first reads it (see
/// `Handle::lazy`: the pipeline's models then take memory one by one, as they
/// are needed; what can be checked without reading them is checked now).
fn transformer_value(
    ctx: &NodeContext,
    path: PathBuf,
    dtype: DType,
    device: &Device,
    lazy: bool,
) -> Result<Value, NodeError> {
    take_model(ctx, "transformer", &path, |_, _| Keep::as_is(dtype))?;
    if !lazy {
        let den = load::transformer(&path, dtype, device).map_err(load_err)?;
        return Ok(handle(PortType::Denoiser, 0, den));
    }
    check_dtype_device(&path, dtype, device).map_err(load_err)?;
    if !path.exists() {
        return Err(load_err(pixart_models::weights::LoadError::file(
            &path,
            "no such file or folder",
        )));
    }
    let device = device.clone();
    Ok(Value::Handle(Handle::lazy(
        PortType::Denoiser,
        0,
        move || load::transformer(&path, dtype, &device).map_err(|e| e.to_string()),
    )))
}

/// The VAE, loaded now, or with `lazy` when a node first reads it.
fn vae_value(
    ctx: &NodeContext,
    dir: PathBuf,
    dtype: DType,
    device: &Device,
    lazy: bool,
) -> Result<Value, NodeError> {
    take_model(ctx, "VAE", &dir, |_, _| Keep::as_is(dtype))?;
    if !lazy {
        let vae = load::vae(&dir, dtype, device).map_err(load_err)?;
        return Ok(handle(PortType::Vae, 0, vae));
    }
    check_dtype_device(&dir, dtype, device).map_err(load_err)?;
    if !dir.join("config.json").is_file() {
        return Err(load_err(pixart_models::weights::LoadError::file(
            &dir,
            "no config.json: not a VAE folder",
        )));
    }
    let device = device.clone();
    Ok(Value::Handle(Handle::lazy(PortType::Vae, 0, move || {
        load::vae(&dir, dtype, &device).map_err(|e| e.to_string())
    })))
}

/// The T5 a loader node outputs, as its `text_encoder_weights` and `memory`
/// inputs ask.
fn load_text_encoder(
    ctx: &NodeContext,
    inputs: &Inputs,
    dir: &std::path::Path,
    dtype: DType,
    device: &Device,
) -> Result<TextEncoder, NodeError> {
    take_model(
        ctx,
        "text encoder (text_encoder_weights bf16 or int8 take a half or a quarter of f32)",
        dir,
        load::text_encoder_keep(dtype, text_weights(inputs)?, device),
    )?;
    TextEncoder::load(
        dir,
        dtype,
        text_weights(inputs)?,
        device,
        low_memory(inputs)?,
    )
    .map_err(load_err)
}

fn load_transformer(
    ctx: &NodeContext,
    inputs: &Inputs,
    dtype: DType,
    device: &Device,
) -> Result<Outputs, NodeError> {
    let path = ctx.input_path(inputs.path("path")?)?;
    Ok(Outputs::one(
        "transformer",
        transformer_value(ctx, path, dtype, device, false)?,
    ))
}

fn load_t5(
    ctx: &NodeContext,
    inputs: &Inputs,
    dtype: DType,
    device: &Device,
) -> Result<Outputs, NodeError> {
    let tok = load::tokenizer(&ctx.input_path(inputs.path("tokenizer")?)?).map_err(load_err)?;
    let enc = load_text_encoder(
        ctx,
        inputs,
        &ctx.input_path(inputs.path("path")?)?,
        dtype,
        device,
    )?;
    Ok(
        Outputs::one("tokenizer", handle(PortType::Tokenizer, 1 << 20, tok))
            .with("text_encoder", enc.into_value()),
    )
}

fn load_vae(
    ctx: &NodeContext,
    inputs: &Inputs,
    dtype: DType,
    device: &Device,
) -> Result<Outputs, NodeError> {
    let dir = ctx.input_path(inputs.path("path")?)?;
    Ok(Outputs::one(
        "vae",
        vae_value(ctx, dir, dtype, device, false)?,
    ))
}

fn loaders() -> Vec<ComponentLoader> {
    vec![
        ComponentLoader {
            spec: loader(
                "pixart.load",
                "Loads a diffusers PixArt-α or PixArt-Σ pipeline folder (PixArtAlphaPipeline or \
                 PixArtSigmaPipeline: model_index.json with tokenizer, text_encoder, transformer, vae, \
                 scheduler). The folder decides the prompt length (120 or 300 tokens), the VAE's \
                 scale and the resolution bins. Models are shared between nodes and runs.",
            )
            .input(text_weights_input())
            .input(memory_input())
            .input(
                InputSpec::new("transformer", PortType::Path)
                    .optional()
                    .describe("Use this transformer instead (folder, .safetensors or official .pth)."),
            )
            .output("tokenizer", PortType::Tokenizer, "T5 tokenizer")
            .output("text_encoder", PortType::TextEncoder, "T5 encoder")
            .output("transformer", PortType::Denoiser, "PixArt transformer")
            .output("vae", PortType::Vae, "AutoencoderKL")
            .output("scheduler", PortType::Scheduler, "the pipeline's scheduler"),
            load: load_pipeline,
        },
        ComponentLoader {
            spec: loader(
                "transformer.load",
                "Loads a PixArt-α transformer alone: a diffusers folder (config.json + \
                 diffusion_pytorch_model.safetensors), a .safetensors file, or an official .pth \
                 checkpoint (with its learned null caption).",
            )
            .output("transformer", PortType::Denoiser, "PixArt transformer"),
            load: load_transformer,
        },
        ComponentLoader {
            spec: loader(
                "t5.load",
                "Loads a T5 encoder folder (`path`: config.json + safetensors, sharded or not) and a \
                 tokenizer folder.",
            )
            .input(InputSpec::new("tokenizer", PortType::Path).describe("The tokenizer folder."))
            .input(text_weights_input())
            .input(memory_input())
            .output("tokenizer", PortType::Tokenizer, "T5 tokenizer")
            .output("text_encoder", PortType::TextEncoder, "T5 encoder"),
            load: load_t5,
        },
        ComponentLoader {
            spec: loader(
                "vae.load",
                "Loads an AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors).",
            )
            .output("vae", PortType::Vae, "AutoencoderKL"),
            load: load_vae,
        },
    ]
}

pub struct SelectScheduler {
    spec: NodeSpec,
}

impl SelectScheduler {
    fn new() -> Self {
        SelectScheduler {
            spec: NodeSpec::new("scheduler.select", 1)
                .category("pixart")
                .describe(
                    "Chooses the sampler: dpm_solver++ (diffusers' default for PixArt, 20 steps), ddim, \
                     iddpm (the official 100-step ancestral sampler using the learned variance), lcm \
                     (diffusers' LCMScheduler, for PixArt-LCM: 4 steps with guidance 0), sa_solver \
                     (diffusers' SASolverScheduler: stochastic predictor-corrector, orders from the \
                     config, default 2 and 2), or dmd (the \
                     one-step call of PixArt-α-DMD: x0 predicted at `timestep` 400, steps 1, guidance 1). \
                     Keeps the noise schedule of `from` (default: PixArt's linear 1e-4…0.02 over 1000 \
                     steps); a pipeline's own scheduler config picks its sampler (an LCMScheduler folder \
                     samples with lcm, an SASolverScheduler one with sa_solver, a DDPMScheduler one \
                     with dmd).",
                )
                .input(InputSpec::new("name", PortType::enum_of(SAMPLER_NAMES)).default("dpm_solver++"))
                .input(InputSpec::new("from", PortType::Scheduler).optional())
                .input(
                    InputSpec::new("timestep", PortType::Int)
                        .default(DMD_TIMESTEP as i64)
                        .min(0.0)
                        .max(999.0)
                        .describe("dmd: the timestep of its one step (PixArt-α-DMD: 400)."),
                )
                .output("scheduler", PortType::Scheduler, "the chosen sampler"),
        }
    }
}

impl Node for SelectScheduler {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn run(&self, _ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        let mut config = match inputs.get("from") {
            Some(_) => inputs.handle::<SchedulerChoice>("from")?.config.clone(),
            None => SchedulerConfig::default(),
        };
        config.one_step_timestep = inputs.int("timestep")? as usize;
        let choice = SchedulerChoice {
            config,
            sampler: inputs.str("name")?.to_string(),
        };
        Ok(Outputs::one(
            "scheduler",
            Value::Handle(Handle::new(PortType::Scheduler, 1024, choice)),
        ))
    }
}

/// A prompt's T5 embeddings and mask, `max_length` tokens long.
pub fn encode_text(
    tok: &T5Tokenizer,
    enc: &T5Encoder,
    text: &str,
    max_length: usize,
) -> Result<Conditioning, String> {
    let e = tok.encode(text, max_length)?;
    let device = enc.device();
    let run = || -> candle_core::Result<Conditioning> {
        let ids = Tensor::from_vec(e.ids, (1, max_length), device)?;
        let mask = Tensor::from_vec(e.mask, (1, max_length), device)?.to_dtype(DType::F32)?;
        let embeddings = enc.forward(&ids, &mask)?;
        Ok(Conditioning {
            embeddings,
            mask,
            empty_prompt: text.trim().is_empty(),
        })
    };
    run().map_err(|e| e.to_string())
}

pub struct EncodeText {
    spec: NodeSpec,
}

impl EncodeText {
    fn new() -> Self {
        EncodeText {
            spec: NodeSpec::new("t5.encode", 1)
                .category("pixart")
                .describe(
                    "Encodes a prompt with T5 as PixArtAlphaPipeline and PixArtSigmaPipeline do: \
                     lower-cased and stripped, `</s>` appended, padded/truncated to max_length tokens \
                     (by default the pipeline's: 120 for PixArt-α, 300 for PixArt-Σ), with the \
                     attention mask.",
                )
                .input(InputSpec::new("tokenizer", PortType::Tokenizer))
                .input(InputSpec::new("encoder", PortType::TextEncoder))
                .input(InputSpec::new("text", PortType::String))
                .input(
                    InputSpec::new("max_length", PortType::Int)
                        .optional()
                        .min(1.0)
                        .max(512.0)
                        .describe("Tokens; left out: the pipeline's length."),
                )
                .output("conditioning", PortType::Conditioning, "embeddings [1, L, D] and mask [1, L]"),
        }
    }
}

impl Node for EncodeText {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn run(&self, _ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        let tok = inputs.handle::<T5Tokenizer>("tokenizer")?;
        let enc = text_encoder::from_input(&inputs, "encoder")?;
        let len = match inputs.get("max_length") {
            Some(_) => inputs.int("max_length")? as usize,
            None => tok.sequence_length(),
        };
        let conditioning = encode_text(tok, &enc, inputs.str("text")?, len)
            .map_err(|e| NodeError::input("text", e))?;
        Ok(Outputs::one(
            "conditioning",
            Value::Conditioning(conditioning),
        ))
    }
}

pub struct Sample {
    spec: NodeSpec,
}

impl Sample {
    fn new() -> Self {
        Sample {
            spec: NodeSpec::new("pixart.sample", 1)
                .category("pixart")
                .describe(
                    "Generates latents: classifier-free guidance on [negative, positive] (u + g·(c − u) on \
                     all channels), the scheduler's sampler, micro-conditions for multi-scale models, \
                     resolution binning (the decoder crops back to width × height). Without a negative, \
                     the checkpoint's learned null caption is used. Seeds give the same noise on every \
                     platform (not torch's). With `init_latents` (img2img) it runs the last \
                     int(steps × strength) steps from the image noised to the first of them, at the \
                     image's size; with a `mask` too (inpainting) the image stays where the mask is \
                     black, noised to each step, as diffusers' img2img and inpaint pipelines do.",
                )
                .input(InputSpec::new("transformer", PortType::Denoiser))
                .input(InputSpec::new("scheduler", PortType::Scheduler))
                .input(InputSpec::new("positive", PortType::Conditioning))
                .input(InputSpec::new("negative", PortType::Conditioning).optional())
                .input(InputSpec::new("steps", PortType::Int).default(20).min(1.0).max(1000.0))
                .input(InputSpec::new("guidance", PortType::Float).default(4.5).min(0.0).max(100.0))
                .input(InputSpec::new("width", PortType::Int).default(512).min(16.0).max(8192.0))
                .input(InputSpec::new("height", PortType::Int).default(512).min(16.0).max(8192.0))
                .input(InputSpec::new("seed", PortType::Int).default(0).min(0.0))
                .input(
                    InputSpec::new("latents", PortType::Tensor)
                        .optional()
                        .describe("Starting noise [B, 4, h, w] instead of drawing it from the seed."),
                )
                .input(InputSpec::new("resolution_binning", PortType::Bool).default(true))
                .input(
                    InputSpec::new("init_latents", PortType::Latents)
                        .optional()
                        .describe("img2img: the latents of the image to start from (vae.encode)."),
                )
                .input(
                    InputSpec::new("strength", PortType::Float)
                        .default(0.8)
                        .min(0.0)
                        .max(1.0)
                        .describe("With init_latents: how much of the schedule runs (1: all of it, from almost pure noise)."),
                )
                .input(
                    InputSpec::new("mask", PortType::Image)
                        .optional()
                        .describe("Inpainting, with init_latents: white repaints, black keeps the image (its size)."),
                )
                .input(
                    InputSpec::new("vae", PortType::Vae).optional().describe(
                        "The VAE that will decode the latents: its downsampling factor sets the latent \
                         size (default: the pipeline folder's VAE, else SD's factor 8); with it the \
                         sampler can show previews.",
                    ),
                )
                .input(
                    InputSpec::new("preview_every", PortType::Int)
                        .default(5)
                        .min(0.0)
                        .describe(
                            "In runs someone watches (the editor): every this many steps, decode the \
                             current estimate of the image with `vae` and send it as a preview (0: never).",
                        ),
                )
                .output("latents", PortType::Latents, "the denoised latents (scaled, as diffusers')"),
        }
    }
}

impl Node for Sample {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn run(&self, ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        let den = inputs.handle::<Denoiser>("transformer")?;
        let choice = inputs.handle::<SchedulerChoice>("scheduler")?;
        let steps = inputs.int("steps")? as usize;
        let mut sampler = choice
            .config
            .start(&choice.sampler, steps)
            .map_err(|e| NodeError::input("scheduler", e))?;
        let negative = match inputs.get("negative") {
            Some(_) => Some(inputs.conditioning("negative")?),
            None => None,
        };
        let vae_scale = match inputs.get("vae") {
            Some(_) => inputs
                .handle::<AutoencoderKl>("vae")?
                .config()
                .scale_factor(),
            None => den.vae_scale_factor,
        };
        let init = match inputs.get("init_latents") {
            Some(_) => Some(init_from(&inputs)?),
            None if inputs.get("mask").is_some() => {
                return Err(NodeError::input(
                    "mask",
                    "inpainting needs the image: connect init_latents",
                ))
            }
            None => None,
        };
        // img2img samples at the image's size, which needs no binning.
        let (width, height, binning) = match &init {
            Some(i) => (
                i.latents.dim(3)? * vae_scale,
                i.latents.dim(2)? * vae_scale,
                false,
            ),
            None => (
                inputs.int("width")? as usize,
                inputs.int("height")? as usize,
                inputs.bool("resolution_binning")?,
            ),
        };
        let init_size = match inputs.get("init_latents") {
            Some(_) => inputs.latents("init_latents")?.image_size,
            None => None,
        };
        let req = Request {
            positive: inputs.conditioning("positive")?,
            negative,
            guidance: inputs.float("guidance")?,
            width,
            height,
            seed: inputs.int("seed")? as u64,
            latents: inputs
                .get("latents")
                .map(|_| inputs.tensor("latents").cloned())
                .transpose()?,
            resolution_binning: binning,
            vae_scale,
            init,
        };
        let image_size = plan(den, &req)
            .map_err(|u| NodeError::input(u.input, u.message))?
            .image_size(&req)
            .or(init_size);
        let preview_vae = match inputs.get("vae") {
            Some(_) if ctx.wants_previews() => Some(inputs.handle::<AutoencoderKl>("vae")?),
            _ => None,
        };
        let every = inputs.int("preview_every")?.max(0) as usize;
        let alphas = choice.config.alphas_cumprod();
        let result = sample(den, sampler.as_mut(), &req, |step: &Step| {
            ctx.progress(step.index as u64, step.total as u64);
            if ctx.is_cancelled() {
                candle_core::bail!("cancelled");
            }
            if let Some(vae) = preview_vae {
                if every > 0 && (step.index.is_multiple_of(every) || step.index == step.total) {
                    // A failed preview must not fail the run.
                    match preview_png(vae, &alphas, step) {
                        Ok(png) => ctx.preview_png(step.index as u64, &png),
                        Err(e) => tracing::debug!("no preview at step {}: {e}", step.index),
                    }
                }
            }
            Ok(())
        });
        let latents = match result {
            Ok(l) => l,
            Err(_) if ctx.is_cancelled() => return Err(NodeError::Cancelled),
            Err(e) => return Err(e.into()),
        };
        Ok(Outputs::one(
            "latents",
            Value::Latents(Latents {
                tensor: latents,
                image_size,
            }),
        ))
    }
}

/// img2img's start: the image's latents, the strength, and an inpainting mask as
/// `[B, 1, H, W]` (its first channel).
fn init_from(inputs: &Inputs) -> Result<Init, NodeError> {
    let mask = match inputs.get("mask") {
        Some(_) => {
            let image = inputs.image("mask")?;
            Some(image.narrow(3, 0, 1)?.permute((0, 3, 1, 2))?.contiguous()?)
        }
        None => None,
    };
    Ok(Init {
        latents: inputs.latents("init_latents")?.tensor.clone(),
        strength: inputs.float("strength")?,
        mask,
    })
}

/// The sampler's current estimate of the clean image, x̂₀ = (x − √(1−ᾱₜ)·ε) / √ᾱₜ,
/// decoded by the VAE (first image of the batch) and encoded as PNG.
fn preview_png(vae: &AutoencoderKl, alphas: &[f32], step: &Step) -> candle_core::Result<Vec<u8>> {
    let t = (step.timestep.round().max(0.0) as usize).min(alphas.len().saturating_sub(1));
    let a = *alphas.get(t).unwrap_or(&1.0) as f64;
    let x = step.sample.narrow(0, 0, 1)?;
    let eps = step.eps.narrow(0, 0, 1)?;
    let x0 = ((x - (eps * (1.0 - a).sqrt())?)? / a.sqrt())?;
    let image = latents::decode(vae, &x0)?.squeeze(0)?;
    let (h, w, c) = image.dims3()?;
    let pixels = crate::image_io::to_bytes(&image).map_err(candle_core::Error::msg)?;
    crate::image_io::encode_png(&pixels, w, h, c, &[]).map_err(candle_core::Error::msg)
}

pub struct Decode {
    spec: NodeSpec,
}

impl Decode {
    fn new() -> Self {
        Decode {
            spec: NodeSpec::new("vae.decode", 1)
                .category("pixart")
                .describe(
                    "Decodes latents to an image: latents / scaling_factor through the VAE decoder, \
                     resized and centre-cropped to the size the sampler was asked for, (x/2 + 0.5) \
                     clamped to 0..1.",
                )
                .input(InputSpec::new("vae", PortType::Vae))
                .input(InputSpec::new("latents", PortType::Latents))
                .output("image", PortType::Image, "[B, H, W, 3] in 0..1"),
        }
    }
}

impl Node for Decode {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn run(&self, ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        let vae = inputs.handle::<AutoencoderKl>("vae")?;
        let given = inputs.latents("latents")?;
        let z = latents::to_vae(vae, &given.tensor)?;
        let mut frames = Vec::new();
        let batch = z.dim(0)?;
        for i in 0..batch {
            ctx.check_cancelled()?;
            let mut x = vae
                .decode(&z.narrow(0, i, 1)?)?
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?;
            if let Some((h, w)) = given.image_size {
                x = resize_and_crop(&x, h, w)?;
            }
            frames.push(latents::to_images(&x)?);
            ctx.progress(i as u64 + 1, batch as u64);
        }
        let image = Tensor::cat(&frames, 0)?.contiguous()?;
        Ok(Outputs::one("image", Value::Image(image)))
    }
}

pub struct Encode {
    spec: NodeSpec,
}

impl Encode {
    fn new() -> Self {
        Encode {
            spec: NodeSpec::new("vae.encode", 1)
                .category("pixart")
                .describe(
                    "Encodes an image (0..1) to latents: the VAE posterior's sample (seeded) or mean, \
                     times scaling_factor. Width and height must be multiples of 8.",
                )
                .input(InputSpec::new("vae", PortType::Vae))
                .input(InputSpec::new("image", PortType::Image))
                .input(InputSpec::new("mode", PortType::enum_of(&["sample", "mean"])).default("sample"))
                .input(InputSpec::new("seed", PortType::Int).default(0).min(0.0))
                .output("latents", PortType::Latents, "scaled latents"),
        }
    }
}

impl Node for Encode {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn run(&self, _ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        let vae = inputs.handle::<AutoencoderKl>("vae")?;
        let image = inputs.image("image")?;
        let (_, h, w, c) = image.dims4()?;
        let f = vae.config().scale_factor();
        if c != 3 || !h.is_multiple_of(f) || !w.is_multiple_of(f) {
            return Err(NodeError::input(
                "image",
                format!("needs RGB with sides multiple of {f}, got {w}×{h}×{c}"),
            ));
        }
        let x = ((image.permute((0, 3, 1, 2))?.contiguous()? * 2.0)? - 1.0)?;
        let post = vae.encode(&x)?;
        let z = if inputs.str("mode")? == "mean" {
            post.mean.clone()
        } else {
            let seed = inputs.int("seed")? as u64;
            let noise = Tensor::from_vec(
                gaussian(seed, post.mean.elem_count()),
                post.mean.dims(),
                post.mean.device(),
            )?
            .to_dtype(post.mean.dtype())?;
            post.sample(&noise)?
        };
        let z = latents::from_vae(vae, &z)?;
        Ok(Outputs::one("latents", Value::Latents(Latents::new(z))))
    }
}

pub fn nodes() -> Vec<Arc<dyn Node>> {
    let mut nodes: Vec<Arc<dyn Node>> = Vec::new();
    nodes.extend(loaders().into_iter().map(|l| Arc::new(l) as Arc<dyn Node>));
    nodes.extend::<Vec<Arc<dyn Node>>>(vec![
        Arc::new(SelectScheduler::new()),
        Arc::new(EncodeText::new()),
        Arc::new(Sample::new()),
        Arc::new(Decode::new()),
        Arc::new(Encode::new()),
    ]);
    nodes
}

//! The denoising loop of PixArtAlphaPipeline: classifier-free guidance on a batch
//! [negative, positive], `u + g·(c − u)` on all output channels, ε (or, for IDDPM,
//! ε and the variance) to the sampler; micro-conditions from the (binned) size.
//! From an image's latents (img2img) it runs the last part of the schedule, as
//! diffusers' generic img2img pipeline; with a mask (inpainting) it keeps the
//! image outside the mask, noised to each step, as its inpaint pipeline and the
//! official PixArt-α one do (a blurred mask blends softly; a binary one is the
//! official arithmetic exactly).

use super::binning;
use super::denoiser::{Denoiser, DEFAULT_VAE_SCALE};
use crate::noise::gaussian;
use candle_core::{DType, Device, Result, Tensor};
use pixart_models::pixart::SizeConditions;
use pixart_models::schedulers::Sampler;
use pixart_runtime::Conditioning;

/// Attention over more tokens than this would need tens of GB for its scores.
pub const MAX_TOKENS: usize = 16_384;

pub struct Request<'a> {
    pub positive: &'a Conditioning,
    /// `None`: the checkpoint's learned null caption (official checkpoints).
    pub negative: Option<&'a Conditioning>,
    pub guidance: f64,
    pub width: usize,
    pub height: usize,
    pub seed: u64,
    /// Starting noise `[B, C, h, w]`; drawn from `seed` when absent.
    pub latents: Option<Tensor>,
    pub resolution_binning: bool,
    /// Pixels per latent cell of the VAE that will decode the result.
    pub vae_scale: usize,
    /// img2img and inpainting: start from an image instead of noise.
    pub init: Option<Init>,
}

/// Where sampling starts from an image (img2img) and, with a mask, what of it
/// stays (inpainting).
pub struct Init {
    /// The image's scaled latents `[B, C, h, w]`; the generation size follows them.
    pub latents: Tensor,
    /// The part of the schedule that runs: its last `int(steps · strength)` steps.
    pub strength: f64,
    /// `[B or 1, 1, H, W]` at pixel size: 1 repaints, 0 keeps the image.
    pub mask: Option<Tensor>,
}

/// A request that cannot be sampled: the input at fault (as `pixart.sample`
/// names it) and why.
#[derive(Debug)]
pub struct Unfit {
    pub input: &'static str,
    pub message: String,
}

impl Unfit {
    fn new(input: &'static str, message: impl Into<String>) -> Unfit {
        Unfit {
            input,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Unfit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.input, self.message)
    }
}

/// What the negative half of a guided batch is.
enum Negative<'a> {
    /// No guidance: the batch is the positive prompt alone.
    Unguided,
    Given(&'a Conditioning),
    /// The checkpoint's learned null caption.
    NullCaption(&'a Tensor),
}

/// A request checked against its denoiser: the size it samples at and its text.
pub struct Plan<'a> {
    /// The generation size (the request's, or its aspect-ratio bin).
    pub height: usize,
    pub width: usize,
    /// The latent grid, `height / vae_scale` × `width / vae_scale`.
    pub latent_height: usize,
    pub latent_width: usize,
    negative: Negative<'a>,
}

impl Plan<'_> {
    /// The size the decoder must crop back to, where binning changed it.
    pub fn image_size(&self, req: &Request) -> Option<(usize, usize)> {
        ((self.height, self.width) != (req.height, req.width)).then_some((req.height, req.width))
    }
}

/// Every check a request must pass before sampling starts, in one place: the
/// node reports a failure at its input, [`sample`] as an error.
pub fn plan<'a>(den: &'a Denoiser, req: &Request<'a>) -> std::result::Result<Plan<'a>, Unfit> {
    let cfg = den.model.config();
    let scale = req.vae_scale;
    let (height, width) = match &req.init {
        Some(init) => init_size(den, init, scale)?,
        None => generation_size(den, req.width, req.height, req.resolution_binning, scale)?,
    };
    let (latent_height, latent_width) = (height / scale, width / scale);
    let tokens = (latent_height / cfg.patch_size) * (latent_width / cfg.patch_size);
    if tokens > MAX_TOKENS {
        return Err(Unfit::new(
            "width",
            format!("{width}×{height} is {tokens} transformer tokens; the limit is {MAX_TOKENS} (2048×2048 at patch 2)"),
        ));
    }
    if let Some(l) = &req.latents {
        let c = cfg.in_channels;
        if l.rank() != 4 || l.dims()[1..] != [c, latent_height, latent_width] {
            return Err(Unfit::new(
                "latents",
                format!(
                    "shape {:?}, but this request needs [B, {c}, {latent_height}, {latent_width}]",
                    l.dims()
                ),
            ));
        }
    }
    // An empty negative prompt means no negative prompt: a checkpoint with a
    // learned null caption (official checkpoints, our trainer) gets it, as the
    // official sampler does; one without (diffusers folders) gets the encoded
    // empty prompt, as diffusers does.
    let negative = match (req.guidance > 1.0, req.negative, &den.null_caption) {
        (false, _, _) => Negative::Unguided,
        (true, Some(n), Some(null)) if n.empty_prompt => Negative::NullCaption(null),
        (true, Some(n), _) => Negative::Given(n),
        (true, None, Some(null)) => Negative::NullCaption(null),
        (true, None, None) => {
            return Err(Unfit::new(
                "negative",
                "guidance > 1 needs a negative conditioning (this checkpoint has no learned null caption)",
            ))
        }
    };
    Ok(Plan {
        height,
        width,
        latent_height,
        latent_width,
        negative,
    })
}

/// The generation size of img2img: the image's, after checking the rest of `init`.
fn init_size(
    den: &Denoiser,
    init: &Init,
    scale: usize,
) -> std::result::Result<(usize, usize), Unfit> {
    let cfg = den.model.config();
    let c = cfg.in_channels;
    let dims = init.latents.dims();
    if dims.len() != 4 || dims[1] != c {
        return Err(Unfit::new(
            "init_latents",
            format!("shape {dims:?}, but this transformer takes [B, {c}, h, w]"),
        ));
    }
    if !(init.strength > 0.0 && init.strength <= 1.0) {
        return Err(Unfit::new(
            "strength",
            format!("{} is outside (0, 1]", init.strength),
        ));
    }
    let (height, width) = (dims[2] * scale, dims[3] * scale);
    if let Some(m) = &init.mask {
        let md = m.dims();
        if md.len() != 4 || md[1] != 1 || md[2..] != [height, width] {
            return Err(Unfit::new(
                "mask",
                format!("shape {md:?}, but the image is {width}×{height}: give a mask of its size"),
            ));
        }
    }
    Ok((height, width))
}

/// A pixel mask `[B, 1, H, W]` on the latent grid `h × w`: nearest neighbour, as
/// torch's default `interpolate` (source index `floor(i · H / h)`).
fn latent_mask(mask: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (_, _, mh, mw) = mask.dims4()?;
    let pick = |n: usize, from: usize| -> Vec<u32> {
        let scale = from as f32 / n as f32;
        (0..n)
            .map(|i| ((i as f32 * scale).floor() as usize).min(from - 1) as u32)
            .collect()
    };
    let device = mask.device();
    let rows = Tensor::new(pick(h, mh), device)?;
    let cols = Tensor::new(pick(w, mw), device)?;
    mask.to_dtype(DType::F32)?
        .index_select(&rows, 2)?
        .index_select(&cols, 3)
}

/// The generation size: the request, or its aspect-ratio bin.
fn generation_size(
    den: &Denoiser,
    width: usize,
    height: usize,
    binning: bool,
    vae_scale: usize,
) -> std::result::Result<(usize, usize), Unfit> {
    let cfg = den.model.config();
    // The official aspect-ratio tables are for models whose native size (sample
    // size × VAE factor) is 256, 512 or 1024 pixels with the SD VAE; other models
    // generate at the size asked for.
    if binning && vae_scale == DEFAULT_VAE_SCALE {
        if let Some(bins) = binning::bins_for(cfg.sample_size) {
            return Ok(binning::classify(height, width, &bins));
        }
    }
    let multiple = vae_scale * cfg.patch_size;
    if !width.is_multiple_of(multiple) || !height.is_multiple_of(multiple) {
        return Err(Unfit::new(
            "width",
            format!(
                "width and height must be multiples of {multiple} (VAE factor {vae_scale} × patch size {})",
                cfg.patch_size
            ),
        ));
    }
    Ok((height, width))
}

/// `[tokens, C]` cut or zero-padded to `len` tokens.
fn fit_tokens(t: &Tensor, len: usize) -> Result<Tensor> {
    let n = t.dim(0)?;
    if n >= len {
        t.narrow(0, 0, len)
    } else {
        t.pad_with_zeros(0, 0, len - n)
    }
}

/// Text features for the batch [negative, positive] (or just positive without
/// guidance), with their masks.
fn text_batch(req: &Request, negative: &Negative, device: &Device) -> Result<(Tensor, Tensor)> {
    let pos = req.positive.embeddings.to_device(device)?;
    let pos_mask = req.positive.mask.to_device(device)?.to_dtype(DType::F32)?;
    let (neg, neg_mask) = match negative {
        Negative::Unguided => return Ok((pos, pos_mask)),
        Negative::Given(n) => (
            n.embeddings.to_device(device)?,
            n.mask.to_device(device)?.to_dtype(DType::F32)?,
        ),
        // The official sampler gives the null caption the positive prompt's mask.
        // A null caption learnt at another text length is cut or zero-padded to
        // the prompt's (padding tokens carry no weight under the mask).
        Negative::NullCaption(null) => (
            fit_tokens(null, pos.dim(1)?)?
                .unsqueeze(0)?
                .to_dtype(pos.dtype())?,
            pos_mask.clone(),
        ),
    };
    if neg.dims() != pos.dims() {
        candle_core::bail!(
            "negative and positive conditionings differ in shape: {:?} vs {:?} (encode both with the same max_length)",
            neg.dims(),
            pos.dims()
        );
    }
    Ok((
        Tensor::cat(&[&neg, &pos], 0)?,
        Tensor::cat(&[&neg_mask, &pos_mask], 0)?,
    ))
}

/// What the sampling loop reports after each step.
pub struct Step<'a> {
    /// Steps done (1-based) of `total`.
    pub index: usize,
    pub total: usize,
    /// The model timestep of this step.
    pub timestep: f64,
    /// The latents this step started from, and the (guided) ε the model
    /// predicted for them: enough to estimate the clean image (previews).
    pub sample: &'a Tensor,
    pub eps: &'a Tensor,
}

/// Runs the sampler; `on_step` is called after each step and may stop the run by
/// returning an error (cancellation). Returns the final latents.
pub fn sample(
    den: &Denoiser,
    sampler: &mut dyn Sampler,
    req: &Request,
    mut on_step: impl FnMut(&Step) -> Result<()>,
) -> Result<Tensor> {
    let model = &den.model;
    let device = model.device().clone();
    let cfg = model.config();
    let plan = plan(den, req).map_err(|u| candle_core::Error::msg(u.message))?;
    let (height, width) = (plan.height, plan.width);
    let (lh, lw) = (plan.latent_height, plan.latent_width);
    let channels = cfg.in_channels;
    let images = req.init.as_ref().map_or(Ok(1), |i| i.latents.dim(0))?;
    let mut x = match &req.latents {
        Some(l) => l.to_device(&device)?.to_dtype(DType::F32)?,
        None => Tensor::from_vec(
            gaussian(req.seed, images * channels * lh * lw),
            (images, channels, lh, lw),
            &device,
        )?,
    };
    let timesteps = sampler.timesteps().to_vec();
    let n = timesteps.len();
    // img2img: the last `int(n · strength)` steps, from the image noised to the
    // first of them; the noise stays for noising the kept region at each step.
    let mut keep = None;
    let start = match &req.init {
        Some(init) => {
            let steps = ((n as f64 * init.strength) as usize).min(n);
            if steps == 0 {
                candle_core::bail!(
                    "strength {} runs none of the {n} steps: raise strength or steps",
                    init.strength
                );
            }
            sampler.skip(n - steps).map_err(candle_core::Error::msg)?;
            let image = init.latents.to_device(&device)?.to_dtype(DType::F32)?;
            let noise = x.broadcast_as(image.dims())?.contiguous()?;
            x = if init.mask.is_some() && steps == n {
                // The official inpainting pipeline starts from pure noise at full strength.
                (&noise * sampler.init_noise_sigma())?
            } else {
                sampler.add_noise(&image, &noise)?
            };
            if let Some(m) = &init.mask {
                let m = latent_mask(&m.to_device(&device)?, lh, lw)?;
                let m = m.broadcast_as(image.dims())?.contiguous()?;
                keep = Some((image, noise, m));
            }
            n - steps
        }
        None => {
            x = (x * sampler.init_noise_sigma())?;
            0
        }
    };
    let batch = x.dim(0)?;
    let cfg_on = !matches!(plan.negative, Negative::Unguided);
    let (text, mask) = text_batch(req, &plan.negative, &device)?;
    // Several images of one prompt: each prompt row repeated per image.
    let (text, mask) = (repeat_each(&text, batch)?, repeat_each(&mask, batch)?);
    let model_batch = if cfg_on { 2 * batch } else { batch };
    let sizes = if cfg.additional_conditions() {
        let res: Vec<f32> = (0..model_batch)
            .flat_map(|_| [height as f32, width as f32])
            .collect();
        let ar: Vec<f32> = vec![(height as f64 / width as f64) as f32; model_batch];
        Some((
            Tensor::from_vec(res, (model_batch, 2), &device)?,
            Tensor::from_vec(ar, (model_batch, 1), &device)?,
        ))
    } else {
        None
    };
    for (i, &t) in timesteps.iter().enumerate().skip(start) {
        let input = if cfg_on {
            Tensor::cat(&[&x, &x], 0)?
        } else {
            x.clone()
        };
        let tvec = Tensor::full(t as f32, model_batch, &device)?;
        let size_cond = sizes.as_ref().map(|(r, a)| SizeConditions {
            resolution: r,
            aspect_ratio: a,
        });
        let out = den
            .forward(&input, &tvec, &text, Some(&mask), size_cond.as_ref())?
            .to_dtype(DType::F32)?;
        let learned_sigma = out.dim(1)? == 2 * channels;
        let guided = if cfg_on {
            let u = out.narrow(0, 0, batch)?;
            let c = out.narrow(0, batch, batch)?;
            if learned_sigma && sampler.uses_variance() {
                // The official sampler guides ε only and takes the variance from the
                // conditional half: guiding it could push (v+1)/2 outside [0, 1].
                let (ue, ce) = (u.narrow(1, 0, channels)?, c.narrow(1, 0, channels)?);
                let eps = (&ue + ((ce - &ue)? * req.guidance)?)?;
                Tensor::cat(&[&eps, &c.narrow(1, channels, channels)?], 1)?
            } else {
                (&u + ((c - &u)? * req.guidance)?)?
            }
        } else {
            out
        };
        let model_output = if learned_sigma && !sampler.uses_variance() {
            guided.narrow(1, 0, channels)?
        } else {
            guided
        };
        let noise = if sampler.needs_noise() {
            let n = x.elem_count();
            let seed = req
                .seed
                .wrapping_add(1 + i as u64)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15);
            Some(Tensor::from_vec(gaussian(seed, n), x.dims(), &device)?)
        } else {
            None
        };
        let mut next = sampler.step(&model_output, &x, noise.as_ref())?;
        if let Some((image, noise, mask)) = &keep {
            // Outside the mask: the image, noised to the next step (the last keeps it clean).
            let known = if i + 1 < n {
                sampler.add_noise(image, noise)?
            } else {
                image.clone()
            };
            next = ((&known * mask.affine(-1.0, 1.0)?)? + (next * mask)?)?;
        }
        on_step(&Step {
            index: i + 1 - start,
            total: n - start,
            timestep: t,
            sample: &x,
            eps: &model_output.narrow(1, 0, channels)?,
        })?;
        x = next;
    }
    Ok(x)
}

/// `[a, b]` → `[a, a, …, b, b, …]`, each row `copies` times.
fn repeat_each(t: &Tensor, copies: usize) -> Result<Tensor> {
    if copies == 1 {
        return Ok(t.clone());
    }
    let mut rows = Vec::with_capacity(t.dim(0)? * copies);
    for i in 0..t.dim(0)? {
        let row = t.narrow(0, i, 1)?;
        rows.extend(std::iter::repeat_n(row, copies));
    }
    Tensor::cat(&rows, 0)
}

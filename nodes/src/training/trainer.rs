//! `train.pixart`: one stage of PixArt-α training on a feature cache, as the
//! official loop runs it — uniform timesteps, posterior sampling, caption
//! dropout to the null caption, IDDPM learned-range loss, clipping, AdamW with
//! warm-up, EMA — with crash-safe checkpoints and exact resumption.

use super::checkpoint::{self, Layout, Saved};
use super::loss::{Diffusion, LossTerms};
use super::model::{LoraSpec, Start, TrainModel, CLASS_TABLE};
use super::optim::{scale_lr, scheduled_lr, AdamW, Ema, LrSchedule};
use super::precompute::{FeatureItem, Features};
use super::preview::{render, Preview};
use super::rng::{Stream, TrainRng};
use super::step::{share_gradients, Batch, Optimizer, StepPlan};
use crate::pixart::Denoiser;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use pixart_models::pixart::{Config, PixArtTransformer};
use pixart_models::vae::AutoencoderKl;
use pixart_runtime::{
    Handle, InputSpec, Inputs, Node, NodeContext, NodeError, NodeSpec, Outputs, PortType, Value,
};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

const LOSS_LOG: &str = "loss.jsonl";

/// What one stage trains with; these must not change across a resume.
#[derive(Clone, Debug)]
pub struct Settings {
    pub steps: u64,
    pub batch: usize,
    pub lr: f64,
    pub warmup: u64,
    /// Not in the fingerprint, like `steps`: a constant-rate run may be resumed
    /// with an anneal added (warmup-stable-decay).
    pub lr_schedule: LrSchedule,
    pub decay_steps: u64,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub ema_rate: f64,
    pub ema_warmup: bool,
    pub caption_dropout: f64,
    /// γ of min-SNR loss weighting; 0 weighs every timestep alike (PixArt's loss).
    pub min_snr_gamma: f64,
    pub class_conditional: bool,
    pub frozen: Vec<String>,
    pub seed: u64,
    pub checkpoint_every: u64,
    pub resume: bool,
    /// Train a LoRA on the frozen `init` instead of the whole transformer.
    pub lora: Option<LoraSpec>,
    /// Train a ControlNet copying this many of `init`'s first blocks (frozen
    /// beside it) instead of the transformer.
    pub controlnet: Option<usize>,
    /// With a LoRA or a ControlNet: what the frozen base's weights hash to, so
    /// a run resumes only onto the base it started from.
    pub base_key: Option<String>,
    /// How each step computes its gradients (micro-batches, activation
    /// checkpointing): not in the fingerprint, since every way gives the same
    /// step, so a run may resume with another.
    pub plan: StepPlan,
    /// Mixed precision: the transformer computes in this dtype (bf16) from f32
    /// master weights. Not in the fingerprint: the saved state is the same f32.
    pub mixed_precision: Option<DType>,
}

impl Settings {
    /// The settings a resumed run must share (not the step count or cadence).
    fn fingerprint(&self, features: &Features, classes: &[String]) -> serde_json::Value {
        let mut f = json!({
            "batch": self.batch,
            "lr": self.lr,
            "warmup": self.warmup,
            "weight_decay": self.weight_decay,
            "grad_clip": self.grad_clip,
            "ema_rate": self.ema_rate,
            "caption_dropout": self.caption_dropout,
            "condition": if self.class_conditional { "class" } else { "text" },
            "freeze": self.frozen,
            "seed": self.seed,
            "features": features.key,
            "classes": classes,
        });
        // Only when on, so checkpoints from before the option still resume.
        if self.ema_warmup {
            f["ema_warmup"] = json!(true);
        }
        if self.min_snr_gamma > 0.0 {
            f["min_snr_gamma"] = json!(self.min_snr_gamma);
        }
        if let Some(lora) = &self.lora {
            f["lora"] = json!({
                "rank": lora.rank, "alpha": lora.alpha, "targets": lora.targets, "base": self.base_key,
            });
        }
        if let Some(copies) = self.controlnet {
            f["controlnet"] = json!({"copies": copies, "base": self.base_key});
        }
        f
    }
}

/// The cache's items grouped by latent size (one group per aspect bucket), and
/// the batches of each epoch drawn from them.
struct Data {
    items: Vec<FeatureItem>,
    buckets: Vec<Vec<usize>>,
    batches_per_epoch: u64,
}

impl Data {
    fn load(features: &Features, batch: usize, device: &Device) -> Result<Data, NodeError> {
        let items = features
            .files
            .iter()
            .map(|f| FeatureItem::read(f, device))
            .collect::<Result<Vec<_>, _>>()?;
        let mut groups: BTreeMap<Vec<usize>, Vec<usize>> = BTreeMap::new();
        for (i, item) in items.iter().enumerate() {
            groups
                .entry(item.vae_mean.dims().to_vec())
                .or_default()
                .push(i);
        }
        let buckets: Vec<Vec<usize>> = groups.into_values().collect();
        let batches_per_epoch = buckets.iter().map(|b| b.len().div_ceil(batch) as u64).sum();
        Ok(Data {
            items,
            buckets,
            batches_per_epoch,
        })
    }

    /// The item indices of optimiser step `step`: each epoch shuffles every
    /// bucket, cuts it into batches and shuffles the batches.
    fn batch_of(&self, seed: u64, batch: usize, step: u64) -> Vec<usize> {
        let epoch = step / self.batches_per_epoch;
        let mut rng = TrainRng::new(seed, Stream::Order, epoch);
        let mut batches: Vec<Vec<usize>> = Vec::new();
        for bucket in &self.buckets {
            let order = rng.permutation(bucket.len());
            let shuffled: Vec<usize> = order.iter().map(|&i| bucket[i]).collect();
            batches.extend(shuffled.chunks(batch).map(<[usize]>::to_vec));
        }
        let order = rng.permutation(batches.len());
        batches.swap_remove(order[(step % self.batches_per_epoch) as usize])
    }
}

/// Sorted distinct labels: class k is the k-th.
fn class_names(data: &Data) -> Vec<String> {
    let mut names: Vec<String> = data.items.iter().map(|i| i.label.clone()).collect();
    names.sort();
    names.dedup();
    names
}

/// Builds step `step`'s batch: timesteps, caption dropout, a posterior sample of
/// each latent and the diffusion noise, all drawn from (seed, step).
#[allow(clippy::too_many_arguments)]
fn make_batch(
    data: &Data,
    indices: &[usize],
    step: u64,
    s: &Settings,
    scaling: f64,
    null_caption: &Tensor,
    class_table: Option<(&Tensor, &[String])>,
    with_sizes: bool,
    diffusion: &Diffusion,
) -> candle_core::Result<Batch> {
    let mut rng = TrainRng::new(s.seed, Stream::Step, step);
    let b = indices.len();
    let t: Vec<usize> = (0..b).map(|_| rng.below(1000) as usize).collect();
    let dropped: Vec<bool> = (0..b).map(|_| rng.uniform() < s.caption_dropout).collect();
    let items: Vec<&FeatureItem> = indices.iter().map(|&i| &data.items[i]).collect();
    let mean = Tensor::stack(&items.iter().map(|i| &i.vae_mean).collect::<Vec<_>>(), 0)?;
    let std = Tensor::stack(&items.iter().map(|i| &i.vae_std).collect::<Vec<_>>(), 0)?;
    let device = mean.device().clone();
    let shape = mean.dims().to_vec();
    let n = mean.elem_count();
    let eps = Tensor::from_vec(rng.normals(n), shape.as_slice(), &device)?;
    let noise = Tensor::from_vec(rng.normals(n), shape.as_slice(), &device)?;
    let x0 = ((mean + (std * eps)?)? * scaling)?;

    let (text, mask) = match class_table {
        Some((table, names)) => {
            let ids: Vec<u32> = items
                .iter()
                .map(|i| names.binary_search(&i.label).unwrap_or(0) as u32)
                .collect();
            let rows = table.index_select(&Tensor::new(ids, &device)?, 0)?; // [B, C]
            let null = null_caption.narrow(0, 0, 1)?.broadcast_as(rows.shape())?;
            let text = select_rows(&dropped, &null, &rows)?.unsqueeze(1)?;
            (text, Tensor::ones((b, 1), DType::F32, &device)?)
        }
        None => {
            let text = Tensor::stack(&items.iter().map(|i| &i.text).collect::<Vec<_>>(), 0)?;
            let mask = Tensor::stack(&items.iter().map(|i| &i.mask).collect::<Vec<_>>(), 0)?;
            let len = text.dim(1)?;
            // As the official code: a dropped caption becomes the null caption,
            // under the caption's own mask.
            let null = null_caption
                .narrow(0, 0, len)?
                .unsqueeze(0)?
                .broadcast_as(text.shape())?;
            (select_rows(&dropped, &null, &text)?, mask)
        }
    };
    let sizes = if with_sizes {
        let hw: Vec<f32> = items.iter().flat_map(|i| [i.hw.0, i.hw.1]).collect();
        let ar: Vec<f32> = items.iter().map(|i| i.ratio).collect();
        Some((
            Tensor::from_vec(hw, (b, 2), &device)?,
            Tensor::from_vec(ar, (b, 1), &device)?,
        ))
    } else {
        None
    };
    let mse_weights = if s.min_snr_gamma > 0.0 {
        let w = diffusion.min_snr_weights(&t, s.min_snr_gamma);
        Some(Tensor::from_vec(w, b, &device)?)
    } else {
        None
    };
    // The control latent is scaled as the latents are (and as vae.encode gives
    // it to controlnet.apply), and stays when the caption is dropped.
    let control = if s.controlnet.is_some() {
        let maps = items
            .iter()
            .map(|i| {
                i.control.as_ref().ok_or_else(|| {
                    candle_core::Error::msg(format!("`{}` has no control latent", i.caption))
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Some((Tensor::stack(&maps, 0)? * scaling)?)
    } else {
        None
    };
    Ok(Batch {
        x0,
        t,
        noise,
        text,
        mask,
        sizes,
        mse_weights,
        control,
    })
}

/// Row i from `on` where `pick[i]`, else from `off` (same shapes).
fn select_rows(pick: &[bool], on: &Tensor, off: &Tensor) -> candle_core::Result<Tensor> {
    let mut shape = vec![pick.len()];
    shape.resize(off.rank(), 1);
    let cond = Tensor::from_vec(
        pick.iter().map(|&p| u8::from(p)).collect::<Vec<_>>(),
        shape.as_slice(),
        off.device(),
    )?
    .broadcast_as(off.shape())?;
    cond.where_cond(on, off)
}

/// The EMA weights by parameter name.
fn ema_tensors(tm: &TrainModel, ema: &Ema) -> HashMap<String, Tensor> {
    tm.params
        .iter()
        .map(|p| p.name.clone())
        .zip(ema.weights.iter().cloned())
        .collect()
}

/// A Denoiser (for sampling and the next stage) from EMA weights.
fn denoiser(
    cfg: &Config,
    ema: &HashMap<String, Tensor>,
    null_caption: &Tensor,
    vae_scale: usize,
    device: &Device,
) -> candle_core::Result<Denoiser> {
    let weights: HashMap<String, Tensor> = ema
        .iter()
        .filter(|(n, _)| n.as_str() != CLASS_TABLE)
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect();
    let model = PixArtTransformer::new(
        VarBuilder::from_tensors(weights.clone(), DType::F32, device),
        cfg,
    )?;
    Ok(Denoiser {
        model: Arc::new(model),
        control: None,
        null_caption: Some(null_caption.clone()),
        weights,
        vae_scale_factor: vae_scale,
    })
}

/// Rewrites the loss log keeping only the steps up to `step`.
fn truncate_log(ctx: &NodeContext, path: &Path, step: u64) -> Result<(), NodeError> {
    let kept: String = std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    crate::fsutil::atomic_write(ctx, path, kept.as_bytes())
}

pub struct TrainPixArt {
    spec: NodeSpec,
}

impl TrainPixArt {
    fn new() -> Self {
        TrainPixArt {
            spec: NodeSpec::new("train.pixart", 1)
                .category("training")
                .describe(
                    "Trains one stage of PixArt-α on a feature cache, as the official recipe: uniform \
                     timesteps, a fresh VAE posterior sample each step, captions dropped to the null caption \
                     for CFG, the IDDPM learned-range loss, global-norm clipping, AdamW with linear warm-up, \
                     and an EMA of the weights. Starts from `init` or, without it, from scratch with PixArt's \
                     initialisation (`config`: a transformer config.json). `condition: class` pre-trains \
                     class-conditionally (stage 1): each label gets a learned embedding in caption space. \
                     Checkpoints (EMA transformer in the diffusers layout + optimiser state) go to `out` \
                     every `checkpoint_every` steps, at the end and when cancelled; `resume` continues from \
                     the newest one and reaches the same weights as an uninterrupted run.",
                )
                // It writes checkpoints: it always runs (resuming makes a finished
                // run cheap) and its results are never cached.
                .output_node()
                .input(InputSpec::new("features", PortType::Features))
                .input(
                    InputSpec::new("init", PortType::Denoiser)
                        .optional()
                        .describe("The starting transformer (a previous stage, or a loaded checkpoint)."),
                )
                .input(
                    InputSpec::new("config", PortType::Path)
                        .optional()
                        .describe(
                            "A transformer config.json: without `init`, trained from scratch; with it, \
                             `init`'s weights in this architecture, new modules (e.g. the micro-condition \
                             embedders of a multi-scale stage) initialised as PixArt does.",
                        ),
                )
                .input(InputSpec::new("steps", PortType::Int).default(1000).min(1.0).max(1e9))
                .input(InputSpec::new("batch", PortType::Int).default(4).min(1.0).max(65536.0))
                .input(
                    InputSpec::new("accumulate", PortType::Int)
                        .default(1)
                        .min(1.0)
                        .max(65536.0)
                        .describe(
                            "Gradient accumulation: each step's batch in this many micro-batches, one \
                             after the other (memory for one micro-batch; the same step).",
                        ),
                )
                .input(
                    InputSpec::new("grad_checkpoint", PortType::Bool)
                        .default(false)
                        .describe(
                            "Activation checkpointing of the transformer blocks, as PixArt's configs \
                             use for XL at 1024 px: each block is run again in the backward pass \
                             (about a third more time, a block's activations instead of all).",
                        ),
                )
                .input(
                    InputSpec::new("mixed_precision", PortType::enum_of(&super::model::MIXED_PRECISION))
                        .default("no")
                        .describe(
                            "bf16: the transformer's forward and backward in bfloat16, cast from f32 \
                             master weights each step; gradients, clipping, AdamW, EMA and checkpoints \
                             stay f32 (Accelerate's `mixed_precision: bf16`). For GPUs: on the CPU, \
                             `--matmul-precision bf16` is the fast way.",
                        ),
                )
                .input(InputSpec::new("lr", PortType::Float).default(2e-5).min(0.0).max(1.0))
                .input(
                    InputSpec::new("scale_lr", PortType::Bool)
                        .default(false)
                        .describe("Scale lr by √(batch / 256), PixArt's auto_scale_lr rule."),
                )
                .input(InputSpec::new("warmup", PortType::Int).default(1000).min(0.0).max(1e9))
                .input(
                    InputSpec::new("lr_schedule", PortType::enum_of(&LrSchedule::NAMES))
                        .default("constant")
                        .describe(
                            "After the warm-up: constant (PixArt's), or annealed to 0 at the last step, \
                             linearly or along a cosine (diffusers' schedules of those names).",
                        ),
                )
                .input(
                    InputSpec::new("decay_steps", PortType::Int)
                        .default(0)
                        .min(0.0)
                        .max(1e9)
                        .describe(
                            "Anneal over only the last N steps, at the base rate until then \
                             (warmup-stable-decay); 0: over every step after the warm-up.",
                        ),
                )
                .input(InputSpec::new("weight_decay", PortType::Float).default(0.03).min(0.0).max(1.0))
                .input(InputSpec::new("grad_clip", PortType::Float).default(0.01).min(0.0).max(1e9))
                .input(InputSpec::new("ema_rate", PortType::Float).default(0.9999).min(0.0).max(1.0))
                .input(
                    InputSpec::new("ema_warmup", PortType::Bool)
                        .default(false)
                        .describe(
                            "Average with rate min(ema_rate, (1+step)/(10+step)) (diffusers' EMA warm-up): \
                             for short runs, whose plain average would still lean on the initial weights.",
                        ),
                )
                .input(InputSpec::new("caption_dropout", PortType::Float).default(0.1).min(0.0).max(1.0))
                .input(
                    InputSpec::new("min_snr_gamma", PortType::Float)
                        .default(0.0)
                        .min(0.0)
                        .max(1e6)
                        .describe(
                            "Min-SNR-γ weighting of the ε loss (Hang et al. 2023; 5 is their choice): \
                             weight min(SNR, γ)/SNR per sample. 0: every timestep alike, as PixArt trains.",
                        ),
                )
                .input(InputSpec::new("condition", PortType::enum_of(&["text", "class"])).default("text"))
                .input(
                    InputSpec::new("freeze", PortType::String)
                        .default("")
                        .describe("Comma-separated weight-name prefixes that stay fixed (e.g. `pos_embed,adaln_single`)."),
                )
                .input(InputSpec::new("seed", PortType::Int).default(0).min(0.0))
                .input(crate::device::device_input().describe(
                    "Where a transformer trained from `config` lives (auto: what `pixart run \
                     --device` chose); with `init`, training runs where `init` is.",
                ))
                .input(InputSpec::new("checkpoint_every", PortType::Int).default(500).min(0.0).max(1e9))
                .input(InputSpec::new("out", PortType::Path).describe("The run folder: checkpoints and loss.jsonl."))
                .input(InputSpec::new("resume", PortType::Bool).default(true))
                .input(
                    InputSpec::new("sample_every", PortType::Int)
                        .default(0)
                        .min(0.0)
                        .max(1e9)
                        .describe("Write a sample image (EMA weights) to out/samples every N steps; 0: never."),
                )
                .input(InputSpec::new("sample_prompt", PortType::Conditioning).optional())
                .input(InputSpec::new("sample_vae", PortType::Vae).optional())
                .input(
                    InputSpec::new("sample_size", PortType::Int)
                        .default(0)
                        .min(0.0)
                        .max(4096.0)
                        .describe("Sample side in pixels; 0: the training resolution."),
                )
                .input(InputSpec::new("sample_steps", PortType::Int).default(20).min(1.0).max(1000.0))
                .input(InputSpec::new("sample_guidance", PortType::Float).default(4.5).min(0.0).max(100.0))
                .input(
                    InputSpec::new("lora_rank", PortType::Int)
                        .default(0)
                        .min(0.0)
                        .max(1024.0)
                        .describe(
                            "Train a LoRA of this rank on the frozen `init` instead of the whole \
                             transformer; checkpoints then hold the adapter in peft's layout \
                             (checkpoint-N/lora/: adapter_model.safetensors, adapter_config.json), \
                             and `transformer` is init with it merged. 0: full training.",
                        ),
                )
                .input(
                    InputSpec::new("lora_alpha", PortType::Float)
                        .default(0.0)
                        .min(0.0)
                        .max(1e6)
                        .describe("The LoRA's alpha (its update is alpha/rank · B·A); 0: the rank."),
                )
                .input(
                    InputSpec::new("lora_targets", PortType::String)
                        .default("to_q,to_k,to_v,to_out.0")
                        .describe(
                            "The linear layers the LoRA adapts, as peft's target_modules: a module \
                             named so or ending in `.` and the name (to_q matches every attention's), among the blocks' projections to_q, to_k, to_v, \
                             to_out.0, ff.net.0.proj and ff.net.2.",
                        ),
                )
                .input(
                    InputSpec::new("controlnet_blocks", PortType::Int)
                        .default(0)
                        .min(0.0)
                        .max(1024.0)
                        .describe(
                            "Train a ControlNet for the frozen `init` instead (PixArt-α's \
                             ControlNet-Transformer: copies of its first N blocks, 13 of 28 in the \
                             released model, joined by zero-initialised projections), on features made \
                             with control images (train.precompute `control`). Checkpoints then hold the \
                             ControlNet as controlnet.load reads it (checkpoint-N/controlnet/), and \
                             `transformer` is `init` unchanged. 0: no ControlNet.",
                        ),
                )
                .output("transformer", PortType::Denoiser, "the trained transformer (EMA weights)")
                .output("checkpoint", PortType::Path, "the final checkpoint's folder")
                .output("run", PortType::Path, "the run folder (`out`), once training is done"),
        }
    }
}

impl Node for TrainPixArt {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn run(&self, ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        let features = inputs.handle::<Features>("features")?;
        let batch = inputs.int("batch")? as usize;
        let base_lr = inputs.float("lr")?;
        let mut settings = Settings {
            steps: inputs.int("steps")? as u64,
            batch,
            lr: if inputs.bool("scale_lr")? {
                scale_lr(base_lr, batch)
            } else {
                base_lr
            },
            warmup: inputs.int("warmup")? as u64,
            lr_schedule: LrSchedule::parse(inputs.str("lr_schedule")?).ok_or_else(|| {
                NodeError::input(
                    "lr_schedule",
                    format!("expected one of {}", LrSchedule::NAMES.join(", ")),
                )
            })?,
            decay_steps: inputs.int("decay_steps")? as u64,
            weight_decay: inputs.float("weight_decay")?,
            grad_clip: inputs.float("grad_clip")?,
            ema_rate: inputs.float("ema_rate")?,
            ema_warmup: inputs.bool("ema_warmup")?,
            caption_dropout: inputs.float("caption_dropout")?,
            min_snr_gamma: inputs.float("min_snr_gamma")?,
            class_conditional: inputs.str("condition")? == "class",
            frozen: inputs
                .str("freeze")?
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(str::to_string)
                .collect(),
            seed: inputs.int("seed")? as u64,
            checkpoint_every: inputs.int("checkpoint_every")? as u64,
            resume: inputs.bool("resume")?,
            lora: match inputs.int("lora_rank")? as usize {
                0 => None,
                rank => Some(LoraSpec {
                    rank,
                    alpha: match inputs.float("lora_alpha")? {
                        a if a > 0.0 => a,
                        _ => rank as f64,
                    },
                    targets: inputs
                        .str("lora_targets")?
                        .split(',')
                        .map(str::trim)
                        .filter(|t| !t.is_empty())
                        .map(str::to_string)
                        .collect(),
                }),
            },
            controlnet: match inputs.int("controlnet_blocks")? as usize {
                0 => None,
                copies => Some(copies),
            },
            base_key: None,
            plan: StepPlan {
                micro_batches: inputs.int("accumulate")? as usize,
                checkpoint: inputs.bool("grad_checkpoint")?,
            },
            mixed_precision: super::model::mixed_precision(inputs.str("mixed_precision")?)
                .map_err(|e| NodeError::input("mixed_precision", e))?,
        };
        if settings.plan.micro_batches > batch {
            return Err(NodeError::input(
                "accumulate",
                format!(
                    "{} micro-batches of a batch of {batch}: at most one a sample",
                    settings.plan.micro_batches
                ),
            ));
        }
        if settings.plan.checkpoint && settings.controlnet.is_some() {
            return Err(NodeError::input(
                "grad_checkpoint",
                "ControlNet training does not checkpoint its blocks yet: leave it off",
            ));
        }
        let out = ctx.output_path(inputs.path("out")?)?;
        let init = match inputs.get("init") {
            Some(_) => Some(inputs.handle::<Denoiser>("init")?),
            None => None,
        };
        if let (true, Some(den)) = (
            settings.lora.is_some() || settings.controlnet.is_some(),
            init,
        ) {
            settings.base_key = Some(weights_key(&den.weights)?);
        }
        if init.is_some_and(|d| d.control.is_some()) {
            return Err(NodeError::input(
                "init",
                "a transformer with a ControlNet: train the transformer without it",
            ));
        }
        let config = match inputs.get("config") {
            Some(_) => {
                let path = ctx.input_path(inputs.path("config")?)?;
                let text = std::fs::read_to_string(&path).map_err(|e| NodeError::io(&path, e))?;
                let cfg: Config = pixart_models::weights::parse_json(&path, &text)
                    .map_err(|e| NodeError::input("config", e))?;
                cfg.check().map_err(|e| NodeError::input("config", e))?;
                Some(cfg)
            }
            None => None,
        };
        let (cfg, device) = match (init, config) {
            (Some(den), Some(cfg)) => (cfg, den.model.device().clone()),
            (Some(den), None) => (den.model.config().clone(), den.model.device().clone()),
            (None, Some(cfg)) => {
                let device = crate::device::device(inputs.str("device")?)
                    .map_err(|e| NodeError::input("device", e))?;
                (cfg, device)
            }
            (None, None) => {
                return Err(NodeError::input(
                    "init",
                    "give a starting transformer (`init`) or a `config` to train from scratch",
                ))
            }
        };
        let extend = init.is_some() && inputs.get("config").is_some();
        if let Some(lora) = &settings.lora {
            if init.is_none() || extend {
                return Err(NodeError::input(
                    "lora_rank",
                    "a LoRA adapts a trained transformer: give `init`, and no `config`",
                ));
            }
            if settings.class_conditional {
                return Err(NodeError::input(
                    "lora_rank",
                    "a LoRA trains on captions: use condition `text`",
                ));
            }
            if lora.targets.is_empty() {
                return Err(NodeError::input("lora_targets", "name at least one module"));
            }
            if !settings.frozen.is_empty() {
                return Err(NodeError::input(
                    "freeze",
                    "a LoRA run freezes the whole transformer already: leave `freeze` empty",
                ));
            }
        }
        if let Some(copies) = settings.controlnet {
            let refuse = |port: &str, why: &str| Err(NodeError::input(port, why.to_string()));
            if init.is_none() || extend {
                return refuse(
                    "controlnet_blocks",
                    "a ControlNet adapts a trained transformer: give `init`, and no `config`",
                );
            }
            if settings.lora.is_some() {
                return refuse(
                    "lora_rank",
                    "train a LoRA or a ControlNet, not both at once",
                );
            }
            if settings.class_conditional {
                return refuse(
                    "controlnet_blocks",
                    "a ControlNet trains on captions: use condition `text`",
                );
            }
            if !settings.frozen.is_empty() {
                return refuse(
                    "freeze",
                    "a ControlNet run freezes the whole transformer already: leave `freeze` empty",
                );
            }
            if copies >= cfg.num_layers {
                return Err(NodeError::input(
                    "controlnet_blocks",
                    format!(
                        "the transformer has {} blocks: copy 1 to {} of them",
                        cfg.num_layers,
                        cfg.num_layers - 1
                    ),
                ));
            }
            if !features.control {
                return refuse(
                    "features",
                    "a ControlNet trains on control images: make the features with \
                     train.precompute's `control` folder",
                );
            }
            if inputs.int("sample_every")? > 0 {
                return refuse(
                    "sample_every",
                    "a ControlNet run has no sample images (they would need a control image); \
                     evaluate its checkpoints instead (eval.shapes `controlnet`)",
                );
            }
        }
        let every = inputs.int("sample_every")? as u64;
        let samples = if every > 0 {
            let need = |port: &str| {
                inputs
                    .get(port)
                    .is_none()
                    .then(|| NodeError::input(port, "needed for sample images (sample_every > 0)"))
            };
            if let Some(e) = need("sample_prompt").or_else(|| need("sample_vae")) {
                return Err(e);
            }
            let size = match inputs.int("sample_size")? as usize {
                0 => features.resolution,
                n => n,
            };
            Some((
                every,
                Preview {
                    vae: inputs.handle::<AutoencoderKl>("sample_vae")?,
                    prompt: inputs.conditioning("sample_prompt")?,
                    size,
                    steps: inputs.int("sample_steps")? as usize,
                    guidance: inputs.float("sample_guidance")?,
                    seed: settings.seed,
                },
            ))
        } else {
            None
        };
        // Counted before anything is made: a config sized past the run's
        // memory fails here, not by exhausting the machine.
        let params = pixart_models::weights::count_parameters(DType::F32, |vb| {
            PixArtTransformer::new(vb, &cfg)
        })?;
        let _memory = match (&settings.lora, settings.controlnet) {
            // The frozen base; the adapter beside it is small.
            (Some(_), _) => ctx.reserve_memory(
                params.saturating_mul(4),
                "training a LoRA of this transformer (its f32 base weights)",
            )?,
            (None, Some(copies)) => {
                let net = pixart_models::weights::count_parameters(DType::F32, |vb| {
                    pixart_models::pixart::ControlNet::new(vb, &cfg, copies)
                })?;
                ctx.reserve_memory(
                    params
                        .saturating_mul(4)
                        .saturating_add(net.saturating_mul(20)),
                    "training a ControlNet (the f32 base; the ControlNet's weights, EMA, \
                     gradients and Adam moments)",
                )?
            }
            (None, None) => ctx.reserve_memory(
                params.saturating_mul(20),
                "training this transformer (f32 weights, their EMA, gradients and Adam moments)",
            )?,
        };
        let run = Run {
            settings: &settings,
            features,
            init,
            extend,
            cfg: &cfg,
            device: &device,
            out: &out,
            samples,
        };
        train(ctx, &run)
    }
}

/// Everything one stage runs with.
struct Run<'a> {
    settings: &'a Settings,
    features: &'a Features,
    init: Option<&'a Denoiser>,
    /// `init` in a new architecture (`config` given too).
    extend: bool,
    cfg: &'a Config,
    device: &'a Device,
    out: &'a Path,
    /// Sample images: every N steps, how.
    samples: Option<(u64, Preview<'a>)>,
}

fn train(ctx: &NodeContext, run: &Run) -> Result<Outputs, NodeError> {
    let s = run.settings;
    // The features are read whole into memory: reserve what their files hold.
    let feature_bytes: u64 = run
        .features
        .files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    let _features = ctx.reserve_memory(feature_bytes, "the training features")?;
    let data = Data::load(run.features, s.batch, run.device)?;
    check_features(run, &data)?;
    if s.mixed_precision.is_some() && run.device.is_cpu() {
        eprintln!(
            "`{}`: mixed_precision bf16 on the CPU runs through candle's generic bf16 ops, \
             about 10x slower than f32 here; on CPUs `--matmul-precision bf16` is the fast way",
            ctx.node_id()
        );
    }
    let classes = if s.class_conditional {
        class_names(&data)
    } else {
        Vec::new()
    };
    let fingerprint = s.fingerprint(run.features, &classes);
    // Across the ranks of an MPI job: each takes a slice of every batch, rank 0
    // alone writes, and every rank starts from rank 0's state (its checkpoint
    // when it resumes one).
    let world = crate::distributed::world();
    let primary = world.is_none_or(|w| w.rank() == 0);
    if let Some(w) = world {
        if s.batch < w.size() {
            return Err(NodeError::input(
                "batch",
                format!(
                    "a batch of {} over {} ranks: at least one sample a rank",
                    s.batch,
                    w.size()
                ),
            ));
        }
    }
    let resumed = if primary {
        resume_point(run, &fingerprint)?
    } else {
        None
    };
    let mut state = State::start(run, &data, classes, fingerprint, resumed)?;
    if let Some(w) = world {
        state.take_rank0s(w)?;
    }
    let mut log = if primary {
        std::fs::create_dir_all(run.out).map_err(|e| NodeError::io(run.out, e))?;
        Some(LossLog::open(ctx, run.out, state.step)?)
    } else {
        None
    };

    let diffusion = Diffusion::pixart();
    let table = state.tm.class_table().map(|v| v.as_tensor().clone());
    let with_sizes = run.cfg.additional_conditions();
    let first = state.step;
    let mut last_checkpoint = checkpoint::list(run.out)
        .into_iter()
        .find(|(s, _)| *s == first)
        .map(|(_, p)| p);
    ctx.progress(first, s.steps);
    while state.step < s.steps {
        if ctx.is_cancelled() {
            if state.step > first && primary {
                state.save(ctx, run)?;
            }
            return Err(NodeError::Cancelled);
        }
        let step = state.step;
        let indices = data.batch_of(s.seed, s.batch, step);
        let batch = make_batch(
            &data,
            &indices,
            step,
            s,
            run.features.scaling_factor,
            &state.null_caption,
            table.as_ref().map(|t| (t, state.classes.as_slice())),
            with_sizes,
            &diffusion,
        )?;
        let compute = match s.mixed_precision {
            Some(dtype) => Some(state.tm.compute_copy(dtype)?),
            None => None,
        };
        let (model, controlnet) = match &compute {
            Some((model, net)) => (model, net.as_ref()),
            None => (&state.tm.model, state.tm.controlnet.as_ref()),
        };
        let (terms, loss, mut grads) = match world {
            Some(w) => super::data_parallel::gradients(
                w,
                model,
                controlnet,
                &diffusion,
                &batch,
                &state.opt.vars,
                s.plan,
            )?,
            None => share_gradients(
                model,
                controlnet,
                &diffusion,
                &batch,
                batch.t.len(),
                &state.opt.vars,
                s.plan,
            )?,
        };
        let lr = scheduled_lr(s.lr, step, s.steps, s.warmup, s.lr_schedule, s.decay_steps);
        // The low-precision copy has done its work: free it before AdamW's pass.
        drop(compute);
        let grad_norm = state.opt.apply(&mut grads, lr)?;
        if s.ema_warmup {
            state
                .ema
                .update_at(&state.all_vars, Ema::warmup_rate(s.ema_rate, step))?;
        } else {
            state.ema.update(&state.all_vars)?;
        }
        state.step += 1;
        let step = state.step;
        if !loss.is_finite() {
            return Err(NodeError::msg(format!(
                "the loss became {loss} at step {step}: lower the learning rate (the last checkpoint is kept)"
            )));
        }
        let Some(log) = log.as_mut() else {
            ctx.progress(step, s.steps);
            continue;
        };
        let rate = log.write(step, loss, &terms, lr, grad_norm, first)?;
        ctx.progress_detail(
            step,
            s.steps,
            &format!("loss {loss:.4} · lr {lr:.2e} · |g| {grad_norm:.3} · {rate:.2} it/s"),
        );
        if step == s.steps || (s.checkpoint_every > 0 && step.is_multiple_of(s.checkpoint_every)) {
            last_checkpoint = Some(state.save(ctx, run)?);
        }
        if let Some((every, preview)) = &run.samples {
            if step.is_multiple_of(*every) || step == s.steps {
                let png = render(&state.ema_denoiser(run)?, preview)?;
                let path = run.out.join(format!("samples/step-{step:06}.png"));
                crate::fsutil::atomic_write(ctx, &path, &png)?;
            }
        }
    }
    let checkpoint = match last_checkpoint {
        Some(p) => p,
        // The other ranks name what rank 0 wrote.
        None if !primary => run.out.join(format!("checkpoint-{:06}", state.step)),
        None => state.save(ctx, run)?,
    };
    let den = match (s.controlnet, run.init) {
        // The base is not trained: it goes on as it came.
        (Some(_), Some(base)) => base.with_control(None),
        _ => state.ema_denoiser(run)?,
    };
    let bytes = den.weights.values().map(|t| t.elem_count() * 4).sum();
    Ok(Outputs::one(
        "transformer",
        Value::Handle(Handle::new(PortType::Denoiser, bytes, den)),
    )
    .with(
        "run",
        Value::Path(
            checkpoint
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
        ),
    )
    .with("checkpoint", Value::Path(checkpoint)))
}

/// The feature cache must fit the transformer: text width and latent channels.
fn check_features(run: &Run, data: &Data) -> Result<(), NodeError> {
    let (s, cfg) = (run.settings, run.cfg);
    let caption_channels = cfg.caption_channels();
    let text_dim = data.items[0].text.dim(1)?;
    if !s.class_conditional && text_dim != caption_channels {
        return Err(NodeError::input(
            "features",
            format!(
                "the cache holds {text_dim}-wide text features, the transformer takes {caption_channels}: \
                 encode with the T5 this model was made for"
            ),
        ));
    }
    if s.controlnet.is_some() && data.items.iter().any(|i| i.control.is_none()) {
        return Err(NodeError::input(
            "features",
            "some cached items have no control latent: make the features with train.precompute's \
             `control` folder",
        ));
    }
    let latent_channels = data.items[0].vae_mean.dim(0)?;
    if latent_channels != cfg.in_channels {
        return Err(NodeError::input(
            "features",
            format!(
                "the cache holds {latent_channels}-channel latents, the transformer takes {}",
                cfg.in_channels
            ),
        ));
    }
    Ok(())
}

/// The newest checkpoint of this run to go on from (with `resume`), refused if
/// it was made with other settings.
fn resume_point(run: &Run, fingerprint: &serde_json::Value) -> Result<Option<Saved>, NodeError> {
    if !run.settings.resume {
        return Ok(None);
    }
    let newest = checkpoint::list(run.out)
        .into_iter()
        .rev()
        .find(|(step, _)| *step <= run.settings.steps);
    let Some((_, dir)) = newest else {
        return Ok(None);
    };
    let saved = checkpoint::load(&dir, run.device).map_err(|e| NodeError::io(&dir, e))?;
    check_same_run(&saved.meta["settings"], fingerprint, &dir)?;
    Ok(Some(saved))
}

/// What a stage trains and carries from step to step: model, optimiser, EMA,
/// the null caption dropped captions become, and the step count.
struct State {
    tm: TrainModel,
    opt: Optimizer,
    ema: Ema,
    all_vars: Vec<candle_core::Var>,
    trainable_names: Vec<String>,
    null_caption: Tensor,
    classes: Vec<String>,
    fingerprint: serde_json::Value,
    step: u64,
}

impl State {
    /// From a checkpoint of this run, else from `init` (or nothing).
    fn start(
        run: &Run,
        data: &Data,
        classes: Vec<String>,
        fingerprint: serde_json::Value,
        resumed: Option<Saved>,
    ) -> Result<State, NodeError> {
        let (s, device) = (run.settings, run.device);
        let start = match (&resumed, run.init) {
            (Some(saved), _) => Start::Tensors(&saved.params),
            (None, Some(den)) if run.extend => Start::Extend(&den.weights),
            (None, Some(den)) => Start::Tensors(&den.weights),
            (None, None) => Start::Scratch,
        };
        let tm = match (&s.lora, s.controlnet, run.init) {
            (None, Some(copies), Some(den)) => TrainModel::new_controlnet(
                run.cfg,
                &den.weights,
                copies,
                resumed.as_ref().map(|saved| &saved.params),
                device,
            ),
            (Some(spec), _, Some(den)) => TrainModel::new_lora(
                run.cfg,
                &den.weights,
                spec,
                resumed.as_ref().map(|saved| &saved.params),
                s.seed,
                device,
            ),
            _ => TrainModel::new(run.cfg, start, s.seed, classes.len(), &s.frozen, device),
        }
        .map_err(|e| NodeError::input("init", e))?;
        let null_caption = match (&resumed, run.init.and_then(|d| d.null_caption.as_ref())) {
            (Some(saved), _) => saved.null_caption.clone(),
            (None, Some(null)) => null.to_dtype(DType::F32)?.to_device(device)?,
            (None, None) => {
                let (len, width) = (run.features.max_length, run.cfg.caption_channels());
                let v = TrainRng::new(s.seed, Stream::Init, u64::MAX).normals(len * width);
                (Tensor::from_vec(v, (len, width), device)? / (width as f64).sqrt())?
            }
        };
        let caption_tokens = data.items[0].text.dim(0)?;
        if !s.class_conditional && null_caption.dim(0)? < caption_tokens {
            return Err(NodeError::input(
                "features",
                format!(
                    "captions of {caption_tokens} tokens, but the null caption has {}",
                    null_caption.dim(0)?
                ),
            ));
        }
        let trainable = tm.trainable();
        if trainable.is_empty() {
            return Err(NodeError::input("freeze", "every parameter is frozen"));
        }
        let trainable_names = tm
            .params
            .iter()
            .filter(|p| p.trainable)
            .map(|p| p.name.clone())
            .collect();
        let opt = Optimizer {
            adam: AdamW::new(&trainable, 0.9, 0.999, 1e-10, s.weight_decay)?,
            vars: trainable,
            max_grad_norm: s.grad_clip,
        };
        let all_vars: Vec<candle_core::Var> = tm.params.iter().map(|p| p.var.clone()).collect();
        let ema = Ema::new(&all_vars, s.ema_rate)?;
        let mut state = State {
            tm,
            opt,
            ema,
            all_vars,
            trainable_names,
            null_caption,
            classes,
            fingerprint,
            step: 0,
        };
        if let Some(saved) = resumed {
            state.restore(&saved)?;
        }
        Ok(state)
    }

    /// Rank 0's step, weights, optimiser state, EMA and null caption, on every
    /// rank: what it resumed or initialised is what all go on from.
    fn take_rank0s(&mut self, world: &crate::distributed::World) -> Result<(), NodeError> {
        use super::data_parallel::broadcast_tensor;
        let err = NodeError::msg;
        self.step = world
            .broadcast_u64(self.step, "the start step")
            .map_err(err)?;
        for v in &self.all_vars {
            v.set(&broadcast_tensor(world, v.as_tensor(), "the weights")?)?;
        }
        let adam_steps = world
            .broadcast_u64(self.opt.adam.steps(), "the optimiser's step")
            .map_err(err)?;
        let moments = self
            .opt
            .adam
            .moments()
            .iter()
            .map(|(m, v)| {
                Ok((
                    broadcast_tensor(world, m, "the optimiser state")?,
                    broadcast_tensor(world, v, "the optimiser state")?,
                ))
            })
            .collect::<Result<Vec<_>, NodeError>>()?;
        self.opt.adam.restore(adam_steps, moments)?;
        for e in self.ema.weights.iter_mut() {
            *e = broadcast_tensor(world, e, "the EMA weights")?;
        }
        self.null_caption = broadcast_tensor(world, &self.null_caption, "the null caption")?;
        Ok(())
    }

    /// The optimiser moments, EMA and step of a checkpoint.
    fn restore(&mut self, saved: &Saved) -> Result<(), NodeError> {
        let moments = self
            .trainable_names
            .iter()
            .map(|n| {
                saved.moments.get(n).cloned().ok_or_else(|| {
                    NodeError::msg(format!("the checkpoint has no optimiser state for `{n}`"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.opt.adam.restore(saved.adam_step, moments)?;
        self.ema.weights = self
            .tm
            .params
            .iter()
            .map(|p| {
                saved.ema.get(&p.name).cloned().ok_or_else(|| {
                    NodeError::msg(format!("the checkpoint has no EMA of `{}`", p.name))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.step = saved.step;
        Ok(())
    }

    /// A checkpoint of the current step; its folder.
    fn save(&self, ctx: &NodeContext, run: &Run) -> Result<PathBuf, NodeError> {
        let saved = Saved {
            step: self.step,
            params: self.tm.tensors().into_iter().collect(),
            ema: ema_tensors(&self.tm, &self.ema),
            moments: self
                .trainable_names
                .iter()
                .cloned()
                .zip(self.opt.adam.moments().iter().cloned())
                .collect(),
            adam_step: self.opt.adam.steps(),
            null_caption: self.null_caption.clone(),
            meta: json!({ "settings": self.fingerprint, "total_steps": run.settings.steps }),
            layout: match (&run.settings.lora, run.settings.controlnet) {
                (Some(lora), _) => Layout::Lora(lora.adapter_config()),
                (None, Some(copies)) => Layout::ControlNet(controlnet_config(run.cfg, copies)),
                (None, None) => Layout::Transformer,
            },
        };
        let class_table = run.settings.class_conditional.then_some(CLASS_TABLE);
        ctx.charge_disk(saved.bytes())?;
        checkpoint::save(run.out, run.cfg, class_table, &saved)
            .map_err(|e| NodeError::io(run.out, e))
    }

    /// The EMA weights as a denoiser: what samples and the stage's output use.
    fn ema_denoiser(&self, run: &Run) -> Result<Denoiser, NodeError> {
        let ema = ema_tensors(&self.tm, &self.ema);
        let weights = match self.tm.merged_weights(&ema)? {
            Some(merged) => merged,
            None => ema,
        };
        Ok(denoiser(
            run.cfg,
            &weights,
            &self.null_caption,
            run.features.vae_scale,
            run.device,
        )?)
    }
}

/// The `config.json` of a ControlNet folder, as diffusers' PixArt port
/// (`PixArtControlNetAdapterModel`) writes it: the copies and their width.
fn controlnet_config(cfg: &Config, copies: usize) -> serde_json::Value {
    json!({
        "_class_name": "PixArtControlNetAdapterModel",
        "num_layers": copies,
        "num_attention_heads": cfg.num_attention_heads,
        "attention_head_dim": cfg.attention_head_dim,
        "cross_attention_dim": cfg.cross_attention_dim,
    })
}

/// A hash of every weight's name, shape and values (in f32), in name order.
fn weights_key(weights: &HashMap<String, Tensor>) -> Result<String, NodeError> {
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let mut hasher = blake3::Hasher::new();
    for name in names {
        let t = &weights[name];
        hasher.update(name.as_bytes());
        hasher.update(format!("{:?}", t.dims()).as_bytes());
        for v in t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()? {
            hasher.update(&v.to_le_bytes());
        }
    }
    Ok(hasher.finalize().to_hex()[..16].to_string())
}

/// `loss.jsonl`: one line a step, kept in step with the checkpoints on resume.
struct LossLog {
    ctx: NodeContext,
    file: std::fs::File,
    path: PathBuf,
    started: Instant,
}

impl LossLog {
    /// Opens the run's log for appending, dropping lines past `step` (a resume
    /// redoes those steps).
    fn open(ctx: &NodeContext, out: &Path, step: u64) -> Result<LossLog, NodeError> {
        let path = out.join(LOSS_LOG);
        truncate_log(ctx, &path, step)?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| NodeError::io(&path, e))?;
        Ok(LossLog {
            ctx: ctx.clone(),
            file,
            path,
            started: Instant::now(),
        })
    }

    /// Logs one step; returns the steps per second since `first`.
    fn write(
        &mut self,
        step: u64,
        loss: f64,
        terms: &LossTerms,
        lr: f64,
        grad_norm: f64,
        first: u64,
    ) -> Result<f64, NodeError> {
        let mean = |t: &Tensor| -> candle_core::Result<f64> {
            t.mean_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()
        };
        let seconds = self.started.elapsed().as_secs_f64();
        let line = json!({
            "step": step,
            "loss": loss,
            "mse": mean(&terms.mse)?,
            "vb": mean(&terms.vb)?,
            "lr": lr,
            "grad_norm": grad_norm,
            "seconds": seconds,
        });
        let line = format!("{line}\n");
        self.ctx.charge_disk(line.len() as u64)?;
        self.file
            .write_all(line.as_bytes())
            .map_err(|e| NodeError::io(&self.path, e))?;
        Ok((step - first) as f64 / seconds.max(1e-9))
    }
}

/// A checkpoint made with other settings is not this run: refuse to mix them.
fn check_same_run(
    saved: &serde_json::Value,
    now: &serde_json::Value,
    dir: &Path,
) -> Result<(), NodeError> {
    let (Some(saved), Some(now)) = (saved.as_object(), now.as_object()) else {
        return Err(NodeError::msg(format!(
            "{}: not a train.pixart checkpoint",
            dir.display()
        )));
    };
    // Settings written only when on (a LoRA, a ControlNet, min-SNR…) count
    // when either side has them: a LoRA checkpoint is no start for a full run.
    let mut keys: Vec<&String> = now.keys().chain(saved.keys()).collect();
    keys.sort();
    keys.dedup();
    let shown = |v: Option<&serde_json::Value>| {
        let s = v.map_or("nothing".to_string(), |w| w.to_string());
        if s.chars().count() > 40 {
            format!("{}…", s.chars().take(40).collect::<String>())
        } else {
            s
        }
    };
    let differing: Vec<String> = keys
        .into_iter()
        .filter(|k| saved.get(*k) != now.get(*k))
        .map(|k| {
            format!(
                "{k} (was {}, now {})",
                shown(saved.get(k)),
                shown(now.get(k))
            )
        })
        .collect();
    if differing.is_empty() {
        Ok(())
    } else {
        Err(NodeError::input(
            "resume",
            format!(
                "{} was made with other settings: {}. Use another `out` folder, or `resume: false` to start over",
                dir.display(),
                differing.join(", ")
            ),
        ))
    }
}

pub fn nodes() -> Vec<Arc<dyn Node>> {
    vec![Arc::new(TrainPixArt::new())]
}

//! Training checkpoints: `checkpoint-NNNNNN/` folders holding the EMA transformer
//! in the diffusers layout (what `pixart.load`, `transformer.load` and diffusers
//! read) and, under `state/`, what resuming needs: the raw weights, the AdamW
//! moments and the trainer's counters and settings. A checkpoint is assembled in
//! a hidden folder and renamed into place, so one either exists whole or not at
//! all; the randomness of every step derives from (seed, step), so no generator
//! state is needed beyond the step.
//!
//! A LoRA run keeps its EMA adapter in peft's layout under `lora/` instead of a
//! transformer (`adapter_model.safetensors` with keys
//! `base_model.model.<module>.lora_A/B.weight`, `adapter_config.json`): what
//! peft, diffusers and `lora.load` read. A ControlNet run keeps its EMA
//! ControlNet under `controlnet/` in the layout of diffusers' PixArt port
//! (`controlnet_blocks.N.*`, `config.json`): what `controlnet.load` reads.

use crate::pixart::denoiser::NULL_CAPTION;
use candle_core::{Device, Tensor};
use pixart_models::pixart::Config;
use pixart_runtime::fsutil::atomic_write;
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

pub const TRANSFORMER: &str = "transformer";
/// A LoRA run's adapter folder.
pub const LORA: &str = "lora";
/// A ControlNet run's folder.
pub const CONTROLNET: &str = "controlnet";
const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
const ADAPTER_CONFIG: &str = "adapter_config.json";
const PEFT_PREFIX: &str = "base_model.model.";
const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";
const PARAMS: &str = "state/params.safetensors";
const OPTIMIZER: &str = "state/optimizer.safetensors";
const TRAINER: &str = "state/trainer.json";
const EMA_PREFIX: &str = "ema.";

/// Everything a checkpoint holds.
pub struct Saved {
    pub step: u64,
    /// Raw (not averaged) parameters by name.
    pub params: HashMap<String, Tensor>,
    /// EMA of every parameter by name.
    pub ema: HashMap<String, Tensor>,
    /// AdamW (first, second) moments of the trainable parameters.
    pub moments: HashMap<String, (Tensor, Tensor)>,
    pub adam_step: u64,
    /// The null caption `[L, caption_channels]` that dropped captions become.
    pub null_caption: Tensor,
    /// Trainer settings and class names, checked when resuming.
    pub meta: serde_json::Value,
    /// What the run trains, and so how its model is written.
    pub layout: Layout,
}

/// What a checkpoint's model folder holds.
#[derive(Clone, Debug, PartialEq)]
pub enum Layout {
    /// The transformer, in the diffusers layout.
    Transformer,
    /// A LoRA adapter and its peft `adapter_config.json`.
    Lora(serde_json::Value),
    /// A ControlNet and its `config.json`.
    ControlNet(serde_json::Value),
}

impl Layout {
    fn folder(&self) -> &'static str {
        match self {
            Layout::Transformer => TRANSFORMER,
            Layout::Lora(_) => LORA,
            Layout::ControlNet(_) => CONTROLNET,
        }
    }
}

impl Saved {
    /// About the bytes its files take (tensor data; headers and JSON aside).
    pub fn bytes(&self) -> u64 {
        let of = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        let tensors = self
            .params
            .values()
            .chain(self.ema.values())
            .chain(self.moments.values().flat_map(|(m, v)| [m, v]))
            .chain(std::iter::once(&self.null_caption));
        tensors.map(of).sum::<u64>() + (1 << 20)
    }
}

pub fn folder_name(step: u64) -> String {
    format!("checkpoint-{step:06}")
}

/// Completed checkpoints under `out`, by step.
pub fn list(out: &Path) -> Vec<(u64, PathBuf)> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(out)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse::<u64>().ok()?;
            let path = e.path();
            path.join(TRAINER).is_file().then_some((step, path))
        })
        .collect();
    found.sort();
    found
}

fn io_err(what: impl std::fmt::Display) -> io::Error {
    io::Error::other(what.to_string())
}

fn serialize(tensors: &[(String, Tensor)]) -> io::Result<Vec<u8>> {
    safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), None).map_err(io_err)
}

/// Writes checkpoint `saved` under `out` and returns its folder.
pub fn save(
    out: &Path,
    cfg: &Config,
    class_table: Option<&str>,
    saved: &Saved,
) -> io::Result<PathBuf> {
    std::fs::create_dir_all(out)?;
    let name = folder_name(saved.step);
    let staging = out.join(format!(".{name}.partial"));
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    let transformer = staging.join(saved.layout.folder());
    std::fs::create_dir_all(transformer.join(""))?;
    std::fs::create_dir_all(staging.join("state"))?;

    let sorted = |m: &HashMap<String, Tensor>| {
        let mut v: Vec<(String, Tensor)> = m.iter().map(|(k, t)| (k.clone(), t.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let is_class = |n: &str| Some(n) == class_table;
    let ema = sorted(&saved.ema);
    let model_weights: Vec<(String, Tensor)> =
        ema.iter().filter(|(n, _)| !is_class(n)).cloned().collect();
    match &saved.layout {
        Layout::Lora(adapter) => {
            let peft: Vec<(String, Tensor)> = model_weights
                .iter()
                .map(|(n, t)| (format!("{PEFT_PREFIX}{n}"), t.clone()))
                .collect();
            atomic_write(&transformer.join(ADAPTER_WEIGHTS), &serialize(&peft)?)?;
            let config = serde_json::to_string_pretty(adapter).map_err(io_err)?;
            atomic_write(&transformer.join(ADAPTER_CONFIG), config.as_bytes())?;
        }
        Layout::ControlNet(config) => {
            atomic_write(&transformer.join(WEIGHTS), &serialize(&model_weights)?)?;
            let config = serde_json::to_string_pretty(config).map_err(io_err)?;
            atomic_write(&transformer.join("config.json"), config.as_bytes())?;
        }
        Layout::Transformer => {
            atomic_write(&transformer.join(WEIGHTS), &serialize(&model_weights)?)?;
            let config = serde_json::to_string_pretty(&cfg.to_diffusers_json()).map_err(io_err)?;
            atomic_write(&transformer.join("config.json"), config.as_bytes())?;
        }
    }
    atomic_write(
        &transformer.join(NULL_CAPTION),
        &serialize(&[("y_embedding".into(), saved.null_caption.clone())])?,
    )?;

    let mut params = sorted(&saved.params);
    params.extend(
        ema.iter()
            .filter(|(n, _)| is_class(n))
            .map(|(n, t)| (format!("{EMA_PREFIX}{n}"), t.clone())),
    );
    atomic_write(&staging.join(PARAMS), &serialize(&params)?)?;
    let mut moments: Vec<(String, Tensor)> = Vec::new();
    for (n, (m, v)) in &saved.moments {
        moments.push((format!("exp_avg.{n}"), m.clone()));
        moments.push((format!("exp_avg_sq.{n}"), v.clone()));
    }
    moments.sort_by(|a, b| a.0.cmp(&b.0));
    atomic_write(&staging.join(OPTIMIZER), &serialize(&moments)?)?;
    let trainer = serde_json::json!({
        "step": saved.step,
        "adam_step": saved.adam_step,
        "meta": saved.meta,
    });
    atomic_write(&staging.join(TRAINER), trainer.to_string().as_bytes())?;

    // Replace an older checkpoint of the same step (a restarted run) only once
    // the new one is complete.
    let target = out.join(&name);
    let old = out.join(format!(".{name}.old"));
    if target.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old)?;
        }
        std::fs::rename(&target, &old)?;
    }
    std::fs::rename(&staging, &target)?;
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    if let Ok(dir) = std::fs::File::open(out) {
        let _ = dir.sync_all();
    }
    Ok(target)
}

/// Reads the checkpoint in `dir` onto `device`.
pub fn load(dir: &Path, device: &Device) -> io::Result<Saved> {
    let read = |rel: &str| -> io::Result<HashMap<String, Tensor>> {
        let path = dir.join(rel);
        candle_core::safetensors::load(&path, device)
            .map_err(|e| io_err(format!("{}: {e}", path.display())))
    };
    let trainer_path = dir.join(TRAINER);
    let trainer: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&trainer_path)?)
        .map_err(|e| io_err(format!("{}: {e}", trainer_path.display())))?;
    let field = |k: &str| {
        trainer[k]
            .as_u64()
            .ok_or_else(|| io_err(format!("{}: no `{k}`", trainer_path.display())))
    };
    let mut params = read(PARAMS)?;
    let json = |path: PathBuf| -> io::Result<serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(&path)?)
            .map_err(|e| io_err(format!("{}: {e}", path.display())))
    };
    let (mut ema, layout) = if dir.join(LORA).join(ADAPTER_WEIGHTS).is_file() {
        let ema = read(&format!("{LORA}/{ADAPTER_WEIGHTS}"))?
            .into_iter()
            .map(|(k, t)| (k.strip_prefix(PEFT_PREFIX).unwrap_or(&k).to_string(), t))
            .collect();
        let config = json(dir.join(LORA).join(ADAPTER_CONFIG))?;
        (ema, Layout::Lora(config))
    } else if dir.join(CONTROLNET).join(WEIGHTS).is_file() {
        let config = json(dir.join(CONTROLNET).join("config.json"))?;
        (
            read(&format!("{CONTROLNET}/{WEIGHTS}"))?,
            Layout::ControlNet(config),
        )
    } else {
        (
            read(&format!("{TRANSFORMER}/{WEIGHTS}"))?,
            Layout::Transformer,
        )
    };
    let model_dir = layout.folder();
    let extra: Vec<String> = params
        .keys()
        .filter(|k| k.starts_with(EMA_PREFIX))
        .cloned()
        .collect();
    for k in extra {
        if let Some(t) = params.remove(&k) {
            ema.insert(k[EMA_PREFIX.len()..].to_string(), t);
        }
    }
    let mut raw = read(OPTIMIZER)?;
    let mut moments = HashMap::new();
    let names: Vec<String> = raw
        .keys()
        .filter_map(|k| k.strip_prefix("exp_avg.").map(str::to_string))
        .collect();
    for n in names {
        let m = raw.remove(&format!("exp_avg.{n}"));
        let v = raw.remove(&format!("exp_avg_sq.{n}"));
        if let (Some(m), Some(v)) = (m, v) {
            moments.insert(n, (m, v));
        }
    }
    let null_caption = read(&format!("{model_dir}/{NULL_CAPTION}"))?
        .remove("y_embedding")
        .ok_or_else(|| io_err(format!("{}: no y_embedding", dir.display())))?;
    Ok(Saved {
        step: field("step")?,
        adam_step: field("adam_step")?,
        params,
        ema,
        moments,
        null_caption,
        meta: trainer["meta"].clone(),
        layout,
    })
}

//! `pipeline.save`: assembles a trained transformer and its tokenizer, text
//! encoder and VAE into a diffusers `PixArtAlphaPipeline` folder — what
//! `pixart.load` and diffusers' `from_pretrained` read — written whole.

use super::model_folder::safetensors_bytes;
use crate::pixart::denoiser::NULL_CAPTION;
use crate::pixart::Denoiser;
use pixart_models::schedulers::diffusion::{
    PIXART_BETA_END, PIXART_BETA_START, PIXART_TRAIN_TIMESTEPS,
};
use pixart_runtime::{
    InputSpec, Inputs, Node, NodeContext, NodeError, NodeSpec, Outputs, PortType, Value,
};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The components' (library, class) as `model_index.json` names them.
const COMPONENTS: &[(&str, &str, &str)] = &[
    ("scheduler", "diffusers", "DPMSolverMultistepScheduler"),
    ("text_encoder", "transformers", "T5EncoderModel"),
    ("tokenizer", "transformers", "T5Tokenizer"),
    ("transformer", "diffusers", "PixArtTransformer2DModel"),
    ("vae", "diffusers", "AutoencoderKL"),
];

/// PixArt-α's scheduler: DPM-Solver++ (2M) on the linear β schedule.
fn scheduler_config() -> serde_json::Value {
    json!({
        "_class_name": "DPMSolverMultistepScheduler",
        "algorithm_type": "dpmsolver++",
        "beta_start": PIXART_BETA_START,
        "beta_end": PIXART_BETA_END,
        "beta_schedule": "linear",
        "num_train_timesteps": PIXART_TRAIN_TIMESTEPS,
        "prediction_type": "epsilon",
        "solver_order": 2,
        "solver_type": "midpoint",
        "lower_order_final": true,
        "final_sigmas_type": "zero",
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "thresholding": false,
        "use_karras_sigmas": false,
        "trained_betas": null,
        "variance_type": null,
    })
}

/// The files of a component folder (not its bookkeeping, not sub-folders).
fn component_files(dir: &Path) -> Result<Vec<(String, PathBuf)>, NodeError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| NodeError::io(dir, e))? {
        let path = entry.map_err(|e| NodeError::io(dir, e))?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if path.is_file() && !name.starts_with('.') && name != "training.json" {
            out.push((name, path));
        }
    }
    out.sort();
    Ok(out)
}

pub struct SavePipeline {
    spec: NodeSpec,
}

impl SavePipeline {
    fn new() -> Self {
        SavePipeline {
            spec: NodeSpec::new("pipeline.save", 1)
                .category("training")
                .output_node()
                .describe(
                    "Writes a diffusers PixArtAlphaPipeline folder: model_index.json, the tokenizer, text \
                     encoder and VAE folders copied in, the transformer (with its learned null caption) and \
                     a DPM-Solver++ scheduler config. The folder is replaced whole.",
                )
                .input(InputSpec::new("transformer", PortType::Denoiser))
                .input(InputSpec::new("tokenizer", PortType::Path).describe("A tokenizer folder."))
                .input(InputSpec::new("text_encoder", PortType::Path).describe("A T5EncoderModel folder."))
                .input(InputSpec::new("vae", PortType::Path).describe("An AutoencoderKL folder."))
                .input(InputSpec::new("out", PortType::Path).describe("The pipeline folder to write."))
                .output("path", PortType::Path, "the pipeline folder"),
        }
    }
}

impl Node for SavePipeline {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn run(&self, ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        let den = inputs.handle::<Denoiser>("transformer")?;
        if den.control.is_some() {
            return Err(NodeError::input(
                "transformer",
                "a ControlNet is not part of a pipeline folder: save the transformer without it",
            ));
        }
        let out = ctx.output_path(inputs.path("out")?)?;
        let mut listed = Vec::new();
        for part in ["tokenizer", "text_encoder", "vae"] {
            let dir = ctx.input_path(inputs.path(part)?)?;
            for (name, path) in component_files(&dir)? {
                listed.push((format!("{part}/{name}"), path));
            }
        }
        // The components are copied file to file; the transformer is
        // serialised in memory: reserve that.
        let weights_bytes: u64 = den
            .weights
            .values()
            .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
            .sum();
        let _memory = ctx.reserve_memory(weights_bytes, "serialising the transformer")?;
        let mut files: Vec<(String, Vec<u8>)> = Vec::new();
        let mut weights: Vec<(String, candle_core::Tensor)> = den
            .weights
            .iter()
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect();
        weights.sort_by(|a, b| a.0.cmp(&b.0));
        let io = |e| NodeError::io(&out, e);
        files.push((
            "transformer/diffusion_pytorch_model.safetensors".into(),
            safetensors_bytes(&weights).map_err(io)?,
        ));
        let config = serde_json::to_string_pretty(&den.model.config().to_diffusers_json())
            .map_err(NodeError::msg)?;
        files.push(("transformer/config.json".into(), config.into_bytes()));
        if let Some(null) = &den.null_caption {
            files.push((
                format!("transformer/{NULL_CAPTION}"),
                safetensors_bytes(&[("y_embedding".into(), null.clone())]).map_err(io)?,
            ));
        }
        let scheduler =
            serde_json::to_string_pretty(&scheduler_config()).map_err(NodeError::msg)?;
        files.push((
            "scheduler/scheduler_config.json".into(),
            scheduler.into_bytes(),
        ));
        let mut index = serde_json::Map::new();
        index.insert("_class_name".into(), json!("PixArtAlphaPipeline"));
        for (part, library, class) in COMPONENTS {
            index.insert(part.to_string(), json!([library, class]));
        }
        let index = serde_json::to_string_pretty(&index).map_err(NodeError::msg)?;
        files.push(("model_index.json".into(), index.into_bytes()));
        let named: Vec<(&str, Vec<u8>)> = files
            .iter_mut()
            .map(|(n, b)| (n.as_str(), std::mem::take(b)))
            .collect();
        let copies: Vec<(&str, PathBuf)> = listed
            .iter()
            .map(|(n, p)| (n.as_str(), p.clone()))
            .collect();
        super::model_folder::write_with_copies(ctx, &out, &named, &copies).map_err(io)?;
        Ok(Outputs::one("path", Value::Path(out)))
    }
}

pub fn nodes() -> Vec<Arc<dyn Node>> {
    vec![Arc::new(SavePipeline::new())]
}

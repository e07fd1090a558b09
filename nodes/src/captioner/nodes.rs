//! The captioner's nodes: `captioner.load`, `caption.generate`,
//! `dataset.caption` (auto-label a trainer folder, resumable) and
//! `caption.stats`.

use super::model::{read_rgb, Captioner, Generation};
use super::stats::stats;
use crate::device::{check_dtype_device, device_input, dtype_device, dtype_input};
use crate::fsutil::{atomic_write, input_file_fingerprint};
use crate::image_io::{image_dims, to_bytes};
use crate::model_cache::{self as cache, key};
use pixart_runtime::{
    Handle, InputSpec, Inputs, Node, NodeContext, NodeError, NodeSpec, Outputs, PortType, Value,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// The official relabelling prompt of PixArt-α's data pipeline.
pub const DENSE_PROMPT: &str = "Describe this image and its style in a very detailed manner.";
/// With the original caption passed in (`{caption}` is replaced).
pub const WITH_CAPTION_PROMPT: &str =
    "Given the caption of this image '{caption}', describe this image in a very detailed manner.";

pub fn nodes() -> Vec<Arc<dyn Node>> {
    vec![
        Arc::new(LoadCaptioner::new()),
        Arc::new(Generate::new()),
        Arc::new(CaptionDataset::new()),
        Arc::new(Stats::new()),
    ]
}

fn generation_inputs(spec: NodeSpec) -> NodeSpec {
    spec.input(
        InputSpec::new("max_tokens", PortType::Int)
            .default(120)
            .min(1.0)
            .max(4096.0),
    )
    .input(
        InputSpec::new("temperature", PortType::Float)
            .default(0.0)
            .min(0.0)
            .max(5.0)
            .describe("0: greedy (the most likely token each step)."),
    )
    .input(
        InputSpec::new("seed", PortType::Int)
            .default(0)
            .min(0.0)
            .describe("For temperature > 0."),
    )
}

fn generation(inputs: &Inputs) -> Result<Generation, NodeError> {
    Ok(Generation {
        max_tokens: inputs.int("max_tokens")? as usize,
        temperature: inputs.float("temperature")?,
        seed: inputs.int("seed")? as u64,
    })
}

// ---- captioner.load ---------------------------------------------------------------

pub struct LoadCaptioner {
    spec: NodeSpec,
}

impl LoadCaptioner {
    fn new() -> Self {
        LoadCaptioner {
            spec: NodeSpec::new("captioner.load", 1)
                .category("captioner")
                .describe(
                    "Loads a LLaVA-1.5 folder as transformers saves it (config.json, safetensors, \
                     tokenizer.json, preprocessor or processor config, chat template), e.g. \
                     llava-hf/llava-1.5-7b-hf. Shared between nodes and runs.",
                )
                .input(InputSpec::new("path", PortType::Path))
                .input(dtype_input())
                .input(device_input())
                .output(
                    "captioner",
                    PortType::Captioner,
                    "the vision-language model",
                ),
        }
    }
}

impl Node for LoadCaptioner {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn fingerprint(&self, ctx: &NodeContext, inputs: &Inputs) -> Option<String> {
        input_file_fingerprint(ctx, inputs, "path")
    }

    fn run(&self, ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        let (dtype, device) = dtype_device(&inputs)?;
        let dir = ctx.input_path(inputs.path("path")?)?;
        check_dtype_device(&dir, dtype, &device).map_err(NodeError::msg)?;
        crate::pixart::nodes::take_model(ctx, "captioner", &dir, |_, _| {
            pixart_models::weights::Keep::as_is(dtype)
        })?;
        let captioner = cache::get_or_load(&key("llava", &dir, dtype, &device), || {
            Captioner::load(&dir, dtype, &device).map(|c| {
                let bytes = c.bytes();
                (c, bytes)
            })
        })
        .map_err(|e| NodeError::input("path", e))?;
        Ok(Outputs::one(
            "captioner",
            Value::Handle(Handle::shared(PortType::Captioner, 0, captioner)),
        ))
    }
}

// ---- caption.generate -------------------------------------------------------------

pub struct Generate {
    spec: NodeSpec,
}

impl Generate {
    fn new() -> Self {
        Generate {
            spec: generation_inputs(
                NodeSpec::new("caption.generate", 1)
                    .category("captioner")
                    .describe("Captions each image of a batch with a vision-language model.")
                    .input(InputSpec::new("captioner", PortType::Captioner))
                    .input(InputSpec::new("image", PortType::Image))
                    .input(InputSpec::new("prompt", PortType::String).default(DENSE_PROMPT)),
            )
            .output("text", PortType::String, "the caption of the first image")
            .output(
                "texts",
                PortType::list_of(PortType::String),
                "every image's caption",
            ),
        }
    }
}

impl Node for Generate {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn run(&self, ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        let captioner = inputs.handle::<Captioner>("captioner")?;
        let image = inputs.image("image")?;
        let (batch, h, w, c) = image_dims(image)?;
        let prompt = inputs.str("prompt")?;
        let opts = generation(&inputs)?;
        let rgb = (0..batch)
            .map(|i| rgb_bytes(&image.narrow(0, i, 1)?, c))
            .collect::<Result<Vec<_>, NodeError>>()?;
        let images: Vec<(&[u8], usize, usize, &str)> =
            rgb.iter().map(|b| (b.as_slice(), w, h, prompt)).collect();
        let captions = captioner
            .caption_many(
                &images,
                &opts,
                |i, done, max| {
                    ctx.progress((i * max + done) as u64, (batch * max) as u64);
                    if ctx.is_cancelled() {
                        candle_core::bail!("cancelled");
                    }
                    Ok(())
                },
                |_, _| Ok(()),
            )
            .map_err(|e| {
                if ctx.is_cancelled() {
                    NodeError::Cancelled
                } else {
                    NodeError::msg(e)
                }
            })?;
        let texts: Vec<String> = captions.into_iter().map(|c| c.text).collect();
        let first = texts.first().cloned().unwrap_or_default();
        Ok(Outputs::one("text", Value::String(first)).with(
            "texts",
            Value::List(texts.into_iter().map(Value::String).collect()),
        ))
    }
}

/// 8-bit RGB of a one-image batch `[1, H, W, C]` (gray repeated, alpha dropped).
fn rgb_bytes(image: &candle_core::Tensor, channels: usize) -> Result<Vec<u8>, NodeError> {
    let bytes = to_bytes(image)?;
    Ok(match channels {
        3 => bytes,
        1 => bytes.iter().flat_map(|&g| [g, g, g]).collect(),
        _ => bytes
            .chunks(channels)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
    })
}

// ---- dataset.caption --------------------------------------------------------------

pub struct CaptionDataset {
    spec: NodeSpec,
}

impl CaptionDataset {
    fn new() -> Self {
        CaptionDataset {
            spec: generation_inputs(
                NodeSpec::new("dataset.caption", 1)
                    .category("captioner")
                    .describe(
                        "Relabels a training folder (name.png + name.txt) with dense captions: the \
                         original caption is kept as name.orig.txt and may go into the prompt; each \
                         caption is written atomically, so an interrupted run resumes where it \
                         stopped (images with a dense caption are skipped unless `overwrite`).",
                    )
                    .input(InputSpec::new("captioner", PortType::Captioner))
                    .input(InputSpec::new("path", PortType::Path).describe("The folder, relabelled in place."))
                    .input(InputSpec::new("prompt", PortType::String).default(DENSE_PROMPT))
                    .input(
                        InputSpec::new("use_original", PortType::Bool)
                            .default(false)
                            .describe("Ask with the original caption (`original_prompt`)."),
                    )
                    .input(InputSpec::new("original_prompt", PortType::String).default(WITH_CAPTION_PROMPT))
                    .input(InputSpec::new("overwrite", PortType::Bool).default(false))
                    .input(
                        InputSpec::new("batch", PortType::Int)
                            .default(4)
                            .min(1.0)
                            .max(256.0)
                            .describe("Images per step (read and preprocessed together)."),
                    ),
            )
            .output_node()
            .nondeterministic()
            .output("path", PortType::Path, "the relabelled folder")
            .output("captioned", PortType::Int, "images captioned by this run")
            .output("skipped", PortType::Int, "images that already had a dense caption"),
        }
    }
}

/// An image of the folder and its caption files.
struct Item {
    image: PathBuf,
    caption: PathBuf,
    original: PathBuf,
}

impl Item {
    /// Done when the original is kept and the caption differs from it: the
    /// dense caption was written after the original was saved.
    fn done(&self) -> bool {
        match (
            std::fs::read_to_string(&self.original),
            std::fs::read_to_string(&self.caption),
        ) {
            (Ok(orig), Ok(now)) => orig != now,
            _ => false,
        }
    }
}

fn items(dir: &Path) -> Result<Vec<Item>, NodeError> {
    let entries = std::fs::read_dir(dir).map_err(|e| NodeError::io(dir, e))?;
    let mut images: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| ["png", "jpg", "jpeg"].contains(&e.to_ascii_lowercase().as_str()))
        })
        .collect();
    images.sort();
    Ok(images
        .into_iter()
        .map(|image| Item {
            caption: image.with_extension("txt"),
            original: image.with_extension("orig.txt"),
            image,
        })
        .collect())
}

impl Node for CaptionDataset {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn run(&self, ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        // Captions are written beside the images: the folder is an output too.
        let dir = ctx.in_place_path(inputs.path("path")?)?;
        let captioner = inputs.handle::<Captioner>("captioner")?;
        let opts = generation(&inputs)?;
        let overwrite = inputs.bool("overwrite")?;
        let use_original = inputs.bool("use_original")?;
        let prompt = inputs.str("prompt")?;
        let original_prompt = inputs.str("original_prompt")?;
        let batch = inputs.int("batch")? as usize;
        let all = items(&dir)?;
        let todo: Vec<&Item> = all.iter().filter(|i| overwrite || !i.done()).collect();
        let skipped = all.len() - todo.len();
        let started = Instant::now();
        let mut captioned = 0;
        for chunk in todo.chunks(batch) {
            // The chunk is decoded together and goes through the vision tower as one batch.
            let decoded = chunk
                .iter()
                .map(|item| read_rgb(&item.image))
                .collect::<Result<Vec<_>, _>>()?;
            ctx.check_cancelled()?;
            let mut asked = Vec::with_capacity(chunk.len());
            for item in chunk {
                // Keep the original once; a rerun with `overwrite` keeps the first one.
                if !item.original.exists() {
                    let original = std::fs::read_to_string(&item.caption).unwrap_or_default();
                    atomic_write(ctx, &item.original, original.as_bytes())?;
                }
                asked.push(if use_original {
                    let original = std::fs::read_to_string(&item.original).unwrap_or_default();
                    original_prompt.replace("{caption}", original.trim())
                } else {
                    prompt.to_string()
                });
            }
            let images: Vec<(&[u8], usize, usize, &str)> = decoded
                .iter()
                .zip(&asked)
                .map(|((rgb, w, h), p)| (rgb.as_slice(), *w, *h, p.as_str()))
                .collect();
            let result = captioner.caption_many(
                &images,
                &opts,
                |_, _, _| {
                    if ctx.is_cancelled() {
                        candle_core::bail!("cancelled");
                    }
                    Ok(())
                },
                // Each caption is saved as soon as it exists: a kill loses at most
                // the one being generated.
                |i, caption| {
                    atomic_write(ctx, &chunk[i].caption, caption.text.trim().as_bytes())
                        .map_err(candle_core::Error::msg)?;
                    captioned += 1;
                    let per = started.elapsed().as_secs_f64() / captioned as f64;
                    let left = per * (todo.len() - captioned) as f64;
                    ctx.progress_detail(
                        (skipped + captioned) as u64,
                        all.len() as u64,
                        &format!("{per:.2} s/image, ETA {}", eta(left)),
                    );
                    Ok(())
                },
            );
            result.map_err(|e| {
                if ctx.is_cancelled() {
                    NodeError::Cancelled
                } else {
                    NodeError::msg(format!("{}: {e}", dir.display()))
                }
            })?;
        }
        Ok(Outputs::one("path", Value::Path(dir))
            .with("captioned", Value::Int(captioned as i64))
            .with("skipped", Value::Int(skipped as i64)))
    }
}

fn eta(seconds: f64) -> String {
    let s = seconds.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

// ---- caption.stats ----------------------------------------------------------------

pub struct Stats {
    spec: NodeSpec,
}

impl Stats {
    fn new() -> Self {
        Stats {
            spec: NodeSpec::new("caption.stats", 1)
                .category("captioner")
                .describe(
                    "Caption statistics of a training folder: captions, mean words, and concept density \
                     (distinct content words per caption, a proxy for the paper's distinct nouns per \
                     image). `which: original` reads the name.orig.txt files dataset.caption kept.",
                )
                .input(InputSpec::new("path", PortType::Path))
                .input(InputSpec::new("which", PortType::enum_of(&["current", "original"])).default("current"))
                .nondeterministic()
                .output("report", PortType::String, "one line of figures")
                .output("captions", PortType::Int, "captions read")
                .output("mean_words", PortType::Float, "words per caption")
                .output("concepts", PortType::Float, "distinct content words per caption")
                .output("vocabulary", PortType::Int, "distinct content words in all captions"),
        }
    }
}

impl Node for Stats {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn run(&self, ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        let dir = ctx.input_path(inputs.path("path")?)?;
        let original = inputs.str("which")? == "original";
        let texts: Vec<String> = items(&dir)?
            .iter()
            .filter_map(|i| {
                std::fs::read_to_string(if original { &i.original } else { &i.caption }).ok()
            })
            .collect();
        let s = stats(texts.iter().map(String::as_str));
        let report = format!(
            "{} captions ({}): {:.1} words, {:.2} distinct content words per caption, {} in all",
            s.captions,
            if original { "original" } else { "current" },
            s.mean_words,
            s.mean_concepts,
            s.vocabulary
        );
        Ok(Outputs::one("report", Value::String(report))
            .with("captions", Value::Int(s.captions as i64))
            .with("mean_words", Value::Float(s.mean_words))
            .with("concepts", Value::Float(s.mean_concepts))
            .with("vocabulary", Value::Int(s.vocabulary as i64)))
    }
}

//! `dataset.shapes` writes the shapes world as a training folder; `eval.shapes`
//! generates images for the world's prompts and scores them with the detector.

use super::detect::{score, Score};
use super::world::{
    caption, combos_of, held_out, unplaced_caption, Background, Object, Sampling, Scene, Shape,
    Size,
};
use crate::edges::canny_rgb;
use crate::fsutil::atomic_write;
use crate::image_io::encode_png;
use crate::pixart::controlnet::{build_controlnet, ControlNetWeights};
use crate::pixart::denoiser::DenoiserControl;
use crate::pixart::nodes::encode_text;
use crate::pixart::Denoiser;
use crate::training::preview::{generate, Preview};
use image::RgbImage;
use pixart_models::pixart::ControlNet;
use pixart_models::t5::T5Encoder;
use pixart_models::tokenizer::T5Tokenizer;
use pixart_models::vae::AutoencoderKl;
use pixart_runtime::{
    InputSpec, Inputs, Node, NodeContext, NodeError, NodeSpec, Outputs, PortType, Value,
};
use rayon::prelude::*;
use serde_json::json;
use std::sync::Arc;

const MANIFEST: &str = "shapes.json";
/// The subfolder of edge maps.
const EDGES: &str = "edges";

/// Aspect ratios (width : height) of the multi-scale set.
const ASPECTS: &[(u32, u32)] = &[(1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (2, 1), (1, 2)];

/// The size of image `index`: the base size, or for a mixed set one of
/// [`ASPECTS`] at about the base area, in multiples of 8 pixels.
fn frame(width: u32, height: u32, mixed: bool, seed: u64, index: u64) -> (u32, u32) {
    if !mixed {
        return (width, height);
    }
    let mut rng =
        crate::training::rng::TrainRng::new(seed, crate::training::rng::Stream::Caption, !index);
    let (a, b) = ASPECTS[rng.below(ASPECTS.len() as u64) as usize];
    let area = (width * height) as f64;
    let w = (area * a as f64 / b as f64).sqrt();
    let round8 = |x: f64| ((x / 8.0).round() as u32).max(1) * 8;
    (round8(w), round8(area / w))
}

pub struct DatasetShapes {
    spec: NodeSpec,
}

impl DatasetShapes {
    fn new() -> Self {
        DatasetShapes {
            spec: NodeSpec::new("dataset.shapes", 1)
                .category("training")
                .describe(
                    "Renders the shapes world into a training folder: one or two objects (circle, square, \
                     triangle; six colours; small or large; left, right, top, bottom or center) on a white, \
                     black or gray background, with jitter. Each image gets name.png, name.txt (its dense \
                     or sparse caption) and name.label (the first object's shape, for class-conditional \
                     training). Deterministic per (seed, index); a folder already holding the same set is \
                     kept as it is.",
                )
                .input(InputSpec::new("path", PortType::Path).describe("The folder to write."))
                .input(InputSpec::new("count", PortType::Int).default(2000).min(1.0).max(1e7))
                .input(InputSpec::new("seed", PortType::Int).default(0).min(0.0))
                .input(InputSpec::new("width", PortType::Int).default(64).min(16.0).max(4096.0))
                .input(InputSpec::new("height", PortType::Int).default(64).min(16.0).max(4096.0))
                .input(
                    InputSpec::new("aspect", PortType::enum_of(&["fixed", "mixed"]))
                        .default("fixed")
                        .describe("mixed: each image takes one of 1:1, 4:3, 3:4, 3:2, 2:3, 2:1, 1:2 at about width×height pixels (for bucketed multi-scale training)."),
                )
                .input(
                    InputSpec::new("two_objects", PortType::Float)
                        .default(0.5)
                        .min(0.0)
                        .max(1.0)
                        .describe("Probability that a scene has two objects."),
                )
                .input(
                    InputSpec::new("captions", PortType::enum_of(&["dense", "sparse", "unplaced"]))
                        .default("dense")
                        .describe(
                            "dense: every object's size, colour, shape and position and the background; \
                             sparse: like web alt-text, the first object's shape, sometimes with its colour \
                             or position; unplaced: dense without the positions (for a ControlNet that \
                             places objects by its control image).",
                        ),
                )
                .input(
                    InputSpec::new("new_shape", PortType::enum_of(&["none", "ring"]))
                        .default("none")
                        .describe(
                            "A shape the default world never shows (nor its tokenizer's vocabulary): \
                             with probability `new_shape_share` a scene's first object takes it. The \
                             data for teaching a trained model a new shape with a LoRA.",
                        ),
                )
                .input(
                    InputSpec::new("new_shape_share", PortType::Float)
                        .default(0.5)
                        .min(0.0)
                        .max(1.0),
                )
                .input(
                    InputSpec::new("edges", PortType::Bool)
                        .default(false)
                        .describe(
                            "Also write each image's Canny edge map (image.canny's defaults, 100 and \
                             200) as edges/name.png: control images for ControlNet training \
                             (train.precompute's `control`).",
                        ),
                )
                .input(
                    InputSpec::new("holdout", PortType::Bool)
                        .default(true)
                        .describe("Leave out the 13 colour-shape-position combinations kept for evaluation."),
                )
                .output("path", PortType::Path, "the folder, for dataset.folder")
                .output("count", PortType::Int, "images written")
                .output("edges", PortType::Path, "the edge maps' folder (written with `edges`)"),
        }
    }
}

impl Node for DatasetShapes {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn run(&self, ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        let dir = ctx.output_path(inputs.path("path")?)?;
        let count = inputs.int("count")? as u64;
        let (width, height) = (inputs.int("width")? as u32, inputs.int("height")? as u32);
        let mixed = inputs.str("aspect")? == "mixed";
        let captions = inputs.str("captions")?.to_string();
        let edges = inputs.bool("edges")?;
        let new_shape = match inputs.str("new_shape")? {
            "none" => None,
            word => Some((
                Shape::from_word(word)
                    .ok_or_else(|| NodeError::input("new_shape", format!("no shape `{word}`")))?,
                inputs.float("new_shape_share")?,
            )),
        };
        let sampling = Sampling {
            seed: inputs.int("seed")? as u64,
            two_objects: inputs.float("two_objects")?,
            holdout: inputs.bool("holdout")?,
            new_shape,
        };
        let mut manifest = json!({
            "world": 1,
            "count": count,
            "seed": sampling.seed,
            "width": width,
            "height": height,
            "aspect": if mixed { "mixed" } else { "fixed" },
            "two_objects": sampling.two_objects,
            "captions": captions,
            "holdout": sampling.holdout,
        });
        // Only when used, so folders written before these options still match.
        if let Some((shape, share)) = new_shape {
            manifest["new_shape"] = json!({"shape": shape.word(), "share": share});
        }
        if edges {
            manifest["edges"] = json!(true);
        }
        let manifest_file = dir.join(MANIFEST);
        let name = |i: u64| format!("{i:06}");
        let complete = std::fs::read_to_string(&manifest_file)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|m| m == manifest)
            && (0..count).all(|i| dir.join(format!("{}.label", name(i))).is_file());
        let edge_dir = dir.join(EDGES);
        if !complete {
            std::fs::create_dir_all(&dir).map_err(|e| NodeError::io(&dir, e))?;
            if edges {
                std::fs::create_dir_all(&edge_dir).map_err(|e| NodeError::io(&edge_dir, e))?;
            }
            // A stale manifest must not vouch for a half-rewritten folder.
            let _ = std::fs::remove_file(&manifest_file);
            let done = std::sync::atomic::AtomicU64::new(0);
            (0..count)
                .into_par_iter()
                .try_for_each(|i| -> Result<(), NodeError> {
                    ctx.check_cancelled()?;
                    let scene = Scene::sample(&sampling, i);
                    let (w, h) = frame(width, height, mixed, sampling.seed, i);
                    let img = scene.render(w, h);
                    let png = encode_png(img.as_raw(), w as usize, h as usize, 3, &[])
                        .map_err(NodeError::msg)?;
                    let text = match captions.as_str() {
                        "sparse" => scene.sparse_caption(sampling.seed, i),
                        "unplaced" => scene.unplaced_caption(),
                        _ => scene.dense_caption(),
                    };
                    let base = dir.join(name(i));
                    if edges {
                        let map = canny_rgb(&img, 100.0, 200.0);
                        let png = encode_png(map.as_raw(), w as usize, h as usize, 3, &[])
                            .map_err(NodeError::msg)?;
                        atomic_write(ctx, &edge_dir.join(format!("{}.png", name(i))), &png)?;
                    }
                    atomic_write(ctx, &base.with_extension("png"), &png)?;
                    atomic_write(ctx, &base.with_extension("txt"), text.as_bytes())?;
                    // The label last: its presence marks the item complete.
                    atomic_write(ctx, &base.with_extension("label"), scene.label().as_bytes())?;
                    let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                    if n.is_multiple_of(64) || n == count {
                        ctx.progress(n, count);
                    }
                    Ok(())
                })?;
            atomic_write(ctx, &manifest_file, manifest.to_string().as_bytes())?;
        }
        Ok(Outputs::one("path", Value::Path(dir))
            .with("count", Value::Int(count as i64))
            .with("edges", Value::Path(edge_dir)))
    }
}

/// A prompt of the evaluation set.
#[derive(Clone, Debug)]
pub struct EvalPrompt {
    pub objects: Vec<Object>,
    pub background: Background,
    pub held_out: bool,
    /// Whether the text names the objects' positions (a ControlNet's prompts
    /// leave them to the control image).
    pub placed: bool,
}

impl EvalPrompt {
    pub fn text(&self) -> String {
        if self.placed {
            caption(&self.objects, self.background)
        } else {
            unplaced_caption(&self.objects, self.background)
        }
    }
}

/// The evaluation prompts: every colour-position combination of `shapes` once
/// per sample, sizes and backgrounds rotating; or (`two`) two-object scenes of
/// the world. `placed`: the prompts name the positions.
pub fn eval_prompts(two: bool, samples: usize, shapes: &[Shape], placed: bool) -> Vec<EvalPrompt> {
    let mut out = Vec::new();
    if two {
        let sampling = Sampling {
            seed: 0x5eed_e7a1,
            two_objects: 1.0,
            holdout: false,
            new_shape: None,
        };
        for i in 0..(60 * samples as u64) {
            let scene = Scene::sample(&sampling, i);
            if scene.objects.len() == 2 {
                let objects: Vec<Object> = scene.objects.iter().map(|p| p.object).collect();
                out.push(EvalPrompt {
                    held_out: objects
                        .iter()
                        .any(|o| held_out((o.colour, o.shape, o.position))),
                    objects,
                    background: scene.background,
                    placed,
                });
            }
        }
        return out;
    }
    for k in 0..samples {
        for (i, combo) in combos_of(shapes).into_iter().enumerate() {
            let (colour, shape, position) = combo;
            out.push(EvalPrompt {
                objects: vec![Object {
                    shape,
                    colour,
                    size: Size::ALL[(i + k) % 2],
                    position,
                }],
                background: Background::ALL[(i / 2 + k) % 3],
                // Only the world's combinations are held out of training; a new
                // shape's data shows all of its own.
                held_out: Shape::WORLD.contains(&shape) && held_out(combo),
                placed,
            });
        }
    }
    out
}

/// Scores of one evaluation: all prompts, and the seen / held-out split.
#[derive(Clone, Debug, Default)]
pub struct Evaluation {
    pub all: Score,
    pub seen: Score,
    pub held_out: Score,
}

impl Evaluation {
    /// Counts one prompt's score in the totals and in its seen / held-out part.
    fn record(&mut self, held_out: bool, score: &Score) {
        self.all.add(score);
        if held_out {
            self.held_out.add(score);
        } else {
            self.seen.add(score);
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "all": self.all.to_json(),
            "seen": self.seen.to_json(),
            "held_out": self.held_out.to_json(),
        })
    }
}

pub struct EvalSettings {
    pub size: usize,
    pub steps: usize,
    pub guidance: f64,
    pub seed: u64,
    /// A ControlNet and its scale: each prompt is sampled under the edge map of
    /// a true render of its scene.
    pub control: Option<(Arc<ControlNet>, f64)>,
}

/// The edge map ControlNet evaluation conditions prompt `index` on: Canny of a
/// true render of its scene (jittered by the evaluation seed), as `[1, 3, s, s]`
/// in −1..1, and that map as an image.
fn control_image(
    p: &EvalPrompt,
    size: usize,
    seed: u64,
) -> Result<(candle_core::Tensor, RgbImage), NodeError> {
    let scene = Scene::of(&p.objects, p.background, seed);
    let edges = canny_rgb(&scene.render(size as u32, size as u32), 100.0, 200.0);
    let pixels = candle_core::Tensor::from_vec(
        edges.as_raw().clone(),
        (1, size, size, 3),
        &candle_core::Device::Cpu,
    )?
    .permute((0, 3, 1, 2))?
    .to_dtype(candle_core::DType::F32)?
    .affine(2.0 / 255.0, -1.0)?;
    Ok((pixels, edges))
}

/// Generates one image per prompt and scores it; `each` sees every image.
pub fn evaluate(
    den: &Denoiser,
    tok: &T5Tokenizer,
    enc: &T5Encoder,
    vae: &AutoencoderKl,
    prompts: &[EvalPrompt],
    s: &EvalSettings,
    mut each: impl FnMut(usize, &RgbImage) -> Result<(), NodeError>,
) -> Result<Evaluation, NodeError> {
    let mut eval = Evaluation::default();
    for (i, p) in prompts.iter().enumerate() {
        let cond = encode_text(tok, enc, &p.text(), 120).map_err(NodeError::msg)?;
        let controlled = match &s.control {
            Some((net, scale)) => {
                let (pixels, _) = control_image(p, s.size, s.seed.wrapping_add(i as u64))?;
                let latents = (vae.encode(&pixels)?.mean * vae.config().scaling_factor)?;
                Some(
                    den.with_control(Some(DenoiserControl {
                        net: net.clone(),
                        latents: latents
                            .to_dtype(den.model.dtype())?
                            .to_device(den.model.device())?,
                        scale: *scale,
                    })),
                )
            }
            None => None,
        };
        let image = generate(
            controlled.as_ref().unwrap_or(den),
            &Preview {
                vae,
                prompt: &cond,
                size: s.size,
                steps: s.steps,
                guidance: s.guidance,
                seed: s.seed.wrapping_add(i as u64),
            },
        )?;
        let (_, h, w, _) = image.dims4()?;
        let bytes = crate::image_io::to_bytes(&image)?;
        let rgb = RgbImage::from_raw(w as u32, h as u32, bytes)
            .ok_or_else(|| NodeError::msg("generated image has the wrong size"))?;
        let sc = score(&rgb, &p.objects, p.background);
        eval.record(p.held_out, &sc);
        each(i, &rgb)?;
    }
    Ok(eval)
}

/// Tiles images into rows of `columns`.
pub fn contact_sheet(images: &[RgbImage], columns: usize) -> RgbImage {
    let (w, h) = images.first().map_or((1, 1), |i| i.dimensions());
    let rows = images.len().div_ceil(columns.max(1)).max(1);
    let mut sheet = RgbImage::new(w * columns as u32, h * rows as u32);
    for (i, img) in images.iter().enumerate() {
        let (x, y) = (
            (i % columns) as i64 * w as i64,
            (i / columns) as i64 * h as i64,
        );
        image::imageops::replace(&mut sheet, img, x, y);
    }
    sheet
}

/// The `shape` input of the evaluations: the world's shapes or one.
fn shape_input() -> InputSpec {
    InputSpec::new(
        "shape",
        PortType::enum_of(&["world", "circle", "square", "triangle", "ring"]),
    )
    .default("world")
    .describe(
        "Single prompts of these shapes: the world's three, or one shape (ring: the shape \
         outside the world that a LoRA can teach).",
    )
}

/// The shapes a `shape` input names.
fn shapes_of(inputs: &Inputs) -> Result<Vec<Shape>, NodeError> {
    Ok(match inputs.str("shape")? {
        "world" => Shape::WORLD.to_vec(),
        word => vec![Shape::from_word(word)
            .ok_or_else(|| NodeError::input("shape", format!("no shape `{word}`")))?],
    })
}

pub struct EvalShapes {
    spec: NodeSpec,
}

impl EvalShapes {
    fn new() -> Self {
        EvalShapes {
            spec: NodeSpec::new("eval.shapes", 1)
                .category("training")
                .output_node()
                .describe(
                    "Scores a model on the shapes world: generates each evaluation prompt (single: all 90 \
                     colour-shape-position combinations per sample, 13 of them held out of training; two: \
                     two-object scenes) and reads colour, shape, size and position back with a deterministic \
                     detector. Writes report.json and a contact sheet to `out`.",
                )
                .input(InputSpec::new("transformer", PortType::Denoiser))
                .input(InputSpec::new("tokenizer", PortType::Tokenizer))
                .input(InputSpec::new("encoder", PortType::TextEncoder))
                .input(InputSpec::new("vae", PortType::Vae))
                .input(InputSpec::new("prompts", PortType::enum_of(&["single", "two"])).default("single"))
                .input(shape_input())
                .input(
                    InputSpec::new("positions", PortType::Bool)
                        .default(true)
                        .describe(
                            "Name the objects' positions in the prompts; without, only a ControlNet's \
                             edge map says where they go (position is still scored).",
                        ),
                )
                .input(
                    InputSpec::new("controlnet", PortType::ControlNet)
                        .optional()
                        .describe(
                            "Sample each prompt under this ControlNet, led by the Canny edge map of a \
                             true render of its scene (written to controls.png).",
                        ),
                )
                .input(InputSpec::new("control_scale", PortType::Float).default(1.0).min(0.0).max(4.0))
                .input(
                    InputSpec::new("samples", PortType::Int)
                        .default(1)
                        .min(1.0)
                        .max(1000.0)
                        .describe("Images per prompt (single) or sets of 60 scenes (two)."),
                )
                .input(InputSpec::new("size", PortType::Int).default(64).min(16.0).max(4096.0))
                .input(InputSpec::new("steps", PortType::Int).default(20).min(1.0).max(1000.0))
                .input(InputSpec::new("guidance", PortType::Float).default(4.5).min(0.0).max(100.0))
                .input(InputSpec::new("seed", PortType::Int).default(0).min(0.0))
                .input(InputSpec::new("out", PortType::Path).describe("Folder for report.json and sheet.png."))
                .output("report", PortType::String, "the scores as JSON")
                .output("colour", PortType::Float, "colour accuracy over all prompts")
                .output("shape", PortType::Float, "shape accuracy over all prompts")
                .output("position", PortType::Float, "position accuracy over all prompts"),
        }
    }
}

impl Node for EvalShapes {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn run(&self, ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        let den = inputs.handle::<Denoiser>("transformer")?;
        let tok = inputs.handle::<T5Tokenizer>("tokenizer")?;
        let encoder = crate::pixart::text_encoder::from_input(&inputs, "encoder")?;
        let enc = &*encoder;
        let vae = inputs.handle::<AutoencoderKl>("vae")?;
        let out = ctx.output_path(inputs.path("out")?)?;
        let size = inputs.int("size")? as usize;
        let scale = vae.config().scale_factor() * den.model.config().patch_size;
        if !size.is_multiple_of(scale) {
            return Err(NodeError::input(
                "size",
                format!("{size} is not a multiple of {scale}"),
            ));
        }
        let two = inputs.str("prompts")? == "two";
        let shape = inputs.str("shape")?;
        let shapes = shapes_of(&inputs)?;
        if two && shape != "world" {
            return Err(NodeError::input(
                "shape",
                "two-object prompts are the world's scenes: choose a shape with `single` prompts",
            ));
        }
        let placed = inputs.bool("positions")?;
        let prompts = eval_prompts(two, inputs.int("samples")? as usize, &shapes, placed);
        if den.control.is_some() {
            return Err(NodeError::input(
                "transformer",
                "this transformer has one control image for every prompt: give the transformer \
                 without it and the ControlNet as `controlnet`, so each prompt gets its own edge map",
            ));
        }
        let control = match inputs.get("controlnet") {
            Some(_) => {
                let weights = inputs.handle::<ControlNetWeights>("controlnet")?;
                let net = build_controlnet(ctx, weights, den)
                    .map_err(|e| NodeError::input("controlnet", e))?;
                Some((Arc::new(net), inputs.float("control_scale")?))
            }
            None => None,
        };
        let settings = EvalSettings {
            size,
            steps: inputs.int("steps")? as usize,
            guidance: inputs.float("guidance")?,
            seed: inputs.int("seed")? as u64,
            control,
        };
        let mut images = Vec::new();
        let eval = evaluate(den, tok, enc, vae, &prompts, &settings, |i, img| {
            ctx.check_cancelled()?;
            ctx.progress(i as u64 + 1, prompts.len() as u64);
            if images.len() < 90 {
                images.push(img.clone());
            }
            Ok(())
        })?;
        let report = json!({
            "prompts": prompts.len(),
            "shape": shape,
            "positions_in_prompt": placed,
            "controlnet": settings.control.as_ref().map(|(_, scale)| json!({"scale": scale})),
            "scores": eval.to_json(),
            "settings": {"size": size, "steps": settings.steps, "guidance": settings.guidance, "seed": settings.seed},
        });
        let outputs = write_report(ctx, &out, &report, &images)?;
        if settings.control.is_some() {
            // The edge maps beside the images they led, for people to compare.
            let maps = prompts
                .iter()
                .take(images.len())
                .enumerate()
                .map(|(i, p)| Ok(control_image(p, size, settings.seed.wrapping_add(i as u64))?.1))
                .collect::<Result<Vec<_>, NodeError>>()?;
            let png = sheet_png(&contact_sheet(&maps, 15))?;
            atomic_write(ctx, &out.join("controls.png"), &png)?;
        }
        Ok(outputs
            .with("colour", Value::Float(eval.all.colour_rate()))
            .with("shape", Value::Float(eval.all.shape_rate()))
            .with("position", Value::Float(eval.all.position_rate())))
    }
}

/// Scores VAE round trips of true renders of `prompts`: the ceiling any model
/// decoded by this VAE can reach.
pub fn evaluate_reconstruction(
    vae: &AutoencoderKl,
    prompts: &[EvalPrompt],
    size: usize,
    seed: u64,
    mut each: impl FnMut(usize, &RgbImage) -> Result<(), NodeError>,
) -> Result<Evaluation, NodeError> {
    let mut eval = Evaluation::default();
    for (i, p) in prompts.iter().enumerate() {
        let scene = Scene::of(&p.objects, p.background, seed.wrapping_add(i as u64));
        let img = scene.render(size as u32, size as u32);
        let x = candle_core::Tensor::from_vec(
            img.into_raw(),
            (1, size, size, 3),
            &candle_core::Device::Cpu,
        )?
        .permute((0, 3, 1, 2))?
        .to_dtype(candle_core::DType::F32)?
        .affine(2.0 / 255.0, -1.0)?;
        let back = vae.decode(&vae.encode(&x)?.mean)?;
        let pixels = ((back.clamp(-1f32, 1f32)? + 1.0)? * 127.5)?
            .round()?
            .permute((0, 2, 3, 1))?
            .flatten_all()?
            .to_dtype(candle_core::DType::U8)?
            .to_vec1::<u8>()?;
        let rgb = RgbImage::from_raw(size as u32, size as u32, pixels)
            .ok_or_else(|| NodeError::msg("decoded image has the wrong size"))?;
        let sc = score(&rgb, &p.objects, p.background);
        eval.record(p.held_out, &sc);
        each(i, &rgb)?;
    }
    Ok(eval)
}

pub struct EvalReconstruction {
    spec: NodeSpec,
}

impl EvalReconstruction {
    fn new() -> Self {
        EvalReconstruction {
            spec: NodeSpec::new("eval.reconstruction", 1)
                .category("training")
                .output_node()
                .describe(
                    "Scores a VAE on the shapes world: true renders of the evaluation prompts, encoded \
                     (posterior mean) and decoded, read back by the detector — the ceiling for any model \
                     this VAE decodes. Writes report.json and sheet.png to `out`.",
                )
                .input(InputSpec::new("vae", PortType::Vae))
                .input(shape_input())
                .input(InputSpec::new("samples", PortType::Int).default(1).min(1.0).max(1000.0))
                .input(InputSpec::new("size", PortType::Int).default(64).min(16.0).max(4096.0))
                .input(InputSpec::new("seed", PortType::Int).default(0).min(0.0))
                .input(InputSpec::new("out", PortType::Path).describe("Folder for report.json and sheet.png."))
                .output("report", PortType::String, "the scores as JSON"),
        }
    }
}

impl Node for EvalReconstruction {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn run(&self, ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        let vae = inputs.handle::<AutoencoderKl>("vae")?;
        let out = ctx.output_path(inputs.path("out")?)?;
        let size = inputs.int("size")? as usize;
        if !size.is_multiple_of(vae.config().scale_factor()) {
            return Err(NodeError::input(
                "size",
                format!("{size} is not a multiple of the VAE's factor"),
            ));
        }
        let prompts = eval_prompts(
            false,
            inputs.int("samples")? as usize,
            &shapes_of(&inputs)?,
            true,
        );
        let mut images = Vec::new();
        let eval =
            evaluate_reconstruction(vae, &prompts, size, inputs.int("seed")? as u64, |i, img| {
                ctx.check_cancelled()?;
                ctx.progress(i as u64 + 1, prompts.len() as u64);
                if images.len() < 90 {
                    images.push(img.clone());
                }
                Ok(())
            })?;
        write_report(
            ctx,
            &out,
            &json!({"prompts": prompts.len(), "scores": eval.to_json()}),
            &images,
        )
    }
}

fn sheet_png(sheet: &RgbImage) -> Result<Vec<u8>, NodeError> {
    encode_png(
        sheet.as_raw(),
        sheet.width() as usize,
        sheet.height() as usize,
        3,
        &[],
    )
    .map_err(NodeError::msg)
}

/// report.json and a contact sheet of (up to) the first 90 images.
fn write_report(
    ctx: &NodeContext,
    out: &std::path::Path,
    report: &serde_json::Value,
    images: &[RgbImage],
) -> Result<Outputs, NodeError> {
    std::fs::create_dir_all(out).map_err(|e| NodeError::io(out, e))?;
    let text = serde_json::to_string_pretty(report).map_err(NodeError::msg)?;
    atomic_write(ctx, &out.join("report.json"), text.as_bytes())?;
    let png = sheet_png(&contact_sheet(images, 15))?;
    atomic_write(ctx, &out.join("sheet.png"), &png)?;
    Ok(Outputs::one("report", Value::String(text)))
}

pub struct EvalCurve {
    spec: NodeSpec,
}

impl EvalCurve {
    fn new() -> Self {
        EvalCurve {
            spec: NodeSpec::new("eval.curve", 1)
                .category("training")
                .output_node()
                .describe(
                    "Scores every checkpoint of a training run (train.pixart's `out` folder) on the shapes \
                     world's single-object prompts and writes the learning curve as CSV: step (plus \
                     `offset`, the steps trained before this run), then colour, shape, position, size and \
                     all-correct rates over all prompts and over the held-out ones. Checkpoints already in \
                     the CSV are not scored again.",
                )
                .input(InputSpec::new("run", PortType::Path).describe("A train.pixart run folder."))
                .input(InputSpec::new("tokenizer", PortType::Tokenizer))
                .input(InputSpec::new("encoder", PortType::TextEncoder))
                .input(InputSpec::new("vae", PortType::Vae))
                .input(InputSpec::new("offset", PortType::Int).default(0).min(0.0))
                .input(InputSpec::new("size", PortType::Int).default(64).min(16.0).max(4096.0))
                .input(InputSpec::new("steps", PortType::Int).default(20).min(1.0).max(1000.0))
                .input(InputSpec::new("guidance", PortType::Float).default(4.5).min(0.0).max(100.0))
                .input(InputSpec::new("seed", PortType::Int).default(0).min(0.0))
                .input(InputSpec::new("out", PortType::Path).describe("The CSV file to write."))
                .output("csv", PortType::Path, "the learning curve"),
        }
    }
}

const CURVE_HEADER: &str =
    "step,colour,shape,position,size,all,held_out_colour,held_out_shape,held_out_position";

fn curve_row(step: u64, e: &Evaluation) -> String {
    let (a, h) = (&e.all, &e.held_out);
    format!(
        "{step},{:.4},{:.4},{:.4},{:.4},{:.4},{:.4},{:.4},{:.4}",
        a.colour_rate(),
        a.shape_rate(),
        a.position_rate(),
        a.size_rate(),
        a.all_rate(),
        h.colour_rate(),
        h.shape_rate(),
        h.position_rate()
    )
}

impl Node for EvalCurve {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn run(&self, ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        let run = ctx.input_path(inputs.path("run")?)?;
        let tok = inputs.handle::<T5Tokenizer>("tokenizer")?;
        let encoder = crate::pixart::text_encoder::from_input(&inputs, "encoder")?;
        let enc = &*encoder;
        let vae = inputs.handle::<AutoencoderKl>("vae")?;
        let offset = inputs.int("offset")? as u64;
        let out = ctx.output_path(inputs.path("out")?)?;
        let settings = EvalSettings {
            size: inputs.int("size")? as usize,
            steps: inputs.int("steps")? as usize,
            guidance: inputs.float("guidance")?,
            seed: inputs.int("seed")? as u64,
            control: None,
        };
        let checkpoints = crate::training::checkpoint::list(&run);
        if checkpoints.is_empty() {
            return Err(NodeError::input(
                "run",
                format!("{}: no checkpoints", run.display()),
            ));
        }
        // Rows already scored (same header) are kept.
        let mut rows: Vec<String> = std::fs::read_to_string(&out)
            .ok()
            .filter(|t| t.lines().next() == Some(CURVE_HEADER))
            .map(|t| t.lines().skip(1).map(str::to_string).collect())
            .unwrap_or_default();
        let done: std::collections::HashSet<u64> = rows
            .iter()
            .filter_map(|r| r.split(',').next()?.parse().ok())
            .collect();
        let prompts = eval_prompts(false, 1, Shape::WORLD, true);
        let device = candle_core::Device::Cpu;
        for (i, (step, dir)) in checkpoints.iter().enumerate() {
            ctx.check_cancelled()?;
            ctx.progress(i as u64, checkpoints.len() as u64);
            if done.contains(&(step + offset)) {
                continue;
            }
            let transformer = dir.join(crate::training::checkpoint::TRANSFORMER);
            if !transformer.exists() && dir.join(crate::training::checkpoint::LORA).exists() {
                return Err(NodeError::input(
                    "run",
                    "a LoRA run's checkpoints hold only the adapter: evaluate the stage's \
                     transformer (init with it merged) instead",
                ));
            }
            if !transformer.exists() && dir.join(crate::training::checkpoint::CONTROLNET).exists() {
                return Err(NodeError::input(
                    "run",
                    "a ControlNet run's checkpoints hold only the ControlNet: score one with \
                     eval.shapes `controlnet` (controlnet.load of checkpoint-N/controlnet)",
                ));
            }
            let bytes = pixart_models::weights::loaded_bytes(&transformer, |_, _| {
                pixart_models::weights::Keep::as_is(candle_core::DType::F32)
            })
            .map_err(NodeError::msg)?;
            let _model = ctx.reserve_memory(bytes, "this checkpoint's transformer")?;
            let den =
                crate::pixart::load::transformer(&transformer, candle_core::DType::F32, &device)
                    .map_err(NodeError::msg)?;
            let eval = evaluate(&den, tok, enc, vae, &prompts, &settings, |_, _| {
                ctx.check_cancelled()
            })?;
            rows.push(curve_row(step + offset, &eval));
            rows.sort_by_key(|r| {
                r.split(',')
                    .next()
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(0)
            });
            let text = format!("{CURVE_HEADER}\n{}\n", rows.join("\n"));
            if let Some(parent) = out.parent() {
                std::fs::create_dir_all(parent).map_err(|e| NodeError::io(parent, e))?;
            }
            atomic_write(ctx, &out, text.as_bytes())?;
        }
        ctx.progress(checkpoints.len() as u64, checkpoints.len() as u64);
        Ok(Outputs::one("csv", Value::Path(out)))
    }
}

pub fn nodes() -> Vec<Arc<dyn Node>> {
    vec![
        Arc::new(DatasetShapes::new()),
        Arc::new(EvalShapes::new()),
        Arc::new(EvalCurve::new()),
        Arc::new(EvalReconstruction::new()),
    ]
}

//! Images: PNG/JPEG in, PNG out (with the workflow embedded), and conversion
//! between images and plain tensors.
//!
//! An `Image` is an f32 tensor `[batch, height, width, channels]` in 0..=1 with
//! 1 (grey), 3 (RGB) or 4 (RGBA) channels.

use crate::fsutil::{atomic_write, input_file_fingerprint};
use pixart_runtime::candle_core::{DType, Device, Tensor};
use pixart_runtime::{
    InputSpec, Inputs, Node, NodeContext, NodeError, NodeSpec, Outputs, PortType, Value,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// PNG text keys under which a saved image carries what made it.
pub const PNG_WORKFLOW_KEY: &str = "pixart-workflow";
pub const PNG_PARAMS_KEY: &str = "pixart-params";

/// Checks an image tensor's shape: `(batch, height, width, channels)`.
pub fn image_dims(t: &Tensor) -> Result<(usize, usize, usize, usize), NodeError> {
    match t.dims() {
        &[b, h, w, c] if matches!(c, 1 | 3 | 4) && b > 0 && h > 0 && w > 0 => Ok((b, h, w, c)),
        dims => Err(NodeError::msg(format!(
            "an image is [batch, height, width, 1|3|4 channels], got shape {dims:?}"
        ))),
    }
}

pub struct LoadImage {
    spec: NodeSpec,
}

impl LoadImage {
    fn new() -> LoadImage {
        LoadImage {
            spec: NodeSpec::new("image.load", 1)
                .category("image")
                .describe("Reads a PNG or JPEG file (relative paths from the base directory) as a 1-image batch.")
                .input(InputSpec::new("path", PortType::Path))
                .input(InputSpec::new("mode", PortType::enum_of(&["rgb", "rgba", "luma"])).default("rgb"))
                .output("image", PortType::Image, "[1, height, width, channels], 0..1")
                .output("width", PortType::Int, "Width in pixels.")
                .output("height", PortType::Int, "Height in pixels."),
        }
    }
}

impl Node for LoadImage {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn fingerprint(&self, ctx: &NodeContext, inputs: &Inputs) -> Option<String> {
        input_file_fingerprint(ctx, inputs, "path")
    }

    fn run(&self, ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        let path = ctx.input_path(inputs.path("path")?)?;
        let decoded = image::ImageReader::open(&path)
            .map_err(|e| NodeError::io(&path, e))?
            .with_guessed_format()
            .map_err(|e| NodeError::io(&path, e))?
            .decode()
            .map_err(|e| {
                NodeError::msg(format!("{}: cannot decode the image: {e}", path.display()))
            })?;
        let (w, h) = (decoded.width() as usize, decoded.height() as usize);
        let (bytes, channels) = match inputs.str("mode")? {
            "rgba" => (decoded.to_rgba8().into_raw(), 4),
            "luma" => (decoded.to_luma8().into_raw(), 1),
            _ => (decoded.to_rgb8().into_raw(), 3),
        };
        let data: Vec<f32> = bytes.iter().map(|&b| b as f32 / 255.0).collect();
        let image = Tensor::from_vec(data, (1, h, w, channels), &Device::Cpu)?;
        Ok(Outputs::one("image", Value::Image(image))
            .with("width", Value::Int(w as i64))
            .with("height", Value::Int(h as i64)))
    }
}

pub struct SaveImage {
    spec: NodeSpec,
}

impl SaveImage {
    fn new() -> SaveImage {
        SaveImage {
            spec: NodeSpec::new("image.save", 1)
                .category("image")
                .describe(
                    "Writes each image of a batch as an 8-bit PNG (relative paths under the output \
                     directory; a batch of n > 1 adds -0000 … to the name), atomically. The PNG \
                     carries the workflow YAML and the run's parameters in text chunks.",
                )
                .input(InputSpec::new("image", PortType::Image))
                .input(InputSpec::new("path", PortType::Path).describe("Relative to the output folder (`--out`), e.g. image.png."))
                .output("paths", PortType::list_of(PortType::Path), "The files written.")
                .output_node(),
        }
    }
}

/// Rounds 0..1 floats to bytes as diffusers does (`(x * 255).round()` after clamping).
pub fn to_bytes(image: &Tensor) -> Result<Vec<u8>, NodeError> {
    let data = image
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(data
        .into_iter()
        .map(|x| (x.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect())
}

pub fn encode_png(
    pixels: &[u8],
    width: usize,
    height: usize,
    channels: usize,
    texts: &[(&str, &str)],
) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width as u32, height as u32);
    encoder.set_color(match channels {
        1 => png::ColorType::Grayscale,
        4 => png::ColorType::Rgba,
        _ => png::ColorType::Rgb,
    });
    encoder.set_depth(png::BitDepth::Eight);
    for (key, text) in texts {
        encoder
            .add_itxt_chunk(key.to_string(), text.to_string())
            .map_err(|e| e.to_string())?;
    }
    let mut writer = encoder.write_header().map_err(|e| e.to_string())?;
    writer.write_image_data(pixels).map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())?;
    Ok(out)
}

/// `out/a.png` for a single image; `out/a-0000.png`, `out/a-0001.png` … for a batch.
fn batch_path(path: &Path, index: usize, batch: usize) -> PathBuf {
    if batch == 1 {
        return path.to_path_buf();
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().into_owned())
        .unwrap_or_else(|| "png".into());
    path.with_file_name(format!("{stem}-{index:04}.{ext}"))
}

impl Node for SaveImage {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn run(&self, ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        let image = inputs.image("image")?;
        let (batch, h, w, c) = image_dims(image)?;
        // As the workflow names it: each file is resolved under the output
        // folder (and numbered in a served run) as it is written.
        let path = inputs.path("path")?.to_path_buf();
        ctx.output_path(&path)?;
        let bytes = to_bytes(image)?;
        let params = ctx.params().to_string();
        let texts = [
            (PNG_WORKFLOW_KEY, ctx.workflow_source()),
            (PNG_PARAMS_KEY, params.as_str()),
        ];
        let mut written = Vec::with_capacity(batch);
        for (i, pixels) in bytes.chunks_exact(h * w * c).enumerate() {
            ctx.check_cancelled()?;
            let png = encode_png(pixels, w, h, c, &texts).map_err(NodeError::msg)?;
            let target = ctx.output_file(&batch_path(&path, i, batch))?;
            atomic_write(ctx, &target, &png)?;
            written.push(Value::Path(target));
            ctx.progress(i as u64 + 1, batch as u64);
        }
        Ok(Outputs::one("paths", Value::List(written)))
    }
}

const LAYOUTS: &[&str] = &["nchw", "nhwc"];
const RANGES: &[&str] = &["minus_one_one", "zero_one"];

pub struct TensorToImage {
    spec: NodeSpec,
}

impl TensorToImage {
    fn new() -> TensorToImage {
        TensorToImage {
            spec: NodeSpec::new("image.from_tensor", 1)
                .category("image")
                .describe(
                    "Views a tensor as an image batch: `layout` says where the channels are, `range` \
                     what values mean black and white (diffusion models work in -1..1); values \
                     outside are clamped.",
                )
                .input(InputSpec::new("tensor", PortType::Tensor).describe("[B, C, H, W] or [B, H, W, C]; rank 3 adds B = 1."))
                .input(InputSpec::new("layout", PortType::enum_of(LAYOUTS)).default("nchw"))
                .input(InputSpec::new("range", PortType::enum_of(RANGES)).default("minus_one_one"))
                .output("image", PortType::Image, "[B, H, W, C] in 0..1"),
        }
    }
}

impl Node for TensorToImage {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn run(&self, _ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        let mut t = inputs.tensor("tensor")?.to_dtype(DType::F32)?;
        if t.rank() == 3 {
            t = t.unsqueeze(0)?;
        }
        if t.rank() != 4 {
            return Err(NodeError::input(
                "tensor",
                format!("expected rank 3 or 4, got shape {:?}", t.dims()),
            ));
        }
        if inputs.str("layout")? == "nchw" {
            t = t.permute((0, 2, 3, 1))?;
        }
        if inputs.str("range")? == "minus_one_one" {
            t = ((t + 1.0)? * 0.5)?;
        }
        let image = t.clamp(0f32, 1f32)?.contiguous()?;
        image_dims(&image).map_err(|e| NodeError::input("tensor", e))?;
        Ok(Outputs::one("image", Value::Image(image)))
    }
}

pub struct ImageToTensor {
    spec: NodeSpec,
}

impl ImageToTensor {
    fn new() -> ImageToTensor {
        ImageToTensor {
            spec: NodeSpec::new("image.to_tensor", 1)
                .category("image")
                .describe(
                    "An image batch as a plain f32 tensor in the chosen layout and value range.",
                )
                .input(InputSpec::new("image", PortType::Image))
                .input(InputSpec::new("layout", PortType::enum_of(LAYOUTS)).default("nchw"))
                .input(InputSpec::new("range", PortType::enum_of(RANGES)).default("minus_one_one"))
                .output("tensor", PortType::Tensor, "The pixels."),
        }
    }
}

impl Node for ImageToTensor {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn run(&self, _ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        let image = inputs.image("image")?;
        image_dims(image)?;
        let mut t = image.to_dtype(DType::F32)?;
        if inputs.str("range")? == "minus_one_one" {
            t = ((t * 2.0)? - 1.0)?;
        }
        if inputs.str("layout")? == "nchw" {
            t = t.permute((0, 3, 1, 2))?;
        }
        Ok(Outputs::one("tensor", Value::Tensor(t.contiguous()?)))
    }
}

pub fn nodes() -> Vec<Arc<dyn Node>> {
    vec![
        Arc::new(LoadImage::new()),
        Arc::new(SaveImage::new()),
        Arc::new(TensorToImage::new()),
        Arc::new(ImageToTensor::new()),
    ]
}

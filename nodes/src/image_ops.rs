//! Image operations for img2img and inpainting: `image.resize` (stretch, or scale
//! and centre-crop to fill, as ComfyUI's "crop: center") and `mask.from_image`
//! (luminance → threshold → invert → blur, a mask `pixart.sample` takes).

use crate::pixart::binning::{resize_and_crop, resize_bilinear};
use pixart_runtime::candle_core::{DType, Tensor, D};
use pixart_runtime::{
    known_count, InputSpec, Inputs, Node, NodeContext, NodeError, NodeSpec, Outputs, PortType,
    Value,
};
use std::sync::Arc;

/// The largest side either node makes: 8192 px (a 2048 px model with room).
const MAX_SIDE: f64 = 8192.0;

pub struct Resize {
    spec: NodeSpec,
}

impl Resize {
    fn new() -> Resize {
        Resize {
            spec: NodeSpec::new("image.resize", 1)
                .category("image")
                .describe(
                    "Resizes an image batch (bilinear): `fill` scales it to cover width × height and \
                     crops the centre (the aspect ratio stays); `stretch` scales each side to its size.",
                )
                .input(InputSpec::new("image", PortType::Image))
                .input(InputSpec::new("width", PortType::Int).default(512).min(1.0).max(MAX_SIDE))
                .input(InputSpec::new("height", PortType::Int).default(512).min(1.0).max(MAX_SIDE))
                .input(InputSpec::new("fit", PortType::enum_of(&["fill", "stretch"])).default("fill"))
                .output("image", PortType::Image, "[B, height, width, C]")
                .estimate(resize_bytes),
        }
    }
}

/// One resized image of up to 4 channels in f32 (the batch is not known at
/// load; the run's budget counts the rest when the node has run).
fn resize_bytes(known: &[Option<&Value>]) -> Option<u64> {
    Some(known_count(known, 1)? * known_count(known, 2)? * 4 * 4)
}

impl Node for Resize {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn run(&self, _ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        let image = inputs.image("image")?;
        let (width, height) = (
            inputs.int("width")? as usize,
            inputs.int("height")? as usize,
        );
        let nchw = image.permute((0, 3, 1, 2))?.contiguous()?;
        let resized = match inputs.str("fit")? {
            "stretch" => resize_bilinear(&nchw, height, width)?,
            _ => resize_and_crop(&nchw, height, width)?,
        };
        let out = resized
            .clamp(0f32, 1f32)?
            .permute((0, 2, 3, 1))?
            .contiguous()?;
        Ok(Outputs::one("image", Value::Image(out)))
    }
}

pub struct MaskFromImage {
    spec: NodeSpec,
}

impl MaskFromImage {
    fn new() -> MaskFromImage {
        MaskFromImage {
            spec: NodeSpec::new("mask.from_image", 1)
                .category("image")
                .describe(
                    "Makes an inpainting mask from an image: its luminance (Rec. 601) against \
                     `threshold` (white: 1 = repaint, black: 0 = keep), optionally inverted, then \
                     softened by a box blur of `blur` pixels.",
                )
                .input(InputSpec::new("image", PortType::Image))
                .input(
                    InputSpec::new("threshold", PortType::Float)
                        .default(0.5)
                        .min(0.0)
                        .max(1.0),
                )
                .input(InputSpec::new("invert", PortType::Bool).default(false))
                .input(
                    InputSpec::new("blur", PortType::Int)
                        .default(0)
                        .min(0.0)
                        .max(256.0),
                )
                .output("mask", PortType::Image, "[B, H, W, 1] in 0..1"),
        }
    }
}

impl Node for MaskFromImage {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn run(&self, _ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        let image = inputs.image("image")?.to_dtype(DType::F32)?;
        let channels = image.dim(D::Minus1)?;
        let luma = match channels {
            1 | 2 => image.narrow(3, 0, 1)?,
            c if c >= 3 => {
                let weights = Tensor::new(&[0.299f32, 0.587, 0.114], image.device())?;
                image
                    .narrow(3, 0, 3)?
                    .broadcast_mul(&weights)?
                    .sum_keepdim(3)?
            }
            c => return Err(NodeError::input("image", format!("{c} channels"))),
        };
        let threshold = inputs.float("threshold")?;
        let mut mask = luma.ge(threshold)?.to_dtype(DType::F32)?;
        if inputs.bool("invert")? {
            mask = mask.affine(-1.0, 1.0)?;
        }
        let radius = inputs.int("blur")?.max(0) as usize;
        if radius > 0 {
            mask = box_blur(&mask, radius)?;
        }
        Ok(Outputs::one("mask", Value::Image(mask)))
    }
}

/// A separable box blur of `[B, H, W, 1]` over `2r + 1` pixels, edges clamped.
fn box_blur(mask: &Tensor, r: usize) -> Result<Tensor, NodeError> {
    let (b, h, w, _) = mask.dims4()?;
    let mut data = mask.flatten_all()?.to_vec1::<f32>()?;
    let pass = |data: &mut [f32], len: usize, lines: &[(usize, usize)]| {
        let mut line = vec![0f32; len];
        for &(start, step) in lines {
            for (i, v) in line.iter_mut().enumerate() {
                *v = data[start + i * step];
            }
            let at = |i: isize| line[i.clamp(0, len as isize - 1) as usize];
            for i in 0..len {
                let sum: f32 = (-(r as isize)..=r as isize)
                    .map(|d| at(i as isize + d))
                    .sum();
                data[start + i * step] = sum / (2 * r + 1) as f32;
            }
        }
    };
    for img in 0..b {
        let base = img * h * w;
        let rows: Vec<(usize, usize)> = (0..h).map(|y| (base + y * w, 1)).collect();
        pass(&mut data, w, &rows);
        let cols: Vec<(usize, usize)> = (0..w).map(|x| (base + x, w)).collect();
        pass(&mut data, h, &cols);
    }
    Ok(Tensor::from_vec(data, (b, h, w, 1), mask.device())?)
}

pub fn nodes() -> Vec<Arc<dyn Node>> {
    vec![Arc::new(Resize::new()), Arc::new(MaskFromImage::new())]
}

#[cfg(test)]
mod tests {
    use super::*;
    use pixart_runtime::candle_core::Device;

    fn run(node: Arc<dyn Node>, pairs: Vec<(&'static str, Value)>) -> Value {
        let inputs = Inputs::from_pairs(node.clone(), pairs).unwrap();
        let ctx = NodeContext::detached(".", ".");
        let mut out = node.run(&ctx, inputs).unwrap();
        out.0.remove(0).1
    }

    /// The first row of the mask `mask.from_image` makes of `image` with `extra` inputs.
    fn mask_row(image: &Tensor, extra: Vec<(&'static str, Value)>) -> Vec<f32> {
        let node: Arc<dyn Node> = Arc::new(MaskFromImage::new());
        let mut pairs = vec![("image", Value::Image(image.clone()))];
        pairs.extend(extra);
        let Value::Image(m) = run(node, pairs) else {
            panic!("not an image")
        };
        m.narrow(1, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn a_mask_is_thresholded_inverted_and_blurred() {
        // A 1×4×4 gray ramp by column: 0, 1/3, 2/3, 1.
        let ramp: Vec<f32> = (0..16).map(|i| (i % 4) as f32 / 3.0).collect();
        let image = Tensor::from_vec(ramp, (1, 4, 4, 1), &Device::Cpu).unwrap();
        assert_eq!(mask_row(&image, vec![]), [0.0, 0.0, 1.0, 1.0]);
        let inverted = mask_row(&image, vec![("invert", Value::Bool(true))]);
        assert_eq!(inverted, [1.0, 1.0, 0.0, 0.0]);
        let row = mask_row(&image, vec![("blur", Value::Int(1))]);
        let third = 1.0 / 3.0;
        for (got, want) in row.iter().zip([0.0, third, 2.0 * third, 1.0]) {
            assert!((got - want).abs() < 1e-6, "{row:?}");
        }
    }

    #[test]
    fn resize_fills_or_stretches() {
        let image = Tensor::ones((1, 4, 8, 3), DType::F32, &Device::Cpu).unwrap();
        let node: Arc<dyn Node> = Arc::new(Resize::new());
        for (fit, (w, h)) in [("fill", (6, 6)), ("stretch", (5, 3))] {
            let Value::Image(out) = run(
                node.clone(),
                vec![
                    ("image", Value::Image(image.clone())),
                    ("width", Value::Int(w)),
                    ("height", Value::Int(h)),
                    ("fit", Value::String(fit.into())),
                ],
            ) else {
                panic!()
            };
            assert_eq!(out.dims(), [1, h as usize, w as usize, 3], "{fit}");
            let max = out.max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!((max - 1.0).abs() < 1e-6);
        }
    }
}

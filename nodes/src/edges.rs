//! `image.canny`: Canny edge maps, the control images of edge ControlNets.
//!
//! It is OpenCV's `cv2.Canny` as ControlNet's canny annotators call it on an RGB
//! image (3×3 Sobel, L1 gradient magnitude; on several channels each pixel takes
//! its strongest channel's gradient; non-maximum suppression; hysteresis between
//! the two thresholds over 8-neighbours), so a control image made here equals
//! the one the reference tools make. Canny rather than HED: HED is a network
//! whose weights would have to be downloaded, and Canny needs none. The official
//! PixArt ControlNet was trained on HED maps, and these are thinner and binary.

use pixart_runtime::candle_core::Tensor;
use pixart_runtime::{
    InputSpec, Inputs, Node, NodeContext, NodeError, NodeSpec, Outputs, PortType, Value,
};
use std::sync::Arc;

/// OpenCV's tan(22.5°) in 15-bit fixed point.
const TG22: i64 = 13573;

/// Edges (255) of an 8-bit image `[h, w, channels]`, row-major; `low` and
/// `high` bound the L1 gradient magnitude as in `cv2.Canny`.
pub fn canny(pixels: &[u8], h: usize, w: usize, channels: usize, low: f64, high: f64) -> Vec<u8> {
    let (low, high) = if low > high { (high, low) } else { (low, high) };
    let (low, high) = (low.floor() as i64, high.floor() as i64);
    let at = |y: isize, x: isize, c: usize| -> i64 {
        // Sobel reads replicated borders.
        let y = y.clamp(0, h as isize - 1) as usize;
        let x = x.clamp(0, w as isize - 1) as usize;
        i64::from(pixels[(y * w + x) * channels + c])
    };
    // Gradients of each pixel's strongest channel (the first on ties).
    let mut dx = vec![0i64; h * w];
    let mut dy = vec![0i64; h * w];
    let mut mag = vec![0i64; (h + 2) * (w + 2)]; // zero border
    for y in 0..h as isize {
        for x in 0..w as isize {
            let mut best = (-1i64, 0i64, 0i64);
            for c in 0..channels {
                let gx = at(y - 1, x + 1, c) + 2 * at(y, x + 1, c) + at(y + 1, x + 1, c)
                    - at(y - 1, x - 1, c)
                    - 2 * at(y, x - 1, c)
                    - at(y + 1, x - 1, c);
                let gy = at(y + 1, x - 1, c) + 2 * at(y + 1, x, c) + at(y + 1, x + 1, c)
                    - at(y - 1, x - 1, c)
                    - 2 * at(y - 1, x, c)
                    - at(y - 1, x + 1, c);
                let m = gx.abs() + gy.abs();
                if m > best.0 {
                    best = (m, gx, gy);
                }
            }
            let i = y as usize * w + x as usize;
            (dx[i], dy[i]) = (best.1, best.2);
            mag[(y as usize + 1) * (w + 2) + x as usize + 1] = best.0;
        }
    }
    // Non-maximum suppression along the gradient's direction (one of four).
    const NOT: u8 = 1;
    const MAYBE: u8 = 0;
    const EDGE: u8 = 2;
    let mut map = vec![NOT; h * w];
    let mut stack = Vec::new();
    let m_at = |y: usize, x: usize| mag[(y + 1) * (w + 2) + x + 1];
    let m_off = |y: usize, x: usize, oy: isize, ox: isize| {
        mag[((y as isize + 1 + oy) as usize) * (w + 2) + (x as isize + 1 + ox) as usize]
    };
    for y in 0..h {
        for x in 0..w {
            let m = m_at(y, x);
            if m <= low {
                continue;
            }
            let i = y * w + x;
            let (xs, ys) = (dx[i].abs(), dy[i].abs() << 15);
            let tg22x = xs * TG22;
            let peak = if ys < tg22x {
                m > m_off(y, x, 0, -1) && m >= m_off(y, x, 0, 1)
            } else if ys > tg22x + (xs << 16) {
                m > m_off(y, x, -1, 0) && m >= m_off(y, x, 1, 0)
            } else {
                let s: isize = if (dx[i] ^ dy[i]) < 0 { -1 } else { 1 };
                m > m_off(y, x, -1, -s) && m > m_off(y, x, 1, s)
            };
            if !peak {
                continue;
            }
            if m > high {
                map[i] = EDGE;
                stack.push(i);
            } else {
                map[i] = MAYBE;
            }
        }
    }
    // Hysteresis: weak pixels joined to an edge become edges.
    while let Some(i) = stack.pop() {
        let (y, x) = ((i / w) as isize, (i % w) as isize);
        for oy in -1..=1 {
            for ox in -1..=1 {
                let (ny, nx) = (y + oy, x + ox);
                if ny < 0 || nx < 0 || ny >= h as isize || nx >= w as isize {
                    continue;
                }
                let j = ny as usize * w + nx as usize;
                if map[j] == MAYBE {
                    map[j] = EDGE;
                    stack.push(j);
                }
            }
        }
    }
    map.into_iter()
        .map(|v| if v == EDGE { 255 } else { 0 })
        .collect()
}

pub struct Canny {
    spec: NodeSpec,
}

impl Canny {
    fn new() -> Self {
        Canny {
            spec: NodeSpec::new("image.canny", 1)
                .category("image")
                .describe(
                    "Canny edges of an image, white on black: OpenCV's cv2.Canny as ControlNet's canny \
                     preprocessors run it (3×3 Sobel, L1 gradient, the strongest colour channel, \
                     hysteresis between `low` and `high` on the 8-bit image), the control image of an \
                     edge ControlNet.",
                )
                .input(InputSpec::new("image", PortType::Image))
                .input(
                    InputSpec::new("low", PortType::Float)
                        .default(100.0)
                        .min(0.0)
                        .max(4080.0)
                        .describe("Weak edges: gradients above this join an edge."),
                )
                .input(
                    InputSpec::new("high", PortType::Float)
                        .default(200.0)
                        .min(0.0)
                        .max(4080.0)
                        .describe("Strong edges: gradients above this start one."),
                )
                .output("image", PortType::Image, "the edge map (3 channels, 0 or 1)"),
        }
    }
}

impl Node for Canny {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn run(&self, _ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        let image = inputs.image("image")?;
        let (b, h, w, c) = image.dims4()?;
        if h * w * c == 0 {
            return Err(NodeError::input("image", "the image is empty"));
        }
        let (low, high) = (inputs.float("low")?, inputs.float("high")?);
        let values = image
            .to_dtype(pixart_runtime::candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut out = Vec::with_capacity(b * h * w * 3);
        for one in values.chunks(h * w * c) {
            let bytes: Vec<u8> = one
                .iter()
                .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
                .collect();
            for e in canny(&bytes, h, w, c, low, high) {
                let v = f32::from(e) / 255.0;
                out.extend([v, v, v]);
            }
        }
        let edges = Tensor::from_vec(out, (b, h, w, 3), image.device())?;
        Ok(Outputs::one("image", Value::Image(edges)))
    }
}

/// The Canny edge map of an RGB image, as an RGB image (white edges on black):
/// the control images the shapes world's ControlNet data is made of.
pub fn canny_rgb(img: &image::RgbImage, low: f64, high: f64) -> image::RgbImage {
    let (w, h) = img.dimensions();
    let edges = canny(img.as_raw(), h as usize, w as usize, 3, low, high);
    image::RgbImage::from_fn(w, h, |x, y| {
        let v = edges[(y * w + x) as usize];
        image::Rgb([v, v, v])
    })
}

pub fn nodes() -> Vec<Arc<dyn Node>> {
    vec![Arc::new(Canny::new())]
}

//! CLIP's image processor as transformers' `CLIPImageProcessor` (PIL backend)
//! runs it: resize the shortest edge with PIL's bicubic filter, centre-crop,
//! rescale to 0..1, normalise with the saved mean and std. The resize is
//! PIL's own algorithm, fixed-point arithmetic and 8-bit rounding between the
//! two passes included, so pixel values equal transformers' exactly.

use crate::weights::{parse_json, LoadError};
use serde::Deserialize;
use std::path::Path;

#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct ImageProcessorConfig {
    pub do_resize: bool,
    pub size: Size,
    /// PIL's filter number: 2 bilinear, 3 bicubic.
    pub resample: u32,
    pub do_center_crop: bool,
    pub crop_size: Size,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: Vec<f32>,
    pub image_std: Vec<f32>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Size {
    pub shortest_edge: Option<usize>,
    pub height: Option<usize>,
    pub width: Option<usize>,
}

impl Default for ImageProcessorConfig {
    fn default() -> Self {
        ImageProcessorConfig {
            do_resize: true,
            size: Size {
                shortest_edge: Some(224),
                ..Size::default()
            },
            resample: 3,
            do_center_crop: true,
            crop_size: Size {
                height: Some(224),
                width: Some(224),
                ..Size::default()
            },
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: vec![0.481_454_66, 0.457_827_5, 0.408_210_73],
            image_std: vec![0.268_629_54, 0.261_302_6, 0.275_777_1],
        }
    }
}

impl ImageProcessorConfig {
    /// `preprocessor_config.json` (the hub's llava-1.5 folders), else the
    /// `image_processor` part of `processor_config.json` (transformers 5).
    pub fn load(dir: &Path) -> Result<ImageProcessorConfig, LoadError> {
        let pre = dir.join("preprocessor_config.json");
        if pre.is_file() {
            let text = std::fs::read_to_string(&pre).map_err(|e| LoadError::file(&pre, e))?;
            return parse_json(&pre, &text);
        }
        let proc = dir.join("processor_config.json");
        let text = std::fs::read_to_string(&proc).map_err(|_| {
            LoadError::file(dir, "no preprocessor_config.json or processor_config.json")
        })?;
        let json: serde_json::Value = parse_json(&proc, &text)?;
        let part = json
            .get("image_processor")
            .cloned()
            .ok_or_else(|| LoadError::file(&proc, "no `image_processor` section"))?;
        serde_json::from_value(part)
            .map_err(|e| LoadError::file(&proc, format!("invalid image_processor: {e}")))
    }

    /// Pixel values `[3, H, W]` (row-major, f32) of an 8-bit RGB image.
    pub fn preprocess(
        &self,
        rgb: &[u8],
        width: usize,
        height: usize,
    ) -> Result<(Vec<f32>, usize, usize), String> {
        if rgb.len() != width * height * 3 || width == 0 || height == 0 {
            return Err(format!(
                "an RGB image of {width}×{height} needs {} bytes",
                width * height * 3
            ));
        }
        let (mut img, mut w, mut h) = (rgb.to_vec(), width, height);
        if self.do_resize {
            let (nw, nh) = self.resize_target(w, h)?;
            if nw == 0 || nh == 0 {
                return Err(format!(
                    "resizing {w}×{h} by {:?} leaves nothing",
                    self.size
                ));
            }
            let filter = match self.resample {
                2 => Filter::Bilinear,
                3 => Filter::Bicubic,
                other => {
                    return Err(format!(
                        "resample filter {other} (only 2 bilinear and 3 bicubic)"
                    ))
                }
            };
            img = resize(&img, w, h, nw, nh, filter);
            (w, h) = (nw, nh);
        }
        if self.do_center_crop {
            let (cw, ch) = match (self.crop_size.width, self.crop_size.height) {
                (Some(cw), Some(ch)) => (cw, ch),
                _ => return Err("crop_size needs height and width".into()),
            };
            img = center_crop(&img, w, h, cw, ch);
            (w, h) = (cw, ch);
        }
        let mut out = vec![0f32; 3 * w * h];
        for c in 0..3 {
            for i in 0..w * h {
                let mut v = img[i * 3 + c] as f32;
                if self.do_rescale {
                    v = (img[i * 3 + c] as f64 * self.rescale_factor) as f32;
                }
                if self.do_normalize {
                    let mean = *self.image_mean.get(c).unwrap_or(&0.0);
                    let std = *self.image_std.get(c).unwrap_or(&1.0);
                    v = (v - mean) / std;
                }
                out[c * w * h + i] = v;
            }
        }
        Ok((out, w, h))
    }

    /// transformers' `get_resize_output_image_size(default_to_square=False)`.
    fn resize_target(&self, w: usize, h: usize) -> Result<(usize, usize), String> {
        match (&self.size.shortest_edge, self.size.width, self.size.height) {
            (Some(short), _, _) => {
                let (s, l) = if w <= h { (w, h) } else { (h, w) };
                let long = (*short as f64 * l as f64 / s as f64) as usize;
                Ok(if w <= h {
                    (*short, long)
                } else {
                    (long, *short)
                })
            }
            (None, Some(sw), Some(sh)) => Ok((sw, sh)),
            _ => Err("size needs shortest_edge, or height and width".into()),
        }
    }
}

/// transformers' `center_crop`: `(size − crop) // 2` from the top left, padding
/// with zeros (centred, rounding the top/left pad up) when the image is smaller.
fn center_crop(img: &[u8], w: usize, h: usize, cw: usize, ch: usize) -> Vec<u8> {
    let (nw, nh) = (w.max(cw), h.max(ch));
    let (pad_left, pad_top) = ((nw - w).div_ceil(2), (nh - h).div_ceil(2));
    let top = (h as i64 - ch as i64).div_euclid(2) + pad_top as i64;
    let left = (w as i64 - cw as i64).div_euclid(2) + pad_left as i64;
    let mut out = vec![0u8; cw * ch * 3];
    for y in 0..ch {
        for x in 0..cw {
            let (py, px) = (
                top + y as i64 - pad_top as i64,
                left + x as i64 - pad_left as i64,
            );
            if py >= 0 && px >= 0 && (py as usize) < h && (px as usize) < w {
                let s = (py as usize * w + px as usize) * 3;
                out[(y * cw + x) * 3..][..3].copy_from_slice(&img[s..s + 3]);
            }
        }
    }
    out
}

#[derive(Clone, Copy)]
enum Filter {
    Bilinear,
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Bilinear => (1.0 - x).max(0.0),
            Filter::Bicubic => {
                // Keys' cubic with a = -0.5, as PIL.
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// Bits of fraction in PIL's fixed-point 8-bit resampling.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: the first input pixel, how many, and fixed-point weights.
struct Coefficients {
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
    ksize: usize,
}

fn coefficients(in_size: usize, out_size: usize, filter: Filter) -> Coefficients {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C casts truncate toward zero, then clamp.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(xmax) {
            *kx = filter.weight((x as f64 + xmin as f64 - center + 0.5) / filterscale);
            ww += *kx;
        }
        for (x, kx) in k.iter().enumerate().take(xmax) {
            let v = if ww != 0.0 { kx / ww } else { *kx };
            let fixed = v * (1u32 << PRECISION_BITS) as f64;
            weights[xx * ksize + x] = if v < 0.0 {
                (fixed - 0.5) as i32
            } else {
                (fixed + 0.5) as i32
            };
        }
        bounds.push((xmin, xmax));
    }
    Coefficients {
        bounds,
        weights,
        ksize,
    }
}

fn clip8(v: i64) -> u8 {
    if v >= (1i64 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// PIL's `Image.resize` for 8-bit RGB: horizontal pass then vertical, each
/// rounded to 8 bits.
fn resize(img: &[u8], w: usize, h: usize, nw: usize, nh: usize, filter: Filter) -> Vec<u8> {
    let (mut cur, mut cw) = (img.to_vec(), w);
    let vert = coefficients(h, nh, filter);
    // Rows the vertical pass reads: the horizontal pass makes only those.
    let first = vert.bounds[0].0;
    let last = vert.bounds[nh - 1].0 + vert.bounds[nh - 1].1;
    let (row0, rows) = if nw != w {
        (first, last - first)
    } else {
        (0, h)
    };
    if nw != w {
        let c = coefficients(w, nw, filter);
        let mut out = vec![0u8; nw * rows * 3];
        for y in 0..rows {
            let src = &cur[(y + row0) * w * 3..][..w * 3];
            for (xx, &(xmin, n)) in c.bounds.iter().enumerate() {
                let k = &c.weights[xx * c.ksize..][..n];
                for ch in 0..3 {
                    let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                    for (x, &kx) in k.iter().enumerate() {
                        acc += src[(xmin + x) * 3 + ch] as i64 * kx as i64;
                    }
                    out[(y * nw + xx) * 3 + ch] = clip8(acc);
                }
            }
        }
        cur = out;
        cw = nw;
    }
    if nh == h && nw != w {
        return cur;
    }
    if nh != h {
        let mut out = vec![0u8; nw * nh * 3];
        for (yy, &(ymin, n)) in vert.bounds.iter().enumerate() {
            let k = &vert.weights[yy * vert.ksize..][..n];
            let ymin = ymin - row0;
            for x in 0..cw {
                for ch in 0..3 {
                    let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                    for (y, &ky) in k.iter().enumerate() {
                        acc += cur[((ymin + y) * cw + x) * 3 + ch] as i64 * ky as i64;
                    }
                    out[(yy * nw + x) * 3 + ch] = clip8(acc);
                }
            }
        }
        return out;
    }
    cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_size_is_a_copy_and_constants_stay_constant() {
        let img: Vec<u8> = (0..4 * 3 * 3).map(|i| i as u8 * 7).collect();
        assert_eq!(resize(&img, 4, 3, 4, 3, Filter::Bicubic), img);
        let flat = vec![200u8; 10 * 7 * 3];
        for (nw, nh) in [(5, 3), (23, 17), (10, 4)] {
            assert!(resize(&flat, 10, 7, nw, nh, Filter::Bicubic)
                .iter()
                .all(|&v| v == 200));
        }
    }

    #[test]
    fn shortest_edge_follows_transformers() {
        let cfg = ImageProcessorConfig::default();
        assert_eq!(cfg.resize_target(640, 480).unwrap(), (298, 224));
        assert_eq!(cfg.resize_target(23, 57).unwrap(), (224, 555));
    }
}

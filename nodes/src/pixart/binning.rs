//! Resolution binning of diffusers' PixArtAlphaPipeline: a requested size snaps to
//! the nearest aspect-ratio bin of the model's resolution, the image is generated
//! there, then resized (bilinear) and centre-cropped back to the requested size.

use candle_core::{Device, Result, Tensor};

/// diffusers' `ASPECT_RATIO_1024_BIN`, in its order (ties go to the first):
/// (ratio as written, height, width). The 512 and 256 tables are this one halved
/// and quartered.
const BINS_1024: &[(&str, usize, usize)] = &[
    ("0.25", 512, 2048),
    ("0.28", 512, 1856),
    ("0.32", 576, 1792),
    ("0.33", 576, 1728),
    ("0.35", 576, 1664),
    ("0.4", 640, 1600),
    ("0.42", 640, 1536),
    ("0.48", 704, 1472),
    ("0.5", 704, 1408),
    ("0.52", 704, 1344),
    ("0.57", 768, 1344),
    ("0.6", 768, 1280),
    ("0.68", 832, 1216),
    ("0.72", 832, 1152),
    ("0.78", 896, 1152),
    ("0.82", 896, 1088),
    ("0.88", 960, 1088),
    ("0.94", 960, 1024),
    ("1.0", 1024, 1024),
    ("1.07", 1024, 960),
    ("1.13", 1088, 960),
    ("1.21", 1088, 896),
    ("1.29", 1152, 896),
    ("1.38", 1152, 832),
    ("1.46", 1216, 832),
    ("1.67", 1280, 768),
    ("1.75", 1344, 768),
    ("2.0", 1408, 704),
    ("2.09", 1472, 704),
    ("2.4", 1536, 640),
    ("2.5", 1600, 640),
    ("3.0", 1728, 576),
    ("4.0", 2048, 512),
];

/// The official training code's `ASPECT_RATIO_256` (40 bins): (ratio as written,
/// height, width). Its 512, 1024 and 2048 tables (PixArt-Σ's `ASPECT_RATIO_2048_BIN`)
/// are this one scaled; training buckets use them all.
pub const OFFICIAL_256: &[(&str, usize, usize)] = &[
    ("0.25", 128, 512),
    ("0.26", 128, 496),
    ("0.27", 128, 480),
    ("0.28", 128, 464),
    ("0.32", 144, 448),
    ("0.33", 144, 432),
    ("0.35", 144, 416),
    ("0.4", 160, 400),
    ("0.42", 160, 384),
    ("0.48", 176, 368),
    ("0.5", 176, 352),
    ("0.52", 176, 336),
    ("0.57", 192, 336),
    ("0.6", 192, 320),
    ("0.68", 208, 304),
    ("0.72", 208, 288),
    ("0.78", 224, 288),
    ("0.82", 224, 272),
    ("0.88", 240, 272),
    ("0.94", 240, 256),
    ("1.0", 256, 256),
    ("1.07", 256, 240),
    ("1.13", 272, 240),
    ("1.21", 272, 224),
    ("1.29", 288, 224),
    ("1.38", 288, 208),
    ("1.46", 304, 208),
    ("1.67", 320, 192),
    ("1.75", 336, 192),
    ("2.0", 352, 176),
    ("2.09", 368, 176),
    ("2.4", 384, 160),
    ("2.5", 400, 160),
    ("2.89", 416, 144),
    ("3.0", 432, 144),
    ("3.11", 448, 144),
    ("3.62", 464, 128),
    ("3.75", 480, 128),
    ("3.88", 496, 128),
    ("4.0", 512, 128),
];

/// The bin table for a transformer's `sample_size` (latent side): 256 → 2048 px
/// (PixArt-Σ's `ASPECT_RATIO_2048_BIN`: all 40 official ratios), 128 → 1024, 64 →
/// 512, 32 → 256, as diffusers chooses; other sizes have no bins.
pub fn bins_for(sample_size: usize) -> Option<Vec<(f64, usize, usize)>> {
    if sample_size == 256 {
        return Some(
            OFFICIAL_256
                .iter()
                .map(|(r, h, w)| (r.parse().unwrap_or(1.0), h * 8, w * 8))
                .collect(),
        );
    }
    let divisor = match sample_size {
        128 => 1,
        64 => 2,
        32 => 4,
        _ => return None,
    };
    Some(
        BINS_1024
            .iter()
            .map(|(r, h, w)| (r.parse().unwrap_or(1.0), h / divisor, w / divisor))
            .collect(),
    )
}

/// `classify_height_width_bin`: the bin whose ratio is closest to height/width.
pub fn classify(height: usize, width: usize, bins: &[(f64, usize, usize)]) -> (usize, usize) {
    let ratio = height as f64 / width as f64;
    let mut best = bins[0];
    for bin in bins {
        if (bin.0 - ratio).abs() < (best.0 - ratio).abs() {
            best = *bin;
        }
    }
    (best.1, best.2)
}

/// `F.interpolate(mode="bilinear", align_corners=False)` on `[B, C, H, W]`.
pub fn resize_bilinear(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if (h, w) == (out_h, out_w) {
        return Ok(x.clone());
    }
    let dtype = x.dtype();
    let data = x
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let taps = |n_in: usize, n_out: usize| -> Vec<(usize, usize, f32)> {
        let scale = n_in as f32 / n_out as f32;
        (0..n_out)
            .map(|o| {
                let src = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
                let i0 = (src as usize).min(n_in - 1);
                let i1 = (i0 + 1).min(n_in - 1);
                (i0, i1, src - i0 as f32)
            })
            .collect()
    };
    let (ty, tx) = (taps(h, out_h), taps(w, out_w));
    let mut out = Vec::with_capacity(b * c * out_h * out_w);
    for plane in data.chunks_exact(h * w) {
        for &(y0, y1, ly) in &ty {
            for &(x0, x1, lx) in &tx {
                let top = (1.0 - lx) * plane[y0 * w + x0] + lx * plane[y0 * w + x1];
                let bottom = (1.0 - lx) * plane[y1 * w + x0] + lx * plane[y1 * w + x1];
                out.push((1.0 - ly) * top + ly * bottom);
            }
        }
    }
    Tensor::from_vec(out, (b, c, out_h, out_w), &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(x.device())
}

/// `resize_and_crop_tensor`: scale to cover the target, then crop the centre.
pub fn resize_and_crop(x: &Tensor, height: usize, width: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if (h, w) == (height, width) {
        return Ok(x.clone());
    }
    let ratio = (height as f64 / h as f64).max(width as f64 / w as f64);
    // diffusers truncates (`int(h * ratio)`), which can land one pixel short of the
    // target (480/832·832 = 479.99…): never resize below the crop.
    let rh = ((h as f64 * ratio) as usize).max(height);
    let rw = ((w as f64 * ratio) as usize).max(width);
    let resized = resize_bilinear(x, rh, rw)?;
    let (top, left) = ((rh - height) / 2, (rw - width) / 2);
    resized.narrow(2, top, height)?.narrow(3, left, width)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snaps_to_the_nearest_ratio() {
        let bins = bins_for(64).unwrap();
        assert_eq!(classify(512, 512, &bins), (512, 512));
        assert_eq!(classify(200, 304, &bins_for(32).unwrap()), (208, 304)); // 0.658 → bin 0.68
    }

    #[test]
    fn crops_never_underflow() {
        // 480×640 snaps to 416×576 on the 512 model; 416·(480/416) truncates to 479.
        let x = Tensor::zeros((1, 3, 416, 576), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            resize_and_crop(&x, 480, 640).unwrap().dims(),
            [1, 3, 480, 640]
        );
        for (h, w) in [(480, 640), (333, 777), (1000, 17)] {
            let bins = bins_for(64).unwrap();
            let (bh, bw) = classify(h, w, &bins);
            let x = Tensor::zeros((1, 1, bh, bw), candle_core::DType::F32, &Device::Cpu).unwrap();
            assert_eq!(resize_and_crop(&x, h, w).unwrap().dims(), [1, 1, h, w]);
        }
    }

    #[test]
    fn bilinear_matches_torch_on_a_ramp() {
        // torch: F.interpolate(arange(4.).view(1,1,1,4), size=(1,8), mode="bilinear")
        let x = Tensor::new(&[0f32, 1., 2., 3.], &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 1, 4))
            .unwrap();
        let y = resize_bilinear(&x, 1, 8)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(y, [0.0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0]);
    }

    #[test]
    fn the_2048_table_is_sigmas_forty_bins() {
        let bins = bins_for(256).unwrap();
        assert_eq!(bins.len(), 40);
        assert_eq!(bins[1], (0.26, 1024, 3968));
        assert_eq!(classify(2048, 2048, &bins), (2048, 2048));
        assert_eq!(classify(1024, 4096, &bins), (1024, 4096));
    }
}

//! Aspect-ratio buckets for multi-scale training: the official training code's
//! 40 bins (`ASPECT_RATIO_256/512/1024`, ratios 0.25–4.0; diffusers' inference
//! tables keep 33 of them). An image goes to the bin whose ratio (height/width)
//! is nearest, ties to the first.

use crate::pixart::binning::OFFICIAL_256 as BINS_256;

/// A bucket: its ratio and pixel size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bin {
    pub ratio: f64,
    pub height: usize,
    pub width: usize,
}

/// The bins for a training resolution: the official table for 256, 512, 1024
/// and 2048 (PixArt-Σ); for other sizes the 256 table scaled, sides rounded to multiples of 16
/// (whole latent patches); where rounding merges bins, the one whose ratio
/// fits the rounded size stays.
pub fn bins(resolution: usize) -> Vec<Bin> {
    let scale = resolution as f64 / 256.0;
    let exact = matches!(resolution, 256 | 512 | 1024 | 2048);
    let side = |s: usize| {
        if exact {
            s * resolution / 256
        } else {
            (((s as f64 * scale) / 16.0).round() as usize).max(1) * 16
        }
    };
    let mut out: Vec<Bin> = Vec::with_capacity(BINS_256.len());
    for (ratio, h, w) in BINS_256 {
        let bin = Bin {
            ratio: ratio.parse().unwrap_or(1.0),
            height: side(*h),
            width: side(*w),
        };
        let off = |b: &Bin| (b.ratio - b.height as f64 / b.width as f64).abs();
        match out
            .iter_mut()
            .find(|b| (b.height, b.width) == (bin.height, bin.width))
        {
            // Rounding merged two bins: keep the ratio that fits the size.
            Some(seen) if off(&bin) < off(seen) => *seen = bin,
            Some(_) => {}
            None => out.push(bin),
        }
    }
    out
}

/// The bin nearest to an image's height/width ratio (ties: the first).
pub fn closest(height: usize, width: usize, bins: &[Bin]) -> Bin {
    let ratio = height as f64 / width.max(1) as f64;
    let mut best = bins[0];
    for b in &bins[1..] {
        if (b.ratio - ratio).abs() < (best.ratio - ratio).abs() {
            best = *b;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_tables_and_nearest_ratio() {
        let b = bins(1024);
        assert_eq!(b.len(), 40);
        assert_eq!((b[0].height, b[0].width), (512, 2048));
        assert_eq!(closest(1024, 1024, &b).ratio, 1.0);
        // 800×1024 (0.78125) → the 0.78 bin; 768×1024 (0.75) ties 0.72 and 0.78: the first.
        let c = closest(800, 1024, &bins(512));
        assert_eq!((c.ratio, c.height, c.width), (0.78, 448, 576));
        assert_eq!(closest(768, 1024, &bins(512)).ratio, 0.72);
        // Small resolutions: multiples of 16, no duplicates.
        let small = bins(64);
        assert!(small
            .iter()
            .all(|b| b.height % 16 == 0 && b.width % 16 == 0));
        assert!(
            small.len() < 40
                && small.contains(&Bin {
                    ratio: 1.0,
                    height: 64,
                    width: 64
                })
        );
    }
}

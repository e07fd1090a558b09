//! A 2-D convolution on the CPU: im2col (`Unfold`, whose backward is the
//! matching fold) followed by the fused linear layer of [`super::linear`]. candle's
//! own convolution differentiates its input with a scalar transposed-convolution
//! loop and its kernel with a convolution the size of the image, which made a
//! small VAE's training step take seconds. The columns are made a band of output
//! rows at a time, so a large image (the VAE's 1024 px decode: 128 channels × 9
//! taps per pixel) never holds gigabytes of them.

use super::gemm::{matmul, Product};
use super::linear::linear;
use super::winograd;
use super::Shared;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Geometry of one convolution: input `[B, C, H, W]`, a `k×k` kernel.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    padding: usize,
    /// The output rows this op makes: the first, and how many.
    band: (usize, usize),
}

impl Geometry {
    fn out_h(&self) -> usize {
        (self.h + 2 * self.padding - self.k) / self.stride + 1
    }
    fn out_w(&self) -> usize {
        (self.w + 2 * self.padding - self.k) / self.stride + 1
    }
    /// Values per column: C·k·k, in the kernel's (c, ky, kx) order.
    fn patch(&self) -> usize {
        self.c * self.k * self.k
    }
    /// For output pixel (oy, ox) and patch entry (c, ky, kx): the input pixel, if inside.
    #[inline(always)]
    fn source(&self, oy: usize, ox: usize, ky: usize, kx: usize) -> Option<(usize, usize)> {
        let y = (oy * self.stride + ky).checked_sub(self.padding)?;
        let x = (ox * self.stride + kx).checked_sub(self.padding)?;
        (y < self.h && x < self.w).then_some((y, x))
    }
}

fn contiguous<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((a, b))) => Ok(&data[a..b]),
        _ => candle_core::bail!("conv unfold: contiguous f32 only, got {:?}", s.dtype()),
    }
}

/// `[B, C, H, W]` → `[B, OH, OW, C·k·k]`.
struct Unfold(Geometry);

impl CustomOp1 for Unfold {
    fn name(&self) -> &'static str {
        "conv-unfold"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let x = contiguous(s, l)?;
        let (ow, patch) = (g.out_w(), g.patch());
        let (first, oh) = g.band;
        let mut cols = vec![0f32; g.b * oh * ow * patch];
        cols.par_chunks_mut(ow * patch)
            .enumerate()
            .for_each(|(row, dst)| {
                let (bi, oy) = (row / oh, first + row % oh);
                let image = &x[bi * g.c * g.h * g.w..][..g.c * g.h * g.w];
                for ox in 0..ow {
                    let col = &mut dst[ox * patch..][..patch];
                    let x0 = (ox * g.stride).checked_sub(g.padding);
                    // The kernel's row lies inside the image: copy it whole.
                    let inside = x0.is_some_and(|x0| x0 + g.k <= g.w);
                    for c in 0..g.c {
                        let plane = &image[c * g.h * g.w..][..g.h * g.w];
                        for ky in 0..g.k {
                            let run = &mut col[(c * g.k + ky) * g.k..][..g.k];
                            let Some(y) = (oy * g.stride + ky)
                                .checked_sub(g.padding)
                                .filter(|y| *y < g.h)
                            else {
                                continue;
                            };
                            match (inside, x0) {
                                (true, Some(x0)) => {
                                    run.copy_from_slice(&plane[y * g.w + x0..][..g.k])
                                }
                                _ => {
                                    for (kx, v) in run.iter_mut().enumerate() {
                                        if let Some((_, xx)) = g.source(oy, ox, ky, kx) {
                                            *v = plane[y * g.w + xx];
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(cols), Shape::from((g.b, oh, ow, patch))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Fold(self.0))?))
    }
}

/// The adjoint of [`Unfold`]: columns' gradients summed back onto input pixels.
struct Fold(Geometry);

impl CustomOp1 for Fold {
    fn name(&self) -> &'static str {
        "conv-fold"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let cols = contiguous(s, l)?;
        let (ow, patch) = (g.out_w(), g.patch());
        let (first, oh) = g.band;
        let mut dx = vec![0f32; g.b * g.c * g.h * g.w];
        // One (image, channel) plane per task: its sums touch no other plane.
        dx.par_chunks_mut(g.h * g.w)
            .enumerate()
            .for_each(|(plane_index, plane)| {
                let (bi, c) = (plane_index / g.c, plane_index % g.c);
                let image_cols = &cols[bi * oh * ow * patch..][..oh * ow * patch];
                for (row, oy) in (first..first + oh).enumerate() {
                    for ox in 0..ow {
                        let col =
                            &image_cols[(row * ow + ox) * patch + c * g.k * g.k..][..g.k * g.k];
                        let x0 = (ox * g.stride).checked_sub(g.padding);
                        let inside = x0.is_some_and(|x0| x0 + g.k <= g.w);
                        for ky in 0..g.k {
                            let Some(y) = (oy * g.stride + ky)
                                .checked_sub(g.padding)
                                .filter(|y| *y < g.h)
                            else {
                                continue;
                            };
                            let run = &col[ky * g.k..][..g.k];
                            match (inside, x0) {
                                (true, Some(x0)) => {
                                    for (d, v) in plane[y * g.w + x0..][..g.k].iter_mut().zip(run) {
                                        *d += v;
                                    }
                                }
                                _ => {
                                    for (kx, v) in run.iter().enumerate() {
                                        if let Some((_, x)) = g.source(oy, ox, ky, kx) {
                                            plane[y * g.w + x] += v;
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(dx), Shape::from((g.b, g.c, g.h, g.w))))
    }
}

/// Column values a forward-only task fills at once: 2^21 f32 (8 MiB).
const BAND_VALUES: usize = if cfg!(test) { 3000 } else { 1 << 21 };

/// The convolution without gradients: `[B, C, H, W]` ∗ `[O, C, k, k]` + `[O]` →
/// `[B, O, OH, OW]`. Each task takes a band of output rows of one image, lays its
/// input patches out as `[C·k·k, pixels]` in a buffer it reuses, and multiplies
/// the kernel `[O, C·k·k]` by them straight into the output's channel planes:
/// no `[pixels, C·k·k]` matrix of the whole image, no permute afterwards.
struct ConvForward(Geometry);

impl ConvForward {
    /// Input patches of output rows `first..first + rows` of `image` `[C, H, W]`
    /// into `cols` `[C·k·k, rows·OW]`.
    fn patches(&self, image: &[f32], first: usize, rows: usize, cols: &mut [f32]) {
        let g = self.0;
        let ow = g.out_w();
        let pixels = rows * ow;
        for c in 0..g.c {
            let plane = &image[c * g.h * g.w..][..g.h * g.w];
            for ky in 0..g.k {
                for kx in 0..g.k {
                    let tap = (c * g.k + ky) * g.k + kx;
                    let dst = &mut cols[tap * pixels..][..pixels];
                    for (r, out_row) in dst.chunks_mut(ow).enumerate() {
                        let oy = first + r;
                        let Some(y) = (oy * g.stride + ky)
                            .checked_sub(g.padding)
                            .filter(|y| *y < g.h)
                        else {
                            out_row.fill(0.0);
                            continue;
                        };
                        let src = &plane[y * g.w..][..g.w];
                        if g.stride == 1 {
                            // Output x reads input x + kx − padding: one shifted copy,
                            // zeros where it falls outside.
                            let lo = g.padding.saturating_sub(kx).min(ow);
                            let hi = (g.w + g.padding).saturating_sub(kx).clamp(lo, ow);
                            out_row[..lo].fill(0.0);
                            out_row[lo..hi]
                                .copy_from_slice(&src[lo + kx - g.padding..hi + kx - g.padding]);
                            out_row[hi..].fill(0.0);
                        } else {
                            for (ox, v) in out_row.iter_mut().enumerate() {
                                *v = (ox * g.stride + kx)
                                    .checked_sub(g.padding)
                                    .filter(|x| *x < g.w)
                                    .map_or(0.0, |x| src[x]);
                            }
                        }
                    }
                }
            }
        }
    }
}

impl CustomOp3 for ConvForward {
    fn name(&self) -> &'static str {
        "conv-forward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let g = self.0;
        let (x, w, bias) = (
            contiguous(s1, l1)?,
            contiguous(s2, l2)?,
            contiguous(s3, l3)?,
        );
        let (o, patch) = (bias.len(), g.patch());
        let (oh, ow) = (g.out_h(), g.out_w());
        let rows = (BAND_VALUES / (patch * ow).max(1)).clamp(1, oh);
        let bands = oh.div_ceil(rows);
        let mut out = vec![0f32; g.b * o * oh * ow];
        let dst = Shared(out.as_mut_ptr());
        (0..g.b * bands).into_par_iter().for_each_init(
            || vec![0f32; patch * rows * ow],
            |cols, task| {
                let (bi, band) = (task / bands, task % bands);
                let first = band * rows;
                let n = rows.min(oh - first);
                let pixels = n * ow;
                let image = &x[bi * g.c * g.h * g.w..][..g.c * g.h * g.w];
                self.patches(image, first, n, cols);
                // SAFETY: this task alone writes rows first..first + n of every
                // channel plane of image bi; the products stay inside `out`,
                // `w` and `cols`.
                unsafe {
                    let at = dst.ptr().add(bi * o * oh * ow + first * ow);
                    for (oc, b) in bias.iter().enumerate() {
                        std::slice::from_raw_parts_mut(at.add(oc * oh * ow), pixels).fill(*b);
                    }
                    matmul(
                        (o, pixels, patch),
                        at,
                        (oh * ow, 1),
                        w.as_ptr(),
                        (patch, 1),
                        cols.as_ptr(),
                        (pixels, 1),
                        Product {
                            accumulate: true,
                            ..Product::one_thread(1.0)
                        },
                    );
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((g.b, o, oh, ow))))
    }
}

/// `conv.forward(x)`, on the CPU in f32 with bounded buffers — a forward-only
/// kernel where no gradient is wanted, im2col with fast gradients where one is;
/// candle's convolution on other devices and dtypes.
pub fn conv2d(conv: &candle_nn::Conv2d, x: &Tensor) -> Result<Tensor> {
    use candle_core::Module;
    let w = conv.weight();
    let cfg = conv.config();
    let square = w.dim(2)? == w.dim(3)?;
    let plain = cfg.groups == 1 && cfg.dilation == 1 && square && conv.bias().is_some();
    if !(plain && x.device().is_cpu() && x.dtype() == DType::F32) {
        return conv.forward(x);
    }
    let (b, c, h, wd) = x.dims4()?;
    let (o, k) = (w.dim(0)?, w.dim(2)?);
    let mut g = Geometry {
        b,
        c,
        h,
        w: wd,
        k,
        stride: cfg.stride,
        padding: cfg.padding,
        band: (0, 0),
    };
    let bias = conv.bias().cloned();
    let wants_grad = x.track_op() || w.track_op() || bias.as_ref().is_some_and(|b| b.track_op());
    if let (false, Some(bias)) = (wants_grad, &bias) {
        if let Some(y) = by_winograd(conv, x, false)? {
            return Ok(y);
        }
        g.band = (0, g.out_h());
        return x.contiguous()?.apply_op3_no_bwd(
            &w.contiguous()?,
            &bias.contiguous()?,
            &ConvForward(g),
        );
    }
    let layer = candle_nn::Linear::new(w.reshape((o, c * k * k))?, bias);
    // A few images, or a band of one image's output rows, at a time, so the
    // columns stay well under glibc's 32 MiB mmap threshold: bigger buffers are
    // mapped fresh and page-faulted on every allocation, which cost more than
    // the arithmetic (and a 1024 px image's would take gigabytes).
    let (oh, row_values) = (g.out_h(), g.out_w() * g.patch());
    let rows = (COLUMN_BUDGET / row_values.max(1)).clamp(1, oh);
    let images = if rows < oh {
        1
    } else {
        (COLUMN_BUDGET / (oh * row_values).max(1)).clamp(1, b)
    };
    let x = x.contiguous()?;
    let mut parts = Vec::new();
    for start in (0..b).step_by(images) {
        g.b = images.min(b - start);
        let batch = x.narrow(0, start, g.b)?;
        let mut bands = Vec::with_capacity(oh.div_ceil(rows));
        for first in (0..oh).step_by(rows) {
            g.band = (first, rows.min(oh - first));
            let cols = batch.apply_op1(Unfold(g))?;
            bands.push(linear(&layer, &cols)?);
        }
        parts.push(cat_or_one(bands, 1)?);
    }
    cat_or_one(parts, 0)?.permute((0, 3, 1, 2))?.contiguous()
}

/// `conv.forward(x.upsample_nearest2d(2·H, 2·W))`, the VAE decoder's upsampler:
/// on the CPU without gradients the enlarged image is read from `x`, never made.
pub fn conv2d_upsampled(conv: &candle_nn::Conv2d, x: &Tensor) -> Result<Tensor> {
    match by_winograd(conv, x, true)? {
        Some(y) => Ok(y),
        None => {
            let (_, _, h, w) = x.dims4()?;
            conv2d(conv, &x.upsample_nearest2d(2 * h, 2 * w)?)
        }
    }
}

/// The convolution (of `x`'s nearest 2× enlargement when `upsampled`) by the
/// Winograd kernel, where it applies: a plain 3×3, stride 1, padding 1 with a
/// bias and enough channels, f32 on the CPU, no gradient wanted. `None` elsewhere.
fn by_winograd(conv: &candle_nn::Conv2d, x: &Tensor, upsampled: bool) -> Result<Option<Tensor>> {
    let w = conv.weight();
    let cfg = conv.config();
    let (b, c, h, wd) = x.dims4()?;
    let (o, k) = (w.dim(0)?, w.dim(2)?);
    let shape = k == 3 && w.dim(3)? == 3 && cfg.stride == 1 && cfg.padding == 1;
    let plain = shape && cfg.groups == 1 && cfg.dilation == 1;
    let thick = c >= winograd::MIN_CHANNELS && o >= winograd::MIN_CHANNELS;
    let on_cpu = x.device().is_cpu() && x.dtype() == DType::F32;
    let Some(bias) = conv.bias() else {
        return Ok(None);
    };
    if !(plain && thick && on_cpu) || x.track_op() || w.track_op() || bias.track_op() {
        return Ok(None);
    }
    let scale = if upsampled { 2 } else { 1 };
    let op = winograd::Winograd3x3 {
        b,
        c,
        h: scale * h,
        w: scale * wd,
        upsampled,
    };
    let y = x
        .contiguous()?
        .apply_op3_no_bwd(&w.contiguous()?, &bias.contiguous()?, &op)?;
    Ok(Some(y))
}

fn cat_or_one(mut parts: Vec<Tensor>, dim: usize) -> Result<Tensor> {
    if parts.len() == 1 {
        Ok(parts.remove(0))
    } else {
        Tensor::cat(&parts, dim)
    }
}

/// Column values unfolded at once (4 MiB of f32; tiny in tests, so they take
/// the chunked path).
const COLUMN_BUDGET: usize = if cfg!(test) { 2000 } else { 1 << 20 };

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Same values and gradients as candle's convolution, strided and padded; at
    /// 13 px the columns are made in bands of output rows (5, 5, 3 with a 3×3
    /// kernel), at 7 px whole images at once.
    #[test]
    fn matches_candle_conv_and_its_gradients() -> Result<()> {
        let dev = Device::Cpu;
        for (stride, padding, k, side) in [
            (1, 1, 3, 7),
            (2, 0, 3, 7),
            (1, 0, 1, 7),
            (1, 1, 3, 13),
            (2, 1, 3, 13),
        ] {
            // Square inputs: candle's own backward takes the width's output padding from the height.
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, side, side), &dev)?)?;
            let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 3, k, k), &dev)?)?;
            let bias = Var::from_tensor(&Tensor::randn(0f32, 1.0, 4, &dev)?)?;
            let cfg = candle_nn::Conv2dConfig {
                stride,
                padding,
                ..Default::default()
            };
            let conv =
                candle_nn::Conv2d::new(w.as_tensor().clone(), Some(bias.as_tensor().clone()), cfg);
            let ours = conv2d(&conv, x.as_tensor())?;
            let theirs = candle_core::Module::forward(&conv, x.as_tensor())?;
            let diff = (&ours - &theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "forward differs by {diff}");
            // Without gradients: the forward-only kernel (bands of output rows).
            let detached = candle_nn::Conv2d::new(
                w.as_tensor().detach(),
                Some(bias.as_tensor().detach()),
                cfg,
            );
            let plain = conv2d(&detached, &x.as_tensor().detach())?;
            let diff = (&plain - &theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "stride {stride}, padding {padding}, {side} px: forward-only kernel differs by {diff}");
            let probe = Tensor::randn(0f32, 1.0, ours.dims(), &dev)?;
            let ga = (&ours * &probe)?.sum_all()?.backward()?;
            let gb = (&theirs * &probe)?.sum_all()?.backward()?;
            for v in [&x, &w, &bias] {
                let a = ga.get(v.as_tensor()).unwrap();
                let b = gb.get(v.as_tensor()).unwrap();
                let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    diff < 1e-4,
                    "stride {stride}, padding {padding}: gradient differs by {diff}"
                );
            }
        }
        Ok(())
    }
}

//! The 3×3, stride-1, padding-1 convolution without gradients by Winograd's
//! minimal filtering F(2×2, 3×3) (Lavin & Gray, "Fast Algorithms for Convolutional
//! Neural Networks", 2015): each 2×2 block of output pixels costs 16 products per
//! (input, output) channel pair instead of 36, so the VAE's convolutions do 2.25×
//! fewer multiply-adds than the direct (im2col) kernel of [`super::conv`]. Its
//! transforms hold only 0, ±1 and ½ (larger tiles, F(4×4, 3×3), need ±2 and ¼ and
//! lose more precision), so its rounding stays close to a direct convolution's:
//! the tests bound the difference from candle's.
//!
//! Per task, a band of tile rows of one image: the input tiles are transformed
//! into `V[16][C][tiles]`, sixteen products `M[ξ] = U[ξ]·V[ξ]` with the transformed
//! kernel `U[16][O][C]` give `M[16][O][tiles]`, and the inverse transform writes
//! each tile's 2×2 outputs (plus the bias) into the output planes.

use super::gemm::{matmul, Product};
use super::{contiguous_f32, Shared};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape};
use rayon::prelude::*;

/// Values one task's `V` and `M` buffers hold together: 2^22 f32 (16 MiB).
const BAND_VALUES: usize = if cfg!(test) { 4000 } else { 1 << 22 };

/// Below these channel counts the products are too thin for the transforms to pay.
pub(super) const MIN_CHANNELS: usize = if cfg!(test) { 1 } else { 16 };

/// `[B, C, H, W]` ∗ `[O, C, 3, 3]` + `[O]` → `[B, O, H, W]`, stride 1, padding 1.
/// With `upsampled`, the input is `[B, C, H/2, W/2]` and is read as its nearest
/// 2× enlargement (the VAE decoder's upsampler), which is never materialised.
pub(super) struct Winograd3x3 {
    pub b: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub upsampled: bool,
}

/// `G·g·Gᵀ` for each (output, input) channel pair: `[O, C, 3, 3]` → `[16, O, C]`.
fn kernel_transform(w: &[f32], o: usize, c: usize) -> Vec<f32> {
    let mut u = vec![0f32; 16 * o * c];
    let plane = o * c;
    for pair in 0..plane {
        let g = &w[pair * 9..][..9];
        // Rows: G·g, 4×3.
        let mut gg = [[0f32; 3]; 4];
        for k in 0..3 {
            let (a, b, d) = (g[k], g[3 + k], g[6 + k]);
            gg[0][k] = a;
            gg[1][k] = 0.5 * (a + b + d);
            gg[2][k] = 0.5 * (a - b + d);
            gg[3][k] = d;
        }
        // Columns: (G·g)·Gᵀ, 4×4.
        for (i, r) in gg.iter().enumerate() {
            let v = [
                r[0],
                0.5 * (r[0] + r[1] + r[2]),
                0.5 * (r[0] - r[1] + r[2]),
                r[2],
            ];
            for (j, v) in v.into_iter().enumerate() {
                u[(i * 4 + j) * plane + pair] = v;
            }
        }
    }
    u
}

impl Winograd3x3 {
    /// The input image's height and width.
    fn source_size(&self) -> (usize, usize) {
        if self.upsampled {
            (self.h / 2, self.w / 2)
        } else {
            (self.h, self.w)
        }
    }

    fn tiles_x(&self) -> usize {
        self.w.div_ceil(2)
    }

    fn tiles_y(&self) -> usize {
        self.h.div_ceil(2)
    }

    /// Input row `y` (of the enlarged image when `upsampled`; zeros outside) split
    /// into the values at even and odd padded positions: with one column of zero
    /// padding on the left, tile `tx` reads `even[tx], odd[tx], even[tx + 1],
    /// odd[tx + 1]`.
    #[inline(always)]
    fn split_row(&self, plane: &[f32], y: Option<usize>, even: &mut [f32], odd: &mut [f32]) {
        let (_, sw) = self.source_size();
        even.fill(0.0);
        odd.fill(0.0);
        let Some(y) = y else { return };
        if self.upsampled {
            // Padded position p reads enlarged column p − 1, source column (p − 1)/2:
            // odd[i] = src[i], even[i] = src[i − 1].
            let src = &plane[(y / 2) * sw..][..sw];
            odd[..sw].copy_from_slice(src);
            even[1..=sw].copy_from_slice(src);
        } else {
            // even[i] = src[2i − 1], odd[i] = src[2i].
            let src = &plane[y * sw..][..sw];
            for (i, v) in src.iter().enumerate() {
                if i.is_multiple_of(2) {
                    odd[i / 2] = *v;
                } else {
                    even[i / 2 + 1] = *v;
                }
            }
        }
    }

    /// `Bᵀ·d·B` of the tiles in tile rows `ty0..ty0 + rows` of `image` `[C, H, W]`
    /// (`[C, H/2, W/2]` when `upsampled`) into `v` `[16, C, rows·TX]`.
    fn input_transform(&self, image: &[f32], ty0: usize, rows: usize, v: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if super::avx2_fma() {
            // SAFETY: the CPU supports the features the function was compiled for.
            return unsafe { self.input_transform_avx2(image, ty0, rows, v) };
        }
        self.input_transform_any(image, ty0, rows, v)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn input_transform_avx2(&self, image: &[f32], ty0: usize, rows: usize, v: &mut [f32]) {
        self.input_transform_any(image, ty0, rows, v)
    }

    #[inline(always)]
    fn input_transform_any(&self, image: &[f32], ty0: usize, rows: usize, v: &mut [f32]) {
        let (h, tx_n) = (self.h, self.tiles_x());
        let (sh, sw) = self.source_size();
        let tiles = rows * tx_n;
        let stride = self.c * tiles;
        let n = tx_n + 1;
        let mut even = vec![0f32; n];
        let mut odd = vec![0f32; n];
        // Bᵀ along each of the tile's four input rows: t[j][k][tx].
        let mut t = vec![0f32; 16 * tx_n];
        for c in 0..self.c {
            let plane = &image[c * sh * sw..][..sh * sw];
            for r in 0..rows {
                for j in 0..4 {
                    let y = (2 * (ty0 + r) + j).checked_sub(1).filter(|y| *y < h);
                    self.split_row(plane, y, &mut even, &mut odd);
                    let (e0, e1, o0, o1) = (&even[..tx_n], &even[1..], &odd[..tx_n], &odd[1..]);
                    let row = &mut t[j * 4 * tx_n..][..4 * tx_n];
                    let (t0, rest) = row.split_at_mut(tx_n);
                    let (t1, rest) = rest.split_at_mut(tx_n);
                    let (t2, t3) = rest.split_at_mut(tx_n);
                    for i in 0..tx_n {
                        t0[i] = e0[i] - e1[i];
                        t1[i] = o0[i] + e1[i];
                        t2[i] = e1[i] - o0[i];
                        t3[i] = o0[i] - o1[i];
                    }
                }
                // Bᵀ down the columns: V[4i + k] from t[0..4][k].
                let at = c * tiles + r * tx_n;
                for k in 0..4 {
                    let row = |j: usize| &t[(j * 4 + k) * tx_n..][..tx_n];
                    let (a, b, cc, d) = (row(0), row(1), row(2), row(3));
                    let out = |i: usize| (4 * i + k) * stride + at;
                    let v0 = out(0);
                    for (x, (a, cc)) in v[v0..v0 + tx_n].iter_mut().zip(a.iter().zip(cc)) {
                        *x = a - cc;
                    }
                    let v1 = out(1);
                    for (x, (b, cc)) in v[v1..v1 + tx_n].iter_mut().zip(b.iter().zip(cc)) {
                        *x = b + cc;
                    }
                    let v2 = out(2);
                    for (x, (b, cc)) in v[v2..v2 + tx_n].iter_mut().zip(b.iter().zip(cc)) {
                        *x = cc - b;
                    }
                    let v3 = out(3);
                    for (x, (b, d)) in v[v3..v3 + tx_n].iter_mut().zip(b.iter().zip(d)) {
                        *x = b - d;
                    }
                }
            }
        }
    }

    /// `Aᵀ·m·A` plus the bias: the tiles of `m` `[16, O, rows·TX]` into output rows
    /// `2·ty0..` of `out` (the image's `[O, H, W]`, reached through `dst`).
    ///
    /// # Safety
    /// `dst` must address the image's `O·H·W` outputs, and no other task may write
    /// the rows of tile rows `ty0..ty0 + rows`.
    unsafe fn output_transform(
        &self,
        m: &[f32],
        bias: &[f32],
        ty0: usize,
        rows: usize,
        dst: *mut f32,
    ) {
        #[cfg(target_arch = "x86_64")]
        if super::avx2_fma() {
            return self.output_transform_avx2(m, bias, ty0, rows, dst);
        }
        self.output_transform_any(m, bias, ty0, rows, dst)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn output_transform_avx2(
        &self,
        m: &[f32],
        bias: &[f32],
        ty0: usize,
        rows: usize,
        dst: *mut f32,
    ) {
        self.output_transform_any(m, bias, ty0, rows, dst)
    }

    /// # Safety
    /// As [`Self::output_transform`].
    #[inline(always)]
    unsafe fn output_transform_any(
        &self,
        m: &[f32],
        bias: &[f32],
        ty0: usize,
        rows: usize,
        dst: *mut f32,
    ) {
        let (h, w, tx_n) = (self.h, self.w, self.tiles_x());
        let tiles = rows * tx_n;
        let stride = bias.len() * tiles;
        // Aᵀ along each row of the tile: s[i][k][tx], then down the columns.
        let mut s = vec![0f32; 8 * tx_n];
        let mut line = vec![0f32; 2 * tx_n];
        for (o, b) in bias.iter().enumerate() {
            for r in 0..rows {
                let at = o * tiles + r * tx_n;
                let e = |xi: usize| &m[xi * stride + at..][..tx_n];
                for i in 0..4 {
                    let (m0, m1, m2, m3) = (e(4 * i), e(4 * i + 1), e(4 * i + 2), e(4 * i + 3));
                    let (s0, s1) = s[i * 2 * tx_n..][..2 * tx_n].split_at_mut(tx_n);
                    for x in 0..tx_n {
                        s0[x] = m0[x] + m1[x] + m2[x];
                        s1[x] = m1[x] - m2[x] - m3[x];
                    }
                }
                let row = |i: usize, k: usize| &s[(i * 2 + k) * tx_n..][..tx_n];
                for a in 0..2 {
                    let y = 2 * (ty0 + r) + a;
                    if y >= h {
                        continue;
                    }
                    for k in 0..2 {
                        if a == 0 {
                            let (p, q, u) = (row(0, k), row(1, k), row(2, k));
                            for x in 0..tx_n {
                                line[2 * x + k] = p[x] + q[x] + u[x] + b;
                            }
                        } else {
                            let (p, q, u) = (row(1, k), row(2, k), row(3, k));
                            for x in 0..tx_n {
                                line[2 * x + k] = p[x] - q[x] - u[x] + b;
                            }
                        }
                    }
                    let out = std::slice::from_raw_parts_mut(dst.add((o * h + y) * w), w);
                    out.copy_from_slice(&line[..w]);
                }
            }
        }
    }
}

impl CustomOp3 for Winograd3x3 {
    fn name(&self) -> &'static str {
        "conv3x3-winograd"
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
        let name = self.name();
        let x = contiguous_f32(name, s1, l1)?;
        let w = contiguous_f32(name, s2, l2)?;
        let bias = contiguous_f32(name, s3, l3)?;
        let (c, o) = (self.c, bias.len());
        let (sh, sw) = self.source_size();
        let even = !self.upsampled || (self.h.is_multiple_of(2) && self.w.is_multiple_of(2));
        if w.len() != o * c * 9 || x.len() != self.b * c * sh * sw || !even {
            candle_core::bail!("{name}: the kernel or input does not match its geometry");
        }
        let u = kernel_transform(w, o, c);
        let (ty_n, tx_n) = (self.tiles_y(), self.tiles_x());
        let rows = (BAND_VALUES / (16 * (c + o) * tx_n).max(1)).clamp(1, ty_n.max(1));
        let bands = ty_n.div_ceil(rows);
        let image_size = c * sh * sw;
        let out_size = o * self.h * self.w;
        let mut out = vec![0f32; self.b * out_size];
        let dst = Shared(out.as_mut_ptr());
        (0..self.b * bands).into_par_iter().for_each_init(
            || {
                let tiles = rows * tx_n;
                (vec![0f32; 16 * c * tiles], vec![0f32; 16 * o * tiles])
            },
            |(v, m), task| {
                let (bi, band) = (task / bands, task % bands);
                let ty0 = band * rows;
                let n = rows.min(ty_n - ty0);
                let tiles = n * tx_n;
                self.input_transform(&x[bi * image_size..][..image_size], ty0, n, v);
                for xi in 0..16 {
                    // SAFETY: U[ξ] is O×C, V[ξ] C×tiles and M[ξ] O×tiles inside their
                    // buffers (the band's V and M use the first 16·C·tiles and
                    // 16·O·tiles values); M is this task's own.
                    unsafe {
                        matmul(
                            (o, tiles, c),
                            m.as_mut_ptr().add(xi * o * tiles),
                            (tiles, 1),
                            u.as_ptr().add(xi * o * c),
                            (c, 1),
                            v.as_ptr().add(xi * c * tiles),
                            (tiles, 1),
                            Product::one_thread(1.0),
                        );
                    }
                }
                // SAFETY: this task alone writes tile rows ty0..ty0 + n of image bi.
                unsafe {
                    self.output_transform(
                        &m[..16 * o * tiles],
                        bias,
                        ty0,
                        n,
                        dst.ptr().add(bi * out_size),
                    );
                }
            },
        );
        Ok((
            CpuStorage::F32(out),
            Shape::from((self.b, o, self.h, self.w)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Equal to candle's direct convolution on odd and even, square and ragged
    /// images (the last tile row and column half outside), down to one pixel, with
    /// the bands split (the test budget makes several per image).
    #[test]
    fn equals_the_direct_convolution() -> Result<()> {
        let dev = Device::Cpu;
        for (b, c, o, h, w) in [
            (1, 3, 5, 1, 1),
            (2, 4, 3, 2, 3),
            (1, 8, 16, 5, 7),
            (2, 5, 6, 13, 9),
            (1, 16, 8, 33, 20),
        ] {
            let x = Tensor::randn(0f32, 1.0, (b, c, h, w), &dev)?;
            let k = Tensor::randn(0f32, 1.0, (o, c, 3, 3), &dev)?;
            let bias = Tensor::randn(0f32, 1.0, o, &dev)?;
            for upsampled in [false, true] {
                let (oh, ow) = if upsampled { (2 * h, 2 * w) } else { (h, w) };
                let op = Winograd3x3 {
                    b,
                    c,
                    h: oh,
                    w: ow,
                    upsampled,
                };
                let ours = x.apply_op3_no_bwd(&k, &bias, &op)?;
                // With `upsampled`, x read as its nearest 2× enlargement.
                let direct = x
                    .upsample_nearest2d(oh, ow)?
                    .conv2d(&k, 1, 1, 1, 1)?
                    .broadcast_add(&bias.reshape((1, o, 1, 1))?)?;
                let scale = direct.abs()?.max_all()?.to_scalar::<f32>()?;
                let diff = (&ours - &direct)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    diff <= 1e-6 * scale.max(1.0) * (c as f32).sqrt(),
                    "{b}×{c}→{o} at {oh}×{ow} (upsampled: {upsampled}): differs by {diff} \
                     (largest value {scale})"
                );
            }
        }
        Ok(())
    }
}

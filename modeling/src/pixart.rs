//! The PixArt-α transformer (diffusers' `PixArtTransformer2DModel`; hub configs may
//! say `Transformer2DModel` with `norm_type: ada_norm_single`), and the conversion
//! of the official `.pth` checkpoints to its weight names.
//!
//! Patch embedding with a 2-D sin-cos position embedding recomputed for the current
//! grid → adaLN-single (one timestep MLP shared by all blocks, optional size and
//! aspect-ratio micro-conditions) → caption projection → blocks (self-attention,
//! masked cross-attention, MLP) → final layer → unpatchify. Output channels: ε then
//! the learned variance interpolation.

use crate::kernels;
use crate::weights::{LoadError, Weights};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Module, Result, Tensor, Var, D};
use candle_nn::{conv2d, linear, linear_b, Conv2d, Conv2dConfig, Linear, VarBuilder};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::Path;

#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    #[serde(default = "default_in")]
    pub in_channels: usize,
    #[serde(default)]
    pub out_channels: Option<usize>,
    pub num_layers: usize,
    pub sample_size: usize,
    #[serde(default = "default_patch")]
    pub patch_size: usize,
    #[serde(default)]
    pub caption_channels: Option<usize>,
    #[serde(default)]
    pub cross_attention_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_true")]
    pub attention_bias: bool,
    #[serde(default)]
    pub interpolation_scale: Option<f64>,
    #[serde(default)]
    pub use_additional_conditions: Option<bool>,
    #[serde(default)]
    pub norm_type: Option<String>,
    /// PixArt-Σ's KV compression, as the official configs write it. diffusers has
    /// no such field; a config without it has none.
    #[serde(default)]
    pub kv_compress_config: Option<KvCompressConfig>,
}

/// The official `kv_compress_config`: in the blocks `kv_compress_layer` the
/// self-attention's keys and values are downsampled `scale_factor` times along
/// each side of the token grid (PixArt-Σ's 1024/2K/4K recipes: blocks 14–27 of
/// 28, factor 2, `conv`).
#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize)]
pub struct KvCompressConfig {
    /// `conv` (a learned depthwise k=stride=factor convolution, then a layer
    /// norm), `ave` (nearest-neighbour resize), `uniform` (every factor-th row
    /// and column), `uniform_every` (every factor-th token); none: off.
    #[serde(default)]
    pub sampling: Option<String>,
    #[serde(default = "one_factor")]
    pub scale_factor: usize,
    #[serde(default)]
    pub kv_compress_layer: Vec<usize>,
}

fn one_factor() -> usize {
    1
}

/// The samplings the official `AttentionKVCompress` defines.
pub const KV_SAMPLINGS: &[&str] = &["conv", "ave", "uniform", "uniform_every"];

impl KvCompressConfig {
    /// The sampling and factor of block `layer`, when it compresses.
    pub fn for_layer(&self, layer: usize) -> Option<(&str, usize)> {
        let sampling = self.sampling.as_deref()?;
        (self.scale_factor > 1 && self.kv_compress_layer.contains(&layer))
            .then_some((sampling, self.scale_factor))
    }
}

fn default_in() -> usize {
    4
}
fn default_patch() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-6
}
fn default_true() -> bool {
    true
}

/// The width of PixArt's sinusoidal timestep (and micro-condition) features.
pub const TIMESTEP_CHANNELS: usize = 256;

/// T5-XXL's width: the caption features every PixArt-α release takes.
const DEFAULT_CAPTION_CHANNELS: usize = 4096;

impl Config {
    pub fn hidden(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// The width of the caption features (`caption_channels`, T5-XXL's 4096 unset).
    pub fn caption_channels(&self) -> usize {
        self.caption_channels.unwrap_or(DEFAULT_CAPTION_CHANNELS)
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// diffusers: on when `sample_size == 128` (the 1024 multi-scale model) unless set.
    pub fn additional_conditions(&self) -> bool {
        self.use_additional_conditions
            .unwrap_or(self.sample_size == 128)
    }

    pub fn interpolation_scale(&self) -> f64 {
        self.interpolation_scale
            .unwrap_or((self.sample_size / 64).max(1) as f64)
    }

    /// A complete diffusers `config.json` for this model (every field diffusers'
    /// `PixArtTransformer2DModel` takes, so diffusers fills in no defaults).
    pub fn to_diffusers_json(&self) -> serde_json::Value {
        let d = self.hidden();
        let mut json = serde_json::json!({
            "_class_name": "PixArtTransformer2DModel",
            "_diffusers_version": "0.42.1",
            "activation_fn": "gelu-approximate",
            "attention_bias": self.attention_bias,
            "attention_head_dim": self.attention_head_dim,
            "attention_type": "default",
            "caption_channels": self.caption_channels(),
            "cross_attention_dim": self.cross_attention_dim.unwrap_or(d),
            "dropout": 0.0,
            "in_channels": self.in_channels,
            "interpolation_scale": self.interpolation_scale(),
            "norm_elementwise_affine": false,
            "norm_eps": self.norm_eps,
            "norm_num_groups": 32,
            "norm_type": "ada_norm_single",
            "num_attention_heads": self.num_attention_heads,
            "num_embeds_ada_norm": 1000,
            "num_layers": self.num_layers,
            "out_channels": self.out_channels(),
            "patch_size": self.patch_size,
            "sample_size": self.sample_size,
            "upcast_attention": false,
            "use_additional_conditions": self.additional_conditions(),
        });
        if let Some(kv) = &self.kv_compress_config {
            json["kv_compress_config"] = serde_json::json!(kv);
        }
        json
    }

    /// Refuses configs of other transformer families, and sizes far beyond any
    /// PixArt's (a config is user input: it sizes what a loader or trainer makes).
    pub fn check(&self) -> std::result::Result<(), String> {
        use crate::weights::check_size;
        for (what, value) in [
            ("num_attention_heads", self.num_attention_heads),
            ("attention_head_dim", self.attention_head_dim),
            ("patch_size", self.patch_size),
            ("in_channels", self.in_channels),
        ] {
            if value == 0 {
                return Err(format!("`{what}` must be at least 1"));
            }
        }
        check_size("num_attention_heads", self.num_attention_heads, 1024)?;
        check_size("attention_head_dim", self.attention_head_dim, 1024)?;
        check_size("hidden size (heads × head dim)", self.hidden(), 16384)?;
        check_size("in_channels", self.in_channels, 1024)?;
        check_size("out_channels", self.out_channels(), 1024)?;
        check_size("patch_size", self.patch_size, 64)?;
        check_size("caption_channels", self.caption_channels(), 16384)?;
        check_size(
            "cross_attention_dim",
            self.cross_attention_dim.unwrap_or(0),
            16384,
        )?;
        check_size("num_layers", self.num_layers, 256)?;
        check_size("sample_size", self.sample_size, 1 << 16)?;
        if let Some(kv) = &self.kv_compress_config {
            check_size("kv_compress_config.scale_factor", kv.scale_factor, 8)?;
        }
        if let Some(norm) = &self.norm_type {
            if norm != "ada_norm_single" {
                return Err(format!(
                    "norm_type {norm:?}: not a PixArt transformer (PixArt uses ada_norm_single)"
                ));
            }
        }
        if let Some(class) = &self.class_name {
            if class != "PixArtTransformer2DModel" && class != "Transformer2DModel" {
                return Err(format!("_class_name {class:?} is not a PixArt transformer"));
            }
        }
        if !self.hidden().is_multiple_of(4) {
            return Err("the hidden size must divide by 4 (2-D sin-cos position embedding)".into());
        }
        if self.additional_conditions() && !self.hidden().is_multiple_of(3) {
            return Err(
                "the hidden size must divide by 3 (size and aspect-ratio conditions)".into(),
            );
        }
        if let Some(kv) = &self.kv_compress_config {
            if let Some(s) = kv.sampling.as_deref() {
                if !KV_SAMPLINGS.contains(&s) {
                    return Err(format!(
                        "kv_compress_config.sampling {s:?} is not one of {KV_SAMPLINGS:?}"
                    ));
                }
            }
            if kv.scale_factor == 0 {
                return Err("kv_compress_config.scale_factor must be at least 1".into());
            }
            if let Some(bad) = kv.kv_compress_layer.iter().find(|&&l| l >= self.num_layers) {
                return Err(format!(
                    "kv_compress_config.kv_compress_layer names block {bad}, but there are {} blocks",
                    self.num_layers
                ));
            }
        }
        Ok(())
    }
}

/// PyTorch's `nn.LayerNorm(elementwise_affine=False)`: candle's fused kernel with
/// unit scale and zero shift, built once per model.
struct LayerNorm {
    ones: Tensor,
    zeros: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn new(d: usize, eps: f64, dtype: DType, device: &Device) -> Result<Self> {
        Ok(LayerNorm {
            ones: Tensor::ones(d, dtype, device)?,
            zeros: Tensor::zeros(d, dtype, device)?,
            eps,
        })
    }

    /// `differentiable`: primitive ops with gradients (training), else the fused
    /// kernel, which has none.
    fn forward(&self, x: &Tensor, differentiable: bool) -> Result<Tensor> {
        if differentiable {
            return kernels::layer_norm(x, self.eps);
        }
        candle_nn::ops::layer_norm(&x.contiguous()?, &self.ones, &self.zeros, self.eps as f32)
    }
}

/// `get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)`:
/// `[cos(t·f), sin(t·f)]` with `f_i = 10000^(-i/128)`, in f32.
pub fn timestep_sinusoid(t: &Tensor, channels: usize) -> Result<Tensor> {
    let half = channels / 2;
    let ln = -(10000f64.ln()) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (ln * i as f32 / half as f32).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = t
        .to_dtype(DType::F32)?
        .reshape(((), 1))?
        .broadcast_mul(&freqs)?;
    Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1)
}

/// The 2-D sin-cos position embedding of diffusers' `get_2d_sincos_pos_embed`:
/// `[h·w, dim]`, rows in patch order; the first half encodes the column, the
/// second the row. Grid coordinates in f32, the rest in f64.
pub fn sincos_2d(
    dim: usize,
    grid_h: usize,
    grid_w: usize,
    base_size: f64,
    interpolation_scale: f64,
) -> Vec<f32> {
    let coord =
        |i: usize, n: usize| i as f32 / (n as f64 / base_size) as f32 / interpolation_scale as f32;
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter)
        .map(|i| 1.0 / 10000f64.powf(i as f64 / quarter as f64))
        .collect();
    let mut out = Vec::with_capacity(grid_h * grid_w * dim);
    for row in 0..grid_h {
        for col in 0..grid_w {
            for pos in [coord(col, grid_w) as f64, coord(row, grid_h) as f64] {
                out.extend(omega.iter().map(|w| (pos * w).sin() as f32));
                out.extend(omega.iter().map(|w| (pos * w).cos() as f32));
            }
        }
    }
    out
}

/// Linear → SiLU → Linear, diffusers' `TimestepEmbedding`.
struct Mlp2 {
    linear_1: Linear,
    linear_2: Linear,
}

impl Mlp2 {
    fn new(vb: VarBuilder, d_in: usize, d_out: usize) -> Result<Self> {
        Ok(Mlp2 {
            linear_1: linear(d_in, d_out, vb.pp("linear_1"))?,
            linear_2: linear(d_out, d_out, vb.pp("linear_2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}

/// `adaln_single`: the shared timestep (and micro-condition) embedding and the
/// one linear layer producing all blocks' shift/scale/gate.
struct AdaLnSingle {
    timestep_embedder: Mlp2,
    resolution_embedder: Option<Mlp2>,
    aspect_ratio_embedder: Option<Mlp2>,
    linear: Linear,
}

/// Micro-conditions of the multi-scale model: the (binned) image size in pixels
/// `[batch, 2]` as (height, width), and height/width `[batch, 1]`.
pub struct SizeConditions<'a> {
    pub resolution: &'a Tensor,
    pub aspect_ratio: &'a Tensor,
}

impl AdaLnSingle {
    fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let d = cfg.hidden();
        let emb = vb.pp("emb");
        let (resolution_embedder, aspect_ratio_embedder) = if cfg.additional_conditions() {
            (
                Some(Mlp2::new(
                    emb.pp("resolution_embedder"),
                    TIMESTEP_CHANNELS,
                    d / 3,
                )?),
                Some(Mlp2::new(
                    emb.pp("aspect_ratio_embedder"),
                    TIMESTEP_CHANNELS,
                    d / 3,
                )?),
            )
        } else {
            (None, None)
        };
        Ok(AdaLnSingle {
            timestep_embedder: Mlp2::new(emb.pp("timestep_embedder"), TIMESTEP_CHANNELS, d)?,
            resolution_embedder,
            aspect_ratio_embedder,
            linear: linear(d, 6 * d, vb.pp("linear"))?,
        })
    }

    /// Returns (the 6·D modulation, the embedded timestep).
    fn forward(
        &self,
        t: &Tensor,
        sizes: Option<&SizeConditions>,
        dtype: DType,
    ) -> Result<(Tensor, Tensor)> {
        let batch = t.dim(0)?;
        let mut emb = self
            .timestep_embedder
            .forward(&timestep_sinusoid(t, TIMESTEP_CHANNELS)?.to_dtype(dtype)?)?;
        if let (Some(res_mlp), Some(ar_mlp)) =
            (&self.resolution_embedder, &self.aspect_ratio_embedder)
        {
            let Some(sizes) = sizes else {
                candle_core::bail!(
                    "this transformer needs the resolution and aspect-ratio conditions"
                );
            };
            let res = res_mlp
                .forward(
                    &timestep_sinusoid(&sizes.resolution.flatten_all()?, TIMESTEP_CHANNELS)?
                        .to_dtype(dtype)?,
                )?
                .reshape((batch, ()))?;
            let ar = ar_mlp
                .forward(
                    &timestep_sinusoid(&sizes.aspect_ratio.flatten_all()?, TIMESTEP_CHANNELS)?
                        .to_dtype(dtype)?,
                )?
                .reshape((batch, ()))?;
            emb = (emb + Tensor::cat(&[res, ar], 1)?)?;
        }
        Ok((self.linear.forward(&emb.silu()?)?, emb))
    }
}

/// How a compressing block shrinks its keys and values on the token grid.
enum KvSampling {
    /// `sr`: depthwise convolution, kernel = stride = factor, `[C, 1, f, f]`
    /// (kept as `[1, 1, f, 1, f, C]` to multiply the grid's windows in place),
    /// then `norm`: PyTorch's default `nn.LayerNorm` (affine, eps 1e-5).
    Conv {
        weight: Tensor,
        bias: Tensor,
        norm_weight: Tensor,
        norm_bias: Tensor,
    },
    /// Every factor-th row and column. `exact`: the grid must divide (the
    /// official `uniform` reshapes to the floored size and fails otherwise;
    /// `ave`, a nearest-neighbour resize, floors).
    Nearest { exact: bool },
    /// Every factor-th token of the flattened sequence.
    Every,
}

/// PixArt-Σ's KV compression of one block's self-attention (the official
/// `AttentionKVCompress.downsample_2d`): queries keep every token.
struct KvCompress {
    factor: usize,
    sampling: KvSampling,
}

/// The official `nn.LayerNorm(dim)` in the KV compression keeps PyTorch's default.
const KV_NORM_EPS: f64 = 1e-5;

impl KvCompress {
    fn new(vb: &VarBuilder, sampling: &str, factor: usize, d: usize) -> Result<Self> {
        let sampling = match sampling {
            "conv" => KvSampling::Conv {
                weight: vb
                    .get((d, 1, factor, factor), "sr.weight")?
                    .reshape((d, factor * factor))?
                    .t()?
                    .reshape((1, 1, factor, 1, factor, d))?
                    .contiguous()?,
                bias: vb.get(d, "sr.bias")?,
                norm_weight: vb.get(d, "norm.weight")?,
                norm_bias: vb.get(d, "norm.bias")?,
            },
            "ave" => KvSampling::Nearest { exact: false },
            "uniform" => KvSampling::Nearest { exact: true },
            "uniform_every" => KvSampling::Every,
            other => candle_core::bail!("unknown KV compression sampling {other:?}"),
        };
        Ok(KvCompress { factor, sampling })
    }

    /// `x` `[B, gh·gw, C]` in grid order → the fewer keys or values.
    fn downsample(&self, x: &Tensor, grid: (usize, usize), differentiable: bool) -> Result<Tensor> {
        let f = self.factor;
        let (b, n, c) = x.dims3()?;
        let (gh, gw) = grid;
        if n != gh * gw {
            candle_core::bail!("KV compression: {n} tokens are not a {gh}×{gw} grid");
        }
        if let KvSampling::Every = self.sampling {
            if !n.is_multiple_of(f) {
                candle_core::bail!(
                    "KV compression (uniform_every): {n} tokens do not divide by {f}"
                );
            }
            return x
                .reshape((b, n / f, f, c))?
                .narrow(2, 0, 1)?
                .reshape((b, n / f, c));
        }
        if let KvSampling::Nearest { exact: true } = self.sampling {
            if !gh.is_multiple_of(f) || !gw.is_multiple_of(f) {
                candle_core::bail!(
                    "KV compression (uniform): the {gh}×{gw} token grid does not divide by {f}"
                );
            }
        }
        let (h2, w2) = (gh / f, gw / f);
        if h2 == 0 || w2 == 0 {
            candle_core::bail!("KV compression: the {gh}×{gw} token grid is smaller than {f}×{f}");
        }
        // Whole windows only, as a stride-f convolution or a floor-sized resize sees them.
        let windows = x
            .reshape((b, gh, gw, c))?
            .narrow(1, 0, h2 * f)?
            .narrow(2, 0, w2 * f)?
            .reshape((b, h2, f, w2, f, c))?;
        match &self.sampling {
            KvSampling::Conv {
                weight,
                bias,
                norm_weight,
                norm_bias,
            } => {
                let pooled = windows
                    .broadcast_mul(weight)?
                    .sum(4)?
                    .sum(2)?
                    .reshape((b, h2 * w2, c))?
                    .broadcast_add(bias)?;
                if differentiable {
                    kernels::layer_norm(&pooled, KV_NORM_EPS)?
                        .broadcast_mul(norm_weight)?
                        .broadcast_add(norm_bias)
                } else {
                    candle_nn::ops::layer_norm(&pooled, norm_weight, norm_bias, KV_NORM_EPS as f32)
                }
            }
            _ => windows
                .narrow(2, 0, 1)?
                .narrow(4, 0, 1)?
                .reshape((b, h2 * w2, c)),
        }
    }
}

struct Attention {
    to_q: Proj,
    to_k: Proj,
    to_v: Proj,
    to_out: Proj,
    heads: usize,
    head_dim: usize,
    kv_compress: Option<KvCompress>,
}

impl Attention {
    fn new(
        vb: VarBuilder,
        cfg: &Config,
        kv_dim: usize,
        adapters: Option<&Adapters>,
    ) -> Result<Self> {
        let d = cfg.hidden();
        let bias = cfg.attention_bias;
        Ok(Attention {
            to_q: Proj::new(
                linear_b(d, d, bias, vb.pp("to_q"))?,
                &vb.pp("to_q"),
                adapters,
            ),
            to_k: Proj::new(
                linear_b(kv_dim, d, bias, vb.pp("to_k"))?,
                &vb.pp("to_k"),
                adapters,
            ),
            to_v: Proj::new(
                linear_b(kv_dim, d, bias, vb.pp("to_v"))?,
                &vb.pp("to_v"),
                adapters,
            ),
            to_out: Proj::new(
                linear(d, d, vb.pp("to_out.0"))?,
                &vb.pp("to_out.0"),
                adapters,
            ),
            heads: cfg.num_attention_heads,
            head_dim: cfg.attention_head_dim,
            kv_compress: None,
        })
    }

    fn heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        x.reshape((b, n, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// `bias`: additive `[batch, 1, 1, keys]` (masked cross-attention) or none;
    /// `grid`: the token grid (gh, gw) of `context`, which KV compression needs.
    fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        bias: Option<&Tensor>,
        grid: (usize, usize),
        differentiable: bool,
    ) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let diff = differentiable;
        let (q, mut k, mut v) = (
            self.to_q.forward(x, diff)?,
            self.to_k.forward(context, diff)?,
            self.to_v.forward(context, diff)?,
        );
        if let Some(kv) = &self.kv_compress {
            k = kv.downsample(&k, grid, diff)?;
            v = kv.downsample(&v, grid, diff)?;
        }
        let key_bias = bias.map(|b| b.reshape((b.dim(0)?, ()))).transpose()?;
        let fused = kernels::attention(&q, &k, &v, self.heads, key_bias.as_ref(), diff)?;
        if let Some(out) = fused {
            return self.to_out.forward(&out, diff);
        }
        let (q, k, v) = (self.heads(&q)?, self.heads(&k)?, self.heads(&v)?);
        let out = kernels::attention_composed(&q, &k, &v, bias, differentiable)?
            .transpose(1, 2)?
            .reshape((b, n, d))?;
        self.to_out.forward(&out, diff)
    }
}

struct FeedForward {
    proj: Proj,
    out: Proj,
}

impl FeedForward {
    fn new(vb: VarBuilder, d: usize, adapters: Option<&Adapters>) -> Result<Self> {
        let (proj, out) = (vb.pp("net.0.proj"), vb.pp("net.2"));
        Ok(FeedForward {
            proj: Proj::new(linear(d, 4 * d, proj.clone())?, &proj, adapters),
            out: Proj::new(linear(4 * d, d, out.clone())?, &out, adapters),
        })
    }

    fn forward(&self, x: &Tensor, differentiable: bool) -> Result<Tensor> {
        let h = gelu_for(&self.proj.forward(x, differentiable)?, differentiable)?;
        self.out.forward(&h, differentiable)
    }
}

/// PixArt-α's ControlNet ("ControlNet-Transformer", the official
/// `ControlPixArtHalf`): trainable copies of the first N blocks (13 of 28 in
/// the released models), a `before_proj` that adds the embedded control latent
/// to the first copy's input and an `after_proj` per copy whose output joins the
/// base's hidden state before the next block. Named as diffusers' PixArt port
/// names it (`controlnet_blocks.N.transformer_block.*`, `.before_proj`,
/// `.after_proj`); the official checkpoint converts to that.
pub struct ControlNet {
    copies: Vec<Block>,
    before_proj: Linear,
    after_proj: Vec<Linear>,
}

impl ControlNet {
    pub fn new(vb: VarBuilder, cfg: &Config, copies: usize) -> Result<Self> {
        let d = cfg.hidden();
        if copies == 0 || copies >= cfg.num_layers {
            candle_core::bail!(
                "a ControlNet copies 1 to {} of the transformer's {} blocks, not {copies}",
                cfg.num_layers - 1,
                cfg.num_layers
            );
        }
        let blocks = vb.pp("controlnet_blocks");
        Ok(ControlNet {
            copies: (0..copies)
                .map(|i| Block::new(blocks.pp(i).pp("transformer_block"), cfg, i, None))
                .collect::<Result<_>>()?,
            before_proj: linear(d, d, blocks.pp(0).pp("before_proj"))?,
            after_proj: (0..copies)
                .map(|i| linear(d, d, blocks.pp(i).pp("after_proj")))
                .collect::<Result<_>>()?,
        })
    }

    pub fn copies(&self) -> usize {
        self.copies.len()
    }
}

/// A ControlNet leading a forward: the control image's latent
/// `[1 or batch, C, h, w]` (the latents' size) and how much of it (`scale` 1 is
/// the official model; it multiplies each copy's contribution).
pub struct Control<'a> {
    pub net: &'a ControlNet,
    pub latents: &'a Tensor,
    pub scale: f64,
}

/// A LoRA's low-rank update of one linear layer, added beside it rather than
/// merged in: `y = x·Wᵀ + scale · (x·Aᵀ)·Bᵀ` (A `[r, in]`, B `[out, r]`). What
/// LoRA training runs: no copy of W, and gradients for A and B only.
#[derive(Clone, Debug)]
pub struct LowRank {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
}

/// Low-rank updates by module name (`transformer_blocks.0.attn1.to_q`).
pub type Adapters = std::collections::HashMap<String, LowRank>;

/// The modules a [`LowRank`] can adapt: the blocks' attention and feed-forward
/// projections (by the last part of their names).
pub const ADAPTABLE: [&str; 6] = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
];

/// A block's projection, with its low-rank update if it has one.
struct Proj {
    linear: Linear,
    lora: Option<LowRank>,
}

impl Proj {
    fn new(linear: Linear, vb: &VarBuilder, adapters: Option<&Adapters>) -> Proj {
        let lora = adapters.and_then(|a| a.get(&vb.prefix()).cloned());
        Proj { linear, lora }
    }

    fn forward(&self, x: &Tensor, differentiable: bool) -> Result<Tensor> {
        let y = linear_for(&self.linear, x, differentiable)?;
        match &self.lora {
            None => Ok(y),
            Some(l) => {
                let low = x.broadcast_matmul(&l.a.t()?)?.broadcast_matmul(&l.b.t()?)?;
                y + (low * l.scale)?
            }
        }
    }
}

pub(crate) struct Block {
    scale_shift_table: Tensor,
    attn1: Attention,
    attn2: Attention,
    ff: FeedForward,
    norm: LayerNorm,
}

impl Block {
    pub(crate) fn new(
        vb: VarBuilder,
        cfg: &Config,
        index: usize,
        adapters: Option<&Adapters>,
    ) -> Result<Self> {
        let d = cfg.hidden();
        let mut attn1 = Attention::new(vb.pp("attn1"), cfg, d, adapters)?;
        if let Some((sampling, factor)) = cfg
            .kv_compress_config
            .as_ref()
            .and_then(|kv| kv.for_layer(index))
        {
            attn1.kv_compress = Some(KvCompress::new(&vb.pp("attn1"), sampling, factor, d)?);
        }
        Ok(Block {
            scale_shift_table: vb.get((6, d), "scale_shift_table")?,
            attn1,
            attn2: Attention::new(
                vb.pp("attn2"),
                cfg,
                cfg.cross_attention_dim.unwrap_or(d),
                adapters,
            )?,
            ff: FeedForward::new(vb.pp("ff"), d, adapters)?,
            norm: LayerNorm::new(d, cfg.norm_eps, vb.dtype(), vb.device())?,
        })
    }

    /// `t6`: `[batch, 6·D]` from adaLN-single; `grid`: the token grid (gh, gw).
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        t6: &Tensor,
        text: &Tensor,
        text_bias: Option<&Tensor>,
        grid: (usize, usize),
        differentiable: bool,
    ) -> Result<Tensor> {
        let (b, _, d) = x.dims3()?;
        let mods = self
            .scale_shift_table
            .unsqueeze(0)?
            .broadcast_add(&t6.reshape((b, 6, d))?)?;
        let m = |i: usize| mods.narrow(1, i, 1);
        let (shift_msa, scale_msa, gate_msa) = (m(0)?, m(1)?, m(2)?);
        let (shift_mlp, scale_mlp, gate_mlp) = (m(3)?, m(4)?, m(5)?);

        let diff = differentiable;
        let h = modulate_for(&self.norm.forward(x, diff)?, &shift_msa, &scale_msa, diff)?;
        let attn = self.attn1.forward(&h, &h, None, grid, diff)?;
        let x = gated_add_for(x, &gate_msa, &attn, diff)?;
        let x = (&x + self.attn2.forward(&x, text, text_bias, grid, diff)?)?;
        let h = modulate_for(&self.norm.forward(&x, diff)?, &shift_mlp, &scale_mlp, diff)?;
        let ff = self.ff.forward(&h, diff)?;
        gated_add_for(&x, &gate_mlp, &ff, diff)
    }
}

/// Tanh-GELU: our vectorised kernel for inference, its differentiable twin for training.
fn gelu_for(x: &Tensor, differentiable: bool) -> Result<Tensor> {
    if differentiable {
        kernels::gelu(x)
    } else {
        kernels::gelu_inference(x)
    }
}

/// The training path's fused kernels, or the inference ops.
fn modulate_for(
    x: &Tensor,
    shift: &Tensor,
    scale: &Tensor,
    differentiable: bool,
) -> Result<Tensor> {
    if differentiable {
        kernels::modulate(x, shift, scale)
    } else {
        modulate(x, shift, scale)
    }
}

fn gated_add_for(x: &Tensor, gate: &Tensor, y: &Tensor, differentiable: bool) -> Result<Tensor> {
    if differentiable {
        kernels::gated_add(x, gate, y)
    } else {
        x + gate.broadcast_mul(y)?
    }
}

/// A linear layer: the training path's version has a fast bias gradient.
fn linear_for(layer: &Linear, x: &Tensor, differentiable: bool) -> Result<Tensor> {
    if differentiable {
        kernels::linear(layer, x)
    } else {
        kernels::linear_inference(layer, x)
    }
}

fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)
}

pub struct PixArtTransformer {
    proj: Conv2d,
    adaln_single: AdaLnSingle,
    caption_linear_1: Linear,
    caption_linear_2: Linear,
    blocks: Vec<Block>,
    scale_shift_table: Tensor,
    norm_out: LayerNorm,
    proj_out: Linear,
    cfg: Config,
    dtype: DType,
    device: Device,
    /// Position embeddings per latent grid (h, w), built once per size.
    positions: std::sync::Mutex<std::collections::HashMap<(usize, usize), Tensor>>,
}

impl PixArtTransformer {
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        Self::build(vb, cfg, None)
    }

    /// The transformer with low-rank updates beside some of its blocks'
    /// projections (LoRA training); a name in `adapters` the blocks do not have
    /// is an error.
    pub fn new_adapted(vb: VarBuilder, cfg: &Config, adapters: &Adapters) -> Result<Self> {
        let model = Self::build(vb, cfg, Some(adapters))?;
        let used = model
            .blocks
            .iter()
            .flat_map(|b| {
                [
                    &b.attn1.to_q,
                    &b.attn1.to_k,
                    &b.attn1.to_v,
                    &b.attn1.to_out,
                    &b.attn2.to_q,
                    &b.attn2.to_k,
                    &b.attn2.to_v,
                    &b.attn2.to_out,
                    &b.ff.proj,
                    &b.ff.out,
                ]
            })
            .filter(|p| p.lora.is_some())
            .count();
        if used != adapters.len() {
            candle_core::bail!(
                "{} of the {} low-rank updates name no projection of the blocks",
                adapters.len() - used,
                adapters.len()
            );
        }
        Ok(model)
    }

    fn build(vb: VarBuilder, cfg: &Config, adapters: Option<&Adapters>) -> Result<Self> {
        cfg.check().map_err(candle_core::Error::msg)?;
        let d = cfg.hidden();
        let p = cfg.patch_size;
        let conv_cfg = Conv2dConfig {
            stride: p,
            ..Default::default()
        };
        let caption = vb.pp("caption_projection");
        let caption_channels = cfg.caption_channels();
        Ok(PixArtTransformer {
            proj: conv2d(cfg.in_channels, d, p, conv_cfg, vb.pp("pos_embed.proj"))?,
            adaln_single: AdaLnSingle::new(vb.pp("adaln_single"), cfg)?,
            caption_linear_1: linear(caption_channels, d, caption.pp("linear_1"))?,
            caption_linear_2: linear(d, d, caption.pp("linear_2"))?,
            blocks: (0..cfg.num_layers)
                .map(|i| Block::new(vb.pp(format!("transformer_blocks.{i}")), cfg, i, adapters))
                .collect::<Result<_>>()?,
            scale_shift_table: vb.get((2, d), "scale_shift_table")?,
            norm_out: LayerNorm::new(d, cfg.norm_eps, vb.dtype(), vb.device())?,
            proj_out: linear(d, p * p * cfg.out_channels(), vb.pp("proj_out"))?,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
            positions: Default::default(),
        })
    }

    fn position_embedding(&self, gh: usize, gw: usize) -> Result<Tensor> {
        let mut cache = self.positions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = cache.get(&(gh, gw)) {
            return Ok(t.clone());
        }
        let d = self.cfg.hidden();
        let base = (self.cfg.sample_size / self.cfg.patch_size) as f64;
        let pos = sincos_2d(d, gh, gw, base, self.cfg.interpolation_scale());
        let pos = Tensor::from_vec(pos, (1, gh * gw, d), &self.device)?.to_dtype(self.dtype)?;
        cache.insert((gh, gw), pos.clone());
        Ok(pos)
    }

    /// The latents `[B, C, H, W]` as patch tokens `[B, H/p · W/p, D]`: the
    /// patch embedding, a convolution with stride = kernel = p.
    fn patch_tokens(&self, x: &Tensor) -> Result<Tensor> {
        if !(x.dtype() == DType::BF16 && x.device().is_cpu()) {
            return self.proj.forward(x)?.flatten_from(2)?.transpose(1, 2);
        }
        // candle's CPU convolution has no bf16 kernel, while its matmul has one:
        // the same convolution as patches times the flattened kernel.
        let (b, c, h, w) = x.dims4()?;
        let p = self.cfg.patch_size;
        let (gh, gw) = (h / p, w / p);
        let patches = x
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b, gh * gw, c * p * p))?;
        let weight = self.proj.weight();
        let kernel = weight.reshape((weight.dim(0)?, c * p * p))?;
        let tokens = patches.broadcast_matmul(&kernel.t()?)?;
        match self.proj.bias() {
            Some(bias) => tokens.broadcast_add(bias),
            None => Ok(tokens),
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `x` latents `[B, C, H, W]`, `t` timesteps `[B]`, `text` T5 features
    /// `[B, L, caption_channels]`, `text_mask` `[B, L]` (1 keep, 0 pad) →
    /// `[B, out_channels, H, W]`. Inference kernels (fused, no gradients).
    pub fn forward(
        &self,
        x: &Tensor,
        t: &Tensor,
        text: &Tensor,
        text_mask: Option<&Tensor>,
        sizes: Option<&SizeConditions>,
    ) -> Result<Tensor> {
        self.forward_split(x, t, text, text_mask, sizes, None)
    }

    /// [`forward`](Self::forward) with a ControlNet: its copies beside the
    /// first blocks, led by the control image's latent (batch 1, shared by the
    /// whole batch as the official sampler shares it between the CFG halves,
    /// or one per sample).
    pub fn forward_controlled(
        &self,
        x: &Tensor,
        t: &Tensor,
        text: &Tensor,
        text_mask: Option<&Tensor>,
        sizes: Option<&SizeConditions>,
        control: &Control,
    ) -> Result<Tensor> {
        self.forward_split(x, t, text, text_mask, sizes, Some(control))
    }

    fn forward_split(
        &self,
        x: &Tensor,
        t: &Tensor,
        text: &Tensor,
        text_mask: Option<&Tensor>,
        sizes: Option<&SizeConditions>,
        control: Option<&Control>,
    ) -> Result<Tensor> {
        let b = x.dim(0)?;
        if !batch_parallel(x, b) {
            return self.forward_with(x, t, text, text_mask, sizes, false, control);
        }
        // Samples are independent: two halves on two threads, each running its
        // element-wise work inline, scale better on few cores than splitting
        // every op (see BENCHMARKS.md).
        let half = b / 2;
        let part = |start: usize, len: usize| -> Result<Tensor> {
            let cut = |x: &Tensor| x.narrow(0, start, len);
            let mask = text_mask.map(cut).transpose()?;
            let (res, ar) = match sizes {
                Some(s) => (Some(cut(s.resolution)?), Some(cut(s.aspect_ratio)?)),
                None => (None, None),
            };
            let sizes = match (&res, &ar) {
                (Some(resolution), Some(aspect_ratio)) => Some(SizeConditions {
                    resolution,
                    aspect_ratio,
                }),
                _ => None,
            };
            let latents = match control {
                Some(ctl) if ctl.latents.dim(0)? == b => Some(cut(ctl.latents)?),
                Some(ctl) => Some(ctl.latents.clone()),
                None => None,
            };
            let control = control.zip(latents.as_ref()).map(|(ctl, latents)| Control {
                net: ctl.net,
                latents,
                scale: ctl.scale,
            });
            self.forward_with(
                &cut(x)?,
                &cut(t)?,
                &cut(text)?,
                mask.as_ref(),
                sizes.as_ref(),
                false,
                control.as_ref(),
            )
        };
        let (a, b2) = rayon::join(|| part(0, half), || part(half, b - half));
        Tensor::cat(&[a?, b2?], 0)
    }

    /// The same forward built only from ops with gradients, for training: candle's
    /// fused layer norm, softmax and our GELU kernel would silently stop them.
    pub fn forward_train(
        &self,
        x: &Tensor,
        t: &Tensor,
        text: &Tensor,
        text_mask: Option<&Tensor>,
        sizes: Option<&SizeConditions>,
    ) -> Result<Tensor> {
        self.forward_with(x, t, text, text_mask, sizes, true, None)
    }

    /// [`forward_train`](Self::forward_train) led by a ControlNet: what
    /// ControlNet training differentiates (the control latent one per sample).
    pub fn forward_train_controlled(
        &self,
        x: &Tensor,
        t: &Tensor,
        text: &Tensor,
        text_mask: Option<&Tensor>,
        sizes: Option<&SizeConditions>,
        control: &Control,
    ) -> Result<Tensor> {
        self.forward_with(x, t, text, text_mask, sizes, true, Some(control))
    }

    // The forward's own inputs, and how to run it: splitting them into a struct
    // would only rename them.
    #[allow(clippy::too_many_arguments)]
    fn forward_with(
        &self,
        x: &Tensor,
        t: &Tensor,
        text: &Tensor,
        text_mask: Option<&Tensor>,
        sizes: Option<&SizeConditions>,
        differentiable: bool,
        control: Option<&Control>,
    ) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let p = self.cfg.patch_size;
        let (gh, gw) = (h / p, w / p);
        let x = x.to_dtype(self.dtype)?;

        let tokens = self.patch_tokens(&x)?; // [B, gh·gw, D]
        let mut x = tokens.broadcast_add(&self.position_embedding(gh, gw)?)?;

        let (t6, embedded_t) = self.adaln_single.forward(t, sizes, self.dtype)?;
        let text = self.embed_caption(text, differentiable)?;
        let text_bias = self.attention_bias(text_mask)?;
        // A ControlNet's copies run beside blocks 1..=N, each on the previous
        // one's output (the first on the hidden state plus the embedded control
        // latent), and add their projected output to that block's input.
        let mut c = match control {
            Some(ctl) => {
                let (cb, _, ch, cw) = ctl.latents.dims4()?;
                if (ch, cw) != (h, w) || (cb != 1 && cb != b) {
                    candle_core::bail!(
                        "the control latent is {:?}; the latents are [{b}, _, {h}, {w}] (one \
                         control, or one per sample, of the latents' size)",
                        ctl.latents.dims()
                    );
                }
                let c = self.patch_tokens(&ctl.latents.to_dtype(self.dtype)?)?;
                Some(c.broadcast_add(&self.position_embedding(gh, gw)?)?)
            }
            None => None,
        };
        for (i, block) in self.blocks.iter().enumerate() {
            if let (Some(ctl), Some(state)) = (control, c.as_ref()) {
                if i >= 1 && i <= ctl.net.copies.len() {
                    let input = if i == 1 {
                        x.broadcast_add(&linear_for(&ctl.net.before_proj, state, differentiable)?)?
                    } else {
                        state.clone()
                    };
                    let out = ctl.net.copies[i - 1].forward(
                        &input,
                        &t6,
                        &text,
                        text_bias.as_ref(),
                        (gh, gw),
                        differentiable,
                    )?;
                    let skip = linear_for(&ctl.net.after_proj[i - 1], &out, differentiable)?;
                    x = (x + (skip * ctl.scale)?)?;
                    c = Some(out);
                }
            }
            x = block.forward(&x, &t6, &text, text_bias.as_ref(), (gh, gw), differentiable)?;
        }
        self.head(&x, &embedded_t, (b, gh, gw), differentiable)
    }

    /// The T5 features through the caption projection.
    fn embed_caption(&self, text: &Tensor, differentiable: bool) -> Result<Tensor> {
        let text = text.to_dtype(self.dtype)?;
        self.caption_linear_2.forward(&gelu_for(
            &self.caption_linear_1.forward(&text)?,
            differentiable,
        )?)
    }

    /// The cross-attention's additive mask `[B, 1, 1, L]` (−10000 on padding).
    fn attention_bias(&self, text_mask: Option<&Tensor>) -> Result<Option<Tensor>> {
        text_mask
            .map(|m| {
                ((1.0 - m.to_dtype(DType::F32)?)? * -10000.0)?
                    .to_dtype(self.dtype)?
                    .unsqueeze(1)?
                    .unsqueeze(1)
            })
            .transpose()
    }

    /// After the blocks: the final norm modulated by the timestep, `proj_out`,
    /// and the tokens back into a `[B, out_channels, H, W]` image.
    fn head(
        &self,
        x: &Tensor,
        embedded_t: &Tensor,
        (b, gh, gw): (usize, usize, usize),
        differentiable: bool,
    ) -> Result<Tensor> {
        let p = self.cfg.patch_size;
        let mods = self
            .scale_shift_table
            .unsqueeze(0)?
            .broadcast_add(&embedded_t.unsqueeze(1)?)?;
        let (shift, scale) = (mods.narrow(1, 0, 1)?, mods.narrow(1, 1, 1)?);
        let x = modulate_for(
            &self.norm_out.forward(x, differentiable)?,
            &shift,
            &scale,
            differentiable,
        )?;
        let x = linear_for(&self.proj_out, &x, differentiable)?; // [B, gh·gw, p·p·C]
        let c = self.cfg.out_channels();
        x.reshape((b, gh, gw, p, p, c))?
            .permute((0, 5, 1, 3, 2, 4))?
            .reshape((b, c, gh * p, gw * p))
    }

    /// A training forward and backward with activation checkpointing (the
    /// official configs' `gradient_checkpointing`): the blocks keep only their
    /// inputs on the way forward, and each block is run again on the way back,
    /// so a step holds one block's activations instead of all of them. Equal to
    /// [`forward_train`](Self::forward_train) then a backward, up to rounding.
    ///
    /// `loss_of` turns the model's output into the scalar to differentiate (and
    /// anything else the caller wants back); the gradients of that scalar with
    /// respect to `vars` are returned with it.
    #[allow(clippy::too_many_arguments)]
    pub fn checkpointed_backward<T>(
        &self,
        x: &Tensor,
        t: &Tensor,
        text: &Tensor,
        text_mask: Option<&Tensor>,
        sizes: Option<&SizeConditions>,
        vars: &[Var],
        loss_of: impl FnOnce(&Tensor) -> Result<(Tensor, T)>,
    ) -> Result<(Tensor, T, GradStore)> {
        let (b, _, h, w) = x.dims4()?;
        let p = self.cfg.patch_size;
        let grid = (h / p, w / p);
        let x = x.to_dtype(self.dtype)?;
        // The embeddings keep their graph for the last backward; the blocks
        // and the head see them as leaves.
        let tokens = self.patch_tokens(&x)?;
        let x0 = tokens.broadcast_add(&self.position_embedding(grid.0, grid.1)?)?;
        let (t6, embedded_t) = self.adaln_single.forward(t, sizes, self.dtype)?;
        let text = self.embed_caption(text, true)?;
        let text_bias = self.attention_bias(text_mask)?;
        let t6_leaf = Var::from_tensor(&t6.detach())?;
        let text_leaf = Var::from_tensor(&text.detach())?;
        let embedded_leaf = Var::from_tensor(&embedded_t.detach())?;
        let block = |i: usize, input: &Tensor| {
            self.blocks[i].forward(
                input,
                t6_leaf.as_tensor(),
                text_leaf.as_tensor(),
                text_bias.as_ref(),
                grid,
                true,
            )
        };

        // Forward: each block's input is kept, its activations are not.
        let mut inputs = Vec::with_capacity(self.blocks.len());
        let mut hidden = x0.detach();
        for i in 0..self.blocks.len() {
            let out = block(i, &hidden)?.detach();
            inputs.push(std::mem::replace(&mut hidden, out));
        }

        // The head and the loss, then each block again, last to first.
        let last = Var::from_tensor(&hidden)?;
        let out = self.head(
            last.as_tensor(),
            embedded_leaf.as_tensor(),
            (b, grid.0, grid.1),
            true,
        )?;
        let (loss, extra) = loss_of(&out)?;
        let mut grads = loss.backward()?;
        let mut upstream = grads
            .remove(last.as_tensor())
            .ok_or_else(|| candle_core::Error::msg("the loss does not depend on the blocks"))?;
        let mut leaf_grads: [Option<Tensor>; 3] =
            [grads.remove(embedded_leaf.as_tensor()), None, None];
        while let Some(input) = inputs.pop() {
            let i = inputs.len();
            let input = Var::from_tensor(&input)?;
            let surrogate = (block(i, input.as_tensor())? * &upstream)?.sum_all()?;
            let mut block_grads = surrogate.backward()?;
            upstream = match block_grads.remove(input.as_tensor()) {
                Some(g) => g,
                None => upstream.zeros_like()?,
            };
            for (slot, leaf) in [(1, &t6_leaf), (2, &text_leaf)] {
                if let Some(g) = block_grads.remove(leaf.as_tensor()) {
                    leaf_grads[slot] = Some(match leaf_grads[slot].take() {
                        Some(sum) => (sum + g)?,
                        None => g,
                    });
                }
            }
            add_grads(&mut grads, &block_grads, vars)?;
        }

        // The embeddings, through what their outputs are owed.
        let mut surrogate = (x0 * upstream)?.sum_all()?;
        for (owed, value) in leaf_grads.into_iter().zip([&embedded_t, &t6, &text]) {
            if let Some(g) = owed {
                surrogate = (surrogate + (value * g)?.sum_all()?)?;
            }
        }
        add_grads(&mut grads, &surrogate.backward()?, vars)?;
        Ok((loss.detach(), extra, grads))
    }
}

/// Adds `from`'s gradients of `vars` into `into`.
fn add_grads(into: &mut GradStore, from: &GradStore, vars: &[Var]) -> Result<()> {
    for v in vars {
        let t = v.as_tensor();
        if let Some(g) = from.get(t) {
            let sum = match into.get(t) {
                Some(have) => (have + g)?,
                None => g.clone(),
            };
            into.insert(t, sum);
        }
    }
    Ok(())
}

/// Whether to split a batch over two threads: CPU, at least two samples and two
/// threads, and not already inside a parallel section.
pub fn batch_parallel(x: &Tensor, batch: usize) -> bool {
    x.device().is_cpu()
        && batch >= 2
        && rayon::current_num_threads() >= 2
        && rayon::current_thread_index().is_none()
}

/// Renames an official PixArt-α state dict (`x_embedder`, `t_block`, fused
/// `attn.qkv` / `cross_attn.kv_linear`, …) to diffusers' names in place. Returns the
/// learned null caption `y_embedder.y_embedding` when present. The stored
/// `pos_embed` is dropped: it is recomputed for every grid.
pub fn convert_official(w: &mut Weights) -> std::result::Result<Option<Tensor>, LoadError> {
    let location = w.location();
    let err = |m: String| LoadError::Model {
        what: "official PixArt checkpoint".into(),
        location: location.clone(),
        message: m,
    };
    let renames = [
        ("x_embedder.proj", "pos_embed.proj"),
        (
            "t_embedder.mlp.0",
            "adaln_single.emb.timestep_embedder.linear_1",
        ),
        (
            "t_embedder.mlp.2",
            "adaln_single.emb.timestep_embedder.linear_2",
        ),
        ("t_block.1", "adaln_single.linear"),
        (
            "csize_embedder.mlp.0",
            "adaln_single.emb.resolution_embedder.linear_1",
        ),
        (
            "csize_embedder.mlp.2",
            "adaln_single.emb.resolution_embedder.linear_2",
        ),
        (
            "ar_embedder.mlp.0",
            "adaln_single.emb.aspect_ratio_embedder.linear_1",
        ),
        (
            "ar_embedder.mlp.2",
            "adaln_single.emb.aspect_ratio_embedder.linear_2",
        ),
        ("y_embedder.y_proj.fc1", "caption_projection.linear_1"),
        ("y_embedder.y_proj.fc2", "caption_projection.linear_2"),
        ("final_layer.linear", "proj_out"),
    ];
    let names: Vec<String> = w.names().map(str::to_string).collect();
    if !names.iter().any(|n| n.starts_with("x_embedder.")) {
        return Err(err(
            "no `x_embedder.proj.weight`: not an official PixArt-α checkpoint".into(),
        ));
    }
    let null_caption = w.remove("y_embedder.y_embedding");
    w.remove("pos_embed");
    for name in names {
        let Some(t) = w.remove(&name) else { continue };
        if let Some((from, to)) = renames
            .iter()
            .find(|(from, _)| name.starts_with(&format!("{from}.")))
        {
            w.insert(format!("{to}{}", &name[from.len()..]), t);
            continue;
        }
        if name == "final_layer.scale_shift_table" {
            w.insert("scale_shift_table", t);
            continue;
        }
        let Some(rest) = name.strip_prefix("blocks.") else {
            w.insert(name, t); // unknown: left for the loader to ignore or report
            continue;
        };
        let (i, field) = rest
            .split_once('.')
            .ok_or_else(|| err(format!("unexpected tensor {name}")))?;
        convert_official_block(w, &format!("transformer_blocks.{i}"), field, &name, t)
            .map_err(err)?;
    }
    Ok(null_caption)
}

/// A ControlNet's weights under diffusers' PixArt port names, and how many
/// blocks it copies: a port folder (`config.json` with `num_layers`,
/// `diffusion_pytorch_model.safetensors`), a `.safetensors` file of those names,
/// or the official checkpoint (`torch.save({"state_dict": ...})` of
/// `ControlPixArtHalf`: the base under `base_model.*`, which is left out: the
/// transformer it adapts is loaded on its own).
pub fn read_controlnet(
    path: &Path,
    dtype: DType,
    device: &Device,
) -> std::result::Result<(HashMap<String, Tensor>, usize), LoadError> {
    let official = path.extension().is_some_and(|e| e == "pth" || e == "pt");
    let mut w = if path.is_dir() {
        Weights::from_folder(path, &["diffusion_pytorch_model"], dtype, device)?
    } else if official {
        Weights::from_pth(path, Some("state_dict"), dtype, device)?
    } else {
        Weights::from_safetensors(&[path.to_path_buf()], dtype, device)?
    };
    if official {
        let names: Vec<String> = w.names().map(str::to_string).collect();
        for name in names {
            let Some(t) = w.remove(&name) else { continue };
            if name.starts_with("base_model.") {
                continue;
            }
            let parsed = name
                .strip_prefix("controlnet.")
                .and_then(|rest| rest.split_once('.'));
            let Some((i, field)) = parsed else {
                return Err(LoadError::file(
                    path,
                    format!("`{name}` is not part of an official PixArt ControlNet"),
                ));
            };
            let block = format!("controlnet_blocks.{i}");
            match field.strip_prefix("copied_block.") {
                Some(inner) => convert_official_block(
                    &mut w,
                    &format!("{block}.transformer_block"),
                    inner,
                    &name,
                    t,
                )
                .map_err(|e| LoadError::file(path, e))?,
                None => w.insert(format!("{block}.{field}"), t),
            }
        }
    }
    let copies = w
        .names()
        .filter_map(|n| {
            n.strip_prefix("controlnet_blocks.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |i| i + 1);
    if copies == 0 {
        return Err(LoadError::file(
            path,
            "holds no ControlNet blocks (controlnet_blocks.N.* or controlnet.N.*)",
        ));
    }
    let tensors = w
        .names()
        .filter_map(|n| Some((n.to_string(), w.get(n)?.clone())))
        .collect();
    Ok((tensors, copies))
}

/// One tensor of an official block (`field`: its name below `blocks.N.`, e.g.
/// `attn.qkv.weight`, fused projections split) under diffusers' names below
/// `block` (`transformer_blocks.N`; a ControlNet's copies go elsewhere).
pub fn convert_official_block(
    w: &mut Weights,
    block: &str,
    field: &str,
    name: &str,
    t: Tensor,
) -> std::result::Result<(), String> {
    let split = |t: &Tensor, parts: usize| -> std::result::Result<Vec<Tensor>, String> {
        t.chunk(parts, 0)
            .map_err(|e| format!("{name}: {e}"))
            .and_then(|c| {
                if c.len() == parts {
                    Ok(c)
                } else {
                    Err(format!("{name}: cannot split into {parts}"))
                }
            })
    };
    let kind = field.rsplit('.').next().unwrap_or(""); // weight | bias
    match field {
        "scale_shift_table" => w.insert(format!("{block}.scale_shift_table"), t),
        f if f.starts_with("attn.qkv.") => {
            for (part, x) in ["to_q", "to_k", "to_v"].iter().zip(split(&t, 3)?) {
                w.insert(
                    format!("{block}.attn1.{part}.{kind}"),
                    x.contiguous().map_err(|e| e.to_string())?,
                );
            }
        }
        f if f.starts_with("attn.proj.") => w.insert(format!("{block}.attn1.to_out.0.{kind}"), t),
        // PixArt-Σ's KV compression keeps its official module names.
        f if f.starts_with("attn.sr.") || f.starts_with("attn.norm.") => {
            w.insert(format!("{block}.attn1.{}", &f["attn.".len()..]), t)
        }
        f if f.starts_with("attn.q_norm.") || f.starts_with("attn.k_norm.") => {
            return Err(format!(
                "{name}: query/key normalisation (qk_norm) is not supported; no released \
                     PixArt model uses it"
            ));
        }
        f if f.starts_with("cross_attn.q_linear.") => {
            w.insert(format!("{block}.attn2.to_q.{kind}"), t)
        }
        f if f.starts_with("cross_attn.kv_linear.") => {
            for (part, x) in ["to_k", "to_v"].iter().zip(split(&t, 2)?) {
                w.insert(
                    format!("{block}.attn2.{part}.{kind}"),
                    x.contiguous().map_err(|e| e.to_string())?,
                );
            }
        }
        f if f.starts_with("cross_attn.proj.") => {
            w.insert(format!("{block}.attn2.to_out.0.{kind}"), t)
        }
        f if f.starts_with("mlp.fc1.") => w.insert(format!("{block}.ff.net.0.proj.{kind}"), t),
        f if f.starts_with("mlp.fc2.") => w.insert(format!("{block}.ff.net.2.{kind}"), t),
        _ => w.insert(name.to_string(), t),
    }
    Ok(())
}

/// The KV compression a checkpoint's weights imply: blocks with the `conv`
/// sampling's `attn1.sr` convolution, its kernel size the factor. (The other
/// samplings have no weights: only a config can name them.)
pub fn infer_kv_compress(w: &Weights) -> Option<KvCompressConfig> {
    let mut layers = Vec::new();
    let mut factor = None;
    for i in (0..).take_while(|i| w.contains(&format!("transformer_blocks.{i}.scale_shift_table")))
    {
        if let Some(t) = w.get(&format!("transformer_blocks.{i}.attn1.sr.weight")) {
            layers.push(i);
            factor = t.dims().last().copied();
        }
    }
    Some(KvCompressConfig {
        sampling: Some("conv".into()),
        scale_factor: factor?,
        kv_compress_layer: layers,
    })
}

/// A transformer config for an official checkpoint without `config.json`, read off
/// the tensor shapes. Official models use 72-dimensional heads (XL/2: 1152 = 16 × 72).
pub fn infer_official_config(
    w: &Weights,
    pos_embed_tokens: Option<usize>,
) -> std::result::Result<Config, String> {
    let shape = |n: &str| {
        w.get(n)
            .map(|t| t.dims().to_vec())
            .ok_or_else(|| format!("missing tensor {n}"))
    };
    let proj = shape("pos_embed.proj.weight")?; // [D, C, p, p]
    let (d, c_in, p) = (proj[0], proj[1], proj[2]);
    if d % 72 != 0 {
        return Err(format!(
            "hidden size {d} is not a multiple of 72, so the head count cannot be inferred: put the \
             transformer's config.json next to the checkpoint"
        ));
    }
    let out = shape("proj_out.weight")?[0] / (p * p);
    let layers = (0..)
        .take_while(|i| w.contains(&format!("transformer_blocks.{i}.scale_shift_table")))
        .count();
    let caption = shape("caption_projection.linear_1.weight")?[1];
    let tokens = pos_embed_tokens
        .ok_or("the checkpoint has no pos_embed to tell its sample size; add a config.json")?;
    let side = (tokens as f64).sqrt() as usize;
    Ok(Config {
        class_name: None,
        num_attention_heads: d / 72,
        attention_head_dim: 72,
        in_channels: c_in,
        out_channels: Some(out),
        num_layers: layers,
        sample_size: side * p,
        patch_size: p,
        caption_channels: Some(caption),
        cross_attention_dim: Some(d),
        norm_eps: 1e-6,
        attention_bias: true,
        interpolation_scale: None,
        use_additional_conditions: Some(
            w.contains("adaln_single.emb.resolution_embedder.linear_1.weight"),
        ),
        norm_type: Some("ada_norm_single".into()),
        kv_compress_config: infer_kv_compress(w),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sincos_first_half_encodes_columns() {
        // 2×3 grid, dim 8: row-major tokens; token (row 1, col 2).
        let e = sincos_2d(8, 2, 3, 2.0, 1.0);
        let token = &e[(3 + 2) * 8..(3 + 2) * 8 + 8];
        let col = 2.0f64 / (3.0 / 2.0);
        let row = 1.0f64 / (2.0 / 2.0);
        let want = [
            col.sin(),
            (col / 100.0).sin(),
            col.cos(),
            (col / 100.0).cos(),
            row.sin(),
            (row / 100.0).sin(),
            row.cos(),
            (row / 100.0).cos(),
        ];
        for (g, w) in token.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-6, "{token:?} vs {want:?}");
        }
    }
}

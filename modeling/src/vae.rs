//! diffusers' `AutoencoderKL` (the Stable Diffusion VAE PixArt-α uses): encoder to a
//! diagonal Gaussian posterior, decoder back to pixels. Latents are scaled by
//! `scaling_factor` (0.18215) outside, in the nodes.

use crate::kernels::{self, conv2d as conv};
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{conv2d, linear, Conv2d, Conv2dConfig, Linear, VarBuilder};
use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
}

fn one() -> usize {
    1
}
fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn thirty_two() -> usize {
    32
}
fn default_scaling() -> f64 {
    0.18215
}
fn yes() -> bool {
    true
}

impl Config {
    /// Pixels per latent along each side.
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len().saturating_sub(1))
    }

    pub fn check(&self) -> std::result::Result<(), String> {
        if let Some(class) = &self.class_name {
            if class != "AutoencoderKL" {
                return Err(format!("_class_name {class:?} is not an AutoencoderKL"));
            }
        }
        if self.block_out_channels.is_empty() {
            return Err("block_out_channels is empty".into());
        }
        // A config is user input: sizes far beyond any VAE's are refused before
        // anything is sized by them.
        use crate::weights::check_size;
        check_size(
            "block_out_channels (levels)",
            self.block_out_channels.len(),
            16,
        )?;
        for &c in &self.block_out_channels {
            check_size("block_out_channels", c, 16384)?;
        }
        check_size("layers_per_block", self.layers_per_block, 64)?;
        check_size("in_channels", self.in_channels, 1024)?;
        check_size("out_channels", self.out_channels, 1024)?;
        check_size("latent_channels", self.latent_channels, 1024)?;
        check_size("norm_num_groups", self.norm_num_groups, 1024)?;
        if self.norm_num_groups == 0 {
            return Err("norm_num_groups must be at least 1".into());
        }
        if let Some(bad) = self
            .block_out_channels
            .iter()
            .find(|c| *c % self.norm_num_groups != 0)
        {
            return Err(format!(
                "{bad} channels do not divide into {} groups",
                self.norm_num_groups
            ));
        }
        Ok(())
    }
}

const EPS: f64 = 1e-6;

fn conv3(vb: VarBuilder, c_in: usize, c_out: usize) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    conv2d(c_in, c_out, 3, cfg, vb)
}

/// diffusers' `GroupNorm` (affine), optionally followed by SiLU: one fused pass
/// on the CPU (`kernels::group_norm`).
struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
}

fn group_norm(groups: usize, channels: usize, vb: VarBuilder) -> Result<GroupNorm> {
    Ok(GroupNorm {
        weight: vb.get(channels, "weight")?,
        bias: vb.get(channels, "bias")?,
        groups,
    })
}

impl GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        kernels::group_norm(x, &self.weight, &self.bias, self.groups, EPS, false)
    }

    fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        kernels::group_norm(x, &self.weight, &self.bias, self.groups, EPS, true)
    }
}

struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn new(vb: VarBuilder, c_in: usize, c_out: usize, groups: usize) -> Result<Self> {
        let conv_shortcut = if c_in != c_out {
            Some(conv2d(
                c_in,
                c_out,
                1,
                Default::default(),
                vb.pp("conv_shortcut"),
            )?)
        } else {
            None
        };
        Ok(ResnetBlock {
            norm1: group_norm(groups, c_in, vb.pp("norm1"))?,
            conv1: conv3(vb.pp("conv1"), c_in, c_out)?,
            norm2: group_norm(groups, c_out, vb.pp("norm2"))?,
            conv2: conv3(vb.pp("conv2"), c_out, c_out)?,
            conv_shortcut,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = conv(&self.conv1, &self.norm1.forward_silu(x)?)?;
        let h = conv(&self.conv2, &self.norm2.forward_silu(&h)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => conv(c, x)?,
            None => x.clone(),
        };
        shortcut + h
    }
}

/// Single-head self-attention over the pixels of the middle block.
struct AttentionBlock {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl AttentionBlock {
    fn new(vb: VarBuilder, c: usize, groups: usize) -> Result<Self> {
        // Old checkpoints name the projections query/key/value/proj_attn.
        let names = if vb.contains_tensor("query.weight") {
            ["query", "key", "value", "proj_attn"]
        } else {
            ["to_q", "to_k", "to_v", "to_out.0"]
        };
        Ok(AttentionBlock {
            group_norm: group_norm(groups, c, vb.pp("group_norm"))?,
            to_q: linear(c, c, vb.pp(names[0]))?,
            to_k: linear(c, c, vb.pp(names[1]))?,
            to_v: linear(c, c, vb.pp(names[2]))?,
            to_out: linear(c, c, vb.pp(names[3]))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let n = self
            .group_norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?;
        let q = self.to_q.forward(&n)?;
        let k = self.to_k.forward(&n)?;
        let v = self.to_v.forward(&n)?;
        // diffusers upcasts the softmax of the VAE's attention: f32 throughout
        // here. One head of all `c` channels; tiled over query rows, so a 1024 px
        // image's 16,384 tokens never make a 16,384² score matrix.
        let dtype = q.dtype();
        let (q, k, v) = (
            q.to_dtype(DType::F32)?,
            k.to_dtype(DType::F32)?,
            v.to_dtype(DType::F32)?,
        );
        let attended = match kernels::attention(&q, &k, &v, 1, None, false)? {
            Some(out) => out,
            None => kernels::attention_composed(
                &q.unsqueeze(1)?,
                &k.unsqueeze(1)?,
                &v.unsqueeze(1)?,
                None,
                false,
            )?
            .squeeze(1)?,
        };
        let out = self.to_out.forward(&attended.to_dtype(dtype)?)?;
        x + out.transpose(1, 2)?.reshape((b, c, h, w))?
    }
}

struct MidBlock {
    resnet_0: ResnetBlock,
    attention: Option<AttentionBlock>,
    resnet_1: ResnetBlock,
}

impl MidBlock {
    fn new(vb: VarBuilder, c: usize, cfg: &Config) -> Result<Self> {
        let g = cfg.norm_num_groups;
        Ok(MidBlock {
            resnet_0: ResnetBlock::new(vb.pp("resnets.0"), c, c, g)?,
            attention: if cfg.mid_block_add_attention {
                Some(AttentionBlock::new(vb.pp("attentions.0"), c, g)?)
            } else {
                None
            },
            resnet_1: ResnetBlock::new(vb.pp("resnets.1"), c, c, g)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.resnet_0.forward(x)?;
        if let Some(a) = &self.attention {
            x = a.forward(&x)?;
        }
        self.resnet_1.forward(&x)
    }
}

struct DownBlock {
    resnets: Vec<ResnetBlock>,
    downsample: Option<Conv2d>,
}

struct UpBlock {
    resnets: Vec<ResnetBlock>,
    upsample: Option<Conv2d>,
}

struct Encoder {
    conv_in: Conv2d,
    down: Vec<DownBlock>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let mut down = Vec::new();
        let mut c_in = ch[0];
        for (i, &c_out) in ch.iter().enumerate() {
            let vb = vb.pp(format!("down_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    ResnetBlock::new(
                        vb.pp(format!("resnets.{j}")),
                        if j == 0 { c_in } else { c_out },
                        c_out,
                        g,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let downsample = if i + 1 < ch.len() {
                let cfg = Conv2dConfig {
                    stride: 2,
                    ..Default::default()
                };
                Some(conv2d(c_out, c_out, 3, cfg, vb.pp("downsamplers.0.conv"))?)
            } else {
                None
            };
            down.push(DownBlock {
                resnets,
                downsample,
            });
            c_in = c_out;
        }
        let last = *ch.last().unwrap_or(&ch[0]);
        Ok(Encoder {
            conv_in: conv3(vb.pp("conv_in"), cfg.in_channels, ch[0])?,
            down,
            mid: MidBlock::new(vb.pp("mid_block"), last, cfg)?,
            norm_out: group_norm(g, last, vb.pp("conv_norm_out"))?,
            conv_out: conv3(vb.pp("conv_out"), last, 2 * cfg.latent_channels)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = conv(&self.conv_in, x)?;
        for block in &self.down {
            for r in &block.resnets {
                x = r.forward(&x)?;
            }
            if let Some(c) = &block.downsample {
                // diffusers pads right and bottom by one, then a stride-2 3×3 conv.
                x = conv(
                    c,
                    &x.pad_with_zeros(D::Minus1, 0, 1)?
                        .pad_with_zeros(D::Minus2, 0, 1)?,
                )?;
            }
        }
        let x = self.mid.forward(&x)?;
        conv(&self.conv_out, &self.norm_out.forward_silu(&x)?)
    }
}

struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let reversed: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let g = cfg.norm_num_groups;
        let mut up = Vec::new();
        let mut c_prev = reversed[0];
        for (i, &c_out) in reversed.iter().enumerate() {
            let vb = vb.pp(format!("up_blocks.{i}"));
            let resnets = (0..=cfg.layers_per_block)
                .map(|j| {
                    ResnetBlock::new(
                        vb.pp(format!("resnets.{j}")),
                        if j == 0 { c_prev } else { c_out },
                        c_out,
                        g,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let upsample = if i + 1 < reversed.len() {
                Some(conv3(vb.pp("upsamplers.0.conv"), c_out, c_out)?)
            } else {
                None
            };
            up.push(UpBlock { resnets, upsample });
            c_prev = c_out;
        }
        let first = cfg.block_out_channels[0];
        Ok(Decoder {
            conv_in: conv3(vb.pp("conv_in"), cfg.latent_channels, reversed[0])?,
            mid: MidBlock::new(vb.pp("mid_block"), reversed[0], cfg)?,
            up,
            norm_out: group_norm(g, first, vb.pp("conv_norm_out"))?,
            conv_out: conv3(vb.pp("conv_out"), first, cfg.out_channels)?,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut x = self.mid.forward(&conv(&self.conv_in, z)?)?;
        for block in &self.up {
            for r in &block.resnets {
                x = r.forward(&x)?;
            }
            if let Some(c) = &block.upsample {
                x = kernels::conv2d_upsampled(c, &x)?;
            }
        }
        conv(&self.conv_out, &self.norm_out.forward_silu(&x)?)
    }
}

/// The posterior of an encoded image: per-pixel mean and log-variance (clamped to
/// [-30, 20] as diffusers does).
pub struct Posterior {
    pub mean: Tensor,
    pub logvar: Tensor,
}

impl Posterior {
    pub fn std(&self) -> Result<Tensor> {
        (&self.logvar * 0.5)?.exp()
    }

    /// `mean + std · noise`, with `noise` supplied by the caller (seeded).
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        &self.mean + (self.std()? * noise)?
    }
}

pub struct AutoencoderKl {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    cfg: Config,
    dtype: DType,
}

impl AutoencoderKl {
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        cfg.check().map_err(candle_core::Error::msg)?;
        let l = cfg.latent_channels;
        Ok(AutoencoderKl {
            encoder: Encoder::new(vb.pp("encoder"), cfg)?,
            decoder: Decoder::new(vb.pp("decoder"), cfg)?,
            quant_conv: if cfg.use_quant_conv {
                Some(conv2d(
                    2 * l,
                    2 * l,
                    1,
                    Default::default(),
                    vb.pp("quant_conv"),
                )?)
            } else {
                None
            },
            post_quant_conv: if cfg.use_post_quant_conv {
                Some(conv2d(
                    l,
                    l,
                    1,
                    Default::default(),
                    vb.pp("post_quant_conv"),
                )?)
            } else {
                None
            },
            cfg: cfg.clone(),
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Pixels `[B, 3, H, W]` in -1..1 → posterior over unscaled latents.
    pub fn encode(&self, x: &Tensor) -> Result<Posterior> {
        let mut h = self.encoder.forward(&x.to_dtype(self.dtype)?)?;
        if let Some(q) = &self.quant_conv {
            h = conv(q, &h)?;
        }
        let l = self.cfg.latent_channels;
        Ok(Posterior {
            mean: h.narrow(1, 0, l)?,
            logvar: h.narrow(1, l, l)?.clamp(-30f32, 20f32)?,
        })
    }

    /// Unscaled latents → pixels in about -1..1.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let mut z = z.to_dtype(self.dtype)?;
        if let Some(q) = &self.post_quant_conv {
            z = conv(q, &z)?;
        }
        self.decoder.forward(&z)
    }
}

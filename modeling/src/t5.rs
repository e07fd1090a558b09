//! The T5 v1.1 encoder (transformers' `T5EncoderModel`) with an attention mask,
//! which candle-transformers' T5 does not take and PixArt needs.
//!
//! Weight names follow the checkpoint: `shared.weight` (or
//! `encoder.embed_tokens.weight`), `encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}`,
//! `…layer.0.layer_norm`, `…layer.1.DenseReluDense.{wi_0,wi_1,wo}` (or `wi` when
//! not gated), `…layer.1.layer_norm`, `encoder.final_layer_norm`.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{embedding, Embedding, Linear, VarBuilder};
use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_ff")]
    pub feed_forward_proj: String,
    #[serde(default)]
    pub dense_act_fn: Option<String>,
}

fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff() -> String {
    "relu".into()
}

impl Config {
    fn gated(&self) -> bool {
        self.feed_forward_proj.starts_with("gated-")
    }

    /// transformers maps "gated-gelu" to the tanh-approximated `gelu_new`.
    fn activation(&self) -> Activation {
        let name = if self.feed_forward_proj == "gated-gelu" {
            "gelu_new".to_string()
        } else {
            self.dense_act_fn.clone().unwrap_or_else(|| {
                self.feed_forward_proj
                    .trim_start_matches("gated-")
                    .to_string()
            })
        };
        match name.as_str() {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "gelu" => Activation::GeluErf,
            "silu" | "swish" => Activation::Silu,
            _ => Activation::Relu,
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Activation {
    GeluTanh,
    GeluErf,
    Silu,
    Relu,
}

impl Activation {
    fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::GeluTanh => crate::kernels::gelu_inference(x),
            Activation::GeluErf => x.gelu_erf(),
            Activation::Silu => x.silu(),
            Activation::Relu => x.relu(),
        }
    }
}

/// T5's RMS norm: no mean subtraction, no bias, statistics in f32.
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: vb.get(size, "weight")?,
            eps,
        })
    }

    /// Statistics in f32; the result in the weight's dtype (as transformers casts
    /// to a half-precision weight), whatever the residual stream's dtype.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x32 = x.to_dtype(DType::F32)?;
        let variance = x32.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x32.broadcast_div(&(variance + self.eps)?.sqrt()?)?;
        normed
            .to_dtype(self.weight.dtype())?
            .broadcast_mul(&self.weight)
    }
}

struct SelfAttention {
    q: Projection,
    k: Projection,
    v: Projection,
    o: Projection,
    heads: usize,
    d_kv: usize,
    relative_attention_bias: Option<Embedding>,
}

impl SelfAttention {
    fn new(vb: VarBuilder, cfg: &Config, has_bias: bool, proj: Projections) -> Result<Self> {
        let inner = cfg.num_heads * cfg.d_kv;
        let relative_attention_bias = if has_bias {
            Some(embedding(
                cfg.relative_attention_num_buckets,
                cfg.num_heads,
                vb.pp("relative_attention_bias"),
            )?)
        } else {
            None
        };
        Ok(SelfAttention {
            q: Projection::new(cfg.d_model, inner, vb.pp("q"), proj)?,
            k: Projection::new(cfg.d_model, inner, vb.pp("k"), proj)?,
            v: Projection::new(cfg.d_model, inner, vb.pp("v"), proj)?,
            o: Projection::new(inner, cfg.d_model, vb.pp("o"), proj)?,
            heads: cfg.num_heads,
            d_kv: cfg.d_kv,
            relative_attention_bias,
        })
    }

    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        x.reshape((b, l, self.heads, self.d_kv))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// `bias`: position bias plus mask, `[batch or 1, heads, len, len]`. T5 does not
    /// scale the scores by 1/√d.
    fn forward(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let q = self.split_heads(&self.q.forward(x)?)?;
        let k = self.split_heads(&self.k.forward(x)?)?;
        let v = self.split_heads(&self.v.forward(x)?)?;
        let scores = q
            .matmul(&k.t()?)?
            .to_dtype(DType::F32)?
            .broadcast_add(bias)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, l, self.heads * self.d_kv))?;
        self.o.forward(&out)
    }
}

struct FeedForward {
    wi_0: Projection,
    wi_1: Option<Projection>,
    wo: Projection,
    act: Activation,
}

impl FeedForward {
    fn new(vb: VarBuilder, cfg: &Config, proj: Projections) -> Result<Self> {
        let wi = |name: &str| Projection::new(cfg.d_model, cfg.d_ff, vb.pp(name), proj);
        let (wi_0, wi_1) = if cfg.gated() {
            (wi("wi_0")?, Some(wi("wi_1")?))
        } else {
            (wi("wi")?, None)
        };
        // transformers keeps `wo` in f32 for f16 models (`_keep_in_fp32_modules`):
        // T5's feed-forward output overflows f16 otherwise.
        let wo_how = if vb.dtype() == DType::F16 {
            Projections {
                dtype: DType::F32,
                ..proj
            }
        } else {
            proj
        };
        let wo = Projection::new(cfg.d_ff, cfg.d_model, vb.pp("wo"), wo_how)?;
        Ok(FeedForward {
            wi_0,
            wi_1,
            wo,
            act: cfg.activation(),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.act.apply(&self.wi_0.forward(x)?)?;
        let h = match &self.wi_1 {
            Some(wi_1) => (h * wi_1.forward(x)?)?,
            None => h,
        };
        // An f32 `wo` in an f16 model takes f32 inputs; bf16 weights under f32
        // activations are widened by the product itself.
        let h = if self.wo.dtype() == DType::F32 {
            h.to_dtype(DType::F32)?
        } else {
            h
        };
        self.wo.forward(&h)
    }
}

struct Block {
    attn_norm: RmsNorm,
    attn: SelfAttention,
    ff_norm: RmsNorm,
    ff: FeedForward,
}

impl Block {
    fn new(vb: VarBuilder, cfg: &Config, first: bool, proj: Projections) -> Result<Self> {
        let eps = cfg.layer_norm_epsilon;
        Ok(Block {
            attn_norm: RmsNorm::new(vb.pp("layer.0.layer_norm"), cfg.d_model, eps)?,
            attn: SelfAttention::new(vb.pp("layer.0.SelfAttention"), cfg, first, proj)?,
            ff_norm: RmsNorm::new(vb.pp("layer.1.layer_norm"), cfg.d_model, eps)?,
            ff: FeedForward::new(vb.pp("layer.1.DenseReluDense"), cfg, proj)?,
        })
    }

    fn forward(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let x = add_promoting(x, &self.attn.forward(&self.attn_norm.forward(x)?, bias)?)?;
        let x = clamp_f16(&x)?;
        let x = add_promoting(&x, &self.ff.forward(&self.ff_norm.forward(&x)?)?)?;
        clamp_f16(&x)
    }
}

/// How the blocks' projection weights are kept: their dtype (`U8`: 8-bit with
/// scales, `weights::quantize_int8`), and whether the products read them
/// transposed (`[in, out]`, see `weights::Keep`): stored so by the loader, or,
/// with `late`, kept as the checkpoint has them until their first product.
#[derive(Clone, Copy, Debug)]
pub struct Projections {
    pub dtype: DType,
    pub transposed: bool,
    /// Transposed at first use, not by the loader: loading then converts
    /// nothing and the weights can stay in their mapped file until an encode
    /// reads them (the first encode pays the copy once, as it would pay
    /// reading the file).
    pub late: bool,
}

/// A projection without bias. Its weight may be narrower than the activations
/// (bf16 weights under f32 arithmetic) and stored transposed.
struct Projection {
    /// The weight, and whether it is `[in, out]` yet (a late one becomes so at
    /// its first product; the lock makes that happen once).
    weight: std::sync::Mutex<(Tensor, bool)>,
    /// An 8-bit weight's scales (`weights::quantize_int8`).
    scales: Option<Tensor>,
    transposed: bool,
    dtype: DType,
}

impl Projection {
    fn new(in_dim: usize, out_dim: usize, vb: VarBuilder, how: Projections) -> Result<Self> {
        let stored_transposed = how.transposed && !how.late;
        let shape = if stored_transposed {
            (in_dim, out_dim)
        } else {
            (out_dim, in_dim)
        };
        let weight = vb.get_with_hints_dtype(shape, "weight", Default::default(), how.dtype)?;
        let scales = if how.dtype == DType::U8 {
            use crate::weights::{int8_scales_shape, INT8_SCALE_SUFFIX};
            let name = format!("weight{INT8_SCALE_SUFFIX}");
            let shape = int8_scales_shape(in_dim, out_dim, stored_transposed);
            Some(vb.get_with_hints_dtype(shape, &name, Default::default(), DType::F32)?)
        } else {
            None
        };
        if scales.is_some() && how.late {
            candle_core::bail!("8-bit projections are transposed by the loader, not late");
        }
        Ok(Projection {
            dtype: weight.dtype(),
            weight: std::sync::Mutex::new((weight, stored_transposed)),
            scales,
            transposed: how.transposed,
        })
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    /// The weight in the layout the products read, transposing a late one
    /// (outside the lock: the transposition runs on rayon's threads).
    fn weight(&self) -> Result<Tensor> {
        let lock = || self.weight.lock().unwrap_or_else(|e| e.into_inner());
        let (weight, ready) = lock().clone();
        if !self.transposed || ready {
            return Ok(weight);
        }
        let t = crate::weights::transposed(&weight)?;
        drop(weight);
        let mut kept = lock();
        if !kept.1 {
            *kept = (t, true);
        }
        Ok(kept.0.clone())
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.transposed && self.scales.is_none() && crate::kernels::bf16_products() {
            // bf16 tiles pack the stored `[out, in]` layout as fast as the
            // transposed one: a late transposition would only cost time and a
            // second copy of the weights.
            let (weight, ready) = self
                .weight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if !ready {
                return crate::kernels::linear_inference(&Linear::new(weight, None), x);
            }
        }
        let weight = self.weight()?;
        if let Some(scales) = &self.scales {
            crate::kernels::linear_int8_inference(&weight, scales, self.transposed, x)
        } else if self.transposed {
            crate::kernels::linear_transposed_inference(&weight, None, x)
        } else {
            crate::kernels::linear_inference(&Linear::new(weight, None), x)
        }
    }
}

/// `a + b` with PyTorch's type promotion between f16 and f32: the residual stream
/// of an f16 T5 becomes f32 after the first (f32) feed-forward output.
fn add_promoting(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dtype() == b.dtype() {
        return a + b;
    }
    a.to_dtype(DType::F32)? + b.to_dtype(DType::F32)?
}

/// As transformers does, keep f16 activations finite (T5 overflows f16 otherwise).
fn clamp_f16(x: &Tensor) -> Result<Tensor> {
    if x.dtype() != DType::F16 {
        return Ok(x.clone());
    }
    let limit = f64::from(half::f16::MAX) - 1000.0;
    x.clamp(-limit, limit)
}

pub struct T5Encoder {
    embed: Embedding,
    blocks: Vec<Block>,
    final_norm: RmsNorm,
    cfg: Config,
    device: Device,
}

impl T5Encoder {
    /// The encoder computing in `vb`'s dtype, its weights in that dtype too.
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let dtype = vb.dtype();
        let proj = Projections {
            dtype,
            transposed: false,
            late: false,
        };
        T5Encoder::with_projections(vb, cfg, proj)
    }

    /// The encoder computing in `vb`'s dtype with the blocks' projection weights
    /// (q, k, v, o, wi, wo: nearly all of T5's parameters) kept as `proj` says.
    /// bf16 projections under f32 arithmetic halve T5-XXL's 19 GB; the CPU
    /// kernels widen them to f32 a band at a time (exactly: bf16 is f32's upper
    /// half). Transposed, the products run at twice the speed on 120 tokens.
    pub fn with_projections(vb: VarBuilder, cfg: &Config, proj: Projections) -> Result<Self> {
        // transformers 5 may save only the tied `shared.weight`; older checkpoints
        // (and some conversions) only `encoder.embed_tokens.weight`.
        let embed_vb = if vb.contains_tensor("shared.weight") {
            vb.pp("shared")
        } else {
            vb.pp("encoder.embed_tokens")
        };
        let embed = embedding(cfg.vocab_size, cfg.d_model, embed_vb)?;
        let enc = vb.pp("encoder");
        let blocks = (0..cfg.num_layers)
            .map(|i| Block::new(enc.pp(format!("block.{i}")), cfg, i == 0, proj))
            .collect::<Result<Vec<_>>>()?;
        Ok(T5Encoder {
            embed,
            blocks,
            final_norm: RmsNorm::new(
                enc.pp("final_layer_norm"),
                cfg.d_model,
                cfg.layer_norm_epsilon,
            )?,
            cfg: cfg.clone(),
            device: vb.device().clone(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `input_ids` `[batch, len]` (u32/i64), `mask` `[batch, len]` (1 = token,
    /// 0 = padding; any dtype) → last hidden state `[batch, len, d_model]`.
    pub fn forward(&self, input_ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (_, len) = input_ids.dims2()?;
        let mut x = self.embed.forward(input_ids)?;
        let bias = self.position_bias(len)?; // [1, heads, len, len]
                                             // Padding keys get the most negative f32, as transformers' extended mask.
        let mask = mask.to_dtype(DType::F32)?;
        let mask_bias = ((1.0 - mask)? * f64::from(f32::MIN))?
            .unsqueeze(1)?
            .unsqueeze(1)?;
        let bias = bias.broadcast_add(&mask_bias)?;
        for block in &self.blocks {
            x = block.forward(&x, &bias)?;
        }
        self.final_norm.forward(&x)
    }

    fn position_bias(&self, len: usize) -> Result<Tensor> {
        let buckets: Vec<u32> = (0..len)
            .flat_map(|q| (0..len).map(move |k| (q, k)))
            .map(|(q, k)| {
                relative_bucket(
                    k as i64 - q as i64,
                    self.cfg.relative_attention_num_buckets,
                    self.cfg.relative_attention_max_distance,
                ) as u32
            })
            .collect();
        let buckets = Tensor::from_vec(buckets, (len, len), &self.device)?;
        let table = match &self
            .blocks
            .first()
            .and_then(|b| b.attn.relative_attention_bias.as_ref())
        {
            Some(t) => t.forward(&buckets)?,
            None => candle_core::bail!("T5: the first block has no relative_attention_bias"),
        };
        // [len, len, heads] → [1, heads, len, len]
        table.permute((2, 0, 1))?.unsqueeze(0)?.to_dtype(DType::F32)
    }
}

/// transformers' `_relative_position_bucket`, bidirectional.
fn relative_bucket(relative: i64, num_buckets: usize, max_distance: usize) -> usize {
    let half = num_buckets / 2;
    let mut bucket = if relative > 0 { half } else { 0 };
    let n = relative.unsigned_abs() as usize;
    let max_exact = half / 2;
    if n < max_exact {
        bucket += n;
    } else {
        // As transformers: f32 log over the f64 log of the ratio, truncated towards zero.
        let ratio = (n as f32 / max_exact as f32).ln()
            / (max_distance as f64 / max_exact as f64).ln() as f32;
        let large = max_exact + (ratio * (half - max_exact) as f32) as usize;
        bucket += large.min(half - 1);
    }
    bucket
}

#[cfg(test)]
mod tests {
    use super::relative_bucket;

    #[test]
    fn buckets_match_transformers() {
        // Values of transformers' T5Attention._relative_position_bucket(…, True, 32, 128).
        let cases = [
            (0, 0),
            (1, 17),
            (-1, 1),
            (7, 23),
            (8, 24),
            (-8, 8),
            (12, 25),
            (100, 31),
            (-200, 15),
            (500, 31),
        ];
        for (rel, want) in cases {
            assert_eq!(
                relative_bucket(rel, 32, 128),
                want,
                "relative position {rel}"
            );
        }
    }
}

//! LLaVA-1.5: a CLIP ViT vision tower, a two-layer GELU projector and a Llama
//! language model, loading transformers' `LlavaForConditionalGeneration` folders
//! (`config.json` + safetensors, sharded or not) so real checkpoints
//! (llava-hf/llava-1.5-7b-hf) load unchanged.
//!
//! The vision tower and the language model are candle-transformers' CLIP and
//! Llama; this file adds the LLaVA parts: which hidden state of the tower feeds
//! the projector, the projector, and putting the image features where the
//! prompt has image tokens.

use crate::weights::{read_config, LoadError, Weights};
use candle_core::{DType, Device, IndexOp, Module, Tensor, D};
use candle_nn::{linear_b, Linear, VarBuilder};
use candle_transformers::models::clip::text_model::Activation;
use candle_transformers::models::clip::vision_model::{ClipVisionConfig, ClipVisionTransformer};
use candle_transformers::models::llama::{Cache, Llama, LlamaConfig};
use serde::Deserialize;
use std::path::Path;

/// `config.json` of a LLaVA folder; defaults are transformers' (the hub's
/// llava-1.5 configs omit what equals them).
#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    pub model_type: String,
    #[serde(default)]
    pub vision_config: VisionConfig,
    #[serde(default)]
    pub text_config: TextConfig,
    #[serde(default = "default_image_token", alias = "image_token_id")]
    pub image_token_index: u32,
    #[serde(default = "default_gelu")]
    pub projector_hidden_act: String,
    #[serde(default = "default_feature_layer")]
    pub vision_feature_layer: i64,
    #[serde(default = "default_strategy")]
    pub vision_feature_select_strategy: String,
    #[serde(default = "yes")]
    pub multimodal_projector_bias: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct VisionConfig {
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub projection_dim: usize,
}

impl Default for VisionConfig {
    /// transformers' `CLIPVisionConfig` defaults.
    fn default() -> Self {
        VisionConfig {
            model_type: "clip_vision_model".into(),
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            projection_dim: 512,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct TextConfig {
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    pub rope_theta: Option<f32>,
    /// transformers 5 writes `rope_parameters: {rope_theta, rope_type}`.
    pub rope_parameters: Option<RopeParameters>,
    pub rope_scaling: Option<serde_json::Value>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<serde_json::Value>,
    pub hidden_act: String,
    pub attention_bias: bool,
    pub mlp_bias: bool,
}

#[derive(Clone, Debug, Deserialize)]
pub struct RopeParameters {
    pub rope_theta: Option<f32>,
    pub rope_type: Option<String>,
}

impl Default for TextConfig {
    /// transformers' `LlamaConfig` defaults.
    fn default() -> Self {
        TextConfig {
            model_type: "llama".into(),
            hidden_size: 4096,
            intermediate_size: 11008,
            vocab_size: 32000,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: None,
            head_dim: None,
            rms_norm_eps: 1e-6,
            rope_theta: None,
            rope_parameters: None,
            rope_scaling: None,
            max_position_embeddings: 2048,
            tie_word_embeddings: false,
            bos_token_id: Some(1),
            eos_token_id: None,
            hidden_act: "silu".into(),
            attention_bias: false,
            mlp_bias: false,
        }
    }
}

fn default_image_token() -> u32 {
    32000
}
fn default_gelu() -> String {
    "gelu".into()
}
fn default_feature_layer() -> i64 {
    -2
}
fn default_strategy() -> String {
    "default".into()
}
fn yes() -> bool {
    true
}

impl Config {
    /// What this implementation cannot run, as one message (before any weight loads).
    fn check(&self) -> Result<(), String> {
        let v = &self.vision_config;
        let t = &self.text_config;
        let layers = v.num_hidden_layers as i64;
        let scaled_rope = t.rope_scaling.as_ref().is_some_and(|s| !s.is_null())
            || t.rope_parameters
                .as_ref()
                .and_then(|p| p.rope_type.as_deref())
                .is_some_and(|r| r != "default");
        // (supported, what it is when not)
        let checks = [
            (
                self.model_type == "llava",
                format!("model_type {:?}", self.model_type),
            ),
            (
                v.model_type == "clip_vision_model",
                format!("vision model {:?} (only CLIP)", v.model_type),
            ),
            (
                v.hidden_act == "quick_gelu",
                format!("vision activation {:?}", v.hidden_act),
            ),
            (
                t.model_type == "llama",
                format!("language model {:?} (only llama)", t.model_type),
            ),
            (
                t.hidden_act == "silu" && !t.attention_bias && !t.mlp_bias,
                "a Llama variant with biases or another activation".into(),
            ),
            (
                t.head_dim
                    .is_none_or(|h| h * t.num_attention_heads == t.hidden_size),
                "head_dim × heads ≠ hidden_size".into(),
            ),
            (!scaled_rope, "scaled RoPE".into()),
            (
                self.projector_hidden_act == "gelu",
                format!("projector activation {:?}", self.projector_hidden_act),
            ),
            (
                self.vision_feature_layer != 0
                    && (-layers..=layers).contains(&self.vision_feature_layer),
                format!("vision_feature_layer {}", self.vision_feature_layer),
            ),
            (
                ["default", "full"].contains(&self.vision_feature_select_strategy.as_str()),
                format!("feature strategy {:?}", self.vision_feature_select_strategy),
            ),
        ];
        let problems: Vec<String> = checks
            .into_iter()
            .filter(|(ok, _)| !ok)
            .map(|(_, m)| m)
            .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "unsupported LLaVA configuration: {}",
                problems.join("; ")
            ))
        }
    }

    fn clip(&self) -> ClipVisionConfig {
        let v = &self.vision_config;
        ClipVisionConfig {
            embed_dim: v.hidden_size,
            activation: Activation::QuickGelu,
            intermediate_size: v.intermediate_size,
            num_hidden_layers: v.num_hidden_layers,
            num_attention_heads: v.num_attention_heads,
            projection_dim: v.projection_dim,
            num_channels: v.num_channels,
            image_size: v.image_size,
            patch_size: v.patch_size,
        }
    }

    fn llama(&self) -> candle_transformers::models::llama::Config {
        let t = &self.text_config;
        let theta = t
            .rope_theta
            .or(t.rope_parameters.as_ref().and_then(|p| p.rope_theta))
            .unwrap_or(10_000.0);
        LlamaConfig {
            hidden_size: t.hidden_size,
            intermediate_size: t.intermediate_size,
            vocab_size: t.vocab_size,
            num_hidden_layers: t.num_hidden_layers,
            num_attention_heads: t.num_attention_heads,
            num_key_value_heads: t.num_key_value_heads,
            rms_norm_eps: t.rms_norm_eps,
            rope_theta: theta,
            bos_token_id: t.bos_token_id,
            eos_token_id: None,
            rope_scaling: None,
            max_position_embeddings: t.max_position_embeddings,
            tie_word_embeddings: Some(t.tie_word_embeddings),
        }
        .into_config(false)
    }

    /// Image tokens per image: patches, plus the class token under "full".
    pub fn image_tokens(&self) -> usize {
        let side = self.vision_config.image_size / self.vision_config.patch_size;
        side * side + usize::from(self.vision_feature_select_strategy == "full")
    }

    /// The end-of-sequence ids the config names.
    pub fn eos_ids(&self) -> Vec<u32> {
        match &self.text_config.eos_token_id {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(|n| vec![n as u32]).unwrap_or_default()
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_u64())
                .map(|n| n as u32)
                .collect(),
            _ => vec![2],
        }
    }
}

pub struct Llava {
    config: Config,
    vision: ClipVisionTransformer,
    projector: (Linear, Linear),
    language: Llama,
    llama_config: candle_transformers::models::llama::Config,
    dtype: DType,
    device: Device,
    /// The memory its weights hold.
    bytes: usize,
}

/// transformers' key layouts → ours: `vision.*`, `projector.*`, `language.*`.
const LAYOUTS: &[(&str, &str)] = &[
    ("model.vision_tower.vision_model.", "vision."),
    ("model.vision_tower.", "vision."),
    ("vision_tower.vision_model.", "vision."),
    ("vision_tower.", "vision."),
    ("model.multi_modal_projector.", "projector."),
    ("multi_modal_projector.", "projector."),
    ("model.language_model.", "language.model."),
    ("language_model.model.", "language.model."),
    ("language_model.lm_head.", "language.lm_head."),
    ("lm_head.", "language.lm_head."),
];

impl Llava {
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Llava, LoadError> {
        let config: Config = read_config(dir)?;
        config
            .check()
            .map_err(|m| LoadError::file(&dir.join("config.json"), m))?;
        let weights = Weights::from_folder(dir, &["model"], dtype, device)?.renamed(|name| {
            LAYOUTS
                .iter()
                .find_map(|(from, to)| name.strip_prefix(from).map(|rest| format!("{to}{rest}")))
        });
        let llama_config = config.llama();
        check_language_weights(&weights, &llama_config)?;
        let vb = weights.var_builder();
        let vision = ClipVisionTransformer::new(vb.pp("vision"), &config.clip())
            .map_err(|e| weights.model_error("the CLIP vision tower", e))?;
        let projector =
            projector(&vb, &config).map_err(|e| weights.model_error("the projector", e))?;
        let language = Llama::load(vb.pp("language"), &llama_config)
            .map_err(|e| weights.model_error("the Llama model", e))?;
        Ok(Llava {
            config,
            vision,
            projector,
            language,
            llama_config,
            dtype,
            device: device.clone(),
            bytes: weights.bytes(),
        })
    }

    /// The memory its weights hold, in bytes.
    pub fn weight_bytes(&self) -> usize {
        self.bytes
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Projected image features `[B, image_tokens, hidden]` of pixel values
    /// `[B, 3, size, size]` (the processor's output).
    pub fn image_features(&self, pixel_values: &Tensor) -> candle_core::Result<Tensor> {
        let px = pixel_values.to_dtype(self.dtype)?.to_device(&self.device)?;
        // candle's list: the output of each layer, then the pooled output; HF's
        // `hidden_states` also starts with the embeddings, so HF index i is ours i − 1.
        let hidden = self.vision.output_hidden_states(&px)?;
        let layers = self.config.vision_config.num_hidden_layers as i64;
        let hf_index = if self.config.vision_feature_layer < 0 {
            layers + 1 + self.config.vision_feature_layer
        } else {
            self.config.vision_feature_layer
        };
        let mut features = hidden[(hf_index - 1) as usize].clone();
        if self.config.vision_feature_select_strategy == "default" {
            let n = features.dim(1)?;
            features = features.narrow(1, 1, n - 1)?;
        }
        let x = self.projector.0.forward(&features)?.gelu_erf()?;
        self.projector.1.forward(&x)
    }

    /// The prompt's embeddings `[1, T, hidden]` with each image token replaced by
    /// the next row of `features` (`[N, hidden]`, all images' features in order).
    pub fn embed_prompt(&self, ids: &[u32], features: &Tensor) -> candle_core::Result<Tensor> {
        let image_token = self.config.image_token_index;
        let slots = ids.iter().filter(|&&i| i == image_token).count();
        let given = features.dim(0)?;
        if slots != given {
            candle_core::bail!(
                "the prompt has {slots} image tokens, the image gives {given} features"
            );
        }
        // Image tokens may lie outside the vocabulary: embed them as id 0, then replace.
        let text_ids: Vec<u32> = ids
            .iter()
            .map(|&i| if i == image_token { 0 } else { i })
            .collect();
        let text = self
            .language
            .embed(&Tensor::new(text_ids.as_slice(), &self.device)?)?;
        let features = features.to_dtype(text.dtype())?;
        let mut rows = Vec::with_capacity(ids.len());
        let (mut next_feature, mut start) = (0, 0);
        while start < ids.len() {
            let is_image = ids[start] == image_token;
            let end = (start..ids.len())
                .find(|&j| (ids[j] == image_token) != is_image)
                .unwrap_or(ids.len());
            if is_image {
                rows.push(features.narrow(0, next_feature, end - start)?);
                next_feature += end - start;
            } else {
                rows.push(text.narrow(0, start, end - start)?);
            }
            start = end;
        }
        Tensor::cat(&rows, 0)?.unsqueeze(0)
    }

    /// A fresh key/value cache for one generation.
    pub fn new_cache(&self) -> candle_core::Result<Cache> {
        Cache::new(true, self.dtype, &self.llama_config, &self.device)
    }

    /// Logits `[1, vocab]` (f32) of the next token after `embeds` at `position`.
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        position: usize,
        cache: &mut Cache,
    ) -> candle_core::Result<Tensor> {
        self.language.forward_input_embed(embeds, position, cache)
    }

    /// Logits of the next token after `token` at `position`.
    pub fn forward_token(
        &self,
        token: u32,
        position: usize,
        cache: &mut Cache,
    ) -> candle_core::Result<Tensor> {
        let x = Tensor::new(&[token], &self.device)?.unsqueeze(0)?;
        self.language.forward(&x, position, cache)
    }

    pub fn max_positions(&self) -> usize {
        self.llama_config.max_position_embeddings
    }
}

fn projector(vb: &VarBuilder, config: &Config) -> candle_core::Result<(Linear, Linear)> {
    let bias = config.multimodal_projector_bias;
    let hidden = config.text_config.hidden_size;
    let width = config.vision_config.hidden_size;
    Ok((
        linear_b(width, hidden, bias, vb.pp("projector.linear_1"))?,
        linear_b(hidden, hidden, bias, vb.pp("projector.linear_2"))?,
    ))
}

/// candle-transformers' Llama loader panics on a missing or misshapen layer
/// tensor: check every one first, so a damaged checkpoint (or one whose config
/// does not fit it) is an error naming the tensor.
fn check_language_weights(
    weights: &Weights,
    cfg: &candle_transformers::models::llama::Config,
) -> Result<(), LoadError> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let head = h / cfg.num_attention_heads;
    let kv = cfg.num_key_value_heads * head;
    let mut expected: Vec<(String, Vec<usize>)> = vec![
        (
            "language.model.embed_tokens.weight".into(),
            vec![cfg.vocab_size, h],
        ),
        ("language.model.norm.weight".into(), vec![h]),
    ];
    if !cfg.tie_word_embeddings {
        expected.push(("language.lm_head.weight".into(), vec![cfg.vocab_size, h]));
    }
    for l in 0..cfg.num_hidden_layers {
        for (part, shape) in [
            ("self_attn.q_proj", vec![h, h]),
            ("self_attn.k_proj", vec![kv, h]),
            ("self_attn.v_proj", vec![kv, h]),
            ("self_attn.o_proj", vec![h, h]),
            ("mlp.gate_proj", vec![i, h]),
            ("mlp.up_proj", vec![i, h]),
            ("mlp.down_proj", vec![h, i]),
            ("input_layernorm", vec![h]),
            ("post_attention_layernorm", vec![h]),
        ] {
            expected.push((format!("language.model.layers.{l}.{part}.weight"), shape));
        }
    }
    for (name, shape) in expected {
        let problem = match weights.get(&name) {
            None => format!("missing tensor {name}"),
            Some(t) if t.dims() != shape.as_slice() => {
                format!(
                    "tensor {name} has shape {:?}, config.json says {shape:?}",
                    t.dims()
                )
            }
            Some(_) => continue,
        };
        return Err(weights.model_error("the Llama model", candle_core::Error::msg(problem)));
    }
    Ok(())
}

/// Picks the next token from logits `[1, vocab]`: the most likely (first on
/// ties, as torch's argmax) at temperature 0, else a draw from
/// softmax(logits / temperature) with `uniform` in [0, 1).
pub fn pick(logits: &Tensor, temperature: f64, uniform: f64) -> candle_core::Result<u32> {
    let logits = logits.i(0)?.to_dtype(DType::F32)?;
    if temperature <= 0.0 {
        let v = logits.to_vec1::<f32>()?;
        let mut best = 0;
        for (i, &x) in v.iter().enumerate() {
            if x > v[best] {
                best = i;
            }
        }
        return Ok(best as u32);
    }
    let probs = candle_nn::ops::softmax(&(logits / temperature)?, D::Minus1)?.to_vec1::<f32>()?;
    let mut acc = 0.0f64;
    for (i, &p) in probs.iter().enumerate() {
        acc += p as f64;
        if uniform < acc {
            return Ok(i as u32);
        }
    }
    Ok((probs.len() - 1) as u32)
}

//! `t5.init`: a T5 v1.1 encoder initialised as transformers initialises one
//! (`T5PreTrainedModel._init_weights`, factor 1), seeded, saved in the
//! `T5EncoderModel` folder layout. PixArt keeps T5 frozen; a small world's
//! model can use such an encoder, whose features still tell every word and its
//! neighbours apart, in place of a pretrained T5-XXL.

use super::model_folder;
use super::rng::{Stream, TrainRng};
use candle_core::{Device, Tensor};
use pixart_models::tokenizer::T5Tokenizer;
use pixart_runtime::{
    InputSpec, Inputs, Node, NodeContext, NodeError, NodeSpec, Outputs, PortType, Value,
};
use serde_json::json;
use std::sync::Arc;

pub struct Shape {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
}

impl Shape {
    /// transformers' `config.json` for this encoder.
    pub fn config(&self) -> serde_json::Value {
        json!({
            "architectures": ["T5EncoderModel"],
            "model_type": "t5",
            "vocab_size": self.vocab_size,
            "d_model": self.d_model,
            "d_kv": self.d_kv,
            "d_ff": self.d_ff,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "relative_attention_num_buckets": 32,
            "relative_attention_max_distance": 128,
            "dropout_rate": 0.1,
            "layer_norm_epsilon": 1e-6,
            "initializer_factor": 1.0,
            "feed_forward_proj": "gated-gelu",
            "dense_act_fn": "gelu_new",
            "is_gated_act": true,
            "tie_word_embeddings": false,
            "pad_token_id": 0,
            "eos_token_id": 1,
            "decoder_start_token_id": 0,
            "use_cache": false,
        })
    }

    /// Every weight, named as in the checkpoint, with the std transformers draws it from
    /// (`None`: a layer norm, all ones).
    fn weights(&self) -> Vec<(String, Vec<usize>, Option<f64>)> {
        let (d, kv, h, ff) = (self.d_model, self.d_kv, self.num_heads, self.d_ff);
        let inner = h * kv;
        let df = d as f64;
        let mut w = vec![(
            "shared.weight".to_string(),
            vec![self.vocab_size, d],
            Some(1.0),
        )];
        for i in 0..self.num_layers {
            let a = format!("encoder.block.{i}.layer.0.SelfAttention");
            w.push((
                format!("{a}.q.weight"),
                vec![inner, d],
                Some((df * kv as f64).powf(-0.5)),
            ));
            w.push((format!("{a}.k.weight"), vec![inner, d], Some(df.powf(-0.5))));
            w.push((format!("{a}.v.weight"), vec![inner, d], Some(df.powf(-0.5))));
            w.push((
                format!("{a}.o.weight"),
                vec![d, inner],
                Some((inner as f64).powf(-0.5)),
            ));
            if i == 0 {
                w.push((
                    format!("{a}.relative_attention_bias.weight"),
                    vec![32, h],
                    Some(df.powf(-0.5)),
                ));
            }
            w.push((
                format!("encoder.block.{i}.layer.0.layer_norm.weight"),
                vec![d],
                None,
            ));
            let f = format!("encoder.block.{i}.layer.1.DenseReluDense");
            w.push((format!("{f}.wi_0.weight"), vec![ff, d], Some(df.powf(-0.5))));
            w.push((format!("{f}.wi_1.weight"), vec![ff, d], Some(df.powf(-0.5))));
            w.push((
                format!("{f}.wo.weight"),
                vec![d, ff],
                Some((ff as f64).powf(-0.5)),
            ));
            w.push((
                format!("encoder.block.{i}.layer.1.layer_norm.weight"),
                vec![d],
                None,
            ));
        }
        w.push(("encoder.final_layer_norm.weight".into(), vec![d], None));
        w
    }

    /// Seeded weights: weight `k` draws from its own stream, so the values do
    /// not depend on the order or number of other weights.
    pub fn init(&self, seed: u64) -> candle_core::Result<Vec<(String, Tensor)>> {
        self.weights()
            .into_iter()
            .enumerate()
            .map(|(k, (name, shape, std))| {
                let n: usize = shape.iter().product();
                let values = match std {
                    Some(std) => TrainRng::new(seed, Stream::Init, k as u64)
                        .normals(n)
                        .into_iter()
                        .map(|x| x * std as f32)
                        .collect(),
                    None => vec![1f32; n],
                };
                Ok((name, Tensor::from_vec(values, shape, &Device::Cpu)?))
            })
            .collect()
    }
}

pub struct InitT5 {
    spec: NodeSpec,
}

impl InitT5 {
    fn new() -> Self {
        InitT5 {
            spec: NodeSpec::new("t5.init", 1)
                .category("training")
                .describe(
                    "Creates a T5 v1.1 encoder (gated-GELU) with transformers' initialisation, seeded, for \
                     the tokenizer's vocabulary, and writes it as a T5EncoderModel folder (config.json, \
                     model.safetensors). Used frozen, as PixArt uses T5.",
                )
                .input(InputSpec::new("tokenizer", PortType::Tokenizer))
                .input(InputSpec::new("d_model", PortType::Int).default(64).min(4.0).max(16384.0))
                .input(InputSpec::new("d_kv", PortType::Int).default(16).min(1.0).max(1024.0))
                .input(InputSpec::new("d_ff", PortType::Int).default(128).min(4.0).max(65536.0))
                .input(InputSpec::new("layers", PortType::Int).default(2).min(1.0).max(128.0))
                .input(InputSpec::new("heads", PortType::Int).default(4).min(1.0).max(256.0))
                .input(InputSpec::new("seed", PortType::Int).default(0).min(0.0))
                .input(InputSpec::new("out", PortType::Path).describe("The text_encoder folder to write."))
                .output("encoder", PortType::TextEncoder, "the encoder")
                .output("path", PortType::Path, "its folder")
                .estimate(t5_bytes),
        }
    }
}

/// The encoder's layers in f32, twice (the tensors and their file's bytes);
/// the vocabulary's embedding is left out (the tokenizer tells it, at run time).
fn t5_bytes(known: &[Option<&Value>]) -> Option<u64> {
    let int = |i: usize| pixart_runtime::known_count(known, i);
    let (d, kv, ff, layers, heads) = (int(1)?, int(2)?, int(3)?, int(4)?, int(5)?);
    let per_layer = (4 * d)
        .checked_mul(heads.checked_mul(kv)?)?
        .checked_add((3 * d).checked_mul(ff)?)?;
    per_layer.checked_mul(layers)?.checked_mul(8)
}

impl Node for InitT5 {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn run(&self, ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        let tok = inputs.handle::<T5Tokenizer>("tokenizer")?;
        let out = ctx.output_path(inputs.path("out")?)?;
        let int = |name: &str| inputs.int(name).map(|v| v as usize);
        let shape = Shape {
            vocab_size: tok.vocab_size(),
            d_model: int("d_model")?,
            d_kv: int("d_kv")?,
            d_ff: int("d_ff")?,
            num_layers: int("layers")?,
            num_heads: int("heads")?,
        };
        // The tokenizer's vocabulary is known only now: reserve the whole model
        // (its f32 tensors and their file's bytes) before making it.
        let elements: u64 = shape
            .weights()
            .iter()
            .map(|(_, dims, _)| dims.iter().map(|&d| d as u64).product::<u64>())
            .sum();
        let _memory = ctx.reserve_memory(
            elements.saturating_mul(8),
            "initialising this T5 (its f32 weights and their file)",
        )?;
        let tensors = shape.init(inputs.int("seed")? as u64)?;
        let bytes =
            model_folder::safetensors_bytes(&tensors).map_err(|e| NodeError::io(&out, e))?;
        let config = serde_json::to_string_pretty(&shape.config()).map_err(NodeError::msg)?;
        model_folder::write(
            ctx,
            &out,
            &[
                ("config.json", config.into_bytes()),
                ("model.safetensors", bytes),
            ],
        )
        .map_err(|e| NodeError::io(&out, e))?;
        let encoder = crate::pixart::text_encoder::TextEncoder::load(
            &out,
            candle_core::DType::F32,
            crate::device::TextWeights::Auto,
            &Device::Cpu,
            false,
        )
        .map_err(NodeError::msg)?;
        Ok(Outputs::one("encoder", encoder.into_value()).with("path", Value::Path(out)))
    }
}

pub fn nodes() -> Vec<Arc<dyn Node>> {
    vec![Arc::new(InitT5::new())]
}

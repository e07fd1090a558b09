//! A loaded captioner: LLaVA, its image processor, tokenizer and chat template,
//! and generation (greedy or seeded temperature sampling, stopping at
//! end-of-sequence).

use super::chat_template::chat_environment;
use candle_core::{DType, Device, Tensor};
use pixart_models::clip_image::ImageProcessorConfig;
use pixart_models::llava::{pick, Llava};
use pixart_models::weights::LoadError;
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

pub struct Captioner {
    model: Llava,
    images: ImageProcessorConfig,
    tokenizer: Tokenizer,
    /// The chat template, parsed once at load.
    template: minijinja::Environment<'static>,
    /// `bos_token` and `eos_token` as the chat template sees them.
    specials: (String, String),
    image_token: String,
    eos: Vec<u32>,
    dir: PathBuf,
}

/// How to generate.
#[derive(Clone, Debug)]
pub struct Generation {
    pub max_tokens: usize,
    /// 0: greedy.
    pub temperature: f64,
    pub seed: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Caption {
    /// The generated ids, end-of-sequence included when generation stopped there.
    pub ids: Vec<u32>,
    pub text: String,
}

impl Captioner {
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Captioner, LoadError> {
        let model = Llava::load(dir, dtype, device)?;
        let images = ImageProcessorConfig::load(dir)?;
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| LoadError::file(&tok_path, format!("not a tokenizer.json: {e}")))?;
        let template = chat_environment(dir)?;
        let tok_config = read_json(&dir.join("tokenizer_config.json"));
        let special = |key: &str, fallback: &str| {
            let v = tok_config.as_ref().and_then(|c| c.get(key));
            v.and_then(|v| {
                v.as_str()
                    .or_else(|| v.get("content").and_then(|c| c.as_str()))
            })
            .unwrap_or(fallback)
            .to_string()
        };
        let specials = (special("bos_token", "<s>"), special("eos_token", "</s>"));
        let processor = read_json(&dir.join("processor_config.json"));
        let image_token = processor
            .as_ref()
            .and_then(|p| p.get("image_token"))
            .and_then(|t| t.as_str())
            .unwrap_or("<image>")
            .to_string();
        match tokenizer.token_to_id(&image_token) {
            Some(id) if id == model.config().image_token_index => {}
            found => {
                return Err(LoadError::file(
                    &tok_path,
                    format!(
                        "the image token {image_token:?} is {found:?} in the tokenizer but {} in config.json",
                        model.config().image_token_index
                    ),
                ))
            }
        }
        let mut eos = model.config().eos_ids();
        if let Some(id) = read_json(&dir.join("generation_config.json"))
            .and_then(|g| g.get("eos_token_id").cloned())
            .and_then(|v| v.as_u64())
        {
            eos.push(id as u32);
        }
        eos.sort_unstable();
        eos.dedup();
        Ok(Captioner {
            model,
            images,
            tokenizer,
            template,
            specials,
            image_token,
            eos,
            dir: dir.to_path_buf(),
        })
    }

    /// The memory it holds, in bytes: its weights (the tokenizer and template
    /// are small beside them).
    pub fn bytes(&self) -> usize {
        self.model.weight_bytes()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The conversation text for one image and a user prompt, by the folder's
    /// chat template (with the generation prompt).
    pub fn prompt_text(&self, prompt: &str) -> Result<String, String> {
        let messages = serde_json::json!([{
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": prompt}],
        }]);
        self.template
            .get_template("chat")
            .and_then(|t| {
                t.render(minijinja::context! {
                    messages => messages,
                    add_generation_prompt => true,
                    bos_token => self.specials.0,
                    eos_token => self.specials.1,
                })
            })
            .map_err(|e| format!("the chat template failed: {e}"))
    }

    /// Token ids of a conversation text: each image token expanded to one per
    /// image feature, then tokenized with the tokenizer's special tokens (BOS).
    pub fn input_ids(&self, text: &str) -> Result<Vec<u32>, String> {
        let expanded = text.replace(
            &self.image_token,
            &self.image_token.repeat(self.model.config().image_tokens()),
        );
        let enc = self
            .tokenizer
            .encode(expanded, true)
            .map_err(|e| format!("cannot tokenize the prompt: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Pixel values `[1, 3, H, W]` of an 8-bit RGB image.
    pub fn pixel_values(&self, rgb: &[u8], width: usize, height: usize) -> Result<Tensor, String> {
        let (data, w, h) = self.images.preprocess(rgb, width, height)?;
        Tensor::from_vec(data, (1, 3, h, w), &Device::Cpu).map_err(|e| e.to_string())
    }

    /// First-step logits `[1, vocab]` of `ids` with the image's pixel values.
    pub fn first_logits(&self, ids: &[u32], pixel_values: &Tensor) -> candle_core::Result<Tensor> {
        let features = self.model.image_features(pixel_values)?.squeeze(0)?;
        let embeds = self.model.embed_prompt(ids, &features)?;
        let mut cache = self.model.new_cache()?;
        self.model.forward_embeds(&embeds, 0, &mut cache)
    }

    pub fn image_features(&self, pixel_values: &Tensor) -> candle_core::Result<Tensor> {
        self.model.image_features(pixel_values)
    }

    /// Captions one image. `on_token(done, max)` is called after each token and
    /// may stop generation by returning an error (cancellation).
    pub fn caption(
        &self,
        rgb: &[u8],
        width: usize,
        height: usize,
        prompt: &str,
        opts: &Generation,
        mut on_token: impl FnMut(usize, usize) -> candle_core::Result<()>,
    ) -> Result<Caption, String> {
        let mut captions = self.caption_many(
            &[(rgb, width, height, prompt)],
            opts,
            |_, done, max| on_token(done, max),
            |_, _| Ok(()),
        )?;
        Ok(captions.remove(0))
    }

    /// Captions several images (`(rgb, width, height, prompt)`): the vision
    /// tower sees them as one batch, then each caption is generated in turn.
    /// `on_token(image, done, max)` may stop generation by returning an error;
    /// `on_caption(image, caption)` sees each caption as soon as it is done (to
    /// save it before the next one starts).
    pub fn caption_many(
        &self,
        images: &[(&[u8], usize, usize, &str)],
        opts: &Generation,
        mut on_token: impl FnMut(usize, usize, usize) -> candle_core::Result<()>,
        mut on_caption: impl FnMut(usize, &Caption) -> candle_core::Result<()>,
    ) -> Result<Vec<Caption>, String> {
        let mut prompts = Vec::with_capacity(images.len());
        let mut pixels = Vec::with_capacity(images.len());
        for &(rgb, width, height, prompt) in images {
            let ids = self.input_ids(&self.prompt_text(prompt)?)?;
            if ids.len() + opts.max_tokens > self.model.max_positions() {
                return Err(format!(
                    "the prompt ({} tokens) plus {} new tokens exceed the model's {} positions",
                    ids.len(),
                    opts.max_tokens,
                    self.model.max_positions()
                ));
            }
            prompts.push(ids);
            pixels.push(self.pixel_values(rgb, width, height)?);
        }
        let mut run = || -> candle_core::Result<Vec<Caption>> {
            let features = self.model.image_features(&Tensor::cat(&pixels, 0)?)?;
            let mut out = Vec::with_capacity(prompts.len());
            for (i, ids) in prompts.iter().enumerate() {
                let caption = self.generate(ids, &features.get(i)?, opts, &mut |done, max| {
                    on_token(i, done, max)
                })?;
                on_caption(i, &caption)?;
                out.push(caption);
            }
            Ok(out)
        };
        run().map_err(|e| e.to_string())
    }

    /// Generates after `ids`, the image features `[N, hidden]` in the image tokens.
    fn generate(
        &self,
        ids: &[u32],
        features: &Tensor,
        opts: &Generation,
        on_token: &mut dyn FnMut(usize, usize) -> candle_core::Result<()>,
    ) -> candle_core::Result<Caption> {
        let embeds = self.model.embed_prompt(ids, features)?;
        let mut cache = self.model.new_cache()?;
        let mut logits = self.model.forward_embeds(&embeds, 0, &mut cache)?;
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&opts.seed.to_le_bytes());
        let mut rng = ChaCha20Rng::from_seed(key);
        let mut out = Vec::new();
        let mut position = ids.len();
        while out.len() < opts.max_tokens {
            let uniform = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            let token = pick(&logits, opts.temperature, uniform)?;
            out.push(token);
            on_token(out.len(), opts.max_tokens)?;
            if self.eos.contains(&token) || out.len() == opts.max_tokens {
                break;
            }
            logits = self.model.forward_token(token, position, &mut cache)?;
            position += 1;
        }
        let text = self
            .tokenizer
            .decode(&out, true)
            .map_err(|e| candle_core::Error::msg(format!("cannot decode: {e}")))?;
        Ok(Caption { ids: out, text })
    }
}

/// An image file (PNG, JPEG) as 8-bit RGB: (bytes, width, height).
pub fn read_rgb(path: &Path) -> Result<(Vec<u8>, usize, usize), pixart_runtime::NodeError> {
    use pixart_runtime::NodeError;
    let img = image::ImageReader::open(path)
        .map_err(|e| NodeError::io(path, e))?
        .with_guessed_format()
        .map_err(|e| NodeError::io(path, e))?
        .decode()
        .map_err(|e| NodeError::msg(format!("{}: {e}", path.display())))?
        .to_rgb8();
    let (w, h) = img.dimensions();
    Ok((img.into_raw(), w as usize, h as usize))
}

fn read_json(path: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

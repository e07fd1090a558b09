//! `tokenizer.train`: a T5-style SentencePiece Unigram tokenizer learnt from a
//! dataset's captions, for training a text encoder on a small world.

use super::dataset::Dataset;
use super::model_folder;
use pixart_models::tokenizer::{t5_pipeline, T5Tokenizer};
use pixart_runtime::{
    Handle, InputSpec, Inputs, Node, NodeContext, NodeError, NodeSpec, Outputs, PortType, Value,
};
use serde_json::json;
use std::path::Path;
use std::sync::Arc;
use tokenizers::models::unigram::Unigram;
use tokenizers::{AddedToken, Tokenizer};

/// T5's fixed ids: `<pad>` 0, `</s>` 1, `<unk>` 2.
const SPECIAL: [&str; 3] = ["<pad>", "</s>", "<unk>"];

/// Trains the tokenizer on `texts` (lower-cased, as the pipeline encodes them)
/// and returns it as the `tokenizer.json` a T5 tokenizer folder holds.
///
/// The Unigram model is fitted by counting: each word (with SentencePiece's `▁`
/// prefix) becomes one piece scored by its log-frequency, most frequent first
/// while the vocabulary has room, and every character seen gets a piece so any
/// text still tokenises. When the budget covers the words this is the maximum-
/// likelihood Unigram model that SentencePiece's EM converges to; unlike the
/// tokenizers crate's `UnigramTrainer`, which on a small corpus keeps
/// sub-word fragments and whose result varies between runs, it is exact and
/// deterministic.
pub fn train(texts: &[String], vocab_size: u32) -> Result<String, String> {
    let mut words: std::collections::BTreeMap<String, u64> = Default::default();
    let mut chars: std::collections::BTreeMap<char, u64> = Default::default();
    for text in texts {
        for word in text.to_lowercase().split_whitespace() {
            *words.entry(format!("▁{word}")).or_default() += 1;
            for c in word.chars().chain(std::iter::once('▁')) {
                *chars.entry(c).or_default() += 1;
            }
        }
    }
    if words.is_empty() {
        return Err("no captions to learn a vocabulary from".into());
    }
    let budget = (vocab_size as usize)
        .checked_sub(SPECIAL.len() + chars.len())
        .ok_or_else(|| {
            format!(
                "vocab_size {vocab_size} cannot hold the {} special tokens and {} characters",
                SPECIAL.len(),
                chars.len()
            )
        })?;
    let mut ranked: Vec<(String, u64)> = words.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    ranked.truncate(budget);
    let total: u64 = ranked.iter().map(|w| w.1).sum::<u64>() + chars.values().sum::<u64>();
    let log_p = |count: u64| (count as f64 / total as f64).ln();
    let mut vocab: Vec<(String, f64)> = SPECIAL.iter().map(|t| (t.to_string(), 0.0)).collect();
    vocab.extend(ranked.iter().map(|(w, n)| (w.clone(), log_p(*n))));
    // Characters only as a fallback: far less likely than any whole word.
    let floor = vocab
        .iter()
        .skip(SPECIAL.len())
        .map(|v| v.1)
        .fold(0f64, f64::min)
        - 10.0;
    vocab.extend(
        chars
            .iter()
            .map(|(c, n)| (c.to_string(), floor + log_p(*n))),
    );
    let model = Unigram::from(vocab, Some(2), false).map_err(|e| e.to_string())?;
    let mut tok = Tokenizer::new(model);
    t5_pipeline(&mut tok, 1)?;
    tok.add_special_tokens(
        SPECIAL
            .iter()
            .map(|t| AddedToken::from(t.to_string(), true))
            .collect::<Vec<_>>(),
    )
    .map_err(|e| e.to_string())?;
    for (id, token) in SPECIAL.iter().enumerate() {
        if tok.token_to_id(token) != Some(id as u32) {
            return Err(format!(
                "the trained vocabulary does not put {token} at id {id}"
            ));
        }
    }
    tok.to_string(true).map_err(|e| e.to_string())
}

/// Writes a transformers T5 tokenizer folder.
pub fn save(ctx: &NodeContext, dir: &Path, tokenizer_json: &str) -> std::io::Result<()> {
    let config = json!({
        "tokenizer_class": "T5Tokenizer",
        "model_max_length": 120,
        "extra_ids": 0,
        "pad_token": "<pad>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "additional_special_tokens": [],
    });
    let special = json!({"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"});
    model_folder::write(
        ctx,
        dir,
        &[
            ("tokenizer.json", tokenizer_json.as_bytes().to_vec()),
            ("tokenizer_config.json", config.to_string().into_bytes()),
            ("special_tokens_map.json", special.to_string().into_bytes()),
        ],
    )
}

pub struct TrainTokenizer {
    spec: NodeSpec,
}

impl TrainTokenizer {
    fn new() -> Self {
        TrainTokenizer {
            spec: NodeSpec::new("tokenizer.train", 1)
                .category("training")
                .describe(
                    "Learns a T5-style SentencePiece Unigram tokenizer (<pad> 0, </s> 1, <unk> 2, </s> \
                     appended) from a dataset's captions and writes a transformers tokenizer folder \
                     (tokenizer.json, tokenizer_config.json, special_tokens_map.json).",
                )
                .input(InputSpec::new("dataset", PortType::Dataset))
                .input(
                    InputSpec::new("vocab_size", PortType::Int)
                        .default(128)
                        .min(8.0)
                        .max(1e6)
                        .describe("At most this many pieces (fewer when the captions need fewer)."),
                )
                .input(InputSpec::new("out", PortType::Path).describe("The tokenizer folder to write."))
                .output("tokenizer", PortType::Tokenizer, "the trained tokenizer")
                .output("path", PortType::Path, "its folder")
                .output("vocab_size", PortType::Int, "pieces in its vocabulary"),
        }
    }
}

impl Node for TrainTokenizer {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn run(&self, ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        let ds = inputs.handle::<Dataset>("dataset")?;
        let out = ctx.output_path(inputs.path("out")?)?;
        let texts: Vec<String> = ds.items.iter().map(|i| i.caption.clone()).collect();
        let json = train(&texts, inputs.int("vocab_size")? as u32).map_err(NodeError::msg)?;
        save(ctx, &out, &json).map_err(|e| NodeError::io(&out, e))?;
        let tok = T5Tokenizer::from_folder(&out).map_err(NodeError::msg)?;
        let size = tok.vocab_size() as i64;
        Ok(Outputs::one(
            "tokenizer",
            Value::Handle(Handle::new(PortType::Tokenizer, json.len(), tok)),
        )
        .with("path", Value::Path(out))
        .with("vocab_size", Value::Int(size)))
    }
}

pub fn nodes() -> Vec<Arc<dyn Node>> {
    vec![Arc::new(TrainTokenizer::new())]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_whole_words_with_t5_ids_and_is_deterministic() {
        let texts: Vec<String> = (0..200)
            .map(|i| {
                format!(
                    "a {} {} circle on the left on a {} background",
                    ["small", "large"][i % 2],
                    ["red", "green", "blue"][i % 3],
                    ["white", "black"][i % 2]
                )
            })
            .collect();
        let a = train(&texts, 64).unwrap();
        assert_eq!(a, train(&texts, 64).unwrap());
        let dir = std::env::temp_dir().join(format!("tok-train-{}", std::process::id()));
        save(&NodeContext::detached(&dir, &dir), &dir, &a).unwrap();
        let tok = T5Tokenizer::from_folder(&dir).unwrap();
        let e = tok.encode("A Red circle", 6).unwrap();
        // ▁a ▁red ▁circle </s> <pad> <pad>: whole words
        assert_eq!(e.mask, vec![1, 1, 1, 1, 0, 0]);
        assert_eq!(&e.ids[3..], &[1, 0, 0]);
        assert!(e.ids[..3].iter().all(|&i| i > 2), "{:?}", e.ids);
        // An unseen word falls back to characters.
        let e = tok.encode("cab", 8).unwrap();
        assert!(e.mask.iter().sum::<u32>() >= 3);
        std::fs::remove_dir_all(dir).unwrap();
    }
}

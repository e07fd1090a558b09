//! The T5 tokenizer as PixArt-α's pipeline uses it: lower-case and strip the text
//! (the pipeline's behaviour without bs4/ftfy), append `</s>`, truncate and pad to
//! a fixed length, with an attention mask.
//!
//! Reads `tokenizer.json`; without one, builds the same Unigram tokenizer from the
//! SentencePiece `spiece.model` (as transformers' converter does).

use crate::weights::LoadError;
use std::path::Path;
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::precompiled::Precompiled;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

pub struct T5Tokenizer {
    inner: Tokenizer,
    pad_id: u32,
    /// The tokenizer set up for each max_length asked for (truncation + padding).
    fixed: std::sync::Mutex<std::collections::HashMap<usize, Tokenizer>>,
    /// Tokens a prompt is padded to unless a node says otherwise: the pipeline's
    /// (PixArt-α 120, PixArt-Σ 300).
    sequence_length: usize,
}

/// PixArt-α's prompt length, the default where no pipeline says otherwise.
pub const ALPHA_SEQUENCE_LENGTH: usize = 120;
/// PixArt-Σ's (`max_sequence_length` of `PixArtSigmaPipeline`).
pub const SIGMA_SEQUENCE_LENGTH: usize = 300;

/// Token ids and mask of one text, both `max_length` long.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub mask: Vec<u32>,
}

impl T5Tokenizer {
    pub fn from_folder(dir: &Path) -> Result<T5Tokenizer, LoadError> {
        let json = dir.join("tokenizer.json");
        let spm = dir.join("spiece.model");
        let inner = if json.is_file() {
            Tokenizer::from_file(&json)
                .map_err(|e| LoadError::file(&json, format!("not a readable tokenizer: {e}")))?
        } else if spm.is_file() {
            let bytes = std::fs::read(&spm).map_err(|e| LoadError::file(&spm, e))?;
            from_sentencepiece(&bytes, extra_ids(dir)).map_err(|e| LoadError::file(&spm, e))?
        } else {
            return Err(LoadError::file(dir, "no tokenizer.json or spiece.model"));
        };
        let pad_id = inner.token_to_id("<pad>").unwrap_or(0);
        Ok(T5Tokenizer {
            inner,
            pad_id,
            fixed: Default::default(),
            sequence_length: ALPHA_SEQUENCE_LENGTH,
        })
    }

    /// Sets the prompt length the pipeline this tokenizer belongs to uses.
    pub fn with_sequence_length(mut self, tokens: usize) -> T5Tokenizer {
        self.sequence_length = tokens;
        self
    }

    /// The prompt length of this tokenizer's pipeline.
    pub fn sequence_length(&self) -> usize {
        self.sequence_length
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Tokenizes as `tokenizer(text.lower().strip(), padding="max_length",
    /// max_length=…, truncation=True, add_special_tokens=True)`.
    pub fn encode(&self, text: &str, max_length: usize) -> Result<Encoded, String> {
        let text = text.to_lowercase();
        let mut fixed = self.fixed.lock().unwrap_or_else(|e| e.into_inner());
        let tok = match fixed.entry(max_length) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let mut tok = self.inner.clone();
                tok.with_truncation(Some(TruncationParams {
                    max_length,
                    ..Default::default()
                }))
                .map_err(|e| e.to_string())?;
                tok.with_padding(Some(PaddingParams {
                    strategy: PaddingStrategy::Fixed(max_length),
                    pad_id: self.pad_id,
                    pad_token: "<pad>".into(),
                    ..Default::default()
                }));
                e.insert(tok)
            }
        };
        let enc = tok.encode(text.trim(), true).map_err(|e| e.to_string())?;
        Ok(Encoded {
            ids: enc.get_ids().to_vec(),
            mask: enc.get_attention_mask().to_vec(),
        })
    }
}

/// How many `<extra_id_N>` tokens the slow tokenizer appends (tokenizer_config.json).
fn extra_ids(dir: &Path) -> usize {
    let Ok(text) = std::fs::read_to_string(dir.join("tokenizer_config.json")) else {
        return 100;
    };
    let Ok(cfg) = serde_json::from_str::<serde_json::Value>(&text) else {
        return 100;
    };
    if let Some(n) = cfg.get("extra_ids").and_then(|v| v.as_u64()) {
        return n as usize;
    }
    cfg.get("additional_special_tokens")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter(|t| t.as_str().is_some_and(|s| s.starts_with("<extra_id_")))
                .count()
        })
        .unwrap_or(100)
}

/// The fields of a SentencePiece `ModelProto` a T5 tokenizer needs.
struct SpmModel {
    pieces: Vec<(String, f64, i64)>,
    charsmap: Vec<u8>,
}

/// Builds what transformers' T5 converter builds from a SentencePiece model.
fn from_sentencepiece(bytes: &[u8], extra_ids: usize) -> Result<Tokenizer, String> {
    let spm = parse_spm(bytes)?;
    const UNKNOWN: i64 = 2;
    let unk = spm.pieces.iter().position(|(_, _, kind)| *kind == UNKNOWN);
    let vocab: Vec<(String, f64)> = spm.pieces.iter().map(|(p, s, _)| (p.clone(), *s)).collect();
    let n = vocab.len();
    let eos = spm
        .pieces
        .iter()
        .position(|(p, _, _)| p == "</s>")
        .ok_or("the model has no </s>")?;
    let model = Unigram::from(vocab, unk, false).map_err(|e| e.to_string())?;
    let mut tok = Tokenizer::new(model);
    // transformers 5's conversion: the model's precompiled normalisation, then
    // whitespace split and SentencePiece's ▁ prefix on every word.
    if !spm.charsmap.is_empty() {
        let pre =
            Precompiled::from(&spm.charsmap).map_err(|e| format!("precompiled charsmap: {e}"))?;
        tok.with_normalizer(Some(pre)).map_err(|e| e.to_string())?;
    }
    t5_pipeline(&mut tok, eos as u32)?;
    // The pieces that transformers registers as special, so a literal "</s>" in a
    // prompt is that token, as with tokenizer.json.
    let known: Vec<AddedToken> = ["<pad>", "</s>", "<unk>"]
        .iter()
        .filter(|t| spm.pieces.iter().any(|(p, _, _)| p == *t))
        .map(|t| AddedToken::from(t.to_string(), true))
        .collect();
    tok.add_special_tokens(known).map_err(|e| e.to_string())?;
    // <extra_id_0> is the last id, <extra_id_{k-1}> the first after the pieces.
    let extras: Vec<AddedToken> = (0..extra_ids)
        .rev()
        .map(|i| AddedToken::from(format!("<extra_id_{i}>"), true))
        .collect();
    tok.add_special_tokens(extras).map_err(|e| e.to_string())?;
    if tok.get_vocab_size(true) != n + extra_ids {
        return Err("cannot add the <extra_id_N> tokens".into());
    }
    Ok(tok)
}

/// T5's pipeline around a Unigram model: whitespace split, SentencePiece's
/// `▁` prefix on every word (and back when decoding), `</s>` appended.
pub fn t5_pipeline(tok: &mut Tokenizer, eos: u32) -> Result<(), String> {
    let words: Vec<PreTokenizerWrapper> = vec![
        WhitespaceSplit.into(),
        Metaspace::new('▁', PrependScheme::Always, true).into(),
    ];
    tok.with_pre_tokenizer(Some(PreTokenizerSequence::new(words)));
    tok.with_decoder(Some(tokenizers::decoders::metaspace::Metaspace::new(
        '▁',
        PrependScheme::Always,
        true,
    )));
    let post = TemplateProcessing::builder()
        .try_single("$A </s>")
        .map_err(|e| e.to_string())?
        .special_tokens(vec![("</s>".to_string(), eos)])
        .build()
        .map_err(|e| e.to_string())?;
    tok.with_post_processor(Some(post));
    Ok(())
}

fn read_varint(buf: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *buf.get(*pos).ok_or("truncated protobuf")?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("bad varint".into())
}

/// One protobuf field: number, bytes (length-delimited or fixed) and varint value.
type Field<'a> = (u64, &'a [u8], u64);

/// The fields of one protobuf message.
fn fields(buf: &[u8]) -> Result<Vec<Field<'_>>, String> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let key = read_varint(buf, &mut pos)?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                let v = read_varint(buf, &mut pos)?;
                out.push((field, &buf[0..0], v));
            }
            1 => {
                let end = pos + 8;
                let b = buf.get(pos..end).ok_or("truncated protobuf")?;
                out.push((field, b, 0));
                pos = end;
            }
            2 => {
                let len = read_varint(buf, &mut pos)? as usize;
                let end = pos.checked_add(len).ok_or("bad length")?;
                let b = buf.get(pos..end).ok_or("truncated protobuf")?;
                out.push((field, b, 0));
                pos = end;
            }
            5 => {
                let end = pos + 4;
                let b = buf.get(pos..end).ok_or("truncated protobuf")?;
                out.push((field, b, 0));
                pos = end;
            }
            w => return Err(format!("unsupported protobuf wire type {w}")),
        }
    }
    Ok(out)
}

fn parse_spm(bytes: &[u8]) -> Result<SpmModel, String> {
    let mut pieces = Vec::new();
    let mut charsmap = Vec::new();
    for (field, payload, _) in
        fields(bytes).map_err(|e| format!("not a SentencePiece model: {e}"))?
    {
        match field {
            1 => {
                let (mut piece, mut score, mut kind) = (String::new(), 0f64, 1i64);
                for (f, p, v) in fields(payload)? {
                    match f {
                        1 => piece = String::from_utf8(p.to_vec()).map_err(|e| e.to_string())?,
                        2 => {
                            score = f64::from(f32::from_le_bytes(
                                p.try_into().map_err(|_| "bad score")?,
                            ))
                        }
                        3 => kind = v as i64,
                        _ => {}
                    }
                }
                pieces.push((piece, score, kind));
            }
            3 => {
                for (f, p, _) in fields(payload)? {
                    if f == 2 {
                        charsmap = p.to_vec();
                    }
                }
            }
            _ => {}
        }
    }
    if pieces.is_empty() {
        return Err("not a SentencePiece model: no pieces".into());
    }
    Ok(SpmModel { pieces, charsmap })
}

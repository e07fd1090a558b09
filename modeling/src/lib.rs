//! PixArt-α's models on candle, as candle-transformers is to candle-examples: the
//! code a Rust program needs to run (or train) the models without pixart-flow's
//! runtime. One file a model, each with a `Config` read from the checkpoint's
//! `config.json` and modules named after the checkpoint's weight prefixes;
//! `kernels` holds the fused CPU ops they share, `schedulers` the samplers.
//!
//! This crate depends on no other crate of the workspace (the compiler enforces
//! what the folder layout only suggests).

pub mod clip_image;
pub mod kernels;
pub mod llava;
pub mod lora;
pub mod mapped;
pub mod pixart;
pub mod safetensors_reader;
pub mod schedulers;
pub mod t5;
pub mod tokenizer;
pub mod vae;
pub mod weights;

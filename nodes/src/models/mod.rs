//! The models behind the PixArt-α nodes, on candle. One file a model; each has a
//! `Config` read from the checkpoint's `config.json` and modules named after the
//! checkpoint's weight prefixes.

pub mod cache;
pub mod clip_image;
pub mod conv_ops;
pub mod fast_ops;
pub mod llava;
pub mod pixart;
pub mod t5;
pub mod tokenizer;
pub mod train_ops;
pub mod vae;
pub mod weights;

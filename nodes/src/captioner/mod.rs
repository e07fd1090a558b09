//! The captioner: dense captions from a LLaVA-1.5 vision-language model, the
//! paper's third idea ("high-informative data"), and dataset relabelling.

pub mod chat_template;
pub mod model;
pub mod nodes;
pub mod stats;

pub use model::{read_rgb, Caption, Captioner, Generation};

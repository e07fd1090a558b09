//! The captioner: dense captions from a LLaVA-1.5 vision-language model, the
//! paper's third idea ("high-informative data").

pub mod model;

pub use model::{Caption, Captioner, Generation};

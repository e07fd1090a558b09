//! Training PixArt-α: data, feature cache, loss, optimiser, the trainer node.

pub mod buckets;
pub mod checkpoint;
pub mod data_parallel;
pub mod dataset;
pub mod loss;
pub mod model;
pub mod model_folder;
pub mod optim;
pub mod pipeline_save;
pub mod precompute;
pub mod preview;
pub mod rng;
pub mod step;
pub mod t5_init;
pub mod tokenizer_train;
pub mod trainer;
pub mod vae_train;

//! Training PixArt-α: data, feature cache, loss, optimiser, the trainer node.

pub mod buckets;
pub mod checkpoint;
pub mod dataset;
pub mod loss;
pub mod model;
pub mod optim;
pub mod precompute;
pub mod preview;
pub mod rng;
pub mod step;
pub mod trainer;

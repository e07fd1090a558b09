//! Training PixArt-α (in progress): data, feature cache, loss, optimiser.

pub mod dataset;
pub mod loss;
pub mod optim;
pub mod precompute;

//! Training PixArt-α (issue in progress): the data side so far.

pub mod dataset;
pub mod loss;
pub mod optim;

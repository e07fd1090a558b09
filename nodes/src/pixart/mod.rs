//! PixArt-α text-to-image: loading, sampling, and the nodes.

pub mod binning;
pub mod load;
pub mod nodes;
pub mod sample;

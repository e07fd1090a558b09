//! The shapes world: a procedural dataset where success is measurable. It
//! trains the default model and scores any model with a deterministic detector.

pub mod detect;
pub mod nodes;
pub mod world;

//! pixart-flow's built-in nodes. Each module declares its nodes in one place
//! (a `NodeSpec` built in the node's constructor) and implements them.

pub mod captioner;
pub mod device;
pub mod distributed;
pub mod edges;
pub mod fsutil;
pub mod image_io;
pub mod image_ops;
pub mod literal;
pub mod math;
pub mod model_cache;
pub mod noise;
pub mod pixart;
pub mod plot;
pub mod shapes;
pub mod tensor_io;
pub mod text;
pub mod training;

use pixart_runtime::registry::{Registry, RegistryError};
use pixart_runtime::Node;
use std::sync::Arc;

/// Every built-in node, one instance each.
pub fn builtin_nodes() -> Vec<Arc<dyn Node>> {
    let mut nodes: Vec<Arc<dyn Node>> = Vec::new();
    nodes.extend(literal::nodes());
    nodes.extend(math::nodes());
    nodes.extend(text::nodes());
    nodes.extend(tensor_io::nodes());
    nodes.extend(image_io::nodes());
    nodes.extend(image_ops::nodes());
    nodes.extend(edges::nodes());
    nodes.extend(noise::nodes());
    nodes.extend(pixart::nodes::nodes());
    nodes.extend(pixart::lora::nodes());
    nodes.extend(pixart::controlnet::nodes());
    nodes.extend(training::dataset::nodes());
    nodes.extend(training::precompute::nodes());
    nodes.extend(training::trainer::nodes());
    nodes.extend(training::tokenizer_train::nodes());
    nodes.extend(training::t5_init::nodes());
    nodes.extend(training::vae_train::nodes());
    nodes.extend(training::pipeline_save::nodes());
    nodes.extend(shapes::nodes::nodes());
    nodes.extend(plot::nodes());
    nodes.extend(captioner::nodes::nodes());
    nodes
}

pub fn register_builtins(registry: &mut Registry) -> Result<(), RegistryError> {
    builtin_nodes()
        .into_iter()
        .try_for_each(|n| registry.register(n))
}

/// A registry holding the built-in nodes.
pub fn builtin_registry() -> Registry {
    let mut registry = Registry::new();
    // Built-in declarations are checked by the tests; a failure here is a bug of ours.
    register_builtins(&mut registry).expect("built-in node declarations are valid");
    registry
}

//! Constants as nodes: one value fanned out to several inputs, or a widget in the editor.

use pixart_runtime::{
    InputSpec, Inputs, Node, NodeContext, NodeError, NodeSpec, Outputs, PortType,
};
use std::sync::Arc;

pub struct Literal {
    spec: NodeSpec,
}

impl Literal {
    fn new(name: &str, ty: PortType, what: &str) -> Literal {
        Literal {
            spec: NodeSpec::new(name, 1)
                .category("literal")
                .describe(&format!("A constant {what}."))
                .input(InputSpec::new("value", ty.clone()).describe("The value."))
                .output("value", ty, "The same value.")
                .inline(),
        }
    }
}

impl Node for Literal {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    fn run(&self, _ctx: &NodeContext, mut inputs: Inputs) -> Result<Outputs, NodeError> {
        let value = inputs
            .take("value")
            .ok_or_else(|| NodeError::input("value", "no value was given"))?;
        Ok(Outputs::one("value", value))
    }
}

pub fn nodes() -> Vec<Arc<dyn Node>> {
    vec![
        Arc::new(Literal::new("literal.int", PortType::Int, "integer")),
        Arc::new(Literal::new("literal.float", PortType::Float, "number")),
        Arc::new(Literal::new("literal.bool", PortType::Bool, "boolean")),
        Arc::new(Literal::new("literal.string", PortType::String, "string")),
        Arc::new(Literal::new("literal.path", PortType::Path, "file path")),
    ]
}

//! pixart-flow's engine: typed node declarations, workflow loading and validation,
//! and the DAG executor. It knows nothing of models: nodes bring those.

pub mod budget;
pub mod confine;
pub mod events;
pub mod executor;
pub mod export;
pub mod float_env;
pub mod fsutil;
pub mod node;
pub mod registry;
pub mod server;
pub mod spec;
pub mod types;
pub mod value;
pub mod workflow;

pub use events::Event;
pub use executor::{CachePolicy, Executor, NodeStatus, RunOptions, RunReport};
pub use node::{Inputs, Node, NodeContext, NodeError, Outputs};
pub use registry::Registry;
pub use spec::{known_count, InputSpec, NodeSpec, OutputSpec};
pub use types::PortType;
pub use value::{Conditioning, Handle, Latents, Value};
pub use workflow::{load_workflow, load_workflow_file, LoadOptions, Workflow, WorkflowError};

/// Re-exported so nodes and tests use the same tensor type as the runtime.
pub use candle_core;
pub use tokio_util::sync::CancellationToken;

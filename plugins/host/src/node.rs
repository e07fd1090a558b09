//! A plugin's node as the runtime sees it: a [`Node`] whose `run` calls into a
//! fresh sandbox.

use crate::limits::{Cancelled, Limits, MemoryLimit, OutputLimit};
use crate::state::{begin_call, end_call, new_store};
use crate::{Bindings, Described, Live, PluginError, RunFailure};
use pixart_runtime::{Inputs, Node, NodeContext, NodeError, NodeSpec, Outputs};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use wasmtime::Trap;

/// Idle instances kept per plugin for reuse.
const MAX_IDLE: usize = 4;

/// What the nodes of one plugin share.
pub(crate) struct Shared {
    pub id: String,
    pub bindings: Bindings,
    pub limits: Limits,
    pub read_dir: Option<PathBuf>,
    pub fingerprint: String,
    /// Instances that finished a call cleanly, ready for the next one.
    pub idle: Mutex<Vec<Live>>,
}

impl Shared {
    fn checkout(&self) -> wasmtime::Result<Live> {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match idle {
            Some(live) => Ok(live),
            None => {
                self.bindings
                    .instantiate(new_store(&self.id, &self.limits, self.read_dir.clone()))
            }
        }
    }

    fn give_back(&self, mut live: Live) {
        end_call(live.store());
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(live);
        }
    }
}

pub struct PluginNode {
    shared: Arc<Shared>,
    /// The node's name inside its plugin (without the `id/` prefix).
    name: String,
    spec: NodeSpec,
}

impl PluginNode {
    pub(crate) fn new(shared: Arc<Shared>, name: String, spec: NodeSpec) -> PluginNode {
        PluginNode { shared, name, spec }
    }

    /// The id of the plugin this node comes from.
    pub fn plugin(&self) -> &str {
        &self.shared.id
    }

    fn fail(&self, message: impl std::fmt::Display) -> NodeError {
        NodeError::msg(format!(
            "plugin `{}`, node `{}`: {message}",
            self.shared.id, self.name
        ))
    }
}

impl Node for PluginNode {
    fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    /// The plugin file's hash: a rebuilt plugin never reuses cached results.
    fn fingerprint(&self, _ctx: &NodeContext, _inputs: &Inputs) -> Option<String> {
        Some(self.shared.fingerprint.clone())
    }

    fn run(&self, ctx: &NodeContext, inputs: Inputs) -> Result<Outputs, NodeError> {
        ctx.check_cancelled()?;
        let values: Vec<(String, pixart_runtime::Value)> = inputs
            .values()
            .filter_map(|(name, v)| v.map(|v| (name.to_string(), v.clone())))
            .collect();
        let mut live = match self.shared.checkout() {
            Ok(live) => live,
            Err(e) => return Err(self.fail(format!("cannot start: {e}"))),
        };
        begin_call(live.store(), &self.shared.limits, Some(ctx.clone()));
        let result = live.run(&self.name, values);
        let values = match result {
            Ok(outcome) => {
                // The call returned normally: the instance is sound for reuse.
                self.shared.give_back(live);
                match outcome {
                    Ok(values) => values,
                    Err(RunFailure::BadInput(port, message)) => {
                        return Err(NodeError::input(&port, self.fail(message)))
                    }
                    Err(RunFailure::Cancelled) => return Err(NodeError::Cancelled),
                    Err(RunFailure::Failed(message) | RunFailure::Malformed(message)) => {
                        return Err(self.fail(message))
                    }
                }
            }
            // A trap poisons the instance: it is dropped here.
            Err(e) => {
                let last_error = live.store().data().last_error.clone();
                return Err(match trap_message(&e, &self.shared.limits, &last_error) {
                    None => NodeError::Cancelled,
                    Some(message) => self.fail(message),
                });
            }
        };
        self.check_outputs(values)
    }
}

impl PluginNode {
    /// Every declared output, once, of its declared type: a plugin cannot hand
    /// the graph something other than what it promised.
    fn check_outputs(
        &self,
        values: Vec<(String, pixart_runtime::Value)>,
    ) -> Result<Outputs, NodeError> {
        let mut out = Outputs::new();
        for (name, value) in values {
            let Some(spec) = self.spec.outputs.iter().find(|o| o.name == name) else {
                return Err(self.fail(format!("returned an undeclared output `{name}`")));
            };
            if out.0.iter().any(|(n, _)| *n == name) {
                return Err(self.fail(format!("returned output `{name}` twice")));
            }
            let value = value.coerce(&spec.ty).map_err(|v| {
                self.fail(format!(
                    "output `{name}` should be {}, the plugin returned {}",
                    spec.ty,
                    v.kind_name()
                ))
            })?;
            out.0.push((name, value));
        }
        if let Some(missing) = self
            .spec
            .outputs
            .iter()
            .find(|o| !out.0.iter().any(|(n, _)| *n == o.name))
        {
            return Err(self.fail(format!("returned no `{}` output", missing.name)));
        }
        Ok(out)
    }
}

/// Calls the plugin's `describe` in a sandbox of its own.
pub(crate) fn describe(
    bindings: &Bindings,
    limits: &Limits,
    path: &Path,
) -> Result<Described, PluginError> {
    let mut store = new_store("(loading)", limits, None);
    begin_call(&mut store, limits, None);
    let result = bindings
        .instantiate(store)
        .and_then(|mut live| live.describe().map(|r| (r, live)));
    let message = match result {
        Ok((Ok(described), _)) => return Ok(described),
        Ok((Err(message), _)) => format!("declares a bad node: {message}"),
        Err(e) => format!(
            "failed while describing itself: {}",
            trap_message(&e, limits, &None).unwrap_or("cancelled".into())
        ),
    };
    Err(PluginError::invalid(path, message))
}

/// A readable reason for an error out of wasm; `None` when it was a cancellation.
fn trap_message(
    e: &wasmtime::Error,
    limits: &Limits,
    last_error: &Option<String>,
) -> Option<String> {
    if e.downcast_ref::<Cancelled>().is_some() {
        return None;
    }
    if let Some(m) = e.downcast_ref::<MemoryLimit>() {
        return Some(m.to_string());
    }
    if let Some(o) = e.downcast_ref::<OutputLimit>() {
        return Some(o.to_string());
    }
    Some(match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => format!(
            "ran longer than its time limit of {:.1} s",
            limits.timeout.as_secs_f64()
        ),
        Some(Trap::UnreachableCodeReached) => match last_error {
            Some(message) => format!("panicked: {message}"),
            None => "trapped: reached unreachable code (a panic or abort)".into(),
        },
        Some(Trap::StackOverflow) => "overflowed its stack".into(),
        Some(trap) => format!("trapped: {trap}"),
        None => format!("failed: {e}"),
    })
}

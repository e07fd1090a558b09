//! pixart-flow's plugin host: third-party nodes as sandboxed WebAssembly
//! components.
//!
//! A plugin is a component built against a versioned WIT interface
//! (`plugins/wit/<version>/`). The host reads which version from the
//! component's exports, keeps bindings for each supported version (`v0_1`, …),
//! asks the plugin to describe its nodes, and registers them in the runtime's
//! registry under `plugin-id/node.name`, where they are indistinguishable from
//! built-ins. Each node run gets a fresh sandbox with a time limit, a memory
//! limit and an output limit; a plugin imports nothing but the host's small API
//! (log, progress, cancellation) and, when granted, read-only access to one
//! folder.

mod cache;
mod engine;
mod error;
mod limits;
mod node;
mod state;
mod v0_1;
pub mod version;

pub use cache::default_dir as default_cache_dir;
pub use error::PluginError;
pub use limits::Limits;
pub use node::PluginNode;

use pixart_runtime::{NodeSpec, Registry};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// How to load one plugin.
#[derive(Clone, Debug, Default)]
pub struct PluginOptions {
    pub limits: Limits,
    /// A folder the plugin may read (through `pixart:plugin/files`).
    pub read_dir: Option<PathBuf>,
}

/// The bindings of one supported interface version (Zed's pattern: one module
/// per version, the host dispatching on what the plugin was built for).
#[derive(Clone)]
pub(crate) enum Bindings {
    V0_1(v0_1::Bindings),
}

/// A live instance of one of the supported versions.
pub(crate) enum Live {
    V0_1(v0_1::Live),
}

impl Bindings {
    pub(crate) fn instantiate(
        &self,
        store: wasmtime::Store<state::StoreState>,
    ) -> wasmtime::Result<Live> {
        match self {
            Bindings::V0_1(b) => b.instantiate(store).map(Live::V0_1),
        }
    }
}

impl Live {
    pub(crate) fn store(&mut self) -> &mut wasmtime::Store<state::StoreState> {
        match self {
            Live::V0_1(l) => &mut l.store,
        }
    }

    pub(crate) fn run(
        &mut self,
        node: &str,
        inputs: Vec<(String, pixart_runtime::Value)>,
    ) -> wasmtime::Result<Result<Vec<(String, pixart_runtime::Value)>, RunFailure>> {
        match self {
            Live::V0_1(l) => l.run(node, inputs),
        }
    }

    pub(crate) fn describe(&mut self) -> wasmtime::Result<Result<Described, String>> {
        match self {
            Live::V0_1(l) => l.describe(),
        }
    }
}

/// What a plugin says about itself, in the runtime's terms.
pub(crate) struct Described {
    pub id: String,
    pub version: String,
    pub description: String,
    /// (name inside the plugin, declaration with the namespaced name)
    pub nodes: Vec<(String, NodeSpec)>,
}

/// How a plugin's run ended when it did not trap.
pub(crate) enum RunFailure {
    BadInput(String, String),
    Cancelled,
    Failed(String),
    /// The plugin returned values the host cannot accept.
    Malformed(String),
}

/// A loaded plugin: its identity and nodes, ready to register.
pub struct Plugin {
    pub id: String,
    pub version: String,
    pub description: String,
    pub path: PathBuf,
    /// The interface version it was built for.
    pub interface: version::Version,
    /// blake3 of the component file.
    pub hash: String,
    pub nodes: Vec<Arc<PluginNode>>,
}

impl Plugin {
    /// Registers every node; the first clash (e.g. two plugins with one id) is
    /// an error naming the plugin.
    pub fn register(&self, registry: &mut Registry) -> Result<(), PluginError> {
        for node in &self.nodes {
            registry
                .register(node.clone())
                .map_err(|e| PluginError::Plugin {
                    plugin: self.id.clone(),
                    path: self.path.clone(),
                    message: e.to_string(),
                })?;
        }
        Ok(())
    }
}

/// Loads plugins and remembers compiled components (in memory, and on disk in
/// the cache folder when one is set).
pub struct PluginHost {
    cache_dir: Option<PathBuf>,
    compiled: Mutex<HashMap<blake3::Hash, wasmtime::component::Component>>,
}

impl Default for PluginHost {
    fn default() -> PluginHost {
        PluginHost::new(default_cache_dir())
    }
}

impl PluginHost {
    /// A host caching compiled plugins under `cache_dir` (`None`: in memory only).
    pub fn new(cache_dir: Option<PathBuf>) -> PluginHost {
        PluginHost {
            cache_dir,
            compiled: Mutex::new(HashMap::new()),
        }
    }

    /// Loads one component file.
    pub fn load(&self, path: &Path, options: PluginOptions) -> Result<Plugin, PluginError> {
        let bytes = std::fs::read(path).map_err(|source| PluginError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        self.load_bytes(path, &bytes, options)
    }

    /// Loads a component from its bytes (`path` names it in messages).
    pub fn load_bytes(
        &self,
        path: &Path,
        bytes: &[u8],
        options: PluginOptions,
    ) -> Result<Plugin, PluginError> {
        check_header(bytes).map_err(|m| PluginError::invalid(path, m))?;
        let hash = blake3::hash(bytes);
        let component = self
            .component(&hash, bytes)
            .map_err(|e| PluginError::invalid(path, format!("not a valid component: {e}")))?;
        let engine = engine::engine();
        let interface =
            version::detect(engine, &component).map_err(|m| PluginError::invalid(path, m))?;
        let bindings = match (interface.major, interface.minor) {
            (0, 1) => Bindings::V0_1(
                v0_1::Bindings::new(&component).map_err(|m| PluginError::invalid(path, m))?,
            ),
            _ => unreachable!("version::detect returns only supported versions"),
        };
        let read_dir = options.read_dir.clone();
        let described = node::describe(&bindings, &options.limits, path)?;
        if !spec_id_ok(&described.id) {
            return Err(PluginError::invalid(
                path,
                format!(
                    "plugin id {:?} must be lower-case letters, digits, '_' or '-'",
                    described.id
                ),
            ));
        }
        let shared = Arc::new(node::Shared {
            id: described.id.clone(),
            bindings,
            limits: options.limits,
            read_dir,
            fingerprint: format!("{}:{}", hash.to_hex(), interface),
            idle: Mutex::new(Vec::new()),
        });
        let nodes = described
            .nodes
            .into_iter()
            .map(|(name, spec)| Arc::new(PluginNode::new(shared.clone(), name, spec)))
            .collect();
        Ok(Plugin {
            id: described.id,
            version: described.version,
            description: described.description,
            path: path.to_path_buf(),
            interface,
            hash: hash.to_hex().to_string(),
            nodes,
        })
    }

    /// Loads every `*.wasm` in `dir` (sorted by name). A plugin that fails to
    /// load is reported in the second list and does not stop the others.
    pub fn load_dir(&self, dir: &Path) -> Result<(Vec<Plugin>, Vec<PluginError>), PluginError> {
        let entries = std::fs::read_dir(dir).map_err(|source| PluginError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "wasm") && p.is_file())
            .collect();
        files.sort();
        let (mut ok, mut failed) = (Vec::new(), Vec::new());
        for file in files {
            match self.load(&file, PluginOptions::default()) {
                Ok(plugin) => ok.push(plugin),
                Err(e) => failed.push(e),
            }
        }
        Ok((ok, failed))
    }

    fn component(
        &self,
        hash: &blake3::Hash,
        bytes: &[u8],
    ) -> wasmtime::Result<wasmtime::component::Component> {
        let mut compiled = self.compiled.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = compiled.get(hash) {
            return Ok(c.clone());
        }
        let component = cache::compile(engine::engine(), self.cache_dir.as_deref(), hash, bytes)?;
        compiled.insert(*hash, component.clone());
        Ok(component)
    }
}

/// Refuses what is not a component before wasmtime sees it: precompiled
/// artefacts (loading one runs native code) and core modules.
fn check_header(bytes: &[u8]) -> Result<(), String> {
    if wasmtime::Engine::detect_precompiled(bytes).is_some() {
        return Err("is a precompiled artefact; plugins are loaded from .wasm components".into());
    }
    match bytes.get(..8) {
        Some([0, b'a', b's', b'm', 0x0d, 0, 1, 0]) => Ok(()),
        Some([0, b'a', b's', b'm', 1, 0, 0, 0]) => Err(
            "is a core WebAssembly module, not a component: link it with wasm-component-ld \
             (or run `wasm-tools component new`)"
                .into(),
        ),
        _ => Err("is not a WebAssembly component".into()),
    }
}

fn spec_id_ok(id: &str) -> bool {
    pixart_runtime::spec::is_identifier(id) && !id.chars().any(|c| c.is_ascii_uppercase())
}

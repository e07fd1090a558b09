//! Why a plugin could not be loaded.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("plugin `{plugin}` ({path}): {message}")]
    Plugin {
        plugin: String,
        path: PathBuf,
        message: String,
    },
}

impl PluginError {
    pub(crate) fn invalid(path: &std::path::Path, message: impl std::fmt::Display) -> PluginError {
        PluginError::Invalid {
            path: path.to_path_buf(),
            message: message.to_string(),
        }
    }
}

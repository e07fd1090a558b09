//! The catalog of node types: built-ins register here, and plugins through the
//! same call.

use crate::node::Node;
use crate::spec::NodeSpec;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("node type {0} is registered twice")]
    Duplicate(String),
    #[error("invalid node declaration: {0}")]
    InvalidSpec(String),
}

#[derive(Default, Clone)]
pub struct Registry {
    nodes: HashMap<String, BTreeMap<u32, Arc<dyn Node>>>,
}

/// Why a `type:` could not be resolved.
#[derive(Debug)]
pub enum LookupError {
    UnknownType { suggestion: Option<String> },
    UnknownVersion { available: Vec<u32> },
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    pub fn register(&mut self, node: Arc<dyn Node>) -> Result<(), RegistryError> {
        let spec = node.spec();
        spec.check().map_err(RegistryError::InvalidSpec)?;
        let versions = self.nodes.entry(spec.name.clone()).or_default();
        if versions.contains_key(&spec.version) {
            return Err(RegistryError::Duplicate(spec.id()));
        }
        versions.insert(spec.version, node);
        Ok(())
    }

    /// Resolves `name` or `name@version`; without a version, the newest.
    pub fn lookup(&self, type_name: &str) -> Result<Arc<dyn Node>, LookupError> {
        let (name, version) = match type_name.rsplit_once('@') {
            Some((name, v)) => (name, v.parse::<u32>().ok()),
            None => (type_name, None),
        };
        let Some(versions) = self.nodes.get(name) else {
            return Err(LookupError::UnknownType {
                suggestion: self.suggest(name),
            });
        };
        let found = match version {
            Some(v) => versions.get(&v),
            None if type_name.contains('@') => None,
            None => versions.values().next_back(),
        };
        found.cloned().ok_or_else(|| LookupError::UnknownVersion {
            available: versions.keys().copied().collect(),
        })
    }

    /// The closest registered name, if it is close enough to be a typo.
    pub fn suggest(&self, name: &str) -> Option<String> {
        closest(name, self.nodes.keys().map(String::as_str))
    }

    /// Every declaration, sorted by category then name then version.
    pub fn catalog(&self) -> Vec<&NodeSpec> {
        let mut specs: Vec<&NodeSpec> = self
            .nodes
            .values()
            .flat_map(|versions| versions.values().map(|n| n.spec()))
            .collect();
        specs.sort_by(|a, b| {
            (a.category.as_str(), a.name.as_str(), a.version).cmp(&(
                b.category.as_str(),
                b.name.as_str(),
                b.version,
            ))
        });
        specs
    }

    pub fn len(&self) -> usize {
        self.nodes.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

/// The candidate with the smallest edit distance to `word`, when that distance is
/// small relative to the word (a likely typo), else `None`.
pub fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let limit = (word.chars().count() / 3).max(2);
    candidates
        .into_iter()
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min()
        .map(|(_, c)| c.to_string())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_are_close_typos() {
        let names = ["noise.gaussian", "tensor.save", "tensor.load"];
        assert_eq!(
            closest("noise.gausian", names).as_deref(),
            Some("noise.gaussian")
        );
        assert_eq!(closest("tensor.sav", names).as_deref(), Some("tensor.save"));
        assert_eq!(closest("vae.decode", names), None);
    }
}

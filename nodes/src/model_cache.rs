//! Loaded models shared between nodes and runs, within a memory budget. This is
//! not the executor's output cache: it keys on what was loaded (files, dtype,
//! device), so two workflows loading the same checkpoint share one copy.

use candle_core::{DType, Device};
use std::any::Any;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

/// Cache key: what, where (canonical path + modification time), dtype, device.
pub fn key(kind: &str, path: &Path, dtype: DType, device: &Device) -> String {
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let stamp = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let device = match device {
        Device::Cpu => "cpu".into(),
        other => format!("{:?}", other.location()),
    };
    format!("{kind}|{}|{stamp}|{dtype:?}|{device}", canonical.display())
}

struct Entry {
    model: Arc<dyn Any + Send + Sync>,
    bytes: usize,
    last_used: u64,
}

pub struct ModelCache {
    entries: HashMap<String, Entry>,
    budget: usize,
    clock: u64,
}

/// The process-wide cache. Budget: `PIXART_MODEL_CACHE_MB` (default 16 GiB).
pub fn global() -> &'static Mutex<ModelCache> {
    static CACHE: OnceLock<Mutex<ModelCache>> = OnceLock::new();
    CACHE.get_or_init(|| {
        let mb = std::env::var("PIXART_MODEL_CACHE_MB")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(16 * 1024);
        Mutex::new(ModelCache::new(mb << 20))
    })
}

impl ModelCache {
    pub fn new(budget: usize) -> ModelCache {
        ModelCache {
            entries: HashMap::new(),
            budget,
            clock: 0,
        }
    }

    pub fn get<T: Any + Send + Sync>(&mut self, key: &str) -> Option<Arc<T>> {
        self.clock += 1;
        let entry = self.entries.get_mut(key)?;
        entry.last_used = self.clock;
        entry.model.clone().downcast::<T>().ok()
    }

    /// Keeps `model`, evicting the least recently used models beyond the budget
    /// (a model in use elsewhere stays alive through its other holders).
    pub fn insert<T: Any + Send + Sync>(&mut self, key: &str, model: Arc<T>, bytes: usize) {
        self.clock += 1;
        self.entries.insert(
            key.to_string(),
            Entry {
                model,
                bytes,
                last_used: self.clock,
            },
        );
        while self.entries.values().map(|e| e.bytes).sum::<usize>() > self.budget
            && self.entries.len() > 1
        {
            let oldest = self
                .entries
                .iter()
                .filter(|(k, _)| k.as_str() != key)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => {
                    self.entries.remove(&k);
                }
                None => break,
            }
        }
    }

    /// The bytes counted for the model under `key`, if it is cached.
    pub fn bytes(&self, key: &str) -> Option<usize> {
        self.entries.get(key).map(|e| e.bytes)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The cached model under `key`, or `load()`'s result, cached. `load` returns the
/// model and its size in bytes. The lock is not held while loading.
pub fn get_or_load<T, E>(
    key: &str,
    load: impl FnOnce() -> Result<(T, usize), E>,
) -> Result<Arc<T>, E>
where
    T: Any + Send + Sync,
{
    let lock = || global().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(model) = lock().get::<T>(key) {
        return Ok(model);
    }
    let (model, bytes) = load()?;
    let model = Arc::new(model);
    lock().insert(key, model.clone(), bytes);
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_beyond_budget() {
        let mut c = ModelCache::new(100);
        c.insert("a", Arc::new(1u8), 60);
        c.insert("b", Arc::new(2u8), 30);
        assert!(c.get::<u8>("a").is_some());
        c.insert("c", Arc::new(3u8), 30);
        assert!(c.get::<u8>("b").is_none(), "b was least recently used");
        assert_eq!(c.get::<u8>("a").as_deref(), Some(&1));
        assert!(c.get::<u16>("a").is_none(), "wrong type is a miss");
    }
}

//! The output cache: results of deterministic nodes keyed by what produced them
//! (ComfyUI's scheme), so a re-run recomputes only what a change affects.

use crate::value::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

pub type CacheKey = [u8; 32];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CachePolicy {
    /// Keep nothing between runs.
    None,
    /// Keep results until their total size exceeds `max_bytes`, dropping the least
    /// recently used first.
    Lru { max_bytes: usize },
}

impl Default for CachePolicy {
    fn default() -> Self {
        CachePolicy::Lru { max_bytes: 2 << 30 }
    }
}

struct Entry {
    outputs: Arc<[Value]>,
    bytes: usize,
    last_used: u64,
}

pub(crate) struct OutputCache {
    policy: CachePolicy,
    entries: HashMap<CacheKey, Entry>,
    by_age: BTreeMap<u64, CacheKey>,
    clock: u64,
    bytes: usize,
}

impl OutputCache {
    pub fn new(policy: CachePolicy) -> OutputCache {
        OutputCache {
            policy,
            entries: HashMap::new(),
            by_age: BTreeMap::new(),
            clock: 0,
            bytes: 0,
        }
    }

    pub fn get(&mut self, key: &CacheKey) -> Option<Arc<[Value]>> {
        let entry = self.entries.get_mut(key)?;
        self.clock += 1;
        self.by_age.remove(&entry.last_used);
        entry.last_used = self.clock;
        self.by_age.insert(self.clock, *key);
        Some(entry.outputs.clone())
    }

    pub fn insert(&mut self, key: CacheKey, outputs: Arc<[Value]>) {
        let CachePolicy::Lru { max_bytes } = self.policy else {
            return;
        };
        let bytes: usize = outputs.iter().map(Value::approx_bytes).sum::<usize>() + 64;
        if bytes > max_bytes {
            return;
        }
        self.remove(&key);
        self.clock += 1;
        self.entries.insert(
            key,
            Entry {
                outputs,
                bytes,
                last_used: self.clock,
            },
        );
        self.by_age.insert(self.clock, key);
        self.bytes += bytes;
        while self.bytes > max_bytes {
            let Some((_, oldest)) = self.by_age.pop_first() else {
                break;
            };
            if let Some(e) = self.entries.remove(&oldest) {
                self.bytes -= e.bytes;
            }
        }
    }

    fn remove(&mut self, key: &CacheKey) {
        if let Some(e) = self.entries.remove(key) {
            self.by_age.remove(&e.last_used);
            self.bytes -= e.bytes;
        }
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.by_age.clear();
        self.bytes = 0;
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn val(n: usize) -> Arc<[Value]> {
        Arc::from(vec![Value::String("x".repeat(n))])
    }

    #[test]
    fn evicts_least_recently_used_by_bytes() {
        let mut c = OutputCache::new(CachePolicy::Lru { max_bytes: 600 });
        c.insert([1; 32], val(100));
        c.insert([2; 32], val(100));
        c.insert([3; 32], val(100));
        assert_eq!(c.len(), 3);
        assert!(c.get(&[1; 32]).is_some()); // 1 is now the most recent
        c.insert([4; 32], val(100));
        assert!(c.get(&[2; 32]).is_none(), "2 was least recently used");
        assert!(c.get(&[1; 32]).is_some());
        assert!(c.bytes() <= 600);
        c.insert([5; 32], val(10_000));
        assert!(
            c.get(&[5; 32]).is_none(),
            "larger than the whole cache: not kept"
        );
    }

    #[test]
    fn none_policy_keeps_nothing() {
        let mut c = OutputCache::new(CachePolicy::None);
        c.insert([1; 32], val(1));
        assert!(c.get(&[1; 32]).is_none());
    }
}

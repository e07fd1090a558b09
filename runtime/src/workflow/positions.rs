//! Line and column of every key and value in a YAML document.
//!
//! serde_yaml gives values without positions; a second, event-level pass with
//! yaml-rust2 records where each path (`nodes` → `noise` → `inputs` → `seed`) sits,
//! so that every diagnostic can point at its line.

use super::diagnostics::Span;
use std::collections::HashMap;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

const SEP: char = '\u{1f}';

#[derive(Default, Debug)]
pub struct Positions {
    keys: HashMap<String, Span>,
    values: HashMap<String, Span>,
}

impl Positions {
    /// Indexes `source`; a document yaml-rust2 cannot read yields an empty index
    /// (serde_yaml reports the syntax error itself).
    pub fn index(source: &str) -> Positions {
        let mut builder = Builder::default();
        let mut parser = Parser::new_from_str(source);
        if parser.load(&mut builder, false).is_err() {
            return Positions::default();
        }
        builder.positions
    }

    /// Where the key at `path` is written (falls back to its value).
    pub fn key(&self, path: &[&str]) -> Option<Span> {
        let p = join(path);
        self.keys.get(&p).or_else(|| self.values.get(&p)).copied()
    }

    /// Where the value at `path` starts (falls back to its key).
    pub fn value(&self, path: &[&str]) -> Option<Span> {
        let p = join(path);
        self.values.get(&p).or_else(|| self.keys.get(&p)).copied()
    }
}

fn join(path: &[&str]) -> String {
    let mut s = String::new();
    for (i, part) in path.iter().enumerate() {
        if i > 0 {
            s.push(SEP);
        }
        s.push_str(part);
    }
    s
}

enum Frame {
    Map { pending_key: Option<String> },
    Seq { next: usize },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    path: Vec<String>,
    positions: Positions,
}

fn span(mark: Marker) -> Span {
    Span {
        line: mark.line(),
        column: mark.col() + 1,
    }
}

impl Builder {
    /// Called when a node starts: a key, or a value whose path it returns.
    fn start_node(&mut self, scalar: Option<&str>, mark: Marker) -> Option<String> {
        let segment = match self.stack.last_mut() {
            None => return Some(String::new()),
            Some(Frame::Map { pending_key }) => match pending_key.take() {
                None => {
                    let key = scalar.unwrap_or("?").to_string();
                    let mut p = self.path.clone();
                    p.push(key.clone());
                    self.positions.keys.insert(p.join(&SEP.to_string()), span(mark));
                    *pending_key = Some(key);
                    return None;
                }
                Some(key) => key,
            },
            Some(Frame::Seq { next }) => {
                *next += 1;
                (*next - 1).to_string()
            }
        };
        let mut p = self.path.clone();
        p.push(segment);
        let joined = p.join(&SEP.to_string());
        self.positions.values.insert(joined.clone(), span(mark));
        Some(joined)
    }

    fn segment_of(&self, joined: &str) -> String {
        joined.rsplit(SEP).next().unwrap_or("").to_string()
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(value, ..) => {
                self.start_node(Some(&value), mark);
            }
            Event::Alias(_) => {
                self.start_node(None, mark);
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let is_map = matches!(ev, Event::MappingStart(..));
                let is_root = self.stack.is_empty();
                match self.start_node(None, mark) {
                    _ if is_root => {}
                    Some(path) => self.path.push(self.segment_of(&path)),
                    // A collection used as a mapping key: indexed under "?".
                    None => self.path.push("?".to_string()),
                }
                self.stack.push(if is_map {
                    Frame::Map { pending_key: None }
                } else {
                    Frame::Seq { next: 0 }
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
                if !self.stack.is_empty() {
                    self.path.pop();
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_keys_and_values() {
        let src = "version: 1\nnodes:\n  noise:\n    type: noise.gaussian\n    inputs: {shape: [1, 4], seed: 3}\n";
        let p = Positions::index(src);
        assert_eq!(p.key(&["nodes", "noise"]), Some(Span { line: 3, column: 3 }));
        assert_eq!(p.value(&["nodes", "noise", "type"]), Some(Span { line: 4, column: 11 }));
        let seed = p.value(&["nodes", "noise", "inputs", "seed"]).unwrap();
        assert_eq!((seed.line, seed.column), (5, 35));
        assert_eq!(p.value(&["nodes", "noise", "inputs", "shape", "1"]).map(|s| s.line), Some(5));
    }
}

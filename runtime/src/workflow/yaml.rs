//! A YAML document as a tree that remembers where every key and value is written.
//!
//! One event-level pass with yaml-rust2 builds it, so each diagnostic can point at
//! its line and column without parsing the file twice.

use super::diagnostics::Span;
use std::collections::HashMap;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};
use yaml_rust2::Yaml;

#[derive(Clone, Debug)]
pub struct YNode {
    pub span: Span,
    pub value: YValue,
}

#[derive(Clone, Debug)]
pub enum YValue {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<YNode>),
    /// Entries in file order; keys are unique (duplicates are a parse error).
    Map(Vec<(YNode, YNode)>),
}

/// A document that is not YAML: the message and where the parser stopped.
#[derive(Debug)]
pub struct ParseError {
    pub message: String,
    pub span: Span,
}

/// Collections nested deeper than this are refused (a workflow needs a handful).
pub const MAX_DEPTH: usize = 128;

/// Parses the first document of `source`. Events are pulled one at a time into
/// an explicit stack (yaml-rust2's own `load` recurses per nesting level, and
/// `- - - … x` has no limit there), so no input can exhaust the thread's stack.
pub fn parse(source: &str) -> Result<Option<YNode>, ParseError> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(source);
    let scan_error = |e: yaml_rust2::ScanError| ParseError {
        message: e.info().to_string(),
        span: span(*e.marker()),
    };
    loop {
        let (event, mark) = parser.next_token().map_err(scan_error)?;
        let done = matches!(event, Event::StreamEnd | Event::DocumentEnd);
        builder.on_event(event, mark);
        if builder.stack.len() > MAX_DEPTH {
            return Err(ParseError {
                message: format!("collections nested more than {MAX_DEPTH} levels deep"),
                span: span(mark),
            });
        }
        if done || builder.error.is_some() {
            break;
        }
    }
    if let Some(e) = builder.error {
        return Err(e);
    }
    Ok(builder.root)
}

impl YNode {
    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            YValue::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_map(&self) -> Option<&[(YNode, YNode)]> {
        match &self.value {
            YValue::Map(entries) => Some(entries),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self.value {
            YValue::Int(i) => Some(i),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self.value {
            YValue::Int(i) => Some(i as f64),
            YValue::Float(f) => Some(f),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self.value, YValue::Null)
    }

    /// The entry of a mapping with a string key.
    pub fn get(&self, key: &str) -> Option<&YNode> {
        self.entry(key).map(|(_, v)| v)
    }

    pub fn entry(&self, key: &str) -> Option<(&YNode, &YNode)> {
        self.as_map()?
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(k, v)| (k, v))
    }

    /// Scalars as text (keys, names); collections in flow style.
    pub fn text(&self) -> String {
        match &self.value {
            YValue::Null => "null".into(),
            YValue::Bool(b) => b.to_string(),
            YValue::Int(i) => i.to_string(),
            YValue::Float(f) => f.to_string(),
            YValue::Str(s) => s.clone(),
            _ => self.to_json().map(|j| j.to_string()).unwrap_or_else(|e| e),
        }
    }

    pub fn to_json(&self) -> Result<serde_json::Value, String> {
        use serde_json::Value as J;
        Ok(match &self.value {
            YValue::Null => J::Null,
            YValue::Bool(b) => J::Bool(*b),
            YValue::Int(i) => J::from(*i),
            YValue::Float(f) => serde_json::Number::from_f64(*f)
                .map(J::Number)
                .ok_or_else(|| format!("{f} is not a usable number"))?,
            YValue::Str(s) => J::String(s.clone()),
            YValue::Seq(items) => {
                J::Array(items.iter().map(YNode::to_json).collect::<Result<_, _>>()?)
            }
            YValue::Map(entries) => J::Object(
                entries
                    .iter()
                    .map(|(k, v)| Ok((k.text(), v.to_json()?)))
                    .collect::<Result<_, String>>()?,
            ),
        })
    }
}

fn span(mark: Marker) -> Span {
    Span {
        line: mark.line(),
        column: mark.col() + 1,
    }
}

enum Open {
    Seq(YNode),
    /// The mapping so far, a key waiting for its value, and the line of each
    /// string key seen (to refuse duplicates).
    Map(YNode, Option<YNode>, HashMap<String, usize>),
}

#[derive(Default)]
struct Builder {
    stack: Vec<(Open, usize)>,
    root: Option<YNode>,
    error: Option<ParseError>,
}

impl Builder {
    /// Places a finished node into the enclosing collection.
    fn finish(&mut self, node: YNode, _anchor: usize) {
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some((Open::Seq(seq), _)) => {
                if let YValue::Seq(items) = &mut seq.value {
                    items.push(node);
                }
            }
            Some((Open::Map(_, pending @ None, _), _)) => *pending = Some(node),
            Some((Open::Map(map, pending @ Some(_), seen), _)) => {
                let key = pending.take().expect("matched Some");
                if let Some(k) = key.as_str() {
                    if let Some(first) = seen.insert(k.to_string(), key.span.line) {
                        if self.error.is_none() {
                            self.error = Some(ParseError {
                                message: format!(
                                    "duplicate key `{k}` (first written on line {first})"
                                ),
                                span: key.span,
                            });
                        }
                    }
                }
                if let YValue::Map(entries) = &mut map.value {
                    entries.push((key, node));
                }
            }
        }
    }
}

fn scalar(text: String, style: TScalarStyle, tagged_str: bool) -> YValue {
    if style != TScalarStyle::Plain || tagged_str {
        return YValue::Str(text);
    }
    match Yaml::from_str(&text) {
        Yaml::Null => YValue::Null,
        Yaml::Boolean(b) => YValue::Bool(b),
        Yaml::Integer(i) => YValue::Int(i),
        real @ Yaml::Real(_) => real.as_f64().map_or(YValue::Str(text), YValue::Float),
        _ => YValue::Str(text),
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let at = span(mark);
        match ev {
            Event::Scalar(text, style, anchor, tag) => {
                let tagged_str = tag.is_some_and(|t| t.suffix == "str");
                let node = YNode {
                    span: at,
                    value: scalar(text, style, tagged_str),
                };
                self.finish(node, anchor);
            }
            Event::Alias(_) => {
                // Aliases can expand a small file into an enormous tree ("billion
                // laughs"); workflows have no need for them.
                if self.error.is_none() {
                    self.error = Some(ParseError {
                        message: "YAML aliases (*name) are not supported in workflows".into(),
                        span: at,
                    });
                }
                self.finish(
                    YNode {
                        span: at,
                        value: YValue::Null,
                    },
                    0,
                );
            }
            Event::SequenceStart(anchor, _) => {
                let node = YNode {
                    span: at,
                    value: YValue::Seq(Vec::new()),
                };
                self.stack.push((Open::Seq(node), anchor));
            }
            Event::MappingStart(anchor, _) => {
                let node = YNode {
                    span: at,
                    value: YValue::Map(Vec::new()),
                };
                self.stack
                    .push((Open::Map(node, None, HashMap::new()), anchor));
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some((open, anchor)) = self.stack.pop() {
                    let node = match open {
                        Open::Seq(n) | Open::Map(n, _, _) => n,
                    };
                    self.finish(node, anchor);
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
    fn keeps_positions_and_types() {
        let src = "version: 1\nnodes:\n  noise:\n    type: noise.gaussian\n    inputs: {shape: [1, 4], seed: 3, s: '5', f: 0.5, b: true}\n";
        let doc = parse(src).unwrap().unwrap();
        let (key, _) = doc.get("nodes").unwrap().entry("noise").unwrap();
        assert_eq!(key.span, Span { line: 3, column: 3 });
        let noise = doc.get("nodes").unwrap().get("noise").unwrap();
        assert_eq!(
            noise.get("type").unwrap().span,
            Span {
                line: 4,
                column: 11
            }
        );
        let inputs = noise.get("inputs").unwrap();
        assert_eq!(
            inputs.get("seed").unwrap().span,
            Span {
                line: 5,
                column: 35
            }
        );
        assert_eq!(inputs.get("seed").unwrap().as_i64(), Some(3));
        assert_eq!(inputs.get("s").unwrap().as_str(), Some("5"));
        assert_eq!(inputs.get("f").unwrap().as_f64(), Some(0.5));
        assert!(matches!(inputs.get("b").unwrap().value, YValue::Bool(true)));
        assert_eq!(
            inputs.get("shape").unwrap().to_json().unwrap().to_string(),
            "[1,4]"
        );
    }

    #[test]
    fn rejects_duplicate_keys_and_bad_syntax() {
        let e = parse("nodes:\n  a: 1\n  a: 2\n").unwrap_err();
        assert!(
            e.message
                .contains("duplicate key `a` (first written on line 2)"),
            "{}",
            e.message
        );
        assert_eq!(e.span.line, 3);
        let e = parse("a: [1, 2\n").unwrap_err();
        assert!(e.span.line >= 1);
    }

    #[test]
    fn aliases_are_refused() {
        let e = parse("a: &x [1, 2]\nb: *x\n").unwrap_err();
        assert!(e.message.contains("aliases"), "{}", e.message);
        assert_eq!(e.span.line, 2);
    }
}

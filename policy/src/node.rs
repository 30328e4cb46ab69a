//! A TOML document as an owned tree that remembers where every key and value stands.
//!
//! Schema errors come back as JSON pointers; this tree turns a pointer into a byte span of the
//! file, so every diagnostic can say `file:line:column`.

use std::ops::Range;

use serde_json::Value;
use toml::de::{DeTable, DeValue};

/// A value with the byte span it occupies in its file.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub span: Range<usize>,
    pub kind: NodeKind,
}

#[derive(Debug, Clone)]
pub(crate) enum NodeKind {
    String(String),
    Integer(i64),
    /// Floats, datetimes and integers too large for i64 are kept as text: the policy format
    /// has no use for them, and the schema rejects them with their type name.
    Other(&'static str, String),
    Bool(bool),
    Array(Vec<Node>),
    Table(Vec<Entry>),
}

#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub key: String,
    pub key_span: Range<usize>,
    pub value: Node,
}

/// A TOML syntax error: message and span.
#[derive(Debug)]
pub(crate) struct SyntaxError {
    pub message: String,
    pub span: Range<usize>,
}

/// Parses a document; on a syntax error returns every error the parser recovered from.
pub(crate) fn parse(content: &str) -> Result<Node, Vec<SyntaxError>> {
    let (doc, errors) = DeTable::parse_recoverable(content);
    if !errors.is_empty() {
        return Err(errors
            .into_iter()
            .map(|e| SyntaxError {
                message: e.message().trim().to_string(),
                span: e.span().unwrap_or(0..0),
            })
            .collect());
    }
    let span = doc.span();
    Ok(Node {
        span,
        kind: table(doc.get_ref()),
    })
}

fn table(t: &DeTable<'_>) -> NodeKind {
    let mut entries: Vec<Entry> = t
        .iter()
        .map(|(k, v)| Entry {
            key: k.get_ref().to_string(),
            key_span: k.span(),
            value: Node {
                span: v.span(),
                kind: value(v.get_ref()),
            },
        })
        .collect();
    entries.sort_by_key(|e| e.key_span.start);
    NodeKind::Table(entries)
}

fn value(v: &DeValue<'_>) -> NodeKind {
    match v {
        DeValue::String(s) => NodeKind::String(s.to_string()),
        DeValue::Integer(i) => {
            let digits = i.as_str().replace('_', "");
            match i64::from_str_radix(&digits, i.radix()) {
                Ok(n) => NodeKind::Integer(n),
                Err(_) => NodeKind::Other("integer", i.as_str().to_string()),
            }
        }
        DeValue::Float(f) => NodeKind::Other("float", f.as_str().to_string()),
        DeValue::Boolean(b) => NodeKind::Bool(*b),
        DeValue::Datetime(d) => NodeKind::Other("datetime", d.to_string()),
        DeValue::Array(a) => NodeKind::Array(
            a.iter()
                .map(|n| Node {
                    span: n.span(),
                    kind: value(n.get_ref()),
                })
                .collect(),
        ),
        DeValue::Table(t) => table(t),
    }
}

/// One step of a JSON pointer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seg {
    Key(String),
    Index(usize),
}

impl Node {
    /// The JSON form the schema validates.
    pub fn to_json(&self) -> Value {
        match &self.kind {
            NodeKind::String(s) => Value::String(s.clone()),
            NodeKind::Integer(n) => Value::from(*n),
            // A float, datetime or huge integer is never what the schema wants; keep its type
            // visible to the validator as a number or a string with a marker it will refuse.
            NodeKind::Other("float", s) => s
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .map_or(Value::Null, Value::Number),
            NodeKind::Other(_, s) => Value::String(s.clone()),
            NodeKind::Bool(b) => Value::Bool(*b),
            NodeKind::Array(items) => Value::Array(items.iter().map(Node::to_json).collect()),
            NodeKind::Table(entries) => Value::Object(
                entries
                    .iter()
                    .map(|e| (e.key.clone(), e.value.to_json()))
                    .collect(),
            ),
        }
    }

    pub fn get(&self, key: &str) -> Option<&Entry> {
        match &self.kind {
            NodeKind::Table(entries) => entries.iter().find(|e| e.key == key),
            _ => None,
        }
    }

    pub fn index(&self, i: usize) -> Option<&Node> {
        match &self.kind {
            NodeKind::Array(items) => items.get(i),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.kind {
            NodeKind::String(s) => Some(s),
            _ => None,
        }
    }

    /// The deepest node on `path`, with the span of the key that leads to it when the last
    /// step is a key.
    pub fn locate(&self, path: &[Seg]) -> (&Node, Option<Range<usize>>) {
        let mut node = self;
        let mut key_span = None;
        for seg in path {
            match seg {
                Seg::Key(k) => match node.get(k) {
                    Some(e) => {
                        key_span = Some(e.key_span.clone());
                        node = &e.value;
                    }
                    None => break,
                },
                Seg::Index(i) => match node.index(*i) {
                    Some(n) => {
                        key_span = None;
                        node = n;
                    }
                    None => break,
                },
            }
        }
        (node, key_span)
    }

    pub fn type_name(&self) -> &'static str {
        match &self.kind {
            NodeKind::String(_) => "string",
            NodeKind::Integer(_) => "integer",
            NodeKind::Other(t, _) => t,
            NodeKind::Bool(_) => "boolean",
            NodeKind::Array(_) => "array",
            NodeKind::Table(_) => "table",
        }
    }
}

//! Structural validation against `schema/policy.schema.json`, the single source of truth for
//! the file format. Schema errors are mapped to stable codes and to the span of the offending
//! key or value.

use std::sync::OnceLock;

use jsonschema::error::{TypeKind, ValidationErrorKind};
use jsonschema::paths::LocationSegment;
use serde_json::Value;

use crate::diag::{Code, Diagnostic};
use crate::node::{Node, Seg};

/// The policy schema (JSON Schema 2020-12), as shipped in `schema/policy.schema.json`.
pub const SCHEMA: &str = include_str!("../../schema/policy.schema.json");

fn validator() -> &'static jsonschema::Validator {
    static V: OnceLock<jsonschema::Validator> = OnceLock::new();
    V.get_or_init(|| {
        #[allow(clippy::expect_used)] // the schema is compiled in; a unit test proves it compiles
        let schema: Value =
            serde_json::from_str(SCHEMA).expect("schema/policy.schema.json is JSON");
        #[allow(clippy::expect_used)] // as above
        jsonschema::draft202012::new(&schema).expect("schema/policy.schema.json is a valid schema")
    })
}

/// A schema problem: the diagnostic, and the JSON path of the item it spoils.
pub(crate) struct SchemaError {
    pub diagnostic: Diagnostic,
    pub path: Vec<Seg>,
}

/// Validates one file's tree; returns every schema error found.
pub(crate) fn validate(file: usize, root: &Node, json: &Value) -> Vec<SchemaError> {
    let mut out = Vec::new();
    for err in validator().iter_errors(json) {
        let path: Vec<Seg> = err
            .instance_path()
            .iter()
            .map(|s| match s {
                LocationSegment::Property(p) => Seg::Key(p.to_string()),
                LocationSegment::Index(i) => Seg::Index(i),
            })
            .collect();
        let (node, key_span) = root.locate(&path);
        let field = path.iter().rev().find_map(|s| match s {
            Seg::Key(k) => Some(k.as_str()),
            Seg::Index(_) => None,
        });
        let what = describe(&path);
        let diagnostic = match err.kind() {
            ValidationErrorKind::AdditionalProperties { unexpected } => {
                // One diagnostic per unknown key, pointing at the key itself.
                for key in unexpected {
                    let span = node
                        .get(key)
                        .map_or(node.span.clone(), |e| e.key_span.clone());
                    let mut d =
                        Diagnostic::new(Code::UnknownKey, format!("unknown key `{key}` in {what}"))
                            .at(file, span, "not part of the policy format");
                    if let Some(hint) = known_keys(&path) {
                        d = d.note(format!("expected one of: {hint}"));
                    }
                    let mut p = path.clone();
                    p.push(Seg::Key(key.clone()));
                    out.push(SchemaError {
                        diagnostic: d,
                        path: p,
                    });
                }
                continue;
            }
            ValidationErrorKind::Required { property } => {
                let key = property.as_str().unwrap_or("?");
                let mut d = Diagnostic::new(
                    Code::MissingKey,
                    format!("{what} is missing the required key `{key}`"),
                )
                .at(file, header_span(node), format!("add `{key} = ...` here"));
                if key == "legacy_id" {
                    d = d.note("legacy_user is only meaningful together with legacy_id");
                }
                d
            }
            ValidationErrorKind::Type { kind } => {
                let expected = match kind {
                    TypeKind::Single(t) => toml_type(&t.to_string()).to_string(),
                    TypeKind::Multiple(set) => set
                        .iter()
                        .map(|t| toml_type(&t.to_string()).to_string())
                        .collect::<Vec<_>>()
                        .join(" or "),
                };
                let expected = if path.len() == 1 && expected == "array" {
                    format!(
                        "an array of tables (write it as [[{}]])",
                        field.unwrap_or("?")
                    )
                } else {
                    article(&expected)
                };
                Diagnostic::new(
                    Code::WrongType,
                    format!("{what} must be {expected}, found {}", article(node.type_name())),
                )
                .at(
                    file,
                    node.span.clone(),
                    format!("this is {}", article(node.type_name())),
                )
            }
            ValidationErrorKind::Pattern { .. } => {
                // A test's `from` is a portal name, not a selector.
                let field = match (path.first(), field) {
                    (Some(Seg::Key(k)), Some("from")) if k == "test" => Some("name"),
                    _ => field,
                };
                pattern_error(file, node, field, &what)
            }
            ValidationErrorKind::Enum { options } => {
                let allowed = options
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|v| v.to_string())
                            .collect::<Vec<_>>()
                            .join(" or ")
                    })
                    .unwrap_or_default();
                Diagnostic::new(
                    Code::InvalidValue,
                    format!("{what} must be {allowed}, found {}", shown(node)),
                )
                .at(file, node.span.clone(), format!("expected {allowed}"))
            }
            ValidationErrorKind::MinItems { .. } => {
                Diagnostic::new(Code::InvalidValue, format!("{what} must not be empty"))
                    .at(file, node.span.clone(), "empty list")
                    .note(match field {
                        Some("relays") => "list at least one relay name or tag:<tag> selector, or remove the key to allow any relay",
                        _ => "list at least one portal name or tag:<tag> selector",
                    })
            }
            ValidationErrorKind::MinLength { .. } => Diagnostic::new(
                Code::InvalidValue,
                format!("{what} must not be empty"),
            )
            .at(file, node.span.clone(), "empty string"),
            other => Diagnostic::new(Code::InvalidValue, format!("{what}: {err}")).at(
                file,
                key_span.unwrap_or(node.span.clone()),
                other.keyword().to_string(),
            ),
        };
        out.push(SchemaError { diagnostic, path });
    }
    out
}

fn pattern_error(file: usize, node: &Node, field: Option<&str>, what: &str) -> Diagnostic {
    let found = shown(node);
    let span = node.span.clone();
    match field {
        Some("listen") => Diagnostic::new(
            Code::BadAddress,
            format!("{what} must be ip:port, found {found}"),
        )
        .at(file, span, "expected ip:port")
        .note("for example \"127.0.0.1:2222\" or \"[::1]:2222\""),
        Some("target") => Diagnostic::new(
            Code::BadAddress,
            format!("{what} must be host:port, found {found}"),
        )
        .at(file, span, "expected host:port")
        .note("for example \"192.168.1.10:22\", \"nas.lan:22\" or \"[fd00::10]:22\""),
        Some("ports") => Diagnostic::new(
            Code::BadPortRange,
            format!("{what} must be a range FIRST-LAST, found {found}"),
        )
        .at(file, span, "expected FIRST-LAST")
        .note("for example \"40000-40999\""),
        Some("spki_sha256") => Diagnostic::new(
            Code::InvalidValue,
            format!("{what} must be 64 hex digits (a SHA-256), found {found}"),
        )
        .at(file, span, "not a SHA-256 in hex")
        .note("`netportd ca show CERT` prints a certificate's SPKI SHA-256"),
        Some("legacy_id" | "legacy_user") => Diagnostic::new(
            Code::InvalidValue,
            format!("{what} must be 8 hex digits, found {found}"),
        )
        .at(file, span, "expected 8 hex digits, like 0A0B0C0D"),
        Some("from" | "relays") => Diagnostic::new(
            Code::InvalidName,
            format!("{what} is not a name or tag:<tag> selector: {found}"),
        )
        .at(file, span, "invalid selector")
        .note("names are 1-63 characters of a-z, 0-9 and '-', starting with a letter or digit; select a tag with tag:<tag>"),
        _ => Diagnostic::new(Code::InvalidName, format!("{what} is not a valid name: {found}"))
            .at(file, span, "invalid name")
            .note("names are 1-63 characters of a-z, 0-9 and '-', starting with a letter or digit"),
    }
}

fn shown(node: &Node) -> String {
    match node.as_str() {
        Some(s) => format!("\"{s}\""),
        None => article(node.type_name()),
    }
}

/// The span to point at for a whole table: its first key, or the table itself.
fn header_span(node: &Node) -> std::ops::Range<usize> {
    match &node.kind {
        crate::node::NodeKind::Table(entries) if !entries.is_empty() && node.span.is_empty() => {
            entries[0].key_span.clone()
        }
        _ => node.span.clone(),
    }
}

/// "a table", "an array", "an integer".
fn article(noun: &str) -> String {
    match noun.chars().next() {
        Some('a' | 'e' | 'i' | 'o' | 'u') => format!("an {noun}"),
        _ => format!("a {noun}"),
    }
}

fn toml_type(json_type: &str) -> &str {
    match json_type {
        "object" => "table",
        "number" => "number",
        other => other,
    }
}

/// Human words for a JSON path: `portal #2`, `key `listen` of access #1`.
pub(crate) fn describe(path: &[Seg]) -> String {
    match path {
        [] => "the file".to_string(),
        [Seg::Key(k)] => format!("`{k}`"),
        [Seg::Key(k), Seg::Index(i)] => format!("[[{k}]] #{}", i + 1),
        [Seg::Key(k), Seg::Index(i), Seg::Key(f)] => format!("`{f}` of [[{k}]] #{}", i + 1),
        [Seg::Key(k), Seg::Index(i), Seg::Key(f), Seg::Index(j), ..] => {
            format!("entry {} of `{f}` in [[{k}]] #{}", j + 1, i + 1)
        }
        _ => path
            .iter()
            .map(|s| match s {
                Seg::Key(k) => k.clone(),
                Seg::Index(i) => i.to_string(),
            })
            .collect::<Vec<_>>()
            .join("."),
    }
}

fn known_keys(path: &[Seg]) -> Option<String> {
    let schema: Value = serde_json::from_str(SCHEMA).ok()?;
    let props = match path {
        [] => schema.get("properties")?,
        [Seg::Key(k), Seg::Index(_)] => schema.get("$defs")?.get(k)?.get("properties")?,
        _ => return None,
    };
    let keys: Vec<String> = props
        .as_object()?
        .keys()
        .map(|k| {
            if path.is_empty() {
                format!("[[{k}]]")
            } else {
                k.clone()
            }
        })
        .collect();
    Some(keys.join(", "))
}

#[cfg(test)]
mod tests {
    #[test]
    fn schema_compiles_and_every_property_has_a_description() {
        let _ = super::validator();
        let schema: serde_json::Value =
            serde_json::from_str(super::SCHEMA).unwrap_or(serde_json::Value::Null);
        let mut missing = Vec::new();
        let mut count = 0;
        walk(&schema, "", &mut missing, &mut count);
        assert!(count > 20, "walked only {count} properties");
        assert!(
            missing.is_empty(),
            "properties without description: {missing:?}"
        );
    }

    fn walk(v: &serde_json::Value, at: &str, missing: &mut Vec<String>, count: &mut usize) {
        if let Some(props) = v.get("properties").and_then(|p| p.as_object()) {
            for (k, p) in props {
                *count += 1;
                if p.get("description").is_none() {
                    missing.push(format!("{at}/{k}"));
                }
                walk(p, &format!("{at}/{k}"), missing, count);
            }
        }
        if let Some(defs) = v.get("$defs").and_then(|p| p.as_object()) {
            for (k, d) in defs {
                walk(d, &format!("$defs/{k}"), missing, count);
            }
        }
    }
}

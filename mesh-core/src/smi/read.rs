//! Reading JSON values with field paths in every error.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::SmiError;
use crate::policy::AnchoredRegex;

pub(crate) fn child(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a map",
    }
}

pub(crate) fn type_error(path: &str, expected: &'static str, found: &Value) -> SmiError {
    SmiError::Type {
        path: path.to_string(),
        expected,
        found: type_name(found),
    }
}

pub(crate) fn invalid(path: &str, value: &str, expected: impl Into<String>) -> SmiError {
    SmiError::Invalid {
        path: path.to_string(),
        value: format!("{value:?}"),
        expected: expected.into(),
    }
}

pub(crate) fn bad_name(path: &str, value: &str, reason: &'static str) -> SmiError {
    SmiError::Name {
        path: path.to_string(),
        value: value.to_string(),
        reason,
    }
}

/// A field that is present and not null.
pub(crate) fn field<'v>(obj: &'v Map<String, Value>, name: &str) -> Option<&'v Value> {
    obj.get(name).filter(|v| !v.is_null())
}

pub(crate) fn required<'v>(
    obj: &'v Map<String, Value>,
    path: &str,
    name: &str,
) -> Result<&'v Value, SmiError> {
    field(obj, name).ok_or_else(|| SmiError::Missing {
        path: child(path, name),
    })
}

pub(crate) fn object<'v>(v: &'v Value, path: &str) -> Result<&'v Map<String, Value>, SmiError> {
    v.as_object().ok_or_else(|| type_error(path, "a map", v))
}

pub(crate) fn array<'v>(v: &'v Value, path: &str) -> Result<&'v Vec<Value>, SmiError> {
    v.as_array().ok_or_else(|| type_error(path, "a list", v))
}

pub(crate) fn non_empty<'v>(list: &'v [Value], path: &str) -> Result<&'v [Value], SmiError> {
    if list.is_empty() {
        return Err(SmiError::Empty {
            path: path.to_string(),
        });
    }
    Ok(list)
}

pub(crate) fn str_at<'v>(v: &'v Value, path: &str) -> Result<&'v str, SmiError> {
    v.as_str().ok_or_else(|| type_error(path, "a string", v))
}

pub(crate) fn required_str(
    obj: &Map<String, Value>,
    path: &str,
    name: &str,
) -> Result<String, SmiError> {
    let s = str_at(required(obj, path, name)?, &child(path, name))?;
    if s.is_empty() {
        return Err(SmiError::Empty {
            path: child(path, name),
        });
    }
    Ok(s.to_string())
}

pub(crate) fn optional_str(
    obj: &Map<String, Value>,
    path: &str,
    name: &str,
) -> Result<Option<String>, SmiError> {
    match field(obj, name) {
        None => Ok(None),
        Some(v) => Ok(Some(str_at(v, &child(path, name))?.to_string())),
    }
}

pub(crate) fn string_map(
    obj: &Map<String, Value>,
    path: &str,
    name: &str,
) -> Result<BTreeMap<String, String>, SmiError> {
    let Some(v) = field(obj, name) else {
        return Ok(BTreeMap::new());
    };
    let mpath = child(path, name);
    object(v, &mpath)?
        .iter()
        .map(|(k, v)| Ok((k.clone(), str_at(v, &child(&mpath, k))?.to_string())))
        .collect()
}

pub(crate) fn port_number(v: &Value, path: &str) -> Result<u16, SmiError> {
    match v.as_u64().and_then(|p| u16::try_from(p).ok()) {
        Some(p) if p > 0 => Ok(p),
        _ => Err(SmiError::Invalid {
            path: path.to_string(),
            value: v.to_string(),
            expected: "a port number from 1 to 65535".to_string(),
        }),
    }
}

/// Whether `b` may appear in an HTTP header name (an RFC 7230 token).
pub(crate) fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

pub(crate) fn regex(source: &str, path: &str) -> Result<AnchoredRegex, SmiError> {
    AnchoredRegex::new(source).map_err(|source| SmiError::Regex {
        path: path.to_string(),
        source,
    })
}

//! The transport-neutral value of an RPC parameter or result, and typed
//! access to the fields of XAPI records.
//!
//! Both wire formats decode into [`Value`] and encode from it. XAPI's
//! 64-bit `int` is [`Value::Int`]: JSON-RPC carries it as a JSON number,
//! XML-RPC as a string of decimal digits. Decoding cannot tell such a
//! string from a real string, so readers of int fields accept both
//! ([`Value::as_i64`]).

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// One XML-RPC / JSON-RPC value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// XML-RPC `<nil/>`, JSON `null`.
    Nil,
    /// `bool`.
    Bool(bool),
    /// XAPI `int` (64-bit).
    Int(i64),
    /// `float`.
    Double(f64),
    /// `string`, refs, enums, and `void` (the empty string).
    String(String),
    /// `datetime`, kept in XAPI's text form (`20240131T12:00:00Z`).
    DateTime(String),
    /// `set`.
    Array(Vec<Value>),
    /// `map` and records.
    Struct(BTreeMap<String, Value>),
}

impl Value {
    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) | Value::DateTime(s) => Some(s),
            _ => None,
        }
    }

    /// The integer, from [`Value::Int`] or a string of decimal digits (how
    /// XML-RPC carries XAPI ints).
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
    }

    /// The boolean.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            Value::String(s) if s == "true" => Some(true),
            Value::String(s) if s == "false" => Some(false),
            _ => None,
        }
    }

    /// The float (ints and numeric strings are accepted).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Double(d) => Some(*d),
            Value::Int(i) => Some(*i as f64),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
    }

    /// The elements of a set.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The members of a map or record.
    pub fn as_struct(&self) -> Option<&BTreeMap<String, Value>> {
        match self {
            Value::Struct(m) => Some(m),
            _ => None,
        }
    }

    /// Short name of the variant, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Nil => "nil",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Double(_) => "double",
            Value::String(_) => "string",
            Value::DateTime(_) => "datetime",
            Value::Array(_) => "array",
            Value::Struct(_) => "struct",
        }
    }

    /// A `(string -> string) map`.
    pub fn string_map<K: Into<String>, V: Into<String>>(
        entries: impl IntoIterator<Item = (K, V)>,
    ) -> Value {
        Value::Struct(
            entries
                .into_iter()
                .map(|(k, v)| (k.into(), Value::String(v.into())))
                .collect(),
        )
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::String(s.to_owned())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::String(s)
    }
}

impl From<&String> for Value {
    fn from(s: &String) -> Self {
        Value::String(s.clone())
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}

impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Value::Int(i)
    }
}

impl From<f64> for Value {
    fn from(d: f64) -> Self {
        Value::Double(d)
    }
}

impl From<Vec<Value>> for Value {
    fn from(a: Vec<Value>) -> Self {
        Value::Array(a)
    }
}

impl From<BTreeMap<String, Value>> for Value {
    fn from(m: BTreeMap<String, Value>) -> Self {
        Value::Struct(m)
    }
}

impl From<&BTreeMap<String, String>> for Value {
    fn from(m: &BTreeMap<String, String>) -> Self {
        Value::string_map(m.iter().map(|(k, v)| (k.clone(), v.clone())))
    }
}

/// Typed, named access to the fields of a record, for decoding.
///
/// A field that is absent takes its type's default (older hosts lack newer
/// fields); a field of the wrong type is an [`Error::Decode`] naming
/// `Class.field`.
pub struct Fields<'a> {
    class: &'static str,
    map: &'a BTreeMap<String, Value>,
}

impl<'a> Fields<'a> {
    /// Fields of `value`, which must be a struct (a record of `class`).
    pub fn of(class: &'static str, value: &'a Value) -> Result<Self> {
        match value {
            Value::Struct(map) => Ok(Fields { class, map }),
            other => Err(Error::Decode {
                field: format!("{class} record"),
                detail: format!("expected a struct, got {}", other.kind()),
            }),
        }
    }

    fn bad(&self, name: &str, want: &str, got: &Value) -> Error {
        Error::Decode {
            field: format!("{}.{name}", self.class),
            detail: format!("expected {want}, got {} {got:?}", got.kind()),
        }
    }

    /// The raw value of a field.
    pub fn raw(&self, name: &str) -> Option<&'a Value> {
        self.map.get(name)
    }

    /// A string field (also enums and datetimes).
    pub fn string(&self, name: &str) -> Result<String> {
        match self.map.get(name) {
            None | Some(Value::Nil) => Ok(String::new()),
            Some(v) => v
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| self.bad(name, "a string", v)),
        }
    }

    /// An `int` field.
    pub fn int(&self, name: &str) -> Result<i64> {
        match self.map.get(name) {
            None | Some(Value::Nil) => Ok(0),
            Some(v) => v.as_i64().ok_or_else(|| self.bad(name, "an int", v)),
        }
    }

    /// A non-negative `int` field (sizes).
    pub fn size(&self, name: &str) -> Result<u64> {
        let i = self.int(name)?;
        u64::try_from(i).map_err(|_| Error::Decode {
            field: format!("{}.{name}", self.class),
            detail: format!("expected a size, got {i}"),
        })
    }

    /// A `float` field.
    pub fn float(&self, name: &str) -> Result<f64> {
        match self.map.get(name) {
            None | Some(Value::Nil) => Ok(0.0),
            Some(v) => v.as_f64().ok_or_else(|| self.bad(name, "a float", v)),
        }
    }

    /// A `bool` field.
    pub fn bool(&self, name: &str) -> Result<bool> {
        match self.map.get(name) {
            None | Some(Value::Nil) => Ok(false),
            Some(v) => v.as_bool().ok_or_else(|| self.bad(name, "a bool", v)),
        }
    }

    /// A `string set` (or `ref set`) field.
    pub fn strings(&self, name: &str) -> Result<Vec<String>> {
        match self.map.get(name) {
            None | Some(Value::Nil) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| self.bad(name, "a set of strings", v))
                })
                .collect(),
            Some(v) => Err(self.bad(name, "a set", v)),
        }
    }

    /// A `(string -> string) map` field.
    pub fn map(&self, name: &str) -> Result<BTreeMap<String, String>> {
        match self.map.get(name) {
            None | Some(Value::Nil) => Ok(BTreeMap::new()),
            Some(Value::Struct(m)) => m
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) | Value::DateTime(s) => Ok((k.clone(), s.clone())),
                    Value::Int(i) => Ok((k.clone(), i.to_string())),
                    Value::Bool(b) => Ok((k.clone(), b.to_string())),
                    other => Err(self.bad(name, "a map of strings", other)),
                })
                .collect(),
            Some(v) => Err(self.bad(name, "a map", v)),
        }
    }
}

/// Decodes a call result that must be a string.
pub(crate) fn expect_string(call: &str, v: Value) -> Result<String> {
    match v {
        Value::String(s) | Value::DateTime(s) => Ok(s),
        other => Err(Error::Decode {
            field: format!("result of {call}"),
            detail: format!("expected a string, got {}", other.kind()),
        }),
    }
}

/// Decodes a call result that must be a set of strings.
pub(crate) fn expect_strings(call: &str, v: Value) -> Result<Vec<String>> {
    match v {
        Value::Array(items) => items
            .into_iter()
            .map(|item| expect_string(call, item))
            .collect(),
        other => Err(Error::Decode {
            field: format!("result of {call}"),
            detail: format!("expected a set, got {}", other.kind()),
        }),
    }
}

/// Decodes a call result that must be a bool.
pub(crate) fn expect_bool(call: &str, v: Value) -> Result<bool> {
    v.as_bool().ok_or_else(|| Error::Decode {
        field: format!("result of {call}"),
        detail: format!("expected a bool, got {}", v.kind()),
    })
}

/// Decodes a call result that must be a struct.
pub(crate) fn expect_struct(call: &str, v: Value) -> Result<BTreeMap<String, Value>> {
    match v {
        Value::Struct(m) => Ok(m),
        other => Err(Error::Decode {
            field: format!("result of {call}"),
            detail: format!("expected a struct, got {}", other.kind()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ints_come_as_numbers_or_digit_strings() {
        assert_eq!(Value::Int(5).as_i64(), Some(5));
        assert_eq!(Value::from("1099511627776").as_i64(), Some(1 << 40));
        assert_eq!(Value::from("x").as_i64(), None);
        assert_eq!(Value::Bool(true).as_i64(), None);
    }

    #[test]
    fn fields_default_when_absent_and_fail_on_wrong_type() {
        let rec = Value::Struct(BTreeMap::from([
            ("virtual_size".to_owned(), Value::from("65536")),
            ("cbt_enabled".to_owned(), Value::Bool(true)),
            ("tags".to_owned(), Value::Array(vec!["a".into()])),
            ("bad".to_owned(), Value::Array(vec![])),
        ]));
        let f = Fields::of("VDI", &rec).unwrap();
        assert_eq!(f.size("virtual_size").unwrap(), 65536);
        assert!(f.bool("cbt_enabled").unwrap());
        assert!(!f.bool("missing").unwrap());
        assert_eq!(f.strings("tags").unwrap(), ["a"]);
        assert_eq!(f.string("missing").unwrap(), "");
        let err = f.string("bad").unwrap_err();
        assert!(err.to_string().contains("VDI.bad"), "{err}");
        assert!(Fields::of("VDI", &Value::Nil).is_err());
    }
}

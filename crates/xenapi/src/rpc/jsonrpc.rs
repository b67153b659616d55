//! JSON-RPC as XAPI speaks it (`POST /jsonrpc`).
//!
//! The client sends version 2.0: `{jsonrpc:"2.0", method, params:[…], id}`
//! and gets `{jsonrpc, result, id}` or `{jsonrpc, error:{code, message:
//! CODE, data:[param…]}, id}`. XAPI also accepts version 1.0 (`error` is
//! then the array `[CODE, param…]` and `result` is `null` on failure), so
//! both are decoded, and the server side answers in the caller's version.
//! `int` is a JSON number; `id` may be a number or a string but not null.

use serde_json::{Map, Number, json};

use super::Response;
use crate::error::{Error, Result};
use crate::value::Value;

const TRANSPORT: &str = "JSON-RPC";

fn protocol(detail: impl Into<String>) -> Error {
    Error::Protocol {
        transport: TRANSPORT,
        detail: detail.into(),
    }
}

/// JSON-RPC protocol version of a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// `{method, params, id}`; errors as arrays.
    V1,
    /// `{jsonrpc:"2.0", …}`; errors as objects.
    V2,
}

/// A decoded call.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    /// Protocol version the caller used.
    pub version: Version,
    /// The caller's id, echoed in the reply.
    pub id: serde_json::Value,
    /// The method name.
    pub method: String,
    /// The parameters.
    pub params: Vec<Value>,
}

/// Converts a value to JSON.
pub fn to_json(v: &Value) -> serde_json::Value {
    match v {
        Value::Nil => serde_json::Value::Null,
        Value::Bool(b) => serde_json::Value::Bool(*b),
        Value::Int(i) => serde_json::Value::Number((*i).into()),
        Value::Double(d) => Number::from_f64(*d)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null),
        Value::String(s) | Value::DateTime(s) => serde_json::Value::String(s.clone()),
        Value::Array(items) => serde_json::Value::Array(items.iter().map(to_json).collect()),
        Value::Struct(m) => {
            serde_json::Value::Object(m.iter().map(|(k, v)| (k.clone(), to_json(v))).collect())
        }
    }
}

/// Converts JSON to a value: integral numbers become [`Value::Int`].
pub fn from_json(v: serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::Nil,
        serde_json::Value::Bool(b) => Value::Bool(b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            None => Value::Double(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => Value::String(s),
        serde_json::Value::Array(items) => Value::Array(items.into_iter().map(from_json).collect()),
        serde_json::Value::Object(m) => {
            Value::Struct(m.into_iter().map(|(k, v)| (k, from_json(v))).collect())
        }
    }
}

/// Encodes a version 2.0 call.
pub fn encode_call(method: &str, params: &[Value], id: u64) -> Vec<u8> {
    let body = json!({
        "jsonrpc": "2.0",
        "method": method,
        "params": params.iter().map(to_json).collect::<Vec<_>>(),
        "id": id,
    });
    body.to_string().into_bytes()
}

/// Decodes a reply of either version.
pub fn decode_response(body: &[u8]) -> Result<Response> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| protocol(format!("not JSON: {e}")))?;
    let serde_json::Value::Object(mut obj) = v else {
        return Err(protocol("reply is not an object"));
    };
    match obj.remove("error") {
        None | Some(serde_json::Value::Null) => obj
            .remove("result")
            .map(|r| Response::Success(from_json(r)))
            .ok_or_else(|| protocol("reply has neither result nor error")),
        // Version 1.0: [CODE, param…].
        Some(serde_json::Value::Array(items)) => Ok(Response::Failure(
            items.into_iter().map(json_to_string).collect(),
        )),
        // Version 2.0: {code, message: CODE, data: [param…]}.
        Some(serde_json::Value::Object(mut err)) => {
            let code = err
                .remove("message")
                .map(json_to_string)
                .ok_or_else(|| protocol("error without message"))?;
            let mut description = vec![code];
            match err.remove("data") {
                Some(serde_json::Value::Array(data)) => {
                    description.extend(data.into_iter().map(json_to_string));
                }
                None | Some(serde_json::Value::Null) => {}
                Some(other) => description.push(json_to_string(other)),
            }
            Ok(Response::Failure(description))
        }
        Some(other) => Err(protocol(format!("unexpected error member {other}"))),
    }
}

fn json_to_string(v: serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    }
}

/// Decodes a call (server side). Notifications (no id or a null id) are
/// refused, as XAPI refuses them.
pub fn decode_call(body: &[u8]) -> Result<Call> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| protocol(format!("not JSON: {e}")))?;
    let serde_json::Value::Object(mut obj) = v else {
        return Err(protocol("call is not an object"));
    };
    let version = match obj.remove("jsonrpc") {
        None => Version::V1,
        Some(serde_json::Value::String(s)) if s == "2.0" => Version::V2,
        Some(other) => return Err(protocol(format!("unsupported jsonrpc version {other}"))),
    };
    let id = match obj.remove("id") {
        None | Some(serde_json::Value::Null) => {
            return Err(protocol(
                "notifications (calls without an id) are not accepted",
            ));
        }
        Some(id @ (serde_json::Value::String(_) | serde_json::Value::Number(_))) => id,
        Some(other) => return Err(protocol(format!("bad id {other}"))),
    };
    let method = match obj.remove("method") {
        Some(serde_json::Value::String(m)) => m,
        _ => return Err(protocol("call without a method name")),
    };
    let params = match obj.remove("params") {
        Some(serde_json::Value::Array(items)) => items.into_iter().map(from_json).collect(),
        // xapi refuses a call without params (Malformed_method_request).
        None => return Err(protocol("call without params")),
        Some(_) => return Err(protocol("params is not an array")),
    };
    Ok(Call {
        version,
        id,
        method,
        params,
    })
}

/// Encodes the reply to `call` (server side), in the caller's version.
pub fn encode_response(version: Version, id: &serde_json::Value, response: &Response) -> Vec<u8> {
    let mut obj = Map::new();
    match (version, response) {
        (Version::V2, Response::Success(v)) => {
            obj.insert("jsonrpc".into(), json!("2.0"));
            obj.insert("result".into(), to_json(v));
        }
        (Version::V2, Response::Failure(description)) => {
            obj.insert("jsonrpc".into(), json!("2.0"));
            let code = description.first().map(String::as_str).unwrap_or_default();
            let data = description.get(1..).unwrap_or_default();
            obj.insert(
                "error".into(),
                json!({"code": 1, "message": code, "data": data}),
            );
        }
        (Version::V1, Response::Success(v)) => {
            obj.insert("result".into(), to_json(v));
            obj.insert("error".into(), serde_json::Value::Null);
        }
        (Version::V1, Response::Failure(description)) => {
            obj.insert("result".into(), serde_json::Value::Null);
            obj.insert("error".into(), json!(description));
        }
    }
    obj.insert("id".into(), id.clone());
    serde_json::Value::Object(obj).to_string().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_call_and_replies_round_trip() {
        let body = encode_call(
            "VDI.get_record",
            &[Value::from("OpaqueRef:s"), Value::Int(1 << 40)],
            7,
        );
        let call = decode_call(&body).unwrap();
        assert_eq!(call.version, Version::V2);
        assert_eq!(call.id, json!(7));
        assert_eq!(call.params[1], Value::Int(1 << 40));
        let ok = Response::Success(Value::string_map([("a", "b")]));
        assert_eq!(
            decode_response(&encode_response(Version::V2, &call.id, &ok)).unwrap(),
            ok
        );
        let err = Response::Failure(vec!["HANDLE_INVALID".into(), "VDI".into(), "x".into()]);
        let bytes = encode_response(Version::V2, &call.id, &err);
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["error"]["message"], "HANDLE_INVALID");
        assert_eq!(v["error"]["data"], json!(["VDI", "x"]));
        assert_ne!(v["error"]["code"], 0);
        assert!(v.get("result").is_none());
        assert_eq!(decode_response(&bytes).unwrap(), err);
    }

    #[test]
    fn documented_v1_and_v2_failures() {
        let v1 =
            br#"{"result": null, "error": ["SESSION_INVALID", "OpaqueRef:93f1"], "id": "xyz"}"#;
        assert_eq!(
            decode_response(v1).unwrap(),
            Response::Failure(vec!["SESSION_INVALID".into(), "OpaqueRef:93f1".into()])
        );
        let v2 = br#"{"jsonrpc": "2.0", "error": {"code": 1, "message": "SESSION_INVALID",
            "data": ["OpaqueRef:c90c"]}, "id": 3}"#;
        assert_eq!(
            decode_response(v2).unwrap(),
            Response::Failure(vec!["SESSION_INVALID".into(), "OpaqueRef:c90c".into()])
        );
        let v1_call = br#"{"method": "host.get_resident_VMs", "params": ["a", "b"], "id": "xyz"}"#;
        let call = decode_call(v1_call).unwrap();
        assert_eq!(call.version, Version::V1);
        let bytes = encode_response(call.version, &call.id, &Response::Success(Value::from("")));
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v, json!({"result": "", "error": null, "id": "xyz"}));
    }

    #[test]
    fn malformed() {
        assert!(decode_call(br#"{"jsonrpc":"2.0","method":"x","params":[]}"#).is_err());
        assert!(decode_call(br#"{"jsonrpc":"2.0","method":"x","id":null}"#).is_err());
        assert!(decode_call(br#"{"jsonrpc":"3.0","method":"x","id":1}"#).is_err());
        assert!(decode_call(b"[1]").is_err());
        assert!(decode_call(br#"{"jsonrpc":"2.0","method":"x","id":1}"#).is_err());
        assert!(decode_response(b"<html>").is_err());
        assert!(decode_response(br#"{"id":1}"#).is_err());
    }
}

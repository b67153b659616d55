//! Reading the VM metadata a XenServer run saved (`{"vm", "vbds",
//! "vifs", "networks", "missing"}`, records as XAPI gave them, over
//! JSON-RPC or XML-RPC) for a whole-VM restore.

use std::collections::BTreeMap;

use cbtvault_xenapi::{NetworkRecord, NetworkRef, Value};
use serde_json::Value as Json;

pub(crate) fn text<'a>(v: &'a Json, key: &str) -> &'a str {
    v.get(key).and_then(Json::as_str).unwrap_or_default()
}

pub(crate) fn flag(v: &Json, key: &str) -> bool {
    match v.get(key) {
        Some(Json::Bool(b)) => *b,
        Some(Json::String(s)) => s.eq_ignore_ascii_case("true"),
        _ => false,
    }
}

pub(crate) fn int(v: &Json, key: &str) -> Option<i64> {
    match v.get(key)? {
        Json::Number(n) => n.as_i64(),
        Json::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// The saved JSON as a XenAPI value (what `VM.get_record` gave).
pub(crate) fn to_value(v: &Json) -> Value {
    match v {
        Json::Null => Value::Nil,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => n
            .as_i64()
            .map(Value::Int)
            .unwrap_or_else(|| Value::Double(n.as_f64().unwrap_or_default())),
        Json::String(s) => Value::String(s.clone()),
        Json::Array(a) => Value::Array(a.iter().map(to_value).collect()),
        Json::Object(m) => Value::Struct(m.iter().map(|(k, v)| (k.clone(), to_value(v))).collect()),
    }
}

/// `2026-11-29 02:00` in the local time zone.
pub(crate) fn short_time(t: jiff::Timestamp) -> String {
    t.to_zoned(jiff::tz::TimeZone::system())
        .strftime("%Y-%m-%d %H:%M")
        .to_string()
}

/// The saved networks by their reference in the old pool. The metadata
/// keeps the records in the order of the VIFs' distinct network
/// references, sorted, leaving out those listed as missing.
pub(crate) fn saved_networks(metadata: &Json) -> BTreeMap<String, Json> {
    let empty = Vec::new();
    let vifs = metadata
        .get("vifs")
        .and_then(Json::as_array)
        .unwrap_or(&empty);
    let missing = metadata.get("missing").and_then(Json::as_object);
    let mut refs: Vec<String> = vifs
        .iter()
        .map(|v| text(v, "network").to_string())
        .filter(|r| !r.is_empty())
        .collect();
    refs.sort();
    refs.dedup();
    refs.retain(|r| missing.is_none_or(|m| !m.contains_key(&format!("network {r}"))));
    let records = metadata
        .get("networks")
        .and_then(Json::as_array)
        .unwrap_or(&empty);
    refs.into_iter().zip(records.iter().cloned()).collect()
}

/// The pool's network `name` names (uuid, name label or bridge).
pub(crate) fn find_network<'a>(
    pool_networks: &'a BTreeMap<NetworkRef, NetworkRecord>,
    name: &str,
) -> Option<(&'a NetworkRef, &'a NetworkRecord)> {
    pool_networks
        .iter()
        .find(|(_, n)| n.uuid.eq_ignore_ascii_case(name))
        .or_else(|| pool_networks.iter().find(|(_, n)| n.name_label == name))
        .or_else(|| pool_networks.iter().find(|(_, n)| n.bridge == name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_networks_pair_records_with_the_vifs_sorted_references() {
        let metadata = serde_json::json!({
            "vifs": [
                {"network": "OpaqueRef:b", "device": "0"},
                {"network": "OpaqueRef:a", "device": "1"},
                {"network": "OpaqueRef:b", "device": "2"},
            ],
            "networks": [{"uuid": "A"}, {"uuid": "B"}],
            "missing": {},
        });
        let n = saved_networks(&metadata);
        assert_eq!(text(&n["OpaqueRef:a"], "uuid"), "A");
        assert_eq!(text(&n["OpaqueRef:b"], "uuid"), "B");
        // A network the pool did not answer for is skipped, not shifted.
        let metadata = serde_json::json!({
            "vifs": [{"network": "OpaqueRef:a"}, {"network": "OpaqueRef:b"}],
            "networks": [{"uuid": "B"}],
            "missing": {"network OpaqueRef:a": "HANDLE_INVALID"},
        });
        let n = saved_networks(&metadata);
        assert_eq!(n.len(), 1);
        assert_eq!(text(&n["OpaqueRef:b"], "uuid"), "B");
    }

    #[test]
    fn xml_rpc_ints_saved_as_text_still_read() {
        let v = serde_json::json!({"VCPUs_max": "4", "MTU": 9000});
        assert_eq!(int(&v, "VCPUs_max"), Some(4));
        assert_eq!(int(&v, "MTU"), Some(9000));
    }
}

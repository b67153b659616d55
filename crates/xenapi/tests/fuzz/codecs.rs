//! The codecs alone: XML-RPC and JSON-RPC replies and calls, task result
//! fragments, error descriptions and record decoders, fed random bytes,
//! mutations of valid encodings and random value trees. Each must give a
//! value or a typed error, without a panic, and allocate in proportion to
//! its input.

use std::collections::BTreeMap;

use cbtvault_xenapi::rpc::{jsonrpc, xmlrpc};
use cbtvault_xenapi::types::{NbdInfo, SrRecord, TaskRecord, VbdRecord, VdiRecord, VmRecord};
use cbtvault_xenapi::{Response, Transport, Value, XapiError};
use proptest::prelude::*;
use proptest::sample::Index;

use super::watch::watch;

/// Largest allocation a decoder may make: a constant plus a multiple of
/// its input (a parsed tree is a few times the text it came from).
fn alloc_bound(input: usize) -> usize {
    (64 << 10) + 16 * input
}

/// A VDI record as XAPI returns it.
pub fn vdi_record() -> Value {
    let s = |v: &str| Value::from(v);
    Value::Struct(BTreeMap::from([
        ("uuid".into(), s("5b6a0bd1-5c3e-4a2f-9d0c-6c1ab0f7c0de")),
        ("name_label".into(), s("disk <0> & \"1\"")),
        ("name_description".into(), s("")),
        ("SR".into(), s("OpaqueRef:sr")),
        ("VBDs".into(), Value::Array(vec![s("OpaqueRef:vbd")])),
        ("virtual_size".into(), Value::Int(1 << 40)),
        ("physical_utilisation".into(), s("4096")),
        ("type".into(), s("user")),
        ("sharable".into(), Value::Bool(false)),
        ("read_only".into(), Value::Bool(false)),
        ("cbt_enabled".into(), Value::Bool(true)),
        (
            "snapshot_time".into(),
            Value::DateTime("20240131T12:00:00Z".into()),
        ),
        (
            "other_config".into(),
            Value::string_map([("k", "v\r\n"), ("n", "1")]),
        ),
        ("sm_config".into(), Value::Struct(BTreeMap::new())),
        ("tags".into(), Value::Array(vec![s("a"), s("b")])),
        ("progress".into(), Value::Double(0.25)),
        ("port".into(), Value::Int(10809)),
        ("status".into(), s("success")),
        ("result".into(), s("<value>OpaqueRef:x</value>")),
        ("error_info".into(), Value::Array(vec![])),
        ("nothing".into(), Value::Nil),
    ]))
}

/// Valid replies of both formats: success with a record, a map of
/// records and a set of them, and failures.
pub fn replies() -> Vec<(Transport, Vec<u8>)> {
    let record = vdi_record();
    let results = [
        Response::Success(record.clone()),
        Response::Success(Value::Struct(BTreeMap::from([(
            "OpaqueRef:1".to_owned(),
            record.clone(),
        )]))),
        Response::Success(Value::Array(vec![record])),
        Response::Success(Value::from("OpaqueRef:session")),
        Response::Failure(vec![
            "HANDLE_INVALID".into(),
            "VDI".into(),
            "OpaqueRef:x".into(),
        ]),
        Response::Failure(vec![
            "SR_BACKEND_FAILURE_460".into(),
            String::new(),
            "a".into(),
            "b".into(),
        ]),
    ];
    let mut out = Vec::new();
    for r in &results {
        out.push((Transport::XmlRpc, xmlrpc::encode_response(r).into_bytes()));
        for version in [jsonrpc::Version::V1, jsonrpc::Version::V2] {
            out.push((
                Transport::JsonRpc,
                jsonrpc::encode_response(version, &serde_json::json!(7), r),
            ));
        }
    }
    out
}

/// Every decoder of the crate that takes outside data.
fn decode_all(transport: Transport, body: &[u8]) {
    let value = match transport {
        Transport::JsonRpc => {
            let _ = jsonrpc::decode_call(body);
            jsonrpc::decode_response(body)
        }
        _ => {
            let text = String::from_utf8_lossy(body);
            let _ = xmlrpc::decode_call(&text);
            let _ = xmlrpc::decode_value_fragment(&text);
            xmlrpc::decode_response(&text)
        }
    };
    match value {
        Ok(Response::Success(v)) => decode_records(&v),
        Ok(Response::Failure(d)) => {
            let e = XapiError::from_description(d);
            let _ = (e.to_string(), e.is_retryable(), e.description());
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

fn decode_records(v: &Value) {
    let _ = VdiRecord::from_value(v);
    let _ = VmRecord::from_value(v);
    let _ = VbdRecord::from_value(v);
    let _ = SrRecord::from_value(v);
    let _ = TaskRecord::from_value(v);
    let _ = NbdInfo::from_value(v);
    for (_, inner) in v.as_struct().into_iter().flatten() {
        let _ = VdiRecord::from_value(inner);
    }
    for inner in v.as_array().into_iter().flatten() {
        let _ = NbdInfo::from_value(inner);
    }
}

fn check(transport: Transport, body: &[u8]) -> Result<(), TestCaseError> {
    let ((), w) = watch(|| decode_all(transport, body));
    prop_assert_eq!(w.panics, 0, "a decoder panicked");
    prop_assert!(
        w.largest_alloc <= alloc_bound(body.len()),
        "{} bytes allocated at once for {} bytes of input",
        w.largest_alloc,
        body.len()
    );
    Ok(())
}

/// Fragments that mean something to one of the two parsers.
const TOKENS: &[&str] = &[
    "<value>",
    "</value>",
    "<struct>",
    "<member><name>Status</name><value>Success</value></member>",
    "<array><data>",
    "<int>99999999999999999999</int>",
    "<double>1e999</double>",
    "<boolean>2</boolean>",
    "<nil/>",
    "&#x110000;",
    "&#0;",
    "&#xD800;",
    "&unknown;",
    "&amp;",
    "<![CDATA[x]]>",
    "]]>",
    "<!DOCTYPE x [<!ENTITY a \"aaaa\">]>",
    "<?pi x?>",
    "<!-- c -->",
    "\u{feff}",
    "\"",
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    "null",
    "1e400",
    "-0",
    "18446744073709551616",
    "\"\\ud800\"",
    "\"error\":",
    "\"result\":",
];

#[derive(Clone, Debug)]
enum Edit {
    Flip(Index, u8),
    Truncate(Index),
    Delete(Index, usize),
    Insert(Index, Vec<u8>),
    Token(Index, Index),
    /// Wraps everything in `n` levels of a container.
    Nest(usize, bool),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        3 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Edit::Flip(i, b)),
        1 => any::<Index>().prop_map(Edit::Truncate),
        1 => (any::<Index>(), 1usize..32).prop_map(|(i, n)| Edit::Delete(i, n)),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..8)).prop_map(|(i, b)| Edit::Insert(i, b)),
        4 => (any::<Index>(), any::<Index>()).prop_map(|(i, t)| Edit::Token(i, t)),
        1 => (1usize..300, any::<bool>()).prop_map(|(n, xml)| Edit::Nest(n, xml)),
    ]
}

fn apply(mut b: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let len = b.len();
        match e {
            Edit::Flip(i, bit) if len > 0 => b[i.index(len)] ^= 1 << bit,
            Edit::Truncate(i) if len > 0 => b.truncate(i.index(len)),
            Edit::Delete(i, n) if len > 0 => {
                let at = i.index(len);
                b.drain(at..(at + n).min(len));
            }
            Edit::Insert(i, bytes) => {
                let at = i.index(len + 1);
                b.splice(at..at, bytes.iter().copied());
            }
            Edit::Token(i, t) => {
                let at = i.index(len + 1);
                let token = TOKENS[t.index(TOKENS.len())].as_bytes();
                b.splice(at..at, token.iter().copied());
            }
            Edit::Nest(n, xml) => {
                let (open, close): (&[u8], &[u8]) = if *xml {
                    (b"<value><array><data>", b"</data></array></value>")
                } else {
                    (b"[", b"]")
                };
                let mut out = open.repeat(*n);
                out.extend_from_slice(&b);
                out.extend_from_slice(&close.repeat(*n));
                b = out;
            }
            _ => {}
        }
    }
    b
}

/// Random value trees, a few levels deep.
fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Nil),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        any::<f64>().prop_map(Value::Double),
        ".{0,12}".prop_map(Value::String),
        "[0-9T:Z-]{0,20}".prop_map(Value::DateTime),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("uuid".to_owned()),
                    Just("virtual_size".to_owned()),
                    Just("port".to_owned()),
                    Just("tags".to_owned()),
                    Just("other_config".to_owned()),
                    Just("status".to_owned()),
                    ".{0,8}",
                ],
                inner,
                0..6
            )
            .prop_map(Value::Struct),
        ]
    })
}

/// XML-RPC carries ints as strings and JSON cannot carry NaN or the
/// infinities; everything else survives an encode and decode unchanged.
fn comparable(v: &Value, xml: bool) -> Value {
    match v {
        Value::Int(i) if xml => Value::String(i.to_string()),
        Value::Double(d) if !d.is_finite() && !xml => Value::Nil,
        Value::DateTime(s) if !xml => Value::String(s.clone()),
        Value::Array(items) => Value::Array(items.iter().map(|i| comparable(i, xml)).collect()),
        Value::Struct(m) => Value::Struct(
            m.iter()
                .map(|(k, v)| (k.clone(), comparable(v, xml)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Equal, doubles within a few units in the last place: serde_json's
/// default float parser is fast rather than exact in the last digit (for
/// subnormal values too, where a relative tolerance does not fit).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Double(x), Value::Double(y)) => {
            x == y
                || (x.is_nan() && y.is_nan())
                || (x.is_sign_negative() == y.is_sign_negative()
                    && x.to_bits().abs_diff(y.to_bits()) <= 4)
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (Value::Struct(x), Value::Struct(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|((ka, a), (kb, b))| ka == kb && same(a, b))
        }
        _ => a == b,
    }
}

#[test]
fn valid_replies_decode() {
    for (transport, body) in replies() {
        let r = match transport {
            Transport::JsonRpc => jsonrpc::decode_response(&body),
            _ => xmlrpc::decode_response(std::str::from_utf8(&body).unwrap()),
        };
        let r = r.unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&body)));
        if let Response::Success(v @ Value::Struct(_)) = &r
            && v.as_struct().is_some_and(|m| m.contains_key("uuid"))
        {
            VdiRecord::from_value(v).unwrap();
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes(xml in any::<bool>(), body in prop::collection::vec(any::<u8>(), 0..512)) {
        let transport = if xml { Transport::XmlRpc } else { Transport::JsonRpc };
        check(transport, &body)?;
    }

    #[test]
    fn mutated_replies(which in any::<Index>(), edits in prop::collection::vec(edit(), 1..5)) {
        let replies = replies();
        let (transport, body) = &replies[which.index(replies.len())];
        check(*transport, &apply(body.clone(), &edits))?;
    }

    /// Random values survive an encode and decode in both formats, and
    /// the record decoders take any value without panicking.
    #[test]
    fn value_trees(v in value()) {
        for xml in [true, false] {
            let r = Response::Success(v.clone());
            let decoded = if xml {
                xmlrpc::decode_response(&xmlrpc::encode_response(&r))
            } else {
                jsonrpc::decode_response(&jsonrpc::encode_response(jsonrpc::Version::V2, &serde_json::json!(1), &r))
            };
            match decoded {
                Ok(Response::Success(back)) => prop_assert!(same(&back, &comparable(&v, xml)), "{back:?} != {v:?}"),
                other => prop_assert!(false, "{other:?}"),
            }
            let call = xmlrpc::encode_call("VDI.create", std::slice::from_ref(&v));
            prop_assert!(xmlrpc::decode_call(&call).is_ok());
            let call = jsonrpc::encode_call("VDI.create", std::slice::from_ref(&v), 3);
            prop_assert!(jsonrpc::decode_call(&call).is_ok());
        }
        let ((), w) = watch(|| decode_records(&v));
        prop_assert_eq!(w.panics, 0);
    }

    /// Any description makes a typed error that gives it back unchanged.
    #[test]
    fn error_descriptions(
        code in prop_oneof![
            Just("SESSION_INVALID".to_owned()),
            Just("HANDLE_INVALID".to_owned()),
            Just("VDI_IN_USE".to_owned()),
            Just("OTHER_OPERATION_IN_PROGRESS".to_owned()),
            Just("MESSAGE_PARAMETER_COUNT_MISMATCH".to_owned()),
            Just("VM_BAD_POWER_STATE".to_owned()),
            "SR_BACKEND_FAILURE_[0-9]{0,12}",
            ".{0,16}",
        ],
        params in prop::collection::vec(".{0,8}", 0..5),
    ) {
        let mut description = vec![code];
        description.extend(params);
        let ((e, shown), w) = watch(|| {
            let e = XapiError::from_description(description.clone());
            let shown = e.to_string();
            (e, shown)
        });
        prop_assert_eq!(w.panics, 0);
        prop_assert_eq!(e.description(), description);
        prop_assert!(shown.starts_with(&e.code()));
    }
}

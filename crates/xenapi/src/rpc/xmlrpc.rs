//! XML-RPC as XAPI speaks it (`POST /`).
//!
//! * A call is `<methodCall>` with the session reference as first param.
//! * A reply is never an XML-RPC `<fault>`: it is a struct with `Status`
//!   `Success` and a `Value`, or `Failure` and an `ErrorDescription` array
//!   of strings `[CODE, param…]`.
//! * `int` is 64-bit and travels as a string of decimal digits; XAPI writes
//!   strings as untyped `<value>text</value>`; `void` is the empty string.
//!
//! Both directions are here because the simulator serves what the client
//! sends. Strings go out as `<string>` in calls (as the Python SDK sends
//! them) and untyped in replies (as XAPI does); both forms are read.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use quick_xml::Reader;
use quick_xml::events::Event;

use super::Response;
use crate::error::{Error, Result};
use crate::value::Value;

const TRANSPORT: &str = "XML-RPC";
/// Deepest nesting of elements accepted; XAPI values are a few levels deep.
const MAX_DEPTH: usize = 64;

/// How strings are written.
#[derive(Clone, Copy)]
enum Strings {
    /// `<value><string>x</string></value>`.
    Typed,
    /// `<value>x</value>`.
    Untyped,
}

fn protocol(detail: impl Into<String>) -> Error {
    Error::Protocol {
        transport: TRANSPORT,
        detail: detail.into(),
    }
}

/// Encodes a call.
pub fn encode_call(method: &str, params: &[Value]) -> String {
    let mut out = String::with_capacity(256);
    out.push_str("<?xml version=\"1.0\"?><methodCall><methodName>");
    escape_into(&mut out, method);
    out.push_str("</methodName><params>");
    for p in params {
        out.push_str("<param>");
        write_value(&mut out, p, Strings::Typed);
        out.push_str("</param>");
    }
    out.push_str("</params></methodCall>");
    out
}

/// Encodes XAPI's reply struct.
pub fn encode_response(response: &Response) -> String {
    let mut out = String::with_capacity(256);
    out.push_str(
        "<?xml version=\"1.0\"?><methodResponse><params><param><value><struct>\
         <member><name>Status</name>",
    );
    match response {
        Response::Success(v) => {
            out.push_str("<value>Success</value></member><member><name>Value</name>");
            write_value(&mut out, v, Strings::Untyped);
        }
        Response::Failure(description) => {
            out.push_str(
                "<value>Failure</value></member><member><name>ErrorDescription</name>\
                 <value><array><data>",
            );
            for s in description {
                out.push_str("<value>");
                escape_into(&mut out, s);
                out.push_str("</value>");
            }
            out.push_str("</data></array></value>");
        }
    }
    out.push_str("</member></struct></value></param></params></methodResponse>");
    out
}

/// Encodes one value the way XAPI stores a task result
/// (`<value>OpaqueRef:…</value>`).
pub fn encode_value_fragment(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value, Strings::Untyped);
    out
}

/// Decodes a call: the method name and its parameters.
pub fn decode_call(body: &str) -> Result<(String, Vec<Value>)> {
    let root = parse_tree(body)?;
    expect_name(&root, "methodCall")?;
    let name = root
        .child("methodName")
        .ok_or_else(|| protocol("methodCall without methodName"))?
        .text
        .trim()
        .to_owned();
    let mut params = Vec::new();
    if let Some(ps) = root.child("params") {
        for p in ps.elements() {
            expect_name(p, "param")?;
            let v = p
                .child("value")
                .ok_or_else(|| protocol("param without value"))?;
            params.push(value_of(v)?);
        }
    }
    Ok((name, params))
}

/// Decodes XAPI's reply struct.
pub fn decode_response(body: &str) -> Result<Response> {
    let root = parse_tree(body)?;
    expect_name(&root, "methodResponse")?;
    if let Some(fault) = root.child("fault") {
        let detail = fault
            .child("value")
            .map(value_of)
            .transpose()?
            .map(|v| format!("{v:?}"))
            .unwrap_or_default();
        return Err(protocol(format!(
            "XML-RPC fault instead of a XAPI reply: {detail}"
        )));
    }
    let value = root
        .child("params")
        .and_then(|p| p.child("param"))
        .and_then(|p| p.child("value"))
        .ok_or_else(|| protocol("methodResponse without params/param/value"))?;
    let Value::Struct(mut fields) = value_of(value)? else {
        return Err(protocol("reply is not a struct"));
    };
    match fields.get("Status").and_then(Value::as_str) {
        Some("Success") => fields
            .remove("Value")
            .map(Response::Success)
            .ok_or_else(|| protocol("Success without Value")),
        Some("Failure") => match fields.remove("ErrorDescription") {
            Some(Value::Array(items)) => Ok(Response::Failure(
                items.into_iter().map(description_item).collect(),
            )),
            _ => Err(protocol("Failure without an ErrorDescription array")),
        },
        _ => Err(protocol("reply without Status Success or Failure")),
    }
}

/// Decodes a task result (an XML-RPC `<value>` fragment; empty means void).
pub fn decode_value_fragment(text: &str) -> Result<Value> {
    if text.trim().is_empty() {
        return Ok(Value::String(String::new()));
    }
    let root = parse_tree(text)?;
    expect_name(&root, "value")?;
    value_of(&root)
}

fn description_item(v: Value) -> String {
    match v {
        Value::String(s) | Value::DateTime(s) => s,
        Value::Int(i) => i.to_string(),
        Value::Bool(b) => b.to_string(),
        other => format!("{other:?}"),
    }
}

fn write_value(out: &mut String, v: &Value, strings: Strings) {
    out.push_str("<value>");
    match v {
        Value::Nil => out.push_str("<nil/>"),
        Value::Bool(b) => out.push_str(if *b {
            "<boolean>1</boolean>"
        } else {
            "<boolean>0</boolean>"
        }),
        // XAPI ints are strings on this transport.
        Value::Int(i) => match strings {
            Strings::Typed => {
                let _ = write!(out, "<string>{i}</string>");
            }
            Strings::Untyped => {
                let _ = write!(out, "{i}");
            }
        },
        Value::Double(d) => {
            let _ = write!(out, "<double>{d:?}</double>");
        }
        Value::String(s) => match strings {
            Strings::Typed => {
                out.push_str("<string>");
                escape_into(out, s);
                out.push_str("</string>");
            }
            Strings::Untyped => escape_into(out, s),
        },
        Value::DateTime(s) => {
            out.push_str("<dateTime.iso8601>");
            escape_into(out, s);
            out.push_str("</dateTime.iso8601>");
        }
        Value::Array(items) => {
            out.push_str("<array><data>");
            for item in items {
                write_value(out, item, strings);
            }
            out.push_str("</data></array>");
        }
        Value::Struct(members) => {
            out.push_str("<struct>");
            for (k, v) in members {
                out.push_str("<member><name>");
                escape_into(out, k);
                out.push_str("</name>");
                write_value(out, v, strings);
                out.push_str("</member>");
            }
            out.push_str("</struct>");
        }
    }
    out.push_str("</value>");
}

fn escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            // Keep carriage returns: a parser would normalise a raw one away.
            '\r' => out.push_str("&#13;"),
            c => out.push(c),
        }
    }
}

/// An element with its child elements and its own text.
#[derive(Debug, Default)]
struct Node {
    name: String,
    children: Vec<Node>,
    text: String,
}

impl Node {
    fn child(&self, name: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.name == name)
    }

    fn elements(&self) -> impl Iterator<Item = &Node> {
        self.children.iter()
    }
}

fn expect_name(node: &Node, name: &str) -> Result<()> {
    if node.name == name {
        Ok(())
    } else {
        Err(protocol(format!(
            "expected <{name}>, found <{}>",
            node.name
        )))
    }
}

fn parse_tree(body: &str) -> Result<Node> {
    let mut reader = Reader::from_str(body);
    let mut stack: Vec<Node> = Vec::new();
    let mut root: Option<Node> = None;
    loop {
        let event = reader
            .read_event()
            .map_err(|e| protocol(format!("bad XML: {e}")))?;
        match event {
            Event::Start(start) => {
                if root.is_some() {
                    return Err(protocol("content after the root element"));
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(protocol("elements nested too deeply"));
                }
                stack.push(Node {
                    name: start.name().as_ref().to_owned(),
                    ..Node::default()
                });
            }
            Event::Empty(start) => {
                let node = Node {
                    name: start.name().as_ref().to_owned(),
                    ..Node::default()
                };
                match stack.last_mut() {
                    Some(parent) => parent.children.push(node),
                    None if root.is_none() => root = Some(node),
                    None => return Err(protocol("content after the root element")),
                }
            }
            Event::End(end) => {
                let node = stack.pop().ok_or_else(|| protocol("unbalanced end tag"))?;
                if node.name != end.name().as_ref() {
                    return Err(protocol(format!(
                        "<{}> closed by </{}>",
                        node.name,
                        end.name().as_ref()
                    )));
                }
                match stack.last_mut() {
                    Some(parent) => parent.children.push(node),
                    None => root = Some(node),
                }
            }
            Event::Text(text) => {
                if let Some(node) = stack.last_mut() {
                    node.text.push_str(&text.xml10_content());
                } else if !text.xml10_content().trim().is_empty() {
                    return Err(protocol("text outside the root element"));
                }
            }
            Event::CData(cdata) => {
                if let Some(node) = stack.last_mut() {
                    node.text.push_str(&cdata.xml10_content());
                }
            }
            Event::GeneralRef(reference) => {
                let c = match reference.resolve_char_ref() {
                    Ok(Some(c)) => c,
                    Ok(None) => match reference.xml10_content().as_ref() {
                        "lt" => '<',
                        "gt" => '>',
                        "amp" => '&',
                        "apos" => '\'',
                        "quot" => '"',
                        other => return Err(protocol(format!("unknown entity &{other};"))),
                    },
                    Err(e) => return Err(protocol(format!("bad character reference: {e}"))),
                };
                if let Some(node) = stack.last_mut() {
                    node.text.push(c);
                }
            }
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) | Event::DocType(_) => {}
            Event::Eof => break,
        }
    }
    if !stack.is_empty() {
        return Err(protocol("document ends inside an element"));
    }
    root.ok_or_else(|| protocol("empty document"))
}

fn value_of(node: &Node) -> Result<Value> {
    let mut typed = node.elements();
    let Some(inner) = typed.next() else {
        // Untyped: the text, verbatim, is a string.
        return Ok(Value::String(node.text.clone()));
    };
    if typed.next().is_some() {
        return Err(protocol("<value> with more than one element"));
    }
    let text = inner.text.as_str();
    Ok(match inner.name.as_str() {
        "string" => Value::String(text.to_owned()),
        "int" | "i4" | "i8" => Value::Int(
            text.trim()
                .parse()
                .map_err(|_| protocol(format!("bad <{}> {text:?}", inner.name)))?,
        ),
        "boolean" => match text.trim() {
            "1" | "true" => Value::Bool(true),
            "0" | "false" => Value::Bool(false),
            other => return Err(protocol(format!("bad <boolean> {other:?}"))),
        },
        "double" => Value::Double(
            text.trim()
                .parse()
                .map_err(|_| protocol(format!("bad <double> {text:?}")))?,
        ),
        "dateTime.iso8601" => Value::DateTime(text.trim().to_owned()),
        "base64" => Value::String(text.trim().to_owned()),
        "nil" => Value::Nil,
        "array" => {
            let data = inner
                .child("data")
                .ok_or_else(|| protocol("<array> without <data>"))?;
            Value::Array(data.elements().map(value_of).collect::<Result<_>>()?)
        }
        "struct" => {
            let mut members = BTreeMap::new();
            for member in inner.elements() {
                expect_name(member, "member")?;
                let name = member
                    .child("name")
                    .ok_or_else(|| protocol("<member> without <name>"))?
                    .text
                    .clone();
                let value = member
                    .child("value")
                    .ok_or_else(|| protocol("<member> without <value>"))?;
                members.insert(name, value_of(value)?);
            }
            Value::Struct(members)
        }
        other => return Err(protocol(format!("unknown value type <{other}>"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_round_trips() {
        let params = vec![
            Value::from("OpaqueRef:abc"),
            Value::Int(1 << 40),
            Value::Bool(true),
            Value::Double(0.5),
            Value::Array(vec![Value::from("a <&> b"), Value::from("")]),
            Value::string_map([("k", "v\r\n"), ("e", "")]),
            Value::Nil,
        ];
        let xml = encode_call("VDI.create", &params);
        let (method, decoded) = decode_call(&xml).unwrap();
        assert_eq!(method, "VDI.create");
        // Ints come back as digit strings: the wire cannot tell them apart.
        let mut expected = params.clone();
        expected[1] = Value::from("1099511627776");
        assert_eq!(decoded, expected);
        assert_eq!(decoded[1].as_i64(), Some(1 << 40));
    }

    #[test]
    fn reads_xapi_documented_reply() {
        // From the XenAPI wire protocol documentation.
        let body = r#"<?xml version="1.0"?>
<methodResponse><params><param><value>
    <struct>
       <member>
         <name>Status</name>
         <value>Success</value>
       </member>
       <member>
          <name>Value</name>
          <value>
            <array>
               <data>
                 <value>81547a35-205c-a551-c577-00b982c5fe00</value>
                 <value>61c85a22-05da-b8a2-2e55-06b0847da503</value>
               </data>
            </array>
         </value>
       </member>
    </struct>
</value></param></params></methodResponse>"#;
        let Response::Success(Value::Array(items)) = decode_response(body).unwrap() else {
            panic!("not a success array");
        };
        assert_eq!(
            items[1],
            Value::from("61c85a22-05da-b8a2-2e55-06b0847da503")
        );
    }

    #[test]
    fn failure_reply() {
        let r = Response::Failure(vec!["SESSION_INVALID".into(), "OpaqueRef:x".into()]);
        let xml = encode_response(&r);
        assert_eq!(decode_response(&xml).unwrap(), r);
    }

    #[test]
    fn typed_and_untyped_strings_and_ints() {
        let xml = "<?xml version='1.0'?><methodCall><methodName>x</methodName><params>\
            <param><value><string> a </string></value></param>\
            <param><value> b </value></param>\
            <param><value><i8>-7</i8></value></param>\
            <param><value><int>7</int></value></param>\
            <param><value/></param>\
            <param><value><struct></struct></value></param>\
            </params></methodCall>";
        let (_, p) = decode_call(xml).unwrap();
        assert_eq!(
            p,
            vec![
                Value::from(" a "),
                Value::from(" b "),
                Value::Int(-7),
                Value::Int(7),
                Value::from(""),
                Value::Struct(BTreeMap::new()),
            ]
        );
    }

    #[test]
    fn task_result_fragments() {
        assert_eq!(
            decode_value_fragment("<value>OpaqueRef:1</value>").unwrap(),
            Value::from("OpaqueRef:1")
        );
        assert_eq!(decode_value_fragment("").unwrap(), Value::from(""));
        let v = Value::Array(vec![Value::from("x")]);
        assert_eq!(
            decode_value_fragment(&encode_value_fragment(&v)).unwrap(),
            v
        );
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        for body in [
            "",
            "<methodResponse>",
            "<methodResponse><params><param><value><int>x</int></value></param></params></methodResponse>",
            "<methodResponse><fault><value><struct/></value></fault></methodResponse>",
            "<a></b>",
            "<methodResponse><params><param><value>Success</value></param></params></methodResponse>",
            "<methodResponse><params><param><value><struct><member><name>Status</name><value>Failure</value></member></struct></value></param></params></methodResponse>",
            "<x>&bogus;</x>",
        ] {
            assert!(decode_response(body).is_err(), "{body}");
        }
        let deep = "<value><array><data>".repeat(100);
        assert!(decode_value_fragment(&deep).is_err());
    }
}

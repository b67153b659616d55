//! The two wire formats XAPI serves, behind one [`Response`] type.
//!
//! [`jsonrpc`] (`POST /jsonrpc`) is used by default; [`xmlrpc`] (`POST /`)
//! when the host has no JSON-RPC endpoint (hosts before XenServer 7.3) or
//! when asked for. Both modules encode and decode both directions so the
//! simulator can serve exactly what the client sends.

pub mod jsonrpc;
pub mod xmlrpc;

use crate::value::Value;

/// Outcome of a call as XAPI reports it.
#[derive(Clone, Debug, PartialEq)]
pub enum Response {
    /// The call's result.
    Success(Value),
    /// `[CODE, param…]`.
    Failure(Vec<String>),
}

/// A wire format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// JSON-RPC 2.0 at `/jsonrpc`.
    JsonRpc,
    /// XML-RPC at `/`.
    XmlRpc,
}

impl Transport {
    /// The HTTP path calls are posted to.
    pub fn path(self) -> &'static str {
        match self {
            Transport::JsonRpc => "/jsonrpc",
            Transport::XmlRpc => "/",
        }
    }

    /// The request content type.
    pub fn content_type(self) -> &'static str {
        match self {
            Transport::JsonRpc => "application/json",
            Transport::XmlRpc => "text/xml",
        }
    }

    /// Name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Transport::JsonRpc => "JSON-RPC",
            Transport::XmlRpc => "XML-RPC",
        }
    }

    /// Encodes a call.
    pub(crate) fn encode_call(self, method: &str, params: &[Value], id: u64) -> Vec<u8> {
        match self {
            Transport::JsonRpc => jsonrpc::encode_call(method, params, id),
            Transport::XmlRpc => xmlrpc::encode_call(method, params).into_bytes(),
        }
    }

    /// Decodes a reply.
    pub(crate) fn decode_response(self, body: &[u8]) -> crate::Result<Response> {
        match self {
            Transport::JsonRpc => jsonrpc::decode_response(body),
            Transport::XmlRpc => {
                let text = std::str::from_utf8(body).map_err(|_| crate::Error::Protocol {
                    transport: "XML-RPC",
                    detail: "reply is not UTF-8".into(),
                })?;
                xmlrpc::decode_response(text)
            }
        }
    }
}

//! Errors: a vSphere fault (the `_typeName` body of an HTTP 500, or a
//! task's `info.error`) as a typed [`Fault`], everything else (transport,
//! TLS, malformed answers, configuration) as the other variants.

use std::fmt;
use std::time::Duration;

/// Result of this crate's operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong talking to vCenter or ESXi.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server answered a call with a fault (HTTP 500 + fault object).
    /// (Boxed: a fault is large, and every `Result` of this crate carries
    /// room for its error.)
    #[error("{what}: {fault}")]
    Fault { what: String, fault: Box<Fault> },

    /// A task ended in `error`; its `info.error.fault` is `fault`.
    #[error("{what} (task {task}) failed: {fault}")]
    Task {
        what: String,
        task: String,
        fault: Box<Fault>,
    },

    /// The server could not be reached, or the connection broke.
    #[error("cannot talk to {endpoint}")]
    Connect {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },

    /// The server presented a certificate other than the pinned one.
    #[error("{}", .mismatch.describe(.endpoint))]
    PinMismatch {
        endpoint: String,
        mismatch: cbtvault_tls_pin::PinMismatch,
    },

    /// The HTTP exchange failed (reset mid-request, bad framing).
    #[error("HTTP exchange with {endpoint} failed")]
    Http {
        endpoint: String,
        #[source]
        source: hyper::Error,
    },

    /// An HTTP status the API does not use for answers or faults
    /// (a proxy's 503, a 404 for a release the server does not serve).
    #[error("HTTP {status} for {what}: {body}")]
    HttpStatus {
        status: u16,
        what: String,
        body: String,
    },

    /// A well-formed HTTP answer whose JSON is not what the API promises.
    #[error("unexpected answer to {what}: {detail}")]
    Protocol { what: String, detail: String },

    /// A request or a task did not finish in time.
    #[error("{what} did not finish within {after:?}")]
    Timeout { what: String, after: Duration },

    /// The password could not be read (the secret is never in the message).
    #[error(transparent)]
    Password(#[from] cbtvault_tls_pin::PasswordError),

    /// Bad options: URL, TLS trust.
    #[error("{0}")]
    Config(String),
}

impl Error {
    /// The fault inside, if the server (or a task) answered with one.
    pub fn fault(&self) -> Option<&Fault> {
        match self {
            Error::Fault { fault, .. } | Error::Task { fault, .. } => Some(fault.as_ref()),
            _ => None,
        }
    }

    /// Whether the fault is of type `name` (`FileFault`, `NotFound`...).
    pub fn is_fault(&self, name: &str) -> bool {
        self.fault().is_some_and(|f| f.type_name == name)
    }

    /// Whether the session is gone (expired, logged out, server restart).
    pub fn is_not_authenticated(&self) -> bool {
        self.is_fault("NotAuthenticated")
    }

    /// Whether trying again later may succeed: lost connections, timeouts,
    /// 5xx statuses outside the fault protocol, and the faults vSphere
    /// documents as transient (`SystemError`, `TaskInProgress`).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::Http { .. } | Error::Timeout { .. } => true,
            Error::HttpStatus { status, .. } => *status >= 500,
            Error::Fault { fault, .. } | Error::Task { fault, .. } => {
                matches!(fault.type_name.as_str(), "SystemError" | "TaskInProgress")
            }
            _ => false,
        }
    }

    pub(crate) fn tls_connect(endpoint: &str, source: std::io::Error) -> Self {
        match cbtvault_tls_pin::PinMismatch::find(&source) {
            Some(mismatch) => Error::PinMismatch {
                endpoint: endpoint.to_owned(),
                mismatch: mismatch.clone(),
            },
            None => Error::Connect {
                endpoint: endpoint.to_owned(),
                source,
            },
        }
    }

    pub(crate) fn protocol(what: &str, detail: impl Into<String>) -> Self {
        Error::Protocol {
            what: what.to_owned(),
            detail: detail.into(),
        }
    }
}

/// A vSphere fault as the JSON API sends it: `{"_typeName": "FileFault",
/// "faultMessage": [...], "file": "...", "faultstring": "..."}`.
#[derive(Debug, Clone)]
pub struct Fault {
    /// `_typeName`: `NotAuthenticated`, `InvalidArgument`, `FileFault`...
    pub type_name: String,
    /// `faultstring` (sent by real servers, not in the schema), else the
    /// first `faultMessage[].message`, else empty.
    pub message: String,
    /// `faultMessage[].key`, such as `vim.hostd.vmsvc.cbt.cannotGetChanges`:
    /// what VMware's own tools branch on.
    pub keys: Vec<String>,
    /// `InvalidArgument.invalidProperty` (`changeId`, `startOffset`...).
    pub invalid_property: Option<String>,
    /// The whole object, for fields this type does not name.
    pub body: serde_json::Value,
}

impl Fault {
    /// Reads a fault object; `None` if it has no `_typeName`.
    pub fn from_json(body: serde_json::Value) -> Option<Fault> {
        let type_name = body.get("_typeName")?.as_str()?.to_owned();
        let messages = body
            .get("faultMessage")
            .and_then(|m| m.as_array())
            .cloned()
            .unwrap_or_default();
        let keys = messages
            .iter()
            .filter_map(|m| m.get("key").and_then(|k| k.as_str()).map(str::to_owned))
            .collect();
        let message = body
            .get("faultstring")
            .and_then(|s| s.as_str())
            .map(str::to_owned)
            .or_else(|| {
                messages
                    .iter()
                    .find_map(|m| m.get("message").and_then(|s| s.as_str()).map(str::to_owned))
            })
            .unwrap_or_default();
        let invalid_property = body
            .get("invalidProperty")
            .and_then(|s| s.as_str())
            .map(str::to_owned);
        Some(Fault {
            type_name,
            message,
            keys,
            invalid_property,
            body,
        })
    }

    /// Whether CBT says the changeId cannot be used any more (reset, off,
    /// a new epoch): the caller copies the disk in full. Per VMware's CSI
    /// driver: `FileFault` and `InvalidState` on a query, and
    /// `InvalidArgument` on `changeId`.
    pub fn invalidates_change_id(&self) -> bool {
        match self.type_name.as_str() {
            "FileFault" | "InvalidState" => true,
            "InvalidArgument" => self.invalid_property.as_deref() == Some("changeId"),
            _ => false,
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.type_name)?;
        if let Some(p) = &self.invalid_property {
            write!(f, " (invalid property {p})")?;
        }
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        if let Some(k) = self.keys.first() {
            write!(f, " [{k}]")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_reads_the_fields_tools_branch_on() {
        let f = Fault::from_json(serde_json::json!({
            "_typeName": "FileFault",
            "file": "[ds1] vm/vm.vmdk",
            "faultMessage": [{"_typeName": "LocalizableMessage",
                              "key": "vim.hostd.vmsvc.cbt.cannotGetChanges",
                              "message": "Cannot compute changes"}]
        }))
        .unwrap();
        assert_eq!(f.type_name, "FileFault");
        assert_eq!(f.keys, ["vim.hostd.vmsvc.cbt.cannotGetChanges"]);
        assert_eq!(f.message, "Cannot compute changes");
        assert!(f.invalidates_change_id());
        let bad = Fault::from_json(serde_json::json!({
            "_typeName": "InvalidArgument", "invalidProperty": "startOffset"
        }))
        .unwrap();
        assert!(!bad.invalidates_change_id());
        assert!(bad.to_string().contains("startOffset"));
        assert!(Fault::from_json(serde_json::json!({"x": 1})).is_none());
    }
}

//! Errors: XAPI's own failures as a typed [`XapiError`], everything else
//! (transport, TLS, malformed replies) as the other variants of [`Error`].

use std::fmt;
use std::time::Duration;

/// Result of this crate's operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong talking to XAPI.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// XAPI answered with a failure (`ErrorDescription` / JSON-RPC `error`).
    /// The message says it in words and ends with the code; the failure is
    /// not also a `source`, so chains print it once.
    #[error("{}", explain(.0))]
    Xapi(XapiError),

    /// The host could not be reached or the connection broke.
    #[error("cannot talk to {endpoint}")]
    Connect {
        /// `host:port` that was dialled.
        endpoint: String,
        /// What the socket or TLS layer said.
        #[source]
        source: std::io::Error,
    },

    /// The host presented a certificate other than the pinned one.
    #[error("{}", .mismatch.describe(.endpoint))]
    PinMismatch {
        /// `host:port` that was dialled.
        endpoint: String,
        /// Which certificate came, and which was pinned where.
        mismatch: cbtvault_tls_pin::PinMismatch,
    },

    /// The HTTP layer failed (connection reset mid-request, bad framing).
    #[error("HTTP exchange with {endpoint} failed")]
    Http {
        /// `host:port` of the host.
        endpoint: String,
        /// What hyper said.
        #[source]
        source: hyper::Error,
    },

    /// The host answered with an unexpected HTTP status.
    #[error("HTTP {status} for {what}: {body}")]
    HttpStatus {
        /// The status code.
        status: u16,
        /// The request, without its query string (which may hold a session).
        what: String,
        /// The start of the response body, for the log.
        body: String,
    },

    /// The reply is not a well-formed XML-RPC or JSON-RPC answer.
    #[error("malformed {transport} reply: {detail}")]
    Protocol {
        /// `XML-RPC` or `JSON-RPC`.
        transport: &'static str,
        /// What was wrong.
        detail: String,
    },

    /// A value in a well-formed reply does not have the type the API promises.
    #[error("unexpected value for {field}: {detail}")]
    Decode {
        /// `Class.field` or the call whose result it is.
        field: String,
        /// What was expected and found.
        detail: String,
    },

    /// A request or a task did not finish in time.
    #[error("{what} did not finish within {after:?}")]
    Timeout {
        /// The call or task.
        what: String,
        /// The limit.
        after: Duration,
    },

    /// An asynchronous task was cancelled.
    #[error("task {task} for {call} was cancelled")]
    TaskCancelled {
        /// The task reference.
        task: String,
        /// The call the task ran.
        call: String,
    },

    /// The password could not be read from its file or variable.
    #[error(transparent)]
    Password(#[from] cbtvault_tls_pin::PasswordError),

    /// The client configuration is unusable (bad URL, bad certificate, …).
    #[error("invalid XenAPI client configuration: {0}")]
    Config(String),

    /// Reading the data of an upload failed.
    #[error("reading the upload source failed")]
    Io(#[from] std::io::Error),
}

impl From<XapiError> for Error {
    fn from(e: XapiError) -> Self {
        Error::Xapi(e)
    }
}

/// A XAPI failure in words, for the codes a user can act on; the code
/// itself ends the message, for searching the documentation.
fn explain(e: &XapiError) -> String {
    match e {
        XapiError::SessionAuthenticationFailed { message, .. } => {
            let said = if message.is_empty() {
                String::new()
            } else {
                format!("; the host said: {message}")
            };
            format!(
                "XenServer refused the login: wrong user name or password \
                 (SESSION_AUTHENTICATION_FAILED){said}"
            )
        }
        XapiError::HostIsSlave { master } => format!(
            "this host is not the pool master; connect to the master, {master} (HOST_IS_SLAVE)"
        ),
        XapiError::LicenceRestriction { feature } => {
            format!("the pool's licence does not allow {feature} (LICENCE_RESTRICTION)")
        }
        XapiError::HandleInvalid { class, handle } => {
            format!("XenServer has no {class} {handle} (HANDLE_INVALID)")
        }
        XapiError::Other { code, params } if code == "VDI_NOT_MANAGED" => format!(
            "XenServer does not manage VDI {} (VDI_NOT_MANAGED): it cannot snapshot or \
             track it; rescan its SR (xe sr-scan) or introduce the VDI, then back it up",
            params.first().map_or("?", String::as_str)
        ),
        other => format!("XenServer refused the call: {other}"),
    }
}

impl Error {
    /// A TLS connection to `endpoint` failed: a pin mismatch is told in
    /// full, anything else is a connection failure with its cause.
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

    /// The XAPI failure inside, if this is one.
    pub fn xapi(&self) -> Option<&XapiError> {
        match self {
            Error::Xapi(e) => Some(e),
            _ => None,
        }
    }

    /// Whether trying the same operation again later may succeed.
    ///
    /// True for transient XAPI failures ([`XapiError::is_retryable`]), lost
    /// connections, timeouts and HTTP 5xx; false for everything that would
    /// fail the same way again (bad handles, wrong types, bad credentials,
    /// malformed replies, configuration).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Xapi(e) => e.is_retryable(),
            Error::Connect { .. } | Error::Http { .. } | Error::Timeout { .. } => true,
            Error::HttpStatus { status, .. } => *status >= 500,
            Error::Protocol { .. }
            | Error::Decode { .. }
            | Error::TaskCancelled { .. }
            | Error::Password(_)
            | Error::PinMismatch { .. }
            | Error::Config(_)
            | Error::Io(_) => false,
        }
    }
}

/// A failure reported by XAPI: its error code and parameters.
///
/// The codes the backup engine acts on have variants with named
/// parameters (the parameter lists are those of xen-api's
/// `datamodel_errors.ml`); any other code, or a known code with an
/// unexpected number of parameters, is kept losslessly in
/// [`XapiError::Other`]. [`XapiError::from_description`] and
/// [`XapiError::description`] convert from and to the wire form
/// `[CODE, param…]`, and round-trip exactly.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum XapiError {
    /// `SESSION_INVALID [handle]`: logged out, expired or evicted.
    SessionInvalid {
        /// The session reference that was refused.
        handle: String,
    },
    /// `SESSION_AUTHENTICATION_FAILED [user, message]`: wrong user name or
    /// password (xapi `xapi_session.ml`, after a deliberate 5 s delay; the
    /// HTTP handlers' form has no parameters, read as two empty ones).
    SessionAuthenticationFailed {
        /// The user name given.
        user: String,
        /// Why, as the authentication module put it.
        message: String,
    },
    /// `HANDLE_INVALID [class, handle]`: no such object.
    HandleInvalid {
        /// The class, e.g. `VDI`.
        class: String,
        /// The reference that was not found.
        handle: String,
    },
    /// `VDI_IN_USE [vdi, operation]`: attached (possibly by an NBD connection).
    VdiInUse {
        /// The VDI reference.
        vdi: String,
        /// The refused operation, e.g. `data_destroy`.
        operation: String,
    },
    /// `VDI_INCOMPATIBLE_TYPE [vdi, type]`, e.g. a data operation on a
    /// `cbt_metadata` VDI.
    VdiIncompatibleType {
        /// The VDI reference.
        vdi: String,
        /// The VDI's type.
        vdi_type: String,
    },
    /// `VDI_NO_CBT_METADATA [vdi]`: `data_destroy` without CBT enabled.
    VdiNoCbtMetadata {
        /// The VDI reference.
        vdi: String,
    },
    /// `VDI_CBT_ENABLED [vdi]`: the operation needs CBT disabled first.
    VdiCbtEnabled {
        /// The VDI reference.
        vdi: String,
    },
    /// `VDI_MISSING [sr, vdi]`: the SR scan no longer finds the VDI.
    VdiMissing {
        /// The SR reference.
        sr: String,
        /// The VDI reference.
        vdi: String,
    },
    /// `SR_BACKEND_FAILURE_<n> [status, stdout, stderr]`: the storage
    /// manager failed; 460 is "changed blocks could not be computed".
    SrBackendFailure {
        /// The SM error number (`460` for `CBTChangedBlocksError`).
        code: u32,
        /// First parameter (usually empty).
        status: String,
        /// Second parameter: the SM message.
        stdout: String,
        /// Third parameter (usually empty).
        stderr: String,
    },
    /// `SR_OPERATION_NOT_SUPPORTED [sr]`.
    SrOperationNotSupported {
        /// The SR reference.
        sr: String,
    },
    /// `OPERATION_NOT_ALLOWED [reason]`.
    OperationNotAllowed {
        /// XAPI's explanation, e.g. `VDI is not a snapshot: OpaqueRef:…`.
        reason: String,
    },
    /// `OTHER_OPERATION_IN_PROGRESS [class, object, …]`.
    OtherOperationInProgress {
        /// The class of the busy object.
        class: String,
        /// The busy object.
        object: String,
        /// Further parameters (operation type and reference on newer hosts).
        rest: Vec<String>,
    },
    /// `MESSAGE_METHOD_UNKNOWN [method]`: the host does not know the call.
    MessageMethodUnknown {
        /// The method name.
        method: String,
    },
    /// `MESSAGE_PARAMETER_COUNT_MISMATCH [method, expected, received]`.
    MessageParameterCountMismatch {
        /// The method name.
        method: String,
        /// Expected number of parameters, as XAPI printed it.
        expected: String,
        /// Received number of parameters, as XAPI printed it.
        received: String,
    },
    /// `LICENCE_RESTRICTION [feature]`, e.g. CBT on an unlicensed pool.
    LicenceRestriction {
        /// The feature.
        feature: String,
    },
    /// `HOST_IS_SLAVE [master address]`: log in to the pool master instead.
    HostIsSlave {
        /// The master's address.
        master: String,
    },
    /// `VM_BAD_POWER_STATE [vm, expected, actual]`.
    VmBadPowerState {
        /// The VM reference.
        vm: String,
        /// The power state the operation needs.
        expected: String,
        /// The VM's power state.
        actual: String,
    },
    /// Any other failure, kept as XAPI sent it.
    Other {
        /// The error code.
        code: String,
        /// Its parameters.
        params: Vec<String>,
    },
}

/// Prefix of the storage manager's numbered failures.
const SR_BACKEND_FAILURE: &str = "SR_BACKEND_FAILURE_";

impl XapiError {
    /// Builds the typed error from XAPI's `[CODE, param…]`.
    pub fn from_description(mut description: Vec<String>) -> Self {
        if description.is_empty() {
            return XapiError::Other {
                code: String::new(),
                params: Vec::new(),
            };
        }
        let code = description.remove(0);
        Self::new(code, description)
    }

    /// Builds the typed error from a code and its parameters.
    pub fn new(code: impl Into<String>, params: Vec<String>) -> Self {
        let code = code.into();
        let p = params;
        match code.as_str() {
            "SESSION_INVALID" if p.len() == 1 => {
                return XapiError::SessionInvalid { handle: first(p) };
            }
            "SESSION_AUTHENTICATION_FAILED" if p.is_empty() => {
                return XapiError::SessionAuthenticationFailed {
                    user: String::new(),
                    message: String::new(),
                };
            }
            "SESSION_AUTHENTICATION_FAILED" if p.len() == 2 => {
                let [user, message] = two(p);
                return XapiError::SessionAuthenticationFailed { user, message };
            }
            "HANDLE_INVALID" if p.len() == 2 => {
                let [class, handle] = two(p);
                return XapiError::HandleInvalid { class, handle };
            }
            "VDI_IN_USE" if p.len() == 2 => {
                let [vdi, operation] = two(p);
                return XapiError::VdiInUse { vdi, operation };
            }
            "VDI_INCOMPATIBLE_TYPE" if p.len() == 2 => {
                let [vdi, vdi_type] = two(p);
                return XapiError::VdiIncompatibleType { vdi, vdi_type };
            }
            "VDI_NO_CBT_METADATA" if p.len() == 1 => {
                return XapiError::VdiNoCbtMetadata { vdi: first(p) };
            }
            "VDI_CBT_ENABLED" if p.len() == 1 => {
                return XapiError::VdiCbtEnabled { vdi: first(p) };
            }
            "VDI_MISSING" if p.len() == 2 => {
                let [sr, vdi] = two(p);
                return XapiError::VdiMissing { sr, vdi };
            }
            "SR_OPERATION_NOT_SUPPORTED" if p.len() == 1 => {
                return XapiError::SrOperationNotSupported { sr: first(p) };
            }
            "OPERATION_NOT_ALLOWED" if p.len() == 1 => {
                return XapiError::OperationNotAllowed { reason: first(p) };
            }
            "OTHER_OPERATION_IN_PROGRESS" if p.len() >= 2 => {
                let mut it = p.into_iter();
                let class = it.next().unwrap_or_default();
                let object = it.next().unwrap_or_default();
                return XapiError::OtherOperationInProgress {
                    class,
                    object,
                    rest: it.collect(),
                };
            }
            "MESSAGE_METHOD_UNKNOWN" if p.len() == 1 => {
                return XapiError::MessageMethodUnknown { method: first(p) };
            }
            "MESSAGE_PARAMETER_COUNT_MISMATCH" if p.len() == 3 => {
                let [method, expected, received] = three(p);
                return XapiError::MessageParameterCountMismatch {
                    method,
                    expected,
                    received,
                };
            }
            "LICENCE_RESTRICTION" if p.len() == 1 => {
                return XapiError::LicenceRestriction { feature: first(p) };
            }
            "HOST_IS_SLAVE" if p.len() == 1 => {
                return XapiError::HostIsSlave { master: first(p) };
            }
            "VM_BAD_POWER_STATE" if p.len() == 3 => {
                let [vm, expected, actual] = three(p);
                return XapiError::VmBadPowerState {
                    vm,
                    expected,
                    actual,
                };
            }
            _ => {}
        }
        if let Some(number) = code.strip_prefix(SR_BACKEND_FAILURE)
            && p.len() == 3
            && let Ok(n) = number.parse::<u32>()
            // Only the canonical spelling, so that the round trip is exact.
            && n.to_string() == number
        {
            let [status, stdout, stderr] = three(p);
            return XapiError::SrBackendFailure {
                code: n,
                status,
                stdout,
                stderr,
            };
        }
        XapiError::Other { code, params: p }
    }

    /// The error code, e.g. `VDI_IN_USE` or `SR_BACKEND_FAILURE_460`.
    pub fn code(&self) -> String {
        match self {
            XapiError::SessionInvalid { .. } => "SESSION_INVALID".into(),
            XapiError::SessionAuthenticationFailed { .. } => "SESSION_AUTHENTICATION_FAILED".into(),
            XapiError::HandleInvalid { .. } => "HANDLE_INVALID".into(),
            XapiError::VdiInUse { .. } => "VDI_IN_USE".into(),
            XapiError::VdiIncompatibleType { .. } => "VDI_INCOMPATIBLE_TYPE".into(),
            XapiError::VdiNoCbtMetadata { .. } => "VDI_NO_CBT_METADATA".into(),
            XapiError::VdiCbtEnabled { .. } => "VDI_CBT_ENABLED".into(),
            XapiError::VdiMissing { .. } => "VDI_MISSING".into(),
            XapiError::SrBackendFailure { code, .. } => format!("{SR_BACKEND_FAILURE}{code}"),
            XapiError::SrOperationNotSupported { .. } => "SR_OPERATION_NOT_SUPPORTED".into(),
            XapiError::OperationNotAllowed { .. } => "OPERATION_NOT_ALLOWED".into(),
            XapiError::OtherOperationInProgress { .. } => "OTHER_OPERATION_IN_PROGRESS".into(),
            XapiError::MessageMethodUnknown { .. } => "MESSAGE_METHOD_UNKNOWN".into(),
            XapiError::MessageParameterCountMismatch { .. } => {
                "MESSAGE_PARAMETER_COUNT_MISMATCH".into()
            }
            XapiError::LicenceRestriction { .. } => "LICENCE_RESTRICTION".into(),
            XapiError::HostIsSlave { .. } => "HOST_IS_SLAVE".into(),
            XapiError::VmBadPowerState { .. } => "VM_BAD_POWER_STATE".into(),
            XapiError::Other { code, .. } => code.clone(),
        }
    }

    /// The parameters, in XAPI's order.
    pub fn params(&self) -> Vec<String> {
        match self.clone() {
            XapiError::SessionInvalid { handle } => vec![handle],
            XapiError::SessionAuthenticationFailed { user, message } => {
                if user.is_empty() && message.is_empty() {
                    vec![]
                } else {
                    vec![user, message]
                }
            }
            XapiError::HandleInvalid { class, handle } => vec![class, handle],
            XapiError::VdiInUse { vdi, operation } => vec![vdi, operation],
            XapiError::VdiIncompatibleType { vdi, vdi_type } => vec![vdi, vdi_type],
            XapiError::VdiNoCbtMetadata { vdi } | XapiError::VdiCbtEnabled { vdi } => vec![vdi],
            XapiError::VdiMissing { sr, vdi } => vec![sr, vdi],
            XapiError::SrBackendFailure {
                status,
                stdout,
                stderr,
                ..
            } => vec![status, stdout, stderr],
            XapiError::SrOperationNotSupported { sr } => vec![sr],
            XapiError::OperationNotAllowed { reason } => vec![reason],
            XapiError::OtherOperationInProgress {
                class,
                object,
                rest,
            } => [class, object].into_iter().chain(rest).collect(),
            XapiError::MessageMethodUnknown { method } => vec![method],
            XapiError::MessageParameterCountMismatch {
                method,
                expected,
                received,
            } => vec![method, expected, received],
            XapiError::LicenceRestriction { feature } => vec![feature],
            XapiError::HostIsSlave { master } => vec![master],
            XapiError::VmBadPowerState {
                vm,
                expected,
                actual,
            } => vec![vm, expected, actual],
            XapiError::Other { params, .. } => params,
        }
    }

    /// The wire form `[CODE, param…]`.
    pub fn description(&self) -> Vec<String> {
        let mut out = vec![self.code()];
        out.extend(self.params());
        out
    }

    /// Whether the same call may succeed if repeated a little later.
    ///
    /// `SESSION_INVALID` (after a new login), `VDI_IN_USE` (the dom0 VBD of
    /// an NBD connection is unplugged asynchronously; Xen Orchestra retries
    /// `destroy`/`data_destroy` for this), `OTHER_OPERATION_IN_PROGRESS`,
    /// and the host-busy codes `TOO_BUSY`, `HOST_STILL_BOOTING`,
    /// `HOST_NOT_LIVE`, `TOO_MANY_PENDING_TASKS`.
    pub fn is_retryable(&self) -> bool {
        match self {
            XapiError::SessionInvalid { .. }
            | XapiError::VdiInUse { .. }
            | XapiError::OtherOperationInProgress { .. } => true,
            XapiError::Other { code, .. } => matches!(
                code.as_str(),
                "TOO_BUSY" | "HOST_STILL_BOOTING" | "HOST_NOT_LIVE" | "TOO_MANY_PENDING_TASKS"
            ),
            _ => false,
        }
    }
}

impl fmt::Display for XapiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code())?;
        let params = self.params();
        if !params.is_empty() {
            write!(f, "({})", params.join(", "))?;
        }
        Ok(())
    }
}

impl std::error::Error for XapiError {}

fn first(p: Vec<String>) -> String {
    p.into_iter().next().unwrap_or_default()
}

fn two(p: Vec<String>) -> [String; 2] {
    let mut it = p.into_iter();
    [it.next().unwrap_or_default(), it.next().unwrap_or_default()]
}

fn three(p: Vec<String>) -> [String; 3] {
    let mut it = p.into_iter();
    [
        it.next().unwrap_or_default(),
        it.next().unwrap_or_default(),
        it.next().unwrap_or_default(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn known_codes_are_typed_and_round_trip() {
        let cases: Vec<Vec<String>> = vec![
            s(&["SESSION_INVALID", "OpaqueRef:x"]),
            s(&["SESSION_AUTHENTICATION_FAILED"]),
            s(&[
                "SESSION_AUTHENTICATION_FAILED",
                "root",
                "Authentication failure",
            ]),
            s(&["HANDLE_INVALID", "VDI", "OpaqueRef:y"]),
            s(&["VDI_IN_USE", "OpaqueRef:v", "data_destroy"]),
            s(&["VDI_INCOMPATIBLE_TYPE", "OpaqueRef:v", "cbt_metadata"]),
            s(&["VDI_NO_CBT_METADATA", "OpaqueRef:v"]),
            s(&["VDI_CBT_ENABLED", "OpaqueRef:v"]),
            s(&["VDI_MISSING", "OpaqueRef:s", "OpaqueRef:v"]),
            s(&["SR_BACKEND_FAILURE_460", "", "unrelated", ""]),
            s(&["SR_OPERATION_NOT_SUPPORTED", "OpaqueRef:s"]),
            s(&[
                "OPERATION_NOT_ALLOWED",
                "VDI is not a snapshot: OpaqueRef:v",
            ]),
            s(&["OTHER_OPERATION_IN_PROGRESS", "VDI", "OpaqueRef:v"]),
            s(&[
                "OTHER_OPERATION_IN_PROGRESS",
                "VDI",
                "OpaqueRef:v",
                "destroy",
                "OpaqueRef:t",
            ]),
            s(&["MESSAGE_METHOD_UNKNOWN", "VDI.frobnicate"]),
            s(&["MESSAGE_PARAMETER_COUNT_MISMATCH", "VDI.destroy", "2", "1"]),
            s(&["LICENCE_RESTRICTION", "CBT"]),
            s(&["HOST_IS_SLAVE", "192.0.2.1"]),
            s(&["VM_BAD_POWER_STATE", "OpaqueRef:m", "halted", "running"]),
        ];
        for d in cases {
            let e = XapiError::from_description(d.clone());
            assert!(!matches!(e, XapiError::Other { .. }), "{d:?} not typed");
            assert_eq!(e.description(), d);
        }
    }

    #[test]
    fn unknown_or_odd_shapes_are_kept() {
        for d in [
            s(&["MAP_DUPLICATE_KEY", "a", "b", "c"]),
            s(&["SESSION_INVALID"]),
            s(&["VDI_IN_USE", "only-one"]),
            s(&["SR_BACKEND_FAILURE_460", "two", "params"]),
            s(&["SR_BACKEND_FAILURE_0460", "", "", ""]),
            s(&["SR_BACKEND_FAILURE_x", "", "", ""]),
        ] {
            let e = XapiError::from_description(d.clone());
            assert!(matches!(e, XapiError::Other { .. }), "{d:?}");
            assert_eq!(e.description(), d);
        }
        let e = XapiError::from_description(vec![]);
        assert_eq!(e.code(), "");
    }

    #[test]
    fn sr_backend_failure_fields() {
        let e = XapiError::from_description(s(&["SR_BACKEND_FAILURE_460", "", "msg", "err"]));
        assert_eq!(
            e,
            XapiError::SrBackendFailure {
                code: 460,
                status: String::new(),
                stdout: "msg".into(),
                stderr: "err".into()
            }
        );
        assert_eq!(e.to_string(), "SR_BACKEND_FAILURE_460(, msg, err)");
    }

    #[test]
    fn failures_read_as_words_once() {
        let e = Error::from(XapiError::from_description(s(&[
            "SESSION_AUTHENTICATION_FAILED",
            "root",
            "Authentication failure",
        ])));
        assert_eq!(
            e.to_string(),
            "XenServer refused the login: wrong user name or password \
             (SESSION_AUTHENTICATION_FAILED); the host said: Authentication failure"
        );
        // Not repeated by a source.
        assert!(std::error::Error::source(&e).is_none());
        let e = Error::from(XapiError::from_description(s(&[
            "VDI_IN_USE",
            "r",
            "destroy",
        ])));
        assert_eq!(
            e.to_string(),
            "XenServer refused the call: VDI_IN_USE(r, destroy)"
        );
        let e = Error::tls_connect("h:443", std::io::Error::other("connection reset"));
        assert_eq!(e.to_string(), "cannot talk to h:443");
        assert_eq!(
            std::error::Error::source(&e).map(|s| s.to_string()),
            Some("connection reset".into())
        );
    }

    #[test]
    fn retryable() {
        assert!(XapiError::from_description(s(&["VDI_IN_USE", "r", "destroy"])).is_retryable());
        assert!(XapiError::from_description(s(&["TOO_BUSY"])).is_retryable());
        assert!(!XapiError::from_description(s(&["HANDLE_INVALID", "VDI", "r"])).is_retryable());
        assert!(
            !XapiError::from_description(s(&["SESSION_AUTHENTICATION_FAILED", "u", "m"]))
                .is_retryable()
        );
        let e = Error::Xapi(XapiError::SessionInvalid { handle: "x".into() });
        assert!(e.is_retryable());
        assert!(!Error::Config("x".into()).is_retryable());
    }
}

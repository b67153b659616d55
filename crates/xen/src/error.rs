//! The crate's error type.

/// An error from a journal implementation, as it reports it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What stopped a step on XenServer. `subject` names the disk or VM
/// concerned (the repository's disk name, or `vm-UUID`); `what` says which
/// step failed, in the user's words.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A XenAPI call failed.
    #[error("{subject}: {what}")]
    Xapi {
        subject: String,
        what: String,
        #[source]
        source: Box<cbtvault_xenapi::Error>,
    },
    /// No NBD host of the pool could be reached.
    #[error("{subject}: {what}")]
    Nbd {
        subject: String,
        what: String,
        #[source]
        source: Option<Box<cbtvault_nbd::Error>>,
    },
    /// The pool's state does not allow the step.
    #[error("{subject}: {what}")]
    Refused { subject: String, what: String },
    /// The crash journal could not be written or read.
    #[error("{subject}: {what}")]
    Journal {
        subject: String,
        what: String,
        #[source]
        source: BoxError,
    },
}

impl Error {
    /// The disk or VM concerned.
    pub fn subject(&self) -> &str {
        match self {
            Error::Xapi { subject, .. }
            | Error::Nbd { subject, .. }
            | Error::Refused { subject, .. }
            | Error::Journal { subject, .. } => subject,
        }
    }

    /// The step that failed, without the subject or the cause.
    pub fn what(&self) -> &str {
        match self {
            Error::Xapi { what, .. }
            | Error::Nbd { what, .. }
            | Error::Refused { what, .. }
            | Error::Journal { what, .. } => what,
        }
    }

    /// Subject, step and cause apart, for a caller that wraps them in its
    /// own error without repeating the message.
    pub fn into_parts(self) -> (String, String, Option<BoxError>) {
        match self {
            Error::Xapi {
                subject,
                what,
                source,
            } => (subject, what, Some(source as BoxError)),
            Error::Nbd {
                subject,
                what,
                source,
            } => (subject, what, source.map(|e| e as BoxError)),
            Error::Refused { subject, what } => (subject, what, None),
            Error::Journal {
                subject,
                what,
                source,
            } => (subject, what, Some(source)),
        }
    }

    /// Whether trying again later may succeed (a lost connection, a busy
    /// host, a VDI still in use).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Xapi { source, .. } => source.is_retryable(),
            Error::Nbd { source, .. } => source.as_ref().is_none_or(|e| e.is_transport()),
            Error::Refused { .. } | Error::Journal { .. } => false,
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Maps a XenAPI error of `what` on `subject`.
pub(crate) fn xapi(subject: &str, what: &str) -> impl FnOnce(cbtvault_xenapi::Error) -> Error {
    let (subject, what) = (subject.to_string(), what.to_string());
    move |source| Error::Xapi {
        subject,
        what,
        source: Box::new(source),
    }
}

/// Maps a journal error of `what` on `subject`.
pub(crate) fn journal_error(subject: &str, what: &str) -> impl FnOnce(BoxError) -> Error {
    let (subject, what) = (subject.to_string(), what.to_string());
    move |source| Error::Journal {
        subject,
        what,
        source,
    }
}

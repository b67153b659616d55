//! A client's password (XenServer, vCenter): read from a file or an
//! environment variable, never printed.
//!
//! There is deliberately no way to build a [`Password`] from a command-line
//! argument in this crate's vocabulary: arguments are visible to every
//! user through `ps` and `/proc`. [`Password::new`] exists for programs
//! that obtained the secret some other safe way (a vault, a prompt).

use std::fmt;
use std::path::Path;

/// The password could not be read from its file or variable (the secret
/// is never in the message).
#[derive(Debug)]
pub struct PasswordError {
    /// `file PATH` or `environment variable NAME`.
    pub from: String,
    /// Why.
    pub detail: String,
}

impl fmt::Display for PasswordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot read the password from {}: {}",
            self.from, self.detail
        )
    }
}

impl std::error::Error for PasswordError {}

type Result<T> = std::result::Result<T, PasswordError>;

/// A password. Its `Debug` form is `Password(<redacted>)`; it has no
/// `Display`.
#[derive(Clone)]
pub struct Password(String);

impl Password {
    /// Wraps a password obtained elsewhere.
    pub fn new(secret: impl Into<String>) -> Self {
        Password(secret.into())
    }

    /// Reads the password from the first line of the file at `path`
    /// (a trailing `\n` or `\r\n` is not part of it). An empty password is
    /// refused.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let from = || format!("file {}", path.display());
        let text = std::fs::read_to_string(path).map_err(|e| PasswordError {
            from: from(),
            detail: e.to_string(),
        })?;
        let line = text.lines().next().unwrap_or_default();
        if line.is_empty() {
            return Err(PasswordError {
                from: from(),
                detail: "the first line is empty".into(),
            });
        }
        Ok(Password(line.to_owned()))
    }

    /// Reads the password from the environment variable `name`.
    pub fn from_env(name: &str) -> Result<Self> {
        let from = || format!("environment variable {name}");
        match std::env::var(name) {
            Ok(v) if !v.is_empty() => Ok(Password(v)),
            Ok(_) => Err(PasswordError {
                from: from(),
                detail: "it is empty".into(),
            }),
            Err(e) => Err(PasswordError {
                from: from(),
                detail: e.to_string(),
            }),
        }
    }

    /// The secret itself, for the login call only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts() {
        let p = Password::new("hunter2");
        assert_eq!(format!("{p:?}"), "Password(<redacted>)");
        assert!(!format!("{p:?}").contains("hunter2"));
        assert_eq!(p.expose(), "hunter2");
    }

    #[test]
    fn from_file_takes_the_first_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\r\n").unwrap();
        assert_eq!(Password::from_file(&path).unwrap().expose(), "s3cret");
        std::fs::write(&path, "\n").unwrap();
        let err = Password::from_file(&path).unwrap_err();
        assert!(!err.to_string().contains("s3cret"));
        assert!(Password::from_file(dir.path().join("missing")).is_err());
    }

    #[test]
    fn from_env() {
        assert!(Password::from_env("CBTVAULT_TLS_PIN_TEST_SURELY_UNSET_VARIABLE").is_err());
    }
}

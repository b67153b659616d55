//! Secrets that stay out of logs and command lines.

use std::path::Path;

/// A password. `Debug` and `Display` print a placeholder; only
/// [`Secret::expose`] gives the value, where it is sent.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The first line of `path` (a trailing newline is not part of it).
    pub fn from_file(path: &Path) -> std::io::Result<Secret> {
        let text = std::fs::read_to_string(path)?;
        let line = text.lines().next().unwrap_or("");
        if line.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the file is empty",
            ));
        }
        Ok(Secret(line.to_string()))
    }

    /// The value of environment variable `var`.
    pub fn from_env(var: &str) -> std::io::Result<Secret> {
        std::env::var(var)
            .map(Secret)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::NotFound, e))
    }

    /// The value, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

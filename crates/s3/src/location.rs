//! `s3://BUCKET/PREFIX?endpoint=URL&region=R&path_style=true`, and the
//! credentials to reach it: from the environment (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`) or a profile of the
//! shared credentials file (`AWS_SHARED_CREDENTIALS_FILE`, else
//! `~/.aws/credentials`; `AWS_PROFILE`, else `default`) — never the command
//! line, where other users of the host see it.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Where an S3 repository lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Location {
    pub bucket: String,
    /// Key prefix of every object of the repository (no leading or
    /// trailing `/`; empty: the bucket's root).
    pub prefix: String,
    /// The service's URL (`https://…`, or `http://` for a server on
    /// loopback); AWS's own endpoint for the region when `None`.
    pub endpoint: Option<String>,
    pub region: String,
    /// `BUCKET` in the path rather than the host name (most servers other
    /// than AWS want this).
    pub path_style: bool,
}

impl S3Location {
    /// Whether `text` names an S3 repository rather than a directory.
    pub fn is_s3(text: &str) -> bool {
        text.starts_with("s3://")
    }

    /// Parses `s3://BUCKET/PREFIX?endpoint=URL&region=R&path_style=true`;
    /// the query's keys default to the environment's `AWS_ENDPOINT_URL`,
    /// `AWS_REGION` (else `us-east-1`), and path style when an endpoint is
    /// given.
    pub fn parse(text: &str) -> Result<S3Location> {
        let bad = |why: &str| Error::Location {
            location: text.to_string(),
            why: why.to_string(),
        };
        let url = url::Url::parse(text).map_err(|e| bad(&e.to_string()))?;
        if url.scheme() != "s3" {
            return Err(bad("expected s3://BUCKET/PREFIX"));
        }
        let bucket = url
            .host_str()
            .filter(|b| !b.is_empty())
            .ok_or_else(|| bad("no bucket: expected s3://BUCKET/PREFIX"))?
            .to_string();
        if url.username() != "" || url.password().is_some() {
            return Err(bad(
                "credentials do not belong in the location; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or use a profile",
            ));
        }
        let prefix = url.path().trim_matches('/').to_string();
        let (mut endpoint, mut region, mut path_style) = (None, None, None);
        for (key, value) in url.query_pairs() {
            match &*key {
                "endpoint" => endpoint = Some(value.into_owned()),
                "region" => region = Some(value.into_owned()),
                "path_style" => {
                    path_style = Some(match &*value {
                        "true" | "1" | "yes" => true,
                        "false" | "0" | "no" => false,
                        _ => return Err(bad("path_style is true or false")),
                    })
                }
                other => {
                    return Err(bad(&format!(
                        "unknown setting {other:?} (endpoint, region, path_style)"
                    )));
                }
            }
        }
        let endpoint = endpoint.or_else(|| std::env::var("AWS_ENDPOINT_URL").ok());
        if let Some(e) = &endpoint
            && !(e.starts_with("https://") || e.starts_with("http://"))
        {
            return Err(bad("the endpoint is an http:// or https:// URL"));
        }
        let region = region
            .or_else(|| std::env::var("AWS_REGION").ok())
            .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
            .unwrap_or_else(|| "us-east-1".to_string());
        Ok(S3Location {
            path_style: path_style.unwrap_or(endpoint.is_some()),
            bucket,
            prefix,
            endpoint,
            region,
        })
    }

    /// The location as given, without settings (for messages).
    pub fn display(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// An access key.
#[derive(Clone)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// From the environment, else the shared credentials file's profile.
    pub fn from_environment() -> Result<Credentials> {
        if let (Ok(id), Ok(secret)) = (
            std::env::var("AWS_ACCESS_KEY_ID"),
            std::env::var("AWS_SECRET_ACCESS_KEY"),
        ) {
            return Ok(Credentials {
                access_key_id: id,
                secret_access_key: secret,
                session_token: std::env::var("AWS_SESSION_TOKEN").ok(),
            });
        }
        let file = std::env::var_os("AWS_SHARED_CREDENTIALS_FILE")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".aws/credentials")));
        let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".to_string());
        let Some(file) = file.filter(|f| f.exists()) else {
            return Err(Error::NoCredentials {
                why: "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not set and there is no shared credentials file (AWS_SHARED_CREDENTIALS_FILE, ~/.aws/credentials)".into(),
            });
        };
        let text = std::fs::read_to_string(&file).map_err(|e| Error::NoCredentials {
            why: format!("{}: {e}", file.display()),
        })?;
        profile_credentials(&text, &profile).ok_or_else(|| Error::NoCredentials {
            why: format!(
                "{} has no profile [{profile}] with aws_access_key_id and aws_secret_access_key (AWS_PROFILE chooses the profile)",
                file.display()
            ),
        })
    }
}

/// The keys of `[profile]` in an INI-style credentials file.
fn profile_credentials(text: &str, profile: &str) -> Option<Credentials> {
    let (mut section, mut id, mut secret, mut token) = (None, None, None, None);
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name.trim().to_string());
            continue;
        }
        if section.as_deref() != Some(profile) {
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            let value = value.trim().to_string();
            match key.trim() {
                "aws_access_key_id" => id = Some(value),
                "aws_secret_access_key" => secret = Some(value),
                "aws_session_token" => token = Some(value),
                _ => {}
            }
        }
    }
    Some(Credentials {
        access_key_id: id?,
        secret_access_key: secret?,
        session_token: token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse_with_their_settings() {
        let l = S3Location::parse(
            "s3://backups/site-a/pool1?endpoint=http://127.0.0.1:9000&region=eu-west-1",
        )
        .unwrap();
        assert_eq!(
            l,
            S3Location {
                bucket: "backups".into(),
                prefix: "site-a/pool1".into(),
                endpoint: Some("http://127.0.0.1:9000".into()),
                region: "eu-west-1".into(),
                path_style: true,
            }
        );
        assert_eq!(l.display(), "s3://backups/site-a/pool1");
        for bad in [
            "s3:///prefix",
            "s3://user:secret@bucket/p",
            "s3://b/p?colour=red",
            "s3://b/p?endpoint=ftp://x",
            "s3://b/p?path_style=maybe",
            "file:///tmp",
        ] {
            assert!(S3Location::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_profile_is_read_from_the_credentials_file() {
        let text = "[default]\naws_access_key_id = A\naws_secret_access_key = B\n\n\
                    [backup]\n# the backup host's key\naws_access_key_id=C\naws_secret_access_key=D\naws_session_token = T\n";
        let c = profile_credentials(text, "backup").unwrap();
        assert_eq!(
            (c.access_key_id.as_str(), c.secret_access_key.as_str()),
            ("C", "D")
        );
        assert_eq!(c.session_token.as_deref(), Some("T"));
        assert!(profile_credentials(text, "other").is_none());
        assert!(
            !format!("{c:?}").contains('D'),
            "the secret is never printed"
        );
    }
}

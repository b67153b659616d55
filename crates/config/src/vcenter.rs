//! `[[vcenter]]`: a vCenter reached over the vSphere JSON API, and what a
//! `kind = "vmware"` job names on it.

use std::path::PathBuf;

use serde::Deserialize;

use crate::PasswordSource;

/// A vCenter (8.0 U1 or later: the JSON API).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vcenter {
    /// Names the vCenter in the repository (`vmware-NAME/vm-42/2000`).
    pub name: String,
    /// `https://HOST[:PORT]`.
    pub url: String,
    pub username: String,
    /// A file holding the password (first line).
    pub password_file: Option<PathBuf>,
    /// An environment variable holding the password.
    pub password_env: Option<String>,
    /// Trust the certificate through this CA (PEM).
    pub ca: Option<PathBuf>,
    /// Trust exactly this certificate (PEM).
    pub pin: Option<PathBuf>,
    /// Trust any certificate. Logged as a warning on every run.
    #[serde(default)]
    pub insecure: bool,
    /// Where snapshots' disks are read: an NBD URI with `{export}` (or
    /// `{vm}`, `{snapshot}`, `{disk_key}`, `{fcd}`), served by nbdkit's
    /// vddk plugin in production (see docs/vmware.md).
    pub nbd_uri: String,
    /// Quiesce guests (VMware Tools) for the snapshot.
    #[serde(default)]
    pub quiesce: bool,
    /// Disks of this vCenter backed up at once, all jobs together.
    #[serde(default = "crate::four")]
    pub max_disks: usize,
}

impl Vcenter {
    /// Where the password is (validation guarantees exactly one source).
    pub fn password_source(&self) -> PasswordSource {
        match (&self.password_file, &self.password_env) {
            (Some(file), _) => PasswordSource::File(file.clone()),
            (None, Some(var)) => PasswordSource::Env(var.clone()),
            (None, None) => PasswordSource::Env(String::new()),
        }
    }
}

/// A First Class Disk: its id and the datastore's moId.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FcdRef {
    pub id: String,
    pub datastore: String,
}

/// Checks a vCenter's settings.
pub(crate) fn check(v: &Vcenter) -> Result<(), String> {
    let at = format!("vcenter {:?}", v.name);
    if !v.url.starts_with("https://") {
        return Err(format!("{at}: url {:?} must start with https://", v.url));
    }
    if v.password_file.is_some() == v.password_env.is_some() {
        return Err(format!(
            "{at}: give exactly one of password_file and password_env"
        ));
    }
    let trust = [v.ca.is_some(), v.pin.is_some(), v.insecure]
        .iter()
        .filter(|b| **b)
        .count();
    if trust != 1 {
        return Err(format!("{at}: give exactly one of ca, pin and insecure"));
    }
    if !v.nbd_uri.contains('{') {
        return Err(format!(
            "{at}: nbd_uri {:?} names no snapshot: put {{export}} (or {{snapshot}} and {{disk_key}}) in it",
            v.nbd_uri
        ));
    }
    if v.max_disks == 0 {
        return Err(format!("{at}: max_disks must be at least 1"));
    }
    Ok(())
}

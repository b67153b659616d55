//! Finding restore points: selectors (`ID`, `DISK@latest`, `DISK@DATE`,
//! `VM@DATE`) and `list` with its filters.
//!
//! A time on the command line is RFC 3339 (`2026-11-28T03:00:00Z`, or
//! with an offset), a local date and time (`2026-11-28T03:00`), or a date
//! (`2026-11-28`); the last two are in the local time zone (`TZ`). A
//! selector's date means the end of that day: `DISK@2026-11-28` is the
//! disk's newest restore point taken that day or before.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Result, bail};
use cbtvault_repo::{Repository, RestorePointRow, VmInfo};
use jiff::{SignedDuration, Timestamp, tz::TimeZone};

use crate::cli::Global;
use crate::failure;
use crate::output::{self, outln};

/// Which end of a day a bare date stands for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum DayEnd {
    /// Its first instant (`--since`).
    Start,
    /// Its last instant (`--until`, selectors).
    End,
}

/// Parses a time given on the command line (see the module doc), or says
/// what forms are accepted.
pub fn parse_time(text: &str, end: DayEnd) -> Result<Timestamp> {
    if let Ok(ts) = text.parse::<Timestamp>() {
        return Ok(ts);
    }
    let tz = TimeZone::system();
    let bad = || {
        failure::usage_error(format!(
            "{text:?} is not a time: give RFC 3339 (2026-11-28T03:00:00Z), a local date and \
             time (2026-11-28T03:00) or a date (2026-11-28, the local time zone)"
        ))
    };
    if let Ok(dt) = text.parse::<jiff::civil::DateTime>()
        && text.contains(['T', 't', ' '])
    {
        return Ok(dt.to_zoned(tz).map_err(|_| bad())?.timestamp());
    }
    let date = text.parse::<jiff::civil::Date>().map_err(|_| bad())?;
    let start = |d: jiff::civil::Date| -> Result<Timestamp> {
        Ok(d.to_zoned(tz.clone()).map_err(|_| bad())?.timestamp())
    };
    match end {
        DayEnd::Start => start(date),
        // The last instant before the next day begins.
        DayEnd::End => {
            let next = date.tomorrow().map_err(|_| bad())?;
            start(next)?
                .checked_sub(SignedDuration::from_nanos(1))
                .map_err(|_| bad())
        }
    }
}

/// A time for people: the local time zone, with its abbreviation.
pub fn local_time(ts: Timestamp) -> String {
    ts.to_zoned(TimeZone::system())
        .strftime("%Y-%m-%d %H:%M:%S %Z")
        .to_string()
}

/// What a selector's `@…` part asks for.
#[derive(Clone, Copy)]
enum When {
    Latest,
    AtOrBefore(Timestamp),
}

impl When {
    fn admits(&self, rp: &RestorePointRow) -> bool {
        match self {
            When::Latest => true,
            When::AtOrBefore(t) => rp.manifest.time <= *t,
        }
    }

    fn describe(&self) -> String {
        match self {
            When::Latest => "at all".into(),
            When::AtOrBefore(t) => format!("at or before {}", local_time(*t)),
        }
    }
}

/// The VMs that restore points know of: uuid → name.
fn known_vms(points: &[RestorePointRow]) -> BTreeMap<String, String> {
    points
        .iter()
        .filter_map(|rp| rp.manifest.source.vm.as_ref())
        .map(|vm| (vm.uuid.clone(), vm.name.clone()))
        .collect()
}

/// The uuid of the one VM `name_or_uuid` names, or an error that lists
/// the VMs (or, for a name several VMs share, their uuids).
fn one_vm(points: &[RestorePointRow], name_or_uuid: &str) -> Result<Option<String>> {
    let vms = known_vms(points);
    let matching: Vec<&String> = vms
        .iter()
        .filter(|(uuid, name)| uuid.eq_ignore_ascii_case(name_or_uuid) || *name == name_or_uuid)
        .map(|(uuid, _)| uuid)
        .collect();
    match matching.as_slice() {
        [] => Ok(None),
        [uuid] => Ok(Some((*uuid).clone())),
        several => bail!(failure::usage_error(format!(
            "{} VMs are named {name_or_uuid:?} (uuids {}); give the VM's uuid instead",
            several.len(),
            several
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn vm_listing(points: &[RestorePointRow]) -> String {
    let vms: Vec<String> = known_vms(points)
        .into_iter()
        .map(|(uuid, name)| format!("{name} ({uuid})"))
        .collect();
    super::listing("VMs", &vms)
}

/// How a disk sits in its VM, for sorting and messages: device position,
/// then disk name.
fn device_key(rp: &RestorePointRow) -> (String, String) {
    let device = rp
        .manifest
        .source
        .vm
        .as_ref()
        .and_then(|vm| vm.device.clone());
    (device.unwrap_or_default(), rp.manifest.disk.clone())
}

/// Every restore point `spec` names: one, or for `VM@…` one per disk of
/// the VM (ordered by device position).
pub fn resolve_all(repo: &Repository, spec: &str) -> Result<Vec<RestorePointRow>> {
    let disks = repo.catalogue().disks()?;
    let selector = spec
        .rsplit_once('@')
        .filter(|_| !disks.iter().any(|d| d == spec));
    let Some((name, when_text)) = selector else {
        return Ok(vec![super::resolve_id(repo, spec)?]);
    };
    let points = repo.catalogue().restore_points(None)?;
    let is_disk = disks.iter().any(|d| d == name);
    let vm = if is_disk {
        None
    } else {
        one_vm(&points, name)?
    };
    let when = if when_text == "latest" {
        When::Latest
    } else {
        match parse_time(when_text, DayEnd::End) {
            Ok(t) => When::AtOrBefore(t),
            Err(e) if is_disk || vm.is_some() => return Err(e),
            // Not a selector at all: an id with a stray `@`, say.
            Err(_) => return Ok(vec![super::resolve_id(repo, spec)?]),
        }
    };
    if is_disk {
        let newest = points
            .into_iter()
            .rfind(|rp| rp.manifest.disk == name && when.admits(rp));
        return match newest {
            Some(rp) => Ok(vec![rp]),
            None => Err(failure::tagged(
                failure::kind::NOT_FOUND,
                format!(
                    "disk {name:?} has no restore point {} (`cbtvault list --disk {name}` shows them)",
                    when.describe()
                ),
            )),
        };
    }
    let Some(uuid) = vm else {
        return Err(failure::tagged(
            failure::kind::NOT_FOUND,
            format!(
                "no disk named {name:?} in this repository ({}), and no VM of that name or uuid ({})",
                super::listing("disks", &disks),
                vm_listing(&points)
            ),
        ));
    };
    // The newest restore point of each of the VM's disks.
    let mut newest: BTreeMap<String, RestorePointRow> = BTreeMap::new();
    for rp in points {
        let of_vm = rp
            .manifest
            .source
            .vm
            .as_ref()
            .is_some_and(|v| v.uuid == uuid);
        if of_vm && when.admits(&rp) {
            newest.insert(rp.manifest.disk.clone(), rp);
        }
    }
    if newest.is_empty() {
        return Err(failure::tagged(
            failure::kind::NOT_FOUND,
            format!(
                "VM {name:?} has no restore point {} (`cbtvault list --vm {name}` shows them)",
                when.describe()
            ),
        ));
    }
    let mut found: Vec<RestorePointRow> = newest.into_values().collect();
    found.sort_by_key(device_key);
    Ok(found)
}

/// The one restore point `spec` names; a VM selector that names several
/// (one per disk) is refused with the selectors of its disks.
pub fn resolve_one(repo: &Repository, spec: &str) -> Result<RestorePointRow> {
    let mut found = resolve_all(repo, spec)?;
    if found.len() == 1 {
        return Ok(found.remove(0));
    }
    let when = spec.rsplit_once('@').map(|(_, w)| w).unwrap_or("latest");
    let choices: Vec<String> = found
        .iter()
        .map(|rp| {
            let device = rp
                .manifest
                .source
                .vm
                .as_ref()
                .and_then(|vm| vm.device.as_deref())
                .map(|d| format!(" (device {d})"))
                .unwrap_or_default();
            format!("{}@{when}{device}", rp.manifest.disk)
        })
        .collect();
    Err(failure::usage_error(format!(
        "{spec:?} names {} disks of a VM, and this command takes one restore point: give one of {}",
        found.len(),
        choices.join(", ")
    )))
}

/// `list`'s filters.
pub struct ListFilter<'a> {
    pub disk: Option<&'a str>,
    pub vm: Option<&'a str>,
    pub since: Option<&'a str>,
    pub until: Option<&'a str>,
}

/// `name:device`, `name`, or `-`: a restore point's VM in a table.
fn vm_column(vm: Option<&VmInfo>) -> String {
    match vm {
        Some(VmInfo {
            name,
            device: Some(d),
            ..
        }) => format!("{name}:{d}"),
        Some(vm) => vm.name.clone(),
        None => "-".into(),
    }
}

pub fn list(g: &Global, path: &Path, filter: ListFilter<'_>) -> Result<ExitCode> {
    let since = filter
        .since
        .map(|t| parse_time(t, DayEnd::Start))
        .transpose()
        .map_err(|e| e.context("--since"))?;
    let until = filter
        .until
        .map(|t| parse_time(t, DayEnd::End))
        .transpose()
        .map_err(|e| e.context("--until"))?;
    let repo = super::open(path)?;
    if let Some(d) = filter.disk {
        let disks = repo.catalogue().disks()?;
        if !disks.iter().any(|n| n == d) {
            bail!(failure::tagged(
                failure::kind::NOT_FOUND,
                format!(
                    "no disk named {d:?} in this repository ({})",
                    super::listing("disks", &disks)
                )
            ));
        }
    }
    let mut points = repo.catalogue().restore_points(filter.disk)?;
    if let Some(vm) = filter.vm {
        let Some(uuid) = one_vm(&points, vm)? else {
            bail!(failure::tagged(
                failure::kind::NOT_FOUND,
                format!(
                    "no restore point of a VM named {vm:?} in this repository ({})",
                    vm_listing(&points)
                )
            ));
        };
        points.retain(|rp| {
            rp.manifest
                .source
                .vm
                .as_ref()
                .is_some_and(|v| v.uuid == uuid)
        });
    }
    points.retain(|rp| {
        since.is_none_or(|t| rp.manifest.time >= t) && until.is_none_or(|t| rp.manifest.time <= t)
    });
    if g.json {
        output::print_json(&points.iter().map(output::restore_point_json).collect());
        return Ok(ExitCode::SUCCESS);
    }
    if g.quiet {
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "{:<12}  {:<16}  {:<12}  {:<23}  {:>10}  {:>10}  {:>10}  mode",
        "id",
        "disk",
        "vm",
        "time",
        "size",
        "read",
        "stored"
    );
    for rp in &points {
        let m = &rp.manifest;
        outln!(
            "{:<12}  {:<16}  {:<12}  {:<23}  {:>10}  {:>10}  {:>10}  {}",
            output::short(&rp.id),
            m.disk,
            vm_column(m.source.vm.as_ref()),
            local_time(m.time),
            output::bytes(m.virtual_size),
            output::bytes(m.stats.bytes_read),
            output::bytes(m.stats.bytes_stored),
            output::mode(&m.mode)
        );
    }
    outln!("{} restore points", points.len());
    Ok(ExitCode::SUCCESS)
}

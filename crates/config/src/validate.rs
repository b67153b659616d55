//! Checks that a parsed configuration can be used.

use std::collections::HashSet;

use crate::{Config, JobKind};

pub(crate) const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// True for a UUID in its usual 8-4-4-4-12 hex form.
pub fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn unique<'a>(what: &str, names: impl Iterator<Item = &'a str>) -> Result<(), String> {
    let mut seen = HashSet::new();
    for n in names {
        if n.is_empty() {
            return Err(format!("a {what} has an empty name"));
        }
        if !seen.insert(n) {
            return Err(format!("two {what}s are named {n:?}"));
        }
    }
    Ok(())
}

/// Returns what is wrong, naming the item.
pub fn check(c: &Config) -> Result<(), String> {
    unique("pool", c.pools.iter().map(|p| p.name.as_str()))?;
    unique("qemu host", c.qemu_hosts.iter().map(|h| h.name.as_str()))?;
    unique("vcenter", c.vcenters.iter().map(|v| v.name.as_str()))?;
    for v in &c.vcenters {
        crate::vcenter::check(v)?;
    }
    unique("job", c.jobs.iter().map(|j| j.name.as_str()))?;
    for (i, m) in c.maintenance.iter().enumerate() {
        let at = format!("maintenance {:?}", m.name);
        if m.name.is_empty() {
            return Err("a maintenance task has an empty name".into());
        }
        if c.jobs.iter().any(|j| j.name == m.name)
            || c.maintenance[..i].iter().any(|o| o.name == m.name)
        {
            return Err(format!(
                "{at}: the name is taken by a job or another maintenance task (it names the \
                 runs in the history and `cbtvault run NAME`)"
            ));
        }
        m.schedule.compile().map_err(|e| format!("{at}: {e}"))?;
        crate::parse_duration(&m.wait).map_err(|e| format!("{at}: wait: {e}"))?;
        if m.read_data && m.task != crate::Task::Verify {
            return Err(format!("{at}: read_data goes with task = \"verify\""));
        }
        if let Some(parts) = m.read_data_parts {
            if m.task != crate::Task::Verify || m.read_data {
                return Err(format!(
                    "{at}: read_data_parts goes with task = \"verify\", instead of read_data"
                ));
            }
            if parts == 0 {
                return Err(format!("{at}: read_data_parts must be at least 1"));
            }
        }
    }
    if let Some(level) = c.repository.compression_level
        && !(1..=22).contains(&level)
    {
        return Err(format!(
            "repository: compression_level {level} is outside 1..=22"
        ));
    }
    for p in &c.pools {
        let at = format!("pool {:?}", p.name);
        if p.url.starts_with("http://") {
            if !p.allow_insecure_http {
                return Err(format!(
                    "{at}: url {:?} is plain HTTP, which would send the password and the \
                     session in clear to anyone on the network; use https:// with pin or ca, \
                     or set allow_insecure_http = true if the network is trusted",
                    p.url
                ));
            }
        } else if !p.url.starts_with("https://") {
            return Err(format!("{at}: url {:?} must start with https://", p.url));
        }
        if p.password_file.is_some() == p.password_env.is_some() {
            return Err(format!(
                "{at}: give exactly one of password_file and password_env"
            ));
        }
        let trust = [p.ca.is_some(), p.pin.is_some(), p.insecure]
            .iter()
            .filter(|b| **b)
            .count();
        if trust > 1 {
            return Err(format!("{at}: give at most one of ca, pin and insecure"));
        }
        if !(1..=16).contains(&p.nbd_connections) {
            return Err(format!(
                "{at}: nbd_connections must be 1..=16 (xapi-nbd's limit per host)"
            ));
        }
        if !(1..=16).contains(&p.max_nbd_connections) || p.max_nbd_connections < p.nbd_connections {
            return Err(format!(
                "{at}: max_nbd_connections must be 1..=16 (xapi-nbd's limit per host) and at \
                 least nbd_connections"
            ));
        }
    }
    for h in &c.qemu_hosts {
        if h.max_disks == 0 {
            return Err(format!(
                "qemu host {:?}: max_disks must be at least 1",
                h.name
            ));
        }
    }
    if c.limits.disks == 0 {
        return Err("limits: disks must be at least 1".into());
    }
    for j in &c.jobs {
        let at = format!("job {:?}", j.name);
        if j.parallel == 0 {
            return Err(format!("{at}: parallel must be at least 1"));
        }
        crate::parse_duration(&j.retry_delay).map_err(|e| format!("{at}: retry_delay: {e}"))?;
        if let Some(b) = &j.bandwidth {
            match crate::parse_size(b) {
                Ok(0) => return Err(format!("{at}: bandwidth must be more than 0")),
                Ok(_) => {}
                Err(e) => return Err(format!("{at}: bandwidth: {e} per second")),
            }
        }
        match &j.kind {
            JobKind::Xenserver {
                pool, vms, vdis, ..
            } => {
                if c.pool(pool).is_none() {
                    return Err(format!("{at}: no pool named {pool:?}"));
                }
                if vms.is_empty() && vdis.is_empty() {
                    return Err(format!("{at}: list vms or vdis to back up"));
                }
                if let Some(bad) = vms.iter().chain(vdis).find(|u| !is_uuid(u)) {
                    return Err(format!("{at}: {bad:?} is not a UUID"));
                }
            }
            JobKind::Vmware { vcenter, vms, fcds } => {
                if c.vcenter(vcenter).is_none() {
                    return Err(format!("{at}: no vcenter named {vcenter:?}"));
                }
                if vms.is_empty() && fcds.is_empty() {
                    return Err(format!(
                        "{at}: list vms (morefs such as vm-42) or fcds to back up"
                    ));
                }
                if vms.iter().any(|m| m.trim().is_empty()) {
                    return Err(format!("{at}: a VM is named by an empty string"));
                }
            }
            JobKind::Copy { to, disks } => {
                if to.as_os_str().is_empty() {
                    return Err(format!("{at}: to names no repository"));
                }
                if *to == c.repository.path {
                    return Err(format!(
                        "{at}: to is this configuration's own repository; name another"
                    ));
                }
                if disks.iter().any(|d| d.trim().is_empty()) {
                    return Err(format!("{at}: a disk is named by an empty string"));
                }
                if j.bandwidth.is_some() {
                    return Err(format!("{at}: bandwidth is not supported for copy jobs"));
                }
            }
            JobKind::Qemu { host, nodes } => {
                if c.qemu_host(host).is_none() {
                    return Err(format!("{at}: no qemu host named {host:?}"));
                }
                if nodes.is_empty() {
                    return Err(format!("{at}: list the block nodes to back up"));
                }
            }
        }
        if let Some(s) = &j.schedule {
            s.compile().map_err(|e| format!("{at}: {e}"))?;
        }
        if let Some(d) = &j.random_delay {
            crate::parse_duration(d).map_err(|e| format!("{at}: random_delay: {e}"))?;
        }
        if j.catch_up && j.schedule.is_none() {
            return Err(format!("{at}: catch_up needs a schedule"));
        }
    }
    if let Some(w) = &c.daemon.webhook
        && !w.starts_with("http://")
        && !w.starts_with("https://")
    {
        return Err(format!(
            "daemon: webhook {w:?} must be an http:// or https:// URL"
        ));
    }
    if c.daemon.webhook_ca.is_some()
        && !c
            .daemon
            .webhook
            .as_deref()
            .is_some_and(|w| w.starts_with("https://"))
    {
        return Err("daemon: webhook_ca goes with an https:// webhook".into());
    }
    c.daemon
        .listen
        .parse::<std::net::SocketAddr>()
        .map_err(|_| {
            format!(
                "daemon: listen {:?} is not an address such as 127.0.0.1:9460",
                c.daemon.listen
            )
        })?;
    Ok(())
}

/// Rejects unknown keys in `[[job]]` tables, which serde cannot do for the
/// flattened job kinds.
pub fn job_keys(table: &toml::Table) -> Result<(), String> {
    const COMMON: [&str; 11] = [
        "name",
        "random_delay",
        "catch_up",
        "kind",
        "parallel",
        "schedule",
        "retention",
        "retries",
        "audit_samples",
        "retry_delay",
        "bandwidth",
    ];
    let Some(jobs) = table.get("job").and_then(|j| j.as_array()) else {
        return Ok(());
    };
    for job in jobs.iter().filter_map(|j| j.as_table()) {
        let name = job.get("name").and_then(|n| n.as_str()).unwrap_or("?");
        let specific: &[&str] = match job.get("kind").and_then(|k| k.as_str()) {
            Some("xenserver") => &["pool", "vms", "vdis", "consistent_vm_snapshot"],
            Some("qemu") => &["host", "nodes"],
            Some("vmware") => &["vcenter", "vms", "fcds"],
            Some("copy") => &["to", "disks"],
            // serde reports unknown or missing kinds with the list of valid ones.
            _ => continue,
        };
        if let Some(key) = job
            .keys()
            .find(|k| !COMMON.contains(&k.as_str()) && !specific.contains(&k.as_str()))
        {
            return Err(format!("job {name:?}: unknown key {key:?}"));
        }
    }
    Ok(())
}

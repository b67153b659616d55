//! Routes a call to its implementation, as xapi's message layer does:
//! login and logout, unknown methods (`MESSAGE_METHOD_UNKNOWN`), then
//! parameter counts (`MESSAGE_PARAMETER_COUNT_MISMATCH`, not counting the
//! session), then session validation (`SESSION_INVALID`), bad handles
//! (`HANDLE_INVALID`), the implicit getters of every class (`get_record`,
//! `get_all`, `get_all_records`, `get_by_uuid`, `get_by_name_label`,
//! `get_<field>`), and `Async.*` calls, which return a task at once (or,
//! for a method without async mode, xapi's `Fault` failure).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use cbtvault_xenapi::{Value, XapiError};

use crate::sim::{Sim, internal};
use crate::vdi::handle_invalid;

/// Classes with records.
const CLASSES: &[&str] = &[
    "VDI", "VM", "VBD", "VIF", "SR", "PBD", "network", "host", "pool", "task", "session",
];

/// Runs one call and returns its result or XAPI failure.
pub async fn call(sim: &Sim, method: &str, mut params: Vec<Value>) -> Result<Value, XapiError> {
    if !method.starts_with("sim.") {
        slow_down(sim).await;
    }
    match method {
        "session.login_with_password" => return login(sim, &params).await,
        "session.logout" => {
            let session = take_session(sim, method, &mut params)?;
            sim.sessions().logout(&session);
            return Ok(Value::from(""));
        }
        _ => {}
    }
    // As xapi's generated server does: the method, then the parameter
    // count, then the session.
    let inner = method.strip_prefix("Async.");
    let name = inner.unwrap_or(method);
    if name.starts_with("sim.") {
        if inner.is_some() {
            return Err(unknown(method));
        }
    } else {
        let (min, max) = params_of(name).ok_or_else(|| unknown(method))?;
        check_count(method, params.len(), min, max)?;
        if inner.is_some() && !has_async_form(name) {
            // server_helpers.ml `do_dispatch`, `API.response_of_fault`.
            return Err(XapiError::Other {
                code: "Fault".into(),
                params: vec![format!("No async mode for this operation (rpc: {method})")],
            });
        }
    }
    let session = take_session(sim, method, &mut params)?;
    if let Some(inner) = inner {
        let task = sim.tasks().create(method);
        sim.event("task", "add", &task);
        let (sim2, inner, task2) = (sim.clone(), inner.to_owned(), task.clone());
        tokio::spawn(async move {
            let outcome = run(&sim2, &session, &inner, params).await;
            sim2.tasks().finish(&task2, outcome);
            sim2.event("task", "mod", &task2);
        });
        return Ok(Value::String(task));
    }
    run(sim, &session, method, params).await
}

async fn slow_down(sim: &Sim) {
    let delay = {
        let mut faults = sim.faults();
        match &mut faults.slow {
            Some((d, None)) => Some(*d),
            Some((d, Some(n))) if *n > 0 => {
                let d = *d;
                *n -= 1;
                if *n == 0 {
                    faults.slow = None;
                }
                Some(d)
            }
            _ => None,
        }
    };
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
}

fn unknown(method: &str) -> XapiError {
    XapiError::MessageMethodUnknown {
        method: method.into(),
    }
}

/// Removes and validates the session parameter.
fn take_session(sim: &Sim, method: &str, params: &mut Vec<Value>) -> Result<String, XapiError> {
    if params.is_empty() {
        return Err(XapiError::MessageParameterCountMismatch {
            method: method.into(),
            expected: "1".into(),
            received: "0".into(),
        });
    }
    let session = match params.remove(0) {
        Value::String(s) => s,
        other => format!("{other:?}"),
    };
    sim.sessions().check(&session)?;
    Ok(session)
}

/// `session.login_with_password(uname, pwd, version, originator)`, the last
/// two optional. A refusal waits [`crate::SimConfig::auth_failure_delay`]
/// and carries `[uname, message]`, the message PAM gives for a wrong
/// password (`xapi_session.ml`).
async fn login(sim: &Sim, params: &[Value]) -> Result<Value, XapiError> {
    if !(2..=4).contains(&params.len()) {
        return Err(XapiError::MessageParameterCountMismatch {
            method: "session.login_with_password".into(),
            expected: "4".into(),
            received: params.len().to_string(),
        });
    }
    let text = |i: usize| params.get(i).and_then(Value::as_str).unwrap_or_default();
    sim.inner.logins.fetch_add(1, Ordering::SeqCst);
    let accepted = text(0) == sim.config().username && text(1) == *sim.password();
    if !accepted {
        sim.inner.failed_logins.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(sim.config().auth_failure_delay).await;
        return Err(XapiError::SessionAuthenticationFailed {
            user: text(0).into(),
            message: "Authentication failure".into(),
        });
    }
    Ok(Value::String(sim.sessions().login(text(0), text(3))))
}

/// `MESSAGE_PARAMETER_COUNT_MISMATCH [method, expected, received]` unless
/// `given` parameters (session included) leave between `min` and `max`
/// others. Both counts leave the session out, as xapi's generated server
/// does (`gen_server.ml`: the full count expected, `List.length params - 1`
/// received, so a call without any parameter reads `-1`).
fn check_count(method: &str, given: usize, min: usize, max: usize) -> Result<(), XapiError> {
    let received = given as i64 - 1;
    if received < min as i64 || received > max as i64 {
        return Err(XapiError::MessageParameterCountMismatch {
            method: method.into(),
            expected: max.to_string(),
            received: received.to_string(),
        });
    }
    Ok(())
}

/// How many parameters after the session a method takes: (fewest, most).
/// Fewer than most when trailing parameters have defaults in xapi's
/// datamodel (`VDI.snapshot`'s `driver_params`, `VM.snapshot`'s
/// `ignore_vdis`). `None`: no such method.
fn params_of(method: &str) -> Option<(usize, usize)> {
    let (class, name) = method.split_once('.')?;
    let n = match (class, name) {
        ("VDI", "snapshot" | "clone") => return Some((1, 2)),
        ("VDI", "copy") => 2,
        ("VM", "checkpoint") => 2,
        ("VM", "snapshot") => return Some((2, 3)),
        ("VDI", "list_changed_blocks" | "resize" | "resize_online") => 2,
        (
            "VDI",
            "enable_cbt" | "disable_cbt" | "get_nbd_info" | "destroy" | "create" | "data_destroy",
        ) => 1,
        ("VDI" | "VM", "add_to_other_config") => 3,
        (
            "VDI" | "VM",
            "remove_from_other_config"
            | "set_other_config"
            | "set_name_label"
            | "set_name_description",
        ) => 2,
        ("VM", "destroy" | "create" | "hard_shutdown" | "clean_shutdown") => 1,
        ("VM", "start") => 3,
        ("VBD", "create" | "plug" | "unplug" | "destroy") => 1,
        ("VIF" | "network", "create" | "destroy") => 1,
        ("task", "cancel" | "destroy") => 1,
        ("event", "from") => 3,
        ("host", "get_server_certificate") => 1,
        (c, "get_all" | "get_all_records") if CLASSES.contains(&c) => 0,
        (c, g) if CLASSES.contains(&c) && g.starts_with("get_") => 1,
        _ => return None,
    };
    Some((n, n))
}

/// Calls that have an `Async.` form (getters, setters, map edits, task
/// calls and `VDI.get_nbd_info` have none: xapi answers their `Async.`
/// form with `["Fault", "No async mode for this operation (rpc: …)"]`).
fn has_async_form(method: &str) -> bool {
    matches!(
        method,
        "VDI.snapshot"
            | "VDI.clone"
            | "VDI.copy"
            | "VM.checkpoint"
            | "VDI.enable_cbt"
            | "VDI.disable_cbt"
            | "VDI.list_changed_blocks"
            | "VDI.data_destroy"
            | "VDI.destroy"
            | "VDI.create"
            | "VDI.resize"
            | "VDI.resize_online"
            | "VM.snapshot"
            | "VM.destroy"
            | "VM.create"
            | "VM.start"
            | "VM.hard_shutdown"
            | "VM.clean_shutdown"
            | "VIF.create"
            | "VIF.destroy"
            | "VBD.create"
            | "VBD.plug"
            | "VBD.unplug"
            | "VBD.destroy"
    )
}

/// Checks the parameter count of a `sim.*` call (counts without the
/// session, as for XenAPI calls).
pub(crate) fn arity(method: &str, args: &[Value], expected: usize) -> Result<(), XapiError> {
    check_count(method, args.len() + 1, expected, expected)
}

/// String parameter `i`.
pub(crate) fn text(args: &[Value], i: usize) -> Result<String, XapiError> {
    match args.get(i) {
        Some(Value::String(s)) => Ok(s.clone()),
        _ => Err(XapiError::Other {
            code: "FIELD_TYPE_ERROR".into(),
            params: vec![format!("parameter {}", i + 2)],
        }),
    }
}

/// Integer parameter `i` (a JSON number or an XML-RPC digit string).
pub(crate) fn int(args: &[Value], i: usize) -> Result<i64, XapiError> {
    args.get(i)
        .and_then(Value::as_i64)
        .ok_or_else(|| XapiError::Other {
            code: "FIELD_TYPE_ERROR".into(),
            params: vec![format!("parameter {}", i + 2)],
        })
}

async fn run(sim: &Sim, session: &str, method: &str, args: Vec<Value>) -> Result<Value, XapiError> {
    if let Some(op) = method.strip_prefix("sim.") {
        return crate::control::run(sim, session, op, args).await;
    }
    if method == "event.from" {
        return crate::events::from(sim, &args).await;
    }
    if method == "VDI.data_destroy" {
        arity(method, &args, 1)?;
        return sim.vdi_data_destroy(&text(&args, 0)?).await;
    }
    let (sim, session, method) = (sim.clone(), session.to_owned(), method.to_owned());
    tokio::task::spawn_blocking(move || run_blocking(&sim, &session, &method, &args))
        .await
        .map_err(internal)?
}

fn run_blocking(
    sim: &Sim,
    session: &str,
    method: &str,
    args: &[Value],
) -> Result<Value, XapiError> {
    let (class, name) = method.split_once('.').ok_or_else(|| unknown(method))?;
    let a = |n: usize| arity(method, args, n);
    match (class, name) {
        ("VDI", "snapshot") => {
            // driver_params (default {}) mean nothing to the simulated SR.
            sim.vdi_snapshot(&text(args, 0)?)
        }
        ("VDI", "clone") => sim.vdi_clone(&text(args, 0)?),
        ("VDI", "copy") => sim.vdi_copy(&text(args, 0)?, &text(args, 1)?),
        ("VM", "checkpoint") => sim.vm_checkpoint(&text(args, 0)?, &text(args, 1)?),
        ("VDI", "enable_cbt") => {
            a(1)?;
            sim.vdi_enable_cbt(&text(args, 0)?)
        }
        ("VDI", "disable_cbt") => {
            a(1)?;
            sim.vdi_disable_cbt(&text(args, 0)?)
        }
        ("VDI", "list_changed_blocks") => {
            a(2)?;
            sim.vdi_list_changed_blocks(&text(args, 0)?, &text(args, 1)?)
        }
        ("VDI", "get_nbd_info") => {
            a(1)?;
            sim.vdi_get_nbd_info(session, &text(args, 0)?)
        }
        ("VDI", "destroy") => {
            a(1)?;
            sim.vdi_destroy(&text(args, 0)?)
        }
        ("VDI", "create") => {
            a(1)?;
            sim.vdi_create(&args[0])
        }
        ("VDI", "resize" | "resize_online") => {
            a(2)?;
            let size = u64::try_from(int(args, 1)?).map_err(internal)?;
            sim.vdi_resize(&text(args, 0)?, size, name == "resize_online")
        }
        ("VDI" | "VM", "add_to_other_config") => {
            a(3)?;
            sim.set_field(class, &text(args, 0)?, name, &args[1..])
        }
        (
            "VDI" | "VM",
            "remove_from_other_config"
            | "set_other_config"
            | "set_name_label"
            | "set_name_description",
        ) => {
            a(2)?;
            sim.set_field(class, &text(args, 0)?, name, &args[1..])
        }
        ("VM", "snapshot") => {
            let ignore: Vec<String> = match args.get(2) {
                None => Vec::new(),
                Some(v) => v
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|r| r.as_str().map(str::to_owned))
                            .collect()
                    })
                    .ok_or_else(|| XapiError::Other {
                        code: "FIELD_TYPE_ERROR".into(),
                        params: vec!["ignore_vdis".into()],
                    })?,
            };
            sim.vm_snapshot(&text(args, 0)?, &text(args, 1)?, &ignore)
        }
        ("VM", "destroy") => {
            a(1)?;
            sim.vm_destroy(&text(args, 0)?)
        }
        ("VM", "create") => {
            a(1)?;
            sim.vm_create(&args[0])
        }
        ("VM", "start") => {
            a(3)?;
            // start_paused and force change nothing in the simulator.
            sim.vm_start(&text(args, 0)?)
        }
        ("VM", "hard_shutdown" | "clean_shutdown") => {
            a(1)?;
            sim.vm_shutdown(&text(args, 0)?)
        }
        ("VIF", "create") => {
            a(1)?;
            sim.vif_create(&args[0])
        }
        ("VIF", "destroy") => {
            a(1)?;
            sim.vif_destroy(&text(args, 0)?)
        }
        ("network", "create") => {
            a(1)?;
            sim.network_create(&args[0])
        }
        ("network", "destroy") => {
            a(1)?;
            sim.network_destroy(&text(args, 0)?)
        }
        ("VBD", "create") => {
            a(1)?;
            sim.vbd_create(&args[0])
        }
        ("VBD", "plug" | "unplug") => {
            a(1)?;
            sim.vbd_set_plugged(&text(args, 0)?, name == "plug")
        }
        ("VBD", "destroy") => {
            a(1)?;
            sim.vbd_destroy(&text(args, 0)?)
        }
        ("task", "cancel") => {
            a(1)?;
            sim.tasks()
                .cancel(&text(args, 0)?)
                .map(|()| Value::from(""))
        }
        ("task", "destroy") => {
            a(1)?;
            let task = text(args, 0)?;
            sim.tasks().destroy(&task)?;
            sim.event("task", "del", &task);
            Ok(Value::from(""))
        }
        ("host", "get_server_certificate") => {
            a(1)?;
            let host = text(args, 0)?;
            if host != sim.db().host_ref {
                return Err(handle_invalid("host", &host));
            }
            Ok(Value::from(sim.certificate_pem()))
        }
        _ if CLASSES.contains(&class) => getter(sim, method, class, name, args),
        _ => Err(unknown(method)),
    }
}

/// The record of `class` object `r`.
fn record(sim: &Sim, class: &str, r: &str) -> Option<Value> {
    match class {
        "task" => {
            let host = sim.db().host_ref.clone();
            sim.tasks().value(r, &host)
        }
        "session" => session_value(sim, r),
        _ => {
            let db = sim.db();
            match class {
                "VDI" => db.vdi_value(r),
                "VM" => db.vm_value(r),
                "VBD" => db.vbd_value(r),
                "VIF" => db.vif_value(r),
                "SR" => db.sr_value(r),
                "PBD" => db.pbd_value(r),
                "network" => db.network_value(r, sim.nbd_port().is_some()),
                "host" => db.host_value(r),
                "pool" => db.pool_value(r),
                _ => None,
            }
        }
    }
}

fn session_value(sim: &Sim, r: &str) -> Option<Value> {
    let host = sim.db().host_ref.clone();
    let pool = sim.db().pool_ref.clone();
    let sessions = sim.sessions();
    let s = sessions.get(r)?;
    let fields: Vec<(&str, Value)> = vec![
        ("uuid", Value::from(s.uuid.as_str())),
        ("this_host", Value::from(host)),
        ("this_user", Value::from(cbtvault_xenapi::NULL_REF)),
        ("last_active", Value::DateTime(s.created.clone())),
        ("pool", Value::Bool(false)),
        ("other_config", Value::Struct(BTreeMap::new())),
        ("is_local_superuser", Value::Bool(true)),
        ("auth_user_name", Value::from(s.user.as_str())),
        ("originator", Value::from(s.originator.as_str())),
        ("parent", Value::from(cbtvault_xenapi::NULL_REF)),
        ("tasks", Value::Array(vec![])),
        ("pool_ref", Value::from(pool)),
    ];
    Some(Value::Struct(
        fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
    ))
}

fn all_refs(sim: &Sim, class: &str) -> Vec<String> {
    match class {
        "task" => sim.tasks().refs(),
        "session" => Vec::new(),
        _ => {
            let db = sim.db();
            match class {
                "VDI" => db.vdis.keys().cloned().collect(),
                "VM" => db.vms.keys().cloned().collect(),
                "VBD" => db.vbds.keys().cloned().collect(),
                "VIF" => db.vifs.keys().cloned().collect(),
                "SR" => db.srs.keys().cloned().collect(),
                "PBD" => db.pbds.keys().cloned().collect(),
                "network" => db.networks.keys().cloned().collect(),
                "host" => vec![db.host_ref.clone()],
                "pool" => vec![db.pool_ref.clone()],
                _ => Vec::new(),
            }
        }
    }
}

fn getter(
    sim: &Sim,
    method: &str,
    class: &str,
    name: &str,
    args: &[Value],
) -> Result<Value, XapiError> {
    match name {
        "get_all" => {
            arity(method, args, 0)?;
            Ok(Value::Array(
                all_refs(sim, class)
                    .into_iter()
                    .map(Value::String)
                    .collect(),
            ))
        }
        "get_all_records" => {
            arity(method, args, 0)?;
            let map = all_refs(sim, class)
                .into_iter()
                .filter_map(|r| record(sim, class, &r).map(|v| (r, v)))
                .collect();
            Ok(Value::Struct(map))
        }
        "get_by_uuid" => {
            arity(method, args, 1)?;
            let uuid = text(args, 0)?;
            all_refs(sim, class)
                .into_iter()
                .find(|r| {
                    record(sim, class, r)
                        .and_then(|v| v.as_struct().and_then(|m| m.get("uuid").cloned()))
                        .is_some_and(|u| u.as_str() == Some(uuid.as_str()))
                })
                .map(Value::String)
                .ok_or_else(|| XapiError::Other {
                    code: "UUID_INVALID".into(),
                    params: vec![class.into(), uuid],
                })
        }
        "get_by_name_label" => {
            arity(method, args, 1)?;
            let label = text(args, 0)?;
            let refs = all_refs(sim, class)
                .into_iter()
                .filter(|r| {
                    record(sim, class, r)
                        .and_then(|v| v.as_struct().and_then(|m| m.get("name_label").cloned()))
                        .is_some_and(|n| n.as_str() == Some(label.as_str()))
                })
                .map(Value::String)
                .collect();
            Ok(Value::Array(refs))
        }
        _ => {
            let field = name.strip_prefix("get_").ok_or_else(|| unknown(method))?;
            arity(method, args, 1)?;
            let r = text(args, 0)?;
            let rec = record(sim, class, &r).ok_or_else(|| handle_invalid(class, &r))?;
            if field == "record" {
                return Ok(rec);
            }
            rec.as_struct()
                .and_then(|m| m.get(field).cloned())
                .ok_or_else(|| unknown(method))
        }
    }
}

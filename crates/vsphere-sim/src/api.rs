//! The JSON API: one function per call, over the [`World`] under its lock.
//!
//! URL scheme `/sdk/vim25/{release}/{moType}/{moId}/{method|property}`;
//! `GET` reads a property, `POST` invokes a method with the request object
//! as its body (a root `_typeName`, which govmomi sends, is ignored).
//! Answers: `200` + JSON, `204` for void methods and unset properties,
//! `500` + the fault object. Unknown paths answer `404`, unknown moIds
//! `ManagedObjectNotFound` and unknown methods `MethodNotFound` (vcsim's
//! SOAP answers; the real JSON statuses are unverified).

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::fault::SimFault;
use crate::model::{FcdSnap, SnapDisk, Snapshot, State, fcd_snapshot_id, now};
use crate::sim::{Sim, Task, World};
use crate::store;

/// Releases served (VI/JSON exists from 8.0 U1).
const RELEASES: &[&str] = &["8.0.1.0", "8.0.2.0", "8.0.3.0", "9.0.0.0"];
pub(crate) const SESSION_MANAGER: &str = "SessionManager";
pub(crate) const VSTORAGE_MANAGER: &str = "VStorageObjectManager";

/// An answer before it becomes HTTP.
pub(crate) enum Answer {
    Value(Value),
    Empty,
    Fault(SimFault),
    /// 404: not a path of the API.
    NoSuchPath,
    /// Login: the value and the new session token.
    LoggedIn(Value, String),
}

impl From<Result<Value, SimFault>> for Answer {
    fn from(r: Result<Value, SimFault>) -> Answer {
        match r {
            Ok(v) => Answer::Value(v),
            Err(f) => Answer::Fault(f),
        }
    }
}

fn moref(kind: &str, value: &str) -> Value {
    json!({"_typeName": "ManagedObjectReference", "type": kind, "value": value})
}

fn arg<'a>(body: &'a Value, key: &str) -> Result<&'a Value, SimFault> {
    body.get(key).ok_or_else(|| SimFault::invalid_argument(key))
}

fn arg_str<'a>(body: &'a Value, key: &str) -> Result<&'a str, SimFault> {
    arg(body, key)?
        .as_str()
        .ok_or_else(|| SimFault::invalid_argument(key))
}

/// An `ID` argument's `id`.
fn arg_id<'a>(body: &'a Value, key: &str) -> Result<&'a str, SimFault> {
    arg(body, key)?
        .get("id")
        .and_then(|i| i.as_str())
        .ok_or_else(|| SimFault::invalid_argument(key))
}

/// A MoRef argument's `value` (inline or boxed form).
fn arg_moref<'a>(body: &'a Value, key: &str) -> Result<&'a str, SimFault> {
    let v = arg(body, key)?;
    let v = v.get("_value").unwrap_or(v);
    v.get("value")
        .and_then(|i| i.as_str())
        .ok_or_else(|| SimFault::invalid_argument(key))
}

fn arg_u64(body: &Value, key: &str) -> Result<u64, SimFault> {
    arg(body, key)?
        .as_u64()
        .ok_or_else(|| SimFault::invalid_argument(key))
}

/// Handles one request. `path` is what follows `/sdk/vim25/`.
pub(crate) fn handle(
    sim: &Sim,
    get: bool,
    path: &str,
    session: Option<&str>,
    body: &[u8],
) -> Answer {
    let parts: Vec<&str> = path.split('/').collect();
    let [release, kind, id, name] = parts[..] else {
        return Answer::NoSuchPath;
    };
    if !RELEASES.contains(&release) {
        return Answer::NoSuchPath;
    }
    let body: Value = if body.is_empty() {
        json!({})
    } else {
        match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => {
                return Answer::Fault(SimFault::new(
                    "InvalidRequest",
                    format!("malformed JSON: {e}"),
                ));
            }
        }
    };
    let behaviour = sim.behaviour();
    let mut w = sim.lock();
    // Public calls.
    match (get, kind, id, name) {
        (true, "ServiceInstance", "ServiceInstance", "content") => {
            return Answer::Value(service_content());
        }
        (false, "SessionManager", SESSION_MANAGER, "Login") => {
            let user = body.get("userName").and_then(|u| u.as_str());
            let password = body.get("password").and_then(|u| u.as_str());
            if user != Some(behaviour.user.as_str())
                || password != Some(behaviour.password.as_str())
            {
                return Answer::Fault(SimFault::new(
                    "InvalidLogin",
                    "Cannot complete login due to an incorrect user name or password.",
                ));
            }
            let token = format!("{:040x}", rand::random::<u128>());
            w.sessions.insert(
                token.clone(),
                crate::sim::Session {
                    user: behaviour.user.clone(),
                    last_active: Instant::now(),
                },
            );
            let session = json!({"_typeName": "UserSession", "key": token.clone(),
                "userName": behaviour.user, "fullName": behaviour.user,
                "loginTime": now(), "lastActiveTime": now(), "locale": "en",
                "messageLocale": "en", "extensionSession": false,
                "ipAddress": "127.0.0.1", "userAgent": "", "callCount": 0});
            return Answer::LoggedIn(session, token);
        }
        _ => {}
    }
    // Everything else needs a live session.
    if !authenticated(&mut w, session, behaviour.session_idle) {
        return Answer::Fault(SimFault::not_authenticated(moref(kind, id)));
    }
    let answer = route(sim, &mut w, get, kind, id, name, &body, &behaviour);
    if let Err(e) = sim.save(&w) {
        tracing::error!("cannot save the simulator's state: {e}");
    }
    answer
}

fn authenticated(w: &mut World, session: Option<&str>, idle: Duration) -> bool {
    let Some(token) = session else { return false };
    if let Some(n) = w.faults.expire_after_calls {
        if n == 0 {
            w.sessions.clear();
            w.faults.expire_after_calls = None;
        } else {
            w.faults.expire_after_calls = Some(n - 1);
        }
    }
    match w.sessions.get_mut(token) {
        Some(s) if s.last_active.elapsed() < idle => {
            s.last_active = Instant::now();
            !s.user.is_empty()
        }
        Some(_) => {
            w.sessions.remove(token);
            false
        }
        None => false,
    }
}

fn service_content() -> Value {
    json!({"_typeName": "ServiceContent",
        "rootFolder": moref("Folder", "group-d1"),
        "propertyCollector": moref("PropertyCollector", "propertyCollector"),
        "sessionManager": moref("SessionManager", SESSION_MANAGER),
        "viewManager": moref("ViewManager", "ViewManager"),
        "vStorageObjectManager": moref("VcenterVStorageObjectManager", VSTORAGE_MANAGER),
        "about": {"_typeName": "AboutInfo", "name": "VMware vCenter Server",
            "fullName": "VMware vCenter Server 8.0.2 (vsphere-sim)", "vendor": "VMware, Inc.",
            "version": "8.0.2", "build": "0", "apiType": "VirtualCenter",
            "apiVersion": "8.0.2.0", "instanceUuid": "00000000-0000-0000-0000-000000000000"}})
}

#[allow(clippy::too_many_arguments)]
fn route(
    sim: &Sim,
    w: &mut World,
    get: bool,
    kind: &str,
    id: &str,
    name: &str,
    body: &Value,
    behaviour: &crate::sim::Behaviour,
) -> Answer {
    let delay = behaviour.task_delay;
    match (get, kind, name) {
        (false, "SessionManager", "Logout") => {
            // The session header named the session; it ends.
            Answer::Empty
        }
        (true, "Task", "info") => task_info(w, id).into(),
        (false, "ViewManager", "CreateContainerView") if id == "ViewManager" => {
            // Every view lists every VM: the inventory is one flat folder.
            w.next_task += 1;
            Answer::Value(moref(
                "ContainerView",
                &format!("session[{}]view-{}", id, w.next_task),
            ))
        }
        (true, "ContainerView", "view") => {
            let vms: Vec<Value> = w
                .state
                .vms
                .keys()
                .map(|v| moref("VirtualMachine", v))
                .collect();
            Answer::Value(Value::Array(vms))
        }
        (false, "ContainerView", "DestroyView") => Answer::Empty,
        (true, "VirtualMachine", prop) => crate::vm::property(&w.state, id, prop),
        (false, "VirtualMachine", "QueryChangedDiskAreas") => {
            if let Some(f) = w.faults.fail_query.take() {
                return Answer::Fault(f);
            }
            w.faults.queries += 1;
            crate::vm::query(&w.state, id, body, behaviour.shape).into()
        }
        (
            false,
            "VirtualMachine",
            method @ ("ReconfigVM_Task" | "CreateSnapshot_Task" | "CreateSnapshotEx_Task"),
        ) => {
            if let Err(f) = w.state.vm(id) {
                return Answer::Fault(f);
            }
            let outcome = injected(w, method).unwrap_or_else(|| match method {
                "ReconfigVM_Task" => crate::vm::reconfigure(&mut w.state, id, body).map(|()| None),
                _ => create_snapshot(sim, &mut w.state, id, body).map(Some),
            });
            new_task(w, method, moref("VirtualMachine", id), outcome, delay)
        }
        (true, "VirtualMachineSnapshot", "config") => {
            crate::vm::snapshot_config(&w.state, id).into()
        }
        (false, "VirtualMachineSnapshot", "RemoveSnapshot_Task") => {
            if !w.state.snapshots.contains_key(id) {
                return Answer::Fault(SimFault::object_not_found("VirtualMachineSnapshot", id));
            }
            let outcome = injected(w, "RemoveSnapshot_Task")
                .unwrap_or_else(|| remove_snapshot(sim, &mut w.state, id).map(|()| None));
            new_task(
                w,
                "RemoveSnapshot_Task",
                moref("VirtualMachineSnapshot", id),
                outcome,
                delay,
            )
        }
        (false, "VcenterVStorageObjectManager", method) if id == VSTORAGE_MANAGER => {
            fcd_call(sim, w, method, body, behaviour)
        }
        (_, "VirtualMachine" | "VirtualMachineSnapshot" | "Task" | "SessionManager", _)
        | (_, "VcenterVStorageObjectManager", _) => Answer::Fault(SimFault::new(
            "MethodNotFound",
            format!("no {name} on {kind}"),
        )),
        _ => Answer::Fault(SimFault::object_not_found(kind, id)),
    }
}

/// A fault the tests asked the next task of `method` to end with.
fn injected(w: &mut World, method: &str) -> Option<Result<Option<Value>, SimFault>> {
    match &w.faults.fail_task {
        Some((m, _)) if m == method => w.faults.fail_task.take().map(|(_, f)| Err(f)),
        _ => None,
    }
}

fn new_task(
    w: &mut World,
    method: &str,
    entity: Value,
    outcome: Result<Option<Value>, SimFault>,
    delay: Duration,
) -> Answer {
    w.next_task += 1;
    let id = format!("task-{}", w.next_task);
    w.tasks.insert(
        id.clone(),
        Task {
            name: method.to_owned(),
            entity,
            queued: now(),
            ready_at: Instant::now() + delay,
            outcome,
        },
    );
    Answer::Value(moref("Task", &id))
}

fn task_info(w: &World, id: &str) -> Result<Value, SimFault> {
    let t = w
        .tasks
        .get(id)
        .ok_or_else(|| SimFault::object_not_found("Task", id))?;
    let mut info = json!({"_typeName": "TaskInfo", "key": id, "task": moref("Task", id),
        "name": t.name, "descriptionId": t.name, "entity": t.entity,
        "cancelled": false, "cancelable": false, "queueTime": t.queued, "startTime": t.queued});
    let o = info
        .as_object_mut()
        .ok_or_else(|| SimFault::new("SystemError", "task info"))?;
    if Instant::now() < t.ready_at {
        o.insert("state".into(), json!("running"));
        o.insert("progress".into(), json!(50));
        return Ok(info);
    }
    o.insert("completeTime".into(), json!(now()));
    match &t.outcome {
        Ok(result) => {
            o.insert("state".into(), json!("success"));
            if let Some(r) = result {
                o.insert("result".into(), r.clone());
            }
        }
        Err(f) => {
            o.insert("state".into(), json!("error"));
            o.insert(
                "error".into(),
                json!({"_typeName": "LocalizedMethodFault", "fault": f.to_json(),
                       "localizedMessage": f.message}),
            );
        }
    }
    Ok(info)
}

fn create_snapshot(sim: &Sim, s: &mut State, vm: &str, body: &Value) -> Result<Value, SimFault> {
    let name = arg_str(body, "name")?.to_owned();
    if name.is_empty() {
        return Err(SimFault::new("InvalidName", "The snapshot name is empty"));
    }
    let description = body
        .get("description")
        .and_then(|d| d.as_str())
        .unwrap_or("")
        .to_owned();
    let quiesce = body
        .get("quiesce")
        .and_then(|q| q.as_bool())
        .unwrap_or(false);
    let n = s.next_id();
    let id = format!("snapshot-{}", n + 100);
    let v = s.vm_mut(vm)?;
    crate::vm::stun(v);
    let mut disks = Vec::new();
    for d in &mut v.disks {
        let image = format!("{id}-{}.img", d.key);
        store::freeze(&sim.dirs.image(&d.image), &sim.dirs.image(&image))
            .map_err(|e| SimFault::file_fault(&format!("{}: {e}", d.file_name())))?;
        let (change_id, generation) = d.cbt.snapshot();
        disks.push(SnapDisk {
            key: d.key,
            image,
            capacity: d.capacity,
            file_name: d.file_name(),
            change_id,
            generation,
            object_id: d.object_id.clone(),
        });
        d.delta += 1;
    }
    v.snapshots.push(id.clone());
    s.snapshots.insert(
        id.clone(),
        Snapshot {
            vm: vm.to_owned(),
            name,
            description,
            created: now(),
            quiesced: quiesce,
            disks,
        },
    );
    Ok(moref("VirtualMachineSnapshot", &id))
}

fn remove_snapshot(sim: &Sim, s: &mut State, id: &str) -> Result<(), SimFault> {
    let snap = s
        .snapshots
        .remove(id)
        .ok_or_else(|| SimFault::object_not_found("VirtualMachineSnapshot", id))?;
    if let Ok(v) = s.vm_mut(&snap.vm) {
        v.snapshots.retain(|x| x != id);
        crate::vm::stun(v);
    }
    for d in &snap.disks {
        // An NBD export still open keeps its file handle.
        let _ = std::fs::remove_file(sim.dirs.image(&d.image));
    }
    Ok(())
}

fn fcd_call(
    sim: &Sim,
    w: &mut World,
    method: &str,
    body: &Value,
    behaviour: &crate::sim::Behaviour,
) -> Answer {
    let delay = behaviour.task_delay;
    let manager = moref("VcenterVStorageObjectManager", VSTORAGE_MANAGER);
    let (id, ds) = match (arg_id(body, "id"), arg_moref(body, "datastore")) {
        (Ok(i), Ok(d)) => (i.to_owned(), d.to_owned()),
        (Err(f), _) | (_, Err(f)) => return Answer::Fault(f),
    };
    match method {
        "RetrieveVStorageObject" => fcd_object(&mut w.state, &id, &ds).into(),
        "SetVStorageObjectControlFlags" | "ClearVStorageObjectControlFlags" => {
            let flags = body
                .get("controlFlags")
                .and_then(|f| f.as_array())
                .cloned()
                .unwrap_or_default();
            let cbt = flags
                .iter()
                .any(|f| f.as_str() == Some("enableChangedBlockTracking"));
            match w.state.fcd_mut(&id, &ds) {
                Ok(f) if cbt => {
                    let on = method == "SetVStorageObjectControlFlags";
                    f.cbt_flag = on;
                    if on && !f.cbt.active {
                        f.cbt.reset();
                    } else if !on {
                        f.cbt.active = false;
                    }
                    Answer::Empty
                }
                Ok(_) => Answer::Empty,
                Err(e) => Answer::Fault(e),
            }
        }
        "VStorageObjectCreateSnapshot_Task" | "DeleteSnapshot_Task" | "ExtendDisk_Task" => {
            if let Err(f) = w.state.fcd_mut(&id, &ds) {
                return Answer::Fault(f);
            }
            let outcome = injected(w, method).unwrap_or_else(|| match method {
                "VStorageObjectCreateSnapshot_Task" => {
                    fcd_snapshot(sim, &mut w.state, &id, &ds, body).map(Some)
                }
                "DeleteSnapshot_Task" => {
                    fcd_delete(sim, &mut w.state, &id, &ds, body).map(|()| None)
                }
                _ => fcd_extend(sim, &mut w.state, &id, &ds, body).map(|()| None),
            });
            new_task(w, method, manager, outcome, delay)
        }
        "RetrieveSnapshotInfo" => match w.state.fcd_mut(&id, &ds) {
            Ok(f) => {
                let list: Vec<Value> = f
                    .snapshots
                    .iter()
                    .map(|(sid, s)| {
                        json!({
                    "_typeName": "VStorageObjectSnapshotInfoVStorageObjectSnapshot",
                    "id": {"_typeName": "ID", "id": sid}, "backingObjectId": sid,
                    "createTime": s.created, "description": s.description})
                    })
                    .collect();
                Answer::Value(json!({"_typeName": "VStorageObjectSnapshotInfo", "snapshots": list}))
            }
            Err(e) => Answer::Fault(e),
        },
        "RetrieveSnapshotDetails" => {
            let snap = match arg_id(body, "snapshotId") {
                Ok(s) => s,
                Err(f) => return Answer::Fault(f),
            };
            let ds_name = w.state.datastore_name(&ds);
            match w.state.fcd_mut(&id, &ds).and_then(|f| {
                f.snapshots
                    .get(snap)
                    .cloned()
                    .ok_or_else(|| SimFault::not_found(&format!("snapshot {snap}")))
            }) {
                Ok(s) => Answer::Value(json!({"_typeName": "VStorageObjectSnapshotDetails",
                    "path": format!("[{ds_name}] fcd/{id}-{snap}.vmdk"),
                    "changedBlockTrackingId": s.change_id.unwrap_or_default()})),
                Err(e) => Answer::Fault(e),
            }
        }
        "VstorageObjectVCenterQueryChangedDiskAreas" => {
            if let Some(f) = w.faults.fail_query.take() {
                return Answer::Fault(f);
            }
            w.faults.queries += 1;
            fcd_query(&mut w.state, &id, &ds, body, behaviour.shape).into()
        }
        _ => Answer::Fault(SimFault::new(
            "MethodNotFound",
            format!("no {method} on VcenterVStorageObjectManager"),
        )),
    }
}

fn fcd_object(s: &mut State, id: &str, ds: &str) -> Result<Value, SimFault> {
    let ds_name = s.datastore_name(ds);
    let f = s.fcd_mut(id, ds)?;
    Ok(json!({"_typeName": "VStorageObject", "config": {
        "_typeName": "VStorageObjectConfigInfo", "id": {"_typeName": "ID", "id": id},
        "name": f.name, "createTime": now(), "keepAfterDeleteVm": true,
        "changedBlockTrackingEnabled": f.cbt_flag, "capacityInMB": f.capacity >> 20,
        "backing": {"_typeName": "BaseConfigInfoDiskFileBackingInfo",
            "datastore": moref("Datastore", ds), "filePath": format!("[{ds_name}] fcd/{id}.vmdk"),
            "provisioningType": "thin"}}}))
}

fn fcd_snapshot(
    sim: &Sim,
    s: &mut State,
    id: &str,
    ds: &str,
    body: &Value,
) -> Result<Value, SimFault> {
    let description = body
        .get("description")
        .and_then(|d| d.as_str())
        .unwrap_or("")
        .to_owned();
    let n = s.next_id();
    let sid = fcd_snapshot_id(n);
    let f = s.fcd_mut(id, ds)?;
    let image = format!("fcd-{id}-{sid}.img");
    store::freeze(&sim.dirs.image(&f.image), &sim.dirs.image(&image))
        .map_err(|e| SimFault::file_fault(&e.to_string()))?;
    let (change_id, generation) = f.cbt.snapshot();
    f.snapshots.insert(
        sid.clone(),
        FcdSnap {
            description,
            image,
            capacity: f.capacity,
            change_id,
            generation,
            created: now(),
        },
    );
    Ok(json!({"_typeName": "ID", "id": sid}))
}

fn fcd_delete(sim: &Sim, s: &mut State, id: &str, ds: &str, body: &Value) -> Result<(), SimFault> {
    let sid = arg_id(body, "snapshotId")?;
    let f = s.fcd_mut(id, ds)?;
    let snap = f
        .snapshots
        .remove(sid)
        .ok_or_else(|| SimFault::not_found(&format!("snapshot {sid}")))?;
    let _ = std::fs::remove_file(sim.dirs.image(&snap.image));
    Ok(())
}

fn fcd_extend(sim: &Sim, s: &mut State, id: &str, ds: &str, body: &Value) -> Result<(), SimFault> {
    let mb = arg_u64(body, "newCapacityInMB")?;
    let f = s.fcd_mut(id, ds)?;
    let size = mb << 20;
    if size < f.capacity {
        return Err(SimFault::invalid_argument("newCapacityInMB"));
    }
    store::create(&sim.dirs.image(&f.image), size)
        .map_err(|e| SimFault::file_fault(&e.to_string()))?;
    f.capacity = size;
    Ok(())
}

fn fcd_query(
    s: &mut State,
    id: &str,
    ds: &str,
    body: &Value,
    shape: crate::cbt::QueryShape,
) -> Result<Value, SimFault> {
    let sid = arg_id(body, "snapshotId")?;
    let start = arg_u64(body, "startOffset")?;
    let change_id = arg_str(body, "changeId")?;
    let f = s.fcd_mut(id, ds)?;
    let snap = f
        .snapshots
        .get(sid)
        .ok_or_else(|| SimFault::not_found(&format!("snapshot {sid}")))?;
    if snap.change_id.is_none() || !f.cbt_flag {
        return Err(SimFault::invalid_state(
            "Change tracking is not enabled on this disk",
        ));
    }
    let (length, areas) = f.cbt.query(
        snap.change_id.as_deref(),
        snap.generation,
        snap.capacity,
        start,
        change_id,
        shape,
    )?;
    Ok(crate::vm::change_info(start, length, &areas))
}

/// Opens the image an NBD export name refers to: `{snapshot}/{deviceKey}`
/// or `fcd/{id}/{snapshotId}`.
pub(crate) fn export_image(sim: &Sim, name: &str) -> Option<(std::path::PathBuf, u64)> {
    let w = sim.lock();
    let parts: Vec<&str> = name.trim_start_matches('/').split('/').collect();
    match parts[..] {
        ["fcd", id, snap] => {
            let s = w.state.fcds.get(id)?.snapshots.get(snap)?;
            Some((sim.dirs.image(&s.image), s.capacity))
        }
        [snap, key] => {
            let key: i32 = key.parse().ok()?;
            let d = w
                .state
                .snapshots
                .get(snap)?
                .disks
                .iter()
                .find(|d| d.key == key)?
                .clone();
            Some((sim.dirs.image(&d.image), d.capacity))
        }
        _ => None,
    }
}

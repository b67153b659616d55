//! Tasks of `Async.*` calls: pending until the call finishes, then
//! `success` with the result as an XML-RPC `<value>` fragment (as xapi's
//! `TaskHelper` stores it) or `failure` with `error_info`. At most 200
//! finished tasks are kept (xapi's `max_tasks`); older ones are collected.

use std::collections::BTreeMap;

use cbtvault_xenapi::rpc::xmlrpc::encode_value_fragment;
use cbtvault_xenapi::{NULL_REF, Value, XapiError};

use crate::model::{EPOCH, new_ref, new_uuid, now_datetime};

/// Finished tasks kept before the oldest are collected.
const MAX_FINISHED: usize = 200;

/// One task.
#[derive(Clone, Debug)]
pub struct Task {
    uuid: String,
    name: String,
    created: String,
    finished: String,
    status: &'static str,
    result: String,
    error_info: Vec<String>,
    seq: u64,
}

/// All tasks.
#[derive(Debug, Default)]
pub struct Tasks {
    map: BTreeMap<String, Task>,
    seq: u64,
}

impl Tasks {
    /// Creates a pending task for `name` (e.g. `Async.VDI.snapshot`).
    pub fn create(&mut self, name: &str) -> String {
        let r = new_ref();
        self.seq += 1;
        self.map.insert(
            r.clone(),
            Task {
                uuid: new_uuid(),
                name: name.to_owned(),
                created: now_datetime(),
                finished: EPOCH.to_owned(),
                status: "pending",
                result: String::new(),
                error_info: Vec::new(),
                seq: self.seq,
            },
        );
        r
    }

    /// Records the outcome of task `r`.
    pub fn finish(&mut self, r: &str, outcome: Result<Value, XapiError>) {
        if let Some(t) = self.map.get_mut(r) {
            t.finished = now_datetime();
            match outcome {
                Ok(v) => {
                    t.status = "success";
                    t.result = encode_value_fragment(&v);
                }
                Err(e) => {
                    t.status = "failure";
                    t.error_info = e.description();
                }
            }
        }
        self.collect();
    }

    fn collect(&mut self) {
        let mut finished: Vec<(u64, String)> = self
            .map
            .iter()
            .filter(|(_, t)| t.status != "pending")
            .map(|(r, t)| (t.seq, r.clone()))
            .collect();
        if finished.len() > MAX_FINISHED {
            finished.sort();
            let excess = finished.len() - MAX_FINISHED;
            for (_, r) in finished.into_iter().take(excess) {
                self.map.remove(&r);
            }
        }
    }

    /// Removes task `r`.
    pub fn destroy(&mut self, r: &str) -> Result<(), XapiError> {
        self.map
            .remove(r)
            .map(drop)
            .ok_or_else(|| handle_invalid(r))
    }

    /// Checks that task `r` exists (cancellation is best effort: the
    /// simulator's operations are not interruptible, as many of xapi's
    /// are not).
    pub fn cancel(&mut self, r: &str) -> Result<(), XapiError> {
        self.map.get(r).map(drop).ok_or_else(|| handle_invalid(r))
    }

    /// All task references.
    pub fn refs(&self) -> Vec<String> {
        self.map.keys().cloned().collect()
    }

    /// The record of task `r`.
    pub fn value(&self, r: &str, host: &str) -> Option<Value> {
        let t = self.map.get(r)?;
        let progress = if t.status == "pending" { 0.0 } else { 1.0 };
        let fields: Vec<(&str, Value)> = vec![
            ("uuid", Value::from(t.uuid.as_str())),
            ("name_label", Value::from(t.name.as_str())),
            ("name_description", Value::from("")),
            ("allowed_operations", Value::Array(vec![])),
            ("current_operations", Value::Struct(BTreeMap::new())),
            ("created", Value::DateTime(t.created.clone())),
            ("finished", Value::DateTime(t.finished.clone())),
            ("status", Value::from(t.status)),
            ("resident_on", Value::from(host)),
            ("progress", Value::Double(progress)),
            ("type", Value::from("")),
            ("result", Value::from(t.result.as_str())),
            (
                "error_info",
                Value::Array(t.error_info.iter().map(Value::from).collect()),
            ),
            ("other_config", Value::Struct(BTreeMap::new())),
            ("subtask_of", Value::from(NULL_REF)),
            ("subtasks", Value::Array(vec![])),
            ("backtrace", Value::from("()")),
        ];
        Some(Value::Struct(
            fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        ))
    }
}

fn handle_invalid(r: &str) -> XapiError {
    XapiError::HandleInvalid {
        class: "task".into(),
        handle: r.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_and_collection() {
        let mut t = Tasks::default();
        let a = t.create("Async.VDI.snapshot");
        let v = t.value(&a, "h").unwrap();
        assert_eq!(v.as_struct().unwrap()["status"], Value::from("pending"));
        t.finish(&a, Ok(Value::from("OpaqueRef:x")));
        let v = t.value(&a, "h").unwrap();
        assert_eq!(
            v.as_struct().unwrap()["result"],
            Value::from("<value>OpaqueRef:x</value>")
        );
        let b = t.create("Async.VDI.destroy");
        t.finish(
            &b,
            Err(XapiError::VdiInUse {
                vdi: "v".into(),
                operation: "destroy".into(),
            }),
        );
        let v = t.value(&b, "h").unwrap();
        assert_eq!(
            v.as_struct().unwrap()["error_info"]
                .as_array()
                .unwrap()
                .len(),
            3
        );
        for _ in 0..250 {
            let r = t.create("x");
            t.finish(&r, Ok(Value::from("")));
        }
        assert_eq!(t.refs().len(), MAX_FINISHED);
        assert!(t.destroy(&a).is_err(), "collected");
    }
}

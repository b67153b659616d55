//! Faults as the JSON API sends them: HTTP 500 with the fault object,
//! `_typeName` first, `faultMessage` when VMware's tools branch on its key,
//! and the non-schema `faultstring` real servers add.

use serde_json::{Value, json};

/// A fault the simulator answers with.
#[derive(Clone, Debug, PartialEq)]
pub struct SimFault {
    pub type_name: String,
    pub message: String,
    /// Type-specific fields (`invalidProperty`, `file`, `obj`...).
    pub fields: Value,
    pub key: Option<String>,
}

impl SimFault {
    pub fn new(type_name: &str, message: impl Into<String>) -> SimFault {
        SimFault {
            type_name: type_name.into(),
            message: message.into(),
            fields: json!({}),
            key: None,
        }
    }

    fn with(mut self, key: &str, value: Value) -> SimFault {
        if let Some(o) = self.fields.as_object_mut() {
            o.insert(key.into(), value);
        }
        self
    }

    pub fn invalid_argument(property: &str) -> SimFault {
        SimFault::new(
            "InvalidArgument",
            format!("A specified parameter was not correct: {property}"),
        )
        .with("invalidProperty", json!(property))
    }

    pub fn file_fault_key(key: &str, message: &str) -> SimFault {
        SimFault {
            key: Some(key.into()),
            ..SimFault::new("FileFault", message)
        }
    }

    pub fn file_fault(file: &str) -> SimFault {
        SimFault::new("FileFault", format!("Cannot access file {file}")).with("file", json!(file))
    }

    pub fn not_authenticated(object: Value) -> SimFault {
        SimFault::new("NotAuthenticated", "The session is not authenticated.")
            .with("object", object)
            .with("privilegeId", json!("System.View"))
    }

    pub fn not_found(what: &str) -> SimFault {
        SimFault::new(
            "NotFound",
            format!("The object or item referred to could not be found: {what}"),
        )
    }

    pub fn object_not_found(kind: &str, value: &str) -> SimFault {
        SimFault::new(
            "ManagedObjectNotFound",
            format!("The object '{kind}:{value}' has already been deleted or has not been completely created"),
        )
        .with("obj", json!({"_typeName": "ManagedObjectReference", "type": kind, "value": value}))
    }

    pub fn invalid_state(message: &str) -> SimFault {
        SimFault::new("InvalidState", message)
    }

    pub fn invalid_datastore(ds: &str) -> SimFault {
        SimFault::new("InvalidDatastore", format!("Invalid datastore {ds}")).with(
            "datastore",
            json!({"_typeName": "ManagedObjectReference", "type": "Datastore", "value": ds}),
        )
    }

    /// The fault object.
    pub fn to_json(&self) -> Value {
        let mut v = json!({"_typeName": self.type_name, "faultstring": self.message});
        if let (Some(o), Some(extra)) = (v.as_object_mut(), self.fields.as_object()) {
            for (k, val) in extra {
                o.insert(k.clone(), val.clone());
            }
            if let Some(key) = &self.key {
                o.insert(
                    "faultMessage".into(),
                    json!([{"_typeName": "LocalizableMessage", "key": key, "message": self.message}]),
                );
            }
        }
        v
    }
}

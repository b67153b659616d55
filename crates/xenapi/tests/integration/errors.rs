//! Typed XAPI errors over both transports.

use std::time::Duration;

use cbtvault_xenapi::{Client, Error, Value, VdiCreate, VdiRef, VdiType, VmRef, XapiError};

use super::common::{BOTH, client, disk_of, options, start};

#[tokio::test]
async fn handle_invalid_for_a_bad_ref() {
    let env = start().await;
    for t in BOTH {
        let c = client(&env, t).await;
        let bad = VdiRef::new("OpaqueRef:00000000-0000-0000-0000-000000000000");
        let err = c.vdi().get_record(&bad).await.unwrap_err();
        assert_eq!(
            err.xapi(),
            Some(&XapiError::HandleInvalid {
                class: "VDI".into(),
                handle: bad.to_string()
            }),
            "{t:?}"
        );
        // Through Async.* the failure comes from the task.
        let err = c
            .vdi()
            .snapshot(&bad, &Default::default())
            .await
            .unwrap_err();
        assert!(
            matches!(err.xapi(), Some(XapiError::HandleInvalid { .. })),
            "{err}"
        );
        let err = c
            .vm()
            .get_record(&VmRef::new("OpaqueRef:x"))
            .await
            .unwrap_err();
        assert_eq!(
            err.xapi().map(XapiError::code).as_deref(),
            Some("HANDLE_INVALID")
        );
        let err = c.vdi().get_by_uuid("no-such-uuid").await.unwrap_err();
        assert_eq!(
            err.xapi().map(XapiError::params),
            Some(vec!["VDI".to_owned(), "no-such-uuid".to_owned()])
        );
    }
}

#[tokio::test]
async fn unknown_methods_and_parameter_counts() {
    let env = start().await;
    for t in BOTH {
        let c = client(&env, t).await;
        let err = c.call("VDI.frobnicate", vec![]).await.unwrap_err();
        assert_eq!(
            err.xapi(),
            Some(&XapiError::MessageMethodUnknown {
                method: "VDI.frobnicate".into()
            })
        );
        let err = c.call("VDI.get_record", vec![]).await.unwrap_err();
        assert_eq!(
            err.xapi(),
            Some(&XapiError::MessageParameterCountMismatch {
                method: "VDI.get_record".into(),
                expected: "1".into(),
                received: "0".into()
            })
        );
        // A known method without async mode: xapi's "Fault" failure.
        let err = c
            .call("Async.VDI.get_nbd_info", vec![Value::from("OpaqueRef:x")])
            .await
            .unwrap_err();
        assert_eq!(
            err.xapi().map(XapiError::description),
            Some(vec![
                "Fault".to_string(),
                "No async mode for this operation (rpc: Async.VDI.get_nbd_info)".to_string()
            ])
        );
    }
}

#[tokio::test]
async fn operation_errors_have_xapi_parameters() {
    let env = start().await;
    let c = client(&env, Default::default()).await;
    let (disk, _) = disk_of(&c, "vm-0").await;
    // data_destroy of a VDI that is not a snapshot.
    let err = c.vdi().data_destroy(&disk).await.unwrap_err();
    assert_eq!(
        err.xapi(),
        Some(&XapiError::OperationNotAllowed {
            reason: format!("VDI is not a snapshot: {disk}")
        })
    );
    // A snapshot without CBT has no CBT metadata.
    let snap = c.vdi().snapshot(&disk, &Default::default()).await.unwrap();
    let err = c.vdi().data_destroy(&snap).await.unwrap_err();
    assert_eq!(
        err.xapi(),
        Some(&XapiError::VdiNoCbtMetadata {
            vdi: snap.to_string()
        })
    );
    // enable_cbt on a snapshot.
    let err = c.vdi().enable_cbt(&snap).await.unwrap_err();
    assert_eq!(
        err.xapi(),
        Some(&XapiError::OperationNotAllowed {
            reason: format!("VDI is a snapshot: {snap}")
        })
    );
    // destroy of a VDI plugged into a running VM.
    let err = c.vdi().destroy(&disk).await.unwrap_err();
    assert_eq!(
        err.xapi(),
        Some(&XapiError::VdiInUse {
            vdi: disk.to_string(),
            operation: "destroy".into()
        })
    );
    assert!(err.is_retryable());
    // VDI.create with type cbt_metadata.
    let sr = c.vdi().get_record(&disk).await.unwrap().sr;
    let mut args = VdiCreate::new("x", sr, 1 << 20);
    args.vdi_type = VdiType::CbtMetadata;
    let err = c.vdi().create(&args).await.unwrap_err();
    assert_eq!(
        err.xapi(),
        Some(&XapiError::VdiIncompatibleType {
            vdi: String::new(),
            vdi_type: "cbt_metadata".into()
        })
    );
    // A running VM cannot be destroyed.
    let vm = c.vm().get_by_name_label("vm-0").await.unwrap().remove(0);
    let err = c.vm().destroy(&vm).await.unwrap_err();
    assert!(
        matches!(err.xapi(), Some(XapiError::VmBadPowerState { .. })),
        "{err}"
    );
    // other_config: adding an existing key is MAP_DUPLICATE_KEY, removing
    // a missing one is fine.
    c.vdi().add_to_other_config(&disk, "k", "v").await.unwrap();
    let err = c
        .vdi()
        .add_to_other_config(&disk, "k", "w")
        .await
        .unwrap_err();
    assert_eq!(
        err.xapi().map(XapiError::code).as_deref(),
        Some("MAP_DUPLICATE_KEY")
    );
    assert_eq!(
        c.vdi().get_record(&disk).await.unwrap().other_config["k"],
        "v"
    );
    c.vdi().remove_from_other_config(&disk, "k").await.unwrap();
    c.vdi().remove_from_other_config(&disk, "k").await.unwrap();
    assert!(
        c.vdi()
            .get_record(&disk)
            .await
            .unwrap()
            .other_config
            .is_empty()
    );
    c.vm()
        .add_to_other_config(&vm, "backup", "yes")
        .await
        .unwrap();
    assert_eq!(
        c.vm().get_record(&vm).await.unwrap().other_config["backup"],
        "yes"
    );
}

#[tokio::test]
async fn slow_answers_time_out_and_are_retryable() {
    let env = start().await;
    let mut o = options(&env, Default::default());
    o.rpc_timeout = Duration::from_millis(200);
    let c = Client::connect(o).await.unwrap();
    env.sim
        .sim()
        .fault_slow(Duration::from_millis(600), Some(1));
    let err = c.call("VDI.get_all", vec![]).await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert!(err.is_retryable());
    // The fault was for one call only.
    let v = c.call("VDI.get_all", vec![]).await.unwrap();
    assert!(matches!(v, Value::Array(_)));
}

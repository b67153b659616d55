//! The CBT chain semantics of shared/specs/xenapi.md, through the client.

use std::collections::BTreeMap;

use cbtvault_blockmap::{BLOCK_SIZE, bitmap_len, block_count};
use cbtvault_xenapi::{Client, VdiRef, VdiType, XapiError};

use super::common::{BOTH, DISK, blocks, client, disk_of, start};

fn no_params() -> BTreeMap<String, String> {
    BTreeMap::new()
}

async fn lcb(c: &Client, from: &VdiRef, to: &VdiRef) -> Result<String, cbtvault_xenapi::Error> {
    c.vdi().list_changed_blocks(from, to).await
}

fn assert_460(err: &cbtvault_xenapi::Error, opterr: &str) {
    match err.xapi() {
        Some(XapiError::SrBackendFailure {
            code: 460,
            status,
            stdout,
            stderr,
        }) => {
            assert!(status.is_empty() && stderr.is_empty());
            assert!(stdout.contains(opterr), "{stdout}");
        }
        other => panic!("expected SR_BACKEND_FAILURE_460, got {other:?}"),
    }
    let params = err.xapi().unwrap().params();
    assert_eq!(params.len(), 3);
}

#[tokio::test]
async fn snapshot_bitmaps_destroy_and_data_destroy() {
    let env = start().await;
    for t in BOTH {
        let c = client(&env, t).await;
        let sim = env.sim.sim();
        let vm = if t == BOTH[0] { "vm-0" } else { "vm-1" };
        let (disk, uuid) = disk_of(&c, vm).await;
        c.vdi().enable_cbt(&disk).await.unwrap();
        c.vdi().enable_cbt(&disk).await.unwrap(); // idempotent
        let s0 = c.vdi().snapshot(&disk, &no_params()).await.unwrap();
        let r0 = c.vdi().get_record(&s0).await.unwrap();
        assert!(r0.is_a_snapshot && r0.cbt_enabled);
        assert_eq!(r0.snapshot_of, disk);
        assert_eq!(r0.vdi_type, VdiType::User);

        // Writes between snapshots: exact 64 KiB blocks, also partial ones.
        sim.write_blocks(&uuid, &[1, 5], 7).unwrap();
        sim.write(&uuid, 10 * BLOCK_SIZE - 1, &[1, 2]).unwrap(); // blocks 9 and 10
        let s1 = c.vdi().snapshot(&disk, &no_params()).await.unwrap();
        let churned = sim.churn(&uuid, 6, 42).unwrap();
        let s2 = c.vdi().snapshot(&disk, &no_params()).await.unwrap();
        sim.write(&uuid, DISK - 1, &[9]).unwrap(); // the last block
        let s3 = c.vdi().snapshot(&disk, &no_params()).await.unwrap();

        let a = lcb(&c, &s0, &s1).await.unwrap();
        assert_eq!(blocks(&a, DISK), [1, 5, 9, 10]);
        let raw = base64_len(&a);
        assert_eq!(raw, bitmap_len(block_count(DISK)) as usize);
        assert_eq!(blocks(&lcb(&c, &s1, &s2).await.unwrap(), DISK), churned);
        assert_eq!(blocks(&lcb(&c, &s2, &s3).await.unwrap(), DISK), [63]);
        let mut all: Vec<u64> = [1, 5, 9, 10, 63]
            .into_iter()
            .chain(churned.clone())
            .collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(blocks(&lcb(&c, &s0, &s3).await.unwrap(), DISK), all);
        // Nothing written since s3: the leaf's own bitmap is empty (once it
        // is unplugged; attached to its VM, XAPI refuses).
        sim.unplug(&uuid).unwrap();
        assert!(blocks(&lcb(&c, &s3, &disk).await.unwrap(), DISK).is_empty());

        // Destroying the middle snapshot keeps the chain: s0 → s2 still
        // covers what s1 and s2 recorded.
        c.vdi().destroy(&s1).await.unwrap();
        let mut a_and_b: Vec<u64> = [1, 5, 9, 10].into_iter().chain(churned).collect();
        a_and_b.sort_unstable();
        a_and_b.dedup();
        assert_eq!(blocks(&lcb(&c, &s0, &s2).await.unwrap(), DISK), a_and_b);

        // data_destroy keeps the log: s0 becomes cbt_metadata and still diffs.
        c.vdi().data_destroy(&s0).await.unwrap();
        let r0 = c.vdi().get_record(&s0).await.unwrap();
        assert_eq!(r0.vdi_type, VdiType::CbtMetadata);
        assert!(r0.is_a_snapshot && r0.cbt_enabled);
        c.vdi().data_destroy(&s0).await.unwrap(); // idempotent
        assert_eq!(blocks(&lcb(&c, &s0, &s2).await.unwrap(), DISK), a_and_b);

        // Data operations on cbt_metadata VDIs.
        let incompatible = Some(XapiError::VdiIncompatibleType {
            vdi: s0.to_string(),
            vdi_type: "cbt_metadata".into(),
        });
        let err = c.vdi().snapshot(&s0, &no_params()).await.unwrap_err();
        assert_eq!(err.xapi(), incompatible.as_ref());
        let err = c.vdi().get_nbd_info(&s0).await.unwrap_err();
        assert_eq!(err.xapi(), incompatible.as_ref());
        // ...while destroy is allowed and coalesces into the child.
        c.vdi().destroy(&s0).await.unwrap();
        assert_eq!(blocks(&lcb(&c, &s2, &s3).await.unwrap(), DISK), [63]);
    }
}

/// Length in bytes of a base64 text.
fn base64_len(text: &str) -> usize {
    let pad = text.bytes().rev().take_while(|b| *b == b'=').count();
    text.len() / 4 * 3 - pad
}

#[tokio::test]
async fn unrelated_reversed_same_and_attached() {
    let env = start().await;
    let c = client(&env, Default::default()).await;
    let sim = env.sim.sim();
    let (d0, u0) = disk_of(&c, "vm-0").await;
    let (d1, _) = disk_of(&c, "vm-1").await;
    for d in [&d0, &d1] {
        c.vdi().enable_cbt(d).await.unwrap();
    }
    let a1 = c.vdi().snapshot(&d0, &no_params()).await.unwrap();
    sim.write_blocks(&u0, &[3], 1).unwrap();
    let a2 = c.vdi().snapshot(&d0, &no_params()).await.unwrap();
    let b1 = c.vdi().snapshot(&d1, &no_params()).await.unwrap();

    assert_460(&lcb(&c, &a2, &a1).await.unwrap_err(), "unrelated");
    assert_460(&lcb(&c, &a1, &b1).await.unwrap_err(), "unrelated");
    assert_460(&lcb(&c, &a1, &a1).await.unwrap_err(), "same");
    let err = lcb(&c, &a1, &a2).await.unwrap();
    assert_eq!(blocks(&err, DISK), [3]);

    // vdi_to attached to a running VM: VDI_IN_USE; unplugged: the leaf's
    // writes since the last snapshot.
    sim.write_blocks(&u0, &[4], 1).unwrap();
    let err = lcb(&c, &a2, &d0).await.unwrap_err();
    assert_eq!(
        err.xapi(),
        Some(&XapiError::VdiInUse {
            vdi: d0.to_string(),
            operation: "list_changed_blocks".into()
        })
    );
    sim.unplug(&u0).unwrap();
    assert_eq!(blocks(&lcb(&c, &a2, &d0).await.unwrap(), DISK), [4]);
}

#[tokio::test]
async fn disable_enable_cuts_the_chain_and_silent_disable() {
    let env = start().await;
    let c = client(&env, Default::default()).await;
    let sim = env.sim.sim();
    let (d, u) = disk_of(&c, "vm-0").await;
    c.vdi().enable_cbt(&d).await.unwrap();
    let s1 = c.vdi().snapshot(&d, &no_params()).await.unwrap();
    let s2 = c.vdi().snapshot(&d, &no_params()).await.unwrap();
    c.vdi().disable_cbt(&d).await.unwrap();
    c.vdi().disable_cbt(&d).await.unwrap(); // idempotent
    assert!(!c.vdi().get_cbt_enabled(&d).await.unwrap());
    // A snapshot taken without CBT has none.
    let plain = c.vdi().snapshot(&d, &no_params()).await.unwrap();
    assert!(!c.vdi().get_record(&plain).await.unwrap().cbt_enabled);
    c.vdi().enable_cbt(&d).await.unwrap();
    let s3 = c.vdi().snapshot(&d, &no_params()).await.unwrap();
    assert_460(&lcb(&c, &s2, &s3).await.unwrap_err(), "unrelated");
    assert!(lcb(&c, &s1, &s2).await.is_ok(), "older links survive");
    assert_460(&lcb(&c, &s2, &plain).await.unwrap_err(), "unrelated");

    // The storage manager disables CBT by itself: cbt_enabled goes false
    // and the chain is cut, with no call from the client.
    sim.fault_cbt_disable(&u).unwrap();
    assert!(!c.vdi().get_cbt_enabled(&d).await.unwrap());
    c.vdi().enable_cbt(&d).await.unwrap();
    let s4 = c.vdi().snapshot(&d, &no_params()).await.unwrap();
    assert_460(&lcb(&c, &s3, &s4).await.unwrap_err(), "unrelated");
}

#[tokio::test]
async fn grown_vdi_bitmaps_are_zero_extended() {
    let env = start().await;
    let c = client(&env, Default::default()).await;
    let sim = env.sim.sim();
    let (d, u) = disk_of(&c, "vm-0").await;
    // An SR that keeps sizes exact (VHD SRs round them up to 2 MiB).
    sim.set_sr_type_of(&u, "dummy").unwrap();
    c.vdi().enable_cbt(&d).await.unwrap();
    let s1 = c.vdi().snapshot(&d, &no_params()).await.unwrap();
    sim.write_blocks(&u, &[2], 1).unwrap();
    let s2 = c.vdi().snapshot(&d, &no_params()).await.unwrap();
    let grown = DISK + 20 * BLOCK_SIZE + 5; // 85 blocks, the last partial
    sim.resize(&u, grown).unwrap();
    sim.write(&u, grown - 1, &[1]).unwrap();
    let s3 = c.vdi().snapshot(&d, &no_params()).await.unwrap();
    assert_eq!(c.vdi().get_record(&s3).await.unwrap().virtual_size, grown);
    // Before the growth: the old length.
    assert_eq!(blocks(&lcb(&c, &s1, &s2).await.unwrap(), DISK), [2]);
    // Across it: the new length, old bits kept, new bits only where written.
    let across = lcb(&c, &s1, &s3).await.unwrap();
    assert_eq!(base64_len(&across), bitmap_len(block_count(grown)) as usize);
    assert_eq!(blocks(&across, grown), [2, 84]);
    assert_eq!(blocks(&lcb(&c, &s2, &s3).await.unwrap(), grown), [84]);
}

#[tokio::test]
async fn vm_snapshot_then_data_destroy() {
    let env = start().await;
    let c = client(&env, Default::default()).await;
    let sim = env.sim.sim();
    let vm = c.vm().get_by_name_label("vm-0").await.unwrap().remove(0);
    let (d, u) = disk_of(&c, "vm-0").await;
    c.vdi().enable_cbt(&d).await.unwrap();
    let base_vm = c.vm().snapshot(&vm, "base").await.unwrap();
    let base = c.vm().get_record(&base_vm).await.unwrap();
    assert!(base.is_a_snapshot && base.snapshot_of == vm && base.power_state == "Halted");
    let vbd = c.vbd().get_record(&base.vbds[0]).await.unwrap();
    assert!(!vbd.currently_attached);
    let base_vdi = vbd.vdi;
    assert!(c.vdi().get_record(&base_vdi).await.unwrap().cbt_enabled);

    // The snapshot VM still holds a VBD: data_destroy waits, then refuses
    // and puts the type back.
    let err = c.vdi().data_destroy(&base_vdi).await.unwrap_err();
    assert_eq!(
        err.xapi(),
        Some(&XapiError::VdiInUse {
            vdi: base_vdi.to_string(),
            operation: "data_destroy".into()
        })
    );
    assert_eq!(
        c.vdi().get_record(&base_vdi).await.unwrap().vdi_type,
        VdiType::User
    );

    // Destroying the snapshot VM removes its VBDs, not its VDIs.
    c.vm().destroy(&base_vm).await.unwrap();
    assert!(c.vdi().get_record(&base_vdi).await.unwrap().vbds.is_empty());
    c.vdi().data_destroy(&base_vdi).await.unwrap();

    sim.write_blocks(&u, &[7, 8], 3).unwrap();
    let next_vm = c.vm().snapshot(&vm, "next").await.unwrap();
    let next = c.vm().get_record(&next_vm).await.unwrap();
    let next_vdi = c.vbd().get_record(&next.vbds[0]).await.unwrap().vdi;
    assert_eq!(
        blocks(&lcb(&c, &base_vdi, &next_vdi).await.unwrap(), DISK),
        [7, 8]
    );

    // The injected fault: VDI_IN_USE on the next data_destroy only.
    c.vm().destroy(&next_vm).await.unwrap();
    sim.fault_data_destroy_in_use();
    let err = c.vdi().data_destroy(&next_vdi).await.unwrap_err();
    assert!(
        matches!(err.xapi(), Some(XapiError::VdiInUse { .. })),
        "{err}"
    );
    c.vdi().data_destroy(&next_vdi).await.unwrap();
}

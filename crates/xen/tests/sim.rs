//! cbtvault-xen against the XenAPI simulator: a VM's disks and metadata,
//! and a snapshot orphaned by a run that died before tagging it.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use cbtvault_xapi_sim::{PoolSpec, SimConfig, Simulator};
use cbtvault_xen::{
    BoxError, Journal, NoteKind, TAG_JOB, VdiBackup, XenChanges, XenOptions, vm_disks, vm_metadata,
};
use cbtvault_xenapi::{Client, ClientOptions, Password};

const PASSWORD: &str = "pw";

async fn start() -> (Simulator, Client, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = SimConfig::new(dir.path(), PASSWORD);
    config.pool = PoolSpec {
        vms: 1,
        disks_per_vm: 2,
        disk_size: 2 << 20,
        initial_blocks: 2,
    };
    config.data_destroy_timeout = Duration::from_millis(300);
    let sim = Simulator::start(config).await.unwrap();
    let options = ClientOptions::new(&sim.http_url(), "root", Password::new(PASSWORD)).unwrap();
    let client = Client::connect(options).await.unwrap();
    (sim, client, dir)
}

async fn vm_uuid(client: &Client) -> String {
    let vm = client.vm().get_by_name_label("vm-0").await.unwrap();
    client.vm().get_record(&vm[0]).await.unwrap().uuid
}

/// A note: its kind, subject, the snapshots it lists, and whether closed.
type Note = (NoteKind, String, Vec<String>, bool);

/// A journal in memory.
#[derive(Default)]
struct Notes(Mutex<BTreeMap<i64, Note>>);

impl Journal for Notes {
    fn note(&self, kind: NoteKind, subject: &str, known: &[String]) -> Result<i64, BoxError> {
        let mut notes = self.0.lock().unwrap();
        let id = notes.len() as i64 + 1;
        notes.insert(id, (kind, subject.into(), known.to_vec(), false));
        Ok(id)
    }

    fn unfinished(
        &self,
        kind: NoteKind,
        subject: &str,
    ) -> Result<Vec<(i64, Vec<String>)>, BoxError> {
        Ok(self
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, (k, s, _, closed))| *k == kind && s == subject && !closed)
            .map(|(id, (_, _, known, _))| (*id, known.clone()))
            .collect())
    }

    fn close(&self, note: i64, _status: &str) -> Result<(), BoxError> {
        if let Some(n) = self.0.lock().unwrap().get_mut(&note) {
            n.3 = true;
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_vms_disks_come_with_their_positions_and_names() {
    let (_sim, client, _dir) = start().await;
    let vm = vm_uuid(&client).await;
    let disks = vm_disks(&client, &vm).await.unwrap();
    assert_eq!(disks.len(), 2);
    let positions: Vec<&str> = disks.iter().map(|d| d.position.as_str()).collect();
    assert_eq!(positions, ["0", "1"]);
    for d in &disks {
        let record = client.vdi().get_record(&d.vdi).await.unwrap();
        assert_eq!(d.vdi_uuid, record.uuid);
        assert_eq!(d.name_label, record.name_label);
        assert!(!d.name_label.is_empty());
    }
}

#[tokio::test]
async fn a_vms_metadata_holds_its_record_and_vbds_and_says_what_is_missing() {
    let (_sim, client, _dir) = start().await;
    let vm = vm_uuid(&client).await;
    let meta = vm_metadata(&client, &vm).await.unwrap();
    assert_eq!(meta["vm"]["uuid"], vm.as_str());
    assert_eq!(meta["vm"]["name_label"], "vm-0");
    let vbds = meta["vbds"].as_array().unwrap();
    assert_eq!(vbds.len(), 2);
    assert!(vbds.iter().all(|v| v["userdevice"].is_string()));
    // The VM's VIFs and their networks come with it; nothing is missing.
    assert_eq!(meta["missing"], serde_json::json!({}), "{meta:#}");
    let vifs = meta["vifs"].as_array().unwrap();
    assert!(!vifs.is_empty(), "{meta:#}");
    assert!(vifs.iter().all(|v| v["MAC"].is_string()), "{meta:#}");
    // Each VIF's network is saved with it (the sim's VIFs share one).
    let networks = meta["networks"].as_array().unwrap();
    assert!(!networks.is_empty(), "{meta:#}");
    assert!(networks.iter().all(|n| n["bridge"].is_string()), "{meta:#}");
}

#[tokio::test]
async fn an_untagged_snapshot_after_a_note_is_reaped_and_others_are_kept() {
    let (_sim, client, _dir) = start().await;
    let vm = vm_uuid(&client).await;
    let disk = &vm_disks(&client, &vm).await.unwrap()[0];
    let vdis = client.vdi();
    // Someone else's snapshot, made before the run: it must survive.
    let theirs = vdis.snapshot(&disk.vdi, &BTreeMap::new()).await.unwrap();
    let journal = Notes::default();
    let known: Vec<String> = vdis
        .get_record(&disk.vdi)
        .await
        .unwrap()
        .snapshots
        .iter()
        .map(|r| r.as_str().to_string())
        .collect();
    // A run noted the snapshots, took one, and died before tagging it.
    journal.note(NoteKind::VdiSnapshot, "d0", &known).unwrap();
    let orphan = vdis.snapshot(&disk.vdi, &BTreeMap::new()).await.unwrap();

    let options = XenOptions::new("nightly");
    let backup = VdiBackup::prepare(
        &client,
        "d0",
        &disk.vdi_uuid,
        None,
        None,
        &options,
        &journal,
    )
    .await
    .unwrap();
    let snapshots = vdis.get_record(&disk.vdi).await.unwrap().snapshots;
    assert!(!snapshots.contains(&orphan), "the orphan was reaped");
    assert!(snapshots.contains(&theirs), "another's snapshot was kept");
    assert!(
        journal
            .unfinished(NoteKind::VdiSnapshot, "d0")
            .unwrap()
            .is_empty()
    );

    // This run's snapshot is tagged, its changes are a full (first backup),
    // and commit leaves only its metadata.
    let capture = backup.snapshot(&client, &options, &journal).await.unwrap();
    let record = vdis.get_record(&capture.snapshot).await.unwrap();
    assert_eq!(
        record.other_config.get(TAG_JOB).map(String::as_str),
        Some("nightly")
    );
    assert!(matches!(
        capture.changes,
        XenChanges::Full(Some(ref r)) if r.contains("first backup") || r.contains("just enabled")
    ));
    backup
        .commit(&client, &capture.snapshot, &options)
        .await
        .unwrap();
    let record = vdis.get_record(&capture.snapshot).await.unwrap();
    assert_eq!(record.vdi_type, cbtvault_xenapi::VdiType::CbtMetadata);
}

//! The CBT audit driven by `drive`: a provider whose change source leaves
//! out a block that did change is caught before the irreversible steps,
//! its restore point is forgotten, and the next backup of the disk is a
//! full whose reason names the audit. A truthful change source passes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cbtvault_blockmap::{BLOCK_SIZE, BlockMap};
use cbtvault_engine::nbd::NbdSource;
use cbtvault_engine::{
    BackupOptions, Changes, DiskRun, DriveContext, Error, NoProgress, PreparedDisk, Provider,
    Result, SharedProgress, drive, lock_disk,
};
use cbtvault_nbd::ConnectOptions;
use cbtvault_nbd::server::{MemoryExport, Server, ServerConfig};
use cbtvault_repo::{BackupMode, InitOptions, Repository, RestorePointRow};
use tokio_util::sync::CancellationToken;

const BLOCKS: u64 = 8;

/// Night `n`'s disk: night 0's with blocks 2 and 5 rewritten from night 1.
fn image(night: u8) -> Vec<u8> {
    let mut data: Vec<u8> = (0..BLOCKS * BLOCK_SIZE)
        .map(|i| ((i / 7) as u8).wrapping_mul(31))
        .collect();
    if night >= 1 {
        for b in [2usize, 5] {
            let at = b * BLOCK_SIZE as usize;
            data[at..at + 100].fill(0xee);
        }
    }
    data
}

/// Serves export `night` as the view, and says `changed` changed.
struct Night {
    socket: std::path::PathBuf,
    export: String,
    changed: Option<Vec<u64>>,
    /// What finish was told: committed or not.
    committed: Arc<Mutex<Vec<bool>>>,
}

impl Provider for Night {
    type View = ();

    fn label(&self) -> String {
        "night".into()
    }

    async fn prepare(&mut self, repo: &Arc<Repository>) -> Result<Vec<PreparedDisk<()>>> {
        let changes = match &self.changed {
            None => Changes::Full { reason: None },
            Some(list) => {
                let mut map = BlockMap::empty(BLOCKS);
                list.iter().for_each(|&b| map.set(b));
                Changes::Blocks {
                    map,
                    origin: "test".into(),
                }
            }
        };
        Ok(vec![PreparedDisk {
            disk: "d0".into(),
            id: "d0".into(),
            locks: lock_disk(repo, "d0").await?,
            changes,
            time: jiff::Timestamp::now(),
            connections: 1,
            vm: None,
            resume: None,
            suspend_as: None,
            view: (),
        }])
    }

    async fn open(&self, _view: &()) -> Result<NbdSource> {
        NbdSource::connect(
            ConnectOptions::unix(self.socket.clone(), self.export.clone()),
            "d0".into(),
        )
        .await
    }

    async fn finish(&mut self, outcomes: Vec<((), Option<RestorePointRow>)>) -> Vec<Result<()>> {
        outcomes
            .into_iter()
            .map(|(_, c)| {
                self.committed.lock().unwrap().push(c.is_some());
                Ok(())
            })
            .collect()
    }
}

struct Setup {
    dir: tempfile::TempDir,
    repo: Arc<Repository>,
    committed: Arc<Mutex<Vec<bool>>>,
}

impl Setup {
    async fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init(&dir.path().join("repo"), &InitOptions::default()).unwrap();
        let server = Server::new(ServerConfig::default());
        for night in 0..2u8 {
            let export = Arc::new(MemoryExport::new(image(night)));
            server.add_export(format!("night{night}"), export);
        }
        let listener = tokio::net::UnixListener::bind(dir.path().join("nbd.sock")).unwrap();
        tokio::spawn(async move { server.serve_unix(listener, CancellationToken::new()).await });
        Setup {
            dir,
            repo: Arc::new(repo),
            committed: Arc::default(),
        }
    }

    /// One backup of night `night`'s view, reporting `changed`.
    async fn night(&self, night: u8, changed: Option<Vec<u64>>, audit: usize) -> DiskRun {
        let mut provider = Night {
            socket: self.dir.path().join("nbd.sock"),
            export: format!("night{night}"),
            changed,
            committed: self.committed.clone(),
        };
        let backup = BackupOptions {
            workers: 1,
            ..Default::default()
        };
        let mut ctx = DriveContext::new(
            backup,
            Arc::new(SharedProgress(Arc::new(NoProgress))),
            CancellationToken::new(),
        );
        ctx.audit_samples = audit;
        let runs = tokio::time::timeout(
            Duration::from_secs(60),
            drive(&mut provider, self.repo.clone(), &ctx),
        )
        .await
        .expect("drive finished within a minute")
        .unwrap();
        runs.into_iter().next().unwrap()
    }

    fn points(&self) -> Vec<RestorePointRow> {
        self.repo.catalogue().restore_points(Some("d0")).unwrap()
    }
}

#[tokio::test]
async fn a_change_the_source_missed_fails_the_audit_and_forces_a_full() {
    let s = Setup::new().await;
    s.night(0, None, 16).await.outcome.unwrap();
    // Blocks 2 and 5 changed; the change source reports only block 2.
    let run = s.night(1, Some(vec![2]), 16).await;
    match &run.outcome {
        Err(Error::CbtAudit {
            offsets, forgotten, ..
        }) => {
            assert_eq!(offsets, &[5 * BLOCK_SIZE]);
            assert!(forgotten);
        }
        other => panic!("expected a failed CBT audit, got {other:?}"),
    }
    assert!(!run.outcome.as_ref().unwrap_err().is_retryable());
    let message = run.outcome.as_ref().unwrap_err().to_string();
    assert!(message.contains(&(5 * BLOCK_SIZE).to_string()), "{message}");
    // Aborted at the hypervisor, and the untrustworthy point is gone.
    assert_eq!(*s.committed.lock().unwrap(), [true, false]);
    assert_eq!(s.points().len(), 1);

    // The next run's change source says nothing changed: it is a full anyway.
    let run = s.night(1, Some(vec![]), 16).await;
    let outcome = run.outcome.unwrap();
    match &outcome.manifest.mode {
        BackupMode::Full { reason: Some(why) } => {
            assert!(why.contains("CBT audit"), "{why}");
            assert!(why.contains(&(5 * BLOCK_SIZE).to_string()), "{why}");
        }
        other => panic!("expected a full naming the audit, got {other:?}"),
    }
    assert!(run.full_reason.is_some_and(|r| r.contains("CBT audit")));
    let mut restored = Vec::new();
    for b in 0..BLOCKS {
        let id = cbtvault_repo::Cursor::new(outcome.manifest.tree(), &s.repo.reader().unwrap())
            .subtree(0, b)
            .unwrap();
        restored.extend(s.repo.reader().unwrap().read(&id).unwrap());
    }
    assert_eq!(restored, image(1), "the full holds the disk as it is");

    // Once that full is finished, incrementals are back.
    let run = s.night(1, Some(vec![]), 16).await;
    assert!(matches!(
        run.outcome.unwrap().manifest.mode,
        BackupMode::Incremental { .. }
    ));
}

#[tokio::test]
async fn a_truthful_change_source_passes_and_no_audit_misses_the_fault() {
    let s = Setup::new().await;
    s.night(0, None, 16).await.outcome.unwrap();
    let run = s.night(1, Some(vec![2, 5]), 16).await;
    assert!(matches!(
        run.outcome.unwrap().manifest.mode,
        BackupMode::Incremental { .. }
    ));

    // With the audit off, the same lie goes unnoticed.
    let s = Setup::new().await;
    s.night(0, None, 0).await.outcome.unwrap();
    s.night(1, Some(vec![2]), 0).await.outcome.unwrap();
    assert_eq!(s.points().len(), 2);
}

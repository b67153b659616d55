//! Retention after each disk's backup.

use std::sync::Arc;

use cbtvault_config::Retention;
use cbtvault_repo::Repository;
use cbtvault_repo::forget::KeepPolicy;

use crate::error::{Error, Result};

/// Forgets the restore points of `disk` that `keep` does not keep; returns
/// how many. The disk's newest restore point always stays.
pub(crate) async fn apply(repo: &Arc<Repository>, disk: &str, keep: Retention) -> Result<usize> {
    let policy = KeepPolicy {
        last: keep.keep_last,
        daily: keep.keep_daily,
        weekly: keep.keep_weekly,
        monthly: keep.keep_monthly,
        ..Default::default()
    };
    if policy.is_empty() {
        return Ok(0);
    }
    let (repo, disk) = (repo.clone(), disk.to_string());
    tokio::task::spawn_blocking(move || -> Result<usize> {
        let points = repo.catalogue().restore_points(Some(&disk))?;
        let doomed: Vec<String> = cbtvault_repo::forget::plan(&points, &policy)
            .into_iter()
            .filter(|d| !d.keep)
            .map(|d| d.id)
            .collect();
        for id in &doomed {
            repo.forget(id)?;
        }
        Ok(doomed.len())
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))?
}

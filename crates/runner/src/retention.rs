//! Retention after each disk's backup.

use std::sync::Arc;

use cbtvault_config::Retention;
use cbtvault_repo::Repository;
use cbtvault_repo::{ForgetSelection, KeepPolicy};

use crate::error::{Error, Result};

/// Forgets the restore points of `disk` that `keep` does not keep; returns
/// how many. The disk's newest restore point always stays.
pub(crate) async fn apply(repo: &Arc<Repository>, disk: &str, keep: Retention) -> Result<usize> {
    let policy = KeepPolicy {
        last: keep.keep_last,
        daily: keep.keep_daily,
        weekly: keep.keep_weekly,
        monthly: keep.keep_monthly,
    };
    if policy.is_empty() {
        return Ok(0);
    }
    let (repo, disk) = (repo.clone(), disk.to_string());
    tokio::task::spawn_blocking(move || -> Result<usize> {
        let selection = ForgetSelection::Policy {
            policy,
            disk: Some(disk),
        };
        let plan = repo.forget_plan(&selection, false)?;
        repo.forget(&plan)?;
        Ok(plan.forgotten().count())
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))?
}

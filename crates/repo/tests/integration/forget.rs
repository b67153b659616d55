//! Forget as a plan and its application, and the locks the repository
//! takes itself for forget, gc and diff.

use std::time::Duration;

use cbtvault_repo::testing::pack::BlobKind;
use cbtvault_repo::{BlobId, Error, ForgetSelection, GcOptions, KeepPolicy, Repository, Result};

use super::common::{commit_disk, data_block, new_repo};

/// Restore points of `disk`, oldest first.
fn ids(repo: &Repository, disk: &str) -> Result<Vec<String>> {
    Ok(repo
        .catalogue()
        .restore_points(Some(disk))?
        .into_iter()
        .map(|rp| rp.id)
        .collect())
}

#[test]
fn a_forget_plan_changes_nothing_and_applying_it_forgets_exactly_what_it_says() -> Result<()> {
    let (_dir, repo) = new_repo(32 << 20);
    let mut writer = repo.pack_writer(None)?;
    let a = writer.add(BlobKind::Data, &data_block(1))?;
    let mut vm1 = Vec::new();
    for second in [0, 10, 20] {
        vm1.push(commit_disk(
            &repo,
            &mut writer,
            "vm1",
            &[a, BlobId::ZERO],
            second,
        )?);
    }
    let vm2 = commit_disk(&repo, &mut writer, "vm2", &[a], 5)?;

    let keep_one = ForgetSelection::Policy {
        policy: KeepPolicy {
            last: Some(1),
            ..Default::default()
        },
        disk: None,
    };
    let plan = repo.forget_plan(&keep_one, false)?;
    let mut going: Vec<&str> = plan.forgotten().map(|d| d.id.as_str()).collect();
    going.sort();
    let mut expected = vec![vm1[0].as_str(), vm1[1].as_str()];
    expected.sort();
    assert_eq!(going, expected);
    assert_eq!(ids(&repo, "vm1")?.len(), 3, "a plan changes nothing");

    assert_eq!(repo.forget(&plan)?, 2);
    assert_eq!(ids(&repo, "vm1")?, vec![vm1[2].clone()]);
    assert_eq!(ids(&repo, "vm2")?, vec![vm2.clone()]);

    // `last 0` would forget everything: each disk's last point stays
    // unless the plan allows it to go.
    let keep_none = ForgetSelection::Policy {
        policy: KeepPolicy {
            last: Some(0),
            ..Default::default()
        },
        disk: Some("vm2".into()),
    };
    let plan = repo.forget_plan(&keep_none, false)?;
    assert_eq!(plan.forgotten().count(), 0);
    let kept: Vec<&str> = plan.kept_as_last().map(|d| d.id.as_str()).collect();
    assert_eq!(kept, [vm2.as_str()]);
    let named = ForgetSelection::Ids(vec![vm2[..8].to_string()]);
    assert_eq!(repo.forget_plan(&named, false)?.forgotten().count(), 0);
    let plan = repo.forget_plan(&named, true)?;
    assert_eq!(repo.forget(&plan)?, 1);
    assert!(ids(&repo, "vm2")?.is_empty());

    let empty = ForgetSelection::Policy {
        policy: KeepPolicy::default(),
        disk: None,
    };
    assert!(matches!(
        repo.forget_plan(&empty, true),
        Err(Error::EmptyRetentionPolicy)
    ));
    Ok(())
}

#[test]
fn gc_runs_beside_a_shared_holder_and_only_repair_keeps_it_out() -> Result<()> {
    let (_dir, repo) = new_repo(32 << 20);
    let held = repo.lock_shared()?;
    repo.collect_garbage(GcOptions::default(), Duration::ZERO)?;
    drop(held);
    let repair = repo.lock_exclusive(Duration::ZERO)?;
    let result = repo.collect_garbage(GcOptions::default(), Duration::ZERO);
    assert!(matches!(result, Err(Error::Locked { .. })), "{result:?}");
    drop(repair);
    repo.collect_garbage(GcOptions::default(), Duration::ZERO)?;
    Ok(())
}

#[test]
fn forget_and_diff_take_the_shared_lock_so_they_never_run_beside_repair() -> Result<()> {
    let (_dir, repo) = new_repo(32 << 20);
    let mut writer = repo.pack_writer(None)?;
    let a = writer.add(BlobKind::Data, &data_block(1))?;
    let first = repo.resolve(&commit_disk(&repo, &mut writer, "vm1", &[a, a], 0)?)?;
    let second = repo.resolve(&commit_disk(
        &repo,
        &mut writer,
        "vm1",
        &[a, BlobId::ZERO],
        1,
    )?)?;
    assert_eq!(repo.diff(&first, &second)?, vec![1..2]);

    let plan = repo.forget_plan(&ForgetSelection::Ids(vec![first.id.clone()]), false)?;
    let repair = repo.lock_exclusive(Duration::ZERO)?;
    // Each waits its bounded time (5 s) for the lock, then says who holds it.
    assert!(matches!(repo.forget(&plan), Err(Error::Locked { .. })));
    assert!(matches!(
        repo.diff(&first, &second),
        Err(Error::Locked { .. })
    ));
    drop(repair);
    assert_eq!(repo.forget(&plan)?, 1);
    Ok(())
}

//! The moves in and out of `quarantine/`, their crash windows (which copy of a state wins),
//! the sweep, and the worker's final-dot check against a move.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use super::*;
use crate::envelope::{Envelope, sample_envelope};
use crate::queue::tests::{names, spool};
use crate::queue::{DeleteOutcome, Loaded};

const BODY: &[u8] = b"Subject: hi\r\n\r\nquarantine me\r\n";
const STATE: &[u8] = br#"{"attempts":2,"next_attempt":1,"last_error":"451 later"}"#;
const NEWER_STATE: &[u8] = br#"{"attempts":3,"next_attempt":9,"last_error":"451 later"}"#;

/// A committed message with a state file; its id.
fn queued(spool: &Spool) -> QueueId {
    let env: Envelope = sample_envelope(&["a@example.com", "b@example.com"]);
    let id = spool.enqueue(&env, BODY).unwrap();
    fs::write(spool.state_path(&id), STATE).unwrap();
    id
}

fn record() -> Record {
    Record::now(
        "queue purge",
        &["--all".to_owned(), "--quarantine".to_owned()],
        Vec::new(),
    )
}

fn q(spool: &Spool, id: &QueueId, suffix: &str) -> PathBuf {
    spool.quarantined_path(id, suffix)
}

/// Quarantine `id` alone; its outcome.
fn quarantine(spool: &Spool, id: &QueueId) -> Option<DeleteOutcome> {
    let msg = spool.load(id).unwrap();
    let out = spool
        .quarantine_selected(vec![msg], &record(), false)
        .unwrap();
    out[0].outcome
}

#[test]
fn quarantine_then_restore_gives_back_the_very_files() {
    let (_d, spool) = spool();
    let id = queued(&spool);
    let message = fs::read(spool.message_path(&id)).unwrap();
    assert_eq!(quarantine(&spool, &id), Some(DeleteOutcome::Deleted));
    assert!(names(&spool.root().join("queue")).is_empty());
    assert_eq!(
        names(&spool.quarantine_dir()),
        [
            id.to_string(),
            format!("{id}.quarantined"),
            format!("{id}.state")
        ]
    );
    assert!(
        spool.list().unwrap().is_empty(),
        "a quarantined message is not queued"
    );

    let listed = spool.quarantined().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].msg.envelope.id, id);
    assert_eq!(listed[0].msg.state.attempts, 2);
    assert_eq!(listed[0].msg.size, BODY.len() as u64);
    let rec = listed[0].record.clone().expect("record");
    assert_eq!(
        (rec.command.as_str(), rec.at_ms),
        ("queue purge", listed[0].at_ms)
    );

    assert_eq!(spool.restore(&id, false).unwrap(), RestoreOutcome::Restored);
    spool.finish_restore().unwrap();
    assert_eq!(fs::read(spool.message_path(&id)).unwrap(), message);
    assert_eq!(fs::read(spool.state_path(&id)).unwrap(), STATE);
    assert!(
        names(&spool.quarantine_dir()).is_empty(),
        "record left behind"
    );
    assert_eq!(
        spool.restore(&id, false).unwrap(),
        RestoreOutcome::NotQuarantined
    );
}

#[test]
fn dry_runs_move_nothing() {
    let (_d, spool) = spool();
    let id = queued(&spool);
    let listed = spool.purge_quarantine(|_| true, &record(), true).unwrap();
    assert_eq!((listed.len(), listed[0].outcome), (1, None));
    assert_eq!(names(&spool.root().join("queue")).len(), 2);
    assert!(names(&spool.quarantine_dir()).is_empty());

    quarantine(&spool, &id);
    let before = names(&spool.quarantine_dir());
    assert_eq!(
        spool.restore(&id, true).unwrap(),
        RestoreOutcome::WouldRestore
    );
    assert_eq!(names(&spool.quarantine_dir()), before);
    assert!(!spool.contains(&id));
}

#[test]
fn restore_refuses_an_id_queued_already_and_moves_nothing() {
    let (_d, spool) = spool();
    let id = queued(&spool);
    let message = fs::read(spool.message_path(&id)).unwrap();
    quarantine(&spool, &id);
    // The same id queued again (a copy put back by hand).
    fs::write(spool.message_path(&id), &message).unwrap();
    assert_eq!(
        spool.restore(&id, false).unwrap(),
        RestoreOutcome::AlreadyQueued
    );
    assert_eq!(
        spool.restore(&id, true).unwrap(),
        RestoreOutcome::AlreadyQueued
    );
    assert_eq!(names(&spool.quarantine_dir()).len(), 3);
    assert!(
        !spool.state_path(&id).exists(),
        "the state moved for a refused id"
    );
}

#[test]
fn rejected_and_planted_files_are_never_restored() {
    use std::os::unix::fs::PermissionsExt as _;
    let (_d, spool) = spool();
    let id = queued(&spool);
    let message = fs::read(spool.message_path(&id)).unwrap();
    fs::remove_file(spool.message_path(&id)).unwrap();
    fs::write(spool.root().join("rejected").join(id.as_str()), &message).unwrap();
    assert_eq!(
        spool.restore(&id, false).unwrap(),
        RestoreOutcome::NotQuarantined
    );

    // In quarantine/ but writable by others: not the relay's, never queued.
    let planted = q(&spool, &id, "");
    fs::write(&planted, &message).unwrap();
    fs::set_permissions(&planted, fs::Permissions::from_mode(0o666)).unwrap();
    assert!(matches!(
        spool.restore(&id, false),
        Err(SpoolError::Untrusted { .. })
    ));
    assert!(!spool.contains(&id));
    assert!(spool.quarantined().unwrap().is_empty());
}

/// Kill -9 of `queue purge --quarantine` between its two renames: the message is in
/// `quarantine/`, its state still in `queue/`.
fn interrupted_quarantine(spool: &Spool) -> QueueId {
    let id = queued(spool);
    fs::rename(spool.message_path(&id), q(spool, &id, "")).unwrap();
    id
}

#[test]
fn crash_between_the_renames_of_a_quarantine_keeps_the_state_with_the_message() {
    let (_d, spool) = spool();
    let id = interrupted_quarantine(&spool);
    let report = spool.recover().unwrap();
    assert_eq!((report.queued, report.orphans_removed), (0, 0));
    assert!(report.rejected.is_empty());
    assert!(
        names(&spool.root().join("queue")).is_empty(),
        "nothing to deliver"
    );
    assert_eq!(fs::read(q(&spool, &id, STATE_SUFFIX)).unwrap(), STATE);
    assert_eq!(spool.restore(&id, false).unwrap(), RestoreOutcome::Restored);
    assert_eq!(spool.load(&id).unwrap().state.attempts, 2);
}

#[test]
fn restore_before_any_recovery_reunites_the_message_with_its_state() {
    let (_d, spool) = spool();
    let id = interrupted_quarantine(&spool);
    assert!(spool.list().unwrap().is_empty());
    assert_eq!(spool.restore(&id, false).unwrap(), RestoreOutcome::Restored);
    assert_eq!(fs::read(spool.state_path(&id)).unwrap(), STATE);
    assert!(names(&spool.quarantine_dir()).is_empty());
}

#[test]
fn crash_between_the_renames_of_a_restore_leaves_the_message_quarantined() {
    let (_d, spool) = spool();
    let id = queued(&spool);
    quarantine(&spool, &id);
    // The state went back first; the message did not follow.
    fs::rename(q(&spool, &id, STATE_SUFFIX), spool.state_path(&id)).unwrap();
    spool.recover().unwrap();
    assert!(
        spool.list().unwrap().is_empty(),
        "a quarantined message was queued"
    );
    assert_eq!(fs::read(q(&spool, &id, STATE_SUFFIX)).unwrap(), STATE);
    assert_eq!(spool.quarantined().unwrap().len(), 1);
}

#[test]
fn a_state_in_both_places_the_queued_one_wins_as_the_newer() {
    let (_d, spool) = spool();
    let id = queued(&spool);
    quarantine(&spool, &id);
    // A worker wrote a state just after the quarantine moved the old one.
    fs::write(spool.state_path(&id), NEWER_STATE).unwrap();
    let (_d2, other) = spool_copy(&spool);
    spool.recover().unwrap();
    assert_eq!(fs::read(q(&spool, &id, STATE_SUFFIX)).unwrap(), NEWER_STATE);
    assert!(!spool.state_path(&id).exists());
    // Without a recovery first, restore keeps the newer one too.
    assert_eq!(other.restore(&id, false).unwrap(), RestoreOutcome::Restored);
    assert_eq!(fs::read(other.state_path(&id)).unwrap(), NEWER_STATE);
    assert!(names(&other.quarantine_dir()).is_empty());
}

/// A copy of `spool`'s files in a new spool (to try two paths from one state).
fn spool_copy(spool: &Spool) -> (tempfile::TempDir, Spool) {
    let (dir, copy) = self::spool();
    for sub in ["queue", DIR] {
        for name in names(&spool.root().join(sub)) {
            fs::copy(
                spool.root().join(sub).join(&name),
                copy.root().join(sub).join(&name),
            )
            .unwrap();
        }
    }
    (dir, copy)
}

#[test]
fn a_state_left_in_quarantine_for_a_queued_message_goes_back() {
    let (_d, spool) = spool();
    let id = queued(&spool);
    // A file system that kept the state's rename but not the message's.
    fs::rename(spool.state_path(&id), q(&spool, &id, STATE_SUFFIX)).unwrap();
    let report = spool.recover().unwrap();
    assert_eq!(report.queued, 1);
    assert_eq!(fs::read(spool.state_path(&id)).unwrap(), STATE);
    assert!(names(&spool.quarantine_dir()).is_empty());
}

#[test]
fn sweep_deletes_what_is_older_than_keep_and_leftovers_only() {
    let (_d, spool) = spool();
    let old = queued(&spool);
    let young = queued(&spool);
    quarantine(&spool, &old);
    quarantine(&spool, &young);
    let at = |id| spool.read_record(id).unwrap().at_ms;
    // Make `old` an hour older.
    let mut rec = spool.read_record(&old).unwrap();
    rec.at_ms -= 3_600_000;
    spool.write_record(&old, &rec).unwrap();
    // A record whose message is gone: a leftover.
    let gone = QueueId::generate();
    spool.write_record(&gone, &record()).unwrap();
    let keep = Duration::from_secs(1800);
    let now = at(&young) + 1;
    let sweep = spool.sweep_quarantine(keep, now).unwrap();
    assert_eq!(sweep.expired, std::slice::from_ref(&old));
    assert_eq!(sweep.leftovers, 1);
    assert_eq!(sweep.next_ms, Some(at(&young) + 1_800_000));
    assert_eq!(
        names(&spool.quarantine_dir()).len(),
        3,
        "young's three files stay"
    );
    assert_eq!(
        spool.restore(&old, false).unwrap(),
        RestoreOutcome::NotQuarantined
    );
    assert_eq!(
        spool.restore(&young, false).unwrap(),
        RestoreOutcome::Restored
    );
}

#[test]
fn a_worker_never_sends_a_quarantined_message_and_the_operator_hears_of_one_in_flight() {
    let (_d, spool) = spool();
    // Moved first: the worker's final-dot check sees it is no longer queue/ID.
    let id = queued(&spool);
    let Loaded { lock, .. } = spool.load_with_body(&id, 1 << 20).unwrap();
    assert_eq!(quarantine(&spool, &id), Some(DeleteOutcome::Deleted));
    assert!(!lock.begin_final_dot().unwrap());
    drop(lock);
    // Restored: the same file is queue/ID again, and may be sent.
    assert_eq!(spool.restore(&id, false).unwrap(), RestoreOutcome::Restored);
    let Loaded { lock, .. } = spool.load_with_body(&id, 1 << 20).unwrap();
    // The worker sends first: the quarantine says it may have been delivered.
    assert!(lock.begin_final_dot().unwrap());
    assert_eq!(
        quarantine(&spool, &id),
        Some(DeleteOutcome::DeletedMaybeSent)
    );
    drop(lock);
    assert_eq!(spool.quarantined().unwrap().len(), 1);
}

#[test]
fn restore_requests_are_merged_and_come_after_the_removal_notices_read_with_them() {
    use crate::queue::{RemovedHow, Request};
    let (_d, spool) = spool();
    let (a, b) = (QueueId::generate(), QueueId::generate());
    spool.request_restore(&[b.clone(), a.clone()]).unwrap();
    spool.request_restore(std::slice::from_ref(&a)).unwrap();
    spool
        .notify_removed(RemovedHow::Quarantine, std::slice::from_ref(&a))
        .unwrap();
    let requests = spool.take_requests(&Default::default()).unwrap();
    assert_eq!(requests.len(), 2, "{requests:?}");
    match &requests[0] {
        Request::Removed(list) => {
            assert_eq!(list.len(), 1);
            assert_eq!((&list[0].id, list[0].how), (&a, RemovedHow::Quarantine));
        }
        other => panic!("not the notice: {other:?}"),
    }
    let mut both = vec![a, b];
    both.sort();
    assert_eq!(requests[1], Request::Restore(both));
    assert!(names(&spool.root().join("control")).is_empty());
}

#[test]
fn a_quarantine_directory_removed_by_hand_is_made_again_and_the_message_moves_whole() {
    // The sibling of free/ removed by hand (recycle.rs): here the move makes quarantine/
    // again first, so the rename's ENOENT can only mean the message is gone.
    let (_d, spool) = spool();
    let id = queued(&spool);
    fs::remove_dir_all(spool.root().join("quarantine")).unwrap();
    assert_eq!(quarantine(&spool, &id), Some(DeleteOutcome::Deleted));
    assert!(!spool.message_path(&id).exists());
    assert!(!spool.state_path(&id).exists());
    assert!(!fs::read(q(&spool, &id, "")).unwrap().is_empty());
    assert_eq!(fs::read(q(&spool, &id, STATE_SUFFIX)).unwrap(), STATE);
}

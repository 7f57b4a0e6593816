//! Loopback tests of what the running relay records after the `250`: removals made by
//! `portcullis queue delete|purge` (another process) reach the relay through a removal notice
//! in the spool and are recorded once each, also when the relay was stopped at the time. The
//! relay's upstream is a closed port, so accepted mail stays queued.

mod common;

use std::time::Duration;

use common::*;

/// The number of files in the spool's `control/`.
fn control_files(relay: &Relay) -> usize {
    std::fs::read_dir(relay.spool.join("control"))
        .unwrap()
        .count()
}

#[test]
fn delete_and_purge_are_recorded_by_the_running_relay_once_each() {
    let relay = example_com_relay("");
    let ids = send_from(&relay, &["a@example.org", "b@example.org", "c@example.org"]);
    let out = relay.command(&["queue", "delete", &ids[0]]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let deleted = [("queue_id", ids[0].as_str()), ("how", "delete")];
    assert_log_fields(&relay, &deleted);

    let out = relay.command(&["queue", "purge", "--from", "b@example.org"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let purged = [("queue_id", ids[1].as_str()), ("how", "purge")];
    assert_log_fields(&relay, &purged);
    // Sync point: a later notice is recorded, so the control loop has run past both.
    let out = relay.command(&["queue", "delete", &ids[2]]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_log_fields(&relay, &[("queue_id", ids[2].as_str()), ("how", "delete")]);
    let log = relay.log();
    assert_eq!(count_log_fields(&log, &deleted), 1, "{log}");
    assert_eq!(count_log_fields(&log, &purged), 1, "{log}");
    assert!(wait_until(Duration::from_secs(5), || control_files(&relay) == 0));
}

#[test]
fn a_removal_made_while_the_relay_is_stopped_is_recorded_at_its_next_start() {
    let mut relay = example_com_relay("");
    let ids = send_from(&relay, &["a@example.org"]);
    relay.stop();
    let out = relay.command(&["queue", "delete", &ids[0]]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(control_files(&relay), 1, "the notice waits in control/");

    relay.restart();
    assert_log_fields(&relay, &[("queue_id", ids[0].as_str()), ("how", "delete")]);
    assert!(wait_until(Duration::from_secs(5), || control_files(&relay) == 0));
}

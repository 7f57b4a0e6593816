use std::fs;

use super::report::{self, SHOW_HEADER_LIMIT};
use super::*;
use crate::envelope::{RcptStatus, ReversePath};

use crate::envelope::sample_envelope as envelope;

const BODY: &[u8] = b"Subject: hi\r\nFrom: a@example.org\r\n\r\nbody line\r\n.leading dot\r\n";

/// A fresh spool in a temporary directory (kept alive by the returned guard).
pub(super) fn spool() -> (tempfile::TempDir, Spool) {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("spool")).unwrap();
    (dir, spool)
}

pub(super) fn commit(spool: &Spool, env: &Envelope, body: &[u8]) -> QueueId {
    let mut w = spool.create(env).unwrap();
    for chunk in body.chunks(7) {
        w.write(chunk).unwrap();
    }
    assert_eq!(w.written(), body.len() as u64);
    w.commit().unwrap()
}

/// The file names in `dir`, sorted.
pub(super) fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn open_creates_private_directories() {
    use std::os::unix::fs::PermissionsExt;
    let (_d, spool) = spool();
    for sub in ["tmp", "queue", "rejected", "control", "free", "quarantine"] {
        let meta = fs::metadata(spool.root().join(sub)).unwrap();
        assert!(meta.is_dir());
        assert_eq!(meta.permissions().mode() & 0o777, 0o700, "{sub}");
    }
    assert!(
        names(&spool.root().join("tmp")).is_empty(),
        "probe left behind"
    );
}

#[test]
fn commit_then_load_round_trips_bytes_and_envelope() {
    let (_d, spool) = spool();
    let env = envelope(&["a@example.com", "b@example.com"]);
    let id = commit(&spool, &env, BODY);
    assert_eq!(id, env.id);
    let msg = spool.load(&id).unwrap();
    assert_eq!(msg.envelope, env);
    assert_eq!(msg.size, BODY.len() as u64);
    assert_eq!(msg.state, DeliveryState::fresh(env.received_at));
    assert_eq!(msg.path, spool.root().join("queue").join(id.as_str()));
    assert_eq!(spool.read_message(&id).unwrap(), BODY);

    let (mut file, offset) = spool.open_message(&id).unwrap();
    let mut streamed = Vec::new();
    file.read_to_end(&mut streamed).unwrap();
    assert_eq!(streamed, BODY);
    assert_eq!(
        offset + BODY.len() as u64,
        fs::metadata(&msg.path).unwrap().len()
    );
    assert!(names(&spool.root().join("tmp")).is_empty());

    let raw = fs::read(&msg.path).unwrap();
    assert!(raw.starts_with(MAGIC));
}

#[test]
fn dropped_or_aborted_writer_leaves_nothing() {
    let (_d, spool) = spool();
    let mut w = spool.create(&envelope(&["a@example.com"])).unwrap();
    w.write(BODY).unwrap();
    drop(w);
    let w = spool.create(&envelope(&["a@example.com"])).unwrap();
    w.abort();
    assert!(names(&spool.root().join("tmp")).is_empty());
    assert!(names(&spool.root().join("queue")).is_empty());
    assert!(spool.list().unwrap().is_empty());
}

#[test]
fn uncommitted_message_is_invisible_to_list_and_load() {
    let (_d, spool) = spool();
    let env = envelope(&["a@example.com"]);
    let mut w = spool.create(&env).unwrap();
    w.write(BODY).unwrap();
    assert!(spool.list().unwrap().is_empty());
    assert!(matches!(spool.load(&env.id), Err(SpoolError::NotFound(_))));
    w.commit().unwrap();
    assert_eq!(spool.list().unwrap().len(), 1);
}

#[test]
fn list_is_sorted_and_skips_unparseable_files() {
    let (_d, spool) = spool();
    let a = commit(&spool, &envelope(&["a@example.com"]), BODY);
    std::thread::sleep(std::time::Duration::from_millis(2));
    let b = commit(&spool, &envelope(&["b@example.com"]), b"x\r\n");
    let bad = QueueId::generate();
    fs::write(spool.root().join("queue").join(bad.as_str()), b"garbage").unwrap();
    fs::write(spool.root().join("tmp").join("leftover"), b"junk").unwrap();
    let ids: Vec<QueueId> = spool
        .list()
        .unwrap()
        .into_iter()
        .map(|m| m.envelope.id)
        .collect();
    assert_eq!(ids, vec![a, b]);
}

#[test]
fn a_list_read_on_several_threads_keeps_the_order_and_leaves_out_the_gone_and_unreadable() {
    let (_d, spool) = spool();
    let mut ids: Vec<QueueId> = (0..9)
        .map(|i| commit(&spool, &envelope(&[&format!("r{i}@example.com")]), BODY))
        .collect();
    ids.sort();
    let gone = QueueId::generate();
    let bad = QueueId::generate();
    fs::write(spool.root().join("queue").join(bad.as_str()), b"garbage").unwrap();
    let mut asked = ids.clone();
    asked.insert(3, gone);
    asked.insert(7, bad);
    // Two messages a thread: as many threads as the machine has, up to LIST_THREADS.
    let read = spool.load_many_split(
        &asked,
        |id| spool.load(id),
        |m| (m.envelope.id, m.envelope.recipients.len()),
        2,
    );
    let expected: Vec<(QueueId, usize)> = ids.into_iter().map(|id| (id, 1)).collect();
    assert_eq!(read, expected);
}

#[test]
fn report_map_reads_the_states_the_listing_saw_and_takes_the_others_as_fresh() {
    let (_d, spool) = spool();
    let ids: Vec<QueueId> = (0..6)
        .map(|i| commit(&spool, &envelope(&[&format!("r{i}@example.com")]), BODY))
        .collect();
    let mut attempted = DeliveryState::fresh(7);
    attempted.attempts = 3;
    attempted.last_error = Some("451 4.3.0 try later".into());
    spool.write_state(&ids[1], &attempted).unwrap();
    let mut held = DeliveryState::fresh(9);
    held.hold(1_700_000_000, "account contained");
    spool.write_state(&ids[4], &held).unwrap();
    // A state file whose message is gone, and a stray name: neither is a message.
    fs::write(
        spool.root().join("queue").join("0000000000000000.state"),
        b"{}",
    )
    .unwrap();
    fs::write(spool.root().join("queue").join("notes.txt"), b"x").unwrap();

    let row = |m: QueuedMessage| (m.envelope.id.clone(), m.size, m.state);
    let report = spool.report_map(row).unwrap();
    assert_eq!(report, spool.list_map(row).unwrap());
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(
        report.iter().map(|r| r.0.clone()).collect::<Vec<_>>(),
        sorted
    );
    let state_of = |id: &QueueId| &report.iter().find(|r| &r.0 == id).unwrap().2;
    assert_eq!(state_of(&ids[1]), &attempted);
    assert!(state_of(&ids[4]).hold.is_some());
    assert_eq!(state_of(&ids[0]).attempts, 0);
    // The listing decides: told there is no state, the load does not look for one.
    let (unlooked, _) = spool.load_open_as(&ids[1], false).unwrap();
    assert_eq!(
        unlooked.state,
        DeliveryState::fresh(unlooked.envelope.received_at)
    );
}

#[test]
fn create_refuses_an_id_already_committed() {
    let (_d, spool) = spool();
    let env = envelope(&["a@example.com"]);
    commit(&spool, &env, BODY);
    let err = spool.create(&env).unwrap_err();
    assert!(matches!(err, SpoolError::AlreadyExists(_)) && err.is_temporary());
    assert_eq!(spool.read_message(&env.id).unwrap(), BODY);
}

#[test]
fn commit_never_overwrites_a_message_committed_meanwhile() {
    let (_d, spool) = spool();
    let env = envelope(&["a@example.com"]);
    let mut late = spool.create(&env).unwrap();
    late.write(b"the second writer\r\n").unwrap();
    // Another writer (e.g. a second relay on the same spool) commits the same id meanwhile.
    let theirs = spool.root().join("queue").join(env.id.as_str());
    fs::write(&theirs, b"committed by someone else").unwrap();
    let err = late.commit().unwrap_err();
    assert!(matches!(err, SpoolError::AlreadyExists(_)), "{err}");
    assert_eq!(fs::read(&theirs).unwrap(), b"committed by someone else");
    assert!(names(&spool.root().join("tmp")).is_empty());
}

#[test]
fn write_state_then_load_round_trips() {
    let (_d, spool) = spool();
    let env = envelope(&["a@example.com", "b@example.com"]);
    let id = commit(&spool, &env, BODY);
    let state = DeliveryState {
        attempts: 2,
        next_attempt: 1_700_000_600,
        last_error: Some("451 4.3.0 try later".into()),
        recipients: vec![RcptStatus::Delivered, RcptStatus::Pending],
        history: vec![Attempt {
            at: 1_700_000_100,
            upstream: Some("exchange".into()),
            outcome: "451 4.3.0 try later".into(),
        }],
        hold: None,
        held_for: 0,
    };
    spool.write_state(&id, &state).unwrap();
    spool.write_state(&id, &state).unwrap(); // replacing works too
    let msg = spool.load(&id).unwrap();
    assert_eq!(msg.state, state);
    let pending: Vec<String> = msg.pending().map(|a| a.to_string()).collect();
    assert_eq!(pending, ["b@example.com"]);
    assert!(names(&spool.root().join("tmp")).is_empty());
    assert_eq!(
        names(&spool.root().join("queue")),
        [id.to_string(), format!("{id}.state")]
    );
}

#[test]
fn write_state_for_a_missing_message_is_not_found() {
    let (_d, spool) = spool();
    let id = QueueId::generate();
    let err = spool
        .write_state(&id, &DeliveryState::fresh(0))
        .unwrap_err();
    assert!(matches!(err, SpoolError::NotFound(_)));
    assert!(names(&spool.root().join("queue")).is_empty());
    assert!(names(&spool.root().join("tmp")).is_empty());
}

#[test]
fn corrupt_state_is_treated_as_fresh_by_load() {
    let (_d, spool) = spool();
    let env = envelope(&["a@example.com"]);
    let id = commit(&spool, &env, BODY);
    fs::write(
        spool.root().join("queue").join(format!("{id}.state")),
        b"{not json",
    )
    .unwrap();
    assert_eq!(
        spool.load(&id).unwrap().state,
        DeliveryState::fresh(env.received_at)
    );
}

#[test]
fn remove_deletes_message_and_state() {
    let (_d, spool) = spool();
    let id = commit(&spool, &envelope(&["a@example.com"]), BODY);
    spool.write_state(&id, &DeliveryState::fresh(5)).unwrap();
    spool.remove(&id).unwrap();
    assert!(names(&spool.root().join("queue")).is_empty());
    assert!(matches!(spool.remove(&id), Err(SpoolError::NotFound(_))));
    assert!(matches!(spool.load(&id), Err(SpoolError::NotFound(_))));
    assert!(matches!(
        spool.read_message(&id),
        Err(SpoolError::NotFound(_))
    ));
}

#[test]
fn ids_from_user_input_cannot_escape_the_spool() {
    for bad in [
        "../../etc/passwd",
        "../queue/AAAAAAAAAAAAAAAA",
        "AAAAAAAAAAAAAAA/",
        ".",
    ] {
        assert!(bad.parse::<QueueId>().is_err(), "{bad:?}");
    }
    // Lower case parses to the canonical upper-case id, which names a file inside queue/.
    let (_d, spool) = spool();
    let id: QueueId = "0123456789abcdef".parse().unwrap();
    assert!(matches!(spool.load(&id), Err(SpoolError::NotFound(_))));
}

/// The files recovery must reject or remove, beside `good`.
struct Planted {
    garbage: QueueId,
    truncated: QueueId,
    renamed: QueueId,
}

/// Garbage under a valid id, a stray name, a truncated header, a wrong id inside; an orphan
/// state, a corrupt state of `good`, leftovers in tmp/.
fn plant_garbage(spool: &Spool, good: &QueueId) -> Planted {
    let queue = spool.root().join("queue");
    let garbage = QueueId::generate();
    fs::write(queue.join(garbage.as_str()), b"not a spool file").unwrap();
    fs::write(queue.join("README"), b"hello").unwrap();
    let truncated = QueueId::generate();
    fs::write(
        queue.join(truncated.as_str()),
        b"PORTCULLIS-SPOOL 1\n{\"id\":\"",
    )
    .unwrap();
    let renamed = QueueId::generate();
    fs::copy(queue.join(good.as_str()), queue.join(renamed.as_str())).unwrap();
    let orphan = QueueId::generate();
    fs::write(queue.join(format!("{orphan}.state")), b"{}").unwrap();
    fs::write(queue.join(format!("{good}.state")), b"{broken").unwrap();
    fs::write(spool.root().join("tmp").join("leftover"), b"x").unwrap();
    fs::create_dir(spool.root().join("tmp").join("somedir")).unwrap();

    Planted {
        garbage,
        truncated,
        renamed,
    }
}

#[test]
fn recovery_cleans_tmp_rejects_garbage_and_keeps_good_messages() {
    let (_d, spool) = spool();
    let queue = spool.root().join("queue");
    let rejected = spool.root().join("rejected");
    let good = commit(&spool, &envelope(&["a@example.com"]), BODY);
    let with_state = commit(&spool, &envelope(&["b@example.com"]), BODY);
    spool
        .write_state(&with_state, &DeliveryState::fresh(9))
        .unwrap();

    let Planted {
        garbage,
        truncated,
        renamed,
    } = plant_garbage(&spool, &good);

    let report = spool.recover().unwrap();
    assert_eq!(report.queued, 2);
    assert_eq!(report.tmp_removed, 2);
    assert_eq!(report.orphans_removed, 1);
    assert_eq!(report.rejected.len(), 5, "{report:?}");
    assert!(names(&spool.root().join("tmp")).is_empty());

    let mut expected_queue = vec![
        good.to_string(),
        with_state.to_string(),
        format!("{with_state}.state"),
    ];
    expected_queue.sort();
    assert_eq!(names(&queue), expected_queue);
    // Rejected, not deleted, and intact.
    assert_eq!(
        fs::read(rejected.join(garbage.as_str())).unwrap(),
        b"not a spool file"
    );
    assert_eq!(fs::read(rejected.join("README")).unwrap(), b"hello");
    assert!(rejected.join(truncated.as_str()).exists());
    assert!(rejected.join(renamed.as_str()).exists());
    assert_eq!(
        fs::read(rejected.join(format!("{good}.state"))).unwrap(),
        b"{broken"
    );

    // The good message stays queued with a fresh state; the other keeps its state.
    let msgs = spool.list().unwrap();
    assert_eq!(msgs.len(), 2);
    assert_eq!(spool.load(&good).unwrap().state.next_attempt, 1_700_000_000);
    assert_eq!(spool.load(&with_state).unwrap().state.next_attempt, 9);
    assert_eq!(spool.read_message(&good).unwrap(), BODY);

    // A second run finds nothing to do.
    let again = spool.recover().unwrap();
    assert_eq!(
        again,
        RecoveryReport {
            queued: 2,
            ..RecoveryReport::default()
        }
    );
}

#[test]
fn recovery_rejects_the_state_of_a_rejected_message_and_avoids_name_clashes() {
    let (_d, spool) = spool();
    let queue = spool.root().join("queue");
    let rejected = spool.root().join("rejected");
    let id = QueueId::generate();
    fs::write(queue.join(id.as_str()), b"bad").unwrap();
    fs::write(queue.join(format!("{id}.state")), b"{}").unwrap();
    fs::write(rejected.join(id.as_str()), b"earlier").unwrap();
    let report = spool.recover().unwrap();
    assert_eq!(report.rejected.len(), 2);
    assert_eq!(report.orphans_removed, 0);
    assert_eq!(fs::read(rejected.join(id.as_str())).unwrap(), b"earlier");
    assert_eq!(fs::read(rejected.join(format!("{id}.1"))).unwrap(), b"bad");
    assert!(rejected.join(format!("{id}.state")).exists());
}

/// Regression: a crash after the data fsync but before the rename leaves a complete file in
/// tmp/ that was never acknowledged; recovery must remove it and must not queue it.
#[test]
fn crash_between_fsync_and_rename_is_cleaned_up_by_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("spool");
    let committed;
    {
        let spool = Spool::open(&root).unwrap();
        committed = commit(&spool, &envelope(&["a@example.com"]), BODY);
        // Simulate the crash: a complete, fsynced message file still named tmp/ID, exactly
        // what a writer leaves when the process dies between sync_data and rename.
        let env = envelope(&["b@example.com"]);
        let mut bytes = MAGIC.to_vec();
        bytes.extend(serde_json::to_vec(&env).unwrap());
        bytes.push(b'\n');
        bytes.extend(BODY);
        let tmp_path = root.join("tmp").join(env.id.as_str());
        let mut file = fs::File::create(&tmp_path).unwrap();
        file.write_all(&bytes).unwrap();
        file.sync_data().unwrap();
    }
    // "Restart".
    let spool = Spool::open(&root).unwrap();
    let report = spool.recover().unwrap();
    assert_eq!(report.tmp_removed, 1);
    assert_eq!(report.queued, 1);
    let ids: Vec<QueueId> = spool
        .list()
        .unwrap()
        .into_iter()
        .map(|m| m.envelope.id)
        .collect();
    assert_eq!(ids, vec![committed]);
    assert!(names(&root.join("tmp")).is_empty());
}

#[test]
fn free_space_is_positive() {
    let (_d, spool) = spool();
    assert!(spool.free_space().unwrap() > 0);
}

#[test]
fn error_classes() {
    let io = SpoolError::Io {
        op: "fsync",
        path: "/x".into(),
        source: io::Error::other("boom"),
    };
    assert!(io.is_temporary());
    assert!(io.to_string().contains("fsync"));
    assert!(!SpoolError::NotFound(QueueId::generate()).is_temporary());
    assert!(!SpoolError::corrupt(Path::new("/x"), "bad").is_temporary());
}

// ---- report ----

fn sample_messages() -> Vec<QueuedMessage> {
    let mut a = envelope(&["a@example.com", "b@example.com"]);
    a.mail_from = ReversePath::Null;
    a.auth_user = Some("alice".into());
    let b = envelope(&["c@example.com"]);
    vec![
        QueuedMessage {
            path: PathBuf::from("/spool/queue").join(a.id.as_str()),
            state: DeliveryState {
                attempts: 3,
                next_attempt: 1_700_000_900,
                last_error: Some("451 4.4.1 no answer\r\nsecond line".into()),
                recipients: vec![RcptStatus::Delivered, RcptStatus::Pending],
                history: vec![Attempt {
                    at: 1_700_000_050,
                    upstream: Some("exchange".into()),
                    outcome: "451 4.4.1 no answer".into(),
                }],
                hold: None,
                held_for: 0,
            },
            size: 1234,
            envelope: a,
        },
        QueuedMessage {
            path: PathBuf::from("/spool/queue").join(b.id.as_str()),
            state: DeliveryState::fresh(b.received_at),
            size: 10,
            envelope: b,
        },
    ]
}

#[test]
fn table_has_header_and_one_row_per_message() {
    let msgs = sample_messages();
    let now = 1_700_000_000 + 3 * 3600 + 5;
    let table = report::list_table(&msgs, now);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("ID ") && lines[0].contains("LAST ERROR"));
    assert!(lines[1].starts_with(msgs[0].envelope.id.as_str()));
    assert!(lines[2].starts_with(msgs[1].envelope.id.as_str()));
    let cols: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        &cols[1..7],
        ["3h", "1234", "<>", "1", "3", "2023-11-14T22:28:20Z"]
    );
    assert!(lines[1].contains("451 4.4.1 no answer??second line"));
    assert_eq!(
        lines[2].split_whitespace().nth(3),
        Some("sender@example.org")
    );

    let empty = report::list_table(&[], now);
    assert_eq!(empty.lines().count(), 1);
    assert!(empty.starts_with("ID "));
}

#[test]
fn human_ages() {
    for (secs, text) in [
        (0, "0s"),
        (45, "45s"),
        (720, "12m"),
        (3 * 3600, "3h"),
        (2 * 86400 + 5, "2d"),
    ] {
        assert_eq!(report::human_age(secs), text);
    }
    assert_eq!(report::rfc3339(0), "1970-01-01T00:00:00Z");
    assert_eq!(report::rfc3339(u64::MAX), u64::MAX.to_string());
}

#[test]
fn json_lines_parse_and_have_the_contract_keys() {
    let msgs = sample_messages();
    let out = report::list_json(&msgs, 1_700_000_100);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2);
    let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    for key in [
        "id",
        "age_secs",
        "size",
        "from",
        "rcpts",
        "attempts",
        "next_attempt",
        "last_error",
        "received_at",
        "listener",
        "client_ip",
    ] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    assert_eq!(v["id"], msgs[0].envelope.id.as_str());
    assert_eq!(v["age_secs"], 100);
    assert_eq!(v["from"], "<>");
    assert_eq!(v["rcpts"], serde_json::json!(["b@example.com"]));
    assert_eq!(v["next_attempt"], "2023-11-14T22:28:20Z");
    assert_eq!(v["received_at"], "2023-11-14T22:13:20Z");
    assert_eq!(v["client_ip"], "192.0.2.7");
    let w: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
    assert!(w["last_error"].is_null());
    assert_eq!(report::list_json(&[], 0), "");
}

#[test]
fn show_prints_envelope_state_and_headers_only() {
    let msgs = sample_messages();
    let text = report::show(&msgs[0], BODY);
    for needle in [
        msgs[0].envelope.id.as_str(),
        "192.0.2.7:40000",
        "client.example",
        "TLSv1.3",
        "alice",
        "a@example.com  delivered",
        "b@example.com  pending",
        "attempts:     3",
        "exchange",
        "Subject: hi",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    assert!(!text.contains("body line"), "{text}");
    assert!(!text.contains("held"), "not held: {text}");

    let mut held = msgs[0].clone();
    held.state.hold(1_700_000_000, "account contained");
    let text = report::show(&held, BODY);
    assert!(
        text.contains("  held:         since 2023-11-14T22:13:20Z (account contained)"),
        "{text}"
    );

    let huge = vec![b'X'; SHOW_HEADER_LIMIT + 10];
    let text = report::show(&msgs[1], &huge);
    assert!(text.contains("truncated"));
    assert!(text.len() < SHOW_HEADER_LIMIT + 4096);
}

#[test]
fn symlinks_in_queue_are_not_followed() {
    let (d, spool) = spool();
    let outside = d.path().join("secret");
    fs::write(&outside, b"secret").unwrap();
    let id = QueueId::generate();
    std::os::unix::fs::symlink(&outside, spool.root().join("queue").join(id.as_str())).unwrap();
    assert!(spool.read_message(&id).is_err());
    assert!(spool.list().unwrap().is_empty());
    let report = spool.recover().unwrap();
    assert_eq!(report.rejected.len(), 1);
    assert_eq!(fs::read(&outside).unwrap(), b"secret");
}

fn from(env: Envelope, sender: &str) -> Envelope {
    Envelope {
        mail_from: if sender == "<>" {
            ReversePath::Null
        } else {
            ReversePath::Address(sender.parse().unwrap())
        },
        ..env
    }
}

#[test]
fn hold_and_release_requests_follow_the_merged_retry_in_the_order_asked() {
    let (_d, spool) = spool();
    let (a, b, c) = (
        QueueId::generate(),
        QueueId::generate(),
        QueueId::generate(),
    );
    spool.request_hold(&b, false).unwrap();
    spool.request_hold(&a, true).unwrap();
    spool
        .request_retry(&RetryTarget::Ids(vec![b.clone()]))
        .unwrap();
    let control = spool.root().join("control");
    fs::write(control.join("hold.not-an-id"), b"").unwrap();
    // An earlier version's request: taken before the numbered ones, which came after it.
    fs::write(control.join(format!("release.{c}")), b"").unwrap();
    spool.request_hold(&c, true).unwrap();
    let requests = spool.take_requests(&Default::default()).unwrap();
    let Some(Request::Holds { files, .. }) = requests.get(1) else {
        panic!("no holds: {requests:?}");
    };
    assert_eq!(files.len(), 3, "the numbered files, left in control/");
    assert_eq!(
        requests,
        [
            Request::Retry(RetryTarget::Ids(vec![b.clone()])),
            Request::Holds {
                asks: vec![(c.clone(), false), (b, false), (a, true), (c, true)],
                files: files.clone()
            },
        ]
    );
    // The hold files stay until their holds are recorded; taken already, they are not read
    // again; finished, they are gone.
    assert_eq!(names(&control).len(), 3);
    let applied: std::collections::HashSet<_> = files.iter().map(|(f, _)| f.clone()).collect();
    assert!(spool.take_requests(&applied).unwrap().is_empty());
    spool
        .finish_holds(&files.iter().map(|(f, _)| f.clone()).collect::<Vec<_>>())
        .unwrap();
    assert!(names(&control).is_empty());
}

#[test]
fn retry_requests_are_merged_consumed_once_and_junk_is_removed() {
    let (_d, spool) = spool();
    let control = spool.root().join("control");
    let (a, b) = (QueueId::generate(), QueueId::generate());
    spool
        .request_retry(&RetryTarget::Ids(vec![b.clone(), a.clone()]))
        .unwrap();
    spool
        .request_retry(&RetryTarget::Ids(vec![a.clone()]))
        .unwrap();
    assert_eq!(
        names(&control),
        [format!("retry.{a}"), format!("retry.{b}")]
    );
    assert!(names(&spool.root().join("tmp")).is_empty());
    fs::write(control.join("retry.not-an-id"), b"").unwrap();
    fs::write(control.join("stray"), b"x").unwrap();

    let mut want = vec![a.clone(), b.clone()];
    want.sort();
    assert_eq!(
        spool.take_requests(&Default::default()).unwrap(),
        [Request::Retry(RetryTarget::Ids(want))]
    );
    assert!(names(&control).is_empty(), "requests and junk are consumed");
    assert!(spool.take_requests(&Default::default()).unwrap().is_empty());

    spool.request_retry(&RetryTarget::Ids(vec![a])).unwrap();
    spool.request_retry(&RetryTarget::All).unwrap();
    assert_eq!(
        spool.take_requests(&Default::default()).unwrap(),
        [Request::Retry(RetryTarget::All)]
    );
    assert!(names(&control).is_empty());
}

#[test]
fn delete_removes_message_and_state_and_knows_unknown_ids() {
    let (_d, spool) = spool();
    let id = commit(&spool, &envelope(&["a@example.com"]), BODY);
    spool.write_state(&id, &DeliveryState::fresh(5)).unwrap();
    assert!(spool.contains(&id));
    assert_eq!(spool.delete(&id).unwrap(), DeleteOutcome::Deleted);
    assert!(!spool.contains(&id));
    assert!(names(&spool.root().join("queue")).is_empty());
    assert_eq!(spool.delete(&id).unwrap(), DeleteOutcome::NotFound);
}

/// Whether another open file holds a lock on `path` that excludes an exclusive one.
fn locked_by_someone(path: &std::path::Path) -> bool {
    use std::os::fd::AsRawFd;
    let probe = std::fs::File::open(path).unwrap();
    // SAFETY: flock on a descriptor owned by `probe`, which outlives the call.
    unsafe { libc::flock(probe.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) != 0 }
}

#[test]
fn final_dot_lock_tells_delete_and_delete_tells_the_worker() {
    let (_d, spool) = spool();
    // The worker locks first: a deletion afterwards reports that it may have been sent.
    let id = commit(&spool, &envelope(&["a@example.com"]), BODY);
    let Loaded { body, lock, .. } = spool.load_with_body(&id, 1 << 20).unwrap();
    assert_eq!(body.as_deref(), Some(BODY));
    assert_eq!(lock.id(), &id);
    let path = spool.root().join("queue").join(id.as_str());
    assert!(!locked_by_someone(&path), "loading alone must not lock");
    assert!(lock.begin_final_dot().unwrap());
    assert!(locked_by_someone(&path));
    assert!(lock.begin_final_dot().unwrap(), "asking twice is harmless");
    assert_eq!(spool.delete(&id).unwrap(), DeleteOutcome::DeletedMaybeSent);
    drop(lock);

    // Deleted first: the worker is told to abort.
    let id = commit(&spool, &envelope(&["a@example.com"]), BODY);
    let Loaded { lock, .. } = spool.load_with_body(&id, 1 << 20).unwrap();
    assert_eq!(spool.delete(&id).unwrap(), DeleteOutcome::Deleted);
    assert!(!lock.begin_final_dot().unwrap());

    // Being deleted (the operator holds its lock): the worker aborts too.
    let id = commit(&spool, &envelope(&["a@example.com"]), BODY);
    let Loaded { lock, .. } = spool.load_with_body(&id, 1 << 20).unwrap();
    let path = spool.root().join("queue").join(id.as_str());
    let operator = std::fs::File::open(&path).unwrap();
    {
        use std::os::fd::AsRawFd;
        // SAFETY: as in locked_by_someone.
        assert_eq!(
            unsafe { libc::flock(operator.as_raw_fd(), libc::LOCK_EX) },
            0
        );
    }
    assert!(!lock.begin_final_dot().unwrap());
    drop(operator);

    // A lock dropped (attempt over, or a crash) leaves nothing behind: a plain deletion.
    assert!(lock.begin_final_dot().unwrap());
    drop(lock);
    assert!(!locked_by_someone(&path));
    assert_eq!(spool.delete(&id).unwrap(), DeleteOutcome::Deleted);
}

#[test]
fn a_queue_command_leaves_the_relays_free_files_alone() {
    // A command that writes opens the spool beside the running relay: it must neither read
    // nor clean free/ (the relay takes files from it at any moment; found by the crash loop,
    // where `queue hold` failed with ENOENT on a free file the relay had just taken).
    use std::os::unix::fs::PermissionsExt;
    let (_d, spool) = spool();
    let free = spool.root().join("free");
    let foreign = free.join("foreign");
    fs::write(&foreign, b"x").unwrap();
    fs::set_permissions(&foreign, fs::Permissions::from_mode(0o660)).unwrap();
    fs::create_dir(free.join("a-directory")).unwrap();
    let command = Spool::open_for_command(spool.root()).unwrap();
    assert_eq!(command.free_files(), 0);
    assert_eq!(names(&free), ["a-directory", "foreign"]);
    // The relay's own open cleans it.
    Spool::open(spool.root()).unwrap();
    assert!(names(&free).is_empty());
}

#[test]
fn finished_messages_are_recycled_and_written_over_exactly() {
    use std::os::unix::fs::MetadataExt;
    let (_d, spool) = spool();
    let queue = spool.root().join("queue");
    let free = spool.root().join("free");
    let long = b"Subject: a long one\r\n\r\n".repeat(100);
    let id = commit(&spool, &envelope(&["a@example.com"]), &long);
    spool.write_state(&id, &DeliveryState::fresh(5)).unwrap();
    let inode = fs::metadata(queue.join(id.as_str())).unwrap().ino();
    spool.remove_finished(&id, long.len() as u64, 1).unwrap();
    assert!(
        names(&queue).is_empty(),
        "message and state leave the queue"
    );
    assert_eq!(names(&free), [id.to_string()]);
    assert!(matches!(
        spool.remove_finished(&id, 1, 1),
        Err(SpoolError::NotFound(_))
    ));

    // The next message is written into that file, cut to its own length.
    let env = envelope(&["b@example.com"]);
    let short = commit(&spool, &env, BODY);
    assert!(names(&free).is_empty());
    assert_eq!(
        fs::metadata(queue.join(short.as_str())).unwrap().ino(),
        inode
    );
    assert_eq!(spool.read_message(&short).unwrap(), BODY);
    assert_eq!(spool.load(&short).unwrap().envelope, env);
    assert_eq!(spool.load(&short).unwrap().size, BODY.len() as u64);

    // A big message is unlinked, not kept.
    let big = vec![b'x'; super::recycle::RECYCLE_MAX as usize + 1];
    let id = commit(&spool, &envelope(&["c@example.com"]), &big);
    spool.remove_finished(&id, big.len() as u64, 0).unwrap();
    assert!(names(&free).is_empty());
    assert_eq!(names(&queue), [short.to_string()]);

    // A free file that also has a name in queue/ (a rename torn by a crash) is never written
    // over: the queued message keeps its bytes.
    spool.remove_finished(&short, BODY.len() as u64, 0).unwrap();
    fs::hard_link(free.join(short.as_str()), queue.join(short.as_str())).unwrap();
    let id = commit(&spool, &envelope(&["e@example.com"]), b"new\r\n");
    assert_eq!(spool.read_message(&short).unwrap(), BODY);
    assert_eq!(spool.read_message(&id).unwrap(), b"new\r\n");
    assert!(names(&free).is_empty());
    spool.remove_finished(&id, 5, 0).unwrap();
    fs::remove_file(free.join(id.as_str())).unwrap();

    // Free files survive a restart, and one removed by hand is simply skipped. Anything but
    // a regular file found in free/ at start is removed, never written into.
    spool.remove_finished(&short, BODY.len() as u64, 0).unwrap();
    fs::create_dir(free.join("a-directory")).unwrap();
    std::os::unix::fs::symlink(queue.join(id.as_str()), free.join("a-symlink")).unwrap();
    let again = Spool::open(spool.root()).unwrap();
    assert_eq!(again.free_files(), 1);
    assert_eq!(names(&free), [short.to_string()]);
    fs::remove_file(free.join(short.as_str())).unwrap();
    let id = commit(&again, &envelope(&["d@example.com"]), BODY);
    assert_eq!(again.read_message(&id).unwrap(), BODY);
}

#[test]
fn a_finished_message_is_recycled_on_the_spot_only_by_a_lone_rename() {
    let (_d, spool) = spool();
    let queue = spool.root().join("queue");
    let free = spool.root().join("free");
    // Never attempted (no state file) and small: one rename into free/.
    let id = commit(&spool, &envelope(&["a@example.com"]), BODY);
    let size = BODY.len() as u64;
    assert!(matches!(spool.recycle_finished(&id, size, 0), Some(Ok(()))));
    assert!(names(&queue).is_empty());
    assert_eq!(names(&free), [id.to_string()]);
    // Gone meanwhile (deleted by an operator): NotFound, as remove_finished says it.
    assert!(matches!(
        spool.recycle_finished(&id, size, 0),
        Some(Err(SpoolError::NotFound(_)))
    ));

    // A state file to unlink, or a file too big to keep: nothing done, left to
    // remove_finished (off the reactor).
    let attempted = commit(&spool, &envelope(&["b@example.com"]), BODY);
    spool
        .write_state(&attempted, &DeliveryState::fresh(5))
        .unwrap();
    assert!(spool.recycle_finished(&attempted, size, 1).is_none());
    // Held and released before any attempt: a state file with no attempt recorded. Left to
    // remove_finished too, which removes it with the message.
    let released = commit(&spool, &envelope(&["r@example.com"]), BODY);
    spool
        .write_state(&released, &DeliveryState::fresh(5))
        .unwrap();
    assert!(spool.recycle_finished(&released, size, 0).is_none());
    spool.remove_finished(&released, size, 0).unwrap();
    assert!(!queue.join(format!("{released}.state")).exists());
    assert!(!queue.join(released.as_str()).exists());
    let big = vec![b'x'; super::recycle::RECYCLE_MAX as usize + 1];
    let big_id = commit(&spool, &envelope(&["c@example.com"]), &big);
    assert!(
        spool
            .recycle_finished(&big_id, big.len() as u64, 0)
            .is_none()
    );
    assert_eq!(names(&queue).len(), 3, "both messages and the state stay");

    // free/ removed by hand: the rename fails with ENOENT although the message is there.
    // Not taken for a message deleted meanwhile: nothing done here, and remove_finished
    // unlinks it instead.
    fs::remove_dir(&free).unwrap();
    let small = commit(&spool, &envelope(&["d@example.com"]), BODY);
    assert!(spool.recycle_finished(&small, size, 0).is_none());
    assert!(queue.join(small.as_str()).exists());
    spool.remove_finished(&small, size, 0).unwrap();
    assert!(!queue.join(small.as_str()).exists());
}

#[test]
fn recovery_keeps_requests() {
    let (_d, spool) = spool();
    commit(&spool, &envelope(&["a@example.com"]), BODY);
    spool.request_retry(&RetryTarget::All).unwrap();
    let report = spool.recover().unwrap();
    assert_eq!(report.queued, 1);
    assert_eq!(names(&spool.root().join("control")), ["retry.all"]);
}

#[test]
fn purge_filter_parsing_and_matching() {
    let addr = |s: &str| ReversePath::Address(s.parse().unwrap());
    let cases: &[(&str, &str, bool)] = &[
        ("spam@junk.example", "spam@junk.example", true),
        ("spam@junk.example", "spam@JUNK.Example", true),
        ("<spam@junk.example>", "spam@junk.example", true),
        ("spam@junk.example.", "spam@junk.example", true),
        // The same comparison as every policy check: ASCII local parts ignore case, non-ASCII
        // ones are byte-exact (U+212A KELVIN SIGN is not `k`), domains compare as A-labels.
        ("spam@junk.example", "Spam@junk.example", true),
        ("kate@junk.example", "\u{212A}ate@junk.example", false),
        (
            "\"john doe\"@junk.example",
            "\"John Doe\"@junk.example",
            true,
        ),
        ("@bücher.example", "x@xn--bcher-kva.example", true),
        ("@xn--bcher-kva.example", "x@BÜCHER.example", true),
        ("spam@junk.example", "spam2@junk.example", false),
        ("spam@junk.example", "<>", false),
        ("@junk.example", "anyone@JUNK.example", true),
        ("@JUNK.EXAMPLE", "anyone@junk.example", true),
        ("@junk.example", "anyone@sub.junk.example", false),
        ("@junk.example", "<>", false),
        ("<>", "<>", true),
        ("<>", "a@junk.example", false),
        ("@παράδειγμα.δοκιμή", "x@ΠΑΡΆΔΕΙΓΜΑ.δοκιμή", true),
    ];
    for &(arg, sender, want) in cases {
        let filter = PurgeFilter::parse_from(arg).unwrap_or_else(|e| panic!("{arg}: {e}"));
        let sender = if sender == "<>" {
            ReversePath::Null
        } else {
            addr(sender)
        };
        assert_eq!(filter.matches(&sender), want, "{arg} vs {sender}");
    }
    for bad in ["", "@", "no-at-sign", "@bad domain", "a@-x.example", "<a@b"] {
        assert!(PurgeFilter::parse_from(bad).is_err(), "{bad:?} accepted");
    }
    assert!(PurgeFilter::All.matches(&ReversePath::Null));
}

#[test]
fn purge_dry_run_lists_and_purge_deletes_only_the_match() {
    let (_d, spool) = spool();
    let junk1 = commit(
        &spool,
        &from(envelope(&["a@example.com"]), "spam@junk.example"),
        BODY,
    );
    let real = commit(
        &spool,
        &from(envelope(&["a@example.com"]), "boss@example.org"),
        BODY,
    );
    let junk2 = commit(
        &spool,
        &from(envelope(&["b@example.com"]), "SPAM@Junk.example"),
        BODY,
    );
    let filter = PurgeFilter::parse_from("@junk.example").unwrap();

    let listed = spool.purge(&filter, true).unwrap();
    let ids: Vec<&QueueId> = listed.iter().map(|p| &p.id).collect();
    let mut want = vec![&junk1, &junk2];
    want.sort();
    assert_eq!(ids, want);
    assert!(listed.iter().all(|p| p.outcome.is_none()));
    assert_eq!(spool.list().unwrap().len(), 3, "dry run deleted something");

    let purged = spool.purge(&filter, false).unwrap();
    assert_eq!(purged.len(), 2);
    assert!(
        purged
            .iter()
            .all(|p| p.outcome == Some(DeleteOutcome::Deleted))
    );
    let left: Vec<QueueId> = spool
        .list()
        .unwrap()
        .into_iter()
        .map(|m| m.envelope.id)
        .collect();
    assert_eq!(left, [real]);
}

#[test]
fn enqueue_commits_a_whole_message() {
    let (_d, spool) = spool();
    let env = envelope(&["a@example.com"]);
    let id = spool.enqueue(&env, BODY).unwrap();
    assert_eq!(spool.read_message(&id).unwrap(), BODY);
    assert_eq!(spool.load(&id).unwrap().envelope, env);
}

#[test]
fn load_with_body_reads_small_messages_through_the_same_open() {
    let (_d, spool) = spool();
    let id = spool.enqueue(&envelope(&["a@example.com"]), BODY).unwrap();
    let Loaded { msg, body, .. } = spool.load_with_body(&id, BODY.len() as u64).unwrap();
    assert_eq!(msg, spool.load(&id).unwrap());
    assert_eq!(body.as_deref(), Some(BODY));
    let Loaded { body, .. } = spool.load_with_body(&id, BODY.len() as u64 - 1).unwrap();
    assert_eq!(body, None, "a message over the limit is left for streaming");
}

#[test]
fn commit_and_keep_hands_over_what_load_would_read() {
    let (_d, spool) = spool();
    let env = envelope(&["a@example.com"]);
    let mut w = spool.create(&env).unwrap();
    for chunk in BODY.chunks(5) {
        w.write(chunk).unwrap();
    }
    let (id, kept) = w.commit_and_keep().unwrap();
    let kept = kept.expect("a small message is kept");
    let Loaded { msg, body, .. } = spool.load_with_body(&id, 1 << 20).unwrap();
    assert_eq!(kept.msg, msg);
    assert_eq!(kept.body, body);
    // Its open file is the message's lock: the final-dot handshake works through it.
    assert!(kept.lock.begin_final_dot().unwrap());
    assert_eq!(spool.delete(&id).unwrap(), DeleteOutcome::DeletedMaybeSent);

    // A message over KEEP_MAX is committed the same but read back by delivery.
    let env = envelope(&["b@example.com"]);
    let mut w = spool.create(&env).unwrap();
    let big = vec![b'x'; super::writer::KEEP_MAX + 1];
    for chunk in big.chunks(4096) {
        w.write(chunk).unwrap();
    }
    let (id, kept) = w.commit_and_keep().unwrap();
    assert!(kept.is_none());
    assert_eq!(spool.read_message(&id).unwrap(), big);
}

#[test]
fn deletion_lines_and_summaries() {
    let id: QueueId = "0123456789ABCDEF".parse().unwrap();
    let sender = ReversePath::Address("a@example.org".parse().unwrap());
    assert_eq!(
        report::deletion_line(&id, None, Some(DeleteOutcome::Deleted)),
        "deleted 0123456789ABCDEF"
    );
    assert_eq!(
        report::deletion_line(&id, Some(&sender), Some(DeleteOutcome::DeletedMaybeSent)),
        format!(
            "deleted 0123456789ABCDEF from a@example.org {}",
            report::MAYBE_SENT_NOTE
        )
    );
    assert_eq!(
        report::deletion_line(&id, Some(&ReversePath::Null), None),
        "would delete 0123456789ABCDEF from <>"
    );
    let mut t = report::Tally::new(false);
    assert_eq!(t.summary(), "0 messages deleted");
    t.add(Some(DeleteOutcome::Deleted));
    assert_eq!(t.summary(), "1 message deleted");
    t.add(Some(DeleteOutcome::DeletedMaybeSent));
    t.add(Some(DeleteOutcome::NotFound));
    assert_eq!(
        t.summary(),
        "2 messages deleted, 1 possibly delivered, 1 not found"
    );
    let mut dry = report::Tally::new(true);
    assert_eq!(dry.summary(), "0 messages would be deleted (dry run)");
    dry.add(None);
    assert_eq!(dry.summary(), "1 message would be deleted (dry run)");
}

/// The uid of `nobody`: a user other than the one running the tests (which run as root, so
/// they may chown).
const OTHER_UID: u32 = 65534;

fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::chown(path, Some(uid), None).unwrap();
}

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

#[test]
fn recovery_rejects_message_files_another_user_wrote_or_may_write() {
    let (_d, spool) = spool();
    let queue = spool.root().join("queue");
    let good = commit(&spool, &envelope(&["a@example.com"]), BODY);
    // Well-formed copies under ids of their own: one owned by another user, one
    // world-writable, one whose state file is another user's.
    let plant = |f: &dyn Fn(&Path)| {
        let mut env = envelope(&["victim@example.com"]);
        env.auth_user = Some("forged".into());
        let id = commit(&spool, &env, BODY);
        f(&queue.join(id.as_str()));
        id
    };
    let foreign = plant(&|p| chown(p, OTHER_UID));
    let writable = plant(&|p| chmod(p, 0o666));
    spool.write_state(&good, &DeliveryState::fresh(5)).unwrap();
    chown(&queue.join(format!("{good}.state")), OTHER_UID);
    // Before recovery, no reader takes them as messages.
    for id in [&foreign, &writable] {
        assert!(
            matches!(spool.load(id), Err(SpoolError::Untrusted { .. })),
            "{id} was loaded"
        );
    }
    assert_eq!(
        spool
            .list()
            .unwrap()
            .iter()
            .map(|m| m.id().clone())
            .collect::<Vec<_>>(),
        vec![good.clone()]
    );
    // The foreign state is ignored (fresh), not believed.
    assert_eq!(spool.load(&good).unwrap().state.next_attempt, 1_700_000_000);

    let report = spool.recover().unwrap();
    assert_eq!(report.queued, 1, "{report:?}");
    assert_eq!(report.rejected.len(), 3, "{report:?}");
    let rejected = names(&spool.root().join("rejected"));
    let mut want = vec![
        foreign.to_string(),
        writable.to_string(),
        format!("{good}.state"),
    ];
    want.sort();
    assert_eq!(rejected, want);
    assert_eq!(names(&queue), vec![good.to_string()]);
}

#[test]
fn check_safe_refuses_a_spool_directory_others_can_write() {
    let (_d, spool) = spool();
    let me = euid();
    spool.check_safe(me).unwrap();

    let queue = spool.root().join("queue");
    chmod(&queue, 0o777);
    match spool.check_safe(me) {
        Err(SpoolError::Unsafe { path, fix, .. }) => {
            assert_eq!(path, queue);
            assert_eq!(fix, format!("chmod 700 {}", queue.display()));
        }
        other => panic!("world-writable queue/ accepted: {other:?}"),
    }
    chmod(&queue, 0o700);
    chmod(spool.root(), 0o770);
    assert!(
        matches!(spool.check_safe(me), Err(SpoolError::Unsafe { path, .. }) if path == spool.root())
    );
    chmod(spool.root(), 0o700);

    let control = spool.root().join("control");
    chown(&control, OTHER_UID);
    let err = spool.check_safe(me).unwrap_err();
    assert!(
        matches!(&err, SpoolError::Unsafe { path, fix, .. } if *path == control && fix.starts_with("chown")),
        "{err:?}"
    );
    assert!(err.to_string().contains(&control.display().to_string()));
}

#[test]
fn open_existing_creates_and_removes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("spool");
    fs::create_dir_all(root.join("queue")).unwrap();
    fs::write(root.join("queue").join("README"), b"x").unwrap();
    let spool = Spool::open_existing(&root).unwrap();
    assert!(spool.list().unwrap().is_empty());
    assert_eq!(names(&root), vec!["queue".to_string()]);
    assert_eq!(names(&root.join("queue")), vec!["README".to_string()]);
}

#[test]
fn a_free_file_of_another_user_is_never_written_into() {
    let (_d, spool) = spool();
    let free = spool.root().join("free");
    fs::write(free.join("PLANTED"), b"x").unwrap();
    chown(&free.join("PLANTED"), OTHER_UID);
    fs::write(free.join("WRITABLE"), b"x").unwrap();
    chmod(&free.join("WRITABLE"), 0o622);
    let spool = Spool::open(spool.root()).unwrap();
    assert_eq!(spool.free_files(), 0);
    assert!(names(&free).is_empty());
}

#[test]
fn clean_replaces_every_control_character_at_the_edges_of_printable_ascii() {
    // Printable ASCII (0x20 to 0x7e) is copied as it is; everything next to it is not.
    assert_eq!(report::clean(" !az~"), " !az~");
    assert_eq!(report::clean("a\tb"), "a b");
    for control in [
        "\0", "\x1f", "\r", "\n", "\x1b[2J", "\x7f", "\u{85}", "\u{9b}",
    ] {
        let cleaned = report::clean(&format!("x{control}y"));
        assert!(
            cleaned.starts_with("x?") && cleaned.ends_with('y'),
            "{control:?}: {cleaned:?}"
        );
        assert!(
            !cleaned.chars().any(char::is_control),
            "{control:?}: {cleaned:?}"
        );
    }
    assert_eq!(report::clean("caf\u{e9} \u{202e}x"), "caf\u{e9} ?x");
}

#[test]
fn list_and_show_escape_bidi_and_zero_width_characters() {
    // U+202E makes `<\u{202e}gro.elpmaxe@knab-ecivres>` display as a bank's address.
    let spoof = "\u{202e}gro.elpmaxe@knab-ecivres";
    let mut msgs = sample_messages();
    let env = &mut msgs[1].envelope;
    env.mail_from = ReversePath::Address(crate::envelope::Address::parse(spoof).unwrap());
    env.helo = "mx\u{200b}.example\u{2066}".into();
    env.auth_user = Some("bob\u{feff}\u{e0041}".into());
    msgs[1].state.last_error = Some("451 \u{200e}\u{200f}\u{2069} later".into());
    let invisible = |text: &str| text.chars().filter(|&c| report::is_invisible(c)).count();

    let table = report::list_table(&msgs, 1_700_000_000);
    assert_eq!(invisible(&table), 0, "{table:?}");
    assert!(table.contains(" ?gro.elpmaxe@knab-ecivres "), "{table}");
    let shown = report::show(&msgs[1], b"Subject: \xe2\x80\xaeabc\r\n\r\n");
    assert_eq!(invisible(&shown), 0, "{shown:?}");
    assert!(shown.contains("helo:         mx?.example?"), "{shown}");
    assert!(shown.contains("Subject: ?abc"), "{shown}");
    let line = report::deletion_line(
        &msgs[1].envelope.id,
        Some(&msgs[1].envelope.mail_from),
        None,
    );
    assert_eq!(invisible(&line), 0, "{line:?}");

    let json = report::list_json(&msgs, 1_700_000_000);
    assert_eq!(invisible(&json), 0, "{json:?}");
    assert!(
        json.contains(r#""from":"\u202egro.elpmaxe@knab-ecivres""#),
        "{json}"
    );
    // Escaped, not altered: a JSON reader gets the original text back.
    let row: serde_json::Value = serde_json::from_str(json.lines().nth(1).unwrap()).unwrap();
    assert_eq!(row["from"], spoof);
    assert_eq!(row["auth_user"], "bob\u{feff}\u{e0041}");
    assert!(
        json.contains(r"\udb40\udc41"),
        "supplementary-plane escape: {json}"
    );
}

#[test]
fn invisible_characters_are_format_separators_and_default_ignorables_only() {
    for c in [
        '\u{ad}',
        '\u{61c}',
        '\u{180e}',
        '\u{200b}',
        '\u{200e}',
        '\u{200f}',
        '\u{2028}',
        '\u{2029}',
        '\u{202a}',
        '\u{202e}',
        '\u{2060}',
        '\u{2066}',
        '\u{2069}',
        '\u{feff}',
        '\u{fffb}',
        '\u{1343f}',
        '\u{e0001}',
        '\u{e007f}',
        // Default_Ignorable_Code_Point that are not Cf, and U+2800.
        '\u{34f}',
        '\u{115f}',
        '\u{1160}',
        '\u{17b4}',
        '\u{17b5}',
        '\u{180b}',
        '\u{180f}',
        '\u{2065}',
        '\u{2800}',
        '\u{3164}',
        '\u{fe00}',
        '\u{fe0f}',
        '\u{ffa0}',
        '\u{fff0}',
        '\u{e0000}',
        '\u{e0080}',
        '\u{e0100}',
        '\u{e01ef}',
        '\u{e0fff}',
    ] {
        assert!(report::is_invisible(c), "U+{:04X}", c as u32);
    }
    for c in [
        'a',
        ' ',
        'é',
        '\u{2027}',
        '\u{034e}',
        '\u{1161}',
        '\u{17b6}',
        '\u{2801}',
        '\u{3165}',
        '\u{fe10}',
        '\u{ffa1}',
        '\u{fffc}',
        '\u{e1000}',
        '\u{10ffff}',
        '日',
    ] {
        assert!(!report::is_invisible(c), "U+{:04X}", c as u32);
    }
}

/// The MAIL parameters a message turned out to need (undeclared 8-bit content, a declared
/// SMTPUTF8 it does not need) are recorded in the envelope in place, whether the header is
/// still buffered or already on disk, and the message bytes are untouched.
#[test]
fn rewrite_mail_params_rewrites_the_envelope_in_place() {
    use crate::envelope::{Body, MailParams};
    let (_d, spool) = spool();
    let big = vec![b'x'; 200 * 1024];
    for smtputf8 in [false, true] {
        for body in [BODY, big.as_slice()] {
            let mut env = envelope(&["a@example.com"]);
            env.mail_params.smtputf8 = smtputf8;
            assert_eq!(env.mail_params.body, None);
            let needed = MailParams {
                body: Some(Body::EightBitMime),
                smtputf8: false,
                ..env.mail_params.clone()
            };
            let mut w = spool.create(&env).unwrap();
            w.write(body).unwrap();
            w.rewrite_mail_params(&env, needed.clone()).unwrap();
            let (id, loaded) = w.commit_and_keep().unwrap();
            if let Some(loaded) = loaded {
                assert_eq!(loaded.msg.envelope.mail_params, needed);
            }
            let msg = spool.load(&id).unwrap();
            assert_eq!(msg.envelope.mail_params.body, Some(Body::EightBitMime));
            assert!(!msg.envelope.mail_params.smtputf8);
            assert_eq!(msg.envelope.recipients, env.recipients);
            let (mut file, _) = spool.open_message(&id).unwrap();
            let mut read = Vec::new();
            std::io::Read::read_to_end(&mut file, &mut read).unwrap();
            assert_eq!(read, body);
        }
    }
}

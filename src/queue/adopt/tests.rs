use std::fs;
use std::os::unix::fs::PermissionsExt as _;

use super::*;
use crate::envelope::{RcptStatus, sample_envelope};
use crate::queue::Request;
use crate::queue::tests::names;

const BODY: &[u8] = b"Subject: hi\r\n\r\nbody line\r\n.leading dot\r\n";

/// The other node's spool and ours, in one temporary directory.
fn spools() -> (tempfile::TempDir, Spool, Spool) {
    let dir = tempfile::tempdir().unwrap();
    let theirs = Spool::open(&dir.path().join("theirs")).unwrap();
    let ours = Spool::open(&dir.path().join("ours")).unwrap();
    (dir, theirs, ours)
}

fn options(theirs: &Spool) -> Options {
    Options {
        dir: theirs.root().to_path_buf(),
        node: "edge-2".to_owned(),
        min_free: 0,
        dry_run: false,
    }
}

/// Queue a message in `spool` with `body`, and `state` when given.
fn queue(spool: &Spool, body: &[u8], state: Option<DeliveryState>) -> QueueId {
    let env = sample_envelope(&["a@example.com", "b@example.com"]);
    let id = spool.enqueue(&env, body).unwrap();
    if let Some(state) = state {
        spool.write_state(&id, &state).unwrap();
    }
    id
}

fn held() -> DeliveryState {
    let mut state = DeliveryState::fresh(1_700_000_000);
    state.hold(1_700_000_100, "account contained");
    state
}

fn half_delivered() -> DeliveryState {
    DeliveryState {
        attempts: 2,
        next_attempt: 1_700_000_900,
        last_error: Some("451 4.3.0 try later".into()),
        recipients: vec![RcptStatus::Delivered, RcptStatus::Pending],
        ..DeliveryState::fresh(1_700_000_000)
    }
}

fn file(spool: &Spool, name: &str) -> Vec<u8> {
    fs::read(spool.root().join("queue").join(name)).unwrap()
}

/// The ids the relay is asked to load, sorted.
fn told(spool: &Spool) -> Vec<QueueId> {
    told_pairs(spool).into_iter().map(|(id, _)| id).collect()
}

/// (id here, id there) of each message the relay is asked to load, sorted.
fn told_pairs(spool: &Spool) -> Vec<(QueueId, QueueId)> {
    let mut pairs = Vec::new();
    for request in spool.take_requests(&Default::default()).unwrap() {
        match request {
            Request::Adopted(list) => pairs.extend(list),
            other => panic!("not an adoption: {other:?}"),
        }
    }
    pairs.sort();
    pairs
}

fn imported(report: &Report) -> Vec<QueueId> {
    let mut ids: Vec<QueueId> = report
        .outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Imported { id, .. } => Some(id.clone()),
            _ => None,
        })
        .collect();
    ids.sort();
    ids
}

#[test]
fn imports_every_message_with_its_id_state_and_bytes_then_a_rerun_imports_nothing() {
    let (_d, theirs, ours) = spools();
    let fresh = queue(&theirs, BODY, None);
    let hold = queue(&theirs, b"Subject: held\r\n\r\nx\r\n", Some(held()));
    let part = queue(
        &theirs,
        b"Subject: part\r\n\r\ny\r\n",
        Some(half_delivered()),
    );
    let report = adopt(&ours, &options(&theirs)).unwrap();
    let mut all = vec![fresh.clone(), hold.clone(), part.clone()];
    all.sort();
    assert_eq!(imported(&report), all);
    assert!(report.outcomes.iter().any(|o| matches!(o,
        Outcome::Imported { id, held: true, fresh: None, .. } if *id == hold)));
    for id in &all {
        assert_eq!(file(&ours, id.as_str()), file(&theirs, id.as_str()), "{id}");
        assert_eq!(ours.load(id).unwrap().state, theirs.load(id).unwrap().state);
    }
    assert_eq!(
        ours.load(&hold).unwrap().state.hold.unwrap().reason,
        "account contained"
    );
    assert_eq!(ours.load(&part).unwrap().state, half_delivered());
    assert_eq!(told(&ours), all);
    // Nothing in their spool changed but the marker.
    assert_eq!(theirs.list().unwrap().len(), 3);
    let marker = ledger::read_marker(theirs.root())
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((marker.node.as_str(), marker.imported), ("edge-2", 3));
    assert_eq!(
        report.marker,
        MarkerOutcome::Written(theirs.root().join(MARKER))
    );
    assert!(names(&ours.root().join("tmp")).is_empty());

    let again = adopt(&ours, &options(&theirs)).unwrap();
    assert!(imported(&again).is_empty());
    assert_eq!(
        again.outcomes,
        all.iter()
            .map(|id| Outcome::AlreadyHere {
                from: id.clone(),
                id: id.clone()
            })
            .collect::<Vec<_>>()
    );
    assert_eq!(again.marker, MarkerOutcome::Already(marker));
    assert_eq!(ours.list().unwrap().len(), 3);
    // Asked again for those still queued here (the last run may have stopped before).
    assert_eq!(told(&ours), all);
}

#[test]
fn an_interrupted_adopt_run_again_imports_each_message_once_even_one_delivered_meanwhile() {
    let (_d, theirs, ours) = spools();
    let ids: Vec<QueueId> = (0..5).map(|_| queue(&theirs, BODY, None)).collect();
    let opts = options(&theirs);
    {
        let mut run = Adoption::start(&ours, &opts).unwrap();
        let names = run.names();
        run.import(&names[0]).unwrap();
        run.import(&names[1]).unwrap();
        // A batch ends: durable, in the ledger, the relay told.
        run.flush().unwrap();
        run.import(&names[2]).unwrap();
        // Stopped here: the third copied into tmp/ only, no marker.
    }
    assert_eq!(told(&ours), ids[..2].to_vec());
    assert_eq!(ours.list().unwrap().len(), 2);
    assert!(ledger::read_marker(theirs.root()).unwrap().is_none());
    // The relay delivered the first meanwhile: gone from here.
    ours.remove(&ids[0]).unwrap();
    let report = adopt(&ours, &opts).unwrap();
    assert_eq!(imported(&report), ids[2..].to_vec());
    assert_eq!(
        report.outcomes[..2],
        ids[..2]
            .iter()
            .map(|id| Outcome::AlreadyHere {
                from: id.clone(),
                id: id.clone()
            })
            .collect::<Vec<_>>()
    );
    let here: Vec<QueueId> = ours
        .list()
        .unwrap()
        .into_iter()
        .map(|m| m.envelope.id)
        .collect();
    assert_eq!(here, ids[1..].to_vec());
    // The delivered one is not asked for again; the others are.
    assert_eq!(told(&ours), ids[1..].to_vec());
    assert_eq!(ledger_lines(&ours).len(), 5);
    assert!(matches!(report.marker, MarkerOutcome::Written(_)));
}

#[test]
fn a_copy_left_by_a_crash_before_the_ledger_line_is_found_not_copied_again() {
    let (_d, theirs, ours) = spools();
    let id = queue(&theirs, BODY, Some(half_delivered()));
    fs::write(
        ours.root().join("queue").join(id.as_str()),
        file(&theirs, id.as_str()),
    )
    .unwrap();
    let report = adopt(&ours, &options(&theirs)).unwrap();
    assert_eq!(
        report.outcomes,
        [Outcome::AlreadyHere {
            from: id.clone(),
            id: id.clone()
        }]
    );
    assert_eq!(told(&ours), std::slice::from_ref(&id));
    let lines = ledger_lines(&ours);
    assert_eq!(lines.len(), 1);
    assert_eq!((&lines[0].from, &lines[0].id), (&id, &id));
}

fn ledger_lines(spool: &Spool) -> Vec<ledger::LedgerLine> {
    fs::read_to_string(spool.root().join(LEDGER))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn another_spools_message_by_an_id_adopted_before_is_imported_under_a_new_id() {
    let (d, theirs, ours) = spools();
    let id = queue(&theirs, BODY, None);
    // A copy of their spool taken earlier, in which that message differs.
    let copy = Spool::open(&d.path().join("copy")).unwrap();
    let mut bytes = file(&theirs, id.as_str());
    bytes.extend_from_slice(b"changed\r\n");
    fs::write(copy.root().join("queue").join(id.as_str()), bytes).unwrap();
    adopt(&ours, &options(&theirs)).unwrap();
    let report = adopt(&ours, &options(&copy)).unwrap();
    let [Outcome::Imported { from, id: new, .. }] = &report.outcomes[..] else {
        panic!("{:?}", report.outcomes);
    };
    assert_eq!(from, &id);
    assert_ne!(new, &id);
    assert_eq!(
        ours.read_message(new).unwrap(),
        [BODY, b"changed\r\n"].concat()
    );
    assert_eq!(ours.read_message(&id).unwrap(), BODY);
    assert_eq!(ledger_lines(&ours).len(), 2);
}

#[test]
fn an_id_taken_here_by_another_message_gets_a_derived_id_found_again_by_a_rerun() {
    let (_d, theirs, ours) = spools();
    let id = queue(&theirs, BODY, Some(held()));
    let mut other = sample_envelope(&["z@example.com"]);
    other.id = id.clone();
    ours.enqueue(&other, b"Subject: mine\r\n\r\n").unwrap();
    let report = adopt(&ours, &options(&theirs)).unwrap();
    let Outcome::Imported {
        from,
        id: new,
        held: true,
        ..
    } = &report.outcomes[0]
    else {
        panic!("{:?}", report.outcomes);
    };
    assert_eq!(from, &id);
    assert_ne!(new, &id);
    assert_eq!(new.created_at(), id.created_at(), "sorts by age as before");
    let copy = ours.load(new).unwrap();
    let mut expected = theirs.load(&id).unwrap().envelope;
    expected.id = new.clone();
    assert_eq!(copy.envelope, expected);
    assert_eq!(copy.state, held());
    assert_eq!(told_pairs(&ours), [(new.clone(), id.clone())]);
    assert_eq!(ours.read_message(new).unwrap(), BODY);
    assert_eq!(ours.read_message(&id).unwrap(), b"Subject: mine\r\n\r\n");
    // A crash before the ledger line: the rerun derives the same id and finds its copy.
    fs::remove_file(ours.root().join(LEDGER)).unwrap();
    fs::remove_file(theirs.root().join(MARKER)).unwrap();
    let again = adopt(&ours, &options(&theirs)).unwrap();
    assert_eq!(
        again.outcomes,
        [Outcome::AlreadyHere {
            from: id.clone(),
            id: new.clone()
        }]
    );
    assert_eq!(ours.list().unwrap().len(), 2);
}

/// Plant in `theirs` beside message `good`: a symlink to `outside`, a file of another
/// format, a huge envelope line, a copy of `good` under another id, a FIFO (those five
/// names returned), a stray name, and a world-writable state for `good`.
fn plant_hostile(theirs: &Spool, good: &QueueId, outside: &Path) -> Vec<String> {
    let q = theirs.root().join("queue");
    fs::write(outside, b"PORTCULLIS-SPOOL 1\n").unwrap();
    let names: Vec<String> = (0..5).map(|_| QueueId::generate().to_string()).collect();
    std::os::unix::fs::symlink(outside, q.join(&names[0])).unwrap();
    fs::write(
        q.join(&names[1]),
        b"From: someone\r\n\r\nnot a spool file\r\n",
    )
    .unwrap();
    let mut huge = b"PORTCULLIS-SPOOL 1\n".to_vec();
    huge.resize(
        huge.len() + crate::queue::MAX_ENVELOPE_LINE as usize + 10,
        b'{',
    );
    fs::write(q.join(&names[2]), huge).unwrap();
    fs::write(q.join(&names[3]), file(theirs, good.as_str())).unwrap();
    let fifo = std::ffi::CString::new(q.join(&names[4]).to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    fs::write(q.join("notes.txt"), b"hello").unwrap();
    let state = q.join(format!("{good}.state"));
    fs::write(&state, serde_json::to_vec(&half_delivered()).unwrap()).unwrap();
    fs::set_permissions(&state, fs::Permissions::from_mode(0o666)).unwrap();
    names
}

#[test]
fn hostile_files_are_refused_one_by_one_and_the_rest_imported() {
    let (dir, theirs, ours) = spools();
    let good = queue(&theirs, BODY, None);
    let outside = dir.path().join("secret");
    let names = plant_hostile(&theirs, &good, &outside);
    let report = adopt(&ours, &options(&theirs)).unwrap();
    let reason = |name: &str| {
        report.outcomes.iter().find_map(|o| match o {
            Outcome::Refused { name: n, reason } if n == name => Some(reason.clone()),
            _ => None,
        })
    };
    assert_eq!(
        reason(&names[0]).as_deref(),
        Some("a symlink (never followed)")
    );
    assert_eq!(
        reason(&names[1]).as_deref(),
        Some("missing PORTCULLIS-SPOOL 1 header")
    );
    assert_eq!(
        reason(&names[2]).as_deref(),
        Some("envelope line truncated or longer than the limit")
    );
    assert_eq!(
        reason(&names[3]),
        Some(format!("envelope id {good} does not match the file name"))
    );
    assert_eq!(reason(&names[4]).as_deref(), Some("not a regular file"));
    assert_eq!(
        reason("notes.txt").as_deref(),
        Some("not a spool file name")
    );
    assert_eq!(imported(&report), std::slice::from_ref(&good));
    assert!(report.outcomes.iter().any(|o| matches!(o,
        Outcome::Imported { fresh: Some(why), .. } if why == "group- or world-writable (mode 0666)")));
    assert_eq!(
        ours.load(&good).unwrap().state,
        DeliveryState::fresh(1_700_000_000)
    );
    assert_eq!(ours.list().unwrap().len(), 1);
    assert_eq!(fs::read(&outside).unwrap(), b"PORTCULLIS-SPOOL 1\n");
}

#[test]
fn a_dry_run_writes_nothing_anywhere() {
    let (_d, theirs, ours) = spools();
    let id = queue(&theirs, BODY, Some(held()));
    let opts = Options {
        dry_run: true,
        ..options(&theirs)
    };
    let report = adopt(&ours, &opts).unwrap();
    assert_eq!(
        report.outcomes,
        [Outcome::WouldImport {
            from: id.clone(),
            id,
            held: true
        }]
    );
    assert_eq!(report.marker, MarkerOutcome::DryRun);
    assert!(ours.list().unwrap().is_empty());
    assert!(!ours.root().join(LEDGER).exists());
    assert!(!theirs.root().join(MARKER).exists());
    assert!(names(&ours.root().join("control")).is_empty());
}

#[test]
fn what_is_not_taken_is_counted_as_left() {
    let (_d, theirs, ours) = spools();
    queue(&theirs, BODY, None);
    fs::write(theirs.root().join("tmp").join("X.tmp"), b"half").unwrap();
    fs::write(theirs.root().join("rejected").join("junk"), b"junk").unwrap();
    theirs
        .request_retry(&crate::queue::RetryTarget::All)
        .unwrap();
    let q = queue(&theirs, BODY, None);
    fs::rename(
        theirs.root().join("queue").join(q.as_str()),
        theirs.root().join("quarantine").join(q.as_str()),
    )
    .unwrap();
    let report = adopt(&ours, &options(&theirs)).unwrap();
    assert_eq!(imported(&report).len(), 1);
    assert_eq!(
        report.left,
        Left {
            unfinished: 1,
            quarantined: 1,
            rejected: 1,
            requests: 1
        }
    );
}

#[test]
fn own_spool_no_spool_and_a_spool_adopted_elsewhere_are_refused_before_anything() {
    let (d, theirs, ours) = spools();
    queue(&theirs, BODY, None);
    let own = Options {
        dir: ours.root().to_path_buf(),
        ..options(&theirs)
    };
    assert!(matches!(adopt(&ours, &own), Err(e @ AdoptError::OwnSpool(_)) if e.is_usage()));
    let none = Options {
        dir: d.path().join("nothing"),
        ..options(&theirs)
    };
    assert!(matches!(adopt(&ours, &none), Err(AdoptError::NotASpool(_))));
    adopt(&ours, &options(&theirs)).unwrap();
    let elsewhere = Options {
        node: "edge-3".to_owned(),
        ..options(&theirs)
    };
    let err = adopt(&ours, &elsewhere).unwrap_err();
    assert!(err.is_usage());
    assert!(
        err.to_string()
            .contains("was adopted already by edge-2 into "),
        "{err}"
    );
    assert_eq!(ours.list().unwrap().len(), 1);
}

#[test]
fn a_second_adopt_on_the_same_spool_at_once_is_refused() {
    let (_d, theirs, ours) = spools();
    queue(&theirs, BODY, None);
    let opts = options(&theirs);
    let _first = Adoption::start(&ours, &opts).unwrap();
    assert!(matches!(
        Adoption::start(&ours, &opts),
        Err(AdoptError::Ledger(LedgerError::Busy(_)))
    ));
}

#[test]
fn a_ledger_line_torn_by_a_crash_costs_no_other_line() {
    let (_d, theirs, ours) = spools();
    let a = queue(&theirs, BODY, None);
    let b = queue(&theirs, BODY, None);
    fs::write(ours.root().join(LEDGER), b"{\"from\":\"0123").unwrap();
    let opts = options(&theirs);
    let mut run = Adoption::start(&ours, &opts).unwrap();
    run.import(a.as_str()).unwrap();
    run.flush().unwrap();
    drop(run);
    ours.remove(&a).unwrap();
    let report = adopt(&ours, &opts).unwrap();
    assert_eq!(imported(&report), [b]);
}

#[test]
fn short_of_space_the_run_stops_before_the_floor_and_a_rerun_goes_on() {
    let (_d, theirs, ours) = spools();
    let ids: Vec<QueueId> = (0..2).map(|_| queue(&theirs, BODY, None)).collect();
    let tight = Options {
        min_free: u64::MAX / 4,
        ..options(&theirs)
    };
    let report = adopt(&ours, &tight).unwrap();
    assert!(report.outcomes.is_empty());
    assert_eq!(report.marker, MarkerOutcome::Stopped);
    let why = report.stopped.unwrap();
    assert!(
        why.starts_with(&format!("stopped before {}: ", ids[0])),
        "{why}"
    );
    assert!(why.contains("below min_free_space"), "{why}");
    assert!(ours.list().unwrap().is_empty());
    assert!(!theirs.root().join(MARKER).exists());
    let report = adopt(&ours, &options(&theirs)).unwrap();
    assert_eq!(imported(&report), ids);
    assert_eq!(report.stopped, None);
}

#[test]
fn files_of_another_owner_are_taken_and_the_copies_are_this_spools() {
    use std::os::unix::fs::MetadataExt as _;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: giving a file to another user needs root");
        return;
    }
    let (_d, theirs, ours) = spools();
    let id = queue(&theirs, BODY, Some(held()));
    let q = theirs.root().join("queue");
    for name in [id.to_string(), format!("{id}{STATE_SUFFIX}")] {
        std::os::unix::fs::chown(q.join(name), Some(4242), Some(4242)).unwrap();
    }
    let report = adopt(&ours, &options(&theirs)).unwrap();
    assert_eq!(imported(&report), std::slice::from_ref(&id));
    let copy = fs::metadata(ours.root().join("queue").join(id.as_str())).unwrap();
    assert_eq!(copy.uid(), fs::metadata(ours.root()).unwrap().uid());
    assert_eq!(ours.load(&id).unwrap().state, held());
}

#[test]
fn a_spool_a_relay_runs_on_or_this_one_by_another_path_is_refused() {
    let (d, theirs, ours) = spools();
    queue(&theirs, BODY, None);
    let running = crate::queue::running::lock(theirs.root()).unwrap();
    let refused = Adoption::start(&ours, &options(&theirs)).err().unwrap();
    assert!(matches!(refused, AdoptError::Running(_)), "{refused}");
    assert!(refused.is_usage());
    drop(running);
    assert!(Adoption::start(&ours, &options(&theirs)).is_ok());
    // This spool under another name: refused by device and inode, not by path.
    let alias = d.path().join("alias");
    std::os::unix::fs::symlink(ours.root(), &alias).unwrap();
    let mut own = options(&ours);
    own.dir = alias.join(".");
    let refused = Adoption::start(&ours, &own).err().unwrap();
    assert!(matches!(refused, AdoptError::OwnSpool(_)), "{refused}");
}

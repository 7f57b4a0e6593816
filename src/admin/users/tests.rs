use std::time::Duration;

use super::*;
use crate::config::{Auth, User};

/// A policy whose users file `/etc/portcullis/users.toml` names `names`.
fn config(names: &[&str]) -> Config {
    let text = "[server]\nhostname = \"relay.test\"\nspool_dir = \"/nonexistent\"\n\
                [[listeners]]\nbind = \"127.0.0.1:2525\"\ntls = \"none\"\n\
                [[upstreams]]\naddress = \"127.0.0.1:25\"\n";
    let mut config = Config::from_toml(text, None).expect("valid");
    config.auth = Some(Auth {
        users_file: Some("/etc/portcullis/users.toml".into()),
        max_failures: 5,
        failure_window: Duration::from_secs(600),
        lockout: Duration::from_secs(900),
        users: (names.iter())
            .map(|name| User {
                name: (*name).to_owned(),
                password_hash: String::new(),
                senders: Vec::new(),
            })
            .collect(),
        check_display_name: true,
    });
    config
}

fn suspension(login: &str, rule: &str, reason: &str) -> Suspension {
    Suspension {
        login: login.into(),
        rule: rule.into(),
        reason: reason.into(),
        // 2023-11-14T22:13:20.000Z
        since_ms: 1_700_000_000_000,
        node: None,
        shared: false,
        store: None,
    }
}

#[test]
fn the_table_aligns_its_columns_and_shows_unknowns_as_dashes() {
    let rows = [
        Row {
            login: "alice".into(),
            suspension: None,
            messages_last_hour: Some(3),
        },
        Row {
            login: "bob@example.com".into(),
            suspension: Some(suspension("bob@example.com", "operator", "stolen password")),
            messages_last_hour: Some(120),
        },
        Row {
            login: "carol".into(),
            suspension: Some(Suspension {
                since_ms: 0,
                ..suspension("carol", "operator", "unreadable suspension record")
            }),
            messages_last_hour: None,
        },
    ];
    assert_eq!(
        table(&rows),
        "LOGIN            STATE      SINCE                     RULE      MSGS/HOUR  REASON\n\
         alice            active     -                         -         3          -\n\
         bob@example.com  suspended  2023-11-14T22:13:20.000Z  operator  120        stolen password\n\
         carol            suspended  -                         operator  -          unreadable suspension record\n"
    );
    assert_eq!(table(&[]), "LOGIN  STATE  SINCE  RULE  MSGS/HOUR  REASON\n");
}

#[test]
fn control_and_invisible_characters_never_reach_the_terminal() {
    let login = "mallory\r\nalice  active\u{1b}[2J\u{202e}";
    let reason = "line one\nline two\u{7}";
    let rows = [Row {
        login: login.into(),
        suspension: Some(suspension(login, "containment_client_ips", reason)),
        messages_last_hour: Some(1),
    }];
    let text = table(&rows);
    assert_eq!(text.lines().count(), 2, "{text:?}");
    assert!(
        text.ends_with(
            "mallory??alice  active?[2J?  suspended  2023-11-14T22:13:20.000Z  \
             containment_client_ips  1          line one?line two?\n"
        ),
        "{text:?}"
    );
    // JSON keeps the strings as they are: the reader decodes them.
    let value = json(&rows);
    assert_eq!(value[0]["login"], login);
    assert_eq!(value[0]["reason"], reason);
    let outcome = Outcome::AlreadySuspended(suspension(login, "operator", reason));
    let said = outcome_text(login, &outcome, false, Path::new("/spool"), (None, None));
    assert_eq!(
        said,
        "mallory??alice  active?[2J? is already suspended since 2023-11-14T22:13:20.000Z \
         (rule operator: line one?line two?); nothing changed\n"
    );
}

#[test]
fn json_rows_have_every_key_with_nulls_for_what_is_unknown_or_does_not_apply() {
    let rows = [
        Row {
            login: "alice".into(),
            suspension: None,
            messages_last_hour: None,
        },
        Row {
            login: "bob".into(),
            suspension: Some(suspension("bob", "operator", "stolen password")),
            messages_last_hour: Some(0),
        },
    ];
    assert_eq!(
        json(&rows),
        json!([
            {"login": "alice", "suspended": false, "rule": null, "reason": null,
             "since": null, "messages_last_hour": null},
            {"login": "bob", "suspended": true, "rule": "operator",
             "reason": "stolen password", "since": "2023-11-14T22:13:20.000Z",
             "messages_last_hour": 0},
        ])
    );
}

#[test]
fn rows_join_the_users_file_and_the_suspended_logins_sorted_by_login() {
    let config = config(&["zoe", "alice", "bob"]);
    let suspended = vec![
        suspension("bob", "operator", "x"),
        suspension("gone", "containment_rate_limit_hits", "y"),
    ];
    let counts: BTreeMap<String, u64> = [("alice".to_owned(), 7)].into();
    let got = rows(Some(&config), suspended.clone(), Some(&counts));
    let summary: Vec<(&str, bool, Option<u64>)> = (got.iter())
        .map(|r| {
            (
                r.login.as_str(),
                r.suspension.is_some(),
                r.messages_last_hour,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("alice", false, Some(7)),
            ("bob", true, Some(0)),
            ("gone", true, Some(0)),
            ("zoe", false, Some(0)),
        ]
    );
    let unknown = rows(Some(&config), suspended, None);
    assert!(unknown.iter().all(|r| r.messages_last_hour.is_none()));
    assert_eq!(
        rows(
            Some(&Config {
                auth: None,
                ..config
            }),
            vec![],
            None
        ),
        vec![]
    );
}

#[test]
fn suspend_and_resume_change_the_record_once_and_a_dry_run_never() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    let config = config(&["alice"]);
    let now = 1_700_000_000_000;
    let record = suspension("alice", OPERATOR, DEFAULT_REASON);

    let dry = suspend(
        Some(&config),
        &spool,
        None,
        "alice",
        reason(None).unwrap(),
        now,
        true,
    )
    .unwrap()
    .0;
    assert_eq!(dry, Outcome::Suspended(record.clone()));
    assert_eq!(spool.suspension("alice").unwrap(), None);
    let done = suspend(
        Some(&config),
        &spool,
        None,
        "alice",
        reason(None).unwrap(),
        now,
        false,
    )
    .unwrap()
    .0;
    assert_eq!(done, Outcome::Suspended(record.clone()));
    assert_eq!(spool.suspension("alice").unwrap(), Some(record.clone()));
    // Again, with another reason: the first suspension stays.
    let again = suspend(
        Some(&config),
        &spool,
        None,
        "alice",
        "other".into(),
        now + 5,
        false,
    )
    .unwrap()
    .0;
    assert_eq!(again, Outcome::AlreadySuspended(record.clone()));
    assert!(!again.changes());

    assert_eq!(
        resume(Some(&config), &spool, None, "alice", true).unwrap(),
        Outcome::Resumed(record.clone())
    );
    assert_eq!(spool.suspension("alice").unwrap(), Some(record.clone()));
    assert_eq!(
        resume(Some(&config), &spool, None, "alice", false).unwrap(),
        Outcome::Resumed(record)
    );
    assert_eq!(spool.suspension("alice").unwrap(), None);
    assert_eq!(
        resume(Some(&config), &spool, None, "alice", false).unwrap(),
        Outcome::NotSuspended
    );
}

#[test]
fn a_login_is_known_by_the_users_file_or_its_suspension_only() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    let config = config(&["alice"]);
    // Suspended by the relay, then removed from the users file: still resumable.
    spool
        .suspend_login(&suspension("gone", "containment_client_ips", "z"))
        .unwrap();
    assert!(known(Some(&config), &spool, "gone").unwrap().is_some());
    assert!(matches!(
        resume(Some(&config), &spool, None, "gone", false).unwrap(),
        Outcome::Resumed(_)
    ));
    for login in ["gone", "Alice", "alice\r\n", ""] {
        let err = suspend(Some(&config), &spool, None, login, "r".into(), 1, false).unwrap_err();
        assert!(err.is_usage(), "{login:?}: {err}");
        assert!(
            resume(Some(&config), &spool, None, login, false)
                .unwrap_err()
                .is_usage()
        );
    }
    let err = known(Some(&config), &spool, "bad\r\nlogin").unwrap_err();
    assert_eq!(
        err.to_string(),
        "unknown login \"bad??login\": not in the users file (/etc/portcullis/users.toml), \
         and not suspended under the spool"
    );
    let long = "x".repeat(10_000);
    let err = known(Some(&config), &spool, &long).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!(
            "unknown login \"{}… (10000 octets)\"",
            "x".repeat(64)
        )),
        "{err}"
    );
    let none = Config {
        auth: None,
        ..config
    };
    assert!(
        (known(Some(&none), &spool, "alice").unwrap_err().to_string())
            .contains("not in the users file (the policy names none)")
    );
    assert_eq!(spool.suspensions().unwrap(), vec![]);
}

#[test]
fn a_reason_is_one_bounded_line() {
    assert_eq!(reason(None).unwrap(), DEFAULT_REASON);
    assert_eq!(reason(Some("  phished  ")).unwrap(), "phished");
    let long = "r".repeat(MAX_REASON);
    assert_eq!(reason(Some(&long)).unwrap(), long);
    for bad in [
        "",
        "   ",
        "two\nlines",
        "bell\u{7}",
        &"r".repeat(MAX_REASON + 1),
    ] {
        let err = reason(Some(bad)).unwrap_err();
        assert!(err.is_usage(), "{bad:?}");
    }
}

#[test]
fn the_release_command_is_one_a_shell_runs_as_shown() {
    let config = Path::new("/etc/portcullis/portcullis.toml");
    assert_eq!(
        release_hint("alice@example.com", Some(config), None),
        "portcullis queue release --user alice@example.com --config /etc/portcullis/portcullis.toml"
    );
    assert_eq!(
        release_hint("o'neil$(rm)", None, None),
        r"portcullis queue release --user 'o'\''neil$(rm)'"
    );
    assert_eq!(
        release_hint("al ice", Some(Path::new("/my policy.toml")), None),
        "portcullis queue list --config '/my policy.toml', then portcullis queue release ID… \
         --config '/my policy.toml' (this login cannot be given to --user)"
    );
    assert_eq!(
        release_hint("bob", Some(config), Some(Path::new("/srv/spool"))),
        "portcullis queue release --user bob --config /etc/portcullis/portcullis.toml \
         --spool /srv/spool"
    );
}

#[test]
fn each_outcome_says_what_happened_and_what_comes_next() {
    let spool = Path::new("/var/spool/portcullis");
    let s = suspension("alice", OPERATOR, "phished");
    let text = |o: &Outcome, dry: bool| outcome_text("alice", o, dry, spool, (None, None));
    assert_eq!(
        text(&Outcome::Suspended(s.clone()), false),
        "suspended alice (rule operator: phished), recorded in /var/spool/portcullis/suspended/\n\
         within a second the running relay refuses its AUTH (535 5.7.8, as a wrong password), \
         closes its open sessions (421 4.7.0) and holds its queued mail; a stopped relay does \
         so when it starts\n\
         held mail stays held until released: portcullis queue release --user alice\n"
    );
    assert_eq!(
        text(&Outcome::Suspended(s.clone()), true),
        "would suspend alice (rule operator: phished); nothing changed (--dry-run)\n"
    );
    assert_eq!(
        text(&Outcome::Resumed(s.clone()), false),
        "resumed alice, suspended since 2023-11-14T22:13:20.000Z (rule operator: phished)\n\
         within a second the running relay accepts its AUTH again; its held mail stays held \
         until released: portcullis queue release --user alice\n"
    );
    assert_eq!(
        text(&Outcome::Resumed(s), true),
        "would resume alice, suspended since 2023-11-14T22:13:20.000Z (rule operator: \
         phished); nothing changed (--dry-run)\n"
    );
    assert_eq!(
        text(&Outcome::NotSuspended, false),
        "alice is not suspended; nothing changed\n"
    );
}

#[test]
fn without_a_policy_any_login_user_takes_is_known_and_no_other() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    assert_eq!(known(None, &spool, "alice").unwrap(), None);
    let err = known(None, &spool, "bad\r\nlogin").unwrap_err();
    assert!(err.is_usage());
    assert!(
        err.to_string().ends_with(
            "(no --config; nor a login --user takes), and not suspended under the spool"
        ),
        "{err}"
    );
    assert!(known(None, &spool, "").is_err());
}

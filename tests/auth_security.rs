//! AUTH lockouts that hold, against the real binary on loopback: a success does not reset
//! another login's failures, parallel connections cannot verify more than `max_failures`
//! guesses, a correct password behind a shared (NAT) address is verified after its
//! colleagues' attempts rather than refused, a flood of strangers gets `454 4.7.0` once the
//! verification queue is full while a user who logged in from the same address before still
//! gets in, one valid account's flood of correct logins cannot stall other known users, and
//! `check-config` reports argon2 parameters that are weak or mixed.
//!
//! Flooding the failure table (50,500 addresses) is tested in-process (`policy::lockout`),
//! where time and table sizes are arguments.

mod common;

use std::process::Command;
use std::thread;

use argon2::password_hash::SaltString;
use argon2::password_hash::rand_core::OsRng;
use argon2::{Algorithm, Argon2, Params, PasswordHasher, Version};
use common::*;

/// An argon2id hash of `password` with m = `m` KiB and t = `t`.
fn hash_with(m: u32, t: u32, password: &str) -> String {
    let params = Params::new(m, t, 1, None).unwrap();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password(password.as_bytes(), &SaltString::generate(&mut OsRng))
        .unwrap()
        .to_string()
}

/// `users.toml` with `alice` and `bob` (both `secret`) and the policy around it: a STARTTLS
/// submission listener requiring AUTH, `[auth]` with `auth_keys`.
fn policy(dir: &TestDir, auth_keys: &str) -> String {
    write_alice_and_bob(dir);
    config(
        &[listener("submission", free_port(), "starttls")
            + "require_tls = true\nauth = \"required\"\n"],
        free_port(),
        &format!(
            "[relay]\naccepted_domains = [\"example.com\"]\n\n\
             [limits]\nmax_connections_per_ip = 50\n\n\
             [auth]\nusers_file = \"{{dir}}/users.toml\"\n{auth_keys}\n"
        ),
    )
}

fn submission(auth_keys: &str) -> Relay {
    let dir = TestDir::new();
    let toml = policy(&dir, auth_keys);
    Relay::start_in(dir, &toml)
}

/// The reply code and enhanced code of a reply.
fn codes(reply: &(u16, String)) -> (u16, String) {
    let enhanced = reply
        .1
        .split_whitespace()
        .find(|t| t.contains('.'))
        .unwrap_or("")
        .to_string();
    (reply.0, enhanced)
}

/// How many log lines carry `rule=RULE`.
fn count(log: &str, rule: &str) -> usize {
    count_log_fields(log, &[("rule", rule)])
}

#[test]
fn success_as_another_login_does_not_reset_the_address_failures() {
    // The reported attack: 6 rounds of 4 wrong passwords for bob, each followed by a correct
    // login as alice, from one address. Before the fix: 24 guesses verified, no lockout.
    let relay = submission("max_failures = 5\nfailure_window = \"10m\"\nlockout = \"1h\"\n");
    let mut replies = Vec::new();
    for _ in 0..6 {
        let mut c = tls_from(&relay, "127.0.0.2");
        for _ in 0..4 {
            replies.push(codes(&c.cmd(&auth_plain("bob", "guess"))));
        }
        replies.push(codes(&c.cmd(&auth_plain("alice", "secret"))));
    }
    let wrong = (535, "5.7.8".to_string());
    let locked = (454, "4.7.0".to_string());
    let ok = (235, "2.7.0".to_string());
    let mut expected = vec![wrong.clone(); 4];
    expected.push(ok);
    expected.push(wrong);
    expected.extend(std::iter::repeat_n(locked, 24));
    assert_eq!(replies, expected);
    let log = relay.log();
    assert_eq!(count(&log, "auth_bad_password"), 5, "{log}");
    assert_log_fields(&relay, &[("rule", "auth_lockout"), ("failures", "5")]);
    assert_log_fields(&relay, &[("rule", "auth_lockout"), ("reply", "454 4.7.0")]);
}

#[test]
fn parallel_connections_cannot_verify_more_than_max_failures_guesses() {
    // The reported attack: 20 TLS connections from one address, 3 wrong AUTHs each, with
    // max_failures = 5. Before the fix: 24 guesses verified.
    let relay = submission("max_failures = 5\nfailure_window = \"10m\"\nlockout = \"15m\"\n");
    let replies: Vec<(u16, String)> = thread::scope(|s| {
        let handles: Vec<_> = (0..20)
            .map(|i| {
                let relay = &relay;
                s.spawn(move || {
                    let mut c = tls_from(relay, "127.0.0.3");
                    (0..3)
                        .map(|j| codes(&c.cmd(&auth_plain("bob", &format!("guess-{i}-{j}")))))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(replies.len(), 60);
    let verified = replies.iter().filter(|r| r.0 == 535).count();
    assert_eq!(verified, 5, "{replies:?}");
    for r in replies.iter().filter(|r| r.0 != 535) {
        assert_eq!(r, &(454, "4.7.0".to_string()), "{replies:?}");
    }
    let log = relay.log();
    assert_eq!(count(&log, "auth_bad_password"), 5, "{log}");
    // The owner, from another address, is not affected.
    let mut c = tls_from(&relay, "127.0.0.4");
    assert_reply(&c.cmd(&auth_plain("bob", "secret")), 235, "2.7.0");
}

#[test]
fn correct_password_behind_a_shared_address_waits_for_colleagues_instead_of_failing() {
    // An office behind one NAT address: four colleagues mistype their passwords while alice
    // logs in, all at once. With max_failures = 5 their four attempts hold four of the five
    // failures in flight; alice's attempt waits for them and succeeds.
    let relay = submission("max_failures = 5\n");
    let replies: Vec<(String, (u16, String))> = thread::scope(|s| {
        let handles: Vec<_> = ["bob", "bob", "bob", "bob", "alice"]
            .into_iter()
            .map(|user| {
                let relay = &relay;
                s.spawn(move || {
                    let mut c = tls_from(relay, "127.0.0.5");
                    let pass = if user == "alice" { "secret" } else { "typo" };
                    (user.to_string(), codes(&c.cmd(&auth_plain(user, pass))))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (user, reply) in &replies {
        let want = if user == "alice" {
            (235, "2.7.0".to_string())
        } else {
            (535, "5.7.8".to_string())
        };
        assert_eq!(reply, &want, "{user}: {replies:?}");
    }
    assert!(!relay.has_fields(&[("rule", "auth_lockout")]));
}

#[test]
fn check_config_warns_about_weak_and_mixed_argon2_parameters() {
    let dir = TestDir::new();
    let toml = policy(&dir, "");
    // Two users keep the default set; one is weaker than every OWASP configuration
    // (m=8, t=1), one is stronger but different (m=65536, t=3).
    let default = secret_hash();
    let weak = hash_with(8, 1, "pw");
    let strong = hash_with(65536, 3, "pw");
    dir.write(
        "users.toml",
        format!(
            "[[users]]\nname = \"alice\"\npassword_hash = \"{default}\"\n\
             [[users]]\nname = \"bob\"\npassword_hash = \"{default}\"\n\
             [[users]]\nname = \"carol\"\npassword_hash = \"{weak}\"\n\
             [[users]]\nname = \"dave\"\npassword_hash = \"{strong}\"\n"
        ),
    );
    write_certs(&dir.join("certs"));
    let path = dir.write("portcullis.toml", dir.expand(&toml));
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("User \"carol\" has password hashes with argon2id m=8,t=1,p=1, weaker than every argon2id configuration of the OWASP Password Storage Cheat Sheet"),
        "{text}"
    );
    assert!(!text.contains("User \"dave\" has password"), "{text}");
    assert!(
        text.contains("mixes argon2 parameter sets: most users have argon2id m=19456,t=2,p=1"),
        "{text}"
    );
    assert!(
        text.contains("argon2id m=65536,t=3,p=1 (\"dave\")"),
        "{text}"
    );

    // One parameter set that meets OWASP: neither warning.
    dir.write(
        "users.toml",
        format!(
            "[[users]]\nname = \"alice\"\npassword_hash = \"{default}\"\n\
             [[users]]\nname = \"bob\"\npassword_hash = \"{default}\"\n"
        ),
    );
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("OWASP"), "{text}");
    assert!(!text.contains("mixes argon2"), "{text}");
}

#[test]
fn strangers_flooding_auth_get_454_when_the_queue_is_full_and_a_known_user_still_gets_in() {
    // Every hash (and so the dummy for unknown logins) costs about 0.3 s here, so all the
    // strangers' AUTHs arrive while the first verifications run: hash slots + 32 of them are
    // admitted to the strangers' queue (one per core running, 32 waiting), the rest get 454
    // at once and nothing is verified for them.
    // Alice has logged in from her address before: her AUTH has its own queue and gets in.
    let dir = TestDir::new();
    let toml = policy(&dir, "max_failures = 5\n");
    let slow = hash_with(19456, 16, "secret");
    dir.write(
        "users.toml",
        format!(
            "[[users]]\nname = \"alice\"\npassword_hash = \"{slow}\"\nsenders = [\"alice@example.com\"]\n"
        ),
    );
    let relay = Relay::start_in(dir, &toml);
    let slots = std::thread::available_parallelism().map_or(1, |n| n.get());
    let admitted = slots + 32;
    let strangers = admitted + 6;
    assert_reply(
        &tls_from(&relay, "127.0.0.6").cmd(&auth_plain("alice", "secret")),
        235,
        "2.7.0",
    );

    let mut alice = tls_from(&relay, "127.0.0.6");
    let mut flood: Vec<SmtpClient> = (0..strangers)
        .map(|i| tls_from(&relay, &format!("127.20.{}.{}", i / 200, i % 200 + 1)))
        .collect();
    for (i, c) in flood.iter_mut().enumerate() {
        c.send_raw(format!("{}\r\n", auth_plain(&format!("intruder{i}"), "guess")).as_bytes());
    }
    assert_reply(&alice.cmd(&auth_plain("alice", "secret")), 235, "2.7.0");

    let replies: Vec<(u16, String)> = flood.iter_mut().map(|c| codes(&c.read_reply())).collect();
    let busy = replies
        .iter()
        .filter(|r| **r == (454, "4.7.0".to_string()))
        .count();
    let verified = replies
        .iter()
        .filter(|r| **r == (535, "5.7.8".to_string()))
        .count();
    assert_eq!(
        (busy, verified),
        (strangers - admitted, admitted),
        "{replies:?}"
    );
    let log = relay.log();
    assert_eq!(count(&log, "auth_busy"), strangers - admitted, "{log}");
    assert_eq!(count(&log, "auth_unknown_user"), admitted, "{log}");
}

/// Someone with alice's password logs in once from 16 addresses (each becomes "known" for
/// alice), then sends a correct AUTH from all 16 at once; carol, known at her own address,
/// logs in right after. Only two of alice's verifications may wait in the known queue, the rest
/// queue with strangers, so carol is verified after at most those two and the ones running.
/// Before, every one of alice's 16 went first (carol got `454` or waited for all of them).
#[test]
fn one_valid_account_cannot_stall_other_known_logins() {
    let dir = TestDir::new();
    let toml = policy(&dir, "max_failures = 5\n");
    // About 0.3 s per verification, so the flood is queued while the first ones run.
    let slow = hash_with(19456, 16, "secret");
    dir.write(
        "users.toml",
        format!(
            "[[users]]\nname = \"alice\"\npassword_hash = \"{slow}\"\nsenders = [\"alice@example.com\"]\n\n\
             [[users]]\nname = \"carol\"\npassword_hash = \"{slow}\"\nsenders = [\"carol@example.com\"]\n"
        ),
    );
    let relay = Relay::start_in(dir, &toml);
    let slots = std::thread::available_parallelism().map_or(1, |n| n.get());
    let addrs: Vec<String> = (1..=16).map(|i| format!("127.21.0.{i}")).collect();
    // Each address (and carol's) becomes known by one successful login.
    let mut flood: Vec<SmtpClient> = thread::scope(|s| {
        let known: Vec<_> = addrs
            .iter()
            .map(|ip| {
                let relay = &relay;
                s.spawn(move || {
                    let mut c = tls_from(relay, ip);
                    assert_reply(&c.cmd(&auth_plain("alice", "secret")), 235, "2.7.0");
                    tls_from(relay, ip)
                })
            })
            .collect();
        known.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_reply(
        &tls_from(&relay, "127.21.1.1").cmd(&auth_plain("carol", "secret")),
        235,
        "2.7.0",
    );
    let mut carol = tls_from(&relay, "127.21.1.1");

    for c in &mut flood {
        c.send_raw(format!("{}\r\n", auth_plain("alice", "secret")).as_bytes());
    }
    // Let the flood's verifications be queued before carol's.
    thread::sleep(std::time::Duration::from_millis(200));
    let answered = std::sync::Mutex::new(Vec::new());
    thread::scope(|s| {
        for (i, c) in flood.iter_mut().enumerate() {
            let answered = &answered;
            s.spawn(move || {
                assert_reply(&c.read_reply(), 235, "2.7.0");
                answered.lock().unwrap().push(format!("alice{i}"));
            });
        }
        assert_reply(&carol.cmd(&auth_plain("carol", "secret")), 235, "2.7.0");
        answered.lock().unwrap().push("carol".to_string());
    });
    let order = answered.into_inner().unwrap();
    let before_carol = order.iter().position(|n| n == "carol").unwrap();
    // Two of alice's in the known queue ahead of carol, plus one running per hash slot.
    assert!(
        before_carol <= 2 + slots,
        "{before_carol} of alice's logins were verified before carol's: {order:?}"
    );
}

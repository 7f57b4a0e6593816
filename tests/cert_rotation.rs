//! A renewed TLS certificate and key take effect on SIGHUP (what `systemctl reload` and an
//! ACME client's deploy hook send), on STARTTLS and implicit-TLS listeners alike, without a
//! restart and without dropping a session already encrypted with the old one; a pair that does
//! not load (a key that is not the certificate's, a truncated file) is refused and the running
//! one stays.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(10);

/// A relay with a STARTTLS listener (port 0 of its ports) and an implicit-TLS one (port 1),
/// relaying for loopback to an upstream that is never reached (mail stays queued).
fn relay() -> Relay {
    let text = config(
        &[
            listener("submission", free_port(), "starttls"),
            listener("smtps", free_port(), "implicit"),
        ],
        free_port(),
        "[relay]\nrelay_networks = [\"127.0.0.0/8\"]\n",
    );
    Relay::start(&text)
}

/// A fresh self-signed pair for `localhost` (another key, another certificate) under `dir`.
fn new_pair(dir: &Path) -> (PathBuf, PathBuf) {
    fs::create_dir_all(dir).unwrap();
    write_certs(dir)
}

/// Install `cert` and `key` where the policy names them, as a renewal does: each written
/// beside its target and renamed over it.
fn install(relay: &Relay, cert: &Path, key: &Path) {
    for (from, name) in [(cert, "cert.pem"), (key, "key.pem")] {
        let target = relay.dir().join("certs").join(name);
        let tmp = target.with_extension("new");
        fs::copy(from, &tmp).unwrap();
        fs::rename(&tmp, &target).unwrap();
    }
}

/// A new session through STARTTLS that trusts only `cert`: it completes only if the relay
/// serves that certificate.
fn starttls_trusting(relay: &Relay, cert: &Path) -> SmtpClient {
    let mut c = SmtpClient::connect(relay.port(0));
    c.expect_reply(220);
    c.expect("EHLO client.test", 250);
    c.starttls(cert);
    c.expect("EHLO client.test", 250);
    c
}

/// A new implicit-TLS session trusting only `cert`, greeted.
fn implicit_trusting(relay: &Relay, cert: &Path) -> SmtpClient {
    let mut c = SmtpClient::connect(relay.port(1));
    c.upgrade_tls(cert, "localhost");
    c.expect_reply(220);
    c
}

fn send(c: &mut SmtpClient, subject: &str) {
    let (code, text) = c.send_message(
        "a@example.org",
        &["b@example.com"],
        &format!("From: <a@example.org>\r\nSubject: {subject}\r\n\r\nhello\r\n"),
    );
    assert_eq!(code, 250, "{text}");
}

/// SIGHUP, then the number of `configuration reloaded` (or `reload refused`) lines to wait for.
fn reload(relay: &Relay, needle: &str, count: usize) {
    relay.sighup();
    assert!(
        wait_until(WAIT, || relay.log().matches(needle).count() >= count),
        "no {needle:?} after SIGHUP:\n{}",
        relay.log()
    );
}

#[test]
fn a_renewed_certificate_takes_effect_on_sighup_and_an_invalid_one_is_refused() {
    let relay = relay();
    let first = relay.dir().join("first");
    fs::create_dir_all(&first).unwrap();
    fs::copy(relay.cert_path(), first.join("cert.pem")).unwrap();
    let first = first.join("cert.pem");

    // Sessions encrypted with the first certificate, open across the renewal.
    let mut open_starttls = starttls_trusting(&relay, &first);
    let mut open_implicit = implicit_trusting(&relay, &first);

    let (renewed, renewed_key) = new_pair(&relay.dir().join("renewed"));
    install(&relay, &renewed, &renewed_key);
    reload(&relay, "configuration reloaded", 1);

    // New sessions get the renewed certificate (a client trusting only it completes its
    // handshake) on both kinds of listener.
    let mut c = starttls_trusting(&relay, &renewed);
    send(&mut c, "after renewal, STARTTLS");
    c.expect("QUIT", 221);
    let mut c = implicit_trusting(&relay, &renewed);
    c.expect("EHLO client.test", 250);
    send(&mut c, "after renewal, implicit TLS");
    c.expect("QUIT", 221);

    // The sessions opened before go on with the first one.
    send(&mut open_starttls, "open across the renewal, STARTTLS");
    open_starttls.expect("QUIT", 221);
    open_implicit.expect("EHLO client.test", 250);
    send(&mut open_implicit, "open across the renewal, implicit TLS");
    open_implicit.expect("QUIT", 221);

    // A key that is not the certificate's: refused, the renewed pair stays.
    let (_, other_key) = new_pair(&relay.dir().join("other"));
    install(&relay, &renewed, &other_key);
    reload(&relay, "reload refused", 1);
    let mut c = starttls_trusting(&relay, &renewed);
    send(&mut c, "after a mismatched key");
    c.expect("QUIT", 221);

    // A truncated certificate (a renewal caught half-written): refused too.
    let text = fs::read_to_string(&renewed).unwrap();
    let cut = relay.dir().join("cut.pem");
    fs::write(&cut, &text[..text.len() / 2]).unwrap();
    install(&relay, &cut, &renewed_key);
    reload(&relay, "reload refused", 2);
    let mut c = implicit_trusting(&relay, &renewed);
    c.expect("EHLO client.test", 250);
    c.expect("QUIT", 221);
    assert_eq!(
        relay.log().matches("configuration reloaded").count(),
        1,
        "{}",
        relay.log()
    );
}

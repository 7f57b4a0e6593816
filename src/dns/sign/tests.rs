//! Signing tests: each signature is checked by mail-auth's verifier, the public keys served
//! from pre-filled caches (no query leaves the process).

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use mail_auth::common::verify::DomainKey;
use mail_auth::{AuthenticatedMessage, DkimResult};

use super::*;
use crate::config::{DkimSign, Dns};
use crate::dns::Resolver;
use crate::dns::keys::SigningKey;

/// A key made once per test run by `openssl` (`genrsa -traditional`: PKCS#1, as OpenDKIM
/// keys are; `genpkey -algorithm ed25519`: PKCS#8).
fn generated(name: &str, args: &[&str]) -> Arc<SigningKey> {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("temporary directory"));
    let path: PathBuf = dir.path().join(name);
    let (command, rest) = args.split_first().expect("an openssl command");
    let status = Command::new("openssl")
        .arg(command)
        .arg("-out")
        .arg(&path)
        .args(rest)
        .status()
        .expect("openssl runs");
    assert!(status.success(), "openssl {args:?} failed");
    Arc::new(SigningKey::load(&path).expect("the generated key loads"))
}

/// An RSA-2048 key (PKCS#1 PEM).
pub(crate) fn rsa_key() -> Arc<SigningKey> {
    static KEY: OnceLock<Arc<SigningKey>> = OnceLock::new();
    KEY.get_or_init(|| generated("rsa.pem", &["genrsa", "-traditional", "2048"]))
        .clone()
}

/// A second RSA-2048 key, for records that do not match [`rsa_key`].
pub(crate) fn other_rsa_key() -> Arc<SigningKey> {
    static KEY: OnceLock<Arc<SigningKey>> = OnceLock::new();
    KEY.get_or_init(|| generated("rsa2.pem", &["genrsa", "-traditional", "2048"]))
        .clone()
}

/// An Ed25519 key (PKCS#8 PEM).
pub(crate) fn ed25519_key() -> Arc<SigningKey> {
    static KEY: OnceLock<Arc<SigningKey>> = OnceLock::new();
    KEY.get_or_init(|| generated("ed.pem", &["genpkey", "-algorithm", "ed25519"]))
        .clone()
}

/// A `[[dkim.sign]]` entry with the default header list.
pub(crate) fn entry(domain: &str, selector: &str, key: Arc<SigningKey>) -> DkimSign {
    DkimSign {
        domain: domain.into(),
        selector: selector.into(),
        key_path: PathBuf::from(format!("/keys/{selector}.pem")),
        key,
        headers: crate::config::DEFAULT_DKIM_HEADERS
            .iter()
            .map(|h| h.to_string())
            .collect(),
    }
}

/// A resolver whose only name server is a closed loopback port, so that a lookup the caches
/// do not answer fails at once.
pub(crate) fn offline_resolver() -> Resolver {
    Resolver::new(&Dns {
        nameservers: vec!["127.0.0.1:9".parse().expect("address")],
        timeout: Duration::from_secs(1),
    })
    .expect("resolver")
}

/// Cache lifetime of pre-filled records.
pub(crate) fn later() -> Instant {
    Instant::now() + Duration::from_secs(600)
}

/// Publish `entry`'s public key in `resolver`'s caches.
fn publish(resolver: &Resolver, entry: &DkimSign) {
    let name = format!("{}._domainkey.{}", entry.selector, entry.domain);
    resolver
        .caches()
        .add_txt::<DomainKey>(&name, entry.key.dns_record().as_bytes(), later());
}

const MESSAGE: &str = concat!(
    "From: Alice <alice@example.test>\r\n",
    "To: bob@example.org\r\n",
    "Subject: Quarterly figures\r\n",
    "Date: Tue, 1 Dec 2026 00:00:00 +0000\r\n",
    "Message-ID: <1@example.test>\r\n",
    "X-Unsigned: not in h=\r\n",
    "\r\n",
    "Hello Bob,\r\n",
    "\r\n",
    "the figures are   attached.  \r\n",
);

/// The DKIM results mail-auth's verifier gives `message`, one per signature.
fn verify(resolver: &Resolver, message: &[u8]) -> Vec<DkimResult> {
    let parsed = AuthenticatedMessage::parse(message).expect("message parses");
    let outputs = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(
            resolver
                .authenticator()
                .verify_dkim(resolver.caches().parameters(&parsed)),
        );
    outputs.iter().map(|o| o.result().clone()).collect()
}

fn signed(message: &str, entries: &[&DkimSign]) -> (String, String) {
    let fields = sign(message.as_bytes(), entries).expect("signs");
    (fields.clone(), format!("{fields}{message}"))
}

fn parsed_signatures(fields: &str) -> Vec<mail_auth::dkim::Signature> {
    fields
        .split("DKIM-Signature:")
        .skip(1)
        .map(|value| mail_auth::dkim::Signature::parse(value.as_bytes()).expect("our field parses"))
        .collect()
}

#[test]
fn an_rsa_signature_verifies() {
    let resolver = offline_resolver();
    let e = entry("example.test", "rsa", rsa_key());
    publish(&resolver, &e);
    let (_, message) = signed(MESSAGE, &[&e]);
    assert_eq!(
        verify(&resolver, message.as_bytes()),
        vec![DkimResult::Pass]
    );
}

#[test]
fn an_ed25519_signature_verifies() {
    let resolver = offline_resolver();
    let e = entry("example.test", "ed", ed25519_key());
    publish(&resolver, &e);
    let (fields, message) = signed(MESSAGE, &[&e]);
    assert_eq!(
        parsed_signatures(&fields)[0].a,
        mail_auth::common::crypto::Algorithm::Ed25519Sha256
    );
    assert_eq!(
        verify(&resolver, message.as_bytes()),
        vec![DkimResult::Pass]
    );
}

#[test]
fn a_body_changed_after_signing_fails_verification() {
    let resolver = offline_resolver();
    let e = entry("example.test", "rsa", rsa_key());
    publish(&resolver, &e);
    let (_, message) = signed(MESSAGE, &[&e]);
    let tampered = message.replace("figures are", "figures were");
    let results = verify(&resolver, tampered.as_bytes());
    assert_eq!(results.len(), 1);
    assert_ne!(results[0], DkimResult::Pass);
}

#[test]
fn two_entries_for_one_domain_add_two_signatures_in_entry_order() {
    let resolver = offline_resolver();
    let rsa = entry("example.test", "rsa", rsa_key());
    let ed = entry("example.test", "ed", ed25519_key());
    publish(&resolver, &rsa);
    publish(&resolver, &ed);
    let entries = [rsa.clone(), ed.clone()];
    let signers = signers_for(MESSAGE.as_bytes(), &entries);
    assert_eq!(signers.len(), 2);
    let (fields, message) = signed(MESSAGE, &signers);
    let selectors: Vec<String> = parsed_signatures(&fields)
        .into_iter()
        .map(|s| s.s)
        .collect();
    assert_eq!(selectors, ["rsa", "ed"]);
    assert_eq!(
        verify(&resolver, message.as_bytes()),
        vec![DkimResult::Pass, DkimResult::Pass]
    );
}

#[test]
fn signatures_are_relaxed_relaxed_with_t_and_without_l() {
    let e = entry("example.test", "rsa", rsa_key());
    let (fields, _) = signed(MESSAGE, &[&e]);
    let sig = &parsed_signatures(&fields)[0];
    assert_eq!(sig.ch, mail_auth::dkim::Canonicalization::Relaxed);
    assert_eq!(sig.cb, mail_auth::dkim::Canonicalization::Relaxed);
    assert_eq!((sig.d.as_str(), sig.s.as_str()), ("example.test", "rsa"));
    assert!(sig.t > 1_700_000_000, "t= is the signing time: {}", sig.t);
    assert_eq!(sig.l, 0, "no l=");
    assert!(!fields.contains("l="), "{fields}");
}

#[test]
fn the_fields_are_folded_and_each_ends_in_crlf() {
    let rsa = entry("example.test", "rsa", rsa_key());
    let ed = entry("example.test", "ed", ed25519_key());
    let (fields, _) = signed(MESSAGE, &[&rsa, &ed]);
    assert!(fields.starts_with("DKIM-Signature: "));
    assert!(fields.ends_with("\r\n"));
    assert_eq!(fields.matches("DKIM-Signature: ").count(), 2);
    for line in fields.split_terminator("\r\n") {
        // mail-auth folds near 78 octets (RFC 5322 §2.1.1 SHOULD), always far below 998.
        assert!(line.len() <= 100, "line over 100 octets: {line:?}");
        assert!(
            line.starts_with("DKIM-Signature: ") || line.starts_with('\t'),
            "a continuation line starts with white space: {line:?}"
        );
    }
    assert!(fields.matches("\r\n\t").count() >= 4, "folded: {fields}");
    assert!(!fields.replace("\r\n", "").contains(['\r', '\n']));
}

#[test]
fn from_is_oversigned_so_an_added_from_breaks_the_signature() {
    let resolver = offline_resolver();
    let e = entry("example.test", "rsa", rsa_key());
    publish(&resolver, &e);
    let (fields, message) = signed(MESSAGE, &[&e]);
    let h = &parsed_signatures(&fields)[0].h;
    let froms = h.iter().filter(|n| n.eq_ignore_ascii_case("from")).count();
    assert_eq!(froms, 2, "h= is {h:?}");
    assert!(
        !h.iter().any(|n| n.eq_ignore_ascii_case("x-unsigned")),
        "only the listed fields are signed: {h:?}"
    );
    // A field appended above the signed ones (where a verifier looks first) is covered.
    let (head, body) = message.split_once("\r\n\r\n").expect("header section");
    let forged = format!("{head}\r\nFrom: mallory@evil.test\r\n\r\n{body}");
    let results = verify(&resolver, forged.as_bytes());
    assert_eq!(results.len(), 1);
    assert_ne!(results[0], DkimResult::Pass);
}

#[test]
fn signers_follow_the_one_from_domain() {
    let entries = [
        entry("example.test", "rsa", rsa_key()),
        entry("other.test", "rsa", rsa_key()),
        entry("xn--bcher-kva.example", "rsa", rsa_key()),
        entry("example.test", "ed", ed25519_key()),
    ];
    let selectors = |headers: &str| -> Vec<(String, String)> {
        let message = format!("{headers}\r\nbody\r\n");
        signers_for(message.as_bytes(), &entries)
            .into_iter()
            .map(|e| (e.domain.clone(), e.selector.clone()))
            .collect()
    };
    let both = vec![
        ("example.test".to_string(), "rsa".to_string()),
        ("example.test".to_string(), "ed".to_string()),
    ];
    let table: [(&str, Vec<(String, String)>); 9] = [
        ("From: a@example.test\r\n", both.clone()),
        ("From: \"A\" <a@EXAMPLE.Test>\r\n", both.clone()),
        ("From: a@example.test, b@example.test\r\n", both.clone()),
        (
            "From: a@Bücher.example\r\n",
            vec![("xn--bcher-kva.example".into(), "rsa".into())],
        ),
        ("From: a@unsigned.test\r\n", vec![]),
        ("From: a@example.test, b@other.test\r\n", vec![]),
        ("From: a@example.test\r\nFrom: a@example.test\r\n", vec![]),
        ("To: b@example.test\r\n", vec![]),
        ("From: not an address\r\n", vec![]),
    ];
    for (headers, expected) in table {
        assert_eq!(selectors(headers), expected, "{headers:?}");
    }
}

#[test]
fn a_subdomain_of_a_signing_domain_has_no_signer() {
    let entries = [entry("example.test", "rsa", rsa_key())];
    let message = b"From: a@mail.example.test\r\n\r\nbody\r\n";
    assert!(signers_for(message, &entries).is_empty());
}

/// CPU time of one signature over a 10 KB message, per algorithm. Run it in an optimised
/// build: `cargo test --profile bench-smoke --lib dns::sign::tests::cpu -- --ignored
/// --nocapture`.
#[test]
#[ignore = "a measurement, not a test: run by hand in an optimised build"]
fn cpu_time_per_10_kb_message() {
    const MESSAGES: u32 = 1000;
    let mut body = String::new();
    while body.len() < 10 * 1024 {
        body.push_str("The quick brown fox jumps over the lazy dog, again and again.\r\n");
    }
    let message = format!(
        "From: a@example.test\r\nTo: b@example.org\r\nSubject: s\r\nDate: Tue, 1 Dec 2026 \
         00:00:00 +0000\r\nMessage-ID: <m@example.test>\r\n\r\n{body}"
    );
    for (name, key) in [("RSA-2048", rsa_key()), ("Ed25519", ed25519_key())] {
        let e = entry("example.test", "sel", key);
        let start = thread_cpu_time();
        for _ in 0..MESSAGES {
            std::hint::black_box(sign(message.as_bytes(), &[&e]).expect("signs"));
        }
        let per = (thread_cpu_time() - start) / MESSAGES;
        println!(
            "{name}: {:.1} µs CPU per {} B message ({MESSAGES} messages)",
            per.as_secs_f64() * 1e6,
            message.len()
        );
    }
}

fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[test]
fn a_from_domain_dmarc_cannot_look_up_has_no_signer() {
    // The signer reads the From: domain as the verifier does (dns::verify::from_domain): a
    // domain DMARC would count as missing is never signed for.
    let entries = [entry("example.test", "rsa", rsa_key())];
    for from in [
        "a@example.test.",
        "A <a@example.test.>",
        "a@example..test",
        "a@[127.0.0.1]",
        "a@example.test, b@",
    ] {
        let message = format!("From: {from}\r\n\r\nbody\r\n");
        assert!(
            signers_for(message.as_bytes(), &entries).is_empty(),
            "{from}"
        );
    }
}

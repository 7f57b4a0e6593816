//! In-process checks: every record comes from pre-filled caches; the resolver has no name
//! server, so a name missing from them fails at once, as a DNS error would.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use base64::Engine;
use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::DkimSigner;
use mail_auth::dmarc::Dmarc;
use mail_auth::hickory_resolver::config::{ResolverConfig, ResolverOpts};
use mail_auth::hickory_resolver::proto::op::ResponseCode;
use mail_auth::spf::Spf;
use mail_auth::{MessageAuthenticator, Txt};

use super::*;
use crate::dns::cache::Caches;

const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));

fn later() -> Instant {
    Instant::now() + Duration::from_secs(600)
}

fn offline() -> Resolver {
    let authenticator = MessageAuthenticator::new(
        ResolverConfig::from_name_servers(vec![]),
        ResolverOpts::default(),
    )
    .expect("resolver");
    Resolver::from_parts(
        authenticator,
        Duration::from_millis(300),
        Caches::with_capacity(64),
    )
}

/// A name that does not exist (NXDOMAIN), as mail-auth caches a failed TXT lookup.
fn nxdomain(resolver: &Resolver, name: &str) {
    resolver.caches().txt.insert(
        name.into(),
        Txt::Error(AuthError::Dns(DnsError::RecordNotFound(
            ResponseCode::NXDomain,
        ))),
        later(),
    );
}

fn spf_record(resolver: &Resolver, name: &str, record: &str) {
    resolver
        .caches()
        .add_txt::<Spf>(name, record.as_bytes(), later());
}

async fn spf_of(resolver: &Resolver, record: &str) -> SpfCheck {
    spf_record(resolver, "example.org", record);
    resolver
        .spf(CLIENT, "mx.example.org", Some("user@example.org"))
        .await
}

#[tokio::test]
async fn spf_results_follow_the_record() {
    let cases = [
        ("v=spf1 ip4:192.0.2.0/24 -all", SpfResult::Pass),
        ("v=spf1 ip4:198.51.100.1 -all", SpfResult::Fail),
        ("v=spf1 ip4:198.51.100.1 ~all", SpfResult::SoftFail),
        ("v=spf1 ?all", SpfResult::Neutral),
        ("v=spf1 ip4:not-an-address -all", SpfResult::PermError),
        (
            "v=spf1 include:missing.example.org -all",
            SpfResult::PermError,
        ),
    ];
    for (record, expected) in cases {
        let resolver = offline();
        nxdomain(&resolver, "missing.example.org.");
        let check = spf_of(&resolver, record).await;
        assert_eq!(check.result, expected, "{record}");
        assert_eq!(check.identity, SpfIdentity::MailFrom);
        assert_eq!(check.domain, "example.org");
    }
}

#[tokio::test]
async fn spf_none_without_a_record_and_for_a_domain_literal() {
    let resolver = offline();
    nxdomain(&resolver, "example.org.");
    let check = resolver
        .spf(CLIENT, "mx.example.org", Some("u@example.org"))
        .await;
    assert_eq!(check.result, SpfResult::None);
    let check = resolver
        .spf(CLIENT, "mx.example.org", Some("u@[192.0.2.1]"))
        .await;
    assert_eq!(check.result, SpfResult::None);
}

#[tokio::test]
async fn spf_of_a_null_reverse_path_checks_the_helo_name() {
    let resolver = offline();
    spf_record(&resolver, "mx.example.net", "v=spf1 ip4:192.0.2.10 -all");
    let check = resolver.spf(CLIENT, "mx.example.net", None).await;
    assert_eq!(check.result, SpfResult::Pass);
    assert_eq!(check.identity, SpfIdentity::Helo);
    assert_eq!(check.subject, "mx.example.net");
}

#[tokio::test]
async fn spf_over_ten_lookups_or_looping_includes_is_permerror() {
    let resolver = offline();
    let chain: String = (0..11)
        .map(|i| format!(" include:i{i}.example.org"))
        .collect();
    for i in 0..11 {
        spf_record(
            &resolver,
            &format!("i{i}.example.org"),
            "v=spf1 ?ip4:203.0.113.1",
        );
    }
    let check = spf_of(&resolver, &format!("v=spf1{chain} -all")).await;
    assert_eq!(check.result, SpfResult::PermError);

    let resolver = offline();
    spf_record(
        &resolver,
        "loop.example.org",
        "v=spf1 include:example.org -all",
    );
    let check = spf_of(&resolver, "v=spf1 include:loop.example.org -all").await;
    assert_eq!(check.result, SpfResult::PermError, "include loop");

    let resolver = offline();
    spf_record(&resolver, "loop.example.org", "v=spf1 redirect=example.org");
    let check = spf_of(&resolver, "v=spf1 redirect=loop.example.org").await;
    assert_eq!(check.result, SpfResult::PermError, "redirect loop");
}

#[tokio::test]
async fn spf_lookup_error_is_temperror_never_pass() {
    let resolver = offline();
    // a:uncached.example.org is not in the caches: the lookup fails.
    let check = spf_of(&resolver, "v=spf1 a:uncached.example.org +all").await;
    assert_eq!(check.result, SpfResult::TempError);
    let check = resolver
        .spf(CLIENT, "mx.example.org", Some("u@uncached.example.net"))
        .await;
    assert_eq!(check.result, SpfResult::TempError);
}

#[tokio::test]
async fn iprev_passes_when_the_ptr_name_resolves_back_and_fails_otherwise() {
    // The PTR name's address is the client's (pass) or another (fail).
    let cases = [
        (Ipv4Addr::new(192, 0, 2, 10), IprevResult::Pass),
        (Ipv4Addr::new(198, 51, 100, 1), IprevResult::Fail),
    ];
    for (address, expected) in cases {
        let resolver = offline();
        resolver
            .caches()
            .add_ptr(CLIENT, vec!["mail.example.org."], later());
        resolver
            .caches()
            .add_ipv4("mail.example.org", vec![address], later());
        let check = resolver.iprev(CLIENT).await;
        assert_eq!(check.result, expected, "{address}");
        if expected == IprevResult::Pass {
            assert_eq!(check.name.as_deref(), Some("mail.example.org"));
        }
    }
}

// DKIM and DMARC.

const MESSAGE: &str = "From: Alice <alice@example.org>\r\nTo: bob@example.net\r\n\
    Subject: test\r\nDate: Mon, 30 Nov 2026 10:00:00 +0000\r\nMessage-ID: <1@example.org>\r\n\r\n\
    Hello.\r\n";

struct Keys {
    rsa_der: Vec<u8>,
    rsa_public: Vec<u8>,
    ed_der: Vec<u8>,
    ed_public: Vec<u8>,
}

fn keys() -> Keys {
    let rsa_der = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256)
        .expect("RSA key")
        .serialize_der();
    let ed_der = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
        .expect("Ed25519 key")
        .serialize_der();
    Keys {
        rsa_public: RsaKey::<Sha256>::from_key_der(rustls_pki_types::PrivateKeyDer::Pkcs8(
            rsa_der.clone().into(),
        ))
        .expect("key")
        .public_key(),
        ed_public: Ed25519Key::from_pkcs8_der(&ed_der)
            .expect("key")
            .public_key(),
        rsa_der,
        ed_der,
    }
}

fn publish_key(resolver: &Resolver, name: &str, k: &str, public: &[u8]) {
    let p = base64::engine::general_purpose::STANDARD.encode(public);
    let record = format!("v=DKIM1; k={k}; p={p}");
    resolver
        .caches()
        .add_txt::<DomainKey>(name, record.as_bytes(), later());
}

const SIGNED: [&str; 5] = ["From", "To", "Subject", "Date", "Message-ID"];

fn sign_rsa(keys: &Keys, domain: &str, message: &str) -> String {
    let key = RsaKey::<Sha256>::from_key_der(rustls_pki_types::PrivateKeyDer::Pkcs8(
        keys.rsa_der.clone().into(),
    ))
    .expect("key");
    let signature = DkimSigner::from_key(key)
        .domain(domain)
        .selector("rsa")
        .headers(SIGNED)
        .sign(message.as_bytes())
        .expect("sign");
    format!("{}{message}", signature.to_header())
}

fn sign_ed(keys: &Keys, domain: &str, message: &str) -> String {
    let key = Ed25519Key::from_pkcs8_der(&keys.ed_der).expect("key");
    let signature = DkimSigner::from_key(key)
        .domain(domain)
        .selector("ed")
        .headers(SIGNED)
        .sign(message.as_bytes())
        .expect("sign");
    format!("{}{message}", signature.to_header())
}

fn facts<'a>(spf: Option<&'a SpfCheck>, own: &'a [String]) -> MessageFacts<'a> {
    MessageFacts {
        client_ip: CLIENT,
        helo: "mx.example.net",
        mail_from_domain: "example.net",
        spf,
        dkim: true,
        dmarc: true,
        own_domains: own,
    }
}

/// A resolver with both keys of example.org and its DMARC record (none when `dmarc` is
/// `None`); the tree walk's other names do not exist.
fn with_records(keys: &Keys, dmarc: Option<&str>) -> Resolver {
    let resolver = offline();
    publish_key(
        &resolver,
        "rsa._domainkey.example.org",
        "rsa",
        &keys.rsa_public,
    );
    publish_key(
        &resolver,
        "ed._domainkey.example.org",
        "ed25519",
        &keys.ed_public,
    );
    match dmarc {
        Some(record) => {
            resolver
                .caches()
                .add_txt::<Dmarc>("_dmarc.example.org", record.as_bytes(), later());
        }
        None => nxdomain(&resolver, "_dmarc.example.org."),
    }
    for name in [
        "_dmarc.org.",
        "_dmarc.sub.example.org.",
        "_dmarc.example.net.",
        "_dmarc.net.",
    ] {
        nxdomain(&resolver, name);
    }
    resolver
}

#[tokio::test]
async fn dkim_passes_rsa_and_ed25519_signatures_each_reported_in_order() {
    let keys = keys();
    let resolver = with_records(&keys, Some("v=DMARC1; p=reject"));
    let message = sign_ed(
        &keys,
        "example.org",
        &sign_rsa(&keys, "example.org", MESSAGE),
    );
    let checks = resolver
        .authenticate(message.as_bytes(), facts(None, &[]))
        .await;
    let results: Vec<_> = checks
        .dkim
        .iter()
        .map(|c| (c.result, c.algorithm.as_str(), c.selector.as_str()))
        .collect();
    assert_eq!(
        results,
        [
            (DkimResult::Pass, "ed25519-sha256", "ed"),
            (DkimResult::Pass, "rsa-sha256", "rsa")
        ]
    );
    assert_eq!(checks.dkim[0].domain, "example.org");
    assert_eq!(checks.dkim[0].b.len(), 8);
    assert_eq!(checks.from, FromDomain::One("example.org".into()));
    let dmarc = checks.dmarc.expect("dmarc ran");
    assert_eq!(dmarc.result, DmarcResult::Pass, "aligned DKIM pass");
    assert_eq!(checks.arc.map(|a| a.result), Some(ArcResult::None));
}

#[tokio::test]
async fn dkim_of_a_modified_body_fails_and_dmarc_rejects() {
    let keys = keys();
    let resolver = with_records(&keys, Some("v=DMARC1; p=reject"));
    let message = sign_rsa(&keys, "example.org", MESSAGE).replace("Hello.", "Hello!");
    let checks = resolver
        .authenticate(message.as_bytes(), facts(None, &[]))
        .await;
    assert_eq!(checks.dkim[0].result, DkimResult::Fail);
    let dmarc = checks.dmarc.expect("dmarc ran");
    assert_eq!(
        (dmarc.result, dmarc.policy),
        (DmarcResult::Fail, DmarcPolicy::Reject)
    );
    assert!(!dmarc.own_domain);
}

#[tokio::test]
async fn dmarc_passes_through_aligned_spf() {
    let keys = keys();
    let resolver = with_records(&keys, Some("v=DMARC1; p=reject"));
    let spf = SpfCheck {
        result: SpfResult::Pass,
        identity: SpfIdentity::MailFrom,
        subject: "bounce@mail.example.org".into(),
        domain: "mail.example.org".into(),
        detail: None,
    };
    nxdomain(&resolver, "_dmarc.mail.example.org.");
    let mut facts = facts(Some(&spf), &[]);
    facts.mail_from_domain = "mail.example.org";
    let checks = resolver.authenticate(MESSAGE.as_bytes(), facts).await;
    assert!(checks.dkim.is_empty());
    assert_eq!(checks.dmarc.map(|d| d.result), Some(DmarcResult::Pass));
}

#[tokio::test]
async fn dmarc_policy_follows_p_sp_and_t() {
    let keys = keys();
    let sub = MESSAGE.replace("alice@example.org", "alice@sub.example.org");
    let cases = [
        ("v=DMARC1; p=quarantine", MESSAGE, DmarcPolicy::Quarantine),
        (
            "v=DMARC1; p=reject; sp=none",
            sub.as_str(),
            DmarcPolicy::None,
        ),
        ("v=DMARC1; p=reject; t=y", MESSAGE, DmarcPolicy::Quarantine),
        ("v=DMARC1; p=quarantine; t=y", MESSAGE, DmarcPolicy::None),
    ];
    for (record, message, expected) in cases {
        let resolver = with_records(&keys, Some(record));
        resolver.caches().add_ipv4(
            "sub.example.org",
            vec![Ipv4Addr::new(192, 0, 2, 99)],
            later(),
        );
        let checks = resolver
            .authenticate(message.as_bytes(), facts(None, &[]))
            .await;
        let dmarc = checks.dmarc.expect("dmarc ran");
        assert_eq!(
            (dmarc.result, dmarc.policy),
            (DmarcResult::Fail, expected),
            "{record}"
        );
    }
}

#[tokio::test]
async fn own_domains_reject_without_a_record() {
    let keys = keys();
    let resolver = with_records(&keys, None);
    let own = ["example.org".to_string()];
    let checks = resolver
        .authenticate(MESSAGE.as_bytes(), facts(None, &own))
        .await;
    let dmarc = checks.dmarc.expect("dmarc ran");
    assert_eq!(
        (dmarc.result, dmarc.policy),
        (DmarcResult::Fail, DmarcPolicy::Reject)
    );
    assert!(dmarc.own_domain);
    // Not one of ours: no record is no policy.
    let checks = resolver
        .authenticate(MESSAGE.as_bytes(), facts(None, &[]))
        .await;
    let dmarc = checks.dmarc.expect("dmarc ran");
    assert_eq!(
        (dmarc.result, dmarc.policy),
        (DmarcResult::None, DmarcPolicy::None)
    );
}

#[tokio::test]
async fn dmarc_lookup_failure_is_temperror() {
    let keys = keys();
    let resolver = offline();
    publish_key(
        &resolver,
        "rsa._domainkey.example.org",
        "rsa",
        &keys.rsa_public,
    );
    // _dmarc.example.org is not cached: the lookup fails.
    let checks = resolver
        .authenticate(MESSAGE.as_bytes(), facts(None, &[]))
        .await;
    assert_eq!(checks.dmarc.map(|d| d.result), Some(DmarcResult::TempError));
}

#[tokio::test]
async fn from_missing_several_fields_or_several_domains_skip_dmarc() {
    let resolver = offline();
    let cases = [
        ("To: b@example.net\r\n\r\nbody\r\n", FromDomain::Missing),
        (
            "From: a@example.org\r\nFrom: a@example.com\r\n\r\nbody\r\n",
            FromDomain::Several,
        ),
        (
            "From: a@example.org, b@example.com\r\n\r\nbody\r\n",
            FromDomain::Several,
        ),
        (
            "From: a@example.org, b@EXAMPLE.org\r\n\r\nbody\r\n",
            FromDomain::One("example.org".into()),
        ),
        ("From: undisclosed\r\n\r\nbody\r\n", FromDomain::Missing),
    ];
    for (message, expected) in cases {
        let mut facts = facts(None, &[]);
        facts.dmarc = !matches!(expected, FromDomain::One(_));
        let checks = resolver.authenticate(message.as_bytes(), facts).await;
        assert_eq!(checks.from, expected, "{message}");
        if expected != FromDomain::One("example.org".into()) {
            assert_eq!(checks.dmarc, None);
        }
    }
}

#[tokio::test]
async fn malformed_signatures_and_empty_input_never_panic() {
    let resolver = offline();
    let messages = [
        "DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=x; b=\r\nFrom: a@example.org\r\n\r\n",
        "DKIM-Signature: v=9; a=foo; d=; s=; bh=!!; b=AAAA; h=from\r\nFrom: a@example.org\r\n\r\n",
        "DKIM-Signature: ;;;==;\r\n\r\n",
        "",
        "\r\n\r\n",
    ];
    for message in messages {
        let checks = resolver
            .authenticate(message.as_bytes(), facts(None, &[]))
            .await;
        for check in &checks.dkim {
            assert_ne!(check.result, DkimResult::Pass, "{message:?}");
        }
    }
    let checks = resolver
        .authenticate(messages[1].as_bytes(), facts(None, &[]))
        .await;
    assert_eq!(checks.dkim.len(), 1);
    assert_eq!(checks.dkim[0].result, DkimResult::PermError);
}

#[tokio::test]
async fn a_signature_with_a_key_under_1024_bits_is_policy_not_pass() {
    // A 512-bit RSA public key published for a message signed with a 2048-bit key: the
    // verification fails on the small key, and the result is RFC 8301's policy.
    let keys = keys();
    let resolver = with_records(&keys, Some("v=DMARC1; p=reject"));
    let small = "MFwwDQYJKoZIhvcNAQEBBQADSwAwSAJBANxGN4Gi8mwRUkQPugWReSqlYs9UHF6g\
                 uoSxJj9FCSIISa1dwMp5YKoDubp8nv4uzvXTg9z2Ah/eo7/ovlz/OV8CAwEAAQ==";
    let small = base64::engine::general_purpose::STANDARD
        .decode(small)
        .expect("base64");
    publish_key(&resolver, "rsa._domainkey.example.org", "rsa", &small);
    let message = sign_rsa(&keys, "example.org", MESSAGE);
    let checks = resolver
        .authenticate(message.as_bytes(), facts(None, &[]))
        .await;
    assert_eq!(
        checks.dkim[0].result,
        DkimResult::Policy,
        "{:?}",
        checks.dkim[0]
    );
    assert_eq!(checks.dmarc.map(|d| d.result), Some(DmarcResult::Fail));
}

#[tokio::test]
async fn arc_is_none_without_a_chain_and_passes_a_sealed_one() {
    use mail_auth::AuthenticationResults;
    use mail_auth::arc::ArcSealer;

    let keys = keys();
    let resolver = with_records(&keys, Some("v=DMARC1; p=none"));
    let checks = resolver
        .authenticate(MESSAGE.as_bytes(), facts(None, &[]))
        .await;
    assert_eq!(
        checks.arc.map(|a| (a.result, a.instances)),
        Some((ArcResult::None, 0))
    );

    let parsed = AuthenticatedMessage::parse(MESSAGE.as_bytes()).expect("message");
    let arc_output = resolver
        .authenticator()
        .verify_arc(resolver.caches().parameters(&parsed))
        .await;
    let results = AuthenticationResults::new("forwarder.example.org");
    let key = Ed25519Key::from_pkcs8_der(&keys.ed_der).expect("key");
    let set = ArcSealer::from_key(key)
        .domain("example.org")
        .selector("ed")
        .headers(["From", "To", "Subject"])
        .seal(&parsed, &results, &arc_output)
        .expect("seal");
    let sealed = format!("{}{MESSAGE}", set.to_header());
    let checks = resolver
        .authenticate(sealed.as_bytes(), facts(None, &[]))
        .await;
    assert_eq!(
        checks.arc.map(|a| (a.result, a.instances)),
        Some((ArcResult::Pass, 1))
    );

    let broken = sealed.replace("Hello.", "Changed.");
    let checks = resolver
        .authenticate(broken.as_bytes(), facts(None, &[]))
        .await;
    assert_eq!(checks.arc.map(|a| a.result), Some(ArcResult::Fail));
}

#[tokio::test]
async fn dkim_key_lookup_failure_is_temperror_never_pass() {
    let keys = keys();
    let resolver = with_records(&keys, Some("v=DMARC1; p=reject"));
    let message = sign_rsa(&keys, "example.org", MESSAGE).replace("s=rsa;", "s=uncached;");
    let checks = resolver
        .authenticate(message.as_bytes(), facts(None, &[]))
        .await;
    assert_eq!(
        checks.dkim[0].result,
        DkimResult::TempError,
        "{:?}",
        checks.dkim
    );
    assert_eq!(checks.dmarc.map(|d| d.result), Some(DmarcResult::TempError));
}

#[tokio::test]
async fn spf_over_two_void_lookups_is_permerror() {
    let resolver = offline();
    for name in ["v1.example.org", "v2.example.org", "v3.example.org"] {
        resolver.caches().add_ipv4(name, vec![], later());
    }
    let two = "v=spf1 a:v1.example.org a:v2.example.org -all";
    assert_eq!(spf_of(&resolver, two).await.result, SpfResult::Fail);
    let three = "v=spf1 a:v1.example.org a:v2.example.org a:v3.example.org -all";
    let check = spf_of(&resolver, three).await;
    assert_eq!(check.result, SpfResult::PermError, "{check:?}");

    let resolver = offline();
    for name in ["n1.example.org.", "n2.example.org.", "n3.example.org."] {
        nxdomain(&resolver, name);
    }
    let three =
        "v=spf1 ?include:n1.example.org ?include:n2.example.org ?include:n3.example.org -all";
    assert_eq!(spf_of(&resolver, three).await.result, SpfResult::PermError);
}

/// `MESSAGE` signed with rsa-sha1 (by OpenSSL, which still signs with SHA-1) and its key.
const SHA1_SIGNATURE: &str = "DKIM-Signature: v=1; a=rsa-sha1; s=sha1; d=example.org; c=relaxed/relaxed;\r\n\
    \th=Message-ID:Date:Subject:To:From; t=1796090391; bh=2+689OSH6dJ8r+u45EO4VHI\r\n\
    \tBWe8=; b=NYZrUb6DkbVYQujMsyj4vAqZszn+pg7LDiIU9IBJ1LJHprUZbqA+Qg27FrMtUeKi99\r\n\
    \tZ4xk6ThuY0Giw+cBIQYt9skoY1PQRKpc2CiTDs9knW1BlgUECwzj6oxrAGtEbF+qUgFdJFU3bQH\r\n\
    \t27uWiNLTHB3wF0NJrMmM/j8bgbj7IC1TKHm+4jq1bLZ7wYi+LIjfI+LkXExFbbw0DO49AGsDWjF\r\n\
    \tO1NT4XVl/mtFYjCiN1FKU8zQ4KLroGYk6uIrHRud5CKFTi17BeDEHaMnfIaWM/QPcNcPuBHpsSg\r\n\
    \tj47DkaXgclJ1m5jY1VXXI062zLFf1acDEsBCu7S2iX0cncvZqOA==;\r\n";
const SHA1_KEY: &str = "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAtRDuJxHn2FOSvE3w7jKbmQ86oEz9a1PNtrhl+4YojVdS9+bNWwYaTedVa0mV49Zp2GET78rsL8zHtWJ47G993vI6irVOgbC8Qnv0tVY8ncqteERW60Iy3VHY1sL/F7IiuSh4ae6JhMDLBc5fY+OcNx6nzwatGCQUi3LnXdbJVhGQ+lPEdPVWY2JjcoG9B6BC5OEUhs9MmahjqvUnia3y+DGTKx8j21CvHxcznCgkEMmmVoeXirvohS7hqEM4K+LK1z/0oCC2dwx8XZeVemtXdo+X6SHi1RVbtA/rfJgpr3o4AsBLwntGyadsWYbYJV/dGtECSFZrIwHMFVL+/xsTBwIDAQAB";

#[tokio::test]
async fn an_rsa_sha1_signature_that_verifies_is_policy_not_pass() {
    let keys = keys();
    let resolver = with_records(&keys, Some("v=DMARC1; p=reject"));
    let key = base64::engine::general_purpose::STANDARD
        .decode(SHA1_KEY)
        .expect("base64");
    publish_key(&resolver, "sha1._domainkey.example.org", "rsa", &key);
    let message = format!("{SHA1_SIGNATURE}{MESSAGE}");
    let checks = resolver
        .authenticate(message.as_bytes(), facts(None, &[]))
        .await;
    assert_eq!(
        checks.dkim[0].result,
        DkimResult::Policy,
        "{:?}",
        checks.dkim
    );
    assert_eq!(checks.dkim[0].algorithm, "rsa-sha1");
    assert_eq!(checks.dmarc.map(|d| d.result), Some(DmarcResult::Fail));
    // The same signature with its body changed is a plain fail.
    let changed = message.replace("Hello.", "Hello!");
    let checks = resolver
        .authenticate(changed.as_bytes(), facts(None, &[]))
        .await;
    assert_eq!(checks.dkim[0].result, DkimResult::Fail);
}

#[tokio::test]
async fn a_from_domain_dmarc_cannot_look_up_counts_as_missing() {
    let resolver = with_records(&keys(), Some("v=DMARC1; p=reject"));
    let long = "a".repeat(64);
    let froms = [
        "ceo@example.org.".to_string(),
        "X <ceo@example.org.>".to_string(),
        "ceo@example..org".to_string(),
        "ceo@.example.org".to_string(),
        "ceo@[127.0.0.1]".to_string(),
        "ceo@example.org\\".to_string(),
        format!("ceo@{long}.example.org"),
        "ceo@org".to_string(),
        "<ceo@example.org>, <x@>".to_string(),
    ];
    for from in froms {
        let message = format!("From: {from}\r\nSubject: s\r\n\r\nbody\r\n");
        let checks = resolver
            .authenticate(message.as_bytes(), facts(None, &[]))
            .await;
        assert_eq!(checks.from, FromDomain::Missing, "{from}");
        assert_eq!(checks.dmarc, None, "{from}");
    }
}

#[tokio::test]
async fn at_most_max_signatures_are_verified_and_recorded() {
    let resolver = with_records(&keys(), Some("v=DMARC1; p=reject"));
    let signature = "DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=rsa; h=from; \
                     bh=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=; b=AAAA\r\n";
    let message = format!(
        "{}From: a@example.org\r\n\r\nbody\r\n",
        signature.repeat(3 * MAX_SIGNATURES)
    );
    let checks = resolver
        .authenticate(message.as_bytes(), facts(None, &[]))
        .await;
    assert_eq!(checks.dkim.len(), MAX_SIGNATURES);
    assert!(checks.dkim.iter().all(|c| c.result != DkimResult::Pass));
    let dmarc = checks.dmarc.expect("dmarc ran");
    assert_eq!(
        (dmarc.result, dmarc.policy),
        (DmarcResult::Fail, DmarcPolicy::Reject)
    );
}

#[tokio::test]
async fn own_domains_reject_covers_their_subdomains_and_no_lookalike() {
    let resolver = with_records(&keys(), None);
    nxdomain(&resolver, "_dmarc.badexample.org.");
    let own = ["example.org".to_string()];
    for (from, ours) in [
        ("a@sub.example.org", true),
        ("a@SUB.Example.Org", true),
        ("a@badexample.org", false),
    ] {
        let message = MESSAGE.replace("From: ", &format!("From: {from}\r\nX-Was: "));
        let checks = resolver
            .authenticate(message.as_bytes(), facts(None, &own))
            .await;
        let dmarc = checks.dmarc.expect("dmarc ran");
        assert_eq!(dmarc.own_domain, ours, "{from}");
        if ours {
            assert_eq!(
                (dmarc.result, dmarc.policy),
                (DmarcResult::Fail, DmarcPolicy::Reject),
                "{from}"
            );
        }
    }
}

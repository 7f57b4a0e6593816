//! The doctor's checks over pre-filled caches (a miss goes to a closed loopback port).

use std::net::{IpAddr, Ipv4Addr};

use mail_auth::common::verify::DomainKey;

use super::*;
use crate::dns::sign::tests::{
    ed25519_key, entry, later, offline_resolver, other_rsa_key, rsa_key,
};

const EGRESS: &str = "192.0.2.7";

fn config() -> Config {
    let mut config = Config::embedded_default();
    config.doctor.egress = vec![EGRESS.parse().expect("ip")];
    config.dkim.sign = vec![
        entry("example.test", "rsa", rsa_key()),
        entry("example.test", "ed", ed25519_key()),
    ];
    config
}

/// A domain that has published everything right.
fn published(resolver: &Resolver, config: &Config) {
    let caches = resolver.caches();
    caches.add_txt::<Spf>("example.test", b"v=spf1 ip4:192.0.2.0/24 -all", later());
    for e in &config.dkim.sign {
        let name = format!("{}._domainkey.{}", e.selector, e.domain);
        caches.add_txt::<DomainKey>(&name, e.key.dns_record().as_bytes(), later());
    }
    caches.add_txt::<Dmarc>(
        "_dmarc.example.test",
        b"v=DMARC1; p=reject; rua=mailto:dmarc@example.test",
        later(),
    );
    let ip: IpAddr = EGRESS.parse().expect("ip");
    caches.add_ptr(ip, vec!["out.example.test."], later());
    caches.add_ipv4(
        "out.example.test",
        vec![Ipv4Addr::new(192, 0, 2, 7)],
        later(),
    );
}

fn statuses(report: &Report) -> Vec<(Status, &'static str)> {
    report
        .findings
        .iter()
        .map(|f| (f.status, f.check))
        .collect()
}

#[tokio::test]
async fn a_domain_that_published_everything_is_all_ok() {
    let resolver = offline_resolver();
    let config = config();
    published(&resolver, &config);
    let report = run(&resolver, &config, "Example.Test.").await;
    assert_eq!(report.domain, "example.test");
    assert_eq!(
        statuses(&report),
        vec![
            (Status::Ok, "spf"),
            (Status::Ok, "spf"),
            (Status::Ok, "dkim"),
            (Status::Ok, "dkim"),
            (Status::Ok, "dmarc"),
            (Status::Ok, "fcrdns"),
        ],
        "{}",
        report.text()
    );
    let text = report.text();
    assert!(
        text.contains("ok spf: 192.0.2.7 is authorised for example.test (pass)\n"),
        "{text}"
    );
    assert!(text.contains("ok dmarc: _dmarc.example.test: p=reject sp=reject np=reject rua=mailto:dmarc@example.test\n"), "{text}");
    assert!(
        text.contains("ok fcrdns: 192.0.2.7 -> out.example.test -> 192.0.2.7\n"),
        "{text}"
    );
}

#[tokio::test]
async fn an_unauthorised_address_and_a_wrong_key_are_failures_with_their_fix() {
    let resolver = offline_resolver();
    let mut config = config();
    published(&resolver, &config);
    resolver
        .caches()
        .add_txt::<Spf>("example.test", b"v=spf1 ip4:198.51.100.0/24 -all", later());
    // The rsa selector publishes another RSA key than ours.
    config.dkim.sign[0] = entry("example.test", "rsa2", rsa_key());
    let other = entry("example.test", "rsa2", other_rsa_key());
    resolver.caches().add_txt::<DomainKey>(
        "rsa2._domainkey.example.test",
        other.key.dns_record().as_bytes(),
        later(),
    );
    let report = run(&resolver, &config, "example.test").await;
    let text = report.text();
    let spf = &report.findings[1];
    assert_eq!(spf.status, Status::Fail, "{text}");
    assert_eq!(
        spf.fix.as_deref(),
        Some("add ip4:192.0.2.7 to the SPF record at example.test")
    );
    let dkim = &report.findings[2];
    assert_eq!(dkim.status, Status::Fail, "{text}");
    let fix = dkim.fix.as_deref().expect("a fix");
    assert!(
        fix.starts_with("publish TXT at rsa2._domainkey.example.test: \"v=DKIM1; k=rsa; p="),
        "{fix}"
    );
    assert!(fix.contains(&config.dkim.sign[0].key.dns_record()), "{fix}");
    assert_eq!(
        report.findings[3].status,
        Status::Ok,
        "the Ed25519 key still matches"
    );
}

#[tokio::test]
async fn missing_records_are_failures_that_say_what_to_publish() {
    let resolver = offline_resolver();
    let config = config();
    let caches = resolver.caches();
    // NXDOMAIN-like answers: records that are not SPF/DMARC/DKIM at all.
    caches.add_txt::<Spf>("example.test", b"google-site-verification=x", later());
    caches.add_txt::<Dmarc>("_dmarc.example.test", b"hello", later());
    let ip: IpAddr = EGRESS.parse().expect("ip");
    caches.add_ptr(ip, vec!["dsl-7.isp.test."], later());
    caches.add_ipv4(
        "dsl-7.isp.test",
        vec![Ipv4Addr::new(203, 0, 113, 1)],
        later(),
    );
    let report = run(&resolver, &config, "example.test").await;
    let text = report.text();
    let by_check = |check: &str| -> Vec<&Finding> {
        report
            .findings
            .iter()
            .filter(|f| f.check == check)
            .collect()
    };
    let spf = by_check("spf");
    assert_eq!(spf[0].status, Status::Fail, "{text}");
    assert_eq!(
        spf[0].fix.as_deref(),
        Some("publish TXT at example.test: \"v=spf1 ip4:192.0.2.7 -all\"")
    );
    let dmarc = by_check("dmarc");
    assert_eq!(dmarc[0].status, Status::Fail, "{text}");
    assert!(
        dmarc[0]
            .fix
            .as_deref()
            .expect("fix")
            .contains("v=DMARC1; p=quarantine"),
        "{text}"
    );
    let fcrdns = by_check("fcrdns");
    assert_eq!(fcrdns[0].status, Status::Fail, "{text}");
    assert!(
        fcrdns[0]
            .found
            .contains("dsl-7.isp.test does not resolve back"),
        "{text}"
    );
    // Uncached DKIM records go to the closed port: not a pass either way.
    assert!(
        by_check("dkim").iter().all(|f| f.status != Status::Ok),
        "{text}"
    );
}

#[tokio::test]
async fn no_egress_and_no_key_are_warnings() {
    let resolver = offline_resolver();
    let mut config = config();
    config.doctor.egress.clear();
    config.dkim.sign.clear();
    resolver
        .caches()
        .add_txt::<Spf>("example.test", b"v=spf1 -all", later());
    let report = run(&resolver, &config, "example.test").await;
    let text = report.text();
    assert!(
        text.contains("warn spf: no [doctor] egress addresses configured"),
        "{text}"
    );
    assert!(
        text.contains("warn dkim: no [[dkim.sign]] entry for example.test"),
        "{text}"
    );
    assert!(
        !report.findings.iter().any(|f| f.check == "fcrdns"),
        "{text}"
    );
}

#[test]
fn the_json_form_is_one_object_with_the_findings() {
    let report = Report {
        domain: "example.test".into(),
        findings: vec![finding(Status::Warn, "dmarc", "x".into(), Some("y".into()))],
    };
    let json = serde_json::to_value(&report).expect("json");
    assert_eq!(
        json,
        serde_json::json!({"domain": "example.test", "findings": [
            {"status": "warn", "check": "dmarc", "found": "x", "fix": "y"}]})
    );
}

#[tokio::test]
async fn an_ipv6_egress_is_confirmed_through_its_aaaa_record_and_a_revoked_key_fails() {
    let resolver = offline_resolver();
    let mut config = config();
    published(&resolver, &config);
    let v6: std::net::Ipv6Addr = "2001:db8::7".parse().expect("ip");
    config.doctor.egress = vec![IpAddr::V6(v6)];
    let caches = resolver.caches();
    caches.add_txt::<Spf>("example.test", b"v=spf1 ip6:2001:db8::/32 -all", later());
    caches.add_ptr(IpAddr::V6(v6), vec!["out6.example.test."], later());
    caches.add_ipv6("out6.example.test", vec![v6], later());
    caches.add_txt::<DomainKey>(
        "ed._domainkey.example.test",
        b"v=DKIM1; k=ed25519; p=",
        later(),
    );
    let report = run(&resolver, &config, "example.test").await;
    let text = report.text();
    assert!(
        text.contains("ok spf: 2001:db8::7 is authorised for example.test (pass)\n"),
        "{text}"
    );
    assert!(
        text.contains("ok fcrdns: 2001:db8::7 -> out6.example.test -> 2001:db8::7\n"),
        "{text}"
    );
    let ed = report
        .findings
        .iter()
        .find(|f| f.check == "dkim" && f.found.contains("ed._domainkey"))
        .expect("the ed25519 finding");
    assert_eq!(ed.status, Status::Fail, "{text}");
    assert!(
        ed.fix
            .as_deref()
            .expect("fix")
            .contains("v=DKIM1; k=ed25519; p="),
        "{text}"
    );
}

#[tokio::test]
async fn a_record_that_cannot_be_looked_up_is_unknown_not_missing() {
    // Nothing cached and no name server answers: every lookup is a resolver error.
    let resolver = offline_resolver();
    let report = run(&resolver, &config(), "example.test").await;
    let dmarc = report
        .findings
        .iter()
        .find(|f| f.check == "dmarc")
        .expect("a dmarc finding");
    assert_eq!(dmarc.status, Status::Warn, "{dmarc:?}");
    assert!(
        dmarc
            .found
            .starts_with("could not look up _dmarc.example.test")
    );
    assert_eq!(
        dmarc.fix, None,
        "no record to publish is suggested: one may be there"
    );
}

#[tokio::test]
async fn a_ptr_name_whose_address_cannot_be_looked_up_is_unknown_not_refuted() {
    // The PTR record is known, its name's A record is not, and no name server answers.
    let resolver = offline_resolver();
    let ip: IpAddr = EGRESS.parse().expect("ip");
    resolver
        .caches()
        .add_ptr(ip, vec!["out.example.test."], later());
    let report = run(&resolver, &config(), "example.test").await;
    let fcrdns = report
        .findings
        .iter()
        .find(|f| f.check == "fcrdns")
        .expect("an fcrdns finding");
    assert_eq!(fcrdns.status, Status::Warn, "{fcrdns:?}");
    assert!(
        fcrdns
            .found
            .starts_with("could not look up out.example.test"),
        "{fcrdns:?}"
    );
    assert_eq!(fcrdns.fix, None, "an A record may well be published");
}

#[tokio::test]
async fn an_address_is_judged_as_the_relay_judges_it() {
    // An address the SPF record does not cover: the relay's check says fail, and so does
    // the doctor.
    let resolver = offline_resolver();
    let config = config();
    published(&resolver, &config);
    resolver
        .caches()
        .add_txt::<Spf>("example.test", b"v=spf1 ip4:198.51.100.0/24 -all", later());
    let ip: IpAddr = EGRESS.parse().expect("ip");
    let relay = resolver
        .spf(ip, &config.server.hostname, Some("postmaster@example.test"))
        .await;
    assert_eq!(relay.result, SpfResult::Fail, "{relay:?}");
    let report = run(&resolver, &config, "example.test").await;
    let spf: Vec<&Finding> = report
        .findings
        .iter()
        .filter(|f| f.check == "spf")
        .collect();
    assert_eq!(spf.len(), 2, "{spf:?}");
    assert_eq!(spf[1].status, Status::Fail, "{spf:?}");
    assert_eq!(
        spf[1].found,
        "192.0.2.7 is not authorised for example.test (Fail)"
    );
}

#[test]
fn dns_text_with_control_characters_cannot_drive_the_terminal_or_forge_a_line() {
    let hostile = "rua=mailto:\u{1b}[2Ja@x.test\nok spf: all good\u{202e}".to_string();
    let report = Report {
        domain: "example.test".into(),
        findings: vec![finding(Status::Ok, "dmarc", hostile.clone(), Some(hostile))],
    };
    let text = report.text();
    assert_eq!(text.lines().count(), 1, "{text:?}");
    assert!(
        !text.chars().any(|c| c.is_control() && c != '\n'),
        "{text:?}"
    );
    assert!(!text.contains('\u{202e}'), "{text:?}");
}

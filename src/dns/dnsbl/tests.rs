use std::net::{IpAddr, Ipv4Addr};

use super::*;
use crate::dns::sign::tests::{later, offline_resolver};

#[test]
fn query_names_follow_rfc_5782() {
    let table = [
        ("127.0.0.9", "bl.test", "9.0.0.127.bl.test"),
        ("192.0.2.99", "zen.example", "99.2.0.192.zen.example"),
        ("::ffff:192.0.2.99", "bl.test", "99.2.0.192.bl.test"),
        (
            "2001:db8:1:2::ab",
            "bl.test",
            "b.a.0.0.0.0.0.0.0.0.0.0.0.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.bl.test",
        ),
        (
            "::1",
            "bl.test",
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.bl.test",
        ),
    ];
    for (ip, zone, expected) in table {
        let name = query_name(ip.parse().expect("ip"), zone);
        assert_eq!(name, expected, "{ip}");
    }
    let v6 = query_name("2001:db8::1".parse().expect("ip"), "z");
    assert_eq!(v6.split('.').count(), 33, "32 nibbles and the zone");
}

#[test]
fn which_answers_count() {
    let a = |s: &str| s.parse::<Ipv4Addr>().expect("ip");
    let only_2: Vec<IpAddr> = vec!["127.0.0.2".parse().expect("ip")];
    let table: [(&str, Option<&[IpAddr]>, Answer); 9] = [
        ("127.0.0.2", None, Answer::Listed),
        ("127.0.0.11", None, Answer::Listed),
        ("127.1.2.3", None, Answer::Listed),
        ("127.255.255.254", None, Answer::Refused),
        ("127.255.255.252", None, Answer::Refused),
        ("10.0.0.2", None, Answer::Other),
        ("127.0.0.2", Some(&only_2), Answer::Listed),
        ("127.0.0.4", Some(&only_2), Answer::Other),
        ("127.255.255.254", Some(&only_2), Answer::Refused),
    ];
    for (answer, accepted, expected) in table {
        assert_eq!(
            classify(a(answer), accepted),
            expected,
            "{answer} {accepted:?}"
        );
    }
}

fn zone(zone: &str, weight: u32, answers: Option<Vec<IpAddr>>) -> DnsblZone {
    DnsblZone {
        zone: zone.into(),
        name: format!("{zone} (public)"),
        weight,
        answers,
    }
}

#[tokio::test]
async fn listings_from_every_zone_add_up_and_others_do_not_count() {
    let resolver = offline_resolver();
    let client: IpAddr = "192.0.2.9".parse().expect("ip");
    let caches = resolver.caches();
    let v4 = |s: &str| s.parse::<Ipv4Addr>().expect("ip");
    caches.add_ipv4("9.2.0.192.one.test", vec![v4("127.0.0.2")], later());
    caches.add_ipv4("9.2.0.192.two.test", vec![v4("127.0.0.4")], later());
    caches.add_ipv4("9.2.0.192.picky.test", vec![v4("127.0.0.3")], later());
    caches.add_ipv4(
        "9.2.0.192.refusing.test",
        vec![v4("127.255.255.254")],
        later(),
    );
    let zones = [
        zone("one.test", 1, None),
        zone("two.test", 2, None),
        zone(
            "picky.test",
            5,
            Some(vec!["127.0.0.2".parse().expect("ip")]),
        ),
        zone("refusing.test", 5, None),
        // Not in the caches: the lookup goes to a closed port and fails.
        zone("unreachable.test", 7, None),
    ];
    let check = resolver.dnsbl(client, &zones).await;
    assert_eq!(
        check.listed,
        vec![
            Listing {
                name: "one.test (public)".into(),
                weight: 1,
                answer: "127.0.0.2".parse().expect("ip"),
            },
            Listing {
                name: "two.test (public)".into(),
                weight: 2,
                answer: "127.0.0.4".parse().expect("ip"),
            },
        ]
    );
    assert_eq!(check.score, 3);
}

#[tokio::test]
async fn an_ipv4_mapped_client_is_looked_up_as_ipv4() {
    let resolver = offline_resolver();
    resolver.caches().add_ipv4(
        "9.0.0.127.bl.test",
        vec!["127.0.0.2".parse().expect("ip")],
        later(),
    );
    let check = resolver
        .dnsbl(
            "::ffff:127.0.0.9".parse().expect("ip"),
            &[zone("bl.test", 1, None)],
        )
        .await;
    assert_eq!(check.score, 1);
}

#[tokio::test]
async fn no_zones_no_listing() {
    let check = offline_resolver()
        .dnsbl("192.0.2.1".parse().expect("ip"), &[])
        .await;
    assert_eq!(check, DnsblCheck::default());
}

use std::net::{IpAddr, Ipv4Addr};

use super::*;
use crate::dns::verify::{
    ArcCheck, DkimCheck, DmarcCheck, FromDomain, IprevCheck, MessageChecks, SpfCheck,
};
use crate::smtp::headers::authserv_id;

fn spf() -> SpfCheck {
    SpfCheck {
        result: SpfResult::Pass,
        identity: SpfIdentity::MailFrom,
        subject: "bounce@example.org".into(),
        domain: "example.org".into(),
        detail: None,
    }
}

fn message() -> MessageChecks {
    let dkim = |result, algorithm: &str, b: &str, detail: Option<&str>| DkimCheck {
        result,
        domain: "example.org".into(),
        selector: "s2026".into(),
        algorithm: algorithm.into(),
        b: b.into(),
        detail: detail.map(String::from),
    };
    MessageChecks {
        dkim: vec![
            dkim(DkimResult::Pass, "rsa-sha256", "AbCdEfGh", None),
            dkim(
                DkimResult::Policy,
                "rsa-sha1",
                "x/y+z=AB",
                Some("rsa-sha1 is not accepted (RFC 8301 §3.1)"),
            ),
        ],
        arc: Some(ArcCheck {
            result: ArcResult::None,
            instances: 0,
            detail: None,
        }),
        dmarc: Some(DmarcCheck {
            result: DmarcResult::Pass,
            domain: "example.org".into(),
            policy: DmarcPolicy::Reject,
            own_domain: false,
            detail: None,
        }),
        from: FromDomain::One("example.org".into()),
    }
}

const EXPECTED: &str = "Authentication-Results: mx.example.com;\r\n \
    spf=pass smtp.mailfrom=bounce@example.org;\r\n \
    dkim=pass header.d=example.org header.s=s2026 header.a=rsa-sha256\r\n  \
    header.b=AbCdEfGh;\r\n \
    dkim=policy reason=\"rsa-sha1 is not accepted (RFC 8301 §3.1)\"\r\n  \
    header.d=example.org header.s=s2026 header.a=rsa-sha1 header.b=\"x/y+z=AB\";\r\n \
    arc=none;\r\n \
    dmarc=pass (p=reject) header.from=example.org;\r\n \
    iprev=pass policy.iprev=192.0.2.10 (mail.example.org)\r\n";

fn all_checks() -> String {
    let spf = spf();
    let message = message();
    let iprev = IprevCheck {
        result: IprevResult::Pass,
        name: Some("mail.example.org".into()),
    };
    authentication_results(&Recorded {
        authserv_id: "mx.example.com",
        client_ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)),
        spf: Some(&spf),
        iprev: Some(&iprev),
        message: Some(&message),
    })
}

#[test]
fn the_field_has_the_exact_text_folded_at_78_columns() {
    let field = all_checks();
    assert_eq!(field, EXPECTED);
    for line in field.split("\r\n") {
        assert!(line.chars().count() <= FOLD_COLUMNS, "{line:?}");
    }
}

#[test]
fn nothing_run_is_none() {
    let field = authentication_results(&Recorded {
        authserv_id: "mx.example.com",
        client_ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)),
        spf: None,
        iprev: None,
        message: None,
    });
    assert_eq!(field, "Authentication-Results: mx.example.com; none\r\n");
}

#[test]
fn hostile_values_are_quoted_or_escaped() {
    let mut spf = spf();
    spf.subject = "\"a;b\\c\"@example.org".into();
    spf.identity = SpfIdentity::MailFrom;
    let iprev = IprevCheck {
        result: IprevResult::Fail,
        name: Some("evil) dkim=pass (x\r\n".into()),
    };
    let field = authentication_results(&Recorded {
        authserv_id: "mx.example.com",
        client_ip: "2001:db8::1".parse().unwrap(),
        spf: Some(&spf),
        iprev: Some(&iprev),
        message: None,
    });
    assert!(
        field.contains(r#"smtp.mailfrom="\"a;b\\c\"@example.org""#),
        "{field}"
    );
    assert!(field.contains("policy.iprev=\"2001:db8::1\""), "{field}");
    assert!(field.contains(r"(evil\) dkim=pass \(x)"), "{field}");
    let results = parse(&field);
    let expected =
        [("spf", "pass"), ("iprev", "fail")].map(|(m, r)| (m.to_string(), r.to_string()));
    assert_eq!(results, expected, "{field}");
}

/// A reader of RFC 8601 fields as consumers read them: unfold, drop comments, split the
/// resinfos at `;` outside quoted strings, and take each one's `method=result`.
fn parse(field: &str) -> Vec<(String, String)> {
    let value = field
        .strip_prefix("Authentication-Results:")
        .expect("field name")
        .replace("\r\n", "");
    let (mut parts, mut current, mut depth, mut quoted, mut escaped) =
        (Vec::new(), String::new(), 0u32, false, false);
    for c in value.chars() {
        if escaped {
            escaped = false;
            if depth == 0 {
                current.push(c);
            }
            continue;
        }
        match c {
            '\\' if quoted || depth > 0 => escaped = true,
            '"' if depth == 0 => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted && depth > 0 => depth -= 1,
            ';' if !quoted && depth == 0 => parts.push(std::mem::take(&mut current)),
            _ if depth == 0 => current.push(c),
            _ => {}
        }
    }
    parts.push(current);
    parts
        .iter()
        .skip(1)
        .filter_map(|resinfo| {
            let spec = resinfo.split_whitespace().next()?;
            let (method, result) = spec.split_once('=')?;
            Some((method.to_string(), result.to_string()))
        })
        .collect()
}

#[test]
fn every_method_result_reads_back_and_the_authserv_id_is_ours() {
    let field = all_checks();
    let pairs: Vec<(String, String)> = parse(&field);
    let pairs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(m, r)| (m.as_str(), r.as_str()))
        .collect();
    assert_eq!(
        pairs,
        [
            ("spf", "pass"),
            ("dkim", "pass"),
            ("dkim", "policy"),
            ("arc", "none"),
            ("dmarc", "pass"),
            ("iprev", "pass")
        ]
    );
    let value = field.strip_prefix("Authentication-Results:").unwrap();
    assert_eq!(
        authserv_id(value.as_bytes()).as_deref(),
        Some(&b"mx.example.com"[..])
    );
}

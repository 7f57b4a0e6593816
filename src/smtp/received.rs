//! The `Received:` trace header portcullis prepends to every message (RFC 5321 §4.4), with the
//! protocol keyword of RFC 3848 and the TLS details of the inbound session.

use std::net::IpAddr;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc2822;

use crate::envelope::TlsInfo;

/// What the header records.
#[derive(Debug, Clone)]
pub struct Trace<'a> {
    pub helo: &'a str,
    pub client_ip: IpAddr,
    pub hostname: &'a str,
    /// This node's name (`[cluster] node`): written as `(portcullis node NODE)` when it
    /// differs from `hostname`.
    pub node: &'a str,
    pub extended: bool,
    pub tls: Option<&'a TlsInfo>,
    pub authenticated: bool,
    pub queue_id: &'a str,
    /// Named in the header only when the message has exactly one recipient (a list would
    /// disclose Bcc recipients).
    pub single_recipient: Option<&'a str>,
    /// Seconds since the Unix epoch.
    pub now: u64,
}

/// Render the header, folded, ending in CRLF.
pub fn header(t: &Trace<'_>) -> String {
    let protocol = match (t.extended, t.tls.is_some(), t.authenticated) {
        (false, _, _) => "SMTP",
        (true, false, false) => "ESMTP",
        (true, true, false) => "ESMTPS",
        (true, false, true) => "ESMTPA",
        (true, true, true) => "ESMTPSA",
    };
    let ip = match t.client_ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => format!("IPv6:{v6}"),
        },
    };
    let helo: String = t
        .helo
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect();
    let by = if t.node == t.hostname {
        "portcullis".to_owned()
    } else {
        format!("portcullis node {}", t.node)
    };
    let mut h = format!(
        "Received: from {helo} ([{ip}])\r\n\tby {} ({by}) with {protocol} id {}",
        t.hostname, t.queue_id
    );
    if let Some(tls) = t.tls {
        h.push_str(&format!(
            "\r\n\t(using {} with cipher {})",
            tls.version, tls.cipher
        ));
    }
    if let Some(rcpt) = t.single_recipient {
        h.push_str(&format!("\r\n\tfor <{rcpt}>"));
    }
    let date = OffsetDateTime::from_unix_timestamp(t.now as i64)
        .ok()
        .and_then(|d| d.format(&Rfc2822).ok())
        .unwrap_or_else(|| "Thu, 01 Jan 1970 00:00:00 +0000".to_string());
    h.push_str(&format!(";\r\n\t{date}\r\n"));
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_tls_protocol_and_date() {
        let tls = TlsInfo {
            version: "TLSv1.3".into(),
            cipher: "TLS13_AES_256_GCM_SHA384".into(),
        };
        let h = header(&Trace {
            helo: "client.example",
            client_ip: "192.0.2.7".parse().unwrap(),
            hostname: "relay.example.com",
            node: "relay.example.com",
            extended: true,
            tls: Some(&tls),
            authenticated: true,
            queue_id: "0123456789ABCDEF",
            single_recipient: Some("a@example.com"),
            now: 1_700_000_000,
        });
        assert_eq!(
            h,
            "Received: from client.example ([192.0.2.7])\r\n\tby relay.example.com (portcullis) \
with ESMTPSA id 0123456789ABCDEF\r\n\t(using TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384)\r\n\
\tfor <a@example.com>;\r\n\tTue, 14 Nov 2023 22:13:20 +0000\r\n"
        );
    }

    #[test]
    fn a_node_named_otherwise_than_the_host_is_named_in_the_by_clause() {
        let h = header(&Trace {
            helo: "client.example",
            client_ip: "192.0.2.7".parse().unwrap(),
            hostname: "mx.example.com",
            node: "edge-2",
            extended: true,
            tls: None,
            authenticated: false,
            queue_id: "0123456789ABCDEF",
            single_recipient: None,
            now: 1_700_000_000,
        });
        assert_eq!(
            h,
            "Received: from client.example ([192.0.2.7])\r\n\tby mx.example.com (portcullis node \
edge-2) with ESMTP id 0123456789ABCDEF;\r\n\tTue, 14 Nov 2023 22:13:20 +0000\r\n"
        );
    }

    #[test]
    fn plain_helo_and_hostile_helo_text() {
        let h = header(&Trace {
            helo: "evil\u{7f}name with space",
            client_ip: "::ffff:127.0.0.1".parse().unwrap(),
            hostname: "r",
            node: "r",
            extended: false,
            tls: None,
            authenticated: false,
            queue_id: "X",
            single_recipient: None,
            now: 0,
        });
        assert!(h.starts_with("Received: from evil?name?with?space ([127.0.0.1])"));
        assert!(h.contains("with SMTP id X;"));
    }
}

//! The PROXY protocol (HAProxy's `proxy-protocol.txt`, versions 1 and 2) on listeners with
//! `trusted_proxies`: the header a load balancer sends before anything else, naming the
//! client it forwards.
//!
//! [`read_header`] reads one header from any stream, before the greeting (and before the TLS
//! handshake of an implicit-TLS listener), and never a single octet past it: what follows
//! belongs to the session (a client that talks before the greeting is still caught by
//! `pregreet_wait`). It is bounded in size ([`V1_MAX_LEN`], [`V2_MAX_LEN`]) and in time
//! ([`HEADER_TIMEOUT`]). Parsing is `ppp`'s; [`progress`] decides how many more octets a
//! header needs, so the reader is pure apart from its reads (and is what the `proxy_header`
//! fuzz target drives).
//!
//! What a header means for the session (the client's address used by every rule, the proxy's
//! own sessions, the refusal of a missing one) is decided by the listener
//! ([`super::listener`]); this module only reads.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::policy::access::normalize;

/// The longest v1 (text) header, CRLF included: 107 octets (proxy-protocol.txt §2.1).
pub const V1_MAX_LEN: usize = 107;

/// The shortest v1 header (`PROXY UNKNOWN\r\n`), read at once before looking further.
const V1_MIN_LEN: usize = 15;

/// The longest v2 (binary) header accepted: 4 KiB, its 16-octet fixed part included. The
/// protocol allows 16 + 65,535 octets; beyond the addresses (at most 216 octets, for
/// `AF_UNIX`) a v2 header only carries TLVs, which the relay ignores, and no load balancer
/// sends kilobytes of them.
pub const V2_MAX_LEN: usize = 4096;

/// The fixed part of a v2 header: signature, version and command, family, length.
const V2_FIXED_LEN: usize = 16;

/// The v1 signature.
const V1_SIGNATURE: &[u8] = b"PROXY ";

/// How long a trusted proxy has to send its whole header, from accept (a constant of its
/// own: no other limit fits a step that takes one packet). A load balancer sends it as soon
/// as its connection is up, before any client octet, so 5 s is generous; a connection that
/// has not sent it by then is closed (`rule=proxy_header`). It holds a slot of
/// `max_connections` meanwhile, never one of `max_connections_per_ip`.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Whom a header says the connection is from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A forwarded TCP connection: the client's address and port (an IPv4-mapped IPv6
    /// address given as the IPv4 address it carries).
    Client(SocketAddr),
    /// A v2 `LOCAL` header: the proxy's own connection (its health check).
    Local,
    /// A header whose family or protocol is unknown (v1 `UNKNOWN`, v2 `UNSPEC` or `AF_UNIX`):
    /// treated as the proxy's own connection, and logged.
    Unknown,
}

/// What [`progress`] says about the octets read so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// The header is not complete: read at most this many more octets (never more than the
    /// header can still hold, so nothing after it is read).
    Need(usize),
    /// The header is complete and valid.
    Done(Origin),
}

/// Why no client address could be read from a trusted proxy's connection.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// The connection closed (or was reset) before sending anything: a TCP health check,
    /// not an error.
    #[error("closed before sending anything")]
    Silent,
    /// The connection closed in the middle of a header.
    #[error("closed after {0} octets of a PROXY header")]
    Truncated(usize),
    /// No complete header within [`HEADER_TIMEOUT`].
    #[error("no complete PROXY header within {secs} s ({got} octets received)", secs = HEADER_TIMEOUT.as_secs())]
    Timeout {
        /// Octets received by then.
        got: usize,
    },
    /// The first octets are neither a v1 nor a v2 signature.
    #[error("not a PROXY header")]
    NotProxy,
    /// A v1 line without its CRLF within [`V1_MAX_LEN`] octets.
    #[error("PROXY v1 header longer than {V1_MAX_LEN} octets")]
    V1TooLong,
    /// A v2 header announcing more than [`V2_MAX_LEN`] octets.
    #[error("PROXY v2 header of {0} octets, over the limit of {V2_MAX_LEN}")]
    V2TooLong(usize),
    /// A v1 line `ppp` cannot read.
    #[error("malformed PROXY v1 header: {0}")]
    V1(#[from] ppp::v1::BinaryParseError),
    /// A v2 header `ppp` cannot read.
    #[error("malformed PROXY v2 header: {0}")]
    V2(#[from] ppp::v2::ParseError),
    /// A v2 `PROXY` header for a datagram (UDP) connection, on a TCP listener.
    #[error("PROXY v2 header for a datagram connection")]
    Datagram,
    /// Reading failed.
    #[error("read error after {got} octets: {source}")]
    Io {
        /// Octets received before the error.
        got: usize,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// How far `read`, the octets received so far, is from a complete header: how many more
/// octets to read, or what the complete header says.
///
/// # Errors
/// As soon as the octets cannot start a valid header, or the header is over its size
/// limit: [`HeaderError::NotProxy`], [`HeaderError::V1TooLong`], [`HeaderError::V2TooLong`],
/// [`HeaderError::V1`], [`HeaderError::V2`], [`HeaderError::Datagram`].
pub fn progress(read: &[u8]) -> Result<Progress, HeaderError> {
    let v2 = ppp::v2::PROTOCOL_PREFIX;
    let starts = |signature: &[u8]| {
        let n = read.len().min(signature.len());
        read[..n] == signature[..n]
    };
    if read.is_empty() {
        Ok(Progress::Need(V1_MIN_LEN))
    } else if starts(v2) {
        v2_progress(read)
    } else if starts(V1_SIGNATURE) {
        v1_progress(read)
    } else {
        Err(HeaderError::NotProxy)
    }
}

fn v1_progress(read: &[u8]) -> Result<Progress, HeaderError> {
    if let Some(end) = read.iter().position(|&b| b == b'\n') {
        if end + 1 != read.len() {
            // Only the first read can hold more than one octet past a line end.
            return Err(HeaderError::V1(ppp::v1::ParseError::InvalidSuffix.into()));
        }
        let header = ppp::v1::Header::try_from(read)?;
        if header.header.len() != read.len() {
            // A CR before the end: `ppp` read a shorter line than the one received.
            return Err(HeaderError::V1(ppp::v1::ParseError::InvalidSuffix.into()));
        }
        return Ok(Progress::Done(match header.addresses {
            ppp::v1::Addresses::Tcp4(a) => client(a.source_address.into(), a.source_port),
            ppp::v1::Addresses::Tcp6(a) => client(a.source_address.into(), a.source_port),
            ppp::v1::Addresses::Unknown => Origin::Unknown,
        }));
    }
    if read.len() >= V1_MAX_LEN {
        return Err(HeaderError::V1TooLong);
    }
    if read.len() < V1_MIN_LEN {
        return Ok(Progress::Need(V1_MIN_LEN - read.len()));
    }
    // A line ends with CRLF: after anything but a CR, at least two octets are still due.
    let due = if read.last() == Some(&b'\r') { 1 } else { 2 };
    Ok(Progress::Need(due.min(V1_MAX_LEN - read.len())))
}

fn v2_progress(read: &[u8]) -> Result<Progress, HeaderError> {
    if read.len() < V2_FIXED_LEN {
        return Ok(Progress::Need(V2_FIXED_LEN - read.len()));
    }
    let total = V2_FIXED_LEN + usize::from(u16::from_be_bytes([read[14], read[15]]));
    if total > V2_MAX_LEN {
        return Err(HeaderError::V2TooLong(total));
    }
    if read.len() < total {
        return Ok(Progress::Need(total - read.len()));
    }
    // TLVs are not read: nothing of them is used.
    let header = ppp::v2::Header::try_from(read)?;
    use ppp::v2::{Addresses, Command, Protocol};
    if header.command == Command::Local {
        return Ok(Progress::Done(Origin::Local));
    }
    let origin = match (header.addresses, header.protocol) {
        (Addresses::IPv4(_) | Addresses::IPv6(_), Protocol::Datagram) => {
            return Err(HeaderError::Datagram);
        }
        (Addresses::IPv4(a), Protocol::Stream) => client(a.source_address.into(), a.source_port),
        (Addresses::IPv6(a), Protocol::Stream) => client(a.source_address.into(), a.source_port),
        _ => Origin::Unknown,
    };
    Ok(Progress::Done(origin))
}

fn client(ip: std::net::IpAddr, port: u16) -> Origin {
    Origin::Client(SocketAddr::new(normalize(ip), port))
}

/// Read one PROXY header (v1 or v2) from `io` within [`HEADER_TIMEOUT`], and nothing after
/// it. A v2 header takes at most three reads; a v1 line is read a few octets at a time
/// (never past its CRLF), at most about 50 small reads.
///
/// # Errors
/// [`HeaderError::Silent`] when the stream ends (or is reset) before its first octet;
/// [`HeaderError::Truncated`], [`HeaderError::Io`] or [`HeaderError::Timeout`] when it
/// ends, fails or stalls within a header; those of [`progress`] for what it sent.
pub async fn read_header<S: AsyncRead + Unpin>(io: &mut S) -> Result<Origin, HeaderError> {
    let mut read = Vec::with_capacity(V2_FIXED_LEN);
    match tokio::time::timeout(HEADER_TIMEOUT, read_until_done(io, &mut read)).await {
        Ok(result) => result,
        Err(_) => Err(HeaderError::Timeout { got: read.len() }),
    }
}

async fn read_until_done<S: AsyncRead + Unpin>(
    io: &mut S,
    read: &mut Vec<u8>,
) -> Result<Origin, HeaderError> {
    loop {
        let need = match progress(read)? {
            Progress::Done(origin) => return Ok(origin),
            Progress::Need(n) => n,
        };
        let got = read.len();
        read.reserve(need);
        // At most `need` octets, appended as they arrive (so a timeout sees what came).
        let n = (&mut *io).take(need as u64).read_buf(read).await;
        match n {
            Ok(0) if got == 0 => return Err(HeaderError::Silent),
            Ok(0) => return Err(HeaderError::Truncated(got)),
            Ok(_) => {}
            // A health check that connects and resets at once.
            Err(e) if got == 0 && e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Err(HeaderError::Silent);
            }
            Err(source) => return Err(HeaderError::Io { got, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    /// A v2 header: `command` (0 LOCAL, 1 PROXY), `family_protocol` (0x11 TCP4, 0x21 TCP6,
    /// 0x12 UDP4, 0x00 UNSPEC), then `body` (addresses and TLVs).
    pub(crate) fn v2(command: u8, family_protocol: u8, body: &[u8]) -> Vec<u8> {
        let mut h = ppp::v2::PROTOCOL_PREFIX.to_vec();
        h.push(0x20 | command);
        h.push(family_protocol);
        h.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    /// Feed `header` to [`progress`] as the reader would, checking it never asks for more
    /// than the header holds; the outcome.
    fn parse(header: &[u8]) -> Result<Origin, HeaderError> {
        let mut at = 0;
        loop {
            match progress(&header[..at])? {
                Progress::Done(origin) => {
                    assert_eq!(at, header.len(), "done before the end of {header:?}");
                    return Ok(origin);
                }
                Progress::Need(n) => {
                    assert!(n > 0);
                    assert!(at + n <= header.len(), "asks past the end of {header:?}");
                    at += n;
                }
            }
        }
    }

    fn addr(s: &str) -> Origin {
        Origin::Client(s.parse().unwrap())
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let tcp4 = b"PROXY TCP4 203.0.113.9 192.0.2.25 51000 25\r\n";
        assert_eq!(parse(tcp4).unwrap(), addr("203.0.113.9:51000"));
        let tcp6 = b"PROXY TCP6 2001:db8::9 2001:db8::25 51000 25\r\n";
        assert_eq!(parse(tcp6).unwrap(), addr("[2001:db8::9]:51000"));
        let mapped = b"PROXY TCP6 ::ffff:203.0.113.9 ::1 51000 25\r\n";
        assert_eq!(parse(mapped).unwrap(), addr("203.0.113.9:51000"));
        assert_eq!(parse(b"PROXY UNKNOWN\r\n").unwrap(), Origin::Unknown);
        let unknown = b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n";
        assert_eq!(parse(unknown).unwrap(), Origin::Unknown);
    }

    #[test]
    fn the_longest_v1_header_is_read_and_one_octet_more_is_refused() {
        let longest = format!(
            "PROXY TCP6 {a} {a} 65535 65535\r\n",
            a = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
        );
        assert_eq!(longest.len(), 104);
        let ff = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"
            .parse()
            .unwrap();
        assert_eq!(parse(longest.as_bytes()).unwrap(), Origin::Client(ff));
        let unknown = format!("PROXY UNKNOWN {}\r\n", "x".repeat(V1_MAX_LEN - 16));
        assert_eq!(unknown.len(), V1_MAX_LEN);
        assert_eq!(parse(unknown.as_bytes()).unwrap(), Origin::Unknown);
        let over = format!("PROXY UNKNOWN {}\r\n", "x".repeat(V1_MAX_LEN - 15));
        assert!(matches!(
            parse(over.as_bytes()),
            Err(HeaderError::V1TooLong)
        ));
    }

    #[test]
    fn malformed_v1_headers_are_refused() {
        for bad in [
            &b"PROXY TCP4 203.0.113.9 192.0.2.25 51000\r\n"[..],
            b"PROXY TCP4 999.0.113.9 192.0.2.25 51000 25\r\n",
            b"PROXY TCP4 2001:db8::9 192.0.2.25 51000 25\r\n",
            b"PROXY TCP4 203.0.113.9 192.0.2.25 051000 25\r\n",
            b"PROXY TCP4 203.0.113.9 192.0.2.25 51000 25\n",
            b"PROXY TCP4 203.0.113.9\r192.0.2.25 51000 25\r\n",
            b"PROXY UDP4 203.0.113.9 192.0.2.25 51000 25\r\n",
            b"PROXY TCP4 203.0.113.9 192.0.2.25 51000 99999\r\n",
            b"PROXY TCP4 \xff.0.113.9 192.0.2.25 51000 25\r\n",
        ] {
            assert!(
                matches!(parse(bad), Err(HeaderError::V1(_))),
                "{:?}: {:?}",
                String::from_utf8_lossy(bad),
                parse(bad)
            );
        }
        assert!(matches!(progress(b"EHLO x"), Err(HeaderError::NotProxy)));
        assert!(matches!(
            progress(b"PROXY X\nEHLO x\r\n"),
            Err(HeaderError::V1(_))
        ));
        assert!(matches!(progress(b"PROXX"), Err(HeaderError::NotProxy)));
        assert!(matches!(
            progress(b"\r\n\r\n\0\r\nQUIT!"),
            Err(HeaderError::NotProxy)
        ));
    }

    #[test]
    fn v2_proxy_local_and_unspec() {
        let tcp4 = v2(1, 0x11, &[203, 0, 113, 9, 192, 0, 2, 25, 0xc7, 0x38, 0, 25]);
        assert_eq!(parse(&tcp4).unwrap(), addr("203.0.113.9:51000"));
        let mut body = Vec::new();
        body.extend_from_slice(
            &"2001:db8::9"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        body.extend_from_slice(&[0; 16]);
        body.extend_from_slice(&[0xc7, 0x38, 0, 25]);
        // A TLV (PP2_TYPE_AUTHORITY) after the addresses is ignored.
        body.extend_from_slice(&[0x02, 0, 4, b'm', b'x', b'.', b't']);
        assert_eq!(
            parse(&v2(1, 0x21, &body)).unwrap(),
            addr("[2001:db8::9]:51000")
        );
        assert_eq!(parse(&v2(0, 0x00, &[])).unwrap(), Origin::Local);
        // LOCAL ignores whatever addresses it carries.
        assert_eq!(parse(&v2(0, 0x11, &tcp4[16..])).unwrap(), Origin::Local);
        assert_eq!(parse(&v2(1, 0x00, &[])).unwrap(), Origin::Unknown);
        assert_eq!(parse(&v2(1, 0x31, &[0; 216])).unwrap(), Origin::Unknown);
    }

    #[test]
    fn malformed_and_oversized_v2_headers_are_refused() {
        let addrs = [203, 0, 113, 9, 192, 0, 2, 25, 0xc7, 0x38, 0, 25];
        assert!(matches!(
            parse(&v2(1, 0x12, &addrs)),
            Err(HeaderError::Datagram)
        ));
        // Too short for its family, an unknown command, a version 1 binary header.
        assert!(matches!(
            parse(&v2(1, 0x11, &addrs[..8])),
            Err(HeaderError::V2(_))
        ));
        assert!(matches!(
            parse(&v2(2, 0x11, &addrs)),
            Err(HeaderError::V2(_))
        ));
        let mut version1 = v2(1, 0x11, &addrs);
        version1[12] = 0x11;
        assert!(matches!(parse(&version1), Err(HeaderError::V2(_))));
        // The length field alone decides: nothing past the limit is read.
        let mut huge = v2(1, 0x11, &addrs);
        huge[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
        assert!(matches!(
            progress(&huge[..16]),
            Err(HeaderError::V2TooLong(65_551))
        ));
        let limit = v2(1, 0x11, &vec![0; V2_MAX_LEN - 16]);
        assert_eq!(
            parse(&limit).unwrap(),
            Origin::Client("0.0.0.0:0".parse().unwrap())
        );
        let over = v2(1, 0x11, &vec![0; V2_MAX_LEN - 15]);
        assert!(matches!(parse(&over), Err(HeaderError::V2TooLong(4097))));
    }

    #[tokio::test(start_paused = true)]
    async fn the_reader_stops_at_the_end_of_the_header() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        use tokio::io::AsyncWriteExt;
        client
            .write_all(b"PROXY TCP4 203.0.113.9 192.0.2.25 51000 25\r\nEHLO x\r\n")
            .await
            .unwrap();
        let origin = read_header(&mut server).await.unwrap();
        assert_eq!(origin, addr("203.0.113.9:51000"));
        let mut rest = [0u8; 8];
        server.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"EHLO x\r\n");
        let ip: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(origin, Origin::Client(SocketAddr::new(ip, 51000)));
    }

    #[tokio::test(start_paused = true)]
    async fn silence_truncation_and_timeout() {
        let (client, mut server) = tokio::io::duplex(1024);
        drop(client);
        assert!(matches!(
            read_header(&mut server).await,
            Err(HeaderError::Silent)
        ));

        let (mut client, mut server) = tokio::io::duplex(1024);
        use tokio::io::AsyncWriteExt;
        client.write_all(b"PROXY TCP4 203.0.113.9").await.unwrap();
        drop(client);
        assert!(matches!(
            read_header(&mut server).await,
            Err(HeaderError::Truncated(22))
        ));

        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(b"PROXY TCP4 203.0.113.9").await.unwrap();
        let started = tokio::time::Instant::now();
        let err = read_header(&mut server).await.unwrap_err();
        assert!(matches!(err, HeaderError::Timeout { got: 22 }), "{err}");
        assert_eq!(started.elapsed(), HEADER_TIMEOUT);
        drop(client);
    }
}

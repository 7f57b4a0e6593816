//! A blocking HTTP/1.1 client for the admin listener's tests: requests written by hand (so a
//! test can send exactly the malformed, oversized or slow request it means to), responses read
//! to the end of the connection (`Connection: close`) or by their `Content-Length`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use base64::Engine as _;

/// How long a test waits for any one response.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(15);

/// One response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header fields in order, names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Connect to 127.0.0.1:`port` with [`HTTP_TIMEOUT`] on reads and writes.
pub fn connect(port: u16) -> TcpStream {
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("connect 127.0.0.1:{port}: {e}"));
    tcp.set_read_timeout(Some(HTTP_TIMEOUT)).unwrap();
    tcp.set_write_timeout(Some(HTTP_TIMEOUT)).unwrap();
    tcp
}

/// Wait until 127.0.0.1:`port` accepts connections (the admin listener is bound); false
/// after `timeout`.
pub fn wait_accepting(port: u16, timeout: Duration) -> bool {
    super::wait_until(timeout, || TcpStream::connect(("127.0.0.1", port)).is_ok())
}

/// `GET path` with `headers` (each a full `Name: value`) and `Connection: close`.
pub fn get(port: u16, path: &str, headers: &[&str]) -> Response {
    request(port, "GET", path, headers)
}

/// `GET path` with `Authorization: Bearer token`.
/// The value of the series `series` (name and labels, e.g. `portcullis_alert_active{alert="x"}`)
/// on the `/metrics` of the admin listener `port`; `(none)` when it is not there.
pub fn metric(port: u16, series: &str) -> String {
    let metrics = get(port, "/metrics", &[]);
    assert_eq!(metrics.status, 200);
    let prefix = format!("{series} ");
    (metrics.body.lines())
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or("(none)")
        .to_owned()
}

/// `portcullis_alert_active{alert="ALERT"}` on the `/metrics` of the admin listener `port`.
pub fn alert_gauge(port: u16, alert: &str) -> String {
    metric(
        port,
        &format!("portcullis_alert_active{{alert=\"{alert}\"}}"),
    )
}

pub fn get_bearer(port: u16, path: &str, token: &str) -> Response {
    get(port, path, &[&format!("Authorization: Bearer {token}")])
}

/// The `Authorization` field for HTTP Basic with `user` and `password`.
pub fn basic(user: &str, password: &str) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Authorization: Basic {encoded}")
}

/// `METHOD path` with `headers` and `Connection: close`, read to the end.
pub fn request(port: u16, method: &str, path: &str, headers: &[&str]) -> Response {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n");
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("Connection: close\r\n\r\n");
    raw(port, head.as_bytes())
}

/// Send `bytes` as they are on a new connection and read the response to the end of the
/// connection.
pub fn raw(port: u16, bytes: &[u8]) -> Response {
    let mut tcp = connect(port);
    tcp.write_all(bytes).expect("write request");
    let mut out = Vec::new();
    // A reset after the response (the server closing with unread input) still leaves what
    // was read.
    let _ = tcp.read_to_end(&mut out);
    parse(&out)
        .unwrap_or_else(|| panic!("not an HTTP response: {:?}", String::from_utf8_lossy(&out)))
}

/// Send one keep-alive `GET path` on `tcp` and read exactly one response (by its
/// `Content-Length`), leaving the connection open.
pub fn get_on(tcp: &mut TcpStream, path: &str) -> Response {
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: admin\r\n\r\n").as_bytes())
        .expect("write request");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = find(&out, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if out.len() >= end + 4 + length {
                return parse(&out).expect("HTTP response");
            }
        }
        let n = tcp.read(&mut buf).expect("read response");
        assert!(n > 0, "connection closed mid-response: {out:?}");
        out.extend_from_slice(&buf[..n]);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Parse a whole response (status line, fields, body as text); `None` when it is not one.
pub fn parse(bytes: &[u8]) -> Option<Response> {
    let end = find(bytes, b"\r\n\r\n")?;
    let head = std::str::from_utf8(&bytes[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let status = status_line
        .strip_prefix("HTTP/1.1 ")?
        .get(..3)?
        .parse()
        .ok()?;
    let headers = lines
        .filter_map(|l| {
            let (n, v) = l.split_once(':')?;
            Some((n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        })
        .collect();
    Some(Response {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes[end + 4..]).into_owned(),
    })
}

//! A local HTTP receiver for the alerts' webhook: a thread that accepts on a loopback port,
//! reads one POST per connection (headers, then `Content-Length` octets of body), records the
//! body as JSON, and answers `200 OK`. Test-side only: the relay's client is hyper's.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use super::wait_until;

/// Most octets of headers a request may have before the receiver gives up on it.
const MAX_HEAD: usize = 16 * 1024;

/// A running receiver; every body it got, in order of arrival.
pub struct WebhookReceiver {
    port: u16,
    bodies: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl WebhookReceiver {
    /// Listen on a free loopback port.
    pub fn start() -> WebhookReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the webhook receiver");
        let port = listener.local_addr().unwrap().port();
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let got = bodies.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                if let Some(body) = serve(stream) {
                    got.lock().unwrap().push(body);
                }
            }
        });
        WebhookReceiver { port, bodies }
    }

    /// `http://127.0.0.1:PORT/hook`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    /// Every body received so far.
    pub fn bodies(&self) -> Vec<serde_json::Value> {
        self.bodies.lock().unwrap().clone()
    }

    /// The `(alert, state)` pairs received so far, in order.
    pub fn states(&self) -> Vec<(String, String)> {
        self.bodies()
            .iter()
            .map(|b| {
                (
                    b["alert"].as_str().unwrap_or("").to_owned(),
                    b["state"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    }

    /// Wait until a body with `alert` and `state` arrived; false after `timeout`.
    pub fn wait_for(&self, alert: &str, state: &str, timeout: Duration) -> bool {
        wait_until(timeout, || {
            self.states().iter().any(|(a, s)| a == alert && s == state)
        })
    }
}

/// Read one request from `stream`, answer 200, return its body as JSON (`None` when the
/// request is not a POST with a JSON body of `application/json`).
fn serve(stream: std::net::TcpStream) -> Option<serde_json::Value> {
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut head = Vec::new();
    let mut head_octets = 0usize;
    let mut length = 0usize;
    let mut json = false;
    loop {
        let mut line = String::new();
        let read = reader
            .by_ref()
            .take((MAX_HEAD + 1 - head_octets) as u64)
            .read_line(&mut line)
            .ok()?;
        head_octets += read;
        if read == 0 || head_octets > MAX_HEAD {
            return None;
        }
        head.push(line.clone());
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().ok()?,
                "content-type" => json = value.trim() == "application/json",
                _ => {}
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    let mut stream = stream;
    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    if !head[0].starts_with("POST /hook ") || !json {
        return None;
    }
    serde_json::from_slice(&body).ok()
}

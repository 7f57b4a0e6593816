//! The alerts' webhook: a POST of one JSON object (`Content-Type: application/json`) to
//! `[alerts] webhook` when an alert starts and when it ends:
//!
//! ```json
//! {"alert": "no_delivery", "state": "firing", "since": "2026-12-01T04:12:09Z",
//!  "node": "edge-1", "value": "312s", "threshold": "5m", "text": "…"}
//! ```
//!
//! `since` is when the state began (RFC 3339, UTC): the start for `firing`, the end for
//! `resolved`. `value` and `threshold` are text as in [`super::alerts::ActiveAlert`].
//!
//! Delivery: HTTP/1.1 over TCP, or over TLS for `https://` (the system's root certificates, as
//! `outbound::tls` verifies an upstream without `ca`); user and password in the URL are sent as
//! HTTP Basic authentication (RFC 7617). At most [`ATTEMPTS`] attempts, each bounded by
//! [`ATTEMPT_TIMEOUT`] from connecting to the response's status line, [`PAUSE`] apart; a 2xx
//! ends it, anything else is tried again, and after the last attempt the notification is
//! logged and dropped.
//!
//! Never blocking: [`Webhook::send`] only puts the notification in a queue of at most
//! [`QUEUE`] (when full, the oldest is dropped and logged), and one task of its own sends them
//! one by one, in order, so a `resolved` never overtakes its `firing`. A receiver that never
//! answers costs each notification at most `ATTEMPTS × ATTEMPT_TIMEOUT + (ATTEMPTS − 1) ×
//! PAUSE` (29 s) of that task's time, and nothing of the evaluation's or of mail's.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::alerts::{ActiveAlert, AlertName};

/// Attempts per notification.
pub const ATTEMPTS: u32 = 5;
/// Bound of one attempt: connect, TLS handshake, request, and the response's head.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between two attempts of one notification.
pub const PAUSE: Duration = Duration::from_secs(1);
/// Notifications waiting to be sent, at most; beyond it the oldest is dropped.
pub const QUEUE: usize = 64;

/// `state` of the webhook's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// The alert started.
    Firing,
    /// The alert ended.
    Resolved,
}

impl State {
    /// `firing` or `resolved`.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Firing => "firing",
            State::Resolved => "resolved",
        }
    }
}

/// The JSON object POSTed (DESIGN.md, `[alerts] webhook`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Body {
    pub alert: AlertName,
    pub state: State,
    /// When this state began, RFC 3339 in UTC.
    pub since: String,
    /// This node's name (`[cluster] node`, else `server.hostname`).
    pub node: String,
    pub value: String,
    pub threshold: String,
    pub text: String,
}

impl Body {
    /// The body announcing `alert` in `state` since `since_unix` (Unix seconds).
    pub fn new(state: State, alert: &ActiveAlert, since_unix: u64, node: &str) -> Body {
        Body {
            alert: alert.alert,
            state,
            since: rfc3339(since_unix),
            node: node.to_owned(),
            value: alert.value.clone(),
            threshold: alert.threshold.clone(),
            text: alert.text.clone(),
        }
    }
}

/// Unix seconds as RFC 3339 in UTC (`2026-12-01T04:12:09Z`); the raw number when out of a
/// date's range. The one spelling of a time in the webhook, the status and
/// the queue reports (`queue::report` re-exports it: observe does not import queue).
pub fn rfc3339(unix: u64) -> String {
    i64::try_from(unix)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

/// Why one attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The URL is not `http://` or `https://` with a host (the configuration check refuses
    /// such a URL; kept for a URL that reaches here otherwise).
    #[error("not an http:// or https:// URL with a host")]
    Url,
    /// The TCP connection failed (name resolution included).
    #[error("connect: {0}")]
    Connect(std::io::Error),
    /// The system has no usable root certificates for `https://`.
    #[error("no system root certificates found for https")]
    NoRoots,
    /// The host is not a valid TLS server name.
    #[error("{0:?} is not a valid TLS server name")]
    ServerName(String),
    /// rustls refused the client configuration.
    #[error("TLS configuration: {0}")]
    TlsConfig(rustls::Error),
    /// The TLS handshake or certificate verification failed.
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    /// The request could not be built (a header value from the URL).
    #[error("request: {0}")]
    Request(#[from] hyper::http::Error),
    /// The HTTP exchange failed.
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    /// The receiver answered with a status other than 2xx.
    #[error("the receiver answered {0}")]
    Status(u16),
    /// No answer within [`ATTEMPT_TIMEOUT`].
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// One notification: where to and what.
#[derive(Debug)]
struct Notification {
    url: String,
    body: Body,
}

#[derive(Debug, Default)]
struct Shared {
    queue: Mutex<VecDeque<Notification>>,
    wake: Notify,
}

/// The handle that queues notifications for the webhook's task. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Webhook {
    shared: Arc<Shared>,
}

impl Webhook {
    /// Start the sending task; it ends when `shutdown` is cancelled (notifications still
    /// queued then are dropped: the process is stopping).
    pub fn spawn(shutdown: CancellationToken) -> (Webhook, JoinHandle<()>) {
        let shared = Arc::new(Shared::default());
        let task = tokio::spawn(worker(shared.clone(), shutdown));
        (Webhook { shared }, task)
    }

    /// Queue `body` for `url`; returns at once. When [`QUEUE`] notifications are already
    /// waiting, the oldest is dropped (logged at warn with its `alert`).
    pub fn send(&self, url: &str, body: Body) {
        let dropped = {
            let mut queue = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
            queue.push_back(Notification {
                url: url.to_owned(),
                body,
            });
            if queue.len() > QUEUE {
                queue.pop_front()
            } else {
                None
            }
        };
        if let Some(n) = dropped {
            warn!(
                alert = n.body.alert.as_str(),
                state = n.body.state.as_str(),
                "webhook queue full ({QUEUE} waiting): dropped the oldest notification"
            );
        }
        self.shared.wake.notify_one();
    }
}

async fn worker(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut client = Client::default();
    loop {
        let next = shared
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front();
        let Some(n) = next else {
            tokio::select! {
                () = shared.wake.notified() => continue,
                () = shutdown.cancelled() => return,
            }
        };
        let alert = n.body.alert.as_str();
        let state = n.body.state.as_str();
        tokio::select! {
            result = client.deliver(&n) => match result {
                Ok(attempts) => info!(alert, state, attempts, "webhook notified"),
                Err(e) => warn!(
                    alert, state, attempts = ATTEMPTS,
                    "webhook failed, notification dropped: {e}"
                ),
            },
            () = shutdown.cancelled() => return,
        }
    }
}

/// Where a webhook URL points.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    tls: bool,
    /// The host to connect to and verify (IPv6 without brackets).
    host: String,
    port: u16,
    /// `Host:` (RFC 9110 §7.2): the authority without user information.
    authority: String,
    /// Path and query (`/` when empty).
    path: String,
    /// `Authorization: Basic …` from `user:password@` in the URL.
    basic: Option<String>,
}

impl Target {
    fn parse(url: &str) -> Result<Target, WebhookError> {
        let uri: hyper::Uri = url.parse().map_err(|_| WebhookError::Url)?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(WebhookError::Url),
        };
        let authority = uri.authority().ok_or(WebhookError::Url)?;
        let host = authority.host();
        if host.is_empty() {
            return Err(WebhookError::Url);
        }
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let basic = authority.as_str().rsplit_once('@').map(|(userinfo, _)| {
            use base64::Engine;
            let decoded = percent_decode(userinfo);
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(decoded)
            )
        });
        let host_header = match authority.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_owned(),
        };
        Ok(Target {
            tls,
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
            authority: host_header,
            path: uri.path_and_query().map_or("/", |p| p.as_str()).to_owned(),
            basic,
        })
    }

    fn request(&self, body: Bytes) -> Result<hyper::Request<Full<Bytes>>, WebhookError> {
        let mut request = hyper::Request::post(self.path.as_str())
            .header(header::HOST, self.authority.as_str())
            .header(header::CONTENT_TYPE, "application/json")
            .header(
                header::USER_AGENT,
                concat!("portcullis/", env!("CARGO_PKG_VERSION")),
            )
            .header(header::CONNECTION, "close");
        if let Some(basic) = &self.basic {
            request = request.header(header::AUTHORIZATION, basic.as_str());
        }
        Ok(request.body(Full::new(body))?)
    }
}

/// `%XX` escapes of the URL's user information decoded (RFC 3986 §2.1); a malformed escape
/// stays as written.
fn percent_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            // Two hex digits: at most 255.
            out.push(u8::try_from(hi * 16 + lo).unwrap_or(b'?'));
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// The HTTP client: the TLS configuration is built at the first `https://` notification and
/// kept.
#[derive(Debug, Default)]
struct Client {
    tls: Option<Arc<ClientConfig>>,
}

impl Client {
    /// Send `n` with retries; the number of attempts on success, the last error otherwise.
    async fn deliver(&mut self, n: &Notification) -> Result<u32, WebhookError> {
        let target = Target::parse(&n.url)?;
        // Serializing a struct of strings cannot fail.
        let body = Bytes::from(serde_json::to_vec(&n.body).unwrap_or_default());
        let mut attempt = 1;
        loop {
            let error =
                match tokio::time::timeout(ATTEMPT_TIMEOUT, self.post(&target, body.clone())).await
                {
                    Ok(Ok(status)) if (200..300).contains(&status) => return Ok(attempt),
                    Ok(Ok(status)) => WebhookError::Status(status),
                    Ok(Err(e)) => e,
                    Err(_) => WebhookError::Timeout(ATTEMPT_TIMEOUT),
                };
            tracing::debug!(
                alert = n.body.alert.as_str(),
                attempt,
                "webhook attempt failed: {error}"
            );
            if attempt == ATTEMPTS {
                return Err(error);
            }
            attempt += 1;
            tokio::time::sleep(PAUSE).await;
        }
    }

    /// One attempt: the response's status code.
    async fn post(&mut self, target: &Target, body: Bytes) -> Result<u16, WebhookError> {
        let request = target.request(body)?;
        let tcp = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(WebhookError::Connect)?;
        let status = |response: hyper::Response<_>| async move { response.status().as_u16() };
        if !target.tls {
            return Ok(exchange(TokioIo::new(tcp), request, status).await?);
        }
        let name = rustls_pki_types::ServerName::try_from(target.host.clone())
            .map_err(|_| WebhookError::ServerName(target.host.clone()))?;
        let stream = tokio_rustls::TlsConnector::from(self.tls_config()?)
            .connect(name, tcp)
            .await
            .map_err(WebhookError::Tls)?;
        Ok(exchange(TokioIo::new(stream), request, status).await?)
    }

    fn tls_config(&mut self) -> Result<Arc<ClientConfig>, WebhookError> {
        if let Some(config) = &self.tls {
            return Ok(config.clone());
        }
        let mut roots = RootCertStore::empty();
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        if roots.is_empty() {
            return Err(WebhookError::NoRoots);
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(WebhookError::TlsConfig)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = Arc::new(config);
        self.tls = Some(config.clone());
        Ok(config)
    }
}

/// One HTTP/1.1 request on `io`, its response handed to `read` (which may read the body);
/// the connection is driven in this same future, not a task of its own, so a timeout around
/// it leaves nothing behind. The one client exchange of the relay: the webhook's POST, and
/// `portcullis status` asking the admin API (`admin::client`).
///
/// # Errors
/// The handshake or the exchange failed; what `read` makes of the response is its own value.
pub(crate) async fn exchange<S, B, T, Fut>(
    io: S,
    request: hyper::Request<B>,
    read: impl FnOnce(hyper::Response<hyper::body::Incoming>) -> Fut,
) -> Result<T, hyper::Error>
where
    S: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    Fut: Future<Output = T>,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    let mut connection = std::pin::pin!(connection);
    let mut work = std::pin::pin!(async move {
        let response = sender.send_request(request).await?;
        Ok(read(response).await)
    });
    tokio::select! {
        biased;
        done = &mut work => done,
        // The connection may end (`Connection: close`) in the same poll that hands over the
        // response: the response, or why there is none, is then ready, and what is left of
        // its body waits in the body's channel.
        closed = &mut connection => {
            closed?;
            work.await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_become_targets_with_default_ports_and_basic_auth() {
        let t = Target::parse("http://127.0.0.1:8080/portcullis?x=1").unwrap();
        assert_eq!(
            t,
            Target {
                tls: false,
                host: "127.0.0.1".into(),
                port: 8080,
                authority: "127.0.0.1:8080".into(),
                path: "/portcullis?x=1".into(),
                basic: None,
            }
        );
        let t = Target::parse("https://ops:s%40cret@hooks.example.org").unwrap();
        assert_eq!(
            (t.tls, t.host.as_str(), t.port, t.authority.as_str()),
            (true, "hooks.example.org", 443, "hooks.example.org")
        );
        assert_eq!(t.path, "/");
        // base64("ops:s@cret")
        assert_eq!(t.basic.as_deref(), Some("Basic b3BzOnNAY3JldA=="));
        let t = Target::parse("http://[::1]:9/a").unwrap();
        assert_eq!((t.host.as_str(), t.authority.as_str()), ("::1", "[::1]:9"));
        for bad in ["ftp://h/", "/relative", "http:///x", "not a url"] {
            assert!(
                matches!(Target::parse(bad), Err(WebhookError::Url)),
                "{bad}"
            );
        }
    }

    #[test]
    fn since_is_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_796_098_329), "2026-12-01T04:12:09Z");
        assert_eq!(rfc3339(u64::MAX), u64::MAX.to_string());
    }

    #[test]
    fn the_body_has_the_contracts_fields() {
        let alert = ActiveAlert {
            alert: AlertName::NoDelivery,
            since: 60,
            value: "312s".into(),
            threshold: "5m".into(),
            text: "stuck".into(),
        };
        let json = serde_json::to_value(Body::new(State::Resolved, &alert, 120, "edge-1")).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "alert": "no_delivery", "state": "resolved", "since": "1970-01-01T00:02:00Z",
                "node": "edge-1", "value": "312s", "threshold": "5m", "text": "stuck",
            })
        );
    }

    #[test]
    fn a_full_queue_drops_the_oldest_notification() {
        let webhook = Webhook {
            shared: Arc::default(),
        };
        let alert = ActiveAlert {
            alert: AlertName::QueueDepth,
            since: 0,
            value: String::new(),
            threshold: "1".into(),
            text: String::new(),
        };
        for n in 0..=QUEUE {
            let mut body = Body::new(State::Firing, &alert, 0, "edge-1");
            body.value = n.to_string();
            webhook.send("http://127.0.0.1:9/", body);
        }
        let queue = webhook.shared.queue.lock().unwrap();
        let values: Vec<&str> = queue.iter().map(|n| n.body.value.as_str()).collect();
        assert_eq!(values.len(), QUEUE);
        assert_eq!((values[0], values[QUEUE - 1]), ("1", "64"));
    }
}

//! `portcullis status`: ask the running relay's admin API (`GET /api/status`, RFC 9110 §9.3.1)
//! for its [`Status`], or, when no admin listener is configured, the relay does not answer,
//! answers a server error or breaks off the exchange ([`ClientError::falls_back`]), rebuild it
//! from the spool and journal ([`super::offline`]) and say why.
//!
//! The request goes over one HTTP/1.1 connection made with hyper's client (no hand-written
//! HTTP; the exchange is the webhook's, `observe::webhook::exchange`), to the configured address (an unspecified bind address is asked on loopback),
//! with the token as `Authorization: Bearer` (RFC 6750 §2.1), bounded by [`TIMEOUT`] and
//! [`MAX_BODY`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper::body::Bytes;
use hyper::header::{ACCEPT, AUTHORIZATION, HOST};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;

use crate::config::Config;
use crate::observe::status::Status;
use crate::observe::webhook::exchange;
use crate::policy::store::ClientState;
use crate::queue::Spool;

use super::offline::{self, OfflineError};

/// The whole request, connection included, must finish within this.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Largest `/api/status` body read (a status is a few KiB; the lists in it are bounded).
pub const MAX_BODY: usize = 4 * 1024 * 1024;

/// Why the admin API gave no status.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing accepted the connection (the relay is not running, or listens elsewhere).
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// No complete answer within [`TIMEOUT`].
    #[error("no answer from {addr} within {}s", TIMEOUT.as_secs())]
    Timeout { addr: SocketAddr },
    /// 401: the token is missing or wrong.
    #[error(
        "the admin API on {addr} refused the token (401 Unauthorized): check [admin] token_file \
         against the running relay's"
    )]
    Unauthorized { addr: SocketAddr },
    /// Any other status than 200.
    #[error("the admin API on {addr} answered {status}")]
    Status {
        addr: SocketAddr,
        status: StatusCode,
    },
    /// The HTTP exchange failed (connection closed, malformed response).
    #[error("HTTP exchange with {addr} failed: {source}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    /// The body exceeded [`MAX_BODY`], or the request could not be built.
    #[error("cannot read the answer of {addr}: {message}")]
    Body { addr: SocketAddr, message: String },
    /// The connection failed while the body was being read.
    #[error("the answer of {addr} was cut off: {message}")]
    Cut { addr: SocketAddr, message: String },
    /// The body is not what was asked for (a status, a client state).
    #[error("the answer of {addr} is not what was asked for: {source}")]
    Json {
        addr: SocketAddr,
        #[source]
        source: serde_json::Error,
    },
}

impl ClientError {
    /// True when the relay is simply not there to ask (nothing listening, or no answer in
    /// time).
    pub fn not_answering(&self) -> bool {
        matches!(
            self,
            ClientError::Connect { .. } | ClientError::Timeout { .. }
        )
    }

    /// True when the live state cannot be had but the relay's files can still tell: it is
    /// not answering, it answered a server error (`5xx`, e.g. `503` with every admin slot
    /// taken), or the exchange failed mid-way. The status then comes from the spool and
    /// journal instead. Every other error (a wrong token above all: the operator's to fix)
    /// is reported, not papered over.
    pub fn falls_back(&self) -> bool {
        match self {
            ClientError::Connect { .. }
            | ClientError::Timeout { .. }
            | ClientError::Http { .. }
            | ClientError::Cut { .. } => true,
            ClientError::Status { status, .. } => status.is_server_error(),
            ClientError::Unauthorized { .. }
            | ClientError::Body { .. }
            | ClientError::Json { .. } => false,
        }
    }
}

/// Why `portcullis status` has nothing to print.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The admin API answered, but not with a status.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The spool or journal could not be read.
    #[error(transparent)]
    Offline(#[from] OfflineError),
}

/// What `portcullis status` prints: the status, and when it is not live, the first line
/// saying why.
#[derive(Debug)]
pub struct Gathered {
    pub status: Status,
    /// `relay not answering on ADDR: live state unavailable; from the spool and journal:` (or
    /// the same with the admin API's failure, e.g. `the admin API on ADDR answered 503 Service
    /// Unavailable`, or for a policy without `[admin]`); `None` for a live status.
    pub notice: Option<String>,
}

/// The address to ask for a listener bound to `bind`: the same, or loopback of the same
/// family for an unspecified address (`0.0.0.0`, `[::]`).
pub fn target(bind: SocketAddr) -> SocketAddr {
    match bind.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), bind.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), bind.port())
        }
        _ => bind,
    }
}

/// The status of the relay `config` describes, at `now_unix`: live from its admin API, else
/// from `spool` and its journal.
///
/// # Errors
/// [`StatusError::Client`] when the admin API answers with anything but a status and
/// [`ClientError::falls_back`] is false (a 401 for a wrong token); [`StatusError::Offline`] when the spool cannot be read.
pub async fn gather(
    config: &Config,
    spool: &Spool,
    now_unix: u64,
) -> Result<Gathered, StatusError> {
    let why = match &config.admin {
        Some(admin) => {
            let addr = target(admin.bind);
            match fetch_status(addr, admin.token.as_deref()).await {
                Ok(status) => {
                    return Ok(Gathered {
                        status,
                        notice: None,
                    });
                }
                Err(e) if e.not_answering() => format!("relay not answering on {addr}"),
                Err(e) if e.falls_back() => e.to_string(),
                Err(e) => return Err(e.into()),
            }
        }
        None => "no [admin] listener configured".to_owned(),
    };
    let spool = spool.clone();
    let config = config.clone();
    let status = tokio::task::spawn_blocking(move || offline::status(&config, &spool, now_unix))
        .await
        .map_err(|e| OfflineError::Task(e.to_string()))??;
    Ok(Gathered {
        status,
        notice: Some(format!(
            "{why}: live state unavailable; from the spool and journal:"
        )),
    })
}

/// `GET /api/status` from the admin listener at `addr`, with `token` as a Bearer token.
///
/// # Errors
/// See [`ClientError`]; [`ClientError::not_answering`] tells a relay that is not there from
/// one that answered wrongly.
pub async fn fetch_status(addr: SocketAddr, token: Option<&str>) -> Result<Status, ClientError> {
    get_json(addr, token, "/api/status").await
}

/// `GET /api/explain-state?ip=IP[&user=LOGIN]` from the admin listener at `addr`: what the
/// running relay's pause, connection caps, rate limits and AUTH lockout say of that client now, read without taking
/// anything (see [`ClientState`]).
///
/// # Errors
/// See [`ClientError`], as for [`fetch_status`].
pub async fn fetch_client_state(
    addr: SocketAddr,
    token: Option<&str>,
    ip: IpAddr,
    user: Option<&str>,
) -> Result<ClientState, ClientError> {
    let mut path = format!("/api/explain-state?ip={}", query_escape(&ip.to_string()));
    if let Some(user) = user {
        path.push_str("&user=");
        path.push_str(&query_escape(user));
    }
    get_json(addr, token, &path).await
}

/// `GET /api/users` from the admin listener at `addr`: the messages each login sent within
/// the last hour (see [`super::users::UsersActivity`]).
///
/// # Errors
/// See [`ClientError`], as for [`fetch_status`].
pub async fn fetch_users(
    addr: SocketAddr,
    token: Option<&str>,
) -> Result<super::users::UsersActivity, ClientError> {
    get_json(addr, token, "/api/users").await
}

/// The running relay's answer to `request` (given the admin listener's address and token),
/// with that address; or, for a person, why there is none: no `[admin]`, the relay not
/// answering, or the error.
///
/// # Errors
/// That reason.
pub async fn ask_running<T, F, Fut>(config: &Config, request: F) -> Result<(T, SocketAddr), String>
where
    F: FnOnce(SocketAddr, Option<std::sync::Arc<str>>) -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let Some(admin) = &config.admin else {
        return Err("no [admin] listener configured".to_owned());
    };
    let addr = target(admin.bind);
    match request(addr, admin.token.clone()).await {
        Ok(answer) => Ok((answer, addr)),
        Err(e) if e.not_answering() => Err(format!("relay not answering on {addr}")),
        Err(e) => Err(e.to_string()),
    }
}

/// `text` as a query value: every octet but unreserved ones percent-encoded (RFC 3986 §2).
fn query_escape(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `GET path` with the token, and the `200` answer's JSON body read as a `T`, all within
/// [`TIMEOUT`].
async fn get_json<T: serde::de::DeserializeOwned>(
    addr: SocketAddr,
    token: Option<&str>,
    path: &str,
) -> Result<T, ClientError> {
    tokio::time::timeout(TIMEOUT, get_json_unbounded(addr, token, path))
        .await
        .unwrap_or(Err(ClientError::Timeout { addr }))
}

/// [`get_json`] without its time bound.
async fn get_json_unbounded<T: serde::de::DeserializeOwned>(
    addr: SocketAddr,
    token: Option<&str>,
    path: &str,
) -> Result<T, ClientError> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|source| ClientError::Connect { addr, source })?;
    let mut request = Request::get(path)
        .header(HOST, addr.to_string())
        .header(ACCEPT, "application/json");
    if let Some(token) = token {
        request = request.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|e| ClientError::Body {
            addr,
            message: e.to_string(),
        })?;
    let body = exchange(TokioIo::new(stream), request, |response| async move {
        match response.status() {
            StatusCode::OK => {}
            StatusCode::UNAUTHORIZED => return Err(ClientError::Unauthorized { addr }),
            status => return Err(ClientError::Status { addr, status }),
        }
        Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map(|collected| collected.to_bytes())
            .map_err(|e| {
                let message = e.to_string();
                if e.is::<LengthLimitError>() {
                    ClientError::Body { addr, message }
                } else {
                    ClientError::Cut { addr, message }
                }
            })
    })
    .await
    .map_err(|source| ClientError::Http { addr, source })??;
    serde_json::from_slice(&body).map_err(|source| ClientError::Json { addr, source })
}

#[cfg(test)]
mod tests;

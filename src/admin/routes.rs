//! The admin routes and the checks every request passes first, in this order:
//! 1. method: `GET` or `HEAD` only, else `405` with `Allow: GET, HEAD` (RFC 9110 §15.5.6);
//! 2. no body: a `Content-Length` other than 0 or any `Transfer-Encoding` is `413`
//!    (RFC 9110 §15.5.14; the body is never read);
//! 3. for every path but `/healthz` and `/readyz`: without a token (a loopback listener),
//!    the `Host` must name an IP literal or `localhost` ([`names_a_local_host`]), else `403`,
//!    so that a page in a browser on the host cannot read the status by DNS rebinding (its
//!    `Host` is the attacker's name); then the token ([`authorized`]): else `401` with
//!    `WWW-Authenticate: Basic realm="portcullis"` (RFC 9110 §11.6.1, RFC 7617);
//! 4. the handler, within [`REQUEST_TIMEOUT`], else `408`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::uri::Authority;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::get;
use base64::Engine as _;
use subtle::ConstantTimeEq as _;
use tracing::info;

use super::server::REQUEST_TIMEOUT;
use super::users::UsersActivity;
use super::{AdminState, page, ready};
use crate::envelope::unix_now;
use crate::observe::metrics::CONTENT_TYPE;
use crate::observe::status::Status;

/// Paths served without the token (probes of load balancers and orchestrators).
pub const OPEN_PATHS: [&str; 2] = ["/healthz", "/readyz"];

/// The challenge of a `401`: a browser then asks for a user name and password.
pub const CHALLENGE: &str = "Basic realm=\"portcullis\"";

/// The peer of the connection a request came on (an extension set per connection).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// The admin routes with their checks, on `state`.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/status", get(api_status))
        .route("/api/explain-state", get(explain_state))
        .route("/api/users", get(api_users))
        .route("/", get(status_page))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// The routes served on a connection beyond the general slots
/// ([`super::server::PROBE_CONNECTIONS`]): the probes, with the same checks, and `503` for
/// anything else.
pub fn probe_router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(busy)
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// The checks of the module doc, steps 1 to 4.
async fn guard(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    let method = request.method().clone();
    // The address itself in the log (every connection has the extension).
    let peer = request
        .extensions()
        .get::<Peer>()
        .map_or_else(|| "unknown".to_owned(), |p| p.0.to_string());
    let refuse = |status: StatusCode, why: &str| {
        // Never the token or the Authorization header: only what was asked and why not.
        info!(%peer, %method, path = %path, status = status.as_u16(), "admin request refused: {why}");
    };
    if method != Method::GET && method != Method::HEAD {
        refuse(StatusCode::METHOD_NOT_ALLOWED, "method");
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    if has_body(request.headers()) {
        refuse(StatusCode::PAYLOAD_TOO_LARGE, "request body");
        return plain(StatusCode::PAYLOAD_TOO_LARGE, "no request body allowed\n");
    }
    let open = OPEN_PATHS.contains(&path.as_str());
    if !open
        && expected_token(&state).is_none()
        && !names_a_local_host(request.headers(), request.uri())
    {
        refuse(
            StatusCode::FORBIDDEN,
            "no token, and Host is not an IP literal or localhost",
        );
        return plain(StatusCode::FORBIDDEN, "forbidden host\n");
    }
    if !open && !authorized(&state, request.headers()) {
        refuse(StatusCode::UNAUTHORIZED, "token missing or wrong");
        let mut response = plain(StatusCode::UNAUTHORIZED, "token required\n");
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(CHALLENGE),
        );
        return response;
    }
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            refuse(StatusCode::REQUEST_TIMEOUT, "handler timed out");
            plain(StatusCode::REQUEST_TIMEOUT, "request timed out\n")
        }
    }
}

/// A request announces a body: `Content-Length` other than `0` (or unreadable), or any
/// `Transfer-Encoding` (RFC 9112 §6.1).
fn has_body(headers: &HeaderMap) -> bool {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        return true;
    }
    headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .any(|v| v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()) != Some(0))
}

/// Whether the request carries the token the running configuration asks for (see
/// [`expected_token`]): `Authorization: Bearer TOKEN` (RFC 6750 §2.1) or `Basic` with any
/// user name and the token as password (RFC 7617), compared in constant time (only the
/// length of a wrong token can be learnt from the timing).
pub fn authorized(state: &AdminState, headers: &HeaderMap) -> bool {
    let Some(token) = expected_token(state) else {
        // No token: open, which check-config allows only on loopback. A listener bound
        // elsewhere whose token a reload removed stays closed until a restart.
        return state.bound.ip().is_loopback();
    };
    let Some(presented) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| presented_token(v.as_bytes()))
    else {
        return false;
    };
    presented.ct_eq(token.as_bytes()).into()
}

/// Whether every name the request gives for the server (each `Host` field, and the
/// authority of an absolute-form target) is an IP literal or `localhost`, with or without a
/// port (parsed as the http crate's [`Authority`]). A request with neither (HTTP/1.0 without
/// `Host`) names nothing and passes: a browser always sends `Host`.
pub fn names_a_local_host(headers: &HeaderMap, uri: &Uri) -> bool {
    let is_local = |authority: &Authority| {
        let host = authority.host();
        let literal = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        host.eq_ignore_ascii_case("localhost") || literal.parse::<IpAddr>().is_ok()
    };
    headers
        .get_all(header::HOST)
        .iter()
        .all(|v| Authority::try_from(v.as_bytes()).is_ok_and(|a| is_local(&a)))
        && uri.authority().is_none_or(is_local)
}

/// The token the running configuration asks for: `[admin]`'s, or the one the listener
/// started with when a reload removed `[admin]` (the listener keeps running until a restart).
fn expected_token(state: &AdminState) -> Option<Arc<str>> {
    let config = (state.config)();
    match &config.admin {
        Some(admin) => admin.token.clone(),
        None => state.start_token.clone(),
    }
}

/// The secret in an `Authorization` value: the token of `Bearer TOKEN`, or the password of
/// `Basic BASE64(user:password)`. Scheme names are case-insensitive (RFC 9110 §11.1).
pub fn presented_token(value: &[u8]) -> Option<Vec<u8>> {
    let space = value.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = (&value[..space], value[space + 1..].trim_ascii());
    if scheme.eq_ignore_ascii_case(b"bearer") {
        return Some(rest.to_vec());
    }
    if scheme.eq_ignore_ascii_case(b"basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let colon = decoded.iter().position(|&b| b == b':')?;
        return Some(decoded[colon + 1..].to_vec());
    }
    None
}

fn plain(status: StatusCode, text: &'static str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        text,
    )
        .into_response()
}

/// `/healthz`: the process answers.
async fn healthz() -> Response {
    plain(StatusCode::OK, "ok\n")
}

/// `/readyz`: `200 ready`, or `503` with the reason on one line.
async fn readyz(State(state): State<AdminState>) -> Response {
    match not_ready(&state).await {
        None => plain(StatusCode::OK, "ready\n"),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("{reason}\n"),
        )
            .into_response(),
    }
}

/// The readiness verdict, its system calls off the reactor.
async fn not_ready(state: &AdminState) -> Option<String> {
    let (telemetry, spool) = (state.telemetry.clone(), state.spool.clone());
    let min_free = (state.config)().limits.min_free_space;
    tokio::task::spawn_blocking(move || ready::check(&telemetry, &spool, min_free))
        .await
        .unwrap_or_else(|e| Some(format!("readiness check failed: {e}")))
}

/// `/metrics`: every family of the contract, OpenMetrics text.
async fn metrics(State(state): State<AdminState>) -> Response {
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        state.telemetry.metrics.encode(),
    )
        .into_response()
}

async fn status(state: &AdminState) -> Status {
    let not_ready = not_ready(state).await;
    Status::live(&state.telemetry, unix_now(), not_ready)
}

/// `/api/status`: [`Status`] as JSON.
async fn api_status(State(state): State<AdminState>) -> Json<Status> {
    Json(status(&state).await)
}

/// The query of `/api/explain-state`: the client's address and, optionally, its login.
#[derive(Debug, serde::Deserialize)]
pub struct ExplainQuery {
    /// The client address.
    pub ip: IpAddr,
    /// The AUTH login.
    pub user: Option<String>,
}

/// `/api/explain-state?ip=IP[&user=LOGIN]`: what the pause, the connection caps, the rate
/// limits and the AUTH lockout say of that client now ([`crate::policy::store::ClientState`]), read without taking a budget or
/// recording anything. A malformed query is `400` (axum's `Query` rejection).
async fn explain_state(
    State(state): State<AdminState>,
    axum::extract::Query(query): axum::extract::Query<ExplainQuery>,
) -> Response {
    let Some(client_state) = &state.client_state else {
        return not_found().await.into_response();
    };
    Json(client_state(query.ip, query.user).await).into_response()
}

/// `/api/users`: [`UsersActivity`], the messages each login sent within the last hour, as the
/// running relay counts them.
async fn api_users(State(state): State<AdminState>) -> Response {
    let Some(users) = &state.users else {
        return not_found().await.into_response();
    };
    Json(UsersActivity {
        messages_last_hour: users(),
    })
    .into_response()
}

/// `/`: the status page.
async fn status_page(State(state): State<AdminState>) -> Html<String> {
    Html(page::render(&status(&state).await))
}

/// Anything but a probe on a probe-only connection.
async fn busy() -> Response {
    let mut response = plain(StatusCode::SERVICE_UNAVAILABLE, "too many connections\n");
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

async fn not_found() -> Response {
    plain(StatusCode::NOT_FOUND, "not found\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_and_basic_carry_the_token_and_nothing_else_does() {
        let basic = |user_pass: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(user_pass)
            )
        };
        let cases: Vec<(String, Option<&[u8]>)> = vec![
            ("Bearer s3cret".into(), Some(b"s3cret")),
            ("bearer  s3cret ".into(), Some(b"s3cret")),
            (basic("anyone:s3cret"), Some(b"s3cret")),
            (basic(":s3cret:with:colons"), Some(b"s3cret:with:colons")),
            (basic("no-colon"), None),
            ("Basic !!notbase64".into(), None),
            ("Digest s3cret".into(), None),
            ("s3cret".into(), None),
            (String::new(), None),
        ];
        for (value, token) in cases {
            assert_eq!(
                presented_token(value.as_bytes()).as_deref(),
                token,
                "{value:?}"
            );
        }
    }

    /// Admin state whose configuration is a minimal policy plus `toml`, bound to
    /// `bound`, started with `start_token`.
    fn state(
        dir: &std::path::Path,
        toml: &str,
        bound: &str,
        start_token: Option<&str>,
    ) -> AdminState {
        let text = format!(
            "[server]\nhostname = \"relay.test\"\nspool_dir = {:?}\n[[listeners]]\n\
             bind = \"127.0.0.1:2525\"\ntls = \"none\"\n[[upstreams]]\naddress = \"127.0.0.1:25\"\n{toml}",
            dir.join("spool")
        );
        let config = Arc::new(crate::config::Config::from_toml(&text, None).expect("valid"));
        AdminState {
            telemetry: Arc::new(crate::observe::Telemetry::new("relay.test")),
            spool: crate::queue::Spool::open(&dir.join("spool")).expect("spool"),
            config: Arc::new(move || config.clone()),
            start_token: start_token.map(Arc::from),
            bound: bound.parse().expect("socket address"),
            client_state: None,
            users: None,
        }
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        headers
    }

    #[test]
    fn the_token_comes_from_the_running_configuration_and_never_opens_up_on_reload() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t"), "now\n").unwrap();
        let with_token = format!(
            "[admin]\nbind = \"127.0.0.1:9025\"\ntoken_file = {:?}\n",
            dir.path().join("t")
        );
        // The configuration's token, not the one the listener started with.
        let s = state(dir.path(), &with_token, "127.0.0.1:9025", Some("then"));
        assert!(authorized(&s, &bearer("now")));
        assert!(!authorized(&s, &bearer("then")));
        assert!(!authorized(&s, &HeaderMap::new()));
        // [admin] reloaded away: the start token still applies.
        let s = state(dir.path(), "", "192.0.2.1:9025", Some("then"));
        assert!(authorized(&s, &bearer("then")));
        assert!(!authorized(&s, &HeaderMap::new()));
        // No token at all: open on loopback only.
        let open = "[admin]\nbind = \"127.0.0.1:9025\"\n";
        assert!(authorized(
            &state(dir.path(), open, "127.0.0.1:9025", None),
            &HeaderMap::new()
        ));
        assert!(authorized(
            &state(dir.path(), open, "[::1]:9025", None),
            &HeaderMap::new()
        ));
        assert!(!authorized(
            &state(dir.path(), open, "192.0.2.1:9025", None),
            &HeaderMap::new()
        ));
        assert!(!authorized(
            &state(dir.path(), open, "192.0.2.1:9025", None),
            &bearer("x")
        ));
    }

    #[test]
    fn only_an_ip_literal_or_localhost_names_a_local_host() {
        let cases: [(&[&str], &str, bool); 14] = [
            (&["127.0.0.1"], "/", true),
            (&["127.0.0.1:9025"], "/", true),
            (&["[::1]:9025"], "/", true),
            (&["[::1]"], "/", true),
            (&["localhost:9025"], "/", true),
            (&["LocalHost"], "/", true),
            (&["192.0.2.7:80"], "/", true),
            (&[], "/", true),
            (&["rebind.example:9025"], "/", false),
            (&["localhost.rebind.example"], "/", false),
            (&["127.0.0.1.nip.io"], "/", false),
            (&["127.0.0.1", "rebind.example"], "/", false),
            (&["bad host"], "/", false),
            (&["127.0.0.1"], "http://rebind.example/api/status", false),
        ];
        for (hosts, target, local) in cases {
            let mut headers = HeaderMap::new();
            for host in hosts {
                headers.append(header::HOST, HeaderValue::from_str(host).unwrap());
            }
            let uri: Uri = target.parse().unwrap();
            assert_eq!(
                names_a_local_host(&headers, &uri),
                local,
                "{hosts:?} {target}"
            );
        }
    }

    #[test]
    fn a_request_announcing_a_body_is_recognised() {
        let cases: [(&[(&str, &str)], bool); 6] = [
            (&[], false),
            (&[("content-length", "0")], false),
            (&[("content-length", "1")], true),
            (&[("content-length", "junk")], true),
            (&[("transfer-encoding", "chunked")], true),
            (&[("content-length", "0"), ("content-length", "5")], true),
        ];
        for (headers, body) in cases {
            let mut map = HeaderMap::new();
            for (name, value) in headers {
                map.append(
                    header::HeaderName::from_static(name),
                    HeaderValue::from_static(value),
                );
            }
            assert_eq!(has_body(&map), body, "{headers:?}");
        }
    }
}

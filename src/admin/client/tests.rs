use std::net::SocketAddr;

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::*;
use crate::observe::{Event, EventKind, Telemetry};

/// A status with something in it: one accepted message and one refusal.
fn sample() -> Status {
    let telemetry = Telemetry::new("edge-1");
    for (kind, rule) in [(EventKind::Queued, None), (EventKind::Refused, Some("spf"))] {
        let mut event = Event::at(kind, 1_796_121_720_000);
        event.listener = Some("mx".into());
        event.rule = rule.map(str::to_owned);
        telemetry.record(&event);
    }
    Status::live(&telemetry, 1_796_121_730, None)
}

/// An admin API on a loopback port answering `/api/status` with `body` to the token
/// `s3cret` (Bearer) and 401 to anything else.
async fn serve(body: String) -> SocketAddr {
    let handler = move |headers: HeaderMap| async move {
        let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
        if auth == Some("Bearer s3cret") {
            ([("content-type", "application/json")], body).into_response()
        } else {
            Response::builder()
                .status(StatusCode::UNAUTHORIZED)
                .header("www-authenticate", "Basic realm=\"portcullis\"")
                .body(axum::body::Body::empty())
                .unwrap()
        }
    };
    let app = Router::new().route("/api/status", get(handler));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

#[tokio::test]
async fn the_status_is_fetched_with_the_bearer_token() {
    let status = sample();
    let addr = serve(serde_json::to_string(&status).unwrap()).await;
    let fetched = fetch_status(addr, Some("s3cret")).await.unwrap();
    assert_eq!(fetched, status);
    assert_eq!(fetched.totals.accepted, vec![("mx".to_owned(), 1)]);
    assert_eq!(fetched.top_refusals, vec![("spf".to_owned(), 1)]);
}

#[tokio::test]
async fn a_wrong_or_missing_token_is_an_error_not_a_fallback() {
    let addr = serve(serde_json::to_string(&sample()).unwrap()).await;
    for token in [Some("wrong"), None] {
        let err = fetch_status(addr, token).await.unwrap_err();
        assert!(matches!(err, ClientError::Unauthorized { .. }), "{err:?}");
        assert!(!err.not_answering());
        assert!(!err.falls_back(), "a wrong token is the operator's to fix");
        assert!(err.to_string().contains("401 Unauthorized"), "{err}");
    }
}

#[tokio::test]
async fn an_answer_that_is_not_a_status_is_an_error() {
    let addr = serve("{\"node\": 3}".to_owned()).await;
    let err = fetch_status(addr, Some("s3cret")).await.unwrap_err();
    assert!(matches!(err, ClientError::Json { .. }), "{err:?}");
    assert!(!err.not_answering());
}

#[tokio::test]
async fn an_answer_over_max_body_is_refused_unread() {
    // A valid status padded past the bound: read whole, it would parse.
    let mut body = serde_json::to_string(&sample()).unwrap();
    body.push_str(&" ".repeat(MAX_BODY));
    let addr = serve(body).await;
    let err = fetch_status(addr, Some("s3cret")).await.unwrap_err();
    assert!(matches!(err, ClientError::Body { .. }), "{err:?}");
    assert!(!err.not_answering());
    assert!(!err.falls_back());
}

#[tokio::test]
async fn a_port_nobody_listens_on_is_not_answering() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let err = fetch_status(addr, Some("s3cret")).await.unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
    assert!(err.not_answering());
}

#[tokio::test(start_paused = true)]
async fn a_listener_that_never_answers_times_out_as_not_answering() {
    // Accepts (the kernel completes the handshake) but never reads or writes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let err = fetch_status(addr, None).await.unwrap_err();
    assert!(matches!(err, ClientError::Timeout { .. }), "{err:?}");
    assert!(err.not_answering());
    drop(listener);
}

#[test]
fn an_unspecified_bind_address_is_asked_on_loopback() {
    let cases = [
        ("0.0.0.0:9025", "127.0.0.1:9025"),
        ("[::]:9025", "[::1]:9025"),
        ("127.0.0.2:9025", "127.0.0.2:9025"),
        ("[::1]:80", "[::1]:80"),
    ];
    for (bind, asked) in cases {
        assert_eq!(target(bind.parse().unwrap()).to_string(), asked);
    }
}

/// An admin API on a loopback port answering `/api/status` with `status` and `body`.
async fn serve_status(status: StatusCode, body: &'static str) -> SocketAddr {
    let app = Router::new().route("/api/status", get(move || async move { (status, body) }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

#[tokio::test]
async fn a_server_error_falls_back_and_a_client_error_does_not() {
    for (status, falls_back) in [
        (StatusCode::SERVICE_UNAVAILABLE, true),
        (StatusCode::INTERNAL_SERVER_ERROR, true),
        (StatusCode::NOT_FOUND, false),
        (StatusCode::FORBIDDEN, false),
    ] {
        let addr = serve_status(status, "too many connections\n").await;
        let err = fetch_status(addr, None).await.unwrap_err();
        assert!(matches!(err, ClientError::Status { .. }), "{err:?}");
        assert_eq!(err.falls_back(), falls_back, "{status}");
        assert!(!err.not_answering());
    }
    let addr = serve(String::new()).await;
    assert!(!fetch_status(addr, None).await.unwrap_err().falls_back());
}

#[tokio::test]
async fn an_exchange_cut_mid_way_falls_back() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    // A head promising more body than is sent, then the connection closed; and a connection
    // closed before any answer.
    for answer in [
        &b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n{\"node\""[..],
        b"",
    ] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut head = [0u8; 1024];
            let _ = tcp.read(&mut head).await;
            let _ = tcp.write_all(answer).await;
        });
        let err = fetch_status(addr, None).await.unwrap_err();
        assert!(
            matches!(err, ClientError::Cut { .. } | ClientError::Http { .. }),
            "{err:?}"
        );
        assert!(err.falls_back(), "{err:?}");
    }
}

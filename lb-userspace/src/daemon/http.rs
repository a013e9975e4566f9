//! The daemon's HTTP listener (`settings.metrics`): the status page at `/`,
//! the data it shows at `/status.json` (for scripts too), and Prometheus
//! metrics at `/metrics`. Read-only, served by hyper with a cap on
//! connections and timeouts, so a slow or greedy client cannot hold the
//! daemon. Answers that need the daemon's state are asked of its loop.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::Incoming,
    header::{ACCEPT, CACHE_CONTROL, CONTENT_TYPE, HeaderName, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::TcpListener,
    sync::{Semaphore, mpsc, oneshot},
};

use super::{metrics::text_format, status::PAGE};

/// Connections served at once; more are closed at once (a Prometheus
/// server scrapes one at a time, a status page polls one at a time).
const MAX_CONNECTIONS: usize = 16;
/// Time a client has to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a connection may take in all, the daemon's answer included.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(15);
/// What OpenMetrics scrapers put in `Accept`.
const OPENMETRICS: &str = "application/openmetrics-text";
/// The content types served.
const OPENMETRICS_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
const HTML_TYPE: &str = "text/html; charset=utf-8";
const JSON_TYPE: &str = "application/json";
/// The page loads nothing from anywhere: its script and style are inline
/// and it fetches only its own `/status.json`.
const PAGE_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; \
     style-src 'unsafe-inline'; connect-src 'self'; img-src data:";

/// What the daemon's loop is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Page {
    /// The metrics, in OpenMetrics.
    Metrics,
    /// The status page's data, as JSON.
    Status,
}

/// A request waiting for the loop's answer.
pub(super) type Ask = (Page, oneshot::Sender<String>);

/// Serves the listener, asking the daemon's loop through `asks`.
pub(super) async fn serve(listener: TcpListener, asks: mpsc::Sender<Ask>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = crate::listen::accept("http", || listener.accept()).await;
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!("http: connection cap reached, closing a connection");
            continue;
        };
        let asks = asks.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| answer(request, asks.clone()));
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await;
            drop(slot);
        });
    }
}

async fn answer(
    request: Request<Incoming>,
    asks: mpsc::Sender<Ask>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, content_type: &'static str, body: Bytes| {
        let mut r = Response::new(Full::new(body));
        *r.status_mut() = status;
        *r.version_mut() = request.version();
        let headers = r.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(
            HeaderName::from_static("x-content-type-options"),
            HeaderValue::from_static("nosniff"),
        );
        r
    };
    let page = match (request.method(), request.uri().path()) {
        (&Method::GET, "/") => {
            let mut r = reply(
                StatusCode::OK,
                HTML_TYPE,
                Bytes::from_static(PAGE.as_bytes()),
            );
            r.headers_mut().insert(
                HeaderName::from_static("content-security-policy"),
                HeaderValue::from_static(PAGE_POLICY),
            );
            return Ok(r);
        }
        (&Method::GET, "/metrics") => Page::Metrics,
        (&Method::GET, "/status.json") => Page::Status,
        _ => {
            let body = Bytes::from_static(b"try / (status page), /status.json or /metrics\n");
            return Ok(reply(StatusCode::NOT_FOUND, TEXT_TYPE, body));
        }
    };
    let (tx, rx) = oneshot::channel();
    let text = match asks.send((page, tx)).await {
        Ok(()) => rx.await.ok(),
        Err(_) => None,
    };
    let Some(text) = text else {
        return Ok(reply(
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT_TYPE,
            Bytes::new(),
        ));
    };
    let open = request
        .headers()
        .get_all(ACCEPT)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.contains(OPENMETRICS)));
    Ok(match page {
        Page::Status => reply(StatusCode::OK, JSON_TYPE, text.into()),
        Page::Metrics if open => reply(StatusCode::OK, OPENMETRICS_TYPE, text.into()),
        Page::Metrics => reply(StatusCode::OK, TEXT_TYPE, text_format(&text).into()),
    })
}

//! The admin endpoint every daemon can serve (`admin_listen` in its configuration):
//!
//! - `GET /metrics`: Prometheus / OpenMetrics text, every name prefixed `netport_`;
//! - `GET /healthz`: 200 while the process runs;
//! - `GET /readyz`: 200 once the daemon is ready (policy loaded, listeners bound, or a
//!   control session up, depending on the daemon), 503 before;
//! - `GET /status`: the daemon's state as JSON.
//!
//! Plain HTTP/1.1 on purpose: bind it to loopback or a management network.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use netport_proto::identity::CertInfo;
use netport_proto::tls::Credentials;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What a daemon shows on its admin endpoint.
pub trait AdminState: Send + Sync + 'static {
    /// The metrics registry, encoded (see [`Metrics::render`]).
    fn metrics(&self) -> String;
    /// Whether `/readyz` says ready.
    fn ready(&self) -> bool;
    /// The `/status` document.
    fn status(&self) -> serde_json::Value;
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertLabels {
    /// `ca`, `server`, `relay` or `portal`.
    role: String,
    /// The certificate's identity (`netport://portal/NAME`) or the CA's subject.
    identity: String,
}

/// A registry with what every daemon reports, the certificate expiry gauges; each daemon
/// registers its own metrics in [`Metrics::registry`] before serving.
#[derive(Debug)]
pub struct Metrics {
    /// Register the daemon's own metrics here (names without the `netport_` prefix).
    pub registry: Registry,
    expiry: Family<CertLabels, Gauge>,
    certs: Vec<(CertLabels, i64)>,
}

impl Metrics {
    /// A registry with prefix `netport` and `netport_certificate_expiry_seconds` for the
    /// daemon's own certificate and the CA it trusts.
    pub fn new(creds: &Credentials) -> Self {
        let mut registry = Registry::with_prefix("netport");
        let expiry = Family::<CertLabels, Gauge>::default();
        registry.register(
            "certificate_expiry_seconds",
            "Seconds until a loaded certificate expires (negative once expired)",
            expiry.clone(),
        );
        let mut certs = vec![(
            CertLabels {
                role: creds.identity().role.as_str().to_string(),
                identity: creds.identity().to_string(),
            },
            creds.info().not_after,
        )];
        certs.extend(creds.ca_info().iter().map(|ca: &CertInfo| {
            (
                CertLabels {
                    role: "ca".into(),
                    identity: ca.subject.clone(),
                },
                ca.not_after,
            )
        }));
        Self {
            registry,
            expiry,
            certs,
        }
    }

    /// The registry in the OpenMetrics text format, certificate gauges brought up to date.
    pub fn render(&self) -> String {
        let now = unix_now();
        for (labels, not_after) in &self.certs {
            self.expiry.get_or_create(labels).set(not_after - now);
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!("cannot encode metrics: {e}");
        }
        out
    }
}

/// Seconds since the epoch.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Binds the admin address (before anything else listens, so a clash fails start-up).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (`admin_listen`)"))
}

/// Serves the admin endpoint on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    state: Arc<dyn AdminState>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (tcp, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("admin accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => {
                if *shutdown.borrow() { return; }
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(respond(&*state, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service);
            if let Err(e) = conn.await {
                tracing::debug!("admin connection: {e}");
            }
        });
    }
}

fn respond(state: &dyn AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let reply = |code: StatusCode, kind: &'static str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = code;
        if let Ok(v) = hyper::header::HeaderValue::from_str(kind) {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    };
    const TEXT: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "only GET is served here\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            state.metrics(),
        ),
        "/healthz" => reply(StatusCode::OK, TEXT, "ok\n".into()),
        "/readyz" if state.ready() => reply(StatusCode::OK, TEXT, "ready\n".into()),
        "/readyz" => reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, "not ready\n".into()),
        "/status" => {
            let mut body = serde_json::to_string_pretty(&state.status()).unwrap_or_default();
            body.push('\n');
            reply(StatusCode::OK, "application/json", body)
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found: try /metrics, /healthz, /readyz or /status\n".into(),
        ),
    }
}

/// `GET http://addr/path` on an admin endpoint: the status code and the body.
pub async fn get(addr: &str, path: &str) -> Result<(u16, String)> {
    let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow!("connecting to {addr} timed out"))?
        .with_context(|| format!("cannot connect to {addr}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .context("HTTP handshake")?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header(hyper::header::HOST, addr)
        .body(Empty::<Bytes>::new())
        .context("request")?;
    let res = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .map_err(|_| anyhow!("{addr} did not answer in 10 s"))?
        .context("request failed")?;
    let code = res.status().as_u16();
    let body = res
        .into_body()
        .collect()
        .await
        .context("reading the body")?;
    Ok((code, String::from_utf8_lossy(&body.to_bytes()).into_owned()))
}

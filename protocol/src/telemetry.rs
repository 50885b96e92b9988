//! Logging and the metrics/health HTTP endpoint shared by both binaries.
//!
//! Logs are JSON lines by default (what a container log collector wants) and human-readable
//! text when stdout is a terminal or `--log-format text` is given. The HTTP endpoint serves
//! `/metrics` (Prometheus text format from the given registry), `/healthz` (the process is
//! alive and its loops are turning) and `/readyz` (the component can do its job: connected
//! to the broker, state applied, leader or standby…).

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use prometheus::{Encoder, Registry, TextEncoder};
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tracing_subscriber::EnvFilter;

/// Raises `counter` to `total`, a running count kept elsewhere (e.g. [`LinkStatus::failures`]
/// of the broker link); a counter never goes down.
///
/// [`LinkStatus::failures`]: crate::broker::LinkStatus::failures
pub fn count_up_to(counter: &prometheus::IntCounter, total: u64) {
    counter.inc_by(total.saturating_sub(counter.get()));
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// JSON lines when stdout is not a terminal, text otherwise.
    Auto,
    Json,
    Text,
}

/// Installs the global tracing subscriber. `level` is a filter directive (`info`,
/// `debug,lapin=info`, …); `RUST_LOG`, when set, wins. JSON lines are flat: the event's fields,
/// the fields of every span it is in (e.g. the agent's `host`) and `timestamp`, `level`,
/// `message` side by side, numbers as numbers. Colour only on a terminal. The broker client's
/// own logging is off by default: dog logs connection failures itself (a repeating one once a
/// minute, with a count).
pub fn init_logging(format: LogFormat, level: &str) {
    init_logging_with(format, level, &[]);
}

/// [`init_logging`] with fields every JSON line carries (the agent's `host`, also on lines
/// of background tasks outside any span).
pub fn init_logging_with(format: LogFormat, level: &str, fields: &[(&str, &str)]) {
    let directive = format!("{level},lapin=off,amq_protocol=off");
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&directive))
        .unwrap_or_else(|_| EnvFilter::new("info,lapin=off"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stdout().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stdout().is_terminal());
    // A second init (tests, embedded use) keeps the first subscriber.
    let _ = if json {
        builder
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(FlatJson {
                fields: fields
                    .iter()
                    .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
                    .collect(),
            })
            .try_init()
    } else {
        builder.try_init()
    };
}

/// One flat JSON object per event (see [`init_logging`]).
struct FlatJson {
    fields: serde_json::Map<String, serde_json::Value>,
}

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for FlatJson
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        use serde_json::Value;
        // fields in a fixed order (timestamp, level, message, process, spans, event); a later
        // field of the same name replaces the earlier one in place
        let mut out: Vec<(String, Value)> = Vec::new();
        let mut put = |k: String, v: Value| match out.iter_mut().find(|(n, _)| *n == k) {
            Some(slot) => slot.1 = v,
            None => out.push((k, v)),
        };
        put(
            "timestamp".into(),
            Value::String(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        );
        put(
            "level".into(),
            Value::String(event.metadata().level().to_string()),
        );
        put("message".into(), Value::String(String::new()));
        for (k, v) in &self.fields {
            put(k.clone(), v.clone());
        }
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let ext = span.extensions();
                if let Some(fields) = ext.get::<tracing_subscriber::fmt::FormattedFields<N>>() {
                    if let Ok(Value::Object(m)) = serde_json::from_str::<Value>(fields.as_str()) {
                        for (k, v) in m {
                            put(k, v);
                        }
                    }
                }
            }
        }
        let mut visitor = FieldMap(Vec::new());
        event.record(&mut visitor);
        for (k, v) in visitor.0 {
            put(k, v);
        }
        let mut line = String::from("{");
        for (i, (k, v)) in out.iter().enumerate() {
            if i > 0 {
                line.push(',');
            }
            line.push_str(&serde_json::to_string(k).map_err(|_| std::fmt::Error)?);
            line.push(':');
            line.push_str(&serde_json::to_string(v).map_err(|_| std::fmt::Error)?);
        }
        line.push('}');
        writeln!(writer, "{line}")
    }
}

/// Event fields with their types kept (a `u64` stays a number), in the order recorded.
struct FieldMap(Vec<(String, serde_json::Value)>);

impl FieldMap {
    fn put(&mut self, field: &tracing::field::Field, v: serde_json::Value) {
        self.0.push((field.name().to_string(), v));
    }
}

impl tracing::field::Visit for FieldMap {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.put(field, format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.put(field, value.into());
    }
}

/// Readiness and liveness as reported by the component; cheap to clone and update.
#[derive(Clone, Default)]
pub struct Health {
    inner: Arc<Mutex<HealthState>>,
}

#[derive(Default, Clone)]
struct HealthState {
    ready: bool,
    not_ready_reason: String,
    unhealthy: Option<String>,
}

impl Health {
    pub fn set_ready(&self) {
        if let Ok(mut s) = self.inner.lock() {
            s.ready = true;
            s.not_ready_reason.clear();
        }
    }
    pub fn set_not_ready(&self, reason: impl Into<String>) {
        if let Ok(mut s) = self.inner.lock() {
            s.ready = false;
            s.not_ready_reason = reason.into();
        }
    }
    pub fn set_unhealthy(&self, reason: Option<String>) {
        if let Ok(mut s) = self.inner.lock() {
            s.unhealthy = reason;
        }
    }
    pub fn is_ready(&self) -> bool {
        self.inner.lock().map(|s| s.ready).unwrap_or(false)
    }
    fn snapshot(&self) -> HealthState {
        self.inner.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

#[derive(Clone)]
struct AppState {
    registry: Registry,
    health: Health,
}

async fn metrics(State(st): State<AppState>) -> impl IntoResponse {
    let mut buf = Vec::new();
    let families = st.registry.gather();
    match TextEncoder::new().encode(&families, &mut buf) {
        Ok(()) => (
            StatusCode::OK,
            [("content-type", "text/plain; version=0.0.4")],
            buf,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn healthz(State(st): State<AppState>) -> impl IntoResponse {
    match st.health.snapshot().unhealthy {
        None => (StatusCode::OK, "ok".to_string()),
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, reason),
    }
}

async fn readyz(State(st): State<AppState>) -> impl IntoResponse {
    let s = st.health.snapshot();
    if s.ready {
        (StatusCode::OK, "ready".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}", s.not_ready_reason),
        )
    }
}

/// The router serving `/metrics`, `/healthz` and `/readyz`.
pub fn router(registry: Registry, health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { registry, health })
}

/// Binds `addr` and serves the router until the process ends. Returns the bound address
/// (useful with port 0) once listening.
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    health: Health,
) -> std::io::Result<SocketAddr> {
    let listener = listen(addr)
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
    let local = listener.local_addr()?;
    let app = router(registry, health);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok(local)
}

/// Binds `addr`. The unspecified IPv6 address (`[::]`, the default) takes IPv4 connections too,
/// whatever the node's `net.ipv6.bindv6only`, and falls back to `0.0.0.0` on a node without
/// IPv6, so the endpoint works on IPv4-only, IPv6-only and dual-stack nodes alike.
pub fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let open = |addr: SocketAddr| -> std::io::Result<std::net::TcpListener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        if addr.is_ipv6() && addr.ip().is_unspecified() {
            socket.set_only_v6(false)?;
        }
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        socket.set_nonblocking(true)?;
        Ok(socket.into())
    };
    let std_listener = match open(addr) {
        Err(e)
            if addr.is_ipv6()
                && addr.ip().is_unspecified()
                && e.raw_os_error() == Some(libc_eafnosupport()) =>
        {
            open(SocketAddr::from(([0, 0, 0, 0], addr.port())))?
        }
        other => other?,
    };
    tokio::net::TcpListener::from_std(std_listener)
}

/// EAFNOSUPPORT on Linux (the kernel has no IPv6).
const fn libc_eafnosupport() -> i32 {
    97
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let code = out.split_whitespace().nth(1).unwrap().parse().unwrap();
        (code, out)
    }

    #[tokio::test]
    async fn endpoints_report_metrics_health_and_readiness() {
        let registry = Registry::new();
        let c = prometheus::IntCounter::new("dog_test_total", "test").unwrap();
        registry.register(Box::new(c.clone())).unwrap();
        c.inc();
        let health = Health::default();
        let addr = serve("127.0.0.1:0".parse().unwrap(), registry, health.clone())
            .await
            .unwrap();
        let (code, body) = get(addr, "/metrics").await;
        assert_eq!(code, 200);
        assert!(body.contains("dog_test_total 1"));
        assert_eq!(get(addr, "/healthz").await.0, 200);
        let (code, body) = get(addr, "/readyz").await;
        assert_eq!(code, 503);
        assert!(body.contains("not ready"));
        health.set_ready();
        assert_eq!(get(addr, "/readyz").await.0, 200);
        health.set_unhealthy(Some("stuck".into()));
        assert_eq!(get(addr, "/healthz").await.0, 503);
    }

    #[tokio::test]
    async fn the_default_address_serves_ipv4_and_ipv6_and_a_busy_port_is_named() {
        let addr = serve(
            "[::]:0".parse().unwrap(),
            Registry::new(),
            Health::default(),
        )
        .await
        .unwrap();
        for host in ["127.0.0.1", "[::1]"] {
            let a: SocketAddr = format!("{host}:{}", addr.port()).parse().unwrap();
            assert_eq!(get(a, "/healthz").await.0, 200, "{a}");
        }
        let busy = serve(addr, Registry::new(), Health::default())
            .await
            .unwrap_err();
        assert!(
            busy.to_string()
                .contains(&format!("cannot listen on [::]:{}", addr.port())),
            "{busy}"
        );
    }
}

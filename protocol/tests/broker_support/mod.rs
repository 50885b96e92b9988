//! Helpers for the broker tests: unique topology prefixes, configs for the local RabbitMQ,
//! scoped connection kills and cleanup that runs even when a test fails.
#![allow(dead_code)]

use std::process::Command;
use std::time::Duration;

use dog_protocol::broker::{Backoff, BrokerConfig, Deliveries, Delivery};
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};

pub const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A prefix no other test (or test run, or the demo) uses: the broker keeps durable queues
/// across runs, so a PID reused by a later run must not meet an earlier run's queues.
pub fn unique_prefix(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{}-{nanos:x}",
        dog_test_support::unique(&format!("dogt-{test}"))
    )
}

/// Config with quick backoff and timeouts for tests.
pub fn config(prefix: &str, connection_name: &str) -> BrokerConfig {
    let mut c = BrokerConfig::new(URL, format!("{prefix}/{connection_name}"));
    c.topology_prefix = prefix.to_string();
    c.confirm_timeout = Duration::from_secs(5);
    c.connect_timeout = Duration::from_secs(5);
    c.backoff = Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(500),
    };
    c
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Close (server side) every connection whose name contains `needle`; returns how many.
pub fn kill_connections(needle: &str) -> usize {
    let expr = format!(
        "Ps = [P || P <- rabbit_networking:connections(), \
           [{{client_properties, Props}}] <- [rabbit_networking:connection_info(P, [client_properties])], \
           {{<<\"connection_name\">>, longstr, N}} <- Props, \
           binary:match(N, <<\"{needle}\">>) =/= nomatch], \
         [rabbit_networking:close_connection(P, \"dog test kill\") || P <- Ps], length(Ps)."
    );
    let out = Command::new("rabbitmqctl")
        .args(["eval", &expr])
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "rabbitmqctl eval failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| {
            panic!(
                "unexpected output {:?}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
}

pub fn rabbitmqctl(args: &[&str]) -> std::process::Output {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Deletes the queues and exchanges of a prefix when dropped (also when the test panics),
/// over its own connection.
pub struct Cleanup {
    pub prefix: String,
    pub queues: Vec<String>,
}

impl Cleanup {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
            queues: vec![
                format!("{prefix}.operator.inbox"),
                format!("{prefix}.operator"),
            ],
        }
    }

    pub fn host(&mut self, host: &str) {
        self.queues.push(format!("{}.host.{host}", self.prefix));
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let queues = std::mem::take(&mut self.queues);
        let prefix = self.prefix.clone();
        let run = move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let conn = lapin::Connection::connect(URL, lapin::ConnectionProperties::default())
                    .await
                    .expect("cleanup connection");
                let ch = conn.create_channel().await.expect("channel");
                for q in queues {
                    let _ = ch
                        .queue_delete(q.into(), QueueDeleteOptions::default())
                        .await;
                }
                for x in ["hosts", "sets", "operator"] {
                    let _ = ch
                        .exchange_delete(
                            format!("{prefix}.{x}").into(),
                            ExchangeDeleteOptions::default(),
                        )
                        .await;
                }
                let _ = conn.close(200, "cleanup".into()).await;
            });
        };
        let _ = std::thread::spawn(run).join();
    }
}

/// Next delivery within `timeout`, or `None`.
pub async fn next_within(d: &mut Deliveries, timeout: Duration) -> Option<Delivery> {
    tokio::time::timeout(timeout, d.recv()).await.ok().flatten()
}

/// Waits for a link's first connection (`link.wait_connected()`), failing the test with the
/// reason instead of waiting forever when no broker answers.
pub async fn connected(
    what: &str,
    wait: impl std::future::Future<Output = Result<(), dog_protocol::broker::BrokerError>>,
) {
    const DEADLINE: Duration = Duration::from_secs(60);
    match tokio::time::timeout(DEADLINE, wait).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{what}: connecting to the broker failed: {e}"),
        Err(_) => panic!(
            "{what}: no broker connection within {DEADLINE:?}; is RabbitMQ running on \
             127.0.0.1:5672? (scripts/setup.sh starts it)"
        ),
    }
}

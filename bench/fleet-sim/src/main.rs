//! dog-fleet-sim: many agents in one process, for propagation benchmarks at a fleet size no
//! machine here can run as agent processes. Everything between the operator and the kernel is
//! real: each simulated host has its own keys (pinned by an administrator: the Host objects it
//! writes carry `spec.keys`), its own queue on the real broker, opens every request with its
//! own key after checking the operator's signature, and answers with a signed response. Only
//! the kernel is left out: an apply is answered as if it took effect (the response reports the
//! desired hashes).
//!
//! ```text
//! dog-fleet-sim --hosts 5000 --name-prefix sim --hosts-file FLEET/hosts.yaml \
//!     --operator-public-keys op.pub --topology-prefix P --classic-queues
//! ```
//!
//! It writes the Host objects first (the operator in `--from-dir` mode reads them), then waits
//! for each host's queue to exist, consumes it, and sends each host's heartbeat. It runs until
//! killed; `bench/fleet_propagation.py` drives it.

use anyhow::Context;
use clap::Parser;
use dog_protocol::broker::BrokerArgs;
use dog_protocol::envelope::{Opener, Sealer};
use dog_protocol::keys::{EncryptionKey, SigningKey, TrustedKeys};
use dog_protocol::messages::{
    AgentMessage, DriftSummary, Heartbeat, Mode, OperatorMessage, Outcome, RequestKind, Response,
};
use dog_protocol::ruleset::{rules_hash, sets_hash, FirewallHashes};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Mutex;
use tracing::{error, info, warn};

#[derive(Parser, Debug)]
#[command(name = "dog-fleet-sim", version)]
struct Args {
    /// How many hosts to simulate.
    #[arg(long, env = "DOG_SIM_HOSTS", default_value_t = 5000)]
    hosts: usize,
    /// Host names are `<prefix>-<number>`.
    #[arg(long, env = "DOG_SIM_NAME_PREFIX", default_value = "sim")]
    name_prefix: String,
    /// Where to write the Host objects (labels `role: app`, an address, pinned keys).
    #[arg(long, env = "DOG_SIM_HOSTS_FILE")]
    hosts_file: PathBuf,
    /// The operator's public key(s), one `key-id base64` per line.
    #[arg(long, env = "DOG_OPERATOR_PUBLIC_KEYS")]
    operator_public_keys: PathBuf,
    #[arg(long, env = "DOG_OPERATOR_NAME", default_value = "dog-operator")]
    operator_name: String,
    /// Broker connections the hosts are spread over.
    #[arg(long, env = "DOG_SIM_CONNECTIONS", default_value_t = 4)]
    connections: usize,
    /// Simulate agents from before session envelopes: their heartbeats do not announce them,
    /// and they refuse an envelope in mode 3 as such an agent does (a mode it does not know
    /// is malformed to it).
    #[arg(long, env = "DOG_SIM_WITHOUT_SESSIONS")]
    without_sessions: bool,
    #[command(flatten)]
    broker: BrokerArgs,
}

/// One simulated host.
struct Host {
    name: String,
    opener: Mutex<Opener>,
    sealer: Sealer,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The Host object of simulated host `i` with its keys pinned.
fn host_yaml(name: &str, i: usize, signing: &str, encryption: &str) -> String {
    format!(
        "apiVersion: dogfw.io/v1alpha1\nkind: Host\nmetadata: {{name: {name}, labels: {{role: app}}}}\nspec:\n  addresses: ['10.{}.{}.{}']\n  keys: {{signing: '{signing}', encryption: '{encryption}'}}\n",
        (i >> 16) & 255,
        (i >> 8) & 255,
        i & 255
    )
}

/// The answer of a host that applies everything it is sent.
fn answer(kind: RequestKind, id: uuid::Uuid) -> Response {
    let (applied_revision, hashes) = match &kind {
        RequestKind::Apply {
            revision,
            firewall,
            kept_sets,
        } => {
            // the kept sets count as held with the hashes the request names
            let mut set_hashes: Vec<(String, String)> = firewall
                .sets
                .iter()
                .map(|(n, s)| (n.clone(), s.hash()))
                .collect();
            set_hashes.extend(kept_sets.iter().map(|(n, h)| (n.clone(), h.clone())));
            let hashes = FirewallHashes {
                ipv4_rules: rules_hash(&firewall.ipv4.text),
                ipv6_rules: rules_hash(&firewall.ipv6.text),
                sets: sets_hash(set_hashes.iter().map(|(n, h)| (n.as_str(), h.as_str()))),
            };
            (Some(*revision), Some(hashes))
        }
        _ => (None, None),
    };
    Response {
        request_id: id,
        result: Outcome::Ok {
            applied_revision,
            hashes,
            timings_ms: BTreeMap::new(),
            detail: None,
            would_change: Some(0),
        },
    }
}

async fn publish(
    channel: &Channel,
    exchange: &str,
    host: &str,
    body: Vec<u8>,
) -> anyhow::Result<()> {
    let props = BasicProperties::default()
        .with_message_id(uuid::Uuid::new_v4().to_string().into())
        .with_delivery_mode(2);
    channel
        .basic_publish(
            exchange.into(),
            host.into(),
            BasicPublishOptions::default(),
            &body,
            props,
        )
        .await?;
    Ok(())
}

/// Serves one host's queue: opens each request, answers it, acknowledges it.
async fn serve(host: Arc<Host>, channel: Channel, queue: String, args: Arc<Args>) {
    let exchange = format!("{}.operator", args.broker.topology_prefix);
    // declared as the operator declares it (classic, bounded, oldest dropped), so either may
    // come first
    let max_len = dog_protocol::broker::BrokerConfig::new(&args.broker.url, "sim")
        .host_queue_max_length
        .unwrap_or(64);
    let mut queue_args = FieldTable::default();
    queue_args.insert(
        "x-max-length".into(),
        lapin::types::AMQPValue::LongLongInt(max_len.into()),
    );
    queue_args.insert(
        "x-overflow".into(),
        lapin::types::AMQPValue::LongString("drop-head".into()),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    if let Err(e) = channel
        .queue_declare(queue.as_str().into(), durable, queue_args)
        .await
    {
        warn!(host = %host.name, error = %e, "queue not declared");
        return;
    }
    let consumer = match channel
        .basic_consume(
            queue.as_str().into(),
            format!("sim-{}", host.name).as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
    {
        Ok(c) => c,
        Err(e) => {
            warn!(host = %host.name, error = %e, "not consuming");
            return;
        }
    };
    let mut consumer = consumer;
    while let Some(d) = consumer.next().await {
        let d = match d {
            Ok(d) => d,
            Err(e) => {
                // the channel is gone, and with it every host served on it: say so, since the
                // bench then waits for answers that cannot come
                error!(host = %host.name, error = %e, "consumer failed; this host stops answering");
                return;
            }
        };
        if args.without_sessions && d.data.get(5) == Some(&3) {
            warn!(host = %host.name, reason = "malformed", "request refused");
            let _ = d.ack(BasicAckOptions::default()).await;
            continue;
        }
        let opened = host.opener.lock().await.open(&d.data, unix_now());
        let response = match opened.map(|o| (o.header.id, o.operator_message())) {
            Ok((id, Ok(OperatorMessage::Request(req)))) => Some(answer(req.request, id)),
            Ok((_, Err(e))) => {
                warn!(host = %host.name, error = %e, "request payload refused");
                None
            }
            Err(r) => {
                warn!(host = %host.name, reason = r.reason(), "request refused");
                None
            }
        };
        if let Some(r) = response {
            let msg = AgentMessage::Response(r);
            match host
                .sealer
                .agent_message(&args.operator_name, &msg, unix_now(), 600)
            {
                Ok(body) => {
                    if let Err(e) = publish(&channel, &exchange, &host.name, body).await {
                        warn!(host = %host.name, error = %e, "response not published");
                    }
                }
                Err(e) => warn!(host = %host.name, error = %e, "response not sealed"),
            }
        }
        let _ = d.ack(BasicAckOptions::default()).await;
    }
    error!(host = %host.name, "consumer ended; this host stops answering");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    dog_protocol::broker::install_rustls_ring_provider();
    let args = Arc::new(Args::parse());
    let text = std::fs::read_to_string(&args.operator_public_keys)
        .with_context(|| format!("reading {}", args.operator_public_keys.display()))?;
    let operator_keys = TrustedKeys::parse(&text, "operator public keys")?;

    // keys, and the Host objects that pin them
    let mut hosts = Vec::with_capacity(args.hosts);
    let mut yaml = Vec::with_capacity(args.hosts);
    for i in 0..args.hosts {
        let name = format!("{}-{i:05}", args.name_prefix);
        let (signing, _) = SigningKey::generate().map_err(|e| anyhow::anyhow!("{e}"))?;
        let encryption = EncryptionKey::generate();
        yaml.push(host_yaml(
            &name,
            i,
            &signing.public().to_base64(),
            &encryption.public().to_base64(),
        ));
        let heartbeat = Heartbeat {
            agent_version: "sim".into(),
            hostname: name.clone(),
            interfaces: vec![],
            signing_key: signing.public(),
            encryption_key: encryption.public(),
            applied_revision: None,
            live_hashes: None,
            drift: DriftSummary::default(),
            mode: Mode::Observe,
            identity_token: None,
            broker_reply_to: None,
            session_envelopes: !args.without_sessions,
        };
        let opener = Opener::for_agent(
            name.clone(),
            encryption,
            args.operator_name.clone(),
            operator_keys.clone(),
        );
        let sealer = Sealer::new(name.clone(), signing);
        hosts.push((
            Arc::new(Host {
                name,
                opener: Mutex::new(opener),
                sealer,
            }),
            heartbeat,
        ));
    }
    let tmp = args.hosts_file.with_extension("tmp");
    std::fs::write(&tmp, yaml.join("---\n"))?;
    std::fs::rename(&tmp, &args.hosts_file)?;
    info!(hosts = hosts.len(), file = %args.hosts_file.display(), "wrote the Host objects");

    // connections, one channel each; every host's queue is served on one of them
    let mut channels = Vec::new();
    for c in 0..args.connections.max(1) {
        let conn = Connection::connect(
            &args.broker.url,
            ConnectionProperties::default()
                .with_connection_name(format!("dog-fleet-sim/{c}").into()),
        )
        .await
        .context("connecting to the broker")?;
        let ch = conn.create_channel().await?;
        ch.basic_qos(64, BasicQosOptions::default()).await?;
        channels.push((Arc::new(conn), ch));
    }
    // heartbeats go out once the operator is there to receive them (its inbox exists)
    let inbox = format!("{}.operator.inbox", args.broker.topology_prefix);
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let probe = channels[0].0.create_channel().await?;
    let mut probe = probe;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while probe
        .queue_declare(inbox.as_str().into(), passive, FieldTable::default())
        .await
        .is_err()
    {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the operator's inbox {inbox} did not appear within 120 s: is the operator running with this topology prefix?"
        );
        // a failed passive declare closes the channel
        tokio::time::sleep(Duration::from_millis(200)).await;
        probe = channels[0].0.create_channel().await?;
    }
    let exchange = format!("{}.operator", args.broker.topology_prefix);
    for (i, (host, heartbeat)) in hosts.into_iter().enumerate() {
        let (_, ch) = &channels[i % channels.len()];
        let queue = format!("{}.host.{}", args.broker.topology_prefix, host.name);
        tokio::spawn(serve(host.clone(), ch.clone(), queue, args.clone()));
        let body = host.sealer.agent_message(
            &args.operator_name,
            &AgentMessage::Heartbeat(heartbeat),
            unix_now(),
            600,
        )?;
        publish(ch, &exchange, &host.name, body).await?;
    }
    info!("heartbeats sent; serving requests until killed");
    futures::future::pending::<()>().await;
    drop(channels);
    Ok(())
}

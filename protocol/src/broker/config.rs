//! Configuration of a broker link: where the broker is, how to authenticate, TLS, the
//! topology prefix and the tuning knobs (prefetch, queue bound, timeouts, backoff).

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::uri::{AMQPScheme, AMQPUri};

use super::BrokerError;

/// Everything a link needs to reach RabbitMQ.
///
/// The vhost is part of the URL (`amqp://host:5672/%2f` is the default vhost `/`,
/// `amqps://host:5671/dog` the vhost `dog`). Per-agent credentials are either in the URL
/// (`amqp://agent-node1:secret@host/…`) or, better, in [`BrokerConfig::credentials`] so the
/// password can come from a mounted Secret instead of a command line. With mutual TLS and
/// RabbitMQ's `rabbitmq_auth_mechanism_ssl` plugin, append `?auth_mechanism=external` to the
/// URL and leave the password out: the broker then takes the user name from the client
/// certificate.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// `amqp://…` or `amqps://…` URL including the vhost.
    pub url: String,
    /// Overrides the user name and password of the URL when set.
    pub credentials: Option<Credentials>,
    /// A file whose content (one line) is the password, overriding the URL's: a mounted
    /// Secret instead of a password in a URL or an environment variable. Read at start.
    pub password_file: Option<std::path::PathBuf>,
    /// TLS settings; only used with an `amqps://` URL.
    pub tls: Option<TlsFiles>,
    /// Connection name shown by `rabbitmqctl list_connections client_properties` and the
    /// management UI; make it unique per process (e.g. `dog-agent/<hostname>`).
    pub connection_name: String,
    /// AMQP heartbeat interval in seconds (`None` keeps the broker's proposal, 60 s by
    /// default; `Some(0)` disables heartbeats, which is not recommended).
    pub heartbeat_secs: Option<u16>,
    /// Prefix of every exchange and queue name (`dog` → `dog.hosts`, `dog.host.<name>`, …).
    pub topology_prefix: String,
    /// Declare durable queues as quorum queues (falling back to classic durable queues when
    /// the broker refuses). `false` declares classic durable queues directly.
    pub quorum_queues: bool,
    /// `x-max-length` of each per-host queue with `x-overflow=drop-head`: the oldest
    /// messages are dropped when more are waiting, because only the latest desired state
    /// matters. `None` leaves the queue unbounded.
    pub host_queue_max_length: Option<u32>,
    /// Publish host-queue messages (Applies and requests) transient (`delivery_mode` 1)
    /// instead of persistent: a classic host queue then keeps them in memory, with no journal
    /// file open per queue and no write per message, and a broker restart loses those still
    /// waiting. Nothing else changes: the publish still waits for its confirm, and a host
    /// whose Apply was lost reconnects with a heartbeat whose hashes are not the expected
    /// ones, so the operator sends its full state again. Quorum queues persist every message
    /// regardless. Shared sets and agents' messages stay persistent.
    pub transient_host_messages: bool,
    /// `x-max-length` of the operator's inbox (`dog.operator.inbox`) with
    /// `x-overflow=reject-publish`: beyond it agents' publishes are refused and retried with
    /// backoff, so a flood from one sender cannot grow the backlog without bound.
    pub operator_queue_max_length: u32,
    /// Unacknowledged deliveries the operator accepts at once on `dog.operator.inbox`.
    pub operator_prefetch: u16,
    /// Unacknowledged deliveries an agent accepts at once on its own queue.
    pub agent_prefetch: u16,
    /// How long a publish waits for the broker's confirm before it is sent again.
    pub confirm_timeout: Duration,
    /// Upper bound on establishing the TCP + TLS + AMQP connection.
    pub connect_timeout: Duration,
    /// How often a publish whose message came back unroutable is retried before
    /// [`BrokerError::Unroutable`] is returned (each retry re-declares what it can).
    pub unroutable_retries: u32,
    /// Delay between reconnect attempts and publish retries.
    pub backoff: Backoff,
}

impl BrokerConfig {
    /// A configuration with the documented defaults for the given URL and connection name.
    pub fn new(url: impl Into<String>, connection_name: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            credentials: None,
            password_file: None,
            tls: None,
            connection_name: connection_name.into(),
            heartbeat_secs: Some(30),
            topology_prefix: "dog".to_string(),
            quorum_queues: true,
            host_queue_max_length: Some(64),
            transient_host_messages: false,
            operator_queue_max_length: 100_000,
            operator_prefetch: 256,
            agent_prefetch: 4,
            confirm_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(15),
            unroutable_retries: 5,
            backoff: Backoff::default(),
        }
    }

    /// Validate the configuration and build the parsed URI and the TLS configuration
    /// (reading the certificate files). Errors name the field at fault.
    pub(crate) fn resolve(&self) -> Result<(AMQPUri, OwnedTLSConfig), BrokerError> {
        let mut uri = AMQPUri::from_str(&self.url).map_err(|reason| BrokerError::Config {
            field: "url",
            reason: format!("not an amqp:// or amqps:// URL: {reason}"),
        })?;
        if let Some(creds) = &self.credentials {
            if creds.username.is_empty() {
                return Err(BrokerError::Config {
                    field: "credentials.username",
                    reason: "must not be empty".into(),
                });
            }
            uri.authority.userinfo.username = creds.username.clone();
            uri.authority.userinfo.password = creds.password.clone();
        }
        if let Some(path) = &self.password_file {
            let text = std::fs::read_to_string(path).map_err(|e| BrokerError::Config {
                field: "password_file",
                reason: format!("{}: {e}", path.display()),
            })?;
            let password = text.trim_end_matches(['\n', '\r']);
            if password.is_empty() || password.contains('\n') {
                return Err(BrokerError::Config {
                    field: "password_file",
                    reason: format!("{}: must hold one non-empty line", path.display()),
                });
            }
            uri.authority.userinfo.password = password.to_string();
        }
        if let Some(hb) = self.heartbeat_secs {
            uri.query.heartbeat = Some(hb);
        }
        validate_name_part("topology_prefix", &self.topology_prefix)?;
        if self.operator_prefetch == 0 {
            return Err(BrokerError::Config {
                field: "operator_prefetch",
                reason: "must be at least 1 (0 would mean unlimited)".into(),
            });
        }
        if self.agent_prefetch == 0 {
            return Err(BrokerError::Config {
                field: "agent_prefetch",
                reason: "must be at least 1 (0 would mean unlimited)".into(),
            });
        }
        if self.operator_queue_max_length == 0 {
            return Err(BrokerError::Config {
                field: "operator_queue_max_length",
                reason: "must be at least 1".into(),
            });
        }
        if self.host_queue_max_length == Some(0) {
            return Err(BrokerError::Config {
                field: "host_queue_max_length",
                reason: "must be at least 1 or unset".into(),
            });
        }
        if self.confirm_timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err(BrokerError::Config {
                field: "confirm_timeout/connect_timeout",
                reason: "must be greater than zero".into(),
            });
        }
        if self.backoff.initial.is_zero() || self.backoff.max < self.backoff.initial {
            return Err(BrokerError::Config {
                field: "backoff",
                reason: "initial must be > 0 and max >= initial".into(),
            });
        }
        let tls = match (&self.tls, &uri.scheme) {
            (Some(_), AMQPScheme::AMQP) => {
                return Err(BrokerError::Config {
                    field: "tls",
                    reason: "TLS files are set but the URL scheme is amqp://, use amqps://".into(),
                })
            }
            (Some(files), AMQPScheme::AMQPS) => files.load()?,
            (None, _) => OwnedTLSConfig::default(),
        };
        Ok((uri, tls))
    }

    /// The vhost the URL names (`%2f` is `/`), where agents' users get their permissions.
    pub fn vhost(&self) -> Result<String, BrokerError> {
        AMQPUri::from_str(&self.url)
            .map(|uri| uri.vhost)
            .map_err(|reason| BrokerError::Config {
                field: "url",
                reason,
            })
    }

    /// The URL without user info, for logs.
    pub fn redacted_url(&self) -> String {
        match AMQPUri::from_str(&self.url) {
            Ok(uri) => {
                let scheme = match uri.scheme {
                    AMQPScheme::AMQP => "amqp",
                    AMQPScheme::AMQPS => "amqps",
                };
                format!(
                    "{scheme}://{}:{}/{}",
                    uri.authority.host, uri.authority.port, uri.vhost
                )
            }
            Err(_) => "<invalid url>".to_string(),
        }
    }
}

/// A user name and password for PLAIN authentication.
#[derive(Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// PEM files for TLS. Without `ca_file` the system's trusted roots are used.
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    /// CA certificate(s) that signed the broker's certificate (PEM).
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain for mutual TLS (PEM); needs `client_key_file`.
    pub client_cert_file: Option<PathBuf>,
    /// Private key of the client certificate (PEM: PKCS#8, PKCS#1 or SEC1).
    pub client_key_file: Option<PathBuf>,
}

impl TlsFiles {
    fn load(&self) -> Result<OwnedTLSConfig, BrokerError> {
        let read = |field: &'static str, path: &PathBuf| {
            std::fs::read(path).map_err(|source| BrokerError::TlsFile {
                field,
                path: path.clone(),
                source,
            })
        };
        let cert_chain = match &self.ca_file {
            Some(path) => {
                let pem = read("tls.ca_file", path)?;
                let text = String::from_utf8(pem).map_err(|_| BrokerError::Config {
                    field: "tls.ca_file",
                    reason: format!("{} is not a PEM text file", path.display()),
                })?;
                if !text.contains("-----BEGIN CERTIFICATE-----") {
                    return Err(BrokerError::Config {
                        field: "tls.ca_file",
                        reason: format!("{} holds no PEM certificate", path.display()),
                    });
                }
                Some(text)
            }
            None => None,
        };
        let identity = match (&self.client_cert_file, &self.client_key_file) {
            (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
                pem: read("tls.client_cert_file", cert)?,
                key: read("tls.client_key_file", key)?,
            }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(BrokerError::Config {
                    field: "tls.client_key_file",
                    reason: "client_cert_file is set but client_key_file is not".into(),
                })
            }
            (None, Some(_)) => {
                return Err(BrokerError::Config {
                    field: "tls.client_cert_file",
                    reason: "client_key_file is set but client_cert_file is not".into(),
                })
            }
        };
        Ok(OwnedTLSConfig {
            identity,
            cert_chain,
        })
    }
}

/// Exponential backoff with full jitter: attempt `n` sleeps a uniformly random time in
/// `[0, min(max, initial * 2^n)]`. The connection supervisor resets its attempt counter
/// once a connection has held for 30 s (one that breaks at once keeps backing off); the
/// retries of one publish count from 0 for each message.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The upper bound of the delay for `attempt` (0-based), before jitter.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u128 << attempt.min(40);
        let ceiling = self.initial.as_nanos().saturating_mul(factor);
        Duration::from_nanos(ceiling.min(self.max.as_nanos()) as u64)
    }

    /// A random delay in `[0, ceiling(attempt)]` (full jitter).
    pub fn delay(&self, attempt: u32) -> Duration {
        use rand::Rng;
        let ceiling = self.ceiling(attempt).as_nanos() as u64;
        Duration::from_nanos(rand::rng().random_range(0..=ceiling))
    }
}

/// Names used inside queue/exchange names and routing keys: host names and set names.
/// Restricted so they are valid routing keys and can be written into permission regexes
/// (only `.` needs escaping).
pub(crate) fn validate_name_part(field: &'static str, name: &str) -> Result<(), BrokerError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':');
    if name.is_empty() || name.len() > 200 || !name.chars().all(ok_char) {
        return Err(BrokerError::InvalidName {
            field,
            name: name.to_string(),
            reason: "must be 1-200 characters of A-Z a-z 0-9 . - _ :",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_ceiling_doubles_and_caps() {
        let b = Backoff::default();
        assert_eq!(b.ceiling(0), Duration::from_millis(100));
        assert_eq!(b.ceiling(1), Duration::from_millis(200));
        assert_eq!(b.ceiling(4), Duration::from_millis(1600));
        assert_eq!(b.ceiling(9), Duration::from_secs(30));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(30));
        for attempt in 0..20 {
            assert!(b.delay(attempt) <= b.ceiling(attempt));
        }
    }

    #[test]
    fn backoff_is_jittered() {
        let b = Backoff::default();
        let delays: std::collections::HashSet<_> = (0..50).map(|_| b.delay(8)).collect();
        assert!(delays.len() > 10, "full jitter should spread delays");
    }

    #[test]
    fn config_errors_name_the_field() {
        let mut c = BrokerConfig::new("http://x", "t");
        assert!(matches!(
            c.resolve(),
            Err(BrokerError::Config { field: "url", .. })
        ));
        c.url = "amqp://127.0.0.1:5672/%2f".into();
        c.tls = Some(TlsFiles {
            client_cert_file: Some("/nonexistent".into()),
            ..Default::default()
        });
        assert!(matches!(
            c.resolve(),
            Err(BrokerError::Config { field: "tls", .. })
        ));
        c.url = "amqps://127.0.0.1:5671/%2f".into();
        assert!(matches!(
            c.resolve(),
            Err(BrokerError::Config {
                field: "tls.client_key_file",
                ..
            })
        ));
        c.tls = Some(TlsFiles {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        });
        assert!(matches!(
            c.resolve(),
            Err(BrokerError::TlsFile {
                field: "tls.ca_file",
                ..
            })
        ));
        c.tls = None;
        c.topology_prefix = "bad prefix".into();
        assert!(matches!(
            c.resolve(),
            Err(BrokerError::InvalidName {
                field: "topology_prefix",
                ..
            })
        ));
    }

    #[test]
    fn credentials_and_heartbeat_override_url() {
        let mut c = BrokerConfig::new("amqp://a:b@127.0.0.1:5672/vh", "t");
        c.credentials = Some(Credentials {
            username: "agent-n1".into(),
            password: "pw".into(),
        });
        c.heartbeat_secs = Some(7);
        let (uri, _) = c.resolve().unwrap();
        assert_eq!(uri.authority.userinfo.username, "agent-n1");
        assert_eq!(uri.authority.userinfo.password, "pw");
        assert_eq!(uri.query.heartbeat, Some(7));
        assert_eq!(uri.vhost, "vh");
        assert_eq!(c.redacted_url(), "amqp://127.0.0.1:5672/vh");
        assert!(!format!("{:?}", c.credentials).contains("pw"));
    }

    #[test]
    fn the_password_file_overrides_the_url_and_errors_name_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("password");
        let mut c = BrokerConfig::new("amqp://agent-n1:url-pw@127.0.0.1:5672/vh", "t");
        c.password_file = Some(file.clone());
        let err = c.resolve().unwrap_err().to_string();
        assert!(
            err.contains("password_file") && err.contains(&file.display().to_string()),
            "{err}"
        );
        std::fs::write(&file, "s3cret\n").unwrap();
        let (uri, _) = c.resolve().unwrap();
        assert_eq!(uri.authority.userinfo.username, "agent-n1");
        assert_eq!(uri.authority.userinfo.password, "s3cret");
        std::fs::write(&file, "\n").unwrap();
        assert!(c
            .resolve()
            .unwrap_err()
            .to_string()
            .contains("one non-empty line"));
    }
}

/// The broker flags both binaries take (every one also settable by an environment variable).
#[derive(clap::Args, Debug, Clone)]
pub struct BrokerArgs {
    /// Broker URL (amqp:// or amqps://, with credentials and vhost).
    #[arg(
        long = "broker-url",
        env = "DOG_BROKER_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub url: String,
    /// A file holding the broker password (one line), overriding the URL's (a mounted Secret).
    #[arg(long = "broker-password-file", env = "DOG_BROKER_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,
    /// CA bundle (PEM) to verify the broker's TLS certificate.
    #[arg(long = "broker-ca-file", env = "DOG_BROKER_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long = "broker-cert-file", env = "DOG_BROKER_CERT_FILE")]
    pub cert_file: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    #[arg(long = "broker-key-file", env = "DOG_BROKER_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// Prefix of exchange and queue names (one broker can serve several independent fleets).
    #[arg(
        long = "topology-prefix",
        env = "DOG_TOPOLOGY_PREFIX",
        default_value = "dog"
    )]
    pub topology_prefix: String,
    /// Declare classic durable queues instead of quorum queues (e.g. a single-node broker
    /// serving thousands of hosts). Operator and agents must agree.
    #[arg(long = "classic-queues", env = "DOG_CLASSIC_QUEUES")]
    pub classic_queues: bool,
}

impl BrokerArgs {
    /// The transport configuration for a connection named `connection_name`.
    pub fn config(&self, connection_name: impl Into<String>) -> BrokerConfig {
        let mut cfg = BrokerConfig::new(self.url.clone(), connection_name);
        cfg.topology_prefix = self.topology_prefix.clone();
        cfg.quorum_queues = !self.classic_queues;
        cfg.password_file = self.password_file.clone();
        if self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some() {
            cfg.tls = Some(TlsFiles {
                ca_file: self.ca_file.clone(),
                client_cert_file: self.cert_file.clone(),
                client_key_file: self.key_file.clone(),
            });
        }
        cfg
    }

    /// The broker's TCP port from the URL (the failsafe list must keep it open): the URL's
    /// port, else the scheme's default (5672, 5671 for `amqps`). A URL that does not parse
    /// is refused at connect; its default port is assumed here.
    pub fn port(&self) -> u16 {
        match AMQPUri::from_str(&self.url) {
            Ok(uri) => uri.authority.port,
            Err(_) if self.url.starts_with("amqps://") => 5671,
            Err(_) => 5672,
        }
    }
}

//! Who may become a host (pure core): the decision on a first heartbeat from a host name that
//! has no pinned key. Identity comes from an authority, never from the message itself:
//!
//! * an administrator's pin (`spec.keys` on the Host) — such a heartbeat never reaches here;
//! * in Kubernetes mode, the agent's projected ServiceAccount token, checked by the API server
//!   (TokenReview) and bound to a Pod whose `spec.nodeName` is the host name;
//! * the broker: a heartbeat published by the host's own broker user `<prefix>.node.<host>`
//!   (RabbitMQ checks the AMQP `user-id` against the login), which exists only because the
//!   operator provisioned it for an admitted host or an administrator created it for a VM;
//! * trust on first use, only when the operator runs with `--trust-on-first-use`, and then
//!   only for DNS-1123 names, under a cap on the number of hosts and a rate limit on new ones.
//!
//! Every attempt, verified or not, spends from the same rate limit, so a flood of forged
//! first heartbeats costs neither a TokenReview per message nor a Host per name.
//! No clock here: callers pass milliseconds of a monotonic clock.

/// How the operator admits hosts it has no pin for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdmissionPolicy {
    /// Pin an unverified first heartbeat (`--trust-on-first-use`).
    pub trust_on_first_use: bool,
    /// At most this many hosts known to the operator before first-use registration stops.
    pub max_hosts: usize,
    /// New-host attempts per minute (token-bucket refill rate).
    pub per_minute: u32,
    /// Attempts allowed at once (bucket size).
    pub burst: u32,
}

impl Default for AdmissionPolicy {
    fn default() -> Self {
        AdmissionPolicy {
            trust_on_first_use: false,
            max_hosts: 10_000,
            per_minute: 120,
            burst: 60,
        }
    }
}

/// What an authority said about the sender of a first heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Evidence {
    /// The heartbeat carried no identity token, or this operator has no authority to ask.
    None,
    /// The authority vouched that the sender runs on this node.
    Node(String),
    /// The authority refused the token (why, for the log).
    Refused(String),
    /// The broker verified that the sender logged in as this host's node user.
    BrokerUser(String),
}

/// Why a first heartbeat was not admitted; `reason()` is the metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("host name {name:?} is not a DNS-1123 subdomain ({why})")]
    InvalidName { name: String, why: &'static str },
    #[error("too many new hosts: more than {burst} at once or {per_minute} a minute")]
    RateLimited { burst: u32, per_minute: u32 },
    #[error("host {host} has no pinned key; pre-pin spec.keys on its Host, give the agent its ServiceAccount token (--identity-token-file), or run the operator with --trust-on-first-use")]
    NotPinned { host: String },
    #[error("host {host} is not admitted: the identity token was refused: {detail}")]
    IdentityRefused { host: String, detail: String },
    #[error("host {host} is not admitted: its identity token belongs to node {node}")]
    WrongNode { host: String, node: String },
    #[error("host {host} is not admitted: {max} hosts are known (--max-hosts)")]
    TooManyHosts { host: String, max: usize },
    #[error("host {host} is not admitted: the message was published by the broker user of host {user_host}")]
    WrongBrokerUser { host: String, user_host: String },
}

impl Refusal {
    /// Every `reason()`, for metrics exposed from the start.
    pub const REASONS: [&'static str; 7] = [
        "invalid_hostname",
        "registration_rate",
        "not_pinned",
        "identity_refused",
        "wrong_node",
        "too_many_hosts",
        "wrong_broker_user",
    ];

    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::InvalidName { .. } => "invalid_hostname",
            Refusal::RateLimited { .. } => "registration_rate",
            Refusal::NotPinned { .. } => "not_pinned",
            Refusal::IdentityRefused { .. } => "identity_refused",
            Refusal::WrongNode { .. } => "wrong_node",
            Refusal::TooManyHosts { .. } => "too_many_hosts",
            Refusal::WrongBrokerUser { .. } => "wrong_broker_user",
        }
    }
}

/// How a host was admitted; the label of `dog_operator_hosts_registered_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admitted {
    /// Its ServiceAccount token names a Pod on this node.
    ServiceAccount,
    /// Trust on first use.
    FirstUse,
    /// Its own broker user published the heartbeat.
    BrokerUser,
}

impl Admitted {
    pub fn label(self) -> &'static str {
        match self {
            Admitted::ServiceAccount => "service_account",
            Admitted::FirstUse => "first_use",
            Admitted::BrokerUser => "broker_user",
        }
    }
}

/// A token bucket: `burst` at once, refilled at `per_minute`.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBucket {
    burst: u32,
    per_minute: u32,
    tokens: f64,
    last_ms: Option<u64>,
}

impl TokenBucket {
    pub fn new(burst: u32, per_minute: u32) -> Self {
        TokenBucket {
            burst,
            per_minute,
            tokens: f64::from(burst),
            last_ms: None,
        }
    }

    /// Spends one token at `now_ms`; false when none is left.
    pub fn take(&mut self, now_ms: u64) -> bool {
        let per_ms = f64::from(self.per_minute) / 60_000.0;
        if let Some(last) = self.last_ms {
            let refill = now_ms.saturating_sub(last) as f64 * per_ms;
            self.tokens = (self.tokens + refill).min(f64::from(self.burst));
        }
        self.last_ms = Some(now_ms);
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

/// The admission state: the policy and its rate limiter.
#[derive(Debug, Clone)]
pub struct Admission {
    policy: AdmissionPolicy,
    bucket: TokenBucket,
}

impl Admission {
    pub fn new(policy: AdmissionPolicy) -> Self {
        Admission {
            policy,
            bucket: TokenBucket::new(policy.burst, policy.per_minute),
        }
    }

    /// The checks made before anyone is asked: the name, then the rate limit (which this
    /// attempt spends from). `Ok` means the caller may consult the authority and then call
    /// [`decide`](Self::decide).
    pub fn precheck(&mut self, host: &str, now_ms: u64) -> Result<(), Refusal> {
        check_dns1123(host).map_err(|why| Refusal::InvalidName {
            name: printable(host),
            why,
        })?;
        if !self.bucket.take(now_ms) {
            return Err(Refusal::RateLimited {
                burst: self.policy.burst,
                per_minute: self.policy.per_minute,
            });
        }
        Ok(())
    }

    /// The decision once the authority answered. `known` is whether a Host of that name is
    /// declared (or mirrors a Node); `hosts` is how many hosts the operator knows.
    pub fn decide(
        &self,
        host: &str,
        evidence: &Evidence,
        known: bool,
        hosts: usize,
    ) -> Result<Admitted, Refusal> {
        match evidence {
            Evidence::Node(node) if node == host => Ok(Admitted::ServiceAccount),
            Evidence::BrokerUser(of) if of == host => Ok(Admitted::BrokerUser),
            Evidence::BrokerUser(of) => Err(Refusal::WrongBrokerUser {
                host: host.to_string(),
                user_host: of.clone(),
            }),
            Evidence::Node(node) => Err(Refusal::WrongNode {
                host: host.to_string(),
                node: node.clone(),
            }),
            Evidence::Refused(detail) => Err(Refusal::IdentityRefused {
                host: host.to_string(),
                detail: detail.clone(),
            }),
            Evidence::None if !self.policy.trust_on_first_use => Err(Refusal::NotPinned {
                host: host.to_string(),
            }),
            Evidence::None if !known && hosts >= self.policy.max_hosts => {
                Err(Refusal::TooManyHosts {
                    host: host.to_string(),
                    max: self.policy.max_hosts,
                })
            }
            Evidence::None => Ok(Admitted::FirstUse),
        }
    }
}

pub use dog_protocol::names::check_dns1123;

/// The name as it may appear in a log line: control characters escaped, at most 64 chars.
fn printable(name: &str) -> String {
    let mut s: String = name.chars().take(64).flat_map(char::escape_debug).collect();
    if name.chars().count() > 64 {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tofu() -> AdmissionPolicy {
        AdmissionPolicy {
            trust_on_first_use: true,
            max_hosts: 3,
            per_minute: 60,
            burst: 2,
        }
    }

    #[test]
    fn the_names_an_attacker_invented_are_refused() {
        let long = "a".repeat(254);
        let label = "b".repeat(64);
        for bad in [
            "../../etc/passwd",
            "node\n1",
            "with space",
            "ünïcode",
            "UPPER",
            "-lead",
            "trail-",
            "a..b",
            "",
            long.as_str(),
            label.as_str(),
        ] {
            let mut a = Admission::new(tofu());
            let err = a.precheck(bad, 0).unwrap_err();
            assert_eq!(err.reason(), "invalid_hostname", "{bad:?}");
            assert!(!err.to_string().contains('\n'), "{err}");
        }
        for good in ["node-1", "ip-10-0-0-1.eu-west-1.compute.internal", "a", "0"] {
            assert_eq!(check_dns1123(good), Ok(()), "{good}");
        }
        assert_eq!(check_dns1123(&"a.".repeat(126)[..251]), Ok(()));
    }

    #[test]
    fn the_rate_limit_spends_per_attempt_and_refills_over_time() {
        let mut a = Admission::new(tofu());
        assert!(a.precheck("h1", 0).is_ok());
        assert!(a.precheck("h2", 0).is_ok());
        let err = a.precheck("h3", 10).unwrap_err();
        assert_eq!(err.reason(), "registration_rate");
        // 60 a minute: one more after a second
        assert!(a.precheck("h3", 1_000).is_ok());
        assert!(a.precheck("h4", 1_100).is_err());
        // a long pause refills only to the burst
        assert!(a.precheck("h5", 600_000).is_ok());
        assert!(a.precheck("h6", 600_000).is_ok());
        assert!(a.precheck("h7", 600_000).is_err());
    }

    #[test]
    fn without_trust_on_first_use_only_an_authority_admits() {
        let a = Admission::new(AdmissionPolicy::default());
        let err = a.decide("charlie", &Evidence::None, true, 0).unwrap_err();
        assert_eq!(err.reason(), "not_pinned");
        assert!(err.to_string().contains("--trust-on-first-use"), "{err}");
        assert_eq!(
            a.decide("charlie", &Evidence::Node("charlie".into()), true, 0),
            Ok(Admitted::ServiceAccount)
        );
        // a token of alpha's pod does not make its holder charlie
        let err = a
            .decide("charlie", &Evidence::Node("alpha".into()), true, 0)
            .unwrap_err();
        assert_eq!(err.reason(), "wrong_node");
        let err = a
            .decide("charlie", &Evidence::Refused("expired".into()), true, 0)
            .unwrap_err();
        assert_eq!(err.reason(), "identity_refused");
        assert!(err.to_string().contains("expired"));
        // a VM's own broker user speaks for that VM, and for no other host
        assert_eq!(
            a.decide("vm-1", &Evidence::BrokerUser("vm-1".into()), false, 0),
            Ok(Admitted::BrokerUser)
        );
        let err = a
            .decide("charlie", &Evidence::BrokerUser("alpha".into()), true, 0)
            .unwrap_err();
        assert_eq!(err.reason(), "wrong_broker_user");
        assert!(err.to_string().contains("alpha"), "{err}");
    }

    #[test]
    fn first_use_stops_at_the_cap_for_new_names_only() {
        let a = Admission::new(tofu());
        assert_eq!(
            a.decide("h", &Evidence::None, false, 2),
            Ok(Admitted::FirstUse)
        );
        assert_eq!(
            a.decide("h", &Evidence::None, false, 3)
                .unwrap_err()
                .reason(),
            "too_many_hosts"
        );
        // a declared Host whose agent comes for the first time is not a new name
        assert_eq!(
            a.decide("h", &Evidence::None, true, 3),
            Ok(Admitted::FirstUse)
        );
        // an authority's word is not capped
        assert_eq!(
            a.decide("h", &Evidence::Node("h".into()), false, 99),
            Ok(Admitted::ServiceAccount)
        );
    }
}

//! Which broker user the agent logs in as.
//!
//! With `--broker-bootstrap`, the user in `--broker-url` is the bootstrap user every node
//! shares: it may only publish to the operator and read a queue the broker names for its own
//! connection. The agent asks for its own user in its heartbeat; the operator provisions
//! `<prefix>.node.<host>` once it has admitted the host and sends it encrypted to that queue.
//! The agent keeps it in its state directory and logs in with it from then on; when the broker
//! refuses it (revoked, or the operator gave a new one to another start of this agent), the
//! agent forgets it and asks again.

use dog_protocol::broker::{
    AgentLink, BrokerConfig, BrokerError, Credentials, Deliveries, LinkStatus,
};
use tracing::{info, warn};

use crate::state::{BrokerUser, StateError};

/// Logins refused in a row before the agent gives up its saved user.
pub const REFUSALS_BEFORE_BOOTSTRAP: u64 = 3;

/// The user a link logs in as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Login {
    /// The node's own user (sent by the operator).
    Own(BrokerUser),
    /// The bootstrap user of `--broker-url`, asking for the node's own.
    Bootstrap,
    /// The user of `--broker-url` as it is (no `--broker-bootstrap`).
    Configured,
}

impl Login {
    /// At start: the saved user if there is one, else the bootstrap user.
    pub fn at_start(bootstrap: bool, saved: Result<Option<BrokerUser>, StateError>) -> Login {
        if !bootstrap {
            return Login::Configured;
        }
        match saved {
            Ok(Some(user)) => Login::Own(user),
            Ok(None) => Login::Bootstrap,
            Err(e) => {
                warn!(error = %e, "the saved broker user is unreadable; asking the operator for a new one");
                Login::Bootstrap
            }
        }
    }

    /// The metric and log label.
    pub fn label(&self) -> &'static str {
        match self {
            Login::Own(_) => "node",
            Login::Bootstrap => "bootstrap",
            Login::Configured => "configured",
        }
    }

    /// Starts a link to the broker of `config` (from `--broker-*`), logged in this way.
    pub fn start(
        &self,
        mut config: BrokerConfig,
        hostname: &str,
    ) -> Result<(AgentLink, Deliveries), BrokerError> {
        match self {
            Login::Own(user) => {
                info!(user = %user.username, "logging in as this node's own broker user");
                config.credentials = Some(Credentials {
                    username: user.username.clone(),
                    password: user.password.clone(),
                });
                config.password_file = None;
                AgentLink::start(config, hostname)
            }
            Login::Bootstrap => {
                info!("logging in as the bootstrap broker user; the operator sends this node's own user once it has admitted the host");
                AgentLink::start_bootstrap(config, hostname)
            }
            Login::Configured => AgentLink::start(config, hostname),
        }
    }
}

/// Whether the broker keeps refusing the node's own user: no connection since
/// `failures_at_connect` failures, and the last of at least [`REFUSALS_BEFORE_BOOTSTRAP`]
/// was a refused login.
pub fn own_user_refused(status: &LinkStatus, failures_at_connect: u64) -> bool {
    !status.connected
        && status.failures.saturating_sub(failures_at_connect) >= REFUSALS_BEFORE_BOOTSTRAP
        && status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("ACCESS_REFUSED") || e.contains("ACCESS-REFUSED"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user() -> BrokerUser {
        BrokerUser {
            username: "dog.node.n1".into(),
            password: "pw".into(),
        }
    }

    #[test]
    fn the_saved_user_wins_and_bootstrap_is_the_fallback() {
        assert_eq!(Login::at_start(false, Ok(Some(user()))), Login::Configured);
        assert_eq!(Login::at_start(true, Ok(Some(user()))), Login::Own(user()));
        assert_eq!(Login::at_start(true, Ok(None)), Login::Bootstrap);
        let unreadable = StateError::Io {
            path: "x".into(),
            source: std::io::Error::other("boom"),
        };
        assert_eq!(Login::at_start(true, Err(unreadable)), Login::Bootstrap);
    }

    #[test]
    fn only_repeated_refused_logins_give_the_user_up() {
        let refused = |failures, connected| LinkStatus {
            connected,
            failures,
            last_error: Some("connect failed: ACCESS_REFUSED - Login was refused".into()),
            ..Default::default()
        };
        assert!(!own_user_refused(&refused(2, false), 0));
        assert!(own_user_refused(&refused(3, false), 0));
        assert!(!own_user_refused(&refused(5, false), 3));
        assert!(!own_user_refused(&refused(9, true), 0));
        let timeout = LinkStatus {
            failures: 9,
            last_error: Some("connect timed out".into()),
            ..Default::default()
        };
        assert!(!own_user_refused(&timeout, 0));
    }
}

//! Per-node broker users through the RabbitMQ management API (IO shell).
//!
//! An agent that logs in as the shared bootstrap user asks for its own user in its heartbeat.
//! Once the operator has admitted the host (an admin's pin, its ServiceAccount token, or trust
//! on first use), it creates or updates `<prefix>.node.<host>` with a fresh random password and
//! the permissions of `Topology::node_permissions` (its own queue, the shared-set exchange, the
//! operator's exchange), and sends the credential encrypted to the agent. Deleting a host
//! deletes its user. The patterns come from the protocol crate; this module only carries them
//! to the broker.

use std::time::Duration;

use dog_protocol::broker::{MessageMeta, OperatorLink, Permissions};
use dog_protocol::envelope::{Encryption, Sealer};
use dog_protocol::keys::EncryptionPublicKey;
use dog_protocol::messages::{Password, Request, RequestKind};
use futures::future::BoxFuture;
use rabbitmq_http_client::api::Client;
use rabbitmq_http_client::password_hashing;
use rabbitmq_http_client::requests::{Permissions as PermissionParams, UserParams};
use uuid::Uuid;

pub use crate::config::ManagementArgs;

/// How long one management API call (or the credential's publish) may take.
const API_TIMEOUT: Duration = Duration::from_secs(10);
/// A credential is for the agent's current connection: it is not valid for long.
const CREDENTIAL_TTL_SECS: u64 = 120;

/// Creates and deletes node users.
pub trait BrokerUsers: Send + Sync {
    /// Creates `user` (or sets its new password) and gives it `permissions`.
    fn provision<'a>(
        &'a self,
        user: &'a str,
        password: &'a str,
        permissions: &'a Permissions,
    ) -> BoxFuture<'a, Result<(), String>>;
    /// Deletes `user`; a user that does not exist is not an error.
    fn remove<'a>(&'a self, user: &'a str) -> BoxFuture<'a, Result<(), String>>;
}

/// The management API of one broker, for users in one vhost.
pub struct ManagementApi {
    client: Client<String, String, String>,
    vhost: String,
}

/// A management URL split into the API endpoint and its credentials.
#[derive(Debug, PartialEq, Eq)]
struct Endpoint {
    api: String,
    username: String,
    password: String,
}

fn parse_endpoint(raw: &str) -> Result<Endpoint, String> {
    let mut url = url::Url::parse(raw).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "scheme {:?}: use http:// or https://",
            url.scheme()
        ));
    }
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(|d| d.into_owned())
            .map_err(|_| "user info is not valid percent-encoded UTF-8".to_string())
    };
    let username = decode(url.username())?;
    let password = decode(url.password().unwrap_or(""))?;
    if username.is_empty() {
        return Err("no user name (https://user:password@host:15671)".into());
    }
    let _ = url.set_username("");
    let _ = url.set_password(None);
    let base = url.as_str().trim_end_matches('/').to_string();
    let api = if base.ends_with("/api") {
        base
    } else {
        format!("{base}/api")
    };
    Ok(Endpoint {
        api,
        username,
        password,
    })
}

impl ManagementApi {
    /// From the flags; `None` without `--broker-management-url`. `vhost` is the agents' (the
    /// operator's broker URL names it). Errors name the flag.
    pub fn from_args(args: &ManagementArgs, vhost: &str) -> Result<Option<Self>, String> {
        let Some(raw) = &args.management_url else {
            return Ok(None);
        };
        let mut endpoint =
            parse_endpoint(raw).map_err(|e| format!("--broker-management-url: {e}"))?;
        if let Some(path) = &args.management_password_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                format!("--broker-management-password-file {}: {e}", path.display())
            })?;
            let password = text.trim_end_matches(['\n', '\r']);
            if password.is_empty() || password.contains('\n') {
                return Err(format!(
                    "--broker-management-password-file {}: must hold one non-empty line",
                    path.display()
                ));
            }
            endpoint.password = password.to_string();
        }
        let http = reqwest::Client::builder()
            .timeout(API_TIMEOUT)
            .build()
            .map_err(|e| format!("--broker-management-url: {e}"))?;
        Ok(Some(ManagementApi {
            client: Client::from_http_client(
                http,
                endpoint.api,
                endpoint.username,
                endpoint.password,
            ),
            vhost: vhost.to_string(),
        }))
    }
}

impl BrokerUsers for ManagementApi {
    fn provision<'a>(
        &'a self,
        user: &'a str,
        password: &'a str,
        permissions: &'a Permissions,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let salt = password_hashing::salt();
            let hash =
                password_hashing::base64_encoded_salted_password_hash_sha256(&salt, password);
            self.client
                .create_user(&UserParams {
                    name: user,
                    password_hash: &hash,
                    tags: "",
                })
                .await
                .map_err(|e| format!("creating broker user {user}: {e}"))?;
            self.client
                .declare_permissions(&PermissionParams {
                    user,
                    vhost: &self.vhost,
                    configure: &permissions.configure,
                    read: &permissions.read,
                    write: &permissions.write,
                })
                .await
                .map_err(|e| format!("setting the permissions of broker user {user}: {e}"))
        })
    }

    fn remove<'a>(&'a self, user: &'a str) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            self.client
                .delete_user(user, true)
                .await
                .map_err(|e| format!("deleting broker user {user}: {e}"))
        })
    }
}

/// The management API the flags name, for users in the vhost of the operator's broker URL;
/// `None` without `--broker-management-url`.
pub fn from_args(
    args: &ManagementArgs,
    broker: &dog_protocol::broker::BrokerConfig,
) -> anyhow::Result<Option<std::sync::Arc<dyn BrokerUsers>>> {
    let vhost = broker.vhost()?;
    let api = ManagementApi::from_args(args, &vhost).map_err(anyhow::Error::msg)?;
    Ok(api.map(|api| {
        tracing::info!(vhost = %vhost, "provisioning each admitted host's own broker user");
        std::sync::Arc::new(api) as std::sync::Arc<dyn BrokerUsers>
    }))
}

/// Why handing out a node user failed: the metric's `result` label and the reason.
#[derive(Debug)]
pub struct HandOutError {
    pub result: &'static str,
    pub reason: String,
}

/// Provisions `host`'s node user with a fresh password and sends it, sealed to the agent's
/// encryption key, to the bootstrap queue `reply_to` the agent named in its heartbeat. The
/// request id is returned so that the agent's answer is recognised.
pub async fn hand_out(
    users: &dyn BrokerUsers,
    link: &OperatorLink,
    sealer: &Sealer,
    host: &str,
    agent_key: &EncryptionPublicKey,
    reply_to: &str,
    now: u64,
) -> Result<Uuid, HandOutError> {
    let fail = |result, reason| HandOutError { result, reason };
    let topology = link.topology();
    let username = topology.node_user(host);
    let password = random_password().map_err(|e| fail("management_api", e))?;
    let permissions = topology.node_permissions(host);
    match tokio::time::timeout(
        API_TIMEOUT,
        users.provision(&username, &password, &permissions),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(fail("management_api", e)),
        Err(_) => {
            return Err(fail(
                "management_api",
                format!("the management API did not answer within {API_TIMEOUT:?}"),
            ))
        }
    }
    let id = Uuid::new_v4();
    let request = Request {
        id,
        request: RequestKind::BrokerUser {
            username,
            password: Password(password),
        },
    };
    let sealed = sealer
        // once per host, and before its agent's sessions are known: an encapsulation of its own
        .request(
            host,
            agent_key,
            Encryption::PerMessage,
            &request,
            now,
            CREDENTIAL_TTL_SECS,
        )
        .map_err(|e| fail("publish", format!("sealing: {e}")))?;
    let meta = MessageMeta::new(id.to_string(), "request");
    match tokio::time::timeout(API_TIMEOUT, link.publish_to_queue(reply_to, &sealed, &meta)).await {
        Ok(Ok(())) => Ok(id),
        Ok(Err(e)) => Err(fail("publish", e.to_string())),
        Err(_) => Err(fail("publish", "the broker did not confirm in time".into())),
    }
}

/// A password for a node user: 32 bytes from the system's random source, hex.
pub fn random_password() -> Result<String, String> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| "the system's random source failed".to_string())?;
    Ok(hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_management_url_gives_endpoint_and_credentials() {
        assert_eq!(
            parse_endpoint("http://guest:guest@127.0.0.1:15672").unwrap(),
            Endpoint {
                api: "http://127.0.0.1:15672/api".into(),
                username: "guest".into(),
                password: "guest".into(),
            }
        );
        let e = parse_endpoint("https://dog-operator:p%40ss%2Fw@mq.example:15671/api/").unwrap();
        assert_eq!(e.api, "https://mq.example:15671/api");
        assert_eq!(e.password, "p@ss/w");
        assert!(!e.api.contains("p%40ss"));
        for (raw, says) in [
            ("amqp://u:p@mq:5672", "scheme"),
            ("http://mq.example:15672", "no user name"),
            ("not a url", "not a URL"),
            ("http://u:%ff@mq:1", "percent-encoded"),
        ] {
            let err = parse_endpoint(raw).unwrap_err();
            assert!(err.contains(says), "{raw}: {err}");
        }
    }

    #[test]
    fn flags_without_a_url_mean_no_provisioning_and_bad_files_are_named() {
        assert!(ManagementApi::from_args(&ManagementArgs::default(), "/")
            .unwrap()
            .is_none());
        let err = ManagementApi::from_args(
            &ManagementArgs {
                management_url: Some("http://u:p@127.0.0.1:15672".into()),
                management_password_file: Some("/nonexistent/pw".into()),
            },
            "/",
        )
        .err()
        .unwrap();
        assert!(
            err.contains("--broker-management-password-file /nonexistent/pw"),
            "{err}"
        );
    }

    #[test]
    fn passwords_are_long_and_differ() {
        let a = random_password().unwrap();
        let b = random_password().unwrap();
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
    }
}

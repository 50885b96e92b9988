//! Kubernetes as the authority on which node an agent runs on (IO shell around
//! [`crate::core::admission`]).
//!
//! An agent in the DaemonSet carries a projected ServiceAccount token with dog's own audience
//! (not usable against the API server). On a first heartbeat the operator asks the API server
//! about it (TokenReview with that audience), requires the agents' ServiceAccount and a token
//! bound to a Pod, reads that Pod and requires its UID to match: the Pod's `spec.nodeName` is
//! then the node the sender runs on. A token only vouches for its own node: root on one node
//! can read the tokens of that node's pods, never another node's.

use crate::runtime::sinks::IdentityVerifier;
use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};

/// Extra keys the API server puts into a Pod-bound token's user info.
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const NODE_NAME: &str = "authentication.kubernetes.io/node-name";

/// The ServiceAccount the agents run as, `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentAccount {
    pub namespace: String,
    pub name: String,
}

impl std::str::FromStr for AgentAccount {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(AgentAccount {
                    namespace: ns.to_string(),
                    name: name.to_string(),
                })
            }
            _ => Err(format!("{s:?} is not namespace/name")),
        }
    }
}

impl AgentAccount {
    fn username(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.name)
    }
}

/// The Pod a reviewed token is bound to, and the node the API server put into the token (when
/// it does: Kubernetes 1.30 and later).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundPod {
    pub name: String,
    pub uid: String,
    pub node: Option<String>,
}

/// What a TokenReview's status says, checked: authenticated, for `audience`, as `account`,
/// bound to a Pod.
pub fn bound_pod(
    status: &TokenReviewStatus,
    account: &AgentAccount,
    audience: &str,
) -> Result<BoundPod, String> {
    if let Some(e) = status.error.as_deref().filter(|e| !e.is_empty()) {
        return Err(format!("the API server refused the token: {e}"));
    }
    if status.authenticated != Some(true) {
        return Err("the token is not authenticated".into());
    }
    // an empty audience list would mean "valid for the API server itself": not ours
    if !status
        .audiences
        .iter()
        .flatten()
        .any(|a| a.as_str() == audience)
    {
        return Err(format!("the token is not for the audience {audience}"));
    }
    let user = status.user.as_ref().ok_or("the review names no user")?;
    let username = user.username.as_deref().unwrap_or_default();
    if username != account.username() {
        return Err(format!(
            "the token belongs to {username}, not to {}",
            account.username()
        ));
    }
    let one = |key: &str| -> Option<String> {
        match user.extra.as_ref()?.get(key)?.as_slice() {
            [v] => Some(v.clone()),
            _ => None,
        }
    };
    let (Some(name), Some(uid)) = (one(POD_NAME), one(POD_UID)) else {
        return Err("the token is not bound to a Pod".into());
    };
    Ok(BoundPod {
        name,
        uid,
        node: one(NODE_NAME),
    })
}

/// The node of the bound Pod, which must still exist with the token's UID.
pub fn node_of_pod(bound: &BoundPod, pod: &Pod) -> Result<String, String> {
    if pod.metadata.uid.as_deref() != Some(bound.uid.as_str()) {
        return Err(format!(
            "Pod {} was replaced since the token was issued",
            bound.name
        ));
    }
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .ok_or_else(|| format!("Pod {} is not scheduled to a node", bound.name))?;
    if let Some(claimed) = &bound.node {
        if *claimed != node {
            return Err(format!(
                "the token names node {claimed} but Pod {} runs on {node}",
                bound.name
            ));
        }
    }
    Ok(node)
}

/// [`IdentityVerifier`] against the API server.
pub struct TokenReviewVerifier {
    client: kube::Client,
    account: AgentAccount,
    audience: String,
}

impl TokenReviewVerifier {
    pub fn new(client: kube::Client, account: AgentAccount, audience: String) -> Self {
        TokenReviewVerifier {
            client,
            account,
            audience,
        }
    }

    async fn verify(&self, token: &str) -> Result<String, String> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let reviews: Api<TokenReview> = Api::all(self.client.clone());
        let answered = reviews
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| format!("TokenReview failed: {e}"))?;
        let status = answered.status.unwrap_or_default();
        let bound = bound_pod(&status, &self.account, &self.audience)?;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.account.namespace);
        let pod = pods
            .get_opt(&bound.name)
            .await
            .map_err(|e| format!("reading Pod {}: {e}", bound.name))?
            .ok_or_else(|| format!("Pod {} no longer exists", bound.name))?;
        node_of_pod(&bound, &pod)
    }
}

impl IdentityVerifier for TokenReviewVerifier {
    fn node_of<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(self.verify(token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;
    use std::collections::BTreeMap;

    fn account() -> AgentAccount {
        "dog-system/dog-agent".parse().unwrap()
    }

    fn status(user: &str, audiences: &[&str], extra: &[(&str, &str)]) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            user: Some(UserInfo {
                username: Some(user.into()),
                extra: Some(
                    extra
                        .iter()
                        .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
                        .collect::<BTreeMap<_, _>>(),
                ),
                ..Default::default()
            }),
            error: None,
        }
    }

    const AGENT: &str = "system:serviceaccount:dog-system:dog-agent";

    #[test]
    fn a_pod_bound_token_of_the_agent_account_names_its_pod() {
        let st = status(
            AGENT,
            &["dogfw.io"],
            &[
                (POD_NAME, "dog-agent-x"),
                (POD_UID, "u1"),
                (NODE_NAME, "n1"),
            ],
        );
        assert_eq!(
            bound_pod(&st, &account(), "dogfw.io"),
            Ok(BoundPod {
                name: "dog-agent-x".into(),
                uid: "u1".into(),
                node: Some("n1".into())
            })
        );
    }

    #[test]
    fn other_accounts_audiences_and_unbound_tokens_are_refused() {
        let bound = [(POD_NAME, "p"), (POD_UID, "u")];
        let cases = [
            (
                status(
                    "system:serviceaccount:default:default",
                    &["dogfw.io"],
                    &bound,
                ),
                "not to",
            ),
            (status(AGENT, &[], &bound), "audience"),
            (
                status(AGENT, &["https://kubernetes.default.svc"], &bound),
                "audience",
            ),
            (status(AGENT, &["dogfw.io"], &[]), "not bound to a Pod"),
            (
                TokenReviewStatus {
                    authenticated: Some(false),
                    ..Default::default()
                },
                "not authenticated",
            ),
        ];
        for (st, want) in cases {
            let err = bound_pod(&st, &account(), "dogfw.io").unwrap_err();
            assert!(err.contains(want), "{err} should say {want}");
        }
    }

    #[test]
    fn the_node_is_the_pods_and_must_agree_with_the_token() {
        let pod = |uid: &str, node: Option<&str>| Pod {
            metadata: kube::api::ObjectMeta {
                uid: Some(uid.into()),
                ..Default::default()
            },
            spec: Some(k8s_openapi::api::core::v1::PodSpec {
                node_name: node.map(str::to_string),
                ..Default::default()
            }),
            ..Default::default()
        };
        let bound = BoundPod {
            name: "p".into(),
            uid: "u".into(),
            node: None,
        };
        assert_eq!(node_of_pod(&bound, &pod("u", Some("n1"))), Ok("n1".into()));
        assert!(node_of_pod(&bound, &pod("other", Some("n1")))
            .unwrap_err()
            .contains("replaced"));
        assert!(node_of_pod(&bound, &pod("u", None))
            .unwrap_err()
            .contains("not scheduled"));
        let claimed = BoundPod {
            node: Some("n2".into()),
            ..bound
        };
        assert!(node_of_pod(&claimed, &pod("u", Some("n1")))
            .unwrap_err()
            .contains("names node n2"));
        assert_eq!(
            "a/b/c".parse::<AgentAccount>().unwrap_err(),
            "\"a/b/c\" is not namespace/name"
        );
    }
}

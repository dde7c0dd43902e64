//! How an agent proves which node it runs on before it has a node certificate.
//!
//! - Local mode: a bootstrap token file. Each line is `<token> <node|*> <expiry>`, the expiry
//!   in RFC 3339; `#` starts a comment. The file is read at every bootstrap, so tokens can be
//!   added or revoked without a restart. A `*` (any node) token is accepted in local mode
//!   only: a token file in cluster mode must name each token's node.
//! - Cluster mode: the agent's projected ServiceAccount token, checked with the TokenReview
//!   API for the controller's audiences (the review's `status.audiences` must name one of
//!   them). The token must authenticate as the agent's service account and be bound to a pod
//!   on the node the agent claims (the `authentication.kubernetes.io/node-name` extra the API
//!   server adds to pod-bound tokens); that Node must still exist, and when the token carries
//!   the node's UID (`authentication.kubernetes.io/node-uid`) it must be the Node's current
//!   one, so a token of a deleted node whose name was reused proves nothing.
//!
//! After bootstrap the agent's node certificate authenticates its other calls (mTLS); each
//! renewal of that certificate takes a fresh proof like the first, so a node certificate
//! lapses with the credential it was issued for.

use std::path::{Path, PathBuf};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, PostParams};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The extra the API server puts in pod-bound ServiceAccount tokens.
const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// The extra with the UID of that node (Kubernetes 1.30 and later).
const NODE_UID_EXTRA: &str = "authentication.kubernetes.io/node-uid";
/// The audience agents request for their projected token (deploy/agent.yaml), the default of
/// `--token-audiences`.
pub const AGENT_TOKEN_AUDIENCE: &str = "mesh-controller";
/// Shortest bootstrap token accepted in the file: guessing must be hopeless.
const MIN_TOKEN_LEN: usize = 16;

/// Why a bootstrap was refused. The message goes back to the agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no bootstrap credential was given")]
    Missing,
    #[error("the bootstrap token is not known")]
    UnknownToken,
    #[error("the bootstrap token expired at {0}")]
    Expired(String),
    #[error("the bootstrap token is for node {allowed}, not {claimed}")]
    WrongNode { allowed: String, claimed: String },
    #[error("this controller takes {expected} credentials")]
    WrongKind { expected: &'static str },
    #[error("bootstrap token file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("the service account token was not authenticated{0}")]
    NotAuthenticated(String),
    #[error("the token belongs to {0}, not to the agent's service account {1}")]
    WrongAccount(String, String),
    #[error("the token is not bound to a pod on node {0}")]
    NodeMismatch(String),
    #[error("token review failed: {0}")]
    Review(String),
    #[error("bootstrap tokens for any node (`*`) are accepted in local mode only")]
    Wildcard,
    #[error(
        "the token is not valid for the audiences {expected:?} (the review granted {granted:?})"
    )]
    WrongAudience {
        expected: Vec<String>,
        granted: Vec<String>,
    },
    #[error("node {0} does not exist")]
    NoSuchNode(String),
    #[error(
        "the token was issued for node {node} with UID {token_uid}, not the current one {node_uid}"
    )]
    NodeUid {
        node: String,
        token_uid: String,
        node_uid: String,
    },
}

impl AuthError {
    pub fn kind(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::UnknownToken => "unknown_token",
            AuthError::Expired(_) => "expired",
            AuthError::WrongNode { .. } => "wrong_node",
            AuthError::WrongKind { .. } => "wrong_kind",
            AuthError::File { .. } => "file",
            AuthError::NotAuthenticated(_) => "not_authenticated",
            AuthError::WrongAccount(..) => "wrong_account",
            AuthError::NodeMismatch(_) => "node_mismatch",
            AuthError::Review(_) => "review",
            AuthError::Wildcard => "wildcard",
            AuthError::WrongAudience { .. } => "wrong_audience",
            AuthError::NoSuchNode(_) => "no_such_node",
            AuthError::NodeUid { .. } => "node_uid",
        }
    }

    /// Whether the agent is at fault (as opposed to the controller's own trouble).
    pub fn is_denial(&self) -> bool {
        !matches!(self, AuthError::File { .. } | AuthError::Review(_))
    }
}

/// A credential an agent presents at bootstrap.
#[derive(Debug, Clone, Copy)]
pub enum Credential<'a> {
    BootstrapToken(&'a str),
    ServiceAccountToken(&'a str),
}

/// One line of the token file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenEntry {
    pub token: String,
    /// `None` for `*`: any node.
    pub node: Option<String>,
    pub expires: OffsetDateTime,
}

/// Parses a token file. Bad lines are errors naming the line: a half-read token file would
/// silently lock agents out.
pub fn parse_token_file(text: &str) -> Result<Vec<TokenEntry>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [token, node, expires] = fields.as_slice() else {
            return Err(format!(
                "line {}: expected `<token> <node|*> <expiry>`, found {} fields",
                i + 1,
                fields.len()
            ));
        };
        if token.len() < MIN_TOKEN_LEN {
            return Err(format!(
                "line {}: tokens must be at least {MIN_TOKEN_LEN} characters",
                i + 1
            ));
        }
        let expires = OffsetDateTime::parse(expires, &Rfc3339)
            .map_err(|e| format!("line {}: expiry {expires:?} is not RFC 3339: {e}", i + 1))?;
        out.push(TokenEntry {
            token: token.to_string(),
            node: (*node != "*").then(|| node.to_string()),
            expires,
        });
    }
    Ok(out)
}

/// Constant-time comparison, so response timing does not reveal how much of a token matched.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Checks a bootstrap token against parsed entries at time `now`; `wildcards` says whether a
/// `*` token (any node) is accepted.
pub fn check_token(
    entries: &[TokenEntry],
    token: &str,
    node: &str,
    now: OffsetDateTime,
    wildcards: bool,
) -> Result<(), AuthError> {
    let entry = entries
        .iter()
        .find(|e| same(&e.token, token))
        .ok_or(AuthError::UnknownToken)?;
    if entry.expires <= now {
        return Err(AuthError::Expired(
            entry.expires.format(&Rfc3339).unwrap_or_default(),
        ));
    }
    match &entry.node {
        Some(allowed) if allowed != node => Err(AuthError::WrongNode {
            allowed: allowed.clone(),
            claimed: node.to_string(),
        }),
        Some(_) => Ok(()),
        None if wildcards => Ok(()),
        None => Err(AuthError::Wildcard),
    }
}

/// The lines (numbered from 1) of a token file whose token is for any node (`*`).
pub fn wildcard_lines(text: &str) -> Result<Vec<usize>, String> {
    parse_token_file(text)?;
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, line)| {
            parse_token_file(line).is_ok_and(|e| e.first().is_some_and(|e| e.node.is_none()))
        })
        .map(|(i, _)| i + 1)
        .collect())
}

/// The bootstrap authenticator of a controller.
#[derive(Clone)]
pub enum Authenticator {
    TokenFile {
        path: PathBuf,
        /// Whether `*` (any node) tokens are accepted: local mode only.
        wildcards: bool,
    },
    TokenReview {
        api: Box<Api<TokenReview>>,
        nodes: Box<Api<Node>>,
        /// `system:serviceaccount:<ns>:<name>` of the agents.
        agent_account: String,
        /// Requested in each review; the review must grant one of them.
        audiences: Vec<String>,
    },
}

// === impl Authenticator ===

impl Authenticator {
    pub fn token_file(path: &Path, wildcards: bool) -> Self {
        Authenticator::TokenFile {
            path: path.to_path_buf(),
            wildcards,
        }
    }

    pub fn token_review(
        client: kube::Client,
        namespace: &str,
        service_account: &str,
        audiences: Vec<String>,
    ) -> Self {
        Authenticator::TokenReview {
            api: Box::new(Api::all(client.clone())),
            nodes: Box::new(Api::all(client)),
            agent_account: format!("system:serviceaccount:{namespace}:{service_account}"),
            audiences,
        }
    }

    /// Checks that `credential` proves the caller is the agent of `node`.
    pub async fn authenticate(
        &self,
        node: &str,
        credential: Option<Credential<'_>>,
    ) -> Result<(), AuthError> {
        let credential = credential.ok_or(AuthError::Missing)?;
        match (self, credential) {
            (Authenticator::TokenFile { path, wildcards }, Credential::BootstrapToken(token)) => {
                let text = tokio::fs::read_to_string(path)
                    .await
                    .map_err(|e| AuthError::File {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                let entries = parse_token_file(&text).map_err(|reason| AuthError::File {
                    path: path.clone(),
                    reason,
                })?;
                check_token(&entries, token, node, OffsetDateTime::now_utc(), *wildcards)
            }
            (
                Authenticator::TokenReview {
                    api,
                    nodes,
                    agent_account,
                    audiences,
                },
                Credential::ServiceAccountToken(token),
            ) => {
                let token_node_uid = review(api, agent_account, audiences, token, node).await?;
                node_exists(nodes, node, token_node_uid.as_deref()).await
            }
            (Authenticator::TokenFile { .. }, _) => Err(AuthError::WrongKind {
                expected: "bootstrap token",
            }),
            (Authenticator::TokenReview { .. }, _) => Err(AuthError::WrongKind {
                expected: "service account token",
            }),
        }
    }
}

/// Reviews the token; `Ok` carries the node UID the token names, if any.
async fn review(
    api: &Api<TokenReview>,
    agent_account: &str,
    audiences: &[String],
    token: &str,
    node: &str,
) -> Result<Option<String>, AuthError> {
    let request = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_string()),
            audiences: (!audiences.is_empty()).then(|| audiences.to_vec()),
        },
        ..TokenReview::default()
    };
    let reviewed = api
        .create(&PostParams::default(), &request)
        .await
        .map_err(|e| AuthError::Review(e.to_string()))?;
    let status = reviewed
        .status
        .ok_or_else(|| AuthError::Review("the API server returned no status".into()))?;
    if status.authenticated != Some(true) {
        let why = status.error.map(|e| format!(": {e}")).unwrap_or_default();
        return Err(AuthError::NotAuthenticated(why));
    }
    // A reviewer that ignores spec.audiences (or a token for another audience) grants none
    // of ours: the API documents that a client setting spec.audiences checks this list.
    let granted = status.audiences.unwrap_or_default();
    if !granted.iter().any(|a| audiences.contains(a)) {
        return Err(AuthError::WrongAudience {
            expected: audiences.to_vec(),
            granted,
        });
    }
    let user = status.user.unwrap_or_default();
    let username = user.username.unwrap_or_default();
    if username != agent_account {
        return Err(AuthError::WrongAccount(username, agent_account.to_string()));
    }
    let bound_node = user
        .extra
        .as_ref()
        .and_then(|e| e.get(NODE_NAME_EXTRA))
        .and_then(|v| v.first());
    if bound_node.map(String::as_str) != Some(node) {
        return Err(AuthError::NodeMismatch(node.to_string()));
    }
    Ok(user
        .extra
        .as_ref()
        .and_then(|e| e.get(NODE_UID_EXTRA))
        .and_then(|v| v.first())
        .cloned())
}

/// Checks that the Node exists and, when the token named its UID, that it is the same Node.
async fn node_exists(
    nodes: &Api<Node>,
    node: &str,
    token_uid: Option<&str>,
) -> Result<(), AuthError> {
    let found = nodes
        .get_opt(node)
        .await
        .map_err(|e| AuthError::Review(format!("get node {node}: {e}")))?
        .ok_or_else(|| AuthError::NoSuchNode(node.to_string()))?;
    let node_uid = found.metadata.uid.unwrap_or_default();
    match token_uid {
        Some(uid) if uid != node_uid => Err(AuthError::NodeUid {
            node: node.to_string(),
            token_uid: uid.to_string(),
            node_uid,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use http_body_util::BodyExt;
    use kube::client::Body;

    const TOKEN: &str = "0123456789abcdef0123";

    fn file(expiry: &str, node: &str) -> Vec<TokenEntry> {
        parse_token_file(&format!(
            "# comment\n\n{TOKEN} {node} {expiry}  # trailing\n"
        ))
        .expect("parses")
    }

    #[test]
    fn token_file_checks_token_node_and_expiry() {
        let now = OffsetDateTime::now_utc();
        let ok = file("2999-01-01T00:00:00Z", "node-1");
        check_token(&ok, TOKEN, "node-1", now, true).expect("valid");
        assert_eq!(
            check_token(&ok, "0123456789abcdef0124", "node-1", now, true),
            Err(AuthError::UnknownToken)
        );
        assert_eq!(
            check_token(&ok, "short", "node-1", now, true),
            Err(AuthError::UnknownToken)
        );
        let e = check_token(&ok, TOKEN, "node-2", now, true).expect_err("other node");
        assert_eq!(e.kind(), "wrong_node");
        let expired = file("2020-01-01T00:00:00Z", "*");
        let e = check_token(&expired, TOKEN, "node-1", now, true).expect_err("expired");
        assert_eq!(e.kind(), "expired");
        assert!(e.to_string().contains("2020-01-01"), "{e}");
        check_token(&file("2999-01-01T00:00:00Z", "*"), TOKEN, "any", now, true)
            .expect("wildcard in local mode");
    }

    #[test]
    fn wildcard_tokens_are_refused_outside_local_mode() {
        let now = OffsetDateTime::now_utc();
        let any = file("2999-01-01T00:00:00Z", "*");
        let e = check_token(&any, TOKEN, "node-1", now, false).expect_err("wildcard");
        assert_eq!(e, AuthError::Wildcard);
        assert!(e.is_denial());
        // A token naming its node is still fine.
        check_token(
            &file("2999-01-01T00:00:00Z", "node-1"),
            TOKEN,
            "node-1",
            now,
            false,
        )
        .expect("named node");
        let text = format!(
            "# header\n{TOKEN} n1 2999-01-01T00:00:00Z\n\n{TOKEN}x * 2999-01-01T00:00:00Z # any\n"
        );
        assert_eq!(wildcard_lines(&text), Ok(vec![4]));
    }

    #[test]
    fn bad_token_files_name_the_line() {
        for (text, needle) in [
            ("abc * 2999-01-01T00:00:00Z", "at least 16"),
            (&format!("{TOKEN} node-1"), "found 2 fields"),
            (&format!("{TOKEN} node-1 tomorrow"), "not RFC 3339"),
        ] {
            let e = parse_token_file(&format!("# header\n{text}\n")).expect_err(text);
            assert!(e.starts_with("line 2:") && e.contains(needle), "{e}");
        }
    }

    #[tokio::test]
    async fn file_authenticator_reads_the_file_each_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokens");
        let auth = Authenticator::token_file(&path, true);
        let cred = Some(Credential::BootstrapToken(TOKEN));
        let e = auth.authenticate("n1", cred).await.expect_err("no file");
        assert!(!e.is_denial());
        std::fs::write(&path, format!("{TOKEN} n1 2999-01-01T00:00:00Z\n")).expect("write");
        auth.authenticate("n1", cred).await.expect("token accepted");
        std::fs::write(&path, "").expect("revoke");
        assert_eq!(
            auth.authenticate("n1", cred).await,
            Err(AuthError::UnknownToken)
        );
        let e = auth
            .authenticate("n1", Some(Credential::ServiceAccountToken("jwt")))
            .await
            .expect_err("wrong kind");
        assert_eq!(e.kind(), "wrong_kind");
        assert_eq!(auth.authenticate("n1", None).await, Err(AuthError::Missing));
    }

    const NODE_UID: &str = "7f3c0d2e-node-1";

    /// Runs one TokenReview (and the Node lookup, if the review passes) against a mock API
    /// server that answers the review with `status` and the Node lookup with `node` (404 for
    /// `None`).
    async fn reviewed(
        status: serde_json::Value,
        node_name: &str,
        node: Option<serde_json::Value>,
    ) -> Result<(), AuthError> {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let auth = Authenticator::token_review(
            kube::Client::new(svc, "default"),
            "mesh-system",
            "mesh-agent",
            vec![AGENT_TOKEN_AUDIENCE.to_string()],
        );
        let name = node_name.to_string();
        let server = tokio::spawn(async move {
            let node_name = name;
            let (req, send) = handle.next_request().await.expect("token review");
            assert_eq!(
                req.uri().path(),
                "/apis/authentication.k8s.io/v1/tokenreviews"
            );
            let body = req.into_body().collect().await.expect("body").to_bytes();
            let sent: serde_json::Value = serde_json::from_slice(&body).expect("json");
            assert_eq!(sent["spec"]["token"], "the-jwt");
            assert_eq!(sent["spec"]["audiences"][0], AGENT_TOKEN_AUDIENCE);
            let mut answer = sent.clone();
            answer["status"] = status;
            send.send_response(
                Response::builder()
                    .status(201)
                    .body(Body::from(serde_json::to_vec(&answer).expect("json")))
                    .expect("response"),
            );
            let Some((req, send)) = handle.next_request().await else {
                return;
            };
            assert_eq!(req.uri().path(), format!("/api/v1/nodes/{node_name}"));
            let response = match node {
                Some(n) => Response::builder()
                    .status(200)
                    .body(Body::from(serde_json::to_vec(&n).expect("json"))),
                None => Response::builder().status(404).body(Body::from(
                    serde_json::to_vec(&serde_json::json!({
                        "kind": "Status", "apiVersion": "v1", "status": "Failure",
                        "reason": "NotFound", "code": 404,
                        "message": format!("nodes \"{node_name}\" not found")}))
                    .expect("json"),
                )),
            };
            send.send_response(response.expect("response"));
        });
        let result = auth
            .authenticate(node_name, Some(Credential::ServiceAccountToken("the-jwt")))
            .await;
        drop(auth);
        server.await.expect("mock server");
        result
    }

    fn node(name: &str, uid: &str) -> Option<serde_json::Value> {
        Some(serde_json::json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "uid": uid}}))
    }

    fn status(username: &str, node: &str, audiences: &[&str]) -> serde_json::Value {
        serde_json::json!({"authenticated": true, "audiences": audiences, "user": {
            "username": username,
            "extra": {NODE_NAME_EXTRA: [node], NODE_UID_EXTRA: [NODE_UID]}}})
    }

    const AGENT: &str = "system:serviceaccount:mesh-system:mesh-agent";

    #[tokio::test]
    async fn token_review_checks_the_audience_and_that_the_node_is_the_same() {
        let good = status(AGENT, "node-1", &[AGENT_TOKEN_AUDIENCE]);
        reviewed(good.clone(), "node-1", node("node-1", NODE_UID))
            .await
            .expect("authenticated");

        // A token for another audience (say the API server's own), or a review that granted
        // no audience at all.
        for granted in [&["https://kubernetes.default.svc"][..], &[]] {
            let e = reviewed(
                status(AGENT, "node-1", granted),
                "node-1",
                node("node-1", NODE_UID),
            )
            .await
            .expect_err("wrong audience");
            assert_eq!(e.kind(), "wrong_audience", "{e}");
        }
        let mut missing = good.clone();
        missing.as_object_mut().expect("status").remove("audiences");
        let e = reviewed(missing, "node-1", node("node-1", NODE_UID))
            .await
            .expect_err("no audiences");
        assert_eq!(e.kind(), "wrong_audience");

        // The Node is gone (its pod-bound token may outlive it until the pod is collected).
        let e = reviewed(good.clone(), "node-1", None)
            .await
            .expect_err("deleted node");
        assert_eq!(e, AuthError::NoSuchNode("node-1".into()));
        assert!(e.is_denial());

        // The name was reused by a new Node: the token was issued for the old one.
        let e = reviewed(good.clone(), "node-1", node("node-1", "another-uid"))
            .await
            .expect_err("reused node name");
        assert_eq!(e.kind(), "node_uid", "{e}");

        // A token without the UID extra (older API servers) is checked by name only.
        let mut no_uid = good;
        no_uid["user"]["extra"]
            .as_object_mut()
            .expect("extra")
            .remove(NODE_UID_EXTRA);
        reviewed(no_uid, "node-1", node("node-1", "whatever"))
            .await
            .expect("no UID to compare");
    }

    #[tokio::test]
    async fn token_review_needs_the_agent_account_bound_to_the_node() {
        let good = status(AGENT, "node-1", &[AGENT_TOKEN_AUDIENCE]);
        reviewed(good.clone(), "node-1", node("node-1", NODE_UID))
            .await
            .expect("authenticated");
        let e = reviewed(good, "node-2", None)
            .await
            .expect_err("other node");
        assert_eq!(e.kind(), "node_mismatch");

        let other = status(
            "system:serviceaccount:default:app",
            "node-1",
            &[AGENT_TOKEN_AUDIENCE],
        );
        assert_eq!(
            reviewed(other, "node-1", None)
                .await
                .expect_err("app")
                .kind(),
            "wrong_account"
        );

        let bad = serde_json::json!({"authenticated": false, "error": "token expired"});
        let e = reviewed(bad, "node-1", None).await.expect_err("expired");
        assert_eq!(e.kind(), "not_authenticated");
        assert!(e.to_string().contains("token expired"), "{e}");
    }
}

//! `/debug/policy/check`: the proxy's `authorize` on a caller and a destination, per
//! destination pod of this node.
use std::net::Ipv4Addr;

use mesh_core::SpiffeId;
use mesh_core::http_path::{self, PathNormalization};
use mesh_core::model::{NamespacedName, NodeSnapshot, Service, TlsMode, Workload};
use mesh_core::policy::{Conn, HeaderLookup, Permit, Request, Rule, TrafficPolicyMode, authorize};
use serde::{Deserialize, Serialize};

use super::{names, parse_name, snapshot};
use crate::admin::AdminState;
use crate::admin::DebugError;

/// The question of `policy check`.
#[derive(Debug, Clone, Default)]
pub struct CheckQuery {
    /// A SPIFFE ID, a pod (`ns/name` or IP) or `plaintext`.
    pub from: String,
    /// A pod or service (`ns/name` or IP), with `:port`.
    pub to: String,
    pub method: Option<String>,
    pub path: Option<String>,
    /// `name: value` headers of the request.
    pub headers: Vec<(String, String)>,
    /// How the proxy normalizes the path before the policy sees it (the agent's own
    /// settings), so the check answers for the path the proxy would match.
    pub paths: PathNormalization,
}

/// The answer of `policy check`: one decision per destination pod.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyCheck {
    /// The caller's identity, or `plaintext`.
    pub from: String,
    /// The pod given as the caller, when one was.
    pub from_pod: Option<String>,
    pub to: String,
    /// `GET /path` when a request was checked.
    pub request: Option<String>,
    /// `allowed` when every pod decided here allows, `denied` when one denies, `elsewhere`
    /// when every destination pod is on another node (whose agent decides).
    pub verdict: String,
    pub decisions: Vec<Decision>,
}

/// The decision for one destination pod.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Decision {
    pub pod: String,
    pub ip: Option<Ipv4Addr>,
    /// The port on the pod (a service port is mapped to its target port).
    pub port: u16,
    /// The service (and split) the pod was reached through.
    pub via: Option<String>,
    pub node: Option<String>,
    /// The pod is on this node: its policy is here and this is its proxy's decision.
    pub decided_here: bool,
    /// `allowed`, `denied`, `elsewhere` (another node's agent decides) or `unmeshed`.
    pub verdict: String,
    /// The permit's or the denial's stable kind (the denial's is the `reason` the proxy's
    /// access log and flows carry).
    pub kind: Option<String>,
    pub reason: String,
    /// The TrafficTarget that allowed.
    pub traffic_target: Option<String>,
    /// The HTTP match that allowed a request.
    pub route: Option<String>,
    pub tls_mode: Option<TlsMode>,
    pub policy_mode: Option<TrafficPolicyMode>,
    /// The pod's rules that list the caller (all rules for a plaintext caller).
    pub rules_for_caller: Vec<Rule>,
}

enum Source {
    Identity(SpiffeId),
    Plaintext,
}

struct Target {
    pod: Option<NamespacedName>,
    ip: Option<Ipv4Addr>,
    port: u16,
    via: Option<String>,
    node: Option<String>,
}

struct Headers(Vec<(String, String)>);

impl HeaderLookup for Headers {
    fn header(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub fn policy_check(state: &AdminState, q: &CheckQuery) -> Result<PolicyCheck, DebugError> {
    check(&snapshot(state)?.snapshot, q)
}

/// [`policy_check`] on the configuration `s`.
pub fn check(s: &NodeSnapshot, q: &CheckQuery) -> Result<PolicyCheck, DebugError> {
    let (source, from_pod) = resolve_source(s, &q.from)?;
    let targets = resolve_destination(s, &q.to)?;
    let headers = Headers(q.headers.clone());
    let method = q
        .method
        .clone()
        .unwrap_or_else(|| "GET".into())
        .to_ascii_uppercase();
    let path = match &q.path {
        Some(p) => Some(
            http_path::normalize(p, &q.paths)
                .map_err(|e| {
                    DebugError::BadRequest(format!(
                        "path {p:?}: {e}; the proxy answers such a request 400"
                    ))
                })?
                .into_owned(),
        ),
        None => None,
    };
    let request = path.as_ref().map(|path| Request {
        method: &method,
        path,
        headers: &headers,
    });
    let caller = match &source {
        Source::Identity(id) => Some(id),
        Source::Plaintext => None,
    };
    let decisions: Vec<Decision> = targets
        .iter()
        .map(|t| decide(s, caller, t, request.as_ref()))
        .collect();
    let here: Vec<&Decision> = decisions.iter().filter(|d| d.decided_here).collect();
    let verdict = if here.is_empty() {
        if decisions.iter().all(|d| d.verdict == "unmeshed") {
            "unmeshed"
        } else {
            "elsewhere"
        }
    } else if here.iter().all(|d| d.verdict == "allowed") {
        "allowed"
    } else {
        "denied"
    };
    Ok(PolicyCheck {
        from: caller.map_or_else(|| "plaintext".into(), |id| id.to_string()),
        from_pod,
        to: q.to.clone(),
        request: path.as_ref().map(|p| format!("{method} {p}")),
        verdict: verdict.into(),
        decisions,
    })
}

fn decide(
    s: &NodeSnapshot,
    caller: Option<&SpiffeId>,
    t: &Target,
    request: Option<&Request<'_>>,
) -> Decision {
    let mut d = Decision {
        pod: t
            .pod
            .as_ref()
            .map_or_else(|| "-".into(), ToString::to_string),
        ip: t.ip,
        port: t.port,
        via: t.via.clone(),
        node: t.node.clone(),
        decided_here: false,
        verdict: String::new(),
        kind: None,
        reason: String::new(),
        traffic_target: None,
        route: None,
        tls_mode: None,
        policy_mode: None,
        rules_for_caller: Vec::new(),
    };
    let Some(pod) = &t.pod else {
        d.verdict = "unmeshed".into();
        d.reason = "the endpoint is not a meshed pod: no policy applies, the connection goes \
                    to it directly"
            .into();
        return d;
    };
    if !s.workloads.contains_key(pod) {
        d.verdict = "elsewhere".into();
        d.reason = format!(
            "{pod} is on node {}: its agent decides (run `policy check` there)",
            t.node.as_deref().unwrap_or("unknown")
        );
        return d;
    }
    d.node = Some(s.node.clone());
    d.decided_here = true;
    let Some(policy) = s.policies.get(pod) else {
        d.verdict = "denied".into();
        d.kind = Some("no_policy".into());
        d.reason = format!("no policy for {pod} yet: its proxy refuses every caller");
        return d;
    };
    d.tls_mode = Some(policy.tls_mode);
    d.policy_mode = Some(policy.mode);
    d.rules_for_caller = policy
        .rules
        .iter()
        .filter(|r| caller.is_none_or(|c| r.sources.contains(c)))
        .cloned()
        .collect();
    let conn = Conn {
        source: caller,
        port: t.port,
        request,
    };
    match authorize(policy, &conn) {
        Ok(permit) => {
            d.verdict = "allowed".into();
            d.kind = Some(permit.kind().into());
            d.reason = permit.to_string();
            d.traffic_target = permit.traffic_target().map(ToString::to_string);
            if let Permit::Http { route, .. } = permit {
                d.route = Some(route.to_string());
            }
        }
        Err(denied) => {
            d.verdict = "denied".into();
            d.kind = Some(denied.kind().into());
            d.reason = denied.to_string();
        }
    }
    d
}

fn resolve_source(s: &NodeSnapshot, from: &str) -> Result<(Source, Option<String>), DebugError> {
    if from.eq_ignore_ascii_case("plaintext") {
        return Ok((Source::Plaintext, None));
    }
    if from.starts_with("spiffe://") {
        let id = from
            .parse::<SpiffeId>()
            .map_err(|e| DebugError::BadRequest(format!("--from {from}: {e}")))?;
        return Ok((Source::Identity(id), None));
    }
    let ip = from.parse::<Ipv4Addr>().ok();
    let name = if ip.is_none() {
        Some(parse_name(from)?)
    } else {
        None
    };
    let matches_workload =
        |w: &Workload| ip.is_some_and(|ip| w.ips.contains(&ip)) || Some(&w.name) == name.as_ref();
    if let Some(w) = s.workloads.values().find(|w| matches_workload(w)) {
        return Ok((
            Source::Identity(w.identity.clone()),
            Some(w.name.to_string()),
        ));
    }
    for svc in s.services.values() {
        for e in &svc.endpoints {
            let hit = ip.is_some_and(|ip| e.ip == ip)
                || (name.is_some() && e.workload.as_ref() == name.as_ref());
            if hit && let Some(id) = &e.identity {
                let pod = e.workload.as_ref().map(ToString::to_string);
                return Ok((Source::Identity(id.clone()), pod));
            }
        }
    }
    Err(DebugError::NotFound(format!(
        "unknown source {from}: not a meshed pod this node's configuration knows (its own \
         pods and the endpoints of services); give the caller's identity instead, like \
         spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>, or `plaintext`"
    )))
}

fn split_port(to: &str) -> Result<(&str, Option<u16>), DebugError> {
    match to.rsplit_once(':') {
        Some((name, port)) => {
            let port = port
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    DebugError::BadRequest(format!("--to {to}: {port:?} is not a port"))
                })?;
            Ok((name, Some(port)))
        }
        None => Ok((to, None)),
    }
}

fn resolve_destination(s: &NodeSnapshot, to: &str) -> Result<Vec<Target>, DebugError> {
    let (what, port) = split_port(to)?;
    let need_port =
        || DebugError::BadRequest(format!("--to {to}: give the port, like {what}:8080"));
    let ip = what.parse::<Ipv4Addr>().ok();
    let name = if ip.is_none() {
        Some(parse_name(what)?)
    } else {
        None
    };
    // A pod of this node.
    if let Some(w) = s
        .workloads
        .values()
        .find(|w| ip.is_some_and(|ip| w.ips.contains(&ip)) || Some(&w.name) == name.as_ref())
    {
        return Ok(vec![Target {
            pod: Some(w.name.clone()),
            ip: w.ips.first().copied(),
            port: port.ok_or_else(need_port)?,
            via: None,
            node: Some(w.node.clone()),
        }]);
    }
    // A service.
    if let Some(svc) = s
        .services
        .values()
        .find(|svc| (ip.is_some() && svc.vip == ip) || Some(&svc.name) == name.as_ref())
    {
        return service_targets(s, svc, port, to);
    }
    // A pod of another node, known as an endpoint.
    for svc in s.services.values() {
        if let Some(e) = svc.endpoints.iter().find(|e| {
            ip.is_some_and(|ip| e.ip == ip)
                || (name.is_some() && e.workload.as_ref() == name.as_ref())
        }) {
            return Ok(vec![Target {
                pod: e.workload.clone(),
                ip: Some(e.ip),
                port: port.ok_or_else(need_port)?,
                via: None,
                node: e.node.clone(),
            }]);
        }
    }
    Err(DebugError::NotFound(format!(
        "unknown destination {what}: not a pod or service of node {}'s configuration (pods: \
         {}; services: {})",
        s.node,
        names(s.workloads.keys()),
        names(s.services.keys())
    )))
}

fn service_targets(
    s: &NodeSnapshot,
    svc: &Service,
    port: Option<u16>,
    to: &str,
) -> Result<Vec<Target>, DebugError> {
    let ports: Vec<String> = svc.ports.iter().map(|p| p.port.to_string()).collect();
    let sp = match port {
        Some(p) => svc.ports.iter().find(|sp| sp.port == p),
        None if svc.ports.len() == 1 => svc.ports.first(),
        None => None,
    }
    .ok_or_else(|| {
        DebugError::BadRequest(format!(
            "--to {to}: service {} has no such port; its ports are {}",
            svc.name,
            if ports.is_empty() {
                "none".into()
            } else {
                ports.join(", ")
            }
        ))
    })?;
    let split = s.splits.values().find(|sp| sp.root == svc.name);
    let backends: Vec<(&Service, u16, String)> = match split {
        None => vec![(
            svc,
            sp.target_port,
            format!("service {}:{}", svc.name, sp.port),
        )],
        Some(split) => split
            .backends
            .iter()
            .filter_map(|b| s.services.get(&b.service))
            .filter_map(|b| {
                let bp = b
                    .ports
                    .iter()
                    .find(|p| p.name == sp.name)
                    .or_else(|| b.ports.iter().find(|p| p.port == sp.port))?;
                Some((
                    b.as_ref(),
                    bp.target_port,
                    format!(
                        "service {}:{} (TrafficSplit {} -> {})",
                        svc.name, sp.port, split.name, b.name
                    ),
                ))
            })
            .collect(),
    };
    let mut out = Vec::new();
    for (b, target_port, via) in backends {
        for e in &b.endpoints {
            out.push(Target {
                pod: e.workload.clone(),
                ip: Some(e.ip),
                port: target_port,
                via: Some(via.clone()),
                node: e.node.clone(),
            });
        }
    }
    if out.is_empty() {
        return Err(DebugError::NotFound(format!(
            "--to {to}: service {} has no endpoints",
            svc.name
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use mesh_core::model::{Endpoint, ServicePort, SplitBackend, TrafficSplit};
    use mesh_core::policy::{AnchoredRegex, HttpMatch, InboundPolicy, RouteMatch};

    use super::*;

    fn id(sa: &str) -> SpiffeId {
        format!("spiffe://cluster.local/ns/shop/sa/{sa}")
            .parse()
            .expect("id")
    }

    fn name(n: &str) -> NamespacedName {
        NamespacedName::new("shop", n)
    }

    fn service(n: &str, port: u16, target: u16, endpoints: Vec<Endpoint>) -> Service {
        Service {
            name: name(n),
            vip: Some([10, 96, 0, 10 + endpoints.len() as u8].into()),
            ports: vec![ServicePort {
                name: "http".into(),
                port,
                target_port: target,
                protocol: Default::default(),
            }],
            endpoints,
        }
    }

    fn endpoint(pod: Option<&str>, ip: [u8; 4], node: &str) -> Endpoint {
        Endpoint {
            ip: ip.into(),
            workload: pod.map(name),
            identity: pod.map(|_| id("web")),
            node: Some(node.into()),
            ready: true,
        }
    }

    /// `shop/web` splits to `web-v1` (pod web-0, here) and `web-v2` (pod web-1, on node-b);
    /// web-0 lets `client` make GET /api/... requests on 8080; `shop/ext` is not meshed.
    fn snapshot() -> NodeSnapshot {
        let workload = Workload {
            name: name("web-0"),
            uid: "u".into(),
            service_account: "web".into(),
            identity: id("web"),
            node: "node-a".into(),
            ips: vec![[10, 0, 0, 5].into()],
            mode: TlsMode::Strict,
            labels: Default::default(),
            cgroup: None,
            netns: None,
            ports: vec![8080],
            excluded_inbound_ports: vec![],
        };
        let policy = InboundPolicy {
            workload: name("web-0"),
            identity: id("web"),
            mode: TrafficPolicyMode::DefaultDeny,
            tls_mode: TlsMode::Strict,
            rules: vec![Rule {
                traffic_target: name("client-to-web"),
                sources: vec![id("client")],
                ports: vec![8080],
                route: RouteMatch::Http(vec![HttpMatch {
                    name: "api".into(),
                    path: Some(AnchoredRegex::new("/api/.*").expect("regex")),
                    methods: vec!["GET".into()],
                    headers: vec![],
                }]),
            }],
        };
        let services = [
            service("web", 80, 8080, vec![]),
            service(
                "web-v1",
                80,
                8080,
                vec![endpoint(Some("web-0"), [10, 0, 0, 5], "node-a")],
            ),
            service(
                "web-v2",
                80,
                8080,
                vec![endpoint(Some("web-1"), [10, 0, 1, 5], "node-b")],
            ),
            service("ext", 443, 443, vec![endpoint(None, [192, 168, 0, 1], "x")]),
        ];
        let split = TrafficSplit {
            name: name("canary"),
            root: name("web"),
            backends: vec![
                SplitBackend {
                    service: name("web-v1"),
                    weight: 90,
                },
                SplitBackend {
                    service: name("web-v2"),
                    weight: 10,
                },
            ],
            matches: vec![],
        };
        NodeSnapshot {
            node: "node-a".into(),
            workloads: [(name("web-0"), workload)].into_iter().collect(),
            services: Arc::new(
                services
                    .into_iter()
                    .map(|s| (s.name.clone(), Arc::new(s)))
                    .collect(),
            ),
            policies: [(name("web-0"), policy)].into_iter().collect(),
            splits: Arc::new([(name("canary"), split)].into_iter().collect()),
            ..NodeSnapshot::default()
        }
    }

    fn ask(from: &str, to: &str, path: Option<&str>) -> Result<PolicyCheck, DebugError> {
        check(
            &snapshot(),
            &CheckQuery {
                from: from.into(),
                to: to.into(),
                path: path.map(String::from),
                ..CheckQuery::default()
            },
        )
    }

    #[test]
    fn a_service_is_checked_through_its_split_on_each_endpoint_here_or_elsewhere() {
        let client = id("client").to_string();
        let v = ask(&client, "shop/web:80", None).expect("check");
        assert_eq!(v.verdict, "allowed");
        let pods: Vec<(&str, &str, u16)> = v
            .decisions
            .iter()
            .map(|d| (d.pod.as_str(), d.verdict.as_str(), d.port))
            .collect();
        assert_eq!(
            pods,
            [
                ("shop/web-0", "allowed", 8080),
                ("shop/web-1", "elsewhere", 8080)
            ]
        );
        assert_eq!(v.decisions[0].kind.as_deref(), Some("http_connection"));
        assert!(
            v.decisions[0]
                .via
                .as_deref()
                .is_some_and(|via| via.contains("TrafficSplit shop/canary")),
            "{v:?}"
        );
        assert!(v.decisions[1].reason.contains("node-b"), "{v:?}");

        // A request: the HTTP match that allowed it, or why none did.
        let v = ask(&client, "10.0.0.5:8080", Some("/api/orders")).expect("check");
        assert_eq!(v.decisions[0].route.as_deref(), Some("api"));
        assert_eq!(v.request.as_deref(), Some("GET /api/orders"));
        let v = ask(&client, "shop/web-0:8080", Some("/admin")).expect("check");
        assert_eq!(v.verdict, "denied");
        assert_eq!(v.decisions[0].kind.as_deref(), Some("no_http_match"));
        assert_eq!(v.decisions[0].rules_for_caller.len(), 1);
        // The path as the proxy matches it: normalized, so it leaves /api/.
        let v = ask(&client, "shop/web-0:8080", Some("/api/%2e%2e/admin")).expect("check");
        assert_eq!(v.request.as_deref(), Some("GET /admin"));
        assert_eq!(v.verdict, "denied");
        let e = ask(&client, "shop/web-0:8080", Some("/api/..%2fadmin")).expect_err("400");
        assert_eq!(e.kind(), "bad_request");
        assert!(e.to_string().contains("%2F"), "{e}");

        // A pod of another node, an unmeshed service.
        let v = ask(&client, "shop/web-1:8080", None).expect("check");
        assert_eq!(v.verdict, "elsewhere");
        let v = ask(&client, "shop/ext", None).expect("one port");
        assert_eq!(v.verdict, "unmeshed");
    }

    #[test]
    fn sources_and_destinations_that_name_nothing_are_refused_with_what_exists() {
        let e = ask("shop/web-9", "shop/web:80", None).expect_err("unknown source");
        assert_eq!(e.kind(), "not_found");
        let e = ask("plaintext", "shop/nope:80", None).expect_err("unknown destination");
        assert!(e.to_string().contains("shop/web-0"), "{e}");
        let e = ask("plaintext", "shop/web:81", None).expect_err("no such port");
        assert_eq!(e.kind(), "bad_request");
        assert!(e.to_string().contains("its ports are 80"), "{e}");
        let e = ask("spiffe://bad id", "shop/web:80", None).expect_err("bad id");
        assert_eq!(e.kind(), "bad_request");
        // The caller by pod name or address, when the configuration knows it.
        let v = ask("10.0.1.5", "shop/web-0:8080", None).expect("by address");
        assert_eq!(v.from_pod.as_deref(), Some("shop/web-1"));
        assert_eq!(v.decisions[0].kind.as_deref(), Some("no_traffic_target"));
    }
}

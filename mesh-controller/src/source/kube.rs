//! The Kubernetes source: one kube-runtime watcher per kind the mesh reads, feeding the
//! [`SharedIndex`] through [`resource::parse`] (the code path of the local YAML source), and a
//! status writer that marks invalid SMI resources `Accepted=False` (and `True` once fixed).
//!
//! Every kind is watched cluster-wide as a [`DynamicObject`] (see [`api_resource`]):
//!
//! - `Apply` parses the object and applies it. An object that does not parse is recorded as a
//!   rejection (origin [`ORIGIN`]); its last good version, if any, stays in the index.
//! - `Delete` removes the object and its rejections.
//! - `Init` .. `InitDone` (a relist, at start and after a lost watch) becomes one index update,
//!   which also removes the objects of that kind the relist no longer shows: deletions missed
//!   while disconnected.
//!
//! Watch errors never stop a watcher: each kind retries with kube-runtime's default backoff
//! (0.8 s doubling to 30 s), so a CRD that is not installed idles only its own watcher. The
//! first error of a kind is a warning, repeats are debug, recovery is logged once.
//!
//! After every index change the status writer merge-patches the status subresource of SMI
//! objects from this source that have a rejection: condition `Accepted=False`, reason
//! `Invalid`, the rejection as the message, once per (object, reason); and `Accepted=True`
//! once when such an object is valid again. A merge patch replaces `status.conditions` as a
//! whole. A 404 (the object is gone, or its CRD has no status subresource) is not retried;
//! other failures are retried with backoff (2 s doubling to 5 min) and never stop anything.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::mem;
use std::pin::pin;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use mesh_core::gateway;
use mesh_core::smi::{self, DEFAULT_NAMESPACE};
use serde_json::{Value, json};
use tokio::task::{Id, JoinSet};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::index::{Index, SharedIndex};
use crate::leader::Leadership;
use crate::resource::{self, Kind, Resource, ResourceKey};

/// The origin of everything this source writes to the index.
pub const ORIGIN: &str = "kube";
/// The field manager of the status patches.
pub const FIELD_MANAGER: &str = "mesh-controller";
/// The status condition written on SMI resources.
pub const ACCEPTED_CONDITION: &str = "Accepted";

/// At most this many ready watch events become one index update.
const MAX_BATCH: usize = 1024;
/// The pause before a task that stopped (it never should) is started again.
const RESTART_DELAY: Duration = Duration::from_secs(1);
/// Retries of a failed status patch back off from the first delay to the second.
const PATCH_RETRY: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(300));

/// Watches every kind and writes SMI status conditions until the future is dropped (which
/// stops every task it started). Never returns: a watcher that fails retries with backoff,
/// and a task that stops anyway is restarted.
pub async fn run(client: kube::Client, index: SharedIndex, leadership: Leadership) {
    let mut tasks = Tasks {
        client,
        index,
        leadership,
        set: JoinSet::new(),
        running: HashMap::new(),
    };
    for kind in Kind::ALL {
        tasks.spawn(Task::Watch(kind));
    }
    tasks.spawn(Task::Status);
    info!("watching the Kubernetes API");

    while let Some(done) = tasks.set.join_next_with_id().await {
        let (id, why) = match done {
            Ok((id, ())) => (id, "it returned".to_string()),
            Err(e) => (e.id(), e.to_string()),
        };
        let Some(task) = tasks.running.remove(&id) else {
            continue;
        };
        error!(%task, reason = %why, "kubernetes source task stopped; restarting it");
        tokio::time::sleep(RESTART_DELAY).await;
        tasks.spawn(task);
    }
    // Unreachable: a stopped task is started again before the set is polled.
    error!("no kubernetes source task is running");
}

/// The tasks of [`run`]; dropping it stops them.
struct Tasks {
    client: kube::Client,
    index: SharedIndex,
    /// The status writer writes only while this replica leads.
    leadership: Leadership,
    set: JoinSet<()>,
    running: HashMap<Id, Task>,
}

impl Tasks {
    fn spawn(&mut self, task: Task) {
        let (client, index) = (self.client.clone(), self.index.clone());
        let handle = match task {
            Task::Watch(kind) => self.set.spawn(watch_kind(client, index, kind)),
            Task::Status => self
                .set
                .spawn(write_status(client, index, self.leadership.clone())),
        };
        self.running.insert(handle.id(), task);
    }
}

/// What `run` runs.
#[derive(Debug, Clone, Copy)]
enum Task {
    Watch(Kind),
    Status,
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Task::Watch(kind) => write!(f, "{kind} watcher"),
            Task::Status => f.write_str("status writer"),
        }
    }
}

/// The API resource each kind is watched as. Core kinds come from k8s-openapi; the SMI and
/// Gateway API CRDs are read in the versions the mesh supports.
pub fn api_resource(kind: Kind) -> ApiResource {
    let crd = |group: &str, version: &str, plural: &str| ApiResource {
        group: group.to_string(),
        version: version.to_string(),
        api_version: format!("{group}/{version}"),
        kind: kind.as_str().to_string(),
        plural: plural.to_string(),
    };
    match kind {
        Kind::Namespace => ApiResource::erase::<Namespace>(&()),
        Kind::ServiceAccount => ApiResource::erase::<ServiceAccount>(&()),
        Kind::Pod => ApiResource::erase::<Pod>(&()),
        Kind::Service => ApiResource::erase::<Service>(&()),
        Kind::EndpointSlice => ApiResource::erase::<EndpointSlice>(&()),
        Kind::TrafficTarget => crd(smi::ACCESS_GROUP, "v1alpha3", "traffictargets"),
        Kind::HttpRouteGroup => crd(smi::SPECS_GROUP, "v1alpha4", "httproutegroups"),
        Kind::TcpRoute => crd(smi::SPECS_GROUP, "v1alpha4", "tcproutes"),
        Kind::TrafficSplit => crd(smi::SPLIT_GROUP, "v1alpha4", "trafficsplits"),
        Kind::HttpRoute => crd(gateway::GATEWAY_GROUP, "v1", "httproutes"),
        Kind::GrpcRoute => crd(gateway::GATEWAY_GROUP, "v1", "grpcroutes"),
        Kind::Node => ApiResource::erase::<k8s_openapi::api::core::v1::Node>(&()),
        Kind::ServiceCidr => {
            ApiResource::erase::<k8s_openapi::api::networking::v1::ServiceCIDR>(&())
        }
    }
}

/// Whether the kind is an SMI resource (the kinds that get status conditions). Gateway API
/// routes report per parent (`status.parents`), which the mesh does not write yet: their
/// rejections are in the logs, the admin endpoint and the debugging commands.
pub fn is_smi(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::TrafficTarget | Kind::HttpRouteGroup | Kind::TcpRoute | Kind::TrafficSplit
    )
}

// === Watching ===

async fn watch_kind(client: kube::Client, index: SharedIndex, kind: Kind) {
    let resource = api_resource(kind);
    let api = Api::<DynamicObject>::all_with(client, &resource);
    let events = watcher(api, watcher::Config::default())
        .default_backoff()
        .ready_chunks(MAX_BATCH);
    let mut events = pin!(events);
    let mut feed = Feed::new(kind);
    let mut health = Health::default();
    debug!(%kind, api_version = %resource.api_version, "watching");
    while let Some(batch) = events.next().await {
        for item in batch {
            match item {
                Ok(event) => {
                    health.ok(kind);
                    feed.event(event);
                }
                Err(e) => health.error(kind, &resource, &e),
            }
        }
        if let Some(changes) = feed.take() {
            let count = changes.len();
            index.update(|index| apply_changes(index, kind, changes));
            debug!(%kind, changes = count, "index updated");
        }
    }
    // The watcher retries forever; `run` restarts this task if it ever gets here.
    warn!(%kind, "watch stream ended");
}

/// One change to the index, from a watch event.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Change {
    /// Boxed: a relist holds many, and a `Resource` is large.
    Apply(Box<Resource>),
    Reject {
        key: ResourceKey,
        reason: String,
    },
    Remove(ResourceKey),
    /// The end of a relist: removes the kind's objects (and rejections) from this source that
    /// the relist did not show.
    Resync(BTreeSet<ResourceKey>),
}

/// Turns one kind's watch events into index changes. A relist is held back until it is
/// complete, then applied in one update with its [`Change::Resync`].
#[derive(Debug)]
pub(crate) struct Feed {
    kind: Kind,
    api_version: String,
    changes: Vec<Change>,
    /// During a relist: where its changes start in `changes`, and the keys it listed so far.
    relist: Option<(usize, BTreeSet<ResourceKey>)>,
}

impl Feed {
    pub(crate) fn new(kind: Kind) -> Self {
        Feed {
            kind,
            api_version: api_resource(kind).api_version,
            changes: Vec::new(),
            relist: None,
        }
    }

    pub(crate) fn event(&mut self, event: watcher::Event<DynamicObject>) {
        match event {
            watcher::Event::Apply(object) => self.apply(object),
            watcher::Event::Delete(object) => {
                if let Some(key) = object_key(self.kind, &object.metadata) {
                    self.changes.push(Change::Remove(key));
                }
            }
            watcher::Event::Init => match &mut self.relist {
                // A relist that did not finish: the new one lists everything again.
                Some((start, seen)) => {
                    self.changes.truncate(*start);
                    seen.clear();
                }
                None => self.relist = Some((self.changes.len(), BTreeSet::new())),
            },
            watcher::Event::InitApply(object) => {
                if let (Some((_, seen)), Some(key)) =
                    (&mut self.relist, object_key(self.kind, &object.metadata))
                {
                    seen.insert(key);
                }
                self.apply(object);
            }
            watcher::Event::InitDone => match self.relist.take() {
                Some((_, seen)) => self.changes.push(Change::Resync(seen)),
                // Without its `Init` the listed set is unknown: removing nothing is safe.
                None => debug!(kind = %self.kind, "relist end without a start; ignored"),
            },
        }
    }

    /// The changes to apply now: none while a relist is incomplete.
    pub(crate) fn take(&mut self) -> Option<Vec<Change>> {
        if self.relist.is_some() || self.changes.is_empty() {
            return None;
        }
        Some(mem::take(&mut self.changes))
    }

    fn apply(&mut self, object: DynamicObject) {
        let Some(key) = object_key(self.kind, &object.metadata) else {
            warn!(kind = %self.kind, "object without a name; ignored");
            return;
        };
        let change = match parse_object(self.kind, &self.api_version, object) {
            Ok(resource) => Change::Apply(Box::new(resource)),
            Err(reason) => {
                warn!(%key, %reason, "rejected");
                Change::Reject { key, reason }
            }
        };
        self.changes.push(change);
    }
}

/// The object as the YAML source would read it: the API server leaves `apiVersion` and
/// `kind` out of list items, so they are set from the watched resource.
fn parse_object(kind: Kind, api_version: &str, object: DynamicObject) -> Result<Resource, String> {
    let mut value = serde_json::to_value(object).map_err(|e| format!("cannot encode: {e}"))?;
    if let Value::Object(map) = &mut value {
        map.insert("apiVersion".into(), api_version.into());
        map.insert("kind".into(), kind.as_str().into());
    }
    resource::parse(value).map_err(|e| e.to_string())
}

/// The key of an object from its metadata; namespaced objects without a namespace are in
/// `default`, as [`resource::parse`] reads them.
fn object_key(kind: Kind, meta: &ObjectMeta) -> Option<ResourceKey> {
    let name = meta.name.as_deref().filter(|n| !n.is_empty())?;
    let namespace = match kind.is_namespaced() {
        true => meta
            .namespace
            .as_deref()
            .filter(|ns| !ns.is_empty())
            .unwrap_or(DEFAULT_NAMESPACE),
        false => "",
    };
    Some(ResourceKey::new(kind, namespace, name))
}

/// Applies one kind's changes, in order.
pub(crate) fn apply_changes(index: &mut Index, kind: Kind, changes: Vec<Change>) {
    for change in changes {
        match change {
            Change::Apply(resource) => {
                index.apply(ORIGIN, *resource);
            }
            Change::Reject { key, reason } => index.record_rejection(ORIGIN, Some(key), reason),
            Change::Remove(key) => {
                if index.origin(&key).is_none_or(|origin| origin == ORIGIN) {
                    index.remove(&key);
                }
            }
            Change::Resync(seen) => {
                let rejected: Vec<ResourceKey> = index
                    .rejections()
                    .into_iter()
                    .filter(|r| r.origin == ORIGIN)
                    .filter_map(|r| r.key)
                    .collect();
                let stale: BTreeSet<ResourceKey> = index
                    .keys()
                    .filter(|key| index.origin(key) == Some(ORIGIN))
                    .chain(&rejected)
                    .filter(|key| key.kind == kind && !seen.contains(*key))
                    .cloned()
                    .collect();
                for key in stale {
                    debug!(%key, "gone after a relist; removed");
                    index.remove(&key);
                }
            }
        }
    }
}

/// Logs a watcher's errors: the first of a kind as a warning, repeats at debug.
#[derive(Debug, Default)]
struct Health {
    failing: Option<&'static str>,
}

impl Health {
    fn ok(&mut self, kind: Kind) {
        if let Some(error) = self.failing.take() {
            info!(%kind, after = error, "watching again");
        }
    }

    fn error(&mut self, kind: Kind, resource: &ApiResource, e: &watcher::Error) {
        let class = error_class(e);
        if class == "expired" {
            debug!(%kind, "watch expired; relisting");
            return;
        }
        if self.failing == Some(class) {
            debug!(%kind, error = %e, "watch still failing; retrying");
            return;
        }
        self.failing = Some(class);
        if class == "not_found" {
            warn!(
                %kind,
                resource = %format!("{}.{}", resource.plural, resource.api_version),
                "the API server does not serve this resource (is the CRD installed?); \
                 retrying with backoff"
            );
        } else {
            warn!(%kind, error = %e, "watch failed; retrying with backoff");
        }
    }
}

fn error_class(e: &watcher::Error) -> &'static str {
    let status = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s))
        | watcher::Error::WatchError(s) => Some(s.code),
        _ => None,
    };
    match status {
        Some(404) => "not_found",
        Some(403) => "forbidden",
        Some(410) => "expired",
        Some(_) => "api",
        None => "connection",
    }
}

// === Status conditions ===

/// The `Accepted` condition of an SMI object, as the mesh last wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    Accepted,
    Rejected(String),
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Accepted => f.write_str("Accepted=True"),
            Verdict::Rejected(_) => f.write_str("Accepted=False"),
        }
    }
}

/// Decides which conditions to write: each (object, reason) once, and `Accepted=True` once
/// when an object marked rejected is valid again. Failed writes are retried with backoff.
#[derive(Debug, Default)]
pub(crate) struct StatusWriter {
    /// What was written (or could not be: the object or its status subresource is gone).
    written: HashMap<ResourceKey, Verdict>,
    failed: HashMap<ResourceKey, Failure>,
}

#[derive(Debug)]
struct Failure {
    verdict: Verdict,
    attempts: u32,
    retry_at: Instant,
}

impl StatusWriter {
    /// The conditions to write now. Forgets objects that are gone, so a new object of the
    /// same name starts afresh.
    pub(crate) fn plan(&mut self, index: &Index, now: Instant) -> Vec<(ResourceKey, Verdict)> {
        let mut reasons: BTreeMap<ResourceKey, Vec<String>> = BTreeMap::new();
        for rejection in index.rejections() {
            if let Some(key) = rejection.key.filter(|k| is_smi(k.kind))
                && rejection.origin == ORIGIN
            {
                reasons.entry(key).or_default().push(rejection.reason);
            }
        }
        self.written
            .retain(|key, _| reasons.contains_key(key) || index.contains(key));

        let accepted: Vec<(ResourceKey, Verdict)> = self
            .written
            .iter()
            .filter(|(key, verdict)| {
                matches!(verdict, Verdict::Rejected(_)) && !reasons.contains_key(*key)
            })
            .map(|(key, _)| (key.clone(), Verdict::Accepted))
            .collect();
        let mut out: Vec<(ResourceKey, Verdict)> = reasons
            .into_iter()
            .map(|(key, reasons)| (key, Verdict::Rejected(reasons.join("; "))))
            .chain(accepted)
            .collect();
        // A failure is retried only while its verdict is still the one to write.
        self.failed
            .retain(|key, f| out.iter().any(|(k, v)| k == key && *v == f.verdict));
        out.retain(|(key, verdict)| {
            self.written.get(key) != Some(verdict)
                && !self
                    .failed
                    .get(key)
                    .is_some_and(|f| &f.verdict == verdict && f.retry_at > now)
        });
        out
    }

    /// Records the outcome of writing `verdict` on `key`.
    pub(crate) fn done(&mut self, key: ResourceKey, verdict: Verdict, result: PatchResult) {
        match result {
            PatchResult::Written | PatchResult::Gone => {
                self.failed.remove(&key);
                self.written.insert(key, verdict);
            }
            PatchResult::Failed(now) => {
                let attempts = match self.failed.get(&key) {
                    Some(f) if f.verdict == verdict => f.attempts + 1,
                    _ => 1,
                };
                let delay = PATCH_RETRY
                    .0
                    .saturating_mul(1 << attempts.min(16))
                    .min(PATCH_RETRY.1);
                let failure = Failure {
                    verdict,
                    attempts,
                    retry_at: now + delay,
                };
                self.failed.insert(key, failure);
            }
        }
    }

    /// When the next failed write is due.
    pub(crate) fn next_retry(&self) -> Option<Instant> {
        self.failed.values().map(|f| f.retry_at).min()
    }
}

/// How a status patch went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PatchResult {
    Written,
    /// 404: the object, or its CRD's status subresource, does not exist. Not retried.
    Gone,
    /// Any other error, at this instant; retried with backoff.
    Failed(Instant),
}

/// The merge patch of the status subresource that sets the `Accepted` condition.
pub(crate) fn status_patch(verdict: &Verdict, now: Timestamp) -> Value {
    let (status, reason, message) = match verdict {
        Verdict::Accepted => ("True", "Valid", "the mesh uses this resource"),
        Verdict::Rejected(reason) => ("False", "Invalid", reason.as_str()),
    };
    // RFC 3339 in whole seconds, as metav1.Time is written.
    let now = Timestamp::from_second(now.as_second()).unwrap_or(now);
    json!({
        "status": {
            "conditions": [{
                "type": ACCEPTED_CONDITION,
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": now.to_string(),
            }]
        }
    })
}

/// Writes status conditions while this replica leads. A replica that starts leading starts
/// with a fresh writer: what an earlier leader wrote is not known here, so each condition is
/// written once again.
async fn write_status(client: kube::Client, index: SharedIndex, mut leadership: Leadership) {
    loop {
        leadership.until_leading().await;
        tokio::select! {
            () = write_status_while_leading(&client, &index) => return,
            () = leadership.until_not_leading() => {
                info!("not leading: status conditions are left to the leader");
            }
        }
    }
}

async fn write_status_while_leading(client: &kube::Client, index: &SharedIndex) {
    let mut generations = index.subscribe();
    let mut writer = StatusWriter::default();
    loop {
        let plan = {
            let index = index.read();
            writer.plan(&index, Instant::now())
        };
        for (key, verdict) in plan {
            let result = patch_status(client, &key, &verdict).await;
            writer.done(key, verdict, result);
        }
        let retry = writer.next_retry();
        tokio::select! {
            changed = generations.changed() => {
                if changed.is_err() {
                    debug!("index dropped; status writer stopped");
                    return;
                }
            }
            () = sleep_until(retry) => {}
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

async fn patch_status(client: &kube::Client, key: &ResourceKey, verdict: &Verdict) -> PatchResult {
    let api = Api::<DynamicObject>::namespaced_with(
        client.clone(),
        &key.namespace,
        &api_resource(key.kind),
    );
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..PatchParams::default()
    };
    let patch = Patch::Merge(status_patch(verdict, Timestamp::now()));
    match api.patch_status(&key.name, &params, &patch).await {
        Ok(_) => {
            info!(%key, condition = %verdict, "status condition written");
            PatchResult::Written
        }
        Err(kube::Error::Api(status)) if status.is_not_found() => {
            warn!(
                %key,
                condition = %verdict,
                "cannot write the status condition: the object or its status subresource \
                 does not exist"
            );
            PatchResult::Gone
        }
        Err(e) => {
            warn!(%key, condition = %verdict, error = %e, "status condition not written; will retry");
            PatchResult::Failed(Instant::now())
        }
    }
}

#[cfg(test)]
mod tests;

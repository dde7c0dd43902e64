//! A mocked API server for the source's tests: LIST and WATCH of every kind the source
//! watches (watches are held open and fed as the test sends events), 404 for kinds marked
//! missing, and a record of every request and PATCH.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use futures::channel::mpsc;
use http::{Method, Request, Response, StatusCode};
use http_body_util::StreamBody;
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use super::super::api_resource;
use crate::resource::Kind;

/// The collection path of a kind, as the client requests it.
pub(super) fn path(kind: Kind) -> String {
    let r = api_resource(kind);
    match r.group.is_empty() {
        true => format!("/api/{}/{}", r.version, r.plural),
        false => format!("/apis/{}/{}/{}", r.group, r.version, r.plural),
    }
}

type Chunk = Result<Frame<Bytes>, Infallible>;
type MockBody = StreamBody<mpsc::UnboundedReceiver<Chunk>>;

fn body(bytes: impl Into<Bytes>) -> MockBody {
    let (tx, rx) = mpsc::unbounded();
    let _ = tx.unbounded_send(Ok(Frame::data(bytes.into())));
    StreamBody::new(rx)
}

fn json_response(status: StatusCode, value: &Value) -> Response<MockBody> {
    let mut response = Response::new(body(value.to_string()));
    *response.status_mut() = status;
    response
}

fn not_found(path: &str) -> Response<MockBody> {
    let status = json!({
        "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
        "message": format!("the server could not find the requested resource ({path})"),
        "reason": "NotFound", "code": 404,
    });
    json_response(StatusCode::NOT_FOUND, &status)
}

/// One collection: its objects (what a LIST returns), the open watches and the events
/// waiting for the next watch.
struct Collection {
    kind: Kind,
    items: Vec<Value>,
    missing: bool,
    watches: Vec<mpsc::UnboundedSender<Chunk>>,
    pending: Vec<String>,
}

struct ApiState {
    collections: HashMap<String, Collection>,
    /// `(method, path?query)` of every request.
    requests: Vec<(Method, String)>,
    /// `(path, body)` of every PATCH.
    patches: Vec<(String, Value)>,
    resource_version: u64,
}

/// Answers LIST and WATCH for every kind the source watches and records PATCHes. Watches
/// are held open; events are written to them as the test sends them.
#[derive(Clone)]
pub(super) struct MockApi {
    state: Arc<Mutex<ApiState>>,
}

impl MockApi {
    pub(super) fn new() -> Self {
        let collections = Kind::ALL
            .into_iter()
            .map(|kind| {
                let collection = Collection {
                    kind,
                    items: Vec::new(),
                    missing: false,
                    watches: Vec::new(),
                    pending: Vec::new(),
                };
                (path(kind), collection)
            })
            .collect();
        let state = ApiState {
            collections,
            requests: Vec::new(),
            patches: Vec::new(),
            resource_version: 1,
        };
        MockApi {
            state: Arc::new(Mutex::new(state)),
        }
    }

    fn state(&self) -> MutexGuard<'_, ApiState> {
        self.state.lock().expect("mock API state")
    }

    /// A client talking to this server, and the task serving it.
    pub(super) fn client(&self) -> (kube::Client, JoinHandle<()>) {
        let (service, mut handle) =
            tower_test::mock::pair::<Request<kube::client::Body>, Response<MockBody>>();
        let api = self.clone();
        let server = tokio::spawn(async move {
            while let Some((request, respond)) = handle.next_request().await {
                respond.send_response(api.answer(request).await);
            }
        });
        (kube::Client::new(service, "default"), server)
    }

    /// Makes a kind answer 404, as when its CRD is not installed, or serves it again.
    pub(super) fn set_missing(&self, kind: Kind, missing: bool) {
        let mut state = self.state();
        if let Some(c) = state.collections.get_mut(&path(kind)) {
            c.missing = missing;
        }
    }

    /// Adds objects that exist before the test starts (LIST returns them).
    pub(super) fn seed(&self, objects: impl IntoIterator<Item = Value>) {
        for object in objects {
            let mut state = self.state();
            let object = state.stamp(object);
            if let Some(c) = state.collections.get_mut(&path(object_kind(&object))) {
                upsert(&mut c.items, object);
            }
        }
    }

    /// A change: updates the collection and sends `{"type": .., "object": ..}` to its watches.
    pub(super) fn send(&self, kind: &str, object: Value) {
        let mut state = self.state();
        let object = state.stamp(object);
        let Some(c) = state.collections.get_mut(&path(object_kind(&object))) else {
            panic!("no collection for {object}");
        };
        match kind {
            "DELETED" => c.items.retain(|o| identity(o) != identity(&object)),
            _ => upsert(&mut c.items, object.clone()),
        }
        c.broadcast(&json!({"type": kind, "object": object}));
    }

    /// Deletes an object without telling the watches: a deletion missed while disconnected.
    pub(super) fn forget(&self, kind: Kind, namespace: &str, name: &str) {
        let mut state = self.state();
        if let Some(c) = state.collections.get_mut(&path(kind)) {
            c.items
                .retain(|o| identity(o) != (namespace.to_string(), name.to_string()));
        }
    }

    /// Ends the kind's watches with 410 Gone, which makes the watcher relist.
    pub(super) fn expire(&self, kind: Kind) {
        let mut state = self.state();
        if let Some(c) = state.collections.get_mut(&path(kind)) {
            let status = json!({
                "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
                "message": "too old resource version", "reason": "Expired", "code": 410,
            });
            c.broadcast(&json!({"type": "ERROR", "object": status}));
        }
    }

    pub(super) fn watching(&self, kind: Kind) -> bool {
        let state = self.state();
        state
            .collections
            .get(&path(kind))
            .is_some_and(|c| c.watches.iter().any(|w| !w.is_closed()))
    }

    pub(super) fn lists(&self, kind: Kind) -> usize {
        let collection = path(kind);
        let state = self.state();
        state
            .requests
            .iter()
            .filter(|(method, uri)| {
                method == Method::GET
                    && uri.split('?').next() == Some(collection.as_str())
                    && !uri.contains("watch=true")
            })
            .count()
    }

    pub(super) fn patches(&self, path: &str) -> Vec<Value> {
        let state = self.state();
        state
            .patches
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, body)| body.clone())
            .collect()
    }

    async fn answer(&self, request: Request<kube::client::Body>) -> Response<MockBody> {
        let (parts, body) = request.into_parts();
        let body = body.collect_bytes().await.unwrap_or_default();
        let path = parts.uri.path().to_string();
        let query = parts.uri.query().unwrap_or_default();
        let mut state = self.state();
        state
            .requests
            .push((parts.method.clone(), parts.uri.to_string()));

        if parts.method == Method::PATCH {
            let patch: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            state.patches.push((path, patch));
            return json_response(StatusCode::OK, &json!({"metadata": {"name": "patched"}}));
        }
        let resource_version = state.resource_version;
        let Some(c) = state.collections.get_mut(&path) else {
            return not_found(&path);
        };
        if parts.method != Method::GET || c.missing {
            return not_found(&path);
        }
        if query.split('&').any(|p| p == "watch=true") {
            let (tx, rx) = mpsc::unbounded();
            for line in c.pending.drain(..) {
                let _ = tx.unbounded_send(Ok(Frame::data(Bytes::from(line))));
            }
            c.watches.push(tx);
            return Response::new(StreamBody::new(rx));
        }
        let resource = api_resource(c.kind);
        let list = json!({
            "apiVersion": resource.api_version,
            "kind": format!("{}List", resource.kind),
            "metadata": {"resourceVersion": resource_version.to_string()},
            "items": c.items,
        });
        json_response(StatusCode::OK, &list)
    }
}

impl ApiState {
    /// Gives the object the next resource version, as the API server does on every write.
    fn stamp(&mut self, mut object: Value) -> Value {
        self.resource_version += 1;
        object["metadata"]["resourceVersion"] = self.resource_version.to_string().into();
        object
    }
}

impl Collection {
    /// Writes an event to the open watches, or keeps it for the next one.
    fn broadcast(&mut self, event: &Value) {
        let line = format!("{event}\n");
        self.watches.retain(|w| {
            w.unbounded_send(Ok(Frame::data(Bytes::from(line.clone()))))
                .is_ok()
        });
        if self.watches.is_empty() {
            self.pending.push(line);
        }
    }
}

fn object_kind(object: &Value) -> Kind {
    object["kind"]
        .as_str()
        .and_then(Kind::from_kind)
        .expect("a kind the source watches")
}

fn identity(object: &Value) -> (String, String) {
    let text = |field: &str| {
        object["metadata"][field]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    (text("namespace"), text("name"))
}

fn upsert(items: &mut Vec<Value>, object: Value) {
    match items.iter_mut().find(|o| identity(o) == identity(&object)) {
        Some(existing) => *existing = object,
        None => items.push(object),
    }
}

//! A fake Microsoft Graph v1.0 and Microsoft identity platform token endpoint.
//!
//! [`FakeGraph`] is an in-process HTTP server (axum, bound to `127.0.0.1`) that implements the
//! small part of Graph that entra-sso-sync talks to and answers with the real Graph JSON shapes:
//!
//! * `POST /{tenant}/oauth2/v2.0/token` — client-credentials grant, identity platform errors;
//! * `GET /v1.0/groups?$filter=displayName eq '…'` — group lookup by name;
//! * `GET /v1.0/groups/{id}` — a single group;
//! * `GET /v1.0/groups/{id}/members` and `/transitiveMembers`, optionally cast with
//!   `/microsoft.graph.user` or `/microsoft.graph.group`, with `$select`, `$top`, `$count` and
//!   server-driven paging through `@odata.nextLink` / `$skiptoken`;
//! * `GET /v1.0/groups/delta` and `GET /v1.0/users/delta` — delta rounds: `$select` (groups
//!   take `members`, answered as `members@delta`), pages sized by `Prefer: odata.maxpagesize`
//!   (at most [`GROUP_DELTA_PAGE_SIZE`] groups or [`USER_DELTA_PAGE_SIZE`] users), nextLinks
//!   to an `@odata.deltaLink` whose `$deltatoken` names a stored tenant state; the next round
//!   from it reports what changed since (`@removed` for deleted objects and departed members).
//!   The last [`DELTA_HISTORY`] states are kept; an older or unknown token is 410 Gone with
//!   `syncStateNotFound`, as is any token after [`FakeGraph::expire_delta_links`].
//!
//! Every `/v1.0` request needs a bearer token previously issued by the token endpoint. Faults
//! (throttling, outages, malformed bodies) can be injected per path, and every request is
//! recorded (without token values or secrets) so tests can assert on the traffic.
//!
//! Output is deterministic: groups are listed in fixture order, direct members in the order of the
//! group's `members` list and transitive members in breadth-first discovery order.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::hash::{BuildHasher, RandomState};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Request, State as AxumState};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::Response;
use axum::Router;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The only scope the token endpoint accepts (client-credentials flow for Graph).
pub const GRAPH_DEFAULT_SCOPE: &str = "https://graph.microsoft.com/.default";

/// Default page size when the request has no `$top` (as in Graph).
pub const DEFAULT_PAGE_SIZE: usize = 100;

/// Largest `$top` Graph accepts for directory objects, and the default server-side page cap.
pub const MAX_PAGE_SIZE: usize = 999;

const METADATA: &str = "https://graph.microsoft.com/v1.0/$metadata";
const GRAPH_CONTENT_TYPE: &str =
    "application/json;odata.metadata=minimal;odata.streaming=true;IEEE754Compatible=false;charset=utf-8";
const SKIPTOKEN_PREFIX: &str = "fake-graph-offset:";
const DELTA_SKIPTOKEN_PREFIX: &str = "fake-graph-delta:";
const DELTATOKEN_PREFIX: &str = "fake-graph-state:";

/// Largest delta page of groups (`Prefer: odata.maxpagesize` is capped to it).
pub const GROUP_DELTA_PAGE_SIZE: usize = 100;
/// Largest delta page of users (Graph caps `odata.maxpagesize` at 200 for directory objects).
pub const USER_DELTA_PAGE_SIZE: usize = 200;
/// Delta rounds whose starting tenant state is kept; older deltaLinks answer 410 Gone.
pub const DELTA_HISTORY: usize = 16;
/// `members@delta` entries per group object: a group with more member changes is sent as
/// several objects with the same id (as Graph splits long member lists), in order.
pub const DELTA_MEMBERS_PER_OBJECT: usize = 50;
const MAX_BODY_BYTES: usize = 1 << 20;

/// Properties of `microsoft.graph.user` that the fake models (returned by default).
const USER_PROPS: &[&str] = &["id", "userPrincipalName", "displayName", "accountEnabled"];
/// Other real user properties: selectable, always returned as `null`.
const USER_EXTRA_PROPS: &[&str] = &[
    "mail",
    "mailNickname",
    "givenName",
    "surname",
    "jobTitle",
    "userType",
    "businessPhones",
    "mobilePhone",
    "officeLocation",
    "preferredLanguage",
    "employeeId",
    "onPremisesImmutableId",
    "onPremisesSyncEnabled",
    "createdDateTime",
    "deletedDateTime",
];
/// Properties of `microsoft.graph.group` that the fake models (returned by default).
const GROUP_PROPS: &[&str] = &["id", "displayName"];
/// Other real group properties: selectable, always returned as `null`.
const GROUP_EXTRA_PROPS: &[&str] = &[
    "description",
    "mail",
    "mailNickname",
    "mailEnabled",
    "securityEnabled",
    "groupTypes",
    "visibility",
    "onPremisesSyncEnabled",
    "createdDateTime",
    "deletedDateTime",
];

fn default_true() -> bool {
    true
}

/// A user fixture (`#microsoft.graph.user`); serde uses the Graph camelCase field names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Object id (usually a GUID).
    pub id: String,
    /// `userPrincipalName`, e.g. `alice@example.com`.
    #[serde(rename = "userPrincipalName")]
    pub user_principal_name: String,
    /// `displayName`.
    #[serde(rename = "displayName")]
    pub display_name: String,
    /// `accountEnabled`; defaults to `true` when absent from the fixture.
    #[serde(rename = "accountEnabled", default = "default_true")]
    pub account_enabled: bool,
}

/// A group fixture (`#microsoft.graph.group`); serde uses the Graph camelCase field names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// Object id (usually a GUID).
    pub id: String,
    /// `displayName`; not necessarily unique, exactly as in Entra.
    #[serde(rename = "displayName")]
    pub display_name: String,
    /// Ids of direct members (users or groups). Ids naming no object are skipped when served.
    #[serde(default)]
    pub members: Vec<String>,
}

/// The directory the fake serves, plus the one app registration allowed to get tokens.
///
/// JSON shape: `{"tenant_id", "client_id", "client_secret", "users": [...], "groups": [...]}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenant {
    /// Directory (tenant) id; the `{tenant}` path segment of the token endpoint.
    pub tenant_id: String,
    /// Application (client) id of the app registration.
    pub client_id: String,
    /// The app registration's client secret.
    pub client_secret: String,
    /// Users, served in this order.
    #[serde(default)]
    pub users: Vec<User>,
    /// Groups, served in this order.
    #[serde(default)]
    pub groups: Vec<Group>,
}

/// A user or a group, borrowed from a [`Tenant`].
#[derive(Clone, Copy, Debug)]
enum Member<'a> {
    User(&'a User),
    Group(&'a Group),
}

impl Tenant {
    /// Loads a tenant from a JSON file; errors name the file. Ids must be unique across users
    /// and groups.
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Tenant, String> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read tenant file {}: {e}", path.display()))?;
        let tenant: Tenant = serde_json::from_str(&text)
            .map_err(|e| format!("invalid tenant JSON in {}: {e}", path.display()))?;
        tenant
            .validate()
            .map_err(|e| format!("invalid tenant in {}: {e}", path.display()))?;
        Ok(tenant)
    }

    /// Checks that every id is non-empty and unique across users and groups.
    pub fn validate(&self) -> Result<(), String> {
        let mut seen = HashSet::new();
        let ids = self
            .users
            .iter()
            .map(|u| &u.id)
            .chain(self.groups.iter().map(|g| &g.id));
        for id in ids {
            if id.is_empty() {
                return Err("an object has an empty id".to_owned());
            }
            if !seen.insert(id.as_str()) {
                return Err(format!("duplicate object id '{id}'"));
            }
        }
        Ok(())
    }

    /// The user with this id, if any.
    pub fn user(&self, id: &str) -> Option<&User> {
        self.users.iter().find(|u| u.id == id)
    }

    /// The group with this id, if any.
    pub fn group(&self, id: &str) -> Option<&Group> {
        self.groups.iter().find(|g| g.id == id)
    }

    /// Transitive user members of a group: every user reachable through nested membership,
    /// each once, in breadth-first discovery order. Cycle-safe; unknown group → empty.
    pub fn transitive_users(&self, group_id: &str) -> Vec<&User> {
        let Some(group) = self.group(group_id) else {
            return Vec::new();
        };
        self.transitive_members(group)
            .into_iter()
            .filter_map(|m| match m {
                Member::User(u) => Some(u),
                Member::Group(_) => None,
            })
            .collect()
    }

    /// Transitive group members of a group (nested groups, each once, excluding the group
    /// itself even when a cycle leads back to it). Unknown group → empty.
    pub fn transitive_groups(&self, group_id: &str) -> Vec<&Group> {
        let Some(group) = self.group(group_id) else {
            return Vec::new();
        };
        self.transitive_members(group)
            .into_iter()
            .filter_map(|m| match m {
                Member::Group(g) => Some(g),
                Member::User(_) => None,
            })
            .collect()
    }

    fn index(&self) -> HashMap<&str, Member<'_>> {
        let mut index = HashMap::with_capacity(self.users.len() + self.groups.len());
        for g in &self.groups {
            index.insert(g.id.as_str(), Member::Group(g));
        }
        for u in &self.users {
            index.insert(u.id.as_str(), Member::User(u));
        }
        index
    }

    /// Direct members in `members` order, deduplicated, dangling ids skipped.
    fn direct_members<'a>(&'a self, group: &'a Group) -> Vec<Member<'a>> {
        let index = self.index();
        let mut seen = HashSet::new();
        group
            .members
            .iter()
            .filter(|id| seen.insert(id.as_str()))
            .filter_map(|id| index.get(id.as_str()).copied())
            .collect()
    }

    /// Transitive members in breadth-first discovery order, each once, excluding `group`.
    fn transitive_members<'a>(&'a self, group: &'a Group) -> Vec<Member<'a>> {
        let index = self.index();
        let mut seen: HashSet<&str> = HashSet::from([group.id.as_str()]);
        let mut queue = VecDeque::from([group]);
        let mut out = Vec::new();
        while let Some(current) = queue.pop_front() {
            for id in &current.members {
                if !seen.insert(id.as_str()) {
                    continue;
                }
                match index.get(id.as_str()) {
                    Some(&Member::User(u)) => out.push(Member::User(u)),
                    Some(&Member::Group(g)) => {
                        out.push(Member::Group(g));
                        queue.push_back(g);
                    }
                    None => {}
                }
            }
        }
        out
    }
}

/// A fault to inject: matching requests are answered with an error instead of normal handling.
///
/// Faults are checked in insertion order before anything else (also for the token endpoint);
/// the first one that matches the request, has its `skip` exhausted and its `times` not yet
/// exhausted answers the request. A fault counts only requests it sees, so a later fault does
/// not see a request an earlier fault answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Substring matched against the request's percent-decoded path+query
    /// (e.g. `"/transitiveMembers"`, `"$skiptoken"`, `"/oauth2/"`).
    pub path_contains: String,
    /// HTTP status to answer with (an invalid code becomes 500).
    pub status: u16,
    /// Value of the `Retry-After` header (seconds), if any.
    pub retry_after: Option<u64>,
    /// How many matching requests fail; `None` = every one.
    pub times: Option<usize>,
    /// Skip (serve normally) this many matching requests before failing, e.g. 1 fails the 2nd.
    pub skip: usize,
    /// Raw body sent instead of the standard Graph error JSON (e.g. truncated JSON).
    pub body: Option<String>,
}

impl Fault {
    /// A fault failing every request whose path+query contains `path_contains` with `status`.
    pub fn new(path_contains: impl Into<String>, status: u16) -> Fault {
        Fault {
            path_contains: path_contains.into(),
            status,
            retry_after: None,
            times: None,
            skip: 0,
            body: None,
        }
    }

    /// Sets the `Retry-After` header value in seconds.
    pub fn retry_after(mut self, seconds: u64) -> Fault {
        self.retry_after = Some(seconds);
        self
    }

    /// Fails only this many matching requests.
    pub fn times(mut self, times: usize) -> Fault {
        self.times = Some(times);
        self
    }

    /// Serves this many matching requests normally before failing.
    pub fn skip(mut self, skip: usize) -> Fault {
        self.skip = skip;
        self
    }

    /// Sends this raw body (as `application/json`) instead of the Graph error JSON.
    pub fn body(mut self, body: impl Into<String>) -> Fault {
        self.body = Some(body.into());
        self
    }
}

/// One request the server received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedRequest {
    /// HTTP method, e.g. `GET`.
    pub method: String,
    /// Percent-decoded path and query (`+` in the query decoded to a space); values of
    /// `client_secret`, `access_token` and `client_assertion` query parameters are redacted.
    pub path_and_query: String,
    /// Whether the request carried an `Authorization: Bearer …` header (its value is never
    /// recorded).
    pub had_bearer: bool,
}

#[derive(Debug)]
struct FaultSlot {
    fault: Fault,
    seen: usize,
    fired: usize,
}

#[derive(Debug)]
struct ServerState {
    tenant: Tenant,
    page_size_cap: usize,
    faults: Vec<FaultSlot>,
    requests: Vec<RecordedRequest>,
    /// Every token issued, in order.
    tokens: Vec<String>,
    /// Tokens that still authenticate.
    active_tokens: HashSet<String>,
    /// Tenant states that delta rounds started at, oldest first (at most [`DELTA_HISTORY`]).
    delta_states: VecDeque<DeltaState>,
    /// Id of the next delta state.
    next_delta_state: u64,
}

/// Which delta function a state belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DeltaKind {
    Groups,
    Users,
}

/// The tenant as a delta round saw it when it started: its deltaLink names this state, and
/// the round's pages (and the next round's diff) are computed from it.
#[derive(Debug)]
struct DeltaState {
    id: u64,
    kind: DeltaKind,
    /// The round's `$select`, kept with the state as Graph keeps it with the token.
    select: Option<String>,
    tenant: Arc<Tenant>,
}

impl ServerState {
    /// Stores the current tenant as the starting state of a new `kind` round (evicting the
    /// oldest beyond [`DELTA_HISTORY`]) and returns its id.
    fn push_delta_state(&mut self, kind: DeltaKind, select: Option<String>) -> u64 {
        let id = self.next_delta_state;
        self.next_delta_state += 1;
        self.delta_states.push_back(DeltaState {
            id,
            kind,
            select,
            tenant: Arc::new(self.tenant.clone()),
        });
        while self.delta_states.len() > DELTA_HISTORY {
            self.delta_states.pop_front();
        }
        id
    }

    /// The stored `kind` state `id`, or 410 `syncStateNotFound` (evicted, expired, or a state
    /// of the other delta function).
    fn delta_state(&self, id: u64, kind: DeltaKind) -> Result<&DeltaState, GraphError> {
        self.delta_states
            .iter()
            .find(|s| s.id == id && s.kind == kind)
            .ok_or_else(sync_state_not_found)
    }

    /// Finds the fault that answers this request, updating the per-fault counters.
    fn take_fault(&mut self, decoded: &str) -> Option<Fault> {
        for slot in &mut self.faults {
            if !decoded.contains(&slot.fault.path_contains) {
                continue;
            }
            if slot.seen < slot.fault.skip {
                slot.seen += 1;
                continue;
            }
            if slot.fault.times.is_some_and(|t| slot.fired >= t) {
                continue;
            }
            slot.fired += 1;
            return Some(slot.fault.clone());
        }
        None
    }
}

struct Shared {
    base_url: String,
    state: Mutex<ServerState>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, ServerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Owns the server task; dropping the last handle shuts the server down.
struct ServerTask {
    shutdown: watch::Sender<bool>,
    handle: Mutex<Option<JoinHandle<std::io::Result<()>>>>,
}

impl Drop for ServerTask {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

/// Handle to a running fake Graph server. Clones share the same server and state; the server
/// shuts down when the last clone is dropped or [`FakeGraph::stop`] is called.
#[derive(Clone)]
pub struct FakeGraph {
    shared: Arc<Shared>,
    task: Arc<ServerTask>,
}

impl std::fmt::Debug for FakeGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeGraph")
            .field("base_url", &self.shared.base_url)
            .finish_non_exhaustive()
    }
}

impl FakeGraph {
    /// Starts the server on `127.0.0.1` with a free port.
    pub async fn start(tenant: Tenant) -> std::io::Result<FakeGraph> {
        FakeGraph::start_on(tenant, 0).await
    }

    /// Starts the server on `127.0.0.1:port` (0 = a free port).
    pub async fn start_on(tenant: Tenant, port: u16) -> std::io::Result<FakeGraph> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            base_url: format!("http://127.0.0.1:{}", addr.port()),
            state: Mutex::new(ServerState {
                tenant,
                page_size_cap: MAX_PAGE_SIZE,
                faults: Vec::new(),
                requests: Vec::new(),
                tokens: Vec::new(),
                active_tokens: HashSet::new(),
                delta_states: VecDeque::new(),
                next_delta_state: 0,
            }),
        });
        let router = Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&shared));
        let (shutdown, mut shutdown_rx) = watch::channel(false);
        let handle = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    // Err = every sender dropped, which also means "shut down".
                    let _ = shutdown_rx.wait_for(|stop| *stop).await;
                })
                .await
        });
        Ok(FakeGraph {
            shared,
            task: Arc::new(ServerTask {
                shutdown,
                handle: Mutex::new(Some(handle)),
            }),
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        self.shared.base_url.clone()
    }

    /// Authority for the token endpoint (same as [`FakeGraph::base_url`]); the token endpoint
    /// is `{login_url}/{tenant}/oauth2/v2.0/token`.
    pub fn login_url(&self) -> String {
        self.base_url()
    }

    /// Graph root: `base_url + "/v1.0"`.
    pub fn graph_url(&self) -> String {
        format!("{}/v1.0", self.shared.base_url)
    }

    /// The token endpoint URL for the served tenant.
    pub fn token_url(&self) -> String {
        let tenant_id = self.shared.lock().tenant.tenant_id.clone();
        format!("{}/{tenant_id}/oauth2/v2.0/token", self.shared.base_url)
    }

    /// Sets the server-side maximum page size (default 999; values below 1 act as 1), so tests
    /// can force paging with few objects.
    pub fn set_page_size_cap(&self, n: usize) {
        self.shared.lock().page_size_cap = n.max(1);
    }

    /// Runs `f` with the served tenant, e.g. to change users, groups or membership between runs.
    pub fn with_tenant<R>(&self, f: impl FnOnce(&mut Tenant) -> R) -> R {
        f(&mut self.shared.lock().tenant)
    }

    /// A snapshot of the served tenant.
    pub fn tenant(&self) -> Tenant {
        self.shared.lock().tenant.clone()
    }

    /// Adds a fault (after the existing ones).
    pub fn inject(&self, fault: Fault) {
        self.shared.lock().faults.push(FaultSlot {
            fault,
            seen: 0,
            fired: 0,
        });
    }

    /// Removes all faults.
    pub fn clear_faults(&self) {
        self.shared.lock().faults.clear();
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.clone()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        self.shared.lock().requests.clear();
    }

    /// Every access token issued so far, in order (so tests can check outputs never leak one).
    pub fn issued_tokens(&self) -> Vec<String> {
        self.shared.lock().tokens.clone()
    }

    /// Forgets every stored delta state (as after Graph's ~7 days): every deltaLink issued so
    /// far, and the nextLinks of rounds in progress, answer 410 Gone `syncStateNotFound`.
    pub fn expire_delta_links(&self) {
        self.shared.lock().delta_states.clear();
    }

    /// Invalidates every issued token (as if they expired): later Graph calls using them get 401.
    /// They stay listed in [`FakeGraph::issued_tokens`].
    pub fn revoke_tokens(&self) {
        self.shared.lock().active_tokens.clear();
    }

    /// Serves until the server stops (it only stops on [`FakeGraph::stop`] from a clone, or on
    /// an I/O error). Intended for the `fake-graph` binary.
    pub async fn wait(self) -> std::io::Result<()> {
        let handle = self
            .task
            .handle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match handle {
            Some(handle) => handle
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e))),
            None => Ok(()),
        }
    }

    /// Stops the server: no new connections, idle keep-alive connections are closed, in-flight
    /// requests get up to 5 s to finish.
    pub async fn stop(self) {
        let _ = self.task.shutdown.send(true);
        let handle = self
            .task
            .handle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(mut handle) = handle {
            if tokio::time::timeout(Duration::from_secs(5), &mut handle)
                .await
                .is_err()
            {
                handle.abort();
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Request handling
// ---------------------------------------------------------------------------------------------

/// Per-request context: ids echoed in headers and error bodies, and the client's preferences.
struct Ctx {
    request_id: String,
    client_request_id: String,
    /// `Prefer: odata.maxpagesize=N` (delta routes only, as the fake serves it).
    max_page_size: Option<usize>,
}

/// A Graph error (`{"error":{"code","message","innerError"}}`).
#[derive(Debug)]
struct GraphError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl GraphError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> GraphError {
        GraphError {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> GraphError {
        GraphError::new(StatusCode::BAD_REQUEST, "Request_BadRequest", message)
    }

    fn unsupported(message: impl Into<String>) -> GraphError {
        GraphError::new(StatusCode::BAD_REQUEST, "Request_UnsupportedQuery", message)
    }

    fn not_found(id: &str) -> GraphError {
        GraphError::new(
            StatusCode::NOT_FOUND,
            "Request_ResourceNotFound",
            format!(
                "Resource '{id}' does not exist or one of its queried reference-property objects are not present."
            ),
        )
    }

    fn response(&self, ctx: &Ctx) -> Response {
        graph_error_response(self.status, self.code, &self.message, ctx)
    }
}

async fn handle(AxumState(shared): AxumState<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let raw_path = parts.uri.path().to_owned();
    let raw_query = parts.uri.query().unwrap_or("").to_owned();
    let decoded = decoded_path_and_query(&raw_path, &raw_query);
    let bearer = bearer_token(&parts.headers);
    let ctx = Ctx {
        request_id: new_uuid(),
        client_request_id: parts
            .headers
            .get("client-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128)
            .map_or_else(new_uuid, str::to_owned),
        max_page_size: prefer_max_page_size(&parts.headers),
    };
    tracing::debug!(method = %parts.method, path = %decoded, "fake graph request");

    let fault = {
        let mut state = shared.lock();
        state.requests.push(RecordedRequest {
            method: parts.method.to_string(),
            path_and_query: decoded.clone(),
            had_bearer: bearer.is_some(),
        });
        state.take_fault(&decoded)
    };
    let mut response = match fault {
        Some(fault) => fault_response(&fault, &ctx),
        None => {
            let segments = path_segments(&raw_path);
            if is_token_route(&segments) {
                if parts.method == Method::POST {
                    let body = axum::body::to_bytes(body, MAX_BODY_BYTES).await;
                    token_endpoint(&shared, &segments[0], body.ok().as_deref())
                } else {
                    method_not_allowed("POST", &ctx)
                }
            } else if segments
                .first()
                .is_some_and(|s| s.eq_ignore_ascii_case("v1.0"))
            {
                graph_endpoint(
                    &shared,
                    &parts.method,
                    bearer.as_deref(),
                    &segments[1..],
                    &raw_path,
                    &raw_query,
                    &ctx,
                )
            } else {
                let first = segments.first().map_or("", String::as_str);
                GraphError::new(
                    StatusCode::NOT_FOUND,
                    "BadRequest",
                    format!("Resource not found for the segment '{first}'."),
                )
                .response(&ctx)
            }
        }
    };
    let headers = response.headers_mut();
    for (name, value) in [
        ("request-id", &ctx.request_id),
        ("client-request-id", &ctx.client_request_id),
    ] {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(name, value);
        }
    }
    response
}

fn is_token_route(segments: &[String]) -> bool {
    segments.len() == 4
        && segments[1].eq_ignore_ascii_case("oauth2")
        && segments[2].eq_ignore_ascii_case("v2.0")
        && segments[3].eq_ignore_ascii_case("token")
}

/// Splits the raw path into percent-decoded segments (one trailing slash tolerated).
fn path_segments(raw_path: &str) -> Vec<String> {
    let mut segments: Vec<String> = raw_path
        .trim_start_matches('/')
        .split('/')
        .map(|s| String::from_utf8_lossy(&percent_decode(s, false)).into_owned())
        .collect();
    if segments.len() > 1 && segments.last().is_some_and(String::is_empty) {
        segments.pop();
    }
    segments
}

/// The bearer token of the request, if it has an `Authorization: Bearer <token>` header.
fn bearer_token(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

fn fault_response(fault: &Fault, ctx: &Ctx) -> Response {
    let status = StatusCode::from_u16(fault.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = match &fault.body {
        Some(body) => plain_response(status, "application/json", body.clone()),
        None => {
            let (code, message) = match status.as_u16() {
                429 => ("TooManyRequests", "Too many requests"),
                503 => ("ServiceUnavailable", "Service unavailable"),
                _ => (
                    "generalException",
                    "General exception while processing the request.",
                ),
            };
            graph_error_response(status, code, message, ctx)
        }
    };
    if let Some(seconds) = fault.retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

fn plain_response(status: StatusCode, content_type: &'static str, body: String) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn graph_error_response(status: StatusCode, code: &str, message: &str, ctx: &Ctx) -> Response {
    let body = json!({
        "error": {
            "code": code,
            "message": message,
            "innerError": {
                "date": timestamp_iso(),
                "request-id": ctx.request_id,
                "client-request-id": ctx.client_request_id,
            }
        }
    });
    plain_response(status, "application/json", body.to_string())
}

fn method_not_allowed(allow: &'static str, ctx: &Ctx) -> Response {
    let mut response = GraphError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "Request_BadRequest",
        "Specified HTTP method is not allowed for the request target.",
    )
    .response(ctx);
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

// ---------------------------------------------------------------------------------------------
// Token endpoint
// ---------------------------------------------------------------------------------------------

fn token_endpoint(shared: &Shared, tenant_segment: &str, body: Option<&[u8]>) -> Response {
    let form = body
        .and_then(|b| parse_pairs(std::str::from_utf8(b).ok()?))
        .unwrap_or_default();
    let param = |name: &str| {
        form.iter()
            .find(|p| p.key == name)
            .map(|p| p.value.as_str())
            .filter(|v| !v.is_empty())
    };
    let mut state = shared.lock();
    let tenant = &state.tenant;
    let missing = |name: &str| {
        identity_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900144,
            &format!("The request body must contain the following parameter: '{name}'."),
        )
    };
    if !tenant_segment.eq_ignore_ascii_case(&tenant.tenant_id) {
        return identity_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            90002,
            &format!(
                "Tenant '{tenant_segment}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."
            ),
        );
    }
    let Some(grant_type) = param("grant_type") else {
        return missing("grant_type");
    };
    if grant_type != "client_credentials" {
        return identity_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70003,
            &format!("The app requested an unsupported grant type '{grant_type}'."),
        );
    }
    let Some(client_id) = param("client_id") else {
        return missing("client_id");
    };
    if client_id != tenant.client_id {
        return identity_error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700016,
            &format!(
                "Application with identifier '{client_id}' was not found in the directory '{}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant.",
                tenant.tenant_id
            ),
        );
    }
    let Some(scope) = param("scope") else {
        return missing("scope");
    };
    if scope != GRAPH_DEFAULT_SCOPE {
        return identity_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            1002012,
            &format!(
                "The provided value for scope {scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."
            ),
        );
    }
    let Some(secret) = param("client_secret") else {
        return identity_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000216,
            "'client_assertion', 'client_secret' or 'request' is required for the 'client_credentials' grant type.",
        );
    };
    if secret != tenant.client_secret {
        return identity_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000215,
            &format!(
                "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{}'.",
                tenant.client_id
            ),
        );
    }
    let token = format!(
        "fake-graph-token-{:016x}{:016x}",
        random_u64(),
        random_u64()
    );
    state.tokens.push(token.clone());
    state.active_tokens.insert(token.clone());
    drop(state);
    let body = json!({
        "token_type": "Bearer",
        "expires_in": 3599,
        "ext_expires_in": 3599,
        "access_token": token,
    });
    let mut response = plain_response(
        StatusCode::OK,
        "application/json; charset=utf-8",
        body.to_string(),
    );
    let headers = response.headers_mut();
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-store, no-cache"),
    );
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

/// An identity platform (AAD v2) error response.
fn identity_error(status: StatusCode, error: &str, aadsts: u32, description: &str) -> Response {
    let trace_id = new_uuid();
    let correlation_id = new_uuid();
    let timestamp = timestamp_aad();
    let body = json!({
        "error": error,
        "error_description": format!(
            "AADSTS{aadsts}: {description} Trace ID: {trace_id} Correlation ID: {correlation_id} Timestamp: {timestamp}"
        ),
        "error_codes": [aadsts],
        "timestamp": timestamp,
        "trace_id": trace_id,
        "correlation_id": correlation_id,
        "error_uri": format!("https://login.microsoftonline.com/error?code={aadsts}"),
    });
    plain_response(status, "application/json; charset=utf-8", body.to_string())
}

// ---------------------------------------------------------------------------------------------
// Graph endpoints
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cast {
    User,
    Group,
}

#[derive(Debug)]
enum GraphRoute<'a> {
    Delta(DeltaKind),
    GroupsList,
    Group(&'a str),
    Members {
        group: &'a str,
        transitive: bool,
        cast: Option<Cast>,
    },
}

/// Routes the segments after `v1.0`; `Err` carries the first segment that resolves to nothing.
fn graph_route(segments: &[String]) -> Result<GraphRoute<'_>, &str> {
    let Some((first, rest)) = segments.split_first() else {
        return Err("v1.0");
    };
    // `delta` is a function bound to the collection (`delta()` in OData's long form).
    let is_delta = |s: &str| s.eq_ignore_ascii_case("delta") || s.eq_ignore_ascii_case("delta()");
    if first.eq_ignore_ascii_case("users") {
        return match rest {
            [d] if is_delta(d) => Ok(GraphRoute::Delta(DeltaKind::Users)),
            _ => Err(first),
        };
    }
    if !first.eq_ignore_ascii_case("groups") {
        return Err(first);
    }
    let Some((id, rest)) = rest.split_first() else {
        return Ok(GraphRoute::GroupsList);
    };
    if rest.is_empty() && is_delta(id) {
        return Ok(GraphRoute::Delta(DeltaKind::Groups));
    }
    let Some((relation, rest)) = rest.split_first() else {
        return Ok(GraphRoute::Group(id));
    };
    let transitive = if relation.eq_ignore_ascii_case("members") {
        false
    } else if relation.eq_ignore_ascii_case("transitiveMembers") {
        true
    } else {
        return Err(relation);
    };
    let cast = match rest {
        [] => None,
        [c] if c.eq_ignore_ascii_case("microsoft.graph.user") => Some(Cast::User),
        [c] if c.eq_ignore_ascii_case("microsoft.graph.group") => Some(Cast::Group),
        [c, ..] => return Err(c),
    };
    Ok(GraphRoute::Members {
        group: id,
        transitive,
        cast,
    })
}

fn graph_endpoint(
    shared: &Shared,
    method: &Method,
    bearer: Option<&str>,
    segments: &[String],
    raw_path: &str,
    raw_query: &str,
    ctx: &Ctx,
) -> Response {
    let mut state = shared.lock();
    let token_ok = bearer.is_some_and(|t| state.active_tokens.contains(t));
    if !token_ok {
        drop(state);
        let message = match bearer {
            Some(t) if !t.is_empty() => "Access token validation failure.",
            _ => "Access token is empty.",
        };
        let mut response = graph_error_response(
            StatusCode::UNAUTHORIZED,
            "InvalidAuthenticationToken",
            message,
            ctx,
        );
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(
                "Bearer realm=\"\", authorization_uri=\"https://login.microsoftonline.com/common/oauth2/authorize\", client_id=\"00000003-0000-0000-c000-000000000000\"",
            ),
        );
        return response;
    }
    let route = match graph_route(segments) {
        Ok(route) => route,
        Err(segment) => {
            return GraphError::new(
                StatusCode::NOT_FOUND,
                "BadRequest",
                format!("Resource not found for the segment '{segment}'."),
            )
            .response(ctx)
        }
    };
    if method != Method::GET {
        drop(state);
        return method_not_allowed("GET", ctx);
    }
    let result = QueryOptions::parse(raw_query)
        .and_then(|opts| serve_graph(&mut state, &shared.base_url, &route, raw_path, &opts, ctx));
    drop(state);
    match result {
        Ok(body) => plain_response(StatusCode::OK, GRAPH_CONTENT_TYPE, body.to_string()),
        Err(e) => e.response(ctx),
    }
}

/// Parsed OData query options.
#[derive(Debug, Default)]
struct QueryOptions {
    filter: Option<String>,
    select: Option<String>,
    top: Option<usize>,
    count: bool,
    skiptoken: Option<String>,
    deltatoken: Option<String>,
    /// Raw (still encoded) query pieces other than `$skiptoken`, for building nextLinks.
    passthrough: Vec<String>,
}

impl QueryOptions {
    fn parse(raw_query: &str) -> Result<QueryOptions, GraphError> {
        let pairs = parse_pairs(raw_query)
            .ok_or_else(|| GraphError::bad_request("The query string is not valid UTF-8."))?;
        let mut opts = QueryOptions::default();
        let mut seen = HashSet::new();
        for pair in pairs {
            let name = pair.key.to_ascii_lowercase();
            if name.starts_with('$') && !seen.insert(name.clone()) {
                return Err(GraphError::bad_request(format!(
                    "Query option '{}' was specified more than once, but it must be specified at most once.",
                    pair.key
                )));
            }
            match name.as_str() {
                "$filter" => opts.filter = Some(pair.value),
                "$select" => opts.select = Some(pair.value),
                "$top" => {
                    let top = pair
                        .value
                        .trim()
                        .parse::<usize>()
                        .ok()
                        .filter(|t| (1..=MAX_PAGE_SIZE).contains(t));
                    match top {
                        Some(top) => opts.top = Some(top),
                        None => {
                            return Err(GraphError::bad_request(format!(
                                "Invalid page size specified: '{}'. Must be between 1 and 999 inclusive.",
                                pair.value
                            )))
                        }
                    }
                }
                "$count" => {
                    opts.count = match pair.value.to_ascii_lowercase().as_str() {
                        "true" => true,
                        "false" => false,
                        _ => {
                            return Err(GraphError::bad_request(format!(
                                "'{}' is not a valid count option.",
                                pair.value
                            )))
                        }
                    }
                }
                "$skiptoken" => {
                    opts.skiptoken = Some(pair.value);
                    continue;
                }
                "$deltatoken" => {
                    opts.deltatoken = Some(pair.value);
                    continue;
                }
                other if other.starts_with('$') => {
                    return Err(GraphError::unsupported(format!(
                        "The query option '{}' is not supported by this fake Graph server.",
                        pair.key
                    )))
                }
                _ => {}
            }
            opts.passthrough.push(pair.raw);
        }
        Ok(opts)
    }

    /// The offset encoded in `$skiptoken` (0 when absent).
    fn offset(&self) -> Result<usize, GraphError> {
        match &self.skiptoken {
            None => Ok(0),
            Some(token) => decode_skiptoken(token).ok_or_else(expired_page_token),
        }
    }
}

fn encode_skiptoken(offset: usize) -> String {
    opaque(&format!("{SKIPTOKEN_PREFIX}{offset}"))
}

fn decode_skiptoken(token: &str) -> Option<usize> {
    parse_digits(unopaque(token)?.strip_prefix(SKIPTOKEN_PREFIX)?)
}

/// Hex of `text`: tokens look opaque (as Graph's do) and need no escaping in a URL.
fn opaque(text: &str) -> String {
    text.bytes().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02X}");
        out
    })
}

fn unopaque(token: &str) -> Option<String> {
    let bytes = token.as_bytes();
    if bytes.is_empty() || !bytes.len().is_multiple_of(2) {
        return None;
    }
    let decoded: Vec<u8> = bytes
        .chunks(2)
        .map(|pair| Some(hex_value(pair[0])? << 4 | hex_value(pair[1])?))
        .collect::<Option<_>>()?;
    String::from_utf8(decoded).ok()
}

/// A non-empty run of ASCII digits as a number (no sign, no spaces).
fn parse_digits<T: std::str::FromStr>(digits: &str) -> Option<T> {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Which entity types a `$select` applies to (for validation and `@odata.context`).
#[derive(Clone, Copy)]
enum SelectTarget {
    Users,
    Groups,
    DirectoryObjects,
}

impl SelectTarget {
    fn type_name(self) -> &'static str {
        match self {
            SelectTarget::Users => "microsoft.graph.user",
            SelectTarget::Groups => "microsoft.graph.group",
            SelectTarget::DirectoryObjects => "microsoft.graph.directoryObject",
        }
    }

    fn known_props(self) -> Vec<&'static str> {
        let user = USER_PROPS.iter().chain(USER_EXTRA_PROPS);
        let group = GROUP_PROPS.iter().chain(GROUP_EXTRA_PROPS);
        match self {
            SelectTarget::Users => user.copied().collect(),
            SelectTarget::Groups => group.copied().collect(),
            SelectTarget::DirectoryObjects => user.chain(group).copied().collect(),
        }
    }
}

/// Parses `$select` into canonical property names (`None` = default properties).
fn parse_select(
    select: Option<&str>,
    target: SelectTarget,
) -> Result<Option<Vec<&'static str>>, GraphError> {
    let Some(select) = select else {
        return Ok(None);
    };
    if select.trim() == "*" {
        return Ok(None);
    }
    let known = target.known_props();
    let mut props: Vec<&'static str> = Vec::new();
    for name in select.split(',').map(str::trim) {
        if name.is_empty() {
            return Err(GraphError::bad_request(format!(
                "Syntax error: character ',' is not valid at position 0 in '{select}'."
            )));
        }
        let Some(canonical) = known.iter().find(|k| k.eq_ignore_ascii_case(name)) else {
            return Err(GraphError::bad_request(format!(
                "Could not find a property named '{name}' on type '{}'.",
                target.type_name()
            )));
        };
        if !props.contains(canonical) {
            props.push(canonical);
        }
    }
    Ok(Some(props))
}

fn context_url(entity_set: &str, select: Option<&[&str]>, suffix: &str) -> String {
    match select {
        Some(props) => format!("{METADATA}#{entity_set}({}){suffix}", props.join(",")),
        None => format!("{METADATA}#{entity_set}{suffix}"),
    }
}

fn render_user(user: &User, select: Option<&[&str]>, with_type: bool) -> Value {
    let mut obj = Map::new();
    if with_type {
        obj.insert("@odata.type".into(), "#microsoft.graph.user".into());
    }
    obj.insert("id".into(), user.id.clone().into());
    let props = select.unwrap_or(USER_PROPS);
    for &prop in props {
        let value = match prop {
            "id" => continue,
            "userPrincipalName" => user.user_principal_name.clone().into(),
            "displayName" => user.display_name.clone().into(),
            "accountEnabled" => user.account_enabled.into(),
            other if USER_EXTRA_PROPS.contains(&other) => Value::Null,
            _ => continue,
        };
        obj.insert(prop.into(), value);
    }
    Value::Object(obj)
}

fn render_group(group: &Group, select: Option<&[&str]>, with_type: bool) -> Value {
    let mut obj = Map::new();
    if with_type {
        obj.insert("@odata.type".into(), "#microsoft.graph.group".into());
    }
    obj.insert("id".into(), group.id.clone().into());
    let props = select.unwrap_or(GROUP_PROPS);
    for &prop in props {
        let value = match prop {
            "id" => continue,
            "displayName" => group.display_name.clone().into(),
            other if GROUP_EXTRA_PROPS.contains(&other) => Value::Null,
            _ => continue,
        };
        obj.insert(prop.into(), value);
    }
    Value::Object(obj)
}

/// Everything needed to cut a collection into pages.
struct Pager<'a> {
    base_url: &'a str,
    raw_path: &'a str,
    opts: &'a QueryOptions,
    cap: usize,
}

impl Pager<'_> {
    fn page(&self, context: String, items: Vec<Value>) -> Result<Value, GraphError> {
        let offset = self.opts.offset()?;
        let size = self
            .opts
            .top
            .unwrap_or(DEFAULT_PAGE_SIZE)
            .min(self.cap)
            .max(1);
        let total = items.len();
        let start = offset.min(total);
        let end = start.saturating_add(size).min(total);
        let mut body = Map::new();
        body.insert("@odata.context".into(), context.into());
        if self.opts.count && self.opts.skiptoken.is_none() {
            body.insert("@odata.count".into(), total.into());
        }
        if end < total {
            let mut link = format!("{}{}?", self.base_url, self.raw_path);
            for piece in &self.opts.passthrough {
                link.push_str(piece);
                link.push('&');
            }
            link.push_str("$skiptoken=");
            link.push_str(&encode_skiptoken(end));
            body.insert("@odata.nextLink".into(), link.into());
        }
        let page: Vec<Value> = items.into_iter().skip(start).take(end - start).collect();
        body.insert("value".into(), Value::Array(page));
        Ok(Value::Object(body))
    }
}

fn serve_graph(
    state: &mut ServerState,
    base_url: &str,
    route: &GraphRoute<'_>,
    raw_path: &str,
    opts: &QueryOptions,
    ctx: &Ctx,
) -> Result<Value, GraphError> {
    if opts.deltatoken.is_some() && !matches!(route, GraphRoute::Delta(_)) {
        return Err(GraphError::unsupported(
            "$deltatoken is only valid on a delta function.",
        ));
    }
    let tenant = &state.tenant;
    let pager = Pager {
        base_url,
        raw_path,
        opts,
        cap: state.page_size_cap,
    };
    match *route {
        GraphRoute::GroupsList => {
            let select = parse_select(opts.select.as_deref(), SelectTarget::Groups)?;
            let groups: Vec<&Group> = match &opts.filter {
                None => tenant.groups.iter().collect(),
                Some(filter) => {
                    let (prop, wanted) = parse_filter(filter)?;
                    let wanted = wanted.to_lowercase();
                    tenant
                        .groups
                        .iter()
                        .filter(|g| {
                            let actual = match prop {
                                FilterProp::DisplayName => &g.display_name,
                                FilterProp::Id => &g.id,
                            };
                            actual.to_lowercase() == wanted
                        })
                        .collect()
                }
            };
            let items = groups
                .into_iter()
                .map(|g| render_group(g, select.as_deref(), false))
                .collect();
            pager.page(context_url("groups", select.as_deref(), ""), items)
        }
        GraphRoute::Group(id) => {
            let select = parse_select(opts.select.as_deref(), SelectTarget::Groups)?;
            let group = tenant.group(id).ok_or_else(|| GraphError::not_found(id))?;
            let mut body = match render_group(group, select.as_deref(), false) {
                Value::Object(map) => map,
                _ => Map::new(),
            };
            body.insert(
                "@odata.context".into(),
                context_url("groups", select.as_deref(), "/$entity").into(),
            );
            Ok(Value::Object(body))
        }
        GraphRoute::Members {
            group,
            transitive,
            cast,
        } => {
            if opts.filter.is_some() {
                return Err(GraphError::unsupported(
                    "$filter on membership collections is not supported by this fake Graph server.",
                ));
            }
            let (target, entity_set) = match cast {
                None => (SelectTarget::DirectoryObjects, "directoryObjects"),
                Some(Cast::User) => (SelectTarget::Users, "users"),
                Some(Cast::Group) => (SelectTarget::Groups, "groups"),
            };
            let select = parse_select(opts.select.as_deref(), target)?;
            let group = tenant
                .group(group)
                .ok_or_else(|| GraphError::not_found(group))?;
            let members = if transitive {
                tenant.transitive_members(group)
            } else {
                tenant.direct_members(group)
            };
            let items = members
                .into_iter()
                .filter_map(|m| match (m, cast) {
                    (Member::User(u), None | Some(Cast::User)) => {
                        Some(render_user(u, select.as_deref(), true))
                    }
                    (Member::Group(g), None | Some(Cast::Group)) => {
                        Some(render_group(g, select.as_deref(), true))
                    }
                    _ => None,
                })
                .collect();
            pager.page(context_url(entity_set, select.as_deref(), ""), items)
        }
        // The only route that changes the state: a round stores the tenant it started from.
        GraphRoute::Delta(kind) => serve_delta(state, base_url, kind, raw_path, opts, ctx),
    }
}

// ---------------------------------------------------------------------------------------------
// Delta
// ---------------------------------------------------------------------------------------------

fn expired_page_token() -> GraphError {
    GraphError::new(
        StatusCode::BAD_REQUEST,
        "Directory_ExpiredPageToken",
        "The specified page token value has expired and can no longer be included in your request.",
    )
}

fn sync_state_not_found() -> GraphError {
    GraphError::new(
        StatusCode::GONE,
        "syncStateNotFound",
        "The sync state of this delta token is not found or has expired; start a new delta round without a token.",
    )
}

/// The `odata.maxpagesize` of the request's `Prefer` header(s), if any (a malformed value is
/// ignored: preferences are hints).
fn prefer_max_page_size(headers: &HeaderMap) -> Option<usize> {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|pref| {
            let (name, value) = pref.split_once('=')?;
            if !name.trim().eq_ignore_ascii_case("odata.maxpagesize") {
                return None;
            }
            parse_digits(value.trim().trim_matches('"'))
        })
}

/// A nextLink of a delta round: the state it diffs from (`None`: a full round), the state it
/// diffs to, and the offset in the round's change list.
fn encode_delta_skiptoken(from: Option<u64>, to: u64, offset: usize) -> String {
    let from = from.map_or_else(|| "-".to_owned(), |f| f.to_string());
    opaque(&format!("{DELTA_SKIPTOKEN_PREFIX}{from}:{to}:{offset}"))
}

fn decode_delta_skiptoken(token: &str) -> Option<(Option<u64>, u64, usize)> {
    let text = unopaque(token)?;
    let mut parts = text.strip_prefix(DELTA_SKIPTOKEN_PREFIX)?.split(':');
    let from = match parts.next()? {
        "-" => None,
        f => Some(parse_digits(f)?),
    };
    let to = parse_digits(parts.next()?)?;
    let offset = parse_digits(parts.next()?)?;
    parts.next().is_none().then_some((from, to, offset))
}

fn encode_deltatoken(state: u64) -> String {
    opaque(&format!("{DELTATOKEN_PREFIX}{state}"))
}

fn decode_deltatoken(token: &str) -> Option<u64> {
    parse_digits(unopaque(token)?.strip_prefix(DELTATOKEN_PREFIX)?)
}

/// A delta round's `$select`: the selected properties (`None`: the defaults) and, for groups,
/// whether `members` was selected (answered as `members@delta`).
struct DeltaSelect {
    props: Option<Vec<&'static str>>,
    members: bool,
}

impl DeltaSelect {
    fn parse(select: Option<&str>, kind: DeltaKind) -> Result<DeltaSelect, GraphError> {
        let Some(select) = select else {
            return Ok(DeltaSelect {
                props: None,
                members: false,
            });
        };
        let (members, rest): (Vec<&str>, Vec<&str>) = select.split(',').partition(|name| {
            kind == DeltaKind::Groups && name.trim().eq_ignore_ascii_case("members")
        });
        let target = match kind {
            DeltaKind::Groups => SelectTarget::Groups,
            DeltaKind::Users => SelectTarget::Users,
        };
        let props = if rest.is_empty() {
            Some(Vec::new())
        } else {
            parse_select(Some(&rest.join(",")), target)?
        };
        Ok(DeltaSelect {
            props,
            members: !members.is_empty(),
        })
    }

    fn context(&self, kind: DeltaKind) -> String {
        let (entity_set, defaults) = match kind {
            DeltaKind::Groups => ("groups", GROUP_PROPS),
            DeltaKind::Users => ("users", USER_PROPS),
        };
        if self.props.is_none() && !self.members {
            return context_url(entity_set, None, "");
        }
        let mut names: Vec<&str> = self.props.clone().unwrap_or_else(|| defaults.to_vec());
        if self.members {
            names.push("members");
        }
        context_url(entity_set, Some(&names), "")
    }
}

/// `{"id", "@removed": {"reason": "deleted"}}`, for a deleted object.
fn removed_object(id: &str) -> Value {
    json!({"id": id, "@removed": {"reason": "deleted"}})
}

/// A group's direct members as `(id, @odata.type)`, deduplicated, in `members` order, ids
/// naming nothing skipped.
fn member_refs<'a>(
    index: &HashMap<&str, Member<'a>>,
    group: &'a Group,
) -> Vec<(&'a str, &'static str)> {
    let mut seen = HashSet::new();
    group
        .members
        .iter()
        .filter(|id| seen.insert(id.as_str()))
        .filter_map(|id| {
            let odata_type = match index.get(id.as_str())? {
                Member::User(_) => "#microsoft.graph.user",
                Member::Group(_) => "#microsoft.graph.group",
            };
            Some((id.as_str(), odata_type))
        })
        .collect()
}

/// Every change of a round from `old` (`None`: a full round, every object) to `new`: new or
/// changed objects in tenant order with their selected properties, then deleted ones.
fn delta_values(
    kind: DeltaKind,
    select: &DeltaSelect,
    old: Option<&Tenant>,
    new: &Tenant,
) -> Vec<Value> {
    match kind {
        DeltaKind::Groups => group_delta_values(select, old, new),
        DeltaKind::Users => user_delta_values(select, old, new),
    }
}

/// Groups: a group is reported when a selected property changed or (with `members`) its
/// direct members did; `members@delta` holds only the members that joined or left (every
/// member for a group new to the round), split over several objects beyond
/// [`DELTA_MEMBERS_PER_OBJECT`].
fn group_delta_values(select: &DeltaSelect, old: Option<&Tenant>, new: &Tenant) -> Vec<Value> {
    let props = select.props.as_deref();
    let new_index = new.index();
    let old_index = old.map(Tenant::index).unwrap_or_default();
    let old_groups: HashMap<&str, &Group> = old
        .map(|t| t.groups.iter().map(|g| (g.id.as_str(), g)).collect())
        .unwrap_or_default();
    let mut present = HashSet::new();
    let mut out = Vec::new();
    for group in &new.groups {
        present.insert(group.id.as_str());
        let before = old_groups.get(group.id.as_str()).copied();
        let rendered = render_group(group, props, false);
        let changed = before.is_none_or(|b| render_group(b, props, false) != rendered);
        let mut members = Vec::new();
        if select.members {
            let now = member_refs(&new_index, group);
            let then = before
                .map(|b| member_refs(&old_index, b))
                .unwrap_or_default();
            let now_ids: HashSet<&str> = now.iter().map(|(id, _)| *id).collect();
            let then_ids: HashSet<&str> = then.iter().map(|(id, _)| *id).collect();
            members.extend(
                now.iter()
                    .filter(|(id, _)| !then_ids.contains(id))
                    .map(|(id, t)| json!({"@odata.type": t, "id": id})),
            );
            members.extend(then.iter().filter(|(id, _)| !now_ids.contains(id)).map(
                |(id, t)| json!({"@odata.type": t, "id": id, "@removed": {"reason": "deleted"}}),
            ));
        }
        if !changed && members.is_empty() {
            continue;
        }
        let Value::Object(mut first) = rendered else {
            continue;
        };
        if !select.members {
            out.push(Value::Object(first));
            continue;
        }
        let mut chunks = members.chunks(DELTA_MEMBERS_PER_OBJECT);
        let head = chunks.next().map_or_else(Vec::new, <[Value]>::to_vec);
        first.insert("members@delta".into(), Value::Array(head));
        out.push(Value::Object(first));
        out.extend(chunks.map(|chunk| json!({"id": group.id, "members@delta": chunk})));
    }
    if let Some(old) = old {
        out.extend(
            old.groups
                .iter()
                .filter(|g| !present.contains(g.id.as_str()))
                .map(|g| removed_object(&g.id)),
        );
    }
    out
}

/// Users: a user is reported with its selected properties when any of them changed.
fn user_delta_values(select: &DeltaSelect, old: Option<&Tenant>, new: &Tenant) -> Vec<Value> {
    let props = select.props.as_deref();
    let old_users: HashMap<&str, &User> = old
        .map(|t| t.users.iter().map(|u| (u.id.as_str(), u)).collect())
        .unwrap_or_default();
    let mut present = HashSet::new();
    let mut out = Vec::new();
    for user in &new.users {
        present.insert(user.id.as_str());
        let rendered = render_user(user, props, false);
        let unchanged = old_users
            .get(user.id.as_str())
            .is_some_and(|b| render_user(b, props, false) == rendered);
        if !unchanged {
            out.push(rendered);
        }
    }
    if let Some(old) = old {
        out.extend(
            old.users
                .iter()
                .filter(|u| !present.contains(u.id.as_str()))
                .map(|u| removed_object(&u.id)),
        );
    }
    out
}

/// One page of a delta round. Without `$skiptoken` a round starts: the current tenant is
/// stored as its state (its deltaLink will name it) and diffed against the `$deltatoken`'s
/// state, or reported whole. Every page recomputes that same diff between two stored states,
/// so paging is stable while tests change the tenant mid-round.
fn serve_delta(
    state: &mut ServerState,
    base_url: &str,
    kind: DeltaKind,
    raw_path: &str,
    opts: &QueryOptions,
    ctx: &Ctx,
) -> Result<Value, GraphError> {
    if opts.filter.is_some() || opts.top.is_some() || opts.count {
        return Err(GraphError::unsupported(
            "$filter, $top and $count on delta are not supported by this fake Graph server; page with Prefer: odata.maxpagesize.",
        ));
    }
    let (from, to, offset) = match (&opts.skiptoken, &opts.deltatoken) {
        (Some(_), Some(_)) => {
            return Err(GraphError::bad_request(
                "$skiptoken and $deltatoken cannot be combined.",
            ))
        }
        (Some(skip), None) => decode_delta_skiptoken(skip).ok_or_else(expired_page_token)?,
        (None, token) => {
            let from = token
                .as_deref()
                .map(|t| decode_deltatoken(t).ok_or_else(sync_state_not_found))
                .transpose()?;
            // Graph keeps the `$select` with the token: a deltaLink round selects as before.
            let select = match from {
                None => opts.select.clone(),
                Some(id) => state.delta_state(id, kind)?.select.clone(),
            };
            DeltaSelect::parse(select.as_deref(), kind)?;
            (from, state.push_delta_state(kind, select), 0)
        }
    };
    let to_state = state.delta_state(to, kind)?;
    let old = from
        .map(|id| state.delta_state(id, kind).map(|s| Arc::clone(&s.tenant)))
        .transpose()?;
    let select = DeltaSelect::parse(to_state.select.as_deref(), kind)?;
    let values = delta_values(kind, &select, old.as_deref(), &to_state.tenant);
    let cap = match kind {
        DeltaKind::Groups => GROUP_DELTA_PAGE_SIZE,
        DeltaKind::Users => USER_DELTA_PAGE_SIZE,
    };
    let size = ctx
        .max_page_size
        .unwrap_or(DEFAULT_PAGE_SIZE)
        .min(cap)
        .min(state.page_size_cap)
        .max(1);
    let total = values.len();
    let start = offset.min(total);
    let end = start.saturating_add(size).min(total);
    let mut body = Map::new();
    body.insert("@odata.context".into(), select.context(kind).into());
    if end < total {
        let link = format!(
            "{base_url}{raw_path}?$skiptoken={}",
            encode_delta_skiptoken(from, to, end)
        );
        body.insert("@odata.nextLink".into(), link.into());
    } else {
        let link = format!("{base_url}{raw_path}?$deltatoken={}", encode_deltatoken(to));
        body.insert("@odata.deltaLink".into(), link.into());
    }
    let page: Vec<Value> = values.into_iter().skip(start).take(end - start).collect();
    body.insert("value".into(), Value::Array(page));
    Ok(Value::Object(body))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FilterProp {
    DisplayName,
    Id,
}

/// Parses `displayName eq 'value'` (or `id eq 'value'`); `''` inside the literal is a quote.
fn parse_filter(filter: &str) -> Result<(FilterProp, String), GraphError> {
    let unsupported = || {
        GraphError::unsupported(format!(
            "Unsupported query: '{filter}'. This fake Graph server supports only \"displayName eq '...'\" and \"id eq '...'\"."
        ))
    };
    let rest = filter.trim_start();
    let prop_len = rest
        .find(|c: char| !c.is_ascii_alphanumeric())
        .unwrap_or(rest.len());
    let (prop, rest) = rest.split_at(prop_len);
    let prop = if prop.eq_ignore_ascii_case("displayName") {
        FilterProp::DisplayName
    } else if prop.eq_ignore_ascii_case("id") {
        FilterProp::Id
    } else {
        return Err(unsupported());
    };
    let after_ws = rest.trim_start();
    if after_ws.len() == rest.len() {
        return Err(unsupported());
    }
    let Some(op_rest) = after_ws
        .get(..2)
        .filter(|op| op.eq_ignore_ascii_case("eq"))
        .map(|_| &after_ws[2..])
    else {
        return Err(unsupported());
    };
    let literal = op_rest.trim_start();
    if literal.len() == op_rest.len() {
        return Err(unsupported());
    }
    let Some(mut chars) = literal.strip_prefix('\'').map(|l| l.chars().peekable()) else {
        return Err(unsupported());
    };
    let mut value = String::new();
    loop {
        match chars.next() {
            None => return Err(unsupported()),
            Some('\'') if chars.peek() == Some(&'\'') => {
                chars.next();
                value.push('\'');
            }
            Some('\'') => break,
            Some(c) => value.push(c),
        }
    }
    if chars.any(|c| !c.is_whitespace()) {
        return Err(unsupported());
    }
    Ok((prop, value))
}

// ---------------------------------------------------------------------------------------------
// Small utilities
// ---------------------------------------------------------------------------------------------

/// One `key=value` piece of a query string or form body.
#[derive(Debug)]
struct Pair {
    /// The piece exactly as received (still percent-encoded).
    raw: String,
    key: String,
    value: String,
}

/// Parses `application/x-www-form-urlencoded` data; `None` if a key or value is not UTF-8.
fn parse_pairs(raw: &str) -> Option<Vec<Pair>> {
    raw.split('&')
        .filter(|piece| !piece.is_empty())
        .map(|piece| {
            let (key, value) = piece.split_once('=').unwrap_or((piece, ""));
            Some(Pair {
                raw: piece.to_owned(),
                key: String::from_utf8(percent_decode(key, true)).ok()?,
                value: String::from_utf8(percent_decode(value, true)).ok()?,
            })
        })
        .collect()
}

/// Decoded `path?query` for recording and fault matching, with secrets redacted.
fn decoded_path_and_query(raw_path: &str, raw_query: &str) -> String {
    let mut out = String::from_utf8_lossy(&percent_decode(raw_path, false)).into_owned();
    let mut first = true;
    for piece in raw_query.split('&').filter(|p| !p.is_empty()) {
        out.push(if first { '?' } else { '&' });
        first = false;
        let (key, value) = match piece.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (piece, None),
        };
        let key = String::from_utf8_lossy(&percent_decode(key, true)).into_owned();
        out.push_str(&key);
        if let Some(value) = value {
            out.push('=');
            if ["client_secret", "access_token", "client_assertion"].contains(&key.as_str()) {
                out.push_str("[redacted]");
            } else {
                out.push_str(&String::from_utf8_lossy(&percent_decode(value, true)));
            }
        }
    }
    out
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-decodes `input`; invalid escapes are kept literally. `plus_as_space` for queries.
fn percent_decode(input: &str, plus_as_space: bool) -> Vec<u8> {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match (hex_value(bytes[i + 1]), hex_value(bytes[i + 2])) {
                    (Some(hi), Some(lo)) => {
                        out.push(hi << 4 | lo);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' if plus_as_space => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    out
}

fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    RandomState::new().hash_one((COUNTER.fetch_add(1, Ordering::Relaxed), nanos))
}

/// A random version-4-looking UUID string.
fn new_uuid() -> String {
    let (a, b) = (random_u64(), random_u64());
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0x0fff,
        (b >> 48) & 0x3fff | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

/// Current UTC time as (year, month, day, hour, minute, second).
fn utc_now() -> (i64, u32, u32, u64, u64, u64) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day, rem / 3600, rem / 60 % 60, rem % 60)
}

/// `2024-05-01T12:34:56` (Graph `innerError.date`).
fn timestamp_iso() -> String {
    let (y, mo, d, h, mi, s) = utc_now();
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}")
}

/// `2024-05-01 12:34:56Z` (identity platform `timestamp`).
fn timestamp_aad() -> String {
    let (y, mo, d, h, mi, s) = utc_now();
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    const TENANT_ID: &str = "11111111-2222-3333-4444-555555555555";
    const CLIENT_ID: &str = "client-abc";
    const SECRET: &str = "s3cret-value";

    fn user(id: &str, upn: &str, name: &str) -> User {
        User {
            id: id.into(),
            user_principal_name: upn.into(),
            display_name: name.into(),
            account_enabled: true,
        }
    }

    fn group(id: &str, name: &str, members: &[&str]) -> Group {
        Group {
            id: id.into(),
            display_name: name.into(),
            members: members.iter().map(|m| m.to_string()).collect(),
        }
    }

    fn fixture() -> Tenant {
        let mut eve = user("u5", "eve@example.com", "Eve");
        eve.account_enabled = false;
        Tenant {
            tenant_id: TENANT_ID.into(),
            client_id: CLIENT_ID.into(),
            client_secret: SECRET.into(),
            users: vec![
                user("u1", "alice@example.com", "Alice"),
                user("u2", "bob@example.com", "Bob"),
                user("u3", "carol@example.com", "Carol"),
                user("u4", "dan@example.com", "Dan"),
                eve,
            ],
            groups: vec![
                // Three nested levels with a cycle back to the top and a dangling member.
                group("g-eng", "Engineering", &["u1", "g-backend", "ghost"]),
                group("g-backend", "Backend", &["u2", "g-db"]),
                group("g-db", "Database", &["u3", "g-eng", "u1"]),
                group("g-quote", "O'Brien's Team", &["u4"]),
                group("g-adm1", "Admins", &["u1"]),
                group("g-adm2", "admins", &["u2"]),
                group("g-all", "Everyone", &["u1", "u2", "u3", "u4", "u5"]),
            ],
        }
    }

    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("client")
    }

    fn token_form(secret: &str) -> Vec<(&'static str, String)> {
        vec![
            ("grant_type", "client_credentials".into()),
            ("client_id", CLIENT_ID.into()),
            ("client_secret", secret.into()),
            ("scope", GRAPH_DEFAULT_SCOPE.into()),
        ]
    }

    async fn post_token(
        fg: &FakeGraph,
        form: &[(&'static str, String)],
    ) -> (reqwest::StatusCode, Value) {
        let resp = client()
            .post(fg.token_url())
            .form(form)
            .send()
            .await
            .expect("token request");
        let status = resp.status();
        (status, resp.json().await.expect("token json"))
    }

    async fn token(fg: &FakeGraph) -> String {
        let (status, body) = post_token(fg, &token_form(SECRET)).await;
        assert_eq!(status, 200, "{body}");
        body["access_token"]
            .as_str()
            .expect("access_token")
            .to_owned()
    }

    async fn get(url: &str, token: Option<&str>) -> (reqwest::StatusCode, HeaderMap, Value) {
        let mut req = client().get(url);
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await.expect("graph request");
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.expect("body");
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, headers, body)
    }

    fn ids(body: &Value) -> Vec<String> {
        body["value"]
            .as_array()
            .expect("value array")
            .iter()
            .map(|v| v["id"].as_str().expect("id").to_owned())
            .collect()
    }

    /// Follows nextLinks, returning every page.
    async fn all_pages(first_url: &str, token: &str) -> Vec<Value> {
        let mut pages = Vec::new();
        let mut url = first_url.to_owned();
        loop {
            let (status, _, body) = get(&url, Some(token)).await;
            assert_eq!(status, 200, "{url}: {body}");
            let next = body["@odata.nextLink"].as_str().map(str::to_owned);
            pages.push(body);
            match next {
                Some(next) => url = next,
                None => return pages,
            }
            assert!(pages.len() < 50, "paging does not terminate");
        }
    }

    #[tokio::test]
    async fn token_ok_returns_bearer_token() {
        let fg = FakeGraph::start(fixture()).await.unwrap();
        let (status, body) = post_token(&fg, &token_form(SECRET)).await;
        assert_eq!(status, 200);
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["expires_in"], 3599);
        assert_eq!(body["ext_expires_in"], 3599);
        let token = body["access_token"].as_str().unwrap();
        assert!(token.starts_with("fake-graph-token-"), "{token}");
        assert_eq!(fg.issued_tokens(), vec![token.to_owned()]);
        let second = self::token(&fg).await;
        assert_ne!(second, token, "tokens are random");
        assert_eq!(fg.login_url(), fg.base_url());
        assert_eq!(fg.graph_url(), format!("{}/v1.0", fg.base_url()));
    }

    #[tokio::test]
    async fn token_wrong_secret_is_invalid_client() {
        let fg = FakeGraph::start(fixture()).await.unwrap();
        let (status, body) = post_token(&fg, &token_form("wrong")).await;
        assert_eq!(status, 401);
        assert_eq!(body["error"], "invalid_client");
        assert_eq!(body["error_codes"], json!([7000215]));
        let description = body["error_description"].as_str().unwrap();
        assert!(
            description.starts_with("AADSTS7000215: Invalid client secret provided."),
            "{description}"
        );
        assert!(body["trace_id"].is_string() && body["correlation_id"].is_string());
        assert!(body["timestamp"].as_str().unwrap().ends_with('Z'));
        assert!(fg.issued_tokens().is_empty());
    }

    #[tokio::test]
    async fn token_errors_use_identity_platform_codes() {
        let fg = FakeGraph::start(fixture()).await.unwrap();
        let mut form = token_form(SECRET);
        form[1].1 = "other-client".into();
        let (status, body) = post_token(&fg, &form).await;
        assert_eq!(
            (status.as_u16(), body["error"].as_str()),
            (400, Some("unauthorized_client"))
        );

        let mut form = token_form(SECRET);
        form[3].1 = "https://graph.microsoft.com/User.Read".into();
        let (status, body) = post_token(&fg, &form).await;
        assert_eq!(
            (status.as_u16(), body["error"].as_str()),
            (400, Some("invalid_scope"))
        );

        let form = token_form(SECRET)[1..].to_vec();
        let (status, body) = post_token(&fg, &form).await;
        assert_eq!(
            (status.as_u16(), body["error"].as_str()),
            (400, Some("invalid_request"))
        );
        assert_eq!(body["error_codes"], json!([900144]));

        let resp = client()
            .post(format!("{}/other-tenant/oauth2/v2.0/token", fg.base_url()))
            .form(&token_form(SECRET))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error_codes"], json!([90002]));

        let resp = client().get(fg.token_url()).send().await.unwrap();
        assert_eq!(resp.status(), 405);
        assert!(fg.issued_tokens().is_empty());
    }

    #[tokio::test]
    async fn missing_or_unknown_bearer_is_401() {
        let fg = FakeGraph::start(fixture()).await.unwrap();
        let url = format!("{}/groups/g-eng", fg.graph_url());
        let (status, headers, body) = get(&url, None).await;
        assert_eq!(status, 401);
        assert_eq!(body["error"]["code"], "InvalidAuthenticationToken");
        assert_eq!(body["error"]["message"], "Access token is empty.");
        assert!(body["error"]["innerError"]["request-id"].is_string());
        assert!(body["error"]["innerError"]["date"].is_string());
        assert!(headers.contains_key(header::WWW_AUTHENTICATE));

        let (status, _, body) = get(&url, Some("not-issued")).await;
        assert_eq!(status, 401);
        assert_eq!(body["error"]["code"], "InvalidAuthenticationToken");

        let token = token(&fg).await;
        let (status, _, _) = get(&url, Some(&token)).await;
        assert_eq!(status, 200);
        fg.revoke_tokens();
        let (status, _, _) = get(&url, Some(&token)).await;
        assert_eq!(status, 401);
        assert_eq!(fg.issued_tokens(), vec![token]);
    }

    #[tokio::test]
    async fn filter_by_display_name_handles_escaped_quote_and_duplicates() {
        let fg = FakeGraph::start(fixture()).await.unwrap();
        let token = token(&fg).await;
        let url = reqwest::Url::parse_with_params(
            &format!("{}/groups", fg.graph_url()),
            &[
                ("$filter", "displayName eq 'O''Brien''s Team'"),
                ("$select", "id,displayName"),
            ],
        )
        .unwrap();
        let (status, headers, body) = get(url.as_str(), Some(&token)).await;
        assert_eq!(status, 200, "{body}");
        assert!(headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("application/json"));
        assert_eq!(
            body,
            json!({
                "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#groups(id,displayName)",
                "value": [{"id": "g-quote", "displayName": "O'Brien's Team"}]
            })
        );

        // Percent-encoded by hand, case-insensitive match, two groups with the same name.
        let url = format!(
            "{}/groups?$filter=displayName%20eq%20%27ADMINS%27&$select=id,displayName&$top=5",
            fg.graph_url()
        );
        let (status, _, body) = get(&url, Some(&token)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(ids(&body), vec!["g-adm1", "g-adm2"]);
        assert_eq!(body["value"][1]["displayName"], "admins");

        let url = format!("{}/groups?$filter=displayName eq 'Nope'", fg.graph_url());
        let (_, _, body) = get(&url, Some(&token)).await;
        assert_eq!(body["value"], json!([]));
    }

    #[tokio::test]
    async fn unsupported_filter_is_400() {
        let fg = FakeGraph::start(fixture()).await.unwrap();
        let token = token(&fg).await;
        for filter in [
            "startswith(displayName,'Eng')",
            "displayName eq 'unterminated",
            "displayName ne 'Engineering'",
            "mail eq 'x'",
            "displayName eq 'Engineering' or displayName eq 'Backend'",
        ] {
            let url = reqwest::Url::parse_with_params(
                &format!("{}/groups", fg.graph_url()),
                &[("$filter", filter)],
            )
            .unwrap();
            let (status, _, body) = get(url.as_str(), Some(&token)).await;
            assert_eq!(status, 400, "{filter}");
            assert_eq!(
                body["error"]["code"], "Request_UnsupportedQuery",
                "{filter}"
            );
        }
    }

    #[tokio::test]
    async fn get_group_and_unknown_group_404_shape() {
        let fg = FakeGraph::start(fixture()).await.unwrap();
        let token = token(&fg).await;
        let (status, _, body) = get(
            &format!("{}/groups/g-db?$select=id,displayName", fg.graph_url()),
            Some(&token),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(body["id"], "g-db");
        assert_eq!(body["displayName"], "Database");
        assert_eq!(
            body["@odata.context"],
            "https://graph.microsoft.com/v1.0/$metadata#groups(id,displayName)/$entity"
        );

        for path in [
            "groups/nope",
            "groups/nope/members",
            "groups/nope/transitiveMembers/microsoft.graph.user",
        ] {
            let (status, _, body) = get(&format!("{}/{path}", fg.graph_url()), Some(&token)).await;
            assert_eq!(status, 404, "{path}");
            assert_eq!(body["error"]["code"], "Request_ResourceNotFound");
            assert_eq!(
                body["error"]["message"],
                "Resource 'nope' does not exist or one of its queried reference-property objects are not present."
            );
            assert!(body["error"]["innerError"]["request-id"].is_string());
        }
    }

    #[tokio::test]
    async fn unknown_path_is_404_and_wrong_method_405() {
        let fg = FakeGraph::start(fixture()).await.unwrap();
        let token = token(&fg).await;
        let (status, _, body) = get(&format!("{}/users", fg.graph_url()), Some(&token)).await;
        assert_eq!(status, 404);
        assert_eq!(body["error"]["code"], "BadRequest");
        let (status, _, _) = get(&format!("{}/nothing", fg.base_url()), None).await;
        assert_eq!(status, 404);
        let resp = client()
            .delete(format!("{}/groups/g-eng", fg.graph_url()))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 405);
        assert_eq!(resp.headers()[header::ALLOW], "GET");
    }

    #[tokio::test]
    async fn paging_with_cap_two_collects_five_users_once() {
        let fg = FakeGraph::start(fixture()).await.unwrap();
        fg.set_page_size_cap(2);
        let token = token(&fg).await;
        let first = format!(
            "{}/groups/g-all/members/microsoft.graph.user?$select=id,userPrincipalName&$top=999&$count=true",
            fg.graph_url()
        );
        let pages = all_pages(&first, &token).await;
        assert_eq!(pages.len(), 3);
        assert_eq!(
            pages
                .iter()
                .map(|p| p["value"].as_array().unwrap().len())
                .collect::<Vec<_>>(),
            vec![2, 2, 1]
        );
        assert_eq!(pages[0]["@odata.count"], 5);
        assert!(pages[1].get("@odata.count").is_none());
        assert!(pages[2].get("@odata.nextLink").is_none());
        let next = pages[0]["@odata.nextLink"].as_str().unwrap();
        assert!(
            next.starts_with(&format!(
                "{}/v1.0/groups/g-all/members/microsoft.graph.user?$select=id,userPrincipalName&$top=999&$count=true&$skiptoken=",
                fg.base_url()
            )),
            "{next}"
        );
        let all: Vec<String> = pages.iter().flat_map(ids).collect();
        assert_eq!(all, vec!["u1", "u2", "u3", "u4", "u5"]);
        let eve = &pages[2]["value"][0];
        assert_eq!(
            *eve,
            json!({"@odata.type": "#microsoft.graph.user", "id": "u5", "userPrincipalName": "eve@example.com"})
        );

        // Without a cap, $top decides the page size; default is 100.
        fg.set_page_size_cap(999);
        let pages = all_pages(
            &format!("{}/groups/g-all/members?$top=3", fg.graph_url()),
            &token,
        )
        .await;
        assert_eq!(pages.len(), 2);
        let pages = all_pages(&format!("{}/groups/g-all/members", fg.graph_url()), &token).await;
        assert_eq!(pages.len(), 1);
        assert_eq!(ids(&pages[0]).len(), 5);
    }

    #[tokio::test]
    async fn invalid_top_and_malformed_skiptoken_are_400() {
        let fg = FakeGraph::start(fixture()).await.unwrap();
        let token = token(&fg).await;
        for query in [
            "$top=0",
            "$top=1000",
            "$top=abc",
            "$top=-1",
            "$top=2&$top=3",
            "$count=maybe",
            "$select=id,nosuch",
        ] {
            let url = format!("{}/groups/g-all/members?{query}", fg.graph_url());
            let (status, _, body) = get(&url, Some(&token)).await;
            assert_eq!(status, 400, "{query}: {body}");
            assert_eq!(body["error"]["code"], "Request_BadRequest", "{query}");
        }
        for token_value in ["zz", "ABC", "", "00", &encode_skiptoken(1)[2..]] {
            let url = format!(
                "{}/groups/g-all/members?$skiptoken={token_value}",
                fg.graph_url()
            );
            let (status, _, body) = get(&url, Some(&token)).await;
            assert_eq!(status, 400, "{token_value}: {body}");
            assert_eq!(body["error"]["code"], "Directory_ExpiredPageToken");
        }
        assert_eq!(decode_skiptoken(&encode_skiptoken(42)), Some(42));
    }

    #[tokio::test]
    async fn transitive_members_through_three_levels_with_cycle() {
        let fg = FakeGraph::start(fixture()).await.unwrap();
        let token = token(&fg).await;
        let (status, _, body) = get(
            &format!("{}/groups/g-eng/transitiveMembers", fg.graph_url()),
            Some(&token),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        // BFS order, each object once, the start group excluded, the dangling id skipped.
        assert_eq!(ids(&body), vec!["u1", "g-backend", "u2", "g-db", "u3"]);
        assert_eq!(body["value"][1]["@odata.type"], "#microsoft.graph.group");
        assert_eq!(
            body["value"][0],
            json!({
                "@odata.type": "#microsoft.graph.user",
                "id": "u1",
                "userPrincipalName": "alice@example.com",
                "displayName": "Alice",
                "accountEnabled": true
            })
        );
        assert_eq!(
            body["@odata.context"],
            "https://graph.microsoft.com/v1.0/$metadata#directoryObjects"
        );

        let (_, _, body) = get(
            &format!("{}/groups/g-eng/members", fg.graph_url()),
            Some(&token),
        )
        .await;
        assert_eq!(ids(&body), vec!["u1", "g-backend"]);

        let tenant = fg.tenant();
        let users: Vec<&str> = tenant
            .transitive_users("g-db")
            .iter()
            .map(|u| u.id.as_str())
            .collect();
        assert_eq!(users, vec!["u3", "u1", "u2"]);
        assert!(tenant.transitive_users("nope").is_empty());
    }

    #[tokio::test]
    async fn user_cast_excludes_groups_and_group_cast_excludes_users() {
        let fg = FakeGraph::start(fixture()).await.unwrap();
        let token = token(&fg).await;
        let url = format!(
            "{}/groups/g-eng/transitiveMembers/microsoft.graph.user?$select=id,displayName",
            fg.graph_url()
        );
        let (status, _, body) = get(&url, Some(&token)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(ids(&body), vec!["u1", "u2", "u3"]);
        assert!(body["value"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["@odata.type"] == "#microsoft.graph.user"
                && v.get("userPrincipalName").is_none()));
        assert_eq!(
            body["@odata.context"],
            "https://graph.microsoft.com/v1.0/$metadata#users(id,displayName)"
        );

        let (_, _, body) = get(
            &format!(
                "{}/groups/g-eng/members/microsoft.graph.user",
                fg.graph_url()
            ),
            Some(&token),
        )
        .await;
        assert_eq!(ids(&body), vec!["u1"]);

        let (_, _, body) = get(
            &format!(
                "{}/groups/g-eng/transitiveMembers/microsoft.graph.group",
                fg.graph_url()
            ),
            Some(&token),
        )
        .await;
        assert_eq!(ids(&body), vec!["g-backend", "g-db"]);
        assert_eq!(
            body["value"][0],
            json!({"@odata.type": "#microsoft.graph.group", "id": "g-backend", "displayName": "Backend"})
        );
    }

    #[tokio::test]
    async fn injected_429_with_retry_after_once_then_success() {
        let fg = FakeGraph::start(fixture()).await.unwrap();
        let token = token(&fg).await;
        fg.inject(
            Fault::new("/transitiveMembers", 429)
                .retry_after(7)
                .times(1),
        );
        let url = format!("{}/groups/g-eng/transitiveMembers", fg.graph_url());
        let (status, headers, body) = get(&url, Some(&token)).await;
        assert_eq!(status, 429);
        assert_eq!(headers[header::RETRY_AFTER], "7");
        assert_eq!(body["error"]["code"], "TooManyRequests");
        assert_eq!(body["error"]["message"], "Too many requests");
        let (status, headers, body) = get(&url, Some(&token)).await;
        assert_eq!(status, 200, "{body}");
        assert!(!headers.contains_key(header::RETRY_AFTER));
        assert_eq!(ids(&body).len(), 5);
        // Other paths were never affected.
        let (status, _, _) = get(&format!("{}/groups/g-eng", fg.graph_url()), Some(&token)).await;
        assert_eq!(status, 200);
    }

    #[tokio::test]
    async fn skip_one_fails_only_the_second_page() {
        let fg = FakeGraph::start(fixture()).await.unwrap();
        fg.set_page_size_cap(2);
        let token = token(&fg).await;
        fg.inject(Fault {
            path_contains: "/members".into(),
            status: 503,
            retry_after: None,
            times: Some(1),
            skip: 1,
            body: None,
        });
        let (status, _, first) = get(
            &format!("{}/groups/g-all/members", fg.graph_url()),
            Some(&token),
        )
        .await;
        assert_eq!(status, 200);
        let second_url = first["@odata.nextLink"].as_str().unwrap().to_owned();
        let (status, _, body) = get(&second_url, Some(&token)).await;
        assert_eq!(status, 503);
        assert_eq!(body["error"]["code"], "ServiceUnavailable");
        let (status, _, second) = get(&second_url, Some(&token)).await;
        assert_eq!(status, 200);
        let third_url = second["@odata.nextLink"].as_str().unwrap().to_owned();
        let (status, _, third) = get(&third_url, Some(&token)).await;
        assert_eq!(status, 200);
        assert_eq!(ids(&third), vec!["u5"]);
    }

    #[tokio::test]
    async fn faults_match_decoded_skiptoken_and_token_endpoint_with_raw_body() {
        let fg = FakeGraph::start(fixture()).await.unwrap();
        fg.set_page_size_cap(2);
        fg.inject(Fault::new("/oauth2/", 200).body("{\"access_tok").times(1));
        let resp = client()
            .post(fg.token_url())
            .form(&token_form(SECRET))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), "{\"access_tok");
        assert!(fg.issued_tokens().is_empty());
        let token = token(&fg).await;

        fg.inject(Fault::new("$skiptoken", 500));
        let (status, _, first) = get(
            &format!("{}/groups/g-all/members", fg.graph_url()),
            Some(&token),
        )
        .await;
        assert_eq!(status, 200);
        let next = first["@odata.nextLink"]
            .as_str()
            .unwrap()
            .replace('$', "%24");
        let (status, _, body) = get(&next, Some(&token)).await;
        assert_eq!(status, 500);
        assert_eq!(body["error"]["code"], "generalException");
        fg.clear_faults();
        let (status, _, _) = get(&next, Some(&token)).await;
        assert_eq!(status, 200);
    }

    #[tokio::test]
    async fn requests_are_recorded_without_secrets_or_tokens() {
        let fg = FakeGraph::start(fixture()).await.unwrap();
        let token = token(&fg).await;
        let url = format!(
            "{}/groups?$filter=displayName+eq+%27Engineering%27&client_secret=leak",
            fg.graph_url()
        );
        let (status, _, body) = get(&url, Some(&token)).await;
        assert_eq!(status, 200);
        assert_eq!(ids(&body), vec!["g-eng"]);
        let requests = fg.requests();
        assert_eq!(
            requests,
            vec![
                RecordedRequest {
                    method: "POST".into(),
                    path_and_query: format!("/{TENANT_ID}/oauth2/v2.0/token"),
                    had_bearer: false,
                },
                RecordedRequest {
                    method: "GET".into(),
                    path_and_query:
                        "/v1.0/groups?$filter=displayName eq 'Engineering'&client_secret=[redacted]"
                            .into(),
                    had_bearer: true,
                },
            ]
        );
        let dump = format!("{requests:?}");
        assert!(!dump.contains(&token) && !dump.contains(SECRET) && !dump.contains("leak"));
        fg.clear_requests();
        assert!(fg.requests().is_empty());
    }

    #[tokio::test]
    async fn with_tenant_changes_are_served_and_stop_closes_the_port() {
        let fg = FakeGraph::start(fixture()).await.unwrap();
        let token = token(&fg).await;
        let url = format!("{}/groups/g-adm1/members", fg.graph_url());
        let added = fg.with_tenant(|t| {
            t.groups[4].members.push("u4".into());
            t.groups[4].members.len()
        });
        assert_eq!(added, 2);
        let (_, _, body) = get(&url, Some(&token)).await;
        assert_eq!(ids(&body), vec!["u1", "u4"]);
        let base = fg.base_url();
        fg.stop().await;
        assert!(client()
            .get(format!("{base}/v1.0/groups"))
            .send()
            .await
            .is_err());
    }

    #[test]
    fn tenant_json_round_trip_and_errors() {
        let dir = std::env::temp_dir().join(format!("fake-graph-test-{}", random_u64()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("tenant.json");
        std::fs::write(
            &good,
            r#"{"tenant_id":"t","client_id":"c","client_secret":"s",
                "users":[{"id":"u1","userPrincipalName":"a@x","displayName":"A"}],
                "groups":[{"id":"g1","displayName":"G","members":["u1"]},{"id":"g2","displayName":"H"}]}"#,
        )
        .unwrap();
        let tenant = Tenant::from_json_file(&good).unwrap();
        assert!(
            tenant.users[0].account_enabled,
            "accountEnabled defaults to true"
        );
        assert!(tenant.groups[1].members.is_empty());
        assert_eq!(tenant.transitive_users("g1")[0].user_principal_name, "a@x");

        let bad = dir.join("bad.json");
        std::fs::write(&bad, "{\"tenant_id\": ").unwrap();
        let err = Tenant::from_json_file(&bad).unwrap_err();
        assert!(err.contains("bad.json"), "{err}");
        let err = Tenant::from_json_file(dir.join("missing.json")).unwrap_err();
        assert!(err.contains("missing.json"), "{err}");
        let dup = dir.join("dup.json");
        std::fs::write(
            &dup,
            r#"{"tenant_id":"t","client_id":"c","client_secret":"s","users":[{"id":"x","userPrincipalName":"a","displayName":"A"}],"groups":[{"id":"x","displayName":"G"}]}"#,
        )
        .unwrap();
        assert!(Tenant::from_json_file(&dup)
            .unwrap_err()
            .contains("duplicate"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn filter_parser_and_percent_decoding() {
        assert_eq!(
            parse_filter("  displayName   eq 'It''s'  ").unwrap(),
            (FilterProp::DisplayName, "It's".to_owned())
        );
        assert_eq!(
            parse_filter("id eq ''").unwrap(),
            (FilterProp::Id, String::new())
        );
        assert!(parse_filter("displayNameeq 'x'").is_err());
        assert!(parse_filter("displayName eq'x'").is_err());
        assert!(parse_filter("displayName eq 'x' and").is_err());
        assert_eq!(percent_decode("a%27b+c%2", true), b"a'b c%2".to_vec());
        assert_eq!(percent_decode("a+b%20", false), b"a+b ".to_vec());
    }

    // -----------------------------------------------------------------------------------------
    // Delta
    // -----------------------------------------------------------------------------------------

    const GROUPS_DELTA: &str = "/groups/delta?$select=displayName,members";
    const USERS_DELTA: &str = "/users/delta?$select=userPrincipalName,displayName,accountEnabled";

    async fn get_prefer(
        url: &str,
        token: &str,
        max_page_size: Option<usize>,
    ) -> (reqwest::StatusCode, Value) {
        let mut req = client().get(url).bearer_auth(token);
        if let Some(n) = max_page_size {
            req = req.header("Prefer", format!("odata.maxpagesize={n}"));
        }
        let resp = req.send().await.expect("graph request");
        let status = resp.status();
        let text = resp.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// One delta round: every page (nextLinks followed) and the deltaLink it ends with.
    async fn delta_round(url: &str, token: &str, prefer: Option<usize>) -> (Vec<Value>, String) {
        let mut pages = Vec::new();
        let mut url = url.to_owned();
        loop {
            let (status, body) = get_prefer(&url, token, prefer).await;
            assert_eq!(status, 200, "{url}: {body}");
            let next = body["@odata.nextLink"].as_str().map(str::to_owned);
            let delta = body["@odata.deltaLink"].as_str().map(str::to_owned);
            pages.push(body);
            match (next, delta) {
                (Some(next), None) => url = next,
                (None, Some(delta)) => return (pages, delta),
                other => panic!("a page needs exactly one of the links: {other:?}"),
            }
            assert!(pages.len() < 50, "paging does not terminate");
        }
    }

    fn values(pages: &[Value]) -> Vec<Value> {
        pages
            .iter()
            .flat_map(|p| p["value"].as_array().expect("value array").clone())
            .collect()
    }

    fn member(kind: &str, id: &str) -> Value {
        json!({"@odata.type": format!("#microsoft.graph.{kind}"), "id": id})
    }

    fn gone_member(kind: &str, id: &str) -> Value {
        json!({"@odata.type": format!("#microsoft.graph.{kind}"), "id": id, "@removed": {"reason": "deleted"}})
    }

    #[tokio::test]
    async fn delta_full_round_has_graph_shapes_and_pages_by_prefer() {
        let fg = FakeGraph::start(fixture()).await.unwrap();
        let token = token(&fg).await;
        let first = format!("{}{GROUPS_DELTA}", fg.graph_url());
        let (pages, delta_link) = delta_round(&first, &token, Some(3)).await;
        assert_eq!(
            pages
                .iter()
                .map(|p| p["value"].as_array().unwrap().len())
                .collect::<Vec<_>>(),
            vec![3, 3, 1]
        );
        for page in &pages {
            assert_eq!(
                page["@odata.context"],
                "https://graph.microsoft.com/v1.0/$metadata#groups(displayName,members)"
            );
        }
        let next = pages[0]["@odata.nextLink"].as_str().unwrap();
        assert!(
            next.starts_with(&format!("{}/groups/delta?$skiptoken=", fg.graph_url())),
            "{next}"
        );
        assert!(
            delta_link.starts_with(&format!("{}/groups/delta?$deltatoken=", fg.graph_url())),
            "{delta_link}"
        );
        let groups = values(&pages);
        assert_eq!(
            groups[0],
            json!({
                "id": "g-eng",
                "displayName": "Engineering",
                "members@delta": [member("user", "u1"), member("group", "g-backend")],
            }),
            "the dangling 'ghost' member is skipped"
        );
        assert_eq!(
            groups
                .iter()
                .map(|g| g["id"].as_str().unwrap())
                .collect::<Vec<_>>(),
            vec![
                "g-eng",
                "g-backend",
                "g-db",
                "g-quote",
                "g-adm1",
                "g-adm2",
                "g-all"
            ]
        );

        // Users: every selected property, no @odata.type; one page of at most 200.
        let (pages, _) = delta_round(
            &format!("{}{USERS_DELTA}", fg.graph_url()),
            &token,
            Some(999),
        )
        .await;
        assert_eq!(pages.len(), 1);
        assert_eq!(
            pages[0]["@odata.context"],
            "https://graph.microsoft.com/v1.0/$metadata#users(userPrincipalName,displayName,accountEnabled)"
        );
        assert_eq!(
            values(&pages)[4],
            json!({"id": "u5", "userPrincipalName": "eve@example.com", "displayName": "Eve", "accountEnabled": false})
        );

        // Page sizes: Prefer is capped at 200 users and 100 groups; 100 without Prefer; the
        // server-wide cap applies too.
        fg.with_tenant(|t| {
            for n in 0..250 {
                t.users
                    .push(user(&format!("x{n}"), &format!("x{n}@example.com"), "X"));
                t.groups.push(group(&format!("gx{n}"), "GX", &[]));
            }
        });
        let sizes = |pages: &[Value]| {
            pages
                .iter()
                .map(|p| p["value"].as_array().unwrap().len())
                .collect::<Vec<_>>()
        };
        let users = format!("{}{USERS_DELTA}", fg.graph_url());
        let groups = format!("{}{GROUPS_DELTA}", fg.graph_url());
        assert_eq!(
            sizes(&delta_round(&users, &token, Some(999)).await.0),
            vec![200, 55]
        );
        assert_eq!(
            sizes(&delta_round(&users, &token, None).await.0),
            vec![100, 100, 55]
        );
        assert_eq!(
            sizes(&delta_round(&groups, &token, Some(999)).await.0),
            vec![100, 100, 57]
        );
        fg.set_page_size_cap(120);
        assert_eq!(
            sizes(&delta_round(&users, &token, Some(999)).await.0),
            vec![120, 120, 15]
        );
    }

    #[tokio::test]
    async fn delta_rounds_report_what_changed_since_their_token() {
        let fg = FakeGraph::start(fixture()).await.unwrap();
        let token = token(&fg).await;
        let groups = format!("{}{GROUPS_DELTA}", fg.graph_url());
        let users = format!("{}{USERS_DELTA}", fg.graph_url());
        let (_, group_link) = delta_round(&groups, &token, None).await;
        let (_, user_link) = delta_round(&users, &token, None).await;
        fg.with_tenant(|t| {
            let eng = t.groups.iter_mut().find(|g| g.id == "g-eng").unwrap();
            eng.members.retain(|m| m != "u1");
            eng.members.push("u4".into());
            t.groups
                .iter_mut()
                .find(|g| g.id == "g-adm1")
                .unwrap()
                .display_name = "Root".into();
            t.groups.retain(|g| g.id != "g-quote");
            t.users
                .iter_mut()
                .find(|u| u.id == "u2")
                .unwrap()
                .account_enabled = false;
            t.users.retain(|u| u.id != "u3");
        });
        let (pages, next_group_link) = delta_round(&group_link, &token, None).await;
        assert_eq!(
            values(&pages),
            vec![
                json!({"id": "g-eng", "displayName": "Engineering",
                       "members@delta": [member("user", "u4"), gone_member("user", "u1")]}),
                // u3 was deleted: it leaves every group it was in.
                json!({"id": "g-db", "displayName": "Database",
                       "members@delta": [gone_member("user", "u3")]}),
                json!({"id": "g-adm1", "displayName": "Root", "members@delta": []}),
                json!({"id": "g-all", "displayName": "Everyone",
                       "members@delta": [gone_member("user", "u3")]}),
                json!({"id": "g-quote", "@removed": {"reason": "deleted"}}),
            ]
        );
        let (pages, _) = delta_round(&user_link, &token, None).await;
        assert_eq!(
            values(&pages),
            vec![
                json!({"id": "u2", "userPrincipalName": "bob@example.com", "displayName": "Bob", "accountEnabled": false}),
                json!({"id": "u3", "@removed": {"reason": "deleted"}}),
            ]
        );
        // Nothing changed since: an empty page with a new deltaLink.
        let (pages, third) = delta_round(&next_group_link, &token, None).await;
        assert_eq!(pages.len(), 1);
        assert!(values(&pages).is_empty());
        assert_ne!(third, next_group_link);
    }

    #[tokio::test]
    async fn delta_keeps_select_with_the_token_and_pages_stay_stable_mid_round() {
        let fg = FakeGraph::start(fixture()).await.unwrap();
        let token = token(&fg).await;
        let url = format!("{}/users/delta?$select=displayName", fg.graph_url());
        let (_, link) = delta_round(&url, &token, None).await;
        assert!(!link.contains("select"), "{link}");
        fg.with_tenant(|t| {
            t.users[0].display_name = "Alice B.".into();
            t.users[1].account_enabled = false; // not selected: not reported
        });
        let (pages, link) = delta_round(&link, &token, None).await;
        assert_eq!(
            values(&pages),
            vec![json!({"id": "u1", "displayName": "Alice B."})]
        );

        // A change made while a round pages through is not mixed into it: the round reports
        // the tenant as it was at its first page, and the next round reports the change.
        let (status, first) = get_prefer(&link, &token, Some(1)).await;
        assert_eq!(status, 200);
        assert!(first["value"].as_array().unwrap().is_empty());
        let (status, page) =
            get_prefer(&format!("{}/users/delta", fg.graph_url()), &token, Some(2)).await;
        assert_eq!(status, 200);
        fg.with_tenant(|t| t.users.retain(|u| u.id != "u1"));
        let mut full = page["value"].as_array().unwrap().clone();
        let mut next = page["@odata.nextLink"].as_str().map(str::to_owned);
        let mut delta = None;
        while let Some(url) = next.take() {
            let (status, page) = get_prefer(&url, &token, Some(2)).await;
            assert_eq!(status, 200, "{page}");
            full.extend(page["value"].as_array().unwrap().clone());
            next = page["@odata.nextLink"].as_str().map(str::to_owned);
            delta = page["@odata.deltaLink"].as_str().map(str::to_owned);
        }
        assert_eq!(
            ids(&json!({ "value": full })),
            vec!["u1", "u2", "u3", "u4", "u5"]
        );
        let (pages, _) = delta_round(&delta.unwrap(), &token, None).await;
        assert_eq!(
            values(&pages),
            vec![json!({"id": "u1", "@removed": {"reason": "deleted"}})]
        );
    }

    #[tokio::test]
    async fn expired_unknown_or_evicted_delta_tokens_are_410_sync_state_not_found() {
        let fg = FakeGraph::start(fixture()).await.unwrap();
        let token = token(&fg).await;
        let groups = format!("{}{GROUPS_DELTA}", fg.graph_url());
        let users = format!("{}{USERS_DELTA}", fg.graph_url());
        let assert_gone = |(status, body): (reqwest::StatusCode, Value)| {
            assert_eq!(status, 410, "{body}");
            assert_eq!(body["error"]["code"], "syncStateNotFound", "{body}");
        };
        let (_, first) = delta_round(&groups, &token, None).await;
        let (_, user_link) = delta_round(&users, &token, None).await;
        // A users token on the groups function, and a token never issued.
        let token_of = |link: &str| link.split_once("$deltatoken=").unwrap().1.to_owned();
        assert_gone(
            get_prefer(
                &format!(
                    "{}/groups/delta?$deltatoken={}",
                    fg.graph_url(),
                    token_of(&user_link)
                ),
                &token,
                None,
            )
            .await,
        );
        assert_gone(
            get_prefer(
                &format!("{}/groups/delta?$deltatoken=abc", fg.graph_url()),
                &token,
                None,
            )
            .await,
        );
        // 16 later rounds evict the first state.
        let mut link = first.clone();
        for _ in 0..DELTA_HISTORY {
            link = delta_round(&link, &token, None).await.1;
        }
        assert_gone(get_prefer(&first, &token, None).await);
        assert_eq!(get_prefer(&link, &token, None).await.0, 200);

        // After expiry, deltaLinks and the nextLinks of a round in progress are gone.
        let (_, page) = get_prefer(&groups, &token, Some(2)).await;
        let next = page["@odata.nextLink"].as_str().unwrap().to_owned();
        fg.expire_delta_links();
        assert_gone(get_prefer(&link, &token, None).await);
        assert_gone(get_prefer(&next, &token, None).await);
        // A skiptoken that is not one of ours is a bad page token, not an expiry.
        let (status, body) = get_prefer(
            &format!("{}/groups/delta?$skiptoken=zz", fg.graph_url()),
            &token,
            None,
        )
        .await;
        assert_eq!(status, 400);
        assert_eq!(body["error"]["code"], "Directory_ExpiredPageToken");
        // A full round works again.
        assert_eq!(values(&delta_round(&groups, &token, None).await.0).len(), 7);
        // $deltatoken outside delta, and $top on delta, are refused.
        let (status, _) = get_prefer(
            &format!("{}/groups?$deltatoken={}", fg.graph_url(), token_of(&link)),
            &token,
            None,
        )
        .await;
        assert_eq!(status, 400);
        let (status, _) = get_prefer(
            &format!("{}/users/delta?$top=5", fg.graph_url()),
            &token,
            None,
        )
        .await;
        assert_eq!(status, 400);
    }

    #[tokio::test]
    async fn delta_routes_see_faults_and_are_recorded() {
        let fg = FakeGraph::start(fixture()).await.unwrap();
        let token = token(&fg).await;
        fg.inject(Fault::new("$skiptoken", 429).retry_after(3).times(1));
        let first = format!("{}{GROUPS_DELTA}", fg.graph_url());
        let (status, page) = get_prefer(&first, &token, Some(5)).await;
        assert_eq!(status, 200);
        let next = page["@odata.nextLink"].as_str().unwrap().to_owned();
        let resp = client()
            .get(&next)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "3");
        let (status, page) = get_prefer(&next, &token, Some(5)).await;
        assert_eq!(status, 200, "the retry of the same page is served");
        assert!(page["@odata.deltaLink"].is_string());
        let paths: Vec<String> = fg
            .requests()
            .into_iter()
            .map(|r| r.path_and_query)
            .collect();
        assert_eq!(paths.len(), 4, "{paths:?}");
        assert_eq!(paths[1], "/v1.0/groups/delta?$select=displayName,members");
        assert!(
            paths[2].starts_with("/v1.0/groups/delta?$skiptoken="),
            "{paths:?}"
        );
        // Without a bearer token, delta is 401 like every Graph route.
        let (status, _, _) = get(&first, None).await;
        assert_eq!(status, 401);
    }

    #[test]
    fn delta_tokens_round_trip_and_reject_garbage() {
        assert_eq!(
            decode_delta_skiptoken(&encode_delta_skiptoken(Some(3), 4, 200)),
            Some((Some(3), 4, 200))
        );
        assert_eq!(
            decode_delta_skiptoken(&encode_delta_skiptoken(None, 0, 7)),
            Some((None, 0, 7))
        );
        assert_eq!(decode_deltatoken(&encode_deltatoken(12)), Some(12));
        assert_eq!(decode_deltatoken(&encode_skiptoken(12)), None);
        assert_eq!(
            decode_delta_skiptoken(&opaque("fake-graph-delta:1:2:3:4")),
            None
        );
        assert_eq!(
            decode_delta_skiptoken(&opaque("fake-graph-delta:x:2:3")),
            None
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            "prefer",
            HeaderValue::from_static("return=minimal, odata.maxpagesize=7"),
        );
        assert_eq!(prefer_max_page_size(&headers), Some(7));
        headers.insert("prefer", HeaderValue::from_static("odata.maxpagesize=lots"));
        assert_eq!(prefer_max_page_size(&headers), None);
    }

    #[test]
    fn long_member_lists_are_split_over_several_objects_of_the_same_group() {
        let mut tenant = fixture();
        let many: Vec<String> = (0..DELTA_MEMBERS_PER_OBJECT + 5)
            .map(|n| format!("m{n}"))
            .collect();
        for id in &many {
            tenant
                .users
                .push(user(id, &format!("{id}@example.com"), id));
        }
        tenant.groups.push(Group {
            id: "g-big".into(),
            display_name: "Big".into(),
            members: many.clone(),
        });
        let select = DeltaSelect::parse(Some("displayName,members"), DeltaKind::Groups).unwrap();
        let values = delta_values(DeltaKind::Groups, &select, None, &tenant);
        let big: Vec<&Value> = values.iter().filter(|v| v["id"] == "g-big").collect();
        assert_eq!(big.len(), 2);
        assert_eq!(big[0]["displayName"], "Big");
        assert_eq!(
            big[0]["members@delta"].as_array().unwrap().len(),
            DELTA_MEMBERS_PER_OBJECT
        );
        assert!(big[1].get("displayName").is_none());
        assert_eq!(big[1]["members@delta"].as_array().unwrap().len(), 5);
    }
}

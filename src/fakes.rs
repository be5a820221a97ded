//! In-process fakes of every outside system, for tests and the benchmark (cargo feature
//! `fakes`; always compiled for this crate's own unit tests). Each fake implements the same
//! trait as the production adapter, keeps its data in memory, and behaves like the service
//! under load:
//!
//! - every request waits a per-call latency of **virtual** time (`tokio::time`), so tests and
//!   the benchmark run under `start_paused` and give the same figures on every machine;
//! - a server-side [`TokenBucket`] enforces the service's quota; a request beyond it is refused
//!   with the service's throttling error and **counted** ([`OpCount::throttled`]);
//! - the client's own retry below the trait is modelled: the AWS SDK's standard mode retries a
//!   throttled request (3 attempts, jittered exponential backoff from 1 s, capped at 20 s), and
//!   `GraphClient` honours `Retry-After` on 429 (6 attempts). [`ServiceSettings::client_attempts`]
//!   set to 1 hands every throttle to the caller instead;
//! - calls are counted per operation and per page, as the production adapter would send them,
//!   and each request after the first of a trait call waits for [`crate::rate::pace_page`]
//!   (a no-op unless the call runs under a [`crate::rate::RateLimited`]), as `SdkAssignments`
//!   does (`SdkIdentityStore`'s page loops do not yet: the decorator charges its pages after
//!   the fact instead);
//!
//! [`FakeAssignments`] also keeps Identity Center's asynchronous requests: a creation or
//! deletion settles after a random 1–3 s of virtual time, and at most 15 creations may be
//! outstanding (more are refused with `ThrottlingException`).
//!
//! [`Fakes`] bundles one of each and builds an [`Engine`] over them. Every fake of a trait lives
//! in this file, once: when a trait grows, its fake grows here.

use crate::aws::AwsError;
use crate::directory::{DirUser, Directory, DirectoryError};
use crate::engine::{ApplySettings, Engine};
use crate::identity::{IdentityStore, Kind, StoreEntry};
use crate::model::{AccountId, Assignment, Principal};
use crate::organizations::OrganizationApi;
use crate::rate::TokenBucket;
use crate::scope::Organization;
use crate::sso::{AssignmentApi, Operation, PermissionSet, RequestStatus};
use crate::state::{Lease, LedgerEntry, MirrorRecord, RunRecord, SourceRecord, StateStore};
use async_trait::async_trait;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

pub mod synth;

/// A server-side quota: `rate` requests (or units) per second, `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    /// Sustained rate per second.
    pub rate: u32,
    /// Bucket size.
    pub burst: u32,
}

/// How the client under the trait retries a throttled request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientRetry {
    /// The AWS SDK's standard retry mode: a random delay up to `min(1 s × 2^n, 20 s)`.
    AwsSdk,
    /// `GraphClient`: waits the `Retry-After` the server sent (whole seconds).
    RetryAfter,
}

/// Behaviour shared by every fake service.
#[derive(Clone, Debug)]
pub struct ServiceSettings {
    /// Time each request takes, refused ones included.
    pub latency: Duration,
    /// The quota, if the service enforces one.
    pub quota: Option<Quota>,
    /// One bucket per operation (the identity store's "per API") instead of one shared.
    pub per_operation: bool,
    /// Requests the client makes before handing a throttle to the caller (1: no retry).
    pub client_attempts: u32,
    /// How the client waits between those attempts.
    pub client_retry: ClientRetry,
    /// Seed of the fake's random numbers (settle times, client jitter).
    pub seed: u64,
}

impl ServiceSettings {
    /// An AWS service with `quota` shared by all its operations, 40 ms per call, and the SDK's
    /// standard retry (3 attempts).
    pub fn aws(quota: Option<Quota>) -> ServiceSettings {
        ServiceSettings {
            latency: Duration::from_millis(40),
            quota,
            per_operation: false,
            client_attempts: 3,
            client_retry: ClientRetry::AwsSdk,
            seed: 7,
        }
    }
}

/// Requests of one operation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpCount {
    /// Requests sent (each page once; a throttled request that was retried counts once).
    pub calls: u64,
    /// Attempts refused as throttled (quota or outstanding-request cap).
    pub throttled: u64,
}

/// Why a fake refused a request.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Refusal {
    /// Slow down (retryable), with the server's hint of when capacity returns.
    Throttle {
        message: String,
        retry_after: Duration,
    },
    /// Any other error.
    Error { code: String, message: String },
}

/// The machinery every fake shares: quota, latency, client retry, counters, fault injection.
pub struct Service {
    name: &'static str,
    throttle_code: &'static str,
    settings: ServiceSettings,
    shared: Option<TokenBucket>,
    per_op: Mutex<BTreeMap<&'static str, Arc<TokenBucket>>>,
    counts: Mutex<BTreeMap<&'static str, OpCount>>,
    faults: Mutex<BTreeMap<&'static str, VecDeque<String>>>,
    rng: Mutex<fastrand::Rng>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Service {
    fn new(name: &'static str, throttle_code: &'static str, settings: ServiceSettings) -> Service {
        let shared = settings
            .quota
            .filter(|_| !settings.per_operation)
            .map(|q| TokenBucket::new(q.rate, q.burst));
        Service {
            name,
            throttle_code,
            rng: Mutex::new(fastrand::Rng::with_seed(settings.seed)),
            settings,
            shared,
            per_op: Mutex::new(BTreeMap::new()),
            counts: Mutex::new(BTreeMap::new()),
            faults: Mutex::new(BTreeMap::new()),
        }
    }

    /// The service's name (`sso-admin`, `identitystore`, `graph`, …).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Requests and throttles per operation since the last reset.
    pub fn counts(&self) -> BTreeMap<&'static str, OpCount> {
        lock(&self.counts).clone()
    }

    /// Requests sent, all operations together.
    pub fn calls(&self) -> u64 {
        lock(&self.counts).values().map(|c| c.calls).sum()
    }

    /// Attempts refused as throttled, all operations together.
    pub fn throttled(&self) -> u64 {
        lock(&self.counts).values().map(|c| c.throttled).sum()
    }

    /// Zeroes the counters (the quota's state is kept).
    pub fn reset_counts(&self) {
        lock(&self.counts).clear();
    }

    /// The next `times` requests of `op` fail with the AWS error `code` (or, for Graph, the
    /// HTTP status `code`), before any quota check and without the client's retry.
    pub fn fail_next(&self, op: &'static str, code: &str, times: usize) {
        lock(&self.faults)
            .entry(op)
            .or_default()
            .extend(std::iter::repeat_n(code.to_string(), times));
    }

    fn admit(&self, op: &'static str, cost: u32) -> Result<(), Duration> {
        if let Some(b) = &self.shared {
            return b.try_acquire_n(cost);
        }
        let Some(q) = self.settings.quota else {
            return Ok(());
        };
        let bucket = lock(&self.per_op)
            .entry(op)
            .or_insert_with(|| Arc::new(TokenBucket::new(q.rate, q.burst)))
            .clone();
        bucket.try_acquire_n(cost)
    }

    fn client_delay(&self, attempt: u32, retry_after: Duration) -> Duration {
        match self.settings.client_retry {
            ClientRetry::AwsSdk => {
                let ceiling = Duration::from_secs(1)
                    .saturating_mul(1 << attempt.min(5))
                    .min(Duration::from_secs(20));
                ceiling.mul_f64(lock(&self.rng).f64())
            }
            ClientRetry::RetryAfter => Duration::from_secs(retry_after.as_secs_f64().ceil() as u64),
        }
    }

    /// One request of `op` costing `cost` quota units: an injected fault, or the quota check,
    /// or `effect` (run when the request arrives), then the latency. Throttles are retried as
    /// the client would, up to `client_attempts`.
    async fn request<R>(
        &self,
        op: &'static str,
        cost: u32,
        mut effect: impl FnMut() -> Result<R, Refusal>,
    ) -> Result<R, Refusal> {
        lock(&self.counts).entry(op).or_default().calls += 1;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let fault = lock(&self.faults).get_mut(op).and_then(VecDeque::pop_front);
            let outcome = if let Some(code) = fault {
                Err(Refusal::Error {
                    message: format!("injected fault {code}"),
                    code,
                })
            } else {
                match self.admit(op, cost) {
                    Ok(()) => effect(),
                    Err(wait) => Err(Refusal::Throttle {
                        message: "Rate exceeded".into(),
                        retry_after: wait,
                    }),
                }
            };
            tokio::time::sleep(self.settings.latency).await;
            match outcome {
                Err(Refusal::Throttle {
                    message,
                    retry_after,
                }) => {
                    lock(&self.counts).entry(op).or_default().throttled += 1;
                    if attempt >= self.settings.client_attempts.max(1) {
                        return Err(Refusal::Throttle {
                            message,
                            retry_after,
                        });
                    }
                    tokio::time::sleep(self.client_delay(attempt - 1, retry_after)).await;
                }
                other => return other,
            }
        }
    }

    /// A request of an AWS operation.
    async fn aws<R>(
        &self,
        op: &'static str,
        effect: impl FnMut() -> Result<R, Refusal>,
    ) -> Result<R, AwsError> {
        self.request(op, 1, effect).await.map_err(|r| match r {
            Refusal::Throttle { message, .. } => AwsError::Call {
                service: self.name,
                operation: op,
                code: Some(self.throttle_code.to_string()),
                message,
            },
            Refusal::Error { code, message } => AwsError::Call {
                service: self.name,
                operation: op,
                code: Some(code),
                message,
            },
        })
    }

    /// `pages` requests of a listing operation (the first carries `effect`).
    async fn aws_pages<R>(
        &self,
        op: &'static str,
        pages: usize,
        effect: impl FnMut() -> Result<R, Refusal>,
    ) -> Result<R, AwsError> {
        let out = self.aws(op, effect).await?;
        for _ in 1..pages {
            crate::rate::pace_page().await;
            self.aws(op, || Ok(())).await?;
        }
        Ok(out)
    }

    fn rand_between(&self, lo: Duration, hi: Duration) -> Duration {
        let (lo_ms, hi_ms) = (lo.as_millis() as u64, hi.as_millis() as u64);
        Duration::from_millis(lock(&self.rng).u64(lo_ms..=hi_ms.max(lo_ms)))
    }
}

fn error(code: &str, message: impl Into<String>) -> Refusal {
    Refusal::Error {
        code: code.into(),
        message: message.into(),
    }
}

/// Pages needed to list `n` entries `per_page` at a time (at least one).
pub fn pages(n: usize, per_page: usize) -> usize {
    n.div_ceil(per_page).max(1)
}

// ---------------------------------------------------------------------------------------------
// sso-admin
// ---------------------------------------------------------------------------------------------

/// Settings of [`FakeAssignments`].
#[derive(Clone, Debug)]
pub struct SsoSettings {
    /// Quota, latency and client retry.
    pub service: ServiceSettings,
    /// Shortest time before an assignment request settles.
    pub settle_min: Duration,
    /// Longest time before an assignment request settles.
    pub settle_max: Duration,
    /// Creations that may be outstanding at once.
    pub max_outstanding_creations: usize,
}

impl Default for SsoSettings {
    /// Identity Center's documented limits: 20 requests per second per instance, 15
    /// outstanding creations; 40 ms per call and 1–3 s before a request settles.
    fn default() -> Self {
        SsoSettings {
            service: ServiceSettings::aws(Some(Quota {
                rate: crate::rate::SSO_ADMIN_RATE,
                burst: crate::rate::SSO_ADMIN_BURST,
            })),
            settle_min: Duration::from_secs(1),
            settle_max: Duration::from_secs(3),
            max_outstanding_creations: crate::rate::MAX_OUTSTANDING_CREATIONS,
        }
    }
}

struct SsoRequest {
    op: Operation,
    assignment: Assignment,
    settled: bool,
}

#[derive(Default)]
struct SsoData {
    permission_sets: Vec<PermissionSet>,
    assigned: BTreeMap<(AccountId, String), BTreeSet<Principal>>,
    /// The same assignments by principal, for `ListAccountAssignmentsForPrincipal`.
    by_principal: BTreeMap<Principal, BTreeSet<(AccountId, String)>>,
    requests: Vec<SsoRequest>,
    pending: BTreeSet<(Instant, usize)>,
    outstanding_creations: usize,
    peak_outstanding_creations: usize,
}

impl SsoData {
    /// Applies every request whose settle time has come.
    fn settle(&mut self, now: Instant) {
        while let Some(&(at, idx)) = self.pending.first() {
            if at > now {
                break;
            }
            self.pending.pop_first();
            let r = &mut self.requests[idx];
            r.settled = true;
            let (op, a) = (r.op, r.assignment.clone());
            match op {
                Operation::Create => {
                    self.outstanding_creations -= 1;
                    self.add(&a);
                }
                Operation::Delete => self.remove(&a),
            }
        }
    }

    fn add(&mut self, a: &Assignment) {
        let pair = (a.account_id.clone(), a.permission_set_arn.clone());
        self.assigned
            .entry(pair.clone())
            .or_default()
            .insert(a.principal());
        self.by_principal
            .entry(a.principal())
            .or_default()
            .insert(pair);
    }

    fn remove(&mut self, a: &Assignment) {
        let pair = (a.account_id.clone(), a.permission_set_arn.clone());
        if let Some(set) = self.assigned.get_mut(&pair) {
            set.remove(&a.principal());
            if set.is_empty() {
                self.assigned.remove(&pair);
            }
        }
        if let Some(set) = self.by_principal.get_mut(&a.principal()) {
            set.remove(&pair);
            if set.is_empty() {
                self.by_principal.remove(&a.principal());
            }
        }
    }
}

/// Identity Center's admin API in memory, with its quotas and asynchronous requests.
pub struct FakeAssignments {
    svc: Service,
    settings: SsoSettings,
    data: Mutex<SsoData>,
}

impl FakeAssignments {
    /// An instance with these permission sets and no assignments.
    pub fn new(settings: SsoSettings, permission_sets: Vec<PermissionSet>) -> FakeAssignments {
        FakeAssignments {
            svc: Service::new("sso-admin", "ThrottlingException", settings.service.clone()),
            settings,
            data: Mutex::new(SsoData {
                permission_sets,
                ..SsoData::default()
            }),
        }
    }

    /// Counters and fault injection.
    pub fn service(&self) -> &Service {
        &self.svc
    }

    fn data(&self) -> MutexGuard<'_, SsoData> {
        let mut d = lock(&self.data);
        d.settle(Instant::now());
        d
    }

    /// Every assignment that exists now (settled requests only).
    pub fn assignments(&self) -> BTreeSet<Assignment> {
        let d = self.data();
        d.assigned
            .iter()
            .flat_map(|((account, ps), principals)| {
                principals.iter().map(move |p| Assignment {
                    account_id: account.clone(),
                    permission_set_arn: ps.clone(),
                    principal_type: p.principal_type,
                    principal_id: p.principal_id.clone(),
                })
            })
            .collect()
    }

    /// How many principals hold `permission_set_arn` in `account` now.
    pub fn count_assigned(&self, account: &AccountId, permission_set_arn: &str) -> usize {
        self.data()
            .assigned
            .get(&(account.clone(), permission_set_arn.to_string()))
            .map_or(0, BTreeSet::len)
    }

    /// Makes an assignment exist at once (made by hand, or before the tool ran).
    pub fn insert(&self, a: &Assignment) {
        self.data().add(a);
    }

    /// Makes an assignment disappear at once (deleted by hand).
    pub fn remove(&self, a: &Assignment) {
        self.data().remove(a);
    }

    /// The most creations that were outstanding at once.
    pub fn peak_outstanding_creations(&self) -> usize {
        lock(&self.data).peak_outstanding_creations
    }
}

#[async_trait]
impl AssignmentApi for FakeAssignments {
    async fn permission_sets(
        &self,
        known: &BTreeMap<String, String>,
    ) -> Result<Vec<PermissionSet>, AwsError> {
        let sets = lock(&self.data).permission_sets.clone();
        self.svc
            .aws_pages("ListPermissionSets", pages(sets.len(), 100), || Ok(()))
            .await?;
        for _ in sets.iter().filter(|s| !known.contains_key(&s.arn)) {
            crate::rate::pace_page().await;
            self.svc.aws("DescribePermissionSet", || Ok(())).await?;
        }
        let mut sets = sets;
        sets.sort();
        Ok(sets)
    }

    async fn assigned(
        &self,
        account: &AccountId,
        permission_set_arn: &str,
    ) -> Result<Vec<Principal>, AwsError> {
        let key = (account.clone(), permission_set_arn.to_string());
        let out: Vec<Principal> = self
            .svc
            .aws("ListAccountAssignments", || {
                Ok(self
                    .data()
                    .assigned
                    .get(&key)
                    .map(|s| s.iter().cloned().collect())
                    .unwrap_or_default())
            })
            .await?;
        for _ in 1..pages(out.len(), 100) {
            crate::rate::pace_page().await;
            self.svc.aws("ListAccountAssignments", || Ok(())).await?;
        }
        Ok(out)
    }

    async fn assigned_to(
        &self,
        principal: &Principal,
    ) -> Result<Vec<(AccountId, String)>, AwsError> {
        let out: Vec<(AccountId, String)> = self
            .svc
            .aws("ListAccountAssignmentsForPrincipal", || {
                Ok(self
                    .data()
                    .by_principal
                    .get(principal)
                    .map(|s| s.iter().cloned().collect())
                    .unwrap_or_default())
            })
            .await?;
        for _ in 1..pages(out.len(), 100) {
            crate::rate::pace_page().await;
            self.svc
                .aws("ListAccountAssignmentsForPrincipal", || Ok(()))
                .await?;
        }
        Ok(out)
    }

    async fn start(
        &self,
        op: Operation,
        a: &Assignment,
    ) -> Result<(String, RequestStatus), AwsError> {
        let name = match op {
            Operation::Create => "CreateAccountAssignment",
            Operation::Delete => "DeleteAccountAssignment",
        };
        let settle = self
            .svc
            .rand_between(self.settings.settle_min, self.settings.settle_max);
        let id = self
            .svc
            .aws(name, || {
                let now = Instant::now();
                let mut d = self.data();
                if op == Operation::Create {
                    if d.outstanding_creations >= self.settings.max_outstanding_creations {
                        return Err(Refusal::Throttle {
                            message: format!(
                                "more than {} CreateAccountAssignment requests outstanding",
                                self.settings.max_outstanding_creations
                            ),
                            retry_after: Duration::from_secs(1),
                        });
                    }
                    d.outstanding_creations += 1;
                    d.peak_outstanding_creations =
                        d.peak_outstanding_creations.max(d.outstanding_creations);
                }
                let idx = d.requests.len();
                d.requests.push(SsoRequest {
                    op,
                    assignment: a.clone(),
                    settled: false,
                });
                d.pending.insert((now + settle, idx));
                Ok(idx)
            })
            .await?;
        Ok((format!("req-{id}"), RequestStatus::InProgress))
    }

    async fn status(&self, op: Operation, request_id: &str) -> Result<RequestStatus, AwsError> {
        let name = match op {
            Operation::Create => "DescribeAccountAssignmentCreationStatus",
            Operation::Delete => "DescribeAccountAssignmentDeletionStatus",
        };
        self.svc
            .aws(name, || {
                let d = self.data();
                let r = request_id
                    .strip_prefix("req-")
                    .and_then(|n| n.parse::<usize>().ok())
                    .and_then(|i| d.requests.get(i))
                    .filter(|r| r.op == op)
                    .ok_or_else(|| {
                        error(
                            "ResourceNotFoundException",
                            format!("no request {request_id}"),
                        )
                    })?;
                Ok(if r.settled {
                    RequestStatus::Succeeded
                } else {
                    RequestStatus::InProgress
                })
            })
            .await
    }

    async fn in_progress(&self, op: Operation) -> Result<BTreeSet<String>, AwsError> {
        let name = match op {
            Operation::Create => "ListAccountAssignmentCreationStatus",
            Operation::Delete => "ListAccountAssignmentDeletionStatus",
        };
        let ids: BTreeSet<String> = self
            .svc
            .aws(name, || {
                let d = self.data();
                Ok(d.pending
                    .iter()
                    .filter(|(_, i)| d.requests[*i].op == op)
                    .map(|(_, i)| format!("req-{i}"))
                    .collect())
            })
            .await?;
        for _ in 1..pages(ids.len(), 100) {
            crate::rate::pace_page().await;
            self.svc.aws(name, || Ok(())).await?;
        }
        Ok(ids)
    }

    fn calls(&self) -> u64 {
        self.svc.calls()
    }
}

// ---------------------------------------------------------------------------------------------
// identity store
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct StoreData {
    users: BTreeMap<String, StoreEntry>,
    groups: BTreeMap<String, StoreEntry>,
    user_names: BTreeMap<String, String>,
    group_names: BTreeMap<String, String>,
    /// membership id → (group id, user id)
    memberships: BTreeMap<String, (String, String)>,
    next_id: u64,
}

/// The identity store in memory: users, groups and memberships, with a quota per API.
pub struct FakeIdentityStore {
    svc: Service,
    data: Mutex<StoreData>,
}

impl FakeIdentityStore {
    /// An empty store. The identity store's quota is 20 requests per second **per API**: use
    /// `per_operation: true` for that.
    pub fn new(settings: ServiceSettings) -> FakeIdentityStore {
        FakeIdentityStore {
            svc: Service::new("identitystore", "ThrottlingException", settings),
            data: Mutex::new(StoreData::default()),
        }
    }

    /// The production quota: 20 requests per second per API, 40 ms per call, SDK retry.
    pub fn production_settings() -> ServiceSettings {
        ServiceSettings {
            per_operation: true,
            ..ServiceSettings::aws(Some(Quota {
                rate: crate::rate::IDENTITY_STORE_RATE,
                burst: crate::rate::IDENTITY_STORE_BURST,
            }))
        }
    }

    /// Counters and fault injection.
    pub fn service(&self) -> &Service {
        &self.svc
    }

    /// Adds a user (as SCIM provisioning would): identity-store id, `userName`, external id.
    pub fn add_user(&self, id: &str, user_name: &str, external_id: Option<&str>) {
        let mut d = lock(&self.data);
        d.user_names
            .insert(user_name.to_lowercase(), id.to_string());
        d.users.insert(
            id.to_string(),
            StoreEntry {
                id: id.to_string(),
                name: user_name.to_string(),
                external_ids: external_id.into_iter().map(str::to_string).collect(),
            },
        );
    }

    /// Adds a group: identity-store id, `displayName`, external id.
    pub fn add_group(&self, id: &str, display_name: &str, external_id: Option<&str>) {
        let mut d = lock(&self.data);
        d.group_names
            .insert(display_name.to_string(), id.to_string());
        d.groups.insert(
            id.to_string(),
            StoreEntry {
                id: id.to_string(),
                name: display_name.to_string(),
                external_ids: external_id.into_iter().map(str::to_string).collect(),
            },
        );
    }

    /// Every group: id → display name.
    pub fn groups(&self) -> BTreeMap<String, String> {
        lock(&self.data)
            .groups
            .values()
            .map(|g| (g.id.clone(), g.name.clone()))
            .collect()
    }

    /// The user ids in a group.
    pub fn members_of(&self, group_id: &str) -> BTreeSet<String> {
        lock(&self.data)
            .memberships
            .values()
            .filter(|(g, _)| g == group_id)
            .map(|(_, u)| u.clone())
            .collect()
    }

    /// Users in the store.
    pub fn user_count(&self) -> usize {
        lock(&self.data).users.len()
    }
}

#[async_trait]
impl IdentityStore for FakeIdentityStore {
    async fn find(&self, kind: Kind, name: &str) -> Result<Option<String>, AwsError> {
        let op = match kind {
            Kind::User => "GetUserId",
            Kind::Group => "GetGroupId",
        };
        self.svc
            .aws(op, || {
                let d = lock(&self.data);
                Ok(match kind {
                    Kind::User => d.user_names.get(&name.to_lowercase()).cloned(),
                    Kind::Group => d.group_names.get(name).cloned(),
                })
            })
            .await
    }

    async fn list_page(
        &self,
        kind: Kind,
        token: Option<String>,
    ) -> Result<(Vec<StoreEntry>, Option<String>), AwsError> {
        let op = match kind {
            Kind::User => "ListUsers",
            Kind::Group => "ListGroups",
        };
        let from: usize = match token.as_deref().map(str::parse) {
            None => 0,
            Some(Ok(n)) => n,
            Some(Err(_)) => {
                return Err(AwsError::malformed("identitystore", op, "bad next token"));
            }
        };
        self.svc
            .aws(op, || {
                let d = lock(&self.data);
                let all: Vec<&StoreEntry> = match kind {
                    Kind::User => d.users.values().collect(),
                    Kind::Group => d.groups.values().collect(),
                };
                let page = all
                    .iter()
                    .skip(from)
                    .take(100)
                    .map(|e| (*e).clone())
                    .collect();
                let next = (from + 100 < all.len()).then(|| (from + 100).to_string());
                Ok((page, next))
            })
            .await
    }

    async fn create_group(
        &self,
        display_name: &str,
        _description: &str,
    ) -> Result<String, AwsError> {
        self.svc
            .aws("CreateGroup", || {
                let mut d = lock(&self.data);
                if d.group_names.contains_key(display_name) {
                    return Err(error(
                        "ConflictException",
                        format!("a group named {display_name:?} exists"),
                    ));
                }
                d.next_id += 1;
                let id = format!("g-fake-{:08}", d.next_id);
                d.group_names.insert(display_name.to_string(), id.clone());
                d.groups.insert(
                    id.clone(),
                    StoreEntry {
                        id: id.clone(),
                        name: display_name.to_string(),
                        external_ids: vec![],
                    },
                );
                Ok(id)
            })
            .await
    }

    async fn rename_group(&self, group_id: &str, display_name: &str) -> Result<(), AwsError> {
        self.svc
            .aws("UpdateGroup", || {
                let mut d = lock(&self.data);
                if d.group_names
                    .get(display_name)
                    .is_some_and(|id| id != group_id)
                {
                    return Err(error(
                        "ConflictException",
                        format!("a group named {display_name:?} exists"),
                    ));
                }
                let old = d
                    .groups
                    .get_mut(group_id)
                    .map(|g| std::mem::replace(&mut g.name, display_name.to_string()))
                    .ok_or_else(|| {
                        error("ResourceNotFoundException", format!("no group {group_id}"))
                    })?;
                d.group_names.remove(&old);
                d.group_names
                    .insert(display_name.to_string(), group_id.to_string());
                Ok(())
            })
            .await
    }

    async fn delete_group(&self, group_id: &str) -> Result<(), AwsError> {
        self.svc
            .aws("DeleteGroup", || {
                let mut d = lock(&self.data);
                if let Some(g) = d.groups.remove(group_id) {
                    d.group_names.remove(&g.name);
                }
                // Unlike moto, AWS removes the group's memberships with it.
                d.memberships.retain(|_, (g, _)| g != group_id);
                Ok(())
            })
            .await
    }

    async fn group_name(&self, group_id: &str) -> Result<Option<String>, AwsError> {
        self.svc
            .aws("DescribeGroup", || {
                Ok(lock(&self.data)
                    .groups
                    .get(group_id)
                    .map(|g| g.name.clone()))
            })
            .await
    }

    async fn user_name(&self, user_id: &str) -> Result<Option<String>, AwsError> {
        self.svc
            .aws("DescribeUser", || {
                Ok(lock(&self.data).users.get(user_id).map(|u| u.name.clone()))
            })
            .await
    }

    async fn memberships(&self, group_id: &str) -> Result<BTreeMap<String, String>, AwsError> {
        let out: BTreeMap<String, String> = lock(&self.data)
            .memberships
            .iter()
            .filter(|(_, (g, _))| g == group_id)
            .map(|(m, (_, u))| (m.clone(), u.clone()))
            .collect();
        self.svc
            .aws_pages("ListGroupMemberships", pages(out.len(), 100), || Ok(()))
            .await?;
        Ok(out)
    }

    async fn add_membership(&self, group_id: &str, user_id: &str) -> Result<String, AwsError> {
        self.svc
            .aws("CreateGroupMembership", || {
                let mut d = lock(&self.data);
                if !d.groups.contains_key(group_id) || !d.users.contains_key(user_id) {
                    return Err(error(
                        "ResourceNotFoundException",
                        format!("no group {group_id} or user {user_id}"),
                    ));
                }
                if d.memberships
                    .values()
                    .any(|(g, u)| g == group_id && u == user_id)
                {
                    return Err(error(
                        "ConflictException",
                        format!("{user_id} is already a member of {group_id}"),
                    ));
                }
                d.next_id += 1;
                let id = format!("m-fake-{:08}", d.next_id);
                d.memberships
                    .insert(id.clone(), (group_id.to_string(), user_id.to_string()));
                Ok(id)
            })
            .await
    }

    async fn remove_membership(&self, membership_id: &str) -> Result<(), AwsError> {
        self.svc
            .aws("DeleteGroupMembership", || {
                lock(&self.data)
                    .memberships
                    .remove(membership_id)
                    .map(|_| ())
                    .ok_or_else(|| {
                        error(
                            "ResourceNotFoundException",
                            format!("no membership {membership_id}"),
                        )
                    })
            })
            .await
    }

    fn calls(&self) -> u64 {
        self.svc.calls()
    }
}

// ---------------------------------------------------------------------------------------------
// Entra (Microsoft Graph)
// ---------------------------------------------------------------------------------------------

/// An Entra group of the synthetic tenant.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TenantGroup {
    /// Display name (not unique in Entra).
    pub display_name: String,
    /// Direct members: user or group object ids.
    pub members: BTreeSet<String>,
}

/// A synthetic Entra tenant.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tenant {
    /// Users by object id.
    pub users: BTreeMap<String, DirUser>,
    /// Groups by object id.
    pub groups: BTreeMap<String, TenantGroup>,
}

impl Tenant {
    /// The users under a group at any depth, each once; nesting cycles are harmless.
    pub fn transitive_users(&self, group_id: &str) -> BTreeSet<&str> {
        self.closure(group_id).1
    }

    /// The groups under a group at any depth, each once (itself only through a cycle).
    pub fn transitive_groups(&self, group_id: &str) -> BTreeSet<&str> {
        self.closure(group_id).0
    }

    fn closure(&self, group_id: &str) -> (BTreeSet<&str>, BTreeSet<&str>) {
        let mut groups = BTreeSet::new();
        let mut users = BTreeSet::new();
        let mut queue = vec![group_id];
        let mut seen = BTreeSet::from([group_id]);
        while let Some(g) = queue.pop() {
            let Some(group) = self.groups.get(g) else {
                continue;
            };
            for m in &group.members {
                if self.users.contains_key(m.as_str()) {
                    users.insert(m.as_str());
                } else if self.groups.contains_key(m.as_str()) {
                    groups.insert(m.as_str());
                    if seen.insert(m.as_str()) {
                        queue.push(m.as_str());
                    }
                }
            }
        }
        (groups, users)
    }
}

/// Graph's request costs in resource units (FACTS.md: a members read about 3, transitive
/// members 5, `$select` saves 1; a single-object read assumed 1, a filtered list 2). The
/// fake charges the delta pages; the targeted reads' costs are what the benchmark's lower
/// bound compares a first run's delta rounds against.
pub mod graph_cost {
    /// `GET /groups/{id}/transitiveMembers/microsoft.graph.user?$select=…`, per page.
    pub const TRANSITIVE_PAGE: u32 = 4;
    /// `GET /groups/{id}`.
    pub const GROUP: u32 = 1;
    /// `GET /groups?$filter=displayName eq '…'`.
    pub const GROUPS_BY_NAME: u32 = 2;
    /// Page size of member listings (`$top=999`).
    pub const MEMBER_PAGE: usize = 999;
    /// `GET /groups/delta` or `/users/delta`, per page (assumed: a listing with `$select`).
    pub const DELTA_PAGE: u32 = 4;
    /// Users per `/users/delta` page (Graph caps `odata.maxpagesize` at 200 for objects).
    pub const USER_DELTA_PAGE: usize = 200;
    /// Groups per `/groups/delta` page (groups carry their member lists, so fewer fit).
    pub const GROUP_DELTA_PAGE: usize = 100;
}

use crate::directory::{DeltaRound, GroupChange, MemberChange, MemberKind, UserChange};

/// Delta links the fake keeps per stream; older ones expire (Graph's 410 Gone).
const DELTA_HISTORY: usize = 8;

/// A group as a delta round saw it: its name and the members that name a user or a group.
#[derive(Clone, Debug, PartialEq, Eq)]
struct DeltaGroupState {
    display_name: String,
    members: BTreeMap<String, MemberKind>,
}

/// The tenant states the issued delta links stand for, oldest first, per stream. One token
/// counter serves both streams, so a link of one stream is unknown to the other.
#[derive(Default)]
struct DeltaHistory {
    next_token: u64,
    groups: VecDeque<(u64, BTreeMap<String, DeltaGroupState>)>,
    users: VecDeque<(u64, BTreeMap<String, DirUser>)>,
}

/// Microsoft Graph in memory over a [`Tenant`].
pub struct FakeDirectory {
    svc: Service,
    tenant: Mutex<Tenant>,
    delta: Mutex<DeltaHistory>,
}

impl FakeDirectory {
    /// Graph over `tenant`.
    pub fn new(settings: ServiceSettings, tenant: Tenant) -> FakeDirectory {
        FakeDirectory {
            svc: Service::new("graph", "429", settings),
            tenant: Mutex::new(tenant),
            delta: Mutex::new(DeltaHistory::default()),
        }
    }

    /// Forgets every delta link issued so far: the next round from one of them is
    /// [`DirectoryError::DeltaExpired`], as after Graph's ~7 days.
    pub fn expire_delta_links(&self) {
        let mut h = lock(&self.delta);
        h.groups.clear();
        h.users.clear();
    }

    /// Graph's smallest tenant budget, 3,500 resource units per 10 s (350/s, burst 3,500),
    /// 40 ms per call, and `GraphClient`'s retry (6 attempts honouring `Retry-After`).
    pub fn production_settings() -> ServiceSettings {
        ServiceSettings {
            latency: Duration::from_millis(40),
            quota: Some(Quota {
                rate: 350,
                burst: 3_500,
            }),
            per_operation: false,
            client_attempts: 6,
            client_retry: ClientRetry::RetryAfter,
            seed: 11,
        }
    }

    /// Counters and fault injection (fault codes are HTTP statuses).
    pub fn service(&self) -> &Service {
        &self.svc
    }

    /// Reads or changes the tenant.
    pub fn with_tenant<R>(&self, f: impl FnOnce(&mut Tenant) -> R) -> R {
        f(&mut lock(&self.tenant))
    }

    async fn graph<R>(
        &self,
        what: &str,
        op: &'static str,
        cost: u32,
        effect: impl FnMut() -> Result<R, Refusal>,
    ) -> Result<R, DirectoryError> {
        self.svc
            .request(op, cost, effect)
            .await
            .map_err(|r| match r {
                Refusal::Throttle { message, .. } => DirectoryError::Http {
                    what: what.to_string(),
                    status: 429,
                    code: Some("TooManyRequests".into()),
                    message,
                },
                Refusal::Error { code, message } => DirectoryError::Http {
                    what: what.to_string(),
                    status: code.parse().unwrap_or(500),
                    code: Some(code),
                    message,
                },
            })
    }

    /// One delta round of `stream` (`groups` or `users`): the first page computes the changes
    /// since the link's stored state (everything without a link), the further pages are only
    /// charged, and the new state is stored under a fresh link once every page has succeeded,
    /// so a failed round leaves the history as it was.
    #[allow(clippy::too_many_arguments)]
    async fn delta_round<S: PartialEq, C>(
        &self,
        stream: &'static str,
        op: &'static str,
        per_page: usize,
        link: Option<&str>,
        history: impl Fn(&mut DeltaHistory) -> &mut VecDeque<(u64, S)>,
        snapshot: impl Fn(&Tenant) -> S,
        diff: impl Fn(Option<&S>, &S) -> Vec<C>,
    ) -> Result<DeltaRound<C>, DirectoryError> {
        let what = format!("GET /{stream}/delta");
        let prefix = format!("fake://{stream}/delta?$deltatoken=");
        let token = link.map(|l| l.strip_prefix(&prefix).and_then(|t| t.parse::<u64>().ok()));
        let first = format!("{what} page 1");
        let (changes, state) = self
            .graph(&first, op, graph_cost::DELTA_PAGE, || {
                let state = snapshot(&lock(&self.tenant));
                let mut h = lock(&self.delta);
                let old = match token {
                    None => None,
                    Some(t) => Some(
                        t.and_then(|t| history(&mut h).iter().find(|(k, _)| *k == t))
                            .map(|(_, s)| s)
                            .ok_or_else(|| {
                                error(
                                    "410",
                                    "syncStateNotFound: the delta token is unknown or expired",
                                )
                            })?,
                    ),
                };
                Ok((diff(old, &state), state))
            })
            .await
            .map_err(|e| match e {
                // Graph's 410 Gone (the fake's own, or one injected with `fail_next`).
                DirectoryError::Http {
                    what,
                    status: 410,
                    message,
                    ..
                } => DirectoryError::DeltaExpired { what, message },
                other => other,
            })?;
        for page in 2..=pages(changes.len(), per_page) {
            self.graph(
                &format!("{what} page {page}"),
                op,
                graph_cost::DELTA_PAGE,
                || Ok(()),
            )
            .await?;
        }
        let mut h = lock(&self.delta);
        // A state already stored keeps its link, so a client that keeps an old link through
        // quiet rounds (as the engine does) finds it valid, as Graph's links stay for days.
        if let Some((token, _)) = history(&mut h).iter().find(|(_, s)| *s == state) {
            return Ok(DeltaRound {
                changes,
                delta_link: format!("{prefix}{token}"),
            });
        }
        let token = h.next_token;
        h.next_token += 1;
        let stored = history(&mut h);
        stored.push_back((token, state));
        while stored.len() > DELTA_HISTORY {
            stored.pop_front();
        }
        Ok(DeltaRound {
            changes,
            delta_link: format!("{prefix}{token}"),
        })
    }
}

/// What a member id names in the tenant (users first, as [`Tenant::transitive_users`] does);
/// `None` for an id that names nothing.
fn member_kind(t: &Tenant, id: &str) -> Option<MemberKind> {
    if t.users.contains_key(id) {
        Some(MemberKind::User)
    } else if t.groups.contains_key(id) {
        Some(MemberKind::Group)
    } else {
        None
    }
}

fn group_states(t: &Tenant) -> BTreeMap<String, DeltaGroupState> {
    t.groups
        .iter()
        .map(|(id, g)| {
            let members = g
                .members
                .iter()
                .filter_map(|m| member_kind(t, m).map(|k| (m.clone(), k)))
                .collect();
            let state = DeltaGroupState {
                display_name: g.display_name.clone(),
                members,
            };
            (id.clone(), state)
        })
        .collect()
}

/// The group changes from `old` (nothing, for a full round) to `now`, in id order: a new or
/// renamed group carries its name, an unchanged name is left out as Graph may do.
fn group_diff(
    old: Option<&BTreeMap<String, DeltaGroupState>>,
    now: &BTreeMap<String, DeltaGroupState>,
) -> Vec<GroupChange> {
    let nothing = BTreeMap::new();
    let old = old.unwrap_or(&nothing);
    let ids: BTreeSet<&String> = old.keys().chain(now.keys()).collect();
    let mut out = Vec::new();
    for id in ids {
        let before = old.get(id);
        let Some(after) = now.get(id) else {
            out.push(GroupChange {
                id: id.clone(),
                removed: true,
                display_name: None,
                members: Vec::new(),
            });
            continue;
        };
        let no_members = BTreeMap::new();
        let before_members = before.map_or(&no_members, |b| &b.members);
        let change = |(m, kind): (&String, &MemberKind), removed| MemberChange {
            id: m.clone(),
            kind: *kind,
            removed,
        };
        let mut members: Vec<MemberChange> = after
            .members
            .iter()
            .filter(|(m, _)| !before_members.contains_key(*m))
            .map(|m| change(m, false))
            .collect();
        members.extend(
            before_members
                .iter()
                .filter(|(m, _)| !after.members.contains_key(*m))
                .map(|m| change(m, true)),
        );
        let renamed = before.is_none_or(|b| b.display_name != after.display_name);
        if renamed || !members.is_empty() {
            out.push(GroupChange {
                id: id.clone(),
                removed: false,
                display_name: renamed.then(|| after.display_name.clone()),
                members,
            });
        }
    }
    out
}

/// The user changes from `old` (nothing, for a full round) to `now`, in id order: a new or
/// changed user carries every field.
fn user_diff(
    old: Option<&BTreeMap<String, DirUser>>,
    now: &BTreeMap<String, DirUser>,
) -> Vec<UserChange> {
    let nothing = BTreeMap::new();
    let old = old.unwrap_or(&nothing);
    let ids: BTreeSet<&String> = old.keys().chain(now.keys()).collect();
    ids.into_iter()
        .filter_map(|id| match now.get(id) {
            None => Some(UserChange {
                id: id.clone(),
                removed: true,
                user_principal_name: None,
                display_name: None,
                account_enabled: None,
            }),
            Some(u) if old.get(id) == Some(u) => None,
            Some(u) => Some(UserChange {
                id: id.clone(),
                removed: false,
                user_principal_name: Some(u.user_principal_name.clone()),
                display_name: Some(u.display_name.clone()),
                account_enabled: Some(u.account_enabled),
            }),
        })
        .collect()
}

#[async_trait]
impl Directory for FakeDirectory {
    async fn groups_delta(
        &self,
        link: Option<&str>,
    ) -> Result<DeltaRound<GroupChange>, DirectoryError> {
        self.delta_round(
            "groups",
            "GroupsDelta",
            graph_cost::GROUP_DELTA_PAGE,
            link,
            |h| &mut h.groups,
            group_states,
            group_diff,
        )
        .await
    }

    async fn users_delta(
        &self,
        link: Option<&str>,
    ) -> Result<DeltaRound<UserChange>, DirectoryError> {
        self.delta_round(
            "users",
            "UsersDelta",
            graph_cost::USER_DELTA_PAGE,
            link,
            |h| &mut h.users,
            |t| t.users.clone(),
            user_diff,
        )
        .await
    }

    fn calls(&self) -> u64 {
        self.svc.calls()
    }
}

#[cfg(test)]
mod delta_tests {
    use super::*;

    fn user(id: &str, enabled: bool) -> DirUser {
        DirUser {
            id: id.into(),
            user_principal_name: format!("{id}@example.com"),
            display_name: format!("User {id}"),
            account_enabled: enabled,
        }
    }

    fn group(name: &str, members: &[&str]) -> TenantGroup {
        TenantGroup {
            display_name: name.into(),
            members: members.iter().map(|m| m.to_string()).collect(),
        }
    }

    fn member(id: &str, kind: MemberKind, removed: bool) -> MemberChange {
        MemberChange {
            id: id.into(),
            kind,
            removed,
        }
    }

    fn group_change(id: &str, name: Option<&str>, members: Vec<MemberChange>) -> GroupChange {
        GroupChange {
            id: id.into(),
            removed: false,
            display_name: name.map(str::to_string),
            members,
        }
    }

    fn user_change(u: &DirUser) -> UserChange {
        UserChange {
            id: u.id.clone(),
            removed: false,
            user_principal_name: Some(u.user_principal_name.clone()),
            display_name: Some(u.display_name.clone()),
            account_enabled: Some(u.account_enabled),
        }
    }

    /// Users a, b, c; g1 = {a, g2, "ghost"} (naming nothing), g2 = {b}, g3 = {c}.
    fn directory(settings: ServiceSettings) -> FakeDirectory {
        let tenant = Tenant {
            users: ["a", "b", "c"]
                .map(|u| (u.to_string(), user(u, true)))
                .into(),
            groups: [
                ("g1".to_string(), group("One", &["a", "g2", "ghost"])),
                ("g2".to_string(), group("Two", &["b"])),
                ("g3".to_string(), group("Three", &["c"])),
            ]
            .into(),
        };
        FakeDirectory::new(settings, tenant)
    }

    fn op_calls(d: &FakeDirectory, op: &str) -> u64 {
        d.service().counts().get(op).map_or(0, |c| c.calls)
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_round_returns_every_object_with_every_field() {
        let d = directory(FakeDirectory::production_settings());
        let groups = d.groups_delta(None).await.unwrap();
        assert_eq!(
            groups.changes,
            vec![
                group_change(
                    "g1",
                    Some("One"),
                    vec![
                        member("a", MemberKind::User, false),
                        member("g2", MemberKind::Group, false),
                    ]
                ),
                group_change(
                    "g2",
                    Some("Two"),
                    vec![member("b", MemberKind::User, false)]
                ),
                group_change(
                    "g3",
                    Some("Three"),
                    vec![member("c", MemberKind::User, false)]
                ),
            ]
        );
        let users = d.users_delta(None).await.unwrap();
        let expected: Vec<UserChange> = ["a", "b", "c"].map(|u| user_change(&user(u, true))).into();
        assert_eq!(users.changes, expected);
        assert_ne!(groups.delta_link, users.delta_link);
        assert_eq!(op_calls(&d, "GroupsDelta"), 1);
        assert_eq!(op_calls(&d, "UsersDelta"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_next_round_returns_exactly_what_changed() {
        let d = directory(FakeDirectory::production_settings());
        let groups = d.groups_delta(None).await.unwrap().delta_link;
        let users = d.users_delta(None).await.unwrap().delta_link;
        d.with_tenant(|t| {
            let g1 = t.groups.get_mut("g1").unwrap();
            g1.members.remove("a");
            g1.members.insert("c".into());
            t.groups.get_mut("g2").unwrap().display_name = "Two renamed".into();
            t.groups.remove("g3");
            t.users.get_mut("b").unwrap().account_enabled = false;
            t.users.remove("c");
            t.users.insert("d".into(), user("d", true));
        });
        let round = d.groups_delta(Some(&groups)).await.unwrap();
        // c was added to g1 and then deleted: it names nothing, so g1 reports only a leaving.
        assert_eq!(
            round.changes,
            vec![
                group_change("g1", None, vec![member("a", MemberKind::User, true)]),
                group_change("g2", Some("Two renamed"), vec![]),
                GroupChange {
                    id: "g3".into(),
                    removed: true,
                    display_name: None,
                    members: vec![],
                },
            ]
        );
        let user_round = d.users_delta(Some(&users)).await.unwrap();
        assert_eq!(
            user_round.changes,
            vec![
                user_change(&user("b", false)),
                UserChange {
                    id: "c".into(),
                    removed: true,
                    user_principal_name: None,
                    display_name: None,
                    account_enabled: None,
                },
                user_change(&user("d", true)),
            ]
        );

        // Nothing changed since: an empty round, still one page, and the same state's link.
        let quiet = d.groups_delta(Some(&round.delta_link)).await.unwrap();
        assert!(quiet.changes.is_empty());
        assert_eq!(quiet.delta_link, round.delta_link);
        assert_eq!(op_calls(&d, "GroupsDelta"), 3);

        // An older link still answers, from its own state.
        let again = d.groups_delta(Some(&groups)).await.unwrap();
        assert_eq!(again.changes, round.changes);
    }

    #[tokio::test(start_paused = true)]
    async fn a_member_added_later_is_reported_as_an_addition() {
        let d = directory(FakeDirectory::production_settings());
        let link = d.groups_delta(None).await.unwrap().delta_link;
        d.with_tenant(|t| {
            t.groups.get_mut("g2").unwrap().members.insert("g3".into());
        });
        let round = d.groups_delta(Some(&link)).await.unwrap();
        assert_eq!(
            round.changes,
            vec![group_change(
                "g2",
                None,
                vec![member("g3", MemberKind::Group, false)]
            )]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn expired_unknown_and_evicted_links_need_a_full_round() {
        let d = directory(FakeDirectory::production_settings());
        let first = d.groups_delta(None).await.unwrap().delta_link;
        let users = d.users_delta(None).await.unwrap().delta_link;
        let expired = |r: Result<DeltaRound<GroupChange>, DirectoryError>| {
            matches!(r, Err(DirectoryError::DeltaExpired { .. }))
        };
        // A link of the other stream, or one the fake never issued.
        assert!(expired(d.groups_delta(Some(&users)).await));
        assert!(expired(
            d.groups_delta(Some("fake://groups/delta?$deltatoken=99"))
                .await
        ));
        assert!(expired(d.groups_delta(Some("https://elsewhere/")).await));
        // Eight newer states evict the first link.
        let mut link = first.clone();
        for i in 0..DELTA_HISTORY {
            d.with_tenant(|t| {
                t.groups.get_mut("g2").unwrap().display_name = format!("renamed {i}");
            });
            link = d.groups_delta(Some(&link)).await.unwrap().delta_link;
        }
        assert!(expired(d.groups_delta(Some(&first)).await));
        assert!(d.groups_delta(Some(&link)).await.is_ok());
        // Forgetting the history expires every link; a full round starts again.
        d.expire_delta_links();
        assert!(expired(d.groups_delta(Some(&link)).await));
        assert!(matches!(
            d.users_delta(Some(&users)).await,
            Err(DirectoryError::DeltaExpired { .. })
        ));
        assert_eq!(d.groups_delta(None).await.unwrap().changes.len(), 3);
        // An injected 410 is an expiry too.
        d.service().fail_next("GroupsDelta", "410", 1);
        assert!(expired(d.groups_delta(None).await));
    }

    #[tokio::test(start_paused = true)]
    async fn rounds_are_charged_per_page_and_a_failed_page_fails_the_round() {
        let d = directory(FakeDirectory::production_settings());
        d.with_tenant(|t| {
            for n in 0..450 {
                let id = format!("u{n:03}");
                t.users.insert(id.clone(), user(&id, true));
            }
            for n in 0..(graph_cost::GROUP_DELTA_PAGE - 3 + 1) {
                t.groups.insert(format!("x{n:03}"), group("X", &[]));
            }
        });
        let users = d.users_delta(None).await.unwrap();
        assert_eq!(users.changes.len(), 453);
        assert_eq!(op_calls(&d, "UsersDelta"), 3, "453 users, 200 a page");
        let groups = d.groups_delta(None).await.unwrap();
        assert_eq!(groups.changes.len(), graph_cost::GROUP_DELTA_PAGE + 1);
        assert_eq!(op_calls(&d, "GroupsDelta"), 2, "101 groups, 100 a page");
        assert_eq!(d.calls(), 5);

        // A quota of two pages' units, no client retry: the third page is throttled and the
        // whole round fails; the link it started from is still good afterwards.
        let tight = ServiceSettings {
            quota: Some(Quota {
                rate: 1,
                burst: 2 * graph_cost::DELTA_PAGE,
            }),
            client_attempts: 1,
            ..FakeDirectory::production_settings()
        };
        let d = directory(tight);
        d.with_tenant(|t| {
            for n in 0..450 {
                let id = format!("u{n:03}");
                t.users.insert(id.clone(), user(&id, true));
            }
        });
        match d.users_delta(None).await {
            Err(DirectoryError::Http {
                status: 429, what, ..
            }) => {
                assert_eq!(what, "GET /users/delta page 3")
            }
            other => panic!("expected a throttled third page, got {other:?}"),
        }
        assert_eq!(d.service().throttled(), 1);
        assert!(
            lock(&d.delta).users.is_empty(),
            "a failed round issues no link"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// AWS Organizations
// ---------------------------------------------------------------------------------------------

/// AWS Organizations in memory over an [`Organization`] snapshot, counting the calls the
/// production adapter would make to read it (20 results per page).
pub struct FakeOrganizations {
    svc: Service,
    org: Mutex<Organization>,
    caller: Option<AccountId>,
}

/// Results per page of the Organizations listings.
pub const ORG_PAGE: usize = 20;

impl FakeOrganizations {
    /// The organization, read from `caller` (the management account when equal to it).
    pub fn new(
        settings: ServiceSettings,
        org: Organization,
        caller: Option<AccountId>,
    ) -> FakeOrganizations {
        FakeOrganizations {
            svc: Service::new("organizations", "TooManyRequestsException", settings),
            org: Mutex::new(org),
            caller,
        }
    }

    /// Counters and fault injection.
    pub fn service(&self) -> &Service {
        &self.svc
    }

    /// Reads or changes the organization.
    pub fn with_org<R>(&self, f: impl FnOnce(&mut Organization) -> R) -> R {
        f(&mut lock(&self.org))
    }

    /// The requests a full read costs: DescribeOrganization, ListRoots, then for each OU and
    /// the root its child-OU pages and account pages, and with tags one call per account.
    pub fn snapshot_calls(org: &Organization, with_tags: bool) -> Vec<&'static str> {
        let mut calls = vec!["DescribeOrganization", "ListRoots"];
        for unit in org.units.keys() {
            let ous = org
                .units
                .values()
                .filter(|u| u.parent.as_deref() == Some(unit.as_str()))
                .count();
            let accounts = org.accounts.values().filter(|a| &a.parent == unit).count();
            calls.extend(std::iter::repeat_n(
                "ListOrganizationalUnitsForParent",
                pages(ous, ORG_PAGE),
            ));
            calls.extend(std::iter::repeat_n(
                "ListAccountsForParent",
                pages(accounts, ORG_PAGE),
            ));
        }
        if with_tags {
            calls.extend(std::iter::repeat_n(
                "ListTagsForResource",
                org.accounts.len(),
            ));
        }
        calls
    }
}

#[async_trait]
impl OrganizationApi for FakeOrganizations {
    async fn snapshot(&self, with_tags: bool) -> Result<Organization, AwsError> {
        let mut org = lock(&self.org).clone();
        for op in FakeOrganizations::snapshot_calls(&org, with_tags) {
            self.svc.aws(op, || Ok(())).await?;
        }
        if !with_tags {
            for a in org.accounts.values_mut() {
                a.tags.clear();
            }
        }
        Ok(org)
    }

    async fn caller_account(&self) -> Result<Option<AccountId>, AwsError> {
        self.svc
            .aws("GetCallerIdentity", || Ok(self.caller.clone()))
            .await
    }

    fn calls(&self) -> u64 {
        self.svc.calls()
    }
}

// ---------------------------------------------------------------------------------------------
// state table (DynamoDB)
// ---------------------------------------------------------------------------------------------

/// Ledger items a DynamoDB Query page holds: a page is at most 1 MB and a ledger item about
/// 400 bytes.
pub const LEDGER_ITEMS_PER_PAGE: usize = 2_500;

/// Everything the state table holds.
#[derive(Clone, Debug, Default)]
pub struct StateData {
    /// The ownership ledger.
    pub ledger: BTreeMap<Assignment, LedgerEntry>,
    /// Run records, oldest first.
    pub runs: Vec<RunRecord>,
    /// Mirror groups by Entra group id.
    pub mirrors: BTreeMap<String, MirrorRecord>,
    /// Rule sources by rule name.
    pub sources: BTreeMap<String, SourceRecord>,
    /// The lease: holder and expiry (seconds since the epoch, on the fake's clock).
    pub lease: Option<(String, u64)>,
    /// Unowned assignments a rule wants, as last read.
    pub seen: BTreeSet<Assignment>,
    /// The rolling audit's cursor.
    pub audit_cursor: Option<u64>,
    /// Creations carried to the next run.
    pub carried: Option<crate::state::CarriedPlan>,
    /// Cached values by name.
    pub caches: BTreeMap<String, crate::state::Cached>,
}

/// Bytes a DynamoDB Query page returns (1 MB), and what one cache chunk item holds.
const QUERY_PAGE_BYTES: usize = 1_000_000;
const CACHE_CHUNK_BYTES: usize = 350_000;

/// The fake state table's clock at its creation (seconds since the epoch, mid-January 2027): a
/// fixed start, so what depends on the clock (the audit's slices, cache ages) is the same in
/// every run of a test or the benchmark.
pub const FAKE_EPOCH: u64 = 1_800_000_000;

/// The state table in memory. Its clock (for lease expiry, the audit and cache ages) is
/// [`FAKE_EPOCH`] plus the virtual time elapsed since it was made, so leases expire under
/// paused time.
pub struct FakeState {
    svc: Service,
    data: Mutex<StateData>,
    epoch0: u64,
    t0: Instant,
}

impl FakeState {
    /// An empty table.
    pub fn new(settings: ServiceSettings) -> FakeState {
        FakeState {
            svc: Service::new("dynamodb", "ThrottlingException", settings),
            data: Mutex::new(StateData::default()),
            epoch0: FAKE_EPOCH,
            t0: Instant::now(),
        }
    }

    /// On-demand DynamoDB: no quota that this tool can reach, 10 ms per call, SDK retry.
    pub fn production_settings() -> ServiceSettings {
        ServiceSettings {
            latency: Duration::from_millis(10),
            ..ServiceSettings::aws(None)
        }
    }

    /// Counters and fault injection.
    pub fn service(&self) -> &Service {
        &self.svc
    }

    /// Reads or changes what the table holds.
    pub fn with_data<R>(&self, f: impl FnOnce(&mut StateData) -> R) -> R {
        f(&mut lock(&self.data))
    }
}

#[async_trait]
impl StateStore for FakeState {
    /// The fake's clock: the epoch when it was made plus the (virtual) time since. Outside a
    /// tokio runtime tokio's clock falls back to the real one, so read it inside.
    fn now_epoch(&self) -> u64 {
        self.epoch0 + (Instant::now() - self.t0).as_secs()
    }

    async fn seen(&self) -> Result<Vec<Assignment>, AwsError> {
        let out: Vec<Assignment> = lock(&self.data).seen.iter().cloned().collect();
        self.svc
            .aws_pages("Query", pages(out.len(), LEDGER_ITEMS_PER_PAGE), || Ok(()))
            .await?;
        Ok(out)
    }

    async fn put_seen(&self, a: &Assignment) -> Result<(), AwsError> {
        self.svc
            .aws("PutItem", || {
                lock(&self.data).seen.insert(a.clone());
                Ok(())
            })
            .await
    }

    async fn remove_seen(&self, a: &Assignment) -> Result<(), AwsError> {
        self.svc
            .aws("DeleteItem", || {
                lock(&self.data).seen.remove(a);
                Ok(())
            })
            .await
    }

    async fn audit_cursor(&self) -> Result<Option<u64>, AwsError> {
        self.svc
            .aws("GetItem", || Ok(lock(&self.data).audit_cursor))
            .await
    }

    async fn carried_plan(&self) -> Result<Option<crate::state::CarriedPlan>, AwsError> {
        let plan = lock(&self.data).carried.clone();
        let chunks = plan
            .as_ref()
            .map_or(0, |p| p.creates.len().div_ceil(2_000).max(1));
        self.svc
            .aws_pages("Query", chunks.max(1), || Ok(()))
            .await?;
        Ok(plan)
    }

    async fn put_carried_plan(&self, plan: &crate::state::CarriedPlan) -> Result<(), AwsError> {
        let old = lock(&self.data)
            .carried
            .as_ref()
            .map_or(0, |p| p.creates.len().div_ceil(2_000).max(1));
        let new = plan.creates.len().div_ceil(2_000);
        // The production adapter's requests: a query, a delete per old chunk, a put per new one.
        self.svc.aws("Query", || Ok(())).await?;
        for _ in 0..old {
            self.svc.aws("DeleteItem", || Ok(())).await?;
        }
        for _ in 0..new {
            self.svc.aws("PutItem", || Ok(())).await?;
        }
        lock(&self.data).carried = (!plan.creates.is_empty()).then(|| plan.clone());
        Ok(())
    }

    async fn cache(&self, name: &str) -> Result<Option<crate::state::Cached>, AwsError> {
        let value = lock(&self.data).caches.get(name).cloned();
        let size = value.as_ref().map_or(0, |v| v.bytes.len());
        self.svc
            .aws_pages("Query", pages(size, QUERY_PAGE_BYTES), || Ok(()))
            .await?;
        Ok(value)
    }

    async fn put_cache(&self, name: &str, value: &crate::state::Cached) -> Result<(), AwsError> {
        let old_chunks = lock(&self.data)
            .caches
            .get(name)
            .map(|v| pages(v.bytes.len(), CACHE_CHUNK_BYTES));
        // The production adapter's requests: the head, batches of new chunks, the new head,
        // batches deleting the old chunks.
        self.svc.aws("GetItem", || Ok(())).await?;
        let new_chunks = pages(value.bytes.len(), CACHE_CHUNK_BYTES);
        self.svc
            .aws_pages("BatchWriteItem", pages(new_chunks, 25), || Ok(()))
            .await?;
        self.svc
            .aws("PutItem", || {
                lock(&self.data)
                    .caches
                    .insert(name.to_string(), value.clone());
                Ok(())
            })
            .await?;
        if let Some(old) = old_chunks {
            self.svc
                .aws_pages("BatchWriteItem", pages(old, 25), || Ok(()))
                .await?;
        }
        Ok(())
    }

    async fn put_audit_cursor(&self, at: u64) -> Result<(), AwsError> {
        self.svc
            .aws("PutItem", || {
                lock(&self.data).audit_cursor = Some(at);
                Ok(())
            })
            .await
    }

    async fn ledger(&self) -> Result<Vec<LedgerEntry>, AwsError> {
        let out: Vec<LedgerEntry> = lock(&self.data).ledger.values().cloned().collect();
        self.svc
            .aws_pages("Query", pages(out.len(), LEDGER_ITEMS_PER_PAGE), || Ok(()))
            .await?;
        Ok(out)
    }

    async fn put(&self, entry: &LedgerEntry, _run_id: &str) -> Result<(), AwsError> {
        self.svc
            .aws("PutItem", || {
                lock(&self.data)
                    .ledger
                    .insert(entry.assignment.clone(), entry.clone());
                Ok(())
            })
            .await
    }

    async fn remove(&self, assignment: &Assignment) -> Result<(), AwsError> {
        self.svc
            .aws("DeleteItem", || {
                lock(&self.data).ledger.remove(assignment);
                Ok(())
            })
            .await
    }

    async fn record_run(&self, run: &RunRecord) -> Result<(), AwsError> {
        self.svc
            .aws("PutItem", || {
                lock(&self.data).runs.push(run.clone());
                Ok(())
            })
            .await
    }

    async fn runs(&self, limit: usize) -> Result<Vec<RunRecord>, AwsError> {
        self.svc
            .aws("Query", || {
                let d = lock(&self.data);
                let mut runs = d.runs.clone();
                runs.sort_by(|a, b| (&b.started_at, &b.run_id).cmp(&(&a.started_at, &a.run_id)));
                runs.truncate(limit);
                Ok(runs)
            })
            .await
    }

    async fn mirrors(&self) -> Result<Vec<MirrorRecord>, AwsError> {
        self.svc
            .aws("Query", || {
                Ok(lock(&self.data).mirrors.values().cloned().collect())
            })
            .await
    }

    async fn put_mirror(&self, mirror: &MirrorRecord) -> Result<(), AwsError> {
        self.svc
            .aws("PutItem", || {
                lock(&self.data)
                    .mirrors
                    .insert(mirror.entra_group_id.clone(), mirror.clone());
                Ok(())
            })
            .await
    }

    async fn remove_mirror(&self, entra_group_id: &str) -> Result<(), AwsError> {
        self.svc
            .aws("DeleteItem", || {
                lock(&self.data).mirrors.remove(entra_group_id);
                Ok(())
            })
            .await
    }

    async fn sources(&self) -> Result<Vec<SourceRecord>, AwsError> {
        self.svc
            .aws("Query", || {
                Ok(lock(&self.data).sources.values().cloned().collect())
            })
            .await
    }

    async fn put_source(&self, source: &SourceRecord) -> Result<(), AwsError> {
        self.svc
            .aws("PutItem", || {
                lock(&self.data)
                    .sources
                    .insert(source.rule.clone(), source.clone());
                Ok(())
            })
            .await
    }

    async fn acquire_lease(&self, holder: &str, ttl_seconds: u64) -> Result<Lease, AwsError> {
        self.svc
            .aws("PutItem", || {
                let now = self.now_epoch();
                let mut d = lock(&self.data);
                match &d.lease {
                    Some((h, expires)) if h != holder && *expires >= now => Ok(Lease::HeldBy {
                        holder: h.clone(),
                        expires_at: *expires,
                    }),
                    _ => {
                        d.lease = Some((holder.to_string(), now + ttl_seconds));
                        Ok(Lease::Acquired)
                    }
                }
            })
            .await
    }

    async fn renew_lease(&self, holder: &str, ttl_seconds: u64) -> Result<bool, AwsError> {
        self.svc
            .aws("PutItem", || {
                let now = self.now_epoch();
                let mut d = lock(&self.data);
                match &mut d.lease {
                    Some((h, expires)) if h == holder => {
                        *expires = now + ttl_seconds;
                        Ok(true)
                    }
                    _ => Ok(false),
                }
            })
            .await
    }

    async fn release_lease(&self, holder: &str) -> Result<(), AwsError> {
        self.svc
            .aws("DeleteItem", || {
                let mut d = lock(&self.data);
                if d.lease.as_ref().is_some_and(|(h, _)| h == holder) {
                    d.lease = None;
                }
                Ok(())
            })
            .await
    }
}

// ---------------------------------------------------------------------------------------------
// all together
// ---------------------------------------------------------------------------------------------

/// One fake of each outside system, shared (`Arc`) between the engine and the test that
/// inspects them.
#[derive(Clone)]
pub struct Fakes {
    /// Graph.
    pub directory: Arc<FakeDirectory>,
    /// The identity store.
    pub identity: Arc<FakeIdentityStore>,
    /// sso-admin.
    pub sso: Arc<FakeAssignments>,
    /// The state table.
    pub state: Arc<FakeState>,
    /// AWS Organizations.
    pub organizations: Arc<FakeOrganizations>,
}

impl Fakes {
    /// Fakes with the production quotas and latencies over this tenant and organization; the
    /// identity store and permission sets are empty until filled.
    pub fn new(
        tenant: Tenant,
        org: Organization,
        permission_sets: Vec<PermissionSet>,
        sso: SsoSettings,
    ) -> Fakes {
        let caller = org.management_account.clone();
        Fakes {
            directory: Arc::new(FakeDirectory::new(
                FakeDirectory::production_settings(),
                tenant,
            )),
            identity: Arc::new(FakeIdentityStore::new(
                FakeIdentityStore::production_settings(),
            )),
            sso: Arc::new(FakeAssignments::new(sso, permission_sets)),
            state: Arc::new(FakeState::new(FakeState::production_settings())),
            organizations: Arc::new(FakeOrganizations::new(
                ServiceSettings::aws(None),
                org,
                caller,
            )),
        }
    }

    /// An engine over these fakes, without any client-side rate limiting (wrap it with
    /// [`crate::rate::with_quotas`] for that).
    pub fn engine(&self, settings: ApplySettings) -> Engine {
        Engine {
            directory: self.directory.clone(),
            identity: self.identity.clone(),
            sso: self.sso.clone(),
            state: self.state.clone(),
            organizations: self.organizations.clone(),
            settings,
        }
    }

    /// Every service's counters, by service name.
    pub fn counts(&self) -> BTreeMap<&'static str, BTreeMap<&'static str, OpCount>> {
        self.services()
            .into_iter()
            .map(|s| (s.name(), s.counts()))
            .collect()
    }

    /// Every service's machinery, for counters and fault injection.
    pub fn services(&self) -> [&Service; 5] {
        [
            self.directory.service(),
            self.identity.service(),
            self.sso.service(),
            self.state.service(),
            self.organizations.service(),
        ]
    }

    /// Zeroes every counter.
    pub fn reset_counts(&self) {
        for s in self.services() {
            s.reset_counts();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PrincipalType;

    fn acct(n: u32) -> AccountId {
        AccountId::try_from(format!("{n:012}")).unwrap()
    }

    fn asg(n: u32) -> Assignment {
        Assignment {
            account_id: acct(1),
            permission_set_arn: "arn:aws:sso:::permissionSet/ssoins-1/ps-1".into(),
            principal_type: PrincipalType::User,
            principal_id: format!("u-{n}"),
        }
    }

    #[test]
    fn the_closure_is_transitive_and_cycle_safe() {
        let user = |id: &str| DirUser {
            id: id.into(),
            user_principal_name: format!("{id}@x"),
            display_name: id.into(),
            account_enabled: true,
        };
        let group = |members: &[&str]| TenantGroup {
            display_name: "g".into(),
            members: members.iter().map(|m| m.to_string()).collect(),
        };
        let t = Tenant {
            users: ["a", "b", "c"].map(|u| (u.to_string(), user(u))).into(),
            groups: [
                ("g1".to_string(), group(&["a", "g2"])),
                ("g2".to_string(), group(&["b", "g3"])),
                ("g3".to_string(), group(&["c", "g1"])),
            ]
            .into(),
        };
        assert_eq!(t.transitive_users("g2"), BTreeSet::from(["a", "b", "c"]));
        assert_eq!(
            t.transitive_groups("g1"),
            BTreeSet::from(["g1", "g2", "g3"])
        );
    }

    #[tokio::test(start_paused = true)]
    async fn requests_settle_after_their_delay_and_creations_are_capped() {
        let sso = FakeAssignments::new(SsoSettings::default(), vec![]);
        let (id, status) = sso.start(Operation::Create, &asg(0)).await.unwrap();
        assert_eq!(status, RequestStatus::InProgress);
        assert!(sso.assignments().is_empty());
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            sso.status(Operation::Create, &id).await.unwrap(),
            RequestStatus::Succeeded
        );
        assert_eq!(sso.assignments(), BTreeSet::from([asg(0)]));

        // 15 outstanding creations; the 16th is refused (the client tries 3 times within the
        // settle time of the first ones, so the caller sees the throttle).
        let sso = FakeAssignments::new(
            SsoSettings {
                settle_min: Duration::from_secs(30),
                settle_max: Duration::from_secs(30),
                ..SsoSettings::default()
            },
            vec![],
        );
        for n in 0..15 {
            sso.start(Operation::Create, &asg(n)).await.unwrap();
        }
        let err = sso.start(Operation::Create, &asg(15)).await.unwrap_err();
        assert_eq!(err.code(), Some("ThrottlingException"));
        assert_eq!(
            sso.service().counts()["CreateAccountAssignment"].throttled,
            3
        );
        assert_eq!(sso.peak_outstanding_creations(), 15);
    }

    #[tokio::test(start_paused = true)]
    async fn calls_beyond_the_quota_are_throttled_and_counted() {
        let sso = Arc::new(FakeAssignments::new(
            SsoSettings {
                service: ServiceSettings {
                    client_attempts: 1,
                    ..SsoSettings::default().service
                },
                ..SsoSettings::default()
            },
            vec![],
        ));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..50 {
            let sso = sso.clone();
            tasks.spawn(async move { sso.assigned(&acct(1), "ps").await.is_ok() });
        }
        let mut ok = 0;
        while let Some(r) = tasks.join_next().await {
            ok += usize::from(r.unwrap());
        }
        assert_eq!(ok, 20, "the burst of 20 passes, the rest is refused");
        let c = sso.service().counts()["ListAccountAssignments"];
        assert_eq!((c.calls, c.throttled), (50, 30));
    }

    #[tokio::test(start_paused = true)]
    async fn identity_store_lists_page_by_100_and_finds_names() {
        let ids = FakeIdentityStore::new(FakeIdentityStore::production_settings());
        for n in 0..250 {
            ids.add_user(
                &format!("u-{n}"),
                &format!("User{n}@x"),
                Some(&format!("e-{n}")),
            );
        }
        let (mut listed, mut token) = (0, None);
        loop {
            let (page, next) = ids.list_page(Kind::User, token).await.unwrap();
            listed += page.len();
            token = next;
            if token.is_none() {
                break;
            }
        }
        assert_eq!(listed, 250);
        assert_eq!(ids.service().counts()["ListUsers"].calls, 3);
        assert_eq!(
            ids.find(Kind::User, "user7@X").await.unwrap().as_deref(),
            Some("u-7")
        );
        let g = ids.create_group("mirror", "").await.unwrap();
        let m = ids.add_membership(&g, "u-1").await.unwrap();
        assert_eq!(
            ids.add_membership(&g, "u-1").await.unwrap_err().code(),
            Some("ConflictException")
        );
        assert_eq!(ids.memberships(&g).await.unwrap()[&m], "u-1");
        ids.delete_group(&g).await.unwrap();
        assert!(ids.members_of(&g).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn injected_faults_come_back_once_each() {
        let state = FakeState::new(FakeState::production_settings());
        state
            .service()
            .fail_next("PutItem", "InternalServerError", 1);
        let entry = LedgerEntry {
            assignment: asg(1),
            owned: Default::default(),
            principal_name: None,
        };
        assert!(state.put(&entry, "r").await.is_err());
        state.put(&entry, "r").await.unwrap();
        assert_eq!(state.ledger().await.unwrap(), vec![entry]);
    }
}

//! The rate-aware executor: one shared token bucket per AWS service, and retry with
//! exponential backoff and full jitter when a service answers that it is throttling us.
//!
//! [`RateLimited`] wraps any [`AssignmentApi`] or [`IdentityStore`]: every request first takes a
//! token from the service's [`TokenBucket`] (shared through an `Arc` by every task of the run),
//! and a request refused with a throttling error code ([`is_throttling`]) is retried after
//! [`Backoff::delay`], taking a new token each time. Other errors are returned at once.
//! [`with_quotas`] wraps an [`Engine`]'s `sso` and `identity` adapters with the production
//! quotas.
//!
//! The cap of [`MAX_OUTSTANDING_CREATIONS`] account-assignment creations in flight is kept by
//! the engine itself (`ApplySettings::max_in_flight`): a request stays in flight until its
//! status settles, which only the engine sees.
//!
//! Microsoft Graph is not wrapped: `GraphClient` already retries 429 with `Retry-After`, and
//! reads Graph one request at a time. AWS's sso-admin and identitystore throttling errors carry
//! no retry-after value, so the delay is always the jittered backoff.
//!
//! A trait call that sends several requests (a listing that pages, or `permission_sets` with
//! one `DescribePermissionSet` per set) takes one token before it starts; each further request
//! takes its own token when the adapter calls [`pace_page`] before sending it (the decorator
//! hands its bucket down through a task-local). An adapter that does not call it is charged for
//! its further requests after the fact, from the size of its result ([`TokenBucket::charge`]):
//! the long-run rate then stays within the quota, but its pages are not spaced out.

use crate::aws::AwsError;
use crate::engine::Engine;
use crate::identity::{IdentityStore, Kind, StoreEntry};
use crate::model::{AccountId, Assignment, Principal};
use crate::retry::Backoff;
use crate::sso::{AssignmentApi, Operation, PermissionSet, RequestStatus};
use async_trait::async_trait;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// sso-admin (Identity Center's admin API): about 20 requests per second, collectively, per
/// Identity Center instance. Source: IAM Identity Center user guide, "IAM Identity Center
/// quotas" → throttle limits (see also shared/FACTS.md).
pub const SSO_ADMIN_RATE: u32 = 20;
/// Burst allowed to the sso-admin bucket: one second's worth. AWS does not document the size
/// of its bucket; if it is smaller, the retry path absorbs the difference.
pub const SSO_ADMIN_BURST: u32 = 20;
/// identitystore: 20 requests per second per API. Source: IAM Identity Center user guide,
/// "IAM Identity Center quotas" (Identity Store throttle limits). [`with_quotas`] applies it to
/// all identitystore operations together, which is stricter than per API.
pub const IDENTITY_STORE_RATE: u32 = 20;
/// Burst allowed to the identitystore bucket: one second's worth.
pub const IDENTITY_STORE_BURST: u32 = 20;
/// At most 15 `CreateAccountAssignment` requests outstanding per instance; cannot be raised.
/// Source: IAM Identity Center user guide, quotas page. Kept by the engine
/// (`ApplySettings::max_in_flight` defaults to this value).
pub const MAX_OUTSTANDING_CREATIONS: usize = 15;
/// Entries per page of the listings the production adapters make (`MaxResults` 100), used to
/// charge a listing for its pages after the fact.
pub const LIST_PAGE: usize = 100;

/// AWS error codes that mean "slow down" (the SDK's own throttling classification, plus
/// DynamoDB's). These, and only these, are retried by [`RateLimited`].
pub const THROTTLING_CODES: &[&str] = &[
    "ThrottlingException",
    "Throttling",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "ProvisionedThroughputExceededException",
];

/// True when AWS refused the call because we sent too many requests.
pub fn is_throttling(e: &AwsError) -> bool {
    e.code().is_some_and(|c| THROTTLING_CODES.contains(&c))
}

/// A token bucket that paces requests to `rate` per second with bursts of up to `burst`,
/// implemented as a generic cell rate algorithm (a "virtual scheduling" bucket): each
/// [`TokenBucket::acquire`] reserves the next free slot under the lock and then sleeps until
/// that slot outside it, so waiters are served first come, first served and never race.
///
/// Time comes from `tokio::time`, so the bucket also works under paused (virtual) time.
#[derive(Debug)]
pub struct TokenBucket {
    /// Time between two tokens.
    interval: Duration,
    /// How far ahead of now the schedule may run before a caller has to wait:
    /// `(burst - 1) × interval`.
    tolerance: Duration,
    /// The theoretical arrival time of the next request at the steady rate; `None` when the
    /// bucket has never been used (full).
    tat: Mutex<Option<Instant>>,
}

impl TokenBucket {
    /// A bucket allowing `rate` requests per second, `burst` of them at once (both at least 1).
    pub fn new(rate: u32, burst: u32) -> TokenBucket {
        TokenBucket::with_interval(Duration::from_secs(1) / rate.max(1), burst)
    }

    /// A bucket allowing one request every `interval`, `burst` of them at once.
    pub fn with_interval(interval: Duration, burst: u32) -> TokenBucket {
        TokenBucket {
            interval,
            tolerance: interval * burst.max(1).saturating_sub(1),
            tat: Mutex::new(None),
        }
    }

    /// Waits until a token is available and takes it.
    pub async fn acquire(&self) {
        let at = self.reserve();
        tokio::time::sleep_until(at).await;
    }

    /// Reserves the next slot; returns when it starts.
    fn reserve(&self) -> Instant {
        let now = Instant::now();
        let mut tat = self.tat.lock().unwrap_or_else(|p| p.into_inner());
        let t = tat.map_or(now, |t| t.max(now));
        let start = t
            .checked_sub(self.tolerance)
            .map_or(now, |earliest| earliest.max(now));
        *tat = Some(t + self.interval);
        start
    }

    /// Takes `n` tokens if they are available now; otherwise takes nothing and returns how
    /// long until they would be. This is the server side of a quota (the fakes use it).
    pub fn try_acquire_n(&self, n: u32) -> Result<(), Duration> {
        let now = Instant::now();
        let mut tat = self.tat.lock().unwrap_or_else(|p| p.into_inner());
        let t = tat.map_or(now, |t| t.max(now));
        let last = t + self.interval * n.max(1).saturating_sub(1);
        let ready = last.checked_sub(self.tolerance).unwrap_or(now);
        if ready <= now {
            *tat = Some(t + self.interval * n.max(1));
            Ok(())
        } else {
            Err(ready - now)
        }
    }

    /// Takes one token if available now (see [`TokenBucket::try_acquire_n`]).
    pub fn try_acquire(&self) -> bool {
        self.try_acquire_n(1).is_ok()
    }

    /// Charges `n` tokens already spent (the further pages of a listing), without waiting:
    /// later callers wait for them. The pages are accounted as if sent back to back, which
    /// never under-charges a listing that ran faster than the rate.
    pub fn charge(&self, n: u32) {
        if n == 0 {
            return;
        }
        let now = Instant::now();
        let mut tat = self.tat.lock().unwrap_or_else(|p| p.into_inner());
        let t = tat.unwrap_or(now);
        *tat = Some(t + self.interval * n);
    }
}

tokio::task_local! {
    /// The bucket of the decorator whose call is running, for [`pace_page`].
    static PACER: Pacer;
}

/// What [`pace_page`] finds in the task-local.
struct Pacer {
    bucket: Arc<TokenBucket>,
    paced: Arc<AtomicU64>,
}

/// Waits for a token of the enclosing [`RateLimited`] call's bucket: adapters call it before
/// each request of a trait call after the first (the next page, the next describe). Outside a
/// rate-limited call it returns at once.
pub async fn pace_page() {
    let bucket = PACER
        .try_with(|p| {
            p.paced.fetch_add(1, Ordering::Relaxed);
            p.bucket.clone()
        })
        .ok();
    if let Some(b) = bucket {
        b.acquire().await;
    }
}

/// Reads a paged AWS listing to the end: `fetch` gets the page token (`None` first) and returns
/// the page's items and the next token. Every page after the first is paced ([`pace_page`]),
/// so the adapters' listings share one loop and one pacing rule.
pub async fn all_pages<T, F, Fut>(mut fetch: F) -> Result<Vec<T>, crate::aws::AwsError>
where
    F: FnMut(Option<String>) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, Option<String>), crate::aws::AwsError>>,
{
    let mut out = Vec::new();
    let mut token = None;
    loop {
        if token.is_some() {
            pace_page().await;
        }
        let (items, next) = fetch(token.take()).await?;
        out.extend(items);
        match next.filter(|t| !t.is_empty()) {
            Some(t) => token = Some(t),
            None => return Ok(out),
        }
    }
}

/// Pages a listing of `entries` results took (at least one).
fn pages(entries: usize) -> u32 {
    u32::try_from(entries.div_ceil(LIST_PAGE).max(1)).unwrap_or(u32::MAX)
}

/// An adapter whose every request is paced by a shared [`TokenBucket`] and retried on
/// throttling with [`Backoff`]. `T` is anything that dereferences to the adapter, such as
/// `Arc<dyn AssignmentApi>` or `Box<SdkAssignments>`.
pub struct RateLimited<T> {
    /// The wrapped adapter.
    pub inner: T,
    /// The service's bucket, shared by every task (and by every decorator of the service).
    pub bucket: Arc<TokenBucket>,
    /// Retry policy for throttled requests.
    pub backoff: Backoff,
    throttled: AtomicU64,
}

impl<T> RateLimited<T> {
    /// Wraps `inner`.
    pub fn new(inner: T, bucket: Arc<TokenBucket>, backoff: Backoff) -> RateLimited<T> {
        RateLimited {
            inner,
            bucket,
            backoff,
            throttled: AtomicU64::new(0),
        }
    }

    /// Throttling errors seen (and retried, or returned after the last attempt).
    pub fn throttled(&self) -> u64 {
        self.throttled.load(Ordering::Relaxed)
    }

    /// Runs one request: token first, then the call, retried while it is throttled and
    /// attempts remain.
    async fn call<R, F, Fut>(&self, mut request: F) -> Result<R, AwsError>
    where
        F: FnMut() -> Fut + Send,
        Fut: Future<Output = Result<R, AwsError>> + Send,
    {
        let mut retry = 0;
        loop {
            self.bucket.acquire().await;
            match request().await {
                Err(e) if is_throttling(&e) => {
                    self.throttled.fetch_add(1, Ordering::Relaxed);
                    if retry + 1 >= self.backoff.max_attempts {
                        return Err(e);
                    }
                    let delay = self.backoff.delay(retry, None);
                    tracing::debug!(error = %e, retry, delay_ms = delay.as_millis() as u64, "throttled; retrying");
                    tokio::time::sleep(delay).await;
                    retry += 1;
                }
                other => return other,
            }
        }
    }

    /// Runs a trait call that may send several requests: the adapter paces the further ones
    /// with [`pace_page`]; those it did not pace (`further` of the result, minus the paced
    /// ones) are charged afterwards.
    async fn call_paged<R, F, Fut>(
        &self,
        request: F,
        further: impl FnOnce(&R) -> u32,
    ) -> Result<R, AwsError>
    where
        F: FnMut() -> Fut + Send,
        Fut: Future<Output = Result<R, AwsError>> + Send,
    {
        let paced = Arc::new(AtomicU64::new(0));
        let pacer = Pacer {
            bucket: self.bucket.clone(),
            paced: paced.clone(),
        };
        let out = PACER.scope(pacer, self.call(request)).await?;
        let paced = u32::try_from(paced.load(Ordering::Relaxed)).unwrap_or(u32::MAX);
        self.bucket.charge(further(&out).saturating_sub(paced));
        Ok(out)
    }
}

#[async_trait]
impl<T> AssignmentApi for RateLimited<T>
where
    T: Deref + Send + Sync,
    T::Target: AssignmentApi,
{
    async fn permission_sets(
        &self,
        known: &BTreeMap<String, String>,
    ) -> Result<Vec<PermissionSet>, AwsError> {
        // ListPermissionSets pages plus one DescribePermissionSet per set not known.
        self.call_paged(
            || self.inner.permission_sets(known),
            |sets| {
                let described = sets.iter().filter(|s| !known.contains_key(&s.arn)).count();
                pages(sets.len()) - 1 + u32::try_from(described).unwrap_or(u32::MAX)
            },
        )
        .await
    }

    async fn assigned(
        &self,
        account: &AccountId,
        permission_set_arn: &str,
    ) -> Result<Vec<Principal>, AwsError> {
        self.call_paged(
            || self.inner.assigned(account, permission_set_arn),
            |out| pages(out.len()) - 1,
        )
        .await
    }

    async fn assigned_to(
        &self,
        principal: &Principal,
    ) -> Result<Vec<(AccountId, String)>, AwsError> {
        self.call_paged(
            || self.inner.assigned_to(principal),
            |out| pages(out.len()) - 1,
        )
        .await
    }

    async fn start(
        &self,
        op: Operation,
        a: &Assignment,
    ) -> Result<(String, RequestStatus), AwsError> {
        self.call(|| self.inner.start(op, a)).await
    }

    async fn status(&self, op: Operation, request_id: &str) -> Result<RequestStatus, AwsError> {
        self.call(|| self.inner.status(op, request_id)).await
    }

    async fn in_progress(&self, op: Operation) -> Result<BTreeSet<String>, AwsError> {
        self.call_paged(|| self.inner.in_progress(op), |out| pages(out.len()) - 1)
            .await
    }

    fn calls(&self) -> u64 {
        self.inner.calls()
    }
}

#[async_trait]
impl<T> IdentityStore for RateLimited<T>
where
    T: Deref + Send + Sync,
    T::Target: IdentityStore,
{
    async fn find(&self, kind: Kind, name: &str) -> Result<Option<String>, AwsError> {
        self.call(|| self.inner.find(kind, name)).await
    }

    async fn list_page(
        &self,
        kind: Kind,
        token: Option<String>,
    ) -> Result<(Vec<StoreEntry>, Option<String>), AwsError> {
        self.call(|| self.inner.list_page(kind, token.clone()))
            .await
    }

    async fn create_group(
        &self,
        display_name: &str,
        description: &str,
    ) -> Result<String, AwsError> {
        self.call(|| self.inner.create_group(display_name, description))
            .await
    }

    async fn rename_group(&self, group_id: &str, display_name: &str) -> Result<(), AwsError> {
        self.call(|| self.inner.rename_group(group_id, display_name))
            .await
    }

    async fn delete_group(&self, group_id: &str) -> Result<(), AwsError> {
        self.call(|| self.inner.delete_group(group_id)).await
    }

    async fn group_name(&self, group_id: &str) -> Result<Option<String>, AwsError> {
        self.call(|| self.inner.group_name(group_id)).await
    }

    async fn user_name(&self, user_id: &str) -> Result<Option<String>, AwsError> {
        self.call(|| self.inner.user_name(user_id)).await
    }

    async fn memberships(&self, group_id: &str) -> Result<BTreeMap<String, String>, AwsError> {
        self.call_paged(
            || self.inner.memberships(group_id),
            |out| pages(out.len()) - 1,
        )
        .await
    }

    async fn add_membership(&self, group_id: &str, user_id: &str) -> Result<String, AwsError> {
        self.call(|| self.inner.add_membership(group_id, user_id))
            .await
    }

    async fn remove_membership(&self, membership_id: &str) -> Result<(), AwsError> {
        self.call(|| self.inner.remove_membership(membership_id))
            .await
    }

    fn calls(&self) -> u64 {
        self.inner.calls()
    }
}

/// The production buckets: one for sso-admin, one for the identity store.
pub fn production_buckets() -> (Arc<TokenBucket>, Arc<TokenBucket>) {
    (
        Arc::new(TokenBucket::new(SSO_ADMIN_RATE, SSO_ADMIN_BURST)),
        Arc::new(TokenBucket::new(IDENTITY_STORE_RATE, IDENTITY_STORE_BURST)),
    )
}

/// Wraps the engine's sso-admin and identity-store adapters with the production quotas
/// ([`SSO_ADMIN_RATE`], [`IDENTITY_STORE_RATE`]) and the default [`Backoff`]. Call it once per
/// engine: wrapping twice gives two buckets in series (still the same rate) and multiplies the
/// retries.
pub fn with_quotas(mut engine: Engine) -> Engine {
    let (sso, identity) = production_buckets();
    engine.sso = Arc::new(RateLimited::new(engine.sso, sso, Backoff::default()));
    engine.identity = Arc::new(RateLimited::new(
        engine.identity,
        identity,
        Backoff::default(),
    ));
    engine
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    fn throttle() -> AwsError {
        AwsError::Call {
            service: "sso-admin",
            operation: "CreateAccountAssignment",
            code: Some("ThrottlingException".into()),
            message: "Rate exceeded".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_bucket_allows_its_burst_then_paces_at_its_rate() {
        let bucket = Arc::new(TokenBucket::new(20, 5));
        let t0 = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..105 {
            let b = bucket.clone();
            tasks.spawn(async move {
                b.acquire().await;
                Instant::now()
            });
        }
        let mut granted: Vec<Duration> = Vec::new();
        while let Some(t) = tasks.join_next().await {
            granted.push(t.unwrap() - t0);
        }
        granted.sort();
        // 5 at once, then one every 50 ms: the 105th at 100 × 50 ms = 5 s.
        assert_eq!(
            granted.iter().filter(|d| d.is_zero()).count(),
            5,
            "{granted:?}"
        );
        assert_eq!(*granted.last().unwrap(), Duration::from_secs(5));
        // No one-second window holds more than rate + burst grants.
        for (i, start) in granted.iter().enumerate() {
            let in_window = granted[i..]
                .iter()
                .take_while(|d| **d < *start + Duration::from_secs(1))
                .count();
            assert!(
                in_window <= 25,
                "{in_window} grants within 1 s of {start:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_bucket_with_the_same_quota_never_refuses_a_paced_client() {
        let client = Arc::new(TokenBucket::new(20, 20));
        let server = Arc::new(TokenBucket::new(20, 20));
        let refused = Arc::new(AtomicU32::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..300u64 {
            let (c, s, r) = (client.clone(), server.clone(), refused.clone());
            tasks.spawn(async move {
                tokio::time::sleep(Duration::from_millis(i * 7 % 400)).await;
                c.acquire().await;
                if !s.try_acquire() {
                    r.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        assert_eq!(refused.load(Ordering::Relaxed), 0);
        // And the same load unpaced is refused.
        let server = TokenBucket::new(20, 20);
        let accepted = (0..300).filter(|_| server.try_acquire()).count();
        assert_eq!(accepted, 20);
    }

    #[tokio::test(start_paused = true)]
    async fn charged_pages_delay_later_callers() {
        let bucket = TokenBucket::new(20, 1);
        let t0 = Instant::now();
        bucket.acquire().await;
        bucket.charge(19);
        bucket.acquire().await;
        assert_eq!(Instant::now() - t0, Duration::from_secs(1));
    }

    /// An sso-admin whose `assigned` sends `pages` requests, pacing them or not.
    struct Pages {
        pages: usize,
        pace: bool,
        sent: Mutex<Vec<Instant>>,
    }

    #[async_trait]
    impl AssignmentApi for Pages {
        async fn permission_sets(
            &self,
            _: &BTreeMap<String, String>,
        ) -> Result<Vec<PermissionSet>, AwsError> {
            Ok(vec![])
        }
        async fn assigned(&self, _: &AccountId, _: &str) -> Result<Vec<Principal>, AwsError> {
            for page in 0..self.pages {
                if page > 0 && self.pace {
                    pace_page().await;
                }
                self.sent.lock().unwrap().push(Instant::now());
            }
            Ok((0..self.pages * LIST_PAGE)
                .map(|i| Principal {
                    principal_type: crate::model::PrincipalType::User,
                    principal_id: format!("u-{i}"),
                })
                .collect())
        }
        async fn start(
            &self,
            _: Operation,
            _: &Assignment,
        ) -> Result<(String, RequestStatus), AwsError> {
            unreachable!()
        }
        async fn status(&self, _: Operation, _: &str) -> Result<RequestStatus, AwsError> {
            unreachable!()
        }
        async fn assigned_to(&self, _: &Principal) -> Result<Vec<(AccountId, String)>, AwsError> {
            unreachable!()
        }
        async fn in_progress(&self, _: Operation) -> Result<BTreeSet<String>, AwsError> {
            unreachable!()
        }
        fn calls(&self) -> u64 {
            0
        }
    }

    #[tokio::test(start_paused = true)]
    async fn pages_are_paced_by_the_adapter_or_charged_afterwards() {
        for pace in [true, false] {
            let api = RateLimited::new(
                Arc::new(Pages {
                    pages: 5,
                    pace,
                    sent: Mutex::new(vec![]),
                }),
                Arc::new(TokenBucket::new(20, 1)),
                Backoff::default(),
            );
            let t0 = Instant::now();
            let account = AccountId::try_from("111111111111".to_string()).unwrap();
            assert_eq!(api.assigned(&account, "ps").await.unwrap().len(), 500);
            let sent: Vec<u128> = api
                .inner
                .sent
                .lock()
                .unwrap()
                .iter()
                .map(|t| (*t - t0).as_millis())
                .collect();
            if pace {
                assert_eq!(sent, vec![0, 50, 100, 150, 200]);
            } else {
                assert_eq!(sent, vec![0; 5]);
            }
            // Either way, the next call waits for the five requests' tokens.
            api.bucket.acquire().await;
            assert_eq!((Instant::now() - t0).as_millis(), 250);
        }
        // Outside a rate-limited call, pacing is a no-op.
        pace_page().await;
    }

    /// An sso-admin that throttles its first `throttles` calls of `start`, then answers.
    struct Flaky {
        throttles: AtomicU32,
        code: &'static str,
        calls: AtomicU64,
    }

    #[async_trait]
    impl AssignmentApi for Flaky {
        async fn permission_sets(
            &self,
            _: &BTreeMap<String, String>,
        ) -> Result<Vec<PermissionSet>, AwsError> {
            Ok(vec![])
        }
        async fn assigned(&self, _: &AccountId, _: &str) -> Result<Vec<Principal>, AwsError> {
            Ok(vec![])
        }
        async fn start(
            &self,
            _: Operation,
            _: &Assignment,
        ) -> Result<(String, RequestStatus), AwsError> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            if self
                .throttles
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(AwsError::Call {
                    service: "sso-admin",
                    operation: "CreateAccountAssignment",
                    code: Some(self.code.into()),
                    message: "no".into(),
                });
            }
            Ok(("req-1".into(), RequestStatus::InProgress))
        }
        async fn status(&self, _: Operation, _: &str) -> Result<RequestStatus, AwsError> {
            Ok(RequestStatus::Succeeded)
        }
        async fn assigned_to(&self, _: &Principal) -> Result<Vec<(AccountId, String)>, AwsError> {
            Ok(vec![])
        }
        async fn in_progress(&self, _: Operation) -> Result<BTreeSet<String>, AwsError> {
            Ok(BTreeSet::new())
        }
        fn calls(&self) -> u64 {
            self.calls.load(Ordering::Relaxed)
        }
    }

    fn assignment() -> Assignment {
        Assignment {
            account_id: AccountId::try_from("111111111111".to_string()).unwrap(),
            permission_set_arn: "arn:aws:sso:::permissionSet/ssoins-1/ps-1".into(),
            principal_type: crate::model::PrincipalType::User,
            principal_id: "u-1".into(),
        }
    }

    fn limited(throttles: u32, code: &'static str) -> RateLimited<Arc<Flaky>> {
        RateLimited::new(
            Arc::new(Flaky {
                throttles: AtomicU32::new(throttles),
                code,
                calls: AtomicU64::new(0),
            }),
            Arc::new(TokenBucket::new(20, 20)),
            Backoff {
                max_attempts: 5,
                base: Duration::from_millis(100),
                cap: Duration::from_secs(2),
            },
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttled_call_is_retried_until_it_succeeds() {
        let api = limited(3, "ThrottlingException");
        let t0 = Instant::now();
        let (id, status) = api.start(Operation::Create, &assignment()).await.unwrap();
        assert_eq!((id.as_str(), status), ("req-1", RequestStatus::InProgress));
        assert_eq!(api.inner.calls(), 4);
        assert_eq!(api.throttled(), 3);
        // Full jitter: at most 100 + 200 + 400 ms of backoff.
        assert!(Instant::now() - t0 <= Duration::from_millis(700));
        assert!(is_throttling(&throttle()));
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stop_at_max_attempts_with_the_throttling_error() {
        let api = limited(10, "TooManyRequestsException");
        let err = api
            .start(Operation::Create, &assignment())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("TooManyRequestsException"));
        assert_eq!(api.inner.calls(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_non_throttling_error_is_not_retried() {
        let api = limited(1, "AccessDeniedException");
        let err = api
            .start(Operation::Create, &assignment())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("AccessDeniedException"));
        assert_eq!(api.inner.calls(), 1);
        assert_eq!(api.throttled(), 0);
    }
}

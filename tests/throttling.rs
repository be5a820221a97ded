//! Issue 6, "Throttling and the service quotas": a reconcile of 1,000 assignment changes
//! through the rate-aware executor, against in-process fakes that enforce Identity Center's
//! quotas (20 requests per second per instance, 15 outstanding creations, 20 per second per
//! identity-store API) and refuse whatever exceeds them. Runs in virtual time.
//!
//! `cargo test --test throttling -- --nocapture` prints the figures.

use entra_sso_sync::config::Config;
use entra_sso_sync::directory::DirUser;
use entra_sso_sync::engine::{ApplySettings, Engine, Mode, RunRequest, Target};
use entra_sso_sync::fakes::{Fakes, SsoSettings, Tenant, TenantGroup};
use entra_sso_sync::model::{AccountId, Assignment, PrincipalType};
use entra_sso_sync::rate::{with_quotas, RateLimited, TokenBucket};
use entra_sso_sync::report::{Outcome, Report};
use entra_sso_sync::retry::Backoff;
use entra_sso_sync::scope::Organization;
use entra_sso_sync::sso::{AssignmentApi, PermissionSet};
use std::collections::BTreeSet;
use std::sync::Arc;

const USERS: usize = 150;
const ACCOUNTS: usize = 10;
const GROUP: &str = "b0000000-0000-4000-8000-000000000001";
const PS_ARN: &str = "arn:aws:sso:::permissionSet/ssoins-722355b8a6a0b2a8/ps-0000000000000001";

fn user_oid(i: usize) -> String {
    format!("a0000000-0000-4000-8000-{i:012x}")
}

fn store_id(i: usize) -> String {
    format!("9067c6f2b2-u{i:012x}")
}

fn account(i: usize) -> AccountId {
    AccountId::try_from(format!("{:012}", 200_000_000_000 + i)).unwrap()
}

/// 150 Entra users, the first 100 in "Engineers"; every user provisioned in the identity store.
fn fakes(sso: SsoSettings) -> Fakes {
    let mut tenant = Tenant::default();
    let mut members = BTreeSet::new();
    for i in 0..USERS {
        tenant.users.insert(
            user_oid(i),
            DirUser {
                id: user_oid(i),
                user_principal_name: format!("user{i:03}@contoso.example"),
                display_name: format!("User {i}"),
                account_enabled: true,
            },
        );
        if i < 100 {
            members.insert(user_oid(i));
        }
    }
    tenant.groups.insert(
        GROUP.into(),
        TenantGroup {
            display_name: "Engineers".into(),
            members,
        },
    );
    let fakes = Fakes::new(
        tenant,
        Organization::default(),
        vec![PermissionSet {
            arn: PS_ARN.into(),
            name: "PowerUser".into(),
        }],
        sso,
    );
    for i in 0..USERS {
        fakes.identity.add_user(
            &store_id(i),
            &format!("user{i:03}@contoso.example"),
            Some(&user_oid(i)),
        );
    }
    fakes
}

/// One members-mode rule over ten accounts: 100 members × 10 accounts = 1,000 assignments.
fn config() -> Config {
    let accounts: Vec<String> = (0..ACCOUNTS)
        .map(|i| format!("\"{}\"", account(i)))
        .collect();
    Config::parse(
        &format!(
            "version: 1\nentra:\n  tenant_id: 11111111-2222-3333-4444-555555555555\n  client_id: 66666666-7777-8888-9999-000000000000\nstate:\n  table: throttling-test\nsafety:\n  max_deletions: 5000\n  max_deletion_ratio: 1.0\nassignments:\n  - name: engineers\n    entra_group: Engineers\n    permission_set: PowerUser\n    accounts: [{}]\n    assign: members\n",
            accounts.join(", ")
        ),
        "throttling-test",
    )
    .unwrap()
}

/// The assignments the rule wants when `members` are the group's members.
fn desired(members: impl Iterator<Item = usize> + Clone) -> BTreeSet<Assignment> {
    (0..ACCOUNTS)
        .flat_map(|a| {
            members.clone().map(move |u| Assignment {
                account_id: account(a),
                permission_set_arn: PS_ARN.into(),
                principal_type: PrincipalType::User,
                principal_id: store_id(u),
            })
        })
        .collect()
}

async fn apply(engine: &Engine) -> Report {
    engine
        .run(
            &config(),
            &RunRequest {
                mode: Mode::Apply,
                trigger: "test".into(),
                allow_deletions: None,
                target: Target::All,
                deadline: None,
                full_read: false,
                refresh: Default::default(),
            },
        )
        .await
        .unwrap()
}

/// Every change applied and none lost: Identity Center holds exactly the desired set, and the
/// ledger claims exactly it, nothing pending.
fn assert_converged(fakes: &Fakes, report: &Report, want: &BTreeSet<Assignment>) {
    assert_eq!(report.outcome, Outcome::Applied, "{}", report.to_text());
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    let have = fakes.sso.assignments();
    assert_eq!(have.len(), want.len());
    assert!(
        have == *want,
        "Identity Center differs from the desired set"
    );
    let ledger = fakes.state.with_data(|d| d.ledger.clone());
    assert!(
        ledger.keys().cloned().collect::<BTreeSet<_>>() == *want,
        "the ledger differs from what exists"
    );
    assert!(ledger.values().all(|e| !e.owned.pending));
}

#[tokio::test(start_paused = true)]
async fn a_thousand_changes_at_the_quota_rate_are_all_applied_and_never_throttled() {
    fastrand::seed(6);
    let fakes = fakes(SsoSettings::default());
    let engine = with_quotas(fakes.engine(ApplySettings::default()));

    let t0 = tokio::time::Instant::now();
    let report = apply(&engine).await;
    let first = tokio::time::Instant::now() - t0;
    assert_eq!(report.creates.len(), 1_000);
    assert_converged(&fakes, &report, &desired(0..100));

    // Half the group is replaced: 500 deletions and 500 creations.
    fakes.directory.with_tenant(|t| {
        let g = t.groups.get_mut(GROUP).unwrap();
        g.members = (50..150).map(user_oid).collect();
    });
    let t1 = tokio::time::Instant::now();
    let report = apply(&engine).await;
    let second = tokio::time::Instant::now() - t1;
    assert_eq!((report.creates.len(), report.deletes.len()), (500, 500));
    assert_converged(&fakes, &report, &desired(50..150));

    let sso = fakes.sso.service();
    println!(
        "sso-admin: {} calls, {} throttled, peak outstanding creations {}; identitystore: {} calls, {} throttled; virtual time {:.0} s + {:.0} s",
        sso.calls(),
        sso.throttled(),
        fakes.sso.peak_outstanding_creations(),
        fakes.identity.service().calls(),
        fakes.identity.service().throttled(),
        first.as_secs_f64(),
        second.as_secs_f64(),
    );
    // The executor paces every request within the quota: the fake never had to refuse one.
    // Without it the engine's 15 workers poll faster than 20 requests per second.
    assert_eq!(sso.throttled(), 0, "{:?}", sso.counts());
    assert_eq!(fakes.identity.service().throttled(), 0);
    assert!(fakes.sso.peak_outstanding_creations() <= 15);
    // At 20 requests per second, 2,000 changes of at least two requests each take at least
    // 200 s; the run is paced, not stalled.
    assert!((first + second).as_secs() >= 200);
}

#[tokio::test(start_paused = true)]
async fn a_server_stricter_than_the_executor_throttles_and_every_change_still_lands() {
    fastrand::seed(7);
    // Identity Center with a bucket of 2 instead of the executor's 20 (AWS does not document
    // its size), and no SDK retry under the trait: every refusal reaches the executor, which
    // must retry it. (A bucket of 1 would refuse the second request of every multi-request
    // call, such as ListPermissionSets + DescribePermissionSet 40 ms apart, forever: those
    // need the SDK's per-request retry, which production has.)
    let mut sso = SsoSettings::default();
    sso.service.quota = Some(entra_sso_sync::fakes::Quota { rate: 20, burst: 2 });
    sso.service.client_attempts = 1;
    let fakes = fakes(sso);
    let mut engine = fakes.engine(ApplySettings::default());
    let limited = Arc::new(RateLimited::new(
        engine.sso.clone(),
        Arc::new(TokenBucket::new(20, 20)),
        Backoff::default(),
    ));
    engine.sso = limited.clone() as Arc<dyn AssignmentApi>;

    let report = apply(&engine).await;
    assert_eq!(report.creates.len(), 1_000);
    assert_converged(&fakes, &report, &desired(0..100));
    let server = fakes.sso.service().throttled();
    println!(
        "strict server: {} sso-admin calls, {server} throttled and retried",
        fakes.sso.service().calls()
    );
    assert!(
        server > 0,
        "the stricter server refused nothing: the test tests nothing"
    );
    assert_eq!(
        limited.throttled(),
        server,
        "every refusal was seen and retried"
    );
}

/// Calls of one sso-admin operation since the fakes were made.
fn calls_of(fakes: &Fakes, op: &str) -> u64 {
    fakes.sso.service().counts().get(op).map_or(0, |c| c.calls)
}

#[tokio::test(start_paused = true)]
async fn one_listing_settles_many_requests_and_a_failed_listing_falls_back_to_polling() {
    fastrand::seed(8);
    let fakes = fakes(SsoSettings::default());
    let engine = with_quotas(fakes.engine(ApplySettings::default()));
    let report = apply(&engine).await;
    assert_converged(&fakes, &report, &desired(0..100));
    let (describes, lists) = (
        calls_of(&fakes, "DescribeAccountAssignmentCreationStatus"),
        calls_of(&fakes, "ListAccountAssignmentCreationStatus"),
    );
    println!("batched: {describes} status reads and {lists} listings for 1,000 creations");
    // Each request reads its final status once, after a listing said it settled.
    assert_eq!(describes, 1_000, "one final status read per creation");
    assert!(lists > 0 && lists < 1_000, "{lists} listings");

    // Listing refused (as by moto, or a role without the permission): every request polls
    // its own status, and every change still lands.
    fastrand::seed(8);
    let fakes = self::fakes(SsoSettings::default());
    fakes.sso.service().fail_next(
        "ListAccountAssignmentCreationStatus",
        "AccessDeniedException",
        1,
    );
    let engine = with_quotas(fakes.engine(ApplySettings::default()));
    let report = apply(&engine).await;
    assert_converged(&fakes, &report, &desired(0..100));
    assert_eq!(
        calls_of(&fakes, "ListAccountAssignmentCreationStatus"),
        1,
        "no listing after the first refusal"
    );
    let polls = calls_of(&fakes, "DescribeAccountAssignmentCreationStatus");
    println!("fallback: {polls} status polls for 1,000 creations");
    assert!(polls > describes, "polling each request costs more reads");
}

#[tokio::test(start_paused = true)]
async fn a_quiet_run_trusts_the_ledger_and_the_audit_catches_a_deletion_made_by_hand() {
    fastrand::seed(9);
    let fakes = fakes(SsoSettings::default());
    let engine = with_quotas(fakes.engine(ApplySettings::default()));
    let want = desired(0..100);
    let report = apply(&engine).await;
    assert_converged(&fakes, &report, &want);
    assert_eq!(
        report.pairs_read, ACCOUNTS,
        "the first run reads every pair"
    );

    // Someone deletes an owned assignment by hand; the next run, minutes later, trusts the
    // ledger for every pair where nothing is to change and reads (almost) nothing.
    let victim = want.iter().next().unwrap().clone();
    fakes.sso.remove(&victim);
    tokio::time::sleep(std::time::Duration::from_secs(60)).await;
    let before = fakes.sso.service().calls();
    let report = apply(&engine).await;
    assert!(report.creates.is_empty(), "{}", report.to_text());
    assert_eq!(report.pairs_read + report.pairs_trusted, ACCOUNTS);
    assert!(
        report.pairs_read < ACCOUNTS,
        "a quiet run read {} of {ACCOUNTS} pairs",
        report.pairs_read
    );
    assert!(fakes.sso.service().calls() - before < 10);

    // A full period later the audit has read every pair and put the assignment back.
    tokio::time::sleep(std::time::Duration::from_secs(24 * 3600)).await;
    let report = apply(&engine).await;
    assert_eq!(report.pairs_read, ACCOUNTS);
    assert_eq!(report.creates.len(), 1);
    assert_eq!(
        (
            report.creates[0].account_id.as_str(),
            report.creates[0].principal_id.as_str()
        ),
        (victim.account_id.as_str(), victim.principal_id.as_str())
    );
    assert_converged(&fakes, &report, &want);
}

#[tokio::test(start_paused = true)]
async fn quiet_runs_read_graph_by_delta_and_trust_their_caches_until_an_event() {
    fastrand::seed(10);
    let fakes = fakes(SsoSettings::default());
    let engine = with_quotas(fakes.engine(ApplySettings::default()));
    let cold = apply(&engine).await;
    // The engine's call counters run on across runs: a run's calls are the difference.
    let spent = |before: &Report, after: &Report, service: &str| {
        after.calls[service] - before.calls[service]
    };

    // Nothing changed: one delta page per stream, the permission set from the cache (one
    // listing, no description), no identity-store call.
    tokio::time::sleep(std::time::Duration::from_secs(60)).await;
    let quiet = apply(&engine).await;
    assert_eq!(quiet.outcome, Outcome::InSync, "{}", quiet.to_text());
    assert_eq!(spent(&cold, &quiet, "graph"), 2);
    assert_eq!(spent(&cold, &quiet, "identitystore"), 0);
    assert_eq!(spent(&cold, &quiet, "sso-admin"), 1);

    // A user joins: the delta round brings it, only that user is looked up, and it is granted.
    fakes.directory.with_tenant(|t| {
        t.groups
            .get_mut(GROUP)
            .unwrap()
            .members
            .insert(user_oid(120));
    });
    let joined = apply(&engine).await;
    assert_converged(&fakes, &joined, &desired((0..100).chain([120])));
    assert_eq!(joined.creates.len(), ACCOUNTS);
    assert_eq!(spent(&quiet, &joined, "graph"), 2);
    assert_eq!(spent(&quiet, &joined, "identitystore"), 1);

    // A SCIM create or delete event: every id is resolved afresh.
    let request = RunRequest {
        mode: Mode::Apply,
        trigger: "test".into(),
        allow_deletions: None,
        target: Target::All,
        deadline: None,
        full_read: false,
        refresh: entra_sso_sync::cache::Refresh {
            principals: true,
            organization: false,
        },
    };
    let refreshed = engine.run(&config(), &request).await.unwrap();
    assert_eq!(refreshed.outcome, Outcome::InSync);
    assert!(spent(&joined, &refreshed, "identitystore") > 1);
}

#[tokio::test(start_paused = true)]
async fn an_unreadable_cache_is_read_afresh_and_the_run_goes_on() {
    fastrand::seed(11);
    let fakes = fakes(SsoSettings::default());
    let engine = with_quotas(fakes.engine(ApplySettings::default()));
    let want = desired(0..100);
    apply(&engine).await;
    let names: Vec<String> = fakes
        .state
        .with_data(|d| d.caches.keys().cloned().collect());
    assert!(names.contains(&"tenant".to_string()), "{names:?}");
    fakes.state.with_data(|d| {
        for c in d.caches.values_mut() {
            c.bytes = b"{ not what was stored".to_vec();
        }
    });
    let report = apply(&engine).await;
    assert_eq!(report.outcome, Outcome::InSync, "{}", report.to_text());
    assert!(report.creates.is_empty() && report.deletes.is_empty());
    assert_eq!(fakes.sso.assignments(), want);
    // Every cache was rebuilt from a fresh read and stored again.
    fakes.state.with_data(|d| {
        for (name, c) in &d.caches {
            assert!(!c.bytes.starts_with(b"{ not"), "{name} was not rewritten");
        }
    });
}

//! Issue 7 §1: the reconcile benchmark. Runs the real engine, wrapped by the rate-aware
//! executor (`rate::with_quotas`), against in-process fakes of Graph, the identity store,
//! sso-admin, Organizations and DynamoDB that enforce the AWS quotas, add 40 ms per call and
//! 1–3 s before an assignment request settles, and throttle whatever exceeds the quotas. Time
//! is tokio's paused (virtual) clock, so every figure but the CPU and real times is the same on
//! every machine.
//!
//! ```text
//! cargo bench --bench reconcile                  # small medium large, then the plan micro-benchmark
//! cargo bench --bench reconcile -- small medium  # some sizes only (`plan` for the micro-benchmark)
//! cargo bench --bench reconcile -- mirror        # medium cold sync, members mode against mirror mode
//! ```
//!
//! See docs/benchmark.md for what each column means and bounds it.

use entra_sso_sync::cache::{self, Principals};
use entra_sso_sync::config::Config;
use entra_sso_sync::engine::{ApplySettings, Engine, Mode, RunRequest, Target};
use entra_sso_sync::fakes::synth::{Spec, World};
use entra_sso_sync::fakes::{graph_cost, pages, FakeOrganizations, Fakes, SsoSettings, Tenant};
use entra_sso_sync::model::{AccountId, Assignment, Principal, PrincipalType};
use entra_sso_sync::plan::{
    self, Limits, Observation, Owned, PlanInput, Protection, ResolvedRule, RuleSource,
};
use entra_sso_sync::rate::{
    with_quotas, IDENTITY_STORE_RATE, MAX_OUTSTANDING_CREATIONS, SSO_ADMIN_RATE,
};
use entra_sso_sync::report::Report;
use entra_sso_sync::state::StateStore;
use entra_sso_sync::tenant::{self, Replica};
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// heap accounting
// ---------------------------------------------------------------------------------------------

/// The system allocator, counting bytes in use and their peak (while [`COUNTING`]).
struct Counting;

/// Bytes in use, as counted; signed, since blocks allocated while not counting may be freed
/// while counting. Only differences are reported.
static CURRENT: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);
/// Off while CPU time is measured, so the counters do not weigh on it.
static COUNTING: AtomicBool = AtomicBool::new(true);

fn grew(by: usize) {
    if COUNTING.load(Ordering::Relaxed) {
        let by = by as isize;
        let now = CURRENT.fetch_add(by, Ordering::Relaxed) + by;
        PEAK.fetch_max(now, Ordering::Relaxed);
    }
}

fn shrank(by: usize) {
    if COUNTING.load(Ordering::Relaxed) {
        CURRENT.fetch_sub(by as isize, Ordering::Relaxed);
    }
}

/// Runs `f` without heap accounting. Everything `f` allocates must be freed inside it.
fn uncounted<R: Copy>(f: impl FnOnce() -> R) -> R {
    COUNTING.store(false, Ordering::Relaxed);
    let r = f();
    COUNTING.store(true, Ordering::Relaxed);
    r
}

// SAFETY: every call is forwarded to the system allocator unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        shrank(layout.size());
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                shrank(layout.size() - new_size);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn mib(bytes: isize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

// ---------------------------------------------------------------------------------------------
// the model's constants
// ---------------------------------------------------------------------------------------------

/// Mean time before an assignment request settles in the fakes (1–3 s).
const MEAN_SETTLE: Duration = Duration::from_secs(2);
/// Time between two runs after the first: the deployment's default schedule, `rate(15 minutes)`.
const SCHEDULE: Duration = Duration::from_secs(15 * 60);
/// Graph's smallest tenant budget, resource units per second.
const GRAPH_UNITS_PER_SEC: f64 = 350.0;

// ---------------------------------------------------------------------------------------------
// one run
// ---------------------------------------------------------------------------------------------

/// The fewest calls a run could make, per service, and what that implies for time.
#[derive(Default)]
struct Bound {
    graph: u64,
    graph_units: u64,
    identity_users: u64,
    identity_groups: u64,
    sso: u64,
    organizations: u64,
    floor: Duration,
}

/// What one run measured.
struct Row {
    size: &'static str,
    case: &'static str,
    creates: usize,
    deletes: usize,
    outcome: String,
    converged: bool,
    calls: BTreeMap<&'static str, u64>,
    throttled: u64,
    pairs_read: usize,
    pairs_trusted: usize,
    bound: Bound,
    simulated: Duration,
    plan_cpu: Duration,
    real: Duration,
    peak_heap: isize,
    retained_heap: isize,
}

/// The lower bound on calls for a run over `tenant`, given what Identity Center and the ledger
/// held before it and the changes it had to make.
///
/// A first run (nothing in the state table):
/// - Graph: the cheaper of one request per distinct Entra group a rule names plus one per
///   999-member page of each members-mode group's transitive users, and the full delta rounds
///   (100 groups, 200 users per page). `$batch` saves round trips, not throttling units.
/// - identitystore: for users and for groups, the cheaper of listing the store (100 per page)
///   and one look-up per wanted principal.
/// - sso-admin: `ListPermissionSets` pages plus one `DescribePermissionSet` per set (rules name
///   permission sets by name), the reads of the changed pairs, and two requests per change
///   (the request and one status read).
/// - organizations: the reads of the tree (see `FakeOrganizations::snapshot_calls`) and the
///   caller's account.
///
/// A later run, with the tenant replica, the caches and the ledger in the state table: Graph
/// one delta page per stream, or the pages of the groups and users that changed; identitystore
/// the principals not resolved before; sso-admin `ListPermissionSets`, the changed pairs'
/// reads and two per change; organizations nothing while the snapshot is younger than the
/// audit's `every_minutes`, else the tree again.
fn bound(
    world: &World,
    tenant: &Tenant,
    fakes: &Fakes,
    pairs: &BTreeSet<(AccountId, String)>,
    changes: (usize, usize),
    now: u64,
) -> Bound {
    let mut b = Bound::default();
    let cached = |name: &str| fakes.state.with_data(|d| d.caches.get(name).cloned());
    let replica = cached(tenant::CACHE_NAME).and_then(|c| Replica::decode(&c.bytes, 0).ok());
    let known: Principals = cached(cache::PRINCIPALS)
        .and_then(|c| serde_json::from_slice(&c.bytes).ok())
        .unwrap_or_default();
    let org_fresh = cached(cache::ORGANIZATION).is_some_and(|c| {
        now.saturating_sub(c.written_at) < u64::from(world.config().audit.every_minutes) * 60
    });
    let named: BTreeSet<&String> = world.rules.iter().map(|r| &r.group).collect();
    b.graph = named.len() as u64;
    b.graph_units = world
        .rules
        .iter()
        .map(|r| &r.group)
        .collect::<BTreeSet<_>>()
        .iter()
        .map(|g| {
            let by_id = world.rules.iter().any(|r| &r.group == *g && r.by_id);
            u64::from(if by_id {
                graph_cost::GROUP
            } else {
                graph_cost::GROUPS_BY_NAME
            })
        })
        .sum();
    let member_groups: BTreeSet<&String> = world
        .rules
        .iter()
        .filter(|r| r.members)
        .map(|r| &r.group)
        .collect();
    let mut wanted_users = BTreeSet::new();
    for g in &member_groups {
        let users = tenant.transitive_users(g);
        let p = pages(users.len(), graph_cost::MEMBER_PAGE) as u64;
        b.graph += p;
        b.graph_units += p * u64::from(graph_cost::TRANSITIVE_PAGE);
        wanted_users.extend(users);
    }
    // With a replica, Graph's delta rounds return only what changed since.
    let full_delta = (pages(tenant.groups.len(), graph_cost::GROUP_DELTA_PAGE)
        + pages(tenant.users.len(), graph_cost::USER_DELTA_PAGE)) as u64;
    if let Some(r) = &replica {
        let groups = tenant
            .groups
            .iter()
            .filter(|(id, g)| {
                let was: BTreeSet<String> = r
                    .direct_members(id)
                    .map(|(u, n)| {
                        u.into_iter()
                            .map(|u| u.id)
                            .chain(n.into_iter().map(|n| n.id))
                            .collect()
                    })
                    .unwrap_or_default();
                was != g.members
            })
            .count();
        let users = tenant
            .users
            .iter()
            .filter(|(id, u)| r.user(id).as_ref() != Some(*u))
            .count();
        b.graph = (pages(groups, graph_cost::GROUP_DELTA_PAGE)
            + pages(users, graph_cost::USER_DELTA_PAGE)) as u64;
        b.graph_units = b.graph * u64::from(graph_cost::DELTA_PAGE);
    } else if full_delta < b.graph {
        b.graph = full_delta;
        b.graph_units = full_delta * u64::from(graph_cost::DELTA_PAGE);
    }
    wanted_users.retain(|u| !known.users.contains_key(*u));
    let wanted_groups = world
        .rules
        .iter()
        .filter(|r| !r.members)
        .map(|r| &r.group)
        .filter(|g| !known.groups.contains_key(*g))
        .collect::<BTreeSet<_>>()
        .len();
    b.identity_users = if wanted_users.is_empty() {
        0
    } else {
        (wanted_users.len() as u64).min(pages(tenant.users.len(), 100) as u64)
    };
    b.identity_groups = if wanted_groups == 0 {
        0
    } else {
        (wanted_groups as u64).min(pages(tenant.groups.len(), 100) as u64)
    };
    let sets = world.permission_sets.len();
    // Reading the changed pairs: per pair, or per principal that holds or will hold an
    // assignment there (each principal's pages over all its assignments), whichever is fewer.
    let per_pair: u64 = pairs
        .iter()
        .map(|(a, ps)| pages(fakes.sso.count_assigned(a, ps), 100) as u64)
        .sum();
    let mut held: BTreeMap<Principal, usize> = BTreeMap::new();
    for a in fakes.sso.assignments() {
        *held.entry(a.principal()).or_default() += 1;
    }
    let involved: BTreeSet<Principal> = world
        .desired(tenant)
        .into_iter()
        .chain(fakes.sso.assignments())
        .filter(|a| pairs.contains(&(a.account_id.clone(), a.permission_set_arn.clone())))
        .map(|a| a.principal())
        .collect();
    let per_principal: u64 = involved
        .iter()
        .map(|p| pages(held.get(p).copied().unwrap_or(0), 100) as u64)
        .sum();
    let described = if cached(cache::PERMISSION_SETS).is_some() {
        0
    } else {
        sets
    };
    b.sso = (pages(sets, 100) + described) as u64
        + per_pair.min(per_principal)
        + 2 * (changes.0 + changes.1) as u64;
    b.organizations = if org_fresh {
        0
    } else {
        FakeOrganizations::snapshot_calls(&world.org, false).len() as u64 + 1
    };

    // The quota floor: the busiest quota-bound service at its rate, or the 15 creation slots
    // each held for a mean settle time, whichever is longer, plus one settle for the last
    // change.
    let per_sec = |calls: u64, rate: u32| Duration::from_secs_f64(calls as f64 / f64::from(rate));
    let slots = Duration::from_secs_f64(
        changes.0 as f64 * MEAN_SETTLE.as_secs_f64() / MAX_OUTSTANDING_CREATIONS as f64,
    );
    let busiest = [
        per_sec(b.sso, SSO_ADMIN_RATE),
        per_sec(b.identity_users, IDENTITY_STORE_RATE),
        per_sec(b.identity_groups, IDENTITY_STORE_RATE),
        Duration::from_secs_f64(b.graph_units as f64 / GRAPH_UNITS_PER_SEC),
        slots,
    ]
    .into_iter()
    .max()
    .unwrap_or_default();
    let tail = if changes.0 + changes.1 > 0 {
        MEAN_SETTLE
    } else {
        Duration::ZERO
    };
    b.floor = busiest + tail;
    b
}

/// The planning core on the inputs the engine gathered: the rules resolved from the world's
/// ground truth, Identity Center's assignments for the pairs in play, and the ledger. Best of
/// three.
fn time_plan(
    world: &World,
    tenant: &Tenant,
    actual: &BTreeSet<Assignment>,
    observed: &Observation,
    owned: &BTreeMap<Assignment, Owned>,
) -> Duration {
    let rules: Vec<ResolvedRule> = world
        .rules
        .iter()
        .map(|r| {
            let principals = if r.members {
                tenant
                    .transitive_users(&r.group)
                    .into_iter()
                    .map(|u| Principal {
                        principal_type: PrincipalType::User,
                        principal_id: entra_sso_sync::fakes::synth::store_user_id(u),
                    })
                    .collect()
            } else {
                BTreeSet::from([Principal {
                    principal_type: PrincipalType::Group,
                    principal_id: entra_sso_sync::fakes::synth::store_group_id(&r.group),
                }])
            };
            ResolvedRule {
                name: r.name.clone(),
                permission_set_arn: world.permission_sets[r.permission_set].arn.clone(),
                accounts: world.accounts_of(r),
                source: RuleSource::Resolved(principals),
                hold_deletions: None,
            }
        })
        .collect();
    time_plan_of(&rules, actual, observed, owned)
}

fn time_plan_of(
    rules: &[ResolvedRule],
    actual: &BTreeSet<Assignment>,
    observed: &Observation,
    owned: &BTreeMap<Assignment, Owned>,
) -> Duration {
    let protection = Protection::default();
    (0..3)
        .map(|_| {
            let t = Instant::now();
            let p = plan::plan(PlanInput {
                rules,
                actual,
                observed,
                owned,
                mirrors: &[],
                protection: &protection,
                limits: Limits {
                    max_deletions: u32::MAX,
                    max_deletion_ratio: 1.0,
                    allow_deletions: None,
                },
            });
            let elapsed = t.elapsed();
            std::hint::black_box(p);
            elapsed
        })
        .min()
        .unwrap_or_default()
}

fn apply_request() -> RunRequest {
    RunRequest {
        mode: Mode::Apply,
        trigger: "bench".into(),
        allow_deletions: None,
        target: Target::All,
        deadline: None,
        full_read: false,
        refresh: Default::default(),
    }
}

/// One apply run and the virtual time it took.
fn timed_apply(
    rt: &tokio::runtime::Runtime,
    engine: &Engine,
    config: &Config,
) -> (Report, Duration) {
    rt.block_on(async {
        let t0 = tokio::time::Instant::now();
        let report = engine
            .run(config, &apply_request())
            .await
            .expect("the run completes its reads");
        (report, tokio::time::Instant::now() - t0)
    })
}

/// Runs one reconcile and measures it.
fn run_case(
    rt: &tokio::runtime::Runtime,
    world: &World,
    fakes: &Fakes,
    engine: &Engine,
    case: &'static str,
) -> Row {
    let config = world.config();
    let tenant = fakes.directory.with_tenant(|t| t.clone());
    let ledger: BTreeMap<Assignment, Owned> = fakes.state.with_data(|d| {
        d.ledger
            .iter()
            .map(|(a, e)| (a.clone(), e.owned.clone()))
            .collect()
    });
    let mut pairs = world.pairs();
    pairs.extend(
        ledger
            .keys()
            .map(|a| (a.account_id.clone(), a.permission_set_arn.clone())),
    );
    let actual: BTreeSet<Assignment> = fakes
        .sso
        .assignments()
        .into_iter()
        .filter(|a| pairs.contains(&(a.account_id.clone(), a.permission_set_arn.clone())))
        .collect();
    let observed = Observation {
        pairs: pairs.clone(),
    };
    let plan_cpu = uncounted(|| time_plan(world, &tenant, &actual, &observed, &ledger));
    let want = world.desired(&tenant);
    let creates = want.difference(&actual).count();
    let deletes = ledger.keys().filter(|a| !want.contains(*a)).count();
    // The pairs a run must read before it acts: where the ground truth says something changes.
    let changed: BTreeSet<(AccountId, String)> = want
        .symmetric_difference(&actual)
        .filter(|a| want.contains(*a) || ledger.contains_key(*a))
        .map(|a| (a.account_id.clone(), a.permission_set_arn.clone()))
        .collect();
    let now = rt.block_on(async { fakes.state.now_epoch() });
    let bound = bound(world, &tenant, fakes, &changed, (creates, deletes), now);
    drop((ledger, actual, tenant));

    fakes.reset_counts();
    fastrand::seed(42);
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let real0 = Instant::now();
    let (report, simulated) = timed_apply(rt, engine, &config);
    let real = real0.elapsed();
    let peak_heap = PEAK.load(Ordering::Relaxed) - base;
    let (c, d, outcome) = (
        report.creates.len(),
        report.deletes.len(),
        format!("{:?}", report.outcome),
    );
    let failures = report.failures.len();
    let (pairs_read, pairs_trusted) = (report.pairs_read, report.pairs_trusted);
    drop(report);
    let retained_heap = CURRENT.load(Ordering::Relaxed) - base;
    if failures > 0 {
        eprintln!("{} {case}: {failures} changes failed", world.spec.name);
    }
    let converged =
        fakes.sso.assignments() == world.desired(&fakes.directory.with_tenant(|t| t.clone()));
    let calls = fakes
        .services()
        .iter()
        .map(|s| (s.name(), s.calls()))
        .collect();
    let throttled = fakes.services().iter().map(|s| s.throttled()).sum();
    for (service, ops) in fakes.counts() {
        for (op, n) in ops.iter().filter(|(_, n)| n.throttled > 0) {
            eprintln!(
                "{} {case}: {service} {op}: {} of {} requests throttled",
                world.spec.name, n.throttled, n.calls
            );
        }
    }
    if (c, d) != (creates, deletes) {
        eprintln!(
            "{} {case}: the engine planned {c}+{d} changes, the ground truth {creates}+{deletes}",
            world.spec.name
        );
    }
    Row {
        size: world.spec.name,
        case,
        creates: c,
        deletes: d,
        outcome,
        converged,
        calls,
        throttled,
        pairs_read,
        pairs_trusted,
        bound,
        simulated,
        plan_cpu,
        real,
        peak_heap,
        retained_heap,
    }
}

/// A paused (virtual-time) runtime, the world of `spec`, its fakes and the production-wrapped
/// engine over them.
fn paused_world(spec: &Spec) -> (tokio::runtime::Runtime, World, Fakes, Engine) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    let world = World::generate(spec);
    // The fakes' clocks (lease expiry, settle times) start inside the paused runtime.
    let fakes = rt.block_on(async { world.fakes(SsoSettings::default()) });
    let engine = with_quotas(fakes.engine(ApplySettings::default()));
    (rt, world, fakes, engine)
}

fn run_size(spec: &Spec) -> (Vec<Row>, String) {
    let (rt, world, fakes, engine) = paused_world(spec);

    let tenant = fakes.directory.with_tenant(|t| t.clone());
    let desired = world.desired(&tenant).len();
    let pairs = world.pairs().len();
    let members_groups = world
        .rules
        .iter()
        .filter(|r| r.members)
        .map(|r| &r.group)
        .collect::<BTreeSet<_>>();
    let biggest = members_groups
        .iter()
        .map(|g| tenant.transitive_users(g).len())
        .max()
        .unwrap_or(0);
    drop(tenant);
    let mut about = format!(
        "{}: {} users, {} groups (depth {}{}), {} accounts, {} rules ({} members mode), {} permission sets → {desired} desired assignments over {pairs} (account, permission set) pairs; largest members-mode group {biggest} users",
        spec.name,
        spec.users,
        spec.groups,
        spec.depth,
        if spec.cycle { ", one cycle" } else { "" },
        spec.accounts,
        spec.rules,
        spec.members_rules,
        spec.permission_sets,
    );

    // Later runs come a schedule's interval after the one before, as in production; the
    // rolling audit reads the slice of the period that passed since the last run started.
    let interval = || rt.block_on(async { tokio::time::sleep(SCHEDULE).await });
    let mut rows = vec![run_case(&rt, &world, &fakes, &engine, "cold")];
    interval();
    rows.push(run_case(&rt, &world, &fakes, &engine, "quiet"));
    let moved = fakes
        .directory
        .with_tenant(|t| world.change_memberships(t, 1.0, spec.seed + 100));
    let _ = write!(about, "; 1% case: {moved} direct memberships moved");
    interval();
    rows.push(run_case(&rt, &world, &fakes, &engine, "1% changed"));
    // The hourly run: nothing changed, once the audit's slice and the organization are due
    // (`audit.every_minutes` after the last slice), so it reads a 24th of the pairs.
    let every = u64::from(world.config().audit.every_minutes) * 60;
    let cursor = fakes
        .state
        .with_data(|d| d.audit_cursor)
        .unwrap_or_default();
    // The fake's clock follows tokio's paused time only inside the runtime.
    let now = rt.block_on(async { fakes.state.now_epoch() });
    let wait = (cursor + every).saturating_sub(now);
    rt.block_on(async { tokio::time::sleep(SCHEDULE.max(Duration::from_secs(wait))).await });
    rows.push(run_case(&rt, &world, &fakes, &engine, "quiet, hourly"));
    // Steady state: nothing changed, 15 minutes after that: what three runs in four cost.
    interval();
    rows.push(run_case(&rt, &world, &fakes, &engine, "quiet, steady"));
    (rows, about)
}

// ---------------------------------------------------------------------------------------------
// the plan micro-benchmark
// ---------------------------------------------------------------------------------------------

/// `plan::plan` diffing 200,000 desired against 200,000 actual assignments: 10 rules of 200
/// accounts × 100 users each; 5% of the actual set is no longer wanted (deleted) and 5% of the
/// desired set is missing (created); the tool owns every actual assignment.
fn plan_micro() -> (Duration, Duration, usize, usize) {
    let ps = |k: usize| format!("arn:aws:sso:::permissionSet/ssoins-722355b8a6a0b2a8/ps-{k:016x}");
    let account = |i: usize| AccountId::try_from(format!("{:012}", 100_000_000_000 + i)).unwrap();
    let user = |u: usize| format!("9067c6f2b2-u{u:012x}");
    let rules: Vec<ResolvedRule> = (0..10)
        .map(|r| ResolvedRule {
            name: format!("rule-{r:03}"),
            permission_set_arn: ps(r),
            accounts: (r * 200..(r + 1) * 200).map(account).collect(),
            source: RuleSource::Resolved(
                (0..100)
                    .map(|u| Principal {
                        principal_type: PrincipalType::User,
                        principal_id: user(u),
                    })
                    .collect(),
            ),
            hold_deletions: None,
        })
        .collect();
    let mut actual = BTreeSet::new();
    let mut owned = BTreeMap::new();
    for r in 0..10 {
        for a in r * 200..(r + 1) * 200 {
            // Users 5..105: 0-4 are missing (creations), 100-104 are unwanted (deletions).
            for u in 5..105 {
                let asg = Assignment {
                    account_id: account(a),
                    permission_set_arn: ps(r),
                    principal_type: PrincipalType::User,
                    principal_id: user(u),
                };
                owned.insert(
                    asg.clone(),
                    Owned {
                        rules: BTreeSet::from([format!("rule-{r:03}")]),
                        pending: false,
                    },
                );
                actual.insert(asg);
            }
        }
    }
    let observed = Observation {
        pairs: actual
            .iter()
            .map(|a| (a.account_id.clone(), a.permission_set_arn.clone()))
            .collect(),
    };
    let t = time_plan_of(&rules, &actual, &observed, &owned);
    let desired_only = (0..3)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(plan::Desired::new(&rules));
            t.elapsed()
        })
        .min()
        .unwrap_or_default();
    let desired = plan::Desired::new(&rules).len();
    (t, desired_only, desired, actual.len())
}

// ---------------------------------------------------------------------------------------------
// output
// ---------------------------------------------------------------------------------------------

fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 3600.0 {
        format!("{:.2} h", s / 3600.0)
    } else if s >= 60.0 {
        format!("{:.1} min", s / 60.0)
    } else {
        format!("{s:.1} s")
    }
}

fn table(rows: &[Row]) -> String {
    let mut t = String::from(
        "| size | case | changes (+/−) | Graph calls (bound) | identitystore calls (bound) | sso-admin calls (bound) | pairs read / in play | organizations | DynamoDB | throttled | simulated wall | quota floor | ratio | plan CPU | run real time | peak heap (retained) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let ratio = r.simulated.as_secs_f64() / r.bound.floor.as_secs_f64().max(1e-9);
        let _ = writeln!(
            t,
            "| {} | {} | {} / {}{} | {} ({}) | {} ({}) | {} ({}) | {} / {} | {} ({}) | {} | {} | {} | {} | {:.2}× | {:.1} ms | {:.2} s | {:.1} MiB ({:.1}) |",
            r.size,
            r.case,
            r.creates,
            r.deletes,
            if r.converged { "" } else { " ⚠ not converged" },
            r.calls["graph"],
            r.bound.graph,
            r.calls["identitystore"],
            r.bound.identity_users + r.bound.identity_groups,
            r.calls["sso-admin"],
            r.bound.sso,
            r.pairs_read,
            r.pairs_read + r.pairs_trusted,
            r.calls["organizations"],
            r.bound.organizations,
            r.calls["dynamodb"],
            r.throttled,
            secs(r.simulated),
            secs(r.bound.floor),
            ratio,
            r.plan_cpu.as_secs_f64() * 1e3,
            r.real.as_secs_f64(),
            mib(r.peak_heap),
            mib(r.retained_heap),
        );
        if r.outcome != "Applied" && r.outcome != "InSync" {
            let _ = writeln!(
                t,
                "|  | outcome {} | | | | | | | | | | | | | | |",
                r.outcome
            );
        }
    }
    t
}

/// Issue 5's comparison: the medium world's cold sync with its members-mode rules as they are,
/// then with the same rules as `assign: mirror` (one group per Entra group, assigned once per
/// account, filled with memberships).
fn mirror_compare() -> String {
    let spec = Spec::medium();
    let mut t = String::from(
        "| medium, cold sync | assignments created | mirror memberships added | Graph calls | identitystore calls | sso-admin calls | simulated wall |\n|---|---|---|---|---|---|---|\n",
    );
    for mode in ["members", "mirror"] {
        let (rt, world, fakes, engine) = paused_world(&spec);
        let yaml = world
            .config_yaml
            .replace("assign: members", &format!("assign: {mode}"));
        let config = Config::parse(&yaml, "synthetic").expect("the synthetic config parses");
        fakes.reset_counts();
        let (report, simulated) = timed_apply(&rt, &engine, &config);
        let calls: BTreeMap<&str, u64> = fakes
            .services()
            .iter()
            .map(|s| (s.name(), s.calls()))
            .collect();
        let added: usize = report.memberships.iter().map(|m| m.added.len()).sum();
        let _ = writeln!(
            t,
            "| `assign: {mode}` | {} | {added} | {} | {} | {} | {:.1} min |",
            report.creates.len(),
            calls.get("graph").copied().unwrap_or_default(),
            calls.get("identitystore").copied().unwrap_or_default(),
            calls.get("sso-admin").copied().unwrap_or_default(),
            simulated.as_secs_f64() / 60.0
        );
    }
    t
}

/// How long one Lambda invocation may start changes: the 900 s timeout less the handler's
/// 60 s margin.
const INVOCATION: Duration = Duration::from_secs(900 - 60);

/// The large cold sync as the Lambda runs it: invocations of at most [`INVOCATION`] each, back
/// to back (the schedule's next event waits behind the running one: reserved concurrency 1),
/// until one finishes. Each continues from the ledger and the plan the one before carried.
fn invocations() -> String {
    let spec = Spec::large();
    let (rt, world, fakes, engine) = paused_world(&spec);
    let config = world.config();
    let mut t = String::from(
        "| invocation | simulated time | pairs read / in play | sso-admin calls | creations made | left for the next | creations per second (15 slots × 2 s settle allow 7.5) |\n|---|---|---|---|---|---|---|\n",
    );
    let (mut total, mut made_total) = (Duration::ZERO, 0);
    for n in 1..=30 {
        fakes.reset_counts();
        let (report, took) = rt.block_on(async {
            let t0 = tokio::time::Instant::now();
            let request = RunRequest {
                deadline: Some(t0 + INVOCATION),
                ..apply_request()
            };
            let report = engine
                .run(&config, &request)
                .await
                .expect("the run completes its reads");
            (report, tokio::time::Instant::now() - t0)
        });
        total += took;
        let made = report.creates.len() - report.deferred - report.failures.len();
        made_total += made;
        let _ = writeln!(
            t,
            "| {n} | {:.1} min | {} / {} | {} | {made} | {} | {:.2} |",
            took.as_secs_f64() / 60.0,
            report.pairs_read,
            report.pairs_read + report.pairs_trusted,
            fakes.sso.service().calls(),
            report.deferred,
            made as f64 / took.as_secs_f64(),
        );
        if report.outcome != entra_sso_sync::report::Outcome::Partial {
            break;
        }
    }
    let converged =
        fakes.sso.assignments() == world.desired(&fakes.directory.with_tenant(|t| t.clone()));
    let _ = writeln!(
        t,
        "\n{made_total} creations in {:.2} h of invocations{}",
        total.as_secs_f64() / 3600.0,
        if converged {
            "; Identity Center holds exactly the desired set"
        } else {
            "; ⚠ not converged"
        }
    );
    t
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wanted: Vec<&str> = if args.is_empty() {
        vec!["small", "medium", "large", "invocations", "plan"]
    } else {
        args.iter().map(String::as_str).collect()
    };
    let mut rows = Vec::new();
    let mut abouts = Vec::new();
    for name in &wanted {
        if ["plan", "mirror", "invocations"].contains(name) {
            continue;
        }
        let Some(spec) = Spec::by_name(name) else {
            eprintln!("unknown size {name:?}: expected small, medium, large or plan");
            std::process::exit(2);
        };
        let started = Instant::now();
        let (r, about) = run_size(&spec);
        eprintln!(
            "{} done in {:.1} s real time",
            spec.name,
            started.elapsed().as_secs_f64()
        );
        rows.extend(r);
        abouts.push(about);
    }
    if !rows.is_empty() {
        println!("{}", table(&rows));
        for a in abouts {
            println!("- {a}");
        }
    }
    if wanted.contains(&"mirror") {
        println!("{}", mirror_compare());
    }
    if wanted.contains(&"invocations") {
        println!(
            "\nlarge cold sync across Lambda invocations:\n\n{}",
            invocations()
        );
    }
    if wanted.contains(&"plan") {
        let (t, desired_only, desired, actual) = uncounted(plan_micro);
        println!(
            "\nplan::plan micro-benchmark: {desired} desired against {actual} actual assignments (10,000 creations, 10,000 deletions): {:.1} ms CPU, of which {:.1} ms building the desired set (plan::Desired::new); best of 3; target < 200 ms",
            t.as_secs_f64() * 1e3,
            desired_only.as_secs_f64() * 1e3
        );
    }
}

//! One reconcile run: gather (organization, Graph, identity store, ledger, Identity Center),
//! plan (pure), apply (bounded, asynchronous requests polled to the end), record. The CLI and
//! the Lambda handler both build a [`RunRequest`] and call [`Engine::run`].

use crate::aws::AwsError;
use crate::cache::{self, OrgView, Principals, Refresh};
use crate::config::{AssignMode, Config, GroupRef, PermissionSetRef, Protected, Rule};
use crate::directory::{DirGroup, DirUser, Directory, DirectoryError};
use crate::identity::{self, IdentityStore, Kind, Wanted};
use crate::mirror;
use crate::model::{AccountId, Assignment, Guid, Principal, PrincipalType};
use crate::organizations::OrganizationApi;
use crate::plan::{
    self, Change, Limits, Observation, Owned, PlanInput, Protection, ResolvedRule, RuleSource,
};
use crate::report::{ChangeView, Failure, Outcome, Report, RuleView, Unresolved};
use crate::scope::{self, Expansion, Organization, ScopeError};
use crate::settle::{Settler, Woken};
use crate::sso::{AssignmentApi, Operation, RequestStatus};
use crate::state::{
    epoch_seconds, now_rfc3339, Cached, CarriedPlan, Lease, LedgerEntry, RunRecord, SourceRecord,
    StateStore,
};
use crate::tenant::{self, Replica};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
// Tokio's clock (the system's, unless a test or the benchmark pauses it).
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Reads of current assignments in flight at once.
const READ_CONCURRENCY: usize = 8;

/// Plan only, or plan and apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Read everything, change nothing.
    Plan,
    /// Make the changes.
    Apply,
}

/// Which part of the configuration a run reconciles.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Every rule and account.
    #[default]
    All,
    /// Only what these accounts and Entra groups touch: rules reaching (or that used to reach)
    /// the accounts, and rules whose Entra group is or contains one of the groups.
    Only {
        /// Accounts that changed (created, moved, retagged).
        accounts: BTreeSet<AccountId>,
        /// Entra groups whose membership changed.
        entra_groups: BTreeSet<Guid>,
    },
}

impl Target {
    /// The union of two targets: what either asks for.
    pub fn merge(self, other: Target) -> Target {
        match (self, other) {
            (Target::All, _) | (_, Target::All) => Target::All,
            (
                Target::Only {
                    mut accounts,
                    mut entra_groups,
                },
                Target::Only {
                    accounts: a,
                    entra_groups: g,
                },
            ) => {
                accounts.extend(a);
                entra_groups.extend(g);
                Target::Only {
                    accounts,
                    entra_groups,
                }
            }
        }
    }
}

/// What to run, as the CLI or the Lambda handler asks for it.
#[derive(Clone, Debug)]
pub struct RunRequest {
    /// Plan or apply.
    pub mode: Mode,
    /// What started the run (`cli`, `schedule`, …), recorded with it.
    pub trigger: String,
    /// The operator's one-off deletion allowance.
    pub allow_deletions: Option<u32>,
    /// Which rules and accounts to reconcile.
    pub target: Target,
    /// No change starts after this instant (a Lambda sets it short of its timeout); changes
    /// not started are reported as deferred and the next run picks them up.
    pub deadline: Option<Instant>,
    /// Read everything afresh: every pair in play instead of trusting the state table for
    /// those nothing will change (an audit now), the tenant from the start, and no cache.
    pub full_read: bool,
    /// Caches an event says are stale.
    pub refresh: Refresh,
}

/// A run that could not complete its reads; nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Microsoft Graph failed.
    #[error("reading Entra: {0}")]
    Directory(#[from] DirectoryError),
    /// An AWS call failed.
    #[error("{0}")]
    Aws(#[from] AwsError),
    /// A rule names a permission set the instance does not have.
    #[error("rule {rule}: no permission set named {name:?} in the Identity Center instance")]
    UnknownPermissionSet {
        /// The rule.
        rule: String,
        /// The name it gave.
        name: String,
    },
    /// A rule's scope names an account or OU that does not exist, or is ambiguous.
    #[error(transparent)]
    Scope(#[from] ScopeError),
    /// Another apply holds the lease; this run changed nothing.
    #[error("another apply ({holder}) is running; its lease expires in {seconds_left} s unless renewed. Nothing was changed")]
    Busy {
        /// The other run's id.
        holder: String,
        /// Seconds until its lease expires.
        seconds_left: u64,
    },
}

/// Tunables of the apply phase.
#[derive(Clone, Copy, Debug)]
pub struct ApplySettings {
    /// Assignment requests outstanding at once (Identity Center allows 15 creations).
    pub max_in_flight: usize,
    /// First wait before polling a request's status: about when requests settle (1–3 s), so
    /// few polls are spent on requests still running.
    pub poll_first: Duration,
    /// Wait between later polls. Each poll is an sso-admin request under the 20/s quota, and
    /// each second of lag holds one of the 15 creation slots; 1 s balances the two.
    pub poll_every: Duration,
    /// How often the requests in progress are listed ([`crate::settle::Settler`]): one
    /// request tells which of up to 15 outstanding ones settled, so a slot is freed within
    /// about this long of its request settling. At 250 ms the listing takes 4 of sso-admin's
    /// 20 requests per second and the creations and their final reads fit in the rest.
    pub list_every: Duration,
    /// How long creations left at a deadline are carried to the next runs without reading
    /// their pairs again (counted from when the pairs were read).
    pub carry_for: Duration,
    /// Give up waiting on one request after this long (it stays pending in the ledger).
    pub settle_timeout: Duration,
    /// How long the apply lease lives unless renewed (renewed every third of it): a run that
    /// died blocks the next one for at most this long.
    pub lease_ttl_seconds: u64,
}

impl Default for ApplySettings {
    fn default() -> Self {
        ApplySettings {
            max_in_flight: 15,
            poll_first: Duration::from_millis(1500),
            poll_every: Duration::from_secs(1),
            list_every: Duration::from_millis(250),
            carry_for: Duration::from_secs(3600),
            settle_timeout: Duration::from_secs(600),
            lease_ttl_seconds: 60,
        }
    }
}

/// The engine: the adapters, built once and shared by every run.
#[derive(Clone)]
pub struct Engine {
    /// Entra, through Graph.
    pub directory: Arc<dyn Directory>,
    /// The identity store.
    pub identity: Arc<dyn IdentityStore>,
    /// sso-admin.
    pub sso: Arc<dyn AssignmentApi>,
    /// The state table.
    pub state: Arc<dyn StateStore>,
    /// AWS Organizations (read only when a rule needs it).
    pub organizations: Arc<dyn OrganizationApi>,
    /// Apply tunables.
    pub settings: ApplySettings,
}

/// Each rule's expanded scope, in configuration order.
pub struct Scopes {
    /// One expansion per rule.
    pub expansions: Vec<Expansion>,
    /// Accounts no rule may target this run, with why (the management account, for a
    /// delegated administrator).
    pub unmanageable: BTreeMap<AccountId, String>,
    /// The organization, when some rule needed it read.
    pub organization: Option<Organization>,
}

/// Everything gathered before planning.
#[derive(Default)]
pub(crate) struct Gathered {
    pub(crate) rules: Vec<ResolvedRule>,
    pub(crate) views: Vec<RuleView>,
    unresolved: Vec<Unresolved>,
    pub(crate) principal_names: BTreeMap<Principal, String>,
    permission_set_names: BTreeMap<String, String>,
    /// Each evaluated rule's group and member count, recorded after an apply.
    sources: Vec<SourceRecord>,
    /// Things a person should know that are not errors.
    pub(crate) warnings: Vec<String>,
    /// Entra groups mirrored by this run's rules, by object id.
    pub(crate) mirror_sources: BTreeMap<String, mirror::Source>,
    /// Display names of mirror groups created by this run.
    pub(crate) created_mirrors: Vec<String>,
}

/// What an apply left undone, and what a person should know of it.
struct Applied {
    /// Changes that failed.
    failures: Vec<Failure>,
    /// Changes not started because the run had to stop (deadline or lease).
    deferred: usize,
    /// The creations among them, for the next run.
    left_creates: Vec<Assignment>,
    /// Things a person should know.
    warnings: Vec<String>,
}

/// When to stop starting changes: the deadline, or the lease lost.
struct Stop {
    deadline: Option<Instant>,
    lease_lost: Arc<AtomicBool>,
}

impl Stop {
    fn new(deadline: Option<Instant>) -> Stop {
        Stop {
            deadline,
            lease_lost: Arc::new(AtomicBool::new(false)),
        }
    }

    fn now(&self) -> bool {
        self.lease_lost.load(Ordering::SeqCst) || self.deadline.is_some_and(|d| Instant::now() >= d)
    }
}

/// `safety.protected` resolved to principals by the names this run knows (group display
/// names exactly, user names case-insensitively).
fn protection(protected: &Protected, names: &BTreeMap<Principal, String>) -> Protection {
    let principals = names
        .iter()
        .filter(|(p, name)| {
            protected
                .principals
                .iter()
                .any(|want| match p.principal_type {
                    PrincipalType::Group => want == *name,
                    PrincipalType::User => want.eq_ignore_ascii_case(name),
                })
        })
        .map(|(p, _)| p.clone())
        .collect();
    Protection {
        accounts: protected.accounts.iter().cloned().collect(),
        principals,
    }
}

/// The instance's permission sets, both ways, when some rule names one by name.
#[derive(Default)]
pub(crate) struct PermissionSets {
    by_name: BTreeMap<String, String>,
    pub(crate) names: BTreeMap<String, String>,
}

impl PermissionSets {
    /// The ARN a rule's permission set stands for.
    pub(crate) fn arn_of(&self, rule: &Rule) -> Result<String, EngineError> {
        match &rule.permission_set {
            PermissionSetRef::Arn(arn) => Ok(arn.clone()),
            PermissionSetRef::Name(name) => {
                self.by_name
                    .get(name)
                    .cloned()
                    .ok_or_else(|| EngineError::UnknownPermissionSet {
                        rule: rule.name.to_string(),
                        name: name.clone(),
                    })
            }
        }
    }
}

/// A rule chosen for this run, and the accounts of its scope this run reconciles.
struct Selected<'a> {
    rule: &'a Rule,
    expansion: &'a Expansion,
    accounts: BTreeSet<AccountId>,
}

impl Engine {
    /// Runs one reconcile. An `Err` means the reads did not complete and nothing changed;
    /// per-change failures during apply are in the report instead. An apply run holds the
    /// state table's lease for its whole life, so two applies never overlap.
    pub async fn run(&self, config: &Config, req: &RunRequest) -> Result<Report, EngineError> {
        let started_at = now_rfc3339();
        let run_id = format!(
            "{}-{:08x}",
            started_at.replace([':', '-'], ""),
            fastrand::u32(..)
        );
        tracing::info!(run_id, trigger = req.trigger, mode = ?req.mode, target = ?req.target, "run started");
        if req.mode == Mode::Plan {
            let stop = Stop::new(req.deadline);
            return self.run_inner(config, req, run_id, started_at, &stop).await;
        }
        let ttl = self.settings.lease_ttl_seconds;
        match self.state.acquire_lease(&run_id, ttl).await? {
            Lease::Acquired => {}
            Lease::HeldBy { holder, expires_at } => {
                return Err(EngineError::Busy {
                    holder,
                    seconds_left: expires_at.saturating_sub(epoch_seconds()),
                })
            }
        }
        let stop = Stop::new(req.deadline);
        let renewer = {
            let (state, holder, lost) =
                (self.state.clone(), run_id.clone(), stop.lease_lost.clone());
            tokio::spawn(async move {
                let every = Duration::from_secs((ttl / 3).max(1));
                loop {
                    tokio::time::sleep(every).await;
                    if !matches!(state.renew_lease(&holder, ttl).await, Ok(true)) {
                        tracing::error!("lost the apply lease: no new change will start");
                        lost.store(true, Ordering::SeqCst);
                        return;
                    }
                }
            })
        };
        let result = self
            .run_inner(config, req, run_id.clone(), started_at, &stop)
            .await;
        renewer.abort();
        if let Err(e) = self.state.release_lease(&run_id).await {
            tracing::warn!(error = %e, "could not release the apply lease; it expires by itself");
        }
        result
    }

    async fn run_inner(
        &self,
        config: &Config,
        req: &RunRequest,
        run_id: String,
        started_at: String,
        stop: &Stop,
    ) -> Result<Report, EngineError> {
        let started = Instant::now();
        let ledger = self.state.ledger().await?;
        let sources: BTreeMap<String, SourceRecord> = self
            .state
            .sources()
            .await?
            .into_iter()
            .map(|s| (s.rule.clone(), s))
            .collect();
        let mirror_records = self.state.mirrors().await?;
        let seen: BTreeSet<Assignment> = self.state.seen().await?.into_iter().collect();
        let audit_cursor = self.state.audit_cursor().await?;
        let keep = req.mode == Mode::Apply;
        let mut refresh = if req.full_read {
            Refresh::ALL
        } else {
            req.refresh
        };
        // Accounts are targeted because they were created, moved or retagged.
        refresh.organization |=
            matches!(&req.target, Target::Only { accounts, .. } if !accounts.is_empty());
        let now = self.state.now_epoch();
        let scopes = self.scopes(config, refresh.organization, keep, now).await?;
        let tenant = self.tenant(keep, req.full_read).await?;
        let groups = self.find_groups(config, &tenant)?;
        let permission_sets = self.permission_sets(config, keep).await?;
        let selected = self.select(
            config,
            &req.target,
            &scopes,
            &groups,
            &permission_sets,
            &tenant,
        )?;
        let mut g = self
            .resolve(
                &selected,
                &tenant,
                &groups,
                &scopes,
                permission_sets,
                &sources,
                config,
                Trust {
                    refresh: refresh.principals,
                    keep,
                    now,
                },
            )
            .await?;
        let mut mirror_failures = Vec::new();
        let mirrors = mirror::prepare(
            self.identity.as_ref(),
            self.state.as_ref(),
            &config.mirror,
            &mut g,
            &mirror_records,
            req.mode == Mode::Apply,
            matches!(req.target, Target::All),
            &mut mirror_failures,
        )
        .await?;

        let mut observed = Observation::default();
        for r in &g.rules {
            for acct in &r.accounts {
                observed
                    .pairs
                    .insert((acct.clone(), r.permission_set_arn.clone()));
            }
        }
        let targeted_accounts = match &req.target {
            Target::All => None,
            Target::Only { accounts, .. } => Some(accounts),
        };
        for e in &ledger {
            let a = &e.assignment;
            // A full run judges every ledger entry. A targeted run judges only the pairs of
            // its selected rules and the targeted accounts, where every rule that reaches them
            // was selected; other entries wait for a full run rather than be judged half-known.
            let in_reach =
                targeted_accounts.is_none_or(|accounts| accounts.contains(&a.account_id));
            if in_reach && !scopes.unmanageable.contains_key(&a.account_id) {
                observed
                    .pairs
                    .insert((a.account_id.clone(), a.permission_set_arn.clone()));
            }
            if let Some(name) = &e.principal_name {
                g.principal_names
                    .entry(a.principal())
                    .or_insert_with(|| name.clone());
            }
        }
        let owned: BTreeMap<Assignment, Owned> = ledger
            .into_iter()
            .map(|e| (e.assignment, e.owned))
            .collect();

        // Read the pairs the plan may change and the audit's slice; trust the rest.
        // Only a full run knows every rule's wants, so only it audits and tidies; it takes a
        // slice at most every `audit.every_minutes`, so the runs between read no audit pairs.
        let full = matches!(req.target, Target::All);
        let audit_due = audit_due(audit_cursor, now, &config.audit);
        let slice = if req.full_read {
            AuditSlice::Everything
        } else if full && audit_due {
            AuditSlice::since(audit_cursor, now, config.audit.period_hours)
        } else {
            AuditSlice::Nothing
        };
        // Creations the last run planned but did not reach before its deadline: their pairs
        // were read then and found without them, so for a while they need not be read again.
        let carried = if full {
            self.state
                .carried_plan()
                .await?
                .filter(|p| now.saturating_sub(p.read_at) <= self.settings.carry_for.as_secs())
        } else {
            None
        };
        let carried_keys: BTreeSet<Key<'_>> =
            carried.iter().flat_map(|p| &p.creates).map(key).collect();
        let desired = desired_keys(&g.rules);
        let to_read = pairs_to_read(&desired, &owned, &seen, &carried_keys, &observed, slice);
        let believed: Vec<&Assignment> = owned
            .iter()
            .filter(|(_, o)| !o.pending)
            .map(|(a, _)| a)
            .chain(&seen)
            .filter(|a| observed.covers(a) && !to_read.covers(a))
            .collect();
        let mut actual = self.read_assignments(&g.rules, &owned, &to_read).await?;
        actual.extend(believed.into_iter().cloned());
        let (pairs_read, pairs_trusted) = (
            to_read.pairs.len(),
            observed.pairs.len() - to_read.pairs.len(),
        );

        let protection = protection(&config.safety.protected, &g.principal_names);
        let plan = plan::plan(PlanInput {
            rules: &g.rules,
            actual: &actual,
            observed: &observed,
            owned: &owned,
            mirrors: &mirrors,
            protection: &protection,
            limits: Limits {
                max_deletions: config.safety.max_deletions,
                max_deletion_ratio: config.safety.max_deletion_ratio.get(),
                allow_deletions: req.allow_deletions,
            },
        });
        tracing::info!(
            creates = plan.creates.len(),
            deletes = plan.deletes.len(),
            held = plan.held.len(),
            mirrors = plan.mirrors.len(),
            unchanged = plan.unchanged,
            "plan computed"
        );

        let (mut failures, mut deferred) = (mirror_failures, 0);
        if req.mode == Mode::Apply {
            let applied = self.apply(&plan, &g, &run_id, stop).await;
            failures.extend(applied.failures);
            deferred = applied.deferred;
            g.warnings.extend(applied.warnings);
            if full && (carried.is_some() || !applied.left_creates.is_empty()) {
                let read_at = match &carried {
                    Some(c)
                        if applied
                            .left_creates
                            .iter()
                            .any(|a| carried_keys.contains(&key(a))) =>
                    {
                        c.read_at
                    }
                    _ => now,
                };
                let next = CarriedPlan {
                    read_at,
                    creates: applied.left_creates,
                };
                if let Err(e) = self.state.put_carried_plan(&next).await {
                    tracing::warn!(error = %e, "could not carry the plan; the next run reads its pairs again");
                }
            }
            if deferred == 0 && stop.lease_lost.load(Ordering::SeqCst) {
                failures.push(Failure {
                    change: ChangeView::default(),
                    operation: "lease".into(),
                    error: "the apply lease was lost during the run".into(),
                });
            }
            self.record_sources(&g, &sources, req.allow_deletions.is_some())
                .await;
            self.record_seen(&desired, &actual, &owned, &seen, &to_read, full)
                .await;
            if full && (audit_due || req.full_read) {
                if let Err(e) = self.state.put_audit_cursor(now).await {
                    tracing::warn!(error = %e, "could not move the audit cursor; the next run reads this slice again");
                }
            }
        }

        let view = |c: &Change| ChangeView::new(c, &g.permission_set_names, &g.principal_names);
        let rules_held = g
            .rules
            .iter()
            .any(|r| matches!(r.source, RuleSource::Held { .. }));
        let outcome = Outcome::decide(req.mode, &plan, !failures.is_empty(), rules_held, deferred);
        let mut report = Report {
            run_id,
            trigger: req.trigger.clone(),
            target: req.target.clone(),
            mode: req.mode,
            outcome,
            started_at,
            duration_ms: 0,
            creates: plan.creates.iter().map(view).collect(),
            deletes: plan.deletes.iter().map(view).collect(),
            held: plan
                .held
                .iter()
                .map(|h| (view(&h.change), h.reason.clone()).into())
                .collect(),
            memberships: mirror::views(&plan, &g.principal_names, &g.created_mirrors),
            held_memberships: plan.held_mirrors.clone(),
            unchanged: plan.unchanged,
            unresolved: g.unresolved,
            warnings: g.warnings,
            rules: g.views,
            guard: plan.guard.clone(),
            failures,
            deferred,
            ledger_claimed: plan.claim.len(),
            ledger_forgotten: plan.forget.len(),
            calls: BTreeMap::from([
                ("graph".to_string(), self.directory.calls()),
                ("identitystore".to_string(), self.identity.calls()),
                ("organizations".to_string(), self.organizations.calls()),
                ("sso-admin".to_string(), self.sso.calls()),
            ]),
            pairs_read,
            pairs_trusted,
        };
        report.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.record(&report).await;
        tracing::info!(run_id = report.run_id, outcome = ?report.outcome, duration_ms = report.duration_ms, "run finished");
        Ok(report)
    }

    /// The current assignments of every observed pair that matter to the plan: those of the
    /// principals it could create or judge. They are read per pair (`ListAccountAssignments`)
    /// or per principal across all accounts (`ListAccountAssignmentsForPrincipal`), whichever
    /// takes fewer calls; several reads in flight (the service's rate limit, not latency,
    /// should bound a large read). Any failed read fails the run.
    async fn read_assignments(
        &self,
        rules: &[ResolvedRule],
        ledger: &BTreeMap<Assignment, Owned>,
        observed: &Observation,
    ) -> Result<BTreeSet<Assignment>, EngineError> {
        let reads = choose_reads(rules, ledger, observed);
        tracing::info!(
            pairs = observed.pairs.len(),
            reads = reads.len(),
            per_principal = matches!(reads.first(), Some(Read::Principal(_))),
            "reading current assignments"
        );
        let gate = Arc::new(Semaphore::new(READ_CONCURRENCY));
        let mut tasks = JoinSet::new();
        for read in reads {
            let (sso, gate) = (self.sso.clone(), gate.clone());
            tasks.spawn(async move {
                let _permit = gate.acquire_owned().await;
                let found: Result<Vec<Assignment>, AwsError> = match &read {
                    Read::Pair(acct, ps) => sso.assigned(acct, ps).await.map(|principals| {
                        principals
                            .into_iter()
                            .map(|p| Assignment {
                                account_id: acct.clone(),
                                permission_set_arn: ps.clone(),
                                principal_type: p.principal_type,
                                principal_id: p.principal_id,
                            })
                            .collect()
                    }),
                    Read::Principal(p) => sso.assigned_to(p).await.map(|pairs| {
                        pairs
                            .into_iter()
                            .map(|(account_id, permission_set_arn)| Assignment {
                                account_id,
                                permission_set_arn,
                                principal_type: p.principal_type,
                                principal_id: p.principal_id.clone(),
                            })
                            .collect()
                    }),
                };
                found
            });
        }
        let mut actual = BTreeSet::new();
        while let Some(joined) = tasks.join_next().await {
            let found = joined.map_err(|e| {
                AwsError::malformed(
                    "sso-admin",
                    "ListAccountAssignments",
                    format!("task failed: {e}"),
                )
            })??;
            // A principal's other pairs are outside this run's judgement.
            actual.extend(found.into_iter().filter(|a| observed.covers(a)));
        }
        Ok(actual)
    }

    /// After an apply: pins each evaluated rule to the object id its group name resolved to,
    /// and remembers how many members it had. A rule whose deletions were held keeps its old
    /// count, so it stays held until the operator confirms.
    async fn record_sources(
        &self,
        g: &Gathered,
        recorded: &BTreeMap<String, SourceRecord>,
        confirmed: bool,
    ) {
        for source in &g.sources {
            // Unchanged since the last apply: a quiet run writes nothing.
            if recorded.get(&source.rule) == Some(source) {
                continue;
            }
            let rule = g.rules.iter().find(|r| r.name == source.rule);
            if rule.is_some_and(|r| r.hold_deletions.is_some()) && !confirmed {
                continue;
            }
            if let Err(e) = self.state.put_source(source).await {
                tracing::warn!(rule = source.rule, error = %e, "could not record the rule's source");
            }
        }
    }

    /// After an apply: remembers the unowned assignments the rules want, as read in the pairs
    /// read this run, so later runs can trust them; a full run also forgets those no rule wants
    /// any more. A failure is logged: the next run reads those pairs again.
    async fn record_seen(
        &self,
        desired: &BTreeSet<Key<'_>>,
        actual: &BTreeSet<Assignment>,
        owned: &BTreeMap<Assignment, Owned>,
        seen: &BTreeSet<Assignment>,
        read: &Observation,
        full: bool,
    ) {
        let is_desired = |a: &Assignment| desired.contains(&key(a));
        let now: BTreeSet<&Assignment> = actual
            .iter()
            .filter(|a| read.covers(a) && !owned.contains_key(*a) && is_desired(a))
            .collect();
        for a in now.iter().filter(|a| !seen.contains(**a)) {
            if let Err(e) = self.state.put_seen(a).await {
                tracing::warn!(assignment = %a, error = %e, "could not record an unowned assignment");
            }
        }
        for a in seen {
            let gone = read.covers(a) && !now.contains(a);
            let unwanted = full && !is_desired(a);
            if gone || unwanted {
                if let Err(e) = self.state.remove_seen(a).await {
                    tracing::warn!(assignment = %a, error = %e, "could not forget an unowned assignment");
                }
            }
        }
    }

    /// Records the run; a failure to record is logged, not fatal: the changes were made.
    async fn record(&self, report: &Report) {
        let record = RunRecord {
            run_id: report.run_id.clone(),
            started_at: report.started_at.clone(),
            trigger: report.trigger.clone(),
            mode: format!("{:?}", report.mode).to_lowercase(),
            outcome: report.outcome.as_str().to_string(),
            duration_ms: report.duration_ms,
            counts: report.counts(),
            report_json: serde_json::to_string(report).unwrap_or_default(),
        };
        if let Err(e) = self.state.record_run(&record).await {
            tracing::error!(error = %e, "could not record the run in the state table");
        }
    }

    /// The Entra tenant, brought up to date from the replica in the state table by delta
    /// rounds, and written back when `keep` and it changed (or its links are a day old). A
    /// stored replica that cannot be read is rebuilt from Graph, with a warning.
    pub(crate) async fn tenant(&self, keep: bool, afresh: bool) -> Result<Replica, EngineError> {
        let now = self.state.now_epoch();
        let cached = if afresh {
            None
        } else {
            cache::read(self.state.as_ref(), tenant::CACHE_NAME).await
        };
        let stored = match cached {
            Some(c) => match Replica::decode(&c.bytes, c.written_at) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(error = %e, "the stored tenant replica is unreadable; reading the tenant in full");
                    None
                }
            },
            None => None,
        };
        let (replica, summary) = tenant::sync(self.directory.as_ref(), stored, now).await?;
        let (groups, users) = replica.len();
        tracing::info!(
            groups,
            users,
            group_changes = summary.group_changes,
            user_changes = summary.user_changes,
            full_reads = ?summary.full_reads,
            "tenant replica synced"
        );
        if keep && (summary.changed() || !replica.links_fresh(now)) {
            let value = Cached {
                written_at: now,
                bytes: replica.encode(),
            };
            if let Err(e) = self.state.put_cache(tenant::CACHE_NAME, &value).await {
                tracing::warn!(error = %e, "could not store the tenant replica; the next run reads these changes again");
            }
        }
        Ok(replica)
    }

    /// The rules' scopes, from the organization kept in the state table while it is younger
    /// than `audit.every_minutes` and no event said it changed; otherwise read from
    /// Organizations (and kept, when `keep`).
    async fn scopes(
        &self,
        config: &Config,
        refresh: bool,
        keep: bool,
        now: u64,
    ) -> Result<Scopes, EngineError> {
        let Some(with_tags) = organization_needed(config) else {
            return expand_with(config, None);
        };
        let max_age = u64::from(config.audit.every_minutes) * 60;
        if !refresh {
            if let Some((view, at)) =
                cache::load::<OrgView>(self.state.as_ref(), cache::ORGANIZATION).await
            {
                if now.saturating_sub(at) < max_age && (view.with_tags || !with_tags) {
                    return expand_with(config, Some(&view));
                }
            }
        }
        let view = read_organization(self.organizations.as_ref(), with_tags).await?;
        if keep {
            cache::store(self.state.as_ref(), cache::ORGANIZATION, &view, now).await;
        }
        expand_with(config, Some(&view))
    }

    /// Looks up each distinct Entra group once, however many rules name it. A group that does
    /// not exist, or a name that several groups share, is an `Err` for the rules naming it.
    pub(crate) fn find_groups(
        &self,
        config: &Config,
        tenant: &Replica,
    ) -> Result<BTreeMap<GroupRef, Result<DirGroup, String>>, EngineError> {
        let mut groups = BTreeMap::new();
        for rule in &config.assignments {
            if groups.contains_key(&rule.entra_group) {
                continue;
            }
            let found = match &rule.entra_group {
                GroupRef::Id(id) => tenant
                    .group(id.as_str())
                    .ok_or_else(|| format!("Entra group {id} does not exist")),
                GroupRef::Name(name) => {
                    let mut hits = tenant.groups_by_name(name);
                    match hits.len() {
                        1 => Ok(hits.remove(0)),
                        0 => Err(format!("no Entra group is named {name:?}")),
                        n => Err(format!(
                            "{n} Entra groups are named {name:?} ({}); name it by object id",
                            hits.iter()
                                .map(|g| g.id.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )),
                    }
                }
            };
            groups.insert(rule.entra_group.clone(), found);
        }
        Ok(groups)
    }

    /// Chooses the rules a run reconciles and, for each, the accounts of its scope in play.
    /// A targeted run also takes every rule that shares an (account, permission set) pair with
    /// a chosen one, so no assignment is judged without all the rules that may want it.
    fn select<'a>(
        &self,
        config: &'a Config,
        target: &Target,
        scopes: &'a Scopes,
        groups: &BTreeMap<GroupRef, Result<DirGroup, String>>,
        permission_sets: &PermissionSets,
        tenant: &Replica,
    ) -> Result<Vec<Selected<'a>>, EngineError> {
        let rules: Vec<(&Rule, &Expansion)> =
            config.assignments.iter().zip(&scopes.expansions).collect();
        let in_scope = |e: &Expansion| -> BTreeSet<AccountId> {
            e.accounts
                .keys()
                .filter(|a| !scopes.unmanageable.contains_key(*a))
                .cloned()
                .collect()
        };
        let (accounts, entra_groups) = match target {
            Target::All => {
                return Ok(rules
                    .into_iter()
                    .map(|(rule, expansion)| Selected {
                        rule,
                        expansion,
                        accounts: in_scope(expansion),
                    })
                    .collect())
            }
            Target::Only {
                accounts,
                entra_groups,
            } => (accounts, entra_groups),
        };

        // Rules whose Entra group is, or contains, a changed group.
        let mut by_group: BTreeSet<&str> = BTreeSet::new();
        if !entra_groups.is_empty() {
            let mut contains: BTreeMap<&str, bool> = BTreeMap::new();
            for (rule, _) in &rules {
                let Some(Ok(g)) = groups.get(&rule.entra_group) else {
                    continue;
                };
                if !contains.contains_key(g.id.as_str()) {
                    let hit = entra_groups
                        .iter()
                        .any(|t| t.as_str() == g.id.to_ascii_lowercase())
                        || tenant
                            .transitive_groups(&g.id)
                            .unwrap_or_default()
                            .iter()
                            .any(|n| {
                                entra_groups
                                    .iter()
                                    .any(|t| t.as_str() == n.id.to_ascii_lowercase())
                            });
                    contains.insert(g.id.as_str(), hit);
                }
                if contains[g.id.as_str()] {
                    by_group.insert(rule.name.as_str());
                }
            }
        }
        let mut chosen: BTreeMap<&str, BTreeSet<AccountId>> = BTreeMap::new();
        for (rule, expansion) in &rules {
            let scope = in_scope(expansion);
            let accounts: BTreeSet<AccountId> = if by_group.contains(rule.name.as_str()) {
                scope
            } else {
                scope.intersection(accounts).cloned().collect()
            };
            if !accounts.is_empty() || by_group.contains(rule.name.as_str()) {
                chosen.insert(rule.name.as_str(), accounts);
            }
        }
        // Pairs in play: every rule with a scope account in one of them joins, for those accounts.
        let mut pairs: BTreeSet<(AccountId, String)> = BTreeSet::new();
        for (rule, _) in &rules {
            let arn = permission_sets.arn_of(rule)?;
            for a in chosen.get(rule.name.as_str()).into_iter().flatten() {
                pairs.insert((a.clone(), arn.clone()));
            }
        }
        for (rule, expansion) in &rules {
            let arn = permission_sets.arn_of(rule)?;
            let shared: BTreeSet<AccountId> = in_scope(expansion)
                .into_iter()
                .filter(|a| pairs.contains(&(a.clone(), arn.clone())))
                .collect();
            if !shared.is_empty() {
                chosen.entry(rule.name.as_str()).or_default().extend(shared);
            }
        }
        Ok(rules
            .into_iter()
            .filter_map(|(rule, expansion)| {
                chosen.remove(rule.name.as_str()).map(|accounts| Selected {
                    rule,
                    expansion,
                    accounts,
                })
            })
            .collect())
    }

    /// Reads members and finds the identity-store principals and permission sets of the
    /// selected rules; checks name pins and sudden loss of members against the last apply.
    #[allow(clippy::too_many_arguments)] // each is a distinct input the resolution needs
    async fn resolve(
        &self,
        selected: &[Selected<'_>],
        tenant: &Replica,
        groups: &BTreeMap<GroupRef, Result<DirGroup, String>>,
        scopes: &Scopes,
        permission_sets: PermissionSets,
        sources: &BTreeMap<String, SourceRecord>,
        config: &Config,
        trust: Trust,
    ) -> Result<Gathered, EngineError> {
        let suggest_mirror_above = config.mirror.suggest_mirror_above;
        // Transitive members of each members/mirror group, read in full or not at all.
        let mut members: BTreeMap<String, Vec<DirUser>> = BTreeMap::new();
        for s in selected {
            if let (AssignMode::Members | AssignMode::Mirror, Some(Ok(g))) =
                (s.rule.assign, groups.get(&s.rule.entra_group))
            {
                if !members.contains_key(&g.id) {
                    let users = tenant.transitive_users(&g.id).unwrap_or_default();
                    tracing::info!(
                        group = g.display_name,
                        members = users.len(),
                        "transitive members from the replica"
                    );
                    members.insert(g.id.clone(), users);
                }
            }
        }

        let wanted_groups: BTreeSet<Wanted> = selected
            .iter()
            .filter(|s| s.rule.assign == AssignMode::Group)
            .filter_map(|s| groups.get(&s.rule.entra_group)?.as_ref().ok())
            .map(|g| Wanted {
                entra_id: g.id.clone(),
                name: g.display_name.clone(),
            })
            .collect();
        let mut known = self.known_principals(config, trust).await?;
        let before = known.clone();
        let store_groups = self
            .find_principals(
                Kind::Group,
                wanted_groups,
                &mut known.groups,
                &mut known.groups_in_store,
            )
            .await?;
        let wanted_users: BTreeSet<Wanted> = members
            .values()
            .flatten()
            .filter(|u| u.account_enabled)
            .map(|u| Wanted {
                entra_id: u.id.clone(),
                name: u.user_principal_name.clone(),
            })
            .collect();
        let store_users = self
            .find_principals(
                Kind::User,
                wanted_users,
                &mut known.users,
                &mut known.users_in_store,
            )
            .await?;
        if trust.keep && known != before {
            cache::store(self.state.as_ref(), cache::PRINCIPALS, &known, trust.now).await;
        }

        let mut g_out = Gathered::default();
        let mut unresolved: BTreeMap<String, Unresolved> = BTreeMap::new();
        for s in selected {
            let rule = s.rule;
            let permission_set_arn = permission_sets.arn_of(rule)?;
            let last = sources.get(rule.name.as_str());
            let mut hold_deletions = s
                .expansion
                .accounts
                .is_empty()
                .then(|| "its scope expands to zero accounts".to_string());
            let found = match groups.get(&rule.entra_group) {
                Some(Ok(g)) => match (&rule.entra_group, last) {
                    // Name pinning: a name that now means another object is not trusted.
                    (GroupRef::Name(name), Some(pin)) if !pin.entra_group_id.eq_ignore_ascii_case(&g.id) => Err(format!(
                        "the name {name:?} now resolves to Entra group {} but resolved to {} before (deleted and recreated, or renamed?); name the group by object id to confirm",
                        g.id, pin.entra_group_id
                    )),
                    _ => Ok(g),
                },
                Some(Err(reason)) => Err(reason.clone()),
                None => Err("Entra group was not looked up".into()),
            };
            let source = match found {
                Err(reason) => RuleSource::Held { reason },
                Ok(g) => {
                    // Resolve the members once for the members and mirror modes.
                    let mut users = BTreeMap::new();
                    if rule.assign != AssignMode::Group {
                        let entra_members =
                            members.get(&g.id).map(Vec::as_slice).unwrap_or_default();
                        for u in entra_members {
                            match store_users.get(&u.id).filter(|_| u.account_enabled) {
                                Some(id) => {
                                    users.insert(id.clone(), u.user_principal_name.clone());
                                }
                                None => {
                                    let reason = if u.account_enabled {
                                        "no Identity Center user with this userName"
                                    } else {
                                        "account disabled in Entra"
                                    };
                                    unresolved
                                        .entry(u.id.clone())
                                        .or_insert_with(|| Unresolved {
                                            entra_id: u.id.clone(),
                                            user_principal_name: u.user_principal_name.clone(),
                                            reason: reason.into(),
                                            rules: Vec::new(),
                                        })
                                        .rules
                                        .push(rule.name.to_string());
                                }
                            }
                        }
                        if let Some(last) =
                            last.filter(|l| l.members > 0 && entra_members.is_empty())
                        {
                            hold_deletions = Some(format!(
                                "Entra group {:?} has no members now but had {} at the last apply",
                                g.display_name, last.members
                            ));
                        }
                        g_out.sources.push(SourceRecord {
                            rule: rule.name.to_string(),
                            entra_group_id: g.id.clone(),
                            members: entra_members.len() as u64,
                        });
                    } else {
                        g_out.sources.push(SourceRecord {
                            rule: rule.name.to_string(),
                            entra_group_id: g.id.clone(),
                            members: 0,
                        });
                    }
                    match rule.assign {
                        AssignMode::Group => match store_groups.get(&g.id) {
                            Some(id) => {
                                let p = Principal {
                                    principal_type: PrincipalType::Group,
                                    principal_id: id.clone(),
                                };
                                g_out.principal_names.insert(p.clone(), g.display_name.clone());
                                RuleSource::Resolved(BTreeSet::from([p]))
                            }
                            None => RuleSource::Held {
                                reason: format!(
                                    "Entra group {:?} has no Identity Center group (not provisioned by SCIM yet?)",
                                    g.display_name
                                ),
                            },
                        },
                        AssignMode::Members => {
                            let total = users.len() * s.accounts.len();
                            if total > suggest_mirror_above {
                                g_out.warnings.push(format!(
                                    "rule {} assigns {} users one by one in {} accounts ({total} assignments); assign: mirror would need {} (one group per account)",
                                    rule.name,
                                    users.len(),
                                    s.accounts.len(),
                                    s.accounts.len()
                                ));
                            }
                            let mut principals = BTreeSet::new();
                            for (id, upn) in users {
                                let p = Principal {
                                    principal_type: PrincipalType::User,
                                    principal_id: id,
                                };
                                g_out.principal_names.insert(p.clone(), upn);
                                principals.insert(p);
                            }
                            RuleSource::Resolved(principals)
                        }
                        AssignMode::Mirror => {
                            // The mirror's group id is filled in by mirror::prepare.
                            let m = g_out.mirror_sources.entry(g.id.clone()).or_insert_with(|| mirror::Source {
                                entra_display_name: g.display_name.clone(),
                                members: Some(BTreeMap::new()),
                                hold_removals: None,
                                rules: Vec::new(),
                            });
                            m.members.get_or_insert_with(BTreeMap::new).extend(users);
                            m.rules.push(rule.name.to_string());
                            if m.hold_removals.is_none() {
                                m.hold_removals.clone_from(&hold_deletions);
                            }
                            RuleSource::Resolved(BTreeSet::from([mirror::placeholder(&g.id)]))
                        }
                    }
                }
            };
            let skipped: Vec<String> = s
                .expansion
                .accounts
                .keys()
                .filter_map(|a| scopes.unmanageable.get(a).map(|why| format!("{a}: {why}")))
                .chain(
                    s.expansion
                        .skipped_inactive
                        .iter()
                        .map(|a| format!("{a}: not ACTIVE")),
                )
                .collect();
            g_out.views.push(RuleView::new(
                rule,
                &permission_set_arn,
                &source,
                s.expansion,
                skipped,
            ));
            g_out.rules.push(ResolvedRule {
                name: rule.name.to_string(),
                permission_set_arn,
                accounts: s.accounts.clone(),
                source,
                hold_deletions,
            });
        }
        g_out.unresolved = unresolved.into_values().collect();
        g_out.permission_set_names = permission_sets.names;
        Ok(g_out)
    }

    /// Lists the instance's permission sets when some rule names one by name.
    pub(crate) async fn permission_sets(
        &self,
        config: &Config,
        keep: bool,
    ) -> Result<PermissionSets, EngineError> {
        let mut sets = PermissionSets::default();
        if config
            .assignments
            .iter()
            .any(|r| matches!(r.permission_set, PermissionSetRef::Name(_)))
        {
            // Names never change for an ARN, so only sets not seen before are described.
            let known: BTreeMap<String, String> =
                cache::load(self.state.as_ref(), cache::PERMISSION_SETS)
                    .await
                    .map(|(k, _)| k)
                    .unwrap_or_default();
            for ps in self.sso.permission_sets(&known).await? {
                sets.by_name.insert(ps.name.clone(), ps.arn.clone());
                sets.names.insert(ps.arn, ps.name);
            }
            if keep && sets.names != known {
                let now = self.state.now_epoch();
                cache::store(
                    self.state.as_ref(),
                    cache::PERMISSION_SETS,
                    &sets.names,
                    now,
                )
                .await;
            }
        }
        Ok(sets)
    }

    /// Identity-store ids for Entra objects, in about the fewer calls of listing and look-ups.
    /// Objects `known` holds are taken from it; the rest are resolved and added to it.
    /// `in_store` is the store's size when a listing counted it, and is updated when one does.
    async fn find_principals(
        &self,
        kind: Kind,
        wanted: BTreeSet<Wanted>,
        known: &mut BTreeMap<String, String>,
        in_store: &mut Option<usize>,
    ) -> Result<BTreeMap<String, String>, EngineError> {
        let (hits, misses): (Vec<Wanted>, Vec<Wanted>) = wanted
            .into_iter()
            .partition(|w| known.contains_key(&w.entra_id));
        let at_least = in_store.unwrap_or(0).max(known.len());
        let resolution = identity::resolve(self.identity.as_ref(), kind, &misses, at_least).await?;
        if resolution.store_size.is_some() {
            *in_store = resolution.store_size;
        }
        let mut found = resolution.ids;
        known.extend(found.iter().map(|(k, v)| (k.clone(), v.clone())));
        for w in hits {
            if let Some(id) = known.get(&w.entra_id) {
                found.insert(w.entra_id, id.clone());
            }
        }
        Ok(found)
    }

    /// The principal cache, unless an event or `full_read` asks for fresh ids or it was built
    /// more than `audit.period_hours` ago (then it starts empty and is built again).
    async fn known_principals(
        &self,
        config: &Config,
        trust: Trust,
    ) -> Result<Principals, EngineError> {
        let max_age = u64::from(config.audit.period_hours) * 3600;
        if !trust.refresh {
            if let Some((known, _)) =
                cache::load::<Principals>(self.state.as_ref(), cache::PRINCIPALS).await
            {
                if trust.now.saturating_sub(known.built_at) < max_age {
                    return Ok(known);
                }
            }
        }
        Ok(Principals {
            built_at: trust.now,
            ..Principals::default()
        })
    }

    /// Applies a plan: ledger housekeeping, then creations, then deletions, each request
    /// waited on until it settles.
    async fn apply(&self, plan: &plan::Plan, g: &Gathered, run_id: &str, stop: &Stop) -> Applied {
        let names = &g.principal_names;
        let mut deferred = 0;
        let mut left_creates = Vec::new();
        let mut warnings = Vec::new();
        let mut failures = Vec::new();
        let fail = |c: &Assignment, op: &str, e: String| Failure {
            change: ChangeView::bare(c),
            operation: op.to_string(),
            error: e,
        };
        for a in &plan.forget {
            if let Err(e) = self.state.remove(a).await {
                failures.push(fail(a, "forget", e.to_string()));
            }
        }
        let retag: BTreeMap<&Assignment, &Change> =
            plan.retag.iter().map(|c| (&c.assignment, c)).collect();
        let mut ledger_updates: Vec<(&Assignment, Vec<String>)> = plan
            .retag
            .iter()
            .map(|c| (&c.assignment, c.rules.clone()))
            .collect();
        for a in &plan.claim {
            if !retag.contains_key(a) {
                ledger_updates.push((a, Vec::new()));
            }
        }
        for (a, rules) in ledger_updates {
            let entry = LedgerEntry {
                assignment: a.clone(),
                owned: Owned {
                    rules: rules.into_iter().collect(),
                    pending: false,
                },
                principal_name: names.get(&a.principal()).cloned(),
            };
            if let Err(e) = self.state.put(&entry, run_id).await {
                failures.push(fail(a, "record", e.to_string()));
            }
        }

        // Mirror members first, so a mirror group holds its users before it is assigned.
        for m in &plan.mirrors {
            if !stop.now() {
                failures.extend(
                    mirror::grow(
                        self.identity.as_ref(),
                        self.state.as_ref(),
                        m,
                        &mut warnings,
                    )
                    .await,
                );
            }
        }
        let mut deletes_left: BTreeSet<String> = BTreeSet::new();
        for (op, changes) in [
            (Operation::Create, &plan.creates),
            (Operation::Delete, &plan.deletes),
        ] {
            if changes.is_empty() {
                continue;
            }
            let gate = Arc::new(Semaphore::new(self.settings.max_in_flight.max(1)));
            let (settler, poller) = Settler::spawn(self.sso.clone(), op, self.settings.list_every);
            let mut tasks = JoinSet::new();
            for change in changes.iter().cloned() {
                let engine = self.clone();
                let (gate, settler) = (gate.clone(), settler.clone());
                let name = names.get(&change.assignment.principal()).cloned();
                let run_id = run_id.to_string();
                let stop = (stop.deadline, stop.lease_lost.clone());
                tasks.spawn(async move {
                    let Ok(slot) = gate.acquire_owned().await else {
                        return (change, None);
                    };
                    if stop.1.load(Ordering::SeqCst) || stop.0.is_some_and(|d| Instant::now() >= d)
                    {
                        return (change, None);
                    }
                    let result = engine
                        .execute(op, &change, name, &run_id, &settler, slot)
                        .await;
                    (change, Some(result))
                });
            }
            while let Some(joined) = tasks.join_next().await {
                if let Ok((change, result)) = &joined {
                    if op == Operation::Delete && !matches!(result, Some(Ok(()))) {
                        deletes_left.insert(change.assignment.principal_id.clone());
                    }
                }
                match joined {
                    Ok((change, None)) => {
                        deferred += 1;
                        if op == Operation::Create {
                            left_creates.push(change.assignment);
                        }
                    }
                    Ok((_, Some(Ok(())))) => {}
                    Ok((change, Some(Err(e)))) => {
                        tracing::error!(assignment = %change.assignment, error = e, "change failed");
                        failures.push(fail(&change.assignment, op_name(op), e));
                    }
                    Err(e) => failures.push(Failure {
                        change: ChangeView::default(),
                        operation: op_name(op).into(),
                        error: format!("task failed: {e}"),
                    }),
                }
            }
            settler.stop(poller);
        }
        for m in &plan.mirrors {
            if stop.now() {
                continue;
            }
            let left = m
                .group_id
                .as_ref()
                .is_some_and(|id| deletes_left.contains(id));
            failures
                .extend(mirror::shrink(self.identity.as_ref(), self.state.as_ref(), m, left).await);
        }
        failures.sort_by(|a, b| (&a.change, &a.operation).cmp(&(&b.change, &b.operation)));
        if deferred > 0 {
            tracing::warn!(deferred, "deadline reached: changes left for the next run");
        }
        left_creates.sort();
        Applied {
            failures,
            deferred,
            left_creates,
            warnings,
        }
    }

    /// One creation or deletion, with its ledger bookkeeping around it. `slot` is one of the
    /// in-flight places; it is given back as soon as the request settles.
    async fn execute(
        &self,
        op: Operation,
        change: &Change,
        principal_name: Option<String>,
        run_id: &str,
        settler: &Settler,
        slot: OwnedSemaphorePermit,
    ) -> Result<(), String> {
        let a = &change.assignment;
        let mut entry = LedgerEntry {
            assignment: a.clone(),
            owned: Owned {
                rules: change.rules.iter().cloned().collect(),
                pending: true,
            },
            principal_name,
        };
        if op == Operation::Create {
            // Intent first: if the process dies after the request, the next run finds the
            // pending entry and claims the assignment, instead of leaking it as unowned.
            self.state
                .put(&entry, run_id)
                .await
                .map_err(|e| format!("recording the intent: {e}"))?;
        }
        let settled = self.request_and_wait(op, a, settler, slot).await;
        match (op, settled) {
            (Operation::Create, Ok(())) => {
                entry.owned.pending = false;
                self.state.put(&entry, run_id).await.map_err(|e| {
                    format!("created, but recording ownership failed (the next run claims it): {e}")
                })
            }
            (Operation::Create, Err((e, definitive))) => {
                if definitive {
                    // Identity Center said FAILED: nothing exists to own.
                    let _ = self.state.remove(a).await;
                }
                Err(e)
            }
            (Operation::Delete, Ok(())) => self.state.remove(a).await.map_err(|e| {
                format!("deleted, but clearing the ledger failed (the next run forgets it): {e}")
            }),
            (Operation::Delete, Err((e, _))) => Err(e),
        }
    }

    /// Starts a request and waits until it settles: woken by the settler, or polling its own
    /// status where listing is unavailable. The error says whether Identity Center
    /// definitively refused (`true`) or the outcome is unknown (`false`).
    async fn request_and_wait(
        &self,
        op: Operation,
        a: &Assignment,
        settler: &Settler,
        slot: OwnedSemaphorePermit,
    ) -> Result<(), (String, bool)> {
        let (request_id, mut status) = self
            .sso
            .start(op, a)
            .await
            .map_err(|e| (e.to_string(), false))?;
        let deadline = Instant::now() + self.settings.settle_timeout;
        let mut wait = self.settings.poll_first;
        let mut slot = Some(slot);
        loop {
            match status {
                RequestStatus::Succeeded => return Ok(()),
                RequestStatus::Failed(reason) => {
                    return Err((format!("Identity Center reported FAILED: {reason}"), true))
                }
                RequestStatus::InProgress if Instant::now() >= deadline => {
                    return Err((
                        format!(
                            "request {request_id} still in progress after {:?}",
                            self.settings.settle_timeout
                        ),
                        false,
                    ))
                }
                RequestStatus::InProgress => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match tokio::time::timeout(left, settler.wait(&request_id)).await {
                        // Settled on Identity Center's side: its slot is free for the next.
                        Ok(Woken::Settled) => drop(slot.take()),
                        Ok(Woken::PollYourself) | Err(_) => {
                            tokio::time::sleep(wait).await;
                            wait = self.settings.poll_every;
                        }
                    }
                    // A throttled poll says nothing about the request: keep polling until the
                    // settle timeout rather than report a change that may have succeeded.
                    status = match self.sso.status(op, &request_id).await {
                        Ok(s) => s,
                        Err(e) if crate::rate::is_throttling(&e) => RequestStatus::InProgress,
                        Err(e) => return Err((e.to_string(), false)),
                    };
                }
            }
        }
    }
}

/// An assignment as borrowed parts, for set look-ups without cloning.
type Key<'a> = (&'a str, &'a str, PrincipalType, &'a str);

fn key(a: &Assignment) -> Key<'_> {
    (
        a.account_id.as_str(),
        &a.permission_set_arn,
        a.principal_type,
        &a.principal_id,
    )
}

/// Every assignment the evaluable rules want.
fn desired_keys(rules: &[ResolvedRule]) -> BTreeSet<Key<'_>> {
    let mut out = BTreeSet::new();
    for r in rules {
        let RuleSource::Resolved(principals) = &r.source else {
            continue;
        };
        for a in &r.accounts {
            for p in principals {
                out.insert((
                    a.as_str(),
                    r.permission_set_arn.as_str(),
                    p.principal_type,
                    p.principal_id.as_str(),
                ));
            }
        }
    }
    out
}

/// Which trusted pairs the rolling audit reads this run.
#[derive(Clone, Copy, Debug, PartialEq)]
enum AuditSlice {
    /// None (a targeted run).
    Nothing,
    /// Every pair (no audit yet, a full period has passed, a period of 0, or `full_read`).
    Everything,
    /// The pairs whose position on the period's circle lies in `(from, to]`, as fractions of
    /// the period: each pair is read once per period, about evenly spread over the runs.
    Between { from: f64, to: f64 },
}

impl AuditSlice {
    /// The slice for a run at `now` when the last audit read up to `cursor`.
    fn since(cursor: Option<u64>, now: u64, period_hours: u32) -> AuditSlice {
        let period = u64::from(period_hours) * 3600;
        match cursor {
            Some(last) if period > 0 && now >= last && now - last < period => {
                let phase = |t: u64| (t % period) as f64 / period as f64;
                AuditSlice::Between {
                    from: phase(last),
                    to: phase(now),
                }
            }
            _ => AuditSlice::Everything,
        }
    }

    fn contains(self, account: &AccountId, permission_set_arn: &str) -> bool {
        match self {
            AuditSlice::Nothing => false,
            AuditSlice::Everything => true,
            AuditSlice::Between { from, to } => {
                let at = position(account, permission_set_arn);
                if from <= to {
                    from < at && at <= to
                } else {
                    at > from || at <= to
                }
            }
        }
    }
}

/// A pair's fixed place in [0, 1): FNV-1a of its text, so every run and every process agrees.
fn position(account: &AccountId, permission_set_arn: &str) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in account
        .as_str()
        .bytes()
        .chain([b'#'])
        .chain(permission_set_arn.bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// The pairs of `observed` to read this run: those where the plan may act (a wanted
/// assignment the state table does not vouch for, as existing or as carried absent; an owned
/// one no rule wants; a pending intent) and the audit's slice. Every change is thus decided on a fresh read; only pairs
/// where the state table says there is nothing to do are trusted.
fn pairs_to_read(
    desired: &BTreeSet<Key<'_>>,
    owned: &BTreeMap<Assignment, Owned>,
    seen: &BTreeSet<Assignment>,
    carried: &BTreeSet<Key<'_>>,
    observed: &Observation,
    slice: AuditSlice,
) -> Observation {
    let believed: BTreeSet<Key<'_>> = owned
        .iter()
        .filter(|(_, o)| !o.pending)
        .map(|(a, _)| key(a))
        .chain(seen.iter().map(key))
        .collect();
    let mut read: BTreeSet<(&str, &str)> = desired
        .iter()
        .filter(|k| !believed.contains(*k) && !carried.contains(*k))
        .map(|k| (k.0, k.1))
        .collect();
    for (a, o) in owned {
        if o.pending || !desired.contains(&key(a)) {
            read.insert((a.account_id.as_str(), &a.permission_set_arn));
        }
    }
    Observation {
        pairs: observed
            .pairs
            .iter()
            .filter(|(a, ps)| read.contains(&(a.as_str(), ps.as_str())) || slice.contains(a, ps))
            .cloned()
            .collect(),
    }
}

/// One read of current assignments.
#[derive(Debug, PartialEq, Eq)]
enum Read {
    /// Every principal of one (account, permission set) pair.
    Pair(AccountId, String),
    /// Every pair of one principal.
    Principal(Principal),
}

/// The reads that observe `observed` for the plan with the fewest calls: one per pair, or one
/// per principal the plan could create or judge there (the rules' principals and the
/// ledger's), each counted with the pages its expected assignments fill.
fn choose_reads(
    rules: &[ResolvedRule],
    ledger: &BTreeMap<Assignment, Owned>,
    observed: &Observation,
) -> Vec<Read> {
    let mut per_pair: BTreeMap<(&AccountId, &str), usize> = observed
        .pairs
        .iter()
        .map(|(a, ps)| ((a, ps.as_str()), 0))
        .collect();
    let ledger_principals: Vec<Principal> = ledger
        .keys()
        .filter(|a| observed.covers(a))
        .map(Assignment::principal)
        .collect();
    let mut per_principal: BTreeMap<&Principal, usize> = BTreeMap::new();
    for r in rules {
        let RuleSource::Resolved(principals) = &r.source else {
            continue;
        };
        let mut in_play = 0;
        for a in &r.accounts {
            if let Some(n) = per_pair.get_mut(&(a, r.permission_set_arn.as_str())) {
                *n += principals.len();
                in_play += 1;
            }
        }
        if in_play > 0 {
            for p in principals.iter().filter(|p| !mirror::is_placeholder(p)) {
                *per_principal.entry(p).or_default() += in_play;
            }
        }
    }
    for a in ledger.keys().filter(|a| observed.covers(a)) {
        if let Some(n) = per_pair.get_mut(&(&a.account_id, a.permission_set_arn.as_str())) {
            *n += 1;
        }
    }
    for p in &ledger_principals {
        *per_principal.entry(p).or_default() += 1;
    }
    let pages = |n: &usize| n.div_ceil(crate::rate::LIST_PAGE).max(1);
    let pair_calls: usize = per_pair.values().map(pages).sum();
    let principal_calls: usize = per_principal.values().map(pages).sum();
    if principal_calls < pair_calls {
        per_principal
            .into_keys()
            .map(|p| Read::Principal(p.clone()))
            .collect()
    } else {
        observed
            .pairs
            .iter()
            .map(|(a, ps)| Read::Pair(a.clone(), ps.clone()))
            .collect()
    }
}

fn op_name(op: Operation) -> &'static str {
    match op {
        Operation::Create => "create",
        Operation::Delete => "delete",
    }
}

/// Whether any rule's scope needs the organization, and if so whether with account tags.
fn organization_needed(config: &Config) -> Option<bool> {
    config
        .assignments
        .iter()
        .any(scope::needs_organization)
        .then(|| {
            config
                .assignments
                .iter()
                .any(|r| !r.account_tags.is_empty())
        })
}

/// Reads the organization (and, when it has a management account, the caller's account).
async fn read_organization(
    organizations: &dyn OrganizationApi,
    with_tags: bool,
) -> Result<OrgView, EngineError> {
    let organization = organizations.snapshot(with_tags).await?;
    let caller = match organization.management_account {
        Some(_) => organizations.caller_account().await?,
        None => None,
    };
    tracing::info!(
        accounts = organization.accounts.len(),
        units = organization.units.len(),
        "read the organization"
    );
    Ok(OrgView {
        with_tags,
        organization,
        caller,
    })
}

/// Expands every rule's scope against the organization, when a rule needs it.
fn expand_with(config: &Config, view: Option<&OrgView>) -> Result<Scopes, EngineError> {
    let mut unmanageable = BTreeMap::new();
    if let Some(v) = view {
        if let Some(mgmt) = &v.organization.management_account {
            if v.caller.as_ref() != Some(mgmt) {
                unmanageable.insert(
                    mgmt.clone(),
                    "the management account: a delegated administrator cannot manage its assignments".to_string(),
                );
            }
        }
    }
    let expansions = config
        .assignments
        .iter()
        .map(|r| scope::expand(r, view.map(|v| &v.organization)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Scopes {
        expansions,
        unmanageable,
        organization: view.map(|v| v.organization.clone()),
    })
}

/// Expands every rule's scope, reading the organization when a rule needs it.
pub async fn expand_scopes(
    organizations: &dyn OrganizationApi,
    config: &Config,
) -> Result<Scopes, EngineError> {
    let view = match organization_needed(config) {
        Some(with_tags) => Some(read_organization(organizations, with_tags).await?),
        None => None,
    };
    expand_with(config, view.as_ref())
}

/// Whether a full run takes an audit slice now: at most every `audit.every_minutes`.
fn audit_due(cursor: Option<u64>, now: u64, audit: &crate::config::AuditConfig) -> bool {
    audit.period_hours == 0
        || cursor.is_none_or(|c| now.saturating_sub(c) >= u64::from(audit.every_minutes) * 60)
}

/// How a run may use the principal cache.
#[derive(Clone, Copy, Debug)]
struct Trust {
    /// An event said identity-store ids may have changed: resolve everything afresh.
    refresh: bool,
    /// Write what was learnt back (apply runs).
    keep: bool,
    /// The state table's clock.
    now: u64,
}

/// The Engine could not be wired to its services.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The client secret could not be had.
    #[error(transparent)]
    Secret(#[from] crate::aws::SecretError),
    /// Identity Center could not be found.
    #[error("finding the Identity Center instance: {0}")]
    Instance(#[from] AwsError),
    /// The Graph client could not be built.
    #[error(transparent)]
    Directory(#[from] DirectoryError),
}

impl Engine {
    /// Builds the production engine: SDK clients from one shared AWS configuration, the
    /// Identity Center instance from the config (or the account's only one), the Entra client
    /// secret from `ENTRA_CLIENT_SECRET` or Secrets Manager.
    pub async fn connect(
        config: &Config,
        sdk: &aws_config::SdkConfig,
        env_secret: Option<String>,
    ) -> Result<Engine, ConnectError> {
        let client_secret =
            crate::aws::client_secret(env_secret, config.entra.client_secret_arn.as_ref(), sdk)
                .await?;
        let sso_client = aws_sdk_ssoadmin::Client::new(sdk);
        let instance = crate::sso::discover_instance(
            &sso_client,
            config
                .identity_center
                .instance_arn
                .as_ref()
                .map(|a| a.as_str()),
            config
                .identity_center
                .identity_store_id
                .as_ref()
                .map(|s| s.as_str()),
        )
        .await?;
        let directory = crate::directory::GraphClient::new(crate::directory::GraphSettings {
            graph_url: config.entra.graph_url.to_string(),
            login_url: config.entra.login_url.to_string(),
            tenant_id: config.entra.tenant_id.clone(),
            client_id: config.entra.client_id.clone(),
            client_secret,
            backoff: crate::retry::Backoff::default(),
        })?;
        // Every request to sso-admin and the identity store goes through one token bucket per
        // service at its quota, with backoff on throttling.
        Ok(crate::rate::with_quotas(Engine {
            directory: Arc::new(directory),
            identity: Arc::new(crate::identity::SdkIdentityStore::new(
                aws_sdk_identitystore::Client::new(sdk),
                instance.identity_store_id,
            )),
            sso: Arc::new(crate::sso::SdkAssignments::new(sso_client, instance.arn)),
            organizations: Arc::new(crate::organizations::SdkOrganizations::new(sdk)),
            state: Arc::new(crate::state::DynamoState::new(
                aws_sdk_dynamodb::Client::new(sdk),
                config.state.table.to_string(),
            )),
            settings: ApplySettings::default(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PS: &str = "arn:aws:sso:::permissionSet/ssoins-1/ps-1";

    fn acct(n: u32) -> AccountId {
        AccountId::try_from(format!("{n:012}")).unwrap()
    }

    fn asg(account: u32, user: &str) -> Assignment {
        Assignment {
            account_id: acct(account),
            permission_set_arn: PS.into(),
            principal_type: PrincipalType::User,
            principal_id: user.into(),
        }
    }

    fn rule(accounts: &[u32], users: &[&str]) -> ResolvedRule {
        ResolvedRule {
            name: "r".into(),
            permission_set_arn: PS.into(),
            accounts: accounts.iter().map(|&a| acct(a)).collect(),
            source: RuleSource::Resolved(
                users
                    .iter()
                    .map(|u| Principal {
                        principal_type: PrincipalType::User,
                        principal_id: u.to_string(),
                    })
                    .collect(),
            ),
            hold_deletions: None,
        }
    }

    fn owned(pending: bool) -> Owned {
        Owned {
            rules: BTreeSet::from(["r".to_string()]),
            pending,
        }
    }

    fn pairs(accounts: impl IntoIterator<Item = u32>) -> Observation {
        Observation {
            pairs: accounts.into_iter().map(|a| (acct(a), PS.into())).collect(),
        }
    }

    #[test]
    fn only_pairs_where_the_plan_may_act_are_read() {
        // 1: in sync per the ledger. 2: a wanted assignment nobody vouches for. 3: a pending
        // intent. 4: owned but no longer wanted. 5: wanted and seen unowned.
        let rules = [rule(&[1, 2, 3, 5], &["u"])];
        let ledger = BTreeMap::from([
            (asg(1, "u"), owned(false)),
            (asg(3, "u"), owned(true)),
            (asg(4, "v"), owned(false)),
        ]);
        let seen = BTreeSet::from([asg(5, "u")]);
        let none = BTreeSet::new();
        let read = pairs_to_read(
            &desired_keys(&rules),
            &ledger,
            &seen,
            &none,
            &pairs(1..=5),
            AuditSlice::Nothing,
        );
        assert_eq!(read, pairs([2, 3, 4]));
        let all = pairs_to_read(
            &desired_keys(&rules),
            &ledger,
            &seen,
            &none,
            &pairs(1..=5),
            AuditSlice::Everything,
        );
        assert_eq!(all, pairs(1..=5), "an audit of everything reads every pair");
        // A creation carried from the last run, its pair read then: not read again.
        let carried = asg(2, "u");
        let carried = BTreeSet::from([key(&carried)]);
        let read = pairs_to_read(
            &desired_keys(&rules),
            &ledger,
            &seen,
            &carried,
            &pairs(1..=5),
            AuditSlice::Nothing,
        );
        assert_eq!(read, pairs([3, 4]));
    }

    #[test]
    fn the_rolling_audit_reads_every_pair_once_per_period() {
        let observed = pairs(0..2_000);
        let (period_hours, step) = (24, 15 * 60);
        let mut reads: BTreeMap<(AccountId, String), u32> = BTreeMap::new();
        let mut cursor = Some(1_000_000);
        for run in 1..=96 {
            let now = 1_000_000 + run * step;
            let slice = AuditSlice::since(cursor, now, period_hours);
            for p in &observed.pairs {
                if slice.contains(&p.0, &p.1) {
                    *reads.entry(p.clone()).or_default() += 1;
                }
            }
            cursor = Some(now);
        }
        assert_eq!(reads.len(), 2_000, "every pair read within the period");
        assert!(reads.values().all(|&n| n == 1), "and only once");
        // About 1/96 of the pairs per run.
        let one = AuditSlice::since(Some(1_000_000), 1_000_000 + step, period_hours);
        let n = observed
            .pairs
            .iter()
            .filter(|p| one.contains(&p.0, &p.1))
            .count();
        assert!((5..=60).contains(&n), "{n} pairs in one slice");
    }

    #[test]
    fn the_audit_reads_everything_without_a_cursor_after_a_period_or_with_period_zero() {
        let everything = AuditSlice::Everything;
        assert_eq!(AuditSlice::since(None, 10, 24), everything);
        assert_eq!(AuditSlice::since(Some(10), 10 + 24 * 3600, 24), everything);
        assert_eq!(AuditSlice::since(Some(10), 20, 0), everything);
        assert_eq!(
            AuditSlice::since(Some(20), 10, 24),
            everything,
            "clock went back"
        );
    }

    #[test]
    fn reads_go_per_principal_when_that_takes_fewer_calls() {
        // One user in 300 accounts: 300 pair reads, or 3 pages of one principal's listing.
        let accounts: Vec<u32> = (1..=300).collect();
        let rules = [rule(&accounts, &["u"])];
        let reads = choose_reads(&rules, &BTreeMap::new(), &pairs(accounts.iter().copied()));
        assert_eq!(
            reads,
            vec![Read::Principal(Principal {
                principal_type: PrincipalType::User,
                principal_id: "u".into()
            })]
        );
        // 300 users in one account: one pair (3 pages) beats 300 principals.
        let users: Vec<String> = (0..300).map(|i| format!("u{i}")).collect();
        let names: Vec<&str> = users.iter().map(String::as_str).collect();
        let reads = choose_reads(&[rule(&[1], &names)], &BTreeMap::new(), &pairs([1]));
        assert_eq!(reads, vec![Read::Pair(acct(1), PS.into())]);
    }
}

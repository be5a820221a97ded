//! One reconcile run: gather (organization, Graph, identity store, ledger, Identity Center),
//! plan (pure), apply (bounded, asynchronous requests polled to the end), record. The CLI and
//! the Lambda handler both build a [`RunRequest`] and call [`Engine::run`].

use crate::aws::AwsError;
use crate::config::{AssignMode, Config, GroupRef, PermissionSetRef, Rule};
use crate::directory::{DirGroup, DirUser, Directory, DirectoryError};
use crate::identity::{self, IdentityStore, Kind, Strategy, Wanted};
use crate::model::{AccountId, Assignment, Guid, Principal, PrincipalType};
use crate::organizations::OrganizationApi;
use crate::plan::{self, Change, Limits, Owned, PlanInput, ResolvedRule, RuleSource};
use crate::report::{ChangeView, Failure, Outcome, Report, RuleView, Unresolved};
use crate::scope::{self, Expansion, Organization, ScopeError};
use crate::sso::{AssignmentApi, Operation, RequestStatus};
use crate::state::{now_rfc3339, LedgerEntry, RunRecord, StateStore};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

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
}

/// Tunables of the apply phase.
#[derive(Clone, Copy, Debug)]
pub struct ApplySettings {
    /// Assignment requests outstanding at once (Identity Center allows 15 creations).
    pub max_in_flight: usize,
    /// First wait before polling a request's status; doubles up to `poll_max`.
    pub poll_initial: Duration,
    /// Longest wait between two polls.
    pub poll_max: Duration,
    /// Give up waiting on one request after this long (it stays pending in the ledger).
    pub settle_timeout: Duration,
}

impl Default for ApplySettings {
    fn default() -> Self {
        ApplySettings {
            max_in_flight: 15,
            poll_initial: Duration::from_millis(250),
            poll_max: Duration::from_secs(5),
            settle_timeout: Duration::from_secs(600),
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
struct Gathered {
    rules: Vec<ResolvedRule>,
    views: Vec<RuleView>,
    unresolved: Vec<Unresolved>,
    principal_names: BTreeMap<Principal, String>,
    permission_set_names: BTreeMap<String, String>,
}

/// The instance's permission sets, both ways, when some rule names one by name.
#[derive(Default)]
struct PermissionSets {
    by_name: BTreeMap<String, String>,
    names: BTreeMap<String, String>,
}

impl PermissionSets {
    /// The ARN a rule's permission set stands for.
    fn arn_of(&self, rule: &Rule) -> Result<String, EngineError> {
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
    /// per-change failures during apply are in the report instead.
    pub async fn run(&self, config: &Config, req: &RunRequest) -> Result<Report, EngineError> {
        let started = Instant::now();
        let started_at = now_rfc3339();
        let run_id = format!(
            "{}-{:08x}",
            started_at.replace([':', '-'], ""),
            fastrand::u32(..)
        );
        tracing::info!(run_id, trigger = req.trigger, mode = ?req.mode, target = ?req.target, "run started");

        let ledger = self.state.ledger().await?;
        let scopes = expand_scopes(self.organizations.as_ref(), config).await?;
        let groups = self.find_groups(config).await?;
        let permission_sets = self.permission_sets(config).await?;
        let selected = self
            .select(config, &req.target, &scopes, &groups, &permission_sets)
            .await?;
        let mut g = self
            .resolve(&selected, &groups, &scopes, permission_sets)
            .await?;

        let mut observed: BTreeSet<(AccountId, String)> = BTreeSet::new();
        for r in &g.rules {
            for acct in &r.accounts {
                observed.insert((acct.clone(), r.permission_set_arn.clone()));
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
                observed.insert((a.account_id.clone(), a.permission_set_arn.clone()));
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

        tracing::info!(pairs = observed.len(), "reading current assignments");
        let mut actual = BTreeSet::new();
        for (acct, ps) in &observed {
            for p in self.sso.assigned(acct, ps).await? {
                actual.insert(Assignment {
                    account_id: acct.clone(),
                    permission_set_arn: ps.clone(),
                    principal_type: p.principal_type,
                    principal_id: p.principal_id,
                });
            }
        }

        let plan = plan::plan(PlanInput {
            rules: &g.rules,
            actual: &actual,
            observed: &observed,
            owned: &owned,
            limits: Limits {
                max_deletions: config.safety.max_deletions,
                allow_deletions: req.allow_deletions,
            },
        });
        tracing::info!(
            creates = plan.creates.len(),
            deletes = plan.deletes.len(),
            held = plan.held.len(),
            unchanged = plan.unchanged,
            "plan computed"
        );

        let (mut failures, mut deferred) = (Vec::new(), 0);
        if req.mode == Mode::Apply {
            (failures, deferred) = self
                .apply(&plan, &g.principal_names, &run_id, req.deadline)
                .await;
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
            unchanged: plan.unchanged,
            unresolved: g.unresolved,
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
        };
        report.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.record(&report).await;
        tracing::info!(run_id = report.run_id, outcome = ?report.outcome, duration_ms = report.duration_ms, "run finished");
        Ok(report)
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

    /// Looks up each distinct Entra group once, however many rules name it. A group that does
    /// not exist, or a name that several groups share, is an `Err` for the rules naming it.
    async fn find_groups(
        &self,
        config: &Config,
    ) -> Result<BTreeMap<GroupRef, Result<DirGroup, String>>, EngineError> {
        let mut groups = BTreeMap::new();
        for rule in &config.assignments {
            if groups.contains_key(&rule.entra_group) {
                continue;
            }
            let found = match &rule.entra_group {
                GroupRef::Id(id) => self
                    .directory
                    .group(id)
                    .await?
                    .ok_or_else(|| format!("Entra group {id} does not exist")),
                GroupRef::Name(name) => {
                    let mut hits = self.directory.groups_by_name(name).await?;
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
    async fn select<'a>(
        &self,
        config: &'a Config,
        target: &Target,
        scopes: &'a Scopes,
        groups: &BTreeMap<GroupRef, Result<DirGroup, String>>,
        permission_sets: &PermissionSets,
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
                        || self
                            .directory
                            .transitive_groups(&g.id)
                            .await?
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
    /// selected rules.
    async fn resolve(
        &self,
        selected: &[Selected<'_>],
        groups: &BTreeMap<GroupRef, Result<DirGroup, String>>,
        scopes: &Scopes,
        permission_sets: PermissionSets,
    ) -> Result<Gathered, EngineError> {
        // Transitive members of each members-mode group, read in full or not at all.
        let mut members: BTreeMap<String, Vec<DirUser>> = BTreeMap::new();
        for s in selected {
            if let (AssignMode::Members, Some(Ok(g))) =
                (s.rule.assign, groups.get(&s.rule.entra_group))
            {
                if !members.contains_key(&g.id) {
                    let users = self.directory.transitive_users(&g.id).await?;
                    tracing::info!(
                        group = g.display_name,
                        members = users.len(),
                        "read transitive members"
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
        let store_groups = self.find_principals(Kind::Group, wanted_groups).await?;
        let wanted_users: BTreeSet<Wanted> = members
            .values()
            .flatten()
            .filter(|u| u.account_enabled)
            .map(|u| Wanted {
                entra_id: u.id.clone(),
                name: u.user_principal_name.clone(),
            })
            .collect();
        let store_users = self.find_principals(Kind::User, wanted_users).await?;

        let mut principal_names = BTreeMap::new();
        let mut rules = Vec::new();
        let mut views = Vec::new();
        let mut unresolved: BTreeMap<String, Unresolved> = BTreeMap::new();
        for s in selected {
            let rule = s.rule;
            let permission_set_arn = permission_sets.arn_of(rule)?;
            let source = match groups.get(&rule.entra_group) {
                Some(Ok(g)) => match rule.assign {
                    AssignMode::Group => match store_groups.get(&g.id) {
                        Some(id) => {
                            let p = Principal {
                                principal_type: PrincipalType::Group,
                                principal_id: id.clone(),
                            };
                            principal_names.insert(p.clone(), g.display_name.clone());
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
                        let mut principals = BTreeSet::new();
                        for u in members.get(&g.id).into_iter().flatten() {
                            match store_users.get(&u.id).filter(|_| u.account_enabled) {
                                Some(id) => {
                                    let p = Principal {
                                        principal_type: PrincipalType::User,
                                        principal_id: id.clone(),
                                    };
                                    principal_names.insert(p.clone(), u.user_principal_name.clone());
                                    principals.insert(p);
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
                        RuleSource::Resolved(principals)
                    }
                },
                Some(Err(reason)) => RuleSource::Held {
                    reason: reason.clone(),
                },
                None => RuleSource::Held {
                    reason: "Entra group was not looked up".into(),
                },
            };
            let hold_deletions = s
                .expansion
                .accounts
                .is_empty()
                .then(|| "its scope expands to zero accounts".to_string());
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
            views.push(RuleView::new(
                rule,
                &permission_set_arn,
                &source,
                s.expansion,
                skipped,
            ));
            rules.push(ResolvedRule {
                name: rule.name.to_string(),
                permission_set_arn,
                accounts: s.accounts.clone(),
                source,
                hold_deletions,
            });
        }
        Ok(Gathered {
            rules,
            views,
            unresolved: unresolved.into_values().collect(),
            principal_names,
            permission_set_names: permission_sets.names,
        })
    }

    /// Lists the instance's permission sets when some rule names one by name.
    async fn permission_sets(&self, config: &Config) -> Result<PermissionSets, EngineError> {
        let mut sets = PermissionSets::default();
        if config
            .assignments
            .iter()
            .any(|r| matches!(r.permission_set, PermissionSetRef::Name(_)))
        {
            for ps in self.sso.permission_sets().await? {
                sets.by_name.insert(ps.name.clone(), ps.arn.clone());
                sets.names.insert(ps.arn, ps.name);
            }
        }
        Ok(sets)
    }

    /// Identity-store ids for Entra objects, by the cheaper strategy.
    async fn find_principals(
        &self,
        kind: Kind,
        wanted: BTreeSet<Wanted>,
    ) -> Result<BTreeMap<String, String>, EngineError> {
        let wanted: Vec<Wanted> = wanted.into_iter().collect();
        let strategy = Strategy::choose(wanted.len(), None);
        Ok(identity::resolve(self.identity.as_ref(), kind, &wanted, strategy).await?)
    }

    /// Applies a plan: ledger housekeeping, then creations, then deletions, each request
    /// polled until it settles. Returns the changes that failed, and how many were not started
    /// because the deadline passed.
    async fn apply(
        &self,
        plan: &plan::Plan,
        names: &BTreeMap<Principal, String>,
        run_id: &str,
        deadline: Option<Instant>,
    ) -> (Vec<Failure>, usize) {
        let mut deferred = 0;
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

        for (op, changes) in [
            (Operation::Create, &plan.creates),
            (Operation::Delete, &plan.deletes),
        ] {
            let gate = Arc::new(Semaphore::new(self.settings.max_in_flight.max(1)));
            let mut tasks = JoinSet::new();
            for change in changes.iter().cloned() {
                let engine = self.clone();
                let gate = gate.clone();
                let name = names.get(&change.assignment.principal()).cloned();
                let run_id = run_id.to_string();
                tasks.spawn(async move {
                    let _permit = gate.acquire_owned().await;
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return (change, None);
                    }
                    let result = engine.execute(op, &change, name, &run_id).await;
                    (change, Some(result))
                });
            }
            while let Some(joined) = tasks.join_next().await {
                match joined {
                    Ok((_, None)) => deferred += 1,
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
        }
        failures.sort_by(|a, b| (&a.change, &a.operation).cmp(&(&b.change, &b.operation)));
        if deferred > 0 {
            tracing::warn!(deferred, "deadline reached: changes left for the next run");
        }
        (failures, deferred)
    }

    /// One creation or deletion, with its ledger bookkeeping around it.
    async fn execute(
        &self,
        op: Operation,
        change: &Change,
        principal_name: Option<String>,
        run_id: &str,
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
        let settled = self.request_and_wait(op, a).await;
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

    /// Starts a request and polls it until it settles. The error says whether Identity Center
    /// definitively refused (`true`) or the outcome is unknown (`false`).
    async fn request_and_wait(&self, op: Operation, a: &Assignment) -> Result<(), (String, bool)> {
        let (request_id, mut status) = self
            .sso
            .start(op, a)
            .await
            .map_err(|e| (e.to_string(), false))?;
        let deadline = Instant::now() + self.settings.settle_timeout;
        let mut wait = self.settings.poll_initial;
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
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(self.settings.poll_max);
                    status = self
                        .sso
                        .status(op, &request_id)
                        .await
                        .map_err(|e| (e.to_string(), false))?;
                }
            }
        }
    }
}

fn op_name(op: Operation) -> &'static str {
    match op {
        Operation::Create => "create",
        Operation::Delete => "delete",
    }
}

/// Expands every rule's scope, reading the organization once when some rule needs it.
pub async fn expand_scopes(
    organizations: &dyn OrganizationApi,
    config: &Config,
) -> Result<Scopes, EngineError> {
    let needs_org = config.assignments.iter().any(scope::needs_organization);
    let mut unmanageable = BTreeMap::new();
    let org = if needs_org {
        let with_tags = config
            .assignments
            .iter()
            .any(|r| !r.account_tags.is_empty());
        let org = organizations.snapshot(with_tags).await?;
        if let Some(mgmt) = &org.management_account {
            let caller = organizations.caller_account().await?;
            if caller.as_ref() != Some(mgmt) {
                unmanageable.insert(
                    mgmt.clone(),
                    "the management account: a delegated administrator cannot manage its assignments".to_string(),
                );
            }
        }
        tracing::info!(
            accounts = org.accounts.len(),
            units = org.units.len(),
            "read the organization"
        );
        Some(org)
    } else {
        None
    };
    let expansions = config
        .assignments
        .iter()
        .map(|r| scope::expand(r, org.as_ref()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Scopes {
        expansions,
        unmanageable,
        organization: org,
    })
}

/// Why an account is or is not reached by each rule.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AccountExplanation {
    /// The account.
    pub account_id: AccountId,
    /// Its name, when the organization was read.
    pub name: Option<String>,
    /// Its OU path, when the organization was read.
    pub path: Option<String>,
    /// Why no rule may target it, when that is so.
    pub unmanageable: Option<String>,
    /// Each rule: the scope entries that reach the account (empty: not reached).
    pub rules: Vec<RuleReach>,
}

/// One rule's reach into an account.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RuleReach {
    /// Rule name.
    pub rule: String,
    /// The Entra group as configured.
    pub entra_group: String,
    /// The permission set as configured.
    pub permission_set: String,
    /// The scope entries that reach the account; empty when the rule does not.
    pub via: Vec<String>,
    /// Set when the account is in the rule's scope but skipped (not ACTIVE).
    pub skipped: Option<String>,
}

/// Which rules reach an account, and through which scope (reads only the organization).
pub async fn explain_account(
    organizations: &dyn OrganizationApi,
    config: &Config,
    account: &AccountId,
) -> Result<AccountExplanation, EngineError> {
    let scopes = expand_scopes(organizations, config).await?;
    let org_account = scopes
        .organization
        .as_ref()
        .and_then(|o| o.accounts.get(account).map(|a| (o, a)));
    let rules = config
        .assignments
        .iter()
        .zip(&scopes.expansions)
        .map(|(rule, e)| RuleReach {
            rule: rule.name.to_string(),
            entra_group: String::from(rule.entra_group.clone()),
            permission_set: rule.permission_set.to_string(),
            via: e.accounts.get(account).cloned().unwrap_or_default(),
            skipped: e
                .skipped_inactive
                .contains(account)
                .then(|| "in scope but not ACTIVE".to_string()),
        })
        .collect();
    Ok(AccountExplanation {
        account_id: account.clone(),
        name: org_account.map(|(_, a)| a.name.clone()),
        path: org_account.map(|(o, a)| o.path(&a.parent)),
        unmanageable: scopes.unmanageable.get(account).cloned(),
        rules,
    })
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
        Ok(Engine {
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
        })
    }
}

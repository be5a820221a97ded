//! The run report: what a run found and did, by name as well as by id, as JSON for machines
//! and as a table a person can review before applying. Exit codes derive from it.

use crate::config::{AssignMode, Rule};
use crate::engine::{Mode, Target};
use crate::model::{Assignment, Principal};
use crate::plan::{Change, GuardTrip, HeldMirror, Plan, RuleSource};
use crate::scope::Expansion;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Nothing to change.
    InSync,
    /// Plan mode: changes are pending.
    ChangesPending,
    /// Apply mode: every change was made.
    Applied,
    /// Apply mode: safety rules held deletions back (creations were made).
    Guarded,
    /// Some rule could not be evaluated or some change failed.
    Failed,
    /// Apply mode: the deadline stopped the run before every change started; the next run
    /// continues.
    Partial,
}

impl Outcome {
    /// The outcome of a run from its plan and what happened applying it.
    pub fn decide(
        mode: Mode,
        plan: &Plan,
        any_failed: bool,
        rules_held: bool,
        deferred: usize,
    ) -> Outcome {
        if any_failed || rules_held {
            return Outcome::Failed;
        }
        if deferred > 0 {
            return Outcome::Partial;
        }
        match mode {
            Mode::Apply if plan.guard.is_some() || plan.any_held() => Outcome::Guarded,
            Mode::Apply if plan.is_in_sync() => Outcome::InSync,
            Mode::Apply => Outcome::Applied,
            Mode::Plan if plan.is_in_sync() && !plan.any_held() => Outcome::InSync,
            Mode::Plan => Outcome::ChangesPending,
        }
    }

    /// The word used in reports and the state table.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::InSync => "in_sync",
            Outcome::ChangesPending => "changes_pending",
            Outcome::Applied => "applied",
            Outcome::Guarded => "guarded",
            Outcome::Failed => "failed",
            Outcome::Partial => "partial",
        }
    }

    /// The CLI's exit code: 0 in sync or applied, 1 error, 2 changes pending, 3 guarded,
    /// 4 stopped at the deadline with changes left for the next run.
    pub fn exit_code(self) -> i32 {
        match self {
            Outcome::InSync | Outcome::Applied => 0,
            Outcome::Failed => 1,
            Outcome::ChangesPending => 2,
            Outcome::Guarded => 3,
            Outcome::Partial => 4,
        }
    }
}

/// One assignment change, with names for people and ids for machines.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct ChangeView {
    /// Target account.
    pub account_id: String,
    /// Permission set ARN.
    pub permission_set_arn: String,
    /// Permission set name, when known.
    pub permission_set_name: Option<String>,
    /// USER or GROUP.
    pub principal_type: String,
    /// Identity-store id.
    pub principal_id: String,
    /// Group display name or user name, when known.
    pub principal_name: Option<String>,
    /// The first rule behind the change.
    pub rule: String,
    /// Every rule behind the change.
    pub rules: Vec<String>,
}

impl ChangeView {
    /// A view with names filled in from what the run learned.
    pub fn new(
        change: &Change,
        permission_sets: &BTreeMap<String, String>,
        principals: &BTreeMap<Principal, String>,
    ) -> Self {
        let a = &change.assignment;
        ChangeView {
            permission_set_name: permission_sets.get(&a.permission_set_arn).cloned(),
            principal_name: principals.get(&a.principal()).cloned(),
            rule: change.rules.first().cloned().unwrap_or_default(),
            rules: change.rules.clone(),
            ..ChangeView::bare(a)
        }
    }

    /// A view with ids only.
    pub fn bare(a: &Assignment) -> Self {
        ChangeView {
            account_id: a.account_id.to_string(),
            permission_set_arn: a.permission_set_arn.clone(),
            principal_type: a.principal_type.to_string(),
            principal_id: a.principal_id.clone(),
            ..ChangeView::default()
        }
    }
}

/// A deletion held back, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HeldView {
    /// The deletion.
    #[serde(flatten)]
    pub change: ChangeView,
    /// Why it was held.
    pub reason: String,
}

impl From<(ChangeView, String)> for HeldView {
    fn from((change, reason): (ChangeView, String)) -> Self {
        HeldView { change, reason }
    }
}

/// A mirror group's changes, by user name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MembershipView {
    /// The mirror group's display name.
    pub mirror: String,
    /// The Entra group it mirrors.
    pub entra_group_id: String,
    /// Its identity-store id, once it exists.
    pub group_id: Option<String>,
    /// Created by this run (apply) or to be created (plan).
    pub created: bool,
    /// Renamed after its Entra group.
    pub renamed: bool,
    /// Deleted: no rule uses it and its assignments are gone.
    pub deleted: bool,
    /// Users added.
    pub added: Vec<String>,
    /// Users removed.
    pub removed: Vec<String>,
}

/// An Entra member who could not be given access.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Unresolved {
    /// Entra object id.
    pub entra_id: String,
    /// User principal name.
    pub user_principal_name: String,
    /// Why.
    pub reason: String,
    /// The rules that wanted the user.
    pub rules: Vec<String>,
}

/// A change that was attempted and failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Failure {
    /// The change.
    #[serde(flatten)]
    pub change: ChangeView,
    /// create, delete, record or forget.
    pub operation: String,
    /// The error.
    pub error: String,
}

/// A rule as this run saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RuleView {
    /// Rule name.
    pub name: String,
    /// The Entra group as configured.
    pub entra_group: String,
    /// group or members.
    pub assign: AssignMode,
    /// Resolved permission set ARN.
    pub permission_set_arn: String,
    /// How many accounts its scope covers.
    pub accounts: usize,
    /// The accounts of its scope, each with the scope entries that reach it.
    pub scope: Expansion,
    /// Accounts in scope that are not reconciled, with why.
    pub skipped: Vec<String>,
    /// How many principals it grants (None when held).
    pub principals: Option<usize>,
    /// Why the rule is held, when it is.
    pub held: Option<String>,
}

impl RuleView {
    /// Summarises a resolved rule.
    pub fn new(
        rule: &Rule,
        permission_set_arn: &str,
        source: &RuleSource,
        scope: &Expansion,
        skipped: Vec<String>,
    ) -> Self {
        let (principals, held) = match source {
            RuleSource::Resolved(p) => (Some(p.len()), None),
            RuleSource::Held { reason } => (None, Some(reason.clone())),
        };
        RuleView {
            name: rule.name.to_string(),
            entra_group: String::from(rule.entra_group.clone()),
            assign: rule.assign,
            permission_set_arn: permission_set_arn.to_string(),
            accounts: scope.accounts.len(),
            scope: scope.clone(),
            skipped,
            principals,
            held,
        }
    }
}

/// Everything a run found and did.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Unique run id.
    pub run_id: String,
    /// What started the run.
    pub trigger: String,
    /// Which rules and accounts it reconciled.
    pub target: Target,
    /// plan or apply.
    pub mode: Mode,
    /// How it ended.
    pub outcome: Outcome,
    /// RFC 3339 start time.
    pub started_at: String,
    /// Wall time.
    pub duration_ms: u64,
    /// Assignments created (apply) or to create (plan).
    pub creates: Vec<ChangeView>,
    /// Assignments deleted (apply) or to delete (plan).
    pub deletes: Vec<ChangeView>,
    /// Deletions held back by safety rules.
    pub held: Vec<HeldView>,
    /// Mirror group changes (`assign: mirror`).
    pub memberships: Vec<MembershipView>,
    /// Mirror membership removals and group deletions held back by safety rules.
    pub held_memberships: Vec<HeldMirror>,
    /// Desired assignments that already existed.
    pub unchanged: usize,
    /// Entra members without an Identity Center user.
    pub unresolved: Vec<Unresolved>,
    /// Things to know that are not errors (e.g. a members rule that should be a mirror).
    pub warnings: Vec<String>,
    /// Each rule as this run saw it.
    pub rules: Vec<RuleView>,
    /// The deletion cap that tripped.
    pub guard: Option<GuardTrip>,
    /// Changes that failed (apply).
    pub failures: Vec<Failure>,
    /// Changes not started because the deadline passed (apply); the next run makes them.
    pub deferred: usize,
    /// Pending ledger entries confirmed as owned.
    pub ledger_claimed: usize,
    /// Ledger entries dropped because their assignment no longer exists.
    pub ledger_forgotten: usize,
    /// Requests sent per service.
    pub calls: BTreeMap<String, u64>,
    /// (account, permission set) pairs in play whose assignments were read this run; the
    /// others were taken from the ledger and the unowned assignments last seen.
    pub pairs_read: usize,
    /// Pairs in play taken from the state table without a read.
    pub pairs_trusted: usize,
}

impl Report {
    /// Counts for the run record and metrics.
    pub fn counts(&self) -> BTreeMap<String, u64> {
        let n = |v: usize| v as u64;
        BTreeMap::from([
            ("creates".to_string(), n(self.creates.len())),
            ("deletes".to_string(), n(self.deletes.len())),
            (
                "held".to_string(),
                n(self.held.len()
                    + self
                        .held_memberships
                        .iter()
                        .map(|h| h.removals.len() + usize::from(h.delete_group))
                        .sum::<usize>()),
            ),
            (
                "members_added".to_string(),
                n(self.memberships.iter().map(|m| m.added.len()).sum()),
            ),
            (
                "members_removed".to_string(),
                n(self.memberships.iter().map(|m| m.removed.len()).sum()),
            ),
            ("unchanged".to_string(), n(self.unchanged)),
            ("unresolved".to_string(), n(self.unresolved.len())),
            ("failures".to_string(), n(self.failures.len())),
            ("deferred".to_string(), n(self.deferred)),
        ])
    }

    /// The report as a table for people.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let verb = match self.mode {
            Mode::Plan => ("to create", "to delete"),
            Mode::Apply => ("created", "deleted"),
        };
        let _ = writeln!(out, "Rules:");
        let _ = writeln!(
            out,
            "{}",
            table(
                &[
                    "RULE",
                    "ENTRA GROUP",
                    "MODE",
                    "ACCOUNTS",
                    "PRINCIPALS",
                    "STATUS"
                ],
                self.rules.iter().map(|r| {
                    vec![
                        r.name.clone(),
                        r.entra_group.clone(),
                        format!("{:?}", r.assign).to_lowercase(),
                        r.accounts.to_string(),
                        r.principals.map_or("-".into(), |p| p.to_string()),
                        r.held
                            .as_ref()
                            .map_or("ok".into(), |why| format!("HELD: {why}")),
                    ]
                })
            )
        );
        for r in &self.rules {
            if r.accounts == 0 {
                let _ = writeln!(
                    out,
                    "WARNING: rule {}: its scope expands to zero accounts",
                    r.name
                );
            }
            for s in &r.skipped {
                let _ = writeln!(out, "Skipped for rule {}: {s}", r.name);
            }
        }
        let sections = [
            (format!("Assignments {}", verb.0), "+", &self.creates),
            (format!("Assignments {}", verb.1), "-", &self.deletes),
        ];
        for (title, sign, changes) in sections {
            let _ = writeln!(out, "{title}: {}", changes.len());
            if !changes.is_empty() {
                let _ = writeln!(
                    out,
                    "{}",
                    change_table(sign, changes.iter().map(|c| (c, None)))
                );
            }
        }
        if !self.memberships.is_empty() {
            let _ = writeln!(out, "Mirror groups:");
            for m in &self.memberships {
                let mut what = Vec::new();
                if m.created {
                    what.push("create".to_string());
                }
                if m.renamed {
                    what.push("rename".to_string());
                }
                if m.deleted {
                    what.push("delete".to_string());
                }
                let _ = writeln!(
                    out,
                    "  {}{}",
                    m.mirror,
                    if what.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", what.join(", "))
                    }
                );
                for u in &m.added {
                    let _ = writeln!(out, "    + {u}");
                }
                for u in &m.removed {
                    let _ = writeln!(out, "    - {u}");
                }
            }
            out.push('\n');
        }
        for h in &self.held_memberships {
            let _ = writeln!(
                out,
                "Held back for mirror {}: {} removals{}: {}",
                h.display_name,
                h.removals.len(),
                if h.delete_group {
                    " and the group's deletion"
                } else {
                    ""
                },
                h.reason
            );
        }
        for w in &self.warnings {
            let _ = writeln!(out, "WARNING: {w}");
        }
        if !self.held.is_empty() {
            let _ = writeln!(out, "Deletions held back: {}", self.held.len());
            let _ = writeln!(
                out,
                "{}",
                change_table(
                    "!",
                    self.held
                        .iter()
                        .map(|h| (&h.change, Some(h.reason.as_str())))
                )
            );
        }
        if let Some(g) = &self.guard {
            let by_rule: Vec<String> = g.by_rule.iter().map(|(r, n)| format!("{r}: {n}")).collect();
            let _ = writeln!(
                out,
                "GUARD: {} is {} and this run would delete {} ({}). Nothing was deleted; rerun with --allow-deletions {} to confirm.\n",
                g.guard, g.limit, g.wanted, by_rule.join(", "), g.wanted
            );
        }
        if !self.unresolved.is_empty() {
            let _ = writeln!(
                out,
                "Entra members without Identity Center access: {}",
                self.unresolved.len()
            );
            let _ = writeln!(
                out,
                "{}",
                table(
                    &["USER", "REASON", "RULES"],
                    self.unresolved.iter().map(|u| {
                        vec![
                            u.user_principal_name.clone(),
                            u.reason.clone(),
                            u.rules.join(","),
                        ]
                    })
                )
            );
        }
        if self.deferred > 0 {
            let _ = writeln!(
                out,
                "Deferred: {} changes were not started before the deadline; the next run makes them.\n",
                self.deferred
            );
        }
        if !self.failures.is_empty() {
            let _ = writeln!(out, "Failed changes: {}", self.failures.len());
            for f in &self.failures {
                let _ = writeln!(
                    out,
                    "  {} {} {} {}: {}",
                    f.operation,
                    f.change.account_id,
                    f.change.permission_set_arn,
                    f.change.principal_id,
                    f.error
                );
            }
            out.push('\n');
        }
        let _ = writeln!(
            out,
            "Outcome: {} ({} unchanged, run {}, {} ms)",
            self.outcome.as_str(),
            self.unchanged,
            self.run_id,
            self.duration_ms
        );
        out
    }
}

fn change_table<'a>(
    sign: &str,
    rows: impl Iterator<Item = (&'a ChangeView, Option<&'a str>)>,
) -> String {
    let mut header = vec!["", "ACCOUNT", "PERMISSION SET", "TYPE", "PRINCIPAL", "RULE"];
    let rows: Vec<(&ChangeView, Option<&str>)> = rows.collect();
    let with_reason = rows.iter().any(|(_, r)| r.is_some());
    if with_reason {
        header.push("REASON");
    }
    table(
        &header,
        rows.into_iter().map(|(c, reason)| {
            let mut row = vec![
                sign.to_string(),
                c.account_id.clone(),
                c.permission_set_name
                    .clone()
                    .unwrap_or_else(|| c.permission_set_arn.clone()),
                c.principal_type.clone(),
                c.principal_name
                    .clone()
                    .unwrap_or_else(|| c.principal_id.clone()),
                c.rules.join(","),
            ];
            if with_reason {
                row.push(reason.unwrap_or_default().to_string());
            }
            row
        }),
    )
}

/// Left-aligned columns separated by two spaces.
fn table(header: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = rows.collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "  {}", line.join("  ").trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_documented_contract() {
        let empty = Plan::default();
        let mut pending = Plan::default();
        pending.creates.push(Change {
            assignment: Assignment {
                account_id: crate::model::AccountId::try_from("111111111111".to_string()).unwrap(),
                permission_set_arn: "arn".into(),
                principal_type: crate::model::PrincipalType::Group,
                principal_id: "g".into(),
            },
            rules: vec!["r".into()],
        });
        let mut guarded = pending.clone();
        guarded.guard = Some(GuardTrip {
            guard: "max_deletions",
            limit: 1,
            wanted: 2,
            by_rule: BTreeMap::new(),
        });
        let code = |mode, plan: &Plan, failed, held| {
            Outcome::decide(mode, plan, failed, held, 0).exit_code()
        };
        assert_eq!(code(Mode::Plan, &empty, false, false), 0);
        assert_eq!(code(Mode::Plan, &pending, false, false), 2);
        assert_eq!(code(Mode::Plan, &empty, false, true), 1);
        assert_eq!(code(Mode::Apply, &pending, false, false), 0);
        assert_eq!(code(Mode::Apply, &empty, false, false), 0);
        assert_eq!(code(Mode::Apply, &guarded, false, false), 3);
        assert_eq!(code(Mode::Apply, &pending, true, false), 1);
        let partial = Outcome::decide(Mode::Apply, &pending, false, false, 3);
        assert_eq!(partial.exit_code(), 4);
    }

    #[test]
    fn tables_align_columns() {
        let t = table(
            &["A", "LONGER"],
            vec![vec!["xyz".into(), "1".into()]].into_iter(),
        );
        assert_eq!(t, "  A    LONGER\n  xyz  1\n");
    }
}

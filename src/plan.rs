//! The pure core: from resolved rules, the assignments Identity Center has, and the ownership
//! ledger, compute what to create, delete, claim and forget. No I/O happens here; every input
//! was gathered and resolved beforehand. Safety rules are filters applied to the full diff
//! afterwards, so the diff stays simple and each filter is visible on its own.

use crate::config::RATIO_FLOOR;
use crate::model::{AccountId, Assignment, Principal, PrincipalType};
use serde::Serialize;
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::iter::Peekable;

/// A rule after its Entra group, members and permission set have been looked up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedRule {
    /// The rule's name.
    pub name: String,
    /// The permission set's ARN.
    pub permission_set_arn: String,
    /// Target accounts.
    pub accounts: BTreeSet<AccountId>,
    /// What the rule grants, or why it cannot be evaluated this run.
    pub source: RuleSource,
    /// Set when the rule's source looks suspicious (a scope of zero accounts, a group that lost
    /// every member): the rule still grants, but deletions of what it owned are held.
    pub hold_deletions: Option<String>,
}

/// The principals a rule grants, when they are known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuleSource {
    /// The identity-store principals the rule grants (possibly none).
    Resolved(BTreeSet<Principal>),
    /// The rule could not be evaluated (its Entra group is gone or ambiguous, say). Nothing is
    /// created for it, and deletions of what it owned are held: an unknown source must never
    /// look like an empty one.
    Held {
        /// Why, for the report.
        reason: String,
    },
}

/// A ledger entry: an assignment the tool created, and the rules that wanted it.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Owned {
    /// Rules that wanted the assignment when it was last recorded.
    pub rules: BTreeSet<String>,
    /// Written before the create call and cleared after it settled: a pending entry whose
    /// assignment exists is claimed, one whose assignment does not exist is forgotten. This is
    /// how a run killed mid-apply neither leaks nor invents ownership.
    pub pending: bool,
}

/// Operator limits on deletions.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// `safety.max_deletions`.
    pub max_deletions: u32,
    /// `safety.max_deletion_ratio`: the share of what the tool owns one run may delete, when it
    /// deletes more than [`crate::config::RATIO_FLOOR`] things.
    pub max_deletion_ratio: f64,
    /// A one-off operator override (`apply --allow-deletions N`): up to N deletions pass the
    /// caps, and held rules' deletions are released.
    pub allow_deletions: Option<u32>,
}

/// What the tool never deletes (`safety.protected`, resolved to ids).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Protection {
    /// Accounts whose assignments are never deleted.
    pub accounts: BTreeSet<AccountId>,
    /// Principals whose assignments are never deleted.
    pub principals: BTreeSet<Principal>,
}

/// A mirror group (`assign: mirror`) as the run found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorState {
    /// The Entra group it mirrors.
    pub entra_group_id: String,
    /// The display name it should have.
    pub display_name: String,
    /// The identity-store group, when it exists.
    pub group_id: Option<String>,
    /// Its current display name, when it exists.
    pub current_name: Option<String>,
    /// The users it should hold (id → user name); `None` when the source is unknown this run,
    /// so its membership is left as it is.
    pub desired: Option<BTreeMap<String, String>>,
    /// Its memberships: membership id → user id.
    pub actual: BTreeMap<String, String>,
    /// Whether some rule of this run uses it.
    pub in_use: bool,
    /// Set when its source looks suspicious: membership removals are held.
    pub hold_removals: Option<String>,
}

/// What to do to one mirror group.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MirrorChange {
    /// The Entra group it mirrors.
    pub entra_group_id: String,
    /// Its display name.
    pub display_name: String,
    /// The identity-store group id, when it exists.
    pub group_id: Option<String>,
    /// Create the group.
    pub create: bool,
    /// Rename it to `display_name`.
    pub rename: bool,
    /// Users to add: user id → user name.
    pub add: BTreeMap<String, String>,
    /// Memberships to remove: membership id → user id.
    pub remove: BTreeMap<String, String>,
    /// Delete the group (no rule uses it and none of its assignments remain).
    pub delete_group: bool,
}

impl MirrorChange {
    /// True when nothing changes.
    pub fn is_empty(&self) -> bool {
        !self.create
            && !self.rename
            && self.add.is_empty()
            && self.remove.is_empty()
            && !self.delete_group
    }
}

/// A mirror membership removal or group deletion that safety rules held back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HeldMirror {
    /// The Entra group.
    pub entra_group_id: String,
    /// The mirror's display name.
    pub display_name: String,
    /// User ids whose removal was held.
    pub removals: Vec<String>,
    /// Whether the group's deletion was held.
    pub delete_group: bool,
    /// Why.
    pub reason: String,
}

/// Everything the plan is computed from.
#[derive(Clone, Copy, Debug)]
pub struct PlanInput<'a> {
    /// Every rule of the configuration, resolved.
    pub rules: &'a [ResolvedRule],
    /// Assignments Identity Center has, within what `observed` covers.
    pub actual: &'a BTreeSet<Assignment>,
    /// What of Identity Center was read. The plan judges only what it covers: an owned
    /// assignment outside it is neither deleted nor forgotten.
    pub observed: &'a Observation,
    /// The ownership ledger.
    pub owned: &'a BTreeMap<Assignment, Owned>,
    /// Mirror groups in play.
    pub mirrors: &'a [MirrorState],
    /// What is never deleted.
    pub protection: &'a Protection,
    /// Deletion limits.
    pub limits: Limits,
}

/// The (account, permission set) pairs whose assignments a run knows: read, or taken from the
/// state table where it vouches for them. Whether they were read per pair or per principal,
/// the plan judges whole pairs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observation {
    /// Pairs whose assignments are known in full.
    pub pairs: BTreeSet<(AccountId, String)>,
}

impl Observation {
    /// True when `a`'s pair is known: had `a` existed, the run would know it.
    pub fn covers(&self, a: &Assignment) -> bool {
        self.pairs
            .contains(&(a.account_id.clone(), a.permission_set_arn.clone()))
    }
}

/// One change, with the rules behind it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Change {
    /// The assignment to create or delete.
    #[serde(flatten)]
    pub assignment: Assignment,
    /// For a creation, the rules that want it; for a deletion, the rules that had wanted it.
    pub rules: Vec<String>,
}

/// A deletion that safety rules held back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Held {
    /// The deletion that was not made.
    #[serde(flatten)]
    pub change: Change,
    /// Why.
    pub reason: String,
}

/// A tripped deletion cap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GuardTrip {
    /// Which cap.
    pub guard: &'static str,
    /// The cap's value.
    pub limit: u32,
    /// How many deletions the run wanted.
    pub wanted: usize,
    /// Those deletions counted by the rule that had wanted each assignment.
    pub by_rule: BTreeMap<String, usize>,
}

/// What a run would do.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// Assignments to create.
    pub creates: Vec<Change>,
    /// Assignments to delete (after the safety filters).
    pub deletes: Vec<Change>,
    /// Deletions held back by safety rules.
    pub held: Vec<Held>,
    /// Pending ledger entries whose assignment exists: now owned.
    pub claim: Vec<Assignment>,
    /// Ledger entries whose assignment no longer exists: dropped from the ledger.
    pub forget: Vec<Assignment>,
    /// Owned assignments whose wanting rules changed: the ledger's attribution is refreshed.
    pub retag: Vec<Change>,
    /// Desired assignments that already exist.
    pub unchanged: usize,
    /// Mirror group changes (only groups with something to do).
    pub mirrors: Vec<MirrorChange>,
    /// Mirror removals and deletions held back.
    pub held_mirrors: Vec<HeldMirror>,
    /// The deletion cap that tripped, if any.
    pub guard: Option<GuardTrip>,
}

impl Plan {
    /// True when nothing in Identity Center would change.
    pub fn is_in_sync(&self) -> bool {
        self.creates.is_empty() && self.deletes.is_empty() && self.mirrors.is_empty()
    }

    /// True when safety rules held anything back.
    pub fn any_held(&self) -> bool {
        !self.held.is_empty() || !self.held_mirrors.is_empty()
    }
}

/// The assignments every evaluable rule wants, each with the rules that want it. Several rules
/// may want the same assignment: it is one assignment, kept while any rule wants it.
///
/// This copies every assignment out of the rules; [`plan`] works on [`Desired`], which borrows.
pub fn desired(rules: &[ResolvedRule]) -> BTreeMap<Assignment, BTreeSet<&str>> {
    let desired = Desired::new(rules);
    // The groups come out sorted, so the map is built in bulk rather than by one insert each.
    desired
        .groups()
        .map(|g| (desired.assignment(g), desired.rule_names(g).collect()))
        .collect()
}

/// One rule wanting one assignment, as indices into [`Desired`]'s tables: account, permission
/// set, principal, rule name. The tables are sorted, so indices sort as what they stand for.
type Want = (usize, usize, usize, usize);

/// The assignments every evaluable rule wants (see [`desired`]), borrowed from the rules: at
/// 200,000 assignments, a map keyed by owned assignments spent most of the plan's time copying
/// strings and rebalancing a tree. Here each want is four indices, sorted once.
#[derive(Clone, Debug)]
pub struct Desired<'a> {
    accounts: Vec<&'a AccountId>,
    permission_sets: Vec<&'a str>,
    principals: Vec<&'a Principal>,
    names: Vec<&'a str>,
    /// Sorted and deduplicated: a run of wants of one assignment is that assignment, wanted by
    /// each rule of the run.
    wants: Vec<Want>,
    /// How many distinct assignments `wants` holds.
    assignments: usize,
}

impl<'a> Desired<'a> {
    /// The desired set of `rules`. A rule that cannot be evaluated wants nothing.
    pub fn new(rules: &'a [ResolvedRule]) -> Desired<'a> {
        let resolved: Vec<(&ResolvedRule, &BTreeSet<Principal>)> = rules
            .iter()
            .filter_map(|r| match &r.source {
                RuleSource::Resolved(principals) => Some((r, principals)),
                RuleSource::Held { .. } => None,
            })
            .collect();
        let accounts = sorted_unique(resolved.iter().flat_map(|(r, _)| &r.accounts));
        let permission_sets =
            sorted_unique(resolved.iter().map(|(r, _)| r.permission_set_arn.as_str()));
        let principals = sorted_unique(resolved.iter().flat_map(|&(_, p)| p));
        let names = sorted_unique(resolved.iter().map(|(r, _)| r.name.as_str()));

        let total = resolved
            .iter()
            .map(|(r, p)| r.accounts.len().saturating_mul(p.len()))
            .fold(0, usize::saturating_add);
        let mut wants = Vec::with_capacity(total);
        for (rule, rule_principals) in &resolved {
            let ps = index_of(&permission_sets, &rule.permission_set_arn.as_str());
            let name = index_of(&names, &rule.name.as_str());
            let ids: Vec<usize> = rule_principals
                .iter()
                .map(|p| index_of(&principals, &p))
                .collect();
            for account in &rule.accounts {
                let account = index_of(&accounts, &account);
                wants.extend(ids.iter().map(|&p| (account, ps, p, name)));
            }
        }
        wants.sort_unstable();
        wants.dedup();
        let assignments = wants.chunk_by(same_assignment).count();
        Desired {
            accounts,
            permission_sets,
            principals,
            names,
            wants,
            assignments,
        }
    }

    /// How many distinct assignments are desired.
    pub fn len(&self) -> usize {
        self.assignments
    }

    /// True when no assignment is desired.
    pub fn is_empty(&self) -> bool {
        self.wants.is_empty()
    }

    /// The desired assignments in order, each as the (never empty) run of its wants.
    fn groups(&self) -> impl Iterator<Item = &[Want]> {
        self.wants.chunk_by(same_assignment)
    }

    /// How the assignment of `group` orders against `a`, without building it.
    fn cmp(&self, group: &[Want], a: &Assignment) -> Ordering {
        let (account, ps, p) = self.key(group);
        (account, ps, p.principal_type, p.principal_id.as_str()).cmp(&(
            &a.account_id,
            a.permission_set_arn.as_str(),
            a.principal_type,
            a.principal_id.as_str(),
        ))
    }

    /// The assignment of `group`, copied out.
    fn assignment(&self, group: &[Want]) -> Assignment {
        let (account, ps, p) = self.key(group);
        Assignment {
            account_id: account.clone(),
            permission_set_arn: ps.to_string(),
            principal_type: p.principal_type,
            principal_id: p.principal_id.clone(),
        }
    }

    /// The names of the rules that want the assignment of `group`, in order.
    fn rule_names<'s>(&'s self, group: &'s [Want]) -> impl Iterator<Item = &'a str> + 's {
        group.iter().map(|w| self.names[w.3])
    }

    fn key(&self, group: &[Want]) -> (&'a AccountId, &'a str, &'a Principal) {
        // Runs from `groups` are never empty, and every index was taken from these tables.
        let (account, ps, p, _) = group[0];
        (
            self.accounts[account],
            self.permission_sets[ps],
            self.principals[p],
        )
    }
}

fn same_assignment(x: &Want, y: &Want) -> bool {
    (x.0, x.1, x.2) == (y.0, y.1, y.2)
}

fn sorted_unique<T: Ord>(items: impl Iterator<Item = T>) -> Vec<T> {
    let mut v: Vec<T> = items.collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Where `item` sits in `table`; every item looked up was put there, so it is always found.
fn index_of<T: Ord>(table: &[T], item: &T) -> usize {
    table.binary_search(item).unwrap_or_else(|i| i)
}

/// Steps a sorted walk past every item before the one sought and returns that one if it is
/// next. `cmp` orders the sought item against an item of the walk.
fn advance_to<I: Iterator>(
    walk: &mut Peekable<I>,
    cmp: impl Fn(&I::Item) -> Ordering,
) -> Option<&I::Item> {
    loop {
        match walk.peek().map(&cmp) {
            Some(Ordering::Greater) => {
                walk.next();
            }
            Some(Ordering::Equal) => return walk.peek(),
            Some(Ordering::Less) | None => return None,
        }
    }
}

/// Counts one desired assignment as unchanged, or plans its creation. `actual` walks the
/// actual set and has not passed `group` yet.
fn judge_desired<'i>(
    desired: &Desired<'_>,
    group: &[Want],
    actual: &mut Peekable<impl Iterator<Item = &'i Assignment>>,
    plan: &mut Plan,
) {
    if advance_to(actual, |x| desired.cmp(group, x)).is_some() {
        plan.unchanged += 1;
    } else {
        plan.creates.push(Change {
            assignment: desired.assignment(group),
            rules: desired.rule_names(group).map(str::to_string).collect(),
        });
    }
}

/// Computes the plan: the raw diff, then the safety filters.
pub fn plan(input: PlanInput<'_>) -> Plan {
    let desired = Desired::new(input.rules);
    let mut plan = Plan::default();

    // Borrowed keys: the ledger may hold 200,000 entries, each checked without cloning.
    let pairs: BTreeSet<(&str, &str)> = input
        .observed
        .pairs
        .iter()
        .map(|(a, ps)| (a.as_str(), ps.as_str()))
        .collect();
    // Sorted ledger entries come in long runs of one (account, permission set).
    let mut last_pair: Option<((&str, &str), bool)> = None;

    // The desired set, the actual set and the ledger all sort by assignment, so one merge walk
    // over the three answers every membership question: no lookups, and nothing is copied but
    // what the plan outputs. The actual set is walked once, in step with both others: its
    // strings are read from memory once, which is most of the cost at 200,000 assignments.
    let mut actual = input.actual.iter().peekable();
    let mut groups = desired.groups().peekable();
    let mut candidates = Vec::new();
    for (a, owned) in input.owned {
        // Desired assignments up to this entry first, so the walk over `actual` stays in order.
        let mut wanted = None;
        while let Some(&g) = groups.peek() {
            let order = desired.cmp(g, a);
            if order == Ordering::Greater {
                break;
            }
            groups.next();
            judge_desired(&desired, g, &mut actual, &mut plan);
            if order == Ordering::Equal {
                wanted = Some(g);
            }
        }

        let pair = (a.account_id.as_str(), a.permission_set_arn.as_str());
        let pair_read = match last_pair {
            Some((last, read)) if last == pair => read,
            _ => {
                let read = pairs.contains(&pair);
                last_pair = Some((pair, read));
                read
            }
        };
        if !pair_read {
            continue;
        }
        if advance_to(&mut actual, |x| a.cmp(*x)).is_none() {
            plan.forget.push(a.clone());
            continue;
        }
        if owned.pending {
            plan.claim.push(a.clone());
        }
        match wanted {
            Some(g)
                if !desired
                    .rule_names(g)
                    .eq(owned.rules.iter().map(String::as_str)) =>
            {
                plan.retag.push(Change {
                    assignment: a.clone(),
                    rules: desired.rule_names(g).map(str::to_string).collect(),
                })
            }
            Some(_) => {}
            None => candidates.push(Change {
                assignment: a.clone(),
                rules: owned.rules.iter().cloned().collect(),
            }),
        }
    }
    for g in groups {
        judge_desired(&desired, g, &mut actual, &mut plan);
    }

    let mut mirrors: Vec<MirrorChange> = input.mirrors.iter().map(mirror_change).collect();
    apply_safety(&mut plan, candidates, &mut mirrors, &input);
    plan.mirrors = mirrors.into_iter().filter(|m| !m.is_empty()).collect();
    plan
}

/// The raw change of one mirror: create or rename it, and bring its members to the desired set.
fn mirror_change(m: &MirrorState) -> MirrorChange {
    let mut change = MirrorChange {
        entra_group_id: m.entra_group_id.clone(),
        display_name: m.display_name.clone(),
        group_id: m.group_id.clone(),
        ..MirrorChange::default()
    };
    if !m.in_use {
        // Deleted after its assignments, if none remain (decided with the deletions).
        return change;
    }
    change.create = m.group_id.is_none();
    change.rename =
        m.group_id.is_some() && m.current_name.as_deref() != Some(m.display_name.as_str());
    if let Some(desired) = &m.desired {
        let present: BTreeSet<&String> = m.actual.values().collect();
        change.add = desired
            .iter()
            .filter(|(user, _)| !present.contains(user))
            .map(|(u, n)| (u.clone(), n.clone()))
            .collect();
        // Each unwanted membership goes, duplicates included (moto and retries can leave two).
        let mut kept = BTreeSet::new();
        change.remove = m
            .actual
            .iter()
            .filter(|(_, user)| !desired.contains_key(*user) || !kept.insert(*user))
            .map(|(id, u)| (id.clone(), u.clone()))
            .collect();
    }
    change
}

/// The safety filters, in order: protected accounts and principals are never deleted;
/// deletions owned by held or suspicious rules, and removals from suspicious mirrors, are held;
/// unused mirror groups are deleted once none of their assignments remain; then the deletion
/// caps (count and ratio) hold every deletion of the run if it would delete too much.
fn apply_safety(
    plan: &mut Plan,
    candidates: Vec<Change>,
    mirrors: &mut [MirrorChange],
    input: &PlanInput<'_>,
) {
    let limits = input.limits;
    let held_rules: BTreeMap<&str, &str> = input
        .rules
        .iter()
        .filter_map(|r| match (&r.source, &r.hold_deletions) {
            (RuleSource::Held { reason }, _) | (_, Some(reason)) => {
                Some((r.name.as_str(), reason.as_str()))
            }
            (RuleSource::Resolved(_), None) => None,
        })
        .collect();
    let overridden = limits.allow_deletions.is_some();

    let mut deletes = Vec::new();
    for change in candidates {
        let a = &change.assignment;
        if input.protection.accounts.contains(&a.account_id)
            || input.protection.principals.contains(&a.principal())
        {
            plan.held.push(Held {
                reason: "protected by safety.protected".into(),
                change,
            });
            continue;
        }
        let holding = change
            .rules
            .iter()
            .find_map(|r| held_rules.get(r.as_str()).map(|why| (r, why)));
        match holding {
            Some((rule, why)) if !overridden => plan.held.push(Held {
                reason: format!("rule {rule} is held: {why}"),
                change,
            }),
            _ => deletes.push(change),
        }
    }

    for (m, state) in mirrors.iter_mut().zip(input.mirrors) {
        if let (Some(why), false) = (&state.hold_removals, m.remove.is_empty() || overridden) {
            plan.held_mirrors.push(HeldMirror {
                entra_group_id: m.entra_group_id.clone(),
                display_name: m.display_name.clone(),
                removals: std::mem::take(&mut m.remove).into_values().collect(),
                delete_group: false,
                reason: why.clone(),
            });
        }
        if !state.in_use {
            if let Some(group) = &state.group_id {
                let deleting: BTreeSet<&Assignment> =
                    deletes.iter().map(|c| &c.assignment).collect();
                let remaining = input.owned.keys().any(|a| {
                    a.principal_type == PrincipalType::Group
                        && &a.principal_id == group
                        && !deleting.contains(a)
                });
                m.delete_group = !remaining;
            }
        }
    }

    let mirror_deletions: usize = mirrors
        .iter()
        .map(|m| m.remove.len() + usize::from(m.delete_group))
        .sum();
    let total = deletes.len() + mirror_deletions;
    let owned_total =
        input.owned.len() + input.mirrors.iter().map(|m| m.actual.len()).sum::<usize>();
    let ratio_cap = (limits.max_deletion_ratio * owned_total as f64).floor() as usize;
    let trip = match limits.allow_deletions {
        Some(allowed) => {
            (total > allowed as usize).then_some(("allow_deletions", allowed as usize))
        }
        None if total > limits.max_deletions as usize => {
            Some(("max_deletions", limits.max_deletions as usize))
        }
        None if total > RATIO_FLOOR && total > ratio_cap => Some(("max_deletion_ratio", ratio_cap)),
        None => None,
    };
    let Some((guard, limit)) = trip else {
        plan.deletes = deletes;
        return;
    };
    let mut by_rule = BTreeMap::new();
    for change in &deletes {
        for rule in &change.rules {
            *by_rule.entry(rule.clone()).or_insert(0) += 1;
        }
    }
    for m in mirrors
        .iter()
        .filter(|m| !m.remove.is_empty() || m.delete_group)
    {
        *by_rule
            .entry(format!("mirror {}", m.display_name))
            .or_insert(0) += m.remove.len() + usize::from(m.delete_group);
    }
    let reason = format!("{guard} allows {limit} and this run would delete {total}");
    plan.guard = Some(GuardTrip {
        guard,
        limit: u32::try_from(limit).unwrap_or(u32::MAX),
        wanted: total,
        by_rule,
    });
    plan.held.extend(deletes.into_iter().map(|change| Held {
        change,
        reason: reason.clone(),
    }));
    for m in mirrors
        .iter_mut()
        .filter(|m| !m.remove.is_empty() || m.delete_group)
    {
        plan.held_mirrors.push(HeldMirror {
            entra_group_id: m.entra_group_id.clone(),
            display_name: m.display_name.clone(),
            removals: std::mem::take(&mut m.remove).into_values().collect(),
            delete_group: std::mem::take(&mut m.delete_group),
            reason: reason.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PrincipalType;
    use proptest::prelude::*;

    const PS: &str = "arn:aws:sso:::permissionSet/ssoins-1/ps-1";

    fn acct(n: u8) -> AccountId {
        AccountId::try_from(format!("{:012}", n)).unwrap()
    }

    fn group(id: &str) -> Principal {
        Principal {
            principal_type: PrincipalType::Group,
            principal_id: id.into(),
        }
    }

    fn asg(account: u8, principal: &str) -> Assignment {
        Assignment {
            account_id: acct(account),
            permission_set_arn: PS.into(),
            principal_type: PrincipalType::Group,
            principal_id: principal.into(),
        }
    }

    fn rule(name: &str, accounts: &[u8], principals: &[&str]) -> ResolvedRule {
        ResolvedRule {
            name: name.into(),
            permission_set_arn: PS.into(),
            accounts: accounts.iter().map(|&a| acct(a)).collect(),
            source: RuleSource::Resolved(principals.iter().map(|p| group(p)).collect()),
            hold_deletions: None,
        }
    }

    fn owned_by(rules: &[&str]) -> Owned {
        Owned {
            rules: rules.iter().map(|r| r.to_string()).collect(),
            pending: false,
        }
    }

    fn observed(accounts: &[u8]) -> Observation {
        Observation {
            pairs: accounts
                .iter()
                .map(|&a| (acct(a), PS.to_string()))
                .collect(),
        }
    }

    const LIMITS: Limits = Limits {
        max_deletions: 20,
        max_deletion_ratio: 1.0,
        allow_deletions: None,
    };

    fn run(
        rules: &[ResolvedRule],
        actual: &BTreeSet<Assignment>,
        owned: &BTreeMap<Assignment, Owned>,
        limits: Limits,
    ) -> Plan {
        plan(PlanInput {
            rules,
            actual,
            observed: &observed(&[1, 2, 3, 4]),
            owned,
            mirrors: &[],
            protection: &Protection::default(),
            limits,
        })
    }

    #[test]
    fn creates_what_is_missing_and_counts_what_exists() {
        let rules = [rule("r", &[1, 2], &["g"])];
        let actual = BTreeSet::from([asg(1, "g")]);
        let p = run(&rules, &actual, &BTreeMap::new(), LIMITS);
        assert_eq!(p.creates.len(), 1);
        assert_eq!(p.creates[0].assignment, asg(2, "g"));
        assert_eq!(p.creates[0].rules, vec!["r".to_string()]);
        assert_eq!(p.unchanged, 1);
        assert!(p.deletes.is_empty());
    }

    #[test]
    fn one_assignment_wanted_by_two_rules_is_created_once_and_kept_while_either_wants_it() {
        let rules = [rule("a", &[1], &["g"]), rule("b", &[1], &["g"])];
        let p = run(&rules, &BTreeSet::new(), &BTreeMap::new(), LIMITS);
        assert_eq!(p.creates.len(), 1);
        assert_eq!(p.creates[0].rules, vec!["a".to_string(), "b".to_string()]);

        let actual = BTreeSet::from([asg(1, "g")]);
        let owned = BTreeMap::from([(asg(1, "g"), owned_by(&["a", "b"]))]);
        let p = run(&rules[1..], &actual, &owned, LIMITS);
        assert!(p.deletes.is_empty());
        assert_eq!(p.retag.len(), 1, "attribution narrows to rule b");
        assert_eq!(p.retag[0].rules, vec!["b".to_string()]);
    }

    #[test]
    fn deletes_only_what_it_owns() {
        let rules = [rule("r", &[1], &["g"])];
        let actual = BTreeSet::from([asg(1, "g"), asg(1, "mine"), asg(1, "by-hand")]);
        let owned = BTreeMap::from([(asg(1, "mine"), owned_by(&["old"]))]);
        let p = run(&rules, &actual, &owned, LIMITS);
        assert_eq!(
            p.deletes,
            vec![Change {
                assignment: asg(1, "mine"),
                rules: vec!["old".into()]
            }]
        );
        assert!(p.creates.is_empty());
    }

    #[test]
    fn pending_entries_are_claimed_or_forgotten_by_what_exists() {
        let rules = [rule("r", &[1, 2], &["g"])];
        let actual = BTreeSet::from([asg(1, "g")]);
        let pending = Owned {
            rules: BTreeSet::from(["r".to_string()]),
            pending: true,
        };
        let owned = BTreeMap::from([(asg(1, "g"), pending.clone()), (asg(2, "g"), pending)]);
        let p = run(&rules, &actual, &owned, LIMITS);
        assert_eq!(p.claim, vec![asg(1, "g")]);
        assert_eq!(p.forget, vec![asg(2, "g")]);
        assert_eq!(p.creates.len(), 1, "the never-created one is created again");
    }

    #[test]
    fn owned_assignments_outside_the_observed_pairs_are_left_alone() {
        let owned = BTreeMap::from([(asg(9, "x"), owned_by(&["gone"]))]);
        let p = run(&[], &BTreeSet::new(), &owned, LIMITS);
        assert_eq!(p, Plan::default());
    }

    #[test]
    fn a_held_rule_creates_nothing_and_its_deletions_are_held() {
        let mut held = rule("r", &[1], &[]);
        held.source = RuleSource::Held {
            reason: "Entra group not found".into(),
        };
        let actual = BTreeSet::from([asg(1, "g")]);
        let owned = BTreeMap::from([(asg(1, "g"), owned_by(&["r"]))]);
        let p = run(&[held.clone()], &actual, &owned, LIMITS);
        assert!(p.deletes.is_empty() && p.creates.is_empty());
        assert_eq!(p.held.len(), 1);
        assert!(p.held[0].reason.contains("Entra group not found"));

        let p = run(
            &[held],
            &actual,
            &owned,
            Limits {
                allow_deletions: Some(1),
                ..LIMITS
            },
        );
        assert_eq!(p.deletes.len(), 1, "the operator's override releases it");
    }

    #[test]
    fn a_suspicious_rule_still_grants_but_its_deletions_are_held() {
        let mut r = rule("r", &[1], &["new"]);
        r.hold_deletions = Some("scope expands to zero accounts".into());
        let actual = BTreeSet::from([asg(1, "old")]);
        let owned = BTreeMap::from([(asg(1, "old"), owned_by(&["r"]))]);
        let p = run(&[r], &actual, &owned, LIMITS);
        assert_eq!(p.creates.len(), 1);
        assert!(p.deletes.is_empty());
        assert!(p.held[0].reason.contains("zero accounts"), "{:?}", p.held);
    }

    #[test]
    fn the_deletion_cap_holds_every_deletion_but_not_the_creations() {
        let rules = [rule("keep", &[1], &["new"])];
        let actual: BTreeSet<_> = ["a", "b", "c"].iter().map(|p| asg(2, p)).collect();
        let owned: BTreeMap<_, _> = actual
            .iter()
            .map(|a| (a.clone(), owned_by(&["removed"])))
            .collect();
        let limits = Limits {
            max_deletions: 2,
            ..LIMITS
        };
        let p = run(&rules, &actual, &owned, limits);
        assert!(p.deletes.is_empty());
        assert_eq!(p.held.len(), 3);
        assert_eq!(p.creates.len(), 1);
        let guard = p.guard.unwrap();
        assert_eq!((guard.limit, guard.wanted), (2, 3));
        assert_eq!(guard.by_rule, BTreeMap::from([("removed".to_string(), 3)]));

        let p = run(
            &rules,
            &actual,
            &owned,
            Limits {
                allow_deletions: Some(3),
                ..limits
            },
        );
        assert_eq!(p.deletes.len(), 3);
        assert!(p.guard.is_none());
    }

    fn arb_world() -> impl Strategy<
        Value = (
            Vec<ResolvedRule>,
            BTreeSet<Assignment>,
            BTreeMap<Assignment, Owned>,
        ),
    > {
        let principal = prop::sample::select(vec!["g1", "g2", "g3", "u1", "u2"]);
        let rule_s = (
            prop::collection::btree_set(1u8..5, 1..3),
            prop::collection::btree_set(principal.clone(), 0..4),
        );
        let rules = prop::collection::vec(rule_s, 0..4).prop_map(|rs| {
            rs.into_iter()
                .enumerate()
                .map(|(i, (accts, ps))| {
                    let accts: Vec<u8> = accts.into_iter().collect();
                    let ps: Vec<&str> = ps.into_iter().collect();
                    rule(&format!("r{i}"), &accts, &ps)
                })
                .collect::<Vec<_>>()
        });
        let asg_s = (1u8..5, principal).prop_map(|(a, p)| asg(a, p));
        let actual = prop::collection::btree_set(asg_s.clone(), 0..10);
        let owned =
            prop::collection::btree_map(asg_s, (any::<bool>(), 0usize..4), 0..10).prop_map(|m| {
                m.into_iter()
                    .map(|(a, (pending, r))| {
                        let rules = BTreeSet::from([format!("r{r}")]);
                        (a, Owned { rules, pending })
                    })
                    .collect()
            });
        (rules, actual, owned)
    }

    /// What applying a plan does to the world, as the executor would.
    fn apply(p: &Plan, actual: &mut BTreeSet<Assignment>, owned: &mut BTreeMap<Assignment, Owned>) {
        for a in &p.forget {
            owned.remove(a);
        }
        for a in &p.claim {
            if let Some(o) = owned.get_mut(a) {
                o.pending = false;
            }
        }
        for c in &p.retag {
            if let Some(o) = owned.get_mut(&c.assignment) {
                o.rules = c.rules.iter().cloned().collect();
            }
        }
        for c in &p.creates {
            actual.insert(c.assignment.clone());
            owned.insert(
                c.assignment.clone(),
                Owned {
                    rules: c.rules.iter().cloned().collect(),
                    pending: false,
                },
            );
        }
        for c in &p.deletes {
            actual.remove(&c.assignment);
            owned.remove(&c.assignment);
        }
    }

    proptest! {
        #[test]
        fn never_deletes_what_it_does_not_own_and_converges((rules, actual, owned) in arb_world()) {
            let limits = Limits { max_deletions: 1000, max_deletion_ratio: 1.0, allow_deletions: None };
            let p = run(&rules, &actual, &owned, limits);
            let want = desired(&rules);
            for d in &p.deletes {
                prop_assert!(owned.contains_key(&d.assignment), "deletes unowned {}", d.assignment);
                prop_assert!(!want.contains_key(&d.assignment), "deletes a desired {}", d.assignment);
            }
            for c in &p.creates {
                prop_assert!(!actual.contains(&c.assignment));
            }

            let (mut actual2, mut owned2) = (actual.clone(), owned.clone());
            apply(&p, &mut actual2, &mut owned2);
            for a in want.keys() {
                prop_assert!(actual2.contains(a), "desired {} missing after apply", a);
            }
            for a in owned2.keys() {
                prop_assert!(actual2.contains(a), "ledger claims {} that does not exist", a);
            }
            let again = run(&rules, &actual2, &owned2, limits);
            prop_assert!(again.is_in_sync(), "second plan not empty: {:?}", again);
            prop_assert!(again.claim.is_empty() && again.forget.is_empty() && again.retag.is_empty());
        }
    }
}

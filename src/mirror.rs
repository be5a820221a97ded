//! `assign: mirror`: an Identity Center group the tool owns, whose members are an Entra group's
//! transitive user members, assigned like any group. This is how nested Entra groups scale:
//! one assignment per account instead of one per user per account.
//!
//! The tool only ever changes groups it created and recorded in the state table (`MIRROR`
//! items); a group with the mirror's name that the tool did not create holds the rule.

use crate::aws::AwsError;
use crate::config::MirrorConfig;
use crate::engine::{EngineError, Gathered};
use crate::identity::{IdentityStore, Kind};
use crate::model::{Principal, PrincipalType};
use crate::plan::{MirrorChange, MirrorState, Plan, RuleSource};
use crate::report::{ChangeView, Failure, MembershipView};
use crate::state::{MirrorRecord, StateStore};
use std::collections::{BTreeMap, BTreeSet};

/// An Entra group mirrored by the rules of this run.
#[derive(Clone, Debug, Default)]
pub struct Source {
    /// The Entra group's display name (the mirror is named from it).
    pub entra_display_name: String,
    /// Identity-store user id → user name of its resolved transitive members.
    pub members: Option<BTreeMap<String, String>>,
    /// Set when the source looks suspicious: membership removals are held.
    pub hold_removals: Option<String>,
    /// The rules that use it.
    pub rules: Vec<String>,
}

/// The principal a mirror rule grants before its group exists (plan mode only).
pub fn placeholder(entra_group_id: &str) -> Principal {
    Principal {
        principal_type: PrincipalType::Group,
        principal_id: format!("(new mirror of {entra_group_id})"),
    }
}

/// True for [`placeholder`]'s principal: nothing exists under it in Identity Center.
pub fn is_placeholder(p: &Principal) -> bool {
    p.principal_id.starts_with("(new mirror of ")
}

/// Finds (and, when applying, creates) each mirror group, reads its members, and puts the
/// real group ids into the rules. Returns the mirror states the plan works from: the ones in
/// use, and in a full run the recorded ones no rule uses any more.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn prepare(
    identity: &dyn IdentityStore,
    state: &dyn StateStore,
    config: &MirrorConfig,
    g: &mut Gathered,
    records: &[MirrorRecord],
    apply: bool,
    full_run: bool,
    failures: &mut Vec<Failure>,
) -> Result<Vec<MirrorState>, EngineError> {
    let by_entra: BTreeMap<&str, &MirrorRecord> = records
        .iter()
        .map(|r| (r.entra_group_id.as_str(), r))
        .collect();
    let mut out = Vec::new();
    let sources = std::mem::take(&mut g.mirror_sources);
    for (entra_id, source) in &sources {
        let display_name = format!("{}{}", config.group_prefix, source.entra_display_name);
        let mut group = None;
        let mut actual = BTreeMap::new();
        let mut current_name = None;
        if let Some(record) = by_entra.get(entra_id.as_str()) {
            match identity.memberships(&record.group_id).await {
                Ok(m) => {
                    group = Some(record.group_id.clone());
                    actual = m;
                    current_name = Some(record.display_name.clone());
                }
                Err(e) if e.code() == Some("ResourceNotFoundException") => {
                    tracing::warn!(
                        mirror = record.display_name,
                        "mirror group is gone; it will be created again"
                    );
                }
                Err(e) => return Err(e.into()),
            }
        }
        if group.is_none() {
            if let Some(other) = identity.find(Kind::Group, &display_name).await? {
                let reason = format!(
                    "an Identity Center group named {display_name:?} ({other}) exists that the tool did not create; rename it or change mirror.group_prefix"
                );
                hold_rules(g, &source.rules, &reason);
                continue;
            }
            if apply {
                match create(identity, state, entra_id, &display_name).await {
                    Ok(id) => {
                        g.created_mirrors.push(display_name.clone());
                        group = Some(id);
                        current_name = Some(display_name.clone());
                    }
                    Err(e) => {
                        failures.push(Failure {
                            change: ChangeView::default(),
                            operation: "create mirror group".into(),
                            error: format!("{display_name}: {e}"),
                        });
                        hold_rules(
                            g,
                            &source.rules,
                            &format!("its mirror group could not be created: {e}"),
                        );
                        continue;
                    }
                }
            }
        }
        let principal = match &group {
            Some(id) => Principal {
                principal_type: PrincipalType::Group,
                principal_id: id.clone(),
            },
            None => placeholder(entra_id),
        };
        g.principal_names
            .insert(principal.clone(), display_name.clone());
        // Name the members about to be removed (one look-up each; removals are rare).
        if let Some(desired) = &source.members {
            for user in actual.values().filter(|u| !desired.contains_key(*u)) {
                let p = Principal {
                    principal_type: PrincipalType::User,
                    principal_id: user.clone(),
                };
                if let std::collections::btree_map::Entry::Vacant(slot) = g.principal_names.entry(p)
                {
                    if let Some(name) = identity.user_name(user).await? {
                        slot.insert(name);
                    }
                }
            }
        }
        let pending = placeholder(entra_id);
        for rule in g
            .rules
            .iter_mut()
            .filter(|r| source.rules.contains(&r.name))
        {
            if let RuleSource::Resolved(principals) = &mut rule.source {
                if principals.remove(&pending) {
                    principals.insert(principal.clone());
                }
            }
        }
        out.push(MirrorState {
            entra_group_id: entra_id.clone(),
            display_name,
            group_id: group,
            current_name,
            desired: source.members.clone(),
            actual,
            in_use: true,
            hold_removals: source.hold_removals.clone(),
        });
    }
    if full_run {
        for record in records
            .iter()
            .filter(|r| !sources.contains_key(&r.entra_group_id))
        {
            g.principal_names.insert(
                Principal {
                    principal_type: PrincipalType::Group,
                    principal_id: record.group_id.clone(),
                },
                record.display_name.clone(),
            );
            out.push(MirrorState {
                entra_group_id: record.entra_group_id.clone(),
                display_name: record.display_name.clone(),
                group_id: Some(record.group_id.clone()),
                current_name: Some(record.display_name.clone()),
                desired: None,
                actual: BTreeMap::new(),
                in_use: false,
                hold_removals: None,
            });
        }
    }
    Ok(out)
}

/// Holds the rules using a mirror that cannot be used.
fn hold_rules(g: &mut Gathered, rules: &[String], reason: &str) {
    for rule in g.rules.iter_mut().filter(|r| rules.contains(&r.name)) {
        rule.source = RuleSource::Held {
            reason: reason.to_string(),
        };
    }
    for view in g.views.iter_mut().filter(|v| rules.contains(&v.name)) {
        view.held = Some(reason.to_string());
        view.principals = None;
    }
}

/// Creates a mirror group and records it before anything else refers to it.
async fn create(
    identity: &dyn IdentityStore,
    state: &dyn StateStore,
    entra_id: &str,
    display_name: &str,
) -> Result<String, AwsError> {
    let description =
        format!("Managed by entra-sso-sync: transitive members of Entra group {entra_id}");
    let id = identity.create_group(display_name, &description).await?;
    let record = MirrorRecord {
        entra_group_id: entra_id.to_string(),
        group_id: id.clone(),
        display_name: display_name.to_string(),
    };
    if let Err(e) = state.put_mirror(&record).await {
        // Unrecorded, the group would look foreign next run: take it back.
        let _ = identity.delete_group(&id).await;
        return Err(e);
    }
    tracing::info!(mirror = display_name, "created mirror group");
    Ok(id)
}

/// Renames and fills mirrors (before assignments are created). A failed rename is a warning:
/// the mirror is the same group whatever its name, and the next run tries again.
pub(crate) async fn grow(
    identity: &dyn IdentityStore,
    state: &dyn StateStore,
    change: &MirrorChange,
    warnings: &mut Vec<String>,
) -> Vec<Failure> {
    let mut failures = Vec::new();
    let Some(group) = &change.group_id else {
        return failures;
    };
    if change.rename {
        match identity.rename_group(group, &change.display_name).await {
            Ok(()) => {
                let record = MirrorRecord {
                    entra_group_id: change.entra_group_id.clone(),
                    group_id: group.clone(),
                    display_name: change.display_name.clone(),
                };
                if let Err(e) = state.put_mirror(&record).await {
                    warnings.push(format!(
                        "renamed mirror {} but could not record it: {e}",
                        change.display_name
                    ));
                }
            }
            Err(e) => warnings.push(format!(
                "could not rename mirror group {group} to {:?}: {e}",
                change.display_name
            )),
        }
    }
    for (user, name) in &change.add {
        if let Err(e) = identity.add_membership(group, user).await {
            failures.push(failure(change, "add member", format!("{name}: {e}")));
        }
    }
    failures
}

/// Removes memberships and deletes unused mirrors (after assignments are deleted). A group is
/// deleted only when every deletion of its assignments succeeded.
pub(crate) async fn shrink(
    identity: &dyn IdentityStore,
    state: &dyn StateStore,
    change: &MirrorChange,
    assignments_left: bool,
) -> Vec<Failure> {
    let mut failures = Vec::new();
    let Some(group) = &change.group_id else {
        return failures;
    };
    for (membership, user) in &change.remove {
        if let Err(e) = identity.remove_membership(membership).await {
            failures.push(failure(change, "remove member", format!("{user}: {e}")));
        }
    }
    if change.delete_group && !assignments_left {
        match identity.delete_group(group).await {
            Ok(()) => {
                if let Err(e) = state.remove_mirror(&change.entra_group_id).await {
                    failures.push(failure(change, "forget mirror", e.to_string()));
                }
            }
            Err(e) => failures.push(failure(change, "delete mirror group", e.to_string())),
        }
    }
    failures
}

fn failure(change: &MirrorChange, operation: &str, error: String) -> Failure {
    Failure {
        change: ChangeView {
            principal_type: "GROUP".into(),
            principal_id: change.group_id.clone().unwrap_or_default(),
            principal_name: Some(change.display_name.clone()),
            ..ChangeView::default()
        },
        operation: operation.into(),
        error,
    }
}

/// The report's `memberships` section: each mirror that changes, with user names.
pub(crate) fn views(
    plan: &Plan,
    names: &BTreeMap<Principal, String>,
    created: &[String],
) -> Vec<MembershipView> {
    let user_name = |id: &String| {
        names
            .get(&Principal {
                principal_type: PrincipalType::User,
                principal_id: id.clone(),
            })
            .cloned()
            .unwrap_or_else(|| id.clone())
    };
    let mut out: Vec<MembershipView> = plan
        .mirrors
        .iter()
        .map(|m| MembershipView {
            mirror: m.display_name.clone(),
            entra_group_id: m.entra_group_id.clone(),
            group_id: m.group_id.clone(),
            created: m.create,
            renamed: m.rename,
            deleted: m.delete_group,
            added: m.add.values().cloned().collect(),
            removed: m.remove.values().map(user_name).collect(),
        })
        .collect();
    let listed: BTreeSet<String> = out.iter().map(|v| v.mirror.clone()).collect();
    for name in created.iter().filter(|n| !listed.contains(*n)) {
        out.push(MembershipView {
            mirror: name.clone(),
            created: true,
            ..MembershipView::default()
        });
    }
    for v in out.iter_mut().filter(|v| created.contains(&v.mirror)) {
        v.created = true;
    }
    out.sort_by(|a, b| a.mirror.cmp(&b.mirror));
    out
}

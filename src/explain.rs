//! "Why does this person have this access?" and "which rules reach this account?": read-only
//! answers for people, from the same configuration, scopes and lookups a run uses.

use crate::config::{AssignMode, Config};
use crate::directory::DirGroup;
use crate::engine::{expand_scopes, Engine, EngineError};
use crate::identity::Kind;
use crate::model::{AccountId, PrincipalType};
use crate::organizations::OrganizationApi;
use crate::tenant::Replica;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

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

impl AccountExplanation {
    /// The explanation as text for people.
    pub fn to_text(&self) -> String {
        let place = match (&self.name, &self.path) {
            (Some(n), Some(p)) => format!(" ({n}, in {p})"),
            _ => String::new(),
        };
        let mut out = format!("Account {}{place}\n", self.account_id);
        if let Some(why) = &self.unmanageable {
            out.push_str(&format!("  not managed: {why}\n"));
        }
        for r in &self.rules {
            let how = match (&r.skipped, r.via.is_empty()) {
                (Some(why), _) => format!("skipped: {why}"),
                (None, true) => "does not reach it".to_string(),
                (None, false) => format!("reaches it via {}", r.via.join("; ")),
            };
            out.push_str(&format!(
                "  rule {}: {} for Entra group {}: {how}\n",
                r.rule, r.permission_set, r.entra_group
            ));
        }
        out
    }
}

/// Why a user has, or has not, the access each rule grants.
#[derive(Clone, Debug, Serialize)]
pub struct UserExplanation {
    /// The user principal name asked about.
    pub user_principal_name: String,
    /// The user's identity-store id, when Identity Center has the user.
    pub identity_store_user_id: Option<String>,
    /// One entry per rule.
    pub rules: Vec<UserReach>,
}

/// One rule's verdict for a user.
#[derive(Clone, Debug, Serialize)]
pub struct UserReach {
    /// Rule name.
    pub rule: String,
    /// group, members or mirror.
    pub assign: AssignMode,
    /// The Entra group as configured.
    pub entra_group: String,
    /// The permission set as configured.
    pub permission_set: String,
    /// The nesting path from the rule's group down to the user, when the user is a member.
    pub path: Vec<String>,
    /// Whether this rule grants the user access, and if not why.
    pub verdict: String,
    /// Per account of the rule's scope: whether the granting assignment exists now.
    pub accounts: BTreeMap<AccountId, bool>,
}

/// Explains a user's access: for each rule, the nesting path that makes the user a member,
/// whether the rule's mode turns that into access, and which accounts have the assignment.
pub async fn explain_user(
    engine: &Engine,
    config: &Config,
    upn: &str,
) -> Result<UserExplanation, EngineError> {
    let scopes = expand_scopes(engine.organizations.as_ref(), config).await?;
    let tenant = engine.tenant(false, false).await?;
    let groups = engine.find_groups(config, &tenant)?;
    let permission_sets = engine.permission_sets(config, false).await?;
    let user_id = engine.identity.find(Kind::User, upn).await?;
    let mirrors: BTreeMap<String, String> = engine
        .state
        .mirrors()
        .await?
        .into_iter()
        .map(|m| (m.entra_group_id, m.group_id))
        .collect();
    let mut rules = Vec::new();
    for (rule, expansion) in config.assignments.iter().zip(&scopes.expansions) {
        let mut reach = UserReach {
            rule: rule.name.to_string(),
            assign: rule.assign,
            entra_group: String::from(rule.entra_group.clone()),
            permission_set: rule.permission_set.to_string(),
            path: Vec::new(),
            verdict: String::new(),
            accounts: BTreeMap::new(),
        };
        let group = match groups.get(&rule.entra_group) {
            Some(Ok(g)) => g,
            Some(Err(why)) => {
                reach.verdict = format!("the rule is held: {why}");
                rules.push(reach);
                continue;
            }
            None => continue,
        };
        reach.path = path_to_user(&tenant, group, upn);
        if reach.path.is_empty() {
            reach.verdict = format!(
                "not a member of Entra group {:?}, directly or through nesting",
                group.display_name
            );
            rules.push(reach);
            continue;
        }
        // The principal that carries the access, for this mode.
        let principal = match rule.assign {
            AssignMode::Members => match &user_id {
                Some(id) => Ok((PrincipalType::User, id.clone())),
                None => Err("Identity Center has no user with this userName (not provisioned)".to_string()),
            },
            AssignMode::Group if reach.path.len() > 2 => Err(format!(
                "a member only through nested groups: SCIM provisions only direct members into the Identity Center group {:?}, so this rule gives no access; use assign: members or mirror",
                group.display_name
            )),
            AssignMode::Group => match engine.identity.find(Kind::Group, &group.display_name).await? {
                Some(id) if user_id.is_some() => Ok((PrincipalType::Group, id)),
                Some(_) => Err("Identity Center has no user with this userName (not provisioned)".to_string()),
                None => Err("the Entra group has no Identity Center group (not provisioned)".to_string()),
            },
            AssignMode::Mirror => match (mirrors.get(&group.id), &user_id) {
                (Some(mirror), Some(user)) => {
                    if engine.identity.memberships(mirror).await?.values().any(|u| u == user) {
                        Ok((PrincipalType::Group, mirror.clone()))
                    } else {
                        Err("not yet in the mirror group (run apply)".to_string())
                    }
                }
                (None, _) => Err("the mirror group does not exist yet (run apply)".to_string()),
                (_, None) => Err("Identity Center has no user with this userName (not provisioned)".to_string()),
            },
        };
        match principal {
            Err(why) => reach.verdict = why,
            Ok((kind, id)) => {
                let arn = permission_sets.arn_of(rule)?;
                for account in expansion
                    .accounts
                    .keys()
                    .filter(|a| !scopes.unmanageable.contains_key(*a))
                {
                    let assigned = engine
                        .sso
                        .assigned(account, &arn)
                        .await?
                        .iter()
                        .any(|p| p.principal_type == kind && p.principal_id == id);
                    reach.accounts.insert(account.clone(), assigned);
                }
                let missing = reach.accounts.values().filter(|a| !**a).count();
                reach.verdict = match missing {
                    0 => "grants access".to_string(),
                    n => format!("grants access; {n} of its accounts do not have the assignment yet (run apply)"),
                };
            }
        }
        rules.push(reach);
    }
    Ok(UserExplanation {
        user_principal_name: upn.to_string(),
        identity_store_user_id: user_id,
        rules,
    })
}

/// The nesting path from `group` down to the user (group names, then the user), breadth
/// first so the shortest path is shown; empty when the user is not a member. Cycle-safe.
fn path_to_user(tenant: &Replica, group: &DirGroup, upn: &str) -> Vec<String> {
    let mut parent: BTreeMap<String, (Option<String>, String)> = BTreeMap::new();
    parent.insert(group.id.clone(), (None, group.display_name.clone()));
    let mut queue = VecDeque::from([group.id.clone()]);
    let mut seen = BTreeSet::from([group.id.clone()]);
    while let Some(id) = queue.pop_front() {
        let (users, groups) = tenant.direct_members(&id).unwrap_or_default();
        if let Some(u) = users
            .iter()
            .find(|u| u.user_principal_name.eq_ignore_ascii_case(upn))
        {
            let mut path = vec![u.user_principal_name.clone()];
            let mut cur = Some(id);
            while let Some(c) = cur {
                let (up, name) = parent[&c].clone();
                path.push(name);
                cur = up;
            }
            path.reverse();
            return path;
        }
        for g in groups {
            if seen.insert(g.id.clone()) {
                parent.insert(g.id.clone(), (Some(id.clone()), g.display_name.clone()));
                queue.push_back(g.id);
            }
        }
    }
    Vec::new()
}

impl UserExplanation {
    /// The explanation as text for people.
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "{} ({})\n",
            self.user_principal_name,
            self.identity_store_user_id
                .as_deref()
                .map_or("no Identity Center user".to_string(), |id| format!(
                    "Identity Center user {id}"
                ))
        );
        for r in &self.rules {
            out.push_str(&format!(
                "  rule {} ({}, {} for Entra group {}): {}\n",
                r.rule,
                format!("{:?}", r.assign).to_lowercase(),
                r.permission_set,
                r.entra_group,
                r.verdict
            ));
            if !r.path.is_empty() {
                out.push_str(&format!("    via {}\n", r.path.join(" > ")));
            }
            for (account, assigned) in &r.accounts {
                out.push_str(&format!(
                    "    {account}: {}\n",
                    if *assigned {
                        "assigned"
                    } else {
                        "not assigned yet"
                    }
                ));
            }
        }
        out
    }
}

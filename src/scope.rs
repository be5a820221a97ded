//! Account scopes: which accounts a rule targets, from account ids and names, organizational
//! units (by id or path, at any depth), tags and `all_accounts`, minus exclusions. Expansion is
//! a pure function over an [`Organization`] snapshot read once per run.

use crate::config::{AccountRef, OuRef, Rule};
use crate::model::AccountId;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// An account's lifecycle status in AWS Organizations.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AccountStatus {
    /// Usable: the only status that is targeted.
    Active,
    /// Suspended, pending closure, or anything else.
    Other(String),
}

/// One account of the organization.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrgAccount {
    /// Account name.
    pub name: String,
    /// Lifecycle status.
    pub status: AccountStatus,
    /// The OU (or root) directly above it.
    pub parent: String,
    /// Its tags (read only when some rule uses `account_tags`).
    pub tags: BTreeMap<String, String>,
}

/// One organizational unit, or the root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrgUnit {
    /// Name (`Root` for the root).
    pub name: String,
    /// The parent OU; `None` for the root.
    pub parent: Option<String>,
}

/// A snapshot of the organization.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Organization {
    /// The root's id (`r-…`).
    pub root_id: String,
    /// The management account.
    pub management_account: Option<AccountId>,
    /// Every OU and the root, by id.
    pub units: BTreeMap<String, OrgUnit>,
    /// Every account, by id.
    pub accounts: BTreeMap<AccountId, OrgAccount>,
}

/// A rule's scope, expanded.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Expansion {
    /// The accounts targeted, each with the scope entries that reach it.
    pub accounts: BTreeMap<AccountId, Vec<String>>,
    /// Accounts in scope but not ACTIVE: skipped.
    pub skipped_inactive: Vec<AccountId>,
}

/// A scope entry that names nothing, or more than one thing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("rule {rule}: {key}: {message}")]
pub struct ScopeError {
    /// The rule.
    pub rule: String,
    /// The configuration key, e.g. `organizational_units[1]`.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl Organization {
    /// The path of an OU, `Root/Workloads/Prod`.
    pub fn path(&self, unit_id: &str) -> String {
        let mut names = Vec::new();
        let mut cur = Some(unit_id);
        // Bounded walk: a malformed snapshot with a parent cycle cannot loop forever.
        for _ in 0..=self.units.len() {
            let Some(id) = cur else { break };
            let Some(u) = self.units.get(id) else { break };
            names.push(u.name.as_str());
            cur = u.parent.as_deref();
        }
        names.reverse();
        names.join("/")
    }

    fn unit_id(&self, r: &OuRef) -> Result<String, String> {
        match r {
            OuRef::Id(id) => self
                .units
                .contains_key(id)
                .then(|| id.clone())
                .ok_or_else(|| format!("no organizational unit {id} in the organization")),
            OuRef::Path(path) => {
                let mut cur = self.root_id.clone();
                for segment in path.split('/').skip(1) {
                    let children: Vec<&String> = self
                        .units
                        .iter()
                        .filter(|(_, u)| {
                            u.parent.as_deref() == Some(cur.as_str()) && u.name == segment
                        })
                        .map(|(id, _)| id)
                        .collect();
                    match children.as_slice() {
                        [one] => cur = (*one).clone(),
                        [] => {
                            return Err(format!(
                                "no organizational unit at path {path:?} (no {segment:?} under {})",
                                self.path(&cur)
                            ))
                        }
                        _ => {
                            return Err(format!(
                                "more than one organizational unit at path {path:?}"
                            ))
                        }
                    }
                }
                Ok(cur)
            }
        }
    }

    /// True when `account` sits anywhere below `unit`.
    fn is_below(&self, account: &OrgAccount, unit: &str) -> bool {
        let mut cur = Some(account.parent.as_str());
        for _ in 0..=self.units.len() {
            match cur {
                Some(id) if id == unit => return true,
                Some(id) => cur = self.units.get(id).and_then(|u| u.parent.as_deref()),
                None => return false,
            }
        }
        false
    }

    fn account_by_ref(&self, r: &AccountRef) -> Result<AccountId, String> {
        match r {
            AccountRef::Id(id) => Ok(id.clone()),
            AccountRef::Name(name) => {
                let hits: Vec<&AccountId> = self
                    .accounts
                    .iter()
                    .filter(|(_, a)| &a.name == name)
                    .map(|(id, _)| id)
                    .collect();
                match hits.as_slice() {
                    [one] => Ok((*one).clone()),
                    [] => Err(format!("no account is named {name:?}")),
                    many => Err(format!(
                        "{} accounts are named {name:?} ({}); use the account id",
                        many.len(),
                        many.iter()
                            .map(|a| a.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                }
            }
        }
    }
}

/// True when the rule needs the organization read (anything but plain account ids).
pub fn needs_organization(rule: &Rule) -> bool {
    let named = |refs: &[AccountRef]| refs.iter().any(|r| matches!(r, AccountRef::Name(_)));
    rule.all_accounts
        || !rule.organizational_units.is_empty()
        || !rule.account_tags.is_empty()
        || !rule.exclude_organizational_units.is_empty()
        || named(&rule.accounts)
        || named(&rule.exclude_accounts)
}

/// Expands a rule's scope. Without an organization (a rule of plain ids), the ids are the scope.
pub fn expand(rule: &Rule, org: Option<&Organization>) -> Result<Expansion, ScopeError> {
    let err = |key: String, message: String| ScopeError {
        rule: rule.name.to_string(),
        key,
        message,
    };
    let Some(org) = org.filter(|_| needs_organization(rule)) else {
        let accounts = rule
            .accounts
            .iter()
            .filter_map(|r| match r {
                AccountRef::Id(id) => Some((id.clone(), vec!["accounts".to_string()])),
                AccountRef::Name(_) => None,
            })
            .collect::<BTreeMap<_, _>>();
        let excluded: BTreeSet<&AccountId> = rule
            .exclude_accounts
            .iter()
            .filter_map(|r| match r {
                AccountRef::Id(id) => Some(id),
                AccountRef::Name(_) => None,
            })
            .collect();
        return Ok(Expansion {
            accounts: accounts
                .into_iter()
                .filter(|(a, _)| !excluded.contains(a))
                .collect(),
            skipped_inactive: Vec::new(),
        });
    };

    let mut reached: BTreeMap<AccountId, Vec<String>> = BTreeMap::new();
    for (i, r) in rule.accounts.iter().enumerate() {
        let id = org
            .account_by_ref(r)
            .map_err(|m| err(format!("accounts[{i}]"), m))?;
        reached
            .entry(id)
            .or_default()
            .push(format!("accounts: {r}"));
    }
    for (i, r) in rule.organizational_units.iter().enumerate() {
        let unit = org
            .unit_id(r)
            .map_err(|m| err(format!("organizational_units[{i}]"), m))?;
        let label = format!("organizational unit {}", org.path(&unit));
        for (id, a) in &org.accounts {
            if org.is_below(a, &unit) {
                reached.entry(id.clone()).or_default().push(label.clone());
            }
        }
    }
    if !rule.account_tags.is_empty() {
        let label = format!(
            "account_tags {}",
            rule.account_tags
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        for (id, a) in &org.accounts {
            if rule
                .account_tags
                .iter()
                .all(|(k, v)| a.tags.get(k) == Some(v))
            {
                reached.entry(id.clone()).or_default().push(label.clone());
            }
        }
    }
    if rule.all_accounts {
        for id in org.accounts.keys() {
            reached
                .entry(id.clone())
                .or_default()
                .push("all_accounts".into());
        }
    }

    for (i, r) in rule.exclude_accounts.iter().enumerate() {
        let id = org
            .account_by_ref(r)
            .map_err(|m| err(format!("exclude_accounts[{i}]"), m))?;
        reached.remove(&id);
    }
    for (i, r) in rule.exclude_organizational_units.iter().enumerate() {
        let unit = org
            .unit_id(r)
            .map_err(|m| err(format!("exclude_organizational_units[{i}]"), m))?;
        reached.retain(|id, _| org.accounts.get(id).is_none_or(|a| !org.is_below(a, &unit)));
    }

    let mut skipped_inactive = Vec::new();
    reached.retain(|id, _| match org.accounts.get(id) {
        Some(a) if a.status != AccountStatus::Active => {
            skipped_inactive.push(id.clone());
            false
        }
        _ => true,
    });
    Ok(Expansion {
        accounts: reached,
        skipped_inactive,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn acct(n: u32) -> AccountId {
        AccountId::try_from(format!("{n:012}")).unwrap()
    }

    /// Root ⊃ Workloads ⊃ Prod ⊃ Payments ⊃ Deep (four levels); Root ⊃ Sandbox.
    fn org() -> Organization {
        let unit = |name: &str, parent: Option<&str>| OrgUnit {
            name: name.into(),
            parent: parent.map(str::to_string),
        };
        let account = |name: &str, parent: &str, tags: &[(&str, &str)], active: bool| OrgAccount {
            name: name.into(),
            status: if active {
                AccountStatus::Active
            } else {
                AccountStatus::Other("SUSPENDED".into())
            },
            parent: parent.into(),
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        Organization {
            root_id: "r-root".into(),
            management_account: Some(acct(1)),
            units: BTreeMap::from([
                ("r-root".into(), unit("Root", None)),
                ("ou-root-work".into(), unit("Workloads", Some("r-root"))),
                ("ou-root-prod".into(), unit("Prod", Some("ou-root-work"))),
                ("ou-root-pay".into(), unit("Payments", Some("ou-root-prod"))),
                ("ou-root-deep".into(), unit("Deep", Some("ou-root-pay"))),
                ("ou-root-sand".into(), unit("Sandbox", Some("r-root"))),
            ]),
            accounts: BTreeMap::from([
                (acct(1), account("Management", "r-root", &[], true)),
                (
                    acct(2),
                    account("Prod Web", "ou-root-prod", &[("env", "prod")], true),
                ),
                (
                    acct(3),
                    account(
                        "Payments",
                        "ou-root-pay",
                        &[("env", "prod"), ("team", "pay")],
                        true,
                    ),
                ),
                (
                    acct(4),
                    account("Deep One", "ou-root-deep", &[("env", "prod")], true),
                ),
                (acct(5), account("Old Prod", "ou-root-prod", &[], false)),
                (
                    acct(6),
                    account("Sandbox", "ou-root-sand", &[("env", "dev")], true),
                ),
                (acct(7), account("Twin", "ou-root-sand", &[], true)),
                (acct(8), account("Twin", "ou-root-work", &[], true)),
            ]),
        }
    }

    fn rule(scope: &str) -> Rule {
        let text = format!(
            "version: 1\nentra: {{tenant_id: 11111111-2222-3333-4444-555555555555, client_id: 11111111-2222-3333-4444-555555555555}}\nstate: {{table: t-1}}\nassignments:\n  - name: r\n    entra_group: G\n    permission_set: P\n{scope}"
        );
        Config::parse(&text, "t.yaml")
            .unwrap()
            .assignments
            .remove(0)
    }

    fn ids(e: &Expansion) -> Vec<u32> {
        e.accounts
            .keys()
            .map(|a| a.as_str().parse().unwrap())
            .collect()
    }

    #[test]
    fn an_ou_reaches_accounts_at_any_depth_by_path_or_id_and_skips_inactive() {
        let by_path = expand(
            &rule("    organizational_units: [Root/Workloads/Prod]\n"),
            Some(&org()),
        )
        .unwrap();
        let by_id = expand(
            &rule("    organizational_units: [ou-root-prod]\n"),
            Some(&org()),
        )
        .unwrap();
        assert_eq!(ids(&by_path), vec![2, 3, 4]);
        assert_eq!(by_path, by_id);
        assert_eq!(by_path.skipped_inactive, vec![acct(5)]);
        assert_eq!(
            by_path.accounts[&acct(4)],
            vec!["organizational unit Root/Workloads/Prod".to_string()]
        );
    }

    #[test]
    fn tags_names_and_exclusions_combine() {
        let e = expand(
            &rule("    account_tags: {env: prod}\n    accounts: [Sandbox, \"000000000009\"]\n    exclude_organizational_units: [Root/Workloads/Prod/Payments/Deep]\n    exclude_accounts: [Payments]\n"),
            Some(&org()),
        )
        .unwrap();
        assert_eq!(ids(&e), vec![2, 6, 9]);
        let all = expand(
            &rule("    all_accounts: true\n    exclude_accounts: [\"000000000001\"]\n"),
            Some(&org()),
        )
        .unwrap();
        assert_eq!(ids(&all), vec![2, 3, 4, 6, 7, 8]);
    }

    #[test]
    fn unknown_and_ambiguous_names_are_errors_for_the_rule() {
        let e = expand(&rule("    accounts: [Twin]\n"), Some(&org())).unwrap_err();
        assert_eq!(e.key, "accounts[0]");
        assert!(e.message.contains("2 accounts are named \"Twin\""), "{e}");
        let e = expand(
            &rule("    organizational_units: [Root/Workloads/Staging]\n"),
            Some(&org()),
        )
        .unwrap_err();
        assert!(
            e.message.contains("no \"Staging\" under Root/Workloads"),
            "{e}"
        );
        let e = expand(
            &rule("    exclude_organizational_units: [ou-root-nope]\n    all_accounts: true\n"),
            Some(&org()),
        )
        .unwrap_err();
        assert_eq!(e.key, "exclude_organizational_units[0]");
    }

    #[test]
    fn plain_ids_need_no_organization() {
        let r = rule("    accounts: [\"000000000002\", \"000000000003\"]\n    exclude_accounts: [\"000000000003\"]\n");
        assert!(!needs_organization(&r));
        assert_eq!(ids(&expand(&r, None).unwrap()), vec![2]);
        assert!(needs_organization(&rule("    accounts: [Sandbox]\n")));
    }
}

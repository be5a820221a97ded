//! Synthetic, seeded organizations and tenants for the throttling test and the benchmark: Entra
//! users and nested groups (with a cycle when asked), the identity store that SCIM would have
//! provisioned from them, an AWS organization of OUs and accounts, permission sets, and a
//! configuration of rules mixing `group` and `members` modes. The same seed gives the same
//! world, and [`World::desired`] computes independently of the engine what it should assign.

use super::{Fakes, SsoSettings, Tenant, TenantGroup};
use crate::config::Config;
use crate::directory::DirUser;
use crate::model::{AccountId, Assignment, PrincipalType};
use crate::scope::{AccountStatus, OrgAccount, OrgUnit, Organization};
use crate::sso::PermissionSet;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

/// The size and shape of a synthetic world.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    /// Label (`small`, `medium`, `large`).
    pub name: &'static str,
    /// Entra users (all provisioned into the identity store).
    pub users: usize,
    /// Entra groups (all provisioned).
    pub groups: usize,
    /// Nesting levels (1: no nesting).
    pub depth: usize,
    /// Add one nesting cycle (a deepest group contains its top ancestor).
    pub cycle: bool,
    /// Accounts.
    pub accounts: usize,
    /// Top-level OUs, each with `sub_units` OUs below it holding the accounts.
    pub top_units: usize,
    /// OUs below each top-level OU.
    pub sub_units: usize,
    /// Permission sets.
    pub permission_sets: usize,
    /// Rules in all.
    pub rules: usize,
    /// How many of them are `members` mode (the rest are `group` mode).
    pub members_rules: usize,
    /// Seed.
    pub seed: u64,
}

impl Spec {
    /// 200 users, 30 groups, 20 accounts, 10 rules.
    pub fn small() -> Spec {
        Spec {
            name: "small",
            users: 200,
            groups: 30,
            depth: 2,
            cycle: false,
            accounts: 20,
            top_units: 2,
            sub_units: 2,
            permission_sets: 4,
            rules: 10,
            members_rules: 3,
            seed: 1,
        }
    }

    /// 5,000 users, 400 groups nested up to 4 levels, 300 accounts, 40 rules.
    pub fn medium() -> Spec {
        Spec {
            name: "medium",
            users: 5_000,
            groups: 400,
            depth: 4,
            cycle: false,
            accounts: 300,
            top_units: 4,
            sub_units: 5,
            permission_sets: 10,
            rules: 40,
            members_rules: 10,
            seed: 2,
        }
    }

    /// 30,000 users, 2,000 groups nested up to 6 levels with a cycle, 2,000 accounts, 120
    /// rules mixing group and members modes.
    pub fn large() -> Spec {
        Spec {
            name: "large",
            users: 30_000,
            groups: 2_000,
            depth: 6,
            cycle: true,
            accounts: 2_000,
            top_units: 6,
            sub_units: 10,
            permission_sets: 20,
            rules: 120,
            members_rules: 30,
            seed: 3,
        }
    }

    /// The spec called `name`.
    pub fn by_name(name: &str) -> Option<Spec> {
        match name {
            "small" => Some(Spec::small()),
            "medium" => Some(Spec::medium()),
            "large" => Some(Spec::large()),
            _ => None,
        }
    }
}

/// A rule's scope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// `all_accounts: true`.
    All,
    /// `organizational_units: [path]`.
    Unit(String),
    /// `accounts: [ids]`.
    Accounts(Vec<AccountId>),
}

/// One rule of the synthetic configuration, as ground truth.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SynthRule {
    /// Rule name.
    pub name: String,
    /// Entra group object id.
    pub group: String,
    /// Name the rule by object id (else by display name).
    pub by_id: bool,
    /// Permission set index.
    pub permission_set: usize,
    /// Members mode (else group mode).
    pub members: bool,
    /// Scope.
    pub scope: Scope,
}

/// A generated world.
pub struct World {
    /// The spec it was made from.
    pub spec: Spec,
    /// Entra.
    pub tenant: Tenant,
    /// AWS Organizations.
    pub org: Organization,
    /// Permission sets, by index.
    pub permission_sets: Vec<PermissionSet>,
    /// The rules.
    pub rules: Vec<SynthRule>,
    /// The configuration text.
    pub config_yaml: String,
    /// OU path → the accounts below it.
    pub unit_accounts: BTreeMap<String, BTreeSet<AccountId>>,
}

/// The Entra object id of user `i`.
pub fn user_oid(i: usize) -> String {
    format!("a0000000-0000-4000-8000-{i:012x}")
}

/// The Entra object id of group `i`.
pub fn group_oid(i: usize) -> String {
    format!("b0000000-0000-4000-8000-{i:012x}")
}

/// The identity-store id SCIM gave the user with this Entra object id.
pub fn store_user_id(oid: &str) -> String {
    format!("9067c6f2b2-u{}", &oid[oid.len() - 12..])
}

/// The identity-store id SCIM gave the group with this Entra object id.
pub fn store_group_id(oid: &str) -> String {
    format!("9067c6f2b2-g{}", &oid[oid.len() - 12..])
}

fn account_id(i: usize) -> AccountId {
    AccountId::try_from(format!("{:012}", 100_000_000_000 + i * 7_919)).expect("12 digits")
}

const TOP_NAMES: [&str; 6] = ["Prod", "Staging", "Dev", "Sandbox", "Security", "Shared"];

impl World {
    /// Generates the world for `spec`.
    pub fn generate(spec: &Spec) -> World {
        let mut rng = fastrand::Rng::with_seed(spec.seed);

        // Users.
        let mut tenant = Tenant::default();
        for i in 0..spec.users {
            let id = user_oid(i);
            tenant.users.insert(
                id.clone(),
                DirUser {
                    id,
                    user_principal_name: format!("user{i:05}@contoso.example"),
                    display_name: format!("User {i:05}"),
                    account_enabled: true,
                },
            );
        }

        // Groups: the first eighth are top level, each other group hangs under a random earlier
        // group that is not yet at the deepest level.
        let roots = (spec.groups / 8).max(1);
        let mut level = vec![0usize; spec.groups];
        let mut parent: Vec<Option<usize>> = vec![None; spec.groups];
        for i in 0..spec.groups {
            tenant.groups.insert(
                group_oid(i),
                TenantGroup {
                    display_name: format!("grp-{i:04}"),
                    members: BTreeSet::new(),
                },
            );
            if i < roots || spec.depth <= 1 {
                continue;
            }
            let candidates: Vec<usize> = (0..i).filter(|&g| level[g] + 1 < spec.depth).collect();
            let p = candidates[rng.usize(..candidates.len())];
            parent[i] = Some(p);
            level[i] = level[p] + 1;
            tenant
                .groups
                .get_mut(&group_oid(p))
                .expect("exists")
                .members
                .insert(group_oid(i));
        }
        if spec.cycle {
            // The first deepest group contains its top ancestor.
            if let Some(deep) = (0..spec.groups).find(|&g| level[g] + 1 == spec.depth) {
                let mut top = deep;
                while let Some(p) = parent[top] {
                    top = p;
                }
                tenant
                    .groups
                    .get_mut(&group_oid(deep))
                    .expect("exists")
                    .members
                    .insert(group_oid(top));
            }
        }
        // Each user is a direct member of one to three random groups.
        for u in 0..spec.users {
            for _ in 0..rng.usize(1..=3) {
                let g = rng.usize(..spec.groups);
                tenant
                    .groups
                    .get_mut(&group_oid(g))
                    .expect("exists")
                    .members
                    .insert(user_oid(u));
            }
        }

        // Organization: Root / top OU / sub OU, accounts dealt round-robin over the sub OUs.
        let mut org = Organization {
            root_id: "r-root".into(),
            management_account: Some(account_id(0)),
            units: BTreeMap::from([(
                "r-root".to_string(),
                OrgUnit {
                    name: "Root".into(),
                    parent: None,
                },
            )]),
            accounts: BTreeMap::new(),
        };
        let mut leaves = Vec::new();
        let mut unit_paths = BTreeMap::new();
        for t in 0..spec.top_units {
            let top_id = format!("ou-root-top{t:04}");
            let top_name = TOP_NAMES[t % TOP_NAMES.len()].to_string();
            let top_path = format!("Root/{top_name}");
            org.units.insert(
                top_id.clone(),
                OrgUnit {
                    name: top_name,
                    parent: Some("r-root".into()),
                },
            );
            unit_paths.insert(top_id.clone(), top_path.clone());
            for s in 0..spec.sub_units {
                let id = format!("ou-root-sub{t:02}{s:02}");
                let name = format!("team-{s:02}");
                unit_paths.insert(id.clone(), format!("{top_path}/{name}"));
                org.units.insert(
                    id.clone(),
                    OrgUnit {
                        name,
                        parent: Some(top_id.clone()),
                    },
                );
                leaves.push(id);
            }
        }
        let mut unit_accounts: BTreeMap<String, BTreeSet<AccountId>> = BTreeMap::new();
        let all: Vec<AccountId> = (0..spec.accounts).map(account_id).collect();
        for (i, id) in all.iter().enumerate() {
            // The management account (0) sits at the root.
            let parent = if i == 0 {
                "r-root".to_string()
            } else {
                leaves[i % leaves.len()].clone()
            };
            let mut cur = Some(parent.clone());
            while let Some(u) = cur {
                if let Some(path) = unit_paths.get(&u) {
                    unit_accounts
                        .entry(path.clone())
                        .or_default()
                        .insert(id.clone());
                }
                cur = org.units.get(&u).and_then(|x| x.parent.clone());
            }
            org.accounts.insert(
                id.clone(),
                OrgAccount {
                    name: format!("acct-{i:04}"),
                    status: AccountStatus::Active,
                    parent,
                    tags: BTreeMap::new(),
                },
            );
        }

        let permission_sets: Vec<PermissionSet> = (0..spec.permission_sets)
            .map(|k| PermissionSet {
                arn: format!("arn:aws:sso:::permissionSet/ssoins-722355b8a6a0b2a8/ps-{k:016x}"),
                name: format!("PS-{k:02}"),
            })
            .collect();

        // Rules. Members-mode rules take a group of 20-400 transitive users (or the nearest)
        // and a handful of accounts; group-mode rules take any group and an OU, all accounts,
        // or a few accounts.
        let sizes: Vec<usize> = (0..spec.groups)
            .map(|g| tenant.transitive_users(&group_oid(g)).len())
            .collect();
        let managed: Vec<AccountId> = all.iter().skip(1).cloned().collect();
        let tops: Vec<&String> = unit_accounts
            .keys()
            .filter(|p| p.matches('/').count() == 1)
            .collect();
        let subs: Vec<&String> = unit_accounts
            .keys()
            .filter(|p| p.matches('/').count() == 2)
            .collect();
        let mut rules = Vec::new();
        for r in 0..spec.rules {
            let members = r % (spec.rules / spec.members_rules.max(1)).max(1) == 0
                && rules.iter().filter(|x: &&SynthRule| x.members).count() < spec.members_rules;
            let group = if members {
                let fitting: Vec<usize> = (0..spec.groups)
                    .filter(|&g| (20..=400).contains(&sizes[g]))
                    .collect();
                if fitting.is_empty() {
                    rng.usize(..spec.groups)
                } else {
                    fitting[rng.usize(..fitting.len())]
                }
            } else {
                rng.usize(..spec.groups)
            };
            let few = |rng: &mut fastrand::Rng, n: usize| -> Vec<AccountId> {
                let mut picked = BTreeSet::new();
                while picked.len() < n.min(managed.len()) {
                    picked.insert(managed[rng.usize(..managed.len())].clone());
                }
                picked.into_iter().collect()
            };
            let scope = if members {
                let n = rng.usize(2..=6);
                Scope::Accounts(few(&mut rng, n))
            } else {
                match rng.usize(..20) {
                    0..=2 => Scope::All,
                    3..=9 => Scope::Unit(tops[rng.usize(..tops.len())].clone()),
                    10..=17 => Scope::Unit(subs[rng.usize(..subs.len())].clone()),
                    _ => {
                        let n = rng.usize(1..=4);
                        Scope::Accounts(few(&mut rng, n))
                    }
                }
            };
            rules.push(SynthRule {
                name: format!("rule-{r:03}"),
                group: group_oid(group),
                by_id: r % 3 == 2,
                permission_set: rng.usize(..spec.permission_sets),
                members,
                scope,
            });
        }

        let mut world = World {
            spec: spec.clone(),
            tenant,
            org,
            permission_sets,
            rules,
            config_yaml: String::new(),
            unit_accounts,
        };
        world.config_yaml = world.render_config();
        world
    }

    fn render_config(&self) -> String {
        let mut y = String::from(
            "version: 1\nentra:\n  tenant_id: 11111111-2222-3333-4444-555555555555\n  client_id: 66666666-7777-8888-9999-000000000000\nstate:\n  table: entra-sso-sync-bench\nsafety:\n  max_deletions: 1000000\nassignments:\n",
        );
        for r in &self.rules {
            let group = if r.by_id {
                r.group.clone()
            } else {
                self.tenant.groups[&r.group].display_name.clone()
            };
            let _ = writeln!(y, "  - name: {}", r.name);
            let _ = writeln!(y, "    entra_group: \"{group}\"");
            let _ = writeln!(
                y,
                "    permission_set: {}",
                self.permission_sets[r.permission_set].name
            );
            match &r.scope {
                Scope::All => y.push_str("    all_accounts: true\n"),
                Scope::Unit(path) => {
                    let _ = writeln!(y, "    organizational_units: [\"{path}\"]");
                }
                Scope::Accounts(ids) => {
                    let ids: Vec<String> = ids.iter().map(|a| format!("\"{a}\"")).collect();
                    let _ = writeln!(y, "    accounts: [{}]", ids.join(", "));
                }
            }
            let _ = writeln!(
                y,
                "    assign: {}",
                if r.members { "members" } else { "group" }
            );
        }
        y
    }

    /// The parsed configuration.
    pub fn config(&self) -> Config {
        Config::parse(&self.config_yaml, "synthetic").expect("the synthetic config parses")
    }

    /// Fakes over this world with the production quotas, the identity store provisioned with
    /// every user and group (external id = Entra object id), and the permission sets.
    pub fn fakes(&self, sso: SsoSettings) -> Fakes {
        let fakes = Fakes::new(
            self.tenant.clone(),
            self.org.clone(),
            self.permission_sets.clone(),
            sso,
        );
        for u in self.tenant.users.values() {
            fakes
                .identity
                .add_user(&store_user_id(&u.id), &u.user_principal_name, Some(&u.id));
        }
        for (id, g) in &self.tenant.groups {
            fakes
                .identity
                .add_group(&store_group_id(id), &g.display_name, Some(id));
        }
        fakes
    }

    /// The accounts a rule reaches (the management account excluded: the fakes run as it, but
    /// rules never name it, and `all_accounts` reaches it; it is kept, as the engine does when
    /// the caller is the management account).
    pub fn accounts_of(&self, rule: &SynthRule) -> BTreeSet<AccountId> {
        match &rule.scope {
            Scope::All => self.org.accounts.keys().cloned().collect(),
            Scope::Unit(path) => self.unit_accounts.get(path).cloned().unwrap_or_default(),
            Scope::Accounts(ids) => ids.iter().cloned().collect(),
        }
    }

    /// The (account, permission set ARN) pairs the rules reach.
    pub fn pairs(&self) -> BTreeSet<(AccountId, String)> {
        self.rules
            .iter()
            .flat_map(|r| {
                let arn = self.permission_sets[r.permission_set].arn.clone();
                self.accounts_of(r)
                    .into_iter()
                    .map(move |a| (a, arn.clone()))
            })
            .collect()
    }

    /// Every assignment the rules want over `tenant` (the fake Graph's current tenant).
    pub fn desired(&self, tenant: &Tenant) -> BTreeSet<Assignment> {
        let mut out = BTreeSet::new();
        for r in &self.rules {
            let arn = &self.permission_sets[r.permission_set].arn;
            let principals: Vec<(PrincipalType, String)> = if r.members {
                tenant
                    .transitive_users(&r.group)
                    .into_iter()
                    .filter(|u| tenant.users[*u].account_enabled)
                    .map(|u| (PrincipalType::User, store_user_id(u)))
                    .collect()
            } else {
                vec![(PrincipalType::Group, store_group_id(&r.group))]
            };
            for account in self.accounts_of(r) {
                for (t, id) in &principals {
                    out.insert(Assignment {
                        account_id: account.clone(),
                        permission_set_arn: arn.clone(),
                        principal_type: *t,
                        principal_id: id.clone(),
                    });
                }
            }
        }
        out
    }

    /// Changes `percent` % of the direct user memberships of `tenant`: each change moves one
    /// membership (a user leaves a group and a random user joins a random group). Returns how
    /// many memberships moved.
    pub fn change_memberships(&self, tenant: &mut Tenant, percent: f64, seed: u64) -> usize {
        let mut rng = fastrand::Rng::with_seed(seed);
        let edges: Vec<(String, String)> = tenant
            .groups
            .iter()
            .flat_map(|(g, grp)| {
                grp.members
                    .iter()
                    .filter(|m| tenant.users.contains_key(*m))
                    .map(move |m| (g.clone(), m.clone()))
            })
            .collect();
        let n = ((edges.len() as f64) * percent / 100.0).ceil() as usize;
        let groups: Vec<String> = tenant.groups.keys().cloned().collect();
        let users: Vec<String> = tenant.users.keys().cloned().collect();
        for _ in 0..n {
            let (g, u) = &edges[rng.usize(..edges.len())];
            if let Some(grp) = tenant.groups.get_mut(g) {
                grp.members.remove(u);
            }
            let g = &groups[rng.usize(..groups.len())];
            let u = &users[rng.usize(..users.len())];
            if let Some(grp) = tenant.groups.get_mut(g) {
                grp.members.insert(u.clone());
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_world_and_the_config_parses() {
        let a = World::generate(&Spec::small());
        let b = World::generate(&Spec::small());
        assert_eq!(a.config_yaml, b.config_yaml);
        assert_eq!(a.tenant, b.tenant);
        let config = a.config();
        assert_eq!(config.assignments.len(), 10);
        assert_eq!(a.rules.iter().filter(|r| r.members).count(), 3);
        assert!(!a.desired(&a.tenant).is_empty());
    }
}

//! The test stack: one isolated moto account (its own Identity Center instance, identity
//! store and state table) and one fake Graph per test, wired to the production adapters.

#![allow(dead_code)] // each test binary uses a different part of it

use aws_credential_types::provider::ProvideCredentials;
use devstack::graph::{FakeGraph, Group, Tenant, User};
use devstack::moto::{self, IdentityCenter, MotoAccount, Provisioned};
use entra_sso_sync::config::Config;
use entra_sso_sync::directory::{GraphClient, GraphSettings};
use entra_sso_sync::engine::{Engine, EngineError, Mode, RunRequest, Target};
use entra_sso_sync::model::Secret;
use entra_sso_sync::report::Report;
use entra_sso_sync::retry::Backoff;
use std::collections::BTreeSet;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

pub const TENANT_ID: &str = "11111111-2222-3333-4444-555555555555";
pub const CLIENT_ID: &str = "66666666-7777-8888-9999-000000000000";
pub const SECRET: &str = "s3cr3t-value-that-must-never-be-printed";
pub const TABLE: &str = "entra-sso-sync-state";
pub const ACCOUNT_A: &str = "111111111111";
pub const ACCOUNT_B: &str = "222222222222";

/// An Entra object id for fixture number `n`.
pub fn oid(n: u32) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

pub fn user(n: u32, name: &str) -> User {
    User {
        id: oid(n),
        user_principal_name: format!("{name}@contoso.example"),
        display_name: name.to_string(),
        account_enabled: true,
    }
}

pub fn group(n: u32, name: &str, members: &[u32]) -> Group {
    Group {
        id: oid(n),
        display_name: name.to_string(),
        members: members.iter().map(|&m| oid(m)).collect(),
    }
}

/// A tenant with nesting three levels deep and a cycle:
/// Developers(100) ⊃ carol(3), Team Payments(101) ⊃ dave(4), Payments Oncall(102) ⊃ erin(5),
/// frank(6), Developers(100). Platform Admins(110) ⊃ alice(1), bob(2).
pub fn tenant() -> Tenant {
    Tenant {
        tenant_id: TENANT_ID.into(),
        client_id: CLIENT_ID.into(),
        client_secret: SECRET.into(),
        users: vec![
            user(1, "alice"),
            user(2, "bob"),
            user(3, "carol"),
            user(4, "dave"),
            user(5, "erin"),
            user(6, "frank"),
            user(7, "contractor"),
        ],
        groups: vec![
            group(100, "Developers", &[3, 101]),
            group(101, "Team Payments", &[4, 102]),
            group(102, "Payments Oncall", &[5, 6, 100]),
            group(110, "Platform Admins", &[1, 2]),
            group(120, "Auditors", &[7]),
        ],
    }
}

pub struct Stack {
    pub graph: FakeGraph,
    pub account: MotoAccount,
    pub ic: IdentityCenter,
    pub provisioned: Provisioned,
    pub admin_ps: String,
    pub read_ps: String,
}

impl Stack {
    /// A fresh stack; every user but `contractor` is provisioned like SCIM would.
    pub async fn new() -> Stack {
        Stack::with_tenant(tenant(), &[7]).await
    }

    pub async fn with_tenant(tenant: Tenant, not_provisioned: &[u32]) -> Stack {
        let account = moto::isolated_account().await.expect("moto account");
        let cfg = &account.sdk_config;
        let ic = moto::identity_center(cfg).await.expect("instance");
        moto::create_state_table(cfg, TABLE).await.expect("table");
        let admin_ps = moto::create_permission_set(cfg, &ic, "AdministratorAccess")
            .await
            .expect("ps");
        let read_ps = moto::create_permission_set(cfg, &ic, "ReadOnlyAccess")
            .await
            .expect("ps");
        let skip: BTreeSet<String> = not_provisioned.iter().map(|&n| oid(n)).collect();
        let only: BTreeSet<String> = tenant
            .users
            .iter()
            .map(|u| u.id.clone())
            .filter(|id| !skip.contains(id))
            .collect();
        let provisioned = moto::provision_like_scim(cfg, &ic, &tenant, Some(&only))
            .await
            .expect("provision");
        let graph = FakeGraph::start(tenant).await.expect("fake graph");
        Stack {
            graph,
            account,
            ic,
            provisioned,
            admin_ps,
            read_ps,
        }
    }

    /// A configuration with these rules (YAML list items, indented by two spaces).
    pub fn config_text(&self, rules: &str, max_deletions: u32) -> String {
        format!(
            "version: 1\nentra:\n  tenant_id: {TENANT_ID}\n  client_id: {CLIENT_ID}\n  graph_url: {}\n  login_url: {}\nstate:\n  table: {TABLE}\nsafety:\n  max_deletions: {max_deletions}\nassignments:\n{rules}",
            self.graph.graph_url(),
            self.graph.login_url()
        )
    }

    pub fn config(&self, rules: &str) -> Config {
        Config::parse(&self.config_text(rules, 20), "test.yaml").expect("valid test config")
    }

    /// The production engine, with a quick Graph backoff so fault tests stay fast.
    pub async fn engine(&self, config: &Config) -> Engine {
        let mut engine = Engine::connect(config, &self.account.sdk_config, Some(SECRET.into()))
            .await
            .expect("engine");
        engine.directory = Arc::new(
            GraphClient::new(GraphSettings {
                graph_url: config.entra.graph_url.to_string(),
                login_url: config.entra.login_url.to_string(),
                tenant_id: config.entra.tenant_id.clone(),
                client_id: config.entra.client_id.clone(),
                client_secret: Secret::new(SECRET),
                backoff: Backoff {
                    max_attempts: 3,
                    base: Duration::from_millis(10),
                    cap: Duration::from_millis(50),
                },
            })
            .expect("graph client"),
        );
        engine
    }

    pub async fn try_run(
        &self,
        config: &Config,
        mode: Mode,
        allow_deletions: Option<u32>,
    ) -> Result<Report, EngineError> {
        self.run_targeted(config, mode, allow_deletions, Target::All)
            .await
    }

    pub async fn run_targeted(
        &self,
        config: &Config,
        mode: Mode,
        allow_deletions: Option<u32>,
        target: Target,
    ) -> Result<Report, EngineError> {
        let request = RunRequest {
            mode,
            trigger: "test".into(),
            allow_deletions,
            target,
            deadline: None,
            full_read: false,
            refresh: Default::default(),
        };
        self.run_request(config, &request).await
    }

    pub async fn run_request(
        &self,
        config: &Config,
        request: &RunRequest,
    ) -> Result<Report, EngineError> {
        self.engine(config).await.run(config, request).await
    }

    pub async fn run(&self, config: &Config, mode: Mode) -> Report {
        self.try_run(config, mode, None).await.expect("run")
    }

    /// (type, principal id) assigned `ps` on `account`.
    pub async fn assigned(&self, account: &str, ps: &str) -> BTreeSet<(String, String)> {
        moto::list_assignments(&self.account.sdk_config, &self.ic, account, ps)
            .await
            .expect("list assignments")
    }

    /// Empties Developers and the groups nested in it: the Entra source loses every member.
    pub fn empty_developers(&self) {
        self.graph.with_tenant(|t| {
            for g in t
                .groups
                .iter_mut()
                .filter(|g| [oid(100), oid(101), oid(102)].contains(&g.id))
            {
                g.members.clear();
            }
        });
    }

    pub fn user_id(&self, n: u32) -> String {
        self.provisioned.users[&oid(n)].clone()
    }

    pub fn group_id(&self, n: u32) -> String {
        self.provisioned.groups[&oid(n)].clone()
    }

    pub fn users(&self, ns: &[u32]) -> BTreeSet<(String, String)> {
        ns.iter()
            .map(|&n| ("USER".to_string(), self.user_id(n)))
            .collect()
    }

    pub fn groups(&self, ns: &[u32]) -> BTreeSet<(String, String)> {
        ns.iter()
            .map(|&n| ("GROUP".to_string(), self.group_id(n)))
            .collect()
    }
}

/// An organization built in the stack's moto account:
/// Root ⊃ Workloads ⊃ Prod ⊃ Payments ⊃ Deep (four levels), Root ⊃ Sandbox.
pub struct Org {
    pub client: aws_sdk_organizations::Client,
    pub root: String,
    pub ous: std::collections::BTreeMap<&'static str, String>,
    pub accounts: std::collections::BTreeMap<&'static str, String>,
}

impl Org {
    pub async fn new(s: &Stack) -> Org {
        let client = aws_sdk_organizations::Client::new(&s.account.sdk_config);
        client
            .create_organization()
            .feature_set(aws_sdk_organizations::types::OrganizationFeatureSet::All)
            .send()
            .await
            .expect("create organization");
        let root = client.list_roots().send().await.unwrap().roots.unwrap()[0]
            .id
            .clone()
            .unwrap();
        let mut org = Org {
            client,
            root: root.clone(),
            ous: Default::default(),
            accounts: Default::default(),
        };
        for (name, parent) in [
            ("Workloads", None),
            ("Prod", Some("Workloads")),
            ("Payments", Some("Prod")),
            ("Deep", Some("Payments")),
            ("Sandbox", None),
        ] {
            let parent_id = parent.map_or(root.clone(), |p| org.ous[p].clone());
            let ou = org
                .client
                .create_organizational_unit()
                .parent_id(parent_id)
                .name(name)
                .send()
                .await
                .expect("create OU");
            org.ous
                .insert(name, ou.organizational_unit.unwrap().id.unwrap());
        }
        for (name, ou) in [
            ("Prod Web", "Prod"),
            ("Payments Main", "Payments"),
            ("Deep One", "Deep"),
            ("Sandbox Dev", "Sandbox"),
            ("Retired", "Prod"),
        ] {
            org.create_account(name, ou).await;
        }
        org
    }

    /// Creates an account and moves it into the OU; returns its id.
    pub async fn create_account(&mut self, name: &'static str, ou: &str) -> String {
        let created = self
            .client
            .create_account()
            .email(format!(
                "{}@example.com",
                name.replace(' ', ".").to_lowercase()
            ))
            .account_name(name)
            .send()
            .await
            .expect("create account");
        let id = created.create_account_status.unwrap().account_id.unwrap();
        self.move_account(&id, &self.root.clone(), &self.ous[ou].clone())
            .await;
        self.accounts.insert(name, id.clone());
        id
    }

    pub async fn move_account(&self, id: &str, from: &str, to: &str) {
        self.client
            .move_account()
            .account_id(id)
            .source_parent_id(from)
            .destination_parent_id(to)
            .send()
            .await
            .expect("move account");
    }

    pub async fn tag(&self, account: &str, key: &str, value: &str) {
        self.client
            .tag_resource()
            .resource_id(&self.accounts[account])
            .tags(
                aws_sdk_organizations::types::Tag::builder()
                    .key(key)
                    .value(value)
                    .build()
                    .unwrap(),
            )
            .send()
            .await
            .expect("tag account");
    }

    pub async fn close(&self, account: &str) {
        self.client
            .close_account()
            .account_id(&self.accounts[account])
            .send()
            .await
            .expect("close account");
    }
}

pub const BIN: &str = env!("CARGO_BIN_EXE_entra-sso-sync");

/// Runs the CLI with the stack's moto account and no client secret in the environment.
pub async fn cli(s: &Stack, args: &[&str], extra_env: &[(&str, &str)]) -> Output {
    let creds = s
        .account
        .sdk_config
        .credentials_provider()
        .expect("credentials")
        .provide_credentials()
        .await
        .expect("credentials");
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("ENTRA_CLIENT_SECRET")
        .env_remove("CONFIG_URI")
        .env("AWS_ACCESS_KEY_ID", creds.access_key_id())
        .env("AWS_SECRET_ACCESS_KEY", creds.secret_access_key())
        .env(
            "AWS_SESSION_TOKEN",
            creds.session_token().unwrap_or_default(),
        )
        .env("RUST_LOG", "debug");
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    tokio::task::spawn_blocking(move || cmd.output().expect("run the CLI"))
        .await
        .expect("join")
}

pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

//! The configuration file (version 1): parsed into checked types in one step, so the rest of
//! the program never sees a malformed account id, GUID or ARN. Every error names the file, the
//! key and what was expected; a bad file changes nothing because nothing runs before this.

use crate::model::{AccountId, Guid};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// Default Microsoft Graph base URL.
pub const DEFAULT_GRAPH_URL: &str = "https://graph.microsoft.com/v1.0";
/// Default Microsoft identity platform URL.
pub const DEFAULT_LOGIN_URL: &str = "https://login.microsoftonline.com";

/// A configuration that could not be read or is not valid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or object could not be read at all.
    #[error("{source_name}: cannot read the configuration: {message}")]
    Read {
        /// Where the configuration came from (path or s3:// URI).
        source_name: String,
        /// What went wrong.
        message: String,
    },
    /// A key has a wrong value, type or is unknown.
    #[error("{source_name}: {key}: {message}")]
    Invalid {
        /// Where the configuration came from (path, s3:// URI or environment).
        source_name: String,
        /// The key, as a path such as `assignments[0].accounts[1]`.
        key: String,
        /// What was expected and what was found.
        message: String,
    },
}

/// The whole configuration, checked.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Format version; only 1 exists.
    pub version: u32,
    /// Which Identity Center instance to manage.
    #[serde(default)]
    pub identity_center: IdentityCenterConfig,
    /// The Entra tenant and app registration.
    pub entra: EntraConfig,
    /// Where the tool records ownership and runs.
    pub state: StateConfig,
    /// Limits that stop a run before it removes too much access.
    #[serde(default)]
    pub safety: SafetyConfig,
    /// Settings of `assign: mirror` groups.
    #[serde(default)]
    pub mirror: MirrorConfig,
    /// How often Identity Center's assignments are read in full.
    #[serde(default)]
    pub audit: AuditConfig,
    /// The assignment rules.
    pub assignments: Vec<Rule>,
}

/// `identity_center:` section.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityCenterConfig {
    /// Instance ARN; optional when the account has exactly one instance.
    pub instance_arn: Option<InstanceArn>,
    /// Identity store id; optional, taken from the instance.
    pub identity_store_id: Option<IdentityStoreId>,
}

/// `entra:` section.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EntraConfig {
    /// Directory (tenant) id.
    pub tenant_id: Guid,
    /// Application (client) id of the app registration.
    pub client_id: Guid,
    /// Secrets Manager secret holding the client secret, when not in `ENTRA_CLIENT_SECRET`.
    pub client_secret_arn: Option<SecretArn>,
    /// Microsoft Graph base URL.
    #[serde(default = "default_graph_url")]
    pub graph_url: HttpUrl,
    /// Microsoft identity platform base URL.
    #[serde(default = "default_login_url")]
    pub login_url: HttpUrl,
}

fn default_graph_url() -> HttpUrl {
    HttpUrl(DEFAULT_GRAPH_URL.to_string())
}

fn default_login_url() -> HttpUrl {
    HttpUrl(DEFAULT_LOGIN_URL.to_string())
}

/// `state:` section.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// DynamoDB table name.
    pub table: TableName,
}

/// `safety:` section.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SafetyConfig {
    /// A run that would delete more than this (assignments, mirror memberships and mirror
    /// groups together) deletes none.
    #[serde(default = "default_max_deletions")]
    pub max_deletions: u32,
    /// A run may not delete more than this share of what the tool owns; applies only when the
    /// run would delete more than [`RATIO_FLOOR`] things, so one removal in a small deployment
    /// is not blocked.
    #[serde(default = "default_max_deletion_ratio")]
    pub max_deletion_ratio: Ratio,
    /// Accounts and principals whose assignments the tool never deletes.
    #[serde(default)]
    pub protected: Protected,
}

/// The ratio guard applies only to runs deleting more than this many things.
pub const RATIO_FLOOR: usize = 5;

fn default_max_deletions() -> u32 {
    20
}

fn default_max_deletion_ratio() -> Ratio {
    Ratio(0.2)
}

impl Default for SafetyConfig {
    fn default() -> Self {
        SafetyConfig {
            max_deletions: default_max_deletions(),
            max_deletion_ratio: default_max_deletion_ratio(),
            protected: Protected::default(),
        }
    }
}

/// A share between 0 and 1.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd, Deserialize, Serialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Ratio(f64);

impl Ratio {
    /// The share.
    pub fn get(self) -> f64 {
        self.0
    }
}

impl TryFrom<f64> for Ratio {
    type Error = String;
    fn try_from(v: f64) -> Result<Self, String> {
        if (0.0..=1.0).contains(&v) {
            Ok(Ratio(v))
        } else {
            Err(format!("expected a share between 0 and 1, got {v}"))
        }
    }
}

impl From<Ratio> for f64 {
    fn from(r: Ratio) -> f64 {
        r.0
    }
}

/// `safety.protected`: what the tool never deletes.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Protected {
    /// Accounts (by id) whose assignments are never deleted, such as the management account.
    #[serde(default)]
    pub accounts: Vec<AccountId>,
    /// Identity Center group display names or user names whose assignments are never deleted,
    /// such as break-glass groups. User names compare case-insensitively.
    #[serde(default)]
    pub principals: Vec<String>,
}

/// `mirror:` section.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorConfig {
    /// Prefix of the Identity Center groups the tool creates for `assign: mirror` rules.
    #[serde(default = "default_group_prefix")]
    pub group_prefix: String,
    /// `plan` warns when one `members` rule would hold more assignments than this, and
    /// suggests `mirror`.
    #[serde(default = "default_suggest_above")]
    pub suggest_mirror_above: usize,
}

/// `audit:` section. A run reads the assignments of every pair it may change; the others it
/// takes from the ledger and the unowned assignments it last saw, and a rolling audit reads a
/// slice of them each run so that every pair is read at least once per period (catching
/// changes made by hand).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Every pair in play is read at least once in this many hours; 0 reads every pair on
    /// every run.
    #[serde(default = "default_audit_period_hours")]
    pub period_hours: u32,
    /// A full run takes the audit's slice, and reads the organization again, at most this
    /// often; the runs between read neither (0: every run).
    #[serde(default = "default_audit_every_minutes")]
    pub every_minutes: u32,
}

fn default_audit_every_minutes() -> u32 {
    60
}

fn default_audit_period_hours() -> u32 {
    24
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            period_hours: default_audit_period_hours(),
            every_minutes: default_audit_every_minutes(),
        }
    }
}

/// Default mirror group prefix: Entra display names do not start like this in practice, and a
/// group of that name the tool did not create is never adopted.
pub const DEFAULT_MIRROR_PREFIX: &str = "entra-sso-sync: ";

fn default_group_prefix() -> String {
    DEFAULT_MIRROR_PREFIX.to_string()
}

fn default_suggest_above() -> usize {
    1000
}

impl Default for MirrorConfig {
    fn default() -> Self {
        MirrorConfig {
            group_prefix: default_group_prefix(),
            suggest_mirror_above: default_suggest_above(),
        }
    }
}

/// One assignment rule: an Entra group gets a permission set in some accounts.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Unique rule name, shown in plans and recorded with what it created.
    pub name: RuleName,
    /// The Entra group, by display name or object id.
    pub entra_group: GroupRef,
    /// The permission set, by name or ARN.
    pub permission_set: PermissionSetRef,
    /// Target accounts, by 12-digit id or by name.
    #[serde(default)]
    pub accounts: Vec<AccountRef>,
    /// Organizational units (id or `Root/…` path): every account below, at any depth.
    #[serde(default)]
    pub organizational_units: Vec<OuRef>,
    /// Accounts carrying all of these tags.
    #[serde(default)]
    pub account_tags: BTreeMap<String, String>,
    /// Every account of the organization.
    #[serde(default)]
    pub all_accounts: bool,
    /// Accounts removed from the scope, by id or name.
    #[serde(default)]
    pub exclude_accounts: Vec<AccountRef>,
    /// Organizational units whose accounts are removed from the scope.
    #[serde(default)]
    pub exclude_organizational_units: Vec<OuRef>,
    /// Whether to assign the provisioned group or each of its transitive members.
    #[serde(default)]
    pub assign: AssignMode,
}

/// How a rule turns an Entra group into Identity Center principals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AssignMode {
    /// Assign the Identity Center group that SCIM provisioning created for the Entra group.
    #[default]
    Group,
    /// Assign every transitive (nested) user member one by one.
    Members,
    /// Keep an Identity Center group whose members are the Entra group's transitive user
    /// members, and assign that group.
    Mirror,
}

/// Defines a string newtype checked by `check` on deserialisation.
macro_rules! checked_string {
    ($(#[$doc:meta])* $name:ident, $check:expr) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// The checked value.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                let check: fn(&str) -> Result<(), String> = $check;
                check(&s).map(|()| $name(s))
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

checked_string!(
    /// An Identity Center instance ARN (`arn:aws:sso:::instance/ssoins-…`).
    InstanceArn,
    |s| check_arn(s, "sso", "instance/", "arn:aws:sso:::instance/ssoins-1234567890abcdef")
);
checked_string!(
    /// A Secrets Manager secret ARN.
    SecretArn,
    |s| check_arn(
        s,
        "secretsmanager",
        "secret:",
        "arn:aws:secretsmanager:eu-west-1:111111111111:secret:name"
    )
);
checked_string!(
    /// An identity store id such as `d-1234567890`.
    IdentityStoreId,
    |s| {
        if !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            Ok(())
        } else {
            Err(format!("expected an identity store id such as d-1234567890, got {s:?}"))
        }
    }
);
checked_string!(
    /// A DynamoDB table name.
    TableName,
    |s| {
        if (3..=255).contains(&s.len())
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        {
            Ok(())
        } else {
            Err(format!(
                "expected a DynamoDB table name (3-255 of A-Z a-z 0-9 _ . -), got {s:?}"
            ))
        }
    }
);
checked_string!(
    /// A rule name: letters, digits, `-`, `_` and `.`, at most 64.
    RuleName,
    |s| {
        if (1..=64).contains(&s.len())
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        {
            Ok(())
        } else {
            Err(format!(
                "expected a rule name of 1-64 letters, digits, '-', '_' or '.', got {s:?}"
            ))
        }
    }
);
checked_string!(
    /// An http(s) base URL. Plain http is accepted only for loopback hosts (tests, local stack),
    /// so a client secret is never sent in clear over a network.
    HttpUrl,
    check_url
);

fn check_arn(s: &str, service: &str, resource_prefix: &str, example: &str) -> Result<(), String> {
    let parts: Vec<&str> = s.splitn(6, ':').collect();
    let ok = parts.len() == 6
        && parts[0] == "arn"
        && parts[1].starts_with("aws")
        && parts[2] == service
        && parts[5].len() > resource_prefix.len()
        && parts[5].starts_with(resource_prefix)
        && !s.chars().any(char::is_whitespace);
    if ok {
        Ok(())
    } else {
        Err(format!("expected an ARN such as {example}, got {s:?}"))
    }
}

fn check_url(s: &str) -> Result<(), String> {
    let url =
        reqwest::Url::parse(s).map_err(|e| format!("expected an http(s) URL, got {s:?}: {e}"))?;
    let loopback = matches!(url.host_str(), Some("127.0.0.1" | "localhost" | "[::1]"));
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        "http" => Err(format!(
            "{s:?} must use https (plain http only for 127.0.0.1 / localhost)"
        )),
        other => Err(format!(
            "expected an http(s) URL, got scheme {other:?} in {s:?}"
        )),
    }
}

/// An account, by 12-digit id or by name. An entry made only of digits is an id and must have
/// 12 of them (all-digit account names are not supported).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum AccountRef {
    /// The account id.
    Id(AccountId),
    /// The account name (must match exactly one account).
    Name(String),
}

impl TryFrom<String> for AccountRef {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s.bytes().all(|b| b.is_ascii_digit()) {
            AccountId::try_from(s).map(AccountRef::Id)
        } else if s.trim().is_empty() {
            Err("expected an account id or name, got an empty string".into())
        } else {
            Ok(AccountRef::Name(s))
        }
    }
}

impl From<AccountRef> for String {
    fn from(a: AccountRef) -> String {
        match a {
            AccountRef::Id(id) => id.into(),
            AccountRef::Name(n) => n,
        }
    }
}

impl fmt::Display for AccountRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AccountRef::Id(id) => write!(f, "{id}"),
            AccountRef::Name(n) => write!(f, "{n:?}"),
        }
    }
}

/// An organizational unit, by id (`ou-…`, or the root's `r-…`) or by path from the root
/// (`Root/Workloads/Prod`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum OuRef {
    /// The OU or root id.
    Id(String),
    /// The path of names from the root.
    Path(String),
}

impl TryFrom<String> for OuRef {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let id_shape = |rest: &str| {
            !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        if s.strip_prefix("ou-").is_some_and(id_shape) || s.strip_prefix("r-").is_some_and(id_shape)
        {
            Ok(OuRef::Id(s))
        } else if (s == "Root" || s.starts_with("Root/")) && !s.split('/').any(str::is_empty) {
            Ok(OuRef::Path(s))
        } else {
            Err(format!(
                "expected an organizational unit id (ou-…, r-…) or a path from the root such as Root/Workloads/Prod, got {s:?}"
            ))
        }
    }
}

impl From<OuRef> for String {
    fn from(o: OuRef) -> String {
        match o {
            OuRef::Id(s) | OuRef::Path(s) => s,
        }
    }
}

impl fmt::Display for OuRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OuRef::Id(s) | OuRef::Path(s) => f.write_str(s),
        }
    }
}

/// An Entra group, named by object id or display name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum GroupRef {
    /// The group's object id.
    Id(Guid),
    /// The group's display name (must match exactly one group).
    Name(String),
}

impl TryFrom<String> for GroupRef {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if Guid::looks_like(&s) {
            Guid::try_from(s).map(GroupRef::Id)
        } else if s.trim().is_empty() {
            Err("expected an Entra group display name or object id, got an empty string".into())
        } else {
            Ok(GroupRef::Name(s))
        }
    }
}

impl From<GroupRef> for String {
    fn from(g: GroupRef) -> String {
        match g {
            GroupRef::Id(id) => id.into(),
            GroupRef::Name(n) => n,
        }
    }
}

impl fmt::Display for GroupRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GroupRef::Id(id) => write!(f, "{id}"),
            GroupRef::Name(n) => write!(f, "{n:?}"),
        }
    }
}

/// A permission set, named by name or ARN.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum PermissionSetRef {
    /// The permission set ARN. AWS writes `arn:aws:sso:::permissionSet/ssoins-…/ps-…`; moto
    /// writes `…:instance/ssoins-…/ps-…`, so the resource type is not checked.
    Arn(String),
    /// The permission set name.
    Name(String),
}

impl TryFrom<String> for PermissionSetRef {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s.starts_with("arn:") {
            let parts: Vec<&str> = s.splitn(6, ':').collect();
            let resource_ok = parts
                .get(5)
                .map(|r| {
                    r.split('/')
                        .any(|seg| seg.starts_with("ps-") && seg.len() > 3)
                })
                .unwrap_or(false);
            if parts.len() == 6 && parts[2] == "sso" && resource_ok {
                Ok(PermissionSetRef::Arn(s))
            } else {
                Err(format!(
                    "expected a permission set ARN such as arn:aws:sso:::permissionSet/ssoins-1234567890abcdef/ps-1234567890abcdef, got {s:?}"
                ))
            }
        } else if (1..=32).contains(&s.len())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "+=,.@-_".contains(c))
        {
            Ok(PermissionSetRef::Name(s))
        } else {
            Err(format!(
                "expected a permission set name (1-32 of A-Z a-z 0-9 + = , . @ - _) or ARN, got {s:?}"
            ))
        }
    }
}

impl From<PermissionSetRef> for String {
    fn from(p: PermissionSetRef) -> String {
        match p {
            PermissionSetRef::Arn(s) | PermissionSetRef::Name(s) => s,
        }
    }
}

impl fmt::Display for PermissionSetRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PermissionSetRef::Arn(s) | PermissionSetRef::Name(s) => f.write_str(s),
        }
    }
}

impl Config {
    /// Parses and checks a configuration. `source_name` (a path or URI) goes into every error.
    pub fn parse(text: &str, source_name: &str) -> Result<Config, ConfigError> {
        let invalid = |key: String, message: String| ConfigError::Invalid {
            source_name: source_name.to_string(),
            key,
            message,
        };
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." {
                "(top level)".to_string()
            } else {
                key
            };
            invalid(key, e.into_inner().to_string())
        })?;

        if config.version != 1 {
            return Err(invalid(
                "version".into(),
                format!("expected 1, got {}", config.version),
            ));
        }
        if config.assignments.is_empty() {
            return Err(invalid(
                "assignments".into(),
                "expected at least one assignment rule, got an empty list".into(),
            ));
        }
        if config.mirror.group_prefix.trim().is_empty() {
            return Err(invalid(
                "mirror.group_prefix".into(),
                "expected a non-empty prefix: mirror groups must not look like provisioned ones"
                    .into(),
            ));
        }
        let mut names = BTreeSet::new();
        for (i, rule) in config.assignments.iter().enumerate() {
            if !names.insert(rule.name.as_str()) {
                return Err(invalid(
                    format!("assignments[{i}].name"),
                    format!("duplicate rule name {:?}", rule.name.as_str()),
                ));
            }
            if rule.accounts.is_empty()
                && rule.organizational_units.is_empty()
                && rule.account_tags.is_empty()
                && !rule.all_accounts
            {
                return Err(invalid(
                    format!("assignments[{i}]"),
                    "expected a scope: accounts, organizational_units, account_tags or all_accounts".into(),
                ));
            }
            if let Some(k) = rule.account_tags.keys().find(|k| k.is_empty()) {
                return Err(invalid(
                    format!("assignments[{i}].account_tags"),
                    format!("expected non-empty tag keys, got {k:?}"),
                ));
            }
        }
        Ok(config)
    }

    /// Applies the environment overrides `ENTRA_GRAPH_URL`, `ENTRA_LOGIN_URL`, `STATE_TABLE`
    /// and `ENTRA_CLIENT_SECRET_ARN` (used by tests and the Lambda, whose template wires them). `lookup` reads a variable; it is a parameter so tests do
    /// not have to mutate the process environment.
    pub fn apply_env_overrides(
        &mut self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        fn set<T: TryFrom<String, Error = String>>(
            name: &str,
            value: Option<String>,
            slot: &mut T,
        ) -> Result<(), ConfigError> {
            if let Some(v) = value.filter(|v| !v.is_empty()) {
                *slot = T::try_from(v).map_err(|message| ConfigError::Invalid {
                    source_name: "environment".into(),
                    key: name.into(),
                    message,
                })?;
            }
            Ok(())
        }
        set(
            "ENTRA_GRAPH_URL",
            lookup("ENTRA_GRAPH_URL"),
            &mut self.entra.graph_url,
        )?;
        set(
            "ENTRA_LOGIN_URL",
            lookup("ENTRA_LOGIN_URL"),
            &mut self.entra.login_url,
        )?;
        set("STATE_TABLE", lookup("STATE_TABLE"), &mut self.state.table)?;
        if let Some(v) = lookup("ENTRA_CLIENT_SECRET_ARN").filter(|v| !v.is_empty()) {
            let mut arn = SecretArn(String::new());
            set("ENTRA_CLIENT_SECRET_ARN", Some(v), &mut arn)?;
            self.entra.client_secret_arn = Some(arn);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = r#"
version: 1
identity_center:
  instance_arn: arn:aws:sso:::instance/ssoins-1234567890abcdef
  identity_store_id: d-1234567890
entra:
  tenant_id: 11111111-2222-3333-4444-555555555555
  client_id: 66666666-7777-8888-9999-000000000000
  client_secret_arn: arn:aws:secretsmanager:eu-west-1:111111111111:secret:entra-sso-sync
state:
  table: entra-sso-sync-state
safety:
  max_deletions: 20
assignments:
  - name: platform-admins
    entra_group: AWS Platform Admins
    permission_set: AdministratorAccess
    accounts: ["111111111111", "222222222222"]
    assign: group
  - name: devs
    entra_group: aaaaaaaa-bbbb-cccc-dddd-000000000001
    permission_set: arn:aws:sso:::permissionSet/ssoins-1234567890abcdef/ps-1234567890abcdef
    accounts: ["012345678901"]
    assign: members
"#;

    fn err(text: &str) -> (String, String) {
        match Config::parse(text, "c.yaml") {
            Err(ConfigError::Invalid {
                source_name,
                key,
                message,
            }) => {
                assert_eq!(source_name, "c.yaml");
                (key, message)
            }
            other => panic!("expected an Invalid error, got {other:?}"),
        }
    }

    #[test]
    fn the_documented_example_parses_with_defaults() {
        let c = Config::parse(VALID, "c.yaml").unwrap();
        assert_eq!(c.assignments.len(), 2);
        assert_eq!(c.entra.graph_url.as_str(), DEFAULT_GRAPH_URL);
        assert_eq!(c.entra.login_url.as_str(), DEFAULT_LOGIN_URL);
        assert_eq!(c.assignments[0].assign, AssignMode::Group);
        assert_eq!(
            c.assignments[0].entra_group,
            GroupRef::Name("AWS Platform Admins".into())
        );
        assert!(matches!(c.assignments[1].entra_group, GroupRef::Id(_)));
        assert!(matches!(
            c.assignments[1].permission_set,
            PermissionSetRef::Arn(_)
        ));
        assert_eq!(
            c.assignments[1].accounts[0],
            AccountRef::Id(AccountId::try_from("012345678901".to_string()).unwrap())
        );
        assert_eq!(c.assignments[1].assign, AssignMode::Members);
    }

    #[test]
    fn optional_sections_default() {
        let text = VALID
            .replace("safety:\n  max_deletions: 20\n", "")
            .replace(
                "identity_center:\n  instance_arn: arn:aws:sso:::instance/ssoins-1234567890abcdef\n  identity_store_id: d-1234567890\n",
                "",
            );
        let c = Config::parse(&text, "c.yaml").unwrap();
        assert_eq!(c.safety.max_deletions, 20);
        assert!(c.identity_center.instance_arn.is_none());
    }

    #[test]
    fn unknown_keys_are_named() {
        let (key, message) = err(&VALID.replace("  max_deletions: 20", "  max_deletion: 20"));
        assert!(key.starts_with("safety"), "{key}");
        assert!(
            message.contains("unknown field `max_deletion`"),
            "{message}"
        );
        let (key, _) = err(&VALID.replace("    assign: group", "    asign: group"));
        assert!(key.starts_with("assignments[0]"), "{key}");
    }

    #[test]
    fn wrong_types_are_named() {
        let (key, message) = err(&VALID.replace("max_deletions: 20", "max_deletions: many"));
        assert_eq!(key, "safety.max_deletions");
        assert!(message.contains("invalid type"), "{message}");
        let (key, _) = err(&VALID.replace("    assign: group", "    assign: everyone"));
        assert_eq!(key, "assignments[0].assign");
    }

    #[test]
    fn malformed_identifiers_are_named() {
        let cases = [
            (
                "\"222222222222\"",
                "\"22222222222\"",
                "assignments[0].accounts[1]",
                "12-digit",
            ),
            (
                "11111111-2222-3333-4444-555555555555",
                "not-a-guid",
                "entra.tenant_id",
                "GUID",
            ),
            (
                "arn:aws:sso:::instance/ssoins-1234567890abcdef",
                "arn:aws:s3:::bucket",
                "identity_center.instance_arn",
                "ARN",
            ),
            (
                "arn:aws:secretsmanager:eu-west-1:111111111111:secret:entra-sso-sync",
                "my-secret",
                "entra.client_secret_arn",
                "ARN",
            ),
            (
                "arn:aws:sso:::permissionSet/ssoins-1234567890abcdef/ps-1234567890abcdef",
                "arn:aws:sso:::permissionSet/oops",
                "assignments[1].permission_set",
                "permission set ARN",
            ),
        ];
        for (from, to, want_key, want_msg) in cases {
            let (key, message) = err(&VALID.replace(from, to));
            assert_eq!(key, want_key, "{to}");
            assert!(message.contains(want_msg), "{to}: {message}");
        }
    }

    #[test]
    fn empty_and_duplicate_rules_are_rejected() {
        let head = VALID.split("assignments:").next().unwrap();
        let (key, message) = err(&format!("{head}assignments: []\n"));
        assert_eq!(key, "assignments");
        assert!(message.contains("at least one"), "{message}");

        let (key, message) = err(&VALID.replace("name: devs", "name: platform-admins"));
        assert_eq!(key, "assignments[1].name");
        assert!(message.contains("duplicate"), "{message}");
    }

    #[test]
    fn version_and_plain_http_are_checked() {
        let (key, _) = err(&VALID.replace("version: 1", "version: 2"));
        assert_eq!(key, "version");
        let (key, message) = err(&VALID.replace(
            "  client_id: 66666666-7777-8888-9999-000000000000",
            "  client_id: 66666666-7777-8888-9999-000000000000\n  graph_url: http://graph.example.com/v1.0",
        ));
        assert_eq!(key, "entra.graph_url");
        assert!(message.contains("https"), "{message}");
    }

    #[test]
    fn scopes_parse_and_check_their_shapes() {
        let scoped = VALID.replace(
            "    accounts: [\"111111111111\", \"222222222222\"]\n",
            "    accounts: [\"111111111111\", Shared Services]\n    organizational_units: [ou-ab12-34cd56ef, Root/Workloads/Prod]\n    account_tags: {environment: production}\n    exclude_accounts: [\"999999999999\"]\n    exclude_organizational_units: [Root/Workloads/Prod/Sandbox]\n",
        );
        let c = Config::parse(&scoped, "c.yaml").unwrap();
        let r = &c.assignments[0];
        assert_eq!(r.accounts[1], AccountRef::Name("Shared Services".into()));
        assert_eq!(
            r.organizational_units[1],
            OuRef::Path("Root/Workloads/Prod".into())
        );
        assert_eq!(r.account_tags["environment"], "production");

        let (key, message) = err(&scoped.replace("Shared Services", "12345"));
        assert_eq!(key, "assignments[0].accounts[1]");
        assert!(message.contains("12-digit"), "{message}");
        let (key, _) = err(&scoped.replace("Root/Workloads/Prod]", "Workloads/Prod]"));
        assert_eq!(key, "assignments[0].organizational_units[1]");
        let (key, message) = err(&VALID.replace("    accounts: [\"012345678901\"]\n", ""));
        assert_eq!(key, "assignments[1]");
        assert!(message.contains("expected a scope"), "{message}");
        let all = VALID.replace(
            "    accounts: [\"012345678901\"]\n",
            "    all_accounts: true\n",
        );
        assert!(Config::parse(&all, "c.yaml").unwrap().assignments[1].all_accounts);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for text in ["", "[", "version: [1", "- a\n- b", "\u{0}"] {
            assert!(Config::parse(text, "c.yaml").is_err(), "{text:?}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]
        /// Arbitrary text and damaged copies of a valid file: an error or a config, never a panic.
        #[test]
        fn parsing_never_panics(
            text in ".{0,200}",
            cut in 0usize..VALID.len(),
            line in 0usize..40,
            junk in "[ -~]{0,12}",
        ) {
            let _ = Config::parse(&text, "fuzz.yaml");
            let _ = Config::parse(&VALID[..cut], "fuzz.yaml");
            let mut lines: Vec<&str> = VALID.lines().collect();
            if line < lines.len() {
                lines[line] = &junk;
            }
            let _ = Config::parse(&lines.join("\n"), "fuzz.yaml");
        }
    }

    #[test]
    fn environment_overrides_apply_and_are_checked() {
        let mut c = Config::parse(VALID, "c.yaml").unwrap();
        c.apply_env_overrides(|k| match k {
            "ENTRA_GRAPH_URL" => Some("http://127.0.0.1:9/v1.0".into()),
            "STATE_TABLE" => Some("other-table".into()),
            "ENTRA_CLIENT_SECRET_ARN" => {
                Some("arn:aws:secretsmanager:us-east-1:111111111111:secret:other".into())
            }
            _ => None,
        })
        .unwrap();
        assert_eq!(c.entra.graph_url.as_str(), "http://127.0.0.1:9/v1.0");
        assert_eq!(c.entra.login_url.as_str(), DEFAULT_LOGIN_URL);
        assert_eq!(c.state.table.as_str(), "other-table");
        assert!(c
            .entra
            .client_secret_arn
            .as_ref()
            .unwrap()
            .as_str()
            .ends_with(":secret:other"));

        let e = c
            .apply_env_overrides(|k| (k == "STATE_TABLE").then(|| "x".to_string()))
            .unwrap_err();
        assert!(e.to_string().contains("STATE_TABLE"), "{e}");
    }
}

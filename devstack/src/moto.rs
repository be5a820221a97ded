//! Helpers that put a running `moto_server` into the state that Entra ID's SCIM provisioning and a
//! deployment of entra-sso-sync would leave real AWS in: an Identity Center instance with users,
//! groups and direct group memberships, permission sets, hand-made account assignments, and the
//! DynamoDB state table.
//!
//! Everything here is test tooling: errors are `String`s that name the AWS call that failed, and
//! nothing panics on an SDK error. Start moto with `scripts/moto.sh` (or run `scripts/test`),
//! which exports `AWS_ENDPOINT_URL`.
//!
//! moto keeps separate state per AWS account. [`isolated_account`] gives each test its own random
//! account (via STS `AssumeRole`), hence its own Identity Center instance, identity store and
//! DynamoDB tables, so tests can run in parallel against one moto server.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::Credentials;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType, TableStatus,
    TimeToLiveSpecification,
};
use aws_sdk_identitystore::types::{Email, MemberId, Name};
use aws_sdk_ssoadmin::error::DisplayErrorContext;
use aws_sdk_ssoadmin::types::{PrincipalType, StatusValues, TargetType};

use crate::graph::Tenant;

/// moto's own default account (what unsigned or `testing` credentials map to); never handed out
/// by [`isolated_account`].
const MOTO_DEFAULT_ACCOUNT: &str = "123456789012";

/// How long to wait for moto's "asynchronous" operations (account assignments, table creation).
/// moto completes them at once; the bound only keeps a misbehaving server from hanging a test.
const POLL_ATTEMPTS: u32 = 100;
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// A fresh moto account and an SDK configuration whose requests land in it.
#[derive(Clone, Debug)]
pub struct MotoAccount {
    /// Endpoint (`AWS_ENDPOINT_URL`), region and assumed-role credentials for [`Self::account_id`].
    pub sdk_config: SdkConfig,
    /// The random 12-digit account id (may have leading zeros).
    pub account_id: String,
}

/// The Identity Center instance of one moto account and region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityCenter {
    /// `arn:aws:sso:::instance/ssoins-…` (random on every moto start).
    pub instance_arn: String,
    /// The identity store id (`d-…`; moto's are not hexadecimal).
    pub identity_store_id: String,
}

/// What [`provision_like_scim`] created, keyed by Entra object id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Provisioned {
    /// Entra user id → identity store user id.
    pub users: BTreeMap<String, String>,
    /// Entra group id → identity store group id.
    pub groups: BTreeMap<String, String>,
}

fn sdk_err<E: std::error::Error>(call: &str, err: E) -> String {
    format!("{call} failed: {}", DisplayErrorContext(err))
}

/// The region the helpers use: `AWS_REGION` if set, else `us-east-1`.
fn region() -> String {
    std::env::var("AWS_REGION")
        .ok()
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| "us-east-1".to_owned())
}

fn endpoint_url() -> Result<String, String> {
    match std::env::var("AWS_ENDPOINT_URL") {
        Ok(url) if !url.is_empty() => Ok(url),
        _ => Err(
            "AWS_ENDPOINT_URL is not set: these tests need a moto server. Run them with \
                  `scripts/test` (it starts moto and sets AWS_ENDPOINT_URL), or start one with \
                  `scripts/moto.sh` and export what it prints"
                .to_owned(),
        ),
    }
}

/// A random 12-digit account id, different on every call within this process.
fn random_account_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    loop {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        hasher.write_u128(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default(),
        );
        hasher.write_u32(std::process::id());
        let id = format!("{:012}", hasher.finish() % 1_000_000_000_000);
        if id != MOTO_DEFAULT_ACCOUNT {
            return id;
        }
    }
}

async fn sdk_config(endpoint: &str, credentials: Credentials) -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(Region::new(region()))
        .credentials_provider(credentials)
        .load()
        .await
}

/// Creates a fresh, random moto account and returns an [`SdkConfig`] whose requests land in it.
///
/// Reads `AWS_ENDPOINT_URL` (an error if unset: tests need moto, run `scripts/test`). The account
/// is entered the way moto documents for multi-account use: STS `AssumeRole` into
/// `arn:aws:iam::<ACCOUNT>:role/test`; moto maps the returned credentials to that account for every
/// service. The assumed identity is checked with `GetCallerIdentity`. The returned configuration is
/// an ordinary one (endpoint, region, credentials), so code under test needs no moto hooks.
///
/// Each account has its own Identity Center instance (moto creates it by itself; see
/// [`identity_center`]), identity store and DynamoDB tables. Region: `AWS_REGION`, else `us-east-1`.
pub async fn isolated_account() -> Result<MotoAccount, String> {
    let endpoint = endpoint_url()?;
    let account_id = random_account_id();
    // Any credentials are good for moto; fixed dummy ones ensure no real AWS profile is ever used.
    let base = sdk_config(
        &endpoint,
        Credentials::new("testing", "testing", None, None, "moto-base"),
    )
    .await;
    let sts = aws_sdk_sts::Client::new(&base);
    let role_arn = format!("arn:aws:iam::{account_id}:role/test");
    let assumed = sts
        .assume_role()
        .role_arn(&role_arn)
        .role_session_name("devstack-test")
        .duration_seconds(43_200)
        .send()
        .await
        .map_err(|e| sdk_err(&format!("sts:AssumeRole {role_arn} at {endpoint}"), e))?;
    let creds = assumed
        .credentials()
        .ok_or("sts:AssumeRole answered without Credentials")?;
    let expiry = SystemTime::try_from(*creds.expiration()).ok();
    let credentials = Credentials::new(
        creds.access_key_id(),
        creds.secret_access_key(),
        Some(creds.session_token().to_owned()),
        expiry,
        "moto-assume-role",
    );
    let sdk_config = sdk_config(&endpoint, credentials).await;

    let who = aws_sdk_sts::Client::new(&sdk_config)
        .get_caller_identity()
        .send()
        .await
        .map_err(|e| sdk_err("sts:GetCallerIdentity", e))?;
    if who.account() != Some(account_id.as_str()) {
        return Err(format!(
            "moto did not map the assumed-role credentials to account {account_id} \
             (GetCallerIdentity says {:?})",
            who.account()
        ));
    }
    Ok(MotoAccount {
        sdk_config,
        account_id,
    })
}

/// Finds the account's Identity Center instance (`sso-admin:ListInstances`; exactly one expected —
/// moto creates one per account and region by itself).
pub async fn identity_center(cfg: &SdkConfig) -> Result<IdentityCenter, String> {
    let out = aws_sdk_ssoadmin::Client::new(cfg)
        .list_instances()
        .send()
        .await
        .map_err(|e| sdk_err("sso-admin:ListInstances", e))?;
    match out.instances() {
        [one] => Ok(IdentityCenter {
            instance_arn: one
                .instance_arn()
                .ok_or("sso-admin:ListInstances: instance without InstanceArn")?
                .to_owned(),
            identity_store_id: one
                .identity_store_id()
                .ok_or("sso-admin:ListInstances: instance without IdentityStoreId")?
                .to_owned(),
        }),
        other => Err(format!(
            "sso-admin:ListInstances: expected exactly one Identity Center instance, found {}",
            other.len()
        )),
    }
}

/// Creates the product's DynamoDB state table `name`: string partition key `pk`, string sort key
/// `sk`, on-demand billing, TTL on attribute `expires_at`. Waits (bounded) until it is `ACTIVE`.
/// An existing table is an error (`ResourceInUseException`).
pub async fn create_state_table(cfg: &SdkConfig, name: &str) -> Result<(), String> {
    let ddb = aws_sdk_dynamodb::Client::new(cfg);
    let attr = |n: &str| {
        AttributeDefinition::builder()
            .attribute_name(n)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .map_err(|e| format!("building AttributeDefinition {n}: {e}"))
    };
    let key = |n: &str, t: KeyType| {
        KeySchemaElement::builder()
            .attribute_name(n)
            .key_type(t)
            .build()
            .map_err(|e| format!("building KeySchemaElement {n}: {e}"))
    };
    ddb.create_table()
        .table_name(name)
        .attribute_definitions(attr("pk")?)
        .attribute_definitions(attr("sk")?)
        .key_schema(key("pk", KeyType::Hash)?)
        .key_schema(key("sk", KeyType::Range)?)
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await
        .map_err(|e| sdk_err(&format!("dynamodb:CreateTable {name}"), e))?;

    let mut status = None;
    for _ in 0..POLL_ATTEMPTS {
        let out = ddb
            .describe_table()
            .table_name(name)
            .send()
            .await
            .map_err(|e| sdk_err(&format!("dynamodb:DescribeTable {name}"), e))?;
        status = out.table().and_then(|t| t.table_status()).cloned();
        if status == Some(TableStatus::Active) {
            break;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    if status != Some(TableStatus::Active) {
        return Err(format!(
            "dynamodb table {name} is not ACTIVE (status {status:?})"
        ));
    }

    let ttl = TimeToLiveSpecification::builder()
        .attribute_name("expires_at")
        .enabled(true)
        .build()
        .map_err(|e| format!("building TimeToLiveSpecification: {e}"))?;
    ddb.update_time_to_live()
        .table_name(name)
        .time_to_live_specification(ttl)
        .send()
        .await
        .map_err(|e| sdk_err(&format!("dynamodb:UpdateTimeToLive {name}"), e))?;
    Ok(())
}

/// Creates a permission set `name` (with `SessionDuration` `PT1H`: without it moto answers a numeric
/// default the Rust SDK cannot parse) and returns its ARN. moto does not refuse duplicate names
/// (AWS does): use [`find_permission_set`] first when that matters.
pub async fn create_permission_set(
    cfg: &SdkConfig,
    ic: &IdentityCenter,
    name: &str,
) -> Result<String, String> {
    let out = aws_sdk_ssoadmin::Client::new(cfg)
        .create_permission_set()
        .instance_arn(&ic.instance_arn)
        .name(name)
        .session_duration("PT1H")
        .send()
        .await
        .map_err(|e| sdk_err(&format!("sso-admin:CreatePermissionSet {name}"), e))?;
    out.permission_set()
        .and_then(|p| p.permission_set_arn())
        .map(str::to_owned)
        .ok_or_else(|| format!("sso-admin:CreatePermissionSet {name}: answer has no ARN"))
}

/// The ARN of the permission set named `name`, if one exists (`ListPermissionSets`, paged, then
/// `DescribePermissionSet` on each). More than one with that name is an error.
pub async fn find_permission_set(
    cfg: &SdkConfig,
    ic: &IdentityCenter,
    name: &str,
) -> Result<Option<String>, String> {
    let sso = aws_sdk_ssoadmin::Client::new(cfg);
    let mut found = Vec::new();
    let mut next_token = None;
    loop {
        let page = sso
            .list_permission_sets()
            .instance_arn(&ic.instance_arn)
            .set_next_token(next_token)
            .send()
            .await
            .map_err(|e| sdk_err("sso-admin:ListPermissionSets", e))?;
        for arn in page.permission_sets() {
            let described = sso
                .describe_permission_set()
                .instance_arn(&ic.instance_arn)
                .permission_set_arn(arn)
                .send()
                .await
                .map_err(|e| sdk_err(&format!("sso-admin:DescribePermissionSet {arn}"), e))?;
            if described.permission_set().and_then(|p| p.name()) == Some(name) {
                found.push(arn.clone());
            }
        }
        next_token = page.next_token().map(str::to_owned);
        if next_token.is_none() {
            break;
        }
    }
    match found.len() {
        0 | 1 => Ok(found.pop()),
        n => Err(format!("{n} permission sets are named {name:?}")),
    }
}

/// Splits an Entra display name into (given, family) for the identity store's required `Name`.
fn split_name(display_name: &str) -> (String, String) {
    let mut words = display_name.split_whitespace();
    let given = words.next().unwrap_or("Unknown").to_owned();
    let family = words.collect::<Vec<_>>().join(" ");
    let family = if family.is_empty() {
        given.clone()
    } else {
        family
    };
    (given, family)
}

/// Creates an identity store user with `UserName` = `user_name`, `DisplayName` = `display_name`,
/// `Name` split from the display name (moto requires both) and a primary work email equal to the
/// user name when it looks like an address. Returns the identity store user id. A duplicate user
/// name is an error (`ConflictException`).
pub async fn create_user(
    cfg: &SdkConfig,
    ic: &IdentityCenter,
    user_name: &str,
    display_name: &str,
) -> Result<String, String> {
    let (given, family) = split_name(display_name);
    let mut req = aws_sdk_identitystore::Client::new(cfg)
        .create_user()
        .identity_store_id(&ic.identity_store_id)
        .user_name(user_name)
        .display_name(display_name)
        .name(
            Name::builder()
                .given_name(given)
                .family_name(family)
                .build(),
        );
    if user_name.contains('@') {
        req = req.emails(
            Email::builder()
                .value(user_name)
                .r#type("work")
                .primary(true)
                .build(),
        );
    }
    let out = req
        .send()
        .await
        .map_err(|e| sdk_err(&format!("identitystore:CreateUser {user_name}"), e))?;
    Ok(out.user_id().to_owned())
}

/// Creates an identity store group with this display name and returns its id. A duplicate display
/// name is an error (`ConflictException`).
pub async fn create_group(
    cfg: &SdkConfig,
    ic: &IdentityCenter,
    display_name: &str,
) -> Result<String, String> {
    let out = aws_sdk_identitystore::Client::new(cfg)
        .create_group()
        .identity_store_id(&ic.identity_store_id)
        .display_name(display_name)
        .send()
        .await
        .map_err(|e| sdk_err(&format!("identitystore:CreateGroup {display_name}"), e))?;
    Ok(out.group_id().to_owned())
}

/// Adds user `user_id` to group `group_id` (`CreateGroupMembership`) and returns the membership id.
/// moto accepts duplicates (AWS refuses them); check [`group_members`] first if that matters.
pub async fn add_member(
    cfg: &SdkConfig,
    ic: &IdentityCenter,
    group_id: &str,
    user_id: &str,
) -> Result<String, String> {
    let out = aws_sdk_identitystore::Client::new(cfg)
        .create_group_membership()
        .identity_store_id(&ic.identity_store_id)
        .group_id(group_id)
        .member_id(MemberId::UserId(user_id.to_owned()))
        .send()
        .await
        .map_err(|e| {
            sdk_err(
                &format!("identitystore:CreateGroupMembership group {group_id} user {user_id}"),
                e,
            )
        })?;
    Ok(out.membership_id().to_owned())
}

/// The user ids that are direct members of group `group_id` (`ListGroupMemberships`, paged).
pub async fn group_members(
    cfg: &SdkConfig,
    ic: &IdentityCenter,
    group_id: &str,
) -> Result<BTreeSet<String>, String> {
    let ids = aws_sdk_identitystore::Client::new(cfg);
    let mut members = BTreeSet::new();
    let mut next_token = None;
    loop {
        let page = ids
            .list_group_memberships()
            .identity_store_id(&ic.identity_store_id)
            .group_id(group_id)
            .set_next_token(next_token)
            .send()
            .await
            .map_err(|e| sdk_err(&format!("identitystore:ListGroupMemberships {group_id}"), e))?;
        for m in page.group_memberships() {
            if let Some(MemberId::UserId(u)) = m.member_id() {
                members.insert(u.clone());
            }
        }
        next_token = page.next_token().map(str::to_owned);
        if next_token.is_none() {
            break;
        }
    }
    Ok(members)
}

/// Deletes identity store user `user_id`, as SCIM deprovisioning would. moto leaves the user's group
/// memberships behind and does not complain about an unknown id.
pub async fn delete_user(
    cfg: &SdkConfig,
    ic: &IdentityCenter,
    user_id: &str,
) -> Result<(), String> {
    aws_sdk_identitystore::Client::new(cfg)
        .delete_user()
        .identity_store_id(&ic.identity_store_id)
        .user_id(user_id)
        .send()
        .await
        .map_err(|e| sdk_err(&format!("identitystore:DeleteUser {user_id}"), e))?;
    Ok(())
}

/// Every user of the identity store as user name → user id (`ListUsers`, paged).
pub async fn users_by_name(
    cfg: &SdkConfig,
    ic: &IdentityCenter,
) -> Result<BTreeMap<String, String>, String> {
    let ids = aws_sdk_identitystore::Client::new(cfg);
    let mut users = BTreeMap::new();
    let mut next_token = None;
    loop {
        let page = ids
            .list_users()
            .identity_store_id(&ic.identity_store_id)
            .set_next_token(next_token)
            .send()
            .await
            .map_err(|e| sdk_err("identitystore:ListUsers", e))?;
        for u in page.users() {
            if let Some(name) = u.user_name() {
                users.insert(name.to_owned(), u.user_id().to_owned());
            }
        }
        next_token = page.next_token().map(str::to_owned);
        if next_token.is_none() {
            break;
        }
    }
    Ok(users)
}

/// Every group of the identity store as display name → group id (`ListGroups`, paged).
pub async fn groups_by_name(
    cfg: &SdkConfig,
    ic: &IdentityCenter,
) -> Result<BTreeMap<String, String>, String> {
    let ids = aws_sdk_identitystore::Client::new(cfg);
    let mut groups = BTreeMap::new();
    let mut next_token = None;
    loop {
        let page = ids
            .list_groups()
            .identity_store_id(&ic.identity_store_id)
            .set_next_token(next_token)
            .send()
            .await
            .map_err(|e| sdk_err("identitystore:ListGroups", e))?;
        for g in page.groups() {
            if let Some(name) = g.display_name() {
                groups.insert(name.to_owned(), g.group_id().to_owned());
            }
        }
        next_token = page.next_token().map(str::to_owned);
        if next_token.is_none() {
            break;
        }
    }
    Ok(groups)
}

/// Simulates Entra ID's SCIM provisioning of `tenant` into the account's identity store.
///
/// - Users: every tenant user (or, with `only_users`, only those Entra ids) becomes an identity
///   store user with `UserName` = `userPrincipalName`, `DisplayName`, `Name` split from the
///   display name and a primary work email = UPN (see [`create_user`]). Disabled users are
///   provisioned too (the identity store has no "active" flag in moto).
/// - Groups: every tenant group becomes a group with `DisplayName` = its Entra display name.
/// - Memberships: only DIRECT user members that were provisioned. Nested groups are NOT
///   flattened (Entra provisioning cannot), and group members are dropped: the identity store
///   has no nested groups. Resolving nesting is the product's job.
///
/// External ids are not set (moto cannot). It is idempotent: users and groups that already exist
/// (by user name / display name) are reused and existing memberships are not duplicated.
pub async fn provision_like_scim(
    cfg: &SdkConfig,
    ic: &IdentityCenter,
    tenant: &Tenant,
    only_users: Option<&BTreeSet<String>>,
) -> Result<Provisioned, String> {
    let mut provisioned = Provisioned::default();
    let existing_users = users_by_name(cfg, ic).await?;
    let existing_groups = groups_by_name(cfg, ic).await?;
    for user in &tenant.users {
        if only_users.is_some_and(|only| !only.contains(&user.id)) {
            continue;
        }
        let upn = &user.user_principal_name;
        let id = match existing_users.get(upn) {
            Some(id) => id.clone(),
            None => create_user(cfg, ic, upn, &user.display_name).await?,
        };
        provisioned.users.insert(user.id.clone(), id);
    }
    for group in &tenant.groups {
        let name = &group.display_name;
        let group_id = match existing_groups.get(name) {
            Some(id) => id.clone(),
            None => create_group(cfg, ic, name).await?,
        };
        let mut existing = group_members(cfg, ic, &group_id).await?;
        for member in &group.members {
            // Member ids that are groups (nesting) or users outside `only_users` are skipped.
            let Some(user_id) = provisioned.users.get(member) else {
                continue;
            };
            if existing.insert(user_id.clone()) {
                add_member(cfg, ic, &group_id, user_id).await?;
            }
        }
        provisioned.groups.insert(group.id.clone(), group_id);
    }
    Ok(provisioned)
}

/// Creates an account assignment by hand, as a human would in the console: permission set
/// `permission_set_arn` on account `account_id` for principal `principal_id` of type
/// `principal_type` (`"USER"` or `"GROUP"`). Polls the creation status (bounded) until it
/// `SUCCEEDED`; `FAILED` is an error with moto's reason.
pub async fn assign_by_hand(
    cfg: &SdkConfig,
    ic: &IdentityCenter,
    account_id: &str,
    permission_set_arn: &str,
    principal_type: &str,
    principal_id: &str,
) -> Result<(), String> {
    let principal = match principal_type {
        "USER" => PrincipalType::User,
        "GROUP" => PrincipalType::Group,
        other => {
            return Err(format!(
                "principal type must be USER or GROUP, not {other:?}"
            ))
        }
    };
    let what =
        format!("{principal_type} {principal_id} / {permission_set_arn} on account {account_id}");
    let sso = aws_sdk_ssoadmin::Client::new(cfg);
    let out = sso
        .create_account_assignment()
        .instance_arn(&ic.instance_arn)
        .target_id(account_id)
        .target_type(TargetType::AwsAccount)
        .permission_set_arn(permission_set_arn)
        .principal_type(principal)
        .principal_id(principal_id)
        .send()
        .await
        .map_err(|e| sdk_err(&format!("sso-admin:CreateAccountAssignment {what}"), e))?;
    let mut status = out
        .account_assignment_creation_status()
        .ok_or_else(|| format!("sso-admin:CreateAccountAssignment {what}: no status"))?
        .clone();
    for _ in 0..POLL_ATTEMPTS {
        match status.status() {
            Some(StatusValues::Succeeded) => return Ok(()),
            Some(StatusValues::Failed) => {
                return Err(format!(
                    "account assignment {what} FAILED: {}",
                    status.failure_reason().unwrap_or("(no reason given)")
                ))
            }
            _ => {}
        }
        tokio::time::sleep(POLL_INTERVAL).await;
        let request_id = status
            .request_id()
            .ok_or_else(|| format!("sso-admin:CreateAccountAssignment {what}: no RequestId"))?
            .to_owned();
        status = sso
            .describe_account_assignment_creation_status()
            .instance_arn(&ic.instance_arn)
            .account_assignment_creation_request_id(&request_id)
            .send()
            .await
            .map_err(|e| {
                sdk_err(
                    &format!("sso-admin:DescribeAccountAssignmentCreationStatus {request_id}"),
                    e,
                )
            })?
            .account_assignment_creation_status()
            .ok_or_else(|| format!("DescribeAccountAssignmentCreationStatus {request_id}: empty"))?
            .clone();
    }
    Err(format!(
        "account assignment {what} still {:?} after polling",
        status.status()
    ))
}

/// The assignments of permission set `permission_set_arn` on account `account_id`, as
/// `(principal type "USER"|"GROUP", principal id)` (`ListAccountAssignments`, paged). A set:
/// moto stores a repeated `CreateAccountAssignment` twice, this collapses such duplicates.
pub async fn list_assignments(
    cfg: &SdkConfig,
    ic: &IdentityCenter,
    account_id: &str,
    permission_set_arn: &str,
) -> Result<BTreeSet<(String, String)>, String> {
    let sso = aws_sdk_ssoadmin::Client::new(cfg);
    let mut found = BTreeSet::new();
    let mut next_token = None;
    loop {
        let page = sso
            .list_account_assignments()
            .instance_arn(&ic.instance_arn)
            .account_id(account_id)
            .permission_set_arn(permission_set_arn)
            .set_next_token(next_token)
            .send()
            .await
            .map_err(|e| {
                sdk_err(
                    &format!(
                        "sso-admin:ListAccountAssignments {permission_set_arn} on {account_id}"
                    ),
                    e,
                )
            })?;
        for a in page.account_assignments() {
            if let (Some(t), Some(id)) = (a.principal_type(), a.principal_id()) {
                found.insert((t.as_str().to_owned(), id.to_owned()));
            }
        }
        next_token = page.next_token().map(str::to_owned);
        if next_token.is_none() {
            break;
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_ids_are_twelve_digits_and_differ() {
        let a = random_account_id();
        let b = random_account_id();
        assert_eq!(a.len(), 12);
        assert!(a.bytes().all(|c| c.is_ascii_digit()));
        assert_ne!(a, b);
    }

    #[test]
    fn names_split_into_given_and_family() {
        assert_eq!(
            split_name("Alice van der Berg"),
            ("Alice".to_owned(), "van der Berg".to_owned())
        );
        assert_eq!(split_name("Cher"), ("Cher".to_owned(), "Cher".to_owned()));
        assert_eq!(split_name(""), ("Unknown".to_owned(), "Unknown".to_owned()));
    }
}

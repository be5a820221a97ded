//! `seed-demo`: puts moto into the state a real deployment would find, for `scripts/demo`.
//!
//! Creates the state table, the permission sets `AdministratorAccess`, `ReadOnlyAccess` and
//! `BillingAccess`, provisions the tenant into the identity store the way Entra SCIM would (users,
//! groups, direct members only), and makes one assignment by hand (ReadOnlyAccess on
//! 111111111111 for one user) that entra-sso-sync must leave alone. Uses the SDK configuration
//! from the environment (moto's default account). Safe to run twice.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;

use aws_config::{BehaviorVersion, SdkConfig};
use clap::Parser;
use devstack::graph::Tenant;
use devstack::moto::{self, IdentityCenter};

const PERMISSION_SETS: [&str; 3] = ["AdministratorAccess", "ReadOnlyAccess", "BillingAccess"];
const HAND_MADE_ACCOUNT: &str = "111111111111";
const HAND_MADE_PERMISSION_SET: &str = "ReadOnlyAccess";

/// Seeds moto for the entra-sso-sync demo (needs AWS_ENDPOINT_URL pointing at moto).
#[derive(Debug, Parser)]
#[command(name = "seed-demo", about)]
struct Args {
    /// Tenant fixture JSON (the same file fake-graph serves).
    #[arg(long, value_name = "FILE")]
    tenant: PathBuf,
    /// Name of the DynamoDB state table to create.
    #[arg(long, value_name = "NAME")]
    table: String,
    /// userPrincipalName of a user NOT to provision (repeatable): Entra knows them, Identity
    /// Center does not.
    #[arg(long = "skip-user", value_name = "UPN")]
    skip_users: Vec<String>,
    /// userPrincipalName of the user who gets the hand-made ReadOnlyAccess assignment.
    #[arg(long, value_name = "UPN", default_value = "judy@contoso.example")]
    hand_made_user: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("seed-demo: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> Result<(), String> {
    if std::env::var("AWS_ENDPOINT_URL").map_or(true, |v| v.is_empty()) {
        return Err(
            "AWS_ENDPOINT_URL is not set; seed-demo only seeds a moto server \
                    (run scripts/demo, or source scripts/moto.sh first)"
                .to_owned(),
        );
    }
    let tenant = Tenant::from_json_file(&args.tenant)?;
    let cfg = aws_config::load_defaults(BehaviorVersion::latest()).await;
    let ic = moto::identity_center(&cfg).await?;

    let table = ensure_table(&cfg, &args.table).await?;

    let mut permission_sets = Vec::new();
    for name in PERMISSION_SETS {
        let (arn, created) = match moto::find_permission_set(&cfg, &ic, name).await? {
            Some(arn) => (arn, false),
            None => (moto::create_permission_set(&cfg, &ic, name).await?, true),
        };
        permission_sets.push((name, arn, created));
    }

    let mut only_users = BTreeSet::new();
    let mut skipped = Vec::new();
    for user in &tenant.users {
        if args
            .skip_users
            .iter()
            .any(|s| s.eq_ignore_ascii_case(&user.user_principal_name))
        {
            skipped.push(user.user_principal_name.clone());
        } else {
            only_users.insert(user.id.clone());
        }
    }
    for s in &args.skip_users {
        if !skipped.iter().any(|u| u.eq_ignore_ascii_case(s)) {
            return Err(format!("--skip-user {s}: no such user in the tenant"));
        }
    }
    let provisioned = moto::provision_like_scim(&cfg, &ic, &tenant, Some(&only_users)).await?;

    let hand_made = hand_made_assignment(&cfg, &ic, &tenant, args, &permission_sets).await?;

    let memberships: usize = tenant
        .groups
        .iter()
        .map(|g| {
            g.members
                .iter()
                .filter(|m| provisioned.users.contains_key(*m))
                .count()
        })
        .sum();
    let region = cfg.region().map_or("?".to_owned(), ToString::to_string);
    eprintln!("seed-demo: moto seeded like an Entra-provisioned Identity Center ({region})");
    eprintln!("  instance        {}", ic.instance_arn);
    eprintln!("  identity store  {}", ic.identity_store_id);
    eprintln!("  state table     {} ({table})", args.table);
    for (name, arn, created) in &permission_sets {
        let what = if *created { "created" } else { "exists" };
        eprintln!("  permission set  {name:<20} {arn} ({what})");
    }
    eprintln!(
        "  SCIM            {} users, {} groups, {memberships} direct memberships (nested groups not flattened)",
        provisioned.users.len(),
        provisioned.groups.len()
    );
    if !skipped.is_empty() {
        eprintln!(
            "  not provisioned {} (in Entra, not in Identity Center)",
            skipped.join(", ")
        );
    }
    eprintln!("  hand-made       {hand_made} (entra-sso-sync must leave it alone)");
    Ok(())
}

/// Creates the state table unless it exists; says which.
async fn ensure_table(cfg: &SdkConfig, name: &str) -> Result<&'static str, String> {
    let exists = aws_sdk_dynamodb::Client::new(cfg)
        .describe_table()
        .table_name(name)
        .send()
        .await;
    match exists {
        Ok(_) => Ok("exists"),
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_resource_not_found_exception()) =>
        {
            moto::create_state_table(cfg, name).await?;
            Ok("created")
        }
        Err(e) => Err(format!(
            "dynamodb:DescribeTable {name} failed: {}",
            aws_sdk_dynamodb::error::DisplayErrorContext(e)
        )),
    }
}

/// Assigns ReadOnlyAccess on 111111111111 to `--hand-made-user` unless already there.
async fn hand_made_assignment(
    cfg: &SdkConfig,
    ic: &IdentityCenter,
    tenant: &Tenant,
    args: &Args,
    permission_sets: &[(&str, String, bool)],
) -> Result<String, String> {
    let upn = &args.hand_made_user;
    if !tenant
        .users
        .iter()
        .any(|u| u.user_principal_name.eq_ignore_ascii_case(upn))
    {
        return Err(format!(
            "--hand-made-user {upn}: no such user in the tenant"
        ));
    }
    let user_id = moto::users_by_name(cfg, ic)
        .await?
        .into_iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(upn))
        .map(|(_, id)| id)
        .ok_or_else(|| format!("--hand-made-user {upn} was not provisioned (skipped?)"))?;
    let ps_arn = permission_sets
        .iter()
        .find(|(name, _, _)| *name == HAND_MADE_PERMISSION_SET)
        .map(|(_, arn, _)| arn.clone())
        .ok_or("ReadOnlyAccess permission set missing")?;
    let existing = moto::list_assignments(cfg, ic, HAND_MADE_ACCOUNT, &ps_arn).await?;
    if !existing.contains(&("USER".to_owned(), user_id.clone())) {
        moto::assign_by_hand(cfg, ic, HAND_MADE_ACCOUNT, &ps_arn, "USER", &user_id).await?;
    }
    Ok(format!(
        "{HAND_MADE_PERMISSION_SET} for {upn} on {HAND_MADE_ACCOUNT}"
    ))
}

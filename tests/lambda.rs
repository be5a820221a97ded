//! The Lambda handler ([`App::handle`], not the runtime) driven by every sample in `events/`
//! against moto and the fake Graph: the configuration is read from S3 in moto on every
//! invocation, and each test checks what its trigger reconciled and what it left alone.

mod common;

use aws_sdk_dynamodb::types::AttributeValue;
use common::*;
use entra_sso_sync::engine::Mode;
use entra_sso_sync::lambda::{
    bounded_report, classify, emf_line, Action, App, Deployment, HandlerError, RunMetrics,
    MAX_LOGGED_REPORT_BYTES, METRICS_NAMESPACE,
};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

const ADMINS_A: &str = "  - name: admins\n    entra_group: Platform Admins\n    permission_set: AdministratorAccess\n    accounts: [\"111111111111\"]\n";
const DEVS_B: &str = "  - name: devs\n    entra_group: Developers\n    permission_set: ReadOnlyAccess\n    accounts: [\"222222222222\"]\n    assign: members\n";
const KEY: &str = "config.yaml";

/// A sample event from `events/`.
fn sample(name: &str) -> Value {
    let path = format!("{}/events/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn bucket(s: &Stack) -> String {
    format!("entra-sso-sync-config-{}", s.account.account_id)
}

/// Uploads the configuration to the stack's bucket (created on first use).
async fn upload(s: &Stack, config_text: &str) {
    let s3 = aws_sdk_s3::Client::new(&s.account.sdk_config);
    let b = bucket(s);
    if s3.head_bucket().bucket(&b).send().await.is_err() {
        s3.create_bucket()
            .bucket(&b)
            .send()
            .await
            .expect("create bucket");
    }
    s3.put_object()
        .bucket(&b)
        .key(KEY)
        .body(config_text.as_bytes().to_vec().into())
        .send()
        .await
        .expect("upload the configuration");
}

/// The function as deployed: configuration in S3, client secret from the environment, the
/// engine connected on the first invocation.
async fn app(s: &Stack, rules: &str, dry_run: bool) -> App {
    upload(s, &s.config_text(rules, 20)).await;
    App::new(
        s.account.sdk_config.clone(),
        format!("s3://{}/{KEY}", bucket(s)),
        dry_run,
    )
    .with_env(|k| (k == "ENTRA_CLIENT_SECRET").then(|| SECRET.to_string()))
}

async fn handle(app: &App, event: Value) -> Value {
    app.handle(event, None).await.expect("handled")
}

/// Triggers of the runs recorded in the state table, oldest first.
async fn recorded_runs(s: &Stack) -> Vec<String> {
    let out = aws_sdk_dynamodb::Client::new(&s.account.sdk_config)
        .query()
        .table_name(TABLE)
        .key_condition_expression("pk = :pk")
        .expression_attribute_values(":pk", AttributeValue::S("RUN".into()))
        .consistent_read(true)
        .send()
        .await
        .expect("query runs");
    out.items()
        .iter()
        .map(|i| {
            i.get("trigger")
                .and_then(|t| t.as_s().ok())
                .cloned()
                .unwrap_or_default()
        })
        .collect()
}

fn outcome(report: &Value) -> &str {
    report["outcome"].as_str().unwrap_or_default()
}

fn count(report: &Value, list: &str) -> usize {
    report[list].as_array().map_or(0, Vec::len)
}

fn rule_names(report: &Value) -> Vec<&str> {
    report["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect()
}

#[test]
fn every_sample_event_is_recognised_as_its_trigger() {
    let dir = format!("{}/events", env!("CARGO_MANIFEST_DIR"));
    let mut seen = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if !name.ends_with(".json") {
            continue;
        }
        let want = match name.as_str() {
            "schedule.json" | "scheduler-default.json" => "schedule",
            "scim-create-user.json" => "scim-event:CreateUser",
            "sqs-scim-batch.json" => "sqs-batch(2 events)",
            "create-account-result.json" | "move-account.json" | "tag-account.json" => {
                "account:444455556666"
            }
            "entra-group-changed.json" => "entra-group:00000000-0000-4000-8000-000000000102",
            "s3-config-changed.json" => "config-changed",
            "manual-plan.json" => "manual",
            other => panic!("events/{other} has no expectation here: add one"),
        };
        let inv = classify(&sample(&name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(inv.trigger, want, "{name}");
        assert!(matches!(inv.action, Action::Run { .. }), "{name}: {inv:?}");
        assert!(inv.rejected.is_empty(), "{name}: {:?}", inv.rejected);
        seen.insert(name);
    }
    assert_eq!(seen.len(), 10, "{seen:?}");
}

#[tokio::test]
async fn both_schedule_events_run_a_full_apply_with_the_configuration_from_s3() {
    let s = Stack::new().await;
    let app = app(&s, &format!("{ADMINS_A}{DEVS_B}"), false).await;

    let report = handle(&app, sample("schedule.json")).await;
    assert_eq!(outcome(&report), "applied", "{report:#}");
    assert_eq!(report["trigger"], "schedule");
    assert_eq!(report["mode"], "apply");
    assert_eq!(report["target"], "all");
    assert_eq!(report["counts"]["creates"], 5);
    assert_eq!(s.assigned(ACCOUNT_A, &s.admin_ps).await, s.groups(&[110]));
    assert_eq!(
        s.assigned(ACCOUNT_B, &s.read_ps).await,
        s.users(&[3, 4, 5, 6])
    );

    // Scheduler's default notification (detail is the string "{}") is a schedule too.
    let report = handle(&app, sample("scheduler-default.json")).await;
    assert_eq!(outcome(&report), "in_sync", "{report:#}");
    assert_eq!(report["unchanged"], 5);
    assert_eq!(recorded_runs(&s).await, ["schedule", "schedule"]);
}

#[tokio::test]
async fn a_manual_plan_changes_nothing_and_reports_the_pending_changes() {
    let s = Stack::new().await;
    let app = app(&s, ADMINS_A, false).await;
    let report = handle(&app, sample("manual-plan.json")).await;
    assert_eq!(outcome(&report), "changes_pending", "{report:#}");
    assert_eq!(report["trigger"], "manual");
    assert_eq!(report["mode"], "plan");
    assert_eq!(count(&report, "creates"), 1);
    assert_eq!(report["creates"][0]["principal_name"], "Platform Admins");
    assert!(s.assigned(ACCOUNT_A, &s.admin_ps).await.is_empty());
}

#[tokio::test]
async fn a_dry_run_deployment_only_plans_whatever_the_event_asks() {
    let s = Stack::new().await;
    let config = s.config(ADMINS_A);
    // An injected engine (the test stack's, with a quick Graph backoff) is used as is.
    let app = app(&s, ADMINS_A, true)
        .await
        .with_engine(s.engine(&config).await);
    for event in [
        sample("schedule.json"),
        json!({"action": "apply", "allow_deletions": 3}),
    ] {
        let report = handle(&app, event).await;
        assert_eq!(report["mode"], "plan", "{report:#}");
        assert_eq!(outcome(&report), "changes_pending");
    }
    assert!(s.assigned(ACCOUNT_A, &s.admin_ps).await.is_empty());
}

#[tokio::test]
async fn a_manual_apply_with_allow_deletions_confirms_what_the_guard_held() {
    let s = Stack::new().await;
    let app_devs = app(&s, DEVS_B, false).await;
    handle(&app_devs, sample("schedule.json")).await;
    // The rule goes away and four deletions exceed a cap of 3.
    upload(&s, &s.config_text(ADMINS_A, 3)).await;
    let report = handle(&app_devs, sample("schedule.json")).await;
    assert_eq!(outcome(&report), "guarded", "{report:#}");
    assert_eq!(count(&report, "held"), 4);
    assert_eq!(s.assigned(ACCOUNT_B, &s.read_ps).await.len(), 4);

    let report = handle(&app_devs, json!({"action": "apply", "allow_deletions": 4})).await;
    assert_eq!(outcome(&report), "applied", "{report:#}");
    assert!(s.assigned(ACCOUNT_B, &s.read_ps).await.is_empty());
}

const PROD_OU: &str = "  - name: prod\n    entra_group: Platform Admins\n    permission_set: AdministratorAccess\n    organizational_units: [Root/Workloads/Prod]\n";
const SANDBOX_OU: &str = "  - name: sandbox\n    entra_group: Developers\n    permission_set: ReadOnlyAccess\n    organizational_units: [Root/Sandbox]\n";

/// Accounts (by fixture name) where the admins group holds AdministratorAccess.
async fn granted(s: &Stack, org: &Org) -> BTreeSet<&'static str> {
    let mut out = BTreeSet::new();
    for (name, id) in &org.accounts {
        if s.assigned(id, &s.admin_ps)
            .await
            .contains(&("GROUP".to_string(), s.group_id(110)))
        {
            out.insert(*name);
        }
    }
    out
}

fn create_account_result(id: &str, state: &str) -> Value {
    let mut event = sample("create-account-result.json");
    let status = &mut event["detail"]["serviceEventDetails"]["createAccountStatus"];
    status["accountId"] = json!(id);
    status["state"] = json!(state);
    if state != "SUCCEEDED" {
        if let Value::Object(m) = status {
            m.remove("accountId");
            m.insert("failureReason".into(), json!("EMAIL_ALREADY_EXISTS"));
        }
    }
    event
}

#[tokio::test]
async fn a_new_account_in_an_ou_scope_gets_only_its_own_assignments() {
    let s = Stack::new().await;
    let mut org = Org::new(&s).await;
    let app = app(&s, PROD_OU, false).await;
    handle(&app, sample("schedule.json")).await;
    let before = granted(&s, &org).await;
    assert_eq!(before.len(), 4, "{before:?}");

    let new = org.create_account("Prod New", "Payments").await;
    let report = handle(&app, create_account_result(&new, "SUCCEEDED")).await;
    assert_eq!(outcome(&report), "applied", "{report:#}");
    assert_eq!(report["trigger"], format!("account:{new}"));
    assert_eq!(report["target"]["only"]["accounts"], json!([new]));
    assert_eq!(count(&report, "creates"), 1);
    assert_eq!(report["creates"][0]["account_id"], new.as_str());
    assert_eq!(
        report["unchanged"], 0,
        "the other accounts were not even read"
    );
    let mut after = before.clone();
    after.insert("Prod New");
    assert_eq!(granted(&s, &org).await, after);
}

#[tokio::test]
async fn an_account_creation_that_did_not_succeed_runs_nothing() {
    let s = Stack::new().await;
    let app = app(&s, ADMINS_A, false).await;
    for state in ["IN_PROGRESS", "FAILED"] {
        let report = handle(&app, create_account_result("444455556666", state)).await;
        assert_eq!(outcome(&report), "skipped", "{report:#}");
        assert!(
            report["reason"].as_str().unwrap().contains(state),
            "{report:#}"
        );
    }
    assert!(recorded_runs(&s).await.is_empty(), "no run was made");
    assert!(s.graph.requests().is_empty(), "nothing was even read");
    assert!(s.assigned(ACCOUNT_A, &s.admin_ps).await.is_empty());
}

#[tokio::test]
async fn a_moved_account_loses_its_old_scope_and_gains_the_new_one() {
    let s = Stack::new().await;
    let org = Org::new(&s).await;
    let app = app(&s, &format!("{PROD_OU}{SANDBOX_OU}"), false).await;
    handle(&app, sample("schedule.json")).await;
    let deep = org.accounts["Deep One"].clone();
    assert!(granted(&s, &org).await.contains("Deep One"));

    org.move_account(&deep, &org.ous["Deep"], &org.ous["Sandbox"])
        .await;
    let mut event = sample("move-account.json");
    event["detail"]["requestParameters"]["accountId"] = json!(deep);
    let report = handle(&app, event).await;
    assert_eq!(outcome(&report), "applied", "{report:#}");
    assert_eq!(report["trigger"], format!("account:{deep}"));
    assert_eq!(count(&report, "deletes"), 1, "{report:#}");
    assert_eq!(report["deletes"][0]["account_id"], deep.as_str());
    assert_eq!(report["deletes"][0]["rule"], "prod");
    assert_eq!(count(&report, "creates"), 1, "{report:#}");
    assert_eq!(report["creates"][0]["account_id"], deep.as_str());
    assert_eq!(report["creates"][0]["rule"], "sandbox");
    assert!(!granted(&s, &org).await.contains("Deep One"));
    assert_eq!(s.assigned(&deep, &s.read_ps).await, s.groups(&[100]));
    // Only the moved account was touched: a full run finds nothing else to do.
    let report = handle(&app, sample("manual-plan.json")).await;
    assert_eq!(outcome(&report), "in_sync", "{report:#}");
}

#[tokio::test]
async fn a_retagged_account_gains_the_access_its_new_tags_grant() {
    let s = Stack::new().await;
    let org = Org::new(&s).await;
    let rule = "  - name: production\n    entra_group: Platform Admins\n    permission_set: AdministratorAccess\n    account_tags: {environment: production}\n";
    let app = app(&s, rule, false).await;
    org.tag("Prod Web", "environment", "production").await;
    handle(&app, sample("schedule.json")).await;
    assert_eq!(granted(&s, &org).await, BTreeSet::from(["Prod Web"]));

    org.tag("Sandbox Dev", "environment", "production").await;
    let sandbox = org.accounts["Sandbox Dev"].clone();
    let mut event = sample("tag-account.json");
    event["detail"]["requestParameters"]["resourceId"] = json!(sandbox);
    let report = handle(&app, event).await;
    assert_eq!(outcome(&report), "applied", "{report:#}");
    assert_eq!(count(&report, "creates"), 1);
    assert_eq!(report["creates"][0]["account_id"], sandbox.as_str());
    assert_eq!(report["unchanged"], 0);
    assert_eq!(
        granted(&s, &org).await,
        BTreeSet::from(["Prod Web", "Sandbox Dev"])
    );
}

fn group_changed(n: u32) -> Value {
    let mut event = sample("entra-group-changed.json");
    event["detail"]["group_id"] = json!(oid(n));
    event
}

#[tokio::test]
async fn a_change_to_a_nested_group_reconciles_only_the_rules_whose_group_contains_it() {
    let s = Stack::new().await;
    let app = app(&s, &format!("{ADMINS_A}{DEVS_B}"), false).await;
    // The sample names Payments Oncall (102), three levels inside Developers (100).
    assert_eq!(
        sample("entra-group-changed.json")["detail"]["group_id"],
        oid(102)
    );

    let report = handle(&app, sample("entra-group-changed.json")).await;
    assert_eq!(outcome(&report), "applied", "{report:#}");
    assert_eq!(report["trigger"], format!("entra-group:{}", oid(102)));
    assert_eq!(rule_names(&report), ["devs"]);
    assert_eq!(
        s.assigned(ACCOUNT_B, &s.read_ps).await,
        s.users(&[3, 4, 5, 6])
    );
    assert!(
        s.assigned(ACCOUNT_A, &s.admin_ps).await.is_empty(),
        "the admins rule was not reconciled"
    );

    // A group no rule reaches reconciles nothing.
    let report = handle(&app, group_changed(120)).await;
    assert!(rule_names(&report).is_empty(), "{report:#}");
    assert_eq!(outcome(&report), "in_sync");
    assert!(s.assigned(ACCOUNT_A, &s.admin_ps).await.is_empty());

    let report = handle(&app, group_changed(110)).await;
    assert_eq!(rule_names(&report), ["admins"]);
    assert_eq!(s.assigned(ACCOUNT_A, &s.admin_ps).await, s.groups(&[110]));
}

#[tokio::test]
async fn an_unknown_event_is_an_error_and_nothing_is_read_or_changed() {
    let s = Stack::new().await;
    let app = app(&s, ADMINS_A, false).await;
    let ec2 = json!({
        "version": "0",
        "detail-type": "EC2 Instance State-change Notification",
        "source": "aws.ec2",
        "detail": {"instance-id": "i-0123456789abcdef0", "state": "running"},
    });
    for event in [
        json!({"hello": "world"}),
        ec2,
        json!("plan"),
        json!({"action": "destroy"}),
    ] {
        let err = app.handle(event.clone(), None).await.unwrap_err();
        assert!(matches!(err, HandlerError::Event(_)), "{event}: {err}");
        assert_eq!(err.kind(), "UnrecognisedEvent");
        assert!(err.to_string().contains("nothing was changed"), "{err}");
    }
    assert!(recorded_runs(&s).await.is_empty());
    assert!(s.graph.requests().is_empty());
    assert!(s.assigned(ACCOUNT_A, &s.admin_ps).await.is_empty());
}

/// An SQS event holding `n` SCIM CloudTrail events, as the queue delivers a provisioning burst.
fn scim_burst(n: usize) -> Value {
    let scim = sample("scim-create-user.json");
    let names = [
        "CreateUser",
        "PatchUser",
        "PutUser",
        "CreateGroup",
        "PatchGroup",
        "DeleteUser",
    ];
    let records: Vec<Value> = (0..n)
        .map(|i| {
            let mut event = scim.clone();
            event["id"] = json!(format!("00000000-0000-4000-9000-{i:012}"));
            event["detail"]["eventName"] = json!(names[i % names.len()]);
            json!({
                "messageId": format!("10000000-0000-4000-8000-{i:012}"),
                "receiptHandle": "AQEB",
                "body": event.to_string(),
                "attributes": {"ApproximateReceiveCount": "1"},
                "messageAttributes": {},
                "md5OfBody": "0",
                "eventSource": "aws:sqs",
                "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:entra-sso-sync-IdentityEvents",
                "awsRegion": "us-east-1",
            })
        })
        .collect();
    json!({ "Records": records })
}

#[tokio::test]
async fn a_burst_of_500_scim_events_in_one_sqs_batch_is_exactly_one_reconcile() {
    let s = Stack::new().await;
    let app = app(&s, &format!("{ADMINS_A}{DEVS_B}"), false).await;
    handle(&app, sample("sqs-scim-batch.json")).await;
    assert_eq!(recorded_runs(&s).await, ["sqs-batch(2 events)"]);
    assert_eq!(
        s.assigned(ACCOUNT_B, &s.read_ps).await,
        s.users(&[3, 4, 5, 6])
    );

    // A provisioning cycle: erin leaves Payments Oncall, then SCIM reports 500 changes.
    s.graph.with_tenant(|t| {
        let g = t.groups.iter_mut().find(|g| g.id == oid(102)).unwrap();
        g.members.retain(|m| *m != oid(5));
    });
    s.graph.clear_requests();
    let report = handle(&app, scim_burst(500)).await;
    assert_eq!(report["trigger"], "sqs-batch(500 events)");
    assert_eq!(outcome(&report), "applied", "{report:#}");
    assert_eq!(
        recorded_runs(&s).await,
        ["sqs-batch(2 events)", "sqs-batch(500 events)"],
        "one run for the whole burst"
    );
    // Graph is read by one delta round per stream, whatever the number of events.
    let reads: Vec<String> = s
        .graph
        .requests()
        .iter()
        .map(|r| {
            r.path_and_query
                .split('?')
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .filter(|p| !p.contains("token"))
        .collect();
    assert_eq!(
        reads,
        ["/v1.0/groups/delta", "/v1.0/users/delta"],
        "one delta round per stream for the whole burst"
    );
    assert_eq!(count(&report, "deletes"), 1);
    assert_eq!(s.assigned(ACCOUNT_B, &s.read_ps).await, s.users(&[3, 4, 6]));
    assert_eq!(s.assigned(ACCOUNT_A, &s.admin_ps).await, s.groups(&[110]));
}

#[tokio::test]
async fn an_uploaded_configuration_is_what_the_next_invocation_applies() {
    let s = Stack::new().await;
    let app = app(&s, ADMINS_A, false).await;
    handle(&app, sample("schedule.json")).await;
    assert_eq!(s.assigned(ACCOUNT_A, &s.admin_ps).await, s.groups(&[110]));

    upload(&s, &s.config_text(DEVS_B, 20)).await;
    let mut event = sample("s3-config-changed.json");
    event["detail"]["bucket"]["name"] = json!(bucket(&s));
    let report = handle(&app, event).await;
    assert_eq!(report["trigger"], "config-changed");
    assert_eq!(outcome(&report), "applied", "{report:#}");
    assert!(
        s.assigned(ACCOUNT_A, &s.admin_ps).await.is_empty(),
        "rule removed"
    );
    assert_eq!(
        s.assigned(ACCOUNT_B, &s.read_ps).await,
        s.users(&[3, 4, 5, 6])
    );
}

#[tokio::test]
async fn an_invalid_configuration_is_an_error_and_changes_nothing() {
    let s = Stack::new().await;
    let app = app(&s, ADMINS_A, false).await;
    upload(&s, "version: 1\nentra: {}\n").await;
    let err = app.handle(sample("schedule.json"), None).await.unwrap_err();
    assert!(matches!(err, HandlerError::Config(_)), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("s3://{}/{KEY}", bucket(&s))),
        "{err}"
    );
    assert!(recorded_runs(&s).await.is_empty());
}

fn guid(s: &str) -> entra_sso_sync::model::Guid {
    entra_sso_sync::model::Guid::try_from(s.to_string()).unwrap()
}

#[tokio::test]
async fn the_deployment_pins_tenant_and_instance_and_lowers_the_deletion_cap() {
    let s = Stack::new().await;
    let pinned = Deployment {
        tenant_id: Some(guid(TENANT_ID)),
        client_id: Some(guid(CLIENT_ID)),
        instance_arn: Some(s.ic.instance_arn.clone().try_into().unwrap()),
        identity_store_id: Some(s.ic.identity_store_id.clone().try_into().unwrap()),
        max_deletions: Some(3),
    };
    let app = app(&s, DEVS_B, false).await.with_deployment(pinned.clone());
    let report = handle(&app, sample("schedule.json")).await;
    assert_eq!(outcome(&report), "applied", "{report:#}");
    assert_eq!(s.assigned(ACCOUNT_B, &s.read_ps).await.len(), 4);

    // The configuration allows 20 deletions; the deployment's ceiling of 3 holds all four.
    upload(&s, &s.config_text(ADMINS_A, 20)).await;
    let report = handle(&app, sample("schedule.json")).await;
    assert_eq!(outcome(&report), "guarded", "{report:#}");
    assert_eq!(report["guard"]["limit"], 3, "{report:#}");
    assert_eq!(s.assigned(ACCOUNT_B, &s.read_ps).await.len(), 4);

    // A configuration for another tenant is refused before anything is read.
    let runs = recorded_runs(&s).await.len();
    let elsewhere = Deployment {
        tenant_id: Some(guid("99999999-2222-3333-4444-555555555555")),
        ..pinned
    };
    let app = app_with(&s, elsewhere);
    let err = app.handle(sample("schedule.json"), None).await.unwrap_err();
    assert!(matches!(err, HandlerError::Mismatch { .. }), "{err}");
    assert!(err.to_string().contains("ENTRA_TENANT_ID"), "{err}");
    assert_eq!(recorded_runs(&s).await.len(), runs);
}

/// An app over the configuration already uploaded.
fn app_with(s: &Stack, deployment: Deployment) -> App {
    App::new(
        s.account.sdk_config.clone(),
        format!("s3://{}/{KEY}", bucket(s)),
        false,
    )
    .with_env(|k| (k == "ENTRA_CLIENT_SECRET").then(|| SECRET.to_string()))
    .with_deployment(deployment)
}

#[tokio::test]
async fn a_report_too_large_for_one_log_line_is_cut_down_to_its_counts() {
    let s = Stack::new().await;
    let report = s
        .run(&s.config(&format!("{ADMINS_A}{DEVS_B}")), Mode::Plan)
        .await;
    let full = bounded_report(&report, MAX_LOGGED_REPORT_BYTES);
    assert_eq!(count(&full, "creates"), 5);
    assert_eq!(full["counts"]["creates"], 5);
    assert!(full.get("omitted").is_none());

    let cut = bounded_report(&report, 900);
    assert!(cut.to_string().len() <= 900, "{cut}");
    assert!(cut.get("creates").is_none(), "{cut}");
    assert_eq!(cut["omitted"]["creates"], 5, "{cut}");
    assert_eq!(cut["counts"]["creates"], 5);
    assert_eq!(cut["outcome"], "changes_pending");
    assert_eq!(cut["run_id"], full["run_id"]);
}

#[tokio::test]
async fn a_lambda_deadline_already_reached_defers_every_change() {
    let s = Stack::new().await;
    let app = app(&s, DEVS_B, false).await;
    let report = app
        .handle(sample("schedule.json"), Some(std::time::Instant::now()))
        .await
        .unwrap();
    assert_eq!(outcome(&report), "partial", "{report:#}");
    assert_eq!(report["deferred"], 4);
    assert!(s.assigned(ACCOUNT_B, &s.read_ps).await.is_empty());
    let report = handle(&app, sample("schedule.json")).await;
    assert_eq!(outcome(&report), "applied");
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn the_report_is_logged_once_as_json_and_no_output_holds_a_secret() {
    let s = Stack::new().await;
    let app = app(&s, &format!("{ADMINS_A}{DEVS_B}"), false).await;
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone())
        .finish();
    // A current-thread runtime: every task of the run logs through this subscriber.
    let response = {
        let _guard = tracing::subscriber::set_default(subscriber);
        handle(&app, sample("schedule.json")).await
    };
    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    let reports: Vec<&Value> = lines
        .iter()
        .filter(|l| l["fields"]["message"] == "run report")
        .collect();
    assert_eq!(reports.len(), 1, "{logs}");
    let logged: Value =
        serde_json::from_str(reports[0]["fields"]["report"].as_str().unwrap()).unwrap();
    assert_eq!(logged["run_id"], response["run_id"]);
    assert_eq!(logged["counts"]["creates"], 5);

    let tokens = s.graph.issued_tokens();
    assert!(!tokens.is_empty(), "the run did talk to Graph");
    let response_text = response.to_string();
    for text in [&logs, &response_text] {
        assert!(!text.contains(SECRET), "the client secret leaked");
        for t in &tokens {
            assert!(!text.contains(t.as_str()), "an access token leaked");
        }
    }
}

#[tokio::test]
async fn the_emf_line_carries_the_run_metrics_and_no_secret() {
    let s = Stack::new().await;
    let config = s.config(&format!("{ADMINS_A}{DEVS_B}"));
    let report = s.run(&config, Mode::Apply).await;
    let line = emf_line(&report, "entra-sso-sync-Function", 1_795_867_331_000);
    assert!(!line.contains('\n'), "one line");
    let emf: Value = serde_json::from_str(&line).unwrap();
    let directive = &emf["_aws"]["CloudWatchMetrics"][0];
    assert_eq!(directive["Namespace"], METRICS_NAMESPACE);
    assert_eq!(directive["Dimensions"], json!([["FunctionName"]]));
    let names: Vec<&str> = directive["Metrics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["Name"].as_str().unwrap())
        .collect();
    for name in [
        "AssignmentsCreated",
        "AssignmentsDeleted",
        "AssignmentsFailed",
        "UnresolvedMembers",
        "DriftFound",
        "GuardTrips",
        "RunDuration",
    ] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
        assert!(emf[name].is_u64(), "{name} has no value: {line}");
    }
    assert_eq!(emf["_aws"]["Timestamp"], 1_795_867_331_000u64);
    assert_eq!(emf["FunctionName"], "entra-sso-sync-Function");
    assert_eq!(emf["AssignmentsCreated"], 5);
    assert_eq!(emf["DriftFound"], 5);
    assert_eq!(emf["GuardTrips"], 0);
    assert_eq!(emf["Outcome"], "applied");
    assert_eq!(RunMetrics::of(&report).assignments_created, 5);

    // The guard trips: no deletion, GuardTrips 1, drift still counted.
    let capped =
        entra_sso_sync::config::Config::parse(&s.config_text(ADMINS_A, 3), "t.yaml").unwrap();
    let guarded = s.run(&capped, Mode::Apply).await;
    let emf: Value = serde_json::from_str(&emf_line(&guarded, "f", 0)).unwrap();
    assert_eq!(emf["GuardTrips"], 1, "{emf}");
    assert_eq!(emf["AssignmentsDeleted"], 0);
    assert_eq!(emf["DriftFound"], 4);
    assert_eq!(emf["Outcome"], "guarded");

    let logged = bounded_report(&report, MAX_LOGGED_REPORT_BYTES).to_string();
    for text in [&line, &logged] {
        assert!(!text.contains(SECRET));
        for t in s.graph.issued_tokens() {
            assert!(!text.contains(t.as_str()));
        }
    }
}

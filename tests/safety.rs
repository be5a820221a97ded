//! The guards before any deletion, the apply lease, and secrets, against moto and the fake
//! Graph. Each test fails if its guard is removed.

mod common;

use aws_sdk_dynamodb::types::AttributeValue;
use common::*;
use entra_sso_sync::config::Config;
use entra_sso_sync::engine::{EngineError, Mode};
use entra_sso_sync::report::Outcome;
use entra_sso_sync::state::epoch_seconds;

const DEVS_MEMBERS: &str = "  - name: devs\n    entra_group: Developers\n    permission_set: ReadOnlyAccess\n    accounts: [\"111111111111\", \"222222222222\"]\n    assign: members\n";
const ADMINS: &str = "  - name: admins\n    entra_group: Platform Admins\n    permission_set: AdministratorAccess\n    accounts: [\"111111111111\"]\n";

fn with_safety(s: &Stack, rules: &str, safety: &str) -> Config {
    let text = s.config_text(rules, 20).replace(
        "safety:\n  max_deletions: 20\n",
        &format!("safety:\n{safety}"),
    );
    Config::parse(&text, "t.yaml").unwrap()
}

#[tokio::test]
async fn the_ratio_guard_holds_a_run_that_deletes_too_large_a_share() {
    let s = Stack::new().await;
    // 8 owned assignments (4 users × 2 accounts) plus 1.
    s.run(&s.config(&format!("{DEVS_MEMBERS}{ADMINS}")), Mode::Apply)
        .await;
    let config = with_safety(
        &s,
        ADMINS,
        "  max_deletions: 100\n  max_deletion_ratio: 0.5\n",
    );
    let report = s.try_run(&config, Mode::Apply, None).await.unwrap();
    assert_eq!(report.outcome, Outcome::Guarded, "{}", report.to_text());
    let guard = report.guard.unwrap();
    assert_eq!(
        (guard.guard, guard.limit, guard.wanted),
        ("max_deletion_ratio", 4, 8)
    );
    assert_eq!(s.assigned(ACCOUNT_B, &s.read_ps).await.len(), 4);

    // Five or fewer deletions are never blocked by the ratio alone.
    let config = with_safety(
        &s,
        &format!("{ADMINS}{}", DEVS_MEMBERS.replace("\"111111111111\", ", "")),
        "  max_deletion_ratio: 0.01\n",
    );
    let report = s.try_run(&config, Mode::Apply, None).await.unwrap();
    assert_eq!(report.outcome, Outcome::Applied, "{}", report.to_text());
    assert_eq!(report.deletes.len(), 4);
}

#[tokio::test]
async fn protected_accounts_and_principals_are_never_deleted() {
    let s = Stack::new().await;
    s.run(&s.config(&format!("{DEVS_MEMBERS}{ADMINS}")), Mode::Apply)
        .await;
    let config = with_safety(
        &s,
        "  - name: other\n    entra_group: Auditors\n    permission_set: ReadOnlyAccess\n    accounts: [\"222222222222\"]\n",
        "  max_deletions: 100\n  max_deletion_ratio: 1\n  protected:\n    accounts: [\"111111111111\"]\n    principals: [\"DAVE@contoso.example\"]\n",
    );
    let report = s.try_run(&config, Mode::Apply, None).await.unwrap();
    // Account A keeps everything; on account B only dave (protected by name) stays.
    assert_eq!(
        s.assigned(ACCOUNT_A, &s.read_ps).await,
        s.users(&[3, 4, 5, 6])
    );
    assert_eq!(s.assigned(ACCOUNT_A, &s.admin_ps).await, s.groups(&[110]));
    let mut want = s.users(&[4]);
    want.extend(s.groups(&[120]));
    assert_eq!(s.assigned(ACCOUNT_B, &s.read_ps).await, want);
    assert_eq!(
        report
            .held
            .iter()
            .filter(|h| h.reason.contains("protected"))
            .count(),
        6
    );
}

#[tokio::test]
async fn a_name_that_now_means_another_group_is_held_not_granted() {
    let s = Stack::new().await;
    let config = s.config(ADMINS);
    s.run(&config, Mode::Apply).await;
    // Platform Admins is deleted and a new group takes its name.
    s.graph.with_tenant(|t| {
        let g = t
            .groups
            .iter_mut()
            .find(|g| g.display_name == "Platform Admins")
            .unwrap();
        g.id = oid(999);
        g.members = vec![oid(3)];
    });
    let report = s.run(&config, Mode::Apply).await;
    assert_eq!(report.outcome, Outcome::Failed);
    let held = report.rules[0].held.as_ref().unwrap();
    assert!(
        held.contains(&oid(999)) && held.contains(&oid(110)),
        "{held}"
    );
    assert_eq!(
        s.assigned(ACCOUNT_A, &s.admin_ps).await,
        s.groups(&[110]),
        "nothing deleted"
    );

    // The operator confirms by naming the new object id once; the pin moves, and the name
    // is trusted again.
    let by_id = s.config(&ADMINS.replace("Platform Admins", &oid(999)));
    let report = s.run(&by_id, Mode::Apply).await;
    assert!(report.rules[0].held.is_none(), "{}", report.to_text());
    let report = s.run(&config, Mode::Plan).await;
    assert!(report.rules[0].held.is_none(), "{}", report.to_text());
}

#[tokio::test]
async fn a_members_group_that_empties_holds_its_deletions_until_confirmed() {
    let s = Stack::new().await;
    let config = s.config(DEVS_MEMBERS);
    s.run(&config, Mode::Apply).await;
    s.empty_developers();
    let report = s.run(&config, Mode::Apply).await;
    assert_eq!(report.outcome, Outcome::Guarded);
    assert_eq!(report.held.len(), 8);
    assert!(
        report.held[0].reason.contains("no members now"),
        "{}",
        report.held[0].reason
    );
    assert_eq!(s.assigned(ACCOUNT_B, &s.read_ps).await.len(), 4);
    let report = s.try_run(&config, Mode::Apply, Some(8)).await.unwrap();
    assert_eq!(report.outcome, Outcome::Applied);
    assert!(s.assigned(ACCOUNT_B, &s.read_ps).await.is_empty());
}

async fn put_lease(s: &Stack, holder: &str, expires_at: u64) {
    aws_sdk_dynamodb::Client::new(&s.account.sdk_config)
        .put_item()
        .table_name(TABLE)
        .item("pk", AttributeValue::S("LEASE".into()))
        .item("sk", AttributeValue::S("apply".into()))
        .item("holder", AttributeValue::S(holder.into()))
        .item("expires_at", AttributeValue::N(expires_at.to_string()))
        .send()
        .await
        .unwrap();
}

#[tokio::test]
async fn a_live_lease_stops_a_second_apply_and_an_expired_one_does_not() {
    let s = Stack::new().await;
    let config = s.config(ADMINS);
    put_lease(&s, "run-of-someone-else", epoch_seconds() + 45).await;
    let err = s.try_run(&config, Mode::Apply, None).await.unwrap_err();
    assert!(matches!(err, EngineError::Busy { .. }), "{err}");
    assert!(err.to_string().contains("run-of-someone-else"), "{err}");
    assert!(
        s.assigned(ACCOUNT_A, &s.admin_ps).await.is_empty(),
        "the loser changed nothing"
    );
    // A plan needs no lease.
    assert_eq!(
        s.run(&config, Mode::Plan).await.outcome,
        Outcome::ChangesPending
    );

    // The holder died a minute ago: its lease has expired.
    put_lease(&s, "run-that-crashed", epoch_seconds() - 1).await;
    let report = s.run(&config, Mode::Apply).await;
    assert_eq!(report.outcome, Outcome::Applied);
    // And the lease is released at the end.
    let lease = aws_sdk_dynamodb::Client::new(&s.account.sdk_config)
        .get_item()
        .table_name(TABLE)
        .key("pk", AttributeValue::S("LEASE".into()))
        .key("sk", AttributeValue::S("apply".into()))
        .send()
        .await
        .unwrap();
    assert!(lease.item.is_none());
}

#[tokio::test]
async fn no_secret_or_token_reaches_the_state_table() {
    let s = Stack::new().await;
    s.run(&s.config(&format!("{DEVS_MEMBERS}{ADMINS}")), Mode::Apply)
        .await;
    let items = aws_sdk_dynamodb::Client::new(&s.account.sdk_config)
        .scan()
        .table_name(TABLE)
        .send()
        .await
        .unwrap()
        .items
        .unwrap_or_default();
    assert!(items.len() > 8, "the ledger and the run record are there");
    let dump = format!("{items:?}");
    assert!(!dump.contains(SECRET));
    let tokens = s.graph.issued_tokens();
    assert!(!tokens.is_empty());
    for t in tokens {
        assert!(!dump.contains(&t));
    }
}

#[tokio::test]
async fn malformed_graph_answers_change_nothing() {
    for (path, status, body) in [
        (
            "groups/delta",
            200,
            "{\"value\": [{\"id\": \"x\", \"userPrincipalName\"",
        ),
        (
            "groups/delta",
            200,
            "{\"value\": [{\"userPrincipalName\": \"no-id@x\"}]}",
        ),
        ("groups/delta", 200, "{\"value\": {\"not\": \"a list\"}}"),
        (
            "groups/delta",
            200,
            "{\"value\": [], \"@odata.nextLink\": \"https://evil.example/steal\"}",
        ),
        ("/groups", 200, "[]"),
    ] {
        let s = Stack::new().await;
        let config = s.config(&format!("{DEVS_MEMBERS}{ADMINS}"));
        s.run(&config, Mode::Apply).await;
        s.graph
            .with_tenant(|t| t.groups.iter_mut().for_each(|g| g.members.clear()));
        s.graph
            .inject(devstack::graph::Fault::new(path, status).body(body));
        let err = s
            .try_run(&config, Mode::Apply, Some(100))
            .await
            .unwrap_err();
        assert!(
            matches!(err, EngineError::Directory(_)),
            "{path} {body}: {err}"
        );
        assert_eq!(s.assigned(ACCOUNT_B, &s.read_ps).await.len(), 4, "{body}");
    }
}

/// The ledger as stored: (assignment key, pending).
async fn ledger_items(s: &Stack) -> Vec<(String, bool)> {
    let items = aws_sdk_dynamodb::Client::new(&s.account.sdk_config)
        .query()
        .table_name(TABLE)
        .key_condition_expression("pk = :pk")
        .expression_attribute_values(":pk", AttributeValue::S("OWNED".into()))
        .send()
        .await
        .unwrap()
        .items
        .unwrap_or_default();
    items
        .iter()
        .map(|i| {
            let sk = i["sk"].as_s().unwrap().clone();
            let pending = matches!(i.get("pending"), Some(AttributeValue::Bool(true)));
            (sk, pending)
        })
        .collect()
}

/// Every ReadOnlyAccess assignment on these accounts, as ledger sort keys.
async fn assigned_keys(s: &Stack, accounts: &[String]) -> Vec<String> {
    let mut keys = Vec::new();
    for a in accounts {
        for (t, p) in s.assigned(a, &s.read_ps).await {
            keys.push(format!("{a}#{}#{t}#{p}", s.read_ps));
        }
    }
    keys.sort();
    keys
}

#[tokio::test]
async fn killed_mid_apply_again_and_again_the_next_run_converges_and_the_ledger_stays_true() {
    use aws_credential_types::provider::ProvideCredentials;
    let s = Stack::new().await;
    let accounts: Vec<String> = (1..=8).map(|n| format!("\"{:012}\"", 100 + n)).collect();
    let rules = DEVS_MEMBERS.replace("\"111111111111\", \"222222222222\"", &accounts.join(", "));
    let dir = std::env::temp_dir().join(format!("ess-kill-{}", s.account.account_id));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("c.yaml");
    std::fs::write(&path, s.config_text(&rules, 100)).unwrap();
    let creds = s
        .account
        .sdk_config
        .credentials_provider()
        .unwrap()
        .provide_credentials()
        .await
        .unwrap();
    let account_ids: Vec<String> = (1..=8).map(|n| format!("{:012}", 100 + n)).collect();

    let mut rng = fastrand::Rng::with_seed(7);
    let mut interrupted = 0;
    for round in 0..6 {
        let mut child = std::process::Command::new(BIN)
            .args(["apply", "--config", path.to_str().unwrap()])
            .env("ENTRA_CLIENT_SECRET", SECRET)
            .env("AWS_ACCESS_KEY_ID", creds.access_key_id())
            .env("AWS_SECRET_ACCESS_KEY", creds.secret_access_key())
            .env(
                "AWS_SESSION_TOKEN",
                creds.session_token().unwrap_or_default(),
            )
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Kill at a random point of the run (the whole apply takes about a second here).
        let after = std::time::Duration::from_millis(rng.u64(50..1500));
        let waited = tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + after;
            while std::time::Instant::now() < deadline {
                if child.try_wait().unwrap().is_some() {
                    return true;
                }
                std::thread::yield_now();
            }
            child.kill().ok();
            child.wait().ok();
            false
        })
        .await
        .unwrap();
        // The dead run's lease would expire within a minute; the test does not wait for it.
        aws_sdk_dynamodb::Client::new(&s.account.sdk_config)
            .delete_item()
            .table_name(TABLE)
            .key("pk", AttributeValue::S("LEASE".into()))
            .key("sk", AttributeValue::S("apply".into()))
            .send()
            .await
            .unwrap();
        // Whatever the ledger claims as settled exists.
        let exists = assigned_keys(&s, &account_ids).await;
        if !waited {
            interrupted += 1;
        }
        for (key, pending) in ledger_items(&s).await {
            assert!(
                pending || exists.contains(&key),
                "round {round} (finished: {waited}): the ledger claims {key} which does not exist"
            );
        }
    }

    assert!(
        interrupted > 0,
        "every run finished before its kill: the kill points need adjusting"
    );
    let config = Config::parse(&s.config_text(&rules, 100), "c.yaml").unwrap();
    let report = s.run(&config, Mode::Apply).await;
    assert!(
        matches!(report.outcome, Outcome::Applied | Outcome::InSync),
        "{}",
        report.to_text()
    );
    let exists = assigned_keys(&s, &account_ids).await;
    assert_eq!(exists.len(), 32, "4 users × 8 accounts");
    let ledger = ledger_items(&s).await;
    assert!(
        ledger.iter().all(|(_, pending)| !pending),
        "no intent left behind"
    );
    let owned: Vec<String> = ledger.into_iter().map(|(k, _)| k).collect();
    assert_eq!(
        owned, exists,
        "the ledger owns exactly what the tool created"
    );
    assert_eq!(s.run(&config, Mode::Plan).await.outcome, Outcome::InSync);
}

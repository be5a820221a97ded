//! End-to-end reconciles through the production adapters: the real AWS SDK against moto and
//! the real Graph client against the fake Graph.

mod common;

use common::*;
use devstack::graph::Fault;
use devstack::moto;
use entra_sso_sync::engine::{EngineError, Mode, RunRequest, Target};
use entra_sso_sync::report::Outcome;
use std::collections::BTreeSet;

const ADMINS_BOTH: &str = "  - name: admins\n    entra_group: Platform Admins\n    permission_set: AdministratorAccess\n    accounts: [\"111111111111\", \"222222222222\"]\n";
const DEVS_MEMBERS: &str = "  - name: devs\n    entra_group: Developers\n    permission_set: ReadOnlyAccess\n    accounts: [\"222222222222\"]\n    assign: members\n";

#[tokio::test]
async fn group_mode_assigns_the_provisioned_group_and_a_second_apply_does_nothing() {
    let s = Stack::new().await;
    let config = s.config(ADMINS_BOTH);

    let plan = s.run(&config, Mode::Plan).await;
    assert_eq!(plan.outcome, Outcome::ChangesPending);
    assert_eq!(plan.creates.len(), 2);
    assert!(
        s.assigned(ACCOUNT_A, &s.admin_ps).await.is_empty(),
        "plan changed nothing"
    );
    assert_eq!(
        plan.creates[0].principal_name.as_deref(),
        Some("Platform Admins")
    );
    assert_eq!(
        plan.creates[0].permission_set_name.as_deref(),
        Some("AdministratorAccess")
    );

    let applied = s.run(&config, Mode::Apply).await;
    assert_eq!(applied.outcome, Outcome::Applied, "{}", applied.to_text());
    for account in [ACCOUNT_A, ACCOUNT_B] {
        assert_eq!(s.assigned(account, &s.admin_ps).await, s.groups(&[110]));
    }

    let again = s.run(&config, Mode::Apply).await;
    assert_eq!(again.outcome, Outcome::InSync);
    assert!(again.creates.is_empty() && again.deletes.is_empty());
    assert_eq!(again.unchanged, 2);
}

#[tokio::test]
async fn members_mode_flattens_three_levels_of_nesting_across_pages() {
    let s = Stack::new().await;
    s.graph.set_page_size_cap(2);
    let config = s.config(DEVS_MEMBERS);

    let report = s.run(&config, Mode::Apply).await;
    assert_eq!(report.outcome, Outcome::Applied, "{}", report.to_text());
    // carol (direct), dave (2nd level), erin and frank (3rd level, inside a cycle).
    assert_eq!(
        s.assigned(ACCOUNT_B, &s.read_ps).await,
        s.users(&[3, 4, 5, 6])
    );
    let pages = s
        .graph
        .requests()
        .iter()
        .filter(|r| r.path_and_query.contains("/groups/delta"))
        .count();
    assert!(pages >= 2, "paged through {pages} pages");
    let names: BTreeSet<_> = report
        .creates
        .iter()
        .filter_map(|c| c.principal_name.clone())
        .collect();
    assert!(names.contains("erin@contoso.example"), "{names:?}");
}

#[tokio::test]
async fn a_member_without_an_identity_center_user_is_reported_not_fatal() {
    let s = Stack::new().await;
    let rules = "  - name: auditors\n    entra_group: Auditors\n    permission_set: ReadOnlyAccess\n    accounts: [\"111111111111\"]\n    assign: members\n";
    let report = s.run(&s.config(rules), Mode::Apply).await;
    assert_eq!(report.outcome, Outcome::InSync, "{}", report.to_text());
    assert_eq!(report.unresolved.len(), 1);
    assert_eq!(
        report.unresolved[0].user_principal_name,
        "contractor@contoso.example"
    );
    assert_eq!(report.unresolved[0].rules, vec!["auditors".to_string()]);
    assert!(s.assigned(ACCOUNT_A, &s.read_ps).await.is_empty());
}

#[tokio::test]
async fn hand_made_assignments_survive_even_when_a_rule_matches_them() {
    let s = Stack::new().await;
    let cfg = &s.account.sdk_config;
    // One unrelated hand-made assignment, one that the rule also wants.
    moto::assign_by_hand(cfg, &s.ic, ACCOUNT_B, &s.read_ps, "USER", &s.user_id(1))
        .await
        .unwrap();
    moto::assign_by_hand(cfg, &s.ic, ACCOUNT_B, &s.read_ps, "USER", &s.user_id(3))
        .await
        .unwrap();

    let mut devs = s.config(DEVS_MEMBERS);
    // A period so long that the seconds between these runs audit no pair by chance.
    devs.audit.period_hours = u32::MAX;
    let report = s.run(&devs, Mode::Apply).await;
    assert_eq!(
        report.creates.len(),
        3,
        "carol's exists already: {}",
        report.to_text()
    );
    assert_eq!(
        s.assigned(ACCOUNT_B, &s.read_ps).await,
        s.users(&[1, 3, 4, 5, 6])
    );
    // Carol's unowned assignment was recorded as seen: the next run trusts the pair.
    let report = s.run(&devs, Mode::Apply).await;
    assert!(report.creates.is_empty(), "{}", report.to_text());
    assert_eq!((report.pairs_read, report.pairs_trusted), (0, 1));

    // Removing the rule deletes only what the tool created.
    let other = s.config(ADMINS_BOTH);
    let report = s.run(&other, Mode::Apply).await;
    assert_eq!(report.deletes.len(), 3, "{}", report.to_text());
    assert_eq!(s.assigned(ACCOUNT_B, &s.read_ps).await, s.users(&[1, 3]));
}

#[tokio::test]
async fn a_removed_member_loses_access_and_a_removed_rule_loses_its_assignments() {
    let s = Stack::new().await;
    let both = format!("{ADMINS_BOTH}{DEVS_MEMBERS}");
    s.run(&s.config(&both), Mode::Apply).await;
    assert_eq!(
        s.assigned(ACCOUNT_B, &s.read_ps).await,
        s.users(&[3, 4, 5, 6])
    );

    // erin leaves Payments Oncall (three levels down).
    s.graph.with_tenant(|t| {
        let g = t
            .groups
            .iter_mut()
            .find(|g| g.display_name == "Payments Oncall")
            .unwrap();
        g.members.retain(|m| *m != oid(5));
    });
    let report = s.run(&s.config(&both), Mode::Apply).await;
    assert_eq!(report.deletes.len(), 1);
    assert_eq!(
        report.deletes[0].principal_name.as_deref(),
        Some("erin@contoso.example")
    );
    assert_eq!(s.assigned(ACCOUNT_B, &s.read_ps).await, s.users(&[3, 4, 6]));

    // The admins rule goes away.
    let report = s.run(&s.config(DEVS_MEMBERS), Mode::Apply).await;
    assert_eq!(report.outcome, Outcome::Applied);
    assert_eq!(report.deletes.len(), 2);
    assert!(report.deletes.iter().all(|d| d.rule == "admins"));
    assert!(s.assigned(ACCOUNT_A, &s.admin_ps).await.is_empty());
    assert!(s.assigned(ACCOUNT_B, &s.admin_ps).await.is_empty());
    assert_eq!(s.assigned(ACCOUNT_B, &s.read_ps).await, s.users(&[3, 4, 6]));
}

#[tokio::test]
async fn a_graph_failure_mid_paging_aborts_before_any_change() {
    let s = Stack::new().await;
    let config = s.config(DEVS_MEMBERS);
    s.run(&config, Mode::Apply).await;
    // Dave leaves; but the second page of members keeps failing.
    s.graph.with_tenant(|t| {
        let g = t
            .groups
            .iter_mut()
            .find(|g| g.display_name == "Team Payments")
            .unwrap();
        g.members.retain(|m| *m != oid(4));
    });
    // A full round (the stored link expired) pages one group at a time; page 2 keeps failing.
    s.graph.expire_delta_links();
    s.graph.set_page_size_cap(1);
    s.graph.inject(Fault::new("$skiptoken", 503));

    let err = s.try_run(&config, Mode::Apply, None).await.unwrap_err();
    assert!(matches!(err, EngineError::Directory(_)), "{err}");
    assert!(err.to_string().contains("503"), "{err}");
    assert_eq!(
        s.assigned(ACCOUNT_B, &s.read_ps).await,
        s.users(&[3, 4, 5, 6]),
        "nothing deleted"
    );
}

#[tokio::test]
async fn graph_throttling_is_retried_with_retry_after() {
    let s = Stack::new().await;
    s.graph
        .inject(Fault::new("groups/delta", 429).retry_after(0).times(2));
    let report = s.run(&s.config(DEVS_MEMBERS), Mode::Apply).await;
    assert_eq!(report.outcome, Outcome::Applied);
    let throttled_then_served = s
        .graph
        .requests()
        .iter()
        .filter(|r| r.path_and_query.contains("groups/delta"))
        .count();
    assert_eq!(throttled_then_served, 3, "two 429s, then the page");
    assert_eq!(
        s.assigned(ACCOUNT_B, &s.read_ps).await,
        s.users(&[3, 4, 5, 6])
    );
}

#[tokio::test]
async fn the_deletion_cap_holds_deletions_until_the_operator_allows_them() {
    let s = Stack::new().await;
    s.run(&s.config(DEVS_MEMBERS), Mode::Apply).await;
    let capped =
        entra_sso_sync::config::Config::parse(&s.config_text(ADMINS_BOTH, 3), "t.yaml").unwrap();

    let report = s.try_run(&capped, Mode::Apply, None).await.unwrap();
    assert_eq!(report.outcome, Outcome::Guarded);
    assert_eq!(report.outcome.exit_code(), 3);
    assert_eq!(report.creates.len(), 2, "creations still happen");
    assert_eq!(report.held.len(), 4);
    assert_eq!(report.guard.as_ref().unwrap().by_rule.get("devs"), Some(&4));
    assert_eq!(
        s.assigned(ACCOUNT_B, &s.read_ps).await.len(),
        4,
        "nothing deleted"
    );
    assert_eq!(s.assigned(ACCOUNT_A, &s.admin_ps).await, s.groups(&[110]));

    let report = s.try_run(&capped, Mode::Apply, Some(4)).await.unwrap();
    assert_eq!(report.outcome, Outcome::Applied);
    assert!(s.assigned(ACCOUNT_B, &s.read_ps).await.is_empty());
}

#[tokio::test]
async fn an_unknown_or_ambiguous_entra_group_holds_its_rule_only() {
    let s = Stack::new().await;
    s.graph
        .with_tenant(|t| t.groups.push(group(130, "Platform Admins", &[3])));
    let rules = format!("{ADMINS_BOTH}{DEVS_MEMBERS}  - name: ghost\n    entra_group: No Such Group\n    permission_set: ReadOnlyAccess\n    accounts: [\"111111111111\"]\n");
    let report = s.run(&s.config(&rules), Mode::Apply).await;
    assert_eq!(report.outcome, Outcome::Failed);
    let held: Vec<_> = report
        .rules
        .iter()
        .filter_map(|r| r.held.as_ref().map(|h| (r.name.as_str(), h.as_str())))
        .collect();
    assert_eq!(held.len(), 2, "{held:?}");
    assert!(held[0].1.contains("2 Entra groups are named"), "{held:?}");
    assert!(held[1].1.contains("no Entra group"), "{held:?}");
    assert!(
        s.assigned(ACCOUNT_A, &s.admin_ps).await.is_empty(),
        "an ambiguous name grants nothing"
    );
    assert_eq!(
        s.assigned(ACCOUNT_B, &s.read_ps).await.len(),
        4,
        "the other rule still applies"
    );
}

#[tokio::test]
async fn an_unknown_permission_set_name_stops_the_run_before_any_change() {
    let s = Stack::new().await;
    let rules = format!("{ADMINS_BOTH}  - name: typo\n    entra_group: Developers\n    permission_set: ReadOnlyAcess\n    accounts: [\"111111111111\"]\n");
    let err = s
        .try_run(&s.config(&rules), Mode::Apply, None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("ReadOnlyAcess"), "{err}");
    assert!(s.assigned(ACCOUNT_A, &s.admin_ps).await.is_empty());
}

#[tokio::test]
async fn an_assignment_deleted_by_hand_is_recreated_and_stays_owned() {
    let s = Stack::new().await;
    let mut config = s.config(ADMINS_BOTH);
    // A period so long that the seconds between these runs audit no pair by chance.
    config.audit.period_hours = u32::MAX;
    s.run(&config, Mode::Apply).await;
    let sso = aws_sdk_ssoadmin::Client::new(&s.account.sdk_config);
    sso.delete_account_assignment()
        .instance_arn(&s.ic.instance_arn)
        .target_id(ACCOUNT_A)
        .target_type(aws_sdk_ssoadmin::types::TargetType::AwsAccount)
        .permission_set_arn(&s.admin_ps)
        .principal_type(aws_sdk_ssoadmin::types::PrincipalType::Group)
        .principal_id(s.group_id(110))
        .send()
        .await
        .unwrap();
    // A run moments later trusts the ledger for this pair (the rolling audit reaches it
    // within audit.period_hours); an audit now (--full-read) reads it and puts it back.
    let report = s.run(&config, Mode::Apply).await;
    assert!(report.creates.is_empty(), "{}", report.to_text());
    assert!(report.pairs_trusted > 0);
    let audit = RunRequest {
        mode: Mode::Apply,
        trigger: "test".into(),
        allow_deletions: None,
        target: Target::All,
        deadline: None,
        full_read: true,
        refresh: Default::default(),
    };
    let report = s.run_request(&config, &audit).await.unwrap();
    assert_eq!(report.pairs_trusted, 0);
    assert_eq!(report.creates.len(), 1);
    assert_eq!(report.ledger_forgotten, 1);
    assert_eq!(s.assigned(ACCOUNT_A, &s.admin_ps).await, s.groups(&[110]));
    // Still owned: removing the rule deletes it.
    let report = s.run(&s.config(DEVS_MEMBERS), Mode::Apply).await;
    assert_eq!(report.deletes.len(), 2);
}

#[tokio::test]
async fn a_run_past_its_deadline_starts_nothing_more_and_the_next_run_continues() {
    let s = Stack::new().await;
    let mut config = s.config(DEVS_MEMBERS);
    // A period so long that the seconds between these runs audit no pair by chance.
    config.audit.period_hours = u32::MAX;
    let request = RunRequest {
        mode: Mode::Apply,
        trigger: "test".into(),
        allow_deletions: None,
        target: Target::All,
        deadline: Some(tokio::time::Instant::now()),
        full_read: false,
        refresh: Default::default(),
    };
    let report = s.run_request(&config, &request).await.unwrap();
    assert_eq!(report.outcome, Outcome::Partial);
    assert_eq!(report.outcome.exit_code(), 4);
    assert_eq!(report.deferred, 4);
    assert!(s.assigned(ACCOUNT_B, &s.read_ps).await.is_empty());
    // The creations left are carried in the state table for the next run.
    let state = s.engine(&config).await.state;
    let carried = state.carried_plan().await.unwrap().expect("a carried plan");
    assert_eq!(carried.creates.len(), 4);
    assert!(carried
        .creates
        .iter()
        .all(|a| a.account_id.as_str() == ACCOUNT_B));

    // The next run makes them without reading their pair again, and clears the plan.
    let report = s.run(&config, Mode::Apply).await;
    assert_eq!(report.outcome, Outcome::Applied);
    assert_eq!(report.pairs_read, 0, "{}", report.to_text());
    assert_eq!(
        s.assigned(ACCOUNT_B, &s.read_ps).await,
        s.users(&[3, 4, 5, 6])
    );
    assert_eq!(state.carried_plan().await.unwrap(), None);
}

#[tokio::test]
async fn a_cached_value_larger_than_an_item_is_stored_in_chunks_and_swapped_whole() {
    use entra_sso_sync::state::Cached;
    let s = Stack::new().await;
    let config = s.config(DEVS_MEMBERS);
    let state = s.engine(&config).await.state;
    assert_eq!(state.cache("test").await.unwrap(), None);

    // 1 MB: three chunks of at most 350 KB, each well under DynamoDB's 400 KB item limit.
    let big = Cached {
        written_at: 7,
        bytes: (0..1_000_000u32).map(|i| (i % 251) as u8).collect(),
    };
    state.put_cache("test", &big).await.unwrap();
    assert_eq!(state.cache("test").await.unwrap().as_ref(), Some(&big));

    // A smaller value replaces it whole: no chunk of the old generation is left to mix in.
    let small = Cached {
        written_at: 8,
        bytes: b"small".to_vec(),
    };
    state.put_cache("test", &small).await.unwrap();
    assert_eq!(state.cache("test").await.unwrap().as_ref(), Some(&small));
    let items = aws_sdk_dynamodb::Client::new(&s.account.sdk_config)
        .query()
        .table_name(TABLE)
        .key_condition_expression("pk = :pk")
        .expression_attribute_values(
            ":pk",
            aws_sdk_dynamodb::types::AttributeValue::S("CACHE#test".into()),
        )
        .send()
        .await
        .unwrap()
        .items
        .unwrap_or_default();
    assert_eq!(items.len(), 2, "the head and one chunk");
}

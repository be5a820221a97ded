//! `assign: mirror` against moto's identity store and sso-admin with the fake Graph: the tool
//! keeps an Identity Center group holding an Entra group's transitive members, and assigns it.

mod common;

use common::*;
use devstack::moto;
use entra_sso_sync::engine::Mode;
use entra_sso_sync::report::Outcome;
use std::collections::BTreeSet;

/// Developers by object id, so renaming the Entra group keeps the rule.
fn mirror_rule(name: &str, accounts: &str) -> String {
    format!(
        "  - name: {name}\n    entra_group: {}\n    permission_set: ReadOnlyAccess\n    accounts: [{accounts}]\n    assign: mirror\n",
        oid(100)
    )
}

async fn mirror_id(s: &Stack, name: &str) -> Option<String> {
    moto::groups_by_name(&s.account.sdk_config, &s.ic)
        .await
        .unwrap()
        .get(name)
        .cloned()
}

async fn members(s: &Stack, group: &str) -> BTreeSet<String> {
    moto::group_members(&s.account.sdk_config, &s.ic, group)
        .await
        .unwrap()
}

fn ids(s: &Stack, ns: &[u32]) -> BTreeSet<String> {
    ns.iter().map(|&n| s.user_id(n)).collect()
}

#[tokio::test]
async fn a_mirror_holds_the_nested_members_and_is_assigned_and_leaves_provisioned_groups_alone() {
    let s = Stack::new().await;
    let config = s.config(&mirror_rule("devs", "\"111111111111\", \"222222222222\""));
    let scim_members_before = members(&s, &s.group_id(100)).await;

    let plan = s.run(&config, Mode::Plan).await;
    assert_eq!(plan.outcome, Outcome::ChangesPending);
    assert!(plan.memberships[0].created);
    assert_eq!(plan.memberships[0].added.len(), 4, "{}", plan.to_text());
    assert!(
        mirror_id(&s, "entra-sso-sync: Developers").await.is_none(),
        "plan creates nothing"
    );

    let report = s.run(&config, Mode::Apply).await;
    assert_eq!(report.outcome, Outcome::Applied, "{}", report.to_text());
    let mirror = mirror_id(&s, "entra-sso-sync: Developers")
        .await
        .expect("mirror group");
    // carol (direct), dave, erin, frank (nested, through a cycle); contractor is not provisioned.
    assert_eq!(members(&s, &mirror).await, ids(&s, &[3, 4, 5, 6]));
    for account in [ACCOUNT_A, ACCOUNT_B] {
        assert_eq!(
            s.assigned(account, &s.read_ps).await,
            BTreeSet::from([("GROUP".to_string(), mirror.clone())])
        );
    }
    assert_eq!(
        members(&s, &s.group_id(100)).await,
        scim_members_before,
        "SCIM's group untouched"
    );
    assert_eq!(s.run(&config, Mode::Plan).await.outcome, Outcome::InSync);
}

#[tokio::test]
async fn nested_joins_and_leaves_reach_the_mirror() {
    let s = Stack::new().await;
    let config = s.config(&mirror_rule("devs", "\"222222222222\""));
    s.run(&config, Mode::Apply).await;
    let mirror = mirror_id(&s, "entra-sso-sync: Developers").await.unwrap();

    // grace joins Payments Oncall, three levels down; erin leaves it.
    let grace = moto::create_user(
        &s.account.sdk_config,
        &s.ic,
        "grace@contoso.example",
        "grace",
    )
    .await
    .unwrap();
    s.graph.with_tenant(|t| {
        t.users.push(user(8, "grace"));
        let g = t
            .groups
            .iter_mut()
            .find(|g| g.display_name == "Payments Oncall")
            .unwrap();
        g.members.push(oid(8));
        g.members.retain(|m| *m != oid(5));
    });
    let report = s.run(&config, Mode::Apply).await;
    assert_eq!(report.outcome, Outcome::Applied, "{}", report.to_text());
    assert_eq!(
        report.memberships[0].added,
        vec!["grace@contoso.example".to_string()]
    );
    assert_eq!(
        report.memberships[0].removed,
        vec!["erin@contoso.example".to_string()]
    );
    let mut want = ids(&s, &[3, 4, 6]);
    want.insert(grace);
    assert_eq!(members(&s, &mirror).await, want);
    assert!(
        report.creates.is_empty() && report.deletes.is_empty(),
        "the assignment stays"
    );
}

#[tokio::test]
async fn renaming_the_entra_group_keeps_the_same_mirror() {
    let s = Stack::new().await;
    let config = s.config(&mirror_rule("devs", "\"222222222222\""));
    s.run(&config, Mode::Apply).await;
    let mirror = mirror_id(&s, "entra-sso-sync: Developers").await.unwrap();

    s.graph.with_tenant(|t| {
        t.groups
            .iter_mut()
            .find(|g| g.id == oid(100))
            .unwrap()
            .display_name = "Engineering".into();
    });
    let report = s.run(&config, Mode::Apply).await;
    assert!(
        report.creates.is_empty() && report.deletes.is_empty(),
        "{}",
        report.to_text()
    );
    assert_eq!(report.memberships.len(), 1);
    assert!(report.memberships[0].renamed && !report.memberships[0].created);
    assert_eq!(
        report.memberships[0].group_id.as_deref(),
        Some(mirror.as_str())
    );
    // moto cannot rename (UpdateGroup answers 500): the report says so and the next run retries;
    // against AWS the group is renamed. Either way it is the same group, still assigned.
    let renamed = mirror_id(&s, "entra-sso-sync: Engineering").await;
    assert!(
        renamed == Some(mirror.clone())
            || report
                .warnings
                .iter()
                .any(|w| w.contains("could not rename")),
        "{}",
        report.to_text()
    );
    assert!(s
        .assigned(ACCOUNT_B, &s.read_ps)
        .await
        .contains(&("GROUP".to_string(), mirror.clone())));
    assert_eq!(members(&s, &mirror).await, ids(&s, &[3, 4, 5, 6]));
}

#[tokio::test]
async fn rules_naming_the_same_group_share_one_mirror() {
    let s = Stack::new().await;
    let rules = format!(
        "{}{}",
        mirror_rule("devs-a", "\"111111111111\""),
        mirror_rule("devs-b", "\"222222222222\"")
    );
    let report = s.run(&s.config(&rules), Mode::Apply).await;
    assert_eq!(report.memberships.len(), 1, "{}", report.to_text());
    let mirror = mirror_id(&s, "entra-sso-sync: Developers").await.unwrap();
    assert!(s
        .assigned(ACCOUNT_A, &s.read_ps)
        .await
        .contains(&("GROUP".to_string(), mirror.clone())));
    assert!(s
        .assigned(ACCOUNT_B, &s.read_ps)
        .await
        .contains(&("GROUP".to_string(), mirror)));
}

#[tokio::test]
async fn a_group_with_the_mirror_name_that_the_tool_did_not_create_is_never_touched() {
    let s = Stack::new().await;
    let foreign = moto::create_group(&s.account.sdk_config, &s.ic, "entra-sso-sync: Developers")
        .await
        .unwrap();
    let report = s
        .run(
            &s.config(&mirror_rule("devs", "\"222222222222\"")),
            Mode::Apply,
        )
        .await;
    assert_eq!(report.outcome, Outcome::Failed);
    assert!(
        report.rules[0]
            .held
            .as_ref()
            .unwrap()
            .contains("did not create"),
        "{}",
        report.to_text()
    );
    assert!(members(&s, &foreign).await.is_empty());
    assert!(s.assigned(ACCOUNT_B, &s.read_ps).await.is_empty());
}

#[tokio::test]
async fn removing_the_last_rule_deletes_the_assignments_then_the_group_under_the_guards() {
    let s = Stack::new().await;
    s.run(
        &s.config(&mirror_rule("devs", "\"111111111111\", \"222222222222\"")),
        Mode::Apply,
    )
    .await;
    let mirror = mirror_id(&s, "entra-sso-sync: Developers").await.unwrap();
    let without = s.config_text(
        "  - name: admins\n    entra_group: Platform Admins\n    permission_set: AdministratorAccess\n    accounts: [\"111111111111\"]\n",
        2,
    );
    let without = entra_sso_sync::config::Config::parse(&without, "t.yaml").unwrap();

    // Two assignment deletions plus the group's: three, over a cap of two.
    let report = s.try_run(&without, Mode::Apply, None).await.unwrap();
    assert_eq!(report.outcome, Outcome::Guarded, "{}", report.to_text());
    assert_eq!(report.guard.as_ref().unwrap().wanted, 3);
    assert!(mirror_id(&s, "entra-sso-sync: Developers").await.is_some());
    assert_eq!(s.assigned(ACCOUNT_B, &s.read_ps).await.len(), 1);

    let report = s.try_run(&without, Mode::Apply, Some(3)).await.unwrap();
    assert_eq!(report.outcome, Outcome::Applied, "{}", report.to_text());
    assert!(report.memberships.iter().any(|m| m.deleted));
    assert!(s.assigned(ACCOUNT_A, &s.read_ps).await.is_empty());
    assert!(s.assigned(ACCOUNT_B, &s.read_ps).await.is_empty());
    assert!(
        mirror_id(&s, "entra-sso-sync: Developers").await.is_none(),
        "group {mirror} deleted"
    );
    assert_eq!(s.run(&without, Mode::Plan).await.outcome, Outcome::InSync);
}

#[tokio::test]
async fn a_mirror_whose_source_empties_holds_its_removals() {
    let s = Stack::new().await;
    let config = s.config(&mirror_rule("devs", "\"222222222222\""));
    s.run(&config, Mode::Apply).await;
    let mirror = mirror_id(&s, "entra-sso-sync: Developers").await.unwrap();
    s.empty_developers();
    let report = s.run(&config, Mode::Apply).await;
    assert_eq!(
        report.outcome,
        Outcome::Guarded,
        "{}\n{:?}",
        report.to_text(),
        s.graph.tenant().groups
    );
    assert_eq!(report.held_memberships[0].removals.len(), 4);
    assert_eq!(members(&s, &mirror).await.len(), 4, "nobody removed");
    // Still held next time: the last apply's member count was kept.
    assert_eq!(s.run(&config, Mode::Apply).await.outcome, Outcome::Guarded);
    // The operator confirms.
    let report = s.try_run(&config, Mode::Apply, Some(4)).await.unwrap();
    assert_eq!(report.outcome, Outcome::Applied, "{}", report.to_text());
    assert!(members(&s, &mirror).await.is_empty());
}

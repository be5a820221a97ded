//! Account scopes against moto's AWS Organizations: OUs at any depth by path or id, tags,
//! names, exclusions, suspended and moved accounts, and targeted runs.

mod common;

use common::*;
use entra_sso_sync::cache::Refresh;
use entra_sso_sync::engine::{EngineError, Mode, RunRequest, Target};
use entra_sso_sync::model::AccountId;
use entra_sso_sync::report::Outcome;
use std::collections::BTreeSet;

fn rule(name: &str, scope: &str) -> String {
    format!("  - name: {name}\n    entra_group: Platform Admins\n    permission_set: AdministratorAccess\n{scope}")
}

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

#[tokio::test]
async fn an_ou_path_and_its_id_reach_every_active_account_four_levels_down() {
    let s = Stack::new().await;
    let org = Org::new(&s).await;
    org.close("Retired").await;

    let by_path = s.config(&rule(
        "prod",
        "    organizational_units: [Root/Workloads/Prod]\n",
    ));
    let plan = s.run(&by_path, Mode::Plan).await;
    let by_id = s.config(&rule(
        "prod",
        &format!("    organizational_units: [{}]\n", org.ous["Prod"]),
    ));
    let plan_by_id = s.run(&by_id, Mode::Plan).await;
    assert_eq!(plan.rules[0].scope, plan_by_id.rules[0].scope);
    assert_eq!(plan.rules[0].accounts, 3);
    assert_eq!(
        plan.rules[0].scope.skipped_inactive,
        vec![AccountId::try_from(org.accounts["Retired"].clone()).unwrap()]
    );
    assert!(plan.calls["organizations"] > 0);

    let report = s.run(&by_path, Mode::Apply).await;
    assert_eq!(report.outcome, Outcome::Applied, "{}", report.to_text());
    assert_eq!(
        granted(&s, &org).await,
        BTreeSet::from(["Prod Web", "Payments Main", "Deep One"])
    );
}

#[tokio::test]
async fn tags_names_and_exclusions_combine() {
    let s = Stack::new().await;
    let org = Org::new(&s).await;
    org.tag("Prod Web", "environment", "production").await;
    org.tag("Deep One", "environment", "production").await;
    org.tag("Sandbox Dev", "environment", "development").await;
    let scope = "    account_tags: {environment: production}\n    accounts: [Sandbox Dev, Payments Main]\n    exclude_accounts: [Payments Main]\n    exclude_organizational_units: [Root/Workloads/Prod/Payments/Deep]\n";
    let report = s.run(&s.config(&rule("mixed", scope)), Mode::Apply).await;
    assert_eq!(report.outcome, Outcome::Applied, "{}", report.to_text());
    assert_eq!(
        granted(&s, &org).await,
        BTreeSet::from(["Prod Web", "Sandbox Dev"])
    );
}

#[tokio::test]
async fn a_moved_account_gains_its_new_scope_and_loses_the_old_in_one_run() {
    let s = Stack::new().await;
    let org = Org::new(&s).await;
    let rules = format!(
        "{}{}",
        rule("prod", "    organizational_units: [Root/Workloads/Prod]\n"),
        "  - name: sandbox\n    entra_group: Developers\n    permission_set: ReadOnlyAccess\n    organizational_units: [Root/Sandbox]\n"
    );
    let config = s.config(&rules);
    s.run(&config, Mode::Apply).await;
    assert!(granted(&s, &org).await.contains("Deep One"));

    let deep = org.accounts["Deep One"].clone();
    org.move_account(&deep, &org.ous["Deep"], &org.ous["Sandbox"])
        .await;
    let target = Target::Only {
        accounts: BTreeSet::from([AccountId::try_from(deep.clone()).unwrap()]),
        entra_groups: BTreeSet::new(),
    };
    let report = s
        .run_targeted(&config, Mode::Apply, None, target)
        .await
        .unwrap();
    assert_eq!(report.outcome, Outcome::Applied, "{}", report.to_text());
    assert_eq!(report.deletes.len(), 1, "{}", report.to_text());
    assert_eq!(report.deletes[0].account_id, deep);
    assert_eq!(report.creates.len(), 1, "{}", report.to_text());
    assert_eq!(report.creates[0].account_id, deep);
    assert_eq!(report.creates[0].rule, "sandbox");
    assert!(!granted(&s, &org).await.contains("Deep One"));
    assert_eq!(s.assigned(&deep, &s.read_ps).await, s.groups(&[100]));
    // The targeted run did not touch the other accounts: a full run finds nothing to do.
    assert_eq!(s.run(&config, Mode::Plan).await.outcome, Outcome::InSync);
}

#[tokio::test]
async fn a_new_account_in_scope_is_reconciled_by_a_run_targeting_it() {
    let s = Stack::new().await;
    let mut org = Org::new(&s).await;
    let config = s.config(&rule(
        "prod",
        "    organizational_units: [Root/Workloads/Prod]\n",
    ));
    s.run(&config, Mode::Apply).await;
    let new = org.create_account("Prod New", "Payments").await;
    let target = Target::Only {
        accounts: BTreeSet::from([AccountId::try_from(new.clone()).unwrap()]),
        entra_groups: BTreeSet::new(),
    };
    let report = s
        .run_targeted(&config, Mode::Apply, None, target)
        .await
        .unwrap();
    assert_eq!(report.creates.len(), 1);
    assert_eq!(report.creates[0].account_id, new);
    assert_eq!(report.unchanged, 0, "the other accounts were not even read");
}

#[tokio::test]
async fn unknown_or_ambiguous_names_and_paths_stop_the_run_before_any_change() {
    let s = Stack::new().await;
    let mut org = Org::new(&s).await;
    org.create_account("Twin", "Sandbox").await;
    org.create_account("Twin", "Prod").await;
    for (scope, want) in [
        ("    accounts: [Nope]\n", "no account is named \"Nope\""),
        ("    accounts: [Twin]\n", "2 accounts are named \"Twin\""),
        (
            "    organizational_units: [Root/Workloads/Staging]\n",
            "no \"Staging\" under Root/Workloads",
        ),
        (
            "    organizational_units: [ou-zzzz-zzzzzzzz]\n",
            "no organizational unit ou-zzzz-zzzzzzzz",
        ),
    ] {
        let rules = format!(
            "{}{}",
            rule("ok", "    accounts: [\"111111111111\"]\n"),
            rule("bad", scope)
        );
        let err = s
            .try_run(&s.config(&rules), Mode::Apply, None)
            .await
            .unwrap_err();
        assert!(matches!(err, EngineError::Scope(_)), "{err}");
        assert!(
            err.to_string().contains(want) && err.to_string().contains("rule bad"),
            "{err}"
        );
    }
    assert!(
        s.assigned(ACCOUNT_A, &s.admin_ps).await.is_empty(),
        "nothing changed"
    );
}

#[tokio::test]
async fn a_scope_that_empties_holds_its_deletions() {
    let s = Stack::new().await;
    let org = Org::new(&s).await;
    s.run(
        &s.config(&rule(
            "prod",
            "    organizational_units: [Root/Workloads/Prod/Payments]\n",
        )),
        Mode::Apply,
    )
    .await;
    assert_eq!(
        granted(&s, &org).await,
        BTreeSet::from(["Payments Main", "Deep One"])
    );
    // Everything moves out of Payments: the scope is now empty, which is almost always a mistake.
    for name in ["Payments Main", "Deep One"] {
        let from = if name == "Deep One" {
            "Deep"
        } else {
            "Payments"
        };
        org.move_account(&org.accounts[name], &org.ous[from], &org.ous["Sandbox"])
            .await;
    }
    let config = s.config(&rule(
        "prod",
        "    organizational_units: [Root/Workloads/Prod/Payments]\n",
    ));
    // A full run as the MoveAccount events cause it: the organization is read afresh.
    let request = RunRequest {
        mode: Mode::Apply,
        trigger: "test".into(),
        allow_deletions: None,
        target: Target::All,
        deadline: None,
        full_read: false,
        refresh: Refresh {
            organization: true,
            principals: false,
        },
    };
    let report = s.run_request(&config, &request).await.unwrap();
    assert_eq!(report.outcome, Outcome::Guarded, "{}", report.to_text());
    assert_eq!(report.rules[0].accounts, 0);
    assert_eq!(report.held.len(), 2);
    assert!(report.held[0].reason.contains("zero accounts"));
    assert_eq!(
        granted(&s, &org).await,
        BTreeSet::from(["Payments Main", "Deep One"])
    );
}

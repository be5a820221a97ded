//! Checks the moto helpers themselves against a running moto server (`scripts/test -p devstack`).

use std::collections::BTreeSet;

use devstack::graph::{Group, Tenant, User};
use devstack::moto::{self, IdentityCenter, MotoAccount};

async fn account() -> (MotoAccount, IdentityCenter) {
    let account = moto::isolated_account()
        .await
        .expect("isolated moto account");
    let ic = moto::identity_center(&account.sdk_config)
        .await
        .expect("identity center");
    (account, ic)
}

fn user(id: &str, upn: &str, name: &str) -> User {
    User {
        id: id.to_owned(),
        user_principal_name: upn.to_owned(),
        display_name: name.to_owned(),
        account_enabled: true,
    }
}

fn group(id: &str, name: &str, members: &[&str]) -> Group {
    Group {
        id: id.to_owned(),
        display_name: name.to_owned(),
        members: members.iter().map(|m| (*m).to_owned()).collect(),
    }
}

/// Top "AWS Developers" ⊃ "Team Payments" ⊃ "Payments Oncall": three levels of nesting.
fn nested_tenant() -> Tenant {
    Tenant {
        tenant_id: "00000000-0000-0000-0000-00000000aaaa".to_owned(),
        client_id: "00000000-0000-0000-0000-00000000bbbb".to_owned(),
        client_secret: "secret".to_owned(),
        users: vec![
            user("u-top", "top@contoso.example", "Tina Top"),
            user("u-mid", "mid@contoso.example", "Mike Middle"),
            user("u-leaf", "leaf@contoso.example", "Lea Leaf"),
            user("u-none", "none@contoso.example", "Nora"),
        ],
        groups: vec![
            group("g-top", "AWS Developers", &["u-top", "g-mid"]),
            group("g-mid", "Team Payments", &["u-mid", "g-leaf"]),
            group("g-leaf", "Payments Oncall", &["u-leaf"]),
        ],
    }
}

async fn raw_membership_count(account: &MotoAccount, ic: &IdentityCenter, group: &str) -> usize {
    aws_sdk_identitystore::Client::new(&account.sdk_config)
        .list_group_memberships()
        .identity_store_id(&ic.identity_store_id)
        .group_id(group)
        .send()
        .await
        .expect("ListGroupMemberships")
        .group_memberships()
        .len()
}

#[tokio::test]
async fn isolated_accounts_do_not_see_each_other() {
    let (a, ic_a) = account().await;
    let (b, ic_b) = account().await;
    assert_ne!(a.account_id, b.account_id);
    assert_eq!(a.account_id.len(), 12);
    assert_ne!(ic_a.instance_arn, ic_b.instance_arn);
    assert_ne!(ic_a.identity_store_id, ic_b.identity_store_id);

    let alice = moto::create_user(&a.sdk_config, &ic_a, "alice@contoso.example", "Alice Smith")
        .await
        .unwrap();
    let in_a = moto::users_by_name(&a.sdk_config, &ic_a).await.unwrap();
    assert_eq!(in_a.get("alice@contoso.example"), Some(&alice));
    assert!(moto::users_by_name(&b.sdk_config, &ic_b)
        .await
        .unwrap()
        .is_empty());
    // Even with A's store id, B's credentials see B's (empty) state, not A's users.
    assert!(moto::users_by_name(&b.sdk_config, &ic_a)
        .await
        .unwrap()
        .is_empty());
    // The same user name is free in B.
    moto::create_user(&b.sdk_config, &ic_b, "alice@contoso.example", "Alice Smith")
        .await
        .unwrap();

    // DynamoDB tables are per account too: the same name twice, once in each.
    moto::create_state_table(&a.sdk_config, "state")
        .await
        .unwrap();
    moto::create_state_table(&b.sdk_config, "state")
        .await
        .unwrap();
    let described = aws_sdk_dynamodb::Client::new(&a.sdk_config)
        .describe_table()
        .table_name("state")
        .send()
        .await
        .unwrap();
    let arn = described.table().and_then(|t| t.table_arn()).unwrap();
    assert!(arn.contains(&a.account_id), "{arn}");
    let ttl = aws_sdk_dynamodb::Client::new(&a.sdk_config)
        .describe_time_to_live()
        .table_name("state")
        .send()
        .await
        .unwrap();
    let ttl = ttl.time_to_live_description().unwrap();
    assert_eq!(ttl.attribute_name(), Some("expires_at"));

    // Permission sets are per instance.
    let ps = moto::create_permission_set(&a.sdk_config, &ic_a, "ReadOnlyAccess")
        .await
        .unwrap();
    assert_eq!(
        moto::find_permission_set(&a.sdk_config, &ic_a, "ReadOnlyAccess")
            .await
            .unwrap(),
        Some(ps)
    );
    assert_eq!(
        moto::find_permission_set(&b.sdk_config, &ic_b, "ReadOnlyAccess")
            .await
            .unwrap(),
        None
    );
}

#[tokio::test]
async fn scim_provisioning_creates_only_direct_memberships() {
    let (acct, ic) = account().await;
    let cfg = &acct.sdk_config;
    let tenant = nested_tenant();
    let p = moto::provision_like_scim(cfg, &ic, &tenant, None)
        .await
        .unwrap();
    assert_eq!(p.users.len(), 4);
    assert_eq!(p.groups.len(), 3);

    let users = moto::users_by_name(cfg, &ic).await.unwrap();
    assert_eq!(users.get("top@contoso.example"), p.users.get("u-top"));
    let groups = moto::groups_by_name(cfg, &ic).await.unwrap();
    assert_eq!(
        groups.keys().map(String::as_str).collect::<Vec<_>>(),
        ["AWS Developers", "Payments Oncall", "Team Payments"]
    );

    let members = |g: &'static str| {
        let group_id = p.groups[g].clone();
        let ic = ic.clone();
        async move { moto::group_members(cfg, &ic, &group_id).await.unwrap() }
    };
    assert_eq!(
        members("g-top").await,
        BTreeSet::from([p.users["u-top"].clone()])
    );
    assert_eq!(
        members("g-mid").await,
        BTreeSet::from([p.users["u-mid"].clone()])
    );
    assert_eq!(
        members("g-leaf").await,
        BTreeSet::from([p.users["u-leaf"].clone()])
    );

    // Running it again reuses everything and adds no duplicate memberships.
    let again = moto::provision_like_scim(cfg, &ic, &tenant, None)
        .await
        .unwrap();
    assert_eq!(again, p);
    assert_eq!(
        raw_membership_count(&acct, &ic, &p.groups["g-top"]).await,
        1
    );
}

#[tokio::test]
async fn scim_provisioning_can_leave_users_out() {
    let (acct, ic) = account().await;
    let cfg = &acct.sdk_config;
    let only = BTreeSet::from(["u-top".to_owned(), "u-leaf".to_owned()]);
    let p = moto::provision_like_scim(cfg, &ic, &nested_tenant(), Some(&only))
        .await
        .unwrap();
    assert_eq!(p.users.keys().collect::<Vec<_>>(), ["u-leaf", "u-top"]);
    assert_eq!(p.groups.len(), 3, "groups are provisioned regardless");
    let users = moto::users_by_name(cfg, &ic).await.unwrap();
    assert!(!users.contains_key("mid@contoso.example"));
    assert!(moto::group_members(cfg, &ic, &p.groups["g-mid"])
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn hand_made_assignments_round_trip() {
    let (acct, ic) = account().await;
    let cfg = &acct.sdk_config;
    let ps = moto::create_permission_set(cfg, &ic, "ReadOnlyAccess")
        .await
        .unwrap();
    let other_ps = moto::create_permission_set(cfg, &ic, "AdministratorAccess")
        .await
        .unwrap();
    let bob = moto::create_user(cfg, &ic, "bob@contoso.example", "Bob Jones")
        .await
        .unwrap();
    let auditors = moto::create_group(cfg, &ic, "AWS Auditors").await.unwrap();

    moto::assign_by_hand(cfg, &ic, "111111111111", &ps, "USER", &bob)
        .await
        .unwrap();
    moto::assign_by_hand(cfg, &ic, "111111111111", &ps, "GROUP", &auditors)
        .await
        .unwrap();
    // Leading zeros in account ids survive.
    moto::assign_by_hand(cfg, &ic, "012345678901", &ps, "USER", &bob)
        .await
        .unwrap();

    assert_eq!(
        moto::list_assignments(cfg, &ic, "111111111111", &ps)
            .await
            .unwrap(),
        BTreeSet::from([
            ("GROUP".to_owned(), auditors.clone()),
            ("USER".to_owned(), bob.clone()),
        ])
    );
    assert_eq!(
        moto::list_assignments(cfg, &ic, "012345678901", &ps)
            .await
            .unwrap(),
        BTreeSet::from([("USER".to_owned(), bob.clone())])
    );
    assert!(moto::list_assignments(cfg, &ic, "111111111111", &other_ps)
        .await
        .unwrap()
        .is_empty());
    assert!(moto::list_assignments(cfg, &ic, "222222222222", &ps)
        .await
        .unwrap()
        .is_empty());

    assert!(
        moto::assign_by_hand(cfg, &ic, "111111111111", &ps, "ROLE", &bob)
            .await
            .is_err()
    );

    moto::delete_user(cfg, &ic, &bob).await.unwrap();
    assert!(!moto::users_by_name(cfg, &ic)
        .await
        .unwrap()
        .contains_key("bob@contoso.example"));
}

#[tokio::test]
async fn many_assignments_are_listed_across_pages() {
    let (acct, ic) = account().await;
    let cfg = &acct.sdk_config;
    let ps = moto::create_permission_set(cfg, &ic, "ReadOnlyAccess")
        .await
        .unwrap();
    let mut expected = BTreeSet::new();
    // moto pages ListAccountAssignments at 100.
    for i in 0..105 {
        let g = moto::create_group(cfg, &ic, &format!("group {i}"))
            .await
            .unwrap();
        moto::assign_by_hand(cfg, &ic, "333333333333", &ps, "GROUP", &g)
            .await
            .unwrap();
        expected.insert(("GROUP".to_owned(), g));
    }
    assert_eq!(
        moto::list_assignments(cfg, &ic, "333333333333", &ps)
            .await
            .unwrap(),
        expected
    );
}

//! `GraphClient::groups_delta` / `users_delta` over HTTP against the devstack fake Graph:
//! paging to the deltaLink, rounds that report exactly what changed, expiry, retries, and the
//! links the client refuses to follow. Needs no moto.

use devstack::graph::{FakeGraph, Fault, Group, Tenant, User};
use entra_sso_sync::directory::{
    DeltaRound, Directory, DirectoryError, GraphClient, GraphSettings, GroupChange, MemberChange,
    MemberKind, UserChange,
};
use entra_sso_sync::model::{Guid, Secret};
use entra_sso_sync::retry::Backoff;
use std::time::Duration;

const TENANT_ID: &str = "11111111-2222-3333-4444-555555555555";
const CLIENT_ID: &str = "66666666-7777-8888-9999-000000000000";
const SECRET: &str = "s3cr3t-value-that-must-never-be-printed";

fn user(id: &str) -> User {
    User {
        id: id.into(),
        user_principal_name: format!("{id}@contoso.example"),
        display_name: format!("User {id}"),
        account_enabled: true,
    }
}

fn group(id: &str, name: &str, members: &[&str]) -> Group {
    Group {
        id: id.into(),
        display_name: name.into(),
        members: members.iter().map(|m| m.to_string()).collect(),
    }
}

/// Users u1–u5; Admins = {u1, u2}, Developers = {u3, Team, "ghost"}, Team = {u4}.
fn tenant() -> Tenant {
    Tenant {
        tenant_id: TENANT_ID.into(),
        client_id: CLIENT_ID.into(),
        client_secret: SECRET.into(),
        users: ["u1", "u2", "u3", "u4", "u5"].map(user).into(),
        groups: vec![
            group("g-admins", "Admins", &["u1", "u2"]),
            group("g-devs", "Developers", &["u3", "g-team", "ghost"]),
            group("g-team", "Team", &["u4"]),
        ],
    }
}

/// A fake Graph paging two objects at a time (so every round has several pages), and the
/// production client with a quick backoff.
async fn start() -> (FakeGraph, GraphClient) {
    let fg = FakeGraph::start(tenant()).await.expect("fake graph");
    fg.set_page_size_cap(2);
    let client = GraphClient::new(GraphSettings {
        graph_url: fg.graph_url(),
        login_url: fg.login_url(),
        tenant_id: Guid::try_from(TENANT_ID.to_string()).unwrap(),
        client_id: Guid::try_from(CLIENT_ID.to_string()).unwrap(),
        client_secret: Secret::new(SECRET),
        backoff: Backoff {
            max_attempts: 3,
            base: Duration::from_millis(10),
            cap: Duration::from_millis(50),
        },
    })
    .expect("graph client");
    (fg, client)
}

fn member(id: &str, kind: MemberKind, removed: bool) -> MemberChange {
    MemberChange {
        id: id.into(),
        kind,
        removed,
    }
}

fn changed_group(id: &str, name: &str, members: Vec<MemberChange>) -> GroupChange {
    GroupChange {
        id: id.into(),
        removed: false,
        display_name: Some(name.into()),
        members,
    }
}

fn changed_user(u: &User) -> UserChange {
    UserChange {
        id: u.id.clone(),
        removed: false,
        user_principal_name: Some(u.user_principal_name.clone()),
        display_name: Some(u.display_name.clone()),
        account_enabled: Some(u.account_enabled),
    }
}

/// Delta page requests the fake received (the token request left out).
fn delta_requests(fg: &FakeGraph) -> Vec<String> {
    fg.requests()
        .into_iter()
        .map(|r| r.path_and_query)
        .filter(|p| p.contains("/delta"))
        .collect()
}

/// Neither an access token nor a paging or delta token may appear in an error.
fn assert_clean(fg: &FakeGraph, err: &DirectoryError, link: &str) {
    let text = err.to_string();
    for token in fg.issued_tokens() {
        assert!(!text.contains(&token), "{text}");
    }
    assert!(!text.contains(SECRET), "{text}");
    if let Some((_, delta_token)) = link.split_once("$deltatoken=") {
        assert!(!text.contains(delta_token), "{text}");
    }
}

#[tokio::test]
async fn rounds_page_to_the_delta_link_and_then_report_exactly_the_changes() {
    let (fg, client) = start().await;

    let groups = client.groups_delta(None).await.expect("full groups round");
    assert_eq!(
        groups.changes,
        vec![
            changed_group(
                "g-admins",
                "Admins",
                vec![
                    member("u1", MemberKind::User, false),
                    member("u2", MemberKind::User, false),
                ]
            ),
            changed_group(
                "g-devs",
                "Developers",
                vec![
                    member("u3", MemberKind::User, false),
                    member("g-team", MemberKind::Group, false),
                ]
            ),
            changed_group(
                "g-team",
                "Team",
                vec![member("u4", MemberKind::User, false)]
            ),
        ]
    );
    let requests = delta_requests(&fg);
    assert_eq!(requests.len(), 2, "3 groups, 2 a page: {requests:?}");
    assert_eq!(
        requests[0],
        "/v1.0/groups/delta?$select=displayName,members"
    );
    assert!(requests[1].contains("$skiptoken="), "{requests:?}");
    assert!(groups
        .delta_link
        .starts_with(&format!("{}/groups/delta?", fg.graph_url())));
    // One token request and two pages.
    assert_eq!(client.calls(), 3);

    let users = client.users_delta(None).await.expect("full users round");
    let all: Vec<UserChange> = tenant().users.iter().map(changed_user).collect();
    assert_eq!(users.changes, all);
    assert_eq!(
        delta_requests(&fg)[2],
        "/v1.0/users/delta?$select=userPrincipalName,displayName,accountEnabled"
    );
    assert_eq!(delta_requests(&fg).len(), 2 + 3, "5 users, 2 a page");

    fg.with_tenant(|t| {
        let admins = t.groups.iter_mut().find(|g| g.id == "g-admins").unwrap();
        admins.members.retain(|m| m != "u2");
        admins.members.push("u5".into());
        t.groups.retain(|g| g.id != "g-team");
        t.users
            .iter_mut()
            .find(|u| u.id == "u3")
            .unwrap()
            .account_enabled = false;
    });
    let next = client
        .groups_delta(Some(&groups.delta_link))
        .await
        .expect("groups round from the deltaLink");
    assert_eq!(
        next.changes,
        vec![
            changed_group(
                "g-admins",
                "Admins",
                vec![
                    member("u5", MemberKind::User, false),
                    member("u2", MemberKind::User, true),
                ]
            ),
            // Team was deleted, so it also left Developers.
            changed_group(
                "g-devs",
                "Developers",
                vec![member("g-team", MemberKind::Group, true)]
            ),
            GroupChange {
                id: "g-team".into(),
                removed: true,
                display_name: None,
                members: vec![],
            },
        ]
    );
    let next_users = client
        .users_delta(Some(&users.delta_link))
        .await
        .expect("users round from the deltaLink");
    let mut u3 = user("u3");
    u3.account_enabled = false;
    assert_eq!(next_users.changes, vec![changed_user(&u3)]);

    // Nothing changed since: an empty round of one page, and a fresh link.
    let quiet = client.groups_delta(Some(&next.delta_link)).await.unwrap();
    assert!(quiet.changes.is_empty());
    assert_ne!(quiet.delta_link, next.delta_link);
}

#[tokio::test]
async fn an_expired_link_is_delta_expired_and_a_full_round_starts_over() {
    let (fg, client) = start().await;
    let first = client.groups_delta(None).await.unwrap();
    let users = client.users_delta(None).await.unwrap();
    fg.expire_delta_links();
    for result in [
        client
            .groups_delta(Some(&first.delta_link))
            .await
            .map(|_| ()),
        client
            .users_delta(Some(&users.delta_link))
            .await
            .map(|_| ()),
    ] {
        let err = result.expect_err("an expired link");
        assert!(
            matches!(&err, DirectoryError::DeltaExpired { what, .. } if what.ends_with("/delta page 1")),
            "{err:?}"
        );
        assert_clean(&fg, &err, &first.delta_link);
        assert_clean(&fg, &err, &users.delta_link);
    }
    let again = client.groups_delta(None).await.unwrap();
    assert_eq!(again.changes, first.changes);

    // syncStateNotFound / resyncRequired mean the same with any status.
    fg.inject(
        Fault::new("/groups/delta", 400)
            .body(r#"{"error":{"code":"resyncRequired","message":"Resync required."}}"#)
            .times(1),
    );
    let err = client
        .groups_delta(Some(&again.delta_link))
        .await
        .unwrap_err();
    assert!(
        matches!(err, DirectoryError::DeltaExpired { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_throttled_delta_page_is_retried_and_the_round_completes() {
    let (fg, client) = start().await;
    let expected = client.groups_delta(None).await.unwrap().changes;
    fg.clear_requests();
    fg.inject(Fault::new("$skiptoken", 429).retry_after(1).times(1));
    let calls = client.calls();
    let round = client.groups_delta(None).await.expect("retried round");
    assert_eq!(round.changes, expected);
    let requests = delta_requests(&fg);
    assert_eq!(requests.len(), 3, "page 2 sent twice: {requests:?}");
    assert_eq!(requests[1], requests[2]);
    assert_eq!(client.calls() - calls, 3, "the retry is counted");
}

#[tokio::test]
async fn a_page_failing_after_its_retries_fails_the_whole_round() {
    let (fg, client) = start().await;
    fg.inject(Fault::new("$skiptoken", 503));
    let err = client.users_delta(None).await.unwrap_err();
    match &err {
        DirectoryError::Http { what, status, .. } => {
            assert_eq!(what, "GET /users/delta page 2");
            assert_eq!(*status, 503);
        }
        other => panic!("expected the failed page, got {other:?}"),
    }
    assert_eq!(delta_requests(&fg).len(), 1 + 3, "three attempts of page 2");
    assert_clean(&fg, &err, "");
}

#[tokio::test]
async fn links_to_another_host_are_refused_before_the_token_goes_there() {
    let (fg, client) = start().await;
    let elsewhere = "http://127.0.0.2:9/v1.0/groups/delta";
    let expect_refused = |result: Result<DeltaRound<GroupChange>, DirectoryError>, what: &str| {
        let err = result.expect_err("a link to another host");
        match &err {
            DirectoryError::Malformed { what: w, message } => {
                assert_eq!(w, what);
                assert!(message.contains("http://127.0.0.2:9"), "{message}");
                assert!(!message.contains("skiptoken") && !message.contains("deltatoken"));
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    };

    // A nextLink, a deltaLink, and a stored link pointing elsewhere.
    fg.inject(
        Fault::new("/groups/delta", 200)
            .body(format!(
                r#"{{"value":[],"@odata.nextLink":"{elsewhere}?$skiptoken=abc"}}"#
            ))
            .times(1),
    );
    expect_refused(client.groups_delta(None).await, "GET /groups/delta page 1");
    fg.inject(
        Fault::new("$skiptoken", 200)
            .body(format!(
                r#"{{"value":[],"@odata.deltaLink":"{elsewhere}?$deltatoken=abc"}}"#
            ))
            .times(1),
    );
    expect_refused(client.groups_delta(None).await, "GET /groups/delta page 2");
    let before = fg.requests().len();
    expect_refused(
        client
            .groups_delta(Some(&format!("{elsewhere}?$deltatoken=abc")))
            .await,
        "GET /groups/delta page 1",
    );
    assert_eq!(fg.requests().len(), before, "nothing was sent");
}

#[tokio::test]
async fn pages_graph_would_never_send_are_malformed_naming_the_page() {
    let (fg, client) = start().await;
    let malformed = |err: DirectoryError| match err {
        DirectoryError::Malformed { what, message } => (what, message),
        other => panic!("expected Malformed, got {other:?}"),
    };
    fg.inject(
        Fault::new("$skiptoken", 200)
            .body(r#"{"value":[]}"#)
            .times(1),
    );
    let (what, message) = malformed(client.groups_delta(None).await.unwrap_err());
    assert_eq!(what, "GET /groups/delta page 2");
    assert!(message.contains("neither"), "{message}");

    fg.inject(
        Fault::new("/users/delta", 200)
            .body(r#"{"value":[{"displayName":"no id"}],"@odata.deltaLink":"x"}"#)
            .times(1),
    );
    let (what, message) = malformed(client.users_delta(None).await.unwrap_err());
    assert_eq!(what, "GET /users/delta page 1");
    assert!(message.contains("without an id"), "{message}");

    let member_without_type =
        r#"{"value":[{"id":"g","members@delta":[{"id":"u"}]}],"@odata.deltaLink":"x"}"#;
    fg.inject(
        Fault::new("/groups/delta", 200)
            .body(member_without_type)
            .times(1),
    );
    let (_, message) = malformed(client.groups_delta(None).await.unwrap_err());
    assert!(message.contains("@odata.type"), "{message}");
}

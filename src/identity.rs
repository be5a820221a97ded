//! The Identity Center identity store: finding the users and groups that Entra's SCIM
//! provisioning created. [`IdentityStore`] is the engine's view; [`SdkIdentityStore`] wraps
//! `aws-sdk-identitystore`; [`resolve`] turns Entra objects into identity-store ids with the
//! cheaper of bulk listing and one look-up per principal.

use crate::aws::AwsError;
use async_trait::async_trait;
use aws_sdk_identitystore::types::{AlternateIdentifier, UniqueAttribute};
use aws_smithy_types::Document;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// A user or group as the identity store lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreEntry {
    /// Identity-store id.
    pub id: String,
    /// `userName` for a user, `displayName` for a group.
    pub name: String,
    /// The `Id`s of its external ids (SCIM sets the Entra object id; the issuer is not
    /// documented, so only the id is compared).
    pub external_ids: Vec<String>,
}

/// Users or groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Users, keyed by `userName`.
    User,
    /// Groups, keyed by `displayName`.
    Group,
}

/// What the engine needs from the identity store.
#[async_trait]
pub trait IdentityStore: Send + Sync {
    /// The id of the user with this `userName` or group with this `displayName`.
    async fn find(&self, kind: Kind, name: &str) -> Result<Option<String>, AwsError>;
    /// Every user or group of the store (paged to the end).
    /// One page (up to 100) of the store's users or groups, and the token of the next page.
    async fn list_page(
        &self,
        kind: Kind,
        token: Option<String>,
    ) -> Result<(Vec<StoreEntry>, Option<String>), AwsError>;
    /// Creates a group; returns its id.
    async fn create_group(&self, display_name: &str, description: &str)
        -> Result<String, AwsError>;
    /// Renames a group.
    async fn rename_group(&self, group_id: &str, display_name: &str) -> Result<(), AwsError>;
    /// Deletes a group.
    async fn delete_group(&self, group_id: &str) -> Result<(), AwsError>;
    /// The group's display name, or `None` when it does not exist.
    async fn group_name(&self, group_id: &str) -> Result<Option<String>, AwsError>;
    /// A user's `userName`, or `None` when the user does not exist.
    async fn user_name(&self, user_id: &str) -> Result<Option<String>, AwsError>;
    /// The group's memberships: membership id → user id (paged to the end).
    async fn memberships(&self, group_id: &str) -> Result<BTreeMap<String, String>, AwsError>;
    /// Adds a user to a group; returns the membership id.
    async fn add_membership(&self, group_id: &str, user_id: &str) -> Result<String, AwsError>;
    /// Removes a membership.
    async fn remove_membership(&self, membership_id: &str) -> Result<(), AwsError>;
    /// Requests sent so far.
    fn calls(&self) -> u64;
}

/// The production [`IdentityStore`].
pub struct SdkIdentityStore {
    client: aws_sdk_identitystore::Client,
    store_id: String,
    calls: AtomicU64,
}

impl SdkIdentityStore {
    /// Wraps a client for one identity store.
    pub fn new(client: aws_sdk_identitystore::Client, store_id: String) -> Self {
        SdkIdentityStore {
            client,
            store_id,
            calls: AtomicU64::new(0),
        }
    }

    fn count(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
    }
}

const SERVICE: &str = "identitystore";

fn is_not_found(e: &AwsError) -> bool {
    e.code() == Some("ResourceNotFoundException")
}

#[async_trait]
impl IdentityStore for SdkIdentityStore {
    async fn find(&self, kind: Kind, name: &str) -> Result<Option<String>, AwsError> {
        let (path, op) = match kind {
            Kind::User => ("userName", "GetUserId"),
            Kind::Group => ("displayName", "GetGroupId"),
        };
        let alt = AlternateIdentifier::UniqueAttribute(
            UniqueAttribute::builder()
                .attribute_path(path)
                .attribute_value(Document::String(name.to_string()))
                .build()
                .map_err(|e| AwsError::malformed(SERVICE, op, e.to_string()))?,
        );
        self.count();
        let result = match kind {
            Kind::User => self
                .client
                .get_user_id()
                .identity_store_id(&self.store_id)
                .alternate_identifier(alt)
                .send()
                .await
                .map(|o| o.user_id)
                .map_err(|e| AwsError::sdk(SERVICE, op, e)),
            Kind::Group => self
                .client
                .get_group_id()
                .identity_store_id(&self.store_id)
                .alternate_identifier(alt)
                .send()
                .await
                .map(|o| o.group_id)
                .map_err(|e| AwsError::sdk(SERVICE, op, e)),
        };
        match result {
            Ok(id) => Ok(Some(id)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn list_page(
        &self,
        kind: Kind,
        token: Option<String>,
    ) -> Result<(Vec<StoreEntry>, Option<String>), AwsError> {
        let ids = |x: Option<Vec<aws_sdk_identitystore::types::ExternalId>>| {
            x.unwrap_or_default().into_iter().map(|x| x.id).collect()
        };
        self.count();
        Ok(match kind {
            Kind::User => {
                let page = self
                    .client
                    .list_users()
                    .identity_store_id(&self.store_id)
                    .max_results(100)
                    .set_next_token(token)
                    .send()
                    .await
                    .map_err(|e| AwsError::sdk(SERVICE, "ListUsers", e))?;
                let entries = page.users.into_iter().map(|u| StoreEntry {
                    name: u.user_name.unwrap_or_default(),
                    external_ids: ids(u.external_ids),
                    id: u.user_id,
                });
                (entries.collect(), page.next_token.filter(|t| !t.is_empty()))
            }
            Kind::Group => {
                let page = self
                    .client
                    .list_groups()
                    .identity_store_id(&self.store_id)
                    .max_results(100)
                    .set_next_token(token)
                    .send()
                    .await
                    .map_err(|e| AwsError::sdk(SERVICE, "ListGroups", e))?;
                let entries = page.groups.into_iter().map(|g| StoreEntry {
                    name: g.display_name.unwrap_or_default(),
                    external_ids: ids(g.external_ids),
                    id: g.group_id,
                });
                (entries.collect(), page.next_token.filter(|t| !t.is_empty()))
            }
        })
    }

    async fn create_group(
        &self,
        display_name: &str,
        description: &str,
    ) -> Result<String, AwsError> {
        self.count();
        let out = self
            .client
            .create_group()
            .identity_store_id(&self.store_id)
            .display_name(display_name)
            .description(description)
            .send()
            .await
            .map_err(|e| AwsError::sdk(SERVICE, "CreateGroup", e))?;
        Ok(out.group_id)
    }

    async fn rename_group(&self, group_id: &str, display_name: &str) -> Result<(), AwsError> {
        self.count();
        let op = |e: aws_smithy_types::error::operation::BuildError| {
            AwsError::malformed(SERVICE, "UpdateGroup", e.to_string())
        };
        let update = aws_sdk_identitystore::types::AttributeOperation::builder()
            .attribute_path("displayName")
            .attribute_value(Document::String(display_name.to_string()))
            .build()
            .map_err(op)?;
        self.client
            .update_group()
            .identity_store_id(&self.store_id)
            .group_id(group_id)
            .operations(update)
            .send()
            .await
            .map_err(|e| AwsError::sdk(SERVICE, "UpdateGroup", e))?;
        Ok(())
    }

    async fn delete_group(&self, group_id: &str) -> Result<(), AwsError> {
        self.count();
        match self
            .client
            .delete_group()
            .identity_store_id(&self.store_id)
            .group_id(group_id)
            .send()
            .await
            .map_err(|e| AwsError::sdk(SERVICE, "DeleteGroup", e))
        {
            Err(e) if !is_not_found(&e) => Err(e),
            _ => Ok(()),
        }
    }

    async fn group_name(&self, group_id: &str) -> Result<Option<String>, AwsError> {
        self.count();
        match self
            .client
            .describe_group()
            .identity_store_id(&self.store_id)
            .group_id(group_id)
            .send()
            .await
            .map_err(|e| AwsError::sdk(SERVICE, "DescribeGroup", e))
        {
            Ok(g) => Ok(Some(g.display_name.unwrap_or_default())),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn user_name(&self, user_id: &str) -> Result<Option<String>, AwsError> {
        self.count();
        match self
            .client
            .describe_user()
            .identity_store_id(&self.store_id)
            .user_id(user_id)
            .send()
            .await
            .map_err(|e| AwsError::sdk(SERVICE, "DescribeUser", e))
        {
            Ok(u) => Ok(Some(u.user_name.unwrap_or_default())),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn memberships(&self, group_id: &str) -> Result<BTreeMap<String, String>, AwsError> {
        let pairs = crate::rate::all_pages(|token| async move {
            self.count();
            let page = self
                .client
                .list_group_memberships()
                .identity_store_id(&self.store_id)
                .group_id(group_id)
                .max_results(100)
                .set_next_token(token)
                .send()
                .await
                .map_err(|e| AwsError::sdk(SERVICE, "ListGroupMemberships", e))?;
            let users = page
                .group_memberships
                .into_iter()
                .filter_map(|m| match m.member_id {
                    Some(aws_sdk_identitystore::types::MemberId::UserId(u)) => {
                        Some((m.membership_id, u))
                    }
                    _ => None,
                });
            Ok((users.collect(), page.next_token))
        })
        .await?;
        Ok(pairs.into_iter().collect())
    }

    async fn add_membership(&self, group_id: &str, user_id: &str) -> Result<String, AwsError> {
        self.count();
        let out = self
            .client
            .create_group_membership()
            .identity_store_id(&self.store_id)
            .group_id(group_id)
            .member_id(aws_sdk_identitystore::types::MemberId::UserId(
                user_id.to_string(),
            ))
            .send()
            .await
            .map_err(|e| AwsError::sdk(SERVICE, "CreateGroupMembership", e))?;
        Ok(out.membership_id)
    }

    async fn remove_membership(&self, membership_id: &str) -> Result<(), AwsError> {
        self.count();
        self.client
            .delete_group_membership()
            .identity_store_id(&self.store_id)
            .membership_id(membership_id)
            .send()
            .await
            .map_err(|e| AwsError::sdk(SERVICE, "DeleteGroupMembership", e))?;
        Ok(())
    }

    fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}

/// An Entra object to find in the identity store.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Wanted {
    /// Entra object id (matched against external ids).
    pub entra_id: String,
    /// `userPrincipalName` for users, `displayName` for groups.
    pub name: String,
}

/// Finds the identity-store id of each wanted object, keyed by Entra object id, in about the
/// fewer calls of listing the store and looking each object up, without knowing the store's
/// size: the store is listed page by page (matching external ids first, then names), but never
/// for more pages than there are objects to find; if it has more, the objects not yet matched
/// are looked up by name (the SCIM issuer that an external-id look-up needs is not
/// documented). So the cost is at most twice the cheaper strategy's, and the listing's when
/// the store is small. `known_size` is how many objects the store is known to hold at least
/// (its size from an earlier listing to the end, or the principal cache's count): when listing
/// them would take more pages than there are objects to find, they are looked up straight
/// away. Objects not found are absent from the map.
pub async fn resolve(
    store: &dyn IdentityStore,
    kind: Kind,
    wanted: &[Wanted],
    known_size: usize,
) -> Result<Resolution, AwsError> {
    let by_entra: BTreeMap<&str, &Wanted> =
        wanted.iter().map(|w| (w.entra_id.as_str(), w)).collect();
    let mut by_name: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for w in wanted {
        by_name
            .entry(name_key(kind, &w.name))
            .or_default()
            .push(w.entra_id.as_str());
    }
    let (mut by_external_id, mut by_store_name) = (BTreeMap::new(), BTreeMap::new());
    let (mut token, mut listed, mut complete) = (None, 0, wanted.is_empty());
    let listing_pays = known_size.div_ceil(LIST_PAGE) < wanted.len();
    let (mut entries_seen, mut to_the_end) = (0, false);
    while listing_pays && !complete && listed < wanted.len() {
        let (entries, next) = store.list_page(kind, token.take()).await?;
        listed += 1;
        entries_seen += entries.len();
        to_the_end = next.is_none();
        for e in entries {
            for x in &e.external_ids {
                if by_entra.contains_key(x.as_str()) {
                    by_external_id.insert(x.clone(), e.id.clone());
                }
            }
            for entra_id in by_name.get(&name_key(kind, &e.name)).into_iter().flatten() {
                by_store_name
                    .entry(entra_id.to_string())
                    .or_insert_with(|| e.id.clone());
            }
        }
        // Every object found by its external id: no later page can change an answer.
        complete = next.is_none() || by_external_id.len() == by_entra.len();
        token = next;
    }
    let mut found = BTreeMap::new();
    for w in wanted {
        let id = match by_external_id
            .get(&w.entra_id)
            .or_else(|| by_store_name.get(&w.entra_id))
        {
            Some(id) => Some(id.clone()),
            None if !complete => store.find(kind, &w.name).await?,
            None => None,
        };
        if let Some(id) = id {
            found.insert(w.entra_id.clone(), id);
        }
    }
    Ok(Resolution {
        ids: found,
        store_size: to_the_end.then_some(entries_seen),
    })
}

/// What [`resolve`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolution {
    /// Identity-store ids by Entra object id.
    pub ids: BTreeMap<String, String>,
    /// How many objects the store holds, when the listing went to its end.
    pub store_size: Option<usize>,
}

/// Objects per `ListUsers` / `ListGroups` page.
const LIST_PAGE: usize = 100;

/// Identity Center compares user names case-insensitively; group names exactly.
fn name_key(kind: Kind, name: &str) -> String {
    match kind {
        Kind::User => name.to_lowercase(),
        Kind::Group => name.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// An identity store in memory that counts calls.
    struct Memory {
        users: Vec<StoreEntry>,
        calls: Mutex<Vec<&'static str>>,
    }

    #[async_trait]
    impl IdentityStore for Memory {
        async fn find(&self, _kind: Kind, name: &str) -> Result<Option<String>, AwsError> {
            self.calls.lock().unwrap().push("find");
            Ok(self
                .users
                .iter()
                .find(|u| u.name.eq_ignore_ascii_case(name))
                .map(|u| u.id.clone()))
        }
        async fn list_page(
            &self,
            _kind: Kind,
            token: Option<String>,
        ) -> Result<(Vec<StoreEntry>, Option<String>), AwsError> {
            self.calls.lock().unwrap().push("list");
            // Pages of two, so the tests can see where paging stops.
            let from: usize = token.map_or(0, |t| t.parse().unwrap());
            let page = self.users.iter().skip(from).take(2).cloned().collect();
            let next = (from + 2 < self.users.len()).then(|| (from + 2).to_string());
            Ok((page, next))
        }
        async fn create_group(&self, _: &str, _: &str) -> Result<String, AwsError> {
            unimplemented!("not used by resolution")
        }
        async fn rename_group(&self, _: &str, _: &str) -> Result<(), AwsError> {
            unimplemented!("not used by resolution")
        }
        async fn delete_group(&self, _: &str) -> Result<(), AwsError> {
            unimplemented!("not used by resolution")
        }
        async fn group_name(&self, _: &str) -> Result<Option<String>, AwsError> {
            unimplemented!("not used by resolution")
        }
        async fn memberships(&self, _: &str) -> Result<BTreeMap<String, String>, AwsError> {
            unimplemented!("not used by resolution")
        }
        async fn user_name(&self, _: &str) -> Result<Option<String>, AwsError> {
            unimplemented!("not used by resolution")
        }
        async fn add_membership(&self, _: &str, _: &str) -> Result<String, AwsError> {
            unimplemented!("not used by resolution")
        }
        async fn remove_membership(&self, _: &str) -> Result<(), AwsError> {
            unimplemented!("not used by resolution")
        }
        fn calls(&self) -> u64 {
            self.calls.lock().unwrap().len() as u64
        }
    }

    fn entry(id: &str, name: &str, ext: &[&str]) -> StoreEntry {
        StoreEntry {
            id: id.into(),
            name: name.into(),
            external_ids: ext.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn wanted(entra_id: &str, name: &str) -> Wanted {
        Wanted {
            entra_id: entra_id.into(),
            name: name.into(),
        }
    }

    fn store(users: Vec<StoreEntry>) -> Memory {
        Memory {
            users,
            calls: Mutex::new(vec![]),
        }
    }

    #[tokio::test]
    async fn a_listing_matches_external_id_before_user_name() {
        // The Entra user e1 was renamed to bob@ but SCIM has not caught up: the external id
        // still finds the right identity-store user, even on a later page than the name.
        let s = store(vec![
            entry("u-bob", "bob@x", &["e2"]),
            entry("u-carol", "CAROL@x", &[]),
            entry("u-alice", "alice@x", &["e1"]),
        ]);
        let want = [
            wanted("e1", "bob@x"),
            wanted("e3", "carol@x"),
            wanted("e4", "nobody@x"),
        ];
        let got = resolve(&s, Kind::User, &want, 0).await.unwrap().ids;
        assert_eq!(got.get("e1").map(String::as_str), Some("u-alice"));
        assert_eq!(
            got.get("e3").map(String::as_str),
            Some("u-carol"),
            "by name, case-insensitively"
        );
        assert!(
            !got.contains_key("e4"),
            "listed to the end: not in the store"
        );
        assert_eq!(*s.calls.lock().unwrap(), vec!["list", "list"]);
    }

    #[tokio::test]
    async fn a_store_larger_than_worth_listing_is_looked_up_after_as_many_pages_as_wanted() {
        // Ten users in pages of two; two wanted: two pages listed, then look-ups for the rest.
        let users = (0..10)
            .map(|i| entry(&format!("u-{i}"), &format!("user{i}@x"), &[]))
            .collect();
        let s = store(users);
        let want = [wanted("e0", "user0@x"), wanted("e9", "user9@x")];
        let got = resolve(&s, Kind::User, &want, 0).await.unwrap().ids;
        assert_eq!(got.get("e0").map(String::as_str), Some("u-0"));
        assert_eq!(got.get("e9").map(String::as_str), Some("u-9"));
        assert_eq!(*s.calls.lock().unwrap(), vec!["list", "list", "find"]);
    }

    #[tokio::test]
    async fn a_listing_to_the_end_counts_the_store_and_one_cut_short_does_not() {
        let users = (0..4)
            .map(|i| entry(&format!("u-{i}"), &format!("user{i}@x"), &[]))
            .collect();
        let s = store(users);
        let want = [
            wanted("e1", "user1@x"),
            wanted("e3", "user3@x"),
            wanted("e9", "nobody@x"),
        ];
        let r = resolve(&s, Kind::User, &want, 0).await.unwrap();
        assert_eq!((r.ids.len(), r.store_size), (2, Some(4)));
        // One wanted object: one page listed, the rest looked up; the size stays unknown.
        let r = resolve(&s, Kind::User, &want[..1], 0).await.unwrap();
        assert_eq!((r.ids.len(), r.store_size), (1, None));
    }

    #[tokio::test]
    async fn a_store_known_to_be_large_is_looked_up_without_listing() {
        let users = (0..10)
            .map(|i| entry(&format!("u-{i}"), &format!("user{i}@x"), &[]))
            .collect();
        let s = store(users);
        let want = [wanted("e3", "user3@x")];
        // The cache knows 150 objects: two pages, more than the one object to find.
        let got = resolve(&s, Kind::User, &want, 150).await.unwrap().ids;
        assert_eq!(got.get("e3").map(String::as_str), Some("u-3"));
        assert_eq!(*s.calls.lock().unwrap(), vec!["find"]);
    }

    #[tokio::test]
    async fn listing_stops_once_every_object_is_found_by_external_id() {
        let users = (0..10)
            .map(|i| {
                entry(
                    &format!("u-{i}"),
                    &format!("user{i}@x"),
                    &[&format!("e{i}")],
                )
            })
            .collect();
        let s = store(users);
        let want = [
            wanted("e0", "user0@x"),
            wanted("e1", "user1@x"),
            wanted("e2", "user2@x"),
        ];
        let got = resolve(&s, Kind::User, &want, 0).await.unwrap().ids;
        assert_eq!(got.len(), 3);
        assert_eq!(*s.calls.lock().unwrap(), vec!["list", "list"]);
        assert!(resolve(&s, Kind::User, &[], 0)
            .await
            .unwrap()
            .ids
            .is_empty());
        assert_eq!(
            s.calls.lock().unwrap().len(),
            2,
            "nothing wanted, nothing read"
        );
    }
}

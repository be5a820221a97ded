//! The Entra tenant as the engine knows it: every group with its direct members and every
//! user, kept current by Graph delta rounds (`/groups/delta`, `/users/delta`) and kept in the
//! state table between runs, so a quiet run reads only what changed in Entra. Nested
//! membership is computed here: delta reports direct changes only.
//!
//! A round either completes or fails the run (the replica is never updated from part of a
//! round). An expired delta link, a replica that cannot be decoded, or one whose last full
//! read is older than [`RESYNC_AFTER`] is read again from the start.

use crate::directory::{
    DeltaRound, DirGroup, DirUser, Directory, DirectoryError, GroupChange, MemberKind, UserChange,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// The state-table cache the replica is kept under.
pub const CACHE_NAME: &str = "tenant";
/// A stream is read in full again after this long (seconds), whatever its deltas said: a
/// daily bound on drift should Graph ever miss a change.
pub const RESYNC_AFTER: u64 = 24 * 3600;
/// A replica with no changes is still rewritten after this long (seconds), so its delta links
/// stay well inside Graph's ~7-day token lifetime.
pub const REFRESH_LINKS_AFTER: u64 = 24 * 3600;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct GroupEntry {
    display_name: String,
    users: BTreeSet<String>,
    groups: BTreeSet<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct UserEntry {
    user_principal_name: String,
    display_name: String,
    account_enabled: bool,
}

/// One delta stream's position.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Stream {
    /// The deltaLink to continue from.
    link: Option<String>,
    /// When the stream was last read from the start (seconds since the epoch).
    full_at: u64,
}

/// Every group and user of the tenant, as of the last delta rounds. Ids are lower-cased.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Replica {
    groups: BTreeMap<String, GroupEntry>,
    users: BTreeMap<String, UserEntry>,
    group_stream: Stream,
    user_stream: Stream,
    /// When this replica was written to the state table.
    written_at: u64,
}

/// What a sync did, for the log and the report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncSummary {
    /// Group objects and user objects the rounds returned.
    pub group_changes: usize,
    /// User objects the rounds returned.
    pub user_changes: usize,
    /// Streams read from the start this time (`groups`, `users`), and why.
    pub full_reads: Vec<String>,
}

impl SyncSummary {
    /// True when the replica differs from the stored one and should be written back.
    pub fn changed(&self) -> bool {
        self.group_changes + self.user_changes > 0 || !self.full_reads.is_empty()
    }
}

impl Replica {
    /// Groups and users held.
    pub fn len(&self) -> (usize, usize) {
        (self.groups.len(), self.users.len())
    }

    /// True when the replica has been written back within [`REFRESH_LINKS_AFTER`] of `now`.
    pub fn links_fresh(&self, now: u64) -> bool {
        now.saturating_sub(self.written_at) < REFRESH_LINKS_AFTER
    }

    /// Every group whose display name is `name`, compared case-insensitively as Graph's
    /// `$filter=displayName eq` does (Entra names are not unique).
    pub fn groups_by_name(&self, name: &str) -> Vec<DirGroup> {
        let name = name.to_lowercase();
        self.groups
            .iter()
            .filter(|(_, g)| g.display_name.to_lowercase() == name)
            .map(|(id, g)| dir_group(id, g))
            .collect()
    }

    /// The group with this object id.
    pub fn group(&self, id: &str) -> Option<DirGroup> {
        let id = id.to_ascii_lowercase();
        self.groups.get(&id).map(|g| dir_group(&id, g))
    }

    /// The group's direct members that the replica knows: users, then groups. `None` when
    /// there is no such group.
    pub fn direct_members(&self, id: &str) -> Option<(Vec<DirUser>, Vec<DirGroup>)> {
        let g = self.groups.get(&id.to_ascii_lowercase())?;
        let users = g.users.iter().filter_map(|u| self.user(u)).collect();
        let groups = g
            .groups
            .iter()
            .filter_map(|n| self.groups.get(n).map(|e| dir_group(n, e)))
            .collect();
        Some((users, groups))
    }

    /// Every group nested in the group at any depth, each once (cycles included), in id
    /// order. `None` when there is no such group.
    pub fn transitive_groups(&self, id: &str) -> Option<Vec<DirGroup>> {
        let nested = self.closure(id)?;
        Some(
            nested
                .iter()
                .filter_map(|n| self.groups.get(*n).map(|e| dir_group(n, e)))
                .collect(),
        )
    }

    /// Every user who is a member of the group directly or through nested groups, each once,
    /// in id order. `None` when there is no such group.
    pub fn transitive_users(&self, id: &str) -> Option<Vec<DirUser>> {
        let root = id.to_ascii_lowercase();
        let nested = self.closure(&root)?;
        let ids: BTreeSet<&String> = std::iter::once(root.as_str())
            .chain(nested.iter().copied())
            .filter_map(|g| self.groups.get(g))
            .flat_map(|g| &g.users)
            .collect();
        Some(ids.into_iter().filter_map(|u| self.user(u)).collect())
    }

    /// The groups reachable from `id` (not `id` itself unless a cycle leads back to it).
    fn closure(&self, id: &str) -> Option<BTreeSet<&str>> {
        let root = self.groups.get(&id.to_ascii_lowercase())?;
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        let mut queue: VecDeque<&str> = root.groups.iter().map(String::as_str).collect();
        while let Some(g) = queue.pop_front() {
            if !seen.insert(g) {
                continue;
            }
            if let Some(e) = self.groups.get(g) {
                queue.extend(e.groups.iter().map(String::as_str));
            }
        }
        seen.retain(|g| self.groups.contains_key(*g));
        Some(seen)
    }

    /// The user with this object id.
    pub fn user(&self, id: &str) -> Option<DirUser> {
        self.users.get(&id.to_ascii_lowercase()).map(|u| DirUser {
            id: id.to_string(),
            user_principal_name: u.user_principal_name.clone(),
            display_name: u.display_name.clone(),
            account_enabled: u.account_enabled,
        })
    }

    /// Applies one groups round's changes, in order.
    fn apply_groups(&mut self, changes: Vec<GroupChange>) {
        for c in changes {
            let id = c.id.to_ascii_lowercase();
            if c.removed {
                self.groups.remove(&id);
                continue;
            }
            let g = self.groups.entry(id).or_default();
            if let Some(name) = c.display_name {
                g.display_name = name;
            }
            for m in c.members {
                let set = match m.kind {
                    MemberKind::User => &mut g.users,
                    MemberKind::Group => &mut g.groups,
                    MemberKind::Other => continue,
                };
                let id = m.id.to_ascii_lowercase();
                if m.removed {
                    set.remove(&id);
                } else {
                    set.insert(id);
                }
            }
        }
    }

    /// Applies one users round's changes, in order.
    fn apply_users(&mut self, changes: Vec<UserChange>) {
        for c in changes {
            let id = c.id.to_ascii_lowercase();
            if c.removed {
                self.users.remove(&id);
                continue;
            }
            let u = self.users.entry(id).or_insert_with(|| UserEntry {
                account_enabled: true,
                ..UserEntry::default()
            });
            if let Some(upn) = c.user_principal_name {
                u.user_principal_name = upn;
            }
            if let Some(name) = c.display_name {
                u.display_name = name;
            }
            if let Some(enabled) = c.account_enabled {
                u.account_enabled = enabled;
            }
        }
    }

    /// The replica as stored: members refer to users and groups by position, which keeps a
    /// large tenant to a few hundred bytes per group.
    pub fn encode(&self) -> Vec<u8> {
        let user_at: BTreeMap<&str, u32> = self
            .users
            .keys()
            .zip(0u32..)
            .map(|(k, i)| (k.as_str(), i))
            .collect();
        let group_at: BTreeMap<&str, u32> = self
            .groups
            .keys()
            .zip(0u32..)
            .map(|(k, i)| (k.as_str(), i))
            .collect();
        let refs = |ids: &BTreeSet<String>, at: &BTreeMap<&str, u32>| -> Vec<Ref> {
            ids.iter()
                .map(|id| match at.get(id.as_str()) {
                    Some(i) => Ref::At(*i),
                    None => Ref::Id(id.clone()),
                })
                .collect()
        };
        let stored = Stored {
            version: STORED_VERSION,
            groups_stream: self.group_stream.clone(),
            users_stream: self.user_stream.clone(),
            users: self
                .users
                .iter()
                .map(|(id, u)| {
                    (
                        id.clone(),
                        u.user_principal_name.clone(),
                        u.display_name.clone(),
                        u.account_enabled,
                    )
                })
                .collect(),
            groups: self
                .groups
                .iter()
                .map(|(id, g)| {
                    (
                        id.clone(),
                        g.display_name.clone(),
                        refs(&g.users, &user_at),
                        refs(&g.groups, &group_at),
                    )
                })
                .collect(),
        };
        // Serializing plain strings, numbers and vectors cannot fail.
        serde_json::to_vec(&stored).unwrap_or_default()
    }

    /// Reads a stored replica; `written_at` is when it was stored.
    pub fn decode(bytes: &[u8], written_at: u64) -> Result<Replica, String> {
        let stored: Stored = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if stored.version != STORED_VERSION {
            return Err(format!(
                "stored as version {}, this build reads {STORED_VERSION}",
                stored.version
            ));
        }
        let user_ids: Vec<String> = stored.users.iter().map(|u| u.0.clone()).collect();
        let group_ids: Vec<String> = stored.groups.iter().map(|g| g.0.clone()).collect();
        let resolve =
            |refs: Vec<Ref>, ids: &[String], what: &str| -> Result<BTreeSet<String>, String> {
                refs.into_iter()
                    .map(|r| match r {
                        Ref::At(i) => ids.get(i as usize).cloned().ok_or_else(|| {
                            format!(
                                "a group refers to {what} {i}, beyond the {} stored",
                                ids.len()
                            )
                        }),
                        Ref::Id(id) => Ok(id),
                    })
                    .collect()
            };
        let mut replica = Replica {
            group_stream: stored.groups_stream,
            user_stream: stored.users_stream,
            written_at,
            ..Replica::default()
        };
        for (id, user_principal_name, display_name, account_enabled) in stored.users {
            replica.users.insert(
                id,
                UserEntry {
                    user_principal_name,
                    display_name,
                    account_enabled,
                },
            );
        }
        for (id, display_name, users, groups) in stored.groups {
            let entry = GroupEntry {
                display_name,
                users: resolve(users, &user_ids, "user")?,
                groups: resolve(groups, &group_ids, "group")?,
            };
            replica.groups.insert(id, entry);
        }
        Ok(replica)
    }
}

const STORED_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Stored {
    version: u32,
    groups_stream: Stream,
    users_stream: Stream,
    /// (id, userPrincipalName, displayName, accountEnabled).
    users: Vec<(String, String, String, bool)>,
    /// (id, displayName, user members, group members).
    groups: Vec<(String, String, Vec<Ref>, Vec<Ref>)>,
}

/// A member: a position in the stored users or groups, or an id the replica does not hold.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Ref {
    At(u32),
    Id(String),
}

fn dir_group(id: &str, g: &GroupEntry) -> DirGroup {
    DirGroup {
        id: id.to_string(),
        display_name: g.display_name.clone(),
    }
}

/// Why a stream is read from the start, or `None` when its delta link can be followed.
fn full_read_reason(stream: &Stream, now: u64) -> Option<String> {
    match &stream.link {
        None => Some("no delta link stored".into()),
        Some(_) if now.saturating_sub(stream.full_at) >= RESYNC_AFTER => {
            Some("last read in full over 24 hours ago".into())
        }
        Some(_) => None,
    }
}

/// One stream's round: from its link when it has a usable one, else (or when Graph says the
/// link expired) from the start. Returns the round and why it was read from the start.
async fn round<T, F>(
    stream: &Stream,
    now: u64,
    read: impl Fn(Option<String>) -> F,
) -> Result<(DeltaRound<T>, Option<String>), DirectoryError>
where
    F: std::future::Future<Output = Result<DeltaRound<T>, DirectoryError>>,
{
    let mut why = full_read_reason(stream, now);
    if why.is_none() {
        match read(stream.link.clone()).await {
            Ok(round) => return Ok((round, None)),
            Err(DirectoryError::DeltaExpired { .. }) => why = Some("delta link expired".into()),
            Err(e) => return Err(e),
        }
    }
    Ok((read(None).await?, why))
}

/// Brings `stored` (or an empty replica) up to date with Graph: groups first, then users, so
/// every user a group round names was present when the users round began.
pub async fn sync(
    directory: &dyn Directory,
    stored: Option<Replica>,
    now: u64,
) -> Result<(Replica, SyncSummary), DirectoryError> {
    let mut replica = stored.unwrap_or_default();
    let mut summary = SyncSummary::default();

    let (groups, why) = round(&replica.group_stream, now, |link| async move {
        directory.groups_delta(link.as_deref()).await
    })
    .await?;
    summary.group_changes = groups.changes.len();
    if let Some(why) = why {
        summary.full_reads.push(format!("groups: {why}"));
        replica.groups.clear();
        replica.group_stream.full_at = now;
    }
    replica.apply_groups(groups.changes);
    replica.group_stream.link = Some(groups.delta_link);

    let (users, why) = round(&replica.user_stream, now, |link| async move {
        directory.users_delta(link.as_deref()).await
    })
    .await?;
    summary.user_changes = users.changes.len();
    if let Some(why) = why {
        summary.full_reads.push(format!("users: {why}"));
        replica.users.clear();
        replica.user_stream.full_at = now;
    }
    replica.apply_users(users.changes);
    replica.user_stream.link = Some(users.delta_link);
    Ok((replica, summary))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::MemberChange;

    fn member(id: &str, kind: MemberKind, removed: bool) -> MemberChange {
        MemberChange {
            id: id.into(),
            kind,
            removed,
        }
    }

    fn group(id: &str, name: Option<&str>, members: Vec<MemberChange>) -> GroupChange {
        GroupChange {
            id: id.into(),
            removed: false,
            display_name: name.map(str::to_string),
            members,
        }
    }

    fn user(id: &str, upn: &str, enabled: bool) -> UserChange {
        UserChange {
            id: id.into(),
            removed: false,
            user_principal_name: Some(upn.into()),
            display_name: Some(upn.to_uppercase()),
            account_enabled: Some(enabled),
        }
    }

    fn world() -> Replica {
        let mut r = Replica::default();
        r.apply_groups(vec![
            group(
                "top",
                Some("Top"),
                vec![
                    member("u1", MemberKind::User, false),
                    member("mid", MemberKind::Group, false),
                    member("device", MemberKind::Other, false),
                ],
            ),
            group(
                "mid",
                Some("Mid"),
                vec![member("leaf", MemberKind::Group, false)],
            ),
            // A long member list split across pages: the same group again.
            group(
                "leaf",
                Some("Leaf"),
                vec![member("u2", MemberKind::User, false)],
            ),
            group(
                "leaf",
                None,
                vec![
                    member("u3", MemberKind::User, false),
                    member("top", MemberKind::Group, false),
                ],
            ),
        ]);
        r.apply_users(vec![
            user("u1", "a@x", true),
            user("u2", "b@x", true),
            user("u3", "c@x", false),
        ]);
        r
    }

    fn ids<T>(v: Option<Vec<T>>, id: impl Fn(&T) -> &str) -> Vec<String> {
        v.unwrap_or_default()
            .iter()
            .map(|x| id(x).to_string())
            .collect()
    }

    #[test]
    fn the_closure_follows_nesting_through_a_cycle_and_each_user_once() {
        let r = world();
        assert_eq!(
            ids(r.transitive_users("top"), |u| &u.id),
            ["u1", "u2", "u3"]
        );
        assert_eq!(
            ids(r.transitive_users("leaf"), |u| &u.id),
            ["u1", "u2", "u3"]
        );
        assert_eq!(
            ids(r.transitive_groups("mid"), |g| &g.id),
            ["leaf", "mid", "top"]
        );
        assert_eq!(
            ids(r.transitive_groups("top"), |g| &g.id),
            ["leaf", "mid", "top"]
        );
        assert!(r.transitive_users("nope").is_none());
        let (users, groups) = r.direct_members("TOP").unwrap();
        assert_eq!((users.len(), groups.len()), (1, 1));
    }

    #[test]
    fn deltas_add_remove_rename_and_delete() {
        let mut r = world();
        r.apply_groups(vec![
            group(
                "mid",
                Some("Middle"),
                vec![member("leaf", MemberKind::Group, true)],
            ),
            GroupChange {
                id: "leaf".into(),
                removed: true,
                display_name: None,
                members: vec![],
            },
        ]);
        r.apply_users(vec![UserChange {
            id: "u1".into(),
            removed: false,
            user_principal_name: None,
            display_name: None,
            account_enabled: Some(false),
        }]);
        assert_eq!(ids(r.transitive_users("top"), |u| &u.id), ["u1"]);
        assert!(!r.transitive_users("top").unwrap()[0].account_enabled);
        assert_eq!(
            r.transitive_users("top").unwrap()[0].user_principal_name,
            "a@x"
        );
        assert!(r.group("leaf").is_none());
        assert_eq!(ids(Some(r.groups_by_name("middle")), |g| &g.id), ["mid"]);
        assert!(r.groups_by_name("Mid").is_empty());
    }

    #[test]
    fn a_replica_survives_encoding_and_rejects_bad_input() {
        let mut r = world();
        r.group_stream.link = Some("https://graph/groups/delta?$deltatoken=1".into());
        r.user_stream.full_at = 42;
        // A member the replica has no object for keeps its id.
        r.apply_groups(vec![group(
            "top",
            None,
            vec![member("ghost", MemberKind::User, false)],
        )]);
        let bytes = r.encode();
        let back = Replica::decode(&bytes, 7).unwrap();
        assert_eq!(back, Replica { written_at: 7, ..r });
        assert!(Replica::decode(b"{", 0).is_err());
        let bad = String::from_utf8(bytes)
            .unwrap()
            .replacen("\"version\":1", "\"version\":9", 1);
        assert!(Replica::decode(bad.as_bytes(), 0)
            .unwrap_err()
            .contains("version 9"));
    }

    #[tokio::test(start_paused = true)]
    async fn sync_follows_links_and_starts_over_when_graph_expires_them() {
        use crate::fakes::{FakeDirectory, Tenant, TenantGroup};
        let mut t = Tenant::default();
        for (id, upn) in [("u1", "a@x"), ("u2", "b@x")] {
            t.users.insert(
                id.into(),
                DirUser {
                    id: id.into(),
                    user_principal_name: upn.into(),
                    display_name: upn.into(),
                    account_enabled: true,
                },
            );
        }
        t.groups.insert(
            "top".into(),
            TenantGroup {
                display_name: "Top".into(),
                members: ["u1".to_string(), "inner".to_string()].into(),
            },
        );
        t.groups.insert(
            "inner".into(),
            TenantGroup {
                display_name: "Inner".into(),
                members: ["u2".to_string()].into(),
            },
        );
        let graph = FakeDirectory::new(FakeDirectory::production_settings(), t);

        let (first, summary) = sync(&graph, None, 100).await.unwrap();
        assert_eq!(summary.full_reads.len(), 2, "{summary:?}");
        assert_eq!(ids(first.transitive_users("top"), |u| &u.id), ["u1", "u2"]);

        // Nothing changed: nothing to write back.
        let (quiet, summary) = sync(&graph, Some(first.clone()), 200).await.unwrap();
        assert!(!summary.changed(), "{summary:?}");
        assert_eq!(quiet.transitive_users("top"), first.transitive_users("top"));

        // u2 leaves the nested group: the closure loses it.
        graph.with_tenant(|t| t.groups.get_mut("inner").unwrap().members.clear());
        let (after, summary) = sync(&graph, Some(quiet), 300).await.unwrap();
        assert_eq!(summary.group_changes, 1);
        assert_eq!(ids(after.transitive_users("top"), |u| &u.id), ["u1"]);

        // Graph forgets the links: both streams are read again, to the same answer.
        graph.expire_delta_links();
        let (again, summary) = sync(&graph, Some(after.clone()), 400).await.unwrap();
        assert_eq!(
            summary.full_reads,
            ["groups: delta link expired", "users: delta link expired"]
        );
        assert_eq!(again.transitive_users("top"), after.transitive_users("top"));
        assert_eq!(again.group_stream.full_at, 400);
    }

    #[test]
    fn streams_read_from_the_start_without_a_link_or_after_a_day() {
        let none = Stream::default();
        assert!(full_read_reason(&none, 0).is_some());
        let fresh = Stream {
            link: Some("l".into()),
            full_at: 1_000,
        };
        assert!(full_read_reason(&fresh, 1_000 + RESYNC_AFTER - 1).is_none());
        assert!(full_read_reason(&fresh, 1_000 + RESYNC_AFTER).is_some());
    }
}

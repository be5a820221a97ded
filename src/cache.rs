//! Values a run reads from AWS and keeps in the state table so the next quiet run need not
//! read them again: permission set names (which never change for an ARN), the organization
//! (refreshed on Organizations events and at most `audit.every_minutes` old), and the
//! identity-store ids of Entra objects (refreshed on SCIM create and delete events and at most
//! `audit.period_hours` old). None of them decides a deletion on its own: a cached value only
//! saves a read of something that changes rarely and says when it does.
//!
//! A cache that cannot be read is ignored with a warning (the value is read afresh), and one
//! that cannot be written leaves the next run to read afresh: neither fails a run.

use crate::model::AccountId;
use crate::scope::Organization;
use crate::state::{Cached, StateStore};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Cache names in the state table.
pub const PERMISSION_SETS: &str = "permission-sets";
/// The organization snapshot.
pub const ORGANIZATION: &str = "organization";
/// Identity-store ids of Entra objects.
pub const PRINCIPALS: &str = "principals";

/// The caches a run reads afresh instead of trusting, because an event says they changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Refresh {
    /// An account was created, moved or retagged.
    pub organization: bool,
    /// Identity Center users or groups were created or deleted (their ids may have changed).
    pub principals: bool,
}

impl Refresh {
    /// Everything.
    pub const ALL: Refresh = Refresh {
        organization: true,
        principals: true,
    };

    /// What either asks for (events merged into one run).
    pub fn merge(self, other: Refresh) -> Refresh {
        Refresh {
            organization: self.organization || other.organization,
            principals: self.principals || other.principals,
        }
    }
}

/// The organization as the scopes need it: the snapshot and the account the tool runs in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrgView {
    /// Whether account tags were read.
    pub with_tags: bool,
    /// The snapshot.
    pub organization: Organization,
    /// The caller's account, when the management account had to be told apart from it.
    pub caller: Option<AccountId>,
}

/// Identity-store ids by Entra object id, for users and for groups.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principals {
    /// When the cache was started empty (seconds since the epoch): it is rebuilt after
    /// `audit.period_hours`.
    pub built_at: u64,
    /// Users: Entra object id → identity-store user id.
    pub users: BTreeMap<String, String>,
    /// Groups: Entra object id → identity-store group id.
    pub groups: BTreeMap<String, String>,
    /// Users in the store, as counted by the last listing to its end.
    #[serde(default)]
    pub users_in_store: Option<usize>,
    /// Groups in the store, likewise.
    #[serde(default)]
    pub groups_in_store: Option<usize>,
}

/// The cached value `name` as JSON, with when it was written; `None` when there is none or it
/// cannot be decoded (a warning: it is read afresh).
pub async fn load<T: DeserializeOwned>(state: &dyn StateStore, name: &str) -> Option<(T, u64)> {
    let c = read(state, name).await?;
    match serde_json::from_slice(&c.bytes) {
        Ok(v) => Some((v, c.written_at)),
        Err(e) => {
            tracing::warn!(cache = name, error = %e, "a cached value is unreadable; reading afresh");
            None
        }
    }
}

/// The cached value `name` as stored; `None` when there is none or it cannot be read (a
/// warning: for example a chunk missing because a writer was swapping it), so the caller
/// reads afresh.
pub async fn read(state: &dyn StateStore, name: &str) -> Option<Cached> {
    match state.cache(name).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(cache = name, error = %e, "a cached value could not be read; reading afresh");
            None
        }
    }
}

/// Writes the cached value `name`; a failure is a warning (the next run reads afresh).
pub async fn store<T: Serialize>(state: &dyn StateStore, name: &str, value: &T, now: u64) {
    let bytes = match serde_json::to_vec(value) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(cache = name, error = %e, "could not encode a cached value");
            return;
        }
    };
    let cached = Cached {
        written_at: now,
        bytes,
    };
    if let Err(e) = state.put_cache(name, &cached).await {
        tracing::warn!(cache = name, error = %e, "could not store a cached value; the next run reads afresh");
    }
}

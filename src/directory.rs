//! Microsoft Entra, read through Microsoft Graph's delta rounds: every group with its direct
//! members (`/groups/delta`) and every user (`/users/delta`), from the start or from a stored
//! deltaLink. The [`Directory`] trait is what the engine needs (the tenant replica in
//! [`crate::tenant`] is built from it); [`GraphClient`] is the production adapter (app-only
//! client-credentials token, paging, `Retry-After`).
//!
//! A round either returns the complete answer or fails: a page that still fails after its
//! retries fails the whole round, so the engine never plans from a partial member list.

use crate::model::{Guid, Secret};
use crate::retry::Backoff;
use async_trait::async_trait;
use reqwest::{StatusCode, Url};
use serde::Deserialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// An Entra group.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DirGroup {
    /// Object id.
    pub id: String,
    /// Display name (not unique in Entra).
    pub display_name: String,
}

/// An Entra user.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DirUser {
    /// Object id (SCIM's default externalId).
    pub id: String,
    /// User principal name (SCIM's default userName).
    pub user_principal_name: String,
    /// Display name.
    pub display_name: String,
    /// Whether the account can sign in.
    pub account_enabled: bool,
}

/// A failed directory read.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    /// The token endpoint refused the app's credentials.
    #[error("Entra token request failed ({status}): {detail}")]
    Auth {
        /// HTTP status.
        status: u16,
        /// The identity platform's error code and description (never the secret).
        detail: String,
    },
    /// Graph answered with an error, after retries where it was transient.
    #[error("Graph {what} failed with HTTP {status}{}: {message}", code.as_deref().map(|c| format!(" {c}")).unwrap_or_default())]
    Http {
        /// Which read, e.g. `GET /groups/{id}/transitiveMembers page 3`.
        what: String,
        /// HTTP status.
        status: u16,
        /// Graph's error code, when it sent one.
        code: Option<String>,
        /// Graph's message.
        message: String,
    },
    /// The request did not get an answer.
    #[error("Graph {what} could not be sent: {message}")]
    Network {
        /// Which read.
        what: String,
        /// The transport error.
        message: String,
    },
    /// A stored deltaLink is no longer valid: the delta state must be built again.
    #[error("Graph {what}: the delta link has expired ({message}); a full delta round is needed")]
    DeltaExpired {
        /// Which read.
        what: String,
        /// Graph's message.
        message: String,
    },
    /// Graph answered something that is not the JSON it documents.
    #[error("Graph {what} returned a malformed response: {message}")]
    Malformed {
        /// Which read.
        what: String,
        /// What was wrong.
        message: String,
    },
}

/// What a member reference in a group's `members@delta` points at (`@odata.type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MemberKind {
    /// `#microsoft.graph.user`.
    User,
    /// `#microsoft.graph.group`.
    Group,
    /// Anything else (devices, service principals, org contacts): never a principal here.
    Other,
}

/// One entry of a group's `members@delta`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberChange {
    /// The member's object id.
    pub id: String,
    /// What it is.
    pub kind: MemberKind,
    /// `true` when the entry carries `@removed` (the member left the group).
    pub removed: bool,
}

/// One group object of a `/groups/delta` round. The same group may appear several times in
/// a round (Graph splits long member lists across pages); apply them in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupChange {
    /// The group's object id.
    pub id: String,
    /// `true` when the group carries `@removed` (deleted, or out of the app's view).
    pub removed: bool,
    /// `displayName`, when Graph sent it (a changed group need not repeat it).
    pub display_name: Option<String>,
    /// `members@delta`, in the order Graph sent them.
    pub members: Vec<MemberChange>,
}

/// One user object of a `/users/delta` round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserChange {
    /// The user's object id.
    pub id: String,
    /// `true` when the user carries `@removed`.
    pub removed: bool,
    /// `userPrincipalName`, when sent.
    pub user_principal_name: Option<String>,
    /// `displayName`, when sent.
    pub display_name: Option<String>,
    /// `accountEnabled`, when sent.
    pub account_enabled: Option<bool>,
}

/// A complete delta round: every page followed to the `@odata.deltaLink`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeltaRound<T> {
    /// The changes since the link the round started from (everything, for a first round).
    pub changes: Vec<T>,
    /// The `@odata.deltaLink` to start the next round from.
    pub delta_link: String,
}

/// What the engine needs from the directory.
#[async_trait]
pub trait Directory: Send + Sync {
    /// One `/groups/delta?$select=displayName,members` round: from the start when `link` is
    /// `None`, else from a stored deltaLink. An expired or unknown link (410 Gone, or
    /// `syncStateNotFound`) is [`DirectoryError::DeltaExpired`]: start again from `None`.
    async fn groups_delta(
        &self,
        link: Option<&str>,
    ) -> Result<DeltaRound<GroupChange>, DirectoryError>;
    /// One `/users/delta?$select=userPrincipalName,displayName,accountEnabled` round, as
    /// [`Directory::groups_delta`].
    async fn users_delta(
        &self,
        link: Option<&str>,
    ) -> Result<DeltaRound<UserChange>, DirectoryError>;
    /// Requests sent so far (for the run report).
    fn calls(&self) -> u64;
}

/// How to reach Graph.
#[derive(Clone, Debug)]
pub struct GraphSettings {
    /// Graph base URL, e.g. `https://graph.microsoft.com/v1.0`.
    pub graph_url: String,
    /// Identity platform base URL, e.g. `https://login.microsoftonline.com`.
    pub login_url: String,
    /// Tenant id.
    pub tenant_id: Guid,
    /// App registration's client id.
    pub client_id: Guid,
    /// App registration's client secret.
    pub client_secret: Secret,
    /// Retry policy for 429 / 5xx / network failures.
    pub backoff: Backoff,
}

/// The production [`Directory`]: Microsoft Graph over HTTPS.
pub struct GraphClient {
    http: reqwest::Client,
    settings: GraphSettings,
    base: Url,
    token: tokio::sync::Mutex<Option<(Secret, Instant)>>,
    calls: AtomicU64,
}

/// Delta pages are sized by `Prefer: odata.maxpagesize` (delta ignores `$top`); Graph caps the
/// value itself (200 objects), so asking for the listing ceiling just means "as large as allowed".
const DELTA_PREFER: &str = "odata.maxpagesize=999";
/// `$select` of the groups delta round: `members` makes Graph send `members@delta`.
const GROUP_DELTA_FIELDS: &str = "displayName,members";
/// `$select` of the users delta round.
const USER_DELTA_FIELDS: &str = "userPrincipalName,displayName,accountEnabled";
/// Graph error codes that mean "this delta state is gone: start a full round" (with any status).
const DELTA_EXPIRED_CODES: &[&str] = &["syncStateNotFound", "resyncRequired"];
/// Refresh the token this long before Entra says it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(300);

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    expires_in: u64,
}

/// One page of a delta round: `value` plus exactly one of the two links.
#[derive(Deserialize)]
struct DeltaPage<T> {
    value: Vec<T>,
    #[serde(rename = "@odata.nextLink")]
    next_link: Option<String>,
    #[serde(rename = "@odata.deltaLink")]
    delta_link: Option<String>,
}

/// A group of `/groups/delta`. `id` is optional here so that its absence is reported as a
/// malformed page naming the page, not as a serde error about a missing field.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeltaGroup {
    id: Option<String>,
    /// Present (`{"reason": …}`) when the group was deleted; its content does not matter.
    #[serde(rename = "@removed")]
    removed: Option<serde::de::IgnoredAny>,
    display_name: Option<String>,
    #[serde(rename = "members@delta")]
    members: Option<Vec<DeltaMember>>,
}

/// One entry of `members@delta`.
#[derive(Deserialize)]
struct DeltaMember {
    #[serde(rename = "@odata.type")]
    odata_type: Option<String>,
    id: Option<String>,
    #[serde(rename = "@removed")]
    removed: Option<serde::de::IgnoredAny>,
}

/// A user of `/users/delta`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeltaUser {
    id: Option<String>,
    #[serde(rename = "@removed")]
    removed: Option<serde::de::IgnoredAny>,
    user_principal_name: Option<String>,
    display_name: Option<String>,
    account_enabled: Option<bool>,
}

impl GraphClient {
    /// Builds the client. Fails only on an unusable base URL.
    pub fn new(settings: GraphSettings) -> Result<GraphClient, DirectoryError> {
        let malformed = |message: String| DirectoryError::Malformed {
            what: "configuration".into(),
            message,
        };
        let base = Url::parse(settings.graph_url.trim_end_matches('/'))
            .map_err(|e| malformed(format!("graph_url {:?}: {e}", settings.graph_url)))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("entra-sso-sync/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| malformed(format!("HTTP client: {e}")))?;
        Ok(GraphClient {
            http,
            settings,
            base,
            token: tokio::sync::Mutex::new(None),
            calls: AtomicU64::new(0),
        })
    }

    /// A cached app-only token, fetched again shortly before it expires or after a 401.
    async fn token(&self, force: bool) -> Result<Secret, DirectoryError> {
        let mut cached = self.token.lock().await;
        if let Some((token, expires)) = cached.as_ref() {
            if !force && Instant::now() + TOKEN_MARGIN < *expires {
                return Ok(token.clone());
            }
        }
        let url = format!(
            "{}/{}/oauth2/v2.0/token",
            self.settings.login_url.trim_end_matches('/'),
            self.settings.tenant_id
        );
        let form = [
            ("client_id", self.settings.client_id.as_str()),
            ("client_secret", self.settings.client_secret.expose()),
            ("scope", "https://graph.microsoft.com/.default"),
            ("grant_type", "client_credentials"),
        ];
        let what = "token request";
        let resp = self
            .send_with_retry(what, || self.http.post(&url).form(&form))
            .await?;
        let status = resp.status();
        let body = resp.text().await.map_err(|e| DirectoryError::Network {
            what: what.into(),
            message: e.without_url().to_string(),
        })?;
        if !status.is_success() {
            return Err(DirectoryError::Auth {
                status: status.as_u16(),
                detail: token_error_detail(&body),
            });
        }
        let parsed: TokenResponse =
            serde_json::from_str(&body).map_err(|e| DirectoryError::Malformed {
                what: what.into(),
                message: e.to_string(),
            })?;
        let token = Secret::new(parsed.access_token);
        *cached = Some((
            token.clone(),
            Instant::now() + Duration::from_secs(parsed.expires_in),
        ));
        Ok(token)
    }

    /// Sends a request, retrying 429, 5xx and transport failures with backoff and
    /// `Retry-After`. Returns the last response (success or not) or the transport error.
    async fn send_with_retry(
        &self,
        what: &str,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, DirectoryError> {
        let backoff = self.settings.backoff;
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.calls.fetch_add(1, Ordering::Relaxed);
            let result = build().send().await;
            let retry_after = match &result {
                Ok(resp) if is_transient(resp.status()) => Some(retry_after(resp)),
                Ok(_) => None,
                Err(_) => Some(None),
            };
            match retry_after {
                Some(after) if attempt < backoff.max_attempts => {
                    let delay = backoff.delay(attempt - 1, after);
                    tracing::warn!(
                        what,
                        attempt,
                        delay_ms = delay.as_millis() as u64,
                        "Graph request failed transiently; retrying"
                    );
                    tokio::time::sleep(delay).await;
                }
                _ => {
                    return result.map_err(|e| DirectoryError::Network {
                        what: what.into(),
                        message: e.without_url().to_string(),
                    })
                }
            }
        }
    }

    /// GETs a Graph URL as JSON with extra request headers, with the bearer token (refreshed
    /// once on 401). Any non-success answer, 404 included, is [`DirectoryError::Http`].
    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        url: &Url,
        what: &str,
        headers: &[(&str, &str)],
    ) -> Result<T, DirectoryError> {
        let mut refreshed = false;
        loop {
            let token = self.token(refreshed).await?;
            let resp = self
                .send_with_retry(what, || {
                    headers.iter().fold(
                        self.http.get(url.clone()).bearer_auth(token.expose()),
                        |req, (name, value)| req.header(*name, *value),
                    )
                })
                .await?;
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && !refreshed {
                refreshed = true;
                continue;
            }
            let body = resp.bytes().await.map_err(|e| DirectoryError::Network {
                what: what.into(),
                message: e.without_url().to_string(),
            })?;
            if !status.is_success() {
                let (code, message) = graph_error(&body);
                return Err(DirectoryError::Http {
                    what: what.into(),
                    status: status.as_u16(),
                    code,
                    message: redact_paging_tokens(message, url),
                });
            }
            return serde_json::from_slice(&body).map_err(|e| DirectoryError::Malformed {
                what: what.into(),
                message: e.to_string(),
            });
        }
    }

    /// One delta round: the first page (`link`, or `path?$select=…`), then every
    /// `@odata.nextLink` until a page carries the `@odata.deltaLink`. Any page failing (after
    /// `send_with_retry`'s retries) fails the round: a partial round would be taken for the
    /// whole change set and silently lose the rest.
    async fn delta_round<T, C>(
        &self,
        path: &str,
        select: &str,
        link: Option<&str>,
        convert: impl Fn(T, &str) -> Result<C, DirectoryError>,
    ) -> Result<DeltaRound<C>, DirectoryError>
    where
        T: serde::de::DeserializeOwned,
    {
        let what = format!("GET {path}");
        let mut url = match link {
            None => self.url(path, &[("$select", select)]),
            Some(stored) => {
                self.checked_link(stored, &format!("{what} page 1"), "stored deltaLink")?
            }
        };
        let mut changes = Vec::new();
        let mut page_no = 0u32;
        loop {
            page_no += 1;
            let page_what = format!("{what} page {page_no}");
            let page: DeltaPage<T> = self
                .get_json(&url, &page_what, &[("Prefer", DELTA_PREFER)])
                .await
                .map_err(delta_expired)?;
            for value in page.value {
                changes.push(convert(value, &page_what)?);
            }
            // A nextLink wins over a deltaLink: the round is only complete on the last page.
            if let Some(next) = page.next_link {
                url = self.checked_link(&next, &page_what, "@odata.nextLink")?;
            } else if let Some(delta_link) = page.delta_link {
                // Checked now, so that the next round never sends the token elsewhere.
                self.checked_link(&delta_link, &page_what, "@odata.deltaLink")?;
                return Ok(DeltaRound {
                    changes,
                    delta_link,
                });
            } else {
                return Err(DirectoryError::Malformed {
                    what: page_what,
                    message: "the page has neither @odata.nextLink nor @odata.deltaLink".into(),
                });
            }
        }
    }

    /// A link Graph sent (or one stored from it), `label`led in errors, must point back at the
    /// configured Graph origin before it is followed: the bearer token goes with it. Errors
    /// name the origin only, never the path or query (which carry paging and delta tokens).
    fn checked_link(&self, link: &str, what: &str, label: &str) -> Result<Url, DirectoryError> {
        let url = Url::parse(link).map_err(|e| DirectoryError::Malformed {
            what: what.into(),
            message: format!("{label} is not a URL: {e}"),
        })?;
        if url.origin() != self.base.origin() {
            return Err(DirectoryError::Malformed {
                what: what.into(),
                message: format!(
                    "{label} points at {}, not at the configured Graph host",
                    url.origin().ascii_serialization()
                ),
            });
        }
        Ok(url)
    }

    fn url(&self, path: &str, query: &[(&str, &str)]) -> Url {
        let mut url = self.base.clone();
        url.set_path(&format!(
            "{}{}",
            self.base.path().trim_end_matches('/'),
            path
        ));
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        url
    }
}

#[async_trait]
impl Directory for GraphClient {
    async fn groups_delta(
        &self,
        link: Option<&str>,
    ) -> Result<DeltaRound<GroupChange>, DirectoryError> {
        self.delta_round("/groups/delta", GROUP_DELTA_FIELDS, link, group_change)
            .await
    }

    async fn users_delta(
        &self,
        link: Option<&str>,
    ) -> Result<DeltaRound<UserChange>, DirectoryError> {
        self.delta_round("/users/delta", USER_DELTA_FIELDS, link, user_change)
            .await
    }

    fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}

/// A delta value without an `id` cannot be applied to anything: the page is malformed.
fn required_id(id: Option<String>, what: &str, entry: &str) -> Result<String, DirectoryError> {
    id.filter(|id| !id.is_empty())
        .ok_or_else(|| DirectoryError::Malformed {
            what: what.into(),
            message: format!("{entry} without an id"),
        })
}

fn group_change(g: DeltaGroup, what: &str) -> Result<GroupChange, DirectoryError> {
    let members = g
        .members
        .unwrap_or_default()
        .into_iter()
        .map(|m| {
            // A member whose type is missing cannot be classified; guessing "not a principal"
            // would drop a removal and leave access in place, so the page is refused instead.
            let kind = match m.odata_type.as_deref() {
                Some("#microsoft.graph.user") => MemberKind::User,
                Some("#microsoft.graph.group") => MemberKind::Group,
                Some(_) => MemberKind::Other,
                None => {
                    return Err(DirectoryError::Malformed {
                        what: what.into(),
                        message: "a members@delta entry without @odata.type".into(),
                    })
                }
            };
            Ok(MemberChange {
                id: required_id(m.id, what, "a members@delta entry")?,
                kind,
                removed: m.removed.is_some(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(GroupChange {
        id: required_id(g.id, what, "a group")?,
        removed: g.removed.is_some(),
        display_name: g.display_name,
        members,
    })
}

fn user_change(u: DeltaUser, what: &str) -> Result<UserChange, DirectoryError> {
    Ok(UserChange {
        id: required_id(u.id, what, "a user")?,
        removed: u.removed.is_some(),
        user_principal_name: u.user_principal_name,
        display_name: u.display_name,
        account_enabled: u.account_enabled,
    })
}

/// 410 Gone, or Graph's "sync state is gone" codes with any status: the stored deltaLink is
/// useless and only a full round (`link: None`) can rebuild the state.
fn delta_expired(e: DirectoryError) -> DirectoryError {
    match e {
        DirectoryError::Http {
            what,
            status,
            code,
            message,
        } if status == 410
            || code.as_deref().is_some_and(|c| {
                DELTA_EXPIRED_CODES
                    .iter()
                    .any(|known| c.eq_ignore_ascii_case(known))
            }) =>
        {
            DirectoryError::DeltaExpired { what, message }
        }
        other => other,
    }
}

/// Graph's message with the request's `$skiptoken` / `$deltatoken` values cut out, should it
/// echo them: errors name the request by path and page number only.
fn redact_paging_tokens(message: String, url: &Url) -> String {
    url.query_pairs()
        .filter(|(k, v)| {
            (k.eq_ignore_ascii_case("$skiptoken") || k.eq_ignore_ascii_case("$deltatoken"))
                && !v.is_empty()
        })
        .fold(message, |m, (_, v)| m.replace(v.as_ref(), "…"))
}

fn is_transient(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

fn retry_after(resp: &reqwest::Response) -> Option<Duration> {
    resp.headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// Graph's `{"error":{"code","message"}}`, or the first bytes of whatever came instead.
fn graph_error(body: &[u8]) -> (Option<String>, String) {
    #[derive(Deserialize)]
    struct Envelope {
        error: Inner,
    }
    #[derive(Deserialize)]
    struct Inner {
        code: Option<String>,
        message: Option<String>,
    }
    match serde_json::from_slice::<Envelope>(body) {
        Ok(e) => (e.error.code, e.error.message.unwrap_or_default()),
        Err(_) => (None, snippet(body)),
    }
}

/// The identity platform's `error` and `error_description`; never echoes the request.
fn token_error_detail(body: &str) -> String {
    #[derive(Deserialize)]
    struct TokenError {
        error: Option<String>,
        error_description: Option<String>,
    }
    match serde_json::from_str::<TokenError>(body) {
        Ok(e) => format!(
            "{}: {}",
            e.error.unwrap_or_default(),
            e.error_description
                .unwrap_or_default()
                .lines()
                .next()
                .unwrap_or_default()
        ),
        Err(_) => snippet(body.as_bytes()),
    }
}

fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut s: String = text.chars().take(200).collect();
    if text.chars().count() > 200 {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graph_errors_are_read_from_the_envelope_or_summarised() {
        let (code, msg) =
            graph_error(br#"{"error":{"code":"Request_ResourceNotFound","message":"gone"}}"#);
        assert_eq!(code.as_deref(), Some("Request_ResourceNotFound"));
        assert_eq!(msg, "gone");
        let (code, msg) = graph_error(&[b'x'; 500]);
        assert!(code.is_none());
        assert_eq!(msg.chars().count(), 201);
    }

    #[test]
    fn gone_or_sync_state_codes_are_delta_expiry_and_other_errors_stay() {
        let http = |status, code: Option<&str>| DirectoryError::Http {
            what: "GET /groups/delta page 1".into(),
            status,
            code: code.map(str::to_string),
            message: "m".into(),
        };
        for e in [
            http(410, None),
            http(400, Some("syncStateNotFound")),
            http(400, Some("ResyncRequired")),
        ] {
            assert!(
                matches!(delta_expired(e), DirectoryError::DeltaExpired { ref what, .. } if what == "GET /groups/delta page 1")
            );
        }
        assert!(matches!(
            delta_expired(http(404, Some("Request_ResourceNotFound"))),
            DirectoryError::Http { status: 404, .. }
        ));
    }

    #[test]
    fn paging_and_delta_tokens_are_cut_from_graph_messages() {
        let url = Url::parse(
            "https://graph.example/v1.0/groups/delta?$deltatoken=SECRETISH&$select=displayName",
        )
        .unwrap();
        assert_eq!(
            redact_paging_tokens("token SECRETISH is bad; displayName".into(), &url),
            "token … is bad; displayName"
        );
    }

    #[test]
    fn token_errors_keep_only_the_first_line_of_the_description() {
        let d = token_error_detail(
            r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret.\r\nTrace ID: x"}"#,
        );
        assert_eq!(d, "invalid_client: AADSTS7000215: Invalid client secret.");
    }
}

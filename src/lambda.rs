//! The AWS Lambda entry point's logic, kept out of the binary so it can be tested without the
//! Lambda runtime: [`classify`] turns any JSON event into an [`Invocation`] (pure, no I/O), and
//! [`App::handle`] turns that into a [`RunRequest`] for the same [`Engine`] the command line
//! uses, then logs the report once, prints CloudWatch Embedded Metric Format (EMF) metrics and
//! returns the report.
//!
//! # Events
//!
//! | Event | Recognised by | Runs |
//! | --- | --- | --- |
//! | EventBridge schedule rule | `source: aws.events`, `detail-type: Scheduled Event` | full, trigger `schedule` |
//! | EventBridge Scheduler default notification | `source: aws.scheduler` (`detail` may be the string `"{}"`) | full, `schedule` |
//! | EventBridge Scheduler `Input` | `{"action": "reconcile"}` | full, `schedule` |
//! | Identity Center change (SCIM, API, console) | `detail-type: AWS API Call via CloudTrail`, `detail.eventSource` `identitystore-scim.amazonaws.com`, `identitystore.amazonaws.com` or `sso-directory.amazonaws.com` | full, `scim-event:<eventName>` / `identitystore-event:<eventName>` |
//! | New account | Organizations `CreateAccountResult` with `state: SUCCEEDED` | that account, `account:<id>` |
//! | Moved or retagged account | Organizations `MoveAccount`, `TagResource` / `UntagResource` on a 12-digit id | that account, `account:<id>` |
//! | Entra group changed | `source: entra-sso-sync`, `detail-type: Entra Group Changed`, `detail.group_id` | rules whose group is or contains it, `entra-group:<id>` |
//! | Configuration uploaded | `source: aws.s3`, `detail-type: Object Created` | full, `config-changed` |
//! | Manual | `{"action": "plan" \| "apply", "dry_run": bool, "allow_deletions": N}` | full, `manual` |
//! | SQS batch of the above | `Records[].eventSource == "aws:sqs"`, each `body` an EventBridge event | one merged run, `sqs-batch(N events)` |
//!
//! Recognised events that change nothing (a CreateAccountResult that is not `SUCCEEDED`, a
//! failed or read-only API call, tags on something other than an account) are *skipped*: no
//! run, a response saying why. Anything else is an [`EventError`] and changes nothing.
//!
//! Whatever the event, a deployment in dry-run mode (`DRY_RUN=true`) only plans.

use crate::aws::load_config;
use crate::cache::Refresh;
use crate::config::{Config, ConfigError, IdentityStoreId, InstanceArn};
use crate::engine::{ConnectError, Engine, EngineError, Mode, RunRequest, Target};
use crate::model::{AccountId, Guid};
use crate::report::{Outcome, Report};
use serde_json::{json, Map, Value};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The CloudWatch namespace of the EMF metrics.
pub const METRICS_NAMESPACE: &str = "EntraSsoSync";

/// How long before the Lambda timeout a run stops starting changes, so that the requests in
/// flight can settle and the run be recorded: 60 s, or a fifth of the time left when an
/// invocation has less than five minutes (see [`run_deadline`]).
pub const SAFETY_MARGIN: Duration = Duration::from_secs(60);

/// The report logged once per run is cut down to about this size (CloudWatch Logs accepts
/// events of up to 256 KB).
pub const MAX_LOGGED_REPORT_BYTES: usize = 200_000;

/// The report returned is cut down to about this size (a synchronous Lambda response may be
/// 6 MB at most).
pub const MAX_RESPONSE_BYTES: usize = 5_000_000;

/// Entries kept per list when a report is cut down.
const KEPT_WHEN_CUT: usize = 20;
/// The longest piece of an event quoted back in an error.
const QUOTE_MAX: usize = 64;
/// Keys named in an error about an unrecognised event.
const KEYS_MAX: usize = 8;

/// CloudTrail event sources whose calls change Identity Center users, groups or memberships.
const IDENTITY_SOURCES: [&str; 3] = [
    "identitystore-scim.amazonaws.com",
    "identitystore.amazonaws.com",
    "sso-directory.amazonaws.com",
];

/// What an event asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    /// What started it, recorded with the run: `schedule`, `scim-event:CreateUser`,
    /// `account:<id>`, `entra-group:<id>`, `manual`, `config-changed`, `sqs-batch(N events)`.
    pub trigger: String,
    /// A run, or nothing to do.
    pub action: Action,
    /// Records of an SQS batch that could not be classified (message id and why); the other
    /// records were. Empty for anything but a batch.
    pub rejected: Vec<String>,
}

/// A run to make, or why there is none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Reconcile.
    Run {
        /// Plan or apply, as the event asks (a dry-run deployment plans regardless).
        mode: Mode,
        /// Everything, or only what some accounts or Entra groups touch.
        target: Target,
        /// The operator's one-off deletion allowance (manual invocations only).
        allow_deletions: Option<u32>,
        /// Caches the event says are stale (the organization, identity-store ids).
        refresh: Refresh,
    },
    /// A recognised event that changes nothing, such as an account creation that failed.
    Skip {
        /// Why nothing runs.
        reason: String,
    },
}

/// An event that is not one the function acts on. Nothing is changed. The message names what
/// was received (source, detail-type or keys, each cut short), never the whole payload.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// The payload is not a JSON object.
    #[error("expected a JSON object as the event, got {found}; nothing was changed")]
    NotAnObject {
        /// The JSON type received.
        found: &'static str,
    },
    /// No known event has this shape.
    #[error("unrecognised event ({what}); nothing was changed")]
    Unrecognised {
        /// What was received, cut short.
        what: String,
    },
    /// A known kind of event, but a field it needs is missing or wrong.
    #[error("{event}: {problem}; nothing was changed")]
    Malformed {
        /// Which kind of event.
        event: String,
        /// What is wrong with it.
        problem: String,
    },
    /// An SQS batch none of whose records is recognised.
    #[error("none of the {records} records of the SQS batch is a recognised event (first: {first}); nothing was changed")]
    Batch {
        /// How many records the batch held.
        records: usize,
        /// Why the first record was rejected.
        first: String,
    },
}

/// The JSON type of a value, for error messages.
fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Quotes outside input for an error message: cut to [`QUOTE_MAX`] characters, escaped.
fn quote(s: &str) -> String {
    if s.chars().count() > QUOTE_MAX {
        let cut: String = s.chars().take(QUOTE_MAX).collect();
        format!("{cut:?}…")
    } else {
        format!("{s:?}")
    }
}

/// Describes an unrecognised object by its source and detail-type, or else by its keys.
fn describe(obj: &Map<String, Value>) -> String {
    let field = |k: &str| match obj.get(k) {
        Some(Value::String(s)) => Some(quote(s)),
        Some(other) => Some(format!("<{}>", json_kind(other))),
        None => None,
    };
    match (field("source"), field("detail-type")) {
        (None, None) => {
            if obj.is_empty() {
                return "an empty object".into();
            }
            let mut keys: Vec<String> = obj.keys().take(KEYS_MAX).map(|k| quote(k)).collect();
            if obj.len() > KEYS_MAX {
                keys.push(format!("and {} more", obj.len() - KEYS_MAX));
            }
            format!("keys {}", keys.join(", "))
        }
        (source, detail_type) => format!(
            "source {}, detail-type {}",
            source.unwrap_or_else(|| "missing".into()),
            detail_type.unwrap_or_else(|| "missing".into())
        ),
    }
}

/// A string field, if present and a string.
fn str_field<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    obj.get(key).and_then(Value::as_str)
}

/// An object field. Some senders JSON-encode nested objects as strings (EventBridge Scheduler
/// sends `"detail": "{}"`): such a string is decoded. Missing or null is `None`.
fn object_field(obj: &Map<String, Value>, key: &str) -> Result<Option<Map<String, Value>>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m.clone())),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Object(m)) => Ok(Some(m)),
            Ok(other) => Err(format!(
                "{key} is a string holding {}, expected an object",
                json_kind(&other)
            )),
            Err(_) => Err(format!("{key} is a string that is not JSON")),
        },
        Some(other) => Err(format!("{key} is {}, expected an object", json_kind(other))),
    }
}

/// Keeps only characters that are safe in a trigger string (letters, digits, `-_.`), at most 64.
fn token(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
        .take(64)
        .collect()
}

fn run(trigger: impl Into<String>, mode: Mode, target: Target) -> Invocation {
    Invocation {
        trigger: trigger.into(),
        action: Action::Run {
            mode,
            target,
            allow_deletions: None,
            refresh: Refresh::default(),
        },
        rejected: Vec::new(),
    }
}

impl Invocation {
    /// The same invocation, also refreshing `r` when it runs.
    fn refreshing(mut self, r: Refresh) -> Invocation {
        if let Action::Run { refresh, .. } = &mut self.action {
            *refresh = refresh.merge(r);
        }
        self
    }
}

/// SCIM and API calls that create or delete users or groups: identity-store ids may change.
const ID_CHANGING_CALLS: [&str; 4] = ["CreateUser", "DeleteUser", "CreateGroup", "DeleteGroup"];

fn skip(trigger: impl Into<String>, reason: impl Into<String>) -> Invocation {
    Invocation {
        trigger: trigger.into(),
        action: Action::Skip {
            reason: reason.into(),
        },
        rejected: Vec::new(),
    }
}

fn accounts_target(id: AccountId) -> Target {
    Target::Only {
        accounts: BTreeSet::from([id]),
        entra_groups: BTreeSet::new(),
    }
}

fn malformed(event: &str, problem: impl Into<String>) -> EventError {
    EventError::Malformed {
        event: event.to_string(),
        problem: problem.into(),
    }
}

/// Classifies any JSON event. Pure and deterministic: the same event always gives the same
/// answer, and no event makes it panic.
pub fn classify(event: &Value) -> Result<Invocation, EventError> {
    classify_at(event, false)
}

/// Classifies an event; `in_batch` when it is the body of an SQS record (no manual actions and
/// no nested batches there).
fn classify_at(event: &Value, in_batch: bool) -> Result<Invocation, EventError> {
    let obj = event.as_object().ok_or(EventError::NotAnObject {
        found: json_kind(event),
    })?;
    if obj.contains_key("Records") && !obj.contains_key("detail-type") {
        if in_batch {
            return Err(EventError::Unrecognised {
                what: "an SQS batch inside an SQS batch".into(),
            });
        }
        return classify_sqs(obj);
    }
    if obj.contains_key("action") && !obj.contains_key("detail-type") {
        if in_batch {
            return Err(EventError::Unrecognised {
                what: "a manual action inside an SQS batch (invoke the function directly)".into(),
            });
        }
        return classify_manual(obj);
    }
    classify_eventbridge(obj)
}

/// An EventBridge event: `source`, `detail-type` and `detail`.
fn classify_eventbridge(obj: &Map<String, Value>) -> Result<Invocation, EventError> {
    let unrecognised = || EventError::Unrecognised {
        what: describe(obj),
    };
    let (Some(source), Some(detail_type)) =
        (str_field(obj, "source"), str_field(obj, "detail-type"))
    else {
        return Err(unrecognised());
    };
    let detail = object_field(obj, "detail")
        .map_err(|p| malformed(&format!("{} event", quote(detail_type)), p))?
        .unwrap_or_default();
    match (source, detail_type) {
        ("aws.events", "Scheduled Event") | ("aws.scheduler", _) => {
            Ok(run("schedule", Mode::Apply, Target::All))
        }
        (_, "AWS API Call via CloudTrail" | "AWS Service Event via CloudTrail") => {
            classify_cloudtrail(&detail).map_err(|e| match e {
                // Name the whole event, not just its detail, when the API is not ours.
                EventError::Unrecognised { what } => EventError::Unrecognised {
                    what: format!("{}: {what}", describe(obj)),
                },
                other => other,
            })
        }
        ("entra-sso-sync", "Entra Group Changed") => {
            let event = "Entra Group Changed";
            let id = match detail.get("group_id") {
                Some(Value::String(s)) => Guid::try_from(s.clone()).map_err(|_| {
                    malformed(event, format!("detail.group_id {} is not a GUID", quote(s)))
                })?,
                Some(other) => {
                    return Err(malformed(
                        event,
                        format!(
                            "detail.group_id is {}, expected a GUID string",
                            json_kind(other)
                        ),
                    ))
                }
                None => return Err(malformed(event, "detail.group_id is missing")),
            };
            Ok(run(
                format!("entra-group:{id}"),
                Mode::Apply,
                Target::Only {
                    accounts: BTreeSet::new(),
                    entra_groups: BTreeSet::from([id]),
                },
            ))
        }
        ("aws.s3", "Object Created") => {
            let event = "S3 Object Created";
            let bucket = object_field(&detail, "bucket")
                .map_err(|p| malformed(event, format!("detail.{p}")))?
                .and_then(|b| b.get("name").and_then(Value::as_str).map(str::to_string));
            let key = object_field(&detail, "object")
                .map_err(|p| malformed(event, format!("detail.{p}")))?
                .and_then(|o| o.get("key").and_then(Value::as_str).map(str::to_string));
            if bucket.is_none() || key.is_none() {
                return Err(malformed(
                    event,
                    "detail.bucket.name or detail.object.key is missing",
                ));
            }
            Ok(run("config-changed", Mode::Apply, Target::All))
        }
        _ => Err(unrecognised()),
    }
}

/// The `detail` of a CloudTrail event delivered by EventBridge.
fn classify_cloudtrail(detail: &Map<String, Value>) -> Result<Invocation, EventError> {
    let event = "CloudTrail event";
    let source = str_field(detail, "eventSource")
        .ok_or_else(|| malformed(event, "detail.eventSource is missing"))?;
    let name = str_field(detail, "eventName")
        .ok_or_else(|| malformed(event, "detail.eventName is missing"))?;
    let is_identity = IDENTITY_SOURCES.contains(&source);
    let is_organizations = source == "organizations.amazonaws.com";
    if !is_identity && !is_organizations {
        return Err(EventError::Unrecognised {
            what: format!("eventSource {}, eventName {}", quote(source), quote(name)),
        });
    }
    let trigger_name = token(name);
    if let Some(code) = detail.get("errorCode").filter(|v| !v.is_null()) {
        let code = code.as_str().map(token).unwrap_or_default();
        return Ok(skip(
            format!("cloudtrail:{trigger_name}"),
            format!(
                "{source} {} failed ({code}): it changed nothing",
                quote(name)
            ),
        ));
    }
    if is_identity {
        let read_only = detail
            .get("readOnly")
            .and_then(Value::as_bool)
            .unwrap_or_else(|| {
                ["Get", "List", "Describe", "IsMember", "Search"]
                    .iter()
                    .any(|p| name.starts_with(p))
            });
        let trigger = if source == "identitystore-scim.amazonaws.com" {
            format!("scim-event:{trigger_name}")
        } else {
            format!("identitystore-event:{trigger_name}")
        };
        if read_only {
            return Ok(skip(
                trigger,
                format!("{source} {} is a read-only call", quote(name)),
            ));
        }
        // The values are masked (HIDDEN_DUE_TO_SECURITY_REASONS): a trigger only.
        return Ok(run(trigger, Mode::Apply, Target::All).refreshing(Refresh {
            principals: ID_CHANGING_CALLS.contains(&name),
            organization: false,
        }));
    }
    classify_organizations(name, detail).map(|inv| {
        inv.refreshing(Refresh {
            organization: true,
            principals: false,
        })
    })
}

/// An Organizations CloudTrail event: account created, moved or retagged.
fn classify_organizations(
    name: &str,
    detail: &Map<String, Value>,
) -> Result<Invocation, EventError> {
    let account =
        |event: &str, field: &str, value: Option<&Value>| -> Result<AccountId, EventError> {
            match value {
                Some(Value::String(s)) => AccountId::try_from(s.clone()).map_err(|_| {
                    malformed(
                        event,
                        format!("{field} {} is not a 12-digit account id", quote(s)),
                    )
                }),
                Some(other) => Err(malformed(
                    event,
                    format!("{field} is {}, expected a string", json_kind(other)),
                )),
                None => Err(malformed(event, format!("{field} is missing"))),
            }
        };
    match name {
        "CreateAccountResult" => {
            let event = "CreateAccountResult";
            let status = object_field(detail, "serviceEventDetails")
                .map_err(|p| malformed(event, format!("detail.{p}")))?
                .map(|d| object_field(&d, "createAccountStatus"))
                .transpose()
                .map_err(|p| malformed(event, format!("detail.serviceEventDetails.{p}")))?
                .flatten()
                .ok_or_else(|| {
                    malformed(
                        event,
                        "detail.serviceEventDetails.createAccountStatus is missing",
                    )
                })?;
            let state = str_field(&status, "state").ok_or_else(|| {
                malformed(
                    event,
                    "detail.serviceEventDetails.createAccountStatus.state is missing",
                )
            })?;
            if state != "SUCCEEDED" {
                let why = str_field(&status, "failureReason")
                    .map(|r| format!(" ({})", token(r)))
                    .unwrap_or_default();
                return Ok(skip(
                    "account-creation",
                    format!(
                        "CreateAccountResult state is {}{why}: there is no new account to reconcile",
                        quote(state)
                    ),
                ));
            }
            let id = account(
                event,
                "detail.serviceEventDetails.createAccountStatus.accountId",
                status.get("accountId"),
            )?;
            Ok(run(
                format!("account:{id}"),
                Mode::Apply,
                accounts_target(id),
            ))
        }
        "MoveAccount" => {
            let params = object_field(detail, "requestParameters")
                .map_err(|p| malformed(name, format!("detail.{p}")))?
                .unwrap_or_default();
            let id = account(
                name,
                "detail.requestParameters.accountId",
                params.get("accountId"),
            )?;
            Ok(run(
                format!("account:{id}"),
                Mode::Apply,
                accounts_target(id),
            ))
        }
        "TagResource" | "UntagResource" => {
            let params = object_field(detail, "requestParameters")
                .map_err(|p| malformed(name, format!("detail.{p}")))?
                .unwrap_or_default();
            let resource = match params.get("resourceId") {
                Some(Value::String(s)) => s.as_str(),
                Some(other) => {
                    return Err(malformed(
                        name,
                        format!(
                            "detail.requestParameters.resourceId is {}, expected a string",
                            json_kind(other)
                        ),
                    ))
                }
                None => {
                    return Err(malformed(
                        name,
                        "detail.requestParameters.resourceId is missing",
                    ))
                }
            };
            match AccountId::try_from(resource.to_string()) {
                Ok(id) => Ok(run(
                    format!("account:{id}"),
                    Mode::Apply,
                    accounts_target(id),
                )),
                Err(_) => Ok(skip(
                    format!("organizations:{name}"),
                    format!(
                        "{name} on {}, which is not an account: scopes use account tags only",
                        quote(resource)
                    ),
                )),
            }
        }
        _ => Err(EventError::Unrecognised {
            what: format!("Organizations eventName {}", quote(name)),
        }),
    }
}

/// A manual invocation: `{"action": "plan" | "apply" | "reconcile", "dry_run": bool,
/// "allow_deletions": N}`. Unknown keys are refused, so a misspelt option never goes unnoticed.
fn classify_manual(obj: &Map<String, Value>) -> Result<Invocation, EventError> {
    let event = "manual invocation";
    let allowed = ["action", "dry_run", "allow_deletions"];
    if let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(malformed(
            event,
            format!(
                "unknown key {} (expected action, dry_run, allow_deletions)",
                quote(k)
            ),
        ));
    }
    let action = match obj.get("action") {
        Some(Value::String(s)) => s.as_str(),
        Some(other) => {
            return Err(malformed(
                event,
                format!(
                    "action is {}, expected \"plan\" or \"apply\"",
                    json_kind(other)
                ),
            ))
        }
        None => return Err(malformed(event, "action is missing")),
    };
    let dry_run = match obj.get("dry_run") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(malformed(
                event,
                format!("dry_run is {}, expected true or false", json_kind(other)),
            ))
        }
    };
    let allow_deletions = match obj.get("allow_deletions") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| {
                    malformed(
                        event,
                        "allow_deletions must be a whole number from 0 to 4294967295",
                    )
                })?,
        ),
    };
    let (trigger, mode) = match action {
        "plan" => ("manual", Mode::Plan),
        "apply" if dry_run => ("manual", Mode::Plan),
        "apply" => ("manual", Mode::Apply),
        "reconcile" if allow_deletions.is_some() => {
            return Err(malformed(
                event,
                "allow_deletions is a one-off confirmation: send it with action \"apply\", not on a schedule",
            ))
        }
        "reconcile" if dry_run => ("schedule", Mode::Plan),
        "reconcile" => ("schedule", Mode::Apply),
        other => {
            return Err(malformed(
                event,
                format!("action {} is not plan, apply or reconcile", quote(other)),
            ))
        }
    };
    Ok(Invocation {
        trigger: trigger.into(),
        action: Action::Run {
            mode,
            target: Target::All,
            allow_deletions,
            // An operator asking for a run wants it from fresh reads.
            refresh: if trigger == "manual" {
                Refresh::ALL
            } else {
                Refresh::default()
            },
        },
        rejected: Vec::new(),
    })
}

/// An SQS batch whose bodies are EventBridge events: one merged invocation.
fn classify_sqs(obj: &Map<String, Value>) -> Result<Invocation, EventError> {
    let event = "SQS batch";
    let records = match obj.get("Records") {
        Some(Value::Array(r)) if !r.is_empty() => r,
        Some(Value::Array(_)) => return Err(malformed(event, "Records is empty")),
        Some(other) => {
            return Err(malformed(
                event,
                format!("Records is {}, expected an array", json_kind(other)),
            ))
        }
        None => return Err(malformed(event, "Records is missing")),
    };
    // Every record must come from SQS; otherwise this is some other service's batch.
    for r in records {
        let source = r.get("eventSource").and_then(Value::as_str);
        if source != Some("aws:sqs") {
            return Err(EventError::Unrecognised {
                what: format!(
                    "Records from {}, not aws:sqs",
                    source
                        .map(quote)
                        .unwrap_or_else(|| "an unknown source".into())
                ),
            });
        }
    }
    let total = records.len();
    let mut runs: Vec<(Mode, Target, Refresh)> = Vec::new();
    let mut skipped: Vec<String> = Vec::new();
    let mut rejected: Vec<String> = Vec::new();
    for (i, r) in records.iter().enumerate() {
        let id = r
            .get("messageId")
            .and_then(Value::as_str)
            .map(quote)
            .unwrap_or_else(|| format!("record {i}"));
        let classified = match r.get("body") {
            Some(Value::String(body)) => match serde_json::from_str::<Value>(body) {
                Ok(v) => classify_at(&v, true),
                Err(_) => Err(malformed("SQS record", "its body is not JSON")),
            },
            Some(other) => Err(malformed(
                "SQS record",
                format!("its body is {}, expected a string", json_kind(other)),
            )),
            None => Err(malformed("SQS record", "it has no body")),
        };
        match classified {
            Ok(Invocation {
                action:
                    Action::Run {
                        mode,
                        target,
                        refresh,
                        ..
                    },
                ..
            }) => runs.push((mode, target, refresh)),
            Ok(Invocation {
                action: Action::Skip { reason },
                ..
            }) => skipped.push(reason),
            Err(e) => rejected.push(format!("{id}: {e}")),
        }
    }
    let trigger = format!("sqs-batch({total} events)");
    if runs.is_empty() && skipped.is_empty() {
        return Err(EventError::Batch {
            records: total,
            first: rejected.first().cloned().unwrap_or_default(),
        });
    }
    let action = match runs.into_iter().reduce(|(m1, t1, r1), (m2, t2, r2)| {
        let mode = if m1 == Mode::Apply || m2 == Mode::Apply {
            Mode::Apply
        } else {
            Mode::Plan
        };
        (mode, t1.merge(t2), r1.merge(r2))
    }) {
        Some((mode, target, refresh)) => Action::Run {
            mode,
            target,
            allow_deletions: None,
            refresh,
        },
        None => Action::Skip {
            reason: format!(
                "no event in the batch changes anything (first: {})",
                skipped.first().cloned().unwrap_or_default()
            ),
        },
    };
    Ok(Invocation {
        trigger,
        action,
        rejected,
    })
}

/// The instant no change may start after: the Lambda deadline less [`SAFETY_MARGIN`], or less
/// a fifth of the time left when that is shorter (a short test timeout still gets most of its
/// time). In-flight requests that have not settled by the timeout stay pending in the ledger
/// and the next run claims them.
pub fn run_deadline(lambda_deadline: Instant, now: Instant) -> Instant {
    let remaining = lambda_deadline.saturating_duration_since(now);
    let margin = SAFETY_MARGIN.min(remaining / 5);
    lambda_deadline.checked_sub(margin).unwrap_or(now)
}

/// Converts the Lambda context's deadline (milliseconds since the Unix epoch) into an
/// [`Instant`], given the wall clock and monotonic clock read at the same moment.
pub fn deadline_instant(deadline_epoch_ms: u64, now_wall: SystemTime, now: Instant) -> Instant {
    let deadline = UNIX_EPOCH + Duration::from_millis(deadline_epoch_ms);
    match deadline.duration_since(now_wall) {
        Ok(left) => now.checked_add(left).unwrap_or(now),
        Err(_) => now,
    }
}

/// The report as JSON with its `counts`, cut down to about `max_bytes`: lists keep their first
/// entries and `omitted` says how many were dropped; if that is still too large the rules and
/// then every list go, leaving the counts, outcome and guard.
pub fn bounded_report(report: &Report, max_bytes: usize) -> Value {
    let mut value = serde_json::to_value(report).unwrap_or_else(|_| json!({}));
    if let Value::Object(m) = &mut value {
        m.insert("counts".into(), json!(report.counts()));
    }
    if json_len(&value) <= max_bytes {
        return value;
    }
    let lists = [
        "creates",
        "deletes",
        "held",
        "unresolved",
        "failures",
        "rules",
    ];
    let mut omitted = Map::new();
    if let Value::Object(m) = &mut value {
        for key in lists {
            if let Some(Value::Array(a)) = m.get_mut(key) {
                if a.len() > KEPT_WHEN_CUT {
                    omitted.insert(key.into(), json!(a.len() - KEPT_WHEN_CUT));
                    a.truncate(KEPT_WHEN_CUT);
                }
            }
        }
        m.insert("omitted".into(), Value::Object(omitted.clone()));
    }
    for key in lists.iter().rev() {
        if json_len(&value) <= max_bytes {
            break;
        }
        if let Value::Object(m) = &mut value {
            if let Some(Value::Array(a)) = m.remove(*key) {
                let kept = a.len() as u64;
                let before = omitted.get(*key).and_then(Value::as_u64).unwrap_or(0);
                omitted.insert((*key).into(), json!(before + kept));
                m.insert("omitted".into(), Value::Object(omitted.clone()));
            }
        }
    }
    value
}

fn json_len(v: &Value) -> usize {
    serde_json::to_vec(v).map(|b| b.len()).unwrap_or(usize::MAX)
}

/// The metric values of one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunMetrics {
    /// Assignments created by this run (0 when planning).
    pub assignments_created: u64,
    /// Assignments deleted by this run (0 when planning).
    pub assignments_deleted: u64,
    /// Changes attempted that failed.
    pub assignments_failed: u64,
    /// Entra members who could not be given access.
    pub unresolved_members: u64,
    /// Differences found: creations, deletions and held deletions, applied or not.
    pub drift_found: u64,
    /// 1 when a safety guard held deletions back, else 0.
    pub guard_trips: u64,
    /// Rules that could not be evaluated (unknown or ambiguous Entra group, group not
    /// provisioned): their deletions are held.
    pub rules_held: u64,
    /// Changes left for the next run by the deadline.
    pub changes_deferred: u64,
    /// Wall time of the run, milliseconds.
    pub run_duration_ms: u64,
}

impl RunMetrics {
    /// The metrics of a report. Creations run before deletions and nothing starts after the
    /// deadline, so when changes were deferred every deletion was, and the creations deferred
    /// are the rest.
    pub fn of(report: &Report) -> RunMetrics {
        let n = |v: usize| v as u64;
        let failed = |op: &str| n(report.failures.iter().filter(|f| f.operation == op).count());
        let creates = n(report.creates.len());
        let deletes = n(report.deletes.len());
        let deferred = n(report.deferred);
        let deferred_creates = deferred.saturating_sub(deletes);
        let deferred_deletes = deferred - deferred_creates;
        let applied = report.mode == Mode::Apply;
        RunMetrics {
            assignments_created: if applied {
                creates.saturating_sub(failed("create") + deferred_creates)
            } else {
                0
            },
            assignments_deleted: if applied {
                deletes.saturating_sub(failed("delete") + deferred_deletes)
            } else {
                0
            },
            assignments_failed: n(report.failures.len()),
            unresolved_members: n(report.unresolved.len()),
            drift_found: creates + deletes + n(report.held.len()),
            guard_trips: u64::from(report.guard.is_some() || !report.held.is_empty()),
            rules_held: n(report.rules.iter().filter(|r| r.held.is_some()).count()),
            changes_deferred: deferred,
            run_duration_ms: report.duration_ms,
        }
    }
}

/// One CloudWatch Embedded Metric Format line for a run: namespace [`METRICS_NAMESPACE`],
/// dimension `FunctionName`, and the run id, trigger, mode and outcome as plain properties
/// (searchable in Logs Insights, not dimensions).
pub fn emf_line(report: &Report, function_name: &str, timestamp_ms: u64) -> String {
    let m = RunMetrics::of(report);
    let metrics: Vec<Value> = [
        ("AssignmentsCreated", "Count"),
        ("AssignmentsDeleted", "Count"),
        ("AssignmentsFailed", "Count"),
        ("UnresolvedMembers", "Count"),
        ("DriftFound", "Count"),
        ("GuardTrips", "Count"),
        ("RulesHeld", "Count"),
        ("ChangesDeferred", "Count"),
        ("RunDuration", "Milliseconds"),
    ]
    .iter()
    .map(|(name, unit)| json!({"Name": name, "Unit": unit}))
    .collect();
    json!({
        "_aws": {
            "Timestamp": timestamp_ms,
            "CloudWatchMetrics": [{
                "Namespace": METRICS_NAMESPACE,
                "Dimensions": [["FunctionName"]],
                "Metrics": metrics,
            }],
        },
        "FunctionName": function_name,
        "AssignmentsCreated": m.assignments_created,
        "AssignmentsDeleted": m.assignments_deleted,
        "AssignmentsFailed": m.assignments_failed,
        "UnresolvedMembers": m.unresolved_members,
        "DriftFound": m.drift_found,
        "GuardTrips": m.guard_trips,
        "RulesHeld": m.rules_held,
        "ChangesDeferred": m.changes_deferred,
        "RunDuration": m.run_duration_ms,
        "RunId": report.run_id,
        "Trigger": report.trigger,
        "Mode": report.mode,
        "Outcome": report.outcome.as_str(),
    })
    .to_string()
}

/// An invocation that did not complete. Lambda retries it (asynchronous invocations twice,
/// then the on-failure destination); the message never holds a secret.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// The event is not one the function acts on; nothing was changed.
    #[error(transparent)]
    Event(#[from] EventError),
    /// The configuration could not be read or is invalid; nothing was changed.
    #[error("{0}; nothing was changed")]
    Config(#[from] ConfigError),
    /// The engine could not be wired to its services; nothing was changed.
    #[error("connecting to AWS and Entra: {0}; nothing was changed")]
    Connect(#[from] ConnectError),
    /// The run could not complete its reads; nothing was changed.
    #[error("the run failed before changing anything: {0}")]
    Run(#[from] EngineError),
    /// The configuration contradicts what the deployment pins (tenant, app, instance).
    #[error("the configuration's {key} is {configured}, but this deployment's {setting} is {deployed}; nothing was changed")]
    Mismatch {
        /// The configuration key, e.g. `entra.tenant_id`.
        key: &'static str,
        /// The environment variable, e.g. `ENTRA_TENANT_ID`.
        setting: &'static str,
        /// The configuration's value.
        configured: String,
        /// The deployment's value.
        deployed: String,
    },
    /// A setting in the function's environment is missing or invalid.
    #[error("environment variable {name}: {problem}")]
    Settings {
        /// The variable.
        name: &'static str,
        /// What is wrong.
        problem: String,
    },
}

impl HandlerError {
    /// A short error type for Lambda's error response (`errorType`).
    pub fn kind(&self) -> &'static str {
        match self {
            HandlerError::Event(_) => "UnrecognisedEvent",
            HandlerError::Config(_) => "InvalidConfiguration",
            HandlerError::Connect(_) => "ConnectFailed",
            HandlerError::Run(_) => "RunFailed",
            HandlerError::Mismatch { .. } => "ConfigurationMismatch",
            HandlerError::Settings { .. } => "InvalidSettings",
        }
    }
}

/// Reads a yes/no environment value: `true`/`1`/`yes`/`on` or `false`/`0`/`no`/`off`/empty.
pub fn parse_flag(name: &'static str, value: Option<&str>) -> Result<bool, HandlerError> {
    match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        None | Some("" | "false" | "0" | "no" | "off") => Ok(false),
        Some("true" | "1" | "yes" | "on") => Ok(true),
        Some(other) => Err(HandlerError::Settings {
            name,
            problem: format!("expected true or false, got {}", quote(other)),
        }),
    }
}

/// What the deployment pins, from the function's environment (the SAM template's parameters),
/// checked against every configuration read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Deployment {
    /// `ENTRA_TENANT_ID`: a configuration for another tenant is refused.
    pub tenant_id: Option<Guid>,
    /// `ENTRA_CLIENT_ID`: a configuration naming another app registration is refused.
    pub client_id: Option<Guid>,
    /// `IDENTITY_CENTER_INSTANCE_ARN`: used when the configuration names no instance; a
    /// configuration naming another is refused (the function's IAM policy only reaches this one).
    pub instance_arn: Option<InstanceArn>,
    /// `IDENTITY_STORE_ID`: likewise.
    pub identity_store_id: Option<IdentityStoreId>,
    /// `MAX_DELETIONS`: a ceiling on the configuration's `safety.max_deletions`; the lower of
    /// the two applies.
    pub max_deletions: Option<u32>,
}

impl Deployment {
    /// Reads the settings; unset or empty variables pin nothing.
    pub fn from_lookup(env: impl Fn(&str) -> Option<String>) -> Result<Deployment, HandlerError> {
        fn parse<T: TryFrom<String, Error = String>>(
            name: &'static str,
            value: Option<String>,
        ) -> Result<Option<T>, HandlerError> {
            value
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .map(|v| T::try_from(v).map_err(|problem| HandlerError::Settings { name, problem }))
                .transpose()
        }
        let max_deletions = env("MAX_DELETIONS")
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .map(|v| {
                v.parse::<u32>().map_err(|_| HandlerError::Settings {
                    name: "MAX_DELETIONS",
                    problem: format!("expected a whole number, got {}", quote(&v)),
                })
            })
            .transpose()?;
        Ok(Deployment {
            tenant_id: parse("ENTRA_TENANT_ID", env("ENTRA_TENANT_ID"))?,
            client_id: parse("ENTRA_CLIENT_ID", env("ENTRA_CLIENT_ID"))?,
            instance_arn: parse(
                "IDENTITY_CENTER_INSTANCE_ARN",
                env("IDENTITY_CENTER_INSTANCE_ARN"),
            )?,
            identity_store_id: parse("IDENTITY_STORE_ID", env("IDENTITY_STORE_ID"))?,
            max_deletions,
        })
    }

    /// Checks a configuration against the deployment and fills in what it pins.
    pub fn apply(&self, config: &mut Config) -> Result<(), HandlerError> {
        fn same<T: PartialEq + ToString>(
            key: &'static str,
            setting: &'static str,
            deployed: Option<&T>,
            configured: Option<&T>,
        ) -> Result<(), HandlerError> {
            match (deployed, configured) {
                (Some(d), Some(c)) if d != c => Err(HandlerError::Mismatch {
                    key,
                    setting,
                    configured: c.to_string(),
                    deployed: d.to_string(),
                }),
                _ => Ok(()),
            }
        }
        same(
            "entra.tenant_id",
            "ENTRA_TENANT_ID",
            self.tenant_id.as_ref(),
            Some(&config.entra.tenant_id),
        )?;
        same(
            "entra.client_id",
            "ENTRA_CLIENT_ID",
            self.client_id.as_ref(),
            Some(&config.entra.client_id),
        )?;
        let ic = &mut config.identity_center;
        same(
            "identity_center.instance_arn",
            "IDENTITY_CENTER_INSTANCE_ARN",
            self.instance_arn.as_ref(),
            ic.instance_arn.as_ref(),
        )?;
        same(
            "identity_center.identity_store_id",
            "IDENTITY_STORE_ID",
            self.identity_store_id.as_ref(),
            ic.identity_store_id.as_ref(),
        )?;
        if ic.instance_arn.is_none() {
            ic.instance_arn = self.instance_arn.clone();
        }
        if ic.identity_store_id.is_none() {
            ic.identity_store_id = self.identity_store_id.clone();
        }
        if let Some(ceiling) = self.max_deletions {
            let configured = config.safety.max_deletions;
            if ceiling < configured {
                tracing::info!(
                    configured,
                    ceiling,
                    "MAX_DELETIONS lowers the configuration's safety.max_deletions"
                );
                config.safety.max_deletions = ceiling;
            }
        }
        Ok(())
    }
}

/// An environment lookup.
type EnvLookup = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// The engine kept between invocations, with the configuration it was built for (`None` for an
/// engine injected by a test, which is kept whatever the configuration).
struct CachedEngine {
    key: Option<String>,
    engine: Engine,
}

/// What the function builds once at start-up and keeps between invocations.
pub struct App {
    sdk: aws_config::SdkConfig,
    config_uri: String,
    dry_run: bool,
    deployment: Deployment,
    function_name: String,
    env: EnvLookup,
    engine: tokio::sync::Mutex<Option<CachedEngine>>,
}

impl App {
    /// An app reading the configuration from `config_uri` (a path or `s3://bucket/key`) on
    /// every invocation, planning only when `dry_run`. Environment overrides of the
    /// configuration and `ENTRA_CLIENT_SECRET` come from the process environment. Nothing is
    /// read or connected here: the engine is built on the first invocation.
    pub fn new(sdk: aws_config::SdkConfig, config_uri: impl Into<String>, dry_run: bool) -> App {
        App {
            sdk,
            config_uri: config_uri.into(),
            dry_run,
            deployment: Deployment::default(),
            function_name: std::env::var("AWS_LAMBDA_FUNCTION_NAME")
                .unwrap_or_else(|_| "entra-sso-sync".into()),
            env: Arc::new(|k: &str| std::env::var(k).ok()),
            engine: tokio::sync::Mutex::new(None),
        }
    }

    /// The app as the deployed function configures it: `CONFIG_URI` (required), `DRY_RUN`, and
    /// the [`Deployment`] settings.
    pub fn from_env(sdk: aws_config::SdkConfig) -> Result<App, HandlerError> {
        let config_uri = std::env::var("CONFIG_URI")
            .ok()
            .filter(|v| !v.trim().is_empty())
            .ok_or(HandlerError::Settings {
                name: "CONFIG_URI",
                problem: "not set: expected s3://bucket/key or a path".into(),
            })?;
        let dry_run = parse_flag("DRY_RUN", std::env::var("DRY_RUN").ok().as_deref())?;
        let deployment = Deployment::from_lookup(|k| std::env::var(k).ok())?;
        Ok(App::new(sdk, config_uri, dry_run).with_deployment(deployment))
    }

    /// Pins these deployment settings.
    pub fn with_deployment(mut self, deployment: Deployment) -> App {
        self.deployment = deployment;
        self
    }

    /// Replaces the environment lookup (configuration overrides, `ENTRA_CLIENT_SECRET`).
    pub fn with_env(mut self, env: impl Fn(&str) -> Option<String> + Send + Sync + 'static) -> App {
        self.env = Arc::new(env);
        self
    }

    /// Uses this engine for every invocation instead of connecting one (tests).
    pub fn with_engine(self, engine: Engine) -> App {
        App {
            engine: tokio::sync::Mutex::new(Some(CachedEngine { key: None, engine })),
            ..self
        }
    }

    /// Whether the app only plans.
    pub fn dry_run(&self) -> bool {
        self.dry_run
    }

    /// Handles one event: classify, load the configuration (every time: it may have changed),
    /// run, log the report once, print the EMF metrics, return the report as JSON.
    /// `lambda_deadline` is when the invocation times out; no change starts after
    /// [`run_deadline`] of it. An `Err` means nothing was changed.
    pub async fn handle(
        &self,
        event: Value,
        lambda_deadline: Option<Instant>,
    ) -> Result<Value, HandlerError> {
        let invocation = match classify(&event) {
            Ok(i) => i,
            Err(e) => {
                tracing::error!(error = %e, "event not recognised");
                return Err(e.into());
            }
        };
        drop(event);
        for r in &invocation.rejected {
            tracing::warn!(record = %r, "SQS record skipped: not a recognised event");
        }
        let (mode, target, allow_deletions, refresh) = match invocation.action {
            Action::Skip { reason } => {
                tracing::info!(trigger = %invocation.trigger, reason = %reason, "nothing to reconcile");
                let mut out = json!({
                    "outcome": "skipped",
                    "trigger": invocation.trigger,
                    "reason": reason,
                });
                add_rejected(&mut out, invocation.rejected);
                return Ok(out);
            }
            Action::Run {
                mode,
                target,
                allow_deletions,
                refresh,
            } => (mode, target, allow_deletions, refresh),
        };
        let mode = if self.dry_run && mode == Mode::Apply {
            tracing::info!("DRY_RUN is set: planning only");
            Mode::Plan
        } else {
            mode
        };

        let env = self.env.clone();
        let mut config = load_config(&self.config_uri, &self.sdk, move |k: &str| env(k)).await?;
        self.deployment.apply(&mut config)?;
        let engine = self.engine(&config).await?;
        let request = RunRequest {
            mode,
            trigger: invocation.trigger,
            allow_deletions,
            target,
            deadline: lambda_deadline
                .map(|d| tokio::time::Instant::from_std(run_deadline(d, Instant::now()))),
            full_read: false,
            refresh,
        };
        let report = match engine.run(&config, &request).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(trigger = %request.trigger, error = %e, "run failed; nothing was changed");
                // The secret may have been rotated or the instance replaced: connect afresh.
                self.forget_engine().await;
                return Err(e.into());
            }
        };

        let logged = bounded_report(&report, MAX_LOGGED_REPORT_BYTES).to_string();
        tracing::info!(
            run_id = %report.run_id,
            trigger = %report.trigger,
            outcome = report.outcome.as_str(),
            report = %logged,
            "run report"
        );
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or_default();
        println!("{}", emf_line(&report, &self.function_name, now_ms));
        if report.outcome == Outcome::Failed {
            tracing::warn!(run_id = %report.run_id, "the run finished with failures; see the report");
        }
        let mut out = bounded_report(&report, MAX_RESPONSE_BYTES);
        add_rejected(&mut out, invocation.rejected);
        Ok(out)
    }

    /// The engine for this configuration: the cached one when the connection settings are
    /// unchanged, else a new one (which is then cached).
    async fn engine(&self, config: &Config) -> Result<Engine, HandlerError> {
        let key = serde_json::to_string(&(&config.identity_center, &config.entra, &config.state))
            .unwrap_or_default();
        let mut cached = self.engine.lock().await;
        if let Some(c) = cached.as_ref() {
            if c.key.as_ref().is_none_or(|k| *k == key) {
                return Ok(c.engine.clone());
            }
            tracing::info!("connection settings changed: connecting afresh");
        }
        let engine = Engine::connect(config, &self.sdk, (self.env)("ENTRA_CLIENT_SECRET")).await?;
        *cached = Some(CachedEngine {
            key: Some(key),
            engine: engine.clone(),
        });
        Ok(engine)
    }

    /// Drops a connected engine (not an injected one) so the next invocation connects again.
    async fn forget_engine(&self) {
        let mut cached = self.engine.lock().await;
        if cached.as_ref().is_some_and(|c| c.key.is_some()) {
            *cached = None;
        }
    }
}

fn add_rejected(out: &mut Value, rejected: Vec<String>) {
    if rejected.is_empty() {
        return;
    }
    if let Value::Object(m) = out {
        m.insert("rejected_events".into(), json!(rejected));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GROUP: &str = "00000000-0000-4000-8000-000000000102";

    fn eb(source: &str, detail_type: &str, detail: Value) -> Value {
        json!({
            "version": "0",
            "id": "6a7e8feb-b491-4cf7-a9f1-bf3703467718",
            "detail-type": detail_type,
            "source": source,
            "account": "123456789012",
            "time": "2026-11-28T12:00:00Z",
            "region": "us-east-1",
            "resources": [],
            "detail": detail,
        })
    }

    fn cloudtrail(source: &str, name: &str, extra: Value) -> Value {
        let mut detail = json!({
            "eventVersion": "1.10",
            "eventSource": source,
            "eventName": name,
            "awsRegion": "us-east-1",
        });
        if let (Value::Object(d), Value::Object(e)) = (&mut detail, extra) {
            d.extend(e);
        }
        eb("aws.whatever", "AWS API Call via CloudTrail", detail)
    }

    fn runs(inv: &Invocation) -> (Mode, &Target, Option<u32>) {
        match &inv.action {
            Action::Run {
                mode,
                target,
                allow_deletions,
                ..
            } => (*mode, target, *allow_deletions),
            Action::Skip { reason } => panic!("expected a run, got a skip: {reason}"),
        }
    }

    fn skip_reason(inv: &Invocation) -> &str {
        match &inv.action {
            Action::Skip { reason } => reason,
            Action::Run { .. } => panic!("expected a skip, got a run"),
        }
    }

    fn account(id: &str) -> Target {
        accounts_target(AccountId::try_from(id.to_string()).unwrap())
    }

    fn sqs(bodies: &[Value]) -> Value {
        let records: Vec<Value> = bodies
            .iter()
            .enumerate()
            .map(|(i, b)| {
                json!({
                    "messageId": format!("m-{i}"),
                    "receiptHandle": "AQEB",
                    "body": b.to_string(),
                    "attributes": {"ApproximateReceiveCount": "1"},
                    "messageAttributes": {},
                    "md5OfBody": "x",
                    "eventSource": "aws:sqs",
                    "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:q",
                    "awsRegion": "us-east-1",
                })
            })
            .collect();
        json!({ "Records": records })
    }

    #[test]
    fn classic_and_scheduler_schedules_are_full_applies() {
        for event in [
            eb("aws.events", "Scheduled Event", json!({})),
            eb("aws.scheduler", "Scheduled Event", json!("{}")),
            json!({"action": "reconcile"}),
        ] {
            let inv = classify(&event).unwrap();
            assert_eq!(inv.trigger, "schedule");
            assert_eq!(runs(&inv), (Mode::Apply, &Target::All, None));
        }
        let inv = classify(&json!({"action": "reconcile", "dry_run": true})).unwrap();
        assert_eq!(runs(&inv).0, Mode::Plan);
    }

    #[test]
    fn a_detail_string_that_is_not_an_object_is_malformed() {
        let err = classify(&eb("aws.scheduler", "Scheduled Event", json!("[1]"))).unwrap_err();
        assert!(matches!(err, EventError::Malformed { .. }), "{err}");
        assert!(err.to_string().contains("array"), "{err}");
    }

    #[test]
    fn identity_center_changes_are_full_reconciles_and_reads_are_skipped() {
        for (source, trigger) in [
            ("identitystore-scim.amazonaws.com", "scim-event:CreateUser"),
            (
                "identitystore.amazonaws.com",
                "identitystore-event:CreateUser",
            ),
            (
                "sso-directory.amazonaws.com",
                "identitystore-event:CreateUser",
            ),
        ] {
            let inv = classify(&cloudtrail(source, "CreateUser", json!({}))).unwrap();
            assert_eq!(inv.trigger, trigger);
            assert_eq!(runs(&inv), (Mode::Apply, &Target::All, None));
        }
        let read = classify(&cloudtrail(
            "identitystore-scim.amazonaws.com",
            "ListUsers",
            json!({}),
        ))
        .unwrap();
        assert!(skip_reason(&read).contains("read-only"));
        let flagged = classify(&cloudtrail(
            "identitystore.amazonaws.com",
            "CreateGroupMembership",
            json!({"readOnly": true}),
        ))
        .unwrap();
        assert!(skip_reason(&flagged).contains("read-only"));
    }

    #[test]
    fn a_failed_api_call_changes_nothing() {
        let inv = classify(&cloudtrail(
            "organizations.amazonaws.com",
            "MoveAccount",
            json!({"errorCode": "AccessDenied", "requestParameters": {"accountId": "111111111111"}}),
        ))
        .unwrap();
        assert!(skip_reason(&inv).contains("AccessDenied"), "{inv:?}");
    }

    #[test]
    fn other_cloudtrail_sources_are_unrecognised_and_named() {
        let err =
            classify(&cloudtrail("ec2.amazonaws.com", "RunInstances", json!({}))).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, EventError::Unrecognised { .. }));
        assert!(
            text.contains("ec2.amazonaws.com") && text.contains("RunInstances"),
            "{text}"
        );
        let err = classify(&eb(
            "aws.whatever",
            "AWS API Call via CloudTrail",
            json!({}),
        ))
        .unwrap_err();
        assert!(err.to_string().contains("eventSource is missing"), "{err}");
    }

    fn create_account_result(state: &str, id: Value) -> Value {
        eb(
            "aws.organizations",
            "AWS Service Event via CloudTrail",
            json!({
                "eventSource": "organizations.amazonaws.com",
                "eventName": "CreateAccountResult",
                "serviceEventDetails": {"createAccountStatus": {"state": state, "accountId": id}},
            }),
        )
    }

    #[test]
    fn create_account_result_targets_the_new_account_only_when_it_succeeded() {
        let inv = classify(&create_account_result("SUCCEEDED", json!("012345678901"))).unwrap();
        assert_eq!(inv.trigger, "account:012345678901");
        assert_eq!(runs(&inv), (Mode::Apply, &account("012345678901"), None));
        for state in ["IN_PROGRESS", "FAILED"] {
            let inv = classify(&create_account_result(state, json!(null))).unwrap();
            assert!(skip_reason(&inv).contains(state), "{inv:?}");
        }
        let err = classify(&create_account_result("SUCCEEDED", json!("12345"))).unwrap_err();
        assert!(err.to_string().contains("\"12345\""), "{err}");
        let err = classify(&create_account_result("SUCCEEDED", json!(null))).unwrap_err();
        assert!(err.to_string().contains("accountId is null"), "{err}");
    }

    #[test]
    fn service_event_details_encoded_as_a_string_are_decoded() {
        let mut event = create_account_result("SUCCEEDED", json!("111111111111"));
        let details = event["detail"]["serviceEventDetails"].to_string();
        event["detail"]["serviceEventDetails"] = json!(details);
        let inv = classify(&event).unwrap();
        assert_eq!(runs(&inv).1, &account("111111111111"));
    }

    #[test]
    fn moved_and_retagged_accounts_are_targeted() {
        let moved = cloudtrail(
            "organizations.amazonaws.com",
            "MoveAccount",
            json!({"requestParameters": {"accountId": "222222222222", "sourceParentId": "ou-a", "destinationParentId": "ou-b"}}),
        );
        assert_eq!(runs(&classify(&moved).unwrap()).1, &account("222222222222"));
        for name in ["TagResource", "UntagResource"] {
            let tagged = cloudtrail(
                "organizations.amazonaws.com",
                name,
                json!({"requestParameters": {"resourceId": "333333333333"}}),
            );
            let inv = classify(&tagged).unwrap();
            assert_eq!(inv.trigger, "account:333333333333");
            assert_eq!(runs(&inv).1, &account("333333333333"));
        }
        let ou = cloudtrail(
            "organizations.amazonaws.com",
            "TagResource",
            json!({"requestParameters": {"resourceId": "ou-abcd-12345678"}}),
        );
        assert!(skip_reason(&classify(&ou).unwrap()).contains("not an account"));
        let bad = cloudtrail(
            "organizations.amazonaws.com",
            "MoveAccount",
            json!({"requestParameters": {}}),
        );
        assert!(classify(&bad)
            .unwrap_err()
            .to_string()
            .contains("accountId is missing"));
        let other = cloudtrail("organizations.amazonaws.com", "CreatePolicy", json!({}));
        assert!(matches!(
            classify(&other).unwrap_err(),
            EventError::Unrecognised { .. }
        ));
    }

    #[test]
    fn entra_group_changed_targets_the_group() {
        let upper = GROUP.to_uppercase();
        let inv = classify(&eb(
            "entra-sso-sync",
            "Entra Group Changed",
            json!({"group_id": upper}),
        ))
        .unwrap();
        assert_eq!(inv.trigger, format!("entra-group:{GROUP}"));
        let want = Target::Only {
            accounts: BTreeSet::new(),
            entra_groups: BTreeSet::from([Guid::try_from(GROUP.to_string()).unwrap()]),
        };
        assert_eq!(runs(&inv), (Mode::Apply, &want, None));
        for (detail, want) in [
            (json!({}), "group_id is missing"),
            (json!({"group_id": "Developers"}), "not a GUID"),
            (json!({"group_id": 7}), "a number"),
        ] {
            let err = classify(&eb("entra-sso-sync", "Entra Group Changed", detail)).unwrap_err();
            assert!(err.to_string().contains(want), "{err}");
        }
    }

    #[test]
    fn an_uploaded_configuration_is_a_full_reconcile() {
        let event = eb(
            "aws.s3",
            "Object Created",
            json!({"bucket": {"name": "b"}, "object": {"key": "config.yaml"}}),
        );
        let inv = classify(&event).unwrap();
        assert_eq!(inv.trigger, "config-changed");
        assert_eq!(runs(&inv).1, &Target::All);
        let err = classify(&eb("aws.s3", "Object Created", json!({"bucket": {}}))).unwrap_err();
        assert!(matches!(err, EventError::Malformed { .. }));
    }

    #[test]
    fn manual_actions_plan_apply_and_confirm_deletions() {
        let plan = classify(&json!({"action": "plan"})).unwrap();
        assert_eq!(plan.trigger, "manual");
        assert_eq!(runs(&plan), (Mode::Plan, &Target::All, None));
        let dry = classify(&json!({"action": "apply", "dry_run": true})).unwrap();
        assert_eq!(runs(&dry).0, Mode::Plan);
        let apply = classify(&json!({"action": "apply", "allow_deletions": 7})).unwrap();
        assert_eq!(runs(&apply), (Mode::Apply, &Target::All, Some(7)));
        for (event, want) in [
            (json!({"action": "destroy"}), "not plan, apply or reconcile"),
            (
                json!({"action": "apply", "allow_deletion": 3}),
                "unknown key \"allow_deletion\"",
            ),
            (
                json!({"action": "apply", "allow_deletions": -1}),
                "whole number",
            ),
            (
                json!({"action": "apply", "allow_deletions": "5"}),
                "whole number",
            ),
            (
                json!({"action": "apply", "dry_run": "yes"}),
                "dry_run is a string",
            ),
            (json!({"action": 1}), "action is a number"),
            (
                json!({"action": "reconcile", "allow_deletions": 1}),
                "one-off",
            ),
        ] {
            let err = classify(&event).unwrap_err();
            assert!(err.to_string().contains(want), "{event}: {err}");
        }
    }

    #[test]
    fn an_sqs_batch_is_one_merged_invocation() {
        let scim = cloudtrail("identitystore-scim.amazonaws.com", "PatchGroup", json!({}));
        let inv = classify(&sqs(&[scim.clone(), scim.clone(), scim])).unwrap();
        assert_eq!(inv.trigger, "sqs-batch(3 events)");
        assert_eq!(runs(&inv), (Mode::Apply, &Target::All, None));

        let moved = |id: &str| {
            cloudtrail(
                "organizations.amazonaws.com",
                "MoveAccount",
                json!({"requestParameters": {"accountId": id}}),
            )
        };
        let group = eb(
            "entra-sso-sync",
            "Entra Group Changed",
            json!({"group_id": GROUP}),
        );
        let inv = classify(&sqs(&[moved("111111111111"), moved("222222222222"), group])).unwrap();
        let want = Target::Only {
            accounts: ["111111111111", "222222222222"]
                .iter()
                .map(|a| AccountId::try_from(a.to_string()).unwrap())
                .collect(),
            entra_groups: BTreeSet::from([Guid::try_from(GROUP.to_string()).unwrap()]),
        };
        assert_eq!(runs(&inv).1, &want);

        // A full reconcile absorbs the targeted ones.
        let inv = classify(&sqs(&[
            moved("111111111111"),
            eb("aws.events", "Scheduled Event", json!({})),
        ]))
        .unwrap();
        assert_eq!(runs(&inv).1, &Target::All);
    }

    #[test]
    fn an_sqs_batch_runs_its_good_records_and_names_the_bad_ones() {
        let scim = cloudtrail("identitystore-scim.amazonaws.com", "DeleteUser", json!({}));
        let mut event = sqs(&[scim, json!({"hello": "world"}), json!({"action": "apply"})]);
        event["Records"][0]["body"] = json!("{not json");
        let err = classify(&event).unwrap_err();
        assert!(matches!(err, EventError::Batch { records: 3, .. }), "{err}");
        assert!(
            err.to_string()
                .contains("\"m-0\": SQS record: its body is not JSON"),
            "{err}"
        );

        let scim = cloudtrail("identitystore-scim.amazonaws.com", "DeleteUser", json!({}));
        let inv = classify(&sqs(&[
            scim,
            json!({"hello": "world"}),
            json!({"action": "apply"}),
        ]))
        .unwrap();
        assert_eq!(runs(&inv).1, &Target::All);
        assert_eq!(inv.rejected.len(), 2, "{:?}", inv.rejected);
        assert!(inv.rejected[0].contains("\"hello\""), "{:?}", inv.rejected);
        assert!(inv.rejected[1].contains("manual action inside an SQS batch"));

        let only_skips = sqs(&[create_account_result("IN_PROGRESS", json!(null))]);
        assert!(skip_reason(&classify(&only_skips).unwrap()).contains("IN_PROGRESS"));
    }

    #[test]
    fn other_batches_and_shapes_are_unrecognised() {
        let s3_batch = json!({"Records": [{"eventSource": "aws:s3", "s3": {}}]});
        assert!(classify(&s3_batch)
            .unwrap_err()
            .to_string()
            .contains("\"aws:s3\", not aws:sqs"));
        assert!(classify(&json!({"Records": []}))
            .unwrap_err()
            .to_string()
            .contains("empty"));
        assert_eq!(
            classify(&json!([1, 2])).unwrap_err(),
            EventError::NotAnObject { found: "an array" }
        );
        let err = classify(&eb(
            "aws.ec2",
            "EC2 Instance State-change Notification",
            json!({}),
        ))
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "unrecognised event (source \"aws.ec2\", detail-type \"EC2 Instance State-change Notification\"); nothing was changed"
        );
    }

    #[test]
    fn errors_quote_outside_input_cut_short() {
        let long = "x".repeat(10_000);
        let err = classify(&eb(&long, "Something", json!({})))
            .unwrap_err()
            .to_string();
        assert!(err.len() < 300, "{}", err.len());
        let many: Map<String, Value> = (0..50).map(|i| (format!("key{i}"), json!(i))).collect();
        let err = classify(&Value::Object(many)).unwrap_err().to_string();
        assert!(err.contains("and 42 more"), "{err}");
        assert!(err.len() < 300, "{err}");
    }

    #[test]
    fn the_deadline_keeps_a_margin_for_requests_in_flight() {
        let now = Instant::now();
        let d = run_deadline(now + Duration::from_secs(900), now);
        assert_eq!(d, now + Duration::from_secs(840));
        let short = run_deadline(now + Duration::from_secs(30), now);
        assert_eq!(short, now + Duration::from_secs(24));
        assert_eq!(run_deadline(now, now), now);

        let wall = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let at = deadline_instant(1_000_000_000 + 5_000, wall, now);
        assert_eq!(at, now + Duration::from_secs(5));
        assert_eq!(
            deadline_instant(0, wall, now),
            now,
            "a past deadline is now"
        );
    }

    #[test]
    fn flags_parse_strictly() {
        assert!(!parse_flag("DRY_RUN", None).unwrap());
        assert!(!parse_flag("DRY_RUN", Some("false")).unwrap());
        assert!(parse_flag("DRY_RUN", Some("TRUE")).unwrap());
        assert!(parse_flag("DRY_RUN", Some(" yes ")).unwrap());
        let err = parse_flag("DRY_RUN", Some("maybe")).unwrap_err();
        assert!(err.to_string().contains("DRY_RUN"), "{err}");
    }

    const CONFIG: &str = "version: 1\nentra:\n  tenant_id: 11111111-2222-3333-4444-555555555555\n  client_id: 66666666-7777-8888-9999-000000000000\nstate:\n  table: entra-sso-sync-state\nsafety:\n  max_deletions: 20\nassignments:\n  - name: admins\n    entra_group: Platform Admins\n    permission_set: AdministratorAccess\n    accounts: [\"111111111111\"]\n";
    const INSTANCE: &str = "arn:aws:sso:::instance/ssoins-1234567890abcdef";

    fn deployment(vars: &[(&str, &str)]) -> Result<Deployment, HandlerError> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Deployment::from_lookup(|k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
    }

    #[test]
    fn the_deployment_fills_in_the_instance_and_caps_deletions() {
        let d = deployment(&[
            ("ENTRA_TENANT_ID", "11111111-2222-3333-4444-555555555555"),
            ("ENTRA_CLIENT_ID", "66666666-7777-8888-9999-000000000000"),
            ("IDENTITY_CENTER_INSTANCE_ARN", INSTANCE),
            ("IDENTITY_STORE_ID", "d-1234567890"),
            ("MAX_DELETIONS", "5"),
        ])
        .unwrap();
        let mut config = Config::parse(CONFIG, "t.yaml").unwrap();
        d.apply(&mut config).unwrap();
        assert_eq!(
            config
                .identity_center
                .instance_arn
                .as_ref()
                .map(|a| a.as_str()),
            Some(INSTANCE)
        );
        assert_eq!(
            config
                .identity_center
                .identity_store_id
                .as_ref()
                .map(|a| a.as_str()),
            Some("d-1234567890")
        );
        assert_eq!(config.safety.max_deletions, 5);

        // A ceiling above the configuration's own limit changes nothing.
        let mut config = Config::parse(CONFIG, "t.yaml").unwrap();
        deployment(&[("MAX_DELETIONS", "50")])
            .unwrap()
            .apply(&mut config)
            .unwrap();
        assert_eq!(config.safety.max_deletions, 20);
        // Empty variables pin nothing.
        assert_eq!(
            deployment(&[("MAX_DELETIONS", ""), ("ENTRA_TENANT_ID", " ")]).unwrap(),
            Deployment::default()
        );
    }

    #[test]
    fn a_configuration_for_another_tenant_or_instance_is_refused() {
        let other_tenant =
            deployment(&[("ENTRA_TENANT_ID", "99999999-2222-3333-4444-555555555555")]).unwrap();
        let err = other_tenant
            .apply(&mut Config::parse(CONFIG, "t.yaml").unwrap())
            .unwrap_err();
        assert_eq!(err.kind(), "ConfigurationMismatch");
        let text = err.to_string();
        assert!(
            text.contains("entra.tenant_id") && text.contains("ENTRA_TENANT_ID"),
            "{text}"
        );
        assert!(text.contains("99999999-2222"), "{text}");

        let with_instance = CONFIG.replace(
            "entra:",
            "identity_center:\n  instance_arn: arn:aws:sso:::instance/ssoins-aaaaaaaaaaaaaaaa\nentra:",
        );
        let err = deployment(&[("IDENTITY_CENTER_INSTANCE_ARN", INSTANCE)])
            .unwrap()
            .apply(&mut Config::parse(&with_instance, "t.yaml").unwrap())
            .unwrap_err();
        assert!(err.to_string().contains("ssoins-aaaaaaaaaaaaaaaa"), "{err}");
    }

    #[test]
    fn invalid_deployment_settings_name_the_variable() {
        for (name, value) in [
            ("MAX_DELETIONS", "ten"),
            ("ENTRA_TENANT_ID", "contoso"),
            ("IDENTITY_CENTER_INSTANCE_ARN", "ssoins-1"),
        ] {
            let err = deployment(&[(name, value)]).unwrap_err();
            assert!(err.to_string().contains(name), "{err}");
        }
    }

    /// Arbitrary JSON, a few levels deep, with strings biased towards the keys and values the
    /// classifier looks at so that the deep branches are reached.
    fn arb_json() -> impl Strategy<Value = Value> {
        let words = prop::sample::select(vec![
            "source",
            "detail-type",
            "detail",
            "Records",
            "eventSource",
            "eventName",
            "body",
            "action",
            "aws:sqs",
            "aws.events",
            "aws.scheduler",
            "aws.s3",
            "aws.organizations",
            "entra-sso-sync",
            "Entra Group Changed",
            "Scheduled Event",
            "AWS API Call via CloudTrail",
            "AWS Service Event via CloudTrail",
            "identitystore-scim.amazonaws.com",
            "organizations.amazonaws.com",
            "CreateAccountResult",
            "MoveAccount",
            "TagResource",
            "serviceEventDetails",
            "createAccountStatus",
            "requestParameters",
            "accountId",
            "resourceId",
            "state",
            "SUCCEEDED",
            "group_id",
            "plan",
            "apply",
            "dry_run",
            "allow_deletions",
            "111111111111",
            "{}",
        ]);
        let string = prop_oneof![
            words.clone().prop_map(str::to_string),
            ".{0,12}".prop_map(|s: String| s),
        ];
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            string.clone().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop_oneof![words.clone().prop_map(str::to_string), ".{0,6}"],
                    inner.clone(),
                    0..6
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
                // An SQS body: a JSON string holding a value.
                inner.prop_map(|v| Value::String(v.to_string())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn the_classifier_never_panics_and_is_deterministic(event in arb_json()) {
            let first = classify(&event);
            prop_assert_eq!(&first, &classify(&event));
            if let Err(e) = first {
                prop_assert!(e.to_string().len() < 2_000);
            }
        }

        #[test]
        fn sqs_batches_of_anything_never_panic(bodies in prop::collection::vec(arb_json(), 1..5)) {
            let _ = classify(&sqs(&bodies));
        }
    }
}

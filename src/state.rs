//! The state table (DynamoDB, string keys `pk`/`sk`, TTL attribute `expires_at`): the
//! ownership ledger of assignments the tool created, and a record of every run.
//!
//! Items:
//! - `pk = "OWNED"`, `sk = <account>#<permission set ARN>#<USER|GROUP>#<principal id>`: one
//!   assignment the tool created (or is about to: `pending`), the rules that wanted it and
//!   the principal's name at the time, so a later deletion can be shown by name.
//! - `pk = "RUN"`, `sk = <started at, RFC 3339>#<run id>`: one run's outcome, counts and
//!   report, expiring after [`RUN_RETENTION_DAYS`].
//! - `pk = "MIRROR"`, `sk = <Entra group id>`: an Identity Center group the tool created to
//!   mirror an Entra group's transitive members.
//! - `pk = "SOURCE"`, `sk = <rule name>`: the Entra group object id the rule's name resolved
//!   to (the pin) and how many members it had at the last apply.
//! - `pk = "LEASE"`, `sk = "apply"`: the run allowed to change things, until `expires_at`.
//! - `pk = "CACHE#<name>"`: one cached value (the Entra tenant replica, the organization, the
//!   permission sets, resolved principals) as `sk = "head"` (generation, chunk count, when
//!   written) and `sk = "<generation>#<chunk>"` binary chunks, so a value larger than an item
//!   is swapped in whole or not at all.

use crate::aws::AwsError;
use crate::model::{AccountId, Assignment, PrincipalType};
use crate::plan::Owned;
use async_trait::async_trait;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{AttributeValue, DeleteRequest, PutRequest, WriteRequest};
use std::collections::{BTreeMap, HashMap};
use std::time::{SystemTime, UNIX_EPOCH};

/// How long run records are kept.
pub const RUN_RETENTION_DAYS: u64 = 90;
const OWNED_PK: &str = "OWNED";
const RUN_PK: &str = "RUN";
const MIRROR_PK: &str = "MIRROR";
const SOURCE_PK: &str = "SOURCE";
const LEASE_PK: &str = "LEASE";
const SEEN_PK: &str = "SEEN";
const AUDIT_PK: &str = "AUDIT";
const PLAN_PK: &str = "PLAN";
/// Creations per item of a carried plan: keys are about 150 bytes, items at most 400 KB.
const PLAN_CHUNK: usize = 2_000;

/// Creations a run planned but did not start before its deadline, carried to the next run so
/// it need not read their pairs again. `read_at` is when their pairs were read (and found
/// without them): carrying a plan never makes that older read look newer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CarriedPlan {
    /// When the pairs were read (seconds since the epoch, the state table's clock).
    pub read_at: u64,
    /// The creations left.
    pub creates: Vec<Assignment>,
}
const LEASE_SK: &str = "apply";
const CACHE_PK: &str = "CACHE#";
const CACHE_HEAD: &str = "head";
/// Bytes per cache chunk: an item holds at most 400 KB.
const CACHE_CHUNK: usize = 350_000;
/// Writes per `BatchWriteItem` (DynamoDB's limit).
const BATCH_WRITES: usize = 25;

/// A value cached in the state table, with when it was written (seconds since the epoch).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cached {
    /// When it was written, on the state table's clock.
    pub written_at: u64,
    /// The value.
    pub bytes: Vec<u8>,
}
const SERVICE: &str = "dynamodb";
/// DynamoDB's item limit is 400 KB; keep the stored report well under it.
const MAX_REPORT_BYTES: usize = 300_000;

/// One ledger entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerEntry {
    /// The assignment.
    pub assignment: Assignment,
    /// Rules and pending flag.
    pub owned: Owned,
    /// The principal's name when recorded (group display name or user name).
    pub principal_name: Option<String>,
}

/// One run, as recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunRecord {
    /// Unique run id.
    pub run_id: String,
    /// RFC 3339 start time.
    pub started_at: String,
    /// What started the run.
    pub trigger: String,
    /// `plan` or `apply`.
    pub mode: String,
    /// Outcome word, as in the report.
    pub outcome: String,
    /// Wall time.
    pub duration_ms: u64,
    /// Counts by name (creates, deletes, held, …).
    pub counts: BTreeMap<String, u64>,
    /// The full report as JSON (truncated when too large for one item).
    pub report_json: String,
}

/// An Identity Center group the tool owns, mirroring an Entra group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorRecord {
    /// The Entra group's object id.
    pub entra_group_id: String,
    /// The identity-store group id.
    pub group_id: String,
    /// The display name it was given.
    pub display_name: String,
}

/// What a rule's Entra group was at the last apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceRecord {
    /// The rule.
    pub rule: String,
    /// The object id its group resolved to (the pin).
    pub entra_group_id: String,
    /// Transitive user members seen (members and mirror modes).
    pub members: u64,
}

/// The result of trying to take the lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lease {
    /// This run holds it.
    Acquired,
    /// Another run holds it.
    HeldBy {
        /// The holder's run id.
        holder: String,
        /// When it expires (seconds since the epoch).
        expires_at: u64,
    },
}

/// Seconds since the Unix epoch.
pub fn epoch_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// What the engine needs from the state table.
#[async_trait]
pub trait StateStore: Send + Sync {
    /// The whole ownership ledger.
    async fn ledger(&self) -> Result<Vec<LedgerEntry>, AwsError>;
    /// Writes (or overwrites) one ledger entry.
    async fn put(&self, entry: &LedgerEntry, run_id: &str) -> Result<(), AwsError>;
    /// Removes one ledger entry.
    async fn remove(&self, assignment: &Assignment) -> Result<(), AwsError>;
    /// Records a run.
    async fn record_run(&self, run: &RunRecord) -> Result<(), AwsError>;
    /// The most recent runs, newest first.
    async fn runs(&self, limit: usize) -> Result<Vec<RunRecord>, AwsError>;
    /// Every mirror group the tool owns.
    async fn mirrors(&self) -> Result<Vec<MirrorRecord>, AwsError>;
    /// Records a mirror group.
    async fn put_mirror(&self, mirror: &MirrorRecord) -> Result<(), AwsError>;
    /// Forgets a mirror group.
    async fn remove_mirror(&self, entra_group_id: &str) -> Result<(), AwsError>;
    /// What each rule's group was at the last apply.
    async fn sources(&self) -> Result<Vec<SourceRecord>, AwsError>;
    /// Records a rule's group.
    async fn put_source(&self, source: &SourceRecord) -> Result<(), AwsError>;
    /// Assignments a rule wants that existed without the tool creating them (unowned), as
    /// last read: trusted like the ledger until the pair is read again.
    async fn seen(&self) -> Result<Vec<Assignment>, AwsError>;
    /// Records an unowned assignment that a rule wants.
    async fn put_seen(&self, assignment: &Assignment) -> Result<(), AwsError>;
    /// Forgets one.
    async fn remove_seen(&self, assignment: &Assignment) -> Result<(), AwsError>;
    /// When the rolling audit last read up to (seconds since the epoch), if ever.
    async fn audit_cursor(&self) -> Result<Option<u64>, AwsError>;
    /// Moves the rolling audit's cursor.
    async fn put_audit_cursor(&self, at: u64) -> Result<(), AwsError>;
    /// The creations the last run left at its deadline, if any.
    async fn carried_plan(&self) -> Result<Option<CarriedPlan>, AwsError>;
    /// Replaces the carried plan (an empty one clears it).
    async fn put_carried_plan(&self, plan: &CarriedPlan) -> Result<(), AwsError>;
    /// The cached value `name`, if one was written.
    async fn cache(&self, name: &str) -> Result<Option<Cached>, AwsError>;
    /// Replaces the cached value `name` whole (readers see the old or the new one).
    async fn put_cache(&self, name: &str, value: &Cached) -> Result<(), AwsError>;
    /// The clock leases and the audit go by (seconds since the epoch).
    fn now_epoch(&self) -> u64 {
        epoch_seconds()
    }
    /// Takes the apply lease for `ttl_seconds` unless a live one is held by another run.
    async fn acquire_lease(&self, holder: &str, ttl_seconds: u64) -> Result<Lease, AwsError>;
    /// Extends the lease; `false` when it is no longer this run's.
    async fn renew_lease(&self, holder: &str, ttl_seconds: u64) -> Result<bool, AwsError>;
    /// Gives the lease up (only if this run holds it).
    async fn release_lease(&self, holder: &str) -> Result<(), AwsError>;
}

/// The production [`StateStore`].
pub struct DynamoState {
    client: aws_sdk_dynamodb::Client,
    table: String,
}

impl DynamoState {
    /// Wraps a client for one table.
    pub fn new(client: aws_sdk_dynamodb::Client, table: String) -> Self {
        DynamoState { client, table }
    }
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

/// Now, in RFC 3339.
pub fn now_rfc3339() -> String {
    aws_smithy_types::DateTime::from(SystemTime::now())
        .fmt(aws_smithy_types::date_time::Format::DateTime)
        .unwrap_or_default()
}

fn get_s<'a>(item: &'a HashMap<String, AttributeValue>, key: &str) -> Result<&'a str, String> {
    match item.get(key) {
        Some(AttributeValue::S(v)) => Ok(v),
        Some(_) => Err(format!("attribute {key} is not a string")),
        None => Err(format!("attribute {key} is missing")),
    }
}

fn parse_entry(item: &HashMap<String, AttributeValue>) -> Result<LedgerEntry, String> {
    let sk = get_s(item, "sk")?;
    let ctx = |e: String| format!("ledger item {sk}: {e}");
    let account_id =
        AccountId::try_from(get_s(item, "account_id").map_err(ctx)?.to_string()).map_err(ctx)?;
    let principal_type = PrincipalType::parse(get_s(item, "principal_type").map_err(ctx)?)
        .ok_or_else(|| ctx("principal_type is not USER or GROUP".into()))?;
    let rules = match item.get("rules") {
        Some(AttributeValue::L(list)) => list
            .iter()
            .map(|v| {
                v.as_s()
                    .cloned()
                    .map_err(|_| ctx("rules holds a non-string".into()))
            })
            .collect::<Result<_, _>>()?,
        None => Default::default(),
        Some(_) => return Err(ctx("rules is not a list".into())),
    };
    let pending = match item.get("pending") {
        Some(AttributeValue::Bool(b)) => *b,
        None => false,
        Some(_) => return Err(ctx("pending is not a boolean".into())),
    };
    let assignment = Assignment {
        account_id,
        permission_set_arn: get_s(item, "permission_set_arn").map_err(ctx)?.to_string(),
        principal_type,
        principal_id: get_s(item, "principal_id").map_err(ctx)?.to_string(),
    };
    if assignment.key() != sk {
        return Err(ctx("sort key does not match its attributes".into()));
    }
    Ok(LedgerEntry {
        assignment,
        owned: Owned { rules, pending },
        principal_name: get_s(item, "principal_name").ok().map(str::to_string),
    })
}

impl DynamoState {
    /// Every item of one partition, paged to the end, newest sort key first when `newest_first`.
    async fn partition(
        &self,
        pk: &str,
        newest_first: bool,
        limit: Option<usize>,
    ) -> Result<Vec<HashMap<String, AttributeValue>>, AwsError> {
        let mut out = Vec::new();
        let mut start = None;
        loop {
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("pk = :pk")
                .expression_attribute_values(":pk", s(pk))
                .consistent_read(true)
                .scan_index_forward(!newest_first)
                .set_limit(limit.map(|l| i32::try_from(l).unwrap_or(i32::MAX)))
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| AwsError::sdk(SERVICE, "Query", e))?;
            out.extend(page.items.unwrap_or_default());
            start = page.last_evaluated_key.filter(|k| !k.is_empty());
            if start.is_none() || limit.is_some_and(|l| out.len() >= l) {
                if let Some(l) = limit {
                    out.truncate(l);
                }
                return Ok(out);
            }
        }
    }

    /// A PutItem of an assignment item (keyed by [`Assignment::key`]) in partition `pk`, with
    /// its attributes, for the caller to add to and send.
    fn put_assignment(
        &self,
        pk: &str,
        a: &Assignment,
    ) -> aws_sdk_dynamodb::operation::put_item::builders::PutItemFluentBuilder {
        self.client
            .put_item()
            .table_name(&self.table)
            .item("pk", s(pk))
            .item("sk", s(a.key()))
            .item("account_id", s(a.account_id.as_str()))
            .item("permission_set_arn", s(&a.permission_set_arn))
            .item("principal_type", s(a.principal_type.as_str()))
            .item("principal_id", s(&a.principal_id))
    }

    async fn delete(&self, pk: &str, sk: &str) -> Result<(), AwsError> {
        self.client
            .delete_item()
            .table_name(&self.table)
            .key("pk", s(pk))
            .key("sk", s(sk))
            .send()
            .await
            .map_err(|e| AwsError::sdk(SERVICE, "DeleteItem", e))?;
        Ok(())
    }

    async fn write_lease(
        &self,
        holder: &str,
        ttl_seconds: u64,
        renew: bool,
    ) -> Result<bool, AwsError> {
        let now = epoch_seconds();
        let req = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("pk", s(LEASE_PK))
            .item("sk", s(LEASE_SK))
            .item("holder", s(holder))
            .item(
                "expires_at",
                AttributeValue::N((now + ttl_seconds).to_string()),
            )
            .expression_attribute_values(":me", s(holder));
        let req = if renew {
            req.condition_expression("holder = :me")
        } else {
            req.condition_expression(
                "attribute_not_exists(pk) OR expires_at < :now OR holder = :me",
            )
            .expression_attribute_values(":now", AttributeValue::N(now.to_string()))
        };
        match req.send().await {
            Ok(_) => Ok(true),
            Err(e) => {
                let e = AwsError::sdk(SERVICE, "PutItem", e);
                if e.code() == Some("ConditionalCheckFailedException") {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
        }
    }
}

fn parse_run(item: &HashMap<String, AttributeValue>) -> Result<RunRecord, String> {
    let n = |key: &str| -> u64 {
        item.get(key)
            .and_then(|v| v.as_n().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or_default()
    };
    let counts = match item.get("counts") {
        Some(AttributeValue::M(m)) => m
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_n()
                        .ok()
                        .and_then(|n| n.parse().ok())
                        .unwrap_or_default(),
                )
            })
            .collect(),
        _ => BTreeMap::new(),
    };
    Ok(RunRecord {
        run_id: get_s(item, "run_id")?.to_string(),
        started_at: get_s(item, "started_at")?.to_string(),
        trigger: get_s(item, "trigger")?.to_string(),
        mode: get_s(item, "mode")?.to_string(),
        outcome: get_s(item, "outcome")?.to_string(),
        duration_ms: n("duration_ms"),
        counts,
        report_json: get_s(item, "report").unwrap_or_default().to_string(),
    })
}

#[async_trait]
impl StateStore for DynamoState {
    async fn ledger(&self) -> Result<Vec<LedgerEntry>, AwsError> {
        self.partition(OWNED_PK, false, None)
            .await?
            .iter()
            .map(|item| parse_entry(item).map_err(|m| AwsError::malformed(SERVICE, "Query", m)))
            .collect()
    }

    async fn put(&self, entry: &LedgerEntry, run_id: &str) -> Result<(), AwsError> {
        let mut req = self
            .put_assignment(OWNED_PK, &entry.assignment)
            .item(
                "rules",
                AttributeValue::L(entry.owned.rules.iter().map(s).collect()),
            )
            .item("pending", AttributeValue::Bool(entry.owned.pending))
            .item("run_id", s(run_id))
            .item("updated_at", s(now_rfc3339()));
        if let Some(name) = &entry.principal_name {
            req = req.item("principal_name", s(name));
        }
        req.send()
            .await
            .map_err(|e| AwsError::sdk(SERVICE, "PutItem", e))?;
        Ok(())
    }

    async fn remove(&self, assignment: &Assignment) -> Result<(), AwsError> {
        self.delete(OWNED_PK, &assignment.key()).await
    }

    async fn record_run(&self, run: &RunRecord) -> Result<(), AwsError> {
        let expires_at = epoch_seconds() + RUN_RETENTION_DAYS * 86_400;
        let mut report = run.report_json.clone();
        if report.len() > MAX_REPORT_BYTES {
            let mut cut = MAX_REPORT_BYTES;
            while !report.is_char_boundary(cut) {
                cut -= 1;
            }
            report.truncate(cut);
        }
        let counts = run
            .counts
            .iter()
            .map(|(k, v)| (k.clone(), AttributeValue::N(v.to_string())))
            .collect();
        self.client
            .put_item()
            .table_name(&self.table)
            .item("pk", s(RUN_PK))
            .item("sk", s(format!("{}#{}", run.started_at, run.run_id)))
            .item("run_id", s(&run.run_id))
            .item("started_at", s(&run.started_at))
            .item("trigger", s(&run.trigger))
            .item("mode", s(&run.mode))
            .item("outcome", s(&run.outcome))
            .item(
                "duration_ms",
                AttributeValue::N(run.duration_ms.to_string()),
            )
            .item("counts", AttributeValue::M(counts))
            .item("report", s(report))
            .item("expires_at", AttributeValue::N(expires_at.to_string()))
            .send()
            .await
            .map_err(|e| AwsError::sdk(SERVICE, "PutItem", e))?;
        Ok(())
    }

    async fn runs(&self, limit: usize) -> Result<Vec<RunRecord>, AwsError> {
        self.partition(RUN_PK, true, Some(limit))
            .await?
            .iter()
            .map(|item| parse_run(item).map_err(|m| AwsError::malformed(SERVICE, "Query", m)))
            .collect()
    }

    async fn mirrors(&self) -> Result<Vec<MirrorRecord>, AwsError> {
        self.partition(MIRROR_PK, false, None)
            .await?
            .iter()
            .map(|item| {
                Ok(MirrorRecord {
                    entra_group_id: get_s(item, "sk")?.to_string(),
                    group_id: get_s(item, "group_id")?.to_string(),
                    display_name: get_s(item, "display_name")?.to_string(),
                })
            })
            .collect::<Result<_, String>>()
            .map_err(|m| AwsError::malformed(SERVICE, "Query", format!("mirror item: {m}")))
    }

    async fn put_mirror(&self, mirror: &MirrorRecord) -> Result<(), AwsError> {
        self.client
            .put_item()
            .table_name(&self.table)
            .item("pk", s(MIRROR_PK))
            .item("sk", s(&mirror.entra_group_id))
            .item("group_id", s(&mirror.group_id))
            .item("display_name", s(&mirror.display_name))
            .item("updated_at", s(now_rfc3339()))
            .send()
            .await
            .map_err(|e| AwsError::sdk(SERVICE, "PutItem", e))?;
        Ok(())
    }

    async fn remove_mirror(&self, entra_group_id: &str) -> Result<(), AwsError> {
        self.delete(MIRROR_PK, entra_group_id).await
    }

    async fn sources(&self) -> Result<Vec<SourceRecord>, AwsError> {
        self.partition(SOURCE_PK, false, None)
            .await?
            .iter()
            .map(|item| {
                Ok(SourceRecord {
                    rule: get_s(item, "sk")?.to_string(),
                    entra_group_id: get_s(item, "entra_group_id")?.to_string(),
                    members: item
                        .get("members")
                        .and_then(|v| v.as_n().ok())
                        .and_then(|v| v.parse().ok())
                        .ok_or("attribute members is missing")?,
                })
            })
            .collect::<Result<_, String>>()
            .map_err(|m| AwsError::malformed(SERVICE, "Query", format!("source item: {m}")))
    }

    async fn put_source(&self, source: &SourceRecord) -> Result<(), AwsError> {
        self.client
            .put_item()
            .table_name(&self.table)
            .item("pk", s(SOURCE_PK))
            .item("sk", s(&source.rule))
            .item("entra_group_id", s(&source.entra_group_id))
            .item("members", AttributeValue::N(source.members.to_string()))
            .item("updated_at", s(now_rfc3339()))
            .send()
            .await
            .map_err(|e| AwsError::sdk(SERVICE, "PutItem", e))?;
        Ok(())
    }

    async fn seen(&self) -> Result<Vec<Assignment>, AwsError> {
        self.partition(SEEN_PK, false, None)
            .await?
            .iter()
            .map(|item| {
                parse_entry(item)
                    .map(|e| e.assignment)
                    .map_err(|m| AwsError::malformed(SERVICE, "Query", format!("seen item: {m}")))
            })
            .collect()
    }

    async fn put_seen(&self, a: &Assignment) -> Result<(), AwsError> {
        self.put_assignment(SEEN_PK, a)
            .item("updated_at", s(now_rfc3339()))
            .send()
            .await
            .map_err(|e| AwsError::sdk(SERVICE, "PutItem", e))?;
        Ok(())
    }

    async fn remove_seen(&self, a: &Assignment) -> Result<(), AwsError> {
        self.delete(SEEN_PK, &a.key()).await
    }

    async fn audit_cursor(&self) -> Result<Option<u64>, AwsError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", s(AUDIT_PK))
            .key("sk", s("cursor"))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| AwsError::sdk(SERVICE, "GetItem", e))?;
        let Some(item) = out.item else {
            return Ok(None);
        };
        item.get("at")
            .and_then(|v| v.as_n().ok())
            .and_then(|n| n.parse().ok())
            .map(Some)
            .ok_or_else(|| {
                AwsError::malformed(
                    SERVICE,
                    "GetItem",
                    "audit cursor: attribute at is not a number",
                )
            })
    }

    async fn put_audit_cursor(&self, at: u64) -> Result<(), AwsError> {
        self.client
            .put_item()
            .table_name(&self.table)
            .item("pk", s(AUDIT_PK))
            .item("sk", s("cursor"))
            .item("at", AttributeValue::N(at.to_string()))
            .item("updated_at", s(now_rfc3339()))
            .send()
            .await
            .map_err(|e| AwsError::sdk(SERVICE, "PutItem", e))?;
        Ok(())
    }

    async fn carried_plan(&self) -> Result<Option<CarriedPlan>, AwsError> {
        let items = self.partition(PLAN_PK, false, None).await?;
        if items.is_empty() {
            return Ok(None);
        }
        let malformed =
            |m: String| AwsError::malformed(SERVICE, "Query", format!("plan item: {m}"));
        let mut plan = CarriedPlan::default();
        for (i, item) in items.iter().enumerate() {
            let read_at: u64 = item
                .get("read_at")
                .and_then(|v| v.as_n().ok())
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| malformed("read_at is not a number".into()))?;
            if i > 0 && read_at != plan.read_at {
                return Err(malformed(
                    "its chunks were written by different runs".into(),
                ));
            }
            plan.read_at = read_at;
            let Some(AttributeValue::L(keys)) = item.get("creates") else {
                return Err(malformed("creates is not a list".into()));
            };
            for k in keys {
                let k = k
                    .as_s()
                    .map_err(|_| malformed("creates holds a non-string".into()))?;
                plan.creates
                    .push(Assignment::from_key(k).map_err(malformed)?);
            }
        }
        Ok(Some(plan))
    }

    async fn put_carried_plan(&self, plan: &CarriedPlan) -> Result<(), AwsError> {
        // Old chunks go first: a crash in between leaves no plan (the next run reads), never a
        // mix of two plans.
        for item in self.partition(PLAN_PK, false, None).await? {
            self.delete(
                PLAN_PK,
                get_s(&item, "sk").map_err(|m| AwsError::malformed(SERVICE, "Query", m))?,
            )
            .await?;
        }
        for (i, chunk) in plan.creates.chunks(PLAN_CHUNK).enumerate() {
            self.client
                .put_item()
                .table_name(&self.table)
                .item("pk", s(PLAN_PK))
                .item("sk", s(format!("chunk#{i:05}")))
                .item("read_at", AttributeValue::N(plan.read_at.to_string()))
                .item(
                    "creates",
                    AttributeValue::L(chunk.iter().map(|a| s(a.key())).collect()),
                )
                .send()
                .await
                .map_err(|e| AwsError::sdk(SERVICE, "PutItem", e))?;
        }
        Ok(())
    }

    async fn cache(&self, name: &str) -> Result<Option<Cached>, AwsError> {
        let pk = format!("{CACHE_PK}{name}");
        let items = self.partition(&pk, false, None).await?;
        let malformed =
            |m: String| AwsError::malformed(SERVICE, "Query", format!("cache {name}: {m}"));
        let Some(head) = items.iter().find(|i| get_s(i, "sk") == Ok(CACHE_HEAD)) else {
            return Ok(None);
        };
        let head = CacheHead::parse(head).map_err(malformed)?;
        let prefix = format!("{}#", head.generation);
        let mut bytes = Vec::new();
        let mut chunks = 0;
        // Chunks sort by their zero-padded number, so concatenating in key order restores them.
        for item in &items {
            if get_s(item, "sk").is_ok_and(|sk| sk.starts_with(&prefix)) {
                let Some(AttributeValue::B(blob)) = item.get("data") else {
                    return Err(malformed("a chunk has no binary data".into()));
                };
                bytes.extend_from_slice(blob.as_ref());
                chunks += 1;
            }
        }
        if chunks != head.chunks {
            return Err(malformed(format!(
                "{chunks} chunks found of the {} its head names",
                head.chunks
            )));
        }
        Ok(Some(Cached {
            written_at: head.written_at,
            bytes,
        }))
    }

    async fn put_cache(&self, name: &str, value: &Cached) -> Result<(), AwsError> {
        let pk = format!("{CACHE_PK}{name}");
        let old = self.cache_head(&pk).await?;
        // A new generation's chunks go first and the head flips to them in one write, so a
        // reader never sees a mix; the old generation's chunks are deleted after.
        let generation = format!("{:020}", old.as_ref().map_or(0, |h| h.number() + 1));
        let chunks: Vec<&[u8]> = value.bytes.chunks(CACHE_CHUNK).collect();
        let puts = chunks.iter().enumerate().map(|(i, c)| {
            PutRequest::builder()
                .item("pk", s(&pk))
                .item("sk", s(format!("{generation}#{i:05}")))
                .item("data", AttributeValue::B(Blob::new(c.to_vec())))
                .build()
                .map(|p| WriteRequest::builder().put_request(p).build())
                .map_err(|e| AwsError::malformed(SERVICE, "BatchWriteItem", e.to_string()))
        });
        self.batch_write(puts.collect()).await?;
        self.client
            .put_item()
            .table_name(&self.table)
            .item("pk", s(&pk))
            .item("sk", s(CACHE_HEAD))
            .item("generation", s(&generation))
            .item("chunks", AttributeValue::N(chunks.len().to_string()))
            .item(
                "written_at",
                AttributeValue::N(value.written_at.to_string()),
            )
            .send()
            .await
            .map_err(|e| AwsError::sdk(SERVICE, "PutItem", e))?;
        if let Some(old) = old {
            self.delete_chunks(&pk, &old).await?;
        }
        Ok(())
    }

    async fn acquire_lease(&self, holder: &str, ttl_seconds: u64) -> Result<Lease, AwsError> {
        if self.write_lease(holder, ttl_seconds, false).await? {
            return Ok(Lease::Acquired);
        }
        let current = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", s(LEASE_PK))
            .key("sk", s(LEASE_SK))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| AwsError::sdk(SERVICE, "GetItem", e))?
            .item
            .unwrap_or_default();
        Ok(Lease::HeldBy {
            holder: get_s(&current, "holder").unwrap_or("unknown").to_string(),
            expires_at: current
                .get("expires_at")
                .and_then(|v| v.as_n().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or_default(),
        })
    }

    async fn renew_lease(&self, holder: &str, ttl_seconds: u64) -> Result<bool, AwsError> {
        self.write_lease(holder, ttl_seconds, true).await
    }

    async fn release_lease(&self, holder: &str) -> Result<(), AwsError> {
        let result = self
            .client
            .delete_item()
            .table_name(&self.table)
            .key("pk", s(LEASE_PK))
            .key("sk", s(LEASE_SK))
            .condition_expression("holder = :me")
            .expression_attribute_values(":me", s(holder))
            .send()
            .await
            .map_err(|e| AwsError::sdk(SERVICE, "DeleteItem", e));
        match result {
            Err(e) if e.code() != Some("ConditionalCheckFailedException") => Err(e),
            _ => Ok(()),
        }
    }
}

/// A cache's head item: which generation of chunks is current.
struct CacheHead {
    generation: String,
    chunks: usize,
    written_at: u64,
}

impl CacheHead {
    fn parse(item: &HashMap<String, AttributeValue>) -> Result<CacheHead, String> {
        let number = |key: &str| -> Result<u64, String> {
            item.get(key)
                .and_then(|v| v.as_n().ok())
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| format!("head attribute {key} is not a number"))
        };
        Ok(CacheHead {
            generation: get_s(item, "generation")?.to_string(),
            chunks: usize::try_from(number("chunks")?).map_err(|e| e.to_string())?,
            written_at: number("written_at")?,
        })
    }

    fn number(&self) -> u64 {
        self.generation.parse().unwrap_or_default()
    }
}

impl DynamoState {
    async fn cache_head(&self, pk: &str) -> Result<Option<CacheHead>, AwsError> {
        let item = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", s(pk))
            .key("sk", s(CACHE_HEAD))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| AwsError::sdk(SERVICE, "GetItem", e))?
            .item;
        item.map(|i| CacheHead::parse(&i))
            .transpose()
            .map_err(|m| AwsError::malformed(SERVICE, "GetItem", format!("{pk}: {m}")))
    }

    async fn delete_chunks(&self, pk: &str, head: &CacheHead) -> Result<(), AwsError> {
        let deletes = (0..head.chunks).map(|i| {
            DeleteRequest::builder()
                .key("pk", s(pk))
                .key("sk", s(format!("{}#{i:05}", head.generation)))
                .build()
                .map(|d| WriteRequest::builder().delete_request(d).build())
                .map_err(|e| AwsError::malformed(SERVICE, "BatchWriteItem", e.to_string()))
        });
        self.batch_write(deletes.collect()).await
    }

    /// Sends writes 25 at a time, resending what DynamoDB leaves unprocessed.
    async fn batch_write(
        &self,
        writes: Vec<Result<WriteRequest, AwsError>>,
    ) -> Result<(), AwsError> {
        let writes: Vec<WriteRequest> = writes.into_iter().collect::<Result<_, _>>()?;
        for batch in writes.chunks(BATCH_WRITES) {
            let mut pending = batch.to_vec();
            for attempt in 0.. {
                let out = self
                    .client
                    .batch_write_item()
                    .request_items(&self.table, pending)
                    .send()
                    .await
                    .map_err(|e| AwsError::sdk(SERVICE, "BatchWriteItem", e))?;
                pending = out
                    .unprocessed_items
                    .and_then(|mut m| m.remove(&self.table))
                    .unwrap_or_default();
                if pending.is_empty() {
                    break;
                }
                if attempt == 8 {
                    return Err(AwsError::malformed(
                        SERVICE,
                        "BatchWriteItem",
                        format!("{} writes still unprocessed after 8 retries", pending.len()),
                    ));
                }
                tokio::time::sleep(std::time::Duration::from_millis(50 << attempt.min(5))).await;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(pairs: &[(&str, AttributeValue)]) -> HashMap<String, AttributeValue> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn ledger_items_parse_and_malformed_ones_are_errors() {
        let a = Assignment {
            account_id: AccountId::try_from("111111111111".to_string()).unwrap(),
            permission_set_arn: "arn:aws:sso:::permissionSet/ssoins-1/ps-1".into(),
            principal_type: PrincipalType::User,
            principal_id: "u-1".into(),
        };
        let good = item(&[
            ("sk", s(a.key())),
            ("account_id", s("111111111111")),
            ("permission_set_arn", s(&a.permission_set_arn)),
            ("principal_type", s("USER")),
            ("principal_id", s("u-1")),
            ("rules", AttributeValue::L(vec![s("r1")])),
            ("pending", AttributeValue::Bool(true)),
        ]);
        let e = parse_entry(&good).unwrap();
        assert_eq!(e.assignment, a);
        assert!(e.owned.pending);
        assert_eq!(e.owned.rules.iter().collect::<Vec<_>>(), vec!["r1"]);

        let mut bad = good.clone();
        bad.insert("principal_type".into(), s("ROLE"));
        assert!(parse_entry(&bad).unwrap_err().contains("principal_type"));
        let mut bad = good.clone();
        bad.insert("principal_id".into(), s("u-2"));
        assert!(parse_entry(&bad).unwrap_err().contains("sort key"));
        let mut bad = good;
        bad.remove("account_id");
        assert!(parse_entry(&bad)
            .unwrap_err()
            .contains("account_id is missing"));
    }
}

//! The state table (DynamoDB, string keys `pk`/`sk`, TTL attribute `expires_at`): the
//! ownership ledger of assignments the tool created, and a record of every run.
//!
//! Items:
//! - `pk = "OWNED"`, `sk = <account>#<permission set ARN>#<USER|GROUP>#<principal id>`: one
//!   assignment the tool created (or is about to: `pending`), the rules that wanted it and
//!   the principal's name at the time, so a later deletion can be shown by name.
//! - `pk = "RUN"`, `sk = <started at, RFC 3339>#<run id>`: one run's outcome, counts and
//!   report, expiring after [`RUN_RETENTION_DAYS`].

use crate::aws::AwsError;
use crate::model::{AccountId, Assignment, PrincipalType};
use crate::plan::Owned;
use async_trait::async_trait;
use aws_sdk_dynamodb::types::AttributeValue;
use std::collections::{BTreeMap, HashMap};
use std::time::{SystemTime, UNIX_EPOCH};

/// How long run records are kept.
pub const RUN_RETENTION_DAYS: u64 = 90;
const OWNED_PK: &str = "OWNED";
const RUN_PK: &str = "RUN";
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

#[async_trait]
impl StateStore for DynamoState {
    async fn ledger(&self) -> Result<Vec<LedgerEntry>, AwsError> {
        let mut out = Vec::new();
        let mut start = None;
        loop {
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("pk = :pk")
                .expression_attribute_values(":pk", s(OWNED_PK))
                .consistent_read(true)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| AwsError::sdk(SERVICE, "Query", e))?;
            for item in page.items.unwrap_or_default() {
                out.push(parse_entry(&item).map_err(|m| AwsError::malformed(SERVICE, "Query", m))?);
            }
            start = page.last_evaluated_key.filter(|k| !k.is_empty());
            if start.is_none() {
                return Ok(out);
            }
        }
    }

    async fn put(&self, entry: &LedgerEntry, run_id: &str) -> Result<(), AwsError> {
        let a = &entry.assignment;
        let mut req = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("pk", s(OWNED_PK))
            .item("sk", s(a.key()))
            .item("account_id", s(a.account_id.as_str()))
            .item("permission_set_arn", s(&a.permission_set_arn))
            .item("principal_type", s(a.principal_type.as_str()))
            .item("principal_id", s(&a.principal_id))
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
        self.client
            .delete_item()
            .table_name(&self.table)
            .key("pk", s(OWNED_PK))
            .key("sk", s(assignment.key()))
            .send()
            .await
            .map_err(|e| AwsError::sdk(SERVICE, "DeleteItem", e))?;
        Ok(())
    }

    async fn record_run(&self, run: &RunRecord) -> Result<(), AwsError> {
        let expires_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default()
            + RUN_RETENTION_DAYS * 86_400;
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

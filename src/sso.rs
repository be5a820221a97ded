//! Identity Center's admin API (sso-admin): instances, permission sets, and account
//! assignments, which are created and deleted asynchronously. [`AssignmentApi`] is the
//! engine's view; [`SdkAssignments`] wraps `aws-sdk-ssoadmin`.

use crate::aws::AwsError;
use crate::model::{AccountId, Assignment, Principal, PrincipalType};
use async_trait::async_trait;
use aws_sdk_ssoadmin::types::{
    OperationStatusFilter, PrincipalType as SdkPrincipalType, StatusValues, TargetType,
};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};

/// An Identity Center instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    /// Instance ARN.
    pub arn: String,
    /// Its identity store id.
    pub identity_store_id: String,
}

/// A permission set's ARN and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PermissionSet {
    /// ARN.
    pub arn: String,
    /// Name.
    pub name: String,
}

/// Create or delete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// CreateAccountAssignment.
    Create,
    /// DeleteAccountAssignment.
    Delete,
}

/// Where an asynchronous assignment request stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestStatus {
    /// Still running; poll again.
    InProgress,
    /// Done.
    Succeeded,
    /// Identity Center gave up, with its reason.
    Failed(String),
}

/// What the engine needs from sso-admin.
#[async_trait]
pub trait AssignmentApi: Send + Sync {
    /// Every permission set of the instance with its name.
    /// Every permission set of the instance with its name. Names in `known` (by ARN) are
    /// taken as they are, since a permission set's name cannot change; only the others are
    /// described.
    async fn permission_sets(
        &self,
        known: &BTreeMap<String, String>,
    ) -> Result<Vec<PermissionSet>, AwsError>;
    /// The principals assigned `permission_set_arn` in `account` (paged to the end).
    async fn assigned(
        &self,
        account: &AccountId,
        permission_set_arn: &str,
    ) -> Result<Vec<Principal>, AwsError>;
    /// Every (account, permission set) in which `principal` holds an assignment (paged to the
    /// end): one read per principal instead of one per pair.
    async fn assigned_to(
        &self,
        principal: &Principal,
    ) -> Result<Vec<(AccountId, String)>, AwsError>;
    /// Starts a creation or deletion; returns the request id and its first status.
    async fn start(
        &self,
        op: Operation,
        a: &Assignment,
    ) -> Result<(String, RequestStatus), AwsError>;
    /// Polls a request started by [`AssignmentApi::start`].
    async fn status(&self, op: Operation, request_id: &str) -> Result<RequestStatus, AwsError>;
    /// The ids of the instance's creation (or deletion) requests still in progress (paged to
    /// the end): one call tells which of many outstanding requests may have settled.
    async fn in_progress(&self, op: Operation) -> Result<BTreeSet<String>, AwsError>;
    /// Requests sent so far.
    fn calls(&self) -> u64;
}

const SERVICE: &str = "sso-admin";

/// Finds the instance: the configured one, or the account's only one.
pub async fn discover_instance(
    client: &aws_sdk_ssoadmin::Client,
    configured_arn: Option<&str>,
    configured_store: Option<&str>,
) -> Result<Instance, AwsError> {
    if let (Some(arn), Some(store)) = (configured_arn, configured_store) {
        return Ok(Instance {
            arn: arn.to_string(),
            identity_store_id: store.to_string(),
        });
    }
    let out = client
        .list_instances()
        .send()
        .await
        .map_err(|e| AwsError::sdk(SERVICE, "ListInstances", e))?;
    let instances: Vec<Instance> = out
        .instances
        .unwrap_or_default()
        .into_iter()
        .filter_map(|i| {
            Some(Instance {
                arn: i.instance_arn?,
                identity_store_id: i.identity_store_id?,
            })
        })
        .collect();
    let chosen = match configured_arn {
        Some(arn) => instances
            .into_iter()
            .find(|i| i.arn == arn)
            .ok_or_else(|| {
                AwsError::malformed(
                    SERVICE,
                    "ListInstances",
                    format!("no Identity Center instance {arn} in this account and region"),
                )
            })?,
        None => match <[Instance; 1]>::try_from(instances) {
            Ok([one]) => one,
            Err(v) => {
                return Err(AwsError::malformed(
                    SERVICE,
                    "ListInstances",
                    format!(
                        "found {} Identity Center instances; set identity_center.instance_arn",
                        v.len()
                    ),
                ))
            }
        },
    };
    Ok(Instance {
        identity_store_id: configured_store.map_or(chosen.identity_store_id, str::to_string),
        arn: chosen.arn,
    })
}

/// The production [`AssignmentApi`] for one instance.
pub struct SdkAssignments {
    client: aws_sdk_ssoadmin::Client,
    instance_arn: String,
    calls: AtomicU64,
}

impl SdkAssignments {
    /// Wraps a client for one instance.
    pub fn new(client: aws_sdk_ssoadmin::Client, instance_arn: String) -> Self {
        SdkAssignments {
            client,
            instance_arn,
            calls: AtomicU64::new(0),
        }
    }

    fn count(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
    }
}

fn sdk_principal_type(t: PrincipalType) -> SdkPrincipalType {
    match t {
        PrincipalType::User => SdkPrincipalType::User,
        PrincipalType::Group => SdkPrincipalType::Group,
    }
}

fn to_status(
    op: &'static str,
    status: Option<StatusValues>,
    reason: Option<String>,
) -> Result<RequestStatus, AwsError> {
    match status {
        Some(StatusValues::InProgress) => Ok(RequestStatus::InProgress),
        Some(StatusValues::Succeeded) => Ok(RequestStatus::Succeeded),
        Some(StatusValues::Failed) => Ok(RequestStatus::Failed(
            reason.unwrap_or_else(|| "no reason given".into()),
        )),
        other => Err(AwsError::malformed(
            SERVICE,
            op,
            format!("unexpected request status {other:?}"),
        )),
    }
}

#[async_trait]
impl AssignmentApi for SdkAssignments {
    async fn permission_sets(
        &self,
        known: &BTreeMap<String, String>,
    ) -> Result<Vec<PermissionSet>, AwsError> {
        let arns = crate::rate::all_pages(|token| async move {
            self.count();
            let page = self
                .client
                .list_permission_sets()
                .instance_arn(&self.instance_arn)
                .max_results(100)
                .set_next_token(token)
                .send()
                .await
                .map_err(|e| AwsError::sdk(SERVICE, "ListPermissionSets", e))?;
            Ok((page.permission_sets.unwrap_or_default(), page.next_token))
        })
        .await?;
        let mut out = Vec::with_capacity(arns.len());
        for arn in arns {
            if let Some(name) = known.get(&arn) {
                out.push(PermissionSet {
                    name: name.clone(),
                    arn,
                });
                continue;
            }
            crate::rate::pace_page().await;
            self.count();
            let d = self
                .client
                .describe_permission_set()
                .instance_arn(&self.instance_arn)
                .permission_set_arn(&arn)
                .send()
                .await
                .map_err(|e| AwsError::sdk(SERVICE, "DescribePermissionSet", e))?;
            let name = d.permission_set.and_then(|p| p.name).ok_or_else(|| {
                AwsError::malformed(
                    SERVICE,
                    "DescribePermissionSet",
                    format!("{arn} has no name"),
                )
            })?;
            out.push(PermissionSet { arn, name });
        }
        out.sort();
        Ok(out)
    }

    async fn assigned(
        &self,
        account: &AccountId,
        permission_set_arn: &str,
    ) -> Result<Vec<Principal>, AwsError> {
        crate::rate::all_pages(|token| async move {
            self.count();
            let page = self
                .client
                .list_account_assignments()
                .instance_arn(&self.instance_arn)
                .account_id(account.as_str())
                .permission_set_arn(permission_set_arn)
                .max_results(100)
                .set_next_token(token)
                .send()
                .await
                .map_err(|e| AwsError::sdk(SERVICE, "ListAccountAssignments", e))?;
            let malformed = |what: &str| {
                AwsError::malformed(SERVICE, "ListAccountAssignments", what.to_string())
            };
            let principals = page
                .account_assignments
                .unwrap_or_default()
                .into_iter()
                .map(|a| {
                    Ok(Principal {
                        principal_type: a
                            .principal_type
                            .as_ref()
                            .and_then(|t| PrincipalType::parse(t.as_str()))
                            .ok_or_else(|| {
                                malformed("an assignment without a USER/GROUP principal type")
                            })?,
                        principal_id: a
                            .principal_id
                            .ok_or_else(|| malformed("an assignment without a principal id"))?,
                    })
                })
                .collect::<Result<Vec<_>, AwsError>>()?;
            Ok((principals, page.next_token))
        })
        .await
    }

    async fn assigned_to(
        &self,
        principal: &Principal,
    ) -> Result<Vec<(AccountId, String)>, AwsError> {
        const OP: &str = "ListAccountAssignmentsForPrincipal";
        crate::rate::all_pages(|token| async move {
            self.count();
            let page = self
                .client
                .list_account_assignments_for_principal()
                .instance_arn(&self.instance_arn)
                .principal_type(sdk_principal_type(principal.principal_type))
                .principal_id(&principal.principal_id)
                .max_results(100)
                .set_next_token(token)
                .send()
                .await
                .map_err(|e| AwsError::sdk(SERVICE, OP, e))?;
            let pairs = page
                .account_assignments
                .unwrap_or_default()
                .into_iter()
                .map(|a| {
                    let account = a.account_id.ok_or_else(|| {
                        AwsError::malformed(SERVICE, OP, "an assignment without an account id")
                    })?;
                    let account = AccountId::try_from(account)
                        .map_err(|e| AwsError::malformed(SERVICE, OP, e))?;
                    let ps = a.permission_set_arn.ok_or_else(|| {
                        AwsError::malformed(SERVICE, OP, "an assignment without a permission set")
                    })?;
                    Ok((account, ps))
                })
                .collect::<Result<Vec<_>, AwsError>>()?;
            Ok((pairs, page.next_token))
        })
        .await
    }

    async fn start(
        &self,
        op: Operation,
        a: &Assignment,
    ) -> Result<(String, RequestStatus), AwsError> {
        self.count();
        let (status, name) = match op {
            Operation::Create => {
                let name = "CreateAccountAssignment";
                let out = self
                    .client
                    .create_account_assignment()
                    .instance_arn(&self.instance_arn)
                    .target_id(a.account_id.as_str())
                    .target_type(TargetType::AwsAccount)
                    .permission_set_arn(&a.permission_set_arn)
                    .principal_type(sdk_principal_type(a.principal_type))
                    .principal_id(&a.principal_id)
                    .send()
                    .await
                    .map_err(|e| AwsError::sdk(SERVICE, name, e))?;
                (out.account_assignment_creation_status, name)
            }
            Operation::Delete => {
                let name = "DeleteAccountAssignment";
                let out = self
                    .client
                    .delete_account_assignment()
                    .instance_arn(&self.instance_arn)
                    .target_id(a.account_id.as_str())
                    .target_type(TargetType::AwsAccount)
                    .permission_set_arn(&a.permission_set_arn)
                    .principal_type(sdk_principal_type(a.principal_type))
                    .principal_id(&a.principal_id)
                    .send()
                    .await
                    .map_err(|e| AwsError::sdk(SERVICE, name, e))?;
                (out.account_assignment_deletion_status, name)
            }
        };
        let status =
            status.ok_or_else(|| AwsError::malformed(SERVICE, name, "no status in the answer"))?;
        let request_id = status
            .request_id
            .ok_or_else(|| AwsError::malformed(SERVICE, name, "no request id in the answer"))?;
        Ok((
            request_id,
            to_status(name, status.status, status.failure_reason)?,
        ))
    }

    async fn status(&self, op: Operation, request_id: &str) -> Result<RequestStatus, AwsError> {
        self.count();
        let (status, name) = match op {
            Operation::Create => {
                let name = "DescribeAccountAssignmentCreationStatus";
                let out = self
                    .client
                    .describe_account_assignment_creation_status()
                    .instance_arn(&self.instance_arn)
                    .account_assignment_creation_request_id(request_id)
                    .send()
                    .await
                    .map_err(|e| AwsError::sdk(SERVICE, name, e))?;
                (out.account_assignment_creation_status, name)
            }
            Operation::Delete => {
                let name = "DescribeAccountAssignmentDeletionStatus";
                let out = self
                    .client
                    .describe_account_assignment_deletion_status()
                    .instance_arn(&self.instance_arn)
                    .account_assignment_deletion_request_id(request_id)
                    .send()
                    .await
                    .map_err(|e| AwsError::sdk(SERVICE, name, e))?;
                (out.account_assignment_deletion_status, name)
            }
        };
        let status =
            status.ok_or_else(|| AwsError::malformed(SERVICE, name, "no status in the answer"))?;
        to_status(name, status.status, status.failure_reason)
    }

    async fn in_progress(&self, op: Operation) -> Result<BTreeSet<String>, AwsError> {
        let filter = OperationStatusFilter::builder()
            .status(StatusValues::InProgress)
            .build();
        let ids = crate::rate::all_pages(|token| {
            let filter = filter.clone();
            async move {
                self.count();
                let (statuses, next) = match op {
                    Operation::Create => {
                        let out = self
                            .client
                            .list_account_assignment_creation_status()
                            .instance_arn(&self.instance_arn)
                            .filter(filter)
                            .max_results(100)
                            .set_next_token(token)
                            .send()
                            .await
                            .map_err(|e| {
                                AwsError::sdk(SERVICE, "ListAccountAssignmentCreationStatus", e)
                            })?;
                        (out.account_assignments_creation_status, out.next_token)
                    }
                    Operation::Delete => {
                        let out = self
                            .client
                            .list_account_assignment_deletion_status()
                            .instance_arn(&self.instance_arn)
                            .filter(filter)
                            .max_results(100)
                            .set_next_token(token)
                            .send()
                            .await
                            .map_err(|e| {
                                AwsError::sdk(SERVICE, "ListAccountAssignmentDeletionStatus", e)
                            })?;
                        (out.account_assignments_deletion_status, out.next_token)
                    }
                };
                let ids: Vec<String> = statuses
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|s| s.request_id)
                    .collect();
                Ok((ids, next))
            }
        })
        .await?;
        Ok(ids.into_iter().collect())
    }

    fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}

//! AWS Organizations, read once per run into an [`Organization`] snapshot: the root, every OU
//! at any depth, every account with its status, and tags when some rule needs them.

use crate::aws::AwsError;
use crate::model::AccountId;
use crate::scope::{AccountStatus, OrgAccount, OrgUnit, Organization};
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// What the engine needs from AWS Organizations.
#[async_trait]
pub trait OrganizationApi: Send + Sync {
    /// The whole organization; tags are read only when `with_tags`.
    async fn snapshot(&self, with_tags: bool) -> Result<Organization, AwsError>;
    /// The account the tool runs in (to know whether it is a delegated administrator).
    async fn caller_account(&self) -> Result<Option<AccountId>, AwsError>;
    /// Requests sent so far.
    fn calls(&self) -> u64;
}

/// The production [`OrganizationApi`].
pub struct SdkOrganizations {
    client: aws_sdk_organizations::Client,
    sts: aws_sdk_sts::Client,
    calls: AtomicU64,
}

const SERVICE: &str = "organizations";

impl SdkOrganizations {
    /// Clients from the shared AWS configuration.
    pub fn new(sdk: &aws_config::SdkConfig) -> Self {
        SdkOrganizations {
            client: aws_sdk_organizations::Client::new(sdk),
            sts: aws_sdk_sts::Client::new(sdk),
            calls: AtomicU64::new(0),
        }
    }

    fn count(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
    }

    async fn children(
        &self,
        parent: &str,
        org: &mut Organization,
        queue: &mut Vec<String>,
    ) -> Result<(), AwsError> {
        let units = crate::rate::all_pages(|token| async move {
            self.count();
            let page = self
                .client
                .list_organizational_units_for_parent()
                .parent_id(parent)
                .set_next_token(token)
                .send()
                .await
                .map_err(|e| AwsError::sdk(SERVICE, "ListOrganizationalUnitsForParent", e))?;
            let units = page
                .organizational_units
                .unwrap_or_default()
                .into_iter()
                .map(|ou| {
                    let id = ou.id.ok_or_else(|| {
                        AwsError::malformed(
                            SERVICE,
                            "ListOrganizationalUnitsForParent",
                            "an OU without an id",
                        )
                    })?;
                    Ok((id, ou.name.unwrap_or_default()))
                });
            Ok((
                units.collect::<Result<Vec<_>, AwsError>>()?,
                page.next_token,
            ))
        })
        .await?;
        for (id, name) in units {
            let unit = OrgUnit {
                name,
                parent: Some(parent.to_string()),
            };
            org.units.insert(id.clone(), unit);
            queue.push(id);
        }
        let accounts = crate::rate::all_pages(|token| async move {
            self.count();
            let page = self
                .client
                .list_accounts_for_parent()
                .parent_id(parent)
                .set_next_token(token)
                .send()
                .await
                .map_err(|e| AwsError::sdk(SERVICE, "ListAccountsForParent", e))?;
            let malformed = |e: String| AwsError::malformed(SERVICE, "ListAccountsForParent", e);
            let accounts = page.accounts.unwrap_or_default().into_iter().map(|a| {
                let id =
                    a.id.ok_or_else(|| malformed("an account without an id".into()))?;
                let status = match a.status.as_ref().map(|s| s.as_str()) {
                    Some("ACTIVE") => AccountStatus::Active,
                    other => AccountStatus::Other(other.unwrap_or("UNKNOWN").to_string()),
                };
                let account = OrgAccount {
                    name: a.name.unwrap_or_default(),
                    status,
                    parent: parent.to_string(),
                    tags: BTreeMap::new(),
                };
                Ok((AccountId::try_from(id).map_err(malformed)?, account))
            });
            Ok((
                accounts.collect::<Result<Vec<_>, AwsError>>()?,
                page.next_token,
            ))
        })
        .await?;
        org.accounts.extend(accounts);
        Ok(())
    }
}

#[async_trait]
impl OrganizationApi for SdkOrganizations {
    async fn snapshot(&self, with_tags: bool) -> Result<Organization, AwsError> {
        self.count();
        let described = self
            .client
            .describe_organization()
            .send()
            .await
            .map_err(|e| AwsError::sdk(SERVICE, "DescribeOrganization", e))?;
        let management_account = described
            .organization
            .and_then(|o| o.master_account_id)
            .and_then(|id| AccountId::try_from(id).ok());
        self.count();
        let roots = self
            .client
            .list_roots()
            .send()
            .await
            .map_err(|e| AwsError::sdk(SERVICE, "ListRoots", e))?;
        let root_id = roots
            .roots
            .unwrap_or_default()
            .into_iter()
            .next()
            .and_then(|r| r.id)
            .ok_or_else(|| {
                AwsError::malformed(SERVICE, "ListRoots", "the organization has no root")
            })?;
        let mut org = Organization {
            root_id: root_id.clone(),
            management_account,
            units: BTreeMap::from([(
                root_id.clone(),
                OrgUnit {
                    name: "Root".into(),
                    parent: None,
                },
            )]),
            accounts: BTreeMap::new(),
        };
        let mut queue = vec![root_id];
        while let Some(parent) = queue.pop() {
            self.children(&parent, &mut org, &mut queue).await?;
        }
        if with_tags {
            for (id, account) in org.accounts.iter_mut() {
                let tags = crate::rate::all_pages(|token| async move {
                    self.count();
                    let page = self
                        .client
                        .list_tags_for_resource()
                        .resource_id(id.as_str())
                        .set_next_token(token)
                        .send()
                        .await
                        .map_err(|e| AwsError::sdk(SERVICE, "ListTagsForResource", e))?;
                    let tags = page
                        .tags
                        .unwrap_or_default()
                        .into_iter()
                        .map(|t| (t.key, t.value));
                    Ok((tags.collect(), page.next_token))
                })
                .await?;
                account.tags.extend(tags);
            }
        }
        Ok(org)
    }

    async fn caller_account(&self) -> Result<Option<AccountId>, AwsError> {
        self.count();
        let who = self
            .sts
            .get_caller_identity()
            .send()
            .await
            .map_err(|e| AwsError::sdk("sts", "GetCallerIdentity", e))?;
        Ok(who.account.and_then(|a| AccountId::try_from(a).ok()))
    }

    fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}

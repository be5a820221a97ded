//! What every AWS adapter shares: one error type that keeps the service, the operation and
//! AWS's error code, and the loading of configuration and secrets from S3 / Secrets Manager.
//! Endpoints, region and credentials come from the SDK's standard configuration chain.

use crate::config::{Config, ConfigError, SecretArn};
use crate::model::Secret;
use aws_sdk_ssoadmin::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use std::fmt::Debug;

/// A failed AWS call, or an AWS answer the tool cannot use.
#[derive(Debug, thiserror::Error)]
pub enum AwsError {
    /// The call failed (after the SDK's own retries).
    #[error("{service} {operation} failed{}: {message}", code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Call {
        /// e.g. `sso-admin`.
        service: &'static str,
        /// e.g. `ListAccountAssignments`.
        operation: &'static str,
        /// AWS's error code, e.g. `ThrottlingException`.
        code: Option<String>,
        /// AWS's message with its cause chain.
        message: String,
    },
    /// The call succeeded but its answer is missing something the tool needs.
    #[error("{service} {operation} returned an unusable answer: {message}")]
    Malformed {
        /// e.g. `dynamodb`.
        service: &'static str,
        /// e.g. `Query`.
        operation: &'static str,
        /// What is wrong.
        message: String,
    },
}

impl AwsError {
    /// Wraps an SDK error, keeping its code and cause chain.
    pub fn sdk<E, R>(service: &'static str, operation: &'static str, err: SdkError<E, R>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: Debug,
    {
        AwsError::Call {
            service,
            operation,
            code: err.code().map(str::to_string),
            message: DisplayErrorContext(&err).to_string(),
        }
    }

    /// An answer missing a field.
    pub fn malformed(
        service: &'static str,
        operation: &'static str,
        message: impl Into<String>,
    ) -> Self {
        AwsError::Malformed {
            service,
            operation,
            message: message.into(),
        }
    }

    /// AWS's error code, when there is one.
    pub fn code(&self) -> Option<&str> {
        match self {
            AwsError::Call { code, .. } => code.as_deref(),
            AwsError::Malformed { .. } => None,
        }
    }
}

/// Loads the configuration from a path or an `s3://bucket/key` URI, then applies the
/// environment overrides.
pub async fn load_config(
    uri: &str,
    sdk: &aws_config::SdkConfig,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let read_err = |message: String| ConfigError::Read {
        source_name: uri.to_string(),
        message,
    };
    let text = if let Some(rest) = uri.strip_prefix("s3://") {
        let (bucket, key) = rest
            .split_once('/')
            .filter(|(b, k)| !b.is_empty() && !k.is_empty())
            .ok_or_else(|| read_err("expected s3://bucket/key".into()))?;
        let s3 = aws_sdk_s3::Client::new(sdk);
        let obj = s3
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| read_err(AwsError::sdk("s3", "GetObject", e).to_string()))?;
        let bytes = obj
            .body
            .collect()
            .await
            .map_err(|e| read_err(format!("reading the object body: {e}")))?
            .into_bytes();
        String::from_utf8(bytes.to_vec())
            .map_err(|_| read_err("the object is not UTF-8 text".into()))?
    } else {
        tokio::fs::read_to_string(uri)
            .await
            .map_err(|e| read_err(e.to_string()))?
    };
    let mut config = Config::parse(&text, uri)?;
    config.apply_env_overrides(env)?;
    Ok(config)
}

/// Where the client secret could not be had from.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// Neither source is configured.
    #[error("no Entra client secret: set ENTRA_CLIENT_SECRET or entra.client_secret_arn")]
    Missing,
    /// Secrets Manager failed.
    #[error("reading the Entra client secret from {arn}: {source}")]
    Read {
        /// The secret's ARN (not its value).
        arn: String,
        /// The failure.
        source: AwsError,
    },
    /// The secret is empty, binary, or JSON without `client_secret`.
    #[error("the secret {arn} holds no usable client secret: {why}")]
    Unusable {
        /// The secret's ARN.
        arn: String,
        /// What is wrong (never the value).
        why: &'static str,
    },
}

/// The Entra client secret: `ENTRA_CLIENT_SECRET` if set, else the Secrets Manager secret
/// (a plain string, or JSON with a `client_secret` field).
pub async fn client_secret(
    env_value: Option<String>,
    arn: Option<&SecretArn>,
    sdk: &aws_config::SdkConfig,
) -> Result<Secret, SecretError> {
    if let Some(v) = env_value.filter(|v| !v.is_empty()) {
        return Ok(Secret::new(v));
    }
    let arn = arn.ok_or(SecretError::Missing)?;
    let client = aws_sdk_secretsmanager::Client::new(sdk);
    let out = client
        .get_secret_value()
        .secret_id(arn.as_str())
        .send()
        .await
        .map_err(|e| SecretError::Read {
            arn: arn.to_string(),
            source: AwsError::sdk("secretsmanager", "GetSecretValue", e),
        })?;
    let unusable = |why| SecretError::Unusable {
        arn: arn.to_string(),
        why,
    };
    let raw = out
        .secret_string()
        .ok_or(unusable("it has no string value"))?;
    let value = if raw.trim_start().starts_with('{') {
        let json: serde_json::Value = serde_json::from_str(raw)
            .map_err(|_| unusable("it looks like JSON but does not parse"))?;
        json.get("client_secret")
            .and_then(|v| v.as_str())
            .ok_or(unusable("its JSON has no string field client_secret"))?
            .to_string()
    } else {
        raw.to_string()
    };
    if value.trim().is_empty() {
        return Err(unusable("it is empty"));
    }
    Ok(Secret::new(value))
}

//! The AWS Lambda function (`provided.al2023`; SAM builds it with cargo-lambda and ships it as
//! `bootstrap`). Start-up only reads the environment: the AWS configuration is resolved from
//! environment variables, and the engine connects (Secrets Manager, Identity Center) on the
//! first invocation, after the runtime's first `next` call. Everything else is in
//! [`entra_sso_sync::lambda`].

use entra_sso_sync::error_chain as chain;
use entra_sso_sync::lambda::{deadline_instant, App, HandlerError};
use lambda_runtime::{service_fn, Diagnostic, LambdaEvent};
use serde_json::Value;
use std::time::{Instant, SystemTime};

fn diagnostic(e: &HandlerError) -> Diagnostic {
    Diagnostic {
        error_type: e.kind().to_string(),
        error_message: chain(e),
    }
}

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    // JSON lines when AWS_LAMBDA_LOG_FORMAT=JSON; level from AWS_LAMBDA_LOG_LEVEL or RUST_LOG.
    lambda_runtime::tracing::init_default_subscriber();
    let sdk = aws_config::load_from_env().await;
    let app = App::from_env(sdk).map_err(|e| {
        tracing::error!(error = %e, "cannot start");
        Box::new(e) as lambda_runtime::Error
    })?;
    tracing::info!(dry_run = app.dry_run(), "entra-sso-sync function ready");
    let app = &app;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| async move {
        let deadline = deadline_instant(event.context.deadline, SystemTime::now(), Instant::now());
        app.handle(event.payload, Some(deadline))
            .await
            .map_err(|e| diagnostic(&e))
    }))
    .await
}

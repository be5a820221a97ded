//! entra-sso-sync: reconciles IAM Identity Center account assignments from Microsoft Entra
//! group membership, nested groups included, against a short human-readable configuration.
//!
//! The shape is a reconciler: [`config`] is parsed and checked, [`engine`] gathers from the
//! [`directory`] (Graph), the [`identity`] store, [`sso`] (sso-admin) and the [`state`] table,
//! [`plan`] computes the diff and applies the safety filters without any I/O, and the engine
//! applies it and records the [`report`]. The command line and the AWS Lambda function
//! ([`lambda`]) are thin entry points over the same engine.

pub mod aws;
pub mod cache;
pub mod config;
pub mod directory;
pub mod engine;
pub mod explain;
#[cfg(any(test, feature = "fakes"))]
pub mod fakes;
pub mod identity;
pub mod lambda;
pub mod mirror;
pub mod model;
pub mod organizations;
pub mod plan;
pub mod rate;
pub mod report;
pub mod retry;
pub mod scope;
pub mod settle;
pub mod sso;
pub mod state;
pub mod tenant;

/// Formats an error with its chain of causes (skipping causes its message already contains),
/// for the command line's and the Lambda's error messages.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cause = c.source();
    }
    s
}

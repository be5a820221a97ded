//! Local development stack for entra-sso-sync: a fake Microsoft Graph that speaks real Graph JSON,
//! and helpers that put moto into the state Entra's SCIM provisioning would leave it in.

pub mod graph;
pub mod moto;

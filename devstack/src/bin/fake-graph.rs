//! `fake-graph`: serves a tenant fixture as a fake Microsoft Graph on 127.0.0.1.
//!
//! Prints one line, the base URL (`http://127.0.0.1:PORT`), then serves until killed.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use devstack::graph::{FakeGraph, Tenant};

/// Fake Microsoft Graph v1.0 + identity platform token endpoint for local development.
#[derive(Debug, Parser)]
#[command(name = "fake-graph", version, about)]
struct Args {
    /// Tenant fixture JSON: {"tenant_id","client_id","client_secret","users":[...],"groups":[...]}.
    #[arg(long, value_name = "FILE")]
    tenant: PathBuf,
    /// Port on 127.0.0.1 to listen on (0 = a free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Server-side maximum page size (1..=999), to force paging with small fixtures.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=999))]
    page_size_cap: Option<u16>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let tenant = match Tenant::from_json_file(&args.tenant) {
        Ok(tenant) => tenant,
        Err(e) => {
            eprintln!("fake-graph: {e}");
            return ExitCode::FAILURE;
        }
    };
    let server = match FakeGraph::start_on(tenant, args.port).await {
        Ok(server) => server,
        Err(e) => {
            eprintln!("fake-graph: cannot listen on 127.0.0.1:{}: {e}", args.port);
            return ExitCode::FAILURE;
        }
    };
    if let Some(cap) = args.page_size_cap {
        server.set_page_size_cap(usize::from(cap));
    }
    let mut stdout = std::io::stdout().lock();
    if writeln!(stdout, "{}", server.base_url())
        .and_then(|()| stdout.flush())
        .is_err()
    {
        return ExitCode::FAILURE;
    }
    drop(stdout);
    match server.wait().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fake-graph: server error: {e}");
            ExitCode::FAILURE
        }
    }
}

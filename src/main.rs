//! The command line: `validate`, `plan` and `apply` over the same engine as the Lambda.

use clap::{Parser, Subcommand, ValueEnum};
use entra_sso_sync::aws::load_config;
use entra_sso_sync::config::Config;
use entra_sso_sync::engine::{Engine, Mode, RunRequest, Target};
use entra_sso_sync::error_chain as chain;
use entra_sso_sync::explain::{explain_account, explain_user};
use entra_sso_sync::model::AccountId;
use entra_sso_sync::organizations::SdkOrganizations;
use entra_sso_sync::state::{DynamoState, StateStore};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "entra-sso-sync",
    version,
    about = "Reconcile IAM Identity Center account assignments from Microsoft Entra groups"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ConfigArg {
    /// Configuration file path or s3://bucket/key URI.
    #[arg(long, env = "CONFIG_URI")]
    config: String,
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Output format of the result on stdout.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Subcommand)]
enum Command {
    /// Check the configuration offline. Exit 0 valid, 1 invalid.
    Validate(ConfigArg),
    /// Read what could change, change nothing. Exit 0 in sync, 2 changes pending, 1 error.
    Plan {
        #[command(flatten)]
        run: RunArgs,
        /// Read every pair's assignments instead of trusting the state table (an audit now).
        #[arg(long)]
        full_read: bool,
    },
    /// Explain which rules reach an account (and through which scope), or why a user has or
    /// lacks access (the rule, the Entra group and the nesting path).
    Explain {
        #[command(flatten)]
        run: RunArgs,
        /// The 12-digit account id.
        #[arg(long, required_unless_present = "user", conflicts_with = "user")]
        account: Option<String>,
        /// The user principal name.
        #[arg(long)]
        user: Option<String>,
    },
    /// List recent runs recorded in the state table, newest first.
    History {
        #[command(flatten)]
        run: RunArgs,
        /// How many runs.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Make the changes. Exit 0 done, 1 error, 3 a safety guard held deletions back.
    Apply {
        #[command(flatten)]
        run: RunArgs,
        /// Confirm, once, up to N deletions past the safety guards.
        #[arg(long, value_name = "N")]
        allow_deletions: Option<u32>,
        /// Read every pair's assignments instead of trusting the state table (an audit now).
        #[arg(long)]
        full_read: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "entra_sso_sync=info,warn".into()),
        )
        .init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => ExitCode::from(code),
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> Result<u8, String> {
    let (args, mode, allow_deletions, full_read) = match cli.command {
        Command::Validate(arg) => {
            let config = read_config(&arg.config, None).await?;
            println!("{}: valid ({} rules)", arg.config, config.assignments.len());
            return Ok(0);
        }
        Command::Explain {
            run,
            account: Some(account),
            ..
        } => return explain(run, &account).await,
        Command::Explain {
            run,
            user: Some(user),
            ..
        } => return explain_person(run, &user).await,
        Command::Explain { .. } => return Err("explain needs --account or --user".into()),
        Command::History { run, limit } => return history(run, limit).await,
        Command::Plan { run, full_read } => (run, Mode::Plan, None, full_read),
        Command::Apply {
            run,
            allow_deletions,
            full_read,
        } => (run, Mode::Apply, allow_deletions, full_read),
    };
    let (sdk, config) = load(&args).await?;
    let engine = Engine::connect(&config, &sdk, std::env::var("ENTRA_CLIENT_SECRET").ok())
        .await
        .map_err(|e| chain(&e))?;
    let request = RunRequest {
        mode,
        // Who started it, for the run record: the local user (the AWS identity is in CloudTrail).
        trigger: format!(
            "cli:{}",
            std::env::var("USER").unwrap_or_else(|_| "unknown".into())
        ),
        allow_deletions,
        target: Target::All,
        deadline: None,
        full_read,
        refresh: Default::default(),
    };
    let report = engine.run(&config, &request).await.map_err(|e| chain(&e))?;
    print(args.output, &report, || report.to_text())?;
    Ok(report.outcome.exit_code() as u8)
}

/// Reads the configuration; S3 URIs need the AWS configuration, local files do not.
async fn read_config(uri: &str, sdk: Option<&aws_config::SdkConfig>) -> Result<Config, String> {
    let env = |k: &str| std::env::var(k).ok();
    let result = match sdk {
        Some(sdk) => load_config(uri, sdk, env).await,
        None if uri.starts_with("s3://") => {
            load_config(uri, &aws_config::load_from_env().await, env).await
        }
        None => {
            let text = std::fs::read_to_string(uri)
                .map_err(|e| format!("{uri}: cannot read the configuration: {e}"))?;
            Config::parse(&text, uri).and_then(|mut c| c.apply_env_overrides(env).map(|()| c))
        }
    };
    result.map_err(|e| e.to_string())
}

/// Prints a result as JSON or as text.
fn print(
    output: Output,
    value: &impl serde::Serialize,
    text: impl FnOnce() -> String,
) -> Result<(), String> {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(value).map_err(|e| e.to_string())?
        ),
        Output::Text => print!("{}", text()),
    }
    Ok(())
}

/// The AWS configuration and the checked configuration file.
async fn load(args: &RunArgs) -> Result<(aws_config::SdkConfig, Config), String> {
    let sdk = aws_config::load_from_env().await;
    let config = read_config(&args.config.config, Some(&sdk)).await?;
    Ok((sdk, config))
}

/// `explain --account`: reads only the configuration and the organization.
async fn explain(args: RunArgs, account: &str) -> Result<u8, String> {
    let account =
        AccountId::try_from(account.to_string()).map_err(|e| format!("--account: {e}"))?;
    let (sdk, config) = load(&args).await?;
    let x = explain_account(&SdkOrganizations::new(&sdk), &config, &account)
        .await
        .map_err(|e| chain(&e))?;
    print(args.output, &x, || x.to_text())?;
    Ok(0)
}

/// `explain --user`: the whole lookup chain, read-only.
async fn explain_person(args: RunArgs, upn: &str) -> Result<u8, String> {
    let (sdk, config) = load(&args).await?;
    let engine = Engine::connect(&config, &sdk, std::env::var("ENTRA_CLIENT_SECRET").ok())
        .await
        .map_err(|e| chain(&e))?;
    let x = explain_user(&engine, &config, upn)
        .await
        .map_err(|e| chain(&e))?;
    print(args.output, &x, || x.to_text())?;
    Ok(0)
}

/// `history`: recent run records from the state table.
async fn history(args: RunArgs, limit: usize) -> Result<u8, String> {
    let (sdk, config) = load(&args).await?;
    let state = DynamoState::new(
        aws_sdk_dynamodb::Client::new(&sdk),
        config.state.table.to_string(),
    );
    let runs = state.runs(limit).await.map_err(|e| chain(&e))?;
    // A report too large for its item was cut when recorded: it shows as null.
    let reports: Vec<serde_json::Value> = runs
        .iter()
        .map(|r| serde_json::from_str(&r.report_json).unwrap_or(serde_json::Value::Null))
        .collect();
    print(args.output, &reports, || {
        let line = |cells: [&dyn std::fmt::Display; 8]| {
            format!(
                "{:<28} {:<14} {:<7} {:<16} {:>7} {:>7} {:>5} {:>8}\n",
                cells[0], cells[1], cells[2], cells[3], cells[4], cells[5], cells[6], cells[7]
            )
        };
        let mut out = line([
            &"STARTED", &"TRIGGER", &"MODE", &"OUTCOME", &"CREATES", &"DELETES", &"HELD", &"MS",
        ]);
        for r in &runs {
            let n = |k: &str| r.counts.get(k).copied().unwrap_or_default();
            let (c, d, h) = (n("creates"), n("deletes"), n("held"));
            out.push_str(&line([
                &r.started_at,
                &r.trigger,
                &r.mode,
                &r.outcome,
                &c,
                &d,
                &h,
                &r.duration_ms,
            ]));
        }
        out
    })?;
    Ok(0)
}

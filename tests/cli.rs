//! The command line as a user runs it: exit codes, JSON output, configuration from S3 and the
//! client secret from Secrets Manager, and no secret or token in anything it prints.

mod common;

use common::*;

#[tokio::test]
async fn validate_exits_0_for_a_good_file_and_1_naming_the_key_for_a_bad_one() {
    let s = Stack::new().await;
    let dir = std::env::temp_dir().join(format!("ess-validate-{}", s.account.account_id));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.yaml");
    std::fs::write(&good, s.config_text(DEVS, 20)).unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        s.config_text(&DEVS.replace("222222222222", "2222"), 20),
    )
    .unwrap();

    let out = cli(&s, &["validate", "--config", good.to_str().unwrap()], &[]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    let out = cli(&s, &["validate", "--config", bad.to_str().unwrap()], &[]).await;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.yaml"), "{err}");
    assert!(err.contains("assignments[0].accounts[0]"), "{err}");
    assert!(err.contains("12-digit"), "{err}");
}

const DEVS: &str = "  - name: devs\n    entra_group: Developers\n    permission_set: ReadOnlyAccess\n    accounts: [\"222222222222\"]\n    assign: members\n";

#[tokio::test]
async fn plan_apply_plan_from_s3_with_the_secret_in_secrets_manager_and_nothing_leaks() {
    let s = Stack::new().await;
    let sdk = &s.account.sdk_config;
    let secret = aws_sdk_secretsmanager::Client::new(sdk)
        .create_secret()
        .name("entra-sso-sync")
        .secret_string(format!("{{\"client_secret\":\"{SECRET}\"}}"))
        .send()
        .await
        .unwrap();
    let arn = secret.arn().unwrap().to_string();
    let config = s.config_text(DEVS, 20).replace(
        "  graph_url:",
        &format!("  client_secret_arn: {arn}\n  graph_url:"),
    );
    // Bucket names are global in moto as in AWS: one per test account.
    let bucket = format!("cfg-{}", s.account.account_id);
    let s3 = aws_sdk_s3::Client::new(sdk);
    s3.create_bucket().bucket(&bucket).send().await.unwrap();
    s3.put_object()
        .bucket(&bucket)
        .key("entra-sso-sync.yaml")
        .body(config.into_bytes().into())
        .send()
        .await
        .unwrap();
    let uri = format!("s3://{bucket}/entra-sso-sync.yaml");
    let env = [("CONFIG_URI", uri.as_str())];

    let plan = cli(&s, &["plan", "--output", "json"], &env).await;
    assert_eq!(plan.status.code(), Some(2), "{}", text(&plan));
    let json: serde_json::Value = serde_json::from_slice(&plan.stdout).expect("JSON on stdout");
    let creates = json["creates"].as_array().unwrap();
    assert_eq!(creates.len(), 4);
    for c in creates {
        assert_eq!(c["account_id"], "222222222222");
        assert_eq!(c["principal_type"], "USER");
        assert_eq!(c["rule"], "devs");
        assert!(c["permission_set_arn"]
            .as_str()
            .unwrap()
            .starts_with("arn:aws:sso:::"));
        assert!(c["principal_id"].as_str().is_some_and(|p| !p.is_empty()));
    }
    assert!(json["deletes"].as_array().unwrap().is_empty());
    assert!(json["unresolved"].is_array());

    let apply = cli(&s, &["apply"], &env).await;
    assert_eq!(apply.status.code(), Some(0), "{}", text(&apply));
    let table = String::from_utf8_lossy(&apply.stdout);
    assert!(
        table.contains("dave@contoso.example") && table.contains("ReadOnlyAccess"),
        "{table}"
    );

    let again = cli(&s, &["plan"], &env).await;
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));

    let tokens = s.graph.issued_tokens();
    assert!(!tokens.is_empty(), "the CLI did get tokens");
    for out in [&plan, &apply, &again] {
        let all = text(out);
        assert!(!all.contains(SECRET), "the client secret leaked");
        for t in &tokens {
            assert!(!all.contains(t.as_str()), "an access token leaked");
        }
    }
}

#[tokio::test]
async fn a_missing_secret_is_a_clear_error() {
    let s = Stack::new().await;
    let dir = std::env::temp_dir().join(format!("ess-secret-{}", s.account.account_id));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("c.yaml");
    std::fs::write(&path, s.config_text(DEVS, 20)).unwrap();
    let out = cli(&s, &["plan", "--config", path.to_str().unwrap()], &[]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ENTRA_CLIENT_SECRET"),
        "{}",
        text(&out)
    );
    assert!(
        s.graph.requests().is_empty(),
        "no Graph call without a secret"
    );
}

#[tokio::test]
async fn explain_account_names_the_rules_and_scopes_that_reach_it() {
    let s = Stack::new().await;
    let org = Org::new(&s).await;
    let rules = "  - name: prod\n    entra_group: Platform Admins\n    permission_set: AdministratorAccess\n    organizational_units: [Root/Workloads/Prod]\n  - name: sandbox\n    entra_group: Developers\n    permission_set: ReadOnlyAccess\n    organizational_units: [Root/Sandbox]\n";
    let dir = std::env::temp_dir().join(format!("ess-explain-{}", s.account.account_id));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("c.yaml");
    std::fs::write(&path, s.config_text(rules, 20)).unwrap();
    let deep = &org.accounts["Deep One"];
    let out = cli(
        &s,
        &[
            "explain",
            "--config",
            path.to_str().unwrap(),
            "--account",
            deep,
        ],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("Deep One, in Root/Workloads/Prod/Payments/Deep"),
        "{stdout}"
    );
    assert!(stdout.contains("rule prod: AdministratorAccess for Entra group Platform Admins: reaches it via organizational unit Root/Workloads/Prod"), "{stdout}");
    assert!(
        stdout
            .contains("rule sandbox: ReadOnlyAccess for Entra group Developers: does not reach it"),
        "{stdout}"
    );
}

#[tokio::test]
async fn explain_user_shows_the_nesting_path_and_history_lists_the_runs() {
    let s = Stack::new().await;
    let rules = "  - name: devs\n    entra_group: Developers\n    permission_set: ReadOnlyAccess\n    accounts: [\"222222222222\"]\n    assign: members\n  - name: devs-group\n    entra_group: Developers\n    permission_set: AdministratorAccess\n    accounts: [\"111111111111\"]\n  - name: admins\n    entra_group: Platform Admins\n    permission_set: AdministratorAccess\n    accounts: [\"111111111111\"]\n";
    let dir = std::env::temp_dir().join(format!("ess-explain-user-{}", s.account.account_id));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("c.yaml");
    std::fs::write(&path, s.config_text(rules, 20)).unwrap();
    let config = path.to_str().unwrap();
    let secret = [("ENTRA_CLIENT_SECRET", SECRET)];
    let apply = cli(&s, &["apply", "--config", config], &secret).await;
    assert_eq!(apply.status.code(), Some(0), "{}", text(&apply));

    let out = cli(
        &s,
        &[
            "explain",
            "--config",
            config,
            "--user",
            "erin@contoso.example",
        ],
        &secret,
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(
            "rule devs (members, ReadOnlyAccess for Entra group Developers): grants access"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("via Developers > Team Payments > Payments Oncall > erin@contoso.example"),
        "{stdout}"
    );
    assert!(stdout.contains("222222222222: assigned"), "{stdout}");
    assert!(stdout.contains("rule devs-group (group, AdministratorAccess for Entra group Developers): a member only through nested groups"), "{stdout}");
    assert!(stdout.contains("rule admins (group, AdministratorAccess for Entra group Platform Admins): not a member"), "{stdout}");

    let out = cli(
        &s,
        &["history", "--config", config, "--output", "json"],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let runs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let runs = runs.as_array().unwrap();
    assert_eq!(runs.len(), 1, "one apply so far (explain records nothing)");
    assert_eq!(runs[0]["outcome"], "applied");
    assert_eq!(runs[0]["creates"].as_array().unwrap().len(), 6);
}

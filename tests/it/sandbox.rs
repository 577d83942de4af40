//! The sandbox is as strict as the real services: JustClick updates existing contacts only,
//! checks in the service's order with its codes, compares the hash as PHP does, needs the form
//! content type; and the worker's `missing_contact` setting. Also JustClick's own PHP example
//! client against the sandbox, when `php` with curl is installed (scripts/test.sh installs it).

use crate::helpers::*;
use contact_sync::config::MissingContact;
use contact_sync::outbox::{inspect, NewJob};
use contact_sync::providers::justclick::sign::{php_build_query, request_hash};
use contact_sync::sandbox::{Sandbox, SandboxAccounts};
use serde_json::{json, Value};

const LOGIN: &str = "strict";
const SECRET: &str = "strict-secret-42";

async fn strict_sandbox() -> Sandbox {
    Sandbox::start(
        "127.0.0.1:0".parse().unwrap(),
        SandboxAccounts::default().with_justclick(LOGIN, SECRET),
    )
    .await
    .unwrap()
}

async fn post(sandbox: &Sandbox, content_type: Option<&str>, body: String) -> Value {
    let mut request = reqwest::Client::new().post(format!(
        "{}/api/UpdateSubscriberData",
        sandbox.justclick_base_url(LOGIN)
    ));
    if let Some(ct) = content_type {
        request = request.header("content-type", ct);
    }
    let bytes = request
        .body(body)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn signed(pairs: &[(&str, &str)]) -> String {
    let query = php_build_query(pairs);
    format!("{query}&hash={}", request_hash(&query, LOGIN, SECRET))
}

const FORM: Option<&str> = Some("application/x-www-form-urlencoded");

#[tokio::test]
async fn justclick_answers_like_the_service() {
    let sandbox = strict_sandbox().await;
    let code = |v: Value| v["error_code"].as_i64().unwrap();
    // empty body → 2; no form content type → 2 (the service sees no POST data)
    assert_eq!(code(post(&sandbox, FORM, String::new()).await), 2);
    let body = signed(&[("lead_email", "known@example.com")]);
    assert_eq!(code(post(&sandbox, None, body.clone()).await), 2);
    assert_eq!(
        code(post(&sandbox, Some("application/json"), body.clone()).await),
        2
    );
    // missing or empty hash → 1, wrong or upper-case hash → 4
    assert_eq!(
        code(post(&sandbox, FORM, "lead_email=known%40example.com".into()).await),
        1
    );
    assert_eq!(
        code(
            post(
                &sandbox,
                FORM,
                "lead_email=known%40example.com&hash=".into()
            )
            .await
        ),
        1
    );
    let (query, hash) = body.rsplit_once("&hash=").unwrap();
    assert_eq!(
        code(
            post(
                &sandbox,
                FORM,
                format!("{query}&hash={}", hash.to_uppercase())
            )
            .await
        ),
        4
    );
    assert_eq!(
        code(post(&sandbox, FORM, format!("{query}&hash={}", "0".repeat(32))).await),
        4
    );
    // e-mail missing or invalid → 100 (signed requests)
    assert_eq!(
        code(post(&sandbox, FORM, signed(&[("lead_name", "x")])).await),
        100
    );
    assert_eq!(
        code(post(&sandbox, FORM, signed(&[("lead_email", "a@b")])).await),
        100
    );
    // unknown contact → 500; seeded → 0
    let answer = post(&sandbox, FORM, body.clone()).await;
    assert_eq!(code(answer.clone()), 500, "{answer}");
    assert_eq!(answer["error_text"], "Subscriber not found");
    let seeded = reqwest::Client::new()
        .post(format!("{}/_sandbox/contacts", sandbox.url()))
        .header("content-type", "application/json")
        .body(
            json!({"provider": "justclick", "account": LOGIN, "emails": ["Known@Example.com"]})
                .to_string(),
        )
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let seeded: Value = serde_json::from_slice(&seeded).unwrap();
    assert_eq!(seeded["created"], 1);
    assert_eq!(code(post(&sandbox, FORM, body).await), 0);
    // several faults at once: the first in the service's order wins
    assert_eq!(
        code(post(&sandbox, None, "lead_name=x".into()).await),
        2,
        "no data before a missing hash"
    );
    assert_eq!(
        code(
            post(
                &sandbox,
                FORM,
                format!("lead_name=x&hash={}", "0".repeat(32))
            )
            .await
        ),
        4,
        "a wrong hash before a missing e-mail"
    );
}

#[tokio::test]
async fn missing_contacts_are_dead_or_skipped_by_account() {
    let mut env = TestEnv::new().await;
    let sandbox = strict_sandbox().await;
    sandbox.seed("justclick", LOGIN, &["there@example.com".to_string()]);
    env.settings
        .accounts
        .insert("jcs".into(), justclick_account(&sandbox, LOGIN, SECRET));
    let mut skipping = justclick_account(&sandbox, LOGIN, SECRET);
    skipping.missing_contact = MissingContact::Skip;
    env.settings.accounts.insert("jcskip".into(), skipping);
    let there = env
        .enqueue(NewJob::new(
            "justclick",
            "jcs",
            "there@example.com",
            json!({"lead_name": "T"}),
        ))
        .await;
    let dead = env
        .enqueue(NewJob::new(
            "justclick",
            "jcs",
            "nobody@example.com",
            json!({"lead_name": "N"}),
        ))
        .await;
    let skipped = env
        .enqueue(NewJob::new(
            "justclick",
            "jcskip",
            "nobody2@example.com",
            json!({"lead_name": "N"}),
        ))
        .await;
    let worker = env.worker();
    env.settle(&worker).await;
    assert_eq!(env.job(there).await.state, "succeeded");
    let row = env.job(dead).await;
    assert_eq!(row.state, "dead");
    assert_eq!(row.errors[0]["code"], "500", "{row:?}");
    let detail = inspect::show(&env.pool, skipped).await.unwrap().unwrap();
    assert_eq!(detail.state.as_str(), "succeeded");
    assert_eq!(detail.outcome.as_deref(), Some("not_found"));
    assert_eq!(
        sandbox.contact("justclick", LOGIN, "nobody2@example.com"),
        None,
        "the provider created nothing"
    );
}

/// JustClick's documented PHP example client (`Send`, `GetHash`, `CheckHash`), with the
/// `lead_email` its example forgets, run against the sandbox.
const PHP_CLIENT: &str = r#"<?php
function Send($url, $data) {
    $ch = curl_init();
    curl_setopt($ch, CURLOPT_URL, $url);
    curl_setopt($ch, CURLOPT_POST, true);
    curl_setopt($ch, CURLOPT_POSTFIELDS, http_build_query($data));
    curl_setopt($ch, CURLOPT_RETURNTRANSFER, true);
    $res = json_decode(curl_exec($ch));
    curl_close($ch);
    return $res;
}
function GetHash($params, $user_rs) {
    $params = http_build_query($params);
    $user_id = $user_rs['user_id'];
    $secret = $user_rs['user_rps_key'];
    $params = "$params::$user_id::$secret";
    return md5($params);
}
function CheckHash($resp, $user_rs) {
    $secret = $user_rs['user_rps_key'];
    $code = $resp->error_code;
    $text = $resp->error_text;
    $hash = md5("$code::$text::$secret");
    return $hash == $resp->hash;
}
$user_rs['user_id'] = $argv[2];
$user_rs['user_rps_key'] = $argv[3];
$send_data = array(
    'lead_email' => $argv[4],
    'lead_name' => "Новое Имя2 *~'!",
    'lead_phone' => '+77777777777',
    'lead_city' => 'Мухоловск',
    'lead_tags' => 'tag1,tag2,tag3',
);
$send_data['hash'] = GetHash($send_data, $user_rs);
$resp = Send($argv[1], $send_data);
echo json_encode(array('code' => $resp->error_code, 'text' => $resp->error_text, 'verified' => CheckHash($resp, $user_rs))), "\n";
"#;

#[tokio::test]
async fn the_documentations_php_client_agrees_with_the_sandbox() {
    let php_ready = std::process::Command::new("php")
        .arg("-m")
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l == "curl")
        });
    if !php_ready {
        assert!(
            std::env::var_os("CI").is_none(),
            "php with curl must be installed in CI (scripts/test.sh installs it)"
        );
        eprintln!("skipped: php with curl is not installed (scripts/test.sh installs it as root)");
        return;
    }
    let sandbox = strict_sandbox().await;
    sandbox.seed("justclick", LOGIN, &["php.client@example.com".to_string()]);
    let dir = Scratch::dir("cs-php");
    let script = dir.join("client.php");
    std::fs::write(&script, PHP_CLIENT).unwrap();
    let url = format!(
        "{}/api/UpdateSubscriberData",
        sandbox.justclick_base_url(LOGIN)
    );
    let run = |email: &'static str, secret: &'static str| {
        let script = script.clone();
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new("php")
                .arg(&script)
                .args([url.as_str(), LOGIN, secret, email])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_slice::<Value>(&out.stdout).unwrap()
        })
    };
    let ok = run("php.client@example.com", SECRET).await.unwrap();
    assert_eq!(ok["code"], 0, "{ok}");
    assert_eq!(
        ok["verified"], true,
        "PHP's CheckHash accepts the sandbox's answer hash"
    );
    let c = sandbox
        .contact("justclick", LOGIN, "php.client@example.com")
        .unwrap();
    assert_eq!(c.fields["lead_name"], "Новое Имя2 *~'!");
    let unknown = run("nobody@example.com", SECRET).await.unwrap();
    assert_eq!(unknown["code"], 500);
    assert_eq!(unknown["verified"], true);
    let wrong = run("php.client@example.com", "wrong-secret").await.unwrap();
    assert_eq!(wrong["code"], 4);
}

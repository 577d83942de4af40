//! The console's handlers over HTTP, against a real database and worker: sign-in, roles, the
//! CSRF token and Origin check on every POST, escaping, security headers, keyset pages, filters,
//! the count-then-confirm bulk actions with the CLI's per-contact rules, and the audit trail.
//! (The same flows in a real browser: `browser`.)

use crate::helpers::*;
use contact_sync::config::{ConsoleRole, ConsoleSettings, ConsoleUser};
use contact_sync::console::{self, Access};
use contact_sync::sandbox::{Fault, FaultRule};
use contact_sync::secret::Secret;
use reqwest::header;
use serde_json::json;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub const OPERATOR_PASSWORD: &str = "op-password-1234";
pub const VIEWER_PASSWORD: &str = "viewer-password-5678";

/// The console's settings with an operator `olga` and a viewer `victor`.
pub fn console_settings() -> ConsoleSettings {
    let mut settings = ConsoleSettings {
        refresh_interval: Duration::from_secs(1),
        ..ConsoleSettings::default()
    };
    for (name, role, password) in [
        ("olga", ConsoleRole::Operator, OPERATOR_PASSWORD),
        ("victor", ConsoleRole::Viewer, VIEWER_PASSWORD),
    ] {
        settings.users.insert(
            name.to_string(),
            ConsoleUser {
                role,
                password_hash: Secret::new(console::hash_password(password).unwrap()),
            },
        );
    }
    settings
}

/// A console served on loopback for one test.
pub struct Served {
    pub base: String,
    pub stop: CancellationToken,
    http: reqwest::Client,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub async fn serve(env: &TestEnv, settings: ConsoleSettings, access: Access) -> Served {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = console::router(env.pool.clone(), settings, access, addr).unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(console::serve(listener, router, stop.clone()));
    Served {
        base: format!("http://{addr}"),
        stop,
        http: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap(),
    }
}

/// A signed-in browser, as the server sees it: its cookie and its forms' token.
pub struct Browser<'a> {
    served: &'a Served,
    cookie: Option<String>,
}

pub struct Answer {
    pub status: u16,
    pub headers: header::HeaderMap,
    pub body: String,
}

impl<'a> Browser<'a> {
    pub fn anonymous(served: &'a Served) -> Browser<'a> {
        Browser {
            served,
            cookie: None,
        }
    }

    pub async fn signed_in(served: &'a Served, user: &str, password: &str) -> Browser<'a> {
        let mut b = Browser::anonymous(served);
        let a = b
            .post("/login", &[("username", user), ("password", password)])
            .await;
        assert_eq!(a.status, 303, "{}", a.body);
        let cookie = a.headers[header::SET_COOKIE].to_str().unwrap().to_string();
        assert!(
            cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
            "{cookie}"
        );
        b.cookie = Some(cookie.split(';').next().unwrap().to_string());
        b
    }

    fn with_cookie(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.cookie {
            Some(c) => rb.header(header::COOKIE, c),
            None => rb,
        }
    }

    async fn answer(rb: reqwest::RequestBuilder) -> Answer {
        let r = rb.send().await.unwrap();
        Answer {
            status: r.status().as_u16(),
            headers: r.headers().clone(),
            body: r.text().await.unwrap(),
        }
    }

    pub async fn get(&self, path: &str) -> Answer {
        Self::answer(self.with_cookie(self.served.http.get(format!("{}{path}", self.served.base))))
            .await
    }

    /// A form POST from a page of the console (its Origin).
    pub async fn post(&self, path: &str, form: &[(&str, &str)]) -> Answer {
        self.post_from(path, form, Some(&self.served.base)).await
    }

    pub async fn post_from(
        &self,
        path: &str,
        form: &[(&str, &str)],
        origin: Option<&str>,
    ) -> Answer {
        let mut rb = self
            .with_cookie(self.served.http.post(format!("{}{path}", self.served.base)))
            .form(form);
        if let Some(origin) = origin {
            rb = rb.header(header::ORIGIN, origin);
        }
        Self::answer(rb).await
    }

    /// The CSRF token the console's pages carry for this browser.
    pub async fn csrf(&self) -> String {
        let page = self.get("/jobs").await.body;
        let at = page
            .find("name=\"csrf\" value=\"")
            .expect("a form with the token");
        page[at + 19..at + 19 + 64].to_string()
    }
}

/// Posts a bulk form, then confirms what the count page asks to confirm (its hidden fields);
/// returns (the count page, the result page).
async fn count_then_confirm(b: &Browser<'_>, form: &[(&str, &str)]) -> (String, String) {
    let count = b.post("/jobs/bulk", form).await.body;
    let start = count
        .find("<form method=\"post\" action=\"/jobs/bulk\">")
        .expect("a confirmation form");
    let confirm = &count[start..start + count[start..].find("</form>").unwrap()];
    let mut fields: Vec<(String, String)> = Vec::new();
    for input in confirm.split("<input type=\"hidden\" ").skip(1) {
        let name = &input[input.find("name=\"").unwrap() + 6..];
        let name = &name[..name.find('"').unwrap()];
        let value = &input[input.find("value=\"").unwrap() + 7..];
        let value = &value[..value.find('"').unwrap()];
        fields.push((
            name.to_string(),
            value
                .replace("&#34;", "\"")
                .replace("&#38;", "&")
                .replace("&#39;", "'")
                .replace("&#60;", "<")
                .replace("&#62;", ">"),
        ));
    }
    let pairs: Vec<(&str, &str)> = fields
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let done = b.post("/jobs/bulk", &pairs).await.body;
    (count, done)
}

async fn audit_rows(env: &TestEnv) -> Vec<(String, String, String, i64)> {
    sqlx::query_as(
        "SELECT username, action, target, jobs FROM contact_sync.console_audit ORDER BY id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_sessions_and_roles_decide_who_sees_and_does_what() {
    let env = TestEnv::new().await;
    // the accounts registered, as a worker does when it starts
    env.settle(&env.worker()).await;
    let served = serve(&env, console_settings(), Access::SignIn).await;
    let anonymous = Browser::anonymous(&served);

    // no page without signing in; the sign-in page itself, and the static files, are open
    for path in [
        "/",
        "/jobs",
        "/jobs/1",
        "/dead",
        "/contacts?email=a@b.c",
        "/audit",
        "/csp-reports",
    ] {
        let a = anonymous.get(path).await;
        assert_eq!(a.status, 303, "{path}");
        assert_eq!(a.headers[header::LOCATION], "/login", "{path}");
    }
    assert_eq!(anonymous.get("/login").await.status, 200);
    assert_eq!(anonymous.get("/static/console.css").await.status, 200);

    // a wrong password, an unknown user: refused alike, and audited
    for (user, password) in [
        ("olga", "wrong"),
        ("nobody", OPERATOR_PASSWORD),
        ("olga", ""),
    ] {
        let a = anonymous
            .post("/login", &[("username", user), ("password", password)])
            .await;
        assert_eq!(a.status, 401, "{user}");
        assert!(
            a.body.contains("Unknown user or wrong password"),
            "{}",
            a.body
        );
        assert!(!a.headers.contains_key(header::SET_COOKIE));
    }
    // a sign-in posted from another site is refused before the password is looked at
    let a = anonymous
        .post_from(
            "/login",
            &[("username", "olga"), ("password", OPERATOR_PASSWORD)],
            Some("http://evil.example"),
        )
        .await;
    assert_eq!(a.status, 403);

    let olga = Browser::signed_in(&served, "olga", OPERATOR_PASSWORD).await;
    let victor = Browser::signed_in(&served, "victor", VIEWER_PASSWORD).await;
    let overview = olga.get("/").await;
    assert_eq!(overview.status, 200);
    assert!(
        overview.body.contains("account-jc") && overview.body.contains("account-sl"),
        "{}",
        overview.body
    );
    assert!(overview.body.contains(">Pause</button>"));
    let overview = victor.get("/").await;
    assert!(overview.body.contains("account-jc"));
    assert!(
        !overview
            .body
            .contains("<button type=\"submit\" class=\"pause\""),
        "a viewer sees no action"
    );
    assert!(!victor.get("/jobs").await.body.contains("bulk-retry"));

    // a viewer's POST is refused by the server, token or not
    let token = victor.csrf().await;
    let a = victor.post("/accounts/jc/pause", &[("csrf", &token)]).await;
    assert_eq!(a.status, 403);
    assert!(a.body.contains("viewer"), "{}", a.body);

    // an operator's POST needs the session's token and this console's Origin
    let token = olga.csrf().await;
    assert_eq!(olga.post("/accounts/jc/pause", &[]).await.status, 403);
    assert_eq!(
        olga.post("/accounts/jc/pause", &[("csrf", &"0".repeat(64))])
            .await
            .status,
        403
    );
    assert_eq!(
        olga.post("/accounts/jc/pause", &[("csrf", &victor.csrf().await)])
            .await
            .status,
        403
    );
    assert_eq!(
        olga.post_from(
            "/accounts/jc/pause",
            &[("csrf", &token)],
            Some("http://evil.example")
        )
        .await
        .status,
        403
    );
    assert_eq!(
        olga.post_from("/accounts/jc/pause", &[("csrf", &token)], None)
            .await
            .status,
        403
    );
    let paused: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM contact_sync.accounts WHERE paused_at IS NOT NULL",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(paused, 0, "nothing refused did anything");

    let a = olga
        .post(
            "/accounts/jc/pause",
            &[("csrf", &token), ("reason", "provider maintenance")],
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let reason: String = sqlx::query_scalar("SELECT pause_reason FROM contact_sync.accounts WHERE account = 'jc' AND paused_at IS NOT NULL")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert!(
        reason.contains("provider maintenance") && reason.contains("olga"),
        "{reason}"
    );
    // an account that is not registered is not created by a pause
    let a = olga
        .post("/accounts/nosuch/pause", &[("csrf", &token)])
        .await;
    assert!(a.body.contains("not a registered account"), "{}", a.body);
    let a = olga.post("/accounts/jc/resume", &[("csrf", &token)]).await;
    assert!(a.body.contains("jc is resumed"), "{}", a.body);

    // signing out ends the session on the server, not only in the browser
    assert_eq!(olga.post("/logout", &[("csrf", &token)]).await.status, 303);
    assert_eq!(olga.get("/").await.status, 303);
    assert_eq!(
        olga.post("/accounts/jc/pause", &[("csrf", &token)])
            .await
            .status,
        403
    );

    let audit = audit_rows(&env).await;
    let actions: Vec<(&str, &str)> = audit
        .iter()
        .map(|(u, a, _, _)| (u.as_str(), a.as_str()))
        .collect();
    assert_eq!(
        actions,
        [
            ("olga", "sign-in"),
            ("nobody", "sign-in"),
            ("olga", "sign-in"),
            ("olga", "sign-in"),
            ("victor", "sign-in"),
            ("olga", "pause"),
            ("olga", "resume"),
            ("olga", "sign-out"),
        ]
    );
    let page = victor.get("/audit").await.body;
    assert!(page.contains("provider maintenance"), "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_expire_and_a_removed_user_loses_access() {
    let env = TestEnv::new().await;
    let mut settings = console_settings();
    settings.session_ttl = Duration::from_secs(60);
    let served = serve(&env, settings.clone(), Access::SignIn).await;
    let olga = Browser::signed_in(&served, "olga", OPERATOR_PASSWORD).await;
    assert_eq!(olga.get("/").await.status, 200);
    sqlx::query(
        "UPDATE contact_sync.console_sessions SET expires_at = now() - interval '1 second'",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        olga.get("/").await.status,
        303,
        "an expired session is no session"
    );

    // the same session table, a configuration without olga: her session no longer opens pages
    let olga = Browser::signed_in(&served, "olga", OPERATOR_PASSWORD).await;
    settings.users.remove("olga");
    let without = serve(&env, settings, Access::SignIn).await;
    let mut stale = Browser::anonymous(&without);
    stale.cookie = olga.cookie.clone();
    assert_eq!(stale.get("/").await.status, 303);
}

#[test]
fn the_console_without_sign_in_serves_only_loopback_and_sign_in_needs_users() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let env = TestEnv::new().await;
        let err = console::router(
            env.pool.clone(),
            ConsoleSettings::default(),
            Access::Open,
            "0.0.0.0:8090".parse().unwrap(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("only on loopback"), "{err}");
        let err = console::router(
            env.pool.clone(),
            ConsoleSettings::default(),
            Access::SignIn,
            "127.0.0.1:8090".parse().unwrap(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("hash-password"), "{err}");
        assert!(console::router(
            env.pool.clone(),
            ConsoleSettings::default(),
            Access::Open,
            "[::1]:8090".parse().unwrap()
        )
        .is_ok());
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_carries_a_strict_policy_and_no_secret() {
    let env = TestEnv::new().await;
    env.settle(&env.worker()).await;
    let settings = console_settings();
    let hash = settings.users["olga"].password_hash.expose().to_string();
    let served = serve(&env, settings, Access::SignIn).await;
    let olga = Browser::signed_in(&served, "olga", OPERATOR_PASSWORD).await;
    let id = env
        .enqueue(jc("sec@example.com", json!({"lead_name": "S"})))
        .await;
    for path in [
        "/",
        "/overview/live",
        "/jobs",
        &format!("/jobs/{id}"),
        "/dead",
        "/contacts?email=sec@example.com",
        "/audit",
        "/static/console.js",
        "/login",
        "/nosuch",
    ] {
        let a = olga.get(path).await;
        let csp = a.headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
        assert!(
            csp.contains("default-src 'none'")
                && csp.contains("script-src 'self'")
                && !csp.contains("unsafe"),
            "{path}: {csp}"
        );
        assert_eq!(
            a.headers[header::X_CONTENT_TYPE_OPTIONS],
            "nosniff",
            "{path}"
        );
        assert_eq!(a.headers[header::X_FRAME_OPTIONS], "DENY", "{path}");
        for secret in [JC_SECRET, SL_SECRET, hash.as_str(), OPERATOR_PASSWORD] {
            assert!(!a.body.contains(secret), "{path} shows a secret");
        }
        assert!(
            !a.body.contains("<script>") && !a.body.contains(" style="),
            "{path}: no inline script or style"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_texts_payloads_and_addresses_are_shown_as_text() {
    let env = TestEnv::new().await;
    let hostile = "<script>document.title='owned'</script><img src=x onerror=alert(1)>";
    env.sandbox.faults().push(
        FaultRule::new(
            Fault::ErrorCode {
                code: 100,
                text: hostile.to_string(),
            },
            1,
        )
        .provider("justclick")
        .email("xss@example.com"),
    );
    let id = env
        .enqueue(jc(
            "xss@example.com",
            json!({"lead_name": "\"><script>alert(2)</script>", "lead_city": "A&B"}),
        ))
        .await;
    env.settle(&env.worker()).await;
    assert_eq!(env.job(id).await.state, "dead");
    let served = serve(&env, console_settings(), Access::SignIn).await;
    let olga = Browser::signed_in(&served, "olga", OPERATOR_PASSWORD).await;
    for path in [
        format!("/jobs/{id}"),
        "/jobs?state=dead".to_string(),
        "/dead".to_string(),
        "/contacts?email=xss@example.com".to_string(),
        "/jobs?email=%3Cscript%3E".to_string(),
        "/contacts?email=%22%3E%3Cscript%3Ealert(3)%3C%2Fscript%3E".to_string(),
    ] {
        let body = olga.get(&path).await.body;
        assert!(!body.contains("<script>"), "{path}: {body}");
        assert!(!body.contains("<img src=x"), "{path}");
    }
    let job = olga.get(&format!("/jobs/{id}")).await.body;
    assert!(
        job.contains("&#60;script&#62;document.title")
            || job.contains("&lt;script&gt;document.title"),
        "{job}"
    );
    assert!(job.contains("A&#38;B") || job.contains("A&amp;B"), "{job}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_page_by_keyset_and_filters_on_payload_fields_and_time() {
    let env = TestEnv::new().await;
    let mut jobs: Vec<_> = (0..230)
        .map(|i| {
            jc(
                &format!("k{i}@example.com"),
                json!({"lead_city": if i % 50 == 7 { "Berlin" } else { "Paris" }}),
            )
        })
        .collect();
    jobs.push(sl(
        "plan@example.com",
        json!({"attributes": {"plan": "pro"}}),
    ));
    let ids = env.enqueue_many(&jobs).await;
    let served = serve(&env, console_settings(), Access::SignIn).await;
    let victor = Browser::signed_in(&served, "victor", VIEWER_PASSWORD).await;

    let shown = |body: &str| -> Vec<i64> {
        body.match_indices("<td><a href=\"/jobs/")
            .map(|(at, _)| {
                let rest = &body[at + 19..];
                rest[..rest.find('"').unwrap()].parse().unwrap()
            })
            .collect()
    };
    let first = victor.get("/jobs").await.body;
    let page1 = shown(&first);
    assert_eq!(page1.len(), 100);
    assert_eq!(page1[0], *ids.last().unwrap(), "newest first");
    let older = first
        .split("href=\"")
        .find(|s| s.starts_with("/jobs?before="))
        .unwrap();
    let older = &older[..older.find('"').unwrap()];
    let page2 = shown(&victor.get(older).await.body);
    assert_eq!(page2.len(), 100);
    assert!(
        page2[0] < *page1.last().unwrap(),
        "the next page starts below the last id shown"
    );

    let berlin = shown(&victor.get("/jobs?field=lead_city&value=Berlin").await.body);
    let expected: Vec<i64> = ids
        .iter()
        .enumerate()
        .rev()
        .filter(|(i, _)| i % 50 == 7 && *i < 230)
        .map(|(_, id)| *id)
        .collect();
    assert_eq!(berlin, expected);
    assert_eq!(
        shown(
            &victor
                .get("/jobs?field=attributes.plan&value=pro")
                .await
                .body
        ),
        [*ids.last().unwrap()]
    );
    assert_eq!(
        shown(&victor.get("/jobs?provider=smartlink").await.body),
        [*ids.last().unwrap()]
    );
    assert!(shown(&victor.get("/jobs?from=2999-01-01").await.body).is_empty());
    assert_eq!(
        shown(
            &victor
                .get("/jobs?to=2999-01-01&email=K7@example.com")
                .await
                .body
        ),
        [ids[7]]
    );
    for (query, says) in [
        ("state=finished", "unknown state"),
        ("field=lead_city", "needs both"),
        ("from=yesterday", "a time like"),
        ("provider=mailchimp", "unknown provider"),
    ] {
        let body = victor.get(&format!("/jobs?{query}")).await.body;
        assert!(body.contains(says), "{query}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_actions_show_the_count_then_act_keep_the_order_rules_and_are_audited() {
    let env = TestEnv::new().await;
    for email in [
        "d1@example.com",
        "d2@example.com",
        "d3@example.com",
        "stale@example.com",
    ] {
        env.sandbox.faults().push(
            FaultRule::new(
                Fault::ErrorCode {
                    code: 100,
                    text: "invalid e-mail".into(),
                },
                1,
            )
            .provider("justclick")
            .email(email),
        );
    }
    let ids = env
        .enqueue_many(&[
            jc("d1@example.com", json!({"lead_name": "1"})),
            jc("d2@example.com", json!({"lead_name": "2"})),
            jc("d3@example.com", json!({"lead_name": "3"})),
            jc("stale@example.com", json!({"lead_name": "old"})),
        ])
        .await;
    let worker = env.worker();
    env.settle(&worker).await;
    // a newer change of the last contact is delivered: retrying the old one would undo it
    let newer = env
        .enqueue(jc("stale@example.com", json!({"lead_name": "new"})))
        .await;
    env.settle(&worker).await;
    assert_eq!(env.job(newer).await.state, "succeeded");
    let served = serve(&env, console_settings(), Access::SignIn).await;
    let olga = Browser::signed_in(&served, "olga", OPERATOR_PASSWORD).await;
    let token = olga.csrf().await;

    let dead = olga.get("/dead").await.body;
    assert!(
        dead.contains("invalid e-mail") && dead.contains(">4</a>"),
        "{dead}"
    );

    // no state in the filter: refused with what to do
    let a = olga
        .post(
            "/jobs/bulk",
            &[("csrf", &token), ("action", "retry"), ("scope", "filter")],
        )
        .await;
    assert!(
        a.body.contains("choose the state dead or cancelled"),
        "{}",
        a.body
    );
    // the count first, nothing done
    let form = [
        ("csrf", token.as_str()),
        ("action", "retry"),
        ("scope", "filter"),
        ("state", "dead"),
        ("account", "jc"),
    ];
    let a = olga.post("/jobs/bulk", &form).await;
    assert!(a.body.contains("This will retry 3 job(s)"), "{}", a.body);
    assert!(
        a.body.contains("1 job(s) are left as they are"),
        "{}",
        a.body
    );
    assert_eq!(env.count("dead").await, 4);
    // confirmed
    let (_, done) = count_then_confirm(&olga, &form).await;
    assert!(done.contains("Retried 3 job(s)"), "{done}");
    env.settle(&worker).await;
    for id in &ids[..3] {
        assert_eq!(env.job(*id).await.state, "succeeded");
    }
    assert_eq!(env.job(ids[3]).await.state, "dead");
    assert_eq!(
        env.sandbox
            .contact("justclick", JC_LOGIN, "stale@example.com")
            .unwrap()
            .fields["lead_name"],
        "new"
    );

    // the selection: a cancel of a dead job and a pending one
    let pending = env
        .enqueue(jc("later@example.com", json!({"lead_name": "L"})))
        .await;
    sqlx::query("UPDATE contact_sync.jobs SET run_at = now() + interval '1 hour' WHERE id = $1")
        .bind(pending)
        .execute(&env.pool)
        .await
        .unwrap();
    let (p, d) = (pending.to_string(), ids[3].to_string());
    let sel = [
        ("csrf", token.as_str()),
        ("action", "cancel"),
        ("scope", "selected"),
        ("id", &p),
        ("id", &d),
    ];
    let (count, done) = count_then_confirm(&olga, &sel).await;
    assert!(count.contains("This will cancel 2 job(s)"), "{count}");
    assert!(done.contains("Cancelled 2 job(s)"), "{done}");
    assert_eq!(env.job(pending).await.state, "cancelled");

    // one job, forced over the newer change
    let a = olga
        .post(&format!("/jobs/{}/retry", ids[3]), &[("csrf", &token)])
        .await;
    assert!(
        a.body.contains("was not retried") && a.body.contains(&format!("job {newer}")),
        "{}",
        a.body
    );
    let a = olga
        .post(
            &format!("/jobs/{}/retry", ids[3]),
            &[("csrf", &token), ("force", "1")],
        )
        .await;
    assert!(a.body.contains("retry done"), "{}", a.body);

    let audit = audit_rows(&env).await;
    let acted: Vec<(&str, &str, i64)> = audit
        .iter()
        .filter(|(_, a, _, _)| a != "sign-in")
        .map(|(_, a, t, n)| (a.as_str(), t.as_str(), *n))
        .collect();
    assert_eq!(acted.len(), 4, "{acted:?}");
    assert_eq!((acted[0].0, acted[0].2), ("bulk retry", 3));
    assert!(
        acted[0].1.contains("state=dead") && acted[0].1.contains("account=jc"),
        "{acted:?}"
    );
    assert_eq!((acted[1].0, acted[1].2), ("bulk cancel", 2));
    assert_eq!((acted[2].0, acted[2].2), ("retry", 0));
    assert_eq!((acted[3].0, acted[3].2), ("retry (forced)", 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_counts_the_queue_and_charts_what_the_workers_delivered() {
    let env = TestEnv::new().await;
    env.sandbox
        .faults()
        .push(FaultRule::new(Fault::Status { status: 503 }, 2).provider("smartlink"));
    let mut jobs: Vec<_> = (0..40)
        .map(|i| jc(&format!("o{i}@example.com"), json!({"lead_name": "O"})))
        .collect();
    jobs.push(sl("s@example.com", json!({"subscribe": 1})));
    env.enqueue_many(&jobs).await;
    let report = env.settle(&env.worker()).await;
    assert_eq!(report.succeeded, 41);
    let (delivered, failed): (i64, i64) = sqlx::query_as(
        "SELECT coalesce(sum(delivered), 0)::bigint, coalesce(sum(failed), 0)::bigint FROM contact_sync.activity",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        (delivered, failed),
        (41, 2),
        "each worker adds what it delivered and what failed"
    );
    // scheduled later, and due now
    env.enqueue_many(&[
        jc("later@example.com", json!({})),
        jc("now1@example.com", json!({})),
        jc("now2@example.com", json!({})),
    ])
    .await;
    sqlx::query("UPDATE contact_sync.jobs SET run_at = now() + interval '1 hour' WHERE email = 'later@example.com'")
        .execute(&env.pool)
        .await
        .unwrap();
    let served = serve(&env, console_settings(), Access::SignIn).await;
    let victor = Browser::signed_in(&served, "victor", VIEWER_PASSWORD).await;
    let page = victor.get("/").await.body;
    let row = &page[page.find("id=\"account-jc\"").unwrap()..];
    let row = &row[..row.find("</tr>").unwrap()];
    let cells: Vec<&str> = row
        .split("<td class=\"num\"")
        .skip(1)
        .map(|c| c[c.find('>').unwrap() + 1..c.find("</td>").unwrap()].trim())
        .collect();
    assert_eq!(&cells[..2], ["2", "1"], "{row}");
    assert!(
        row.contains("40 delivered") && row.contains("0 failed"),
        "{row}"
    );
    assert!(row.contains("bar-ok"), "the chart has a bar: {row}");
    let sl_row = &page[page.find("id=\"account-sl\"").unwrap()..];
    assert!(
        sl_row.contains("1 delivered") && sl_row.contains("2 failed"),
        "{sl_row}"
    );
    assert!(page.contains("data-refresh-ms=\"1000\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_hashes_a_password_and_refuses_an_unsafe_console() {
    use tokio::io::AsyncWriteExt;
    let env = TestEnv::new().await;
    let config = env.config_file("");
    let mut child = env
        .binary(&config)
        .args(["console", "hash-password"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"s3cret pass\n")
        .await
        .unwrap();
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hash = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(!hash.contains("s3cret"));
    // the hash signs the user in
    let mut settings = ConsoleSettings::default();
    settings.users.insert(
        "ann".into(),
        ConsoleUser {
            role: ConsoleRole::Viewer,
            password_hash: Secret::new(hash.clone()),
        },
    );
    let served = serve(&env, settings, Access::SignIn).await;
    Browser::signed_in(&served, "ann", "s3cret pass").await;

    let (code, _, err) = env.cli(&config, &["console", "hash-password"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("no password given"), "{err}");
    let (code, _, err) = env
        .cli(&config, &["console", "--no-auth", "--listen", "0.0.0.0:0"])
        .await;
    assert_ne!(code, 0);
    assert!(err.contains("only on loopback"), "{err}");
    let (code, _, err) = env
        .cli(&config, &["console", "--listen", "127.0.0.1:0"])
        .await;
    assert_ne!(code, 0);
    assert!(err.contains("hash-password"), "{err}");
    // a password in clear in the configuration is refused, naming the setting
    let clear =
        env.config_file("[console.users.ann]\nrole = \"operator\"\npassword_hash = \"hunter2\"\n");
    let (code, _, err) = env.cli(&clear, &["console"]).await;
    assert_ne!(code, 0);
    assert!(
        err.contains("console.users.ann.password_hash") && !err.contains("hunter2"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessing_passwords_is_slow_bounded_and_a_changed_password_ends_sessions() {
    let env = TestEnv::new().await;
    let mut settings = console_settings();
    let served = serve(&env, settings.clone(), Access::SignIn).await;
    let anonymous = Browser::anonymous(&served);
    // five failures for one user in a minute: the sixth is refused without a password check,
    // even with the right password
    for _ in 0..5 {
        let a = anonymous
            .post("/login", &[("username", "olga"), ("password", "guess")])
            .await;
        assert_eq!(a.status, 401);
    }
    let a = anonymous
        .post(
            "/login",
            &[("username", "olga"), ("password", OPERATOR_PASSWORD)],
        )
        .await;
    assert_eq!(a.status, 429, "{}", a.body);
    // many sign-ins at once: a few password checks run, the rest are told to come back
    let started = std::time::Instant::now();
    let statuses: Vec<u16> = futures_util::future::join_all((0..12).map(|i| {
        let user = format!("nobody{i}");
        let anonymous = &anonymous;
        async move {
            anonymous
                .post("/login", &[("username", &user), ("password", "x")])
                .await
                .status
        }
    }))
    .await;
    assert!(
        statuses.iter().all(|s| [401, 429, 503].contains(s)),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&503),
        "checks at once are bounded: {statuses:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    // a client that hangs up while its password is checked is counted all the same
    let hasty = reqwest::Client::builder()
        .timeout(Duration::from_millis(10))
        .build()
        .unwrap();
    for _ in 0..5 {
        let _ = hasty
            .post(format!("{}/login", served.base))
            .header(header::ORIGIN, &served.base)
            .form(&[("username", "victor"), ("password", "guess")])
            .send()
            .await;
        tokio::time::sleep(Duration::from_millis(900)).await;
    }
    let a = anonymous
        .post(
            "/login",
            &[("username", "victor"), ("password", VIEWER_PASSWORD)],
        )
        .await;
    assert_eq!(a.status, 429, "hung-up guesses count: {}", a.body);
    let refused: i64 = sqlx::query_scalar("SELECT count(*) FROM contact_sync.console_audit WHERE username = 'victor' AND outcome = 'refused'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(refused, 5, "and audited");

    // victor signs in (at another console: the lockouts are per process); his password
    // changes; his session ends with the old password
    let fresh = serve(&env, settings.clone(), Access::SignIn).await;
    let victor = Browser::signed_in(&fresh, "victor", VIEWER_PASSWORD).await;
    assert_eq!(victor.get("/").await.status, 200);
    settings.users.get_mut("victor").unwrap().password_hash =
        Secret::new(console::hash_password("a new password").unwrap());
    let rotated = serve(&env, settings, Access::SignIn).await;
    let mut old = Browser::anonymous(&rotated);
    old.cookie = victor.cookie.clone();
    assert_eq!(old.get("/").await.status, 303);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_another_site_pointed_at_the_console_is_refused() {
    let env = TestEnv::new().await;
    let served = serve(&env, ConsoleSettings::default(), Access::Open).await;
    let port = served.base.rsplit(':').next().unwrap().to_string();
    let http = reqwest::Client::new();
    // DNS rebinding: the attacker's name resolves to 127.0.0.1, the browser sends its Host
    let rebound = format!("rebind.attacker.example:{port}");
    let a = http
        .get(format!("{}/jobs", served.base))
        .header(header::HOST, &rebound)
        .send()
        .await
        .unwrap();
    assert_eq!(a.status(), 421);
    assert!(!a.text().await.unwrap().contains("csrf"));
    let a = http
        .post(format!("{}/accounts/jc/pause", served.base))
        .header(header::HOST, &rebound)
        .header(header::ORIGIN, format!("http://{rebound}"))
        .form(&[("csrf", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(a.status(), 421);
    for host in [format!("localhost:{port}"), format!("127.0.0.1:{port}")] {
        let a = http
            .get(format!("{}/jobs", served.base))
            .header(header::HOST, host)
            .send()
            .await
            .unwrap();
        assert_eq!(a.status(), 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_action_does_what_was_counted_and_a_group_is_exactly_its_jobs() {
    let env = TestEnv::new().await;
    sqlx::query("INSERT INTO contact_sync.accounts (account, provider) VALUES ('jc', 'justclick'), ('sl', 'smartlink')")
        .execute(&env.pool)
        .await
        .unwrap();
    let served = serve(&env, console_settings(), Access::SignIn).await;
    let olga = Browser::signed_in(&served, "olga", OPERATOR_PASSWORD).await;
    let token = olga.csrf().await;
    // counted: one pending job; three more queued before the confirmation
    env.enqueue(sl("c0@example.com", json!({"subscribe": 1})))
        .await;
    let form = [
        ("csrf", token.as_str()),
        ("action", "cancel"),
        ("scope", "filter"),
        ("state", "pending"),
        ("account", "sl"),
    ];
    let a = olga.post("/jobs/bulk", &form).await;
    assert!(a.body.contains("This will cancel 1 job(s)"), "{}", a.body);
    let field = |name: &str| -> String {
        let at = a.body.find(&format!("name=\"{name}\" value=\"")).unwrap() + name.len() + 15;
        a.body[at..at + a.body[at..].find('"').unwrap()].to_string()
    };
    let (upto, counted) = (field("upto"), field("counted"));
    let later = env
        .enqueue_many(&[
            sl("c1@example.com", json!({})),
            sl("c2@example.com", json!({})),
            sl("c3@example.com", json!({})),
        ])
        .await;
    let mut confirmed = form.to_vec();
    confirmed.extend([
        ("upto", upto.as_str()),
        ("counted", counted.as_str()),
        ("confirm", "yes"),
    ]);
    let a = olga.post("/jobs/bulk", &confirmed).await;
    assert!(a.body.contains("Cancelled 1 job(s)"), "{}", a.body);
    for id in later {
        assert_eq!(
            env.job(id).await.state,
            "pending",
            "queued after the count: untouched"
        );
    }
    // a confirmation without the count's pin only counts again
    let mut unpinned = form.to_vec();
    unpinned.push(("confirm", "yes"));
    let a = olga.post("/jobs/bulk", &unpinned).await;
    assert!(a.body.contains("This will cancel 3 job(s)"), "{}", a.body);

    // dead groups differ by a trailing space, by no error at all, by the provider code
    let ids = env
        .enqueue_many(
            &(0..8)
                .map(|i| jc(&format!("g{i}@example.com"), json!({})))
                .collect::<Vec<_>>(),
        )
        .await;
    for (range, error, code) in [
        (0..3, Some("timeout  "), "500"),
        (3..5, Some("timeout"), "500"),
        (5..6, Some("timeout"), "429"),
        (6..8, None, ""),
    ] {
        for id in &ids[range] {
            sqlx::query(
                "UPDATE contact_sync.jobs SET state = 'dead', finished_at = now(), last_error = $2,
                        errors = CASE WHEN $3 = '' THEN '[]'::jsonb ELSE jsonb_build_array(jsonb_build_object('code', $3::text)) END
                 WHERE id = $1",
            )
            .bind(id)
            .bind(error)
            .bind(code)
            .execute(&env.pool)
            .await
            .unwrap();
        }
    }
    let dead = olga.get("/dead").await.body;
    for (error, code, n) in [
        ("timeout  ", "500", 3),
        ("timeout", "500", 2),
        ("timeout", "429", 1),
        ("", "", 2),
    ] {
        let group = [
            ("csrf", token.as_str()),
            ("action", "retry"),
            ("scope", "filter"),
            ("state", "dead"),
            ("account", "jc"),
            ("error_is", error),
            ("code", code),
        ];
        let a = olga.post("/jobs/bulk", &group).await;
        assert!(
            a.body.contains(&format!("This will retry {n} job(s)")),
            "{error:?}/{code}: {}",
            a.body
        );
        assert!(
            dead.contains(&format!("value=\"{error}\"")),
            "the group's form carries the exact text"
        );
    }
    let link = dead
        .split("href=\"")
        .find(|s| {
            s.starts_with("/jobs?state=dead&#38;account=jc&#38;error_is=timeout++&#38;code=500")
        })
        .unwrap();
    let link = link[..link.find('"').unwrap()].replace("&#38;", "&");
    let listed = olga.get(&link).await.body;
    assert_eq!(listed.matches("<td><a href=\"/jobs/").count(), 3, "{link}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_inputs_get_an_answer_not_an_error() {
    let env = TestEnv::new().await;
    env.settle(&env.worker()).await;
    let served = serve(&env, console_settings(), Access::SignIn).await;
    let olga = Browser::signed_in(&served, "olga", OPERATOR_PASSWORD).await;
    for path in [
        "/jobs?email=a%00b",
        "/jobs?value=x%00&field=lead_name",
        "/contacts?email=a%00b@example.com",
    ] {
        let a = olga.get(path).await;
        assert_eq!(a.status, 200, "{path}");
        assert!(a.body.contains("NUL character"), "{path}: {}", a.body);
    }
    // a contact with more open changes than a page shows says so and links to all of them
    let many: Vec<_> = (0..250)
        .map(|i| jc("many@example.com", json!({"lead_name": format!("v{i}")})))
        .collect();
    env.enqueue_many(&many).await;
    let page = olga.get("/contacts?email=many@example.com").await.body;
    assert_eq!(page.matches("<tr class=\"state-pending\">").count(), 200);
    assert!(
        page.contains("More open or parked changes than shown"),
        "{page}"
    );
    // the overview's refresh after the session ended: 401, which the page turns into a sign-in
    let anonymous = Browser::anonymous(&served);
    assert_eq!(anonymous.get("/overview/live").await.status, 401);
    // violation reports: only as browsers send them; the count only for signed-in users
    assert_eq!(
        anonymous.post("/csp-report", &[("a", "b")]).await.status,
        400
    );
    assert_eq!(anonymous.get("/csp-reports").await.status, 303);
    // an address SQL lower-cases differently from Rust (a C-locale database): found all the same
    env.enqueue(sl("Äb@Example.com", json!({"subscribe": 1})))
        .await;
    let page = olga.get("/contacts?email=%C3%84b%40Example.com").await.body;
    assert!(page.contains("state-pending"), "{page}");
    // a reason with a NUL: paused, and audited
    let token = olga.csrf().await;
    let a = olga
        .post(
            "/accounts/sl/pause",
            &[("csrf", &token), ("reason", "a\0b")],
        )
        .await;
    assert_eq!(a.status, 200);
    let audited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM contact_sync.console_audit WHERE action = 'pause'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(audited, 1);
    // a pause reason is cut to what the page shows
    let token = olga.csrf().await;
    let long = "r".repeat(5000);
    olga.post("/accounts/jc/pause", &[("csrf", &token), ("reason", &long)])
        .await;
    let reason: String =
        sqlx::query_scalar("SELECT pause_reason FROM contact_sync.accounts WHERE account = 'jc'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert!(reason.len() <= 200 && reason.contains("olga"), "{reason}");
}

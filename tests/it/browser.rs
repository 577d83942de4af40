//! The console in a real browser: headless Chromium driven over WebDriver (Debian's `chromium`
//! and `chromium-driver`, which `scripts/test.sh` installs), against a real worker, Postgres and
//! the sandbox. A person's path through it: sign in, pause and resume an account and watch its
//! jobs go out (the overview refreshing itself), filter jobs by a payload field, open a dead job
//! whose provider text carries a script and retry it, bulk-retry a filter after the count, read
//! a contact's timeline, sign in as a viewer and find no action, and no Content-Security-Policy
//! violation reported by the browser. Every page is saved as a PNG under
//! `target/console-screenshots/` (and the page at a failure, with its HTML).

use crate::console::{console_settings, serve, OPERATOR_PASSWORD, VIEWER_PASSWORD};
use crate::helpers::*;
use contact_sync::console::Access;
use contact_sync::sandbox::{Fault, FaultRule};
use contact_sync::worker::Shutdown;
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use thirtyfour::prelude::*;
use thirtyfour::ChromiumLikeCapabilities;

type Step<T = ()> = Result<T, String>;

fn fail<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn ensure(cond: bool, what: impl Into<String>) -> Step {
    if cond {
        Ok(())
    } else {
        Err(what.into())
    }
}

/// ChromeDriver on a free loopback port, and a headless Chromium session through it.
struct Browser {
    driver: WebDriver,
    _chromedriver: tokio::process::Child,
    shots: PathBuf,
    shot: std::sync::atomic::AtomicU32,
    base: String,
    // (dropped after the driver above: Chromium's profile, removed once the session is over)
    _profile: Scratch,
}

impl Browser {
    async fn start(base: &str) -> Browser {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let chromedriver = tokio::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver (Debian's chromium-driver, installed by scripts/test.sh)");
        let url = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        while reqwest::get(format!("{url}/status")).await.is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "chromedriver did not start"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut caps = DesiredCapabilities::chrome();
        caps.set_binary("/usr/bin/chromium").unwrap();
        let profile = Scratch::dir("cs-chromium");
        for arg in [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1400,1000",
            &format!("--user-data-dir={}", profile.display()),
        ] {
            caps.add_arg(arg).unwrap();
        }
        let driver = WebDriver::new(url, caps).await.expect("a Chromium session");
        let shots = PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/target/console-screenshots"
        ));
        let _ = std::fs::remove_dir_all(&shots);
        std::fs::create_dir_all(&shots).unwrap();
        Browser {
            driver,
            _chromedriver: chromedriver,
            shots,
            shot: 0.into(),
            base: base.to_string(),
            _profile: profile,
        }
    }

    async fn screenshot(&self, name: &str) {
        let n = self.shot.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _ = self
            .driver
            .screenshot(&self.shots.join(format!("{n:02}-{name}.png")))
            .await;
    }

    async fn goto(&self, path: &str) -> Step {
        self.driver
            .goto(format!("{}{path}", self.base))
            .await
            .map_err(fail(path))
    }

    /// The element, waiting for it while a page loads (a click that submits a form returns
    /// before the next page is there).
    async fn el(&self, css: &str) -> Step<WebElement> {
        let started = Instant::now();
        loop {
            match self.driver.find(By::Css(css)).await {
                Ok(el) => return Ok(el),
                Err(e) if started.elapsed() > Duration::from_secs(10) => {
                    return Err(format!("{css}: {e}"))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    async fn els(&self, css: &str) -> Step<Vec<WebElement>> {
        self.driver.find_all(By::Css(css)).await.map_err(fail(css))
    }

    async fn text(&self, css: &str) -> Step<String> {
        self.el(css).await?.text().await.map_err(fail(css))
    }

    async fn click(&self, css: &str) -> Step {
        self.el(css).await?.click().await.map_err(fail(css))
    }

    async fn fill(&self, css: &str, text: &str) -> Step {
        let el = self.el(css).await?;
        el.clear().await.map_err(fail(css))?;
        el.send_keys(text).await.map_err(fail(css))
    }

    async fn script(&self, js: &str) -> Step<serde_json::Value> {
        self.driver
            .execute(js, vec![])
            .await
            .map(|r| r.json().clone())
            .map_err(fail(js))
    }

    /// Polls `check` (reloading the page with `reload`) until it holds.
    async fn wait_for(
        &self,
        what: &str,
        within: Duration,
        reload: bool,
        check: impl AsyncFn() -> Step<bool>,
    ) -> Step {
        let started = Instant::now();
        loop {
            if check().await? {
                return Ok(());
            }
            if started.elapsed() > within {
                return Err(format!("waited {within:?} for {what}"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            if reload {
                self.driver.refresh().await.map_err(fail("reload"))?;
            }
        }
    }

    async fn sign_in(&self, user: &str, password: &str) -> Step {
        self.goto("/login").await?;
        self.fill("input[name=username]", user).await?;
        self.fill("input[name=password]", password).await?;
        self.click("#sign-in").await?;
        self.wait_for(
            "the overview after signing in",
            Duration::from_secs(10),
            false,
            async || Ok(self.driver.current_url().await.map_err(fail("url"))?.path() == "/"),
        )
        .await?;
        // the overview itself, not the page it replaces
        self.el("#live").await.map(|_| ())
    }
}

async fn state_of(env: &TestEnv, email: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT state FROM contact_sync.jobs WHERE email = $1 ORDER BY id")
        .bind(email)
        .fetch_all(&env.pool)
        .await
        .unwrap()
}

async fn wait_states(env: &TestEnv, emails: &[&str], state: &str) -> Step {
    let started = Instant::now();
    loop {
        let mut all = true;
        for e in emails {
            all &= state_of(env, e).await.last().map(String::as_str) == Some(state);
        }
        if all {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(20) {
            return Err(format!("{emails:?} did not become {state}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The cells of `account`'s overview row, read at once (the page may replace the row
/// while it refreshes itself).
async fn account_cells(b: &Browser, account: &str) -> Step<Vec<String>> {
    let cells = b
        .script(&format!(
            "return Array.from(document.querySelectorAll('#account-{account} td')).map(function (td) {{ return td.innerText; }})"
        ))
        .await?;
    Ok(cells
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

/// The violations reported to the console so far, asked by the signed-in page itself.
async fn csp_reports(b: &Browser) -> Step<u64> {
    let text = b
        .script("var x = new XMLHttpRequest(); x.open('GET', '/csp-reports', false); x.send(); return x.responseText;")
        .await?;
    text.as_str()
        .and_then(|t| t.trim().parse().ok())
        .ok_or_else(|| format!("/csp-reports said {text}"))
}

async fn scenario(env: &TestEnv, b: &Browser) -> Step {
    // -- sign in; the worker's accounts are on the overview
    b.goto("/").await?;
    let url = b.driver.current_url().await.map_err(fail("url"))?;
    ensure(url.path() == "/login", "a stranger is sent to sign in")?;
    b.screenshot("login").await;
    b.sign_in("olga", OPERATOR_PASSWORD).await?;
    b.wait_for("the accounts", Duration::from_secs(10), true, async || {
        Ok(b.els("#account-jc").await?.len() == 1 && b.els("#account-sl").await?.len() == 1)
    })
    .await?;
    b.screenshot("overview").await;

    // -- pause jc; its changes wait; resume; they go out while the page refreshes itself
    b.fill("#account-jc input[name=reason]", "checking the list")
        .await?;
    b.click("#account-jc button.pause").await?;
    ensure(b.text("#message").await?.contains("jc is paused"), "paused")?;
    let emails: Vec<String> = (0..5).map(|i| format!("p{i}@example.com")).collect();
    for (i, e) in emails.iter().enumerate() {
        let city = if i == 2 { "Berlin" } else { "Paris" };
        sqlx::query("SELECT contact_sync.enqueue('justclick', 'jc', $1, jsonb_build_object('lead_name', 'P', 'lead_city', $2::text))")
            .bind(e)
            .bind(city)
            .execute(&env.pool)
            .await
            .unwrap();
    }
    b.goto("/").await?;
    b.wait_for(
        "five due on the paused account",
        Duration::from_secs(10),
        true,
        async || {
            let cells = account_cells(b, "jc").await?;
            Ok(cells.get(2).map(String::as_str) == Some("5")
                && cells.iter().any(|c| c.contains("paused since")))
        },
    )
    .await?;
    b.screenshot("overview-paused").await;
    ensure(
        state_of(env, "p0@example.com").await == ["pending"],
        "nothing was sent while paused",
    )?;
    b.click("#account-jc button.resume").await?;
    ensure(
        b.text("#message").await?.contains("jc is resumed"),
        "resumed",
    )?;
    b.goto("/").await?;
    // no reload from here: the page's own refresh brings the numbers
    b.wait_for(
        "the deliveries on the overview",
        Duration::from_secs(30),
        false,
        async || {
            let cells = account_cells(b, "jc").await?;
            Ok(cells.get(2).map(String::as_str) == Some("0")
                && cells.iter().any(|c| c.contains("5 delivered")))
        },
    )
    .await?;
    b.screenshot("overview-delivered").await;

    // -- jobs by a payload field
    b.goto("/jobs").await?;
    b.fill("input[name=field]", "lead_city").await?;
    b.fill("input[name=value]", "Berlin").await?;
    b.click("#apply-filter").await?;
    b.wait_for(
        "the filtered page",
        Duration::from_secs(10),
        false,
        async || {
            Ok(b.driver
                .current_url()
                .await
                .map_err(fail("url"))?
                .query()
                .unwrap_or("")
                .contains("field=lead_city"))
        },
    )
    .await?;
    b.el("table.jobs").await?;
    let rows = b.els("table.jobs tbody tr").await?;
    ensure(
        rows.len() == 1,
        format!("one Berlin job, {} shown", rows.len()),
    )?;
    let row = rows[0].text().await.map_err(fail("row"))?;
    ensure(
        row.contains("p2@example.com") && row.contains("succeeded"),
        row,
    )?;
    b.screenshot("jobs-filtered").await;

    // -- a dead job whose provider text carries a script: shown as text, retried, delivered
    let hostile = "<script>window.__xss = 1</script><img src=x onerror=\"window.__xss = 2\">";
    env.sandbox.faults().push(
        FaultRule::new(
            Fault::ErrorCode {
                code: 100,
                text: hostile.into(),
            },
            1,
        )
        .provider("justclick")
        .email("dead@example.com"),
    );
    env.enqueue(jc("dead@example.com", json!({"lead_name": "Dee"})))
        .await;
    wait_states(env, &["dead@example.com"], "dead").await?;
    b.goto("/dead").await?;
    let group = b.text("table.dead tbody tr td.error-text").await?;
    ensure(
        group.contains("<script>window.__xss = 1</script>"),
        format!("the text as text: {group}"),
    )?;
    b.screenshot("dead-letters").await;
    b.click("table.dead tbody tr td a[href^='/jobs/']").await?;
    let attempts = b.text("#attempts").await?;
    ensure(attempts.contains("onerror=\"window.__xss = 2\""), attempts)?;
    let ran = b.script("return typeof window.__xss").await?;
    ensure(
        ran == json!("undefined"),
        format!("the provider's script ran: {ran}"),
    )?;
    b.screenshot("job-dead").await;
    b.click("#retry-job").await?;
    ensure(b.text("#message").await?.contains("retry done"), "retried")?;
    wait_states(env, &["dead@example.com"], "succeeded").await?;
    b.click("#back").await?;
    ensure(
        b.text("#job-state").await? == "succeeded",
        "the job page says succeeded",
    )?;

    // -- bulk retry of a filter: the count first, then the confirmation
    let bulk = ["b1@example.com", "b2@example.com", "b3@example.com"];
    for e in bulk {
        env.sandbox.faults().push(
            FaultRule::new(
                Fault::ErrorCode {
                    code: 100,
                    text: "list is closed".into(),
                },
                1,
            )
            .provider("justclick")
            .email(e),
        );
        env.enqueue(jc(e, json!({"lead_name": "B"}))).await;
    }
    wait_states(env, &bulk, "dead").await?;
    b.goto("/jobs?state=dead").await?;
    b.click("#scope-filter").await?;
    b.click("#bulk-retry").await?;
    let count = b.text("#confirm-count").await?;
    ensure(count.contains("This will retry 3 job(s)"), count)?;
    b.screenshot("bulk-confirm").await;
    ensure(
        state_of(env, "b1@example.com").await == ["dead"],
        "nothing done before the confirmation",
    )?;
    b.click("#confirm").await?;
    ensure(
        b.text("#message").await?.contains("Retried 3 job(s)"),
        "bulk retried",
    )?;
    wait_states(env, &bulk, "succeeded").await?;

    // -- the contact's timeline and what the provider was last sent
    b.goto("/contacts").await?;
    b.fill("input[name=email]", "DEAD@example.com").await?;
    b.click("#find-contact").await?;
    let section = b.text("section.contact-account").await?;
    ensure(
        section.contains("jc")
            && section.contains("succeeded")
            && section.contains("\"lead_name\": \"Dee\""),
        section,
    )?;
    b.screenshot("contact").await;
    b.goto("/audit").await?;
    let audit = b.text("#audit").await?;
    ensure(
        audit.contains("bulk retry") && audit.contains("pause") && audit.contains("resume"),
        audit,
    )?;
    b.screenshot("audit").await;

    // -- a viewer sees everything and can do nothing
    b.goto("/").await?;
    b.click("nav form button").await?;
    b.el("#sign-in").await?;
    b.sign_in("victor", VIEWER_PASSWORD).await?;
    b.el("#account-jc").await?;
    ensure(
        b.els("button.pause, button.resume").await?.is_empty(),
        "a viewer sees no pause",
    )?;
    b.goto("/jobs?state=succeeded").await?;
    b.el("table.jobs").await?;
    ensure(
        !b.els("table.jobs tbody tr").await?.is_empty(),
        "a viewer reads jobs",
    )?;
    ensure(
        b.els("input[type=checkbox], #bulk-retry").await?.is_empty(),
        "a viewer sees no bulk action",
    )?;
    b.click("table.jobs tbody tr a[href^='/jobs/']").await?;
    b.el("#job-state").await?;
    ensure(
        b.els("#retry-job, #cancel-job").await?.is_empty(),
        "a viewer sees no job action",
    )?;
    b.screenshot("viewer-job").await;

    // -- no page made the browser report a policy violation; one made on purpose is reported
    ensure(
        csp_reports(b).await? == 0,
        "the browser reported a CSP violation",
    )?;
    b.script("var i = document.createElement('img'); i.src = 'http://192.0.2.1/x.png'; document.body.appendChild(i); return 1").await?;
    let started = Instant::now();
    while csp_reports(b).await? == 0 {
        ensure(
            started.elapsed() < Duration::from_secs(10),
            "the browser reports violations (the check above can fail)",
        )?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_and_a_viewer_use_the_console_in_a_real_browser() {
    let env = TestEnv::new().await;
    let served = serve(&env, console_settings(), Access::SignIn).await;
    let worker = env.worker();
    let shutdown = Shutdown::new();
    let stop = shutdown.graceful.clone();
    let running = tokio::spawn(async move { worker.run(shutdown).await });
    let browser = Browser::start(&served.base).await;
    let result = scenario(&env, &browser).await;
    if let Err(why) = &result {
        browser.screenshot("failure").await;
        if let Ok(html) = browser.driver.source().await {
            let _ = std::fs::write(browser.shots.join("failure.html"), html);
        }
        eprintln!("screenshots in {}", browser.shots.display());
        let _ = why;
    }
    let _ = browser.driver.clone().quit().await;
    stop.cancel();
    running.await.unwrap();
    result.unwrap();
}

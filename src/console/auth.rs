//! Who is asking: sign-in against `[console.users]` (Argon2 hashes), sessions (a random token in
//! an `HttpOnly`, `SameSite=Strict` cookie; only its SHA-256 is stored), roles, and the checks
//! every POST passes (same Origin, the session's CSRF token, and for actions the operator role).

use super::views::{self, Chrome};
use super::{Access, Console};
use crate::config::ConsoleRole;
use crate::outbox::console::{self as store, Session};
use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::{PasswordHasher, SaltString};
use argon2::{Argon2, PasswordHash, PasswordVerifier};
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use sha2::{Digest, Sha256};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// The session cookie; with `Secure`, under the `__Host-` prefix (no other origin of the host,
/// no path, can set a cookie of that name).
const COOKIE: &str = "contact_sync_session";
const SECURE_COOKIE: &str = "__Host-contact_sync_session";

fn cookie_name(console: &Console) -> &'static str {
    if console.secure_cookies {
        SECURE_COOKIE
    } else {
        COOKIE
    }
}

/// Failed sign-ins one user name may have per [`FAILURE_WINDOW`] before it is refused
/// without a password check.
const USER_FAILURES: u32 = 5;
/// The same for one client address (higher: several people may share one).
const ADDRESS_FAILURES: u32 = 20;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Password checks at once (each takes 19 MiB and a core for tens of milliseconds).
pub(crate) const CONCURRENT_CHECKS: usize = 2;

/// What keeps sign-in from being a way to guess passwords fast or to exhaust the process.
pub(crate) struct SignInGuard {
    checks: std::sync::Arc<tokio::sync::Semaphore>,
    failures: std::sync::Mutex<std::collections::HashMap<String, (u32, std::time::Instant)>>,
}

impl SignInGuard {
    pub fn new() -> SignInGuard {
        SignInGuard {
            checks: std::sync::Arc::new(tokio::sync::Semaphore::new(CONCURRENT_CHECKS)),
            failures: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    fn failures(&self, key: &str) -> u32 {
        self.failures
            .lock()
            .ok()
            .and_then(|f| f.get(key).copied())
            .filter(|(_, since)| since.elapsed() < FAILURE_WINDOW)
            .map_or(0, |(n, _)| n)
    }

    fn failed(&self, keys: &[&str]) {
        if let Ok(mut f) = self.failures.lock() {
            if f.len() > 10_000 {
                f.retain(|_, (_, since)| since.elapsed() < FAILURE_WINDOW);
            }
            for key in keys {
                let entry = f
                    .entry((*key).to_string())
                    .or_insert((0, std::time::Instant::now()));
                if entry.1.elapsed() >= FAILURE_WINDOW {
                    *entry = (0, std::time::Instant::now());
                }
                entry.0 += 1;
            }
        }
    }

    fn succeeded(&self, key: &str) {
        if let Ok(mut f) = self.failures.lock() {
            f.remove(key);
        }
    }
}

/// A digest of a password hash, kept with a session: a changed password ends it.
fn credential(password_hash: &str) -> String {
    Sha256::digest(password_hash.as_bytes())
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// How long a refused sign-in waits before answering (on top of the hash's own cost).
const REFUSED_SIGN_IN_DELAY: Duration = Duration::from_millis(500);

/// The person behind a request.
#[derive(Debug, Clone)]
pub(crate) struct Me {
    pub user: String,
    pub role: ConsoleRole,
    /// The token this person's forms carry.
    pub csrf: String,
    /// Signed in (not the console without sign-in).
    pub session: bool,
}

impl Me {
    pub fn can_act(&self) -> bool {
        self.role == ConsoleRole::Operator
    }

    /// The page frame for this person.
    pub fn chrome(&self, console: &Console, title: impl Into<String>) -> Chrome {
        Chrome {
            title: title.into(),
            user: Some(self.user.clone()),
            role: self.role.as_str(),
            csrf: self.csrf.clone(),
            can_sign_out: self.session,
            no_auth: console.access == Access::Open,
        }
    }
}

/// A form body (or query string): its pairs in order, names repeated as sent.
#[derive(Debug, Default)]
pub(crate) struct Form(Vec<(String, String)>);

impl Form {
    pub fn parse(bytes: &[u8]) -> Form {
        Form(
            url::form_urlencoded::parse(bytes)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    /// The first value of `name`, trimmed, if not empty.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
    }

    /// The first value of `name` as sent (untrimmed, possibly empty), if present.
    pub fn raw(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Some value holds a NUL character (which no text column can store).
    pub fn has_nul(&self) -> bool {
        self.0
            .iter()
            .any(|(k, v)| k.contains('\0') || v.contains('\0'))
    }

    pub fn pairs(&self) -> impl Iterator<Item = &(String, String)> {
        self.0.iter()
    }

    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// 32 random bytes from the operating system, as hex.
pub(crate) fn random_token() -> String {
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn digest(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// An Argon2id hash of `password` in PHC form, for `[console.users.NAME] password_hash`.
pub fn hash_password(password: &str) -> anyhow::Result<String> {
    if password.is_empty() {
        anyhow::bail!("the password is empty");
    }
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("could not hash the password: {e}"))
}

/// A hash no password matches in practice, checked for unknown users so that a refused name
/// costs as much as a refused password.
fn decoy_hash() -> &'static str {
    static DECOY: OnceLock<String> = OnceLock::new();
    DECOY.get_or_init(|| hash_password(&random_token()).unwrap_or_default())
}

fn verify(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

fn cookie_token(headers: &HeaderMap, cookie: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == cookie)
        .map(|(_, value)| value.to_string())
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The person behind the request, if any.
async fn identify(console: &Console, headers: &HeaderMap) -> Result<Option<Me>, Response> {
    if console.access == Access::Open {
        return Ok(Some(Me {
            user: "local".to_string(),
            role: ConsoleRole::Operator,
            csrf: console.open_csrf.clone(),
            session: false,
        }));
    }
    let Some(token) = cookie_token(headers, cookie_name(console)) else {
        return Ok(None);
    };
    let session = store::session(&console.pool, &digest(&token))
        .await
        .map_err(|e| views::database_error(&e))?;
    // The configuration says what a user may do now: a user removed or made a viewer since
    // signing in loses what they lost.
    // ... and a changed password ends every session signed in with the old one.
    Ok(session.and_then(|s| {
        console
            .settings
            .users
            .get(&s.username)
            .filter(|user| credential(user.password_hash.expose()) == s.credential)
            .map(|user| Me {
                user: s.username,
                role: user.role,
                csrf: s.csrf_token,
                session: true,
            })
    }))
}

/// For a page: the person, or a redirect to sign in.
pub(crate) async fn reader(console: &Console, headers: &HeaderMap) -> Result<Me, Response> {
    match identify(console, headers).await? {
        Some(me) => Ok(me),
        None => Err(Redirect::to("/login").into_response()),
    }
}

/// The request comes from a page of this console: its `Origin` (or, without one, its
/// `Referer`) names the host it was sent to.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let from = headers
        .get(header::ORIGIN)
        .or_else(|| headers.get(header::REFERER))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| url::Url::parse(v).ok());
    match from {
        Some(url) if matches!(url.scheme(), "http" | "https") => {
            let authority = match (url.host_str(), url.port()) {
                (Some(h), Some(p)) => format!("{h}:{p}"),
                (Some(h), None) => h.to_string(),
                _ => return false,
            };
            authority.eq_ignore_ascii_case(host)
        }
        _ => false,
    }
}

fn refused(status: StatusCode, why: &str) -> Response {
    (status, format!("{why}\n")).into_response()
}

/// For a POST: same Origin, a signed-in person, the session's CSRF token, and (with
/// `operator`) the operator role; otherwise 403 with the reason.
pub(crate) async fn poster(
    console: &Console,
    headers: &HeaderMap,
    form: &Form,
    operator: bool,
) -> Result<Me, Response> {
    if !same_origin(headers) {
        return Err(refused(
            StatusCode::FORBIDDEN,
            "refused: the request does not come from a page of this console (Origin or Referer must name this host; behind a proxy, pass the Host header on)",
        ));
    }
    let Some(me) = identify(console, headers).await? else {
        return Err(refused(
            StatusCode::FORBIDDEN,
            "refused: not signed in (sign in at /login)",
        ));
    };
    let sent = form.get("csrf").unwrap_or("");
    if !crate::providers::digest_eq(sent, &me.csrf) || sent.is_empty() {
        return Err(refused(
            StatusCode::FORBIDDEN,
            "refused: the form's token is missing or stale (reload the page and try again)",
        ));
    }
    if operator && !me.can_act() {
        return Err(refused(
            StatusCode::FORBIDDEN,
            "refused: a viewer cannot act (an operator can)",
        ));
    }
    Ok(me)
}

pub(crate) async fn login_page(State(console): State<Arc<Console>>) -> Response {
    if console.access == Access::Open {
        return Redirect::to("/").into_response();
    }
    views::render(&views::Login {
        chrome: Chrome::signed_out("Sign in"),
        error: None,
    })
}

pub(crate) async fn login(
    State(console): State<Arc<Console>>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if console.access == Access::Open {
        return Redirect::to("/").into_response();
    }
    if !same_origin(&headers) {
        return refused(
            StatusCode::FORBIDDEN,
            "refused: the request does not come from a page of this console",
        );
    }
    let form = Form::parse(&body);
    let username: String = form
        .get("username")
        .unwrap_or("")
        .chars()
        .take(64)
        .collect();
    let password = form
        .pairs()
        .find(|(k, _)| k == "password")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let guard = &console.sign_in;
    let (user_key, address_key) = (format!("user {username}"), format!("address {}", peer.ip()));
    if guard.failures(&user_key) >= USER_FAILURES
        || guard.failures(&address_key) >= ADDRESS_FAILURES
    {
        tracing::warn!(user = %username, address = %peer.ip(), "console sign-in refused without a check: too many failures in the last minute");
        return refused(
            StatusCode::TOO_MANY_REQUESTS,
            "too many failed sign-ins for this user or from this address: wait a minute",
        );
    }
    // at most a few password checks at once, never queued: each takes 19 MiB and a core
    let Ok(permit) = guard.checks.clone().try_acquire_owned() else {
        return refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many sign-ins at once: try again in a moment",
        );
    };
    let user = console.settings.users.get(&username).cloned();
    let hash = user.as_ref().map_or_else(
        || decoy_hash().to_string(),
        |u| u.password_hash.expose().to_string(),
    );
    // The check, its refusal's record and its delay run to their end on their own thread,
    // holding the slot, even when the client hangs up and this handler is dropped: a client
    // cannot start checks faster than they finish, nor fail without being counted.
    let checking = console.clone();
    let (who, address) = (username.clone(), peer.ip());
    let runtime = tokio::runtime::Handle::current();
    let ok = tokio::task::spawn_blocking(move || {
        let ok = verify(&password, &hash);
        if !ok {
            checking
                .sign_in
                .failed(&[&format!("user {who}"), &format!("address {address}")]);
            let audit = checking.clone();
            runtime.spawn(async move {
                if let Err(e) = store::audit(
                    &audit.pool,
                    &who,
                    "sign-in",
                    &format!("from {address}"),
                    0,
                    "refused",
                )
                .await
                {
                    tracing::warn!(error = %e, "could not write the console's audit entry");
                }
            });
            std::thread::sleep(REFUSED_SIGN_IN_DELAY);
        }
        drop(permit);
        ok
    })
    .await
    .unwrap_or(false);
    let Some(user) = user.filter(|_| ok) else {
        let mut page = views::render(&views::Login {
            chrome: Chrome::signed_out("Sign in"),
            error: Some("Unknown user or wrong password.".to_string()),
        });
        *page.status_mut() = StatusCode::UNAUTHORIZED;
        return page;
    };
    guard.succeeded(&user_key);
    let token = random_token();
    let session = Session {
        username: username.clone(),
        role: user.role.as_str().to_string(),
        csrf_token: random_token(),
        credential: credential(user.password_hash.expose()),
    };
    let ttl = console.settings.session_ttl;
    if let Err(e) = store::create_session(&console.pool, &digest(&token), &session, ttl).await {
        return views::database_error(&e);
    }
    if let Err(e) = store::audit(
        &console.pool,
        &username,
        "sign-in",
        &format!("from {}", peer.ip()),
        0,
        "signed in",
    )
    .await
    {
        tracing::warn!(error = %e, "could not write the console's audit entry");
    }
    let cookie = format!(
        "{}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        cookie_name(&console),
        ttl.as_secs(),
        if console.secure_cookies {
            "; Secure"
        } else {
            ""
        }
    );
    let mut response = Redirect::to("/").into_response();
    if let Ok(value) = header::HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

pub(crate) async fn logout(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let form = Form::parse(&body);
    let me = match poster(&console, &headers, &form, false).await {
        Ok(me) => me,
        Err(r) => return r,
    };
    if let Some(token) = cookie_token(&headers, cookie_name(&console)) {
        if let Err(e) = store::end_session(&console.pool, &digest(&token)).await {
            return views::database_error(&e);
        }
    }
    if let Err(e) = store::audit(
        &console.pool,
        &me.user,
        "sign-out",
        "console",
        0,
        "signed out",
    )
    .await
    {
        tracing::warn!(error = %e, "could not write the console's audit entry");
    }
    let mut response = Redirect::to("/login").into_response();
    if let Ok(value) = header::HeaderValue::from_str(&format!(
        "{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{}",
        cookie_name(&console),
        if console.secure_cookies {
            "; Secure"
        } else {
            ""
        }
    )) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_verifies_its_password_only() {
        let hash = hash_password("correct horse").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify("correct horse", &hash));
        assert!(!verify("correct horse ", &hash));
        assert!(!verify("", &hash));
        assert!(!verify("correct horse", "not a hash"));
        assert!(hash_password("").is_err());
    }

    #[test]
    fn the_session_cookie_is_read_among_others_and_only_in_its_form() {
        let mut headers = HeaderMap::new();
        let token = random_token();
        headers.insert(
            header::COOKIE,
            format!("a=b; {COOKIE}={token}; c=d").parse().unwrap(),
        );
        assert_eq!(cookie_token(&headers, COOKIE), Some(token));
        assert_eq!(cookie_token(&headers, SECURE_COOKIE), None);
        headers.insert(header::COOKIE, format!("{COOKIE}=zz").parse().unwrap());
        assert_eq!(cookie_token(&headers, COOKIE), None);
    }

    #[test]
    fn only_a_request_from_this_host_passes_the_origin_check() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, "127.0.0.1:8090".parse().unwrap());
        assert!(!same_origin(&headers), "neither Origin nor Referer");
        headers.insert(header::ORIGIN, "http://127.0.0.1:8090".parse().unwrap());
        assert!(same_origin(&headers));
        headers.insert(header::ORIGIN, "http://evil.example:8090".parse().unwrap());
        assert!(!same_origin(&headers));
        headers.insert(header::ORIGIN, "null".parse().unwrap());
        assert!(!same_origin(&headers));
        headers.remove(header::ORIGIN);
        headers.insert(
            header::REFERER,
            "http://127.0.0.1:8090/jobs?state=dead".parse().unwrap(),
        );
        assert!(same_origin(&headers));
    }

    #[test]
    fn tokens_are_random_and_long() {
        let (a, b) = (random_token(), random_token());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
    }
}

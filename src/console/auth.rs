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
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use sha2::{Digest, Sha256};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// The session cookie.
const COOKIE: &str = "contact_sync_session";

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

fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
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
    let Some(token) = cookie_token(headers) else {
        return Ok(None);
    };
    let session = store::session(&console.pool, &digest(&token))
        .await
        .map_err(|e| views::database_error(&e))?;
    // The configuration says what a user may do now: a user removed or made a viewer since
    // signing in loses what they lost.
    Ok(session.and_then(|s| {
        console.settings.users.get(&s.username).map(|user| Me {
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
    let user = console.settings.users.get(&username).cloned();
    let hash = user.as_ref().map_or_else(
        || decoy_hash().to_string(),
        |u| u.password_hash.expose().to_string(),
    );
    let ok = tokio::task::spawn_blocking(move || verify(&password, &hash))
        .await
        .unwrap_or(false);
    let Some(user) = user.filter(|_| ok) else {
        if let Err(e) =
            store::audit(&console.pool, &username, "sign-in", "console", 0, "refused").await
        {
            tracing::warn!(error = %e, "could not write the console's audit entry");
        }
        tokio::time::sleep(REFUSED_SIGN_IN_DELAY).await;
        let mut page = views::render(&views::Login {
            chrome: Chrome::signed_out("Sign in"),
            error: Some("Unknown user or wrong password.".to_string()),
        });
        *page.status_mut() = StatusCode::UNAUTHORIZED;
        return page;
    };
    let token = random_token();
    let session = Session {
        username: username.clone(),
        role: user.role.as_str().to_string(),
        csrf_token: random_token(),
    };
    let ttl = console.settings.session_ttl;
    if let Err(e) = store::create_session(&console.pool, &digest(&token), &session, ttl).await {
        return views::database_error(&e);
    }
    if let Err(e) = store::audit(
        &console.pool,
        &username,
        "sign-in",
        "console",
        0,
        "signed in",
    )
    .await
    {
        tracing::warn!(error = %e, "could not write the console's audit entry");
    }
    let cookie = format!(
        "{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
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
    if let Some(token) = cookie_token(&headers) {
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
        "{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"
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
        assert_eq!(cookie_token(&headers), Some(token));
        headers.insert(header::COOKIE, format!("{COOKIE}=zz").parse().unwrap());
        assert_eq!(cookie_token(&headers), None);
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

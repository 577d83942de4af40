//! Wire-level behaviour shared by both simulators: transport faults (a connection closed before
//! or in the middle of an answer) and PHP's JSON string encoding.

use super::faults::Fault;

/// The answer to a fault that is the same for both providers (HTTP status, 429, reset); `None`
/// for the provider-specific ones.
pub(crate) fn transport_fault(fault: &Fault) -> Option<axum::response::Response> {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    match fault {
        Fault::Status { status } => {
            let code = StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            Some((code, "sandbox: injected failure").into_response())
        }
        Fault::RateLimit { retry_after_secs } => Some(
            (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, retry_after_secs.to_string())],
                "slow down",
            )
                .into_response(),
        ),
        Fault::Reset => Some(reset_mid_response()),
        _ => None,
    }
}

/// A 200 response that promises a JSON body, sends half of it, and breaks the connection.
pub(crate) fn reset_mid_response() -> axum::response::Response {
    use axum::http::header;
    let chunks: Vec<Result<axum::body::Bytes, std::io::Error>> = vec![
        Ok(axum::body::Bytes::from_static(
            b"{\"error_code\":0,\"error_te",
        )),
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "sandbox: injected reset",
        )),
    ];
    let body = axum::body::Body::from_stream(futures_util::stream::iter(chunks));
    axum::response::Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, "120")
        .body(body)
        .unwrap_or_default()
}

/// JSON string the way PHP's `json_encode` writes it: non-ASCII as `\uXXXX`, `/` as `\/`.
pub(crate) fn php_json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for ch in text.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '/' => out.push_str("\\/"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_ascii() && !c.is_ascii_control() => out.push(c),
            c => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
    out.push('"');
    out
}

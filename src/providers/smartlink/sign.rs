//! Smartlink signature: `sig = md5(path + "?" + params + body + api_key)` where `params` is the
//! query string exactly as sent without `sig`, and `body` the exact JSON bytes sent.

use crate::providers::md5_hex;

pub fn sig(path: &str, params: &str, body: &[u8], api_key: &str) -> String {
    md5_hex(&[
        path.as_bytes(),
        b"?",
        params.as_bytes(),
        body,
        api_key.as_bytes(),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_full_body() {
        let body = r#"{"email":"545058834@qq.com","modify_ts":1691225447577,"tags":["tag1","tag2"],"openid":"5450588341569","subscribe":1,"location":"004","language":"en","attributes":{"nickname":"tang","level":"10","birthday":"1990-05-09 00:00:00+08:00"},"preferences":["option1","option2"]}"#;
        assert_eq!(
            sig(
                "/api/v4/userinfo/sync_user_by_email",
                "gameid=12345&seq=job_42_1&ts=1691225447",
                body.as_bytes(),
                "sl-api-key-0123456789abcdef"
            ),
            "2f2200788ba8bf16584cec1d1ad529b3"
        );
    }

    #[test]
    fn vector_minimal_body_empty_seq() {
        assert_eq!(
            sig(
                "/api/v4/userinfo/sync_user_by_email",
                "gameid=7&seq=&ts=1700000000",
                br#"{"email":"a@b.co","modify_ts":1700000000000}"#,
                "k"
            ),
            "6fbcdf9194e2bd2cfdd3f5b03dcff1d1"
        );
    }
}

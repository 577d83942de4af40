//! JustClick signatures: PHP's `http_build_query` byte for byte, the request hash
//! `md5(query + "::" + login + "::" + secret)` and the response hash
//! `md5(error_code + "::" + error_text + "::" + secret)`. Pinned by the tests below to the
//! provider's published test vectors.

use crate::providers::md5_hex;

/// PHP `urlencode`: `A-Z a-z 0-9 - _ .` stay, space is `+`, every other byte is `%XX` (upper hex).
pub fn php_urlencode(text: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in text.as_bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => out.push(char::from(b)),
            b' ' => out.push('+'),
            _ => {
                out.push('%');
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 0xf)]));
            }
        }
    }
}

/// PHP `http_build_query` of string pairs, in order.
pub fn php_build_query<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)]) -> String {
    let mut out = String::with_capacity(
        pairs
            .iter()
            .map(|(k, v)| k.as_ref().len() + v.as_ref().len() * 3 + 2)
            .sum(),
    );
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        php_urlencode(k.as_ref(), &mut out);
        out.push('=');
        php_urlencode(v.as_ref(), &mut out);
    }
    out
}

/// The inverse of [`php_urlencode`] as PHP decodes `$_POST`: `+` is a space, `%XX` a byte.
/// Returns `None` for malformed escapes or non-UTF-8 results.
pub fn php_urldecode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let s = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(s, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// The request hash over the encoded params (everything sent but `hash`).
pub fn request_hash(query: &str, login: &str, secret: &str) -> String {
    md5_hex(&[
        query.as_bytes(),
        b"::",
        login.as_bytes(),
        b"::",
        secret.as_bytes(),
    ])
}

/// The response hash over the decoded `error_code` and `error_text`.
pub fn response_hash(error_code: i64, error_text: &str, secret: &str) -> String {
    md5_hex(&[
        error_code.to_string().as_bytes(),
        b"::",
        error_text.as_bytes(),
        b"::",
        secret.as_bytes(),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_one_cyrillic_and_plus() {
        let params = [
            ("lead_email", "user@example.com"),
            ("lead_name", "Новое Имя2"),
            ("lead_phone", "+77777777777"),
            ("lead_city", "Мухоловск"),
            ("lead_tags", "tag1,tag2,tag3"),
        ];
        let query = php_build_query(&params);
        assert_eq!(
            query,
            "lead_email=user%40example.com&lead_name=%D0%9D%D0%BE%D0%B2%D0%BE%D0%B5+%D0%98%D0%BC%D1%8F2&lead_phone=%2B77777777777&lead_city=%D0%9C%D1%83%D1%85%D0%BE%D0%BB%D0%BE%D0%B2%D1%81%D0%BA&lead_tags=tag1%2Ctag2%2Ctag3"
        );
        assert_eq!(
            request_hash(
                &query,
                "username",
                "XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX"
            ),
            "ab9658bd7aa8614cc37a9c06a7bf744e"
        );
    }

    #[test]
    fn vector_two_plus_in_address() {
        let query = php_build_query(&[("lead_email", "a.b+c@example.org")]);
        assert_eq!(query, "lead_email=a.b%2Bc%40example.org");
        assert_eq!(
            request_hash(&query, "shop42", "s3cr3t"),
            "0ca9242ac988287b7afb5605d6cd1bd3"
        );
    }

    #[test]
    fn response_vectors() {
        assert_eq!(
            response_hash(0, "OK", "s3cr3t"),
            "b6dbfded180416dee23ca6bfb4d96e3d"
        );
        assert_eq!(
            response_hash(0, "Данные контакта обновлены", "s3cr3t"),
            "c6979ee97b510722694890d64b702eed"
        );
        assert_eq!(
            response_hash(401, "Error", "s3cr3t"),
            "dec40809bfb20b91f07fc5104776c1e7"
        );
    }

    #[test]
    fn php_specific_bytes() {
        let mut out = String::new();
        php_urlencode("a*b~c d+e/f", &mut out);
        assert_eq!(out, "a%2Ab%7Ec+d%2Be%2Ff");
        assert_eq!(php_build_query(&[("k", "")]), "k=");
    }

    #[test]
    fn decode_inverts_encode() {
        for s in ["Новое Имя2", "a*b~c d+e/f", "", "🙂 & = %"] {
            let mut enc = String::new();
            php_urlencode(s, &mut enc);
            assert_eq!(php_urldecode(&enc).as_deref(), Some(s));
        }
        assert_eq!(php_urldecode("%zz"), None);
        assert_eq!(php_urldecode("%4"), None);
    }
}

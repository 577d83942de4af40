//! The one definition of a valid e-mail address, shared by the clients (and the sandbox) with
//! the database's `contact_sync.email_is_valid` (migration `…_trust_hardening.sql`): whatever
//! enqueue accepts, the worker sends. A test holds both to the same answers on hostile input.

/// Longest address (characters).
pub const MAX_LEN: usize = 254;
/// Longest local part (characters).
pub const MAX_LOCAL_LEN: usize = 64;

/// Whitespace, control, format, bidi and other invisible (default-ignorable) characters an
/// address may not contain (Unicode ones included), and the address specials.
pub fn is_forbidden(c: char) -> bool {
    matches!(c,
        '\u{0}'..='\u{20}' | '\u{7f}'..='\u{a0}' | '\u{ad}' | '\u{34f}'
        | '\u{600}'..='\u{605}' | '\u{61c}' | '\u{6dd}' | '\u{70f}' | '\u{890}'..='\u{891}'
        | '\u{8e2}' | '\u{115f}'..='\u{1160}' | '\u{1680}' | '\u{17b4}'..='\u{17b5}'
        | '\u{180b}'..='\u{180f}' | '\u{2000}'..='\u{200f}' | '\u{2028}'..='\u{202f}'
        | '\u{205f}'..='\u{206f}' | '\u{3000}' | '\u{3164}' | '\u{fe00}'..='\u{fe0f}'
        | '\u{feff}' | '\u{ffa0}' | '\u{fff9}'..='\u{fffb}' | '\u{110bd}' | '\u{110cd}'
        | '\u{13430}'..='\u{1343f}' | '\u{1bca0}'..='\u{1bca3}' | '\u{1d173}'..='\u{1d17a}'
        | '\u{e0000}'..='\u{e0fff}'
        | '<' | '>' | '(' | ')' | '[' | ']' | ',' | ';' | ':' | '\\' | '"')
}

/// `local@domain`, at most 254 characters (local part 1–64), no forbidden character, no
/// leading, trailing or doubled dot in the local part, a domain of two or more non-empty labels.
pub fn is_valid_email(email: &str) -> bool {
    if email.chars().count() > MAX_LEN || email.chars().any(is_forbidden) {
        return false;
    }
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    let local_len = local.chars().count();
    if local_len == 0 || local_len > MAX_LOCAL_LEN || domain.contains('@') {
        return false;
    }
    if local.starts_with('.') || local.ends_with('.') || local.contains("..") {
        return false;
    }
    let labels: Vec<&str> = domain.split('.').collect();
    labels.len() >= 2 && labels.iter().all(|l| !l.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_and_international_addresses() {
        for ok in [
            "user@example.com",
            "a.b+c@example.org",
            "ü@例え.jp",
            "x@b.c",
        ] {
            assert!(is_valid_email(ok), "{ok}");
        }
    }

    #[test]
    fn refuses_hostile_addresses() {
        for bad in [
            "a@b",
            "user\u{a0}@example.com", // no-break space (regression)
            "user@exa\u{200b}mple.com",
            "\u{feff}user@example.com",
            "a\u{61c}b@example.com", // found by the adversarial review
            "a\u{fff9}b@example.com",
            "a\u{e0001}b@example.com",
            "a\u{1d173}b@example.com",
            "a\u{34f}b@example.com",
            "a\u{fe0f}b@example.com",
            "us er@example.com",
            "user@@example.com",
            "a@b@example.com",
            ".a@example.com",
            "a.@example.com",
            "a..b@example.com",
            "a@example..com",
            "a@.example.com",
            "<a>@example.com",
            "a\"b@example.com",
            "",
            "@example.com",
        ] {
            assert!(!is_valid_email(bad), "{bad:?}");
        }
        let long_local = format!("{}@example.com", "a".repeat(65));
        assert!(!is_valid_email(&long_local));
        let long = format!("a@{}.com", "b".repeat(250));
        assert!(!is_valid_email(&long));
    }
}

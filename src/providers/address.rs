//! The one definition of a valid e-mail address, shared by the clients (and the sandbox) with
//! the database's `contact_sync.email_is_valid` (`schema/contact_sync.sql`): whatever
//! enqueue accepts, the worker sends. A test holds both to the same answers on hostile input.
//!
//! JustClick accepts fewer: what PHP's `filter_var($email, FILTER_VALIDATE_EMAIL)` accepts
//! ([`php_valid_email`], the database's `contact_sync.justclick_email_is_valid`), so a JustClick
//! job also needs that ([`is_valid_justclick_email`]). A test holds the three (Rust, SQL, PHP
//! itself) to the same answers.

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

/// What JustClick accepts, and so what enqueue accepts for a JustClick job and the JustClick
/// client sends: the rule above and PHP's ([`php_valid_email`]).
pub fn is_valid_justclick_email(email: &str) -> bool {
    is_valid_email(email) && php_valid_email(email)
}

/// PHP's `filter_var($email, FILTER_VALIDATE_EMAIL)` without `FILTER_FLAG_EMAIL_UNICODE`: the
/// regular expression of php-src `ext/filter/logical_filters.c` (`php_filter_validate_email`,
/// unchanged from PHP 7.1 to 8.4) after its 320-byte test, read as PCRE reads it (bytes,
/// case-insensitive):
/// - ASCII only;
/// - the look-aheads at the start: fewer than 255 "units" (a character, an escaped pair
///   `\x`, each with an optional `"` on either side) from the start, and fewer than 65 before
///   an `@`; for an address without `"` or `\` that is at most 254 characters and a local part
///   of at most 64;
/// - a local part of dot-separated words, each an atom (letters, digits,
///   ``!#$%&'*+-/=?^_`{|}~``) or a quoted string (`"…"` of printable characters but space, `"`
///   and `\`, control characters but NUL, tab, CR and LF, and escaped pairs `\` + any ASCII);
/// - a domain of two or more labels of letters, digits and inner hyphens, each shorter than 64
///   characters, the last starting with a letter (so `a@b.123` and `a@1.2.3.4` fail), or an
///   address literal: `[1.2.3.4]`, `[IPv6:…]`.
///
/// Not modelled: PHP gives up (and refuses) when the look-ahead's backtracking exceeds
/// `pcre.backtrack_limit`, which a local part of many short quoted strings reaches (eight,
/// `"a"."a"…`, with PHP 8.2's defaults); contact-sync refuses every `"` anyway
/// ([`is_valid_email`]).
pub fn php_valid_email(email: &str) -> bool {
    let s = email.as_bytes();
    if s.len() > 320 || !s.is_ascii() {
        return false;
    }
    let Some(at) = php::local_part_end(s) else {
        return false;
    };
    php::units_within_limits(s) && php::domain_ok(&s[at + 1..])
}

/// The parts of [`php_valid_email`].
mod php {
    /// Atom characters (`[\x21\x23-\x27\x2A\x2B\x2D\x2F-\x39\x3D\x3F\x5E-\x7E]`, and
    /// upper-case letters through the `i` flag).
    fn atext(c: u8) -> bool {
        c.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&c)
    }

    /// Characters of a quoted string besides escaped pairs
    /// (`[\x01-\x08\x0B\x0C\x0E-\x1F\x21\x23-\x5B\x5D-\x7F]`).
    fn qtext(c: u8) -> bool {
        matches!(c, 0x01..=0x08 | 0x0b | 0x0c | 0x0e..=0x1f | 0x21 | 0x23..=0x5b | 0x5d..=0x7f)
    }

    /// Where the local part's `@` is: `word(.word)*@`, a word an atom run or a quoted string.
    pub(super) fn local_part_end(s: &[u8]) -> Option<usize> {
        let mut i = 0;
        loop {
            if s.get(i) == Some(&b'"') {
                i += 1;
                loop {
                    match *s.get(i)? {
                        b'"' => break,
                        b'\\' if s.get(i + 1).is_some_and(u8::is_ascii) => i += 2,
                        c if qtext(c) => i += 1,
                        _ => return None,
                    }
                }
                i += 1;
            } else {
                let start = i;
                while s.get(i).copied().is_some_and(atext) {
                    i += 1;
                }
                if i == start {
                    return None;
                }
            }
            match *s.get(i)? {
                b'.' => i += 1,
                b'@' => return Some(i),
                _ => return None,
            }
        }
    }

    /// The two look-aheads at the start:
    /// `(?!(?:(?:\x22?\x5C[\x00-\x7E]\x22?)|(?:\x22?[^\x5C\x22]\x22?)){255,})` and the same
    /// with `{65,}@`. `most[p]`: the most units a parse from the start can end at `p` with.
    pub(super) fn units_within_limits(s: &[u8]) -> bool {
        let mut most: Vec<Option<usize>> = vec![None; s.len() + 2];
        most[0] = Some(0);
        for p in 0..s.len() {
            let Some(units) = most[p] else { continue };
            let opening = if s[p] == b'"' { 2 } else { 1 };
            for q in p..p + opening {
                let end = match s.get(q) {
                    Some(b'\\') if s.get(q + 1).is_some_and(|&c| c <= 0x7e) => q + 2,
                    Some(b'\\' | b'"') | None => continue,
                    Some(_) => q + 1,
                };
                let closing = if s.get(end) == Some(&b'"') { 2 } else { 1 };
                for slot in &mut most[end..end + closing] {
                    *slot = (*slot).max(Some(units + 1));
                }
            }
        }
        let too_long = most.iter().flatten().any(|&units| units >= 255);
        let local_too_long = s
            .iter()
            .zip(&most)
            .any(|(&c, units)| c == b'@' && units.is_some_and(|u| u >= 65));
        !too_long && !local_too_long
    }

    /// A host name (with the look-ahead `(?!.*[^.]{64,})`) or an address literal.
    pub(super) fn domain_ok(d: &[u8]) -> bool {
        if let Some(literal) = d.strip_prefix(b"[").and_then(|d| d.strip_suffix(b"]")) {
            return address_literal_ok(literal);
        }
        let labels: Vec<&[u8]> = d.split(|&c| c == b'.').collect();
        let label_ok = |l: &&[u8]| {
            l.len() < 64
                && l.first().is_some_and(u8::is_ascii_alphanumeric)
                && l.last().is_some_and(u8::is_ascii_alphanumeric)
                && l.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'-')
        };
        labels.len() >= 2
            && labels.iter().all(label_ok)
            && labels
                .last()
                .and_then(|l| l.first())
                .is_some_and(u8::is_ascii_alphabetic)
    }

    /// `25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9]`, four times, dot-separated.
    fn ipv4_ok(s: &[u8]) -> bool {
        let parts: Vec<&[u8]> = s.split(|&c| c == b'.').collect();
        parts.len() == 4
            && parts.iter().all(|p| {
                (1..=3).contains(&p.len())
                    && p.iter().all(u8::is_ascii_digit)
                    && (p.len() == 1 || p[0] != b'0')
                    && std::str::from_utf8(p)
                        .ok()
                        .and_then(|t| t.parse::<u16>().ok())
                        .is_some_and(|n| n <= 255)
            })
    }

    /// How many `[a-f0-9]{1,4}` groups `s` is, colon-separated (`""`: none).
    fn hex_groups(s: &[u8]) -> Option<usize> {
        if s.is_empty() {
            return Some(0);
        }
        let groups: Vec<&[u8]> = s.split(|&c| c == b':').collect();
        groups
            .iter()
            .all(|g| (1..=4).contains(&g.len()) && g.iter().all(u8::is_ascii_hexdigit))
            .then_some(groups.len())
    }

    /// `s` as `A::B` with `A` of `before` groups at most and `B` accepted by `after`.
    fn compressed(s: &[u8], before: usize, after: impl Fn(&[u8]) -> bool) -> bool {
        (0..s.len().saturating_sub(1)).any(|i| {
            s[i..].starts_with(b"::")
                && hex_groups(&s[..i]).is_some_and(|n| n <= before)
                && after(&s[i + 2..])
        })
    }

    /// An address literal's inside: an IPv4 address, or `IPv6:` (any case) and an IPv6 address,
    /// full, compressed, or with an IPv4 tail.
    fn address_literal_ok(s: &[u8]) -> bool {
        if ipv4_ok(s) {
            return true;
        }
        if s.len() < 5 || !s[..5].eq_ignore_ascii_case(b"ipv6:") {
            return false;
        }
        let v6 = &s[5..];
        // the look-aheads count hex digits followed by `:` (or the closing `]`) up to the end
        let mut rest = v6.to_vec();
        rest.push(b']');
        let followed_by = |seps: &[u8]| {
            rest.windows(2)
                .filter(|w| w[0].is_ascii_hexdigit() && seps.contains(&w[1]))
                .count()
        };
        if hex_groups(v6) == Some(8) {
            return true;
        }
        if followed_by(b":]") < 7 && compressed(v6, 6, |b| hex_groups(b).is_some_and(|n| n <= 6)) {
            return true;
        }
        // an IPv4 tail after the last colon
        let Some(colon) = v6.iter().rposition(|&c| c == b':') else {
            return false;
        };
        let (head, v4) = (&v6[..=colon], &v6[colon + 1..]);
        if !ipv4_ok(v4) {
            return false;
        }
        let head_groups = hex_groups(&head[..head.len() - 1]);
        head_groups == Some(6)
            || (followed_by(b":") < 5
                && compressed(head, 4, |b| {
                    b.is_empty()
                        || b.strip_suffix(b":")
                            .and_then(hex_groups)
                            .is_some_and(|n| (1..=4).contains(&n))
                }))
    }
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

    /// PHP 8.2's own answers (`filter_var($e, FILTER_VALIDATE_EMAIL) !== false`); the
    /// integration test `addresses::*` asks PHP itself about many more.
    #[test]
    fn php_answers() {
        let long = |n: usize| "a".repeat(n);
        let labels = |lens: &[usize]| {
            let l: Vec<String> = lens.iter().map(|&n| "b".repeat(n)).collect();
            l.join(".")
        };
        let cases: Vec<(String, bool)> = [
            ("a@b_c.com", false),
            ("a@b-.com", false),
            ("a@-b.com", false),
            ("a@b.123", false),
            ("a@1.2.3.4", false),
            ("a@b.1c", false),
            ("a@b.c1", true),
            ("A@B.COM", true),
            ("a@xn--80ak6aa92e.com", true),
            ("a@b.xn--p1ai", true),
            ("a@b.c--d", true),
            ("a@a-b.c", true),
            ("a@1-2.co", true),
            ("a@xn--.com", false),
            ("a@-.com", false),
            ("a@b.co-", false),
            ("a@b..c", false),
            ("a@b.c.", false),
            (".a@b.com", false),
            ("a.@b.com", false),
            ("a..b@b.com", false),
            ("a!#$%&'*+-/=?^_`{|}~@x.com", true),
            ("a(b)@x.com", false),
            ("a b@x.com", false),
            ("a@b.com\n", false),
            ("a\n@b.com", false),
            ("a@b", false),
            ("@b.com", false),
            ("a@", false),
            ("a@@b.com", false),
            ("a@b@c.com", false),
            ("ü@example.com", false),
            ("a@пример.рф", false),
            ("a@[1.2.3.4]", true),
            ("a@[01.2.3.4]", false),
            ("a@[256.1.1.1]", false),
            ("a@[1.2.3]", false),
            ("a@[IPv6:::1]", true),
            ("a@[ipv6:::1]", true),
            ("a@[IPv6:1:2:3:4:5:6:7:8]", true),
            ("a@[IPv6:1:2:3:4:5:6:7:8:9]", false),
            ("a@[IPv6:1:2:3:4:5:6:7::]", false),
            ("a@[IPv6:1:2:3:4:5:6::7]", false),
            ("a@[IPv6:1:2:3::4:5:6]", true),
            ("a@[IPv6:12345::1]", false),
            ("a@[IPv6:1:2:3:4:5:6:1.2.3.4]", true),
            ("a@[IPv6:1:2:3:4::1.2.3.4]", true),
            ("a@[IPv6:1:2:3:4:5::1.2.3.4]", false),
            ("a@[IPv6:::1.2.3.4]", true),
            ("a@[IPv6:1::2:3:4:1.2.3.4]", true),
            ("\"a b\"@x.com", false),
            ("\"a\\ b\"@x.com", true),
            ("\"a@b\"@x.com", true),
            ("\"\"@x.com", true),
            ("a.\"b\".c@x.com", true),
            ("\"a\"b@x.com", false),
            ("\"a\\\"b\"@x.com", true),
            ("\"a\tb\"@x.com", false),
            ("\"a\u{1}b\"@x.com", true),
            ("\"a\\\u{7f}\"@x.com", true),
        ]
        .into_iter()
        .map(|(e, ok)| (e.to_string(), ok))
        .chain([
            (format!("{}@x.com", long(64)), true),
            (format!("{}@x.com", long(65)), false),
            (format!("a@{}.com", labels(&[63])), true),
            (format!("a@{}.com", labels(&[64])), false),
            // 254 and 255 characters
            (format!("a@{}.com", labels(&[63, 63, 63, 56])), true),
            (format!("a@{}.com", labels(&[63, 63, 63, 57])), false),
            (format!("{}@{}.com", long(64), labels(&[63, 63, 58])), false),
            (format!("\"{}\"@x.com", long(70)), false),
            (format!("\"\\{}\"@x.com", long(30)), true),
            // a leading "" stops PHP's look-ahead from counting: no length limit but 320 bytes
            (format!("\"\".{}@example.com", long(100)), true),
        ])
        .collect();
        for (email, php) in &cases {
            assert_eq!(php_valid_email(email), *php, "{email:?}");
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

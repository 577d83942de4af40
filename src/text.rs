//! Text made safe to keep and to show: provider answers, operator reasons and error chains end
//! up in the database, logs and terminals, so control characters are escaped and lengths bounded.

/// `err: source: source` in one line.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// A provider's text made safe for the database, logs and terminals: control characters
/// (NUL, ESC, C1, line separators, bidi overrides) become `\u{…}` escapes, and the text is cut
/// at `max` characters with a trailing `…`.
pub fn printable(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max * 4));
    for (n, c) in text.chars().enumerate() {
        if n == max {
            out.push('…');
            break;
        }
        let unsafe_char = c.is_control()
            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}');
        if unsafe_char {
            out.push_str(&format!("\\u{{{:04x}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

/// The start of a body for an error text: printable, at most 200 characters.
pub fn body_snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let cleaned: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect();
    cleaned.trim().to_string()
}

/// A text made storable in Postgres (no NUL) and bounded; provider texts are already printable
/// ([`printable`]), this is the last guard before the database.
pub fn storable(text: &str) -> String {
    const MAX: usize = 2000;
    let mut out: String = text.chars().take(MAX).collect();
    if out.contains('\0') {
        out = out.replace('\0', "\\u{0000}");
    }
    if text.chars().nth(MAX).is_some() {
        out.push('…');
    }
    out
}

/// An SQL string literal: `text` between single quotes, each quote doubled.
pub fn sql_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The known name closest to `word`, if close enough to be a typo (for "did you mean …?").
pub fn closest<'a, S: AsRef<str>>(word: &str, known: &'a [S]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (strsim::levenshtein(word, k.as_ref()), k.as_ref()))
        .filter(|(d, k)| *d <= 2.max(k.chars().count() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_texts_are_made_printable() {
        // Regression: a NUL in a provider's text could not be stored; ESC reached terminals.
        let t = printable("bad\u{0}\u{1b}[31mred\u{202e}", 100);
        assert_eq!(t, "bad\\u{0000}\\u{001b}[31mred\\u{202e}");
        assert!(!t.chars().any(char::is_control));
        assert_eq!(printable("abcdef", 3), "abc…");
    }

    #[test]
    fn snippets_are_short_and_printable() {
        let long = "x\n".repeat(500);
        let s = body_snippet(long.as_bytes());
        assert!(s.chars().count() <= 200);
        assert!(!s.contains('\n'));
    }
}

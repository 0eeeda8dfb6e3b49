//! Input rules shared by HTTP and WebSocket.

use super::DomainError;

/// 1–32 characters from `A–Z a–z 0–9 _ . -`.
pub fn username(name: &str) -> Result<(), DomainError> {
    let ok = (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(DomainError::invalid(
            "invalid_username",
            "username must be 1-32 characters from A-Z a-z 0-9 _ . -",
        ))
    }
}

/// 8–128 characters.
pub fn password(password: &str) -> Result<(), DomainError> {
    if (8..=128).contains(&password.chars().count()) {
        Ok(())
    } else {
        Err(DomainError::invalid(
            "invalid_password",
            "password must be 8-128 characters",
        ))
    }
}

/// Message content: 1..=`max_chars` characters, not only invisible
/// characters ([`is_invisible`]: whitespace, zero-width, bidi controls,
/// BOM, tags…), no control characters but newline, tab and the CR of a
/// CRLF line break. The error says which rule failed.
pub fn content(content: &str, max_chars: usize) -> Result<(), String> {
    if only_invisible(content) {
        return Err("content must not be empty or only whitespace or invisible characters".into());
    }
    if content.chars().count() > max_chars {
        return Err(format!("content must be at most {max_chars} characters"));
    }
    if has_control_chars(content) {
        return Err(
            "content must not contain control characters other than newline (LF or CRLF) and tab"
                .into(),
        );
    }
    Ok(())
}

/// A group title: 1..=`max_chars` characters, not only invisible
/// characters (as for content), no control characters at all.
pub fn title(title: &str, max_chars: usize) -> Result<(), String> {
    if only_invisible(title) {
        return Err("title must not be empty or only whitespace or invisible characters".into());
    }
    if title.chars().count() > max_chars {
        return Err(format!("title must be at most {max_chars} characters"));
    }
    if title.chars().any(char::is_control) {
        return Err("title must not contain control characters".into());
    }
    Ok(())
}

/// True for text a reader would see as empty: nothing, or only
/// [`is_invisible`] characters.
fn only_invisible(text: &str) -> bool {
    text.chars().all(is_invisible)
}

/// Characters that render as nothing (or as blank space) on their own:
/// Unicode whitespace, and format characters that a client can use to
/// send a message that looks empty. Mixed with visible text they stay
/// allowed (bidi controls and joiners are needed by real scripts and
/// emoji); only text made of nothing else is refused.
pub fn is_invisible(c: char) -> bool {
    c.is_whitespace()
        || matches!(
            c,
            '\u{00AD}'                     // soft hyphen
            | '\u{034F}'                   // combining grapheme joiner
            | '\u{061C}'                   // Arabic letter mark
            | '\u{115F}' | '\u{1160}'      // Hangul choseong/jungseong fillers
            | '\u{17B4}' | '\u{17B5}'      // Khmer inherent vowels
            | '\u{180B}'..='\u{180F}'      // Mongolian variation selectors, vowel separator
            | '\u{200B}'..='\u{200F}'      // zero-width space/non-joiner/joiner, LRM, RLM
            | '\u{202A}'..='\u{202E}'      // bidi embeddings and overrides
            | '\u{2060}'..='\u{2064}'      // word joiner, invisible operators
            | '\u{2066}'..='\u{206F}'      // bidi isolates, deprecated format characters
            | '\u{2800}'                   // Braille pattern blank
            | '\u{3164}'                   // Hangul filler
            | '\u{FE00}'..='\u{FE0F}'      // variation selectors
            | '\u{FEFF}'                   // byte order mark / zero-width no-break space
            | '\u{FFA0}'                   // halfwidth Hangul filler
            | '\u{1D173}'..='\u{1D17A}'    // musical formatting characters
            | '\u{E0000}'..='\u{E007F}'    // tag characters
            | '\u{E0100}'..='\u{E01EF}' // variation selectors supplement
        )
}

/// A control character other than newline, tab, or a CR directly before a
/// newline (clients on Windows and HTML forms send CRLF line breaks).
fn has_control_chars(text: &str) -> bool {
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let allowed = match c {
            '\n' | '\t' => true,
            '\r' => chars.peek() == Some(&'\n'),
            c => !c.is_control(),
        };
        if !allowed {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_follow_the_contract() {
        for ok in ["a", "Alice", "bob_1.x-y", &"x".repeat(32)] {
            assert!(username(ok).is_ok(), "{ok}");
        }
        for bad in ["", "al ice", "ålice", "a/b", &"x".repeat(33)] {
            assert!(username(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn titles_are_short_visible_lines() {
        assert!(title("Team ✓", 100).is_ok());
        assert!(title(&"é".repeat(100), 100).is_ok());
        for bad in ["", "   ", "a\nb", "a\tb", &"x".repeat(101)] {
            assert!(title(bad, 100).is_err(), "{bad:?}");
        }
    }

    /// Every character the rule names, alone and repeated.
    const INVISIBLE: &[char] = &[
        ' ',
        '\u{A0}',
        '\u{3000}',
        '\u{2028}',
        '\u{00AD}',
        '\u{034F}',
        '\u{061C}',
        '\u{115F}',
        '\u{1160}',
        '\u{180E}',
        '\u{200B}',
        '\u{200C}',
        '\u{200D}',
        '\u{200E}',
        '\u{200F}',
        '\u{202A}',
        '\u{202B}',
        '\u{202C}',
        '\u{202D}',
        '\u{202E}',
        '\u{2060}',
        '\u{2066}',
        '\u{2067}',
        '\u{2068}',
        '\u{2069}',
        '\u{2800}',
        '\u{3164}',
        '\u{FE0F}',
        '\u{FEFF}',
        '\u{FFA0}',
        '\u{E0001}',
        '\u{E0020}',
        '\u{E007F}',
        '\u{E0100}',
    ];

    #[test]
    fn only_invisible_characters_are_refused_like_whitespace() {
        for &c in INVISIBLE {
            for text in [c.to_string(), format!("{c}{c} {c}"), format!("\n{c}\t")] {
                let e = content(&text, 100).unwrap_err();
                assert!(e.contains("empty"), "{text:?}: {e}");
                let e = title(&text, 100).unwrap_err();
                assert!(e.contains("empty"), "{text:?}: {e}");
            }
            // Next to something visible they are fine (joiners, bidi marks
            // and variation selectors are part of real text and emoji).
            assert!(content(&format!("a{c}b"), 100).is_ok(), "{c:?}");
            assert!(title(&format!("a{c}b"), 100).is_ok(), "{c:?}");
        }
        // A tag sequence flag, a ZWJ family emoji, Hebrew with an RLM.
        for ok in [
            "\u{1F3F4}\u{E0067}\u{E0062}\u{E0073}\u{E0063}\u{E0074}\u{E007F}",
            "\u{1F468}\u{200D}\u{1F469}\u{200D}\u{1F467}",
            "\u{200F}שלום",
        ] {
            assert!(content(ok, 100).is_ok(), "{ok:?}");
        }
    }

    #[test]
    fn crlf_line_breaks_are_accepted_and_a_lone_cr_is_not() {
        assert!(content("one\r\ntwo\r\n", 20).is_ok());
        for bad in ["a\rb", "a\r", "\r\r\nx", "x\n\r"] {
            assert!(content(bad, 20).is_err(), "{bad:?}");
        }
        assert!(content("\r\n", 20).is_err(), "only a line break is empty");
        assert!(title("a\r\nb", 100).is_err(), "titles are one line");
    }

    #[test]
    fn content_rules_count_characters_not_bytes() {
        assert!(content("line\nnext\ttab", 20).is_ok());
        assert!(content("ünïcödé ✓", 9).is_ok());
        for bad in [
            "",
            "  \n\t ",
            "a\u{0000}b",
            "a\rb",
            "\u{1b}[31m",
            "12345678901",
        ] {
            assert!(content(bad, 10).is_err(), "{bad:?}");
        }
    }
}

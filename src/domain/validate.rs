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

/// Message content: 1..=`max_chars` characters, not only whitespace, no
/// control characters but newline and tab. The error says which rule failed.
pub fn content(content: &str, max_chars: usize) -> Result<(), String> {
    if content.trim().is_empty() {
        return Err("content must not be empty or only whitespace".into());
    }
    if content.chars().count() > max_chars {
        return Err(format!("content must be at most {max_chars} characters"));
    }
    if has_control_chars(content) {
        return Err(
            "content must not contain control characters other than newline and tab".into(),
        );
    }
    Ok(())
}

/// A group title: 1..=`max_chars` characters, not only whitespace, no
/// control characters at all.
pub fn title(title: &str, max_chars: usize) -> Result<(), String> {
    if title.trim().is_empty() {
        return Err("title must not be empty or only whitespace".into());
    }
    if title.chars().count() > max_chars {
        return Err(format!("title must be at most {max_chars} characters"));
    }
    if title.chars().any(char::is_control) {
        return Err("title must not contain control characters".into());
    }
    Ok(())
}

fn has_control_chars(text: &str) -> bool {
    text.chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
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

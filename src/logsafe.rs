//! Values a client (or a backend) chose, made safe to log.
//!
//! In text logs a value is written as it is, so a newline in a username or
//! in a token's header would start a forged log line, and an escape
//! sequence (`\x1b[2J`) would act on the terminal of whoever reads the log.
//! Every such value is logged through [`Escaped`], which writes control
//! characters as escapes (`\n`, `\u{1b}`) and everything else unchanged.

use std::fmt;

/// Displays a string with its control characters escaped.
#[derive(Debug, Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(at) = rest.find(|c: char| c.is_control()) {
            f.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().unwrap_or('\0');
            write!(f, "{}", c.escape_default())?;
            rest = &rest[at + c.len_utf8()..];
        }
        f.write_str(rest)
    }
}

/// Shorthand: `tracing::info!(user = %escaped(&name), ...)`.
pub fn escaped(s: &str) -> Escaped<'_> {
    Escaped(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert_eq!(escaped("alice").to_string(), "alice");
        assert_eq!(escaped("Zoë ☃").to_string(), "Zoë ☃");
        assert_eq!(
            escaped("a\nINFO fake line\r\x1b[2J\u{85}\t").to_string(),
            "a\\nINFO fake line\\r\\u{1b}[2J\\u{85}\\t"
        );
        assert!(!escaped("x\ny\u{7f}").to_string().contains(['\n', '\u{7f}']));
    }
}

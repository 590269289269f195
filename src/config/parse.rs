//! The value parsers every setting goes through: each takes the variable's
//! name and its raw string, and fails with a [`ConfigError`] naming both.

use std::time::Duration;

use super::ConfigError;

pub(super) fn path(raw: &Option<String>) -> Option<std::path::PathBuf> {
    raw.as_deref()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(std::path::PathBuf::from)
}

pub(super) fn boolean(var: &'static str, raw: &str) -> Result<bool, ConfigError> {
    match raw.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        _ => Err(ConfigError::new(
            var,
            format!("{raw:?} is not a boolean (expected true or false)"),
        )),
    }
}

/// Parses a whole number within `range`, naming `var` on failure.
pub(super) fn number<T>(
    var: &'static str,
    raw: &str,
    range: std::ops::RangeInclusive<T>,
) -> Result<T, ConfigError>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
{
    let value: T = raw.trim().parse().map_err(|_| {
        ConfigError::new(
            var,
            format!(
                "{raw:?} is not a whole number (expected {}-{})",
                range.start(),
                range.end()
            ),
        )
    })?;
    if !range.contains(&value) {
        return Err(ConfigError::new(
            var,
            format!("{value} is outside {}-{}", range.start(), range.end()),
        ));
    }
    Ok(value)
}

pub(super) fn nonempty(var: &'static str, raw: &str) -> Result<String, ConfigError> {
    let v = raw.trim();
    if v.is_empty() {
        return Err(ConfigError::new(var, "must not be empty"));
    }
    Ok(v.to_owned())
}

pub(super) fn seconds(
    var: &'static str,
    raw: &str,
    range: std::ops::RangeInclusive<u64>,
) -> Result<Duration, ConfigError> {
    number(var, raw, range).map(Duration::from_secs)
}

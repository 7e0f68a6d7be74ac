//! Reading environment variables for a [`super::Section`]: empty counts as unset, and a value
//! that does not parse is a [`ConfigError`] naming the variable.

use std::str::FromStr;

use super::{ConfigError, err};

/// The trimmed value of `key`, or `None` when unset or blank.
pub fn value(get: &dyn Fn(&str) -> Option<String>, key: &str) -> Option<String> {
    get(key).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
}

/// `key` parsed as `T`; a value that does not parse is an error saying `what` it must be and
/// `fix` (an example).
pub fn parse<T: FromStr>(
    get: &dyn Fn(&str) -> Option<String>,
    key: &str,
    what: &str,
    fix: &str,
) -> Result<Option<T>, ConfigError> {
    value(get, key).map(|v| v.parse().map_err(|_| err(key, format!("`{v}` is not {what}"), fix))).transpose()
}

/// `key` as a comma-separated list (blank entries dropped).
pub fn list(get: &dyn Fn(&str) -> Option<String>, key: &str) -> Option<Vec<String>> {
    value(get, key).map(|v| v.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect())
}

//! Secrets read from the environment: API keys, agent keys, the admin token.
//!
//! A [`Secret`] never prints its value, so `Debug` output of settings is safe to log.

use std::fmt;

use crate::error::{Invalid, KeyPath};

/// A secret from the environment: `Debug` and `Display` print `[redacted]`; [`Secret::expose`]
/// gives the value. Equality compares in time independent of where the values differ.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The secret value; do not log it or put it in an event.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when `candidate` is this secret, compared without an early exit on the first
    /// differing byte (for checking bearer keys).
    pub fn matches(&self, candidate: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), candidate.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.matches(other.expose())
    }
}

impl Eq for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Reads the secret named by the `*_env` key at `at` from `env`; unset or empty is an error
/// at that key, and so is a value no HTTP header can carry (every secret is sent in or
/// compared with one).
pub(crate) fn from_env(
    var: &str,
    at: &KeyPath,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Secret, Invalid> {
    if var.is_empty() {
        return Err(at.invalid("must name an environment variable"));
    }
    // A name as shells write them; another (with `-` or `.`, as containers allow) is read
    // all the same, but not repeated in an error, since it may be the key itself pasted in.
    let plain = var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !var.starts_with(|c: char| c.is_ascii_digit());
    match env(var) {
        None if !plain => Err(at.invalid(
            "the environment variable it names is not set (the name is not repeated here: it does not look like a variable's name; is it the key itself? put the key in an environment variable and name that variable here)",
        )),
        Some(value) if value.chars().any(char::is_control) => Err(at.invalid(format!(
            "environment variable {var} holds a line break or another control character, which no HTTP header can carry (a file of variables with Windows line endings?)"
        ))),
        Some(value) if !value.is_empty() => Ok(Secret::new(value)),
        Some(_) => Err(at.invalid(format!("environment variable {var} is empty"))),
        None => Err(at.invalid(format!("environment variable {var} is not set"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_are_redacted() {
        let secret = Secret::new("sk-very-secret".into());
        assert_eq!(format!("{secret:?}"), "[redacted]");
        assert_eq!(format!("{secret}"), "[redacted]");
        assert_eq!(format!("{:?}", Some(secret.clone())), "Some([redacted])");
        assert_eq!(secret.expose(), "sk-very-secret");
    }

    #[test]
    fn a_value_that_is_no_variable_name_is_not_repeated_and_a_control_character_is_refused() {
        let at = KeyPath::root()
            .child("providers")
            .child("openai")
            .child("api_key_env");
        let env = |var: &str| match var {
            "CRLF" => Some("sk-abc\r".to_owned()),
            "GOOD" => Some("sk-abc".to_owned()),
            _ => None,
        };
        let pasted = from_env("sk-proj-abc123", &at, &env).unwrap_err().message;
        assert!(!pasted.contains("sk-proj"), "{pasted}");
        assert!(pasted.contains("is it the key itself"), "{pasted}");
        let crlf = from_env("CRLF", &at, &env).unwrap_err().message;
        assert!(crlf.contains("line break"), "{crlf}");
        assert!(!crlf.contains("sk-abc"), "{crlf}");
        assert_eq!(from_env("GOOD", &at, &env).unwrap().expose(), "sk-abc");
        // A name containers allow is read like any other.
        let dotted = |var: &str| (var == "openai.key").then(|| "sk-abc".to_owned());
        assert_eq!(
            from_env("openai.key", &at, &dotted).unwrap().expose(),
            "sk-abc"
        );
    }

    #[test]
    fn matches_only_the_same_value() {
        let secret = Secret::new("abc".into());
        assert!(secret.matches("abc"));
        assert!(!secret.matches("abd"));
        assert!(!secret.matches("ab"));
        assert!(!secret.matches("abcd"));
    }

    #[test]
    fn from_env_reads_the_lookup_not_the_process_env() {
        let at = KeyPath::root().child("api_key_env");
        let env = |name: &str| (name == "K").then(|| "v".to_owned());
        assert_eq!(
            from_env("K", &at, &env).map(|s| s.expose().to_owned()),
            Ok("v".into())
        );
        let err = from_env("PATH", &at, &env).err().map(|e| e.message);
        assert_eq!(err.as_deref(), Some("environment variable PATH is not set"));
        let empty = |_: &str| Some(String::new());
        let err = from_env("K", &at, &empty).err().map(|e| e.message);
        assert_eq!(err.as_deref(), Some("environment variable K is empty"));
    }
}

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
/// at that key.
pub(crate) fn from_env(
    var: &str,
    at: &KeyPath,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Secret, Invalid> {
    if var.is_empty() {
        return Err(at.invalid("must name an environment variable"));
    }
    match env(var) {
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

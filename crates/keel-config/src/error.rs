//! Errors that name file, line and key, and the key paths they are built from.
//!
//! Validation works on [`KeyPath`]s only and knows nothing of files: a broken rule is an
//! [`Invalid`]. [`crate::parse`] then places each one in the file (the line comes from a
//! span-preserving parse of the same text) and turns it into a [`ConfigError`].

use std::fmt;

// === KeyPath ===

/// One step of a [`KeyPath`]: a table key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// A key in a table or inline table.
    Key(String),
    /// A position in an array (0-based).
    Index(usize),
}

/// The path to a key in keel.toml, rendered like `routes.smart.targets[1].provider`.
///
/// Keys that are not bare TOML keys are quoted: `providers.local.headers."x y"`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPath {
    segments: Vec<Segment>,
}

impl KeyPath {
    /// The empty path: the document itself.
    pub fn root() -> Self {
        Self::default()
    }

    /// A path built from segments, outermost first.
    pub fn from_segments(segments: Vec<Segment>) -> Self {
        Self { segments }
    }

    /// This path extended by a table key.
    pub fn child(&self, key: &str) -> Self {
        let mut segments = self.segments.clone();
        segments.push(Segment::Key(key.to_owned()));
        Self { segments }
    }

    /// This path extended by an array index.
    pub fn index(&self, index: usize) -> Self {
        let mut segments = self.segments.clone();
        segments.push(Segment::Index(index));
        Self { segments }
    }

    /// The segments, outermost first.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// A broken rule at this key.
    pub fn invalid(&self, message: impl fmt::Display) -> Invalid {
        Invalid {
            path: self.clone(),
            message: message.to_string(),
        }
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.segments.iter().enumerate() {
            match segment {
                Segment::Key(key) => {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    write_key(f, key)?;
                }
                Segment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

/// Writes a key bare when TOML allows it, quoted otherwise.
fn write_key(f: &mut fmt::Formatter<'_>, key: &str) -> fmt::Result {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        return f.write_str(key);
    }
    f.write_str("\"")?;
    for c in key.chars() {
        match c {
            '"' => f.write_str("\\\"")?,
            '\\' => f.write_str("\\\\")?,
            c if c.is_control() => write!(f, "\\u{:04X}", u32::from(c))?,
            c => write!(f, "{c}")?,
        }
    }
    f.write_str("\"")
}

// === Invalid ===

/// A rule broken at a key, before it is placed in a file (see [`ConfigError`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// Where the rule is broken.
    pub path: KeyPath,
    /// What is wrong, lowercase, no trailing period.
    pub message: String,
}

/// Collects every [`Invalid`] found while validating one table, so that a user sees all
/// problems of a file at once instead of fixing them one run at a time.
#[derive(Debug, Default)]
pub(crate) struct Problems(Vec<Invalid>);

impl Problems {
    /// Records one problem.
    pub(crate) fn push(&mut self, invalid: Invalid) {
        self.0.push(invalid);
    }

    /// Keeps the value of a nested validation, or records its problems.
    pub(crate) fn take<T>(&mut self, result: Result<T, Vec<Invalid>>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(mut problems) => {
                self.0.append(&mut problems);
                None
            }
        }
    }

    /// Keeps the value of a single check, or records its problem.
    pub(crate) fn one<T>(&mut self, result: Result<T, Invalid>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(invalid) => {
                self.0.push(invalid);
                None
            }
        }
    }

    /// The settings when nothing was wrong, every problem otherwise.
    ///
    /// `build` returns `None` only when a piece is missing, and a piece is only ever missing
    /// after its problem was recorded; the fallback message below covers a bug in that chain.
    pub(crate) fn finish<T>(
        mut self,
        at: &KeyPath,
        build: impl FnOnce() -> Option<T>,
    ) -> Result<T, Vec<Invalid>> {
        if self.0.is_empty() {
            if let Some(value) = build() {
                return Ok(value);
            }
            self.0.push(at.invalid("invalid value"));
        }
        Err(self.0)
    }
}

// === ConfigError ===

/// One problem in a config file, rendered `{file}:{line}: {key}: {message}`.
///
/// When the line is unknown it renders `{file}: {key}: {message}`; when the problem is not
/// at a key (a TOML syntax error, an unreadable file) the key part is left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file as the user named it (`keel.toml`, `/etc/keel/keel.toml`).
    pub file: String,
    /// 1-based line of the key, or of its nearest parent when the key is absent.
    pub line: Option<usize>,
    /// The key path, like `routes.smart.retry.base`; empty when not at a key.
    pub key: String,
    /// What is wrong, lowercase, no trailing period.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in a config file, in file order; `Display` prints one per line.
///
/// Never empty when returned by [`crate::load`] or [`crate::parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// The errors, in file order.
    pub fn iter(&self) -> std::slice::Iter<'_, ConfigError> {
        self.0.iter()
    }

    /// How many errors there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are none (never the case for errors returned by this crate).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(error: ConfigError) -> Self {
        Self(vec![error])
    }
}

impl IntoIterator for ConfigErrors {
    type Item = ConfigError;
    type IntoIter = std::vec::IntoIter<ConfigError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a ConfigErrors {
    type Item = &'a ConfigError;
    type IntoIter = std::slice::Iter<'a, ConfigError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_path_renders_indexes_and_quotes_non_bare_keys() {
        let path = KeyPath::root()
            .child("routes")
            .child("smart")
            .child("targets")
            .index(1)
            .child("provider");
        assert_eq!(path.to_string(), "routes.smart.targets[1].provider");
        let quoted = KeyPath::root().child("headers").child("x y").child("a\"b");
        assert_eq!(quoted.to_string(), r#"headers."x y"."a\"b""#);
    }

    #[test]
    fn config_error_leaves_out_unknown_line_and_empty_key() {
        let mut error = ConfigError {
            file: "keel.toml".into(),
            line: Some(3),
            key: "server.listen".into(),
            message: "bad".into(),
        };
        assert_eq!(error.to_string(), "keel.toml:3: server.listen: bad");
        error.line = None;
        assert_eq!(error.to_string(), "keel.toml: server.listen: bad");
        error.key.clear();
        assert_eq!(error.to_string(), "keel.toml: bad");
    }

    #[test]
    fn config_errors_print_one_per_line() {
        let one = |line| ConfigError {
            file: "k.toml".into(),
            line: Some(line),
            key: "a".into(),
            message: "m".into(),
        };
        let errors = ConfigErrors(vec![one(1), one(2)]);
        assert_eq!(errors.to_string(), "k.toml:1: a: m\nk.toml:2: a: m");
    }
}

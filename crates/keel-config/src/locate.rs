//! Finds where a key path is written in the config text, and which key a byte offset is in.
//!
//! Uses a span-preserving parse (`toml_edit::Document`) of the same text that serde read.
//! This module owns line numbers only; it does not judge values.

use std::ops::Range;

use toml_edit::{Array, ArrayOfTables, Document, Item, Table, TableLike, Value};

use crate::error::{ConfigError, Invalid, KeyPath, Segment};

/// The config text plus its span-preserving parse (absent when the text is not valid TOML).
pub(crate) struct Locator<'a> {
    text: &'a str,
    doc: Option<Document<&'a str>>,
}

impl<'a> Locator<'a> {
    /// Parses `text` for spans; invalid TOML leaves only offset → line conversion working.
    pub(crate) fn new(text: &'a str) -> Self {
        Self {
            text,
            doc: Document::parse(text).ok(),
        }
    }

    /// The 1-based line that holds byte `offset`.
    pub(crate) fn line_at(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        let before = self.text.as_bytes().get(..end).unwrap_or_default();
        before.iter().filter(|b| **b == b'\n').count() + 1
    }

    /// The line of `path`'s key, or of the nearest parent that is written in the file
    /// (a key left at its default is not in the text). `None` when nothing of it is written.
    pub(crate) fn line_of(&self, path: &KeyPath) -> Option<usize> {
        let doc = self.doc.as_ref()?;
        let mut node = Node::Item(doc.as_item());
        let mut best: Option<Range<usize>> = None;
        for segment in path.segments() {
            let Some((span, child)) = node.child(segment) else {
                break;
            };
            best = span.or(best);
            node = child;
        }
        best.map(|span| self.line_at(span.start))
    }

    /// The deepest key path whose key or value covers byte `offset` (root when none does).
    pub(crate) fn path_at(&self, offset: usize) -> KeyPath {
        let Some(doc) = self.doc.as_ref() else {
            return KeyPath::root();
        };
        let mut search = Search {
            offset,
            path: Vec::new(),
            best: Vec::new(),
        };
        search.visit(Node::Item(doc.as_item()));
        KeyPath::from_segments(search.best)
    }

    /// Turns a validation problem into an error naming file, line and key.
    pub(crate) fn place(&self, file: &str, invalid: Invalid) -> ConfigError {
        ConfigError {
            file: file.to_owned(),
            line: self.line_of(&invalid.path),
            key: invalid.path.to_string(),
            message: invalid.message,
        }
    }

    /// Turns a TOML syntax or serde error into an error naming file, line and, when the
    /// offset is inside a key or value, the key.
    pub(crate) fn place_toml_error(&self, file: &str, error: &toml::de::Error) -> ConfigError {
        let span = error.span();
        let message = error.message().trim_end();
        // Syntax is judged by toml itself, the parser serde read with, in case the two
        // parsers ever disagree on an edge of the TOML spec.
        let syntax = self.text.parse::<toml::Table>().is_err();
        let (key, message) = match &span {
            _ if syntax => (String::new(), self.syntax_message(message, span.clone())),
            Some(span) => {
                let path = self.path_at(span.start);
                let message = hint(&path, &plain(message));
                (path.to_string(), message)
            }
            None => (String::new(), plain(message)),
        };
        ConfigError {
            file: file.to_owned(),
            line: span.map(|span| self.line_at(span.start)),
            key,
            message,
        }
    }
}

impl Locator<'_> {
    /// A TOML syntax error in words; a duplicate key is named, since the TOML parser's
    /// message ("duplicate key") does not say which.
    fn syntax_message(&self, message: &str, span: Option<Range<usize>>) -> String {
        let key = span
            .and_then(|span| self.text.get(span))
            .map(str::trim)
            .filter(|key| !key.is_empty() && !key.contains('\n'));
        match key {
            Some(key) if message == "duplicate key" => format!(
                "invalid TOML: duplicate key {key}: it is set twice in the same table; keep one"
            ),
            _ => format!("invalid TOML: {message}"),
        }
    }
}

/// serde's message with Rust's names (`expected struct RouteConfig`, `expected u64`) in the
/// words of the file: `expected a table`, `expected a whole number, 0 or more`.
fn plain(message: &str) -> String {
    const NUMBERS: [(&str, &str); 9] = [
        ("usize", "a whole number, 0 or more"),
        ("u64", "a whole number, 0 or more"),
        ("u32", "a whole number from 0 to 4294967295"),
        ("u16", "a whole number from 0 to 65535"),
        ("u8", "a whole number from 0 to 255"),
        ("i64", "a whole number"),
        ("i32", "a whole number"),
        ("f64", "a number"),
        ("f32", "a number"),
    ];
    if let Some((before, after)) = message.rsplit_once("expected ")
        && let Some((_, words)) = NUMBERS.iter().find(|(rust, _)| *rust == after)
    {
        return format!("{before}expected {words}");
    }
    match message.split_once("expected struct ") {
        Some((before, after)) if after.ends_with("Config") || after.ends_with("Table") => {
            format!("{before}expected a table")
        }
        _ => message.to_owned(),
    }
}

/// A hint for the mistakes a serde message does not explain: a key written in the file
/// (keel reads secrets from the environment only), and a name with dots used unquoted in a
/// table header (`[routes.gpt-4.1]` is the table `1` inside `gpt-4`).
fn hint(path: &KeyPath, message: &str) -> String {
    let keys: Vec<&str> = path
        .segments()
        .iter()
        .filter_map(|s| match s {
            Segment::Key(k) => Some(k.as_str()),
            Segment::Index(_) => None,
        })
        .collect();
    if message.starts_with("unknown field `api_key`") {
        return format!(
            "{message}; keel takes no key in the file: put it in an environment variable and name the variable with api_key_env"
        );
    }
    let named = ["providers", "routes", "agents", "tools"];
    if let [section, name, field, ..] = keys.as_slice()
        && named.contains(section)
        && message.starts_with(&format!("unknown field `{field}`"))
        && field.chars().next().is_some_and(|c| c.is_ascii_digit())
    {
        return format!(
            "{message}; if \"{name}.{field}\" is one name, quote it: [{section}.\"{name}.{field}\"]"
        );
    }
    message.to_owned()
}

// === Node ===

/// Anything a key path can step through: items, plain values, and the tables of `[[x]]`.
#[derive(Clone, Copy)]
enum Node<'a> {
    Item(&'a Item),
    Value(&'a Value),
    Table(&'a Table),
}

impl<'a> Node<'a> {
    fn span(self) -> Option<Range<usize>> {
        match self {
            Self::Item(item) => item.span(),
            Self::Value(value) => value.span(),
            Self::Table(table) => table.span(),
        }
    }

    fn table(self) -> Option<&'a dyn TableLike> {
        match self {
            Self::Item(item) => item.as_table_like(),
            Self::Value(value) => value.as_inline_table().map(|table| table as &dyn TableLike),
            Self::Table(table) => Some(table as &dyn TableLike),
        }
    }

    fn array(self) -> Option<&'a Array> {
        match self {
            Self::Item(item) => item.as_array(),
            Self::Value(value) => value.as_array(),
            Self::Table(_) => None,
        }
    }

    fn tables(self) -> Option<&'a ArrayOfTables> {
        match self {
            Self::Item(item) => item.as_array_of_tables(),
            Self::Value(_) | Self::Table(_) => None,
        }
    }

    /// The child at `segment` and the span that best marks it (its key, else its value).
    fn child(self, segment: &Segment) -> Option<(Option<Range<usize>>, Node<'a>)> {
        match segment {
            Segment::Key(key) => {
                let (key, item) = self.table()?.get_key_value(key)?;
                let child = Node::Item(item);
                Some((key.span().or_else(|| child.span()), child))
            }
            Segment::Index(index) => {
                let child = if let Some(array) = self.array() {
                    Node::Value(array.get(*index)?)
                } else {
                    Node::Table(self.tables()?.get(*index)?)
                };
                Some((child.span(), child))
            }
        }
    }

    /// Every child with its segment, key span and value node.
    fn children(self) -> Vec<(Segment, Option<Range<usize>>, Node<'a>)> {
        if let Some(table) = self.table() {
            return table
                .iter()
                .filter_map(|(name, _)| {
                    let (key, item) = table.get_key_value(name)?;
                    Some((Segment::Key(name.to_owned()), key.span(), Node::Item(item)))
                })
                .collect();
        }
        if let Some(array) = self.array() {
            return array
                .iter()
                .enumerate()
                .map(|(i, value)| (Segment::Index(i), None, Node::Value(value)))
                .collect();
        }
        if let Some(tables) = self.tables() {
            return tables
                .iter()
                .enumerate()
                .map(|(i, table)| (Segment::Index(i), None, Node::Table(table)))
                .collect();
        }
        Vec::new()
    }
}

/// Depth-first search for the deepest path covering an offset.
struct Search {
    offset: usize,
    path: Vec<Segment>,
    best: Vec<Segment>,
}

impl Search {
    fn visit(&mut self, node: Node<'_>) {
        for (segment, key_span, child) in node.children() {
            self.path.push(segment);
            let hit = [key_span, child.span()]
                .into_iter()
                .flatten()
                .any(|span| covers(&span, self.offset));
            if hit && self.path.len() > self.best.len() {
                self.best = self.path.clone();
            }
            // Descend even without a hit: a `[table]` header's span does not cover its body.
            self.visit(child);
            self.path.pop();
        }
    }
}

fn covers(span: &Range<usize>, offset: usize) -> bool {
    span.contains(&offset) || (span.is_empty() && span.start == offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"[server]
listen = "x"

[routes.smart]
targets = [
  { provider = "a", model = "b" },
  { provider = "c", model = "d" },
]
retry = { base = "2s", cap = "1s" }
"#;

    fn path(text: &str) -> KeyPath {
        let mut path = KeyPath::root();
        for part in text.split('.') {
            path = match part.parse::<usize>() {
                Ok(i) => path.index(i),
                Err(_) => path.child(part),
            };
        }
        path
    }

    #[test]
    fn finds_lines_of_keys_in_tables_inline_tables_and_arrays() {
        let locator = Locator::new(TEXT);
        assert_eq!(locator.line_of(&path("server.listen")), Some(2));
        assert_eq!(locator.line_of(&path("routes.smart")), Some(4));
        assert_eq!(
            locator.line_of(&path("routes.smart.targets.1.provider")),
            Some(7)
        );
        assert_eq!(locator.line_of(&path("routes.smart.retry.cap")), Some(9));
    }

    #[test]
    fn absent_key_falls_back_to_nearest_written_parent() {
        let locator = Locator::new(TEXT);
        assert_eq!(locator.line_of(&path("routes.smart.retry.jitter")), Some(9));
        assert_eq!(
            locator.line_of(&path("routes.smart.timeouts.total")),
            Some(4)
        );
        assert_eq!(locator.line_of(&path("store.url")), None);
    }

    #[test]
    fn finds_deepest_path_at_offset() {
        let locator = Locator::new(TEXT);
        let offset = TEXT.find("\"c\"").unwrap_or_default();
        assert_eq!(
            locator.path_at(offset).to_string(),
            "routes.smart.targets[1].provider"
        );
        let offset = TEXT.find("cap").unwrap_or_default();
        assert_eq!(
            locator.path_at(offset).to_string(),
            "routes.smart.retry.cap"
        );
    }
}

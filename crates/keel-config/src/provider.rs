//! `[providers.NAME]`: upstream model APIs that route targets point at.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::error::{Invalid, KeyPath, Problems};
use crate::secret::{self, Secret};

/// The wire protocol a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ProviderKind {
    /// Any OpenAI-compatible API (OpenAI, Azure OpenAI, vLLM, Ollama, llama.cpp, ...).
    #[serde(rename = "openai")]
    OpenAi,
    /// Anthropic's Messages API.
    #[serde(rename = "anthropic")]
    Anthropic,
}

/// `[providers.NAME]` as written in keel.toml. Nothing here is trusted yet.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// `"openai"` or `"anthropic"`.
    pub kind: ProviderKind,
    /// Base URL, like `https://api.openai.com/v1`.
    pub base_url: String,
    /// Environment variable holding the API key; none for keyless local servers.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// The header the key goes in, as it is (`"api-key"` for Azure OpenAI); unset:
    /// `Authorization: Bearer KEY`. Only for `kind = "openai"`.
    #[serde(default)]
    pub api_key_header: Option<String>,
    /// Extra headers sent with every request.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Extra query parameters sent with every request (Azure's `api-version`).
    #[serde(default)]
    pub query: BTreeMap<String, String>,
    /// `prices = { "gpt-5" = { input = 1.25, output = 10.0 } }`: US dollars per million
    /// tokens, per model; what `budget.usd_per_day` counts.
    #[serde(default)]
    pub prices: BTreeMap<String, Price>,
}

/// The price of a model, in US dollars per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// Per million prompt tokens.
    pub input: f64,
    /// Per million completion tokens.
    pub output: f64,
}

/// A validated provider.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderSettings {
    /// The table name, `NAME` in `[providers.NAME]`.
    pub name: String,
    /// The wire protocol.
    pub kind: ProviderKind,
    /// `http(s)://` base URL without trailing `/`.
    pub base_url: String,
    /// The API key, read from the environment.
    pub api_key: Option<Secret>,
    /// The header the key is sent in as it is, lowercase (`api-key` for Azure OpenAI);
    /// `None`: `Authorization: Bearer KEY`. Set only with a key, for `kind = "openai"`.
    pub api_key_header: Option<String>,
    /// Extra headers, sorted by name; names are valid HTTP tokens, values have no control
    /// characters.
    pub headers: Vec<(String, String)>,
    /// Extra query parameters, sorted by name; names are non-empty.
    pub query: Vec<(String, String)>,
    /// Prices per model, for `usd_per_day` budgets.
    pub prices: BTreeMap<String, Price>,
}

impl ProviderConfig {
    /// Checks every rule and reads the API key from `env`.
    pub fn validate(
        self,
        name: &str,
        at: &KeyPath,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<ProviderSettings, Vec<Invalid>> {
        let mut problems = Problems::default();
        let base_url = problems.one(
            check_http_url(
                &self.base_url,
                &at.child("base_url"),
                "https://api.openai.com/v1",
            ).and_then(|url| {
                // keel appends `/chat/completions` and the like to the base URL; a query
                // string in it would end up in the middle of the path.
                let endpoint = ["/chat/completions", "/embeddings", "/messages"]
                    .into_iter()
                    .find(|e| url.trim_end_matches('/').ends_with(e));
                if url.contains('?') || url.contains('#') {
                    Err(at.child("base_url").invalid(format!(
                        "{url:?} has a query string; give query parameters as `query = {{ name = \"value\" }}`"
                    )))
                } else if let Some(endpoint) = endpoint {
                    Err(at.child("base_url").invalid(format!(
                        "{url:?} names an endpoint; give the API's root, which keel appends {endpoint} and the others to (for example \"https://api.openai.com/v1\")"
                    )))
                } else {
                    Ok(url)
                }
            }),
        );
        let api_key = match &self.api_key_env {
            Some(var) => problems
                .one(secret::from_env(var, &at.child("api_key_env"), env))
                .map(Some),
            None => Some(None),
        };
        let api_key_header = self.api_key_header.as_deref().and_then(|header| {
            let key = at.child("api_key_header");
            let problem = if !is_token(header) {
                format!("{header:?} is not a valid header name")
            } else if HTTP_OWN.iter().any(|own| own.eq_ignore_ascii_case(header)) {
                format!(
                    "{header:?} belongs to HTTP itself, not to a key; name the header the \
                     provider reads its key from, such as \"api-key\""
                )
            } else if self.kind == ProviderKind::Anthropic {
                "kind = \"anthropic\" always sends the key as x-api-key; api_key_header is for \
                 kind = \"openai\""
                    .to_owned()
            } else if self.api_key_env.is_none() {
                format!(
                    "{header:?} would carry the key, but there is none: name the variable that \
                     holds it with api_key_env"
                )
            } else if let Some(same) = self
                .headers
                .keys()
                .find(|name| name.eq_ignore_ascii_case(header))
            {
                format!("headers.{same:?} would replace the key sent in {header:?}; leave one out")
            } else {
                return Some(header.to_ascii_lowercase());
            };
            problems.push(key.invalid(problem));
            None
        });
        for (header, value) in &self.headers {
            let key = at.child("headers").child(header);
            if !is_token(header) {
                problems.push(key.invalid(format!("{header:?} is not a valid header name")));
            } else if value.chars().any(|c| c.is_control() && c != '\t') {
                problems.push(key.invalid("header value must not contain control characters"));
            }
        }
        for (model, price) in &self.prices {
            for (key, value) in [("input", price.input), ("output", price.output)] {
                if !(value.is_finite() && value >= 0.0) {
                    problems.push(at.child("prices").child(model).child(key).invalid(format!(
                        "{value} is not a price in US dollars per million tokens"
                    )));
                }
            }
        }
        if self.query.contains_key("") {
            problems.push(
                at.child("query")
                    .child("")
                    .invalid("query parameter name is empty"),
            );
        }
        problems.finish(at, || {
            Some(ProviderSettings {
                name: name.to_owned(),
                kind: self.kind,
                base_url: base_url?,
                api_key: api_key?,
                api_key_header,
                headers: self.headers.into_iter().collect(),
                query: self.query.into_iter().collect(),
                prices: self.prices,
            })
        })
    }
}

/// Checks an `http(s)://host...` URL (a host, a port in range, nothing a client would
/// refuse later) and returns it without trailing slashes.
/// `url` as an http(s) URL with a host, without trailing slashes; the error names `like`, a
/// URL of the kind the key takes.
pub(crate) fn check_http_url(url: &str, at: &KeyPath, like: &str) -> Result<String, Invalid> {
    let like = format!("write it like {like:?}");
    if !(url.starts_with("https://") || url.starts_with("http://")) {
        return Err(at.invalid(format!("{url:?} is not an http(s) URL; {like}")));
    }
    match url::Url::parse(url) {
        Ok(parsed) if parsed.host().is_some() => Ok(url.trim_end_matches('/').to_owned()),
        Ok(_) => Err(at.invalid(format!("{url:?} has no host; {like}"))),
        Err(e) => Err(at.invalid(format!("{url:?} is not a valid URL ({e}); {like}"))),
    }
}

/// Headers HTTP and keel's client set themselves, which cannot carry a key.
const HTTP_OWN: [&str; 8] = [
    "content-type",
    "content-length",
    "host",
    "transfer-encoding",
    "connection",
    "te",
    "upgrade",
    "keep-alive",
];

/// RFC 9110 token: the characters allowed in a header name.
fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_url_loses_trailing_slashes() {
        let at = KeyPath::root();
        assert_eq!(
            check_http_url(
                "http://127.0.0.1:8000/v1//",
                &at,
                "https://api.openai.com/v1"
            ),
            Ok("http://127.0.0.1:8000/v1".into())
        );
        assert!(check_http_url("api.openai.com/v1", &at, "https://api.openai.com/v1").is_err());
        assert!(check_http_url("https://", &at, "https://api.openai.com/v1").is_err());
        // Not URLs a client could use: a space in the host, no host, a port out of range.
        for bad in [
            "http://exa mple.com/v1",
            "http://:80/v1",
            "http://127.0.0.1:99999/v1",
        ] {
            let err = check_http_url(bad, &at, "https://api.openai.com/v1").unwrap_err();
            assert!(
                err.message.contains("not a valid URL"),
                "{bad}: {}",
                err.message
            );
        }
        assert!(
            check_http_url(
                "http://localhost:11434/v1",
                &at,
                "https://api.openai.com/v1"
            )
            .is_ok()
        );
    }

    #[test]
    fn header_names_are_tokens() {
        assert!(is_token("x-foo"));
        assert!(is_token("api-key"));
        assert!(!is_token("x foo"));
        assert!(!is_token(""));
    }
}

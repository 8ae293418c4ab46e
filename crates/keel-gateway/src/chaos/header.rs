//! The `x-keel-chaos` request header: one fault for one request.
//!
//! Honoured only when `[chaos] enabled = true`; otherwise the gateway never reads it.
//! The value is one fault and optional options, separated by `;`:
//!
//! | part | meaning |
//! | --- | --- |
//! | `status=CODE` | the upstream answers `CODE` (400..=599) |
//! | `latency=DURATION` or `latency=MIN..MAX` | added delay before the real call |
//! | `hang` | no answer until the attempt's deadline |
//! | `drop` | connection dropped before the first byte |
//! | `stream_cut=N` | the answer is cut after N chunks |
//! | `malformed` | a 200 whose body is not valid JSON |
//! | `retry_after=DURATION` | with `status`: a `Retry-After` header |
//! | `attempts=N` | only the first N attempts of the call (default: every attempt) |
//!
//! ```
//! use keel_gateway::chaos::HeaderFault;
//! let fault = HeaderFault::parse("status=429; retry_after=1s; attempts=2").unwrap();
//! assert!(fault.covers(2) && !fault.covers(3));
//! ```

use std::num::NonZeroU32;
use std::time::Duration;

use keel_config::{Fault, Latency};

/// The header's name.
pub const HEADER: &str = "x-keel-chaos";

/// What every error message ends with: the syntax.
const SYNTAX: &str = "write one fault (status=CODE, latency=DURATION or latency=MIN..MAX, hang, \
                      drop, stream_cut=N, malformed), optionally with ;retry_after=DURATION \
                      (for status) and ;attempts=N";

/// A parsed `x-keel-chaos` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderFault {
    /// The fault; a latency range is resolved per attempt.
    pub fault: Fault,
    /// Only the first N attempts of the call; `None`: every attempt.
    pub attempts: Option<NonZeroU32>,
}

impl HeaderFault {
    /// Parses a header value; the error says what is wrong and how to write it.
    pub fn parse(value: &str) -> Result<Self, String> {
        let mut fault: Option<(&str, Fault)> = None;
        let mut retry_after: Option<Duration> = None;
        let mut attempts: Option<NonZeroU32> = None;
        for part in value.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, arg) = match part.split_once('=') {
                Some((name, arg)) => (name.trim(), Some(arg.trim())),
                None => (part, None),
            };
            match name {
                "retry_after" => retry_after = Some(duration(name, need(name, arg)?)?),
                "attempts" => {
                    let text = need(name, arg)?;
                    attempts =
                        Some(text.parse::<NonZeroU32>().map_err(|_| {
                            format!("attempts={text} is not a count of at least 1")
                        })?);
                }
                _ => {
                    let parsed = parse_fault(name, arg)?;
                    if let Some((first, _)) = fault {
                        return Err(format!("give one fault, not both {first} and {name}"));
                    }
                    fault = Some((name, parsed));
                }
            }
        }
        let Some((_, mut fault)) = fault else {
            return Err(format!("no fault given; {SYNTAX}"));
        };
        if let Some(after) = retry_after {
            match &mut fault {
                Fault::Status { retry_after, .. } => *retry_after = Some(after),
                Fault::Latency(_)
                | Fault::Hang
                | Fault::Drop
                | Fault::StreamCut { .. }
                | Fault::Malformed => {
                    return Err("retry_after only applies to status=CODE".to_owned());
                }
            }
        }
        Ok(Self { fault, attempts })
    }

    /// Whether the fault applies to the call's `attempt`-th attempt (1-based).
    pub fn covers(&self, attempt: u32) -> bool {
        self.attempts.is_none_or(|n| attempt <= n.get())
    }
}

fn parse_fault(name: &str, arg: Option<&str>) -> Result<Fault, String> {
    let no_value = |fault: Fault| match arg {
        None => Ok(fault),
        Some(_) => Err(format!("{name} takes no value")),
    };
    match name {
        "status" => {
            let text = need(name, arg)?;
            match text.parse::<u16>() {
                Ok(status) if (400..=599).contains(&status) => Ok(Fault::Status {
                    status,
                    retry_after: None,
                }),
                _ => Err(format!(
                    "status={text} is not an HTTP error status; use 400..=599"
                )),
            }
        }
        "latency" => {
            let text = need(name, arg)?;
            let latency = match text.split_once("..") {
                Some((min, max)) => {
                    let (min, max) = (duration(name, min)?, duration(name, max)?);
                    if min > max {
                        return Err(format!("latency={text}: the minimum is above the maximum"));
                    }
                    Latency::Uniform { min, max }
                }
                None => Latency::Fixed(duration(name, text)?),
            };
            Ok(Fault::Latency(latency))
        }
        "stream_cut" => {
            let text = need(name, arg)?;
            let after_chunks = text
                .parse::<u32>()
                .map_err(|_| format!("stream_cut={text} is not a number of chunks"))?;
            Ok(Fault::StreamCut { after_chunks })
        }
        "hang" => no_value(Fault::Hang),
        "drop" => no_value(Fault::Drop),
        "malformed" => no_value(Fault::Malformed),
        other => Err(format!("unknown part {other:?}; {SYNTAX}")),
    }
}

fn need<'a>(name: &str, arg: Option<&'a str>) -> Result<&'a str, String> {
    arg.filter(|a| !a.is_empty())
        .ok_or_else(|| format!("{name} needs a value, like {}", example(name)))
}

fn example(name: &str) -> &'static str {
    match name {
        "status" => "status=503",
        "latency" => "latency=300ms",
        "stream_cut" => "stream_cut=2",
        "retry_after" => "retry_after=1s",
        _ => "attempts=1",
    }
}

/// The longest a fault's duration may be: an attempt's own timeouts end it well before.
const LONGEST_FAULT: Duration = Duration::from_secs(3600);

fn duration(name: &str, text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text.trim()).map_err(|e| {
        format!(
            "{name}: {:?} is not a duration ({e}); write it like 300ms or 2s",
            text.trim()
        )
    })?;
    if duration > LONGEST_FAULT {
        return Err(format!(
            "{name}: {:?} is longer than 1h, the longest a fault takes",
            text.trim()
        ));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn every(fault: Fault) -> HeaderFault {
        HeaderFault {
            fault,
            attempts: None,
        }
    }

    #[test]
    fn parses_every_fault_and_option() {
        let status = |status, retry_after| Fault::Status {
            status,
            retry_after,
        };
        let cases = [
            ("status=503", every(status(503, None))),
            (
                "status=429;retry_after=1s",
                every(status(429, Some(Duration::from_secs(1)))),
            ),
            (
                " status = 429 ; retry_after = 1500ms ; ",
                every(status(429, Some(ms(1500)))),
            ),
            (
                "latency=300ms",
                every(Fault::Latency(Latency::Fixed(ms(300)))),
            ),
            (
                "latency=50ms..500ms",
                every(Fault::Latency(Latency::Uniform {
                    min: ms(50),
                    max: ms(500),
                })),
            ),
            ("hang", every(Fault::Hang)),
            ("drop", every(Fault::Drop)),
            ("stream_cut=2", every(Fault::StreamCut { after_chunks: 2 })),
            ("stream_cut=0", every(Fault::StreamCut { after_chunks: 0 })),
            ("malformed", every(Fault::Malformed)),
            (
                "attempts=1;status=503",
                HeaderFault {
                    fault: status(503, None),
                    attempts: NonZeroU32::new(1),
                },
            ),
        ];
        for (text, want) in cases {
            assert_eq!(HeaderFault::parse(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn rejects_bad_values_with_a_reason() {
        let cases = [
            ("", "no fault given; write one fault"),
            ("attempts=2", "no fault given"),
            ("explode", "unknown part \"explode\"; write one fault"),
            ("status", "status needs a value, like status=503"),
            (
                "status=200",
                "status=200 is not an HTTP error status; use 400..=599",
            ),
            ("status=abc", "status=abc is not an HTTP error status"),
            ("latency=soon", "latency: \"soon\" is not a duration"),
            (
                "latency=500000000000years",
                "latency: \"500000000000years\" is longer than 1h",
            ),
            (
                "latency=2s..1s",
                "latency=2s..1s: the minimum is above the maximum",
            ),
            ("stream_cut=-1", "stream_cut=-1 is not a number of chunks"),
            ("hang=1", "hang takes no value"),
            (
                "drop;status=503",
                "give one fault, not both drop and status",
            ),
            (
                "drop;retry_after=1s",
                "retry_after only applies to status=CODE",
            ),
            (
                "status=503;attempts=0",
                "attempts=0 is not a count of at least 1",
            ),
        ];
        for (text, want) in cases {
            let got = HeaderFault::parse(text).unwrap_err();
            assert!(got.starts_with(want), "{text:?}: {got}");
        }
    }

    #[test]
    fn attempts_limit_which_attempts_are_covered() {
        let first = HeaderFault::parse("drop;attempts=1").unwrap();
        assert!(first.covers(1) && !first.covers(2));
        let all = HeaderFault::parse("drop").unwrap();
        assert!(all.covers(1) && all.covers(100));
    }
}

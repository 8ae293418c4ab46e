//! Text from agents, workers and providers as an operator's screen shows it.

/// `text` on one line, as a terminal shows it: a control character (a newline, an escape
/// sequence a worker or an agent put in its error or reason) escaped, never printed, so a
/// line stays one line and no text can pass for what it is not; cut after `max_chars`
/// characters, ending in `...`.
pub fn one_line(text: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max_chars.saturating_add(3)));
    for (n, c) in text.chars().enumerate() {
        if n == max_chars {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn a_line_prints_no_control_character_and_is_cut_where_asked() {
        assert_eq!(
            one_line("wire money\nAPPROVED BY CFO \u{1b}[2K", usize::MAX),
            "wire money\\nAPPROVED BY CFO \\u{1b}[2K"
        );
        assert_eq!(one_line(&"é".repeat(10), 4), "éééé...");
        assert_eq!(one_line("café", 4), "café");
    }
}

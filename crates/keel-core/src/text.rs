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
        if c.is_control() || invisible(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A format character that changes how the text around it shows without showing itself:
/// zero-width characters and the bidirectional overrides and isolates (which can make text
/// read backwards, as in "Trojan Source").
fn invisible(c: char) -> bool {
    matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
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
        // Text that would show other than it reads.
        assert_eq!(
            one_line("approve\u{202E}txt.exe", usize::MAX),
            "approve\\u{202e}txt.exe"
        );
    }
}

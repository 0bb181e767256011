//! Log output: readable text or JSON lines on stderr, with every control character that a
//! value may carry escaped.
//!
//! Job ids are checked, but step names, file names, commands and the runner's stderr come from
//! jobs: a file named `x\nINFO job finished` would otherwise write a fake line into the text
//! log (JSON output escapes by itself). [`EscapedFields`] formats fields as tracing's default
//! does, then escapes line breaks and other control characters in everything it wrote.

use std::fmt;

use std::io::IsTerminal;

use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::{DefaultFields, Writer};
use tracing_subscriber::fmt::FormatFields;

use crate::config::LogFormat;

/// tracing's default field formatting, with control characters escaped.
#[derive(Debug, Default)]
pub struct EscapedFields(DefaultFields);

impl<'writer> FormatFields<'writer> for EscapedFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut escaping = Escaping(&mut writer);
        self.0.format_fields(Writer::new(&mut escaping), fields)
    }
}

/// Writes through, escaping control characters: `\n` as `\n`, others as `\u{..}`.
struct Escaping<'a, W: fmt::Write>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaping<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for piece in s.split_inclusive(char::is_control) {
            let mut chars = piece.chars();
            match chars.next_back() {
                Some(c) if c.is_control() => {
                    self.0.write_str(chars.as_str())?;
                    match c {
                        '\n' => self.0.write_str("\\n")?,
                        '\r' => self.0.write_str("\\r")?,
                        '\t' => self.0.write_str("\\t")?,
                        c => write!(self.0, "\\u{{{:x}}}", u32::from(c))?,
                    }
                }
                _ => self.0.write_str(piece)?,
            }
        }
        Ok(())
    }
}

/// Sets up logging to stderr in `format`; `RUST_LOG` filters (info by default, the NATS client
/// at warn).
pub fn init(format: LogFormat) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|s| s.parse::<Targets>().ok())
        .unwrap_or_else(|| {
            Targets::new()
                .with_default(LevelFilter::INFO)
                .with_target("async_nats", LevelFilter::WARN)
        });
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false);
    // Under systemd, stderr goes to the journal, which stamps every line itself.
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    match format {
        LogFormat::Text if journal => tracing_subscriber::registry()
            .with(
                layer
                    .fmt_fields(EscapedFields::default())
                    .without_time()
                    .with_ansi(false),
            )
            .with(filter)
            .init(),
        LogFormat::Text => tracing_subscriber::registry()
            .with(
                layer
                    .fmt_fields(EscapedFields::default())
                    .with_ansi(std::io::stderr().is_terminal()),
            )
            .with(filter)
            .init(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(
                layer
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .with(filter)
            .init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fmt::Write as _;

    #[test]
    fn control_characters_are_escaped() {
        let mut out = String::new();
        write!(Escaping(&mut out), "a\nb\rc\u{1b}[31md\u{7}é").unwrap();
        assert_eq!(out, "a\\nb\\rc\\u{1b}[31md\\u{7}é");
    }
}

//! Tables for people, JSON for scripts.

use std::io::Write;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::Value;

use crate::CliError;

/// What a command prints: rows under headers for people, and the same as JSON.
pub(crate) struct Report {
    pub(crate) headers: Vec<&'static str>,
    pub(crate) rows: Vec<Vec<String>>,
    /// Printed after the table (people only).
    pub(crate) note: Option<String>,
    pub(crate) json: Value,
}

impl Report {
    pub(crate) fn message(text: impl Into<String>, json: Value) -> Self {
        Self {
            headers: Vec::new(),
            rows: Vec::new(),
            note: Some(text.into()),
            json,
        }
    }

    pub(crate) fn print(&self, out: &mut dyn Write, json: bool) -> Result<(), CliError> {
        let written = if json {
            serde_json::to_writer_pretty(&mut *out, &self.json)
                .map_err(std::io::Error::other)
                .and_then(|()| writeln!(out))
        } else {
            let mut text = String::new();
            if !self.headers.is_empty() {
                text.push_str(&table(&self.headers, &self.rows));
            }
            if let Some(note) = &self.note {
                text.push_str(note);
                text.push('\n');
            }
            out.write_all(text.as_bytes())
        };
        written
            .and_then(|()| out.flush())
            .map_err(|e| CliError::new(format!("cannot write the output: {e}")))
    }
}

/// Columns padded to their widest cell, a rule under the headers; "(none)" for no rows.
pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            s.push_str(cell);
            if i + 1 < cells.len() {
                let pad = widths[i].saturating_sub(cell.chars().count());
                s.push_str(&" ".repeat(pad));
            }
        }
        s.push('\n');
        s
    };
    let mut text = line(headers.to_vec());
    text.push_str(&line(
        widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str)
            .collect(),
    ));
    if rows.is_empty() {
        text.push_str("(none)\n");
    }
    for row in rows {
        text.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    text
}

pub(crate) fn time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

pub(crate) fn opt_time(t: Option<&DateTime<Utc>>) -> String {
    t.map_or_else(|| "-".to_owned(), time)
}

pub(crate) fn duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs >= 3600 {
        format!("{}h{:02}m", secs / 3600, secs / 60 % 60)
    } else if secs >= 60 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_say_none() {
        let text = table(
            &["name", "lag"],
            &[
                vec!["balances".into(), "3".into()],
                vec!["x".into(), "120".into()],
            ],
        );
        assert_eq!(
            text,
            "name      lag\n--------  ---\nbalances  3\nx         120\n"
        );
        assert_eq!(table(&["a"], &[]), "a\n-\n(none)\n");
        assert_eq!(duration(Duration::from_secs(3725)), "1h02m");
        assert_eq!(duration(Duration::from_millis(1500)), "1.5s");
    }
}

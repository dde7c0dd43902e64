//! Human output of the debugging commands: tables that fit a terminal of [`WIDTH`] columns,
//! and short forms of sizes, durations, times and identities.
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The width human output is laid out for.
pub const WIDTH: usize = 100;

/// Columns separated by two spaces, each as wide as its widest cell; when the whole is wider
/// than [`WIDTH`], the columns marked flexible give up characters (their cells end in `~`)
/// until it fits.
pub struct Table {
    headers: Vec<&'static str>,
    flexible: Vec<bool>,
    /// Cut at the start (paths, whose end says most), not at the end.
    cut_start: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these headers; a header starting with `~` marks a flexible column, `~<`
    /// one whose cells are cut at the start (neither mark is shown).
    pub fn new(headers: &[&'static str]) -> Table {
        Table {
            headers: headers
                .iter()
                .map(|h| h.trim_start_matches('~').trim_start_matches('<'))
                .collect(),
            flexible: headers.iter().map(|h| h.starts_with('~')).collect(),
            cut_start: headers.iter().map(|h| h.starts_with("~<")).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        let n = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(n) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let total = |w: &[usize]| w.iter().sum::<usize>() + 2 * w.len().saturating_sub(1);
        // Shrink the widest flexible column, one character at a time, down to its header.
        while total(&widths) > WIDTH {
            let widest = (0..n)
                .filter(|i| self.flexible[*i] && widths[*i] > self.headers[*i].len().max(8))
                .max_by_key(|i| widths[*i]);
            match widest {
                Some(i) => widths[i] -= 1,
                None => break,
            }
        }
        let mut out = String::new();
        let headers: Vec<String> = self.headers.iter().map(|h| h.to_string()).collect();
        for row in std::iter::once(&headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, width) in widths.iter().enumerate() {
                let cell = row.get(i).map_or("", String::as_str);
                let cell = if self.cut_start[i] {
                    fit_start(cell, *width)
                } else {
                    fit(cell, *width)
                };
                if i + 1 == n {
                    line.push_str(&cell);
                } else {
                    let _ = write!(line, "{cell:<width$}  ");
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `s` cut to `width` characters, the last one replaced by `~` when cut.
pub fn fit(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        return s.to_string();
    }
    let mut cut: String = s.chars().take(width.saturating_sub(1)).collect();
    cut.push('~');
    cut
}

/// `s` cut to its last `width` characters, the first one replaced by `~` when cut.
pub fn fit_start(s: &str, width: usize) -> String {
    let n = s.chars().count();
    if n <= width {
        return s.to_string();
    }
    let tail: String = s.chars().skip(n + 1 - width.max(1)).collect();
    format!("~{tail}")
}

/// `1.5 KiB`, `12 B`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// `850ms`, `12s`, `3m 4s`, `2h 5m`, `3d 4h`: the two largest units.
pub fn duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let s = d.as_secs();
    let (days, hours, mins, secs) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    if days > 0 {
        format!("{days}d {hours}h")
    } else if hours > 0 {
        format!("{hours}h {mins}m")
    } else if mins > 0 {
        format!("{mins}m {secs}s")
    } else {
        format!("{secs}s")
    }
}

/// `duration` of milliseconds.
pub fn millis(ms: u64) -> String {
    duration(Duration::from_millis(ms))
}

/// Unix milliseconds as `HH:MM:SS.mmm` (UTC).
pub fn clock(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60,
        unix_ms % 1000
    )
}

/// An RFC 3339 time relative to now: `in 11h 59m`, `3m 2s ago`; the text itself when it does
/// not parse.
pub fn relative(rfc3339: &str) -> String {
    let Ok(t) =
        time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
    else {
        return rfc3339.to_string();
    };
    let at = UNIX_EPOCH + Duration::from_secs(u64::try_from(t.unix_timestamp()).unwrap_or(0));
    let now = SystemTime::now();
    match at.duration_since(now) {
        Ok(ahead) => format!("in {}", duration(ahead)),
        Err(e) => format!("{} ago", duration(e.duration())),
    }
}

/// A SPIFFE ID without the scheme and trust domain (`ns/demo/sa/web`); other text as is.
pub fn short_id(id: &str) -> String {
    id.strip_prefix("spiffe://")
        .and_then(|rest| rest.split_once('/'))
        .map_or_else(|| id.to_string(), |(_, path)| path.to_string())
}

/// `-` for nothing.
pub fn or_dash(v: Option<impl ToString>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// Every line of `text` cut to [`WIDTH`] columns.
pub fn fit_lines(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let _ = writeln!(out, "{}", fit(line, WIDTH));
    }
    out
}

/// `text` broken at spaces into lines of at most [`WIDTH`] columns: the first starts with
/// `first`, the others with as many spaces. A word longer than a line (a path) is cut.
pub fn wrap(first: &str, text: &str) -> String {
    let indent = " ".repeat(first.chars().count());
    let room = WIDTH.saturating_sub(indent.len()).max(20);
    let mut lines: Vec<String> = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        let word = fit(word, room);
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > room {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(&word);
    }
    lines.push(line);
    let mut out = String::new();
    for (i, l) in lines.iter().enumerate() {
        out.push_str(if i == 0 { first } else { &indent });
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// `key  value` lines, keys padded to the longest.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in pairs {
        out.push_str(&wrap(&format!("  {k:<width$}  "), v));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wide_table_shrinks_its_flexible_columns_to_fit() {
        let mut t = Table::new(&["POD", "~IDENTITY", "STATE"]);
        t.row(vec!["demo/web".into(), "x".repeat(150), "ok".into()]);
        t.row(vec!["demo/client".into(), "short".into(), "failing".into()]);
        let out = t.render();
        for line in out.lines() {
            assert!(line.chars().count() <= WIDTH, "{line}");
        }
        assert!(out.lines().nth(1).expect("row").contains("x~"), "{out}");
        assert!(
            out.lines().nth(2).expect("row").ends_with("failing"),
            "{out}"
        );
        assert!(out.starts_with("POD          IDENTITY"), "{out}");
    }

    #[test]
    fn sizes_durations_and_identities_read_short() {
        assert_eq!(bytes(12), "12 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(duration(Duration::from_millis(850)), "850ms");
        assert_eq!(duration(Duration::from_secs(184)), "3m 4s");
        assert_eq!(duration(Duration::from_secs(7500)), "2h 5m");
        assert_eq!(
            duration(Duration::from_secs(86_400 * 3 + 3600 * 4)),
            "3d 4h"
        );
        assert_eq!(clock(3_723_004), "01:02:03.004");
        assert_eq!(
            short_id("spiffe://cluster.local/ns/demo/sa/web"),
            "ns/demo/sa/web"
        );
        assert_eq!(short_id("plaintext"), "plaintext");
        assert_eq!(fit("abcdef", 4), "abc~");
        assert_eq!(fit_start("/a/b/pod-x", 6), "~pod-x");
        assert!(relative("2999-01-01T00:00:00Z").starts_with("in "));
        assert!(relative("2000-01-01T00:00:00Z").ends_with(" ago"));
    }

    #[test]
    fn long_text_wraps_under_its_first_line() {
        let text = "word ".repeat(40);
        let out = wrap("  - ", &text);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines.len() > 1, "{out}");
        assert!(lines[0].starts_with("  - word"), "{out}");
        assert!(lines[1].starts_with("    word"), "{out}");
        assert!(lines.iter().all(|l| l.chars().count() <= WIDTH), "{out}");
        assert!(
            wrap("x ", &"p".repeat(200))
                .lines()
                .all(|l| l.len() <= WIDTH)
        );
    }
}

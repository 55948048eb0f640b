//! The JSON-lines protocol a built-in worker speaks on its report pipe (file descriptor
//! 3, named by `TURBOSCHED_REPORT_FD`). One message per line:
//!
//! ```text
//! {"type":"heartbeat"}
//! {"type":"progress","pct":45.0,"phase":"features"}
//! {"type":"checkpoint","data":{"file":"SPX.csv"}}
//! {"type":"result","data":{"rows":5031}}
//! {"type":"error","message":"source_dir data/inbox does not exist","fatal":true}
//! ```
//!
//! Built-in workers speak it on their report pipe. External commands report on stdout
//! instead, one marker line each (see [`parse_stdout_line`]). Both are promises to
//! programs outside this crate: change them only by adding optional fields.

use serde::{Deserialize, Serialize};

/// One line on the report pipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Msg {
    /// Still alive.
    Heartbeat,
    /// Progress in percent, with an optional phase name.
    Progress {
        /// 0 to 100.
        pct: f64,
        /// e.g. "features".
        #[serde(default, skip_serializing_if = "Option::is_none")]
        phase: Option<String>,
    },
    /// State to resume from if this attempt is retried.
    Checkpoint {
        /// Any JSON.
        data: serde_json::Value,
    },
    /// The attempt's result (the last one sent wins).
    Result {
        /// Any JSON.
        data: serde_json::Value,
    },
    /// The attempt failed; `fatal` means retrying cannot help.
    Error {
        /// What went wrong.
        message: String,
        /// No retry.
        #[serde(default)]
        fatal: bool,
    },
}

impl Msg {
    /// Parses one line; `None` for a line that is not a message.
    pub fn parse(line: &str) -> Option<Msg> {
        serde_json::from_str(line.trim()).ok()
    }

    /// The line to write (no newline).
    pub fn to_line(&self) -> String {
        // Serializing these plain enums cannot fail; an empty object is a harmless
        // fallback that the reader ignores.
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_string())
    }
}

/// Parses an external command's report lines on stdout:
/// `::progress::45 phase name`, `::checkpoint::{json}`, `::result::{json}`.
pub fn parse_stdout_line(line: &str) -> Option<Msg> {
    let line = line.trim();
    if let Some(json) = line.strip_prefix("::result::") {
        return serde_json::from_str(json)
            .ok()
            .map(|data| Msg::Result { data });
    }
    if let Some(json) = line.strip_prefix("::checkpoint::") {
        return serde_json::from_str(json)
            .ok()
            .map(|data| Msg::Checkpoint { data });
    }
    let rest = line.strip_prefix("::progress::")?;
    let mut parts = rest.trim().splitn(2, char::is_whitespace);
    let pct: f64 = parts.next()?.trim_end_matches('%').parse().ok()?;
    if !(0.0..=100.0).contains(&pct) {
        return None;
    }
    let phase = parts
        .next()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_string);
    Some(Msg::Progress { pct, phase })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_through_a_line() {
        let messages = [
            Msg::Heartbeat,
            Msg::Progress {
                pct: 45.0,
                phase: Some("features".into()),
            },
            Msg::Checkpoint {
                data: serde_json::json!({"file": "SPX.csv"}),
            },
            Msg::Result {
                data: serde_json::json!({"rows": 5031}),
            },
            Msg::Error {
                message: "boom".into(),
                fatal: true,
            },
        ];
        for msg in messages {
            assert_eq!(Msg::parse(&msg.to_line()), Some(msg));
        }
    }

    #[test]
    fn report_lines_from_external_commands_are_read() {
        assert_eq!(
            parse_stdout_line("::progress::45 loading files"),
            Some(Msg::Progress {
                pct: 45.0,
                phase: Some("loading files".into())
            })
        );
        assert_eq!(
            parse_stdout_line("::progress::100"),
            Some(Msg::Progress {
                pct: 100.0,
                phase: None
            })
        );
        assert_eq!(parse_stdout_line("::progress::150 too much"), None);
        assert_eq!(parse_stdout_line("progress 45"), None);
        assert_eq!(
            parse_stdout_line("::result::{\"rows\": 42}"),
            Some(Msg::Result {
                data: serde_json::json!({"rows": 42})
            })
        );
        assert_eq!(
            parse_stdout_line("::checkpoint::{\"file\": \"SPX.csv\"}"),
            Some(Msg::Checkpoint {
                data: serde_json::json!({"file": "SPX.csv"})
            })
        );
        assert_eq!(parse_stdout_line("::result::not json"), None);
    }
}

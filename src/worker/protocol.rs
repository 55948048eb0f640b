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

/// A child's report as the engine receives it: decoded and checked at the runner edge, so
/// the engine sees no JSON. Checkpoints and results keep their JSON text for the store.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// Still alive.
    Heartbeat,
    /// Progress in percent, with an optional phase name.
    Progress {
        /// 0 to 100.
        pct: f64,
        /// e.g. "features".
        phase: Option<String>,
    },
    /// State to resume from, as JSON text.
    Checkpoint(String),
    /// The attempt's result.
    Result(ResultReport),
    /// The attempt failed; `fatal` means retrying cannot help.
    Error {
        /// What went wrong.
        message: String,
        /// No retry.
        fatal: bool,
    },
}

/// A result: its JSON text, and what it asks the engine for if the run succeeds.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ResultReport {
    /// The whole result, as JSON text (stored with the run).
    pub json: String,
    /// `"event": {"kind", "message"}`: an event to publish, if well-formed and allowed.
    pub event: Option<ResultEvent>,
    /// `"request_runs": [{"task", "trigger", "reason"}]`: runs to queue.
    pub requests: Vec<RunRequest>,
    /// Why a part of the result was ignored (logged by the engine).
    pub ignored: Vec<String>,
}

/// An event a handler's result asks the engine to publish: `{"kind", "message"}`, e.g.
/// the drift task's verdict. Kinds are lower-case words joined by `_`; the `run_` kinds
/// are the engine's own, and refused here.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResultEvent {
    /// e.g. `drift_detected`.
    pub kind: String,
    /// What it says.
    pub message: String,
}

impl ResultEvent {
    fn is_allowed(&self) -> bool {
        !self.kind.starts_with("run_")
            && (1..=40).contains(&self.kind.len())
            && self
                .kind
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_')
    }
}

/// A run a handler's result asks the engine to queue: `{"task", "trigger", "reason"}`.
/// The handler never calls the engine; it says what it wants and the engine decides.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// The task to run.
    pub task: String,
    /// The trigger it asks for (the engine accepts `drift` only).
    pub trigger: String,
    /// Why, for the task's log.
    pub reason: String,
}

impl From<Msg> for Report {
    fn from(msg: Msg) -> Report {
        match msg {
            Msg::Heartbeat => Report::Heartbeat,
            Msg::Progress { pct, phase } => Report::Progress { pct, phase },
            Msg::Checkpoint { data } => Report::Checkpoint(data.to_string()),
            Msg::Result { data } => Report::Result(ResultReport::decode(&data)),
            Msg::Error { message, fatal } => Report::Error { message, fatal },
        }
    }
}

impl ResultReport {
    /// Reads what a result asks for; malformed parts are ignored, each with its reason.
    pub fn decode(data: &serde_json::Value) -> ResultReport {
        let mut report = ResultReport {
            json: data.to_string(),
            ..ResultReport::default()
        };
        if let Some(event) = data.get("event") {
            match ResultEvent::deserialize(event) {
                Ok(event) if event.is_allowed() => report.event = Some(event),
                Ok(event) => report.ignored.push(format!(
                    "result event kind {:?}: kinds are lower-case words joined by _, not run_*",
                    event.kind
                )),
                Err(err) => report
                    .ignored
                    .push(format!("malformed event in the result: {err}")),
            }
        }
        if let Some(requests) = data.get("request_runs") {
            match Vec::<RunRequest>::deserialize(requests) {
                Ok(requests) => report.requests = requests,
                Err(err) => report
                    .ignored
                    .push(format!("malformed request_runs in the result: {err}")),
            }
        }
        report
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
    fn a_result_is_decoded_at_the_edge_and_its_malformed_parts_are_named() {
        let good = ResultReport::decode(&serde_json::json!({
            "rows": 3,
            "event": {"kind": "drift_detected", "message": "3 of 18 drifted"},
            "request_runs": [{"task": "training", "trigger": "drift", "reason": "drift"}],
        }));
        assert_eq!(
            good.event.as_ref().map(|e| e.kind.as_str()),
            Some("drift_detected")
        );
        assert_eq!(good.requests.len(), 1);
        assert!(good.ignored.is_empty());
        assert!(good.json.contains("\"rows\":3"));

        let bad = ResultReport::decode(&serde_json::json!({
            "event": {"kind": "run_succeeded", "message": "x"},
            "request_runs": [{"task": "training"}],
        }));
        assert_eq!(bad.event, None);
        assert!(bad.requests.is_empty());
        assert_eq!(bad.ignored.len(), 2, "{:?}", bad.ignored);
        assert!(bad.ignored[0].contains("run_*"));
        assert!(bad.ignored[1].contains("request_runs"));
    }

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

//! `[[alerts]]` (issue 16, feature 1) against a real HTTP receiver on loopback: each
//! event delivered once, retried through 500s, never holding up firing when the
//! endpoint hangs, and not lost across a restart while pending.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use turbosched::model::{RunId, RunState};

use crate::support::{wait_until, Sandbox};

/// What the receiver does with the next request.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Answer {
    Status(u16),
    /// Read the request, answer nothing, hold the connection.
    Hang,
}

/// One POST the receiver took.
#[derive(Clone, Debug)]
struct Received {
    body: Value,
    answered: Option<u16>,
}

/// An HTTP server on a loopback port, in a thread: answers each request with the next
/// planned answer (then `then`), and keeps what it received.
struct Receiver {
    url: String,
    received: Arc<Mutex<Vec<Received>>>,
    plan: Arc<Mutex<Vec<Answer>>>,
    then: Arc<Mutex<Answer>>,
    hanging: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Receiver {
    fn start(plan: &[Answer], then: Answer) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let receiver = Receiver {
            url,
            received: Arc::default(),
            plan: Arc::new(Mutex::new(plan.iter().rev().copied().collect())),
            then: Arc::new(Mutex::new(then)),
            hanging: Arc::default(),
            stop: Arc::default(),
        };
        let (received, plan, then, hanging, stop) = (
            receiver.received.clone(),
            receiver.plan.clone(),
            receiver.then.clone(),
            receiver.hanging.clone(),
            receiver.stop.clone(),
        );
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let answer = plan.lock().unwrap().pop().unwrap_or(*then.lock().unwrap());
                let (received, hanging, stop) = (received.clone(), hanging.clone(), stop.clone());
                std::thread::spawn(move || serve_one(stream, answer, &received, &hanging, &stop));
            }
        });
        receiver
    }

    fn answer_from_now_on(&self, answer: Answer) {
        *self.then.lock().unwrap() = answer;
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve_one(
    stream: TcpStream,
    answer: Answer,
    received: &Mutex<Vec<Received>>,
    hanging: &AtomicUsize,
    stop: &AtomicBool,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    match answer {
        Answer::Hang => {
            received.lock().unwrap().push(Received {
                body,
                answered: None,
            });
            hanging.fetch_add(1, Ordering::Relaxed);
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
            }
            drop(stream);
        }
        Answer::Status(status) => {
            received.lock().unwrap().push(Received {
                body,
                answered: Some(status),
            });
            let mut stream = stream;
            let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
        }
    }
}

fn config(alerts: &str, tasks: &str) -> String {
    format!(
        r#"
[scheduler]
timezone = "UTC"
database = "data/scheduler.db"
max_workers = 4
heartbeat_interval = "200ms"
heartbeat_timeout = "3s"
kill_grace = "500ms"
shutdown_grace = "1s"

[api]
bind = "127.0.0.1:0"

{alerts}

[tasks.fails]
command = ["sh", "-c", "exit 3"]

[tasks.other]
command = ["sh", "-c", "exit 4"]
{tasks}
"#
    )
}

/// POSTs `/scheduler/run_<task>` and returns the run's id.
fn trigger(api: &str, task: &str) -> RunId {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut response = agent
        .post(format!("{api}/scheduler/run_{task}"))
        .send_empty()
        .expect("POST run");
    let body: Value = serde_json::from_str(&response.body_mut().read_to_string().unwrap()).unwrap();
    RunId(body["run_id"].as_i64().expect("run_id"))
}

fn metrics(api: &str) -> String {
    let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
    agent
        .get(format!("{api}/metrics"))
        .call()
        .expect("GET /metrics")
        .body_mut()
        .read_to_string()
        .unwrap()
}

#[test]
fn a_failed_run_is_alerted_once_through_two_500s_with_three_attempts_recorded() {
    let ops = Receiver::start(
        &[Answer::Status(500), Answer::Status(500)],
        Answer::Status(200),
    );
    let others = Receiver::start(&[], Answer::Status(200));
    let alerts = format!(
        r#"
[[alerts]]
name = "ops"
url = "{}"
events = ["run_failed", "deadline_missed", "circuit_opened"]

[[alerts]]
name = "other-team"
url = "{}"
events = ["run_failed"]
tasks = ["other"]
"#,
        ops.url, others.url
    );
    let sandbox = Sandbox::with_config(&config(&alerts, ""));
    let service = sandbox.serve();
    let run = trigger(&service.api, "fails");
    sandbox.wait_for_state(run, RunState::Failed, Duration::from_secs(20));

    let delivered = wait_until("the alert delivered", Duration::from_secs(20), || {
        let rows = sandbox.store().alert_deliveries(10).ok()?;
        rows.into_iter()
            .find(|d| d.alert == "ops" && d.state == "delivered")
    });
    assert_eq!(delivered.attempts, 3, "{delivered:?}");
    assert_eq!(delivered.last_status, Some(200));
    assert_eq!(delivered.kind, "run_failed");
    assert_eq!(delivered.run_id, Some(run));
    // Wait past another backoff: nothing more is sent.
    std::thread::sleep(Duration::from_millis(2500));
    let got = ops.received();
    let answers: Vec<Option<u16>> = got.iter().map(|r| r.answered).collect();
    assert_eq!(answers, [Some(500), Some(500), Some(200)]);
    for post in &got {
        assert_eq!(post.body, got[0].body, "every attempt sends the same body");
    }
    let body = &got[0].body;
    assert_eq!(body["version"], 1);
    assert_eq!(body["alert"], "ops");
    assert_eq!(body["event"], "run_failed");
    assert_eq!(body["task"], "fails");
    assert_eq!(body["run_id"], run.0);
    assert!(body["seq"].as_i64().is_some_and(|seq| seq > 0), "{body}");
    assert!(
        body["instance"].as_str().is_some_and(|i| !i.is_empty()),
        "{body}"
    );
    assert!(
        body["at"].as_str().is_some_and(|at| at.ends_with("+00:00")),
        "{body}"
    );
    assert_eq!(
        body["link"],
        format!("{}/scheduler/runs/{}", service.api, run.0)
    );
    let text = body["text"].as_str().unwrap();
    assert!(
        text.starts_with(&format!("[turbosched] run_failed fails (run {run})")),
        "{text}"
    );
    // The other alert wants only task `other`: nothing for it, and no row.
    assert!(others.received().is_empty());
    assert!(sandbox
        .store()
        .alert_deliveries(10)
        .unwrap()
        .iter()
        .all(|d| d.alert == "ops"));
    let metrics = metrics(&service.api);
    for line in [
        r#"turbosched_alert_posts_total{alert="ops",outcome="delivered"} 1"#,
        r#"turbosched_alert_posts_total{alert="ops",outcome="failed"} 2"#,
        r#"turbosched_alert_posts_total{alert="other-team",outcome="delivered"} 0"#,
    ] {
        assert!(metrics.contains(line), "{line} not in:\n{metrics}");
    }
    service.stop();
}

#[test]
fn a_hanging_endpoint_does_not_delay_a_per_second_task() {
    let hook = Receiver::start(&[], Answer::Hang);
    let alerts = format!(
        "[[alerts]]\nurl = \"{}\"\nevents = [\"run_failed\"]\n",
        hook.url
    );
    let tick = "[tasks.tick]\nhandler = \"ping\"\nschedule = \"* * * * * *\"\n";
    let sandbox = Sandbox::with_config(&config(&alerts, tick));
    let service = sandbox.serve();
    let failures: Vec<RunId> = ["fails", "other"]
        .iter()
        .map(|task| trigger(&service.api, task))
        .collect();
    wait_until("a POST hanging", Duration::from_secs(20), || {
        (hook.hanging.load(Ordering::Relaxed) >= 1).then_some(())
    });
    let hung_at = chrono::Utc::now();
    // Six ticks while the endpoint holds the sender's POSTs.
    let runs = wait_until("6 ticks after the hang", Duration::from_secs(20), || {
        let runs: Vec<_> = sandbox
            .runs_of("tick")
            .into_iter()
            .filter(|r| r.scheduled_for > hung_at && r.started_at.is_some())
            .collect();
        (runs.len() >= 6).then_some(runs)
    });
    assert!(
        hook.hanging.load(Ordering::Relaxed) >= 1
            && hook.received().iter().all(|r| r.answered.is_none()),
        "the endpoint hung throughout"
    );
    for run in &runs {
        let lag = run.started_at.unwrap() - run.scheduled_for;
        assert!(
            lag < chrono::Duration::milliseconds(900),
            "tick {} started {lag} late while the alert endpoint hung",
            run.scheduled_for
        );
    }
    for run in failures {
        assert_eq!(sandbox.run(run).state, RunState::Failed);
    }
    let pending = sandbox.store().alert_deliveries(10).unwrap();
    assert_eq!(pending.len(), 2, "{pending:?}");
    assert!(pending.iter().all(|d| d.state == "pending"), "{pending:?}");
    drop(hook);
    service.stop();
}

#[test]
fn an_alert_pending_at_a_restart_is_delivered_after_it_once() {
    let hook = Receiver::start(&[], Answer::Status(503));
    let alerts = format!(
        "[[alerts]]\nname = \"ops\"\nurl = \"{}\"\nevents = [\"run_failed\"]\nmax_attempts = 10\n",
        hook.url
    );
    let sandbox = Sandbox::with_config(&config(&alerts, ""));
    let service = sandbox.serve();
    let run = trigger(&service.api, "fails");
    sandbox.wait_for_state(run, RunState::Failed, Duration::from_secs(20));
    wait_until("a failed POST recorded", Duration::from_secs(20), || {
        let rows = sandbox.store().alert_deliveries(10).ok()?;
        rows.iter().any(|d| d.attempts >= 1).then_some(())
    });
    service.stop();
    let before = sandbox.store().alert_deliveries(10).unwrap();
    assert_eq!(before.len(), 1);
    assert_eq!(before[0].state, "pending", "{before:?}");
    assert_eq!(
        before[0].claimed_by, None,
        "a clean stop leaves no claim behind"
    );

    hook.answer_from_now_on(Answer::Status(200));
    let service = sandbox.serve();
    let delivered = wait_until(
        "delivered after the restart",
        Duration::from_secs(20),
        || {
            let rows = sandbox.store().alert_deliveries(10).ok()?;
            rows.into_iter().find(|d| d.state == "delivered")
        },
    );
    assert_eq!(delivered.run_id, Some(run));
    assert_eq!(delivered.attempts, before[0].attempts + 1);
    std::thread::sleep(Duration::from_millis(1500));
    let ok: Vec<_> = hook
        .received()
        .into_iter()
        .filter(|r| r.answered == Some(200))
        .collect();
    assert_eq!(ok.len(), 1, "delivered once");
    assert_eq!(ok[0].body["run_id"], run.0);
    assert_eq!(sandbox.store().alert_deliveries(10).unwrap().len(), 1);
    service.stop();
}

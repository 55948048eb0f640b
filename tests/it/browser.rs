//! The dashboard in a real headless Chromium (Debian's `chromium` and `chromium-driver`,
//! which `.ci/run` installs): it shows the tasks, its Run button starts a run, and the run
//! reaches `succeeded` on the page without a reload; the history grid and the timeline
//! page back in time; a cascade is one unit; Retry, Run ⇣ and Force act; a failed reload
//! shows as a banner; a run's outputs are linked (and the file route refuses anything
//! outside the output folders); every time carries its zone. Each test saves a
//! screenshot under `target/screenshots/`.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};

use crate::support::*;

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A chromedriver process and one browser session, spoken to over WebDriver.
struct Browser {
    driver: Child,
    base: String,
    session: String,
    agent: ureq::Agent,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Browser {
        let chromedriver = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("chromedriver is not installed: apt-get install -y chromium chromium-driver (bash .ci/run does it)");
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        let base = format!("http://127.0.0.1:{port}");
        wait_until("chromedriver to answer", Duration::from_secs(20), || {
            agent
                .get(format!("{base}/status"))
                .call()
                .ok()
                .filter(|r| r.status() == 200)
                .map(|_| ())
        });
        let profile = tempfile::tempdir().unwrap();
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--disable-background-networking", "--disable-component-update", "--disable-sync",
                         "--no-first-run", "--disable-quic", "--window-size=1400,1000",
                         format!("--user-data-dir={}", profile.path().display())],
            }
        }}});
        let mut browser = Browser {
            driver,
            base,
            session: String::new(),
            agent,
            _profile: profile,
        };
        let created = browser.call("POST", "/session", Some(capabilities));
        browser.session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_string();
        browser
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.base);
        let mut response = match method {
            "GET" => self.agent.get(url).call(),
            "DELETE" => self.agent.delete(url).call(),
            _ => self
                .agent
                .post(url)
                .header("Content-Type", "application/json")
                .send(body.unwrap_or(json!({})).to_string()),
        }
        .expect("WebDriver request");
        let text = response.body_mut().read_to_string().unwrap_or_default();
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        value["value"].clone()
    }

    fn session_call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    fn open(&self, url: &str) {
        self.session_call("POST", "/url", Some(json!({ "url": url })));
    }

    /// The element matching `css`, once it exists.
    fn find(&self, css: &str) -> String {
        wait_until(&format!("element {css}"), Duration::from_secs(20), || {
            let found = self.session_call(
                "POST",
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            );
            found[ELEMENT].as_str().map(str::to_string)
        })
    }

    /// The text of the element matching `css` (found afresh: the page re-renders).
    fn text(&self, css: &str) -> String {
        wait_until(
            &format!("the text of {css}"),
            Duration::from_secs(20),
            || {
                let element = self.find(css);
                let answer = self.session_call("GET", &format!("/element/{element}/text"), None);
                answer.as_str().map(str::to_string)
            },
        )
    }

    /// Clicks the element matching `css`. The page re-renders its tables on every event,
    /// so an element found a moment ago may be stale: find it again and retry.
    fn click(&self, css: &str) {
        wait_until(
            &format!("a click on {css}"),
            Duration::from_secs(20),
            || {
                let element = self.find(css);
                let answer = self.session_call(
                    "POST",
                    &format!("/element/{element}/click"),
                    Some(json!({})),
                );
                match answer["error"].as_str() {
                    None => Some(()),
                    Some("stale element reference") => None,
                    Some(other) => panic!("click on {css}: {other}: {answer}"),
                }
            },
        )
    }

    /// Types `text` into the element matching `css`.
    fn type_into(&self, css: &str, text: &str) {
        let element = self.find(css);
        self.session_call(
            "POST",
            &format!("/element/{element}/value"),
            Some(json!({ "text": text })),
        );
    }

    /// A DOM property of the element matching `css`.
    fn property(&self, css: &str, name: &str) -> Value {
        let element = self.find(css);
        self.session_call("GET", &format!("/element/{element}/property/{name}"), None)
    }

    /// The `href` of the link matching `css`, read in one step of the page: the live
    /// dashboard draws a run's detail anew at every update, so an element found by one
    /// request can be gone by the next (waited for while there is none).
    fn href(&self, css: &str) -> String {
        let selector = serde_json::to_string(css).unwrap();
        wait_until(&format!("a link at {css}"), Duration::from_secs(15), || {
            self.script(&format!(
                "const a = document.querySelector({selector}); return a ? a.href : null;"
            ))
            .as_str()
            .map(str::to_string)
        })
    }

    /// How many elements match `css` now.
    fn count(&self, css: &str) -> usize {
        let css = serde_json::to_string(css).unwrap();
        self.script(&format!("return document.querySelectorAll({css}).length;"))
            .as_u64()
            .unwrap_or(0) as usize
    }

    /// The `data-run` of every element matching `css`, in document order.
    fn runs_shown(&self, css: &str) -> Vec<i64> {
        let css = serde_json::to_string(css).unwrap();
        let found = self.script(&format!(
            "return [...document.querySelectorAll({css})].map((e) => Number(e.dataset.run));"
        ));
        found
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_i64).collect())
            .unwrap_or_default()
    }

    fn script(&self, script: &str) -> Value {
        self.session_call(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
    }

    /// A screenshot of the element matching `css` (scrolled into view), saved as
    /// `target/screenshots/<name>.png`.
    fn shoot(&self, css: &str, name: &str) {
        let element = self.find(css);
        // Its top at the viewport's top: chromedriver clips the picture to the viewport.
        self.script(&format!(
            "document.querySelector({}).scrollIntoView({{block: 'start'}}); return true;",
            serde_json::to_string(css).unwrap()
        ));
        let encoded = self.session_call("GET", &format!("/element/{element}/screenshot"), None);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().unwrap_or_default())
            .unwrap_or_default();
        assert!(bytes.starts_with(b"\x89PNG"), "a PNG of {css}: {encoded}");
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("target/screenshots/{name}.png"));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        println!("screenshot: {}", path.display());
    }

    fn screenshot(&self, path: &std::path::Path) {
        let encoded = self.session_call("GET", "/screenshot", None);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().unwrap())
            .unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "a PNG");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self
                .agent
                .delete(format!("{}/session/{}", self.base, self.session))
                .call();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[test]
fn the_dashboard_shows_the_tasks_and_a_run_started_with_its_button_succeeds_without_a_reload() {
    let sandbox = Sandbox::new(
        r#"
[tasks.ingestion]
handler = "ping"
schedule = "0 30 16 * * Mon-Fri"
params = { sleep_sec = 1.0, progress = true }
description = "load the day's bars"
[tasks.training]
handler = "ping"
depends_on = ["ingestion"]
"#,
    );
    let service = sandbox.serve();
    let browser = Browser::start();
    browser.open(&format!("{}/", service.api));

    assert!(browser
        .text("#tasks tbody tr[data-task='ingestion']")
        .contains("load the day's bars"));
    browser.find("#tasks tbody tr[data-task='training']");
    browser.find("#dag g[data-node='training']");
    assert_eq!(
        browser.script("return document.querySelector('#pools').hidden;"),
        Value::Bool(true),
        "no pool configured: no pools line"
    );
    let countdown = "#tasks tbody tr[data-task='ingestion'] td.countdown";
    wait_until("a live countdown", Duration::from_secs(10), || {
        browser.text(countdown).starts_with("in ").then_some(())
    });
    wait_until(
        "the event stream to connect",
        Duration::from_secs(10),
        || (browser.text("#connection") == "live").then_some(()),
    );

    // Mark this page: if anything reloads it, the mark is gone.
    browser.script("window.__notReloaded = true; return true;");
    browser.click("button[data-action='run'][data-task='ingestion']");

    wait_until(
        "the run to show as running",
        Duration::from_secs(20),
        || {
            let text = browser.text("#detail-state");
            (text == "running" || text == "succeeded").then_some(())
        },
    );
    wait_until(
        "the run to reach succeeded on the page",
        Duration::from_secs(30),
        || (browser.text("#detail-state") == "succeeded").then_some(()),
    );
    wait_until("the history to show it", Duration::from_secs(10), || {
        (browser.text("#runs tbody tr[data-run] .state") == "succeeded").then_some(())
    });
    assert_eq!(
        browser.script("return window.__notReloaded === true;"),
        Value::Bool(true),
        "no page reload"
    );
    let runs = sandbox.runs_of("ingestion");
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].state, turbosched::model::RunState::Succeeded);
    let log = browser.text("#log");
    assert!(
        log.contains(&format!("run={} attempt=1", runs[0].id)),
        "the log tail shows the run: {log}"
    );

    let screenshot =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/screenshots/dashboard.png");
    browser.screenshot(&screenshot);
    println!("screenshot: {}", screenshot.display());
    drop(browser);
    drop(service);
}

#[test]
fn the_dashboard_asks_for_the_token_once_in_a_masked_field_and_uses_it_for_every_button() {
    let sandbox =
        Sandbox::new("[tasks.hello]\nhandler = \"ping\"\n[tasks.other]\nhandler = \"ping\"\n");
    let service = sandbox.serve_with(&[("TURBOSCHED_TOKEN", "dashboard-token")]);
    let browser = Browser::start();
    browser.open(&format!("{}/", service.api));
    wait_until(
        "the event stream to connect",
        Duration::from_secs(10),
        || (browser.text("#connection") == "live").then_some(()),
    );

    browser.click("button[data-action='run'][data-task='hello']");
    // The first mutating click gets 401 and asks for the token, in a password field.
    wait_until("the token dialog", Duration::from_secs(10), || {
        (browser.property("#token-dialog", "open") == Value::Bool(true)).then_some(())
    });
    assert!(browser.text("#token-why").contains("API token"));
    assert_eq!(
        browser.property("#token-input", "type"),
        Value::String("password".into()),
        "the token is masked"
    );
    browser.type_into("#token-input", "dashboard-token");
    browser.shoot("#token-dialog", "dashboard-token");
    browser.click("#token-save");
    wait_until(
        "the run to succeed on the page",
        Duration::from_secs(20),
        || (browser.text("#detail-state") == "succeeded").then_some(()),
    );

    // The next button uses the remembered token: no second prompt.
    browser.click("button[data-action='pause'][data-task='other']");
    wait_until(
        "the task to show as paused",
        Duration::from_secs(10),
        || {
            browser
                .text("#tasks tbody tr[data-task='other']")
                .contains("paused")
                .then_some(())
        },
    );
    assert_eq!(
        browser.property("#token-dialog", "open"),
        Value::Bool(false),
        "asked only once"
    );
    assert!(sandbox.store().task_state(&"other".into()).unwrap().paused);
    assert_eq!(
        sandbox.runs_of("hello")[0].state,
        turbosched::model::RunState::Succeeded
    );
    drop(browser);
    drop(service);
}

#[test]
fn the_dashboard_reconnects_after_the_service_restarts_and_catches_up_on_missed_events() {
    // A fixed port, so the restarted service is the same origin for the page.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sandbox = Sandbox::with_config(&format!(
        "{}\n[tasks.hello]\nhandler = \"ping\"\n",
        FAST_SCHEDULER.replace("127.0.0.1:0", &format!("127.0.0.1:{port}"))
    ));
    let service = sandbox.serve();
    let browser = Browser::start();
    browser.open(&format!("{}/", service.api));
    wait_until("live", Duration::from_secs(10), || {
        (browser.text("#connection") == "live").then_some(())
    });
    browser.script("window.__notReloaded = true; return true;");

    service.stop_cleanly();
    wait_until(
        "the page to notice the drop",
        Duration::from_secs(15),
        || {
            browser
                .text("#connection")
                .starts_with("reconnecting")
                .then_some(())
        },
    );
    // While the service is down, a run happens (the CLI runs it itself).
    assert_eq!(sandbox.cli(&["run", "hello"]).status.code(), Some(0));
    let missed = sandbox.runs_of("hello")[0].id;

    let service = sandbox.serve();
    wait_until("the page to reconnect", Duration::from_secs(40), || {
        (browser.text("#connection") == "live").then_some(())
    });
    let probe = format!("const row = document.querySelector(\"#runs tbody tr[data-run='{missed}'] .state\"); return row ? row.textContent : null;");
    wait_until(
        "the missed run to show in the history",
        Duration::from_secs(10),
        || (browser.script(&probe) == Value::String("succeeded".into())).then_some(()),
    );
    assert_eq!(
        browser.script("return window.__notReloaded === true;"),
        Value::Bool(true),
        "no page reload"
    );
    drop(browser);
    drop(service);
}

/// A pool of one with a run running and one waiting shows so on the dashboard, live.
#[test]
fn the_dashboard_shows_a_full_pools_running_and_waiting_runs_live() {
    let sandbox = Sandbox::new(crate::pools::FULL_POOL_OF_ONE);
    let service = sandbox.serve();
    let browser = Browser::start();
    browser.open(&format!("{}/", service.api));
    wait_live(&browser);
    wait_until("the idle pool line", Duration::from_secs(10), || {
        (browser.text("#pools") == "Pools: gpu 0/1 running, 0 waiting").then_some(())
    });
    for task in ["first", "second"] {
        let (code, body) = crate::faults::post_json(&service, &format!("/scheduler/run_{task}"));
        assert_eq!(code, 202, "{task}: {body}");
    }
    wait_until(
        "the pool line to show one running and one waiting",
        Duration::from_secs(20),
        || (browser.text("#pools") == "Pools: gpu 1/1 running, 1 waiting").then_some(()),
    );
    std::fs::write(sandbox.path().join("release"), "").unwrap();
    wait_until("the pool line to empty", Duration::from_secs(20), || {
        (browser.text("#pools") == "Pools: gpu 0/1 running, 0 waiting").then_some(())
    });
    drop(browser);
    drop(service);
}

/// A sandbox whose scheduler's zone is Asia/Tokyo: no daylight saving, so the zone label a
/// browser prints for it is always `GMT+9`.
fn in_tokyo(tasks: &str) -> Sandbox {
    Sandbox::with_config(&format!(
        "{}\n{tasks}",
        FAST_SCHEDULER.replace("timezone = \"UTC\"", "timezone = \"Asia/Tokyo\"")
    ))
}

/// Runs `task` through the API and waits for it to end; its run id.
fn run_to_the_end(service: &Service, task: &str) -> i64 {
    let (code, body) = crate::faults::post_json(service, &format!("/scheduler/run_{task}?wait=30"));
    assert_eq!(code, 200, "{task}: {body}");
    body["run_id"].as_i64().unwrap_or_else(|| panic!("{body}"))
}

fn wait_live(browser: &Browser) {
    wait_until(
        "the event stream to connect",
        Duration::from_secs(15),
        || (browser.text("#connection") == "live").then_some(()),
    );
}

fn sorted(mut ids: Vec<i64>) -> Vec<i64> {
    ids.sort_unstable();
    ids
}

#[test]
fn the_history_grid_and_the_timeline_show_runs_by_state_page_back_in_time_and_open_a_run() {
    let sandbox = in_tokyo(
        r#"
[tasks.ok]
handler = "ping"
schedule = "0 30 16 * * Mon-Fri"
params = { sleep_sec = 0.3 }
[tasks.bad]
command = ["/bin/false"]
"#,
    );
    let service = sandbox.serve();
    let ok: Vec<i64> = (0..4).map(|_| run_to_the_end(&service, "ok")).collect();
    let bad = run_to_the_end(&service, "bad");
    let browser = Browser::start();
    browser.open(&format!("{}/?grid=2&timeline=2&runs=2", service.api));
    wait_live(&browser);

    // The grid: a row per task, its newest page of runs as cells, oldest left, by state.
    let ok_cells = "#grid tr[data-task='ok'] .cell";
    wait_until("the grid's first page", Duration::from_secs(20), || {
        (browser.runs_shown(ok_cells) == vec![ok[2], ok[3]]).then_some(())
    });
    assert_eq!(browser.count("#grid tr[data-task='ok'] .cell.succeeded"), 2);
    let colour = |css: &str| {
        browser.script(&format!(
            "return getComputedStyle(document.querySelector({})).backgroundColor;",
            serde_json::to_string(css).unwrap()
        ))
    };
    assert_eq!(
        colour(&format!("#grid .cell[data-run='{}']", ok[3])),
        json!("rgb(26, 127, 55)"),
        "green"
    );
    assert_eq!(
        colour(&format!("#grid .cell[data-run='{bad}']")),
        json!("rgb(207, 34, 46)"),
        "red"
    );
    assert_eq!(
        browser.runs_shown("#grid tr[data-task='bad'] .cell.failed"),
        vec![bad]
    );
    browser.shoot("#grid", "dashboard-grid");
    browser.click("#grid-older");
    wait_until("the grid's older page", Duration::from_secs(10), || {
        (browser.runs_shown(ok_cells) == vec![ok[0], ok[1]]).then_some(())
    });
    assert_eq!(
        browser.count("#grid tr[data-task='bad'] .cell"),
        0,
        "bad has no older run"
    );
    browser.click(&format!("#grid .cell[data-run='{}']", ok[0]));
    wait_until("the clicked cell's run", Duration::from_secs(10), || {
        (browser.text("#detail-id") == format!("{} · ok", ok[0])).then_some(())
    });
    browser.click("#grid-newer");
    wait_until(
        "the grid's newest page again",
        Duration::from_secs(10),
        || (browser.runs_shown(ok_cells) == vec![ok[2], ok[3]]).then_some(()),
    );

    // The timeline: the newest runs as bars with their durations, then the page before.
    let bars = "#timeline rect.run";
    wait_until("the timeline's first page", Duration::from_secs(10), || {
        (sorted(browser.runs_shown(bars)) == vec![ok[3], bad]).then_some(())
    });
    assert_eq!(
        browser.count(&format!("#timeline rect.run.failed[data-run='{bad}']")),
        1
    );
    let took = browser.text(&format!("#timeline text.took[data-run='{}']", ok[3]));
    let took_ms: f64 = match took.split_once(' ') {
        Some((n, "ms")) => n.parse().unwrap(),
        Some((n, "s")) => n.parse::<f64>().unwrap() * 1000.0,
        _ => panic!("a duration: {took:?}"),
    };
    assert!(took_ms >= 300.0, "ping slept 0.3 s: {took}");
    browser.shoot("#timeline", "dashboard-timeline");
    browser.click("#timeline-older");
    wait_until("the timeline's older page", Duration::from_secs(10), || {
        (sorted(browser.runs_shown(bars)) == vec![ok[1], ok[2]]).then_some(())
    });
    browser.click(&format!("#timeline rect.run[data-run='{}']", ok[1]));
    wait_until("the clicked bar's run", Duration::from_secs(10), || {
        (browser.text("#detail-id") == format!("{} · ok", ok[1])).then_some(())
    });

    // The runs list pages the same way, newest first.
    let rows = "#runs tbody tr[data-run]";
    assert_eq!(browser.runs_shown(rows), vec![bad, ok[3]]);
    browser.click("#runs-older");
    wait_until(
        "the runs list's older page",
        Duration::from_secs(10),
        || (browser.runs_shown(rows) == vec![ok[2], ok[1]]).then_some(()),
    );
    browser.click("#runs-newer");
    wait_until(
        "the runs list's newest page",
        Duration::from_secs(10),
        || (browser.runs_shown(rows) == vec![bad, ok[3]]).then_some(()),
    );
    drop(browser);
    drop(service);
}

#[test]
fn times_show_the_scheduler_zone_schedules_read_as_words_and_far_countdowns_count_days() {
    let sandbox = in_tokyo(
        r#"
[tasks.ok]
handler = "ping"
schedule = "0 30 16 * * Mon-Fri"
[tasks.leap]
handler = "ping"
schedule = "0 0 0 29 Feb *"
timezone = "UTC"
"#,
    );
    let service = sandbox.serve();
    let run = run_to_the_end(&service, "ok");
    let started = sandbox
        .run(turbosched::model::RunId(run))
        .started_at
        .expect("started");
    let browser = Browser::start();
    browser.open(&format!("{}/", service.api));
    wait_live(&browser);

    let ok = "#tasks tbody tr[data-task='ok']";
    assert_eq!(
        browser.text(&format!("{ok} .describe")),
        "at 16:30, Monday through Friday"
    );
    assert_eq!(browser.text(&format!("{ok} code")), "0 30 16 * * Mon-Fri");
    assert_eq!(
        browser.text("#tasks tbody tr[data-task='leap'] .describe"),
        "at 00:00, on 29 February (UTC)",
        "a task in another zone than the scheduler's names it"
    );
    let leap = "#tasks tbody tr[data-task='leap'] td.countdown";
    let countdown = wait_until("a countdown in days", Duration::from_secs(10), || {
        Some(browser.text(leap)).filter(|t| t.starts_with("in "))
    });
    let words: Vec<&str> = countdown.split(' ').collect();
    assert!(
        words.len() == 3 && words[1].ends_with('d') && words[2].ends_with('h'),
        "days and hours: {countdown:?}"
    );
    assert!(browser.text("#meta").contains("times in Asia/Tokyo"));

    // A run's start, in the runs list and the run detail: Tokyo time, labelled.
    let tokyo = started
        .with_timezone(&chrono_tz::Asia::Tokyo)
        .format("%Y-%m-%d %H:%M:%S GMT+9")
        .to_string();
    let cell = format!("#runs tr[data-run='{run}'] .time");
    wait_until(
        "the run's start in Tokyo time",
        Duration::from_secs(10),
        || (browser.text(&cell) == tokyo).then_some(()),
    );
    browser.click(&format!("#runs tr[data-run='{run}']"));
    wait_until("the detail's times", Duration::from_secs(10), || {
        browser
            .text("#detail-times")
            .contains(&format!("started {tokyo}"))
            .then_some(())
    });
    assert!(
        browser.text("#detail table .time") == tokyo,
        "the attempt's start too"
    );
    browser.shoot("main", "dashboard-zones");

    // The UTC switch: the same instants, in UTC.
    browser.click("#utc");
    let utc = started.format("%Y-%m-%d %H:%M:%S UTC").to_string();
    wait_until("the run's start in UTC", Duration::from_secs(10), || {
        (browser.text(&cell) == utc).then_some(())
    });
    assert!(browser.text("#meta").contains("times in UTC"));
    drop(browser);
    drop(service);
}

#[test]
fn a_cascade_shows_as_one_unit_and_run_downstream_force_retry_and_the_reload_banner_work() {
    let tasks = r#"
[tasks.ingest]
handler = "ping"
[tasks.train]
handler = "ping"
depends_on = ["ingest"]
[tasks.report]
handler = "ping"
depends_on = ["train"]
[tasks.never]
handler = "ping"
[tasks.lonely]
handler = "ping"
depends_on = ["never"]
"#;
    let sandbox = Sandbox::new(tasks);
    let service = sandbox.serve();
    let browser = Browser::start();
    browser.open(&format!("{}/", service.api));
    wait_live(&browser);

    // Run ⇣: ingest and everything downstream of it, shown as one unit.
    browser.click("button[data-action='run-downstream'][data-task='ingest']");
    let root = wait_until("the cascade's root run", Duration::from_secs(20), || {
        sandbox.runs_of("ingest").first().map(|r| r.id.0)
    });
    wait_until(
        "the whole cascade to succeed",
        Duration::from_secs(30),
        || {
            let members: Vec<_> = ["train", "report"]
                .iter()
                .flat_map(|t| sandbox.runs_of(t))
                .collect();
            (members.len() == 2
                && members.iter().all(|r| {
                    r.cascade.map(|c| c.0) == Some(root)
                        && r.state == turbosched::model::RunState::Succeeded
                }))
            .then_some(())
        },
    );
    let members: Vec<i64> = ["train", "report"]
        .iter()
        .map(|t| sandbox.runs_of(t)[0].id.0)
        .collect();
    wait_until(
        "the cascade grouped in the runs list",
        Duration::from_secs(15),
        || {
            let order = browser.runs_shown("#runs tbody tr[data-run]");
            let at = order.iter().position(|id| *id == root)?;
            (order[at..].starts_with(&[root, members[0], members[1]])
                && browser.count(&format!("#runs tr.cascade-member[data-cascade='{root}']")) == 2)
                .then_some(())
        },
    );
    assert_eq!(
        browser.text(&format!("#runs tr.cascade-root[data-run='{root}'] .badge")),
        "cascade · 3 runs"
    );
    wait_until(
        "the cascade in the run detail",
        Duration::from_secs(15),
        || {
            (browser.text("#cascade")
                == format!(
                    "cascade of run {root}: ingest succeeded → train succeeded → report succeeded"
                ))
            .then_some(())
        },
    );
    browser.shoot("#runs-section", "dashboard-cascade");
    browser.shoot("#detail-section", "dashboard-cascade-detail");

    // Run: lonely's dependency has never run, so it is skipped; Force runs it anyway.
    browser.click("button[data-action='run'][data-task='lonely']");
    wait_until(
        "the unforced run to be skipped",
        Duration::from_secs(20),
        || (browser.text("#detail-state") == "skipped").then_some(()),
    );
    browser.click("button[data-action='run-force'][data-task='lonely']");
    wait_until("the forced run to succeed", Duration::from_secs(20), || {
        let runs = sandbox.runs_of("lonely");
        (runs.len() == 2 && browser.text("#detail-state") == "succeeded").then_some(())
    });
    assert!(browser.text("#detail").contains("forced"));
    let forced = sandbox
        .runs_of("lonely")
        .into_iter()
        .find(|r| r.force)
        .expect("a forced run");
    assert_eq!(forced.state, turbosched::model::RunState::Succeeded);
    assert!(
        browser.count("button[data-action='run-force'][data-task='ingest']") == 0,
        "no Force for a task without dependencies"
    );

    // Retry: the task again, as a new run, shown at once.
    browser.click(&format!(
        "button[data-action='retry'][data-run='{}']",
        forced.id
    ));
    let retried = wait_until("a retry run", Duration::from_secs(20), || {
        sandbox
            .runs_of("lonely")
            .into_iter()
            .find(|r| r.trigger == turbosched::model::Trigger::Retry)
    });
    wait_until("the retry's detail", Duration::from_secs(10), || {
        browser
            .text("#detail-id")
            .starts_with(&format!("{} ·", retried.id))
            .then_some(())
    });

    // A reload that fails shows a banner until a reload succeeds.
    assert!(
        browser.script("return document.querySelector('#banner').hidden;") == Value::Bool(true)
    );
    let config = sandbox.path().join("config/scheduler.toml");
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!("{good}\n[tasks.broken]\nhandler = \"pnig\"\n"),
    )
    .unwrap();
    let (code, body) = crate::faults::post_json(&service, "/scheduler/reload");
    assert!((400..500).contains(&code), "{code} {body}");
    let banner = wait_until("the reload banner", Duration::from_secs(15), || {
        Some(browser.text("#banner")).filter(|t| !t.is_empty())
    });
    assert!(
        banner.starts_with("Config reload failed.") && banner.contains("pnig"),
        "{banner}"
    );
    browser.shoot("body", "dashboard-banner");
    std::fs::write(&config, good).unwrap();
    let (code, body) = crate::faults::post_json(&service, "/scheduler/reload");
    assert_eq!(code, 200, "{body}");
    wait_until("the banner to go", Duration::from_secs(15), || {
        (browser.script("return document.querySelector('#banner').hidden;") == Value::Bool(true))
            .then_some(())
    });
    drop(browser);
    drop(service);
}

/// A GET of the service: status, `Content-Type`, a header and the body.
fn get_raw(service: &Service, path: &str, header: &str) -> (u16, String, String, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut response = agent
        .get(format!("{}{path}", service.api))
        .call()
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let value = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let (content_type, extra) = (value("content-type"), value(header));
    let status = response.status().as_u16();
    let body = response.body_mut().read_to_string().unwrap_or_default();
    (status, content_type, extra, body)
}

#[test]
fn a_runs_outputs_are_linked_in_its_detail_and_served_only_from_the_output_folders() {
    // `backtest` only configures the output folder; `chart` writes into it as a backtest
    // does (a report folder: equity.svg, metrics.json) and names them in its result.
    let sandbox = Sandbox::new(
        r#"
[tasks.backtest]
handler = "backtest"
params = { report_dir = "reports/backtest" }
[tasks.chart]
command = ["/bin/sh", "make_report.sh"]
"#,
    );
    std::fs::write(
        sandbox.path().join("make_report.sh"),
        r##"set -e
folder="reports/backtest/run_$TURBOSCHED_RUN_ID"
mkdir -p "$folder"
printf '<svg xmlns="http://www.w3.org/2000/svg" width="240" height="60"><rect width="240" height="60" fill="#0969da"/></svg>' > "$folder/equity.svg"
printf '{"sharpe": 1.25}' > "$folder/metrics.json"
ln -s "$PWD/config/scheduler.toml" "$folder/leak.json"
echo "::result::{\"report_dir\": \"$folder\", \"chart\": \"$folder/equity.svg\"}"
"##,
    )
    .unwrap();
    let service = sandbox.serve();
    let run = run_to_the_end(&service, "chart");
    let folder = format!("reports/backtest/run_{run}");

    let browser = Browser::start();
    browser.open(&format!("{}/", service.api));
    wait_live(&browser);
    browser.click(&format!("#runs tr[data-run='{run}']"));
    browser.find("#outputs li[data-output='chart'] img");
    wait_until(
        "the chart to load in the page",
        Duration::from_secs(10),
        || {
            (browser.script("return document.querySelector('#outputs img').naturalWidth;")
                == json!(240))
            .then_some(())
        },
    );
    assert_eq!(
        browser.text("#outputs li[data-output='report folder']"),
        format!("report folder {folder}: equity.svg · metrics.json"),
        "the folder's files, without the link out of it"
    );
    let href = browser.href("#outputs li[data-output='report folder'] a[data-file='metrics.json']");
    let path = &href[href.find("/scheduler/files").unwrap()..];
    let (status, content_type, _, body) = get_raw(&service, path, "x-none");
    assert_eq!(
        (status, content_type.as_str(), body.as_str()),
        (200, "application/json", "{\"sharpe\": 1.25}")
    );
    browser.shoot("#detail-id", "dashboard-outputs-title");
    browser.shoot("#outputs", "dashboard-outputs");

    // A served SVG runs no script in this origin.
    let (status, content_type, policy, _) = get_raw(
        &service,
        &format!("/scheduler/files?path={folder}/equity.svg"),
        "content-security-policy",
    );
    assert_eq!((status, content_type.as_str()), (200, "image/svg+xml"));
    assert!(policy.contains("sandbox"), "{policy}");

    // Nothing outside the output folders: not by "..", not by an absolute path, not by a
    // symbolic link in the folder.
    let absolute = sandbox.path().join("config/scheduler.toml");
    for path in [
        format!("{folder}/../../../config/scheduler.toml"),
        absolute.display().to_string(),
        "/etc/passwd".to_string(),
        format!("{folder}/leak.json"),
        "config/scheduler.toml".to_string(),
    ] {
        let (status, body) =
            crate::faults::get_json(&service, &format!("/scheduler/files?path={path}"));
        assert_eq!(status, 403, "{path}: {body}");
        assert_eq!(body["error"]["code"], "outside_outputs", "{path}: {body}");
    }
    let (status, body) = crate::faults::get_json(
        &service,
        &format!("/scheduler/files?path={folder}/missing.json"),
    );
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let (status, body) = crate::faults::get_json(&service, "/scheduler/files");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("bad_query"))
    );
    drop(browser);
    drop(service);
}

#[test]
fn the_shipped_market_cascade_is_one_unit_whose_real_charts_metrics_and_shap_log_open_from_the_dashboard(
) {
    let sandbox = crate::market::shipped();
    let service = sandbox.serve();
    let (code, body) =
        crate::faults::post_json(&service, "/scheduler/run_ingestion?downstream=true");
    assert_eq!(code, 202, "{body}");
    let root = body["run_id"].as_i64().unwrap();
    let tasks = ["training", "predictions", "backtest", "drift"];
    let done = |task: &str| {
        sandbox
            .runs_of(task)
            .into_iter()
            .find(|r| r.cascade.map(|c| c.0) == Some(root) && r.state.is_terminal())
    };
    wait_until(
        "the market cascade to end",
        Duration::from_secs(240),
        || tasks.iter().all(|t| done(t).is_some()).then_some(()),
    );
    for task in tasks {
        assert_eq!(
            done(task).unwrap().state,
            turbosched::model::RunState::Succeeded,
            "{task}"
        );
    }

    let browser = Browser::start();
    browser.open(&format!("{}/", service.api));
    wait_live(&browser);
    assert_eq!(
        browser.text(&format!("#runs tr.cascade-root[data-run='{root}'] .badge")),
        "cascade · 5 runs"
    );
    browser.shoot("body", "dashboard-shipped");
    let image_width = |label: &str| {
        let css =
            serde_json::to_string(&format!("#outputs li[data-output='{label}'] img")).unwrap();
        browser.script(&format!(
            "const i = document.querySelector({css}); return i && i.complete ? i.naturalWidth : 0;"
        ))
    };
    let served = |label: &str| -> Value {
        let href = browser.href(&format!("#outputs li[data-output='{label}'] a"));
        let (status, body) =
            crate::faults::get_json(&service, &href[href.find("/scheduler/files").unwrap()..]);
        assert_eq!(status, 200, "{label}: {body}");
        body
    };

    let backtest = done("backtest").unwrap().id;
    browser.click(&format!("#runs tr[data-run='{backtest}']"));
    wait_until("the equity chart drawn", Duration::from_secs(15), || {
        (image_width("chart").as_u64().unwrap_or(0) > 100).then_some(())
    });
    assert!(served("metrics JSON").is_object());
    browser.shoot("#detail-section", "dashboard-backtest-outputs");

    let drift = done("drift").unwrap().id;
    browser.click(&format!("#runs tr[data-run='{drift}']"));
    wait_until("the PSI chart drawn", Duration::from_secs(15), || {
        (browser
            .text("#detail-id")
            .starts_with(&format!("{drift} ·"))
            && image_width("chart").as_u64().unwrap_or(0) > 100)
            .then_some(())
    });
    browser.shoot("#outputs", "dashboard-drift-outputs");

    let training = done("training").unwrap().id;
    browser.click(&format!("#runs tr[data-run='{training}']"));
    wait_until(
        "the training run's outputs",
        Duration::from_secs(15),
        || {
            (browser
                .text("#detail-id")
                .starts_with(&format!("{training} ·"))
                && browser.count("#outputs li[data-output='SHAP log'] a") == 1)
                .then_some(())
        },
    );
    assert!(served("SHAP log")["models"].is_array());
    drop(browser);
    drop(service);
}

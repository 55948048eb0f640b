//! The dashboard in a real headless Chromium (Debian's `chromium` and `chromium-driver`,
//! which `.ci/run` installs): it shows the tasks, its Run button starts a run, and the run
//! reaches `succeeded` on the page without a reload. Saves a screenshot.

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

    fn script(&self, script: &str) -> Value {
        self.session_call(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
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
fn the_dashboard_asks_for_the_token_once_and_uses_it_for_every_button() {
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
    // The first mutating click gets 401 and asks for the token.
    let prompt = wait_until("the token prompt", Duration::from_secs(10), || {
        browser
            .session_call("GET", "/alert/text", None)
            .as_str()
            .map(str::to_string)
    });
    assert!(prompt.contains("API token"), "{prompt}");
    browser.session_call(
        "POST",
        "/alert/text",
        Some(json!({"text": "dashboard-token"})),
    );
    browser.session_call("POST", "/alert/accept", Some(json!({})));
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
    assert!(
        browser.session_call("GET", "/alert/text", None)["error"] == "no such alert",
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

    assert!(service.stop().success());
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

//! A small W3C WebDriver client for chromedriver: enough to load a page, type,
//! click and read text.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hyper::Method;
use serde_json::{Value, json};

use super::http;

/// The W3C key under which an element reference is returned.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Where chromedriver listens: `OPAMP_TEST_CHROMEDRIVER_URL`, default the
/// port `scripts/services/chromium` starts it on.
pub(crate) fn driver_addr() -> SocketAddr {
    let url = std::env::var("OPAMP_TEST_CHROMEDRIVER_URL").unwrap_or_else(|_| "http://127.0.0.1:9532".into());
    let host = url.trim_start_matches("http://").trim_end_matches('/');
    host.parse()
        .unwrap_or_else(|err| panic!("OPAMP_TEST_CHROMEDRIVER_URL {url:?} is not http://IP:PORT: {err}"))
}

/// One browser session.
#[derive(Debug)]
pub(crate) struct Browser {
    driver: SocketAddr,
    session: String,
    _profile: TempDir,
}

/// A folder removed on drop: the browser's fresh profile.
#[derive(Debug)]
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Browser {
    /// Starts headless Chromium through the chromedriver at `driver`.
    pub(crate) async fn start(driver: SocketAddr) -> Result<Browser, String> {
        let profile = std::env::temp_dir().join(format!("opamp-dashboard-{}", uuid_like()));
        std::fs::create_dir_all(&profile).map_err(|err| format!("profile folder: {err}"))?;
        let profile = TempDir(profile);
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--no-first-run",
                    format!("--user-data-dir={}", profile.0.display()),
                ]
            }
        } } });
        let answer = command(driver, Method::POST, "/session", Some(&capabilities)).await?;
        let session = answer["sessionId"]
            .as_str()
            .ok_or_else(|| format!("no sessionId in {answer}"))?
            .to_owned();
        Ok(Browser {
            driver,
            session,
            _profile: profile,
        })
    }

    async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value, String> {
        command(self.driver, method, &format!("/session/{}{path}", self.session), body).await
    }

    /// Loads `url`.
    pub(crate) async fn goto(&self, url: &str) -> Result<(), String> {
        self.call(Method::POST, "/url", Some(&json!({ "url": url })))
            .await
            .map(drop)
    }

    async fn element(&self, css: &str) -> Result<String, String> {
        let found = self
            .call(
                Method::POST,
                "/element",
                Some(&json!({ "using": "css selector", "value": css })),
            )
            .await?;
        found[ELEMENT]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("no element reference for {css}: {found}"))
    }

    /// Types `text` into the element `css`.
    pub(crate) async fn type_into(&self, css: &str, text: &str) -> Result<(), String> {
        let id = self.element(css).await?;
        self.call(
            Method::POST,
            &format!("/element/{id}/value"),
            Some(&json!({ "text": text })),
        )
        .await
        .map(drop)
    }

    /// Clicks the element `css`.
    pub(crate) async fn click(&self, css: &str) -> Result<(), String> {
        let id = self.element(css).await?;
        self.call(Method::POST, &format!("/element/{id}/click"), Some(&json!({})))
            .await
            .map(drop)
    }

    /// Runs `script` in the page with `args`; its return value.
    pub(crate) async fn run(&self, script: &str, args: Value) -> Result<Value, String> {
        self.call(
            Method::POST,
            "/execute/sync",
            Some(&json!({ "script": script, "args": args })),
        )
        .await
    }

    /// The text of the first element matching `css`, `None` if there is none.
    pub(crate) async fn text(&self, css: &str) -> Result<Option<String>, String> {
        let value = self
            .run(
                "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
                json!([css]),
            )
            .await?;
        Ok(value.as_str().map(str::to_owned))
    }

    /// How many elements match `css`.
    pub(crate) async fn count(&self, css: &str) -> Result<u64, String> {
        let value = self
            .run("return document.querySelectorAll(arguments[0]).length;", json!([css]))
            .await?;
        value.as_u64().ok_or_else(|| format!("count of {css}: {value}"))
    }

    /// Waits until the text of `css` is `expected`; panics with what it saw last.
    pub(crate) async fn wait_for_text(&self, css: &str, expected: &str, within: Duration) {
        let deadline = Instant::now() + within;
        let mut last = None;
        while Instant::now() < deadline {
            last = Some(self.text(css).await);
            if matches!(&last, Some(Ok(Some(text))) if text == expected) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let message = self.text("#message").await;
        panic!("{css} did not read {expected:?} within {within:?}; last {last:?}; page message {message:?}");
    }

    /// Ends the session (and the browser).
    pub(crate) async fn quit(self) {
        let _ = self.call(Method::DELETE, "", None).await;
    }
}

/// One WebDriver command; the `value` of its answer, or the driver's error.
async fn command(driver: SocketAddr, method: Method, path: &str, body: Option<&Value>) -> Result<Value, String> {
    let body = body.map(|b| ("application/json", b.to_string().into_bytes()));
    let answer = http::send(driver, method, path, &[], body).await;
    let value: Value = serde_json::from_slice(&answer.body).map_err(|err| {
        format!(
            "chromedriver answered {} with non-JSON ({err}): {}",
            answer.status,
            answer.text()
        )
    })?;
    if answer.status.is_success() {
        Ok(value["value"].clone())
    } else {
        Err(format!("chromedriver {path}: {} {}", answer.status, value["value"]))
    }
}

fn uuid_like() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{}-{nanos}", std::process::id())
}

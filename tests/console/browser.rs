//! A headless Chromium for one test, driven over WebDriver (fantoccini) through a
//! chromedriver this test starts on a free port, with a profile of its own.
//!
//! Missing chromedriver or Chromium fails the test with what to install: a browser test
//! that cannot run must never look like one that passed.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

/// Flags for Chromium in a container without a display, a sandbox or the internet.
const CHROMIUM_FLAGS: [&str; 9] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1100,1000",
];
/// How long chromedriver may take to answer, and a page or an element to appear.
const PATIENCE: Duration = Duration::from_secs(30);
const INSTALL: &str = "install them with `apt-get install -y chromium chromium-driver`";

/// chromedriver, and a session of Chromium through it.
pub struct Browser {
    /// The WebDriver session.
    pub client: Client,
    driver: Child,
    profile: PathBuf,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session; panics with what to install when
    /// either is missing.
    pub async fn start() -> Self {
        let chromium = find_chromium();
        let port = crate::support::free_local_addr().port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run chromedriver ({e}): {INSTALL}"));
        let profile = std::env::temp_dir().join(format!(
            "tt-console-chromium-{}",
            uuid::Uuid::new_v4().simple()
        ));
        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|s| (*s).to_owned()).collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        let caps = json!({ "goog:chromeOptions": { "binary": chromium, "args": args } });
        let serde_json::Value::Object(caps) = caps else {
            unreachable!("a JSON object literal")
        };
        let mut browser = Browser {
            client: connect(port, caps).await,
            driver,
            profile,
        };
        browser.check_alive();
        browser
    }

    fn check_alive(&mut self) {
        if let Ok(Some(status)) = self.driver.try_wait() {
            panic!("chromedriver exited with {status}");
        }
    }

    /// Opens `url` and waits for `css` to be on the page.
    pub async fn open(&self, url: &str, css: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("open {url}: {e}"));
        self.wait_for(css).await;
    }

    /// Waits until an element matching `css` is on the page.
    pub async fn wait_for(&self, css: &str) -> fantoccini::elements::Element {
        match self
            .client
            .wait()
            .at_most(PATIENCE)
            .for_element(Locator::Css(css))
            .await
        {
            Ok(e) => e,
            Err(e) => {
                let page = self.client.source().await.unwrap_or_default();
                panic!("no {css} on the page ({e}):\n{page}")
            }
        }
    }

    /// The texts of the elements matching `css`; empty while the page is being replaced
    /// (poll it with `eventually`).
    pub async fn texts(&self, css: &str) -> Vec<String> {
        let Ok(elements) = self.client.find_all(Locator::Css(css)).await else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in elements {
            match e.text().await {
                Ok(t) => out.push(t),
                Err(_) => return Vec::new(),
            }
        }
        out
    }

    /// Clicks the element matching `css`.
    pub async fn click(&self, css: &str) {
        self.wait_for(css).await.click().await.expect(css);
    }

    /// Types `text` into the field matching `css`.
    pub async fn type_into(&self, css: &str, text: &str) {
        let field = self.wait_for(css).await;
        field.clear().await.expect("clear field");
        field.send_keys(text).await.expect("type");
    }

    /// Ends the session and chromedriver.
    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if matches!(self.driver.try_wait(), Ok(None)) {
            let _ = self.driver.kill();
            let _ = self.driver.wait();
        }
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Chromium's binary: `CHROME_BIN`, else the first of the usual names on `PATH`.
fn find_chromium() -> String {
    if let Ok(bin) = std::env::var("CHROME_BIN") {
        return bin;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate.display().to_string();
            }
        }
    }
    panic!("no Chromium found (chromium, chromium-browser or google-chrome on PATH): {INSTALL}");
}

/// A WebDriver session, retried while chromedriver starts up.
async fn connect(port: u16, caps: serde_json::Map<String, serde_json::Value>) -> Client {
    let deadline = Instant::now() + PATIENCE;
    let url = format!("http://127.0.0.1:{port}");
    // Two rustls back-ends are linked (aws-lc-rs and ring, by different dependencies), so
    // rustls cannot pick one for fantoccini's client on its own.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    loop {
        let mut builder = ClientBuilder::rustls().expect("TLS roots for the WebDriver client");
        match builder.capabilities(caps.clone()).connect(&url).await {
            Ok(client) => return client,
            Err(e) if Instant::now() > deadline => {
                panic!("no WebDriver session from chromedriver at {url}: {e} ({INSTALL})")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

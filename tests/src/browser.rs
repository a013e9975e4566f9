//! Headless Chromium in a namespace, driven through WebDriver: Debian's
//! `chromedriver` (from `chromium-driver`) starts the browser, and
//! fantoccini speaks WebDriver to it. Both live in the namespace the page
//! is served in, so the page's `127.0.0.1` is the daemon's.

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use fantoccini::{Client, ClientBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use lb::netns::{Netns, spawn_in};
use serde_json::{Map, Value, json};

/// The port chromedriver listens on, in the namespace.
const DRIVER_PORT: u16 = 9515;
/// How long chromedriver and the browser get to start.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Debian's browser: chromedriver is told where it is rather than guess.
const CHROMIUM: &str = "/usr/bin/chromium";

/// A chromedriver process and the browsers it starts: they share its
/// process group, which is killed on drop, so no browser outlives a
/// failed test.
pub struct Chromium {
    driver: Child,
    /// Browser profile and chromedriver's log.
    dir: PathBuf,
}

impl Chromium {
    /// Starts chromedriver in `ns`, with its log and the browser's profile
    /// under `dir` (made here, removed on drop).
    pub fn start(ns: &Netns, dir: &Path) -> Result<Chromium> {
        for tool in ["chromedriver", CHROMIUM] {
            if which::which(tool).is_err() {
                bail!(
                    "{tool} is missing: `cargo xtask setup` installs chromium and chromium-driver"
                );
            }
        }
        std::fs::create_dir_all(dir)?;
        let mut cmd = Command::new("chromedriver");
        cmd.arg(format!("--port={DRIVER_PORT}"))
            .arg(format!(
                "--log-path={}",
                dir.join("chromedriver.log").display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own group: the browser's processes join it.
            .process_group(0);
        let driver = spawn_in(&ns.name, &mut cmd)?;
        Ok(Chromium {
            driver,
            dir: dir.to_path_buf(),
        })
    }

    /// Opens a browser session: headless, with a window of `width` ×
    /// `height` CSS pixels. Call it on a thread inside the namespace (its
    /// connections to chromedriver are made there).
    pub async fn session(&self, width: u32, height: u32) -> Result<Client> {
        let profile = self.dir.join("profile");
        let args = [
            "--headless=new".to_string(),
            // Root in a test namespace: Chromium's sandbox needs a user.
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            // Nothing but the page: no updates, sync or crash reports.
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-breakpad".into(),
            "--no-first-run".into(),
            format!("--user-data-dir={}", profile.display()),
            format!("--window-size={width},{height}"),
        ];
        let mut caps = Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({ "binary": CHROMIUM, "args": args }),
        );
        let url = format!("http://127.0.0.1:{DRIVER_PORT}");
        let started = Instant::now();
        loop {
            let session = ClientBuilder::new(HttpConnector::new())
                .capabilities(caps.clone())
                .connect(&url)
                .await;
            match session {
                Ok(client) => return Ok(client),
                Err(e) if started.elapsed() > START_TIMEOUT => {
                    return Err(anyhow::anyhow!("{e}")).with_context(|| {
                        format!(
                            "no browser session from chromedriver in {START_TIMEOUT:?} (log: {})",
                            self.dir.join("chromedriver.log").display()
                        )
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group of a child we started (its
        // PID is the group's ID) and have not reaped.
        unsafe { libc::kill(-(self.driver.id() as i32), libc::SIGKILL) };
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Evaluates `script` (a function body, `return` for a value) in the page.
pub async fn eval(client: &Client, script: &str) -> Result<Value> {
    client
        .execute(script, Vec::new())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("running {script:?} in the page"))
}

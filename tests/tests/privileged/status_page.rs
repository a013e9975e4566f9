//! The status page in a real browser: headless Chromium, driven through
//! WebDriver, opens the daemon's page in the load balancer's namespace,
//! sees three backends up and traffic counted, sees one backend turn down
//! when its server dies without the page being reloaded, stays within a
//! phone's width, loads nothing from anywhere else, and leaves a
//! screenshot in the test's output (`target/tmp/status-page.png`).

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use fantoccini::{Client, Locator};
use lb::demo::server::{NameServer, http_get};
use lb_tests::{
    browser::{Chromium, eval},
    daemon::{Daemon, web_config},
    lan::Lan,
    require_root,
};
use serde_json::Value;

/// The page, as `web_config` serves it in the load balancer's namespace.
const PAGE: &str = "http://127.0.0.1:9108/";
const WAIT: Duration = Duration::from_secs(15);
/// The backend whose server the test stops.
const VICTIM: &str = "198.18.0.12";

#[test]
#[ignore = "needs root: cargo xtask test runs it"]
fn status_page_shows_a_backend_going_down_live_in_chromium() {
    require_root();
    run().unwrap();
}

fn run() -> Result<()> {
    let lan = Lan::build(3, &["198.18.1.1/32"])?;
    let mut servers: Vec<Option<NameServer>> = lan.serve_names(80)?.into_iter().map(Some).collect();
    let d = Daemon::start(&lan.lb, "status", &web_config(3))?;
    d.wait_in_table(3, WAIT)?;
    lan.client.run(|| {
        for _ in 0..30 {
            http_get(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(198, 18, 1, 1)),
                80,
            ))?;
        }
        Ok(())
    })?;
    let chromium = Chromium::start(&lan.lb, &d.dir.join("chromium"))?;
    let screenshot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");

    let shot = lan.lb.run(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let client = chromium.session(1100, 900).await?;
            let result = in_browser(&client, &mut servers).await;
            let _ = client.close().await;
            result
        })
    });
    let shot = shot?;
    std::fs::write(&screenshot, &shot)?;
    eprintln!("status page screenshot: {}", screenshot.display());

    // Scripts read the same data the page shows.
    let json: Value = serde_json::from_str(&lan.lb.run(|| get("/status.json"))?)?;
    let victim = json["backends"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["address"] == VICTIM))
        .context("no victim in /status.json")?;
    assert_eq!(victim["health"], "down", "{victim}");
    assert_eq!(json["backends"].as_array().map(Vec::len), Some(3));
    Ok(())
}

/// What the test does in the browser; returns the screenshot (PNG).
async fn in_browser(client: &Client, servers: &mut [Option<NameServer>]) -> Result<Vec<u8>> {
    client.goto(PAGE).await?;
    wait_for(
        client,
        "three backends up",
        |v| v == 3,
        "tr.backend[data-health=\"up\"]",
    )
    .await?;
    let forwarded = client
        .find(Locator::Css("tr[data-reason=\"forward_dsr\"]"))
        .await?
        .text()
        .await?;
    ensure!(forwarded.contains("forward_dsr"), "{forwarded}");

    // A reload would lose this.
    eval(client, "window.lbNotReloaded = true; return true;").await?;
    let started = Instant::now();
    servers[1] = None;
    let victim_down = format!("tr.backend[data-backend=\"{VICTIM}\"][data-health=\"down\"]");
    wait_for(client, "the victim down", |v| v == 1, &victim_down).await?;
    eprintln!(
        "the page showed {VICTIM} down {} ms after its server died (probes every 200 ms, fall 2; the page polls every 2 s)",
        started.elapsed().as_millis()
    );
    let kept = eval(client, "return window.lbNotReloaded === true;").await?;
    ensure!(kept == Value::Bool(true), "the page was reloaded to update");
    let up = client
        .find_all(Locator::Css("tr.backend[data-health=\"up\"]"))
        .await?;
    ensure!(up.len() == 2, "{} backends up", up.len());
    let events = client.find(Locator::Css("#events")).await?.text().await?;
    ensure!(
        events.contains("backend down") && events.contains(VICTIM),
        "events lack the victim going down:\n{events}"
    );

    // Everything the page loaded came from the daemon.
    let loaded = eval(
        client,
        "return performance.getEntriesByType('resource').map(e => e.name);",
    )
    .await?;
    for url in loaded.as_array().into_iter().flatten() {
        let url = url.as_str().unwrap_or_default();
        ensure!(url.starts_with(PAGE), "the page loaded {url}");
    }
    let shot = client.screenshot().await?;
    ensure!(shot.starts_with(b"\x89PNG"), "the screenshot is not a PNG");

    // A phone's width: the tables scroll inside their cards, the page
    // does not.
    client.set_window_size(390, 844).await?;
    let wide = eval(
        client,
        "const w = document.documentElement.clientWidth; \
         return [...document.querySelectorAll('body *')] \
           .filter(e => !e.closest('.scroll') && e.getBoundingClientRect().right > w + 0.5) \
           .map(e => e.tagName + '.' + e.className + ' ' + e.getBoundingClientRect().right + ' > ' + w);",
    )
    .await?;
    ensure!(
        wide.as_array().is_some_and(Vec::is_empty),
        "wider than a phone: {wide}"
    );
    // A table scrolled sideways stays where it was across polls, though
    // each poll builds the page anew.
    let scrolled = eval(
        client,
        "const box = document.querySelector('section.service .scroll'); \
         box.scrollLeft = 40; window.lbPolledBox = box; return box.scrollLeft;",
    )
    .await?;
    ensure!(
        scrolled.as_f64().is_some_and(|x| x > 0.0),
        "the table does not scroll at a phone's width: {scrolled}"
    );
    let polled = Instant::now();
    while eval(
        client,
        "return document.querySelector('section.service .scroll') === window.lbPolledBox;",
    )
    .await?
        == Value::Bool(true)
    {
        ensure!(
            polled.elapsed() < Duration::from_secs(10),
            "no poll in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = eval(
        client,
        "return document.querySelector('section.service .scroll').scrollLeft;",
    )
    .await?;
    ensure!(
        after == scrolled,
        "the table's scroll went from {scrolled} to {after} at a poll"
    );
    Ok(shot)
}

/// Waits until the number of elements `css` matches satisfies `done`.
async fn wait_for(
    client: &Client,
    what: &str,
    done: impl Fn(usize) -> bool,
    css: &str,
) -> Result<()> {
    let started = Instant::now();
    loop {
        let n = client.find_all(Locator::Css(css)).await?.len();
        if done(n) {
            return Ok(());
        }
        if started.elapsed() > WAIT {
            let body = client.find(Locator::Css("body")).await?.text().await?;
            bail!(
                "{what}: not within {WAIT:?} ({n} elements match {css}); the page shows:\n{body}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `GET path` from the daemon's listener, the body.
fn get(path: &str) -> Result<String> {
    let mut s = std::net::TcpStream::connect("127.0.0.1:9108")?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP head")?;
    ensure!(head.starts_with("HTTP/1.0 200"), "{head}");
    Ok(body.to_string())
}

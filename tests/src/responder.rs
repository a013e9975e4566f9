//! A server on a backend that answers each connection, after a delay it is
//! told, with the next of its lines (round robin) and closes: an agent, or
//! with an HTTP status line a health-check target.

use std::{
    io::{ErrorKind, Write as _},
    net::TcpListener,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow};
use lb::netns::Netns;

use crate::lan::Lan;

/// How long the responder takes to start, at most.
const START: Duration = Duration::from_secs(10);
/// How often an idle responder checks whether to stop.
const POLL: Duration = Duration::from_millis(5);

/// A running responder; stops when dropped.
pub struct Responder {
    lines: Arc<Mutex<(Vec<String>, usize)>>,
    delay_ms: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Responder {
    /// Listens on `port` of every IPv4 address in `ns`, answering `line`.
    pub fn start(ns: &Netns, port: u16, line: &str) -> Result<Responder> {
        let lines = Arc::new(Mutex::new((vec![line.to_string()], 0)));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (said, delay, count, flag) = (
            lines.clone(),
            delay_ms.clone(),
            accepted.clone(),
            stop.clone(),
        );
        let (ready, bound) = std::sync::mpsc::channel();
        let thread = ns.spawn(move || {
            let listener = TcpListener::bind(("0.0.0.0", port))?;
            listener.set_nonblocking(true)?;
            let _ = ready.send(());
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let line = {
                            let mut l = said.lock().map_err(|_| anyhow!("poisoned"))?;
                            let (lines, next) = &mut *l;
                            let line = lines[*next % lines.len()].clone();
                            *next += 1;
                            line
                        };
                        // Counted before its delay is read: a connection
                        // counted after a test set the delay answers late.
                        count.fetch_add(1, Ordering::SeqCst);
                        let delay = Duration::from_millis(delay.load(Ordering::SeqCst));
                        std::thread::sleep(delay);
                        let _ = s.write_all(format!("{line}\n").as_bytes());
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(POLL),
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(())
        });
        bound
            .recv_timeout(START)
            .with_context(|| format!("the responder in {} did not start", ns.name))?;
        Ok(Responder {
            lines,
            delay_ms,
            accepted,
            stop,
            thread: Some(thread),
        })
    }

    /// One responder on `port` of each of `lan`'s backends, in order.
    pub fn on_backends(lan: &Lan, port: u16, line: &str) -> Result<Vec<Responder>> {
        lan.backends
            .iter()
            .map(|h| Responder::start(&h.ns, port, line))
            .collect()
    }

    /// Answers `delay` late from now on (a connection accepted already
    /// keeps the delay it was accepted with).
    pub fn delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Answers `lines` from now on, in turn.
    pub fn say(&self, lines: &[&str]) {
        let mut l = self
            .lines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *l = (lines.iter().map(ToString::to_string).collect(), 0);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

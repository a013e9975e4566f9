//! Registrations sent straight to a standalone daemon's registration port
//! (`[registration]`), for hosts without etcd (pure: the message format,
//! its signature and its checks).
//!
//! One request per TCP connection: a line `MAC PAYLOAD`, where `PAYLOAD`
//! is JSON ([`Message`]) and `MAC` is the hex HMAC-SHA256 of the payload's
//! bytes under the shared secret both sides read from a file. The daemon
//! answers one line `MAC ANSWER` ([`Answer`]), its MAC over the request's
//! MAC and the answer, so an answer cannot be forged nor replayed to
//! another request (the agent acts on it: it stops draining at zero flows,
//! and sets the VIPs it names up on `lo`). A message more than
//! [`MAX_SKEW`] from the daemon's clock, or not newer than the last from
//! its sender for the same registration, is refused: a captured one cannot
//! be replayed.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use ring::hmac;
use serde::{Deserialize, Serialize};

use crate::{config::Mode, fleet::registry::Registration};

/// Longest request line the daemon reads.
pub const MAX_LINE: usize = 16 * 1024;
/// The least length of a shared secret, in bytes.
pub const MIN_SECRET: usize = 16;
/// How far a message's clock may be from the daemon's.
pub const MAX_SKEW: Duration = Duration::from_secs(30);

/// What an agent says (fields a daemon does not know are ignored, for
/// agents newer than it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// When it was sent, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// Leaving now: remove these registrations.
    #[serde(default)]
    pub leave: bool,
    /// Only asking: change nothing, answer the services' VIPs and modes.
    #[serde(default)]
    pub query: bool,
    /// service → registration.
    pub registrations: BTreeMap<String, Registration>,
}

/// What the daemon answers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    /// Why the whole request is refused (nothing in it was read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<String>,
    /// Why each registration the services did not admit was refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<String>,
    /// Flows the connection table still pins to each draining
    /// registration, by service.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub flows: BTreeMap<String, u64>,
    /// The VIP and mode of each service registered for (what the host must
    /// set itself up for).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub services: BTreeMap<String, (IpAddr, Mode)>,
    /// The daemon's lease in milliseconds, so an agent can tell whether its
    /// checks renew in time (absent from older daemons).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<u64>,
}

/// Why a request is refused before any of it is read as a registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not `MAC PAYLOAD`, or the MAC is not hex.
    #[error("malformed request")]
    Malformed,
    /// The MAC does not match: a wrong secret, or a changed payload.
    #[error("bad signature")]
    Signature,
    /// The payload is not a message.
    #[error("malformed payload")]
    Payload,
    /// Sent too long ago or too far ahead.
    #[error("clock skew over {MAX_SKEW:?}")]
    Stale,
    /// More connections open, from its address or in all, than the port
    /// takes: closed unread.
    #[error("too many connections open")]
    Busy,
}

impl Refusal {
    /// Its metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed",
            Refusal::Signature => "signature",
            Refusal::Payload => "payload",
            Refusal::Stale => "stale",
            Refusal::Busy => "busy",
        }
    }
}

/// The shared secret, as a signing key.
#[derive(Clone)]
pub struct Secret(hmac::Key);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// The secret from its bytes (surrounding whitespace trimmed).
    pub fn new(bytes: &[u8]) -> Result<Secret> {
        let trimmed = bytes.trim_ascii();
        if trimmed.len() < MIN_SECRET {
            bail!(
                "the shared secret has {} bytes: use at least {MIN_SECRET} (e.g. openssl rand -hex 32)",
                trimmed.len()
            );
        }
        Ok(Secret(hmac::Key::new(hmac::HMAC_SHA256, trimmed)))
    }

    /// Reads the secret from `path`.
    pub fn read(path: &Path) -> Result<Secret> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("reading the shared secret {}", path.display()))?;
        Secret::new(&bytes).with_context(|| path.display().to_string())
    }
}

/// Milliseconds since the Unix epoch at `t`.
pub fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// `MAC TEXT` with the MAC over `bound` and `text`.
fn signed_line(secret: &Secret, bound: &str, text: &str) -> String {
    let tag = hmac::sign(&secret.0, format!("{bound}{text}").as_bytes());
    format!("{} {text}\n", hex(tag.as_ref()))
}

/// Splits `MAC TEXT` and checks the MAC over `bound` and `TEXT`
/// (constant-time: a wrong guess learns nothing of the right MAC).
fn checked<'a>(secret: &Secret, bound: &str, line: &'a str) -> Result<(&'a str, &'a str), Refusal> {
    let (mac, text) = line.split_once(' ').ok_or(Refusal::Malformed)?;
    let tag = unhex(mac).ok_or(Refusal::Malformed)?;
    hmac::verify(&secret.0, format!("{bound}{text}").as_bytes(), &tag)
        .map_err(|_| Refusal::Signature)?;
    Ok((mac, text))
}

/// The request line for `message` (with its newline), and its MAC (which
/// its answer is bound to).
pub fn sign(secret: &Secret, message: &Message) -> Result<(String, String)> {
    let line = signed_line(secret, "", &serde_json::to_string(message)?);
    let mac = line
        .split_once(' ')
        .map(|(m, _)| m.to_string())
        .unwrap_or_default();
    Ok((line, mac))
}

/// The answer line to the request with MAC `request_mac`.
pub fn sign_answer(secret: &Secret, request_mac: &str, answer: &Answer) -> Result<String> {
    Ok(signed_line(
        secret,
        request_mac,
        &serde_json::to_string(answer)?,
    ))
}

/// Checks an answer line (without its newline) to the request with MAC
/// `request_mac`.
pub fn verify_answer(secret: &Secret, request_mac: &str, line: &str) -> Result<Answer, Refusal> {
    let (_, text) = checked(secret, request_mac, line)?;
    serde_json::from_str(text).map_err(|_| Refusal::Payload)
}

/// Checks a request line (without its newline) at time `now`; the message
/// and its MAC.
pub fn verify(secret: &Secret, line: &str, now: SystemTime) -> Result<(Message, String), Refusal> {
    let (mac, payload) = checked(secret, "", line)?;
    let message: Message = serde_json::from_str(payload).map_err(|_| Refusal::Payload)?;
    let skew = millis(now).abs_diff(message.time_ms);
    if u128::from(skew) > MAX_SKEW.as_millis() {
        return Err(Refusal::Stale);
    }
    Ok((message, mac.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::registry::FULL_PERCENT;

    fn secret(s: &str) -> Secret {
        Secret::new(s.as_bytes()).unwrap()
    }

    fn message(now: SystemTime) -> Message {
        let r = Registration {
            address: "198.18.0.11".parse().unwrap(),
            weight: 1,
            percent: FULL_PERCENT,
            draining: false,
            host: "h".into(),
            version: "0".into(),
        };
        Message {
            time_ms: millis(now),
            leave: false,
            query: false,
            registrations: [("web".to_string(), r)].into(),
        }
    }

    #[test]
    fn a_signed_message_verifies_and_nothing_else_does() {
        let key = secret("0123456789abcdef0123");
        let now = SystemTime::now();
        let m = message(now);
        let (line, mac) = sign(&key, &m).unwrap();
        let line = line.trim_end();
        assert_eq!(verify(&key, line, now), Ok((m.clone(), mac.clone())));

        let other = secret("0123456789abcdef0124");
        assert_eq!(verify(&other, line, now), Err(Refusal::Signature));
        let tampered = line.replace("\"weight\":1", "\"weight\":9");
        assert_eq!(verify(&key, &tampered, now), Err(Refusal::Signature));
        for bad in ["", "nospace", "zz {}", "abc {}"] {
            assert_eq!(verify(&key, bad, now), Err(Refusal::Malformed), "{bad:?}");
        }
        let late = now + MAX_SKEW + Duration::from_secs(1);
        assert_eq!(verify(&key, line, late), Err(Refusal::Stale));
        // Another payload under this one's tag.
        let (hex, _) = line.split_once(' ').unwrap();
        assert_eq!(
            verify(&key, &format!("{hex} []"), now),
            Err(Refusal::Signature)
        );
        // A payload signed with the secret that is not a message.
        let tag = hmac::sign(&key.0, b"[]");
        let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            verify(&key, &format!("{hex} []"), now),
            Err(Refusal::Payload)
        );
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(Secret::new(b"  short \n").is_err());
        assert!(Secret::new(b"0123456789abcdef\n").is_ok());
    }
}

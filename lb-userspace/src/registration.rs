//! Registrations sent straight to a standalone daemon's registration port
//! (`[registration]`), for hosts without etcd (pure: the message format,
//! its signature and its checks).
//!
//! One request per TCP connection: a line `MAC PAYLOAD`, where `PAYLOAD`
//! is JSON ([`Message`]) and `MAC` is the hex HMAC-SHA256 of the payload's
//! bytes under the shared secret both sides read from a file. The daemon
//! answers one JSON line ([`Answer`]). A message older or newer than
//! [`MAX_SKEW`] is refused, so a captured one can be replayed only within
//! that window, where it merely renews what its sender last said.

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

/// What an agent says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
}

impl Refusal {
    /// Its metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed",
            Refusal::Signature => "signature",
            Refusal::Payload => "payload",
            Refusal::Stale => "stale",
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

/// The request line for `message` (with its newline).
pub fn sign(secret: &Secret, message: &Message) -> Result<String> {
    let payload = serde_json::to_string(message)?;
    let tag = hmac::sign(&secret.0, payload.as_bytes());
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("{hex} {payload}\n"))
}

/// Checks a request line (without its newline) at time `now`.
pub fn verify(secret: &Secret, line: &str, now: SystemTime) -> Result<Message, Refusal> {
    let (hex, payload) = line.split_once(' ').ok_or(Refusal::Malformed)?;
    if hex.len() % 2 != 0 {
        return Err(Refusal::Malformed);
    }
    let tag = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()
        .ok_or(Refusal::Malformed)?;
    // Constant-time: a wrong guess learns nothing of the right tag.
    hmac::verify(&secret.0, payload.as_bytes(), &tag).map_err(|_| Refusal::Signature)?;
    let message: Message = serde_json::from_str(payload).map_err(|_| Refusal::Payload)?;
    let skew = millis(now).abs_diff(message.time_ms);
    if u128::from(skew) > MAX_SKEW.as_millis() {
        return Err(Refusal::Stale);
    }
    Ok(message)
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
        let line = sign(&key, &m).unwrap();
        let line = line.trim_end();
        assert_eq!(verify(&key, line, now), Ok(m.clone()));

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

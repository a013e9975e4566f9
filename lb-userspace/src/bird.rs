//! A client of BIRD's control socket (what `birdc` speaks), for the BGP
//! sessions' state in `lb node status` and `lb doctor`.
//!
//! The protocol is line based: BIRD greets with `0001 BIRD x.y.z ready.`,
//! and answers a command with lines `CCCC-text` (more follows) or
//! `CCCC text` (the last line), where a line starting with a space continues
//! the previous code. Codes 0xxx end a reply, 8xxx and 9xxx are errors.

use std::{path::Path, time::Duration};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::UnixStream,
};

/// How long BIRD may take to greet and answer.
const TIMEOUT: Duration = Duration::from_secs(2);

/// The code of `show protocols` rows.
const PROTOCOL_ROW: &str = "1002";

/// One row of `show protocols`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Protocol {
    /// Its name in BIRD's configuration.
    pub name: String,
    /// `BGP`, `Kernel`, `Device`, `BFD`, ...
    pub proto: String,
    /// `up`, `start`, `down`, ...
    pub state: String,
    /// For BGP: `Established`, `Active`, `Connect`, ..., with any error.
    pub info: String,
}

impl Protocol {
    /// A BGP session that is up.
    pub fn established(&self) -> bool {
        self.state == "up" && self.info.starts_with("Established")
    }
}

/// Sends `command` to BIRD at `socket` and returns the reply's lines
/// (without codes) and the final code.
pub async fn command(socket: &Path, command: &str) -> Result<Vec<(String, String)>> {
    tokio::time::timeout(TIMEOUT, exchange(socket, command))
        .await
        .with_context(|| format!("BIRD at {} did not answer in time", socket.display()))?
}

async fn exchange(socket: &Path, command: &str) -> Result<Vec<(String, String)>> {
    let stream = UnixStream::connect(socket).await.with_context(|| {
        format!(
            "cannot reach BIRD's control socket {} (is bird running? see [announce] bird_socket)",
            socket.display()
        )
    })?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let greeting = lines.next_line().await?.unwrap_or_default();
    if !greeting.starts_with("0001 ") {
        bail!(
            "{} is not BIRD's control socket: it said {greeting:?}",
            socket.display()
        );
    }
    write.write_all(format!("{command}\n").as_bytes()).await?;
    let mut out = Vec::new();
    let mut code = String::new();
    while let Some(line) = lines.next_line().await? {
        if let Some(rest) = line.strip_prefix(' ') {
            out.push((code.clone(), rest.to_string()));
            continue;
        }
        let (c, sep, text) = (line.get(..4), line.get(4..5), line.get(5..));
        let (Some(c), Some(sep), Some(text)) = (c, sep, text) else {
            bail!("BIRD sent a malformed line: {line:?}");
        };
        code = c.to_string();
        if code.starts_with('8') || code.starts_with('9') {
            bail!("BIRD refused `{command}`: {text}");
        }
        out.push((code.clone(), text.to_string()));
        if sep == " " {
            return Ok(out);
        }
    }
    bail!("BIRD closed the connection in the middle of a reply")
}

/// Parses `show protocols` rows: `name proto table state since info...`.
pub fn parse_protocols(reply: &[(String, String)]) -> Vec<Protocol> {
    reply
        .iter()
        .filter(|(code, _)| code == PROTOCOL_ROW)
        .filter_map(|(_, text)| {
            let mut words = text.split_whitespace().peekable();
            let name = words.next()?.to_string();
            let proto = words.next()?.to_string();
            let _table = words.next()?;
            let state = words.next()?.to_string();
            // `timeformat protocol` sets the since column's words: one
            // (`05:56:44.045`, `Dec06`) or two (`iso long`: a date and a
            // time). Each has a digit; the info's first word (a BGP state,
            // `Socket:`, `Error:`) has none.
            words.next_if(|w| w.bytes().any(|b| b.is_ascii_digit()))?;
            while words
                .next_if(|w| w.bytes().any(|b| b.is_ascii_digit()))
                .is_some()
            {}
            let info = words.collect::<Vec<_>>().join(" ");
            Some(Protocol {
                name,
                proto,
                state,
                info,
            })
        })
        .collect()
}

/// Every protocol BIRD runs.
pub async fn protocols(socket: &Path) -> Result<Vec<Protocol>> {
    Ok(parse_protocols(&command(socket, "show protocols").await?))
}

/// BIRD's BGP sessions.
pub async fn bgp_sessions(socket: &Path) -> Result<Vec<Protocol>> {
    Ok(protocols(socket)
        .await?
        .into_iter()
        .filter(|p| p.proto == "BGP")
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_show_protocols() {
        let reply: Vec<(String, String)> = [
            ("2002", "Name       Proto      Table      State  Since         Info"),
            ("1002", "device1    Device     ---        up     05:56:44.045  "),
            ("1002", "vips4      Kernel     master4    up     05:56:44.045  "),
            ("1002", "upstream   BGP        ---        up     05:56:48.602  Established   "),
            (
                "1002",
                "backup     BGP        ---        start  05:56:44.045  Active        Socket: Connection refused",
            ),
            ("0000", ""),
        ]
        .into_iter()
        .map(|(c, t)| (c.to_string(), t.to_string()))
        .collect();
        let p = parse_protocols(&reply);
        assert_eq!(p.len(), 4);
        assert_eq!(p[2].name, "upstream");
        assert!(p[2].established());
        assert_eq!(p[3].info, "Active Socket: Connection refused");
        assert!(!p[3].established());
        assert!(!p[1].established());
    }

    #[test]
    fn reads_the_info_whatever_the_since_columns_time_format() {
        for since in [
            "2026-12-06 05:56:48",
            "06-12-2026 05:56:48",
            "Dec06",
            "05:56:48",
        ] {
            let row = format!("upstream   BGP        ---        up     {since}  Established   ");
            let reply = vec![("1002".to_string(), row)];
            let p = parse_protocols(&reply);
            assert_eq!(p.len(), 1, "{since}");
            assert_eq!(p[0].info, "Established", "{since}");
            assert!(p[0].established(), "{since}");
        }
    }
}

//! `lb decap`: the decapsulator a backend of `ipip` and `gue` services runs. Its file
//! names the interfaces, this host's tunnel endpoints, the prefixes the load
//! balancers tunnel from, and the VIPs this host serves; `lb decap apply`
//! makes the pinned program and maps match it and exits (the pins keep it
//! running), `status` shows it, `remove` takes it away. See docs/decap.md.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
};

use anyhow::{Context as _, Result, anyhow};
use aya::programs::XdpMode;
use lb_common::{
    counters::DecapCounter,
    limits::{DEFAULT_GUE_PORT, MAX_ADDRESSES, MAX_DECAP_SOURCES},
};
use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::{
    config::{ConfigError, ConfigErrors, XdpModeSetting, from_toml, line_of, parse_source, usable},
    daemon::xdp_mode,
    dataplane::{self, DecapTables, Decapsulator},
};

/// Where operators keep the file by convention.
pub const DEFAULT_DECAP_FILE: &str = "/etc/lb/decap.toml";

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecapFile {
    /// Interfaces tunnel packets arrive on.
    interfaces: Vec<String>,
    /// `auto`, `native` or `generic`.
    #[serde(default)]
    xdp_mode: XdpModeSetting,
    /// This host's addresses that load balancers tunnel to.
    endpoints: Vec<Spanned<String>>,
    /// The load balancers' tunnel sources, `address/prefix`.
    accept_from: Vec<Spanned<String>>,
    /// The VIPs of the `ipip` and `gue` services this host is a backend of.
    vips: Vec<Spanned<String>>,
    /// The load balancers' `gue_port`; 0 takes no GUE packets.
    #[serde(default = "default_gue_port")]
    gue_port: u16,
}

fn default_gue_port() -> u16 {
    DEFAULT_GUE_PORT
}

/// A validated decapsulator file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecapConfig {
    /// Interfaces to attach to.
    pub interfaces: Vec<String>,
    /// How to attach.
    pub xdp_mode: XdpModeSetting,
    /// What the maps are to hold.
    pub tables: DecapTables,
}

/// Parses and validates `text`, reporting every problem at once.
pub fn parse(text: &str) -> Result<DecapConfig, ConfigErrors> {
    let file: DecapFile = from_toml(text, "file")?;
    let mut errors = Vec::new();
    let mut push = |at: Option<usize>, field: String, message: String| {
        errors.push(ConfigError {
            line: at.map(|o| line_of(text, o)),
            field,
            message,
        });
    };
    if file.interfaces.is_empty() {
        push(
            None,
            "interfaces".into(),
            "name at least one interface tunnel packets arrive on".into(),
        );
    }
    let mut seen = BTreeSet::new();
    for (i, iface) in file.interfaces.iter().enumerate() {
        if !seen.insert(iface) {
            push(
                None,
                format!("interfaces[{i}]"),
                format!("{iface} is listed twice"),
            );
        }
    }
    let mut addresses = |list: &[Spanned<String>], field: &str, what: &str| {
        let mut out = BTreeSet::new();
        if list.is_empty() {
            push(None, field.into(), format!("name at least one {what}"));
        }
        if list.len() > MAX_ADDRESSES as usize {
            push(
                None,
                field.into(),
                format!(
                    "{} addresses, more than the {MAX_ADDRESSES} lb decap holds",
                    list.len()
                ),
            );
        }
        for (i, a) in list.iter().enumerate() {
            let at = Some(a.span().start);
            match a.get_ref().parse::<IpAddr>() {
                Ok(ip) if usable(ip) => {
                    if !out.insert(ip) {
                        push(at, format!("{field}[{i}]"), format!("{ip} is listed twice"));
                    }
                }
                Ok(_) => push(at, format!("{field}[{i}]"), "not a unicast address".into()),
                Err(_) => push(
                    at,
                    format!("{field}[{i}]"),
                    format!("{:?} is not an IP address", a.get_ref()),
                ),
            }
        }
        out
    };
    let endpoints = addresses(
        &file.endpoints,
        "endpoints",
        "tunnel endpoint address of this host",
    );
    let vips = addresses(&file.vips, "vips", "VIP this host serves");
    let mut sources = BTreeSet::new();
    if file.accept_from.is_empty() {
        push(
            None,
            "accept_from".into(),
            "name the load balancers' tunnel sources (their tunnel_source_v4/v6 prefixes): \
             with none, every tunnel packet would be dropped"
                .into(),
        );
    }
    if file.accept_from.len() > MAX_DECAP_SOURCES as usize {
        push(
            None,
            "accept_from".into(),
            format!(
                "{} prefixes, more than the {MAX_DECAP_SOURCES} lb decap holds",
                file.accept_from.len()
            ),
        );
    }
    for (i, p) in file.accept_from.iter().enumerate() {
        match parse_source(p.get_ref()) {
            Ok(prefix) => {
                if !sources.insert(prefix) {
                    push(
                        Some(p.span().start),
                        format!("accept_from[{i}]"),
                        "listed twice".into(),
                    );
                }
            }
            Err(message) => push(Some(p.span().start), format!("accept_from[{i}]"), message),
        }
    }
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    Ok(DecapConfig {
        interfaces: file.interfaces,
        xdp_mode: file.xdp_mode,
        tables: DecapTables {
            endpoints,
            sources,
            vips,
            gue_port: file.gue_port,
        },
    })
}

/// Reads and validates the file at `path`.
pub fn read(path: &Path) -> Result<DecapConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&text).map_err(|e| anyhow!("{} is invalid:\n{e}", path.display()))
}

/// What [`apply`] changed.
#[derive(Debug, Default, Serialize)]
pub struct Applied {
    /// Interfaces the decapsulator now runs on.
    pub attached: Vec<String>,
    /// Interfaces it ran on before and no longer does.
    pub detached: Vec<String>,
}

/// Makes the decapsulator pinned under `dir` run as `config` says: the maps
/// first (new entries before stale ones go), then every interface attached
/// (a link already pinned is switched in place), then interfaces no longer
/// named detached. Every interface is checked before anything changes; if
/// an attach fails, the maps and the interfaces attached by this call are
/// put back as they were.
pub fn apply(config: &DecapConfig, dir: &Path) -> Result<Applied> {
    for iface in &config.interfaces {
        dataplane::read_interface(iface)?;
    }
    let mut decap = Decapsulator::load_pinned(dir)?;
    let before = decap.tables()?;
    // The interfaces it runs on and their modes: a failure part way puts
    // back the mode of those this apply switched, and detaches the others.
    let had: BTreeMap<String, Option<XdpMode>> = dataplane::pinned_interfaces(dir)?
        .into_iter()
        .map(|iface| {
            let mode = dataplane::attached_mode(&iface);
            (iface, mode)
        })
        .collect();
    decap.set_tables(&config.tables)?;
    let mode = xdp_mode(config.xdp_mode);
    for (i, iface) in config.interfaces.iter().enumerate() {
        if let Err(e) = decap.attach(iface, mode, Some(dir)) {
            // The failed one too: a switch of mode that failed both ways
            // has taken its program away.
            let mut left: Vec<String> = config.interfaces[..=i]
                .iter()
                .enumerate()
                .filter_map(|(j, done)| {
                    let attached = j < i;
                    let undone = put_back(&mut decap, dir, done, had.get(done), mode, attached);
                    undone.err().map(|u| format!("{done}: {u:#}"))
                })
                .collect();
            if let Err(r) = decap.set_tables(&before) {
                left.push(format!("restoring the previous addresses: {r:#}"));
            }
            return Err(if left.is_empty() {
                e.context("nothing changed")
            } else {
                e.context(format!("and undoing the rest failed: {}", left.join("; ")))
            });
        }
    }
    let mut applied = Applied {
        attached: config.interfaces.clone(),
        detached: Vec::new(),
    };
    for iface in had.into_keys() {
        if !config.interfaces.contains(&iface) {
            dataplane::detach(dir, &iface)?;
            applied.detached.push(iface);
        }
    }
    Ok(applied)
}

/// Undoes what a failed [`apply`] did to `iface`, which ran in `had`
/// before it (`None`: not at all; `Some(None)`: in a mode that could not
/// be read) and which `apply` tried to attach in `mode` (`attached`: did).
fn put_back(
    decap: &mut Decapsulator,
    dir: &Path,
    iface: &str,
    had: Option<&Option<XdpMode>>,
    mode: XdpMode,
    attached: bool,
) -> Result<()> {
    match had {
        None if attached => dataplane::detach(dir, iface),
        None => Ok(()),
        Some(Some(old)) if *old != mode => {
            decap.attach(iface, *old, Some(dir))?;
            match dataplane::attached_mode(iface) {
                Some(now) if now == *old => Ok(()),
                now => Err(anyhow!("left in {now:?}, not {old:?}")),
            }
        }
        Some(None) if mode != XdpMode::Default => Err(anyhow!(
            "its mode before could not be read: left as the new file says"
        )),
        Some(_) => Ok(()),
    }
}

/// The decapsulator pinned under a directory, as `lb decap status` shows it.
#[derive(Debug, Serialize)]
pub struct Status {
    /// Interfaces with a pinned link.
    pub interfaces: Vec<String>,
    /// Tunnel endpoints.
    pub endpoints: Vec<IpAddr>,
    /// Accepted source prefixes, `address/len`.
    pub accept_from: Vec<String>,
    /// VIPs inner packets may be addressed to.
    pub vips: Vec<IpAddr>,
    /// The UDP port GUE packets come to (0: none taken).
    pub gue_port: u16,
    /// Every counter by name, summed over CPUs.
    pub counters: BTreeMap<&'static str, u64>,
}

impl Status {
    /// One line per field, then one per counter, for a terminal.
    pub fn render(&self) -> String {
        let list = |v: Vec<String>| {
            if v.is_empty() {
                "-".to_string()
            } else {
                v.join(" ")
            }
        };
        let ips = |v: &[IpAddr]| list(v.iter().map(ToString::to_string).collect());
        let mut rows = vec![
            ("interfaces", list(self.interfaces.clone())),
            ("endpoints", ips(&self.endpoints)),
            ("accept_from", list(self.accept_from.clone())),
            ("vips", ips(&self.vips)),
            ("gue_port", self.gue_port.to_string()),
        ];
        rows.extend(self.counters.iter().map(|(name, n)| (*name, n.to_string())));
        rows.iter().map(|(k, v)| format!("{k:<20} {v}\n")).collect()
    }
}

/// Reads the decapsulator pinned under `dir`.
pub fn status(dir: &Path) -> Result<Status> {
    let (tables, counters) = dataplane::read_pinned(dir)?;
    Ok(Status {
        interfaces: dataplane::pinned_interfaces(dir)?.into_iter().collect(),
        endpoints: tables.endpoints.into_iter().collect(),
        accept_from: tables
            .sources
            .iter()
            .map(|(ip, len)| format!("{ip}/{len}"))
            .collect(),
        vips: tables.vips.into_iter().collect(),
        gue_port: tables.gue_port,
        counters: DecapCounter::ALL
            .iter()
            .map(|c| (c.name(), counters[*c as usize]))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
interfaces = ["eth0"]
endpoints = ["198.18.1.10", "2001:2:0:1::10"]
accept_from = ["198.18.0.0/24", "2001:2::/64"]
vips = ["198.18.100.1", "2001:2:100::1"]
"#;

    #[test]
    fn a_good_file_reads_as_written() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.interfaces, ["eth0"]);
        assert_eq!(c.xdp_mode, XdpModeSetting::Auto);
        assert_eq!(c.tables.endpoints.len(), 2);
        assert!(
            c.tables
                .sources
                .contains(&("198.18.0.0".parse().unwrap(), 24))
        );
        assert!(
            c.tables
                .sources
                .contains(&("2001:2::".parse().unwrap(), 64))
        );
        assert_eq!(c.tables.vips.len(), 2);
        assert_eq!(c.tables.gue_port, DEFAULT_GUE_PORT);
    }

    fn errors(text: &str) -> Vec<String> {
        parse(text)
            .unwrap_err()
            .0
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn the_example_file_is_valid() {
        let c = parse(include_str!("../../examples/decap.toml")).unwrap();
        assert_eq!(c.tables.sources.len(), 2);
    }

    #[test]
    fn every_problem_is_reported_with_where_it_is() {
        let text = r#"
interfaces = []
endpoints = ["198.18.1.300", "224.0.0.1"]
accept_from = ["198.18.0.1/24", "2001:2::/129", "nonsense", "198.18.0.0/24", "198.18.0.0/24"]
vips = []
"#;
        let e = errors(text);
        let want = [
            "interfaces: name at least one interface",
            "line 3: endpoints[0]: \"198.18.1.300\" is not an IP address",
            "line 3: endpoints[1]: not a unicast address",
            "vips: name at least one VIP",
            "line 4: accept_from[0]: 198.18.0.1/24 has host bits set; the prefix is 198.18.0.0/24",
            "line 4: accept_from[1]: /129 is longer",
            "line 4: accept_from[2]: \"nonsense\" is not a prefix",
            "line 4: accept_from[4]: listed twice",
        ];
        for w in want {
            assert!(
                e.iter().any(|x| x.starts_with(w)),
                "missing {w:?} in {e:#?}"
            );
        }
        assert_eq!(e.len(), want.len(), "{e:#?}");
    }

    #[test]
    fn no_accepted_source_is_refused_not_read_as_anyone() {
        let text = GOOD.replace(
            r#"accept_from = ["198.18.0.0/24", "2001:2::/64"]"#,
            "accept_from = []",
        );
        let e = errors(&text);
        assert!(
            e[0].starts_with("accept_from: name the load balancers'"),
            "{e:?}"
        );
    }

    #[test]
    fn unknown_keys_and_missing_sections_are_errors() {
        assert!(errors(&format!("{GOOD}\nextra = 1"))[0].contains("unknown field"));
        assert!(errors("interfaces = [\"eth0\"]")[0].contains("missing field"));
    }

    #[test]
    fn status_renders_a_line_per_field_and_counter() {
        let status = Status {
            interfaces: vec!["eth0".into()],
            endpoints: vec!["198.18.0.11".parse().unwrap()],
            accept_from: Vec::new(),
            vips: vec![
                "198.18.1.2".parse().unwrap(),
                "2001:2:1::2".parse().unwrap(),
            ],
            gue_port: DEFAULT_GUE_PORT,
            counters: [("decapsulated", 7)].into(),
        };
        let text = status.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 6, "{text}");
        assert!(
            lines[2].starts_with("accept_from") && lines[2].ends_with(" -"),
            "{text}"
        );
        assert!(lines[3].ends_with("198.18.1.2 2001:2:1::2"), "{text}");
        assert!(
            lines[5].starts_with("decapsulated") && lines[5].ends_with(" 7"),
            "{text}"
        );
    }
}

//! Edits of a configuration file's text for `lb service add|del`,
//! `lb backend add|del` and `lb acl add|del`. The edits keep the operator's comments and layout
//! (toml_edit), and the result is validated as a whole like any file: an edit
//! is only a quicker way to write the next configuration.

use std::net::IpAddr;

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use toml_edit::{Array, ArrayOfTables, DocumentMut, Item, Table, value};

use crate::{
    config::{Affinity, CheckKind, Mode, Protocol, parse_source},
    dataplane::SourceList,
};

/// One change to the set of services and backends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Edit {
    /// A new service, with no backends yet and default health settings.
    AddService {
        /// Unique name.
        name: String,
        /// Virtual IP.
        vip: IpAddr,
        /// Port.
        port: u16,
        /// tcp or udp.
        protocol: Protocol,
        /// Forwarding mode.
        mode: Mode,
        /// What picks the backend.
        affinity: Affinity,
        /// Health probe kind.
        check: CheckKind,
        /// The probe's request payload (`udp`: required).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        send: Option<String>,
        /// The reply's expected prefix (`udp`: required).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expect: Option<String>,
    },
    /// Removes a service and its backends.
    DelService {
        /// Service name.
        name: String,
    },
    /// A new backend of a service.
    AddBackend {
        /// Service name.
        service: String,
        /// Backend address.
        address: IpAddr,
        /// Weight.
        weight: u32,
        /// Into the table on its first successful probe instead of its
        /// first `rise` (a run-time hint: the file does not keep it).
        #[serde(default)]
        trust_first_probe: bool,
    },
    /// Removes a backend from a service.
    DelBackend {
        /// Service name.
        service: String,
        /// Backend address.
        address: IpAddr,
    },
    /// A prefix added to one of a service's source lists.
    AddSource {
        /// Service name.
        service: String,
        /// Which list.
        list: SourceList,
        /// `address/length`, validated with the rest of the file.
        prefix: String,
    },
    /// A prefix removed from one of a service's source lists.
    DelSource {
        /// Service name.
        service: String,
        /// Which list.
        list: SourceList,
        /// `address/length`, as listed (compared as a prefix when it parses).
        prefix: String,
        /// The allow list's last prefix may go, which opens the service to
        /// every source.
        #[serde(default)]
        open: bool,
    },
}

/// TOML keys of the configuration file, spelled once.
const SERVICE: &str = "service";
const BACKEND: &str = "backend";

impl Edit {
    /// Adding `prefix` to service `service`'s `list` (`add`), or removing
    /// it (`open`: even the allow list's last prefix).
    pub fn source(
        add: bool,
        service: String,
        list: SourceList,
        prefix: String,
        open: bool,
    ) -> Edit {
        if add {
            Edit::AddSource {
                service,
                list,
                prefix,
            }
        } else {
            Edit::DelSource {
                service,
                list,
                prefix,
                open,
            }
        }
    }

    /// Returns `text` with the edit made. Fails, saying why, if the service
    /// or backend it names does not exist or already exists.
    pub fn apply_to(&self, text: &str) -> Result<String> {
        let mut doc: DocumentMut = text
            .parse()
            .context("the running configuration is not valid TOML")?;
        match self {
            Edit::AddService {
                name,
                vip,
                port,
                protocol,
                mode,
                affinity,
                check,
                send,
                expect,
            } => {
                if find_service(&doc, name).is_some() {
                    bail!("service {name:?} already exists (see `lb service list`)");
                }
                let mut t = Table::new();
                t.insert("name", value(name.as_str()));
                t.insert("vip", value(vip.to_string()));
                t.insert("port", value(i64::from(*port)));
                t.insert("protocol", value(enum_str(protocol)?));
                t.insert("mode", value(enum_str(mode)?));
                t.insert("affinity", value(enum_str(affinity)?));
                let mut health = Table::new();
                health.insert("check", value(enum_str(check)?));
                for (key, text) in [("send", send), ("expect", expect)] {
                    if let Some(text) = text {
                        health.insert(key, value(text.as_str()));
                    }
                }
                t.insert("health", Item::Table(health));
                services_mut(&mut doc)?.push(t);
            }
            Edit::DelService { name } => {
                let i = find_service(&doc, name).with_context(|| {
                    format!("no service named {name:?} (see `lb service list`)")
                })?;
                services_mut(&mut doc)?.remove(i);
            }
            Edit::AddBackend {
                service,
                address,
                weight,
                ..
            } => {
                let backends = backends_mut(&mut doc, service)?;
                if find_backend(backends, *address).is_some() {
                    bail!("service {service:?} already has backend {address}");
                }
                let mut t = Table::new();
                t.insert("address", value(address.to_string()));
                t.insert("weight", value(i64::from(*weight)));
                backends.push(t);
            }
            Edit::DelBackend { service, address } => {
                let backends = backends_mut(&mut doc, service)?;
                let i = find_backend(backends, *address).with_context(|| {
                    format!("service {service:?} has no backend {address} (see `lb backend list`)")
                })?;
                backends.remove(i);
            }
            Edit::AddSource {
                service,
                list,
                prefix,
            } => {
                let prefixes = source_list_mut(&mut doc, service, *list)?;
                if find_prefix(prefixes, prefix).is_some() {
                    bail!(
                        "service {service:?}'s {} list already has {prefix}",
                        list.name()
                    );
                }
                prefixes.push(prefix.as_str());
            }
            Edit::DelSource {
                service,
                list,
                prefix,
                open,
            } => {
                let prefixes = source_list_mut(&mut doc, service, *list)?;
                let i = find_prefix(prefixes, prefix).with_context(|| {
                    format!(
                        "service {service:?}'s {} list has no {prefix} (see `lb acl list`)",
                        list.name()
                    )
                })?;
                // An empty allow list admits every source: a service kept
                // private must not open by the removal of one prefix.
                if *list == SourceList::Allow && prefixes.len() == 1 && !open {
                    bail!(
                        "{prefix} is the last prefix of service {service:?}'s allow list: without \
                         it every source is admitted. Give --open to remove it all the same, or \
                         add the prefixes to keep first"
                    );
                }
                prefixes.remove(i);
            }
        }
        Ok(doc.to_string())
    }
}

/// How many `[[service]]` tables a configuration file has.
pub fn service_count(text: &str) -> usize {
    text.parse::<DocumentMut>().map_or(0, |doc| {
        doc.get(SERVICE)
            .and_then(Item::as_array_of_tables)
            .map_or(0, toml_edit::ArrayOfTables::len)
    })
}

/// Whether a configuration file has the top-level table `name`.
pub fn has_table(text: &str, name: &str) -> bool {
    text.parse::<DocumentMut>()
        .is_ok_and(|doc| doc.contains_key(name))
}

/// The `[[service]]` tables of a configuration file, and nothing else: what
/// a fleet keeps in etcd (`lb fleet import`, `lb apply` on a fleet node).
pub fn services_only(text: &str) -> Result<String> {
    let mut doc: DocumentMut = text.parse().context("the file is not valid TOML")?;
    let others: Vec<String> = doc
        .iter()
        .map(|(k, _)| k.to_string())
        .filter(|k| k != SERVICE)
        .collect();
    for k in others {
        doc.remove(&k);
    }
    Ok(doc.to_string().trim_start().to_string())
}

/// A fleet node's file as a standalone one: without `[fleet]`, with the
/// fleet's services appended (`lb fleet export`).
pub fn standalone(node_text: &str, services_text: &str) -> Result<String> {
    let mut doc: DocumentMut = node_text
        .parse()
        .context("the node's file is not valid TOML")?;
    doc.remove("fleet");
    Ok(format!("{}\n{services_text}", doc.to_string().trim_end()))
}

/// The configuration spelling of a unit enum (`dsr-l2`, `tcp`, ...).
fn enum_str(v: &impl Serialize) -> Result<String> {
    match serde_json::to_value(v)? {
        serde_json::Value::String(s) => Ok(s),
        other => bail!("{other} is not a unit variant"),
    }
}

fn services(doc: &DocumentMut) -> Option<&ArrayOfTables> {
    doc.get(SERVICE)?.as_array_of_tables()
}

fn services_mut(doc: &mut DocumentMut) -> Result<&mut ArrayOfTables> {
    doc.entry(SERVICE)
        .or_insert(Item::ArrayOfTables(ArrayOfTables::new()))
        .as_array_of_tables_mut()
        .context("`service` is not an array of tables ([[service]])")
}

fn find_service(doc: &DocumentMut, name: &str) -> Option<usize> {
    services(doc)?
        .iter()
        .position(|t| t.get("name").and_then(Item::as_str) == Some(name))
}

fn backends_mut<'a>(doc: &'a mut DocumentMut, service: &str) -> Result<&'a mut ArrayOfTables> {
    let i = find_service(doc, service)
        .with_context(|| format!("no service named {service:?} (see `lb service list`)"))?;
    let svc = services_mut(doc)?
        .get_mut(i)
        .context("service vanished while editing")?;
    svc.entry(BACKEND)
        .or_insert(Item::ArrayOfTables(ArrayOfTables::new()))
        .as_array_of_tables_mut()
        .with_context(|| format!("service {service:?}: `backend` is not [[service.backend]]"))
}

/// Service `service`'s `list` (`deny = [...]`), made if missing.
fn source_list_mut<'a>(
    doc: &'a mut DocumentMut,
    service: &str,
    list: SourceList,
) -> Result<&'a mut Array> {
    let i = find_service(doc, service)
        .with_context(|| format!("no service named {service:?} (see `lb service list`)"))?;
    let svc = services_mut(doc)?
        .get_mut(i)
        .context("service vanished while editing")?;
    svc.entry(list.name())
        .or_insert(Item::Value(toml_edit::Value::Array(Array::new())))
        .as_array_mut()
        .with_context(|| format!("service {service:?}: `{}` is not an array", list.name()))
}

/// Compares parsed prefixes where both parse, so `2001:2::/64` matches
/// `2001:0002::/64`; the text otherwise.
fn find_prefix(prefixes: &Array, prefix: &str) -> Option<usize> {
    let parsed = parse_source(prefix).ok();
    prefixes.iter().position(|v| {
        v.as_str()
            .is_some_and(|p| match (&parsed, parse_source(p)) {
                (Some(want), Ok(have)) => *want == have,
                _ => p == prefix,
            })
    })
}

/// Compares parsed addresses, so `2001:2::11` matches `2001:0002::0011`.
fn find_backend(backends: &ArrayOfTables, address: IpAddr) -> Option<usize> {
    backends.iter().position(|t| {
        t.get("address")
            .and_then(Item::as_str)
            .and_then(|a| a.parse::<IpAddr>().ok())
            == Some(address)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_file_splits_into_node_settings_and_fleet_services() {
        let file = "[settings]\ninterfaces = [\"eth0\"]\n\n[fleet]\nendpoints = [\"http://198.18.0.254:2379\"]\n\n# the web tier\n[[service]]\nname = \"web\"\nvip = \"198.18.1.1\"\nport = 80\nprotocol = \"tcp\"\n";
        let services = super::services_only(file).unwrap();
        assert!(services.contains("[[service]]") && services.contains("the web tier"));
        assert!(!services.contains("settings") && !services.contains("fleet"));
        let node = "[settings]\ninterfaces = [\"eth0\"]\n\n[fleet]\nendpoints = [\"http://198.18.0.254:2379\"]\n";
        let back = super::standalone(node, &services).unwrap();
        let d = crate::config::parse(&back).unwrap();
        assert!(d.settings.fleet.is_none());
        assert_eq!(d.services.len(), 1);
    }

    use super::*;
    use crate::config;

    const BASE: &str = r#"# operator's comment, kept
[settings]
interfaces = ["eth0"]
tunnel_source_v6 = "2001:2:ff::/112"

[[service]]
name = "web"   # the site
vip = "198.18.1.1"
port = 80
protocol = "tcp"

[[service.backend]]
address = "198.18.0.11"
"#;

    fn add_backend(addr: &str, weight: u32) -> Edit {
        Edit::AddBackend {
            service: "web".into(),
            address: addr.parse().unwrap(),
            weight,
            trust_first_probe: false,
        }
    }

    #[test]
    fn adds_and_removes_source_prefixes_keeping_comments() {
        let edit = |add: bool, list: SourceList, prefix: &str| {
            Edit::source(add, "web".into(), list, prefix.into(), false)
        };
        let text = edit(true, SourceList::Deny, "198.18.2.0/24")
            .apply_to(BASE)
            .unwrap();
        let text = edit(true, SourceList::Allow, "198.18.0.0/16")
            .apply_to(&text)
            .unwrap();
        assert!(text.contains("name = \"web\"   # the site"), "{text}");
        let web = &config::parse(&text).unwrap().services["web"];
        let prefix = |s: &str| config::parse_source(s).unwrap();
        assert_eq!(web.deny, [prefix("198.18.2.0/24")].into());
        assert_eq!(web.allow, [prefix("198.18.0.0/16")].into());
        let err = edit(true, SourceList::Deny, "198.18.2.0/24")
            .apply_to(&text)
            .unwrap_err();
        assert!(err.to_string().contains("already has"), "{err}");
        let text = edit(false, SourceList::Deny, "198.18.2.0/24")
            .apply_to(&text)
            .unwrap();
        assert!(
            config::parse(&text).unwrap().services["web"]
                .deny
                .is_empty()
        );
        let err = edit(false, SourceList::Deny, "198.18.2.0/24")
            .apply_to(&text)
            .unwrap_err();
        assert!(err.to_string().contains("has no 198.18.2.0/24"), "{err}");
        // The allow list's last prefix goes only with `open`: without it,
        // every source is admitted.
        let err = edit(false, SourceList::Allow, "198.18.0.0/16")
            .apply_to(&text)
            .unwrap_err();
        assert!(err.to_string().contains("--open"), "{err}");
        let wider = edit(true, SourceList::Allow, "198.19.0.0/16")
            .apply_to(&text)
            .unwrap();
        let narrower = edit(false, SourceList::Allow, "198.18.0.0/16")
            .apply_to(&wider)
            .unwrap();
        assert_eq!(
            config::parse(&narrower).unwrap().services["web"].allow,
            [prefix("198.19.0.0/16")].into()
        );
        let open = Edit::source(
            false,
            "web".into(),
            SourceList::Allow,
            "198.18.0.0/16".into(),
            true,
        )
        .apply_to(&text)
        .unwrap();
        assert!(
            config::parse(&open).unwrap().services["web"]
                .allow
                .is_empty()
        );
        let err = Edit::AddSource {
            service: "nope".into(),
            list: SourceList::Allow,
            prefix: "198.18.0.0/16".into(),
        }
        .apply_to(&text)
        .unwrap_err();
        assert!(err.to_string().contains("no service named"), "{err}");
    }

    #[test]
    fn adds_and_removes_backends_keeping_comments() {
        let text = add_backend("198.18.0.12", 3).apply_to(BASE).unwrap();
        assert!(text.contains("# operator's comment, kept"));
        assert!(text.contains("name = \"web\"   # the site"));
        let d = config::parse(&text).unwrap();
        let web = &d.services["web"];
        assert_eq!(web.backends[&"198.18.0.12".parse().unwrap()], 3);
        assert_eq!(web.backends.len(), 2);

        let del = Edit::DelBackend {
            service: "web".into(),
            address: "198.18.0.11".parse().unwrap(),
        };
        let text = del.apply_to(&text).unwrap();
        let d = config::parse(&text).unwrap();
        assert_eq!(d.services["web"].backends.len(), 1);
        assert!(
            del.apply_to(&text)
                .unwrap_err()
                .to_string()
                .contains("has no backend")
        );
    }

    #[test]
    fn refuses_duplicates_and_unknown_names() {
        let err = add_backend("198.18.0.11", 1).apply_to(BASE).unwrap_err();
        assert!(err.to_string().contains("already has backend"), "{err}");
        let err = Edit::AddBackend {
            service: "nope".into(),
            address: "198.18.0.12".parse().unwrap(),
            weight: 1,
            trust_first_probe: false,
        }
        .apply_to(BASE)
        .unwrap_err();
        assert!(
            err.to_string().contains("no service named \"nope\""),
            "{err}"
        );
        let err = Edit::DelService {
            name: "nope".into(),
        }
        .apply_to(BASE)
        .unwrap_err();
        assert!(err.to_string().contains("no service named"), "{err}");
    }

    #[test]
    fn adds_and_removes_services() {
        let add = Edit::AddService {
            name: "dns".into(),
            vip: "2001:2:1::53".parse().unwrap(),
            port: 53,
            protocol: Protocol::Udp,
            mode: Mode::Ipip,
            affinity: Affinity::Client,
            check: CheckKind::Udp,
            send: Some("ping".into()),
            expect: Some("pong".into()),
        };
        let text = add.apply_to(BASE).unwrap();
        let d = config::parse(&text).unwrap();
        let dns = &d.services["dns"];
        assert_eq!(dns.port, 53);
        assert_eq!(dns.mode, Mode::Ipip);
        assert_eq!(dns.affinity, Affinity::Client);
        assert!(dns.backends.is_empty());
        assert_eq!(
            dns.health.kind,
            config::Probe::Udp {
                send: b"ping".to_vec(),
                expect: b"pong".to_vec()
            }
        );
        assert!(
            add.apply_to(&text)
                .unwrap_err()
                .to_string()
                .contains("already exists")
        );

        let text = Edit::DelService { name: "web".into() }
            .apply_to(&text)
            .unwrap();
        let d = config::parse(&text).unwrap();
        assert_eq!(d.services.keys().collect::<Vec<_>>(), ["dns"]);
    }

    #[test]
    fn adds_the_first_service_to_a_file_without_any() {
        let text = Edit::AddService {
            name: "web".into(),
            vip: "198.18.1.1".parse().unwrap(),
            port: 443,
            protocol: Protocol::Tcp,
            mode: Mode::DsrL2,
            affinity: Affinity::None,
            check: CheckKind::Tcp,
            send: None,
            expect: None,
        }
        .apply_to("[settings]\ninterfaces = [\"eth0\"]\n")
        .unwrap();
        assert_eq!(config::parse(&text).unwrap().services["web"].port, 443);
    }
}

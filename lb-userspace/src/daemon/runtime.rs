//! Operator changes made at run time (weights, drain, maintenance). They
//! override the configuration file and persist in the state file, so they
//! survive a daemon restart and a configuration reload; so does each
//! backend's health history.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    time::SystemTime,
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use tracing::{error, warn};

use crate::fleet::state::FleetState;

/// What an operator says of a backend, beside what the probes say.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Admin {
    /// In rotation when healthy.
    #[default]
    Ready,
    /// No new flows; established flows stay until they end.
    Drain,
    /// No traffic at all and no probes.
    Maintenance,
}

/// One backend's overrides.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Override {
    /// Weight replacing the configured one, at most
    /// [`crate::config::MAX_WEIGHT`] (checked where one is read: the API,
    /// the fleet's overrides, the state file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Operator state.
    #[serde(default)]
    pub admin: Admin,
}

/// Where the state file at `path` keeps its previous copy.
pub fn previous_copy(path: &Path) -> PathBuf {
    path.with_extension("prev")
}

/// Where the state file at `path` is written before it replaces the file.
fn temporary_copy(path: &Path) -> PathBuf {
    path.with_extension("tmp")
}

/// Refuses a state file at `path` that would write over the configuration
/// file `config`: the file, its temporary or its previous copy being the
/// configuration (a typo, a link). Loading would set the configuration
/// aside as a corrupt state file, and saving would put JSON in its place.
/// Files are compared by device and inode, so any path to the same file
/// counts; a file that does not exist yet is not the configuration.
pub fn check_apart_from(path: &Path, config: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let file_id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let Some(config_id) = file_id(config) else {
        // Read already, but gone or not a file of its own: nothing to keep.
        return Ok(());
    };
    for written in [
        path.to_path_buf(),
        temporary_copy(path),
        previous_copy(path),
    ] {
        if file_id(&written) == Some(config_id) {
            bail!(
                "state_file {} would write over the configuration file {} ({} is one of the files it writes): name another file",
                path.display(),
                config.display(),
                written.display()
            );
        }
    }
    Ok(())
}

/// The state file at `path`: `None` if there is none, else what it parses
/// to.
fn read(path: &Path) -> Result<Option<Result<Runtime, serde_json::Error>>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(serde_json::from_str(&text))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Overrides by service name and backend address, and the ids the data
/// plane knows services and backends by.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Runtime {
    /// service → backend → override.
    #[serde(default)]
    pub overrides: BTreeMap<String, BTreeMap<IpAddr, Override>>,
    /// service → its id and its backends' ids. Kept so that a restarted
    /// daemon addresses the pinned maps exactly as its predecessor did.
    #[serde(default)]
    pub ids: BTreeMap<String, ServiceIds>,
    /// service → backend → its health history, as of the last health
    /// transition or change, so `lb health` after a restart still says
    /// since when a backend is up and how often it changed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub history: BTreeMap<String, BTreeMap<IpAddr, History>>,
    /// What the operator says of the whole node.
    #[serde(default)]
    pub node: NodeState,
    /// A fleet node's last applied fleet state, so a restart while etcd is
    /// unreachable still has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetState>,
    /// A standalone daemon's registrations from `lb agent`s
    /// (`[registration]`), kept so a restart keeps their backends.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub registered: super::registrations::HeldRegistrations,
}

/// The operator's word on the node as a whole.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    /// `lb node drain`: every VIP withdrawn, forwarding kept for what still
    /// arrives, until `lb node undrain`.
    #[serde(default)]
    pub drained: bool,
}

/// A backend's health history.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// When its health state last changed, in seconds since the Unix epoch.
    pub since: u64,
    /// Health transitions so far.
    pub transitions: u64,
    /// Failed probes so far (as of the last transition).
    pub probe_failures: u64,
}

/// The ids of one service and its backends.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceIds {
    /// Service id.
    pub id: u32,
    /// Backend address → backend id.
    pub backends: BTreeMap<IpAddr, u32>,
}

impl Runtime {
    /// Reads the state file; a missing file is an empty state.
    pub fn load(path: &Path) -> Result<Runtime> {
        Self::load_whole(path).map(Runtime::without_bad_weights)
    }

    /// A weight out of range, which only a hand can have written there,
    /// is dropped (the configured one applies) rather than the whole
    /// file: the table weight (weight × ramp × scale) would wrap.
    fn without_bad_weights(mut self) -> Runtime {
        for (service, backends) in &mut self.overrides {
            for (ip, o) in backends.iter_mut() {
                if let Err(e) = crate::config::check_weight(o.weight) {
                    error!(%service, backend = %ip, error = %e, "the state file's weight is dropped");
                    o.weight = None;
                }
            }
            backends.retain(|_, o| *o != Override::default());
        }
        self.overrides.retain(|_, m| !m.is_empty());
        self
    }

    fn load_whole(path: &Path) -> Result<Runtime> {
        let previous = previous_copy(path);
        match read(path)? {
            Some(Ok(r)) => return Ok(r),
            // A crash between the two renames of `save`.
            None => return Ok(read(&previous)?.and_then(Result::ok).unwrap_or_default()),
            Some(Err(e)) => {
                let aside = path.with_extension(format!(
                    "corrupt-{}",
                    SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_secs()
                ));
                let kept = std::fs::rename(path, &aside).is_ok();
                error!(
                    file = %path.display(),
                    error = %e,
                    moved_to = %if kept { aside.display().to_string() } else { "nowhere (it stays)".into() },
                    "the state file is corrupt"
                );
            }
        }
        match read(&previous)? {
            Some(Ok(r)) => {
                warn!(
                    file = %previous.display(),
                    "starting from the state file's previous copy: the last operator change or \
                     health transition may be missing"
                );
                Ok(r)
            }
            _ => {
                error!(
                    "starting without a state file: tables come from the pinned maps and the \
                     configuration; the operator's weights, drains, maintenance and node drain \
                     are forgotten, and health history starts again"
                );
                Ok(Runtime::default())
            }
        }
    }

    /// Writes the state file so that a crash leaves the old state or the
    /// new one, whole (written beside it, flushed, renamed, flushed); the
    /// old one is kept as the previous copy, for a file corrupted anyway
    /// (a hand edit, a disk that lies about its flushes).
    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let tmp = temporary_copy(path);
        if let Err(e) = super::durable::write_synced(&tmp, &serde_json::to_vec_pretty(self)?) {
            // A part written to a full disk would only take what room is left.
            let _ = std::fs::remove_file(&tmp);
            return Err(anyhow::Error::new(e).context(format!("writing {}", tmp.display())));
        }
        if path.exists() {
            let previous = previous_copy(path);
            std::fs::rename(path, &previous)
                .with_context(|| format!("keeping {} as {}", path.display(), previous.display()))?;
        }
        super::durable::rename_synced(&tmp, path)
            .with_context(|| format!("replacing {}", path.display()))
    }

    /// The override of one backend.
    pub fn get(&self, service: &str, backend: IpAddr) -> Override {
        self.overrides
            .get(service)
            .and_then(|m| m.get(&backend))
            .copied()
            .unwrap_or_default()
    }

    /// Sets one backend's override; a default override is removed.
    pub fn set(&mut self, service: &str, backend: IpAddr, o: Override) {
        let entry = self.overrides.entry(service.to_string()).or_default();
        if o == Override::default() {
            entry.remove(&backend);
        } else {
            entry.insert(backend, o);
        }
        if entry.is_empty() {
            self.overrides.remove(service);
        }
    }

    /// Drops overrides of backends the configuration no longer has.
    pub fn retain(&mut self, exists: impl Fn(&str, IpAddr) -> bool) {
        for (svc, m) in &mut self.overrides {
            m.retain(|ip, _| exists(svc, *ip));
        }
        self.overrides.retain(|_, m| !m.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_file_that_would_write_over_the_configuration_is_refused() {
        let dir = std::env::temp_dir().join(format!("lb-runtime-c-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let config = dir.join("lb.toml");
        std::fs::write(&config, "").unwrap();
        std::os::unix::fs::symlink(&config, dir.join("link.json")).unwrap();
        std::fs::hard_link(&config, dir.join("hard.json")).unwrap();
        // A configuration named as a state file's previous copy.
        let prev = dir.join("state.prev");
        std::fs::write(&prev, "").unwrap();
        let refused = [
            (config.clone(), &config),
            (dir.join("sub/../lb.toml"), &config),
            (dir.join("link.json"), &config),
            (dir.join("hard.json"), &config),
            (dir.join("state.json"), &prev),
        ];
        for (state, config) in &refused {
            let e = check_apart_from(state, config).unwrap_err().to_string();
            assert!(e.contains("would write over the configuration file"), "{e}");
        }
        for state in [
            dir.join("state.json"),
            dir.join("sub/lb.toml"),
            dir.join("no/dir.json"),
        ] {
            check_apart_from(&state, &config).unwrap();
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_state_files_weight_out_of_range_is_dropped_alone() {
        let dir = std::env::temp_dir().join(format!("lb-runtime-w-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        std::fs::write(
            &path,
            r#"{"overrides": {"web": {
                "198.18.0.11": {"weight": 429497},
                "198.18.0.12": {"weight": 429497, "admin": "drain"},
                "198.18.0.13": {"weight": 65535}}},
              "node": {"drained": true}}"#,
        )
        .unwrap();
        let r = Runtime::load(&path).unwrap();
        let at = |last: u8| r.get("web", IpAddr::from([198, 18, 0, last]));
        assert_eq!(at(11), Override::default());
        assert_eq!((at(12).weight, at(12).admin), (None, Admin::Drain));
        assert_eq!(at(13).weight, Some(65_535));
        assert!(r.node.drained, "the rest of the file stands");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn round_trips_and_forgets_defaults() {
        let dir = std::env::temp_dir().join(format!("lb-runtime-{}", std::process::id()));
        let path = dir.join("state.json");
        let ip: IpAddr = "198.18.0.11".parse().unwrap();
        let mut r = Runtime::default();
        r.set(
            "web",
            ip,
            Override {
                weight: Some(5),
                admin: Admin::Drain,
            },
        );
        r.node.drained = true;
        r.save(&path).unwrap();
        assert_eq!(Runtime::load(&path).unwrap(), r);
        r.set("web", ip, Override::default());
        assert!(r.overrides.is_empty());
        // Saved again: the first save is the previous copy now.
        r.save(&path).unwrap();
        assert_eq!(Runtime::load(&path).unwrap(), r);
        // Torn: moved aside, and the previous copy read instead.
        let first = Runtime::load(&previous_copy(&path)).unwrap();
        assert_eq!(first.get("web", ip).weight, Some(5));
        std::fs::write(&path, b"{\"overrides\": {\"web\"").unwrap();
        assert_eq!(Runtime::load(&path).unwrap(), first);
        assert!(!path.exists(), "the corrupt file is moved aside");
        let aside = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains("corrupt-"))
            .count();
        assert_eq!(aside, 1);
        // Both torn: a fresh start, not a refusal.
        std::fs::write(&path, b"\0\0\0").unwrap();
        std::fs::write(previous_copy(&path), b"").unwrap();
        assert_eq!(Runtime::load(&path).unwrap(), Runtime::default());
        // Only the previous copy (a crash between save's renames): read.
        r.save(&path).unwrap();
        r.save(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(Runtime::load(&path).unwrap(), r);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(Runtime::load(&path).unwrap(), Runtime::default());
    }
}

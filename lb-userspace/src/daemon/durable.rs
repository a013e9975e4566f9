//! Files that survive a crash or a power cut: the new content is written
//! beside the file and flushed to the disk, then renamed over the file, and
//! the rename is flushed with the directory that holds it. A reader after a
//! crash finds the old content or the new one, whole (without the flushes,
//! a file system may commit the rename before the data: an empty or torn
//! file, which stops the daemon from starting).

use std::{fs::File, io::Write as _, os::unix::fs::MetadataExt as _, path::Path};

/// Writes `bytes` to `path`, a new file (whatever was there is removed
/// first, so a link planted there is not followed), and flushes them.
pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = File::options().write(true).create_new(true).open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// [`write_synced`], the new file then given `like`'s mode and owner if
/// `like` exists (a file it replaces keeps them). Another owner than the
/// writer's takes CAP_CHOWN, which the daemon's unit does not grant: the
/// error says so rather than leave the file to another owner.
pub(crate) fn write_synced_like(path: &Path, bytes: &[u8], like: &Path) -> std::io::Result<()> {
    write_synced(path, bytes)?;
    let like = match std::fs::metadata(like) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    std::fs::set_permissions(path, like.permissions())?;
    let new = std::fs::metadata(path)?;
    if (new.uid(), new.gid()) != (like.uid(), like.gid()) {
        std::os::unix::fs::chown(path, Some(like.uid()), Some(like.gid())).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "giving it the owner of the file it replaces (uid {}, gid {}): {e}",
                    like.uid(),
                    like.gid()
                ),
            )
        })?;
    }
    Ok(())
}

/// Renames `from` over `to`, then flushes `to`'s directory, which holds the
/// rename. Once renamed, `to` holds the new content whatever the flush
/// does: a flush that fails is said so, not returned, since a caller told
/// of a failure would take the new content for not written.
pub(crate) fn rename_synced(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::rename(from, to)?;
    let dir = match to.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!(
            file = %to.display(),
            error = %e,
            "written, but flushing its directory failed: a power loss may bring back the file before"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_synced_replacement_leaves_the_new_content_and_no_temporary() {
        let dir = std::env::temp_dir().join(format!("lb-durable-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (path, tmp) = (dir.join("state.json"), dir.join("state.tmp"));
        std::fs::write(&path, b"old").unwrap();
        // A link where the new content goes is replaced, not followed.
        std::os::unix::fs::symlink(&path, &tmp).unwrap();
        write_synced(&tmp, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        rename_synced(&tmp, &path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert!(!tmp.exists());
        assert!(
            rename_synced(&tmp, &path).is_err(),
            "nothing left to rename"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

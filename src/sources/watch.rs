//! Change notices for definition files: a filesystem watch on every configured path (folders
//! directly, files through their folder, since editors and ConfigMap updates replace files by
//! renaming) plus SIGHUP, debounced into one "reload now" signal.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tracing::warn;

/// Bursts of events (a `git pull`, a ConfigMap swap) settle for this long before one reload.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// Keeps the watch alive; dropping it stops the notices.
pub struct FileWatch {
    _watcher: Option<notify::RecommendedWatcher>,
    notices: mpsc::Receiver<()>,
    hangups: tokio::signal::unix::Signal,
}

impl FileWatch {
    /// Watches `paths`; a path that cannot be watched (say, not created yet) is logged and its
    /// folder's parent is tried, so it is picked up once it appears.
    pub fn new(paths: &[PathBuf]) -> std::io::Result<FileWatch> {
        let (tx, notices) = mpsc::channel(1);
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // Only changes count: reading the files on reload raises access events, which
            // must not trigger the next reload.
            let changed = event.is_ok_and(|e| {
                matches!(
                    e.kind,
                    notify::EventKind::Create(_)
                        | notify::EventKind::Modify(_)
                        | notify::EventKind::Remove(_)
                )
            });
            if changed {
                // A full channel already holds a pending reload; that is enough.
                let _ = tx.try_send(());
            }
        });
        let watcher = match watcher {
            Ok(mut watcher) => {
                for path in paths {
                    watch_path(&mut watcher, path);
                }
                Some(watcher)
            }
            Err(e) => {
                warn!(error = %e, "cannot watch definition files; reload with SIGHUP");
                None
            }
        };
        let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        Ok(FileWatch {
            _watcher: watcher,
            notices,
            hangups,
        })
    }

    /// Waits for the next change (or SIGHUP), then for the burst to settle.
    pub async fn changed(&mut self) {
        tokio::select! {
            _ = self.notices.recv() => {}
            _ = self.hangups.recv() => {}
        }
        loop {
            match tokio::time::timeout(DEBOUNCE, self.notices.recv()).await {
                Ok(Some(())) => continue,
                _ => return,
            }
        }
    }
}

fn watch_path(watcher: &mut notify::RecommendedWatcher, path: &Path) {
    let target = if path.is_dir() {
        path
    } else {
        path.parent().unwrap_or(path)
    };
    if let Err(e) = watcher.watch(target, RecursiveMode::NonRecursive) {
        warn!(path = %target.display(), error = %e, "cannot watch; changes here need SIGHUP");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reading_the_files_is_not_a_change_but_writing_one_is() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.yaml");
        std::fs::write(&file, "x: 1\n").unwrap();
        let mut watch = FileWatch::new(&[dir.path().to_path_buf()]).unwrap();
        // What every reload does: open and read the files.
        for _ in 0..3 {
            std::fs::read_to_string(&file).unwrap();
        }
        let quiet = tokio::time::timeout(Duration::from_millis(600), watch.changed()).await;
        assert!(quiet.is_err(), "reading the files was taken for a change");
        std::fs::write(&file, "x: 2\n").unwrap();
        tokio::time::timeout(Duration::from_secs(5), watch.changed())
            .await
            .expect("a write is a change");
    }
}

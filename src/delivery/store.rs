//! Where videos live: an `object_store` store, by URL (SPEC §7).
//!
//! - empty or `file://` (default): a local directory, `D/videos` unless a path is given
//!   (`file:///srv/videos`);
//! - `memory://`: in memory (tests, benchmarks of everything else);
//! - other schemes (`s3://bucket/prefix`, `gs://…`, `az://…`) through `object_store`'s URL
//!   parser, with credentials from the usual `AWS_*`, `GOOGLE_*`, `AZURE_*` variables;
//!   a build needs the matching cargo feature (`store-aws`, `store-gcp`, `store-azure`:
//!   they pull in a TLS stack, so the default build leaves them out). A scheme this build
//!   lacks is refused at startup with a clear error, never at the first video.
//!
//! Keys: `videos/<shard>/<vid_…>.clean.<ext>` and `….watermarked.<ext>`, where the shard is
//! the id's last two characters (random bits: 1,024 shards, so a local directory never
//! holds more than a fraction of the videos, and no directory is made per video). A key is
//! written once (a put is atomic: readers never see a partial object) and never changed.
//!
//! Durability: with `fsync` (the default) a local put returns only after its file and
//! directory entry are on stable storage, so an item recorded `succeeded` never points at
//! a file a power loss could take (the guarantee S3 and GCS give). On Linux this is group
//! commit for files: puts write without syncing, then wait for one `syncfs(2)` of the
//! store's filesystem that started after their write — one sync covers every put waiting
//! (`FsSyncer`). Elsewhere each put syncs its file and directory. Without `fsync`, a
//! kill -9 still loses nothing (the page cache survives the process), a power loss may.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::ids::VideoId;

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL names a store this build cannot open.
    #[error("video store {url:?}: {reason}")]
    Config { url: String, reason: String },
    /// The object does not exist.
    #[error("object {0} not found")]
    NotFound(String),
    /// The store failed.
    #[error("video store: {0}")]
    Io(String),
}

/// Which rendition of a video.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rendition {
    /// As the provider made it.
    Clean,
    /// With the visible watermark (plans without watermark-free downloads).
    Watermarked,
}

/// The video store.
#[derive(Clone, Debug)]
pub struct VideoStore {
    /// The backing store.
    store: Arc<dyn ObjectStore>,
    /// What was opened (for messages and metrics).
    url: String,
    /// Group sync of a local store's filesystem (Linux, `fsync` on).
    syncer: Option<Arc<FsSyncer>>,
}

/// Group commit for files: one `syncfs` on a dedicated thread serves every put waiting.
///
/// Tickets: a put takes ticket `requested + 1` after its write finished; the thread reads
/// `requested` *before* each `syncfs` starts and publishes it as `done` when it returns, so
/// `done >= ticket` means a sync that began after the write completed — the write is durable.
#[derive(Debug)]
struct FsSyncer {
    /// Tickets handed out.
    requested: std::sync::Mutex<u64>,
    /// Wakes the thread.
    wake: std::sync::Condvar,
    /// Highest ticket covered by a finished sync; `Err` after a failed sync (sticky: like
    /// the WAL, a filesystem that failed a sync is not trusted again).
    done: tokio::sync::watch::Sender<Result<u64, String>>,
}

#[cfg(target_os = "linux")]
impl FsSyncer {
    fn start(dir: &Path) -> std::io::Result<Arc<FsSyncer>> {
        use std::os::fd::AsRawFd;
        let root = std::fs::File::open(dir)?;
        let syncer = Arc::new(FsSyncer {
            requested: std::sync::Mutex::new(0),
            wake: std::sync::Condvar::new(),
            done: tokio::sync::watch::channel(Ok(0)).0,
        });
        let weak = Arc::downgrade(&syncer);
        std::thread::Builder::new()
            .name("store-syncfs".into())
            .spawn(move || loop {
                let Some(s) = weak.upgrade() else { return };
                let target = {
                    let mut req = s.requested.lock().expect("not poisoned");
                    let done = s.done.borrow().clone().unwrap_or(u64::MAX);
                    // Wait for a ticket beyond what is done (with a timeout, so the thread
                    // notices when the store is dropped).
                    while *req <= done {
                        let (g, _) = s
                            .wake
                            .wait_timeout(req, std::time::Duration::from_millis(200))
                            .expect("not poisoned");
                        req = g;
                        if Arc::strong_count(&s) == 1 {
                            return;
                        }
                    }
                    *req
                };
                // SAFETY: `root` is an open descriptor for the thread's whole life.
                let rc = unsafe { libc::syncfs(root.as_raw_fd()) };
                if rc == 0 {
                    let _ = s.done.send_replace(Ok(target));
                } else {
                    let e = std::io::Error::last_os_error();
                    let _ = s.done.send_replace(Err(format!("syncfs failed: {e}")));
                    return;
                }
            })?;
        Ok(syncer)
    }

    async fn sync(&self) -> Result<(), StoreError> {
        let ticket = {
            let mut req = self.requested.lock().expect("not poisoned");
            *req += 1;
            *req
        };
        self.wake.notify_one();
        let mut rx = self.done.subscribe();
        let res = rx
            .wait_for(|d| d.as_ref().map_or(true, |&d| d >= ticket))
            .await
            .map_err(|_| StoreError::Io("the store's sync thread stopped".into()))?
            .clone();
        res.map(|_| ()).map_err(StoreError::Io)
    }
}

/// File extension for a content type.
pub fn extension(content_type: &str) -> &'static str {
    match content_type {
        "image/gif" => "gif",
        "video/mp4" => "mp4",
        "video/webm" => "webm",
        "video/quicktime" => "mov",
        _ => "bin",
    }
}

impl VideoStore {
    /// Opens the store named by `url` (see the module docs); `data_dir` is the default
    /// location of a local store.
    pub fn open(url: &str, data_dir: &Path, fsync: bool) -> Result<VideoStore, StoreError> {
        let config = |reason: String| StoreError::Config {
            url: url.to_string(),
            reason,
        };
        let local = if url.is_empty() || url == "file://" {
            Some(data_dir.join("videos"))
        } else {
            url.strip_prefix("file://").map(std::path::PathBuf::from)
        };
        let mut syncer = None;
        let store: Arc<dyn ObjectStore> = if let Some(dir) = local {
            std::fs::create_dir_all(&dir).map_err(|e| config(e.to_string()))?;
            #[cfg(target_os = "linux")]
            let per_file_fsync = {
                if fsync {
                    syncer = Some(FsSyncer::start(&dir).map_err(|e| config(e.to_string()))?);
                }
                false
            };
            #[cfg(not(target_os = "linux"))]
            let per_file_fsync = fsync;
            Arc::new(
                object_store::local::LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| config(e.to_string()))?
                    .with_fsync(per_file_fsync),
            )
        } else if url == "memory://" {
            Arc::new(object_store::memory::InMemory::new())
        } else {
            let parsed = url::Url::parse(url).map_err(|e| config(e.to_string()))?;
            // Credentials and settings from the environment, as the stores' own
            // `from_env` builders read them.
            let options: Vec<(String, String)> = std::env::vars()
                .filter(|(k, _)| {
                    ["AWS_", "GOOGLE_", "AZURE_"]
                        .iter()
                        .any(|p| k.starts_with(p))
                })
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect();
            let (store, prefix) = object_store::parse_url_opts(&parsed, options).map_err(|e| {
                config(format!(
                    "{e} (cloud stores need reelbatch built with the store-aws, store-gcp \
                     or store-azure feature)"
                ))
            })?;
            Arc::new(object_store::prefix::PrefixStore::new(store, prefix))
        };
        Ok(VideoStore {
            store,
            url: url.to_string(),
            syncer,
        })
    }

    /// The URL it was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The key of a rendition.
    pub fn key(video: VideoId, rendition: Rendition, content_type: &str) -> String {
        let name = match rendition {
            Rendition::Clean => "clean",
            Rendition::Watermarked => "watermarked",
        };
        let id = video.to_string();
        let shard = &id[id.len() - 2..];
        format!("videos/{shard}/{id}.{name}.{}", extension(content_type))
    }

    /// Stores a rendition (atomic).
    pub async fn put(
        &self,
        video: VideoId,
        rendition: Rendition,
        content_type: &str,
        bytes: Bytes,
    ) -> Result<(), StoreError> {
        let key = ObjectPath::from(Self::key(video, rendition, content_type));
        self.store
            .put(&key, bytes.into())
            .await
            .map_err(|e| StoreError::Io(e.to_string()))?;
        #[cfg(target_os = "linux")]
        if let Some(s) = &self.syncer {
            s.sync().await?;
        }
        Ok(())
    }

    /// Streams a rendition, or the bytes `range` of it.
    pub async fn stream(
        &self,
        video: VideoId,
        rendition: Rendition,
        content_type: &str,
        range: Option<std::ops::Range<u64>>,
    ) -> Result<futures_util::stream::BoxStream<'static, object_store::Result<Bytes>>, StoreError>
    {
        let key = Self::key(video, rendition, content_type);
        let path = ObjectPath::from(key.as_str());
        let opts = object_store::GetOptions {
            range: range.map(object_store::GetRange::Bounded),
            ..Default::default()
        };
        match self.store.get_opts(&path, opts).await {
            Ok(r) => Ok(r.into_stream()),
            Err(object_store::Error::NotFound { .. }) => Err(StoreError::NotFound(key)),
            Err(e) => Err(StoreError::Io(e.to_string())),
        }
    }

    /// Reads a whole rendition.
    pub async fn get(
        &self,
        video: VideoId,
        rendition: Rendition,
        content_type: &str,
    ) -> Result<Bytes, StoreError> {
        let key = Self::key(video, rendition, content_type);
        let path = ObjectPath::from(key.as_str());
        match self.store.get(&path).await {
            Ok(r) => r.bytes().await.map_err(|e| StoreError::Io(e.to_string())),
            Err(object_store::Error::NotFound { .. }) => Err(StoreError::NotFound(key)),
            Err(e) => Err(StoreError::Io(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_and_memory_round_trip_and_missing_cloud_features_refused() {
        let dir = tempfile::tempdir().unwrap();
        let v = VideoId(7);
        for store in [
            VideoStore::open("", dir.path(), true).unwrap(),
            VideoStore::open(
                &format!("file://{}", dir.path().join("x").display()),
                dir.path(),
                false,
            )
            .unwrap(),
            VideoStore::open("memory://", dir.path(), false).unwrap(),
        ] {
            store
                .put(
                    v,
                    Rendition::Clean,
                    "image/gif",
                    Bytes::from_static(b"GIF89a.."),
                )
                .await
                .unwrap();
            assert_eq!(
                store.get(v, Rendition::Clean, "image/gif").await.unwrap(),
                Bytes::from_static(b"GIF89a..")
            );
            assert!(matches!(
                store.get(v, Rendition::Watermarked, "image/gif").await,
                Err(StoreError::NotFound(_))
            ));
        }
        assert!(dir.path().join("videos/videos").is_dir());
        match VideoStore::open("s3://bucket/videos", dir.path(), true) {
            Err(StoreError::Config { reason, .. }) => {
                assert!(reason.contains("store-aws"), "{reason}")
            }
            #[cfg(feature = "store-aws")]
            Ok(_) => {}
            other => panic!("{other:?}"),
        }
        assert!(VideoStore::open("not a url", dir.path(), true).is_err());
    }
}

//! Where videos live: an `object_store` store, by URL (SPEC §7).
//!
//! - empty or `file://` (default): a local directory, `D/videos` unless a path is given
//!   (`file:///srv/videos`);
//! - `memory://`: in memory (tests, benchmarks of everything else);
//! - other schemes (`s3://`, `gs://`, `az://`) need the matching `object_store` cloud
//!   feature compiled in; this build refuses them at startup with a clear error rather
//!   than failing at the first video.
//!
//! Keys: `videos/<shard>/<vid_…>.clean.<ext>` and `….watermarked.<ext>`, where the shard is
//! the id's last two characters (random bits: 1,024 shards, so a local directory never
//! holds more than a fraction of the videos, and no directory is made per video). A key is
//! written once (a put is atomic: readers never see a partial object) and never changed.
//!
//! Durability: with `fsync` (the default) a local put syncs the file and its directory
//! before it returns, so an item recorded `succeeded` never points at a file a power loss
//! could take (the guarantee S3 and GCS give). Without it, a kill -9 still loses nothing
//! (the page cache survives the process), a power loss may.

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
        let store: Arc<dyn ObjectStore> = if url.is_empty() || url == "file://" {
            let dir = data_dir.join("videos");
            std::fs::create_dir_all(&dir).map_err(|e| config(e.to_string()))?;
            Arc::new(
                object_store::local::LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| config(e.to_string()))?
                    .with_fsync(fsync),
            )
        } else if let Some(path) = url.strip_prefix("file://") {
            std::fs::create_dir_all(path).map_err(|e| config(e.to_string()))?;
            Arc::new(
                object_store::local::LocalFileSystem::new_with_prefix(path)
                    .map_err(|e| config(e.to_string()))?
                    .with_fsync(fsync),
            )
        } else if url == "memory://" {
            Arc::new(object_store::memory::InMemory::new())
        } else {
            return Err(config(
                "this build supports file:// and memory:// stores; cloud stores need \
                 object_store's aws/gcp/azure feature"
                    .into(),
            ));
        };
        Ok(VideoStore {
            store,
            url: url.to_string(),
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
            .map(|_| ())
            .map_err(|e| StoreError::Io(e.to_string()))
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

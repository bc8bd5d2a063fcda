//! The object pool: S3-compatible object storage (AWS, Ceph RGW, MinIO, any
//! S3 service) through the `object_store` crate.
//!
//! Layout under the bucket and prefix, one object per pool object:
//! ```text
//! PREFIX/config
//! PREFIX/packs/<name>
//! PREFIX/index/<name>
//! PREFIX/snapshots/<name>
//! ```
//!
//! - Small objects are one conditional PUT (`If-None-Match: *`): nothing is
//!   ever overwritten. Packs larger than one part stream up as multipart
//!   uploads with a bounded number of parts in flight, so memory stays flat;
//!   a multipart completion is not conditional in S3's API, which is why
//!   every writer picks fresh random names (packs, segments) or names that
//!   are the hash of their content (manifests). Some servers check-then-write
//!   instead of putting atomically; unique names make that harmless too.
//! - A create retried after a timeout can find its own first attempt already
//!   stored: the object is read back and accepted when its bytes are the
//!   ones being written, refused otherwise.
//! - Requests are retried with exponential backoff and jitter on 5xx,
//!   429/SlowDown, timeouts and dropped connections (`object_store`'s retry
//!   layer), for a bounded total time, then fail with an error naming the
//!   object.
//!
//! ## Threads and async
//! `object_store` is async. The pool owns a private tokio runtime and every
//! call blocks its calling thread until the requests it makes are done. It
//! works from any thread: a plain thread, a rayon worker, or, inside an
//! async program, a `tokio::task::spawn_blocking` closure (calling it from an
//! async task directly would block that task's executor thread).

use std::future::Future;
use std::io::Write;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cairn_engine::{
    Error, FileKind, ObjectWriter, PoolDelete, PoolList, PoolRead, PoolWrite, Result,
};
use futures::StreamExt;
use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientOptions, MultipartUpload, ObjectStore, PutMode, PutOptions, PutPayload,
    RetryConfig,
};

use crate::address::S3Address;
use crate::PoolOpenError;

/// Default size of one multipart part (and the largest object sent as one
/// PUT): large enough that a GiB stored costs few requests.
pub const PART_SIZE: usize = 40 << 20;
/// Most parts in flight at once over all writers of one pool; each holds a
/// part's memory until it is sent.
pub const PARTS_IN_FLIGHT: usize = 2;
/// Range reads a restore or verify keeps in flight: each waits on a round
/// trip, not on CPU.
pub const READS_IN_FLIGHT: usize = 12;
/// Default stored size of a pack on object storage: 12 parts, so a GiB
/// stored costs about 32 requests (PUTs are billed per request).
pub const PACK_SIZE: u64 = 12 * PART_SIZE as u64;

/// The pool's private runtime. Dropped without blocking, so the last
/// handle to a pool may go away anywhere, inside async code included.
struct PoolRuntime(Option<tokio::runtime::Runtime>);

impl std::ops::Deref for PoolRuntime {
    type Target = tokio::runtime::Runtime;
    fn deref(&self) -> &tokio::runtime::Runtime {
        // Always Some until drop.
        self.0
            .as_ref()
            .unwrap_or_else(|| unreachable!("runtime used after drop"))
    }
}

impl Drop for PoolRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Counts the requests a pool makes (one per GET, range GET, HEAD, PUT,
/// DELETE, list page, multipart create/part/complete; retries inside a
/// request are not counted).
#[derive(Debug, Default)]
pub struct RequestStats {
    requests: AtomicU64,
}

impl RequestStats {
    /// Requests made so far.
    pub fn total(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    fn add(&self, n: u64) {
        self.requests.fetch_add(n, Ordering::Relaxed);
    }
}

/// A pool in an S3 bucket (see the module documentation).
pub struct ObjectPool {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    location: String,
    runtime: Arc<PoolRuntime>,
    stats: Arc<RequestStats>,
    parts: Arc<tokio::sync::Semaphore>,
    part_size: usize,
    pack_size: u64,
    retry_timeout: Duration,
    /// Values that must never appear in a message (secret key, token).
    secrets: Arc<Vec<String>>,
}

impl std::fmt::Debug for ObjectPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The store's own Debug would show its configuration, credentials
        // included: never print it.
        f.debug_struct("ObjectPool")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

/// Reads an environment variable, treating an empty value as unset.
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Credentials and client settings of an object pool. `Debug` never shows
/// the secrets.
#[derive(Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct S3Settings {
    /// `AWS_ACCESS_KEY_ID`.
    pub access_key_id: String,
    /// `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: String,
    /// `AWS_SESSION_TOKEN`, for temporary credentials.
    pub session_token: Option<String>,
    /// `AWS_REGION` (the address's `region` wins).
    pub region: Option<String>,
    /// `AWS_ENDPOINT_URL` / `AWS_ENDPOINT` (the address's `endpoint` wins).
    pub endpoint: Option<String>,
    /// `AWS_ALLOW_HTTP`: plain-http endpoints are allowed.
    pub allow_http: bool,
}

impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("allow_http", &self.allow_http)
            .finish()
    }
}

impl S3Settings {
    /// Credentials and settings with the given key pair, nothing else set.
    pub fn new(access_key_id: impl Into<String>, secret_access_key: impl Into<String>) -> Self {
        S3Settings {
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
            ..Default::default()
        }
    }

    /// Reads the usual variables: `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` (or
    /// `AWS_DEFAULT_REGION`), `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT`),
    /// `AWS_ALLOW_HTTP`. Missing keys are an error naming them.
    pub fn from_env() -> std::result::Result<Self, String> {
        let (Some(key), Some(secret)) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY"))
        else {
            return Err(
                "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY".into(),
            );
        };
        Ok(S3Settings {
            access_key_id: key,
            secret_access_key: secret,
            session_token: env("AWS_SESSION_TOKEN"),
            region: env("AWS_REGION").or_else(|| env("AWS_DEFAULT_REGION")),
            endpoint: env("AWS_ENDPOINT_URL").or_else(|| env("AWS_ENDPOINT")),
            allow_http: env("AWS_ALLOW_HTTP").is_some_and(|v| v == "true" || v == "1"),
        })
    }
}

impl ObjectPool {
    /// Opens the pool at `address` with credentials and settings from the
    /// environment ([`S3Settings::from_env`]). Requests are path-style, so
    /// local servers work. No request is made until the pool is used.
    pub fn open(address: &S3Address) -> std::result::Result<Self, PoolOpenError> {
        let settings = S3Settings::from_env().map_err(|reason| PoolOpenError::Settings {
            address: address.to_string(),
            reason,
        })?;
        Self::open_with(address, &settings)
    }

    /// Opens the pool at `address` with explicit credentials and settings.
    pub fn open_with(
        address: &S3Address,
        settings: &S3Settings,
    ) -> std::result::Result<Self, PoolOpenError> {
        let bad = |reason: String| PoolOpenError::Settings {
            address: address.to_string(),
            reason,
        };
        let allow_http = settings.allow_http;
        let endpoint = match (&address.endpoint, &settings.endpoint) {
            (Some(e), _) => Some(e.clone()),
            // From the environment: checked like an address's endpoint.
            (None, Some(e)) => Some(crate::address::parse_endpoint(e).map_err(&bad)?),
            (None, None) => None,
        };
        if endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("http://"))
            && !allow_http
        {
            return Err(bad(
                "the endpoint is plain http: set AWS_ALLOW_HTTP=true to allow it".into(),
            ));
        }
        let region = address
            .region
            .clone()
            .or_else(|| settings.region.clone())
            .unwrap_or_else(|| "us-east-1".into());
        let options = ClientOptions::new()
            .with_allow_http(allow_http)
            .with_timeout(address.timeout)
            .with_connect_timeout(address.timeout.min(Duration::from_secs(10)))
            .with_pool_max_idle_per_host(16);
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_secs(5),
                base: 2.0,
            },
            max_retries: 10,
            retry_timeout: address.retry_timeout,
        };
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&address.bucket)
            .with_region(region)
            .with_access_key_id(&settings.access_key_id)
            .with_secret_access_key(&settings.secret_access_key)
            .with_virtual_hosted_style_request(false)
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            .with_client_options(options)
            .with_retry(retry);
        if let Some(token) = &settings.session_token {
            builder = builder.with_token(token);
        }
        if let Some(endpoint) = endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        let store = builder.build().map_err(|e| bad(e.to_string()))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cairn-s3")
            .enable_all()
            .build()
            .map_err(|source| PoolOpenError::Io {
                path: "tokio runtime".into(),
                source,
            })?;
        Ok(ObjectPool {
            store: Arc::new(store),
            prefix: address.prefix.trim_matches('/').to_string(),
            location: address.to_string(),
            runtime: Arc::new(PoolRuntime(Some(runtime))),
            stats: Arc::new(RequestStats::default()),
            parts: Arc::new(tokio::sync::Semaphore::new(PARTS_IN_FLIGHT)),
            part_size: address.part_size,
            pack_size: address.pack_size,
            retry_timeout: address.retry_timeout,
            secrets: Arc::new(
                std::iter::once(settings.secret_access_key.clone())
                    .chain(settings.session_token.clone())
                    .filter(|v| v.len() >= 4)
                    .collect(),
            ),
        })
    }

    /// The requests this pool has made.
    pub fn stats(&self) -> Arc<RequestStats> {
        self.stats.clone()
    }

    /// The key of a pool object.
    fn key(&self, kind: FileKind, name: &str) -> Result<ObjectPath> {
        if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
            return Err(Error::InvalidArgument(format!(
                "object name {name:?} is not a plain name"
            )));
        }
        let rel = match kind {
            FileKind::Config => name.to_string(),
            other => format!("{}/{name}", other.dir_name()),
        };
        Ok(ObjectPath::from(self.with_prefix(&rel)))
    }

    fn with_prefix(&self, rel: &str) -> String {
        if self.prefix.is_empty() {
            rel.to_string()
        } else {
            format!("{}/{rel}", self.prefix)
        }
    }

    /// Runs `fut` on the pool's runtime and waits for it (from any thread).
    fn run<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> Result<T> {
        block_on(&self.runtime, fut)
    }
}

/// Runs `fut` on `runtime` and blocks the calling thread until it is done.
/// Works on threads that run no runtime and on threads that run another one
/// (`spawn` never nests a runtime, unlike `Runtime::block_on`).
fn block_on<T: Send + 'static>(
    runtime: &tokio::runtime::Runtime,
    fut: impl Future<Output = T> + Send + 'static,
) -> Result<T> {
    futures::executor::block_on(runtime.spawn(fut))
        .map_err(|e| Error::Internal(format!("S3 request task failed: {e}")))
}

/// `text` with every secret in `secrets` replaced by `<redacted>` (server
/// error bodies can quote a request's token or canonical form).
fn scrub(text: String, secrets: &[String]) -> String {
    secrets
        .iter()
        .fold(text, |t, secret| t.replace(secret.as_str(), "<redacted>"))
}

/// Maps an `object_store` error on object `kind`/`name` to the engine's.
fn store_error(
    secrets: &[String],
    op: &'static str,
    kind: FileKind,
    name: &str,
    e: object_store::Error,
) -> Error {
    match e {
        // A missing bucket is not a missing object.
        object_store::Error::NotFound { source, .. }
            if source.to_string().contains("NoSuchBucket") =>
        {
            Error::PoolIo {
                op,
                kind,
                name: name.to_string(),
                source: std::io::Error::other("the bucket does not exist"),
            }
        }
        object_store::Error::NotFound { .. } => Error::NotFound {
            kind,
            name: name.to_string(),
        },
        object_store::Error::AlreadyExists { .. } => Error::AlreadyExists {
            kind,
            name: name.to_string(),
        },
        other => Error::PoolIo {
            op,
            kind,
            name: name.to_string(),
            source: std::io::Error::other(scrub(other.to_string(), secrets)),
        },
    }
}

impl PoolRead for ObjectPool {
    fn read(&self, kind: FileKind, name: &str) -> Result<Bytes> {
        let key = self.key(kind, name)?;
        let store = self.store.clone();
        self.stats.add(1);
        self.run(async move { store.get(&key).await?.bytes().await })?
            .map_err(|e| store_error(&self.secrets, "read", kind, name, e))
    }

    fn read_range(&self, kind: FileKind, name: &str, offset: u64, len: usize) -> Result<Bytes> {
        let key = self.key(kind, name)?;
        if len == 0 {
            // S3 has no empty range; an empty read needs only the object to exist.
            self.size(kind, name)?;
            return Ok(Bytes::new());
        }
        let store = self.store.clone();
        let range: Range<u64> = offset..offset + len as u64;
        self.stats.add(1);
        let bytes = self
            .run(async move { store.get_range(&key, range).await })?
            .map_err(|e| store_error(&self.secrets, "read", kind, name, e))?;
        if bytes.len() != len {
            return Err(Error::PoolIo {
                op: "read",
                kind,
                name: name.to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "{len} bytes at offset {offset}: the object returned {}",
                        bytes.len()
                    ),
                ),
            });
        }
        Ok(bytes)
    }

    fn size(&self, kind: FileKind, name: &str) -> Result<u64> {
        let key = self.key(kind, name)?;
        let store = self.store.clone();
        self.stats.add(1);
        self.run(async move { store.head(&key).await })?
            .map(|m| m.size)
            .map_err(|e| store_error(&self.secrets, "stat", kind, name, e))
    }

    fn location(&self) -> String {
        self.location.clone()
    }

    fn preferred_read_concurrency(&self) -> Option<usize> {
        Some(READS_IN_FLIGHT)
    }
}

impl PoolList for ObjectPool {
    fn list(&self, kind: FileKind) -> Result<Vec<String>> {
        Ok(self.listing(kind)?.into_iter().map(|(n, _)| n).collect())
    }

    fn list_sizes(&self, kind: FileKind) -> Result<Option<Vec<(String, u64)>>> {
        self.listing(kind).map(Some)
    }
}

impl ObjectPool {
    /// Names and sizes of every object of `kind` (one request per page).
    fn listing(&self, kind: FileKind) -> Result<Vec<(String, u64)>> {
        let dir = match kind {
            FileKind::Config => {
                return match self.size(kind, "config") {
                    Ok(size) => Ok(vec![("config".to_string(), size)]),
                    Err(Error::NotFound { .. }) => Ok(Vec::new()),
                    Err(e) => Err(e),
                };
            }
            other => ObjectPath::from(self.with_prefix(other.dir_name())),
        };
        let store = self.store.clone();
        let listed = self
            .run(async move {
                let mut out = Vec::new();
                let mut stream = store.list(Some(&dir));
                while let Some(meta) = stream.next().await {
                    let meta = meta?;
                    if let Some(name) = meta.location.filename() {
                        out.push((name.to_string(), meta.size));
                    }
                }
                Ok::<_, object_store::Error>(out)
            })?
            .map_err(|e| store_error(&self.secrets, "list", kind, "*", e))?;
        // One request per page of up to 1000 keys.
        self.stats.add((listed.len() as u64).div_ceil(1000).max(1));
        Ok(listed)
    }
}

impl PoolDelete for ObjectPool {
    fn delete(&self, kind: FileKind, name: &str) -> Result<()> {
        let key = self.key(kind, name)?;
        let store = self.store.clone();
        self.stats.add(2);
        // S3 deletes of missing keys succeed: check first, so a missing
        // object is reported as the contract says.
        self.run(async move {
            store.head(&key).await?;
            store.delete(&key).await
        })?
        .map_err(|e| store_error(&self.secrets, "delete", kind, name, e))
    }
}

impl PoolWrite for ObjectPool {
    fn create(&self, kind: FileKind, name: &str) -> Result<Box<dyn ObjectWriter>> {
        let key = self.key(kind, name)?;
        Ok(Box::new(S3Writer {
            pool: self.shared(),
            key,
            kind,
            name: name.to_string(),
            buffer: Vec::new(),
            upload: None,
            failed: false,
        }))
    }

    fn preferred_pack_size(&self) -> Option<u64> {
        Some(self.pack_size)
    }
}

/// Waits before retry `attempt` (exponential backoff with jitter) and
/// returns true, or returns false when the time budget or the attempts are
/// spent.
fn retry_pause(attempt: u32, started: std::time::Instant, budget: Duration) -> bool {
    const MAX_ATTEMPTS: u32 = 10;
    let mut jitter = [0u8; 1];
    let _ = getrandom::getrandom(&mut jitter);
    let base = Duration::from_millis(50).saturating_mul(1 << attempt.min(7));
    let pause = base
        .min(Duration::from_secs(5))
        .mul_f64(0.5 + jitter[0] as f64 / 255.0);
    if attempt >= MAX_ATTEMPTS || started.elapsed() + pause > budget {
        return false;
    }
    std::thread::sleep(pause);
    true
}

/// What a writer needs of its pool.
#[derive(Clone)]
struct Shared {
    store: Arc<dyn ObjectStore>,
    runtime: Arc<PoolRuntime>,
    stats: Arc<RequestStats>,
    /// Parts in flight over every writer of the pool (each holds one part's
    /// memory until it is sent).
    parts: Arc<tokio::sync::Semaphore>,
    part_size: usize,
    retry_timeout: Duration,
    secrets: Arc<Vec<String>>,
}

impl ObjectPool {
    fn shared(&self) -> Shared {
        Shared {
            store: self.store.clone(),
            runtime: self.runtime.clone(),
            stats: self.stats.clone(),
            parts: self.parts.clone(),
            part_size: self.part_size,
            retry_timeout: self.retry_timeout,
            secrets: self.secrets.clone(),
        }
    }
}

/// A multipart upload in progress.
struct Multipart {
    upload: Box<dyn MultipartUpload>,
    sending: Vec<tokio::task::JoinHandle<object_store::Result<()>>>,
}

/// A write in progress: buffered up to one part; larger objects become a
/// multipart upload whose parts are sent while the next one fills.
struct S3Writer {
    pool: Shared,
    key: ObjectPath,
    kind: FileKind,
    name: String,
    buffer: Vec<u8>,
    upload: Option<Multipart>,
    /// A part failed: the upload is aborted and every later call fails
    /// (committing the rest would store an object with parts missing).
    failed: bool,
}

impl S3Writer {
    fn err(&self, op: &'static str, e: object_store::Error) -> Error {
        store_error(&self.pool.secrets, op, self.kind, &self.name, e)
    }

    /// Starts the multipart upload, refusing a name that is taken (a
    /// completed multipart upload is not conditional in S3's API).
    fn start_upload(&mut self) -> Result<Multipart> {
        let store = self.pool.store.clone();
        let key = self.key.clone();
        self.pool.stats.add(2);
        let started = block_on(&self.pool.runtime, async move {
            match store.head(&key).await {
                Ok(_) => return Ok(None),
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
            store.put_multipart(&key).await.map(Some)
        })?
        .map_err(|e| self.err("write", e))?;
        match started {
            Some(upload) => Ok(Multipart {
                upload,
                sending: Vec::new(),
            }),
            None => Err(Error::AlreadyExists {
                kind: self.kind,
                name: self.name.clone(),
            }),
        }
    }

    /// Sends the buffered part; on failure aborts the whole upload and
    /// marks the writer failed.
    fn send_part(&mut self) -> Result<()> {
        if self.failed {
            return Err(self.failed_error());
        }
        let sent = self.try_send_part();
        if sent.is_err() {
            self.fail();
        }
        sent
    }

    fn failed_error(&self) -> Error {
        Error::PoolIo {
            op: "write",
            kind: self.kind,
            name: self.name.clone(),
            source: std::io::Error::other("an earlier part of this upload failed"),
        }
    }

    /// Stops every part still sending and aborts the upload.
    fn fail(&mut self) {
        self.failed = true;
        self.buffer = Vec::new();
        if let Some(mut upload) = self.upload.take() {
            for handle in &upload.sending {
                handle.abort();
            }
            let _ = block_on(
                &self.pool.runtime,
                async move { upload.upload.abort().await },
            );
        }
    }

    /// Sends the buffered part (waiting while the pool's parts in flight
    /// are at their limit), starting the multipart upload first if needed.
    fn try_send_part(&mut self) -> Result<()> {
        let mut upload = match self.upload.take() {
            Some(u) => u,
            None => self.start_upload()?,
        };
        // Errors of parts already sent surface here.
        let done: Vec<_> = upload
            .sending
            .iter()
            .enumerate()
            .filter(|(_, h)| h.is_finished())
            .map(|(i, _)| i)
            .collect();
        // The upload goes back into `self` before any error returns, so
        // `fail` can abort it.
        for i in done.into_iter().rev() {
            let handle = upload.sending.swap_remove(i);
            if let Err(e) = self.joined(handle) {
                self.upload = Some(upload);
                return Err(e);
            }
        }
        let permits = self.pool.parts.clone();
        let permit = match block_on(
            &self.pool.runtime,
            async move { permits.acquire_owned().await },
        ) {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                self.upload = Some(upload);
                return Err(Error::Internal(format!("S3 part limit closed: {e}")));
            }
            Err(e) => {
                self.upload = Some(upload);
                return Err(e);
            }
        };
        let part = PutPayload::from(Bytes::from(std::mem::take(&mut self.buffer)));
        let sending = upload.upload.put_part(part);
        self.pool.stats.add(1);
        upload.sending.push(self.pool.runtime.spawn(async move {
            let result = sending.await;
            drop(permit);
            result
        }));
        self.upload = Some(upload);
        Ok(())
    }

    /// Waits for every part, then completes the upload.
    fn finish_upload(&mut self, mut upload: Multipart) -> Result<()> {
        while !upload.sending.is_empty() {
            let handle = upload.sending.remove(0);
            if let Err(e) = self.joined(handle) {
                self.upload = Some(upload);
                self.fail();
                return Err(e);
            }
        }
        self.pool.stats.add(1);
        let mut upload_handle = upload.upload;
        block_on(&self.pool.runtime, async move {
            let result = upload_handle.complete().await;
            if result.is_err() {
                let _ = upload_handle.abort().await;
            }
            result
        })?
        .map(|_| ())
        .map_err(|e| self.err("write", e))
    }

    /// Waits for one part's task; its outcome as the engine's error.
    fn joined(&self, handle: tokio::task::JoinHandle<object_store::Result<()>>) -> Result<()> {
        match block_on(&self.pool.runtime, handle)? {
            Ok(sent) => sent.map_err(|e| self.err("write", e)),
            Err(e) => Err(Error::Internal(format!("S3 part upload task failed: {e}"))),
        }
    }

    /// One conditional PUT of the whole (small) object, retried on
    /// transport errors (a create is safe to repeat: see below).
    fn put_once(&mut self) -> Result<()> {
        let data = Bytes::from(std::mem::take(&mut self.buffer));
        let started = std::time::Instant::now();
        let mut attempt = 0u32;
        let result = loop {
            let store = self.pool.store.clone();
            let key = self.key.clone();
            let payload = PutPayload::from_bytes(data.clone());
            self.pool.stats.add(1);
            let result = block_on(&self.pool.runtime, async move {
                let opts = PutOptions {
                    mode: PutMode::Create,
                    ..Default::default()
                };
                store.put_opts(&key, payload, opts).await
            })?;
            match result {
                // `object_store` does not repeat a PUT whose connection
                // dropped after the request went out (it may have landed);
                // a conditional create may be repeated, and the read-back
                // below tells our own landed attempt from someone else's.
                Err(object_store::Error::Generic { .. })
                    if retry_pause(attempt, started, self.pool.retry_timeout) =>
                {
                    attempt += 1;
                }
                other => break other,
            }
        };
        match result {
            Ok(_) => Ok(()),
            // A repeated PUT may find its own first attempt: accept it when
            // the stored bytes are ours. A first attempt that finds the name
            // taken is refused outright (create-only).
            Err(object_store::Error::AlreadyExists { .. }) if attempt > 0 => {
                let store = self.pool.store.clone();
                let key = self.key.clone();
                self.pool.stats.add(1);
                let stored = block_on(&self.pool.runtime, async move {
                    store.get(&key).await?.bytes().await
                })?;
                match stored {
                    Ok(stored) if stored == data => Ok(()),
                    _ => Err(Error::AlreadyExists {
                        kind: self.kind,
                        name: self.name.clone(),
                    }),
                }
            }
            Err(e) => Err(self.err("write", e)),
        }
    }
}

impl Write for S3Writer {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.failed {
            return Err(std::io::Error::other(self.failed_error().to_string()));
        }
        let room = self.pool.part_size - self.buffer.len();
        let n = data.len().min(room);
        // Small objects take a small buffer; once an object outgrows 1 MiB
        // the buffer is sized to one part exactly (doubling growth would
        // hold up to 1.6 parts of memory per writer).
        let need = self.buffer.len() + n;
        if need > self.buffer.capacity() {
            let want = if need > 1 << 20 {
                self.pool.part_size
            } else {
                1 << 20
            };
            self.buffer
                .reserve_exact(want.max(need) - self.buffer.len());
        }
        self.buffer.extend_from_slice(&data[..n]);
        if self.buffer.len() == self.pool.part_size {
            self.send_part()
                .map_err(|e| std::io::Error::other(e.to_string()))?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ObjectWriter for S3Writer {
    fn commit(mut self: Box<Self>) -> Result<()> {
        if self.failed {
            return Err(self.failed_error());
        }
        if self.upload.is_none() {
            return self.put_once();
        }
        if !self.buffer.is_empty() {
            self.send_part()?;
        }
        match self.upload.take() {
            Some(upload) => self.finish_upload(upload),
            None => Err(Error::Internal("multipart upload vanished".into())),
        }
    }
}

impl Drop for S3Writer {
    fn drop(&mut self) {
        // Not committed: stop the parts and abort the upload so its parts
        // are freed (a bucket lifecycle rule for incomplete uploads covers a
        // process killed before this runs).
        if let Some(mut upload) = self.upload.take() {
            for handle in &upload.sending {
                handle.abort();
            }
            let _ = block_on(
                &self.pool.runtime,
                async move { upload.upload.abort().await },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_scrubbed_from_error_text() {
        let secrets = vec!["s3cr3t-key".to_string(), "tok-EN-123".to_string()];
        let text =
            "403: <CanonicalRequest>x-amz-security-token:tok-EN-123</CanonicalRequest> s3cr3t-key"
                .to_string();
        let clean = scrub(text, &secrets);
        assert!(
            !clean.contains("tok-EN-123") && !clean.contains("s3cr3t-key"),
            "{clean}"
        );
        assert!(clean.contains("<redacted>"));
        let e = store_error(
            &secrets,
            "write",
            FileKind::Pack,
            "p",
            object_store::Error::Generic {
                store: "S3",
                source: "the server said tok-EN-123".into(),
            },
        );
        assert!(!e.to_string().contains("tok-EN-123"), "{e}");
    }

    #[test]
    fn debug_output_never_shows_secrets() {
        let mut s = S3Settings::new("AKIDEXAMPLE", "wJalrXUtnFEMI-secret");
        s.session_token = Some("token-secret-part".into());
        let shown = format!("{s:?}");
        assert!(shown.contains("AKIDEXAMPLE"), "{shown}");
        assert!(!shown.contains("wJalrXUtnFEMI-secret"), "{shown}");
        assert!(!shown.contains("token-secret-part"), "{shown}");
        let crate::PoolAddress::S3(addr) =
            crate::PoolAddress::parse("s3://bucket/p?endpoint=http://127.0.0.1:1").unwrap()
        else {
            panic!("not s3")
        };
        s.allow_http = true;
        let pool = ObjectPool::open_with(&addr, &s).unwrap();
        let shown = format!("{pool:?}");
        assert!(
            !shown.contains("wJalrXUtnFEMI-secret") && !shown.contains("AKID"),
            "{shown}"
        );
    }
}

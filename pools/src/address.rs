//! Pool addresses, parsed in one place: [`PoolAddress::parse`], and
//! [`open`] / [`create`], which embedders call too.
//!
//! Accepted forms (also in [`ACCEPTED_FORMS`]):
//! - `DIR` or `dedup:DIR` — the local directory pool (the default);
//! - `s3://BUCKET[/PREFIX][?endpoint=URL&region=R&timeout=D&retry_timeout=D]`
//!   — an S3-compatible bucket; credentials come from `AWS_ACCESS_KEY_ID`,
//!   `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`, never from the address;
//! - `tape:DIR` — a tape pool on the virtual tape library in `DIR/library`
//!   (a simulator; `cairn init` creates it with blank cartridges).

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cairn_engine::DynPool;

use crate::object::{ObjectPool, RequestStats, PACK_SIZE, PART_SIZE};
use crate::{LocalPool, PoolOpenError};

/// What a pool address may look like, for usage errors.
pub const ACCEPTED_FORMS: &str = "DIR, dedup:DIR, standard:DIR, tape:DIR (a virtual tape library), \
tape:/dev/nstN?changer=/dev/sgM&dir=DIR (untested on hardware), or \
s3://BUCKET[/PREFIX][?endpoint=URL&region=R&timeout=30s&retry_timeout=2m&part_size=40M&pack_size=480M]";

/// Default time one S3 request may take.
pub const DEFAULT_S3_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time an S3 request may be retried for before it fails.
pub const DEFAULT_S3_RETRY_TIMEOUT: Duration = Duration::from_secs(120);

/// A parsed pool address.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PoolAddress {
    /// A local directory (deduplicating pool).
    Local(PathBuf),
    /// An S3-compatible bucket.
    S3(S3Address),
    /// A tape pool on the virtual tape library in `DIR/library`.
    Tape(PathBuf),
    /// A standard pool: one folder per backup set.
    Standard(PathBuf),
    /// A tape pool on a real drive and changer (Linux `st` and `mtx`;
    /// untested on hardware), its local side in `dir`.
    TapeDevice {
        /// The non-rewinding tape device (`/dev/nstN`).
        drive: PathBuf,
        /// The changer's SCSI generic device (`/dev/sgM`).
        changer: PathBuf,
        /// The pool's local directory (catalog, media state, copies).
        dir: PathBuf,
    },
}

/// Where an object pool lives. Holds no secrets.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct S3Address {
    /// The bucket.
    pub bucket: String,
    /// Key prefix inside the bucket (no leading or trailing `/`; may be empty).
    pub prefix: String,
    /// The service endpoint (`http(s)://host[:port]`), when not AWS's.
    pub endpoint: Option<String>,
    /// The region (default: `AWS_REGION`, else `us-east-1`).
    pub region: Option<String>,
    /// Time one request may take.
    pub timeout: Duration,
    /// Time a request may be retried for before it fails.
    pub retry_timeout: Duration,
    /// Multipart part size (5 MiB–5 GiB).
    pub part_size: usize,
    /// Stored size a pack grows to before it is sealed.
    pub pack_size: u64,
}

impl fmt::Display for S3Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}", self.bucket)?;
        if !self.prefix.is_empty() {
            write!(f, "/{}", self.prefix)?;
        }
        let mut sep = '?';
        if let Some(e) = &self.endpoint {
            write!(f, "{sep}endpoint={e}")?;
            sep = '&';
        }
        if let Some(r) = &self.region {
            write!(f, "{sep}region={r}")?;
        }
        Ok(())
    }
}

impl fmt::Display for PoolAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoolAddress::Local(p) => write!(f, "{}", p.display()),
            PoolAddress::S3(s) => write!(f, "{s}"),
            PoolAddress::Tape(p) => write!(f, "tape:{}", p.display()),
            PoolAddress::Standard(p) => write!(f, "standard:{}", p.display()),
            PoolAddress::TapeDevice {
                drive,
                changer,
                dir,
            } => write!(
                f,
                "tape:{}?changer={}&dir={}",
                drive.display(),
                changer.display(),
                dir.display()
            ),
        }
    }
}

impl PoolAddress {
    /// Parses an address; the error shows the accepted forms.
    pub fn parse(address: &str) -> Result<Self, PoolOpenError> {
        let bad = |reason: &str| PoolOpenError::BadAddress {
            // Redacted as written and once decoded (`%40` is an `@`).
            address: redact(&percent_decode(address).unwrap_or_else(|_| address.to_string())),
            reason: reason.to_string(),
        };
        if address.is_empty() {
            return Err(bad("empty address"));
        }
        if let Some(rest) = address.strip_prefix("s3://") {
            return parse_s3(rest).map(PoolAddress::S3).map_err(|r| bad(&r));
        }
        if let Some(dir) = address.strip_prefix("dedup:") {
            if dir.is_empty() {
                return Err(bad("dedup: needs a directory"));
            }
            return Ok(PoolAddress::Local(PathBuf::from(dir)));
        }
        if let Some(dir) = address.strip_prefix("tape:") {
            if dir.is_empty() {
                return Err(bad("tape: needs a directory"));
            }
            if dir.starts_with("/dev/") {
                return parse_tape_device(dir).map_err(|r| bad(&r));
            }
            if dir.contains('?') {
                return Err(bad(
                    "tape:DIR takes no options (a device is tape:/dev/nstN?…)",
                ));
            }
            return Ok(PoolAddress::Tape(PathBuf::from(dir)));
        }
        if let Some(dir) = address.strip_prefix("standard:") {
            if dir.is_empty() {
                return Err(bad("standard: needs a directory"));
            }
            return Ok(PoolAddress::Standard(PathBuf::from(dir)));
        }
        if let Some((scheme, _)) = address.split_once("://") {
            return Err(bad(&format!("unknown pool kind {scheme:?}")));
        }
        Ok(PoolAddress::Local(PathBuf::from(address)))
    }

    /// The kind of pool, for reports: `local` or `s3`.
    pub fn kind(&self) -> &'static str {
        match self {
            PoolAddress::Local(_) => "local",
            PoolAddress::S3(_) => "s3",
            PoolAddress::Tape(_) | PoolAddress::TapeDevice { .. } => "tape",
            PoolAddress::Standard(_) => "standard",
        }
    }
}

/// `/dev/nstN?changer=/dev/sgM&dir=DIR` (after `tape:`).
fn parse_tape_device(rest: &str) -> Result<PoolAddress, String> {
    let (drive, query) = rest.split_once('?').ok_or(
        "a tape device needs its changer and a local directory: \
         tape:/dev/nstN?changer=/dev/sgM&dir=DIR",
    )?;
    let (mut changer, mut dir) = (None, None);
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("changer", v)) if !v.is_empty() => changer = Some(PathBuf::from(v)),
            Some(("dir", v)) if !v.is_empty() => dir = Some(PathBuf::from(v)),
            _ => {
                return Err(format!(
                    "unknown or empty tape option {pair:?} (changer=, dir=)"
                ))
            }
        }
    }
    Ok(PoolAddress::TapeDevice {
        drive: PathBuf::from(drive),
        changer: changer.ok_or("changer=/dev/sgM is missing")?,
        dir: dir.ok_or("dir=DIR (the pool's local directory) is missing")?,
    })
}

/// `address` with any `user:password@` of a URL in it replaced by `***@`.
pub fn redact(address: &str) -> String {
    let mut out = String::with_capacity(address.len());
    let mut rest = address;
    while let Some(i) = rest.find("://") {
        out.push_str(&rest[..i + 3]);
        rest = &rest[i + 3..];
        let end = rest.find(['/', '?', '&']).unwrap_or(rest.len());
        if let Some(at) = rest[..end].rfind('@') {
            out.push_str("***");
            rest = &rest[at..];
        }
    }
    out.push_str(rest);
    out
}

/// Decodes `%XX` escapes in a query value.
fn percent_decode(s: &str) -> Result<String, String> {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad escape in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8"))
}

fn parse_s3(rest: &str) -> Result<S3Address, String> {
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    let (bucket, prefix) = match path.split_once('/') {
        Some((b, p)) => (b, p.trim_matches('/')),
        None => (path, ""),
    };
    let valid_bucket = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-');
    if !valid_bucket {
        return Err(format!(
            "bucket {bucket:?} must be 3–63 characters of a–z, 0–9, '.' and '-'"
        ));
    }
    if prefix.split('/').any(|seg| seg == "." || seg == "..") || prefix.contains("//") {
        return Err(format!("prefix {prefix:?} has empty, . or .. segments"));
    }
    let mut addr = S3Address {
        bucket: bucket.to_string(),
        prefix: prefix.to_string(),
        endpoint: None,
        region: None,
        timeout: DEFAULT_S3_TIMEOUT,
        retry_timeout: DEFAULT_S3_RETRY_TIMEOUT,
        part_size: PART_SIZE,
        pack_size: PACK_SIZE,
    };
    for pair in query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("query item {pair:?} is not KEY=VALUE"))?;
        let value = percent_decode(value)?;
        let duration = |v: &str| {
            humantime::parse_duration(v)
                .ok()
                .filter(|d| !d.is_zero() && *d <= Duration::from_secs(3600))
                .ok_or_else(|| format!("{key}={v:?}: give a duration from 1ms to 1h, like 30s"))
        };
        match key {
            "endpoint" => addr.endpoint = Some(parse_endpoint(&value)?),
            "region" if !value.is_empty() => addr.region = Some(value),
            "timeout" => addr.timeout = duration(&value)?,
            "retry_timeout" => addr.retry_timeout = duration(&value)?,
            "part_size" => {
                addr.part_size = size(&value)
                    .filter(|n| (5 << 20..=5 << 30).contains(n))
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| format!("part_size={value:?}: give 5M to 5G"))?
            }
            "pack_size" => {
                addr.pack_size = size(&value)
                    .filter(|n| (1 << 20..=64 << 30).contains(n))
                    .ok_or_else(|| format!("pack_size={value:?}: give 1M to 64G"))?
            }
            other => return Err(format!("unknown setting {other:?}")),
        }
    }
    // S3 allows 10 000 parts per upload; stay well below.
    if addr.pack_size / addr.part_size as u64 > 1000 {
        return Err(format!(
            "pack_size {} / part_size {} would need more than 1000 parts per pack",
            addr.pack_size, addr.part_size
        ));
    }
    Ok(addr)
}

/// A size like `40M` or `5G`.
fn size(v: &str) -> Option<u64> {
    cairn_engine::parse_size(v).ok()
}

/// Checks an endpoint URL: `http(s)://host[:port]`, no credentials in it.
pub(crate) fn parse_endpoint(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| {
            format!(
                "endpoint {:?} must start with http:// or https://",
                redact(url)
            )
        })?;
    let host = rest.split('/').next().unwrap_or("");
    if host.contains('@') {
        return Err(
            "the endpoint must not carry credentials; set AWS_ACCESS_KEY_ID and \
             AWS_SECRET_ACCESS_KEY"
                .into(),
        );
    }
    if host.is_empty() {
        return Err(format!("endpoint {:?} has no host", redact(url)));
    }
    Ok(url.trim_end_matches('/').to_string())
}

/// An opened pool and what the caller may want to know about it.
#[derive(Clone)]
#[non_exhaustive]
pub struct OpenedPool {
    /// The pool.
    pub pool: DynPool,
    /// Where it is.
    pub address: PoolAddress,
    /// Requests made, for pools that pay per request (object storage).
    pub requests: Option<Arc<RequestStats>>,
    /// The tape pool itself, for what only tape has (its catalog rebuild,
    /// its media sets).
    pub tape: Option<crate::tape::TapePool>,
}

impl fmt::Debug for OpenedPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenedPool")
            .field("address", &self.address)
            .field("requests", &self.requests)
            .finish_non_exhaustive()
    }
}

/// How [`open_with`] opens a pool.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct OpenOptions {
    /// Where remote pools keep their local cache of index segments and
    /// manifests (one sub-directory per pool address). `None`: the default
    /// ([`default_cache_dir`](crate::default_cache_dir)).
    pub cache_dir: Option<PathBuf>,
    /// Use no local cache.
    pub no_cache: bool,
    /// Create what the medium needs first (a local directory and its layout;
    /// a virtual tape library; an S3 bucket must exist already).
    pub create: bool,
    /// The virtual tape library a `tape:DIR` pool gets when `create` finds
    /// none (default: 8 cartridges of LTO-9's 18 TB, sparse files).
    pub virtual_tape: Option<crate::tape::VirtualTapeOptions>,
    /// Incrementals per backup set of a new `standard:DIR` pool (default
    /// [`DEFAULT_SET_LENGTH`](crate::DEFAULT_SET_LENGTH)).
    pub standard_set_length: Option<u32>,
}

/// Opens the pool at `address` (which must exist), with the default cache.
pub fn open(address: &str) -> Result<OpenedPool, PoolOpenError> {
    open_with(address, &OpenOptions::default())
}

/// Opens the pool at `address`, creating what its medium needs first (a
/// local directory and its layout; an S3 bucket must exist already).
pub fn create(address: &str) -> Result<OpenedPool, PoolOpenError> {
    open_with(
        address,
        &OpenOptions {
            create: true,
            ..OpenOptions::default()
        },
    )
}

/// Opens the pool at `address` as `options` say.
pub fn open_with(address: &str, options: &OpenOptions) -> Result<OpenedPool, PoolOpenError> {
    let mut opened = open_parsed(PoolAddress::parse(address)?, options)?;
    if let PoolAddress::S3(_) = &opened.address {
        let base = match (&options.cache_dir, options.no_cache) {
            (_, true) => None,
            (Some(dir), false) => Some(dir.clone()),
            (None, false) => crate::default_cache_dir(),
        };
        if let Some(base) = base {
            // The address and the endpoint from the environment (the same
            // bucket on two services must not share a cache).
            let endpoint = std::env::var("AWS_ENDPOINT_URL")
                .or_else(|_| std::env::var("AWS_ENDPOINT"))
                .unwrap_or_default();
            let key =
                cairn_engine::ChunkId::of(format!("{}\n{endpoint}", opened.address).as_bytes())
                    .to_hex();
            let dir = base.join(key.get(..24).unwrap_or(&key));
            opened.pool = Arc::new(cairn_engine::WrappedPool(crate::CachedPool::new(
                opened.pool.clone(),
                dir,
            )));
        }
    }
    Ok(opened)
}

fn open_parsed(address: PoolAddress, options: &OpenOptions) -> Result<OpenedPool, PoolOpenError> {
    let create = options.create;
    match &address {
        PoolAddress::Tape(dir) => {
            let settings = |reason: String| PoolOpenError::Settings {
                address: address.to_string(),
                reason,
            };
            if dir.exists() && !dir.is_dir() {
                return Err(PoolOpenError::NotADirectory(dir.clone()));
            }
            let library_dir = dir.join("library");
            let library = if create && !library_dir.join("library.json").exists() {
                let opts = options.virtual_tape.clone().unwrap_or_else(|| {
                    crate::tape::VirtualTapeOptions::new(8, crate::tape::LTO9_CAPACITY)
                });
                crate::tape::VirtualTapeLibrary::create(&library_dir, &opts)
            } else if !dir.exists() {
                return Err(PoolOpenError::Missing(dir.clone()));
            } else {
                crate::tape::VirtualTapeLibrary::open(&library_dir)
            }
            .map_err(|e| settings(e.to_string()))?;
            open_tape(dir, Box::new(library), address.clone())
        }
        PoolAddress::Standard(dir) => {
            let pool = if create {
                crate::StandardPool::create(
                    dir,
                    options
                        .standard_set_length
                        .unwrap_or(crate::DEFAULT_SET_LENGTH),
                )?
            } else {
                crate::StandardPool::open(dir)?
            };
            Ok(OpenedPool {
                pool: Arc::new(pool),
                address,
                requests: None,
                tape: None,
            })
        }
        PoolAddress::TapeDevice {
            drive,
            changer,
            dir,
        } => {
            let settings = |reason: String| PoolOpenError::Settings {
                address: address.to_string(),
                reason,
            };
            let changer = crate::tape::scsi::MtxChanger::open(changer, vec![drive.clone()])
                .map_err(|e| settings(e.to_string()))?;
            if create {
                std::fs::create_dir_all(dir).map_err(|source| PoolOpenError::Io {
                    path: dir.clone(),
                    source,
                })?;
            } else if !dir.is_dir() {
                return Err(PoolOpenError::Missing(dir.clone()));
            }
            open_tape(dir, Box::new(changer), address.clone())
        }
        PoolAddress::Local(dir) => {
            let pool = if create {
                LocalPool::create(dir)?
            } else {
                LocalPool::open(dir)?
            };
            Ok(OpenedPool {
                pool: Arc::new(pool),
                address,
                requests: None,
                tape: None,
            })
        }
        PoolAddress::S3(s3) => {
            let pool = ObjectPool::open(s3)?;
            let requests = Some(pool.stats());
            Ok(OpenedPool {
                pool: Arc::new(pool),
                address,
                requests,
                tape: None,
            })
        }
    }
}

/// Opens the tape pool in `dir` on `library`: a tape another process
/// drives is [`PoolOpenError::Busy`] (worth trying again), any other
/// failure the pool's settings.
fn open_tape(
    dir: &std::path::Path,
    library: Box<dyn crate::tape::TapeLibrary>,
    address: PoolAddress,
) -> Result<OpenedPool, PoolOpenError> {
    let pool = crate::tape::TapePool::open(dir, library).map_err(|e| match e {
        cairn_engine::Error::PoolBusy(reason) => PoolOpenError::Busy {
            address: address.to_string(),
            reason,
        },
        e => PoolOpenError::Settings {
            address: address.to_string(),
            reason: e.to_string(),
        },
    })?;
    Ok(OpenedPool {
        pool: Arc::new(pool.clone()),
        address,
        requests: None,
        tape: Some(pool),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_or_say_what_is_accepted() {
        assert_eq!(
            PoolAddress::parse("/backup/pool").unwrap(),
            PoolAddress::Local("/backup/pool".into())
        );
        assert_eq!(
            PoolAddress::parse("dedup:rel/dir").unwrap(),
            PoolAddress::Local("rel/dir".into())
        );
        let PoolAddress::S3(s) = PoolAddress::parse(
            "s3://my-bucket/a/b/?endpoint=http%3A%2F%2F127.0.0.1%3A9000&region=eu-1&timeout=5s",
        )
        .unwrap() else {
            panic!("not s3")
        };
        assert_eq!(s.bucket, "my-bucket");
        assert_eq!(s.prefix, "a/b");
        assert_eq!(s.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(s.region.as_deref(), Some("eu-1"));
        assert_eq!(s.timeout, Duration::from_secs(5));
        assert_eq!(
            s.to_string(),
            "s3://my-bucket/a/b?endpoint=http://127.0.0.1:9000&region=eu-1"
        );
        let PoolAddress::S3(bare) = PoolAddress::parse("s3://bkt").unwrap() else {
            panic!("not s3")
        };
        assert_eq!(bare.prefix, "");
        for bad in [
            "",
            "s3://",
            "s3://Upper/x",
            "s3://ab",
            "s3://bucket/../x",
            "s3://bucket?colour=red",
            "s3://bucket?timeout=forever",
            "s3://bucket?endpoint=ftp://x",
            "s3://bucket?endpoint=http://key:secret@host",
            "s3://bucket?endpoint=http%3A%2F%2Fkey%3Asecret%40host",
            "s3://bucket?endpoint=ftp://key:secret@host",
            "s3://bucket?part_size=5M&pack_size=64G",
            "gs://bucket",
            "dedup:",
            "tape:/dev/nst0",
            "tape:/dev/nst0?changer=/dev/sg1",
            "tape:/dev/nst0?dir=/x",
            "tape:/dev/nst0?changer=/dev/sg1&dir=/x&speed=9",
            "tape:dir?x=1",
        ] {
            let e = PoolAddress::parse(bad).unwrap_err();
            assert!(matches!(e, PoolOpenError::BadAddress { .. }), "{bad}: {e}");
            assert!(e.to_string().contains("s3://BUCKET"), "{bad}: {e}");
            assert!(!e.to_string().contains("secret"), "{bad}: {e}");
        }
    }
}

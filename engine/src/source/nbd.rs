//! A pure-Rust NBD client (the network block device protocol spoken by
//! qemu-nbd, libvirt's pull-mode backup and nbdkit): fixed-newstyle
//! handshake, structured replies, `NBD_OPT_SET_META_CONTEXT` for
//! `base:allocation` and `qemu:dirty-bitmap:NAME`, `NBD_CMD_BLOCK_STATUS`
//! and `NBD_CMD_READ`, each looped until the asked range is covered (replies
//! may cover less; requests are capped at 32 MiB). Unix sockets and TCP.
//!
//! [`NbdSource`] is a [`DiskSource`]: allocated extents come from
//! `base:allocation`, [`NbdSource::dirty_extents`] reads a dirty bitmap, and
//! reads are spread over several connections to the same export ("streams
//! per disk"; qemu-nbd accepts them with `-e N`). [`NbdTarget`] is a
//! [`DiskTarget`] writing a restore into a blank writable export
//! (`NBD_CMD_WRITE`, `NBD_CMD_FLUSH`).
//! Reference client for the tests: `nbdinfo --map` from libnbd-bin.
//!
//! Every socket has a read/write timeout: a server that stops answering
//! fails the job with an error naming it instead of hanging it.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::ops::Range;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::source::{DiskSource, DiskTarget};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const INFO_EXPORT: u16 = 0;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_BLOCK_STATUS: u16 = 7;

/// Transmission flag: the export is read-only.
pub const TRANSMIT_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: the server accepts `NBD_CMD_FLUSH`.
pub const TRANSMIT_SEND_FLUSH: u16 = 1 << 2;

/// How long a socket may stay silent before the operation fails.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Handshake timeout for the extra read connections of an [`NbdSource`]: a
/// server that accepts one client at a time (qemu-nbd without `-e`) never
/// greets them, and the source then reads over the connections it has.
pub const EXTRA_CONNECTION_TIMEOUT: Duration = Duration::from_secs(3);
/// Most connections an [`NbdSource`] opens to one export.
pub const MAX_CONNECTIONS: usize = 16;
/// Largest block-status reply chunk accepted (8 Mi extents): bounds the
/// memory a misbehaving server can make the client allocate.
const MAX_BLOCK_STATUS_PAYLOAD: u32 = 64 << 20;
/// Reads smaller than this are not split across connections.
const MIN_SPLIT_PIECE: usize = 512 << 10;

const REPLY_FLAG_DONE: u16 = 1;
const REPLY_NONE: u16 = 0;
const REPLY_OFFSET_DATA: u16 = 1;
const REPLY_OFFSET_HOLE: u16 = 2;
const REPLY_BLOCK_STATUS: u16 = 5;
const REPLY_ERROR_BIT: u16 = 1 << 15;

/// Largest request sent (qemu-nbd refuses more than 32 MiB).
pub const MAX_REQUEST: u32 = 32 << 20;

/// `base:allocation` flag: the range is a hole.
pub const STATE_HOLE: u32 = 1;
/// `base:allocation` flag: the range reads as zeros.
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:*` flag: the range is dirty.
pub const STATE_DIRTY: u32 = 1;

/// Where an NBD export is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdAddress {
    /// `nbd+unix:///EXPORT?socket=PATH`
    Unix {
        /// The socket's path.
        socket: String,
        /// The export's name.
        export: String,
    },
    /// `nbd://HOST[:PORT]/EXPORT`
    Tcp {
        /// Host name or address.
        host: String,
        /// TCP port (default 10809).
        port: u16,
        /// The export's name.
        export: String,
    },
}

impl NbdAddress {
    /// Parses `nbd+unix:///EXPORT?socket=PATH` or `nbd://HOST[:PORT]/EXPORT`.
    pub fn parse(uri: &str) -> Result<Self> {
        let bad = |why: &str| Error::InvalidArgument(format!("NBD URI {uri:?}: {why}"));
        if let Some(rest) = uri.strip_prefix("nbd+unix://") {
            let (path, query) = rest
                .split_once('?')
                .ok_or_else(|| bad("needs ?socket=PATH"))?;
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .ok_or_else(|| bad("needs ?socket=PATH"))?;
            Ok(NbdAddress::Unix {
                socket: socket.to_string(),
                export: path.trim_start_matches('/').to_string(),
            })
        } else if let Some(rest) = uri.strip_prefix("nbd://") {
            let (hostport, export) = rest.split_once('/').unwrap_or((rest, ""));
            let (host, port) = match hostport.rsplit_once(':') {
                Some((h, p)) => (h, p.parse().map_err(|_| bad("bad port"))?),
                None => (hostport, 10809),
            };
            if host.is_empty() {
                return Err(bad("no host"));
            }
            Ok(NbdAddress::Tcp {
                host: host.to_string(),
                port,
                export: export.to_string(),
            })
        } else {
            Err(bad(
                "use nbd+unix:///EXPORT?socket=PATH or nbd://HOST:PORT/EXPORT",
            ))
        }
    }

    fn export(&self) -> &str {
        match self {
            NbdAddress::Unix { export, .. } | NbdAddress::Tcp { export, .. } => export,
        }
    }
}

/// A byte stream to a server; sockets can bound how long a call waits.
trait Stream: Read + Write + Send {
    fn set_timeout(&self, _timeout: Duration) -> std::io::Result<()> {
        Ok(())
    }
}

impl Stream for UnixStream {
    fn set_timeout(&self, timeout: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(timeout))?;
        self.set_write_timeout(Some(timeout))
    }
}

impl Stream for TcpStream {
    fn set_timeout(&self, timeout: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(timeout))?;
        self.set_write_timeout(Some(timeout))
    }
}

/// Any other byte stream (tests, fuzzing): no timeouts.
struct Plain<S>(S);

impl<S: Read> Read for Plain<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl<S: Write> Write for Plain<S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl<S: Read + Write + Send> Stream for Plain<S> {}

/// One connection to an export, after the handshake.
pub struct NbdConnection {
    stream: Box<dyn Stream>,
    peer: String,
    size: u64,
    /// Transmission flags from the server (`TRANSMIT_*`).
    flags: u16,
    contexts: HashMap<String, u32>,
    cookie: u64,
    /// Broken: closed without the polite goodbye.
    broken: bool,
    /// Largest read request sent (reads are split into requests of at
    /// most this many bytes).
    max_read: u32,
}

impl std::fmt::Debug for NbdConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdConnection")
            .field("peer", &self.peer)
            .field("size", &self.size)
            .field("flags", &self.flags)
            .field("contexts", &self.contexts)
            .finish()
    }
}

impl NbdConnection {
    /// Connects, negotiates structured replies and the given metadata
    /// contexts (unknown ones are simply absent), and enters transmission.
    /// Socket calls time out after 60 seconds.
    pub fn connect(uri: &str, contexts: &[&str]) -> Result<Self> {
        Self::connect_with(uri, contexts, DEFAULT_TIMEOUT, DEFAULT_TIMEOUT)
    }

    /// [`connect`](Self::connect) with explicit timeouts for the handshake
    /// and for every later socket call.
    pub fn connect_with(
        uri: &str,
        contexts: &[&str],
        handshake_timeout: Duration,
        timeout: Duration,
    ) -> Result<Self> {
        let addr = NbdAddress::parse(uri)?;
        let stream: Box<dyn Stream> = match &addr {
            NbdAddress::Unix { socket, .. } => Box::new(
                UnixStream::connect(socket)
                    .map_err(|e| Error::io(format!("connecting to NBD socket {socket}"), e))?,
            ),
            NbdAddress::Tcp { host, port, .. } => {
                let what = || format!("connecting to NBD server {host}:{port}");
                let addrs = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), *port))
                    .map_err(|e| Error::io(what(), e))?;
                // Each address in turn, each bounded by the handshake
                // timeout (an unreachable host fails in seconds, not minutes).
                let mut last = std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the host name resolves to no address",
                );
                let mut stream = None;
                for addr in addrs {
                    match TcpStream::connect_timeout(&addr, handshake_timeout) {
                        Ok(s) => {
                            stream = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                let s = stream.ok_or_else(|| Error::io(what(), last))?;
                let _ = s.set_nodelay(true);
                Box::new(s)
            }
        };
        stream
            .set_timeout(handshake_timeout)
            .map_err(|e| Error::io(format!("setting timeouts on {uri}"), e))?;
        let c = Self::handshake_over(stream, uri, addr.export(), contexts)?;
        c.stream
            .set_timeout(timeout)
            .map_err(|e| Error::io(format!("setting timeouts on {uri}"), e))?;
        Ok(c)
    }

    /// Runs the handshake over any byte stream (tests and fuzzing feed
    /// recorded or arbitrary server bytes here).
    pub fn over<S: Read + Write + Send + 'static>(
        stream: S,
        peer: &str,
        export: &str,
        contexts: &[&str],
    ) -> Result<Self> {
        Self::handshake_over(Box::new(Plain(stream)), peer, export, contexts)
    }

    fn handshake_over(
        stream: Box<dyn Stream>,
        peer: &str,
        export: &str,
        contexts: &[&str],
    ) -> Result<Self> {
        let mut c = NbdConnection {
            stream,
            peer: peer.to_string(),
            size: 0,
            flags: 0,
            contexts: HashMap::new(),
            cookie: 1,
            broken: false,
            max_read: MAX_REQUEST,
        };
        c.handshake(export, contexts)?;
        Ok(c)
    }

    fn protocol(&self, detail: impl Into<String>) -> Error {
        Error::Protocol {
            peer: self.peer.clone(),
            detail: detail.into(),
        }
    }

    fn io(&self, what: &str, e: std::io::Error) -> Error {
        Error::io(format!("NBD {what} with {}", self.peer), e)
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<()> {
        self.stream.read_exact(buf).map_err(|e| {
            // A read timeout shows as WouldBlock or TimedOut: say so.
            let what = if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) {
                format!(
                    "NBD read from {}: the server did not answer in full within the timeout",
                    self.peer
                )
            } else {
                format!("NBD read from {}", self.peer)
            };
            // The server closing mid-reply is a dropped connection (a
            // network-type failure), not a short file.
            let e = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "the connection closed in the middle of a reply",
                )
            } else {
                e
            };
            Error::io(what, e)
        })
    }

    fn get<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.read_exact(&mut b)?;
        Ok(b)
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(self.get()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.get()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(self.get()?))
    }

    fn send(&mut self, data: &[u8]) -> Result<()> {
        let r = self
            .stream
            .write_all(data)
            .and_then(|()| self.stream.flush());
        r.map_err(|e| self.io("write", e))
    }

    fn send_option(&mut self, option: u32, data: &[u8]) -> Result<()> {
        let mut m = Vec::with_capacity(16 + data.len());
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.send(&m)
    }

    /// One option reply: (reply type, payload).
    fn option_reply(&mut self, option: u32) -> Result<(u32, Vec<u8>)> {
        if self.u64()? != OPT_REPLY_MAGIC {
            return Err(self.protocol("bad option reply magic"));
        }
        let opt = self.u32()?;
        let kind = self.u32()?;
        let len = self.u32()?;
        if opt != option {
            return Err(self.protocol(format!("reply for option {opt}, expected {option}")));
        }
        if len > 1 << 20 {
            return Err(self.protocol(format!("option reply of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        self.read_exact(&mut data)?;
        Ok((kind, data))
    }

    // Long on purpose: the fixed-newstyle handshake is one sequence of
    // messages, read top to bottom against the protocol document.
    fn handshake(&mut self, export: &str, contexts: &[&str]) -> Result<()> {
        if self.u64()? != NBDMAGIC || self.u64()? != IHAVEOPT {
            return Err(self.protocol("not a newstyle NBD server"));
        }
        let flags = self.u16()?;
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(self.protocol("server does not support fixed newstyle"));
        }
        let client = (flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)) as u32;
        self.send(&client.to_be_bytes())?;

        self.send_option(OPT_STRUCTURED_REPLY, &[])?;
        let (kind, _) = self.option_reply(OPT_STRUCTURED_REPLY)?;
        if kind != REP_ACK {
            return Err(self.protocol(format!("structured replies refused (reply {kind:#x})")));
        }

        if !contexts.is_empty() {
            let mut d = Vec::new();
            d.extend_from_slice(&(export.len() as u32).to_be_bytes());
            d.extend_from_slice(export.as_bytes());
            d.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
            for q in contexts {
                d.extend_from_slice(&(q.len() as u32).to_be_bytes());
                d.extend_from_slice(q.as_bytes());
            }
            self.send_option(OPT_SET_META_CONTEXT, &d)?;
            loop {
                let (kind, data) = self.option_reply(OPT_SET_META_CONTEXT)?;
                match kind {
                    REP_ACK => break,
                    REP_META_CONTEXT if data.len() >= 4 => {
                        let id = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                        let name = String::from_utf8_lossy(&data[4..]).to_string();
                        self.contexts.insert(name, id);
                    }
                    k if k & (1 << 31) != 0 => {
                        return Err(self.protocol(format!(
                            "metadata contexts refused (error {:#x}: {})",
                            k,
                            String::from_utf8_lossy(&data)
                        )))
                    }
                    k => {
                        return Err(
                            self.protocol(format!("unexpected reply {k} to SET_META_CONTEXT"))
                        )
                    }
                }
            }
        }

        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        self.send_option(OPT_GO, &d)?;
        let mut size = None;
        loop {
            let (kind, data) = self.option_reply(OPT_GO)?;
            match kind {
                REP_ACK => break,
                REP_INFO if data.len() >= 12 && data[..2] == INFO_EXPORT.to_be_bytes() => {
                    let mut s = [0u8; 8];
                    s.copy_from_slice(&data[2..10]);
                    size = Some(u64::from_be_bytes(s));
                    self.flags = u16::from_be_bytes([data[10], data[11]]);
                }
                REP_INFO => {}
                k if k & (1 << 31) != 0 => {
                    return Err(self.protocol(format!(
                        "export {export:?} refused (error {:#x}: {})",
                        k,
                        String::from_utf8_lossy(&data)
                    )))
                }
                k => return Err(self.protocol(format!("unexpected reply {k} to GO"))),
            }
        }
        self.size = size.ok_or_else(|| self.protocol("server sent no export size"))?;
        Ok(())
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The server's transmission flags (`TRANSMIT_*`).
    pub fn transmission_flags(&self) -> u16 {
        self.flags
    }

    /// Whether the export refuses writes.
    pub fn read_only(&self) -> bool {
        self.flags & TRANSMIT_READ_ONLY != 0
    }

    /// Whether the server agreed to a metadata context.
    pub fn has_context(&self, name: &str) -> bool {
        self.contexts.contains_key(name)
    }

    fn request(&mut self, kind: u16, offset: u64, len: u32) -> Result<u64> {
        self.request_with(kind, offset, len, &[])
    }

    /// Sends one request header followed by `payload` (a write's data).
    fn request_with(&mut self, kind: u16, offset: u64, len: u32, payload: &[u8]) -> Result<u64> {
        let cookie = self.cookie;
        self.cookie += 1;
        let mut m = [0u8; 28];
        m[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        m[6..8].copy_from_slice(&kind.to_be_bytes());
        m[8..16].copy_from_slice(&cookie.to_be_bytes());
        m[16..24].copy_from_slice(&offset.to_be_bytes());
        m[24..28].copy_from_slice(&len.to_be_bytes());
        let r = self
            .stream
            .write_all(&m)
            .and_then(|()| self.stream.write_all(payload))
            .and_then(|()| self.stream.flush());
        r.map_err(|e| self.io("write", e))?;
        Ok(cookie)
    }

    /// Waits for the reply to a command that returns no data.
    fn expect_done(&mut self, cookie: u64, what: &str) -> Result<()> {
        loop {
            let (flags, kind, len) = self.chunk_header(cookie)?;
            match kind {
                REPLY_NONE if len == 0 => {}
                k if k & REPLY_ERROR_BIT != 0 => return Err(self.error_chunk(len)?),
                k => {
                    return Err(self.protocol(format!("unexpected reply chunk type {k} to {what}")))
                }
            }
            if flags & REPLY_FLAG_DONE != 0 {
                return Ok(());
            }
        }
    }

    /// Writes `data` at `offset`, splitting into requests of ≤ 32 MiB.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if self.read_only() {
            return Err(self.protocol("the export is read-only"));
        }
        self.check_range("write", offset, data.len())?;
        for (i, piece) in data.chunks(MAX_REQUEST as usize).enumerate() {
            let at = offset + i as u64 * MAX_REQUEST as u64;
            let cookie = self.request_with(CMD_WRITE, at, piece.len() as u32, piece)?;
            self.expect_done(cookie, "WRITE").map_err(|e| match e {
                Error::Protocol { peer, detail } => Error::Protocol {
                    peer,
                    detail: format!("writing {} bytes at {at}: {detail}", piece.len()),
                },
                e => e,
            })?;
        }
        Ok(())
    }

    /// Asks the server to make every completed write durable (a no-op when
    /// the server does not offer flushes).
    pub fn flush(&mut self) -> Result<()> {
        if self.flags & TRANSMIT_SEND_FLUSH == 0 {
            return Ok(());
        }
        let cookie = self.request(CMD_FLUSH, 0, 0)?;
        self.expect_done(cookie, "FLUSH")
    }

    /// Reads one reply chunk header: (flags, type, payload length), or an
    /// error for a simple reply carrying an error.
    fn chunk_header(&mut self, cookie: u64) -> Result<(u16, u16, u32)> {
        match self.u32()? {
            STRUCTURED_REPLY_MAGIC => {
                let flags = self.u16()?;
                let kind = self.u16()?;
                let got = self.u64()?;
                let len = self.u32()?;
                if got != cookie {
                    return Err(
                        self.protocol(format!("reply for request {got}, expected {cookie}"))
                    );
                }
                Ok((flags, kind, len))
            }
            SIMPLE_REPLY_MAGIC => {
                let error = self.u32()?;
                let got = self.u64()?;
                if got != cookie {
                    return Err(
                        self.protocol(format!("reply for request {got}, expected {cookie}"))
                    );
                }
                if error != 0 {
                    return Err(self.protocol(format!("request failed with errno {error}")));
                }
                Ok((REPLY_FLAG_DONE, REPLY_NONE, 0))
            }
            m => Err(self.protocol(format!("bad reply magic {m:#x}"))),
        }
    }

    fn error_chunk(&mut self, len: u32) -> Result<Error> {
        if len > 1 << 16 {
            return Err(self.protocol(format!("error chunk of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        self.read_exact(&mut data)?;
        let errno = data
            .get(..4)
            .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        let msg_len = data
            .get(4..6)
            .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]) as usize);
        let msg = data
            .get(6..6 + msg_len)
            .map(String::from_utf8_lossy)
            .unwrap_or_default();
        Ok(self.protocol(format!("server error {errno}: {msg}")))
    }

    /// Refuses a `what` ("read", "write") of `len` bytes at `offset` that
    /// does not lie inside the export.
    fn check_range(&self, what: &str, offset: u64, len: usize) -> Result<()> {
        if offset.checked_add(len as u64).is_none_or(|e| e > self.size) {
            return Err(self.protocol(format!(
                "{what} of {len} bytes at {offset} past the export's end ({})",
                self.size
            )));
        }
        Ok(())
    }

    /// Fills `buf` from `offset`, splitting into requests of ≤ 32 MiB.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range("read", offset, buf.len())?;
        let step = self.max_read as usize;
        for (i, piece) in buf.chunks_mut(step).enumerate() {
            let at = offset + (i * step) as u64;
            self.read_piece(at, piece)?;
        }
        Ok(())
    }

    /// Sends reads as requests of at most `bytes` (4 KiB–32 MiB; the job
    /// option "read buffer", spec B16).
    pub fn set_max_read(&mut self, bytes: u32) -> Result<()> {
        if !(4096..=MAX_REQUEST).contains(&bytes) {
            return Err(Error::InvalidArgument(format!(
                "NBD read request size {bytes} is out of range (4 KiB–32 MiB)"
            )));
        }
        self.max_read = bytes;
        Ok(())
    }

    fn read_piece(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let cookie = self.request(CMD_READ, offset, buf.len() as u32)?;
        // Every byte must be covered exactly once: the buffer is reused, so
        // a gap or an overlap would pass stale bytes off as disk content.
        let mut pieces: Vec<(usize, usize)> = Vec::new();
        loop {
            let (flags, kind, len) = self.chunk_header(cookie)?;
            match kind {
                REPLY_OFFSET_DATA | REPLY_OFFSET_HOLE => {
                    let at = self.u64()?;
                    let n = if kind == REPLY_OFFSET_DATA {
                        len.checked_sub(8)
                            .ok_or_else(|| self.protocol("short data chunk"))?
                            as usize
                    } else {
                        if len != 12 {
                            return Err(self.protocol(format!("hole chunk of {len} bytes")));
                        }
                        self.u32()? as usize
                    };
                    let range = at
                        .checked_sub(offset)
                        .and_then(|s| usize::try_from(s).ok())
                        .and_then(|s| Some(s..s.checked_add(n)?))
                        .filter(|r| r.end <= buf.len());
                    let Some(range) = range else {
                        return Err(
                            self.protocol(format!("reply chunk at {at}+{n} outside the request"))
                        );
                    };
                    match buf.get_mut(range.clone()) {
                        Some(part) if kind == REPLY_OFFSET_DATA => self.read_exact(part)?,
                        Some(part) => part.fill(0),
                        None => return Err(Error::Internal("checked range out of bounds".into())),
                    }
                    pieces.push((range.start, range.end));
                }
                REPLY_NONE if len == 0 => {}
                k if k & REPLY_ERROR_BIT != 0 => return Err(self.error_chunk(len)?),
                k => return Err(self.protocol(format!("unexpected reply chunk type {k} to READ"))),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        pieces.sort_unstable();
        let mut covered = 0usize;
        for (start, end) in pieces {
            if start != covered {
                return Err(self.protocol(format!(
                    "read at {offset}: reply chunks {} at byte {}",
                    if start < covered {
                        "overlap"
                    } else {
                        "leave a gap"
                    },
                    start.min(covered)
                )));
            }
            covered = end;
        }
        if covered != buf.len() {
            return Err(self.protocol(format!(
                "read at {offset}: server covered {covered} of {} bytes",
                buf.len()
            )));
        }
        Ok(())
    }

    /// Block status of `context` from `offset`: (length, flags) runs, which
    /// may cover less than `len` (callers loop).
    pub fn block_status(
        &mut self,
        context: &str,
        offset: u64,
        len: u32,
    ) -> Result<Vec<(u32, u32)>> {
        let id = *self.contexts.get(context).ok_or_else(|| {
            self.protocol(format!("metadata context {context:?} was not negotiated"))
        })?;
        let cookie = self.request(CMD_BLOCK_STATUS, offset, len)?;
        let mut out = Vec::new();
        loop {
            let (flags, kind, plen) = self.chunk_header(cookie)?;
            match kind {
                REPLY_BLOCK_STATUS => {
                    if plen < 4 || (plen - 4) % 8 != 0 || plen > MAX_BLOCK_STATUS_PAYLOAD {
                        return Err(self.protocol(format!("block status payload of {plen} bytes")));
                    }
                    let ctx = self.u32()?;
                    for _ in 0..(plen - 4) / 8 {
                        let l = self.u32()?;
                        let f = self.u32()?;
                        if ctx == id {
                            out.push((l, f));
                        }
                    }
                }
                REPLY_NONE if plen == 0 => {}
                k if k & REPLY_ERROR_BIT != 0 => return Err(self.error_chunk(plen)?),
                k => {
                    return Err(
                        self.protocol(format!("unexpected reply chunk type {k} to BLOCK_STATUS"))
                    )
                }
            }
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        if out.is_empty() || out.iter().any(|&(l, _)| l == 0) {
            return Err(self.protocol(format!("empty block status for {context} at {offset}")));
        }
        Ok(out)
    }

    /// The whole export's ranges whose `context` flags satisfy `pick`, merged.
    pub fn extents_where(
        &mut self,
        context: &str,
        pick: impl Fn(u32) -> bool,
    ) -> Result<Vec<Range<u64>>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        let mut pos = 0u64;
        while pos < self.size {
            let len = (self.size - pos)
                .min(MAX_REQUEST as u64 * 64)
                .min(u32::MAX as u64) as u32;
            for (l, f) in self.block_status(context, pos, len)? {
                let end = (pos + l as u64).min(self.size);
                if pick(f) {
                    match out.last_mut() {
                        Some(last) if last.end == pos => last.end = end,
                        _ => out.push(pos..end),
                    }
                }
                pos = end;
                if pos >= self.size {
                    break;
                }
            }
        }
        Ok(out)
    }
}

impl Drop for NbdConnection {
    fn drop(&mut self) {
        // Polite disconnect; errors do not matter any more.
        if !self.broken {
            let _ = self.request(CMD_DISC, 0, 0);
        }
    }
}

/// A disk read over NBD, over one or more connections to the same export.
#[derive(Debug)]
pub struct NbdSource {
    uri: String,
    size: u64,
    /// The first connection carries the metadata contexts; reads use all.
    connections: Vec<Mutex<NbdConnection>>,
    /// The contexts the first connection negotiates.
    contexts: Vec<String>,
    /// The request timeout.
    timeout: Duration,
    /// How long a failed connection is re-established (zero: never).
    reconnect_window: Duration,
    /// Connections re-established so far.
    reconnects: std::sync::atomic::AtomicU64,
    /// Largest read request (see [`NbdConnection::set_max_read`]).
    max_read: u32,
    /// What the export serves, when the caller knows (resume keys on it).
    identity: Option<String>,
    /// Ends reconnect waits early.
    cancel: Option<crate::CancelToken>,
}

/// First pause before a reconnect attempt; doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// Longest pause between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Tries of a request the server answers with an error.
const ANSWERED_TRIES: usize = 3;

impl NbdSource {
    /// Connects and negotiates `base:allocation` and, if given, the dirty
    /// bitmap context `qemu:dirty-bitmap:<bitmap>`.
    pub fn connect(uri: &str, bitmap: Option<&str>) -> Result<Self> {
        Self::connect_many(uri, bitmap, 1)
    }

    /// Like [`connect`](Self::connect), then opens up to `connections - 1`
    /// more connections for parallel reads. A server that accepts fewer
    /// clients (qemu-nbd's `-e`/`--shared` limit) leaves the source with
    /// the connections it got; [`connections`](Self::connections) says how many.
    pub fn connect_many(uri: &str, bitmap: Option<&str>, connections: usize) -> Result<Self> {
        Self::connect_many_with_timeout(uri, bitmap, connections, DEFAULT_TIMEOUT)
    }

    /// Like [`connect_many`](Self::connect_many), with `timeout` for every
    /// request (and the first handshake): a server that stops answering
    /// fails the read after that long instead of the default 60 s.
    pub fn connect_many_with_timeout(
        uri: &str,
        bitmap: Option<&str>,
        connections: usize,
        timeout: Duration,
    ) -> Result<Self> {
        if timeout.is_zero() {
            return Err(Error::InvalidArgument(
                "the NBD timeout must be above zero".into(),
            ));
        }
        if connections == 0 || connections > MAX_CONNECTIONS {
            return Err(Error::InvalidArgument(format!(
                "NBD connections per disk must be 1–{MAX_CONNECTIONS}, not {connections}"
            )));
        }
        let dirty = bitmap.map(|b| format!("qemu:dirty-bitmap:{b}"));
        let mut contexts = vec!["base:allocation"];
        if let Some(d) = &dirty {
            contexts.push(d);
        }
        let first = NbdConnection::connect_with(uri, &contexts, timeout, timeout)?;
        let size = first.size();
        let mut all = vec![Mutex::new(first)];
        while all.len() < connections {
            let handshake = EXTRA_CONNECTION_TIMEOUT.min(timeout);
            match NbdConnection::connect_with(uri, &[], handshake, timeout) {
                Ok(c) if c.size() == size => all.push(Mutex::new(c)),
                Ok(c) => {
                    return Err(Error::Protocol {
                        peer: uri.to_string(),
                        detail: format!(
                            "a second connection reports {} bytes, the first {size}",
                            c.size()
                        ),
                    })
                }
                Err(_) => break,
            }
        }
        Ok(NbdSource {
            uri: uri.to_string(),
            size,
            connections: all,
            contexts: contexts.iter().map(|c| c.to_string()).collect(),
            timeout,
            reconnect_window: Duration::ZERO,
            reconnects: std::sync::atomic::AtomicU64::new(0),
            max_read: MAX_REQUEST,
            identity: None,
            cancel: None,
        })
    }

    /// Says what the export serves (a string that changes whenever its
    /// content may have: the platform snapshot's id, an image file's
    /// device, inode, size and times), so an interrupted backup of it can
    /// resume (see [`DiskSource::identity`]).
    pub fn with_identity(mut self, identity: impl Into<String>) -> Self {
        self.identity = Some(identity.into());
        self
    }

    /// Reads with requests of at most `bytes` (4 KiB–32 MiB; spec B16's
    /// read buffer, 64 KiB–8 MiB in jobs).
    pub fn with_read_request_size(mut self, bytes: u32) -> Result<Self> {
        for c in &self.connections {
            c.lock().set_max_read(bytes)?;
        }
        self.max_read = bytes;
        Ok(self)
    }

    /// After a failed request, re-establishes the connection (backing off
    /// from 50 ms to 5 s between attempts) and retries the request, for up
    /// to `window` (spec B12: 1–60 min, 10 in jobs) before failing it. Zero
    /// (the default): a failed request fails at once.
    pub fn with_reconnect(mut self, window: Duration) -> Self {
        self.reconnect_window = window;
        self
    }

    /// Stops reconnecting (the read fails with [`Error::Cancelled`]) as
    /// soon as `cancel` fires, instead of waiting out the window.
    pub fn with_cancel(mut self, cancel: crate::CancelToken) -> Self {
        self.cancel = Some(cancel);
        self
    }

    /// Connections re-established after failures so far.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs `op` on connection `conn` (index `index`; 0 carries the
    /// contexts); after a failure, reconnects and retries it within the
    /// reconnect window.
    fn on_connection<T>(
        &self,
        index: usize,
        mut op: impl FnMut(&mut NbdConnection) -> Result<T>,
    ) -> Result<T> {
        let conn = &self.connections[index];
        let mut guard = conn.lock();
        let first = match op(&mut guard) {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        // A connection that failed (I/O) is re-established until the
        // window ends; after an error the server answered (EIO) or a reply
        // that made no sense the connection is renewed too (the rest of
        // that reply is still on the wire), but the request is tried at
        // most `ANSWERED_TRIES` times: a bad sector stays bad.
        let answered = |e: &Error| matches!(e, Error::Protocol { .. });
        if self.reconnect_window.is_zero()
            || !(matches!(first, Error::Io { .. }) || answered(&first))
        {
            return Err(first);
        }
        let mut answers = usize::from(answered(&first));
        let start = std::time::Instant::now();
        let mut backoff = FIRST_BACKOFF;
        let mut last = first;
        let contexts: Vec<&str> = if index == 0 {
            self.contexts.iter().map(String::as_str).collect()
        } else {
            Vec::new()
        };
        loop {
            let left = self.reconnect_window.saturating_sub(start.elapsed());
            if left.is_zero() {
                // A network-type failure still: a job may retry it later.
                return Err(Error::io(
                    format!(
                        "NBD {}: the connection could not be re-established within the \
                         reconnect window of {} (last: {last})",
                        self.uri,
                        humantime::format_duration(self.reconnect_window)
                    ),
                    std::io::Error::from(std::io::ErrorKind::TimedOut),
                ));
            }
            let pause_end = std::time::Instant::now() + backoff.min(left);
            loop {
                if self.cancel.as_ref().is_some_and(|c| c.is_cancelled()) {
                    return Err(Error::Cancelled);
                }
                let rest = pause_end.saturating_duration_since(std::time::Instant::now());
                if rest.is_zero() {
                    break;
                }
                std::thread::sleep(rest.min(Duration::from_millis(50)));
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            // A handshake never outlasts the window.
            let left = self
                .reconnect_window
                .saturating_sub(start.elapsed())
                .max(Duration::from_millis(100));
            let handshake = self.timeout.min(left);
            match NbdConnection::connect_with(&self.uri, &contexts, handshake, self.timeout) {
                Ok(c) if c.size() != self.size => {
                    return Err(Error::Protocol {
                        peer: self.uri.clone(),
                        detail: format!(
                            "after reconnecting the export is {} bytes, before {}",
                            c.size(),
                            self.size
                        ),
                    })
                }
                Ok(mut c) => {
                    c.max_read = self.max_read;
                    // The old connection is broken: drop it without a goodbye.
                    let mut old = std::mem::replace(&mut *guard, c);
                    old.broken = true;
                    drop(old);
                    self.reconnects
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    match op(&mut guard) {
                        Ok(v) => return Ok(v),
                        Err(e) if answered(&e) => {
                            answers += 1;
                            if answers >= ANSWERED_TRIES {
                                return Err(e);
                            }
                            last = e;
                        }
                        Err(e) => last = e,
                    }
                }
                Err(e) => last = e,
            }
        }
    }

    /// Connections open to the export.
    pub fn connections(&self) -> usize {
        self.connections.len()
    }

    /// Whether the server offers the dirty bitmap `bitmap`.
    pub fn has_bitmap(&self, bitmap: &str) -> bool {
        self.primary()
            .lock()
            .has_context(&format!("qemu:dirty-bitmap:{bitmap}"))
    }

    fn primary(&self) -> &Mutex<NbdConnection> {
        // `connect_many` always opens at least one connection.
        &self.connections[0]
    }

    /// Dirty ranges of `qemu:dirty-bitmap:<bitmap>`; an error if the server
    /// does not offer that bitmap.
    pub fn dirty_extents(&self, bitmap: &str) -> Result<Vec<Range<u64>>> {
        let ctx = format!("qemu:dirty-bitmap:{bitmap}");
        if !self.primary().lock().has_context(&ctx) {
            return Err(Error::CbtNotTrusted {
                disk: self.uri.clone(),
                reason: format!("the export offers no dirty bitmap {bitmap:?}"),
            });
        }
        self.on_connection(0, |c| c.extents_where(&ctx, |f| f & STATE_DIRTY != 0))
    }
}

impl DiskSource for NbdSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn data_extents(&self) -> Result<Vec<Range<u64>>> {
        if !self.primary().lock().has_context("base:allocation") {
            return Ok(if self.size == 0 {
                Vec::new()
            } else {
                std::iter::once(0..self.size).collect()
            });
        }
        // Holes and ranges the server knows read as zeros are not read.
        self.on_connection(0, |c| {
            c.extents_where("base:allocation", |f| f & (STATE_HOLE | STATE_ZERO) == 0)
        })
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let n = self
            .connections
            .len()
            .min(buf.len() / MIN_SPLIT_PIECE)
            .max(1);
        // One request at a time per connection, each retried on its own
        // after a reconnect (a cut never makes a whole batch read again).
        let step = self.max_read as usize;
        let read_requests = |index: usize, at: u64, part: &mut [u8]| -> Result<()> {
            for (i, piece) in part.chunks_mut(step).enumerate() {
                let pos = at + (i * step) as u64;
                self.on_connection(index, |c| c.read_at(pos, piece))?;
            }
            Ok(())
        };
        if n == 1 {
            return read_requests(0, offset, buf);
        }
        // One piece per connection, each a multiple of 64 KiB but the last.
        let piece = buf.len().div_ceil(n).div_ceil(1 << 16) << 16;
        std::thread::scope(|scope| {
            let handles: Vec<_> = buf
                .chunks_mut(piece)
                .enumerate()
                .map(|(i, part)| {
                    let at = offset + (i * piece) as u64;
                    let read_requests = &read_requests;
                    scope.spawn(move || read_requests(i, at, part))
                })
                .collect();
            let mut result = Ok(());
            for h in handles {
                let r = h
                    .join()
                    .unwrap_or_else(|_| Err(Error::Internal("an NBD reader panicked".into())));
                if result.is_ok() {
                    result = r;
                }
            }
            result
        })
    }

    fn describe(&self) -> String {
        self.uri.clone()
    }

    fn identity(&self) -> Option<String> {
        self.identity.clone()
    }
}

/// A restore target: a blank, writable NBD export (a fresh qcow2 or raw
/// image served by qemu-nbd, or a hypervisor's new disk). Zero extents are
/// never written, so the export must read as zeros where nothing is written:
/// [`NbdTarget::connect`] checks that with `base:allocation`.
#[derive(Debug)]
pub struct NbdTarget {
    uri: String,
    connection: Mutex<NbdConnection>,
}

impl NbdTarget {
    /// Connects to `uri`, which must be writable, exactly `size` bytes and
    /// read as zeros throughout.
    pub fn connect(uri: &str, size: u64) -> Result<Self> {
        let mut c = NbdConnection::connect(uri, &["base:allocation"])?;
        let refuse = |detail: String| Error::Protocol {
            peer: uri.to_string(),
            detail,
        };
        if c.read_only() {
            return Err(refuse("the restore target export is read-only".into()));
        }
        if c.size() != size {
            return Err(refuse(format!(
                "the restore target is {} bytes, the disk {size}",
                c.size()
            )));
        }
        if c.has_context("base:allocation") {
            let data = c.extents_where("base:allocation", |f| f & STATE_ZERO == 0)?;
            if let Some(r) = data.first() {
                return Err(refuse(format!(
                    "the restore target is not blank: bytes {}..{} may hold data",
                    r.start, r.end
                )));
            }
        } else {
            return Err(refuse(
                "the restore target does not report allocation (base:allocation), so it \
                 cannot be checked for blankness"
                    .into(),
            ));
        }
        Ok(NbdTarget {
            uri: uri.to_string(),
            connection: Mutex::new(c),
        })
    }

    /// The export's URI.
    pub fn uri(&self) -> &str {
        &self.uri
    }
}

impl DiskTarget for NbdTarget {
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.connection.lock().write_at(offset, data)
    }

    fn finish(self: Box<Self>) -> Result<()> {
        // Dropping the connection disconnects it after the flush.
        self.connection.lock().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Server bytes: a handshake for an export of `size` bytes, then `replies`.
    fn scripted(size: u64, replies: &[u8]) -> Vec<u8> {
        let mut s = Vec::new();
        s.extend_from_slice(&NBDMAGIC.to_be_bytes());
        s.extend_from_slice(&IHAVEOPT.to_be_bytes());
        s.extend_from_slice(&3u16.to_be_bytes());
        let reply = |s: &mut Vec<u8>, opt: u32, kind: u32, data: &[u8]| {
            s.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
            s.extend_from_slice(&opt.to_be_bytes());
            s.extend_from_slice(&kind.to_be_bytes());
            s.extend_from_slice(&(data.len() as u32).to_be_bytes());
            s.extend_from_slice(data);
        };
        reply(&mut s, OPT_STRUCTURED_REPLY, REP_ACK, &[]);
        let mut info = vec![0u8, 0];
        info.extend_from_slice(&size.to_be_bytes());
        info.extend_from_slice(&0u16.to_be_bytes());
        reply(&mut s, OPT_GO, REP_INFO, &info);
        reply(&mut s, OPT_GO, REP_ACK, &[]);
        s.extend_from_slice(replies);
        s
    }

    /// One structured data chunk answering request `cookie`.
    fn data_chunk(cookie: u64, done: bool, at: u64, data: &[u8]) -> Vec<u8> {
        let mut c = Vec::new();
        c.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        c.extend_from_slice(&u16::from(done).to_be_bytes());
        c.extend_from_slice(&REPLY_OFFSET_DATA.to_be_bytes());
        c.extend_from_slice(&cookie.to_be_bytes());
        c.extend_from_slice(&(data.len() as u32 + 8).to_be_bytes());
        c.extend_from_slice(&at.to_be_bytes());
        c.extend_from_slice(data);
        c
    }

    struct Script(std::io::Cursor<Vec<u8>>);
    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.0.read(buf)
        }
    }
    impl Write for Script {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn read_with(replies: Vec<u8>) -> Result<Vec<u8>> {
        let bytes = scripted(4096, &replies);
        let mut c = NbdConnection::over(Script(std::io::Cursor::new(bytes)), "t", "", &[])?;
        let mut buf = vec![0xeeu8; 16];
        c.read_at(0, &mut buf)?;
        Ok(buf)
    }

    #[test]
    fn read_replies_must_tile_the_request_exactly() {
        // Out of order but exact: accepted.
        let mut r = data_chunk(1, false, 8, &[2; 8]);
        r.extend(data_chunk(1, true, 0, &[1; 8]));
        assert_eq!(read_with(r).unwrap(), [[1u8; 8], [2; 8]].concat());
        // Twice the same half: 16 bytes "covered", half the buffer stale.
        let mut r = data_chunk(1, false, 0, &[1; 8]);
        r.extend(data_chunk(1, true, 0, &[1; 8]));
        assert!(read_with(r).unwrap_err().to_string().contains("overlap"));
        // Offsets far outside the request (once an overflow panic, found by fuzzing).
        let r = data_chunk(1, true, u64::MAX - 3, &[1; 16]);
        assert!(read_with(r).unwrap_err().to_string().contains("outside"));
        // Short coverage.
        let r = data_chunk(1, true, 0, &[1; 8]);
        assert!(read_with(r)
            .unwrap_err()
            .to_string()
            .contains("covered 8 of 16"));
    }

    #[test]
    fn uri_forms() {
        assert_eq!(
            NbdAddress::parse("nbd+unix:///vda?socket=/run/x.sock").unwrap(),
            NbdAddress::Unix {
                socket: "/run/x.sock".into(),
                export: "vda".into()
            }
        );
        assert_eq!(
            NbdAddress::parse("nbd://10.0.0.5:10810/disk0").unwrap(),
            NbdAddress::Tcp {
                host: "10.0.0.5".into(),
                port: 10810,
                export: "disk0".into()
            }
        );
        assert_eq!(
            NbdAddress::parse("nbd://host").unwrap(),
            NbdAddress::Tcp {
                host: "host".into(),
                port: 10809,
                export: "".into()
            }
        );
        for bad in ["nbd+unix:///x", "http://x", "nbd://:1/x", "nbd://h:port/x"] {
            assert!(NbdAddress::parse(bad).is_err(), "{bad}");
        }
    }
}

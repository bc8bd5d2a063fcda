//! Little-endian binary encoding helpers shared by every on-disk structure.
//!
//! [`Decoder`] never panics: every read is bounds-checked and returns a
//! [`DecodeError`] that the caller wraps with what was being decoded and where.

use std::fmt;

use crate::id::hex;

/// Why a byte string could not be decoded. The caller adds the object's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than the structure needs.
    Truncated {
        /// Bytes needed.
        needed: u64,
        /// Bytes there were.
        available: u64,
    },
    /// A magic number did not match.
    BadMagic,
    /// A version this build does not understand.
    UnsupportedVersion(u32),
    /// A checksum did not match the data.
    ChecksumMismatch {
        /// The checksum (or id) recorded.
        expected: String,
        /// The checksum of the data.
        got: String,
    },
    /// A field holds a value that is not allowed.
    Invalid(String),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated { needed, available } => {
                write!(f, "truncated: needs {needed} bytes, {available} available")
            }
            DecodeError::BadMagic => write!(f, "bad magic number (not this kind of file)"),
            DecodeError::UnsupportedVersion(v) => write!(f, "unsupported format version {v}"),
            DecodeError::ChecksumMismatch { expected, got } => {
                write!(f, "checksum mismatch: expected {expected}, got {got}")
            }
            DecodeError::Invalid(msg) => write!(f, "invalid field: {msg}"),
        }
    }
}

/// Reads little-endian fields from a byte slice without panicking.
#[derive(Debug)]
pub struct Decoder<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Decoder<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Decoder { data, pos: 0 }
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> usize {
        self.data.len().saturating_sub(self.pos)
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        match end {
            Some(end) => {
                let out = self.data.get(self.pos..end).ok_or(DecodeError::Truncated {
                    needed: n as u64,
                    available: self.remaining() as u64,
                })?;
                self.pos = end;
                Ok(out)
            }
            None => Err(DecodeError::Truncated {
                needed: n as u64,
                available: self.remaining() as u64,
            }),
        }
    }

    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let b = self.bytes(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    /// Reads a format's leading magic and version (the start of every
    /// Cairn header) and checks both.
    pub fn magic_version(&mut self, magic: &[u8; 8], version: u16) -> Result<(), DecodeError> {
        if &self.array::<8>()? != magic {
            return Err(DecodeError::BadMagic);
        }
        let got = self.u16()?;
        if got != version {
            return Err(DecodeError::UnsupportedVersion(got as u32));
        }
        Ok(())
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }
    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    pub fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_le_bytes(self.array()?))
    }

    /// A reserved `u16` that must be 0 (one encoding per value).
    pub fn zero_u16(&mut self, field: &str) -> Result<(), DecodeError> {
        match self.u16()? {
            0 => Ok(()),
            v => Err(DecodeError::Invalid(format!(
                "{field} is {v:#x}, must be 0"
            ))),
        }
    }
    /// A reserved `u32` that must be 0.
    pub fn zero_u32(&mut self, field: &str) -> Result<(), DecodeError> {
        match self.u32()? {
            0 => Ok(()),
            v => Err(DecodeError::Invalid(format!(
                "{field} is {v:#x}, must be 0"
            ))),
        }
    }
    /// A reserved `u64` that must be 0.
    pub fn zero_u64(&mut self, field: &str) -> Result<(), DecodeError> {
        match self.u64()? {
            0 => Ok(()),
            v => Err(DecodeError::Invalid(format!(
                "{field} is {v:#x}, must be 0"
            ))),
        }
    }

    /// A string stored as `u32` byte length + UTF-8 bytes, at most `max` bytes.
    pub fn string(&mut self, max: usize) -> Result<String, DecodeError> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(DecodeError::Invalid(format!(
                "string of {len} bytes exceeds limit {max}"
            )));
        }
        let b = self.bytes(len)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| DecodeError::Invalid("string is not UTF-8".into()))
    }

    pub fn expect_end(&self) -> Result<(), DecodeError> {
        if self.remaining() == 0 {
            Ok(())
        } else {
            Err(DecodeError::Invalid(format!(
                "{} unexpected trailing bytes",
                self.remaining()
            )))
        }
    }
}

/// Appends little-endian fields to a `Vec<u8>`.
pub trait Encoder {
    fn put_u8(&mut self, v: u8);
    fn put_u16(&mut self, v: u16);
    fn put_u32(&mut self, v: u32);
    fn put_u64(&mut self, v: u64);
    fn put_i64(&mut self, v: i64);
    fn put_i32(&mut self, v: i32);
    /// `u32` length + UTF-8 bytes. Strings longer than `u32::MAX` are not representable;
    /// callers validate lengths first.
    fn put_str(&mut self, s: &str);
}

impl Encoder for Vec<u8> {
    fn put_u8(&mut self, v: u8) {
        self.push(v);
    }
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_i64(&mut self, v: i64) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_i32(&mut self, v: i32) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_str(&mut self, s: &str) {
        self.put_u32(s.len() as u32);
        self.extend_from_slice(s.as_bytes());
    }
}

/// Verifies a trailing 32-byte BLAKE3 checksum over everything before it and
/// returns the covered bytes.
pub fn split_checksummed(data: &[u8]) -> Result<&[u8], DecodeError> {
    if data.len() < 32 {
        return Err(DecodeError::Truncated {
            needed: 32,
            available: data.len() as u64,
        });
    }
    let (body, sum) = data.split_at(data.len() - 32);
    let got = blake3::hash(body);
    if got.as_bytes() != sum {
        return Err(DecodeError::ChecksumMismatch {
            expected: hex(sum),
            got: got.to_hex().to_string(),
        });
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checksum alone guards an empty body; anything shorter is cut off.
    #[test]
    fn an_empty_body_with_its_checksum_splits() {
        let empty = *blake3::hash(b"").as_bytes();
        assert_eq!(split_checksummed(&empty).unwrap(), b"");
        assert!(matches!(
            split_checksummed(&empty[..31]),
            Err(DecodeError::Truncated {
                needed: 32,
                available: 31
            })
        ));
    }

    #[test]
    fn decoder_never_reads_past_end() {
        let mut d = Decoder::new(&[1, 2, 3]);
        assert_eq!(d.u16().unwrap(), 0x0201);
        assert!(matches!(
            d.u32(),
            Err(DecodeError::Truncated {
                needed: 4,
                available: 1
            })
        ));
        assert!(d.bytes(usize::MAX).is_err());
    }

    #[test]
    fn checksum_detects_flip() {
        let mut data = b"hello world".to_vec();
        let sum = blake3::hash(&data);
        data.extend_from_slice(sum.as_bytes());
        assert_eq!(split_checksummed(&data).unwrap(), b"hello world");
        data[3] ^= 1;
        assert!(matches!(
            split_checksummed(&data),
            Err(DecodeError::ChecksumMismatch { .. })
        ));
    }
}

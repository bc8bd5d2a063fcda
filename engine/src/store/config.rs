//! The pool configuration: the text object `config`, written once by
//! `init`:
//! ```text
//! cairn-pool 1
//! id-scheme blake3-256
//! pool-id <32 hex digits>
//! created <RFC 3339 UTC>
//! ```

use std::time::SystemTime;

use crate::id::{IdScheme, PoolId};
use crate::store::format::CONFIG_VERSION_V1;
use crate::store::wire::DecodeError;

/// The pool-wide settings written by `init`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolConfig {
    /// Configuration format version.
    pub version: u32,
    /// How chunk ids are derived in this pool.
    pub id_scheme: IdScheme,
    /// The pool's identity.
    pub pool_id: PoolId,
    /// When the pool was initialised (whole seconds).
    pub created: SystemTime,
}

impl PoolConfig {
    /// A configuration for a new pool.
    pub fn new(pool_id: PoolId, created: SystemTime) -> Self {
        PoolConfig {
            version: CONFIG_VERSION_V1,
            id_scheme: IdScheme::Blake3,
            pool_id,
            created,
        }
    }

    /// The configuration as text.
    pub fn encode(&self) -> String {
        format!(
            "cairn-pool {}\nid-scheme {}\npool-id {}\ncreated {}\n",
            self.version,
            self.id_scheme.name(),
            self.pool_id,
            humantime::format_rfc3339_seconds(self.created)
        )
    }

    /// Parses a configuration: exactly the lines [`encode`](Self::encode)
    /// writes, in its order (one encoding per configuration; a later version
    /// that adds settings gets a new version number).
    pub fn decode(text: &[u8]) -> Result<Self, DecodeError> {
        let text = std::str::from_utf8(text)
            .map_err(|_| DecodeError::Invalid("config is not UTF-8 text".into()))?;
        // Written whole, ending in a newline: anything else was cut short.
        if !text.ends_with('\n') {
            return Err(DecodeError::Truncated {
                needed: text.len() as u64 + 1,
                available: text.len() as u64,
            });
        }
        let mut lines = text.lines();
        let version = match lines.next().and_then(|l| l.strip_prefix("cairn-pool ")) {
            Some(v) => v
                .trim()
                .parse::<u32>()
                .map_err(|_| DecodeError::Invalid(format!("bad version {v:?}")))?,
            None => return Err(DecodeError::BadMagic),
        };
        if version != CONFIG_VERSION_V1 {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let (mut scheme, mut pool_id, mut created) = (None, None, None);
        for line in lines {
            match line.split_once(' ') {
                Some(("id-scheme", v)) => {
                    scheme =
                        Some(IdScheme::from_name(v.trim()).ok_or_else(|| {
                            DecodeError::Invalid(format!("unknown id scheme {v:?}"))
                        })?)
                }
                Some(("pool-id", v)) => {
                    pool_id = Some(PoolId::from_hex(v.trim()).ok_or_else(|| {
                        DecodeError::Invalid(format!("pool id {v:?} is not 32 hex digits"))
                    })?)
                }
                Some(("created", v)) => {
                    created = Some(humantime::parse_rfc3339(v.trim()).map_err(|_| {
                        DecodeError::Invalid(format!("creation time {v:?} is not RFC 3339"))
                    })?)
                }
                _ => {}
            }
        }
        let config = PoolConfig {
            version,
            id_scheme: scheme.ok_or_else(|| DecodeError::Invalid("no id-scheme".into()))?,
            pool_id: pool_id.ok_or_else(|| DecodeError::Invalid("no pool-id".into()))?,
            created: created.ok_or_else(|| DecodeError::Invalid("no created".into()))?,
        };
        // One encoding per configuration: exactly the lines `encode`
        // writes, in its order (a later version adds settings under a new
        // version number).
        if config.encode() != text {
            return Err(DecodeError::Invalid(
                "config is not in canonical form (extra, repeated or reordered lines, or \
                 a value written differently)"
                    .into(),
            ));
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trip_and_damage() {
        let created = humantime::parse_rfc3339("2026-01-01T00:00:00Z").unwrap();
        let c = PoolConfig::new(PoolId([0; 16]), created);
        let text = c.encode();
        assert_eq!(
            text,
            "cairn-pool 1\nid-scheme blake3-256\npool-id 00000000000000000000000000000000\n\
             created 2026-01-01T00:00:00Z\n"
        );
        assert_eq!(PoolConfig::decode(text.as_bytes()).unwrap(), c);
        assert!(PoolConfig::decode(b"").is_err());
        assert!(PoolConfig::decode(b"cairn-pool 9\n").is_err());
        assert!(PoolConfig::decode(b"cairn-pool 1\nid-scheme md5\npool-id x\n").is_err());
        assert!(PoolConfig::decode(&[0xff, 0xfe]).is_err());
        // Cut anywhere before the last line's value, it is refused.
        let cut = text.rfind(' ').unwrap();
        for n in 0..=cut {
            assert!(
                PoolConfig::decode(&text.as_bytes()[..n]).is_err(),
                "cut at {n}"
            );
        }
    }
}

//! # cairn-cas — H3C CAS adapter (skeleton)
//!
//! Implements the engine's [`Platform`] trait for H3C CAS: a CVM manager with
//! a REST API (`http(s)://<cvm>:<port>/cas/casrs/`, HTTP Digest auth, XML or
//! JSON, asynchronous `msgId` tasks) and CVK hosts whose disks are reached
//! over NBD exports with `qemu:dirty-bitmap:NAME` contexts for CBT.
//!
//! Status: the host side is in place — [`qemu`] drives qemu-img and qemu-nbd
//! on a qcow2 file: the dirty-bitmap lifecycle of a CBT chain, read-only
//! exports with several connections, and thin qcow2 restore targets. The
//! CVM side has only the connection settings and their validation: every
//! platform call returns [`cairn_engine::Error::Unsupported`] naming what is
//! missing; the REST client and the snapshot lifecycle arrive with the CAS
//! adapter issues (see `docs/DESIGN.md`). A CVM simulator for tests will live
//! beside it and never on the production path.

#![warn(missing_docs)]

pub mod inventory;
pub mod qemu;

pub use inventory::{InventoryPlatform, ReadSettings};

use cairn_engine::{DiskTarget, Error, Platform, PlatformSnapshot, Result, VmDisk, VmInfo};

/// How to reach a CVM (spec "Platform facts": name, address, SSL, port, user,
/// password).
#[derive(Clone, PartialEq, Eq)]
pub struct CvmConnection {
    /// A name for the CVM (for messages).
    pub name: String,
    /// Host name or IP address.
    pub address: String,
    /// HTTPS instead of HTTP.
    pub ssl: bool,
    /// 8080 (HTTP) by default; 8443/443 with SSL; 80 possible.
    pub port: u16,
    /// A CVM system-admin user.
    pub user: String,
    /// Its password (never printed).
    pub password: String,
}

impl std::fmt::Debug for CvmConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CvmConnection")
            .field("name", &self.name)
            .field("address", &self.address)
            .field("ssl", &self.ssl)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Errors in CAS adapter settings.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CasError {
    /// The connection settings are unusable.
    #[error("CVM {name:?}: {reason}")]
    InvalidConnection {
        /// The CVM's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
}

impl CvmConnection {
    /// The REST base URL, e.g. `http://10.0.0.5:8080/cas/casrs/`.
    pub fn base_url(&self) -> String {
        let scheme = if self.ssl { "https" } else { "http" };
        format!("{scheme}://{}:{}/cas/casrs/", self.address, self.port)
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), CasError> {
        let bad = |reason: &str| CasError::InvalidConnection {
            name: self.name.clone(),
            reason: reason.to_string(),
        };
        if self.address.is_empty() || self.address.contains(['/', ' ']) {
            return Err(bad("address must be a host name or IP"));
        }
        if self.port == 0 {
            return Err(bad("port must be 1–65535"));
        }
        if self.user.is_empty() {
            return Err(bad("a CVM system-admin user is required"));
        }
        Ok(())
    }
}

/// The H3C CAS platform (skeleton: every call is `Unsupported`).
#[derive(Debug)]
pub struct CasPlatform {
    connection: CvmConnection,
}

impl CasPlatform {
    /// A platform for the CVM `connection` (validated).
    pub fn new(connection: CvmConnection) -> Result<Self, CasError> {
        connection.validate()?;
        Ok(CasPlatform { connection })
    }

    fn unsupported(&self, what: &str) -> Error {
        Error::Unsupported(format!(
            "H3C CAS {what} (CVM {}) is not implemented yet",
            self.connection.base_url()
        ))
    }
}

impl Platform for CasPlatform {
    fn list_vms(&self) -> Result<Vec<VmInfo>> {
        Err(self.unsupported("VM inventory"))
    }
    fn snapshot(&self, _vm: &VmInfo) -> Result<Box<dyn PlatformSnapshot>> {
        Err(self.unsupported("VM snapshots"))
    }
    fn restore_target(&self, _vm: &VmInfo, _disk: &VmDisk) -> Result<Box<dyn DiskTarget>> {
        Err(self.unsupported("restore targets"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> CvmConnection {
        CvmConnection {
            name: "cvm1".into(),
            address: "10.0.0.5".into(),
            ssl: false,
            port: 8080,
            user: "admin".into(),
            password: "secret".into(),
        }
    }

    #[test]
    fn base_url_and_validation() {
        assert_eq!(conn().base_url(), "http://10.0.0.5:8080/cas/casrs/");
        let mut c = conn();
        c.port = 0;
        assert!(CasPlatform::new(c).is_err());
        assert!(!format!("{:?}", conn()).contains("secret"));
    }

    #[test]
    fn calls_say_they_are_not_implemented() {
        let p = CasPlatform::new(conn()).unwrap();
        assert!(matches!(p.list_vms(), Err(Error::Unsupported(_))));
    }
}

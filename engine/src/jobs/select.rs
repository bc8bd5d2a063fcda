//! Which VMs a job backs up (spec B1): whole hosts (every VM on them, by
//! host name or host IP), VMs by name or IP address, VMs whose name contains a keyword,
//! minus those whose name contains an exclude filter. Matching ignores
//! case; the result is in name order, each VM once.

use crate::platform::VmInfo;
use crate::{Error, Result};

/// A job's source selection.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct Selection {
    /// Hosts whose every VM is taken: host names or host IP addresses.
    pub hosts: Vec<String>,
    /// VMs by exact name.
    pub vms: Vec<String>,
    /// VMs whose name contains one of these.
    pub keywords: Vec<String>,
    /// VMs whose name contains one of these are left out.
    pub exclude: Vec<String>,
}

impl Selection {
    /// Whether it names nothing (a job must select something).
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty() && self.vms.is_empty() && self.keywords.is_empty()
    }

    /// Refuses empty entries (an empty keyword would match every VM).
    pub fn check_entries(&self) -> Result<()> {
        for (field, list) in [
            ("hosts", &self.hosts),
            ("vms", &self.vms),
            ("keywords", &self.keywords),
            ("exclude", &self.exclude),
        ] {
            if list.iter().any(|s| s.trim().is_empty()) {
                return Err(Error::InvalidArgument(format!(
                    "select.{field} holds an empty entry (it would match every VM)"
                )));
            }
        }
        Ok(())
    }

    /// The VMs of `inventory` it selects. A host or VM named that the
    /// inventory does not have is an error (a typo must not make a job
    /// back up nothing, quietly).
    pub fn select(&self, inventory: &[VmInfo]) -> Result<Vec<VmInfo>> {
        if self.is_empty() {
            return Err(Error::InvalidArgument(
                "the selection names no host, VM or keyword".into(),
            ));
        }
        self.check_entries()?;
        let lower = |s: &str| s.to_lowercase();
        let on_host = |vm: &VmInfo, h: &str| {
            lower(&vm.host) == lower(h) || (!vm.host_address.is_empty() && vm.host_address == h)
        };
        // A VM by its name or one of its IP addresses.
        let is_vm = |vm: &VmInfo, v: &str| {
            lower(&vm.name) == lower(v) || vm.addresses.iter().any(|a| a == v)
        };
        for h in &self.hosts {
            if !inventory.iter().any(|vm| on_host(vm, h)) {
                return Err(Error::InvalidArgument(format!(
                    "no host named {h:?} (by name or IP) runs any VM the platform lists"
                )));
            }
        }
        for v in &self.vms {
            if !inventory.iter().any(|vm| is_vm(vm, v)) {
                return Err(Error::InvalidArgument(format!(
                    "the platform lists no VM named {v:?} (by name or IP)"
                )));
            }
        }
        let mut out: Vec<VmInfo> = inventory
            .iter()
            .filter(|vm| {
                let name = lower(&vm.name);
                let wanted = self.hosts.iter().any(|h| on_host(vm, h))
                    || self.vms.iter().any(|v| is_vm(vm, v))
                    || self.keywords.iter().any(|k| name.contains(&lower(k)));
                wanted && !self.exclude.iter().any(|x| name.contains(&lower(x)))
            })
            .cloned()
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.id.cmp(&b.id)));
        out.dedup_by(|a, b| a.id == b.id && a.name == b.name);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn vm(name: &str, host: &str, ip: &str) -> VmInfo {
        VmInfo {
            id: format!("id-{name}"),
            name: name.into(),
            host: host.into(),
            host_address: ip.into(),
            ..VmInfo::default()
        }
    }

    fn names(v: &[VmInfo]) -> Vec<&str> {
        v.iter().map(|v| v.name.as_str()).collect()
    }

    #[test]
    fn hosts_names_keywords_and_excludes() {
        let inv = vec![
            vm("web01", "cvk1", "10.0.0.1"),
            vm("web02", "cvk2", "10.0.0.2"),
            vm("db01", "cvk1", "10.0.0.1"),
            vm("db-test", "cvk2", "10.0.0.2"),
            vm("mail", "cvk3", ""),
        ];
        let sel = |hosts: &[&str], vms: &[&str], keywords: &[&str], exclude: &[&str]| Selection {
            hosts: hosts.iter().map(|s| s.to_string()).collect(),
            vms: vms.iter().map(|s| s.to_string()).collect(),
            keywords: keywords.iter().map(|s| s.to_string()).collect(),
            exclude: exclude.iter().map(|s| s.to_string()).collect(),
        };
        assert_eq!(
            names(&sel(&["cvk1"], &[], &[], &[]).select(&inv).unwrap()),
            ["db01", "web01"]
        );
        assert_eq!(
            names(&sel(&["10.0.0.2"], &[], &[], &[]).select(&inv).unwrap()),
            ["db-test", "web02"]
        );
        assert_eq!(
            names(&sel(&[], &["MAIL"], &[], &[]).select(&inv).unwrap()),
            ["mail"]
        );
        // A VM by one of its addresses.
        let mut inv = inv;
        inv[4].addresses = vec!["192.168.1.9".into()];
        assert_eq!(
            names(&sel(&[], &["192.168.1.9"], &[], &[]).select(&inv).unwrap()),
            ["mail"]
        );
        assert_eq!(
            names(&sel(&[], &[], &["DB"], &["test"]).select(&inv).unwrap()),
            ["db01"]
        );
        assert_eq!(
            names(
                &sel(&["cvk2"], &["web02"], &["web"], &[])
                    .select(&inv)
                    .unwrap()
            ),
            ["db-test", "web01", "web02"]
        );
        assert!(sel(&[], &[], &["nothing-matches"], &[])
            .select(&inv)
            .unwrap()
            .is_empty());
        for bad in [
            sel(&["cvk9"], &[], &[], &[]),
            sel(&[], &["web03"], &[], &[]),
            sel(&[], &[], &[], &["x"]),
            sel(&[], &[], &[""], &[]),
            sel(&["cvk1"], &[], &[], &[" "]),
            sel(&[], &["10.0.0.1"], &[], &[]),
        ] {
            assert!(
                matches!(bad.select(&inv), Err(Error::InvalidArgument(_))),
                "{bad:?}"
            );
        }
    }
}

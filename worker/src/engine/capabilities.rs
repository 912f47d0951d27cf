//! Linux capabilities: names, numbers and the sets a container keeps.
//!
//! The default set is smaller than Docker's: it keeps what package managers
//! and ordinary programs need (file ownership, switching users, binding low
//! ports, signalling their own processes) and drops `CAP_NET_RAW` (packet
//! spoofing), `CAP_MKNOD` (device nodes), `CAP_SYS_CHROOT` and `CAP_SETFCAP`.
//! `CAP_SYS_ADMIN` is never granted, whatever the spec asks.

use std::fmt;

macro_rules! capabilities {
    ($($variant:ident = $number:expr, $name:literal;)*) => {
        /// One Linux capability (capabilities(7)).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[allow(missing_docs)]
        pub enum Capability { $($variant),* }

        impl Capability {
            /// Every capability this build knows, in number order.
            pub const ALL: &'static [Capability] = &[$(Capability::$variant),*];

            /// The kernel's number for it.
            pub fn number(self) -> u32 {
                match self { $(Capability::$variant => $number),* }
            }

            /// The `CAP_*` name.
            pub fn name(self) -> &'static str {
                match self { $(Capability::$variant => $name),* }
            }
        }
    };
}

capabilities! {
    Chown = 0, "CAP_CHOWN";
    DacOverride = 1, "CAP_DAC_OVERRIDE";
    DacReadSearch = 2, "CAP_DAC_READ_SEARCH";
    Fowner = 3, "CAP_FOWNER";
    Fsetid = 4, "CAP_FSETID";
    Kill = 5, "CAP_KILL";
    Setgid = 6, "CAP_SETGID";
    Setuid = 7, "CAP_SETUID";
    Setpcap = 8, "CAP_SETPCAP";
    LinuxImmutable = 9, "CAP_LINUX_IMMUTABLE";
    NetBindService = 10, "CAP_NET_BIND_SERVICE";
    NetBroadcast = 11, "CAP_NET_BROADCAST";
    NetAdmin = 12, "CAP_NET_ADMIN";
    NetRaw = 13, "CAP_NET_RAW";
    IpcLock = 14, "CAP_IPC_LOCK";
    IpcOwner = 15, "CAP_IPC_OWNER";
    SysModule = 16, "CAP_SYS_MODULE";
    SysRawio = 17, "CAP_SYS_RAWIO";
    SysChroot = 18, "CAP_SYS_CHROOT";
    SysPtrace = 19, "CAP_SYS_PTRACE";
    SysPacct = 20, "CAP_SYS_PACCT";
    SysAdmin = 21, "CAP_SYS_ADMIN";
    SysBoot = 22, "CAP_SYS_BOOT";
    SysNice = 23, "CAP_SYS_NICE";
    SysResource = 24, "CAP_SYS_RESOURCE";
    SysTime = 25, "CAP_SYS_TIME";
    SysTtyConfig = 26, "CAP_SYS_TTY_CONFIG";
    Mknod = 27, "CAP_MKNOD";
    Lease = 28, "CAP_LEASE";
    AuditWrite = 29, "CAP_AUDIT_WRITE";
    AuditControl = 30, "CAP_AUDIT_CONTROL";
    Setfcap = 31, "CAP_SETFCAP";
    MacOverride = 32, "CAP_MAC_OVERRIDE";
    MacAdmin = 33, "CAP_MAC_ADMIN";
    Syslog = 34, "CAP_SYSLOG";
    WakeAlarm = 35, "CAP_WAKE_ALARM";
    BlockSuspend = 36, "CAP_BLOCK_SUSPEND";
    AuditRead = 37, "CAP_AUDIT_READ";
    Perfmon = 38, "CAP_PERFMON";
    Bpf = 39, "CAP_BPF";
    CheckpointRestore = 40, "CAP_CHECKPOINT_RESTORE";
}

impl Capability {
    /// Parse `CAP_CHOWN` or `chown`.
    pub fn parse(text: &str) -> Option<Capability> {
        let upper = text.to_ascii_uppercase();
        let wanted = if upper.starts_with("CAP_") { upper } else { format!("CAP_{upper}") };
        Capability::ALL.iter().copied().find(|c| c.name() == wanted)
    }

    fn bit(self) -> u64 {
        1 << self.number()
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The default capabilities of a container process.
pub const DEFAULT_CAPABILITIES: &[Capability] = &[
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fowner,
    Capability::Fsetid,
    Capability::Kill,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::AuditWrite,
];

/// The five capability sets of a process, as bit masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapabilitySet {
    /// Bounding set: the ceiling for anything gained on exec.
    pub bounding: u64,
    /// Effective set.
    pub effective: u64,
    /// Permitted set.
    pub permitted: u64,
    /// Inheritable set.
    pub inheritable: u64,
    /// Ambient set (kept across exec by non-root users).
    pub ambient: u64,
}

impl CapabilitySet {
    /// [`DEFAULT_CAPABILITIES`] in the bounding, effective, permitted and
    /// inheritable sets; nothing ambient.
    pub fn default_set() -> CapabilitySet {
        let mask = mask_of(DEFAULT_CAPABILITIES.iter().copied());
        CapabilitySet { bounding: mask, effective: mask, permitted: mask, inheritable: mask, ambient: 0 }
    }

    /// Whether any set holds `capability`.
    pub fn grants(&self, capability: Capability) -> bool {
        let all = self.bounding | self.effective | self.permitted | self.inheritable | self.ambient;
        all & capability.bit() != 0
    }

    /// The effective set as `CapEff` shows it in /proc/PID/status.
    pub fn effective_hex(&self) -> String {
        format!("{:016x}", self.effective)
    }
}

/// A bit mask of the given capabilities.
pub(super) fn mask_of(capabilities: impl IntoIterator<Item = Capability>) -> u64 {
    capabilities.into_iter().fold(0, |mask, c| mask | c.bit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_dense_and_named() {
        for (index, cap) in Capability::ALL.iter().enumerate() {
            assert_eq!(cap.number() as usize, index);
            assert_eq!(Capability::parse(cap.name()), Some(*cap));
        }
        assert_eq!(Capability::parse("net_raw"), Some(Capability::NetRaw));
        assert_eq!(Capability::parse("CAP_NOPE"), None);
    }

    #[test]
    fn default_excludes_dangerous() {
        let set = CapabilitySet::default_set();
        for cap in [Capability::SysAdmin, Capability::NetRaw, Capability::Mknod, Capability::SysPtrace] {
            assert!(!set.grants(cap), "{cap}");
        }
        assert_eq!(set.effective_hex(), "00000000200005fb");
    }
}

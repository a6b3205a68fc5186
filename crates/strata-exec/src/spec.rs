//! The runtime spec (`config.json`) for one step.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxNamespace, LinuxNamespaceType,
    MountBuilder, PosixRlimitBuilder, PosixRlimitType, ProcessBuilder, RootBuilder, Spec,
    SpecBuilder, UserBuilder, get_default_mounts,
};

use crate::{Error, Result};

/// Which network a step sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Network {
    /// A namespace of its own on the host's bridge, outbound through NAT
    /// (Docker's default; [`crate::Cni`]). The host's loopback services
    /// are out of reach.
    #[default]
    Private,
    /// The host's network (`RUN --network=host`, an entitlement; `strata
    /// run`).
    Host,
    /// Only a loopback interface (`RUN --network=none`).
    None,
}

/// An extra mount inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mount {
    /// A host path bound at `destination`.
    Bind {
        /// Host path.
        source: PathBuf,
        /// Path in the container.
        destination: String,
        /// Read-only.
        read_only: bool,
    },
    /// An empty tmpfs.
    Tmpfs {
        /// Path in the container.
        destination: String,
        /// Size limit in bytes.
        size: Option<u64>,
    },
}

impl Mount {
    /// Where the mount appears in the container.
    pub fn destination(&self) -> &str {
        match self {
            Mount::Bind { destination, .. } | Mount::Tmpfs { destination, .. } => destination,
        }
    }
}

/// The process to run and its surroundings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    /// argv.
    pub args: Vec<String>,
    /// `KEY=value` environment.
    pub env: Vec<String>,
    /// Working directory.
    pub cwd: String,
    /// User ID.
    pub uid: u32,
    /// Primary group ID.
    pub gid: u32,
    /// Supplementary group IDs.
    pub additional_gids: Vec<u32>,
    /// The container's host name.
    pub hostname: String,
    /// Network.
    pub network: Network,
    /// Mounts beyond `/proc`, `/dev` and `/sys`.
    pub mounts: Vec<Mount>,
    /// `RUN --security=insecure`: all capabilities, nothing masked.
    pub insecure: bool,
    /// Size of `/dev/shm`, bytes (default: the runtime's 64 MiB).
    pub shm_size: Option<u64>,
    /// Resource limits beyond the runtime's defaults.
    pub rlimits: Vec<Rlimit>,
}

/// A resource limit of the sandboxed process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rlimit {
    /// Its name in the runtime spec: `RLIMIT_NOFILE`.
    pub name: String,
    /// Soft limit.
    pub soft: u64,
    /// Hard limit.
    pub hard: u64,
}

/// System calls a step may not make, as Docker's default seccomp profile
/// refuses them to a container without extra capabilities: loading kernel
/// code, changing the host's clock, keyrings, mounts and namespaces (and
/// so user namespaces), tracing other processes' memory, and the rest of
/// what only an administrator of the host should do. Each fails with
/// EPERM.
const DENIED_SYSCALLS: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "get_mempolicy",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mbind",
    "mount",
    "mount_setattr",
    "move_mount",
    "move_pages",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "query_module",
    "quotactl",
    "quotactl_fd",
    "reboot",
    "request_key",
    "set_mempolicy",
    "setns",
    "settimeofday",
    "stime",
    "swapoff",
    "swapon",
    "syslog",
    "sysfs",
    "_sysctl",
    "umount",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
    "vm86",
    "vm86old",
];

/// `clone` flags that make namespaces: refused, as `unshare` is.
const NAMESPACE_FLAGS: &[u64] = &[
    0x0002_0000, // CLONE_NEWNS
    0x0200_0000, // CLONE_NEWCGROUP
    0x0400_0000, // CLONE_NEWUTS
    0x0800_0000, // CLONE_NEWIPC
    0x1000_0000, // CLONE_NEWUSER
    0x2000_0000, // CLONE_NEWPID
    0x4000_0000, // CLONE_NEWNET
];

const EPERM: u32 = 1;
const ENOSYS: u32 = 38;

/// The architectures the filter covers: this machine's, and the 32-bit
/// ones its processes may also call in.
fn architectures() -> Vec<oci_spec::runtime::Arch> {
    use oci_spec::runtime::Arch;
    if cfg!(target_arch = "x86_64") {
        vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32]
    } else if cfg!(target_arch = "aarch64") {
        vec![Arch::ScmpArchAarch64, Arch::ScmpArchArm]
    } else {
        vec![Arch::ScmpArchNative]
    }
}

/// The seccomp filter of a step: every call allowed but those Docker's
/// default profile refuses a container ([`DENIED_SYSCALLS`], namespaces
/// through `clone`); `clone3`, whose flags a filter cannot read, answers
/// ENOSYS so the C library falls back to `clone`, as under Docker.
fn seccomp() -> Result<oci_spec::runtime::LinuxSeccomp> {
    use oci_spec::runtime::{
        LinuxSeccompAction, LinuxSeccompArgBuilder, LinuxSeccompBuilder, LinuxSeccompOperator,
        LinuxSyscallBuilder,
    };
    let err = |e: oci_spec::OciSpecError| Error::Spec(e.to_string());
    let mut syscalls = vec![
        LinuxSyscallBuilder::default()
            .names(
                DENIED_SYSCALLS
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>(),
            )
            .action(LinuxSeccompAction::ScmpActErrno)
            .errno_ret(EPERM)
            .build()
            .map_err(err)?,
        LinuxSyscallBuilder::default()
            .names(vec!["clone3".to_string()])
            .action(LinuxSeccompAction::ScmpActErrno)
            .errno_ret(ENOSYS)
            .build()
            .map_err(err)?,
    ];
    for flag in NAMESPACE_FLAGS {
        let arg = LinuxSeccompArgBuilder::default()
            .index(0usize)
            .value(*flag)
            .value_two(*flag)
            .op(LinuxSeccompOperator::ScmpCmpMaskedEq)
            .build()
            .map_err(err)?;
        syscalls.push(
            LinuxSyscallBuilder::default()
                .names(vec!["clone".to_string()])
                .action(LinuxSeccompAction::ScmpActErrno)
                .errno_ret(EPERM)
                .args(vec![arg])
                .build()
                .map_err(err)?,
        );
    }
    LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActAllow)
        .architectures(architectures())
        .syscalls(syscalls)
        .build()
        .map_err(err)
}

/// The capabilities Docker gives a container (and BuildKit a build step).
const DEFAULT_CAPS: &[Capability] = &[
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// Every capability with its number in the kernel's capability sets.
const ALL_CAPS: &[(Capability, u32)] = &[
    (Capability::Chown, 0),
    (Capability::DacOverride, 1),
    (Capability::DacReadSearch, 2),
    (Capability::Fowner, 3),
    (Capability::Fsetid, 4),
    (Capability::Kill, 5),
    (Capability::Setgid, 6),
    (Capability::Setuid, 7),
    (Capability::Setpcap, 8),
    (Capability::LinuxImmutable, 9),
    (Capability::NetBindService, 10),
    (Capability::NetBroadcast, 11),
    (Capability::NetAdmin, 12),
    (Capability::NetRaw, 13),
    (Capability::IpcLock, 14),
    (Capability::IpcOwner, 15),
    (Capability::SysModule, 16),
    (Capability::SysRawio, 17),
    (Capability::SysChroot, 18),
    (Capability::SysPtrace, 19),
    (Capability::SysPacct, 20),
    (Capability::SysAdmin, 21),
    (Capability::SysBoot, 22),
    (Capability::SysNice, 23),
    (Capability::SysResource, 24),
    (Capability::SysTime, 25),
    (Capability::SysTtyConfig, 26),
    (Capability::Mknod, 27),
    (Capability::Lease, 28),
    (Capability::AuditWrite, 29),
    (Capability::AuditControl, 30),
    (Capability::Setfcap, 31),
    (Capability::MacOverride, 32),
    (Capability::MacAdmin, 33),
    (Capability::Syslog, 34),
    (Capability::WakeAlarm, 35),
    (Capability::BlockSuspend, 36),
    (Capability::AuditRead, 37),
    (Capability::Perfmon, 38),
    (Capability::Bpf, 39),
    (Capability::CheckpointRestore, 40),
];

/// The capabilities this process may hand on (its bounding set): a
/// sandbox cannot get one its runtime lacks, so `--security=insecure`
/// gets every capability of this set, as privileged containers do.
fn bounding_set() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapBnd:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(u64::MAX)
}

fn err(e: impl std::fmt::Display) -> Error {
    Error::Spec(e.to_string())
}

impl Sandbox {
    /// The runtime spec for running this sandbox over `rootfs`.
    pub fn spec(&self, rootfs: &Path, netns: Option<&Path>) -> Result<Spec> {
        let caps: std::collections::HashSet<Capability> = if self.insecure {
            let bounding = bounding_set();
            ALL_CAPS
                .iter()
                .filter(|(_, bit)| bounding & (1 << bit) != 0)
                .map(|(c, _)| *c)
                .collect()
        } else {
            DEFAULT_CAPS.iter().copied().collect()
        };
        let capabilities = LinuxCapabilitiesBuilder::default()
            .bounding(caps.clone())
            .effective(caps.clone())
            .permitted(caps.clone())
            .build()
            .map_err(err)?;
        let user = UserBuilder::default()
            .uid(self.uid)
            .gid(self.gid)
            .additional_gids(self.additional_gids.clone())
            .build()
            .map_err(err)?;
        let mut process = ProcessBuilder::default()
            .terminal(false)
            .args(self.args.clone())
            .env(self.env.clone())
            .cwd(self.cwd.clone())
            .user(user)
            .capabilities(capabilities)
            .no_new_privileges(false);
        if !self.rlimits.is_empty() {
            let rlimits =
                self.rlimits
                    .iter()
                    .map(|r| {
                        let typ: PosixRlimitType = r.name.parse().map_err(|_| {
                            Error::Spec(format!("unknown resource limit {}", r.name))
                        })?;
                        PosixRlimitBuilder::default()
                            .typ(typ)
                            .soft(r.soft)
                            .hard(r.hard)
                            .build()
                            .map_err(err)
                    })
                    .collect::<Result<Vec<_>>>()?;
            process = process.rlimits(rlimits);
        }
        let process = process.build().map_err(err)?;
        let mut namespaces = vec![
            LinuxNamespace::default()
                .set_typ(LinuxNamespaceType::Pid)
                .clone(),
            LinuxNamespace::default()
                .set_typ(LinuxNamespaceType::Ipc)
                .clone(),
            LinuxNamespace::default()
                .set_typ(LinuxNamespaceType::Uts)
                .clone(),
            LinuxNamespace::default()
                .set_typ(LinuxNamespaceType::Mount)
                .clone(),
        ];
        match self.network {
            Network::Host => {}
            Network::None => namespaces.push(
                LinuxNamespace::default()
                    .set_typ(LinuxNamespaceType::Network)
                    .clone(),
            ),
            Network::Private => {
                let path = netns.ok_or_else(|| {
                    Error::Spec("a private network needs its namespace made first".into())
                })?;
                namespaces.push(
                    LinuxNamespace::default()
                        .set_typ(LinuxNamespaceType::Network)
                        .set_path(Some(path.to_path_buf()))
                        .clone(),
                );
            }
        }
        let mut linux = LinuxBuilder::default().namespaces(namespaces);
        if self.insecure {
            linux = linux
                .masked_paths(Vec::<String>::new())
                .readonly_paths(Vec::<String>::new());
        } else {
            let d = oci_spec::runtime::Linux::default();
            linux = linux
                .masked_paths(d.masked_paths().clone().unwrap_or_default())
                .readonly_paths(d.readonly_paths().clone().unwrap_or_default())
                .seccomp(seccomp()?);
        }
        let linux = linux.build().map_err(err)?;

        let mut mounts: Vec<oci_spec::runtime::Mount> = get_default_mounts()
            .into_iter()
            // The host's cgroup tree is not the build's business.
            .filter(|m| m.destination() != Path::new("/sys/fs/cgroup"))
            .collect();
        if let Some(size) = self.shm_size
            && let Some(shm) = mounts
                .iter_mut()
                .find(|m| m.destination() == Path::new("/dev/shm"))
        {
            let mut opts: Vec<String> = shm
                .options()
                .clone()
                .unwrap_or_default()
                .into_iter()
                .filter(|o| !o.starts_with("size="))
                .collect();
            opts.push(format!("size={size}"));
            shm.set_options(Some(opts));
        }
        for m in &self.mounts {
            let built = match m {
                Mount::Bind {
                    source,
                    destination,
                    read_only,
                } => {
                    let mut opts = vec!["rbind".to_string(), "rprivate".to_string()];
                    if *read_only {
                        opts.push("ro".into());
                    }
                    MountBuilder::default()
                        .destination(destination)
                        .typ("bind")
                        .source(source)
                        .options(opts)
                        .build()
                }
                Mount::Tmpfs { destination, size } => {
                    let mut opts = vec![
                        "nosuid".to_string(),
                        "nodev".to_string(),
                        "mode=1777".to_string(),
                    ];
                    if let Some(s) = size {
                        opts.push(format!("size={s}"));
                    }
                    MountBuilder::default()
                        .destination(destination)
                        .typ("tmpfs")
                        .source("tmpfs")
                        .options(opts)
                        .build()
                }
            };
            mounts.push(built.map_err(err)?);
        }
        SpecBuilder::default()
            .version("1.0.2")
            .root(
                RootBuilder::default()
                    .path(rootfs)
                    .readonly(false)
                    .build()
                    .map_err(err)?,
            )
            .hostname(self.hostname.clone())
            .process(process)
            .mounts(mounts)
            .linux(linux)
            .build()
            .map_err(err)
    }
}

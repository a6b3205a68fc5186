//! The arm64 emulator for platform tests: Debian's qemu-user-static
//! registered with binfmt_misc for a test's length.

use std::process::Command;

/// Registers Debian's qemu-user-static emulator for arm64 with binfmt_misc
/// for the test's length, undoing only what it did.
pub struct Arm64Emulator {
    mounted: bool,
    registered: bool,
}

pub const BINFMT: &str = "/proc/sys/fs/binfmt_misc";
pub const QEMU_AARCH64: &str = "/usr/lib/binfmt.d/qemu-aarch64.conf";

impl Arm64Emulator {
    /// Whether an arm64 emulator is registered already.
    pub fn already() -> bool {
        std::path::Path::new(BINFMT).join("qemu-aarch64").exists()
    }

    /// Registers it (mounting binfmt_misc first if need be).
    pub fn register() -> Arm64Emulator {
        let mut e = Arm64Emulator {
            mounted: false,
            registered: false,
        };
        if !std::path::Path::new(BINFMT).join("register").exists() {
            let ok = Command::new("mount")
                .args(["-t", "binfmt_misc", "binfmt_misc", BINFMT])
                .status()
                .unwrap();
            assert!(ok.success(), "cannot mount binfmt_misc at {BINFMT}");
            e.mounted = true;
        }
        if !Self::already() {
            let line = std::fs::read_to_string(QEMU_AARCH64).unwrap();
            std::fs::write(std::path::Path::new(BINFMT).join("register"), line.trim()).unwrap();
            e.registered = true;
        }
        e
    }
}

impl Drop for Arm64Emulator {
    fn drop(&mut self) {
        if self.registered {
            let _ = std::fs::write(std::path::Path::new(BINFMT).join("qemu-aarch64"), "-1");
        }
        if self.mounted {
            let _ = Command::new("umount").arg(BINFMT).status();
        }
    }
}

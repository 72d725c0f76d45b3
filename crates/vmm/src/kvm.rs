//! Opening KVM with errors a user can act on, and telling hardware KVM from PVM.

use std::fs::OpenOptions;
use std::os::fd::{FromRawFd, IntoRawFd};

use kvm_ioctls::Kvm;

/// The kind of KVM this host offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmFlavor {
    /// kvm_intel or kvm_amd: guests run on the CPU.
    Hardware,
    /// kvm_pvm: guest kernels run through an instruction emulator (see `pvm`).
    Pvm,
}

impl KvmFlavor {
    /// Detects this host's flavor.
    pub fn detect() -> Self {
        if crate::pvm::host_is_pvm() {
            KvmFlavor::Pvm
        } else {
            KvmFlavor::Hardware
        }
    }
}

/// Errors opening KVM.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// The device node is missing.
    #[error(
        "no /dev/kvm: this host has no KVM (load kvm_intel or kvm_amd, or enable nested virtualisation)"
    )]
    Missing,
    /// Permission denied.
    #[error("no permission to open /dev/kvm: run as root or add this user to the 'kvm' group")]
    Permission,
    /// Any other failure.
    #[error("cannot open /dev/kvm: {0}")]
    Open(std::io::Error),
    /// The KVM API version is not the stable one.
    #[error("/dev/kvm speaks KVM API version {0}, Stratus needs 12")]
    ApiVersion(i32),
}

/// Opens `/dev/kvm`.
pub fn open() -> Result<Kvm, KvmError> {
    let file = OpenOptions::new().read(true).write(true).open("/dev/kvm").map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => KvmError::Missing,
        std::io::ErrorKind::PermissionDenied => KvmError::Permission,
        _ => KvmError::Open(e),
    })?;
    // SAFETY: the fd was just opened on /dev/kvm and ownership passes to `Kvm`.
    let kvm = unsafe { Kvm::from_raw_fd(file.into_raw_fd()) };
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(KvmError::ApiVersion(version));
    }
    Ok(kvm)
}

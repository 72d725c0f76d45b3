//! userfaultfd, for the destination of a post-copy migration: the guest runs before all of its
//! memory has arrived, and whoever touches a page that is still missing (a vCPU through KVM,
//! a device thread) waits until the page is placed with `copy` or `zero`.
//!
//! Only what post-copy needs: missing-page faults on anonymous memory, read in a loop by one
//! thread. The ioctl numbers and structures are those of `<linux/userfaultfd.h>`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_val};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iowr_nr};

const UFFD_API: u64 = 0xAA;
const UFFDIO: u32 = 0xAA;
const REGISTER_MODE_MISSING: u64 = 1;
const EVENT_PAGEFAULT: u8 = 0x12;

// The structures mirror the kernel's layout; not every field is read here.
#[allow(dead_code)]
#[repr(C)]
#[derive(Default)]
struct Api {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[allow(dead_code)]
#[repr(C)]
#[derive(Default)]
struct Range {
    start: u64,
    len: u64,
}

#[allow(dead_code)]
#[repr(C)]
#[derive(Default)]
struct Register {
    range: Range,
    mode: u64,
    ioctls: u64,
}

#[allow(dead_code)]
#[repr(C)]
#[derive(Default)]
struct Copy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[allow(dead_code)]
#[repr(C)]
#[derive(Default)]
struct Zeropage {
    range: Range,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg` with the page-fault member of its union.
#[allow(dead_code)]
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Msg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    flags: u64,
    address: u64,
    feat: u64,
}

ioctl_io_nr!(USERFAULTFD_IOC_NEW, UFFDIO, 0x00);
ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3F, Api);
ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, Register);
ioctl_ior_nr!(UFFDIO_UNREGISTER, UFFDIO, 0x01, Range);
ioctl_iowr_nr!(UFFDIO_COPY, UFFDIO, 0x03, Copy);
ioctl_iowr_nr!(UFFDIO_ZEROPAGE, UFFDIO, 0x04, Zeropage);

/// A userfaultfd: faults on the ranges registered with it are this process's to resolve.
pub struct Uffd(OwnedFd);

fn last_error(what: &str) -> std::io::Error {
    let e = std::io::Error::last_os_error();
    std::io::Error::new(e.kind(), format!("{what}: {e}"))
}

impl Uffd {
    /// A non-blocking userfaultfd that also takes faults the kernel raises on the process's
    /// behalf (KVM reading guest memory): through `/dev/userfaultfd` when this process may open
    /// it, else the system call (which needs CAP_SYS_PTRACE for kernel faults).
    pub fn new() -> std::io::Result<Self> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        let fd = match std::fs::OpenOptions::new().read(true).write(true).open("/dev/userfaultfd") {
            Ok(dev) => {
                // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and returns a new fd.
                unsafe { ioctl_with_val(&dev, USERFAULTFD_IOC_NEW(), flags as libc::c_ulong) }
            }
            // SAFETY: userfaultfd(2) takes flags and returns a new fd or -1.
            Err(_) => unsafe { libc::syscall(libc::SYS_userfaultfd, flags) as i32 },
        };
        if fd < 0 {
            return Err(last_error("creating a userfaultfd (post-copy needs root or /dev/userfaultfd)"));
        }
        // SAFETY: `fd` was just created and nothing else owns it.
        let uffd = Uffd(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut api = Api { api: UFFD_API, ..Default::default() };
        // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which `Api` matches.
        if unsafe { ioctl_with_mut_ref(&uffd.0, UFFDIO_API(), &mut api) } < 0 {
            return Err(last_error("the userfaultfd API handshake"));
        }
        Ok(uffd)
    }

    /// Faults on missing pages of `len` bytes at `start` come to this userfaultfd.
    pub fn register(&self, start: *mut u8, len: usize) -> std::io::Result<()> {
        let mut reg = Register {
            range: Range { start: start as u64, len: len as u64 },
            mode: REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes a `struct uffdio_register`; the range is
        // only registered, not touched.
        if unsafe { ioctl_with_mut_ref(&self.0, UFFDIO_REGISTER(), &mut reg) } < 0 {
            return Err(last_error("registering guest memory with userfaultfd"));
        }
        Ok(())
    }

    /// Faults in the range are the kernel's again.
    pub fn unregister(&self, start: *mut u8, len: usize) -> std::io::Result<()> {
        let mut range = Range { start: start as u64, len: len as u64 };
        // SAFETY: UFFDIO_UNREGISTER reads a `struct uffdio_range`.
        if unsafe { ioctl_with_mut_ref(&self.0, UFFDIO_UNREGISTER(), &mut range) } < 0 {
            return Err(last_error("unregistering guest memory from userfaultfd"));
        }
        Ok(())
    }

    /// Places `data` (whole pages) at `dst` and wakes whoever waits for them. Pages already
    /// there are left as they are (`Ok(false)` when any was).
    ///
    /// # Safety
    /// `dst..dst + data.len()` must lie in a range registered with this userfaultfd.
    pub unsafe fn copy(&self, dst: *mut u8, data: &[u8]) -> std::io::Result<bool> {
        let mut done = 0usize;
        let mut all_new = true;
        while done < data.len() {
            let mut op = Copy {
                dst: dst as u64 + done as u64,
                src: data[done..].as_ptr() as u64,
                len: (data.len() - done) as u64,
                mode: 0,
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY reads `src..src+len` (in `data`) and fills `dst` (registered,
            // the caller's promise); it writes back how much it copied.
            let rc = unsafe { ioctl_with_mut_ref(&self.0, UFFDIO_COPY(), &mut op) };
            if rc == 0 {
                return Ok(all_new);
            }
            match std::io::Error::last_os_error().raw_os_error() {
                // Some of it was done; the rest again.
                Some(libc::EAGAIN) if op.copy > 0 => done += op.copy as usize,
                Some(libc::EAGAIN) => {}
                // A page was already there: skip it and go on with the next.
                Some(libc::EEXIST) => {
                    all_new = false;
                    done += (op.copy.max(0) as usize) + crate::snapshot::memory::PAGE;
                }
                _ => return Err(last_error("placing pages with userfaultfd")),
            }
        }
        Ok(all_new)
    }

    /// Maps zero pages over `len` bytes at `dst` and wakes whoever waits for them; pages
    /// already there are left as they are.
    ///
    /// # Safety
    /// `dst..dst + len` must lie in a range registered with this userfaultfd.
    pub unsafe fn zero(&self, dst: *mut u8, len: usize) -> std::io::Result<()> {
        let mut done = 0usize;
        while done < len {
            let mut op = Zeropage {
                range: Range { start: dst as u64 + done as u64, len: (len - done) as u64 },
                mode: 0,
                zeropage: 0,
            };
            // SAFETY: UFFDIO_ZEROPAGE maps zero pages over the registered range.
            let rc = unsafe { ioctl_with_mut_ref(&self.0, UFFDIO_ZEROPAGE(), &mut op) };
            if rc == 0 {
                return Ok(());
            }
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EAGAIN) => done += op.zeropage.max(0) as usize,
                Some(libc::EEXIST) => done += (op.zeropage.max(0) as usize) + crate::snapshot::memory::PAGE,
                _ => return Err(last_error("mapping zero pages with userfaultfd")),
            }
        }
        Ok(())
    }

    /// The addresses of pending missing-page faults, waiting up to `timeout` for one.
    pub fn faults(&self, timeout: std::time::Duration) -> std::io::Result<Vec<u64>> {
        let mut pfd = libc::pollfd { fd: self.0.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis().min(i32::MAX as u128) as i32) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            return if e.kind() == std::io::ErrorKind::Interrupted { Ok(Vec::new()) } else { Err(e) };
        }
        let mut msgs = [Msg::default(); 64];
        // SAFETY: reads whole `struct uffd_msg`s into a buffer of that many.
        let n =
            unsafe { libc::read(self.0.as_raw_fd(), msgs.as_mut_ptr().cast(), std::mem::size_of_val(&msgs)) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return if e.kind() == std::io::ErrorKind::WouldBlock { Ok(Vec::new()) } else { Err(e) };
        }
        let count = n as usize / std::mem::size_of::<Msg>();
        Ok(msgs[..count].iter().filter(|m| m.event == EVENT_PAGEFAULT).map(|m| m.address).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_page_waits_until_it_is_placed() {
        let uffd = match Uffd::new() {
            Ok(u) => u,
            Err(e) => {
                println!("SKIPPED: no userfaultfd here ({e})");
                return;
            }
        };
        const LEN: usize = 4 * 4096;
        // SAFETY: a fresh anonymous private mapping, unmapped at the end of the test.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(map, libc::MAP_FAILED);
        let base = map as *mut u8;
        uffd.register(base, LEN).unwrap();
        let addr = base as usize;
        let reader = std::thread::spawn(move || {
            // SAFETY: inside the mapping; page 1 is missing until the test places it.
            let a = unsafe { std::ptr::read_volatile((addr + 4096 + 7) as *const u8) };
            // SAFETY: page 3, made a zero page.
            let b = unsafe { std::ptr::read_volatile((addr + 3 * 4096) as *const u8) };
            (a, b)
        });
        let mut seen = Vec::new();
        while seen.len() < 2 {
            for fault in uffd.faults(std::time::Duration::from_secs(5)).unwrap() {
                let page = (fault as usize - addr) / 4096;
                seen.push(page);
                if page == 1 {
                    // SAFETY: page 1 of the registered mapping.
                    assert!(unsafe { uffd.copy(base.add(4096), &[9u8; 4096]) }.unwrap());
                } else {
                    // SAFETY: page `page` of the registered mapping.
                    unsafe { uffd.zero(base.add(page * 4096), 4096) }.unwrap();
                }
            }
        }
        assert_eq!(reader.join().unwrap(), (9, 0));
        assert_eq!(seen, vec![1, 3]);
        // Placing a page that is there already changes nothing.
        // SAFETY: page 1 again.
        assert!(!unsafe { uffd.copy(base.add(4096), &[5u8; 4096]) }.unwrap());
        // SAFETY: page 1 is mapped now.
        assert_eq!(unsafe { *base.add(4096) }, 9);
        uffd.unregister(base, LEN).unwrap();
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(map, LEN) };
    }
}

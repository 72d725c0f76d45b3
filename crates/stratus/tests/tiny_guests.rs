//! The VMM seen from inside tiny test guests: each boots in milliseconds, checks what the VMM
//! set up (boot state, memory map, CPUs, ACPI, serial, exits, PVM completions) and prints it.

mod common;

use common::*;

fn field<'a>(out: &'a str, key: &str) -> &'a str {
    let start = out.find(&format!("{key}=")).unwrap_or_else(|| panic!("no {key}= in {out}")) + key.len() + 1;
    out[start..].split([' ', '\n']).next().unwrap()
}

#[test]
fn boots_in_long_mode_with_the_zero_page() {
    if !kvm_available("boots_in_long_mode_with_the_zero_page") {
        return;
    }
    let out = run_guest("test=boot", &[]);
    assert_eq!(out.code, Some(0), "{out:#?}");
    let line = out.stdout.lines().find(|l| l.starts_with("boot:")).expect("boot line");
    for expected in [
        "cr0.pe=1",
        "cr0.pg=1",
        "cr4.pae=1",
        "efer.lme=1",
        "efer.lma=1",
        "cs=0x8",
        "rsp=0x8ff0",
        "zero_page=0x7000",
        "hdrs=1",
        "boot_flag=0xaa55",
    ] {
        assert!(line.contains(expected), "missing {expected} in {line}");
    }
}

#[test]
fn bzimage_enters_at_64_bit_entry_with_its_own_setup_header() {
    if !kvm_available("bzimage_enters_at_64_bit_entry_with_its_own_setup_header") {
        return;
    }
    let bz = guests().bzimage.to_str().unwrap().to_owned();
    let out = stratus(
        &["vm", "run", "--kernel", &bz, "--cmdline", "test=boot"],
        b"",
        std::time::Duration::from_secs(30),
    );
    assert_eq!(out.code, Some(0), "{out:#?}");
    let line = out.stdout.lines().find(|l| l.starts_with("boot:")).expect("boot line");
    for expected in ["efer.lma=1", "cr0.pg=1", "zero_page=0x7000", "hdrs=1", "protocol=0x20f"] {
        assert!(line.contains(expected), "missing {expected} in {line}");
    }
    // The ELF path has no kernel header to copy: the protocol field stays empty.
    let elf = run_guest("test=boot", &[]);
    assert!(elf.stdout.contains("protocol=0x0"), "{}", elf.stdout);
}

#[test]
fn memory_map_gives_exactly_the_requested_ram() {
    if !kvm_available("memory_map_gives_exactly_the_requested_ram") {
        return;
    }
    for (arg, bytes) in [("128M", 128u64 << 20), ("300M", 300 << 20), ("1G", 1 << 30)] {
        let out = run_guest("test=memory", &["--memory", arg]);
        assert_eq!(out.code, Some(0), "{out:#?}");
        assert_eq!(field(&out.stdout, "ram_top"), format!("{bytes:#x}"), "{}", out.stdout);
        // RAM minus the legacy hole between the EBDA (0x9fc00) and 1 MiB.
        assert_eq!(field(&out.stdout, "ram_total"), format!("{:#x}", bytes - 0x60400));
        assert_eq!(field(&out.stdout, "top_rw"), "1", "the last bytes of RAM are writable");
        assert!(out.stdout.contains("e820: 0xe0000 0x20000 type=2"), "ACPI area reserved: {}", out.stdout);
    }
}

#[test]
fn memory_beyond_the_mmio_hole_continues_above_4gib() {
    if !kvm_available("memory_beyond_the_mmio_hole_continues_above_4gib") {
        return;
    }
    let out = run_guest("test=memory", &["--memory", "5G"]);
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(out.stdout.contains("e820: 0x100000000 0x80000000 type=1"), "{}", out.stdout);
    assert_eq!(field(&out.stdout, "ram_total"), format!("{:#x}", (5u64 << 30) - 0x60400));
}

#[test]
fn cpus_appear_in_cpuid_and_the_madt() {
    if !kvm_available("cpus_appear_in_cpuid_and_the_madt") {
        return;
    }
    for (cpus, ids) in [(1, "0"), (2, "0,1"), (4, "0,1,2,3")] {
        let out = run_guest("test=cpus", &["--cpus", &cpus.to_string()]);
        assert_eq!(out.code, Some(0), "{out:#?}");
        assert_eq!(field(&out.stdout, "apic_id"), "0", "the boot CPU");
        assert_eq!(field(&out.stdout, "hypervisor"), "1");
        assert_eq!(field(&out.stdout, "signature"), "KVMKVMKVM");
        assert_eq!(field(&out.stdout, "madt_cpus"), cpus.to_string());
        assert_eq!(field(&out.stdout, "madt_apic_ids"), ids);
        assert_eq!(field(&out.stdout, "ioapics"), "1");
        assert_eq!(field(&out.stdout, "checksums"), "ok");
    }
}

#[test]
fn serial_input_reaches_the_guest_and_output_the_terminal() {
    if !kvm_available("serial_input_reaches_the_guest_and_output_the_terminal") {
        return;
    }
    let out = run_guest_with_input("test=echo", &[], b"hello from the host\n");
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(out.stdout.contains("ready\necho: hello from the host\n"), "{}", out.stdout);
}

#[test]
fn long_serial_input_is_not_lost_when_the_fifo_fills() {
    if !kvm_available("long_serial_input_is_not_lost_when_the_fifo_fills") {
        return;
    }
    let line: String = (0..70).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    let out = run_guest_with_input("test=echo", &[], format!("{line}\n").as_bytes());
    assert!(out.stdout.contains(&format!("echo: {line}\n")), "{}", out.stdout);
}

#[test]
fn guest_exits_end_the_process_with_one_line() {
    if !kvm_available("guest_exits_end_the_process_with_one_line") {
        return;
    }
    let cases = [
        ("exit=reset", Some(0), "stratus: guest rebooted (i8042 reset)"),
        ("exit=poweroff", Some(0), "stratus: guest powered off"),
        ("exit=acpi-reset", Some(0), "stratus: guest rebooted (ACPI reset)"),
        ("exit=panic", Some(3), "stratus: guest kernel panicked (pvpanic)"),
        ("test=triple-fault", Some(0), "stratus: guest rebooted (triple fault)"),
    ];
    for (cmdline, code, line) in cases {
        let out = run_guest(cmdline, &[]);
        assert_eq!(out.code, code, "{cmdline}: {out:#?}");
        let last = out.stderr.lines().filter(|l| l.starts_with("stratus:")).collect::<Vec<_>>();
        assert_eq!(last, vec![line], "{cmdline}: {}", out.stderr);
    }
}

#[test]
fn instructions_pvm_cannot_emulate_give_architectural_results() {
    if !kvm_available("instructions_pvm_cannot_emulate_give_architectural_results") {
        return;
    }
    let out = run_guest("test=pvm", &[]);
    assert_eq!(out.code, Some(0), "{out:#?}");
    let line = out.stdout.lines().find(|l| l.starts_with("pvm:")).expect("pvm line");
    assert!(!line.contains("FAIL"), "{line}");
    for name in ["int3=ok", "popcnt=ok", "ldmxcsr=ok", "ldmxcsr_gp=ok", "fences=ok"] {
        assert!(line.contains(name), "missing {name}: {line}");
    }
    assert!(line.contains("stac=ok") || line.contains("stac=skipped"), "{line}");
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        // Each completed kind is logged exactly once, however often it ran.
        let logged = out.stderr.lines().filter(|l| l.contains("completing `int3`")).count();
        assert_eq!(logged, 1, "{}", out.stderr);
    }
}

#[test]
fn pvh_entry_gets_the_start_info() {
    if !kvm_available("pvh_entry_gets_the_start_info") {
        return;
    }
    let pvh = guests().pvh.to_str().unwrap().to_owned();
    let out = stratus(&["vm", "run", "--kernel", &pvh], b"", std::time::Duration::from_secs(30));
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert_eq!(out.stdout, "Sp\n", "marker and start-info check");
}

fn assert_one_line_error(out: &Outcome, needle: &str) {
    assert_eq!(out.code, Some(1), "{out:#?}");
    let lines: Vec<_> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {}", out.stderr);
    assert!(lines[0].starts_with("stratus: error: ") && lines[0].contains(needle), "{}", out.stderr);
}

#[test]
fn user_errors_are_one_clear_line() {
    if !kvm_available("user_errors_are_one_clear_line") {
        return;
    }
    let t = std::time::Duration::from_secs(30);
    let out = stratus(&["vm", "run", "--kernel", "/nonexistent/vmlinux"], b"", t);
    assert_one_line_error(&out, "/nonexistent/vmlinux: No such file or directory");

    let not_kernel = std::env::temp_dir().join(format!("stratus-not-a-kernel-{}", std::process::id()));
    std::fs::write(&not_kernel, vec![b'x'; 4096]).unwrap();
    let out = stratus(&["vm", "run", "--kernel", not_kernel.to_str().unwrap()], b"", t);
    std::fs::remove_file(&not_kernel).unwrap();
    assert_one_line_error(&out, "is not a kernel: neither an ELF vmlinux nor a bzImage");

    let guest = guests().guest.to_str().unwrap().to_owned();
    let out = stratus(&["vm", "run", "--kernel", &guest, "--memory", "64T"], b"", t);
    assert_one_line_error(&out, "is more than this host's");

    let out = stratus(&["vm", "run", "--kernel", &guest, "--cpus", "0"], b"", t);
    assert_one_line_error(&out, "--cpus 0");

    let out = stratus(&["vm", "run", "--kernel", &guest, "--memory", "lots"], b"", t);
    assert_eq!(out.code, Some(2), "usage errors exit 2: {out:#?}");
    assert!(out.stderr.contains("'lots' is not a size"), "{}", out.stderr);

    let out = stratus(&["vm", "run", "--kernel", &guest, "--initrd", "/nonexistent/initrd"], b"", t);
    assert_one_line_error(&out, "/nonexistent/initrd: No such file or directory");
}

#[test]
fn a_host_without_kvm_is_named() {
    if !kvm_available("a_host_without_kvm_is_named") {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIPPED: not root, cannot hide /dev/kvm in a mount namespace");
        return;
    }
    let guest = guests().guest.to_str().unwrap().to_owned();
    let bin = env!("CARGO_BIN_EXE_stratus");
    // A private mount namespace with an empty /dev: the host as a user without KVM sees it.
    let script = format!("mount -t tmpfs none /dev && exec {bin} vm run --kernel {guest}");
    let out = stratus_cmd(
        std::process::Command::new("unshare").args(["-m", "sh", "-c", &script]),
        b"",
        std::time::Duration::from_secs(30),
    );
    assert_one_line_error(&out, "no /dev/kvm: this host has no KVM");
}

fn blank_disk(name: &str, sector0: &[u8]) -> std::path::PathBuf {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let mut content = vec![0u8; 1 << 20];
    content[..sector0.len()].copy_from_slice(sector0);
    std::fs::write(&path, content).unwrap();
    path
}

#[test]
fn virtio_rng_hands_out_fresh_bytes() {
    if !kvm_available("virtio_rng_hands_out_fresh_bytes") {
        return;
    }
    let out = run_guest("test=virtio-rng", &["--rng"]);
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert_eq!(field(&out.stdout, "features_ok"), "1");
    assert_eq!(field(&out.stdout, "len"), "64");
    assert_eq!(field(&out.stdout, "nonzero"), "1");
    assert!(field(&out.stdout, "distinct").parse::<u32>().unwrap() > 20, "{}", out.stdout);
    assert_eq!(field(&out.stdout, "second_differs"), "1");
    assert_eq!(field(&out.stdout, "isr"), "0x1", "used-buffer interrupt bit");
    assert_eq!(field(&out.stdout, "isr_after_ack"), "0x0");
}

#[test]
fn virtio_feature_negotiation_needs_version_1() {
    if !kvm_available("virtio_feature_negotiation_needs_version_1") {
        return;
    }
    let out = run_guest("test=virtio-features", &["--rng"]);
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert_eq!(field(&out.stdout, "device_id"), "4");
    assert_eq!(field(&out.stdout, "version"), "2");
    assert_eq!(field(&out.stdout, "without_version_1_features_ok"), "0");
    assert_eq!(field(&out.stdout, "status_after_reset"), "0x0");
    assert_eq!(field(&out.stdout, "with_version_1_features_ok"), "1");
    let none = run_guest("test=virtio-features", &[]);
    assert!(none.stdout.contains("virtio: no device"), "{}", none.stdout);
}

#[test]
fn virtio_blk_reads_writes_and_flushes_the_file() {
    if !kvm_available("virtio_blk_reads_writes_and_flushes_the_file") {
        return;
    }
    let disk = blank_disk("rw.img", b"written by host!");
    let out = run_guest("test=virtio-blk", &["--disk", disk.to_str().unwrap()]);
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert_eq!(field(&out.stdout, "capacity"), "2048");
    assert_eq!(field(&out.stdout, "ro"), "0");
    assert_eq!(field(&out.stdout, "flush"), "1");
    assert!(out.stdout.contains("sector0=written by host!"), "{}", out.stdout);
    assert_eq!(field(&out.stdout, "write_status"), "0");
    assert_eq!(field(&out.stdout, "flush_status"), "0");
    assert_eq!(field(&out.stdout, "readback"), "1");
    assert_eq!(field(&out.stdout, "last_status"), "0");
    assert_eq!(field(&out.stdout, "past_end_status"), "1", "IOERR past the end, and the VMM lives");
    assert_eq!(field(&out.stdout, "isr_all_set"), "1");
    // The guest's write is in the file on the host.
    let file = std::fs::read(&disk).unwrap();
    let expected: Vec<u8> = (0..512u32).map(|i| ((i * 7 + 3) & 0xff) as u8).collect();
    assert_eq!(&file[512..1024], &expected[..]);
}

#[test]
fn virtio_blk_readonly_refuses_writes() {
    if !kvm_available("virtio_blk_readonly_refuses_writes") {
        return;
    }
    let disk = blank_disk("ro.img", b"read-only disk..");
    let before = std::fs::read(&disk).unwrap();
    let arg = format!("{},readonly", disk.to_str().unwrap());
    let out = run_guest("test=virtio-blk", &["--disk", &arg]);
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert_eq!(field(&out.stdout, "ro"), "1");
    assert_eq!(field(&out.stdout, "write_status"), "1", "IOERR, not a crash");
    assert_eq!(field(&out.stdout, "readback"), "0");
    assert_eq!(std::fs::read(&disk).unwrap(), before, "the file is untouched");
}

#[test]
fn disk_errors_are_one_clear_line() {
    if !kvm_available("disk_errors_are_one_clear_line") {
        return;
    }
    let t = std::time::Duration::from_secs(30);
    let guest = guests().guest.to_str().unwrap().to_owned();
    let out = stratus(&["vm", "run", "--kernel", &guest, "--disk", "/nonexistent/disk.img"], b"", t);
    assert_one_line_error(&out, "disk /nonexistent/disk.img: No such file or directory");

    let out = stratus(&["vm", "run", "--kernel", &guest, "--disk", "/tmp/x.img,fast"], b"", t);
    assert_eq!(out.code, Some(2), "{out:#?}");
    assert!(out.stderr.contains("unknown disk option 'fast'"), "{}", out.stderr);

    // A disk held by a running VMM is refused by a second one.
    let disk = blank_disk("locked.img", b"");
    let disk_arg = disk.to_str().unwrap().to_owned();
    let mut holder =
        Interactive::start(&["vm", "run", "--kernel", &guest, "--cmdline", "test=echo", "--disk", &disk_arg]);
    holder.expect("ready", 0, t);
    let out = stratus(&["vm", "run", "--kernel", &guest, "--disk", &disk_arg], b"", t);
    assert_one_line_error(&out, "is in use by another VMM");
    holder.send("bye\n");
    assert_eq!(holder.finish(t).code, Some(0));
}

/// Waits on `tap` (in the caller's namespace) for the guest's frame of ethertype 0x88b5 and
/// answers it; returns (source MAC, payload) of what it received. `listening` is told once
/// the socket is bound, so the guest is started only when its frame cannot be missed.
fn answer_one_frame(tap: &str, listening: std::sync::mpsc::Sender<()>) -> Result<([u8; 6], String), String> {
    const ETH_P: u16 = 0x88b5;
    // SAFETY: plain socket calls with valid, initialised arguments; the fd is closed below.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(ETH_P.to_be()));
        if fd < 0 {
            return Err(format!("AF_PACKET socket: {}", std::io::Error::last_os_error()));
        }
        let name = std::ffi::CString::new(tap).unwrap();
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ETH_P.to_be();
        addr.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
        let len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        if libc::bind(fd, (&addr as *const libc::sockaddr_ll).cast(), len) != 0 {
            return Err(format!("bind: {}", std::io::Error::last_os_error()));
        }
        let timeout = libc::timeval { tv_sec: 30, tv_usec: 0 };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            16,
        );
        let _ = listening.send(());
        let mut frame = [0u8; 2048];
        let n = libc::recv(fd, frame.as_mut_ptr().cast(), frame.len(), 0);
        if n < 14 {
            libc::close(fd);
            return Err(format!("no frame from the guest: {}", std::io::Error::last_os_error()));
        }
        let src: [u8; 6] = frame[6..12].try_into().unwrap();
        let payload = String::from_utf8_lossy(&frame[14..n as usize]).trim_end_matches('\0').to_owned();
        let mut reply = Vec::new();
        reply.extend_from_slice(&src);
        reply.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
        reply.extend_from_slice(&ETH_P.to_be_bytes());
        let mut body = b"stratus-host-reply".to_vec();
        body.resize(46, 0);
        reply.extend_from_slice(&body);
        libc::send(fd, reply.as_ptr().cast(), reply.len(), 0);
        libc::close(fd);
        Ok((src, payload))
    }
}

#[test]
fn virtio_net_frames_cross_the_tap_both_ways() {
    if !kvm_available("virtio_net_frames_cross_the_tap_both_ways") {
        return;
    }
    let Some(net) = TestNet::create(1, "virtio_net_frames_cross_the_tap_both_ways") else { return };
    let tap = net.tap.clone();
    let (listening, ready) = std::sync::mpsc::channel();
    let responder = net.spawn_within(move || answer_one_frame(&tap, listening));
    ready.recv_timeout(std::time::Duration::from_secs(30)).expect("the host side is listening");
    let guest = guests().guest.to_str().unwrap().to_owned();
    let net_arg = format!("tap={},mac=52:54:00:12:34:56", net.tap);
    let args = net.stratus_args(&[
        "vm",
        "run",
        "--kernel",
        &guest,
        "--cmdline",
        "test=virtio-net",
        "--net",
        &net_arg,
    ]);
    let out =
        stratus_cmd(std::process::Command::new("ip").args(&args), b"", std::time::Duration::from_secs(60));
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(out.stdout.contains("virtio-net: mac=52:54:00:12:34:56 features_ok=1"), "{}", out.stdout);
    assert_eq!(field(&out.stdout, "tx_done"), "1");
    assert_eq!(field(&out.stdout, "ethertype"), "0x88b5");
    assert_eq!(field(&out.stdout, "payload"), "stratus-host-reply");
    assert_eq!(field(&out.stdout, "rx_from"), "02:00:00:00:00:01");
    let (src, payload) = responder.join().unwrap().expect("the host saw the guest's frame");
    assert_eq!(src, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    assert_eq!(payload, "stratus-guest-hello");
}

#[test]
fn network_errors_are_one_clear_line() {
    if !kvm_available("network_errors_are_one_clear_line") {
        return;
    }
    let t = std::time::Duration::from_secs(30);
    let guest = guests().guest.to_str().unwrap().to_owned();
    let out = stratus(&["vm", "run", "--kernel", &guest, "--net", "tap=stratus-absent0"], b"", t);
    assert_one_line_error(
        &out,
        "tap device stratus-absent0 does not exist (create it with: ip tuntap add stratus-absent0 mode tap)",
    );
    for (arg, needle) in [
        ("tap=x,mac=zz", "is not a MAC address"),
        ("mac=52:54:00:00:00:01", "--net needs tap=NAME"),
        ("tap=x,speed=9", "unknown network option"),
    ] {
        let out = stratus(&["vm", "run", "--kernel", &guest, "--net", arg], b"", t);
        assert_eq!(out.code, Some(2), "{arg}: {out:#?}");
        assert!(out.stderr.contains(needle), "{arg}: {}", out.stderr);
    }
}

#[test]
fn virtio_vsock_connections_both_ways() {
    if !kvm_available("virtio_vsock_connections_both_ways") {
        return;
    }
    use std::io::{BufRead, Write};
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let socket = dir.join("tiny-vsock.sock");
    let service_path = format!("{}_5000", socket.display());
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&service_path);
    // The host service the guest reaches as vsock port 5000.
    let service = std::os::unix::net::UnixListener::bind(&service_path).unwrap();
    let service = std::thread::spawn(move || {
        let (stream, _) = service.accept().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(stream.try_clone().unwrap()).read_line(&mut line).unwrap();
        (&stream).write_all(b"welcome\n").unwrap();
        line
    });
    let guest = guests().guest.to_str().unwrap().to_owned();
    let vsock_arg = format!("cid=7,socket={}", socket.display());
    let mut vm = Interactive::start(&[
        "vm",
        "run",
        "--kernel",
        &guest,
        "--cmdline",
        "test=virtio-vsock",
        "--vsock",
        &vsock_arg,
    ]);
    let pos = vm.expect("virtio-vsock: cid=7 features_ok=1", 0, std::time::Duration::from_secs(30));

    // Host to guest.
    let host = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    host.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    (&host).write_all(b"CONNECT 1234\n").unwrap();
    let mut reader = std::io::BufReader::new(host.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let host_port =
        line.strip_prefix("OK ").map(|p| p.trim().to_owned()).unwrap_or_else(|| panic!("{line:?}"));
    (&host).write_all(b"hi\n").unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert_eq!(line, "echo: hi\n");
    drop(host);
    vm.expect(
        &format!("virtio-vsock: accepted from_port={host_port}"),
        pos,
        std::time::Duration::from_secs(30),
    );

    // Guest to host, then the guest closes.
    vm.expect("virtio-vsock: reply=welcome", pos, std::time::Duration::from_secs(30));
    vm.expect("virtio-vsock: done", pos, std::time::Duration::from_secs(30));
    let out = vm.finish(std::time::Duration::from_secs(30));
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert_eq!(service.join().unwrap(), "hello-from-tiny-guest\n");
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&service_path);
}

#[test]
fn a_vsock_socket_in_use_is_refused() {
    if !kvm_available("a_vsock_socket_in_use_is_refused") {
        return;
    }
    let socket = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("taken-vsock.sock");
    let _ = std::fs::remove_file(&socket);
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let guest = guests().guest.to_str().unwrap().to_owned();
    let arg = format!("cid=3,socket={}", socket.display());
    let out =
        stratus(&["vm", "run", "--kernel", &guest, "--vsock", &arg], b"", std::time::Duration::from_secs(30));
    assert_one_line_error(&out, "is already in use");
}

//! ACPI tables: how a guest finds its CPUs, its interrupt controllers, its devices and how to
//! power itself off.
//!
//! Stock distribution kernels discover a microVM only through ACPI (no MP table parsing, no
//! `virtio_mmio.device=`), so every guest gets RSDP, XSDT, FADT (hardware-reduced), MADT and a
//! DSDT naming the serial port, the pvpanic device and each virtio-mmio device.

use acpi_tables::{aml, rsdp::Rsdp, sdt::GenericAddress, sdt::Sdt, Aml};

use crate::layout::{
    ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_S5_SLEEP_TYPE, ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT,
    APIC_START, COM1_IRQ, COM1_PORT, GED_EVENT_GENERATION, GED_EVENT_POWER_BUTTON, GED_IRQ, GED_PORT,
    IOAPIC_START, PVPANIC_PORT, VMGENID_ADDR,
};

const OEM_ID: [u8; 6] = *b"STRTUS";

/// A virtio-mmio device as the DSDT announces it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    /// Base of its register window.
    pub base: u64,
    /// Window size in bytes.
    pub size: u64,
    /// Its interrupt (GSI).
    pub irq: u32,
}

/// Errors building ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit the area reserved for them.
    #[error("ACPI tables need {needed} bytes but only {available} are reserved")]
    TooLarge {
        /// Bytes the tables need.
        needed: usize,
        /// Bytes reserved.
        available: usize,
    },
    /// More vCPUs than an xAPIC MADT entry can name.
    #[error("{0} vCPUs do not fit in 8-bit APIC ids")]
    TooManyCpus(u32),
}

/// All tables laid out contiguously from `base`, RSDP first.
pub struct AcpiTables {
    /// Guest-physical address of the first byte (the RSDP).
    pub base: u64,
    /// The bytes to copy to `base`.
    pub bytes: Vec<u8>,
}

fn align(v: usize, to: usize) -> usize {
    v.div_ceil(to) * to
}

/// The DSDT: `_S5_` for power off, COM1, pvpanic, and the virtio-mmio devices.
fn dsdt(virtio: &[VirtioMmioDevice]) -> Sdt {
    let mut body = Vec::new();
    let s5 = aml::Package::new(vec![&ACPI_S5_SLEEP_TYPE, &aml::ZERO, &aml::ZERO, &aml::ZERO]);
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut body);

    let com1_io = aml::IO::new(COM1_PORT, COM1_PORT, 1, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = aml::EISAName::new("PNP0501");
    let com1_name = aml::Name::new("_HID".into(), &com1_hid);
    let com1_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let com1_res = aml::Name::new("_CRS".into(), &com1_crs);
    aml::Device::new("_SB_.COM1".into(), vec![&com1_name, &com1_uid, &com1_res]).to_aml_bytes(&mut body);

    let pvp_io = aml::IO::new(PVPANIC_PORT, PVPANIC_PORT, 1, 1);
    let pvp_crs = aml::ResourceTemplate::new(vec![&pvp_io]);
    let pvp_name = aml::Name::new("_HID".into(), &"QEMU0001");
    let pvp_res = aml::Name::new("_CRS".into(), &pvp_crs);
    aml::Device::new("_SB_.PVPN".into(), vec![&pvp_name, &pvp_res]).to_aml_bytes(&mut body);

    for (i, dev) in virtio.iter().enumerate() {
        let mem = aml::Memory32Fixed::new(true, dev.base as u32, dev.size as u32);
        let irq = aml::Interrupt::new(true, true, false, false, dev.irq);
        let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
        let hid = aml::Name::new("_HID".into(), &"LNRO0005");
        let uid_value = i as u32;
        let uid = aml::Name::new("_UID".into(), &uid_value);
        let res = aml::Name::new("_CRS".into(), &crs);
        let path = format!("_SB_.V{i:03X}");
        aml::Device::new(path.as_str().into(), vec![&hid, &uid, &res]).to_aml_bytes(&mut body);
    }

    ged(&mut body);

    let mut table = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"STRTDSDT", 1);
    table.append_slice(&body);
    table
}

/// The Generic Event Device and what it signals: the power button (the host asks for a
/// graceful shutdown) and the VM generation id (the host restored the VM: reseed).
fn ged(body: &mut Vec<u8>) {
    let irq = aml::Interrupt::new(true, true, false, false, GED_IRQ);
    let crs = aml::ResourceTemplate::new(vec![&irq]);
    let hid = aml::Name::new("_HID".into(), &"ACPI0013");
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let res = aml::Name::new("_CRS".into(), &crs);
    let port = GED_PORT as u32;
    let one = 1u8;
    let region = aml::OpRegion::new("GDST".into(), aml::OpRegionSpace::SystemIO, &port, &one);
    let field = aml::Field::new(
        "GDST".into(),
        aml::FieldAccessType::Byte,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![aml::FieldEntry::Named(*b"GDAT", 8)],
    );
    let gdat = aml::Path::new("GDAT");
    let read = aml::Store::new(&aml::Local(0), &gdat);
    let power_bit = GED_EVENT_POWER_BUTTON;
    let power_set = aml::And::new(&aml::Local(1), &aml::Local(0), &power_bit);
    let power_pressed = aml::NotEqual::new(&power_set, &aml::ZERO);
    let notify_value = 0x80u8;
    let pwrb = aml::Path::new("\\_SB_.PWRB");
    let notify_power = aml::Notify::new(&pwrb, &notify_value);
    let on_power = aml::If::new(&power_pressed, vec![&notify_power]);
    let generation_bit = GED_EVENT_GENERATION;
    let generation_set = aml::And::new(&aml::Local(2), &aml::Local(0), &generation_bit);
    let generation_changed = aml::NotEqual::new(&generation_set, &aml::ZERO);
    let vgen = aml::Path::new("\\_SB_.VGEN");
    let notify_generation = aml::Notify::new(&vgen, &notify_value);
    let on_generation = aml::If::new(&generation_changed, vec![&notify_generation]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&read, &on_power, &on_generation]);
    aml::Device::new("_SB_.GED_".into(), vec![&hid, &uid, &res, &region, &field, &evt]).to_aml_bytes(body);

    let button = aml::EISAName::new("PNP0C0C");
    let button_hid = aml::Name::new("_HID".into(), &button);
    aml::Device::new("_SB_.PWRB".into(), vec![&button_hid, &uid]).to_aml_bytes(body);

    let vgen_hid = aml::Name::new("_HID".into(), &"VMGENCTR");
    let vgen_cid = aml::Name::new("_CID".into(), &"VM_Gen_Counter");
    let vgen_ddn = aml::Name::new("_DDN".into(), &"VM_Gen_Counter");
    let low = VMGENID_ADDR as u32;
    let high = (VMGENID_ADDR >> 32) as u32;
    let addr = aml::Package::new(vec![&low, &high]);
    let vgen_addr = aml::Name::new("ADDR".into(), &addr);
    aml::Device::new("_SB_.VGEN".into(), vec![&vgen_hid, &vgen_cid, &vgen_ddn, &vgen_addr])
        .to_aml_bytes(body);
}

/// The FADT: hardware-reduced ACPI with a sleep control register for S5 and a reset register.
fn fadt(dsdt_addr: u64) -> Sdt {
    let mut t = Sdt::new(*b"FACP", 276, 6, OEM_ID, *b"STRTFACP", 1);
    // HW_REDUCED_ACPI (20) and RESET_REG_SUP (10).
    t.write(112, (1u32 << 20) | (1 << 10));
    t.write(116, GenericAddress::io_port_address::<u8>(ACPI_RESET_PORT));
    t.write(128, ACPI_RESET_VALUE);
    t.write(131, 3u8); // FADT minor version
    t.write(140, dsdt_addr); // X_DSDT
    t.write(244, GenericAddress::io_port_address::<u8>(ACPI_SLEEP_CONTROL_PORT));
    t.write(256, GenericAddress::io_port_address::<u8>(ACPI_SLEEP_STATUS_PORT));
    t.write_bytes(268, b"STRATUS\0"); // hypervisor vendor identity
    t.update_checksum();
    t
}

/// The MADT: one local APIC per vCPU (APIC id = vCPU index) and the IOAPIC.
fn madt(vcpus: u32) -> Result<Sdt, AcpiError> {
    if vcpus > 255 {
        return Err(AcpiError::TooManyCpus(vcpus));
    }
    let mut t = Sdt::new(*b"APIC", 44, 4, OEM_ID, *b"STRTMADT", 1);
    t.write(36, APIC_START as u32);
    t.write(40, 1u32); // PCAT_COMPAT: there is a legacy 8259 pair too.
    for id in 0..vcpus {
        // Processor Local APIC: type 0, length 8, uid, apic id, flags (enabled).
        t.append_slice(&[0, 8, id as u8, id as u8, 1, 0, 0, 0]);
    }
    // I/O APIC: type 1, length 12, id, reserved, address, GSI base 0.
    let mut ioapic = vec![1, 12, 0, 0];
    ioapic.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes());
    t.append_slice(&ioapic);
    t.update_checksum();
    Ok(t)
}

/// Builds every table for a guest with `vcpus` CPUs and the given virtio-mmio devices, laid out
/// from `base`.
pub fn build(base: u64, vcpus: u32, virtio: &[VirtioMmioDevice]) -> Result<AcpiTables, AcpiError> {
    let rsdp_len = Rsdp::len();
    let dsdt = dsdt(virtio);
    let dsdt_off = align(rsdp_len, 16);
    let fadt_off = align(dsdt_off + dsdt.len(), 8);
    let fadt = fadt(base + dsdt_off as u64);
    let madt = madt(vcpus)?;
    let madt_off = align(fadt_off + fadt.len(), 8);
    let xsdt_off = align(madt_off + madt.len(), 8);
    let mut xsdt = Sdt::new(*b"XSDT", 36, 1, OEM_ID, *b"STRTXSDT", 1);
    xsdt.append(base + fadt_off as u64);
    xsdt.append(base + madt_off as u64);
    xsdt.update_checksum();
    let total = xsdt_off + xsdt.len();
    // The tables end where the VM generation id's page begins.
    let available = (VMGENID_ADDR - base) as usize;
    if total > available {
        return Err(AcpiError::TooLarge { needed: total, available });
    }

    let mut bytes = vec![0u8; total];
    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, base + xsdt_off as u64).to_aml_bytes(&mut rsdp);
    bytes[..rsdp_len].copy_from_slice(&rsdp);
    for (off, table) in [(dsdt_off, &dsdt), (fadt_off, &fadt), (madt_off, &madt), (xsdt_off, &xsdt)] {
        bytes[off..off + table.len()].copy_from_slice(table.as_slice());
    }
    Ok(AcpiTables { base, bytes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::ACPI_START;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }
    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    /// Follows RSDP -> XSDT -> tables the way a guest does, checking every checksum.
    fn parse(t: &AcpiTables) -> Vec<([u8; 4], Vec<u8>)> {
        let b = &t.bytes;
        assert_eq!(&b[0..8], b"RSD PTR ");
        assert_eq!(sum(&b[0..20]), 0, "RSDP checksum");
        assert_eq!(sum(&b[0..36]), 0, "RSDP extended checksum");
        let table_at = |addr: u64| {
            let off = (addr - t.base) as usize;
            let len = u32_at(b, off + 4) as usize;
            let table = b[off..off + len].to_vec();
            assert_eq!(sum(&table), 0, "checksum of {:?}", String::from_utf8_lossy(&table[0..4]));
            table
        };
        let xsdt = table_at(u64_at(b, 24));
        assert_eq!(&xsdt[0..4], b"XSDT");
        let mut out = vec![(*b"XSDT", xsdt.clone())];
        for i in 0..(xsdt.len() - 36) / 8 {
            let table = table_at(u64_at(&xsdt, 36 + i * 8));
            out.push((table[0..4].try_into().unwrap(), table));
        }
        let fadt = &out.iter().find(|(s, _)| s == b"FACP").unwrap().1;
        let dsdt = table_at(u64_at(fadt, 140));
        out.push((*b"DSDT", dsdt));
        out
    }

    #[test]
    fn tables_parse_back_with_valid_checksums() {
        let dev = VirtioMmioDevice { base: 0xd000_0000, size: 0x1000, irq: 5 };
        let t = build(ACPI_START, 2, &[dev, dev]).unwrap();
        let tables = parse(&t);
        let names: Vec<_> = tables.iter().map(|(s, _)| *s).collect();
        assert_eq!(names, vec![*b"XSDT", *b"FACP", *b"APIC", *b"DSDT"]);
    }

    #[test]
    fn madt_lists_one_enabled_lapic_per_vcpu_and_the_ioapic() {
        let t = build(ACPI_START, 4, &[]).unwrap();
        let madt = parse(&t).into_iter().find(|(s, _)| s == b"APIC").unwrap().1;
        let mut off = 44;
        let mut apic_ids = Vec::new();
        let mut ioapics = 0;
        while off < madt.len() {
            match madt[off] {
                0 => {
                    assert_eq!(madt[off + 4] & 1, 1, "enabled");
                    apic_ids.push(madt[off + 3]);
                }
                1 => {
                    ioapics += 1;
                    assert_eq!(u32_at(&madt, off + 4) as u64, IOAPIC_START);
                }
                other => panic!("unexpected MADT entry type {other}"),
            }
            off += madt[off + 1] as usize;
        }
        assert_eq!(apic_ids, vec![0, 1, 2, 3]);
        assert_eq!(ioapics, 1);
    }

    #[test]
    fn fadt_is_hardware_reduced_with_sleep_and_reset_registers() {
        let t = build(ACPI_START, 1, &[]).unwrap();
        let fadt = parse(&t).into_iter().find(|(s, _)| s == b"FACP").unwrap().1;
        assert_ne!(u32_at(&fadt, 112) & (1 << 20), 0);
        // Generic address structures: space id 1 (I/O), then the 64-bit address at +4.
        assert_eq!(fadt[244], 1);
        assert_eq!(u64_at(&fadt, 248), ACPI_SLEEP_CONTROL_PORT as u64);
        assert_eq!(u64_at(&fadt, 120), ACPI_RESET_PORT as u64);
        assert_eq!(fadt[128], ACPI_RESET_VALUE);
    }

    #[test]
    fn dsdt_names_every_device() {
        let devs: Vec<_> = (0..3)
            .map(|i| VirtioMmioDevice { base: 0xd000_0000 + i * 0x1000, size: 0x1000, irq: 5 + i as u32 })
            .collect();
        let t = build(ACPI_START, 1, &devs).unwrap();
        let dsdt = parse(&t).into_iter().find(|(s, _)| s == b"DSDT").unwrap().1;
        let count = |needle: &[u8]| dsdt.windows(needle.len()).filter(|w| *w == needle).count();
        assert_eq!(count(b"LNRO0005"), 3);
        assert_eq!(count(b"QEMU0001"), 1);
        assert_eq!(count(b"_S5_"), 1);
        assert_eq!(count(b"COM1"), 1);
    }

    #[test]
    fn too_many_devices_do_not_fit() {
        let devs = vec![VirtioMmioDevice { base: 0xd000_0000, size: 0x1000, irq: 5 }; 4000];
        assert!(matches!(build(ACPI_START, 1, &devs), Err(AcpiError::TooLarge { .. })));
    }
}

//! Platform devices of a Stratus guest — the 16550 serial console, the i8042 reset line, the
//! ACPI power-management registers and pvpanic — and the buses that route a guest's port and
//! MMIO accesses to them. Devices know nothing of KVM: they see offsets and bytes.

pub mod acpi_pm;
pub mod bus;
pub mod exit;
pub mod ged;
pub mod i8042;
pub mod pvpanic;
pub mod serial;

pub use bus::{Bus, BusDevice, BusError};
pub use exit::{ExitSignal, GuestExit};

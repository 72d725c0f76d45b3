//! x86_64 platform layout for Stratus guests: where memory, tables and devices live, and the
//! bytes and register values each boot protocol expects. Pure data: no KVM calls, so every
//! piece is unit-tested without a VM.

pub mod acpi;
pub mod boot;
pub mod cpu_state;
pub mod cpuid;
pub mod layout;
pub mod memory_map;

/* The smallest useful guest: a PVH ELF whose 32-bit entry checks the start info the VMM
 * passed in EBX, prints a marker on COM1, then resets through the i8042 — or, on machines
 * without one (QEMU microvm), by a triple fault.
 * Output: "S" then "p" (start info magic right) or "?" (wrong), then "\n". */
    .section .note.Xen, "a", @note
    .p2align 2
    .long 4                     /* name size: "Xen\0" */
    .long 4                     /* descriptor size */
    .long 18                    /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_start

    .text
    .code32
    .globl pvh_start
pvh_start:
    mov $0x3f8, %dx
    mov $'S', %al
    out %al, %dx
    mov $'p', %al
    cmpl $0x336ec578, (%ebx)
    je 1f
    mov $'?', %al
1:  out %al, %dx
    mov $'\n', %al
    out %al, %dx
    mov $0xfe, %al
    out %al, $0x64
    lidt empty_idt
    ud2
2:  hlt
    jmp 2b

    .p2align 3
empty_idt:
    .word 0
    .long 0

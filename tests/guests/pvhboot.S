/* PVH entry for the full tiny guest (`guest.pvh`), so that the same binary boots under any VMM
 * that loads PVH ELF kernels (Stratus, QEMU microvm): from the 32-bit entry (paging off, EBX =
 * hvm_start_info) it identity-maps the low 4 GiB with 2 MiB pages (RAM and both VMMs'
 * virtio-mmio windows), enters long mode and jumps to start.S's _start with RSI pointing at a
 * stand-in zero page. That page carries only the command line (cmd_line_ptr, taken from the
 * start info's cmdline_paddr) and the e820 table (from its memory map); the tests that read the
 * rest of a real zero page (boot) are meant for the 64-bit-entry variants. */
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
    /* PML4[0] -> PDPT; PDPT[i] -> PD i (i < 4); PD i[j] -> (i*512 + j) * 2 MiB, PS|RW|P. */
    mov $pvh_pml4, %edi
    mov $pvh_pdpt + 3, %eax
    mov %eax, (%edi)
    mov $pvh_pdpt, %edi
    mov $pvh_pd + 3, %eax
    xor %ecx, %ecx
1:  mov %eax, (%edi,%ecx,8)
    add $4096, %eax
    inc %ecx
    cmp $4, %ecx
    jne 1b
    mov $pvh_pd, %edi
    xor %ecx, %ecx
2:  mov %ecx, %eax
    shl $21, %eax
    or $0x83, %eax
    mov %eax, (%edi,%ecx,8)
    movl $0, 4(%edi,%ecx,8)
    inc %ecx
    cmp $2048, %ecx
    jne 2b
    /* The memory map (start info version 1 on) into the stand-in zero page's e820 table, for
     * the tests that check a range is RAM: 24-byte entries become 20-byte ones, 128 at most. */
    cld
    cmpl $1, 4(%ebx)            /* hvm_start_info.version */
    jb 4f
    mov 0x28(%ebx), %esi        /* memmap_paddr (low half; below 4 GiB) */
    mov 0x30(%ebx), %edx        /* memmap_entries */
    cmp $128, %edx
    jbe 3f
    mov $128, %edx
3:  mov %dl, pvh_zero_page + 0x1e8
    mov $pvh_zero_page + 0x2d0, %edi
    test %edx, %edx
    jz 4f
5:  mov $5, %ecx                /* addr, size, type */
    rep movsl
    add $4, %esi                /* skip the reserved word */
    dec %edx
    jnz 5b
4:
    /* The command line into the stand-in zero page, before EBX is clobbered. */
    mov 0x18(%ebx), %eax        /* hvm_start_info.cmdline_paddr (low half; below 4 GiB) */
    mov %eax, pvh_zero_page + 0x228
    mov $pvh_pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x20, %eax              /* PAE */
    mov %eax, %cr4
    mov $0xc0000080, %ecx       /* EFER.LME */
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax        /* PG | PE */
    mov %eax, %cr0
    lgdt pvh_gdtr
    ljmp $8, $pvh_long

    .code64
pvh_long:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov $pvh_zero_page, %esi
    jmp _start

    .data
    .p2align 3
pvh_gdt:
    .quad 0
    .quad 0x00af9a000000ffff    /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff    /* 0x10: data */
pvh_gdtr:
    .word pvh_gdtr - pvh_gdt - 1
    .long pvh_gdt

    .bss
    .p2align 12
pvh_pml4: .space 4096
pvh_pdpt: .space 4096
pvh_pd:   .space 4 * 4096
pvh_zero_page: .space 4096

/* Entry for tiny test guests booted through the 64-bit Linux boot protocol: the VMM has
 * already put the CPU in long mode with paging on and RSI pointing at the zero page. */
    .section .text.start, "ax"
    .globl _start
    .code64
_start:
    mov %rsp, %rdx              /* the stack the VMM gave us, for the boot-state test */
    lea stack_top(%rip), %rsp
    mov %rsi, %rdi              /* main(zero_page, entry_rsp) */
    mov %rdx, %rsi
    call main
1:  hlt
    jmp 1b

/* #BP handler for the int3 test: records the return RIP the CPU pushed. */
    .globl bp_handler
bp_handler:
    push %rax
    mov 8(%rsp), %rax
    mov %rax, bp_rip(%rip)
    incl bp_count(%rip)
    pop %rax
    iretq

/* #GP handler: records the faulting RIP and skips the 3-byte ldmxcsr that faulted. */
    .globl gp_handler
gp_handler:
    push %rax
    mov 16(%rsp), %rax          /* above the error code */
    mov %rax, gp_rip(%rip)
    addq $4, 16(%rsp)           /* ldmxcsr (%rax) with disp8: 0f ae 50 00 */
    incl gp_count(%rip)
    pop %rax
    add $8, %rsp                /* drop the error code */
    iretq

    .bss
    .balign 16
    .space 16384
stack_top:

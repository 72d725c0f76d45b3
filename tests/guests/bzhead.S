/* First bytes of the protected-mode kernel in the bzImage test guest: the 32-bit entry
 * (offset 0) is never used by Stratus, which enters at offset 0x200 in long mode. */
    .section .text.bzhead, "ax"
    .code32
    ud2

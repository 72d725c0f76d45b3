/* A small vsock client/server for tests that run inside the Linux guest (busybox has no
 * AF_VSOCK support):
 *   vsock-tool listen PORT        accept one connection, answer each line with "echo: LINE"
 *   vsock-tool connect PORT MSG   connect to the host (CID 2), send MSG, print the reply line */
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int read_line(int fd, char *buf, size_t cap) {
    size_t n = 0;
    while (n + 1 < cap) {
        ssize_t r = read(fd, buf + n, 1);
        if (r <= 0) break;
        if (buf[n] == '\n') break;
        n++;
    }
    buf[n] = 0;
    return (int)n;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: vsock-tool listen PORT | connect PORT MSG\n");
        return 2;
    }
    int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (fd < 0) { perror("socket"); return 1; }
    struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_port = (unsigned)atoi(argv[2])};
    char line[256];
    if (!strcmp(argv[1], "listen")) {
        addr.svm_cid = VMADDR_CID_ANY;
        if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) || listen(fd, 1)) { perror("listen"); return 1; }
        printf("vsock-tool: listening on %s\n", argv[2]);
        fflush(stdout);
        int c = accept(fd, NULL, NULL);
        if (c < 0) { perror("accept"); return 1; }
        while (read_line(c, line, sizeof(line)) > 0) {
            char out[300];
            int n = snprintf(out, sizeof(out), "echo: %s\n", line);
            if (write(c, out, n) != n) break;
        }
        close(c);
        return 0;
    }
    if (!strcmp(argv[1], "connect") && argc == 4) {
        addr.svm_cid = VMADDR_CID_HOST;
        if (connect(fd, (struct sockaddr *)&addr, sizeof(addr))) { perror("connect"); return 1; }
        dprintf(fd, "%s\n", argv[3]);
        read_line(fd, line, sizeof(line));
        printf("vsock-tool: reply %s\n", line);
        return 0;
    }
    fprintf(stderr, "usage: vsock-tool listen PORT | connect PORT MSG\n");
    return 2;
}

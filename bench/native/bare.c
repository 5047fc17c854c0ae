// bare: the cheapest possible server, to measure the load generator's ceiling.
//   bare PORT PROCESSES — each process has its own SO_REUSEPORT socket and a blocking accept loop
// that writes a canned response and closes. No routing, no HTTP parsing.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    int processes = atoi(argv[2]);
    for (int p = 0; p < processes; p++) {
        if (p < processes - 1 && fork() != 0) continue;
        char response[128];  // the body names the process, like every other worker's
        int response_len = snprintf(response, sizeof response,
                                    "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n%d\n", p % 10);
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
        struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[1]))};
        addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (bind(fd, (struct sockaddr *)&addr, sizeof addr) || listen(fd, 4096)) return 1;
        char buf[2048];
        for (;;) {
            int c = accept(fd, NULL, NULL);
            if (c < 0) continue;
            if (read(c, buf, sizeof buf) > 0) (void)!write(c, response, (size_t)response_len);
            close(c);
        }
    }
    return 0;
}

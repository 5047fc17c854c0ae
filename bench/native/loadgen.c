// loadgen: new-connection HTTP load from many source addresses, for scripts/bench.
//
//   loadgen [--proxy | --proxy-v2] HOST PORT SOURCES CONCURRENCY SECONDS [REQUESTS_PER_CONNECTION [PATH | @FILE]]
//
// Keeps CONCURRENCY connections in flight; each binds the next source address (127.77.y.z, by
// index, cycling through SOURCES of them), connects, sends REQUESTS_PER_CONNECTION (default 1)
// GETs of PATH (default /; with @FILE, source i asks for line i of FILE) one after another
// (keep-alive; the last says "Connection: close"), and records each response's latency and worker
// id (the body's first integer). Responses need Content-Length. A source is sticky when every
// connection it made was answered by the same worker. With --proxy (--proxy-v2), each connection's
// first write starts with a PROXY protocol v1 (v2) header naming the connection's own addresses, as
// an L4 balancer that sends one would (HAProxy's send-proxy, send-proxy-v2).
// Prints one JSON object: completed, errors, latencies, per-worker counts, stickiness per source.
// Connections still open DRAIN_SECONDS after the end (a SYN dropped by a full backlog is retried
// for over a minute) are closed and counted as errors, so a run always ends.
// Single-threaded epoll: one core of load, so the bench can measure this generator's ceiling.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_WORKERS 64
#define DRAIN_SECONDS 10
#define BUF 1024
#define MAX_PATHS 1024
#define MAX_PATH 160

struct conn {
    int fd;
    int source;
    int sent;  // requests sent on this connection
    size_t got;
    uint64_t started_ns;
    char buf[BUF];
};

// Length of a complete response at the start of buf (0: not complete yet, -1: malformed).
static long response_length(const char *buf, size_t got) {
    const char *end = memmem(buf, got, "\r\n\r\n", 4);
    if (!end) return 0;
    const char *cl = strcasestr(buf, "\r\ncontent-length:");
    if (!cl || cl > end) return -1;
    long total = (end + 4 - buf) + atol(cl + 17);
    return (size_t)total <= got ? total : 0;
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint32_t source_addr(int index) {
    // Skip .0 and .255 host bytes, as tests/netlab.py does.
    int i = 2, n = 0;
    for (;;) {
        if ((i & 0xff) != 0 && (i & 0xff) != 255) {
            if (n == index) break;
            n++;
        }
        i++;
    }
    return htonl((127u << 24) | (77u << 16) | (uint32_t)(i & 0xffff));
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

// The first write of a connection with --proxy or --proxy-v2: a PROXY header of that version naming
// its own addresses, then the request. Returns its length (0: the addresses could not be read).
static int proxied_request(int version, int fd, const char *request, int len, char *out, size_t size) {
    struct sockaddr_in src, dst;
    socklen_t src_len = sizeof src, dst_len = sizeof dst;
    if (getsockname(fd, (struct sockaddr *)&src, &src_len) || getpeername(fd, (struct sockaddr *)&dst, &dst_len))
        return 0;
    if (version == 2) {
        // Signature, PROXY command, TCP over IPv4, 12 bytes of addresses (all in network order).
        static const char head[16] = "\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c";
        if (sizeof head + 12 + (size_t)len > size)
            return 0;
        memcpy(out, head, sizeof head);
        memcpy(out + 16, &src.sin_addr, 4);
        memcpy(out + 20, &dst.sin_addr, 4);
        memcpy(out + 24, &src.sin_port, 2);
        memcpy(out + 26, &dst.sin_port, 2);
        memcpy(out + 28, request, (size_t)len);
        return 28 + len;
    }
    char src_ip[INET_ADDRSTRLEN], dst_ip[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &src.sin_addr, src_ip, sizeof src_ip);
    inet_ntop(AF_INET, &dst.sin_addr, dst_ip, sizeof dst_ip);
    return snprintf(out, size, "PROXY TCP4 %s %s %u %u\r\n%.*s", src_ip, dst_ip, ntohs(src.sin_port),
                    ntohs(dst.sin_port), len, request);
}

int main(int argc, char **argv) {
    int proxy = 0;  // the PROXY header's version, if any
    if (argc > 1)
        proxy = strcmp(argv[1], "--proxy") == 0 ? 1 : strcmp(argv[1], "--proxy-v2") == 0 ? 2 : 0;
    argv += proxy > 0;
    argc -= proxy > 0;
    if (argc < 6) {
        fprintf(stderr,
                "usage: loadgen [--proxy | --proxy-v2] HOST PORT SOURCES CONCURRENCY SECONDS "
                "[REQUESTS_PER_CONNECTION [PATH | @FILE]]\n");
        return 2;
    }
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[2]))};
    inet_pton(AF_INET, argv[1], &dst.sin_addr);
    int nsources = atoi(argv[3]), concurrency = atoi(argv[4]);
    double seconds = atof(argv[5]);
    int per_conn = argc > 6 ? atoi(argv[6]) : 1;
    // PATH, or "@FILE": one path per line, source i asking for line i (cycling), so that each
    // source can carry a session key of its own.
    const char *path_arg = argc > 7 ? argv[7] : "/";
    char paths[MAX_PATHS][MAX_PATH + 1];
    int npaths = 0;
    if (path_arg[0] == '@') {
        FILE *file = fopen(path_arg + 1, "r");
        if (!file) {
            perror(path_arg + 1);
            return 2;
        }
        while (npaths < MAX_PATHS && fgets(paths[npaths], sizeof paths[npaths], file)) {
            size_t len = strcspn(paths[npaths], "\n");
            if (paths[npaths][len] != '\n' && !feof(file)) {
                fprintf(stderr, "loadgen: a path in %s is longer than %d bytes\n", path_arg + 1, MAX_PATH);
                return 2;
            }
            paths[npaths][len] = 0;
            if (len) npaths++;
        }
        fclose(file);
    } else if (strlen(path_arg) <= MAX_PATH) {
        strcpy(paths[npaths++], path_arg);
    }
    if (npaths == 0) {
        fprintf(stderr, "loadgen: no PATH of at most %d bytes in %s\n", MAX_PATH, path_arg);
        return 2;
    }

    uint32_t *addrs = calloc((size_t)nsources, sizeof *addrs);
    int *first_worker = malloc((size_t)nsources * sizeof(int));
    char *moved = calloc((size_t)nsources, 1);
    long *per_source = calloc((size_t)nsources, sizeof(long));
    for (int i = 0; i < nsources; i++) {
        addrs[i] = source_addr(i);
        first_worker[i] = -1;
    }
    size_t lat_cap = 1 << 20, lat_n = 0;
    uint32_t *lat_us = malloc(lat_cap * sizeof *lat_us);
    long per_worker[MAX_WORKERS] = {0};
    long completed = 0, errors = 0;
    // Each path's request, and the last one of a connection (which says "Connection: close").
    char (*request)[2][MAX_PATH + 128] = calloc((size_t)npaths, sizeof *request);
    int (*request_len)[2] = calloc((size_t)npaths, sizeof *request_len);
    for (int i = 0; i < npaths; i++) {
        request_len[i][0] = snprintf(request[i][0], sizeof request[i][0],
                                     "GET %s HTTP/1.1\r\nHost: %s\r\n\r\n", paths[i], argv[1]);
        request_len[i][1] = snprintf(request[i][1], sizeof request[i][1],
                                     "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n",
                                     paths[i], argv[1]);
    }

    int ep = epoll_create1(0);
    struct conn *conns = calloc((size_t)concurrency, sizeof *conns);
    int next_source = 0;
    uint64_t start = now_ns(), deadline = start + (uint64_t)(seconds * 1e9);
    uint64_t drained = deadline + (uint64_t)DRAIN_SECONDS * 1000000000ull;

    // Open a connection in slot c; returns 0 on success.
    #define OPEN(c)                                                                            \
        do {                                                                                   \
            struct conn *k = &conns[c];                                                        \
            k->source = next_source;                                                           \
            next_source = (next_source + 1) % nsources;                                        \
            k->got = 0;                                                                        \
            k->sent = 0;                                                                       \
            k->started_ns = now_ns();                                                          \
            k->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);                           \
            int one = 1;                                                                       \
            setsockopt(k->fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);                     \
            setsockopt(k->fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);          \
            struct sockaddr_in src = {.sin_family = AF_INET, .sin_addr.s_addr = addrs[k->source]}; \
            bind(k->fd, (struct sockaddr *)&src, sizeof src);                                  \
            connect(k->fd, (struct sockaddr *)&dst, sizeof dst);                               \
            struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = (uint32_t)(c)};           \
            epoll_ctl(ep, EPOLL_CTL_ADD, k->fd, &ev);                                          \
        } while (0)

    for (int c = 0; c < concurrency; c++) OPEN(c);
    struct epoll_event events[256];
    int open_conns = concurrency;
    while (open_conns > 0) {
        int n = epoll_wait(ep, events, 256, 100);
        uint64_t t = now_ns();
        if (t >= drained) {
            for (int c = 0; c < concurrency; c++) {
                if (conns[c].fd >= 0) {
                    close(conns[c].fd);
                    errors++;
                }
            }
            break;
        }
        for (int e = 0; e < n; e++) {
            int c = (int)events[e].data.u32;
            struct conn *k = &conns[c];
            int done = 0, failed = 0;
            if (events[e].events & (EPOLLERR | EPOLLHUP) && !(events[e].events & EPOLLIN)) {
                failed = 1;
            } else if (events[e].events & EPOLLOUT) {
                int last = k->sent + 1 >= per_conn, path = k->source % npaths;
                const char *bytes = request[path][last];
                ssize_t len = request_len[path][last];
                char with_header[MAX_PATH + 256];
                if (proxy && k->sent == 0) {
                    len = proxied_request(proxy, k->fd, bytes, (int)len, with_header, sizeof with_header);
                    bytes = with_header;
                }
                if (len <= 0 || write(k->fd, bytes, (size_t)len) != len) {
                    failed = 1;
                } else {
                    k->sent++;
                    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)c};
                    epoll_ctl(ep, EPOLL_CTL_MOD, k->fd, &ev);
                }
            } else if (events[e].events & EPOLLIN) {
                ssize_t r = read(k->fd, k->buf + k->got, BUF - 1 - k->got);
                if (r <= 0) {
                    failed = r == 0 || errno != EAGAIN;
                } else {
                    k->got += (size_t)r;
                    k->buf[k->got] = 0;
                    long length = response_length(k->buf, k->got);
                    if (length < 0 || k->got >= BUF - 1 || strncmp(k->buf, "HTTP/1.1 200", 12) != 0) {
                        failed = length != 0 || k->got >= BUF - 1;
                    }
                    if (length > 0 && !failed) {
                        int worker = atoi(strstr(k->buf, "\r\n\r\n") + 4);
                        completed++;
                        if (lat_n == lat_cap) lat_us = realloc(lat_us, (lat_cap *= 2) * sizeof *lat_us);
                        lat_us[lat_n++] = (uint32_t)((t - k->started_ns) / 1000);
                        if (worker >= 0 && worker < MAX_WORKERS) per_worker[worker]++;
                        if (k->sent == 1) {  // stickiness is about a source's connections
                            if (first_worker[k->source] < 0) first_worker[k->source] = worker;
                            else if (first_worker[k->source] != worker) moved[k->source] = 1;
                            per_source[k->source]++;
                        }
                        if (k->sent >= per_conn || t >= deadline) {
                            done = 1;
                        } else {  // next request on the same connection
                            k->got = 0;
                            k->started_ns = t;
                            struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = (uint32_t)c};
                            epoll_ctl(ep, EPOLL_CTL_MOD, k->fd, &ev);
                        }
                    }
                }
            }
            if (done || failed) {
                close(k->fd);
                k->fd = -1;
                if (failed) errors++;
                if (t < deadline) {
                    OPEN(c);
                } else {
                    open_conns--;
                }
            }
        }
    }
    double elapsed = (double)(now_ns() - start) / 1e9;
    qsort(lat_us, lat_n, sizeof *lat_us, cmp_u32);
    long sticky_sources = 0, multi = 0;
    for (int i = 0; i < nsources; i++) {
        if (per_source[i] >= 2) {
            multi++;
            if (!moved[i]) sticky_sources++;
        }
    }
    printf("{\"completed\": %ld, \"errors\": %ld, \"elapsed\": %.4f, ", completed, errors, elapsed);
    printf("\"requests_per_connection\": %d, ", per_conn);
    printf("\"p50_us\": %u, \"p99_us\": %u, ", lat_n ? lat_us[lat_n / 2] : 0,
           lat_n ? lat_us[(size_t)((double)lat_n * 0.99)] : 0);
    printf("\"sources_seen_twice\": %ld, \"sticky_sources\": %ld, \"per_worker\": [", multi, sticky_sources);
    int last = MAX_WORKERS - 1;
    while (last > 0 && per_worker[last] == 0) last--;
    for (int w = 0; w <= last; w++) printf("%s%ld", w ? ", " : "", per_worker[w]);
    printf("]}\n");
    return 0;
}

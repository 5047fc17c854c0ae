/* Tries to detach the SO_REUSEPORT group's program from fd 3 through each system-call ABI named on
 * the command line, the way an attacker holding one worker would:
 *   i386  int $0x80 from this 64-bit process (setsockopt is 366 there),
 *   x32   the x32 bit (0x40000000) on x32's setsockopt (541),
 *   64    the native setsockopt,
 *   uring io_uring's socket command (Linux 6.7+), which sets options without the setsockopt call.
 * Each attempt runs in a child, so a seccomp kill ends only that attempt. Prints one word per
 * attempt ("0" detached, "errno:N", "signal:N"); with "serve" first, then answers every connection
 * on fd 3 with "<EBPF_STICKY_WORKER> <words>". Built by the tests with gcc; x86_64 only. */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/io_uring.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define SO_DETACH_REUSEPORT_BPF 68

static int *zero; /* the option value, below 4 GiB so the i386 ABI can point at it */

/* One SOCKET_URING_OP_SETSOCKOPT through a one-entry ring; the result is the completion's. The
 * installed headers may predate the socket command, so its fields are written at their offsets. */
static long attempt_uring(void) {
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    int ring = syscall(__NR_io_uring_setup, 1, &p);
    if (ring < 0) return -errno;
    size_t sq_size = p.sq_off.array + p.sq_entries * sizeof(uint32_t);
    size_t cq_size = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    char *sq = mmap(NULL, sq_size, PROT_READ | PROT_WRITE, MAP_SHARED, ring, IORING_OFF_SQ_RING);
    char *cq = mmap(NULL, cq_size, PROT_READ | PROT_WRITE, MAP_SHARED, ring, IORING_OFF_CQ_RING);
    unsigned char *sqe = mmap(NULL, 64, PROT_READ | PROT_WRITE, MAP_SHARED, ring, IORING_OFF_SQES);
    if (sq == MAP_FAILED || cq == MAP_FAILED || sqe == MAP_FAILED) return -errno;
    memset(sqe, 0, 64);
    sqe[0] = IORING_OP_URING_CMD;
    int32_t fd = 3;
    uint32_t cmd_op = 3 /* SOCKET_URING_OP_SETSOCKOPT */, level = SOL_SOCKET, optname = SO_DETACH_REUSEPORT_BPF, optlen = 4;
    uint64_t optval = (uintptr_t)zero;
    memcpy(sqe + 4, &fd, 4);
    memcpy(sqe + 8, &cmd_op, 4);
    memcpy(sqe + 16, &level, 4);
    memcpy(sqe + 20, &optname, 4);
    memcpy(sqe + 44, &optlen, 4);
    memcpy(sqe + 48, &optval, 8);
    uint32_t *tail = (uint32_t *)(sq + p.sq_off.tail), mask = *(uint32_t *)(sq + p.sq_off.ring_mask);
    ((uint32_t *)(sq + p.sq_off.array))[*tail & mask] = 0;
    __atomic_store_n(tail, *tail + 1, __ATOMIC_RELEASE);
    if (syscall(__NR_io_uring_enter, ring, 1, 1, IORING_ENTER_GETEVENTS, NULL, 0) < 0) return -errno;
    struct io_uring_cqe *cqe = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    return cqe[*(uint32_t *)(cq + p.cq_off.head) & *(uint32_t *)(cq + p.cq_off.ring_mask)].res;
}

static long attempt(const char *abi) {
    if (strcmp(abi, "uring") == 0) return attempt_uring();
    long ret;
    if (strcmp(abi, "i386") == 0) {
        /* int $0x80 takes the i386 numbers and registers, and clobbers r8-r11. */
        __asm__ volatile("int $0x80"
                         : "=a"(ret)
                         : "a"(366), "b"(3), "c"(SOL_SOCKET), "d"(SO_DETACH_REUSEPORT_BPF), "S"(zero), "D"(4)
                         : "memory", "r8", "r9", "r10", "r11");
        return ret;
    }
    long nr = strcmp(abi, "x32") == 0 ? (0x40000000L | 541) : SYS_setsockopt;
    ret = syscall(nr, 3, SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, zero, 4);
    return ret < 0 ? -errno : ret;
}

int main(int argc, char **argv) {
    char words[256] = "";
    int serve = argc > 1 && strcmp(argv[1], "serve") == 0;
    zero = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_32BIT, -1, 0);
    if (zero == MAP_FAILED) return 2;
    for (int i = 1 + serve; i < argc; i++) {
        pid_t pid = fork();
        if (pid == 0) {
            long ret = attempt(argv[i]);
            _exit(ret == 0 ? 0 : (int)(ret < 0 ? -ret : 255));
        }
        int status;
        if (pid < 0 || waitpid(pid, &status, 0) != pid) return 2;
        char word[32];
        if (WIFSIGNALED(status)) snprintf(word, sizeof word, "signal:%d", WTERMSIG(status));
        else if (WEXITSTATUS(status) == 0) snprintf(word, sizeof word, "0");
        else snprintf(word, sizeof word, "errno:%d", WEXITSTATUS(status));
        strncat(words, word, sizeof words - strlen(words) - 2);
        if (i + 1 < argc) strcat(words, " ");
    }
    printf("%s\n", words);
    fflush(stdout);
    if (!serve) return 0;
    const char *slot = getenv("EBPF_STICKY_WORKER");
    for (;;) {
        int conn = accept(3, NULL, NULL);
        if (conn < 0) continue;
        dprintf(conn, "%s %s\n", slot ? slot : "-", words);
        close(conn);
    }
}

/* memcheck: pseudo-random data in a guest's memory and page cache, checked byte for byte from
 * inside the guest (kvm-tier/tests/linux.rs compiles it statically and copies it into the guest).
 *
 *   memcheck hold SEED MIB DIR   fill MIB MiB of this process's memory from SEED, write DIR/pid,
 *                                then on every SIGUSR1 check all of it and write DIR/result.N
 *                                (N counts the checks): "OK <MIB>" or "BAD at <offset>"
 *   memcheck fill FILE SEED MIB  write MIB MiB from SEED into FILE
 *   memcheck check FILE SEED MIB check FILE holds that data: prints "OK <MIB>" or "BAD at <off>"
 *   memcheck churn MIB FILE      rewrite MIB MiB of this process's memory forever, a pass every
 *                                20 ms, so that every checkpoint has that much memory to write;
 *                                FILE is created once all of it is mapped (page faults run in
 *                                the guest kernel, which a PVM host emulates: seconds per MiB)
 *
 * Integer code only (-mgeneral-regs-only): the data must not pass through vector registers,
 * which a guest on a PVM host does not reliably keep (dormant-kvm's boot.rs, PVM_GLIBC_TUNABLES).
 */
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static uint64_t next(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static void fill(uint64_t *p, size_t words, uint64_t seed) {
    uint64_t s = seed | 1;
    for (size_t i = 0; i < words; i++) p[i] = next(&s);
}

/* Index of the first word that differs, or words. */
static size_t verify(const volatile uint64_t *p, size_t words, uint64_t seed) {
    uint64_t s = seed | 1;
    for (size_t i = 0; i < words; i++)
        if (p[i] != next(&s)) return i;
    return words;
}

static volatile sig_atomic_t wanted;
static void on_usr1(int sig) { (void)sig; wanted++; }

static void put(const char *path, const char *text) {
    char tmp[512];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f) { perror(tmp); exit(1); }
    fputs(text, f);
    fclose(f);
    rename(tmp, path);
}

int main(int argc, char **argv) {
    if (argc == 5 && strcmp(argv[1], "hold") == 0) {
        uint64_t seed = strtoull(argv[2], 0, 10);
        size_t mib = strtoull(argv[3], 0, 10), words = mib << 17;
        uint64_t *p = mmap(0, mib << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) { perror("mmap"); return 1; }
        fill(p, words, seed);
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_usr1;
        sigaction(SIGUSR1, &sa, 0);
        char path[512], text[128];
        snprintf(path, sizeof path, "%s/pid", argv[4]);
        snprintf(text, sizeof text, "%d\n", (int)getpid());
        put(path, text);
        for (int done = 0;;) {
            while (done == wanted) pause();
            done++;
            size_t bad = verify(p, words, seed);
            if (bad == words) snprintf(text, sizeof text, "OK %zu\n", mib);
            else snprintf(text, sizeof text, "BAD at %zu\n", bad * 8);
            snprintf(path, sizeof path, "%s/result.%d", argv[4], done);
            put(path, text);
        }
    }
    if (argc == 5 && (strcmp(argv[1], "fill") == 0 || strcmp(argv[1], "check") == 0)) {
        uint64_t seed = strtoull(argv[3], 0, 10);
        size_t mib = strtoull(argv[4], 0, 10), words = mib << 17;
        uint64_t *p = malloc(mib << 20);
        if (!p) return 1;
        if (argv[1][0] == 'f') {
            fill(p, words, seed);
            int fd = open(argv[2], O_WRONLY | O_CREAT | O_TRUNC, 0644);
            if (fd < 0 || write(fd, p, mib << 20) != (ssize_t)(mib << 20)) { perror(argv[2]); return 1; }
            close(fd);
            return 0;
        }
        int fd = open(argv[2], O_RDONLY);
        size_t got = 0;
        while (fd >= 0 && got < (mib << 20)) {
            ssize_t n = read(fd, (char *)p + got, (mib << 20) - got);
            if (n <= 0) break;
            got += n;
        }
        size_t bad = got == (mib << 20) ? verify(p, words, seed) : 0;
        if (got == (mib << 20) && bad == words) printf("OK %zu\n", mib);
        else printf("BAD at %zu\n", bad * 8);
        return 0;
    }
    if (argc == 4 && strcmp(argv[1], "churn") == 0) {
        size_t mib = strtoull(argv[2], 0, 10), words = mib << 17;
        uint64_t *p = mmap(0, mib << 20, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
        if (p == MAP_FAILED) { perror("mmap"); return 1; }
        fill(p, words, 1);
        put(argv[3], "ready\n");
        for (uint64_t seed = 2;; seed++) {
            usleep(20000);
            fill(p, words, seed);
        }
    }
    fprintf(stderr, "usage: memcheck hold SEED MIB DIR | fill FILE SEED MIB | check FILE SEED MIB"
                    " | churn MIB FILE\n");
    return 2;
}

/*
 * cube-egress guest agent: serves the host over one byte channel (a virtio-serial port in a guest, a unix socket
 * for tests on the host). Compiled by hypervisor/image.py:
 *
 *     gcc -static -O2 -Wall -Wextra -Werror -s agent.c -o cube-agent -ljansson
 *
 * Protocol (docs/runtime.md, "Guest agent and protocol"): every frame is
 *
 *     "CXA" | version (1 byte, 1) | payload length (4 bytes, big endian) | payload
 *     payload = JSON object (UTF-8, no raw newline) "\n" blob0 blob1 ...
 *
 * The header's "blobs" array gives the blob lengths. A request carries "id" and "op"; its reply echoes "id" and has
 * "ok": true and the op's fields, or "ok": false, "error": CODE, "detail": TEXT. A frame that cannot be parsed gets
 * an error reply with "id": null, and the agent resynchronises by scanning for the next "CXA".
 *
 * Robustness rules: every allocation is bounded (frames by CXA_MAX_FRAME, exec output by CXA_MAX_STREAM, files by
 * CXA_MAX_FILE); no shell ever sees argv (fork + execvp); exec reads stdout and stderr with poll so neither pipe
 * can fill up, writes stdin without blocking, and kills the whole process group with SIGKILL at the deadline; the
 * host going away (EOF, POLLHUP, EPIPE) only resets the channel: the agent never exits because of it, because
 * every snapshot restore or clone continues the same guest under a new QEMU process and a new host socket.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <linux/random.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <ctype.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <net/if.h>
#include <net/if_arp.h>

#ifndef CXA_BUILD
#define CXA_BUILD "dev"
#endif

#define CXA_PROTOCOL 1
#define CXA_MAX_FRAME (64u << 20)   /* payload bytes, both directions */
#define CXA_MAX_STREAM (16u << 20)  /* exec stdout and stderr, each; the rest is counted and dropped */
#define CXA_MAX_FILE (48u << 20)    /* read_file */
#define CXA_MAX_ENTROPY 4096        /* reseed */
#define CXA_MAX_BLOBS 4
#define CXA_MAX_ARGV 4096
#define CXA_MAX_TIMEOUT_S (7.0 * 24 * 3600)
#define CXA_DEFAULT_PORT "org.cube-egress.agent.0"
#define CXA_IDLE_WAKE_MS 5000       /* reap orphans this often when idle */
#define CXA_WRITE_STALL_MS 60000    /* a host that reads nothing for this long is treated as gone */

extern char **environ;

static const unsigned char MAGIC[3] = {'C', 'X', 'A'};

enum chan_mode { CHAN_PORT, CHAN_DEVICE, CHAN_LISTEN };

static struct {
    enum chan_mode mode;
    const char *path;      /* --device or --listen */
    const char *port_name; /* --port */
    const char *busybox;   /* --busybox: accepted and unused (net_config no longer runs `ip`; init passes it) */
    int system;            /* --system: allow ops that change the machine (time, entropy, network, power) */
    long frame_timeout_ms; /* a frame that stops arriving for this long is dropped with "truncated" */
} opt = {CHAN_PORT, NULL, CXA_DEFAULT_PORT, NULL, 0, 10000};

static void logmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void logmsg(const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    dprintf(2, "cube-agent: %s\n", line);
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

static const char *errno_code(int err)
{
    const char *name = strerrorname_np(err);
    return name ? name : "EIO";
}

/* -- growable, bounded byte buffer ------------------------------------------------------------------------- */

struct buf {
    unsigned char *p;
    size_t len, cap, max;
    int truncated;
    unsigned long long dropped;
};

static void buf_append(struct buf *b, const void *data, size_t n)
{
    size_t room = b->max - b->len;
    if (n > room) {
        b->truncated = 1;
        b->dropped += n - room;
        n = room;
    }
    if (n == 0)
        return;
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 65536;
        while (cap < b->len + n)
            cap *= 2;
        if (cap > b->max)
            cap = b->max;
        unsigned char *p = realloc(b->p, cap);
        if (!p) { /* out of memory: keep what we have, say so */
            b->truncated = 1;
            b->dropped += n;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, data, n);
    b->len += n;
}

static void buf_free(struct buf *b)
{
    free(b->p);
    memset(b, 0, sizeof *b);
}

/* -- the channel -------------------------------------------------------------------------------------------- */

struct chan {
    int fd;      /* the device or the accepted connection; -1 when none */
    int lfd;     /* listening socket (CHAN_LISTEN) */
    int lost;    /* the host went away since the last chan_wait */
    int waiting; /* logged "waiting" already */
};

static void on_sigio(int sig) { (void)sig; }

/* Finds /dev/vportNpM whose /sys/class/virtio-ports/vportNpM/name is the port name. */
static int find_port(char *out, size_t outlen)
{
    DIR *d = opendir("/sys/class/virtio-ports");
    if (!d)
        return -1;
    struct dirent *e;
    int found = -1;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        char path[PATH_MAX], name[256];
        snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            continue;
        ssize_t n = read(fd, name, sizeof name - 1);
        close(fd);
        if (n <= 0)
            continue;
        name[n] = 0;
        name[strcspn(name, "\n")] = 0;
        if (strcmp(name, opt.port_name) == 0) {
            snprintf(out, outlen, "/dev/%s", e->d_name);
            found = 0;
            break;
        }
    }
    closedir(d);
    return found;
}

static int open_device(struct chan *c)
{
    char path[PATH_MAX];
    if (opt.mode == CHAN_PORT) {
        if (find_port(path, sizeof path) < 0)
            return -1;
    } else {
        snprintf(path, sizeof path, "%s", opt.path);
    }
    int fd = open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
    if (fd < 0)
        return -1;
    /* virtio-console signals SIGIO when the host side connects: the wait below wakes at once instead of
     * sleeping out its backstop interval. */
    if (fcntl(fd, F_SETOWN, getpid()) == 0)
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_ASYNC);
    c->fd = fd;
    logmsg("serving on %s", path);
    return 0;
}

/* Waits up to ms for SIGIO (which stays blocked outside this call, so none is missed). */
static void wait_sigio(long ms)
{
    sigset_t unblocked;
    sigprocmask(SIG_SETMASK, NULL, &unblocked);
    sigdelset(&unblocked, SIGIO);
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    ppoll(NULL, 0, &ts, &unblocked);
}

/* Blocks until a host is connected to the channel. */
static void chan_wait(struct chan *c)
{
    if (opt.mode == CHAN_LISTEN) {
        while (c->fd < 0) {
            int fd = accept4(c->lfd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
            if (fd >= 0)
                c->fd = fd;
            else if (errno != EINTR && errno != ECONNABORTED)
                sleep_ms(100);
        }
        c->lost = 0;
        return;
    }
    while (c->fd < 0) {
        if (open_device(c) == 0)
            break;
        if (!c->waiting) {
            logmsg("waiting for %s", opt.mode == CHAN_PORT ? opt.port_name : opt.path);
            c->waiting = 1;
        }
        sleep_ms(100);
    }
    /* A virtio port without a host reports POLLHUP (and reads return EOF) until the host connects. After a loss
     * wait at least once so that a device whose EOF does not clear cannot make us spin. */
    for (;;) {
        if (c->lost) {
            wait_sigio(200);
            c->lost = 0;
        }
        struct pollfd p = {c->fd, POLLIN, 0};
        if (poll(&p, 1, 0) >= 0 && !(p.revents & (POLLHUP | POLLERR | POLLNVAL)))
            return;
        if (p.revents & POLLNVAL) {
            close(c->fd);
            c->fd = -1;
            chan_wait(c);
            return;
        }
        c->lost = 1;
    }
}

static void chan_lost(struct chan *c)
{
    c->lost = 1;
    if (opt.mode == CHAN_LISTEN && c->fd >= 0) {
        close(c->fd);
        c->fd = -1;
    }
}

/* > 0: bytes read; 0: nothing before timeout_ms (-1: wait forever); -1: the host went away. */
static ssize_t chan_read(struct chan *c, void *dst, size_t n, int timeout_ms)
{
    for (;;) {
        struct pollfd p = {c->fd, POLLIN, 0};
        int r = poll(&p, 1, timeout_ms);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (r == 0)
            return 0;
        /* POLLHUP: data still queued from a host that is gone would be answered to nobody. */
        if (p.revents & (POLLHUP | POLLERR | POLLNVAL))
            return -1;
        ssize_t got = read(c->fd, dst, n);
        if (got > 0)
            return got;
        if (got == 0)
            return -1;
        if (errno != EAGAIN && errno != EINTR)
            return -1;
    }
}

static int chan_write_all(struct chan *c, const void *src, size_t n)
{
    const unsigned char *p = src;
    int64_t last = now_ms();
    while (n > 0) {
        ssize_t w = write(c->fd, p, n > (1u << 20) ? (1u << 20) : n);
        if (w > 0) {
            p += w;
            n -= (size_t)w;
            last = now_ms();
            continue;
        }
        if (w < 0 && errno != EAGAIN && errno != EINTR)
            return -1;
        struct pollfd pf = {c->fd, POLLOUT, 0};
        int r = poll(&pf, 1, 1000);
        if (r > 0 && (pf.revents & (POLLHUP | POLLERR | POLLNVAL)))
            return -1;
        if (now_ms() - last > CXA_WRITE_STALL_MS)
            return -1;
    }
    return 0;
}

/* -- replies ------------------------------------------------------------------------------------------------ */

struct reply {
    json_t *obj;     /* the op's result fields */
    const char *code; /* error code, NULL on success */
    char detail[768];
    struct buf blob[2];
    int nblobs;
    int poweroff; /* after the reply is out */
};

static int fail(struct reply *r, const char *code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(struct reply *r, const char *code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->detail, sizeof r->detail, fmt, ap);
    va_end(ap);
    r->code = code;
    return -1;
}

static int send_frame(struct chan *c, json_t *hdr, struct buf *blobs, int nblobs)
{
    json_t *lens = json_array();
    size_t total = 0;
    for (int i = 0; i < nblobs; i++) {
        json_array_append_new(lens, json_integer((json_int_t)blobs[i].len));
        total += blobs[i].len;
    }
    json_object_set_new(hdr, "blobs", lens);
    char *text = json_dumps(hdr, JSON_COMPACT);
    if (!text)
        return 0; /* cannot happen for the objects we build; dropping the reply beats crashing */
    size_t tlen = strlen(text);
    size_t plen = tlen + 1 + total;
    if (plen > CXA_MAX_FRAME) { /* the limits above keep every reply inside the frame */
        free(text);
        logmsg("reply of %zu bytes exceeds the frame limit; dropped", plen);
        return 0;
    }
    unsigned char *head = malloc(8 + tlen + 1);
    if (!head) {
        free(text);
        return 0;
    }
    memcpy(head, MAGIC, 3);
    head[3] = CXA_PROTOCOL;
    uint32_t be = htonl((uint32_t)plen);
    memcpy(head + 4, &be, 4);
    memcpy(head + 8, text, tlen);
    head[8 + tlen] = '\n';
    free(text);
    int rc = chan_write_all(c, head, 8 + tlen + 1);
    free(head);
    for (int i = 0; rc == 0 && i < nblobs; i++)
        rc = chan_write_all(c, blobs[i].p, blobs[i].len);
    return rc;
}

static int send_error(struct chan *c, const json_t *id, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int send_error(struct chan *c, const json_t *id, const char *code, const char *fmt, ...)
{
    char detail[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(detail, sizeof detail, fmt, ap);
    va_end(ap);
    json_t *h = json_object();
    json_object_set_new(h, "id", id ? json_deep_copy(id) : json_null());
    json_object_set_new(h, "ok", json_false());
    json_object_set_new(h, "error", json_string(code));
    /* detail may quote bytes from the request: keep it valid UTF-8 for the JSON encoder */
    json_t *d = json_string(detail);
    json_object_set_new(h, "detail", d ? d : json_string("(detail not valid UTF-8)"));
    int rc = send_frame(c, h, NULL, 0);
    json_decref(h);
    return rc;
}

/* -- request field access ----------------------------------------------------------------------------------- */

struct req {
    json_t *h;
    const char *op;
    const unsigned char *blob[CXA_MAX_BLOBS];
    size_t bloblen[CXA_MAX_BLOBS];
    size_t nblobs;
};

/* A string field without NUL bytes (jansson rejects \u0000 unless asked, this re-checks). NULL if absent. */
static int get_str(struct reply *r, const struct req *q, const char *key, int required, const char **out)
{
    json_t *v = json_object_get(q->h, key);
    *out = NULL;
    if (!v || json_is_null(v)) {
        if (required)
            return fail(r, "bad_request", "%s: missing field %s", q->op, key);
        return 0;
    }
    if (!json_is_string(v) || strlen(json_string_value(v)) != json_string_length(v))
        return fail(r, "bad_request", "%s: %s must be a string without NUL bytes", q->op, key);
    *out = json_string_value(v);
    return 0;
}

static int get_path(struct reply *r, const struct req *q, const char *key, const char **out)
{
    if (get_str(r, q, key, 1, out) < 0)
        return -1;
    if ((*out)[0] != '/' || strlen(*out) >= PATH_MAX)
        return fail(r, "bad_request", "%s: %s must be an absolute path shorter than %d bytes", q->op, key, PATH_MAX);
    return 0;
}

static const unsigned char *get_blob(const struct req *q, size_t i, size_t *len)
{
    *len = i < q->nblobs ? q->bloblen[i] : 0;
    return i < q->nblobs ? q->blob[i] : (const unsigned char *)"";
}

static int need_system(struct reply *r, const struct req *q)
{
    if (!opt.system)
        return fail(r, "disabled", "%s changes the machine and is enabled only with --system (the guest's init)",
                    q->op);
    return 0;
}

/* -- running a process -------------------------------------------------------------------------------------- */

struct proc_result {
    int exited, status, timed_out;
    struct buf out, err;
};

static void set_nonblock(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

static void reap_orphans(void)
{
    /* We are a child subreaper: orphaned descendants of exec'd commands end up here. */
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

static void pump(int *fd, struct buf *b)
{
    unsigned char chunk[65536];
    for (;;) {
        ssize_t n = read(*fd, chunk, sizeof chunk);
        if (n > 0) {
            buf_append(b, chunk, (size_t)n);
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return;
        close(*fd); /* EOF or error: this stream is done */
        *fd = -1;
        return;
    }
}

/*
 * Runs argv (PATH search like execvp, never a shell) in a new session, feeding stdin and collecting stdout and
 * stderr until the process has exited and both pipes are closed, or until timeout_ms, when the whole process
 * group is killed with SIGKILL. Returns 0, or -1 with r->code set when the process could not be started.
 */
static int run_process(struct reply *r, const char *op, char *const argv[], char *const envp[], const char *cwd,
                       const unsigned char *in, size_t inlen, int64_t timeout_ms, struct proc_result *res)
{
    int pin[2] = {-1, -1}, pout[2] = {-1, -1}, perr[2] = {-1, -1}, pex[2] = {-1, -1};
    memset(res, 0, sizeof *res);
    res->out.max = CXA_MAX_STREAM;
    res->err.max = CXA_MAX_STREAM;
    if (pipe2(pin, O_CLOEXEC) < 0 || pipe2(pout, O_CLOEXEC) < 0 || pipe2(perr, O_CLOEXEC) < 0 ||
        pipe2(pex, O_CLOEXEC) < 0) {
        int e = errno;
        int *all[] = {pin, pout, perr, pex};
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 2; j++)
                if (all[i][j] >= 0)
                    close(all[i][j]);
        return fail(r, errno_code(e), "%s: pipe: %s", op, strerror(e));
    }
    pid_t pid = fork();
    if (pid == 0) {
        sigset_t none;
        sigemptyset(&none);
        signal(SIGPIPE, SIG_DFL);
        signal(SIGIO, SIG_DFL);
        sigprocmask(SIG_SETMASK, &none, NULL);
        setsid();
        dup2(pin[0], 0);
        dup2(pout[1], 1);
        dup2(perr[1], 2);
        /* Every other descriptor we hold is O_CLOEXEC; pex reports a failure before exec and closes on success. */
        int stage = 0, e = 0;
        if (cwd && chdir(cwd) < 0) {
            stage = 1;
            e = errno;
        } else {
            environ = (char **)envp;
            execvp(argv[0], argv);
            stage = 2;
            e = errno;
        }
        int msg[2] = {stage, e};
        ssize_t ignored = write(pex[1], msg, sizeof msg);
        (void)ignored;
        _exit(127);
    }
    int fork_errno = errno;
    close(pin[0]);
    close(pout[1]);
    close(perr[1]);
    close(pex[1]);
    if (pid < 0) {
        close(pin[1]);
        close(pout[0]);
        close(perr[0]);
        close(pex[0]);
        return fail(r, errno_code(fork_errno), "%s: fork: %s", op, strerror(fork_errno));
    }
    int msg[2];
    ssize_t n;
    do {
        n = read(pex[0], msg, sizeof msg);
    } while (n < 0 && errno == EINTR);
    close(pex[0]);
    if (n == (ssize_t)sizeof msg) {
        waitpid(pid, NULL, 0);
        close(pin[1]);
        close(pout[0]);
        close(perr[0]);
        if (msg[0] == 1)
            return fail(r, errno_code(msg[1]), "%s: cannot change to directory %s: %s", op, cwd, strerror(msg[1]));
        return fail(r, errno_code(msg[1]), "%s: cannot execute %s: %s", op, argv[0], strerror(msg[1]));
    }

    int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    int fin = pin[1], fout = pout[0], ferr = perr[0];
    set_nonblock(fin);
    set_nonblock(fout);
    set_nonblock(ferr);
    size_t inpos = 0;
    if (inlen == 0) {
        close(fin);
        fin = -1;
    }
    int64_t deadline = now_ms() + timeout_ms;
    while (fout >= 0 || ferr >= 0 || !res->exited) {
        if (res->exited && fin >= 0) { /* nobody will read the rest */
            close(fin);
            fin = -1;
        }
        struct pollfd p[4];
        int np = 0, iin = -1, iout = -1, ierr = -1, ipid = -1;
        if (fin >= 0) {
            p[np] = (struct pollfd){fin, POLLOUT, 0};
            iin = np++;
        }
        if (fout >= 0) {
            p[np] = (struct pollfd){fout, POLLIN, 0};
            iout = np++;
        }
        if (ferr >= 0) {
            p[np] = (struct pollfd){ferr, POLLIN, 0};
            ierr = np++;
        }
        if (!res->exited && pidfd >= 0) {
            p[np] = (struct pollfd){pidfd, POLLIN, 0};
            ipid = np++;
        }
        int64_t left = deadline - now_ms();
        if (left <= 0) {
            res->timed_out = 1;
            break;
        }
        /* without a pidfd (kernel < 5.3) look at the child now and then */
        int wait = (int)(left > 86400000 ? 86400000 : left);
        if (pidfd < 0 && !res->exited && wait > 50)
            wait = 50;
        int rc = poll(p, (nfds_t)np, wait);
        if (rc < 0 && errno != EINTR)
            break;
        if (iin >= 0 && p[iin].revents) {
            ssize_t w = write(fin, in + inpos, inlen - inpos > 65536 ? 65536 : inlen - inpos);
            if (w > 0)
                inpos += (size_t)w;
            if ((w < 0 && errno != EAGAIN && errno != EINTR) || inpos == inlen) {
                close(fin); /* done, or EPIPE: the process closed its stdin */
                fin = -1;
            }
        }
        if (iout >= 0 && p[iout].revents)
            pump(&fout, &res->out);
        if (ierr >= 0 && p[ierr].revents)
            pump(&ferr, &res->err);
        if (!res->exited && (pidfd < 0 || (ipid >= 0 && p[ipid].revents))) {
            if (waitpid(pid, &res->status, WNOHANG) == pid)
                res->exited = 1;
        }
    }
    if (res->timed_out) {
        kill(-pid, SIGKILL);
        kill(pid, SIGKILL); /* in case setsid failed */
    }
    if (!res->exited && waitpid(pid, &res->status, 0) == pid)
        res->exited = 1;
    /* After a kill, take what is left in the pipes; a descendant that left the process group and keeps them
     * open does not hold the reply for more than a second. */
    int64_t grace = now_ms() + 1000;
    while ((fout >= 0 || ferr >= 0) && now_ms() < grace) {
        struct pollfd p[2];
        int np = 0;
        if (fout >= 0)
            p[np++] = (struct pollfd){fout, POLLIN, 0};
        if (ferr >= 0)
            p[np++] = (struct pollfd){ferr, POLLIN, 0};
        if (poll(p, (nfds_t)np, 100) < 0 && errno != EINTR)
            break;
        if (fout >= 0)
            pump(&fout, &res->out);
        if (ferr >= 0)
            pump(&ferr, &res->err);
    }
    if (fin >= 0)
        close(fin);
    if (fout >= 0)
        close(fout);
    if (ferr >= 0)
        close(ferr);
    if (pidfd >= 0)
        close(pidfd);
    reap_orphans();
    return 0;
}

/* -- ops ---------------------------------------------------------------------------------------------------- */

static const char *OPS[] = {"hello", "exec", "read_file", "write_file", "set_time", "reseed", "net_config",
                            "shutdown"};

static int op_hello(struct reply *r, const struct req *q)
{
    (void)q;
    char boot_id[64] = "";
    int fd = open("/proc/sys/kernel/random/boot_id", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        ssize_t n = read(fd, boot_id, sizeof boot_id - 1);
        close(fd);
        boot_id[n > 0 ? n : 0] = 0;
        boot_id[strcspn(boot_id, "\n")] = 0;
    }
    struct timespec up;
    clock_gettime(CLOCK_BOOTTIME, &up);
    struct utsname u;
    if (uname(&u) < 0)
        snprintf(u.release, sizeof u.release, "unknown");
    json_t *ops = json_array();
    for (size_t i = 0; i < sizeof OPS / sizeof OPS[0]; i++)
        json_array_append_new(ops, json_string(OPS[i]));
    r->obj = json_pack("{s:i, s:s, s:s, s:f, s:s, s:I, s:b, s:I, s:o}", "protocol", CXA_PROTOCOL, "agent",
                       "cube-egress-agent/" CXA_BUILD, "boot_id", boot_id,
                       "uptime_s", (double)up.tv_sec + up.tv_nsec / 1e9, "kernel", u.release, "pid",
                       (json_int_t)getpid(), "system", opt.system, "max_frame", (json_int_t)CXA_MAX_FRAME, "ops", ops);
    return 0;
}

static int env_key_ok(const char *k) { return k[0] && !strchr(k, '='); }

static int op_exec(struct reply *r, const struct req *q)
{
    json_t *jargv = json_object_get(q->h, "argv");
    if (!json_is_array(jargv) || json_array_size(jargv) == 0 || json_array_size(jargv) > CXA_MAX_ARGV)
        return fail(r, "bad_request", "exec: argv must be a non-empty list of at most %d strings", CXA_MAX_ARGV);
    json_t *jenv = json_object_get(q->h, "env");
    if (jenv && !json_is_null(jenv) && (!json_is_object(jenv) || json_object_size(jenv) > CXA_MAX_ARGV))
        return fail(r, "bad_request", "exec: env must be an object of at most %d strings", CXA_MAX_ARGV);
    const char *cwd;
    if (get_str(r, q, "cwd", 0, &cwd) < 0)
        return -1;
    double timeout_s = 30;
    json_t *jt = json_object_get(q->h, "timeout_s");
    if (jt && !json_is_null(jt)) {
        if (!json_is_number(jt) || json_number_value(jt) <= 0 || json_number_value(jt) > CXA_MAX_TIMEOUT_S)
            return fail(r, "bad_request", "exec: timeout_s must be a number in (0, %.0f]", CXA_MAX_TIMEOUT_S);
        timeout_s = json_number_value(jt);
    }

    size_t argc = json_array_size(jargv);
    char **argv = calloc(argc + 1, sizeof *argv);
    size_t nenv = 0;
    while (environ[nenv])
        nenv++;
    size_t extra = jenv && json_is_object(jenv) ? json_object_size(jenv) : 0;
    char **envp = calloc(nenv + extra + 1, sizeof *envp);
    char **owned = calloc(extra + 1, sizeof *owned);
    int rc = -1;
    if (!argv || !envp || !owned) {
        fail(r, "ENOMEM", "exec: out of memory");
        goto out;
    }
    for (size_t i = 0; i < argc; i++) {
        json_t *a = json_array_get(jargv, i);
        if (!json_is_string(a) || strlen(json_string_value(a)) != json_string_length(a)) {
            fail(r, "bad_request", "exec: argv[%zu] must be a string without NUL bytes", i);
            goto out;
        }
        argv[i] = (char *)json_string_value(a);
    }
    /* the child's environment: ours, with the request's entries added or replacing */
    size_t ne = 0, no = 0;
    for (size_t i = 0; i < nenv; i++) {
        const char *eq = strchr(environ[i], '=');
        size_t klen = eq ? (size_t)(eq - environ[i]) : strlen(environ[i]);
        int overridden = 0;
        const char *k;
        json_t *v;
        if (extra) {
            json_object_foreach(jenv, k, v) {
                if (strlen(k) == klen && strncmp(k, environ[i], klen) == 0)
                    overridden = 1;
            }
        }
        if (!overridden)
            envp[ne++] = environ[i];
    }
    if (extra) {
        const char *k;
        json_t *v;
        json_object_foreach(jenv, k, v) {
            if (!env_key_ok(k) || !json_is_string(v) ||
                strlen(json_string_value(v)) != json_string_length(v)) {
                fail(r, "bad_request", "exec: env entries must be NAME (no '=') to a string without NUL bytes");
                goto out;
            }
            if (asprintf(&owned[no], "%s=%s", k, json_string_value(v)) < 0) {
                owned[no] = NULL;
                fail(r, "ENOMEM", "exec: out of memory");
                goto out;
            }
            envp[ne++] = owned[no++];
        }
    }
    size_t inlen;
    const unsigned char *in = get_blob(q, 0, &inlen);
    struct proc_result res;
    if (run_process(r, "exec", argv, envp, cwd, in, inlen, (int64_t)(timeout_s * 1000), &res) < 0)
        goto out;
    r->obj = json_object();
    json_object_set_new(r->obj, "exit_code",
                        res.exited && WIFEXITED(res.status) ? json_integer(WEXITSTATUS(res.status)) : json_null());
    json_object_set_new(r->obj, "signal",
                        res.exited && WIFSIGNALED(res.status) ? json_integer(WTERMSIG(res.status)) : json_null());
    json_object_set_new(r->obj, "timed_out", json_boolean(res.timed_out));
    json_object_set_new(r->obj, "stdout_truncated", json_boolean(res.out.truncated));
    json_object_set_new(r->obj, "stderr_truncated", json_boolean(res.err.truncated));
    r->blob[0] = res.out;
    r->blob[1] = res.err;
    r->nblobs = 2;
    rc = 0;
out:
    if (owned)
        for (size_t i = 0; owned[i]; i++)
            free(owned[i]);
    free(owned);
    free(argv);
    free(envp);
    return rc;
}

static int op_read_file(struct reply *r, const struct req *q)
{
    const char *path;
    if (get_path(r, q, "path", &path) < 0)
        return -1;
    /* O_NONBLOCK: opening a FIFO must not hang the agent; only regular files are read */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd < 0)
        return fail(r, errno_code(errno), "read_file: %s: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int e = errno;
        close(fd);
        return fail(r, errno_code(e), "read_file: %s: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return fail(r, errno_code(S_ISDIR(st.st_mode) ? EISDIR : EINVAL), "read_file: %s: not a regular file",
                    path);
    }
    struct buf b = {.max = CXA_MAX_FILE};
    unsigned char chunk[65536];
    for (;;) {
        ssize_t n = read(fd, chunk, sizeof chunk);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            int e = errno;
            close(fd);
            buf_free(&b);
            return fail(r, errno_code(e), "read_file: %s: %s", path, strerror(e));
        }
        if (n == 0)
            break;
        buf_append(&b, chunk, (size_t)n);
        if (b.truncated) {
            close(fd);
            buf_free(&b);
            return fail(r, "EFBIG", "read_file: %s is larger than %u bytes", path, CXA_MAX_FILE);
        }
    }
    close(fd);
    r->obj = json_pack("{s:i, s:I}", "mode", (int)(st.st_mode & 07777), "size", (json_int_t)b.len);
    r->blob[0] = b;
    r->nblobs = 1;
    return 0;
}

/* Writes data to path atomically: a temporary file in the same directory, fsync, rename over path. */
static int write_atomic(struct reply *r, const char *op, const char *path, const unsigned char *data, size_t len,
                        mode_t mode)
{
    char tmp[PATH_MAX + 32];
    const char *slash = strrchr(path, '/');
    if (!slash[1])
        return fail(r, "bad_request", "%s: %s names a directory", op, path);
    snprintf(tmp, sizeof tmp, "%.*s.%s.cxa-XXXXXX", (int)(slash - path + 1), path, slash + 1);
    int fd = mkostemp(tmp, O_CLOEXEC);
    if (fd < 0)
        return fail(r, errno_code(errno), "%s: %s: %s", op, path, strerror(errno));
    int e = 0;
    if (fchmod(fd, mode) < 0)
        e = errno;
    size_t off = 0;
    while (!e && off < len) {
        ssize_t w = write(fd, data + off, len - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            e = errno;
        else
            off += (size_t)w;
    }
    if (!e && fsync(fd) < 0 && errno != EINVAL)
        e = errno;
    if (close(fd) < 0 && !e)
        e = errno;
    if (!e && rename(tmp, path) < 0)
        e = errno;
    if (e) {
        unlink(tmp);
        return fail(r, errno_code(e), "%s: %s: %s", op, path, strerror(e));
    }
    return 0;
}

static int op_write_file(struct reply *r, const struct req *q)
{
    const char *path;
    if (get_path(r, q, "path", &path) < 0)
        return -1;
    json_int_t mode = 0644;
    json_t *jm = json_object_get(q->h, "mode");
    if (jm && !json_is_null(jm)) {
        if (!json_is_integer(jm) || json_integer_value(jm) < 0 || json_integer_value(jm) > 07777)
            return fail(r, "bad_request", "write_file: mode must be an integer in [0, 0o7777]");
        mode = json_integer_value(jm);
    }
    size_t len;
    const unsigned char *data = get_blob(q, 0, &len);
    if (write_atomic(r, "write_file", path, data, len, (mode_t)mode) < 0)
        return -1;
    r->obj = json_pack("{s:I}", "size", (json_int_t)len);
    return 0;
}

static int op_set_time(struct reply *r, const struct req *q)
{
    if (need_system(r, q) < 0)
        return -1;
    json_t *jt = json_object_get(q->h, "epoch_ns");
    if (!json_is_integer(jt) || json_integer_value(jt) < 0)
        return fail(r, "bad_request", "set_time: epoch_ns must be a non-negative integer");
    json_int_t ns = json_integer_value(jt);
    struct timespec ts = {(time_t)(ns / 1000000000), (long)(ns % 1000000000)};
    if (clock_settime(CLOCK_REALTIME, &ts) < 0)
        return fail(r, errno_code(errno), "set_time: clock_settime: %s", strerror(errno));
    r->obj = json_object();
    return 0;
}

static int op_reseed(struct reply *r, const struct req *q)
{
    if (need_system(r, q) < 0)
        return -1;
    size_t len;
    const unsigned char *data = get_blob(q, 0, &len);
    if (len == 0 || len > CXA_MAX_ENTROPY)
        return fail(r, "bad_request", "reseed: send 1 to %d bytes of entropy", CXA_MAX_ENTROPY);
    /* Writing mixes the bytes in without crediting them; RNDADDENTROPY credits them; RNDRESEEDCRNG makes the
     * CRNG take them now. A clone shares its template's CRNG state until this happens. */
    int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return fail(r, errno_code(errno), "reseed: /dev/urandom: %s", strerror(errno));
    size_t off = 0;
    while (off < len) {
        ssize_t w = write(fd, data + off, len - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0) {
            int e = errno;
            close(fd);
            return fail(r, errno_code(e), "reseed: write /dev/urandom: %s", strerror(e));
        }
        off += (size_t)w;
    }
    struct rand_pool_info *info = malloc(sizeof *info + len);
    if (!info) {
        close(fd);
        return fail(r, "ENOMEM", "reseed: out of memory");
    }
    info->entropy_count = (int)(len * 8);
    info->buf_size = (int)len;
    memcpy(info->buf, data, len);
    int rc = ioctl(fd, RNDADDENTROPY, info);
    int e = errno;
    free(info);
    if (rc < 0) {
        close(fd);
        return fail(r, errno_code(e), "reseed: RNDADDENTROPY: %s", strerror(e));
    }
    int reseeded = ioctl(fd, RNDRESEEDCRNG) == 0;
    e = errno;
    close(fd);
    if (!reseeded)
        return fail(r, errno_code(e), "reseed: RNDRESEEDCRNG: %s", strerror(e));
    r->obj = json_pack("{s:I, s:I, s:b}", "bytes", (json_int_t)len, "credited_bits", (json_int_t)len * 8,
                       "reseeded", 1);
    return 0;
}

/* -- net_config, in-process ------------------------------------------------------------------------------------
 *
 * The same steps busybox `ip` took (link down, MAC, flush the IPv4 addresses, add ADDRESS/PREFIX, link up, replace
 * the default route), without a fork: under TCG each fork + exec of busybox costs tens of milliseconds, and every
 * networked restore or clone runs this. Link flags and the MAC go through ioctls on an AF_INET socket; addresses
 * and the route through one rtnetlink socket, because the ioctls cannot remove every address (SIOCSIFADDR only
 * replaces the primary one, leaving secondaries) nor say "replace the default route" in one step.
 * Link down also drops the routes and the neighbour cache (ARP entries of the template's gateway), so the clone
 * starts clean, and the MAC changes while it is down (not every driver takes a live change). */

#define CXA_NL_TIMEOUT_S 5 /* a kernel that does not answer a netlink request in this long is treated as broken */
#define CXA_NL_BUF 32768
#define CXA_MAX_ADDRS 64   /* addresses removed per flush round */

struct nl {
    int fd;
    uint32_t seq;
    char err[256]; /* the kernel's extended ack message of the last failure, if any */
};

struct nl_req {
    struct nlmsghdr h;
    union {
        struct ifaddrmsg ifa;
        struct rtmsg rt;
    } u;
    char attrs[128];
};

/* Appends one attribute; the callers add at most two IPv4-sized ones, far inside attrs[]. */
static void nl_attr(struct nl_req *m, unsigned short type, const void *data, size_t len)
{
    struct rtattr *a = (struct rtattr *)((char *)m + NLMSG_ALIGN(m->h.nlmsg_len));
    a->rta_type = type;
    a->rta_len = (unsigned short)RTA_LENGTH(len);
    memcpy(RTA_DATA(a), data, len);
    m->h.nlmsg_len = NLMSG_ALIGN(m->h.nlmsg_len) + RTA_ALIGN(a->rta_len);
}

static int nl_open(struct nl *n)
{
    n->seq = (uint32_t)now_ms();
    n->err[0] = 0;
    n->fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
    if (n->fd < 0)
        return -errno;
    struct timeval tv = {CXA_NL_TIMEOUT_S, 0};
    int one = 1;
    struct sockaddr_nl sa = {.nl_family = AF_NETLINK};
    if (setsockopt(n->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) < 0 ||
        bind(n->fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        int e = errno;
        close(n->fd);
        return -e;
    }
    /* best effort: the kernel then says why it refused (e.g. "Nexthop has invalid gateway") */
    setsockopt(n->fd, SOL_NETLINK, NETLINK_EXT_ACK, &one, sizeof one);
    return 0;
}

/* Keeps the kernel's extended ack message of an error reply, if it sent one. */
static void nl_ext_ack(struct nl *n, const struct nlmsghdr *h)
{
    const struct nlmsgerr *e = NLMSG_DATA(h);
    if (!(h->nlmsg_flags & NLM_F_ACK_TLVS))
        return;
    size_t off = NLMSG_HDRLEN + sizeof *e;
    if (!(h->nlmsg_flags & NLM_F_CAPPED))
        off += e->msg.nlmsg_len - NLMSG_HDRLEN; /* the request came back whole */
    if (off >= h->nlmsg_len)
        return;
    int len = (int)(h->nlmsg_len - off);
    for (const struct rtattr *a = (const struct rtattr *)((const char *)h + off); RTA_OK(a, len);
         a = RTA_NEXT(a, len))
        if (a->rta_type == NLMSGERR_ATTR_MSG && RTA_PAYLOAD(a) > 0)
            snprintf(n->err, sizeof n->err, "%.*s", (int)strnlen(RTA_DATA(a), RTA_PAYLOAD(a)),
                     (const char *)RTA_DATA(a));
}

/* Sends one request. With cb (a dump) every message of the answer goes to cb until NLMSG_DONE; without, the
 * request asks for an ack. Returns 0, or -errno (the kernel's, or our socket's). */
static int nl_talk(struct nl *n, struct nl_req *m, void (*cb)(const struct nlmsghdr *, void *), void *ctx)
{
    m->h.nlmsg_flags |= NLM_F_REQUEST | (cb ? NLM_F_DUMP : NLM_F_ACK);
    m->h.nlmsg_seq = ++n->seq;
    n->err[0] = 0;
    struct sockaddr_nl kernel = {.nl_family = AF_NETLINK};
    if (sendto(n->fd, m, m->h.nlmsg_len, 0, (struct sockaddr *)&kernel, sizeof kernel) < 0)
        return -errno;
    static char buf[CXA_NL_BUF] __attribute__((aligned(NLMSG_ALIGNTO)));
    for (;;) {
        ssize_t got = recv(n->fd, buf, sizeof buf, MSG_TRUNC); /* MSG_TRUNC: the real size, to notice a cut */
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0)
            return -errno;
        if ((size_t)got > sizeof buf)
            return -EMSGSIZE;
        int len = (int)got;
        for (const struct nlmsghdr *h = (const struct nlmsghdr *)buf; NLMSG_OK(h, len); h = NLMSG_NEXT(h, len)) {
            if (h->nlmsg_seq != n->seq)
                continue; /* a late answer to an earlier request */
            if (h->nlmsg_type == NLMSG_DONE)
                return 0;
            if (h->nlmsg_type == NLMSG_ERROR) {
                if (h->nlmsg_len < NLMSG_LENGTH(sizeof(struct nlmsgerr)))
                    return -EPROTO;
                const struct nlmsgerr *e = NLMSG_DATA(h);
                if (e->error)
                    nl_ext_ack(n, h);
                return e->error; /* 0 is the ack */
            }
            if (cb)
                cb(h, ctx);
        }
    }
}

struct addr_list {
    int ifindex;
    size_t n;
    struct {
        unsigned char prefixlen;
        struct in_addr local, address;
        int has_local, has_address;
    } a[CXA_MAX_ADDRS];
};

static void collect_addr(const struct nlmsghdr *h, void *ctx)
{
    struct addr_list *l = ctx;
    if (h->nlmsg_type != RTM_NEWADDR || h->nlmsg_len < NLMSG_LENGTH(sizeof(struct ifaddrmsg)))
        return;
    const struct ifaddrmsg *ifa = NLMSG_DATA(h);
    if (ifa->ifa_family != AF_INET || (int)ifa->ifa_index != l->ifindex || l->n == CXA_MAX_ADDRS)
        return;
    memset(&l->a[l->n], 0, sizeof l->a[l->n]);
    l->a[l->n].prefixlen = ifa->ifa_prefixlen;
    int len = (int)IFA_PAYLOAD(h);
    for (const struct rtattr *a = IFA_RTA(ifa); RTA_OK(a, len); a = RTA_NEXT(a, len)) {
        if (RTA_PAYLOAD(a) != sizeof(struct in_addr))
            continue;
        if (a->rta_type == IFA_LOCAL)
            memcpy(&l->a[l->n].local, RTA_DATA(a), sizeof(struct in_addr)), l->a[l->n].has_local = 1;
        else if (a->rta_type == IFA_ADDRESS)
            memcpy(&l->a[l->n].address, RTA_DATA(a), sizeof(struct in_addr)), l->a[l->n].has_address = 1;
    }
    l->n++;
}

static void addr_req(struct nl_req *m, unsigned short type, unsigned short flags, int ifindex, unsigned char plen)
{
    memset(m, 0, sizeof *m);
    m->h.nlmsg_len = NLMSG_LENGTH(sizeof(struct ifaddrmsg));
    m->h.nlmsg_type = type;
    m->h.nlmsg_flags = flags;
    m->u.ifa.ifa_family = AF_INET;
    m->u.ifa.ifa_prefixlen = plen;
    m->u.ifa.ifa_scope = RT_SCOPE_UNIVERSE; /* `ip addr add`'s default, but for 127/8 (below) */
    m->u.ifa.ifa_index = (unsigned)ifindex;
}

/* Removes every IPv4 address of the interface, like `ip addr flush`: removing a primary address can take its
 * secondaries with it (EADDRNOTAVAIL for those next), so it lists again until the list comes back empty. */
static int flush_ipv4(struct reply *r, struct nl *n, const char *ifname, int ifindex)
{
    struct addr_list l;
    for (int round = 0; round < 8; round++) {
        struct nl_req m;
        addr_req(&m, RTM_GETADDR, 0, 0, 0);
        memset(&l, 0, sizeof l);
        l.ifindex = ifindex;
        int rc = nl_talk(n, &m, collect_addr, &l);
        if (rc < 0)
            return fail(r, errno_code(-rc), "net_config: %s: listing addresses: %s", ifname, strerror(-rc));
        if (l.n == 0)
            return 0;
        for (size_t i = 0; i < l.n; i++) {
            addr_req(&m, RTM_DELADDR, 0, ifindex, l.a[i].prefixlen);
            if (l.a[i].has_local)
                nl_attr(&m, IFA_LOCAL, &l.a[i].local, sizeof(struct in_addr));
            if (l.a[i].has_address)
                nl_attr(&m, IFA_ADDRESS, &l.a[i].address, sizeof(struct in_addr));
            rc = nl_talk(n, &m, NULL, NULL);
            if (rc < 0 && rc != -EADDRNOTAVAIL) {
                char a[INET_ADDRSTRLEN];
                inet_ntop(AF_INET, l.a[i].has_local ? &l.a[i].local : &l.a[i].address, a, sizeof a);
                return fail(r, errno_code(-rc), "net_config: %s: removing %s/%u: %s%s%s", ifname, a,
                            l.a[i].prefixlen, strerror(-rc), n->err[0] ? ": " : "", n->err);
            }
        }
    }
    return fail(r, "EBUSY", "net_config: %s: IPv4 addresses keep coming back after 8 flushes", ifname);
}

static int set_link_up(struct reply *r, int fd, struct ifreq *ifr, int up)
{
    if (ioctl(fd, SIOCGIFFLAGS, ifr) < 0)
        return fail(r, errno_code(errno), "net_config: %s: SIOCGIFFLAGS: %s", ifr->ifr_name, strerror(errno));
    if (up)
        ifr->ifr_flags = (short)(ifr->ifr_flags | IFF_UP);
    else
        ifr->ifr_flags = (short)(ifr->ifr_flags & ~IFF_UP);
    if (ioctl(fd, SIOCSIFFLAGS, ifr) < 0)
        return fail(r, errno_code(errno), "net_config: %s: setting the link %s: %s", ifr->ifr_name,
                    up ? "up" : "down", strerror(errno));
    return 0;
}

struct net_request {
    const char *ifname, *address, *gateway;
    int has_mac, has_gateway, has_dns;
    unsigned char mac[6];
    struct in_addr addr, gw;
    unsigned char prefix;
    char resolv[1024];
};

static int apply_net_config(struct reply *r, const struct net_request *w)
{
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return fail(r, errno_code(errno), "net_config: socket: %s", strerror(errno));
    struct nl n = {.fd = -1};
    struct ifreq ifr;
    int rc = -1;
    memset(&ifr, 0, sizeof ifr);
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", w->ifname);
    if (ioctl(fd, SIOCGIFINDEX, &ifr) < 0) {
        fail(r, errno_code(errno), "net_config: %s: %s", w->ifname,
             errno == ENODEV ? "no such interface" : strerror(errno));
        goto out;
    }
    int ifindex = ifr.ifr_ifindex;
    int e = nl_open(&n);
    if (e < 0) {
        fail(r, errno_code(-e), "net_config: rtnetlink socket: %s", strerror(-e));
        goto out;
    }
    if (set_link_up(r, fd, &ifr, 0) < 0)
        goto out;
    if (w->has_mac) {
        ifr.ifr_hwaddr.sa_family = ARPHRD_ETHER;
        memcpy(ifr.ifr_hwaddr.sa_data, w->mac, 6);
        if (ioctl(fd, SIOCSIFHWADDR, &ifr) < 0) {
            fail(r, errno_code(errno), "net_config: %s: setting the MAC: %s", w->ifname, strerror(errno));
            goto out;
        }
    }
    if (flush_ipv4(r, &n, w->ifname, ifindex) < 0)
        goto out;
    struct nl_req m;
    addr_req(&m, RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, ifindex, w->prefix);
    if ((ntohl(w->addr.s_addr) >> 24) == 127)
        m.u.ifa.ifa_scope = RT_SCOPE_HOST;
    nl_attr(&m, IFA_LOCAL, &w->addr, sizeof w->addr);
    nl_attr(&m, IFA_ADDRESS, &w->addr, sizeof w->addr);
    if ((e = nl_talk(&n, &m, NULL, NULL)) < 0) {
        fail(r, errno_code(-e), "net_config: %s: adding %s: %s%s%s", w->ifname, w->address, strerror(-e),
             n.err[0] ? ": " : "", n.err);
        goto out;
    }
    if (set_link_up(r, fd, &ifr, 1) < 0)
        goto out;
    if (w->has_gateway) {
        /* `ip route replace default via GW dev IF`: table main, proto boot, scope universe, unicast */
        memset(&m, 0, sizeof m);
        m.h.nlmsg_len = NLMSG_LENGTH(sizeof(struct rtmsg));
        m.h.nlmsg_type = RTM_NEWROUTE;
        m.h.nlmsg_flags = NLM_F_CREATE | NLM_F_REPLACE;
        m.u.rt.rtm_family = AF_INET;
        m.u.rt.rtm_table = RT_TABLE_MAIN;
        m.u.rt.rtm_protocol = RTPROT_BOOT;
        m.u.rt.rtm_scope = RT_SCOPE_UNIVERSE;
        m.u.rt.rtm_type = RTN_UNICAST;
        uint32_t oif = (uint32_t)ifindex;
        nl_attr(&m, RTA_GATEWAY, &w->gw, sizeof w->gw);
        nl_attr(&m, RTA_OIF, &oif, sizeof oif);
        if ((e = nl_talk(&n, &m, NULL, NULL)) < 0) {
            fail(r, errno_code(-e), "net_config: %s: default route via %s: %s%s%s", w->ifname, w->gateway,
                 strerror(-e), n.err[0] ? ": " : "", n.err);
            goto out;
        }
    }
    if (w->has_dns &&
        write_atomic(r, "net_config", "/etc/resolv.conf", (const unsigned char *)w->resolv, strlen(w->resolv),
                     0644) < 0)
        goto out;
    rc = 0;
out:
    if (n.fd >= 0)
        close(n.fd);
    close(fd);
    return rc;
}

static int valid_ifname(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n >= IFNAMSIZ || s[0] == '-')
        return 0;
    for (size_t i = 0; i < n; i++)
        if (s[i] == '/' || s[i] <= ' ' || s[i] == ':' || (unsigned char)s[i] >= 0x7f)
            return 0;
    return 1;
}

/* "52:54:00:12:34:56": six pairs of hex digits, nothing else (sscanf alone would take " 1" or "+1"). */
static int parse_mac(const char *s, unsigned char out[6])
{
    if (strlen(s) != 17)
        return 0;
    for (int i = 0; i < 6; i++) {
        const char *p = s + 3 * i;
        if (!isxdigit((unsigned char)p[0]) || !isxdigit((unsigned char)p[1]) || (i < 5 && p[2] != ':'))
            return 0;
        char pair[3] = {p[0], p[1], 0};
        out[i] = (unsigned char)strtoul(pair, NULL, 16);
    }
    return 1;
}

/* "A.B.C.D/P" with P in 0..32 written as 1-2 digits. */
static int parse_cidr(const char *s, struct in_addr *addr, unsigned char *prefix)
{
    char a[INET_ADDRSTRLEN];
    const char *slash = strchr(s, '/');
    if (!slash || (size_t)(slash - s) >= sizeof a)
        return 0;
    memcpy(a, s, (size_t)(slash - s));
    a[slash - s] = 0;
    const char *p = slash + 1;
    size_t plen = strlen(p);
    if (plen < 1 || plen > 2 || !isdigit((unsigned char)p[0]) || (plen == 2 && !isdigit((unsigned char)p[1])))
        return 0;
    int v = atoi(p);
    if (v > 32 || inet_pton(AF_INET, a, addr) != 1)
        return 0;
    *prefix = (unsigned char)v;
    return 1;
}

/* Validates every field before the --system gate, so a bad request is told so even where the op is disabled. */
static int op_net_config(struct reply *r, const struct req *q)
{
    struct net_request w;
    memset(&w, 0, sizeof w);
    const char *mac;
    if (get_str(r, q, "interface", 0, &w.ifname) < 0 || get_str(r, q, "mac", 0, &mac) < 0 ||
        get_str(r, q, "address", 1, &w.address) < 0 || get_str(r, q, "gateway", 0, &w.gateway) < 0)
        return -1;
    if (!w.ifname)
        w.ifname = "eth0";
    if (!valid_ifname(w.ifname))
        return fail(r, "bad_request", "net_config: interface %.64s is not a valid interface name", w.ifname);
    if (mac && !(w.has_mac = parse_mac(mac, w.mac)))
        return fail(r, "bad_request", "net_config: mac must look like 52:54:00:12:34:56");
    if (!parse_cidr(w.address, &w.addr, &w.prefix))
        return fail(r, "bad_request", "net_config: address must be IPv4 ADDRESS/PREFIX");
    if (w.gateway && !(w.has_gateway = inet_pton(AF_INET, w.gateway, &w.gw) == 1))
        return fail(r, "bad_request", "net_config: gateway must be an IPv4 address");
    json_t *dns = json_object_get(q->h, "dns");
    if (dns && !json_is_null(dns)) {
        size_t i;
        json_t *d;
        struct in_addr ignored;
        if (!json_is_array(dns) || json_array_size(dns) > 8)
            return fail(r, "bad_request", "net_config: dns must be a list of at most 8 IPv4 addresses");
        json_array_foreach(dns, i, d) {
            if (!json_is_string(d) || inet_pton(AF_INET, json_string_value(d), &ignored) != 1)
                return fail(r, "bad_request", "net_config: dns must be a list of at most 8 IPv4 addresses");
            snprintf(w.resolv + strlen(w.resolv), sizeof w.resolv - strlen(w.resolv), "nameserver %s\n",
                     json_string_value(d));
        }
        w.has_dns = 1;
    }
    if (need_system(r, q) < 0)
        return -1;
    if (apply_net_config(r, &w) < 0)
        return -1;
    r->obj = json_object();
    return 0;
}

static int op_shutdown(struct reply *r, const struct req *q)
{
    if (need_system(r, q) < 0)
        return -1;
    r->obj = json_object();
    r->poweroff = 1;
    return 0;
}

typedef int (*op_fn)(struct reply *, const struct req *);
static const struct {
    const char *name;
    op_fn fn;
} OP_TABLE[] = {
    {"hello", op_hello},       {"exec", op_exec},         {"read_file", op_read_file},
    {"write_file", op_write_file}, {"set_time", op_set_time}, {"reseed", op_reseed},
    {"net_config", op_net_config}, {"shutdown", op_shutdown},
};

/* Parses one complete payload and answers it. Returns -1 when the host went away while we replied. */
static int handle(struct chan *c, const unsigned char *payload, size_t plen)
{
    const unsigned char *nl = memchr(payload, '\n', plen);
    if (!nl)
        return send_error(c, NULL, "bad_frame", "payload has no header line (JSON object, then a newline)");
    size_t hlen = (size_t)(nl - payload);
    json_error_t jerr;
    json_t *h = json_loadb((const char *)payload, hlen, JSON_REJECT_DUPLICATES, &jerr);
    if (!h)
        return send_error(c, NULL, "bad_json", "header is not valid JSON: %s (column %d)", jerr.text, jerr.column);
    int rc = 0;
    json_t *id = json_object_get(h, "id");
    if (!json_is_object(h)) {
        rc = send_error(c, NULL, "bad_request", "header must be a JSON object");
        goto out;
    }
    if (!json_is_integer(id) || json_integer_value(id) < 0) {
        rc = send_error(c, NULL, "bad_request", "header needs \"id\", a non-negative integer");
        goto out;
    }
    struct req q = {.h = h};
    json_t *blobs = json_object_get(h, "blobs");
    size_t total = 0, rest = plen - hlen - 1;
    if (blobs && !json_is_null(blobs)) {
        if (!json_is_array(blobs) || json_array_size(blobs) > CXA_MAX_BLOBS) {
            rc = send_error(c, id, "bad_frame", "blobs must be a list of at most %d lengths", CXA_MAX_BLOBS);
            goto out;
        }
        size_t i;
        json_t *b;
        json_array_foreach(blobs, i, b) {
            if (!json_is_integer(b) || json_integer_value(b) < 0 || (size_t)json_integer_value(b) > rest - total) {
                rc = send_error(c, id, "bad_frame", "blob lengths exceed the %zu bytes after the header", rest);
                goto out;
            }
            q.blob[i] = nl + 1 + total;
            q.bloblen[i] = (size_t)json_integer_value(b);
            total += q.bloblen[i];
        }
        q.nblobs = json_array_size(blobs);
    }
    if (total != rest) {
        rc = send_error(c, id, "bad_frame", "blobs announce %zu bytes but %zu follow the header", total, rest);
        goto out;
    }
    json_t *op = json_object_get(h, "op");
    if (!json_is_string(op)) {
        rc = send_error(c, id, "bad_request", "header needs \"op\", a string");
        goto out;
    }
    q.op = json_string_value(op);
    op_fn fn = NULL;
    for (size_t i = 0; i < sizeof OP_TABLE / sizeof OP_TABLE[0]; i++)
        if (strcmp(OP_TABLE[i].name, q.op) == 0)
            fn = OP_TABLE[i].fn;
    if (!fn) {
        rc = send_error(c, id, "unknown_op", "unknown op %.64s", q.op);
        goto out;
    }
    struct reply r;
    memset(&r, 0, sizeof r);
    if (fn(&r, &q) < 0) {
        json_decref(r.obj);
        for (int i = 0; i < r.nblobs; i++)
            buf_free(&r.blob[i]);
        rc = send_error(c, id, r.code, "%s", r.detail);
        goto out;
    }
    if (!r.obj) { /* json_pack refused a value (say, text that is not UTF-8): answer rather than go silent */
        for (int i = 0; i < r.nblobs; i++)
            buf_free(&r.blob[i]);
        rc = send_error(c, id, "internal", "%s: could not encode the reply", q.op);
        goto out;
    }
    json_object_set_new(r.obj, "id", json_deep_copy(id));
    json_object_set_new(r.obj, "ok", json_true());
    rc = send_frame(c, r.obj, r.blob, r.nblobs);
    json_decref(r.obj);
    for (int i = 0; i < r.nblobs; i++)
        buf_free(&r.blob[i]);
    if (r.poweroff) {
        logmsg("powering off at the host's request");
        sync();
        reboot(RB_POWER_OFF);
        logmsg("poweroff failed: %s", strerror(errno));
    }
out:
    json_decref(h);
    return rc;
}

/* -- framing ------------------------------------------------------------------------------------------------ */

enum state { ST_HEADER, ST_SCAN, ST_PAYLOAD, ST_DISCARD };

static unsigned char inbuf[65536];

/* Serves one host connection until it goes away. */
static void serve(struct chan *c)
{
    size_t pos = 0, len = 0;
    enum state st = ST_HEADER;
    unsigned char *payload = NULL;
    uint32_t plen = 0, phave = 0, discard = 0;
    int64_t last = now_ms();
    for (;;) {
        size_t avail = len - pos;
        switch (st) {
        case ST_HEADER: {
            if (avail == 0)
                break;
            size_t k = avail < 3 ? avail : 3;
            if (memcmp(inbuf + pos, MAGIC, k) != 0) {
                if (send_error(c, NULL, "bad_magic", "frames start with \"CXA\"; skipping to the next frame") < 0)
                    goto lost;
                pos++;
                st = ST_SCAN;
                continue;
            }
            if (avail < 8)
                break;
            unsigned version = inbuf[pos + 3];
            uint32_t be;
            memcpy(&be, inbuf + pos + 4, 4);
            uint32_t n = ntohl(be);
            pos += 8;
            if (version != CXA_PROTOCOL) {
                if (send_error(c, NULL, "bad_version", "protocol version %u is not supported (this agent speaks %d)",
                               version, CXA_PROTOCOL) < 0)
                    goto lost;
                if (n <= CXA_MAX_FRAME) { /* the 8-byte prefix is the same in every version: skip the frame */
                    discard = n;
                    st = ST_DISCARD;
                } else {
                    st = ST_SCAN;
                }
                continue;
            }
            if (n > CXA_MAX_FRAME) {
                if (send_error(c, NULL, "too_large", "frame of %u bytes exceeds the limit of %u", n, CXA_MAX_FRAME) <
                    0)
                    goto lost;
                st = ST_SCAN;
                continue;
            }
            if (n == 0) {
                if (send_error(c, NULL, "bad_frame", "empty payload") < 0)
                    goto lost;
                continue;
            }
            payload = malloc(n);
            if (!payload) {
                if (send_error(c, NULL, "ENOMEM", "no memory for a frame of %u bytes", n) < 0)
                    goto lost;
                discard = n;
                st = ST_DISCARD;
                continue;
            }
            plen = n;
            phave = 0;
            st = ST_PAYLOAD;
            continue;
        }
        case ST_PAYLOAD: {
            size_t k = avail < plen - phave ? avail : plen - phave;
            memcpy(payload + phave, inbuf + pos, k);
            pos += k;
            phave += (uint32_t)k;
            if (phave < plen)
                break;
            int rc = handle(c, payload, plen);
            free(payload);
            payload = NULL;
            st = ST_HEADER;
            last = now_ms(); /* the next frame's clock starts after this one's (maybe long) answer */
            if (rc < 0)
                goto lost;
            continue;
        }
        case ST_DISCARD: {
            size_t k = avail < discard ? avail : discard;
            pos += k;
            discard -= (uint32_t)k;
            if (discard > 0)
                break;
            st = ST_HEADER;
            continue;
        }
        case ST_SCAN: {
            unsigned char *hit = memmem(inbuf + pos, avail, MAGIC, 3);
            if (hit) {
                pos = (size_t)(hit - inbuf);
                st = ST_HEADER;
                continue;
            }
            /* keep a tail that may be the start of the magic */
            size_t keep = 0;
            if (avail >= 2 && memcmp(inbuf + len - 2, MAGIC, 2) == 0)
                keep = 2;
            else if (avail >= 1 && inbuf[len - 1] == MAGIC[0])
                keep = 1;
            pos = len - keep;
            break;
        }
        }

        /* need more bytes */
        avail = len - pos;
        if (pos > 0) {
            memmove(inbuf, inbuf + pos, avail);
            len = avail;
            pos = 0;
        }
        int in_frame = st == ST_PAYLOAD || st == ST_DISCARD || (st == ST_HEADER && len > 0);
        int timeout = CXA_IDLE_WAKE_MS;
        if (in_frame) {
            int64_t left = last + opt.frame_timeout_ms - now_ms();
            timeout = (int)(left < 0 ? 0 : left);
        }
        ssize_t got;
        if (st == ST_PAYLOAD && len == 0) /* big frames go straight into their buffer */
            got = chan_read(c, payload + phave, plen - phave, timeout);
        else
            got = chan_read(c, inbuf + len, sizeof inbuf - len, timeout);
        if (got < 0)
            goto lost;
        if (got == 0) {
            if (in_frame) {
                if (send_error(c, NULL, "truncated", "frame incomplete after %ld ms without data; dropped",
                               opt.frame_timeout_ms) < 0)
                    goto lost;
                free(payload);
                payload = NULL;
                pos = len = 0;
                st = ST_HEADER;
            } else {
                reap_orphans();
            }
            last = now_ms();
            continue;
        }
        last = now_ms();
        if (st == ST_PAYLOAD && len == 0) {
            phave += (uint32_t)got;
            if (phave == plen) {
                int rc = handle(c, payload, plen);
                free(payload);
                payload = NULL;
                st = ST_HEADER;
                last = now_ms();
                if (rc < 0)
                    goto lost;
            }
        } else {
            len += (size_t)got;
        }
    }
lost:
    free(payload);
}

/* -- main --------------------------------------------------------------------------------------------------- */

static void usage(void)
{
    dprintf(2, "usage: cube-agent [--port NAME | --device PATH | --listen SOCKET] [--system] [--busybox PATH]\n"
               "                  [--frame-timeout-ms N]\n"
               "  --port NAME      virtio-serial port to serve (default %s)\n"
               "  --device PATH    serve this character device instead\n"
               "  --listen SOCKET  serve one client at a time on a unix socket (tests, debugging)\n"
               "  --system         allow set_time, reseed, net_config and shutdown (the guest's init passes it)\n"
               "  --busybox PATH   ignored (kept for older init scripts; net_config runs no command)\n",
            CXA_DEFAULT_PORT);
    exit(2);
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--system") == 0) {
            opt.system = 1;
        } else if (!v) {
            usage();
        } else if (strcmp(a, "--port") == 0) {
            opt.mode = CHAN_PORT, opt.port_name = v, i++;
        } else if (strcmp(a, "--device") == 0) {
            opt.mode = CHAN_DEVICE, opt.path = v, i++;
        } else if (strcmp(a, "--listen") == 0) {
            opt.mode = CHAN_LISTEN, opt.path = v, i++;
        } else if (strcmp(a, "--busybox") == 0) {
            opt.busybox = v, i++;
        } else if (strcmp(a, "--frame-timeout-ms") == 0) {
            char *end;
            opt.frame_timeout_ms = strtol(v, &end, 10);
            if (*end || opt.frame_timeout_ms <= 0)
                usage();
            i++;
        } else {
            usage();
        }
    }
    /* fds 0-2 must exist, or a pipe could land on them and be clobbered by dup2 in a child */
    for (int fd = 0; fd < 3; fd++)
        if (fcntl(fd, F_GETFD) < 0 && open("/dev/null", O_RDWR) != fd)
            return 1;
    /* jansson seeds its hash tables from /dev/urandom, and on Linux >= 5.18 reading that before the CRNG is ready
     * first runs the jitter entropy generator: about two seconds of a TCG boot. GRND_INSECURE never waits; the
     * only party that can send us JSON is the host. */
    size_t seed = 0;
    if (getrandom(&seed, sizeof seed, GRND_INSECURE) != (ssize_t)sizeof seed || seed == 0)
        seed = (size_t)now_ms() ^ ((size_t)getpid() << 16) ^ 0x9e3779b97f4a7c15u;
    json_object_seed(seed);
    signal(SIGPIPE, SIG_IGN); /* a vanished host is an EPIPE, not a death */
    struct sigaction sa = {0};
    sa.sa_handler = on_sigio;
    sigaction(SIGIO, &sa, NULL);
    sigset_t block;
    sigemptyset(&block);
    sigaddset(&block, SIGIO);
    sigprocmask(SIG_BLOCK, &block, NULL);
    prctl(PR_SET_CHILD_SUBREAPER, 1);

    struct chan c = {.fd = -1, .lfd = -1};
    if (opt.mode == CHAN_LISTEN) {
        struct sockaddr_un sun = {.sun_family = AF_UNIX};
        if (strlen(opt.path) >= sizeof sun.sun_path) {
            logmsg("socket path too long: %s", opt.path);
            return 2;
        }
        strcpy(sun.sun_path, opt.path);
        unlink(opt.path);
        c.lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        mode_t old = umask(077);
        if (c.lfd < 0 || bind(c.lfd, (struct sockaddr *)&sun, sizeof sun) < 0 || listen(c.lfd, 4) < 0) {
            logmsg("cannot listen on %s: %s", opt.path, strerror(errno));
            return 1;
        }
        umask(old);
        logmsg("serving on %s", opt.path);
    }
    for (;;) {
        chan_wait(&c);
        serve(&c);
        chan_lost(&c);
        reap_orphans();
    }
}

/*
 * pyvmm-agent: the guest agent of pyvmm sandboxes.
 *
 * It runs commands and moves files for the host over a stream socket (vsock in a
 * guest, a Unix socket in host-side tests), speaking the framed binary protocol of
 * docs/agent-protocol.md (version 1).  One thread, one poll() loop over every
 * connection, the pipes of its command and the SIGCHLD signalfd; every buffer is
 * bounded and a client can only ever cost its own connection.
 *
 * Built static against musl by build.sh: a small binary with no NSS or dlopen
 * surprises (static glibc has both), that runs on any guest root filesystem.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <net/if.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysinfo.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"

#ifndef PYVMM_AGENT_BUILD_ID
#define PYVMM_AGENT_BUILD_ID "dev"
#endif

/* ---- protocol constants (docs/agent-protocol.md keeps the same table) ---- */

#define PROTOCOL_VERSION 1
#define HEADER_SIZE 4              /* u32 big-endian length of type + payload */
#define MAX_FRAME_SIZE (1u << 20)  /* largest length field accepted: 1 MiB */

enum frame_type {
    FR_HELLO = 0x01, FR_ERROR = 0x02, FR_OK = 0x03,
    FR_EXEC = 0x10, FR_STDIN = 0x11, FR_STDIN_CLOSE = 0x12, FR_SIGNAL = 0x13,
    FR_STDOUT = 0x14, FR_STDERR = 0x15, FR_EXIT = 0x16,
    FR_PUT_FILE = 0x20, FR_GET_FILE = 0x21, FR_DATA = 0x22, FR_DATA_END = 0x23,
    FR_HEALTH = 0x30, FR_SET_TIME = 0x31, FR_RESEED = 0x32,
};

enum tag {
    T_VERSION = 1, T_BUILD_ID = 2, T_ARGV = 3, T_ENV = 4, T_CWD = 5, T_FLAGS = 6,
    T_TIMEOUT_MS = 7, T_PTY_ROWS = 8, T_PTY_COLS = 9, T_PATH = 10, T_MODE = 11,
    T_SIGNAL = 12, T_TIME_NS = 13, T_ENTROPY = 14, T_EXIT_CODE = 15, T_TERM_SIGNAL = 16,
    T_TIMED_OUT = 17, T_ERRNO = 18, T_MESSAGE = 19, T_UPTIME_MS = 20, T_LOAD1_MILLI = 21,
    T_MEM_TOTAL = 22, T_MEM_FREE = 23, T_PROCS = 24, T_CONNECTIONS = 25,
    T_MAX = 26,
};

#define EXEC_FLAG_STDIN 1u
#define EXEC_FLAG_PTY 2u
#define PUT_FLAG_MKDIRS 1u

#define MAX_FIELDS 8192          /* TLVs in one request (argv + env entries) */
#define MAX_ENTROPY 4096         /* bytes in one RESEED */

/* ---- agent limits ---- */

#define MAX_CONNECTIONS 32
#define CHUNK AGENT_CHUNK              /* bytes read from a pipe or file per frame */
#define OUTBUF_SIZE (4 * CHUNK)  /* per connection, frames waiting for the socket */
#define CONTROL_RESERVE 4096     /* room kept for EXIT/OK/ERROR frames */
#define INBUF_MIN 16384
#define HELLO_TIMEOUT_MS 10000   /* a connection that never says HELLO is closed */
#define CLOSE_LINGER_MS 1000     /* time to flush a final ERROR before closing */
#define OUTPUT_LINGER_MS 200     /* after the command exits, wait this long for its
                                    pipes to close (a background child may hold them) */

enum state { S_HELLO, S_IDLE, S_EXEC, S_PUT, S_PUT_DISCARD, S_GET, S_CLOSING };

struct conn {
    int fd;
    enum state state;
    int64_t deadline;                 /* HELLO or CLOSING deadline (ms), 0 = none */
    uint8_t *in;                      /* received bytes not yet handled */
    size_t in_start, in_end, in_cap;
    size_t stdin_done;                /* bytes of the current STDIN frame written */
    int stdin_blocked;                /* that frame waits for room in the pipe */
    int after_exec;                   /* late STDIN/SIGNAL frames of the last command are
                                         dropped until the next request */
    uint8_t out[OUTBUF_SIZE];         /* frames not yet sent */
    size_t out_start, out_end;
    /* EXEC */
    pid_t pid;                        /* the command (its process group id too) */
    int reaped, wstatus;
    int64_t reaped_at, exec_deadline; /* exec_deadline 0 = no timeout */
    int timed_out, pty, stdin_wanted;
    int out_fd, err_fd, in_fd;        /* pty: out_fd == in_fd == the master */
    /* PUT_FILE / GET_FILE */
    int file_fd;
    mode_t mode;
    char tmp_path[PATH_MAX], final_path[PATH_MAX];
    /* poll indexes of this iteration, -1 when not polled */
    int ix_sock, ix_out, ix_err, ix_in;
};

struct field { uint8_t tag; uint32_t len; const uint8_t *val; };

static struct conn *conns[MAX_CONNECTIONS];
static int nconns;
static struct field fields[MAX_FIELDS];
static int nfields;

/* ---- small helpers ---- */

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void put_u32(uint8_t *p, uint32_t v)
{
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}

static uint32_t get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint64_t get_u64(const uint8_t *p)
{
    return (uint64_t)get_u32(p) << 32 | get_u32(p + 4);
}

static void set_nonblock(int fd)
{
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

static void close_fd(int *fd)
{
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

void log_line(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("pyvmm-agent: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

/* A TLV builder over a caller's buffer (responses are small and fixed). */
struct tlv_buf { uint8_t data[CONTROL_RESERVE - 64]; size_t len; };

static void tlv_add(struct tlv_buf *b, uint8_t tag, const void *val, size_t len)
{
    if (b->len + 5 + len > sizeof(b->data))
        len = sizeof(b->data) - b->len - 5; /* only MESSAGE can be long: truncated */
    b->data[b->len] = tag;
    put_u32(b->data + b->len + 1, (uint32_t)len);
    memcpy(b->data + b->len + 5, val, len);
    b->len += 5 + len;
}

static void tlv_u32(struct tlv_buf *b, uint8_t tag, uint32_t v)
{
    uint8_t be[4];
    put_u32(be, v);
    tlv_add(b, tag, be, 4);
}

static void tlv_u64(struct tlv_buf *b, uint8_t tag, uint64_t v)
{
    uint8_t be[8];
    put_u32(be, v >> 32);
    put_u32(be + 4, (uint32_t)v);
    tlv_add(b, tag, be, 8);
}

/* ---- TLV parsing: strict (unknown tag, wrong size, duplicate -> error) ---- */

static const char *parse_fields(const uint8_t *p, size_t n, const uint8_t *allowed)
{
    int seen[T_MAX] = {0};
    nfields = 0;
    while (n > 0) {
        if (n < 5)
            return "truncated TLV header";
        uint8_t tag = p[0];
        uint32_t len = get_u32(p + 1);
        if (len > n - 5)
            return "TLV length beyond the frame";
        if (tag == 0 || tag >= T_MAX || !allowed[tag])
            return "unexpected TLV tag";
        if (seen[tag] && tag != T_ARGV && tag != T_ENV)
            return "repeated TLV tag";
        if (nfields == MAX_FIELDS)
            return "too many TLVs";
        seen[tag] = 1;
        fields[nfields++] = (struct field){tag, len, p + 5};
        p += 5 + len;
        n -= 5 + len;
    }
    return NULL;
}

static const struct field *field(uint8_t tag)
{
    for (int i = 0; i < nfields; i++)
        if (fields[i].tag == tag)
            return &fields[i];
    return NULL;
}

/* Integer fields: absent -> dflt; *bad set when the size is not 4 or 8 as the tag says. */
static uint64_t field_uint(uint8_t tag, size_t size, uint64_t dflt, int *bad)
{
    const struct field *f = field(tag);
    if (f == NULL)
        return dflt;
    if (f->len != size) {
        *bad = 1;
        return dflt;
    }
    return size == 4 ? get_u32(f->val) : get_u64(f->val);
}

/* A text field as a C string (no NUL inside); NULL if absent or bad. */
static char *field_cstr(const struct field *f, char *dst, size_t cap)
{
    if (f == NULL || f->len >= cap || memchr(f->val, 0, f->len) != NULL)
        return NULL;
    memcpy(dst, f->val, f->len);
    dst[f->len] = 0;
    return dst;
}

/* ---- output queue ---- */

static size_t out_room(struct conn *c)
{
    return OUTBUF_SIZE - (c->out_end - c->out_start);
}

/* Space for n contiguous bytes at the end of the queue, or NULL. */
static uint8_t *out_reserve(struct conn *c, size_t n)
{
    if (OUTBUF_SIZE - c->out_end < n && c->out_start > 0) {
        memmove(c->out, c->out + c->out_start, c->out_end - c->out_start);
        c->out_end -= c->out_start;
        c->out_start = 0;
    }
    return OUTBUF_SIZE - c->out_end < n ? NULL : c->out + c->out_end;
}

static void out_commit(struct conn *c, uint8_t type, size_t payload_len)
{
    uint8_t *h = c->out + c->out_end;
    put_u32(h, (uint32_t)(1 + payload_len));
    h[4] = type;
    c->out_end += HEADER_SIZE + 1 + payload_len;
}

static void conn_close(struct conn *c);

static void queue_frame(struct conn *c, uint8_t type, const void *payload, size_t len)
{
    uint8_t *p = out_reserve(c, HEADER_SIZE + 1 + len);
    if (p == NULL) { /* cannot happen: callers keep CONTROL_RESERVE free */
        log_line("output queue full, closing a connection");
        conn_close(c);
        return;
    }
    if (len)
        memcpy(p + HEADER_SIZE + 1, payload, len);
    out_commit(c, type, len);
}

static void queue_tlvs(struct conn *c, uint8_t type, const struct tlv_buf *b)
{
    queue_frame(c, type, b->data, b->len);
}

__attribute__((format(printf, 3, 4)))
static void queue_error(struct conn *c, int err, const char *fmt, ...)
{
    struct tlv_buf b = {.len = 0};
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (err)
        tlv_u32(&b, T_ERRNO, (uint32_t)err);
    tlv_add(&b, T_MESSAGE, msg, strlen(msg));
    queue_tlvs(c, FR_ERROR, &b);
}

/* ---- connection teardown ---- */

static void exec_kill(struct conn *c)
{
    if (c->pid > 0 && !c->reaped) {
        kill(-c->pid, SIGKILL);
        kill(c->pid, SIGKILL); /* in case it has not called setsid() yet */
    }
}

static void exec_release(struct conn *c)
{
    close_fd(&c->out_fd);
    close_fd(&c->err_fd);
    if (c->pty)
        c->in_fd = -1; /* the same fd as out_fd */
    close_fd(&c->in_fd);
    c->pid = 0;
    c->stdin_done = 0;
    c->stdin_blocked = 0;
}

static void file_release(struct conn *c)
{
    close_fd(&c->file_fd);
    if (c->tmp_path[0]) {
        unlink(c->tmp_path);
        c->tmp_path[0] = 0;
    }
}

/* Kill what the connection runs and free it (the reaper reaps the orphaned child). */
static void conn_close(struct conn *c)
{
    if (c->fd < 0)
        return;
    exec_kill(c);
    exec_release(c);
    file_release(c);
    close_fd(&c->fd); /* removed from conns[] by the main loop */
}

/* A protocol violation: one ERROR frame, then the connection closes. */
__attribute__((format(printf, 2, 3))) static void protocol_error(struct conn *c, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    exec_kill(c);
    exec_release(c);
    file_release(c);
    queue_error(c, EPROTO, "protocol error: %s", msg);
    c->state = S_CLOSING;
    c->deadline = now_ms() + CLOSE_LINGER_MS;
}

/* ---- EXEC ---- */

static const uint8_t exec_tags[T_MAX] = {
    [T_ARGV] = 1, [T_ENV] = 1, [T_CWD] = 1, [T_FLAGS] = 1, [T_TIMEOUT_MS] = 1,
    [T_PTY_ROWS] = 1, [T_PTY_COLS] = 1,
};

static void handle_stdin_close(struct conn *c);

/* The child side: never returns. */
static void exec_child(char **argv, char **envp, const char *cwd, int in, int out, int err,
                       const char *pty_name, unsigned rows, unsigned cols)
{
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    signal(SIGPIPE, SIG_DFL);
    setsid(); /* its own session and process group: one kill(-pid) reaches all of it */
    if (pty_name != NULL) {
        int slave = open(pty_name, O_RDWR);
        if (slave < 0)
            _exit(126);
        ioctl(slave, TIOCSCTTY, 0);
        struct winsize ws = {.ws_row = rows, .ws_col = cols};
        ioctl(slave, TIOCSWINSZ, &ws);
        in = out = err = slave;
    }
    dup2(in, 0);
    dup2(out, 1);
    dup2(err, 2);
    if (cwd != NULL && chdir(cwd) != 0) {
        dprintf(2, "pyvmm-agent: cannot change directory to %s: %s\n", cwd, strerror(errno));
        _exit(126);
    }
    environ = envp; /* execvp searches the new PATH */
    execvp(argv[0], argv);
    int code = errno == ENOENT ? 127 : 126; /* as a shell says "not found" / "cannot run" */
    dprintf(2, "pyvmm-agent: cannot run %s: %s\n", argv[0], strerror(errno));
    _exit(code);
}

/* Variables a command inherits from the agent's own environment, where the kernel put
 * them from the kernel command line: on KVM PVM hosts pyvmm sets GLIBC_TUNABLES there to
 * keep glibc off AVX, whose register state a guest booted with noxsave never switches
 * (pyvmm/pvm.py). */
static const char *const inherited[] = {"GLIBC_TUNABLES"};

/* The environment every command starts from, its own env TLVs added on top: a clean
 * PATH and HOME (TERM with a pty), and the inherited variables that are set. */
static int default_env(const char **out, int pty)
{
    int n = 0;
    out[n++] = "PATH=" DEFAULT_PATH;
    out[n++] = "HOME=/root";
    if (pty)
        out[n++] = "TERM=xterm";
    for (size_t k = 0; k < sizeof inherited / sizeof *inherited; k++) {
        size_t klen = strlen(inherited[k]);
        for (char **v = environ; v != NULL && *v != NULL; v++) {
            if (strncmp(*v, inherited[k], klen) == 0 && (*v)[klen] == '=') {
                out[n++] = *v;
                break;
            }
        }
    }
    return n;
}

/* Copy argv and env TLVs into one block of C strings: argv[], NULL, envp[], NULL. */
static char **exec_vectors(char ***envp_out, int pty)
{
    int nargv = 0, nenv = 0;
    size_t bytes = 0;
    const char *defaults[3 + sizeof inherited / sizeof *inherited];
    int ndefaults = default_env(defaults, pty);
    for (int i = 0; i < nfields; i++) {
        if (fields[i].tag == T_ARGV)
            nargv++;
        else if (fields[i].tag == T_ENV)
            nenv++;
        else
            continue;
        bytes += fields[i].len + 1;
    }
    nenv += ndefaults;
    for (int i = 0; i < ndefaults; i++)
        bytes += strlen(defaults[i]) + 1;
    size_t nptr = (size_t)nargv + 1 + (size_t)nenv + 1;
    char **vec = malloc(nptr * sizeof(char *) + bytes);
    if (vec == NULL)
        return NULL;
    char *s = (char *)(vec + nptr);
    char **argv = vec, **envp = vec + nargv + 1;
    int a = 0, e = 0;
    for (int i = 0; i < ndefaults; i++) {
        envp[e++] = strcpy(s, defaults[i]);
        s += strlen(s) + 1;
    }
    for (int i = 0; i < nfields; i++) {
        const struct field *f = &fields[i];
        if (f->tag != T_ARGV && f->tag != T_ENV)
            continue;
        memcpy(s, f->val, f->len);
        s[f->len] = 0;
        if (f->tag == T_ARGV) {
            argv[a++] = s;
        } else {
            /* a later K=V replaces an earlier one (the defaults first) */
            size_t klen = strcspn(s, "=");
            int j;
            for (j = 0; j < e; j++)
                if (strncmp(envp[j], s, klen + 1) == 0)
                    break;
            envp[j] = s;
            if (j == e)
                e++;
        }
        s += f->len + 1;
    }
    argv[a] = NULL;
    envp[e] = NULL;
    *envp_out = envp;
    return vec;
}

static void handle_exec(struct conn *c, const uint8_t *p, size_t n)
{
    const char *why = parse_fields(p, n, exec_tags);
    if (why != NULL)
        return protocol_error(c, "EXEC: %s", why);
    int bad = 0;
    uint32_t flags = (uint32_t)field_uint(T_FLAGS, 4, 0, &bad);
    uint64_t timeout_ms = field_uint(T_TIMEOUT_MS, 8, 0, &bad);
    unsigned rows = (unsigned)field_uint(T_PTY_ROWS, 4, 24, &bad);
    unsigned cols = (unsigned)field_uint(T_PTY_COLS, 4, 80, &bad);
    if (bad || flags & ~(EXEC_FLAG_STDIN | EXEC_FLAG_PTY) || rows > 0xffff || cols > 0xffff)
        return protocol_error(c, "EXEC: bad FLAGS, TIMEOUT_MS or PTY size field");
    if (timeout_ms > (uint64_t)1 << 40)
        return protocol_error(c, "EXEC: TIMEOUT_MS too large");
    int nargv = 0;
    for (int i = 0; i < nfields; i++) {
        if (fields[i].tag != T_ARGV && fields[i].tag != T_ENV)
            continue;
        if (memchr(fields[i].val, 0, fields[i].len) != NULL)
            return protocol_error(c, "EXEC: NUL byte inside ARGV or ENV");
        if (fields[i].tag == T_ENV && memchr(fields[i].val, '=', fields[i].len) == NULL)
            return protocol_error(c, "EXEC: ENV entry without '='");
        nargv += fields[i].tag == T_ARGV;
    }
    if (nargv == 0 || field(T_ARGV)->len == 0)
        return protocol_error(c, "EXEC: ARGV missing or empty");
    char cwd_buf[PATH_MAX], *cwd = NULL;
    if (field(T_CWD) != NULL && (cwd = field_cstr(field(T_CWD), cwd_buf, sizeof cwd_buf)) == NULL)
        return protocol_error(c, "EXEC: bad CWD");

    char **envp = NULL, **argv = exec_vectors(&envp, (flags & EXEC_FLAG_PTY) != 0);
    int in[2] = {-1, -1}, out[2] = {-1, -1}, err[2] = {-1, -1}, master = -1;
    char *pty_name = NULL;
    int ok = argv != NULL;
    if (ok && flags & EXEC_FLAG_PTY) {
        master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
        ok = master >= 0 && grantpt(master) == 0 && unlockpt(master) == 0 &&
             (pty_name = ptsname(master)) != NULL;
    } else if (ok) {
        ok = pipe2(out, O_CLOEXEC) == 0 && pipe2(err, O_CLOEXEC) == 0;
        if (ok && flags & EXEC_FLAG_STDIN)
            ok = pipe2(in, O_CLOEXEC) == 0;
        else if (ok)
            ok = (in[0] = open("/dev/null", O_RDONLY | O_CLOEXEC)) >= 0;
    }
    pid_t pid = ok ? fork() : -1;
    if (pid == 0)
        exec_child(argv, envp, cwd, in[0], out[1], err[1], pty_name, rows, cols);
    int saved = errno;
    free(argv);
    close_fd(&in[0]);
    close_fd(&out[1]);
    close_fd(&err[1]);
    if (pid < 0) {
        close_fd(&in[1]);
        close_fd(&out[0]);
        close_fd(&err[0]);
        close_fd(&master);
        const struct field *arg0 = field(T_ARGV); /* not NUL-terminated */
        queue_error(c, saved, "cannot start %.*s: %s", (int)(arg0->len < 200 ? arg0->len : 200),
                    (const char *)arg0->val, strerror(saved));
        return; /* the connection stays usable */
    }
    c->pid = pid;
    c->reaped = 0;
    c->timed_out = 0;
    c->pty = master >= 0;
    c->stdin_wanted = (flags & EXEC_FLAG_STDIN) != 0;
    c->out_fd = c->pty ? master : out[0];
    c->err_fd = err[0];
    c->in_fd = c->pty ? master : in[1];
    set_nonblock(c->out_fd);
    if (c->err_fd >= 0)
        set_nonblock(c->err_fd);
    if (c->in_fd >= 0)
        set_nonblock(c->in_fd);
    c->exec_deadline = timeout_ms ? now_ms() + (int64_t)timeout_ms : 0;
    c->state = S_EXEC;
    if (c->pty && !c->stdin_wanted) { /* no stdin: the terminal reads EOF at once */
        c->stdin_wanted = 1;
        handle_stdin_close(c);
    }
}

/* Returns 1 when the frame could not be written yet (the pipe is full): retry later. */
static int handle_stdin(struct conn *c, const uint8_t *p, size_t n)
{
    if (!c->stdin_wanted) {
        protocol_error(c, "STDIN without the STDIN flag, or after STDIN_CLOSE");
        return 0;
    }
    if (c->in_fd < 0 || c->reaped)
        return 0; /* the command closed its stdin or ended: dropped, as by a shell */
    c->stdin_blocked = 0;
    while (c->stdin_done < n) {
        ssize_t w = write(c->in_fd, p + c->stdin_done, n - c->stdin_done);
        if (w < 0 && errno == EAGAIN)
            return c->stdin_blocked = 1;
        if (w < 0) {
            if (!c->pty)
                close_fd(&c->in_fd); /* EPIPE: nobody reads it any more */
            break;
        }
        c->stdin_done += (size_t)w;
    }
    c->stdin_done = 0;
    return 0;
}

static void handle_stdin_close(struct conn *c)
{
    if (!c->stdin_wanted)
        return protocol_error(c, "STDIN_CLOSE without the STDIN flag, or twice");
    c->stdin_wanted = 0;
    if (c->pty) {
        /* a terminal has no half-close: send its EOF character (^D) */
        struct termios t;
        char eof = tcgetattr(c->in_fd, &t) == 0 ? (char)t.c_cc[VEOF] : 4;
        if (write(c->in_fd, &eof, 1) < 0) {
            /* the terminal is gone: nothing to close */
        }
        c->in_fd = -1;
    } else {
        close_fd(&c->in_fd);
    }
}

static const uint8_t signal_tags[T_MAX] = {[T_SIGNAL] = 1};

static void handle_signal(struct conn *c, const uint8_t *p, size_t n)
{
    const char *why = parse_fields(p, n, signal_tags);
    int bad = 0;
    uint32_t sig = (uint32_t)field_uint(T_SIGNAL, 4, 0, &bad);
    if (why != NULL || bad || sig == 0 || sig > 64)
        return protocol_error(c, "SIGNAL: %s", why ? why : "SIGNAL field missing or not 1..64");
    if (!c->reaped && kill(-c->pid, (int)sig) != 0 && errno == ESRCH)
        kill(c->pid, (int)sig); /* it has not called setsid() yet */
}

/* The command is over when it was reaped and its pipes are closed (or silent since). */
static void exec_maybe_finish(struct conn *c)
{
    if (c->state != S_EXEC || !c->reaped || c->out_fd >= 0 || c->err_fd >= 0)
        return;
    if (out_room(c) < CONTROL_RESERVE)
        return;
    struct tlv_buf b = {.len = 0};
    if (WIFSIGNALED(c->wstatus))
        tlv_u32(&b, T_TERM_SIGNAL, (uint32_t)WTERMSIG(c->wstatus));
    else
        tlv_u32(&b, T_EXIT_CODE, (uint32_t)WEXITSTATUS(c->wstatus));
    tlv_u32(&b, T_TIMED_OUT, (uint32_t)c->timed_out);
    queue_tlvs(c, FR_EXIT, &b);
    exec_release(c);
    c->state = S_IDLE;
    c->after_exec = 1;
}

/* Move one chunk from a command's pipe to a STDOUT/STDERR frame; 0 on EOF or error. */
static int pump_output(struct conn *c, int *fd, uint8_t type)
{
    if (out_room(c) < HEADER_SIZE + 1 + CHUNK + CONTROL_RESERVE)
        return 1; /* backpressure: the socket must drain first */
    uint8_t *p = out_reserve(c, HEADER_SIZE + 1 + CHUNK);
    if (p == NULL)
        return 1;
    ssize_t r = read(*fd, p + HEADER_SIZE + 1, CHUNK);
    if (r > 0) {
        out_commit(c, type, (size_t)r);
        return 1;
    }
    if (r < 0 && errno == EAGAIN) {
        /* empty: after the command exited and its linger passed, stop waiting */
        if (c->reaped && now_ms() >= c->reaped_at + OUTPUT_LINGER_MS)
            goto done;
        return 1;
    }
done: /* EOF, or EIO from a pty master whose slave closed */
    if (c->pty && fd == &c->out_fd && c->in_fd == c->out_fd)
        c->in_fd = -1;
    close_fd(fd);
    return 0;
}

/* ---- files ---- */

static const uint8_t put_tags[T_MAX] = {[T_PATH] = 1, [T_MODE] = 1, [T_FLAGS] = 1};
static const uint8_t get_tags[T_MAX] = {[T_PATH] = 1};

static int mkdirs(char *path)
{
    for (char *s = path + 1; *s; s++) {
        if (*s != '/')
            continue;
        *s = 0;
        int r = mkdir(path, 0755);
        *s = '/';
        if (r != 0 && errno != EEXIST)
            return -1;
    }
    return 0;
}

static void handle_put(struct conn *c, const uint8_t *p, size_t n)
{
    const char *why = parse_fields(p, n, put_tags);
    int bad = 0;
    uint32_t mode = (uint32_t)field_uint(T_MODE, 4, 0644, &bad);
    uint32_t flags = (uint32_t)field_uint(T_FLAGS, 4, 0, &bad);
    if (why == NULL && (bad || mode > 07777 || flags & ~PUT_FLAG_MKDIRS))
        why = "bad MODE or FLAGS field";
    if (why == NULL && (field_cstr(field(T_PATH), c->final_path, sizeof c->final_path) == NULL ||
                        c->final_path[0] != '/'))
        why = "PATH missing, not absolute or too long";
    if (why != NULL)
        return protocol_error(c, "PUT_FILE: %s", why);
    c->mode = (mode_t)mode;
    c->state = S_PUT_DISCARD; /* until the file is open */
    char dir[PATH_MAX];
    strcpy(dir, c->final_path);
    char *slash = strrchr(dir, '/');
    const char *base = slash + 1;
    if (*base == 0) {
        queue_error(c, EISDIR, "cannot write %s: it names a directory", c->final_path);
        return;
    }
    *slash = 0;
    if (flags & PUT_FLAG_MKDIRS && dir[0] && (strcat(dir, "/"), mkdirs(dir) != 0)) {
        queue_error(c, errno, "cannot create the directories of %s: %s", c->final_path,
                    strerror(errno));
        return;
    }
    /* a temporary file beside the target, renamed over it at DATA_END: readers see the
       old file or the whole new one, never a part */
    int len = snprintf(c->tmp_path, sizeof c->tmp_path, "%.*s/.pyvmm-put-XXXXXX",
                       (int)(slash - dir), dir);
    if (len < 0 || (size_t)len >= sizeof c->tmp_path) {
        c->tmp_path[0] = 0;
        queue_error(c, ENAMETOOLONG, "cannot write %s: path too long", c->final_path);
        return;
    }
    c->file_fd = mkostemp(c->tmp_path, O_CLOEXEC);
    if (c->file_fd < 0) {
        int e = errno;
        c->tmp_path[0] = 0;
        queue_error(c, e, "cannot write %s: %s", c->final_path, strerror(e));
        return;
    }
    c->state = S_PUT;
}

static void put_failed(struct conn *c, const char *what)
{
    int e = errno;
    file_release(c);
    queue_error(c, e, "cannot %s %s: %s", what, c->final_path, strerror(e));
    c->state = S_PUT_DISCARD;
}

static void handle_put_data(struct conn *c, const uint8_t *p, size_t n)
{
    if (c->state == S_PUT_DISCARD)
        return;
    while (n > 0) {
        ssize_t w = write(c->file_fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            return put_failed(c, "write");
        p += w;
        n -= (size_t)w;
    }
}

static void handle_put_end(struct conn *c)
{
    int discarding = c->state == S_PUT_DISCARD; /* its ERROR went out when it failed */
    const char *failed = NULL;
    c->state = S_IDLE;
    if (discarding)
        return;
    int fd = c->file_fd;
    if (fchmod(fd, c->mode) != 0) /* exactly the mode asked, whatever the umask */
        failed = "chmod";
    c->file_fd = -1;
    if (close(fd) != 0 && failed == NULL)
        failed = "write";
    if (failed == NULL && rename(c->tmp_path, c->final_path) != 0)
        failed = "rename onto";
    if (failed != NULL) {
        put_failed(c, failed);
        c->state = S_IDLE;
        return;
    }
    c->tmp_path[0] = 0;
    queue_frame(c, FR_OK, NULL, 0);
}

static void handle_get(struct conn *c, const uint8_t *p, size_t n)
{
    char path[PATH_MAX];
    const char *why = parse_fields(p, n, get_tags);
    if (why == NULL && field_cstr(field(T_PATH), path, sizeof path) == NULL)
        why = "PATH missing or bad";
    if (why != NULL)
        return protocol_error(c, "GET_FILE: %s", why);
    /* O_NONBLOCK so that a FIFO cannot block the agent in open() */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        int e = errno;
        if (fd >= 0)
            close(fd);
        return queue_error(c, e, "cannot read %s: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return queue_error(c, S_ISDIR(st.st_mode) ? EISDIR : EINVAL,
                           "cannot read %s: not a regular file", path);
    }
    c->file_fd = fd;
    c->state = S_GET;
}

static void pump_get(struct conn *c)
{
    if (out_room(c) < HEADER_SIZE + 1 + CHUNK + CONTROL_RESERVE)
        return;
    uint8_t *p = out_reserve(c, HEADER_SIZE + 1 + CHUNK);
    if (p == NULL)
        return;
    ssize_t r = read(c->file_fd, p + HEADER_SIZE + 1, CHUNK);
    if (r > 0) {
        out_commit(c, FR_DATA, (size_t)r);
        return;
    }
    if (r < 0 && errno == EINTR)
        return;
    if (r < 0)
        queue_error(c, errno, "read error: %s", strerror(errno));
    else
        queue_frame(c, FR_DATA_END, NULL, 0);
    close_fd(&c->file_fd);
    c->state = S_IDLE;
}

/* ---- HEALTH, SET_TIME, RESEED, HELLO ---- */

static void handle_health(struct conn *c)
{
    struct sysinfo si;
    struct timespec up;
    struct tlv_buf b = {.len = 0};
    sysinfo(&si);
    clock_gettime(CLOCK_BOOTTIME, &up);
    tlv_u64(&b, T_UPTIME_MS, (uint64_t)up.tv_sec * 1000 + (uint64_t)up.tv_nsec / 1000000);
    tlv_u64(&b, T_LOAD1_MILLI, ((uint64_t)si.loads[0] * 1000) >> SI_LOAD_SHIFT);
    tlv_u64(&b, T_MEM_TOTAL, (uint64_t)si.totalram * si.mem_unit);
    tlv_u64(&b, T_MEM_FREE, (uint64_t)si.freeram * si.mem_unit);
    tlv_u64(&b, T_PROCS, si.procs);
    tlv_u64(&b, T_CONNECTIONS, (uint64_t)nconns);
    queue_tlvs(c, FR_OK, &b);
}

static const uint8_t time_tags[T_MAX] = {[T_TIME_NS] = 1};
static const uint8_t reseed_tags[T_MAX] = {[T_ENTROPY] = 1};
static const uint8_t hello_tags[T_MAX] = {[T_VERSION] = 1};

static void handle_set_time(struct conn *c, const uint8_t *p, size_t n)
{
    const char *why = parse_fields(p, n, time_tags);
    int bad = 0;
    uint64_t ns = field_uint(T_TIME_NS, 8, 0, &bad);
    if (why != NULL || bad || field(T_TIME_NS) == NULL)
        return protocol_error(c, "SET_TIME: %s", why ? why : "TIME_NS missing or not 8 bytes");
    struct timespec ts = {.tv_sec = (time_t)(ns / 1000000000u), .tv_nsec = (long)(ns % 1000000000u)};
    if (clock_settime(CLOCK_REALTIME, &ts) != 0)
        return queue_error(c, errno, "cannot set the clock: %s", strerror(errno));
    queue_frame(c, FR_OK, NULL, 0);
}

static void handle_reseed(struct conn *c, const uint8_t *p, size_t n)
{
    const char *why = parse_fields(p, n, reseed_tags);
    const struct field *f = field(T_ENTROPY);
    if (why == NULL && (f == NULL || f->len == 0 || f->len > MAX_ENTROPY))
        why = "ENTROPY missing or larger than 4096 bytes";
    if (why != NULL)
        return protocol_error(c, "RESEED: %s", why);
    static union { struct rand_pool_info info; uint8_t raw[sizeof(struct rand_pool_info) + MAX_ENTROPY]; } pool;
    pool.info.entropy_count = (int)f->len * 8; /* the host's entropy is good: credit it all */
    pool.info.buf_size = (int)f->len;
    memcpy(pool.info.buf, f->val, f->len);
    int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
    int ok = fd >= 0 && ioctl(fd, RNDADDENTROPY, &pool.info) == 0;
    int e = errno;
    if (fd >= 0)
        close(fd);
    if (!ok)
        return queue_error(c, e, "cannot add entropy: %s", strerror(e));
    queue_frame(c, FR_OK, NULL, 0);
}

static void handle_hello(struct conn *c, const uint8_t *p, size_t n)
{
    const char *why = parse_fields(p, n, hello_tags);
    int bad = 0;
    uint32_t version = (uint32_t)field_uint(T_VERSION, 4, 0, &bad);
    if (why != NULL || bad || field(T_VERSION) == NULL)
        return protocol_error(c, "HELLO: %s", why ? why : "VERSION missing or not 4 bytes");
    if (version != PROTOCOL_VERSION) {
        queue_error(c, EPROTO, "protocol version mismatch: the client speaks version %u, "
                    "this agent speaks version %u", version, PROTOCOL_VERSION);
        c->state = S_CLOSING;
        c->deadline = now_ms() + CLOSE_LINGER_MS;
        return;
    }
    struct tlv_buf b = {.len = 0};
    tlv_u32(&b, T_VERSION, PROTOCOL_VERSION);
    tlv_add(&b, T_BUILD_ID, PYVMM_AGENT_BUILD_ID, strlen(PYVMM_AGENT_BUILD_ID));
    queue_tlvs(c, FR_HELLO, &b);
    c->state = S_IDLE;
    c->deadline = 0;
}

/* ---- frame dispatch ---- */

static const char *type_name(uint8_t t)
{
    switch (t) {
    case FR_HELLO: return "HELLO";
    case FR_EXEC: return "EXEC";
    case FR_STDIN: return "STDIN";
    case FR_STDIN_CLOSE: return "STDIN_CLOSE";
    case FR_SIGNAL: return "SIGNAL";
    case FR_PUT_FILE: return "PUT_FILE";
    case FR_GET_FILE: return "GET_FILE";
    case FR_DATA: return "DATA";
    case FR_DATA_END: return "DATA_END";
    case FR_HEALTH: return "HEALTH";
    case FR_SET_TIME: return "SET_TIME";
    case FR_RESEED: return "RESEED";
    default: return "unknown";
    }
}

/* Handle one frame; 1 = not handled yet (stdin pipe full), keep it for later. */
static int handle_frame(struct conn *c, uint8_t type, const uint8_t *p, size_t n)
{
    int empty_only = type == FR_STDIN_CLOSE || type == FR_DATA_END || type == FR_HEALTH;
    if (empty_only && n != 0) {
        protocol_error(c, "%s carries no payload", type_name(type));
        return 0;
    }
    switch (c->state) {
    case S_HELLO:
        if (type == FR_HELLO)
            return handle_hello(c, p, n), 0;
        break;
    case S_IDLE:
        if (c->after_exec && (type == FR_STDIN || type == FR_STDIN_CLOSE || type == FR_SIGNAL))
            return 0; /* sent before the client saw EXIT */
        c->after_exec = 0;
        switch (type) {
        case FR_EXEC: return handle_exec(c, p, n), 0;
        case FR_PUT_FILE: return handle_put(c, p, n), 0;
        case FR_GET_FILE: return handle_get(c, p, n), 0;
        case FR_HEALTH: return handle_health(c), 0;
        case FR_SET_TIME: return handle_set_time(c, p, n), 0;
        case FR_RESEED: return handle_reseed(c, p, n), 0;
        }
        break;
    case S_EXEC:
        switch (type) {
        case FR_STDIN: return handle_stdin(c, p, n);
        case FR_STDIN_CLOSE: return handle_stdin_close(c), 0;
        case FR_SIGNAL: return handle_signal(c, p, n), 0;
        }
        break;
    case S_PUT:
    case S_PUT_DISCARD:
        if (type == FR_DATA)
            return handle_put_data(c, p, n), 0;
        if (type == FR_DATA_END)
            return handle_put_end(c), 0;
        break;
    case S_GET:
    case S_CLOSING:
        return 0; /* not read in these states */
    }
    protocol_error(c, "frame type 0x%02x (%s) is not expected here", type, type_name(type));
    return 0;
}

/* Can the connection take another frame now?  (Its answers must fit the queue.) */
static int wants_frames(struct conn *c)
{
    if (c->fd < 0 || c->state == S_GET || c->state == S_CLOSING)
        return 0;
    return out_room(c) >= 2 * CONTROL_RESERVE;
}

static void handle_frames(struct conn *c)
{
    while (wants_frames(c) && c->in_end - c->in_start >= HEADER_SIZE) {
        uint8_t *h = c->in + c->in_start;
        uint32_t len = get_u32(h);
        if (len == 0 || len > MAX_FRAME_SIZE)
            return protocol_error(c, "frame length %u is not within 1..%u", len, MAX_FRAME_SIZE);
        if (c->in_end - c->in_start < HEADER_SIZE + (size_t)len)
            return;
        if (handle_frame(c, h[HEADER_SIZE], h + HEADER_SIZE + 1, len - 1))
            return; /* stdin backpressure */
        c->in_start += HEADER_SIZE + len;
    }
}

/* Room to receive: compact, and grow up to the frame being received. */
static int in_make_room(struct conn *c)
{
    if (c->in_start == c->in_end)
        c->in_start = c->in_end = 0;
    size_t need = INBUF_MIN;
    if (c->in_end - c->in_start >= HEADER_SIZE) {
        uint32_t len = get_u32(c->in + c->in_start);
        if (len <= MAX_FRAME_SIZE && HEADER_SIZE + len > need)
            need = HEADER_SIZE + len;
    }
    if (c->in_cap - c->in_start < need && c->in_start > 0) {
        memmove(c->in, c->in + c->in_start, c->in_end - c->in_start);
        c->in_end -= c->in_start;
        c->in_start = 0;
    }
    if (c->in_cap < need) {
        uint8_t *bigger = realloc(c->in, need);
        if (bigger == NULL) {
            log_line("out of memory for a %zu-byte frame: closing its connection", need);
            conn_close(c);
            return 0;
        }
        c->in = bigger;
        c->in_cap = need;
    }
    return c->in_end < c->in_cap;
}

static void conn_read(struct conn *c)
{
    if (!in_make_room(c) || c->fd < 0)
        return;
    ssize_t r = recv(c->fd, c->in + c->in_end, c->in_cap - c->in_end, MSG_DONTWAIT);
    if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
        conn_close(c); /* the client is gone: its command dies with it */
        return;
    }
    if (r > 0) {
        c->in_end += (size_t)r;
        handle_frames(c);
    }
}

static void conn_flush(struct conn *c)
{
    while (c->out_end > c->out_start) {
        ssize_t w = send(c->fd, c->out + c->out_start, c->out_end - c->out_start,
                         MSG_DONTWAIT | MSG_NOSIGNAL);
        if (w < 0 && errno == EAGAIN)
            return;
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0) {
            conn_close(c);
            return;
        }
        c->out_start += (size_t)w;
    }
    c->out_start = c->out_end = 0;
    if (c->state == S_CLOSING)
        conn_close(c);
}

static void conn_accept(int listen_fd)
{
    int fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0)
        return;
    struct conn *c = calloc(1, sizeof *c);
    if (c == NULL) {
        close(fd);
        return;
    }
    c->fd = fd;
    c->state = S_HELLO;
    c->deadline = now_ms() + HELLO_TIMEOUT_MS;
    c->out_fd = c->err_fd = c->in_fd = c->file_fd = -1;
    c->ix_sock = c->ix_out = c->ix_err = c->ix_in = -1;
    conns[nconns++] = c;
}

/* ---- children ---- */

static void reap_children(void)
{
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        for (int i = 0; i < nconns; i++) {
            struct conn *c = conns[i];
            if (c->pid == pid && !c->reaped) {
                c->reaped = 1;
                c->wstatus = status;
                c->reaped_at = now_ms();
            }
        }
        /* anything else: an orphan (we are PID 1 or a subreaper), or the command of a
           connection that closed; reaped and forgotten */
    }
}

/* ---- the event loop ---- */

static void check_deadlines(struct conn *c, int64_t now)
{
    if (c->fd < 0)
        return;
    if (c->deadline && now >= c->deadline) {
        conn_close(c); /* a silent new connection, or a final ERROR nobody reads */
        return;
    }
    if (c->state == S_EXEC && c->exec_deadline && now >= c->exec_deadline && !c->reaped) {
        c->timed_out = 1;
        c->exec_deadline = 0;
        exec_kill(c);
    }
    if (c->state == S_EXEC && c->reaped && now >= c->reaped_at + OUTPUT_LINGER_MS) {
        if (c->out_fd >= 0)
            pump_output(c, &c->out_fd, FR_STDOUT);
        if (c->err_fd >= 0)
            pump_output(c, &c->err_fd, FR_STDERR);
    }
}

static int64_t next_wakeup(struct conn *c, int64_t soonest)
{
    int64_t d[3] = {c->deadline, c->state == S_EXEC ? c->exec_deadline : 0,
                    c->state == S_EXEC && c->reaped ? c->reaped_at + OUTPUT_LINGER_MS : 0};
    for (int i = 0; i < 3; i++)
        if (d[i] && (soonest == 0 || d[i] < soonest))
            soonest = d[i];
    return soonest;
}

static int add_poll(struct pollfd *pfds, int *n, int fd, short events)
{
    pfds[*n] = (struct pollfd){.fd = fd, .events = events};
    return (*n)++;
}

static void conn_step(struct conn *c, struct pollfd *pfds)
{
    short sock = c->ix_sock >= 0 ? pfds[c->ix_sock].revents : 0;
    if (sock & POLLOUT)
        conn_flush(c);
    if (c->fd >= 0 && sock & (POLLIN | POLLHUP | POLLERR | POLLRDHUP)) {
        if (pfds[c->ix_sock].events & POLLIN)
            conn_read(c); /* reads what the client sent last, then sees the close */
        else
            conn_close(c); /* gone while we were not reading: during a GET, say */
    }
    if (c->fd < 0)
        return;
    if (c->state == S_EXEC) {
        if (c->ix_in >= 0 && pfds[c->ix_in].revents)
            handle_frames(c); /* retry the STDIN frame waiting for pipe room */
        if (c->ix_out >= 0 && pfds[c->ix_out].revents && c->out_fd >= 0)
            pump_output(c, &c->out_fd, FR_STDOUT);
        if (c->ix_err >= 0 && pfds[c->ix_err].revents && c->err_fd >= 0)
            pump_output(c, &c->err_fd, FR_STDERR);
    }
    if (c->state == S_GET)
        pump_get(c);
}

/* What any step may have made possible: the EXIT, waiting frames, sending. */
static void conn_settle(struct conn *c)
{
    if (c->fd < 0)
        return;
    exec_maybe_finish(c);
    if (c->state == S_GET)
        pump_get(c);
    handle_frames(c); /* frames that waited for queue room or for the command's end */
    if (c->fd >= 0 && c->out_end > c->out_start)
        conn_flush(c);
}

void serve(int listen_fd)
{
    static struct pollfd pfds[2 + 4 * MAX_CONNECTIONS];
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    int sig_fd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
    if (sig_fd < 0)
        log_line("signalfd: %s (children reaped on a timer)", strerror(errno));
    set_nonblock(listen_fd);
    for (;;) {
        int n = 0, ix_listen = -1, ix_sig = -1;
        int64_t wake = 0;
        if (nconns < MAX_CONNECTIONS)
            ix_listen = add_poll(pfds, &n, listen_fd, POLLIN);
        if (sig_fd >= 0)
            ix_sig = add_poll(pfds, &n, sig_fd, POLLIN);
        for (int i = 0; i < nconns; i++) {
            struct conn *c = conns[i];
            int exec = c->state == S_EXEC;
            int frame_room = out_room(c) >= HEADER_SIZE + 1 + CHUNK + CONTROL_RESERVE;
            int stdin_blocked = exec && c->stdin_blocked;
            /* a GET waits for socket room only: its file is always readable */
            short ev = (short)(c->out_end > c->out_start || c->state == S_GET ? POLLOUT : 0);
            /* RDHUP: a vsock peer's close raises no POLLHUP, and a client that is gone
               must be noticed even while its connection is not being read */
            ev |= POLLRDHUP;
            if (wants_frames(c) && !stdin_blocked)
                ev |= POLLIN;
            c->ix_sock = add_poll(pfds, &n, c->fd, ev);
            c->ix_out = exec && c->out_fd >= 0 && frame_room ? add_poll(pfds, &n, c->out_fd, POLLIN) : -1;
            c->ix_err = exec && c->err_fd >= 0 && frame_room ? add_poll(pfds, &n, c->err_fd, POLLIN) : -1;
            c->ix_in = stdin_blocked && c->in_fd >= 0 ? add_poll(pfds, &n, c->in_fd, POLLOUT) : -1;
            wake = next_wakeup(c, wake);
        }
        int timeout = -1;
        if (wake) {
            int64_t left = wake - now_ms();
            timeout = left < 0 ? 0 : left > 60000 ? 60000 : (int)left;
        }
        if (sig_fd < 0 && (timeout < 0 || timeout > 100))
            timeout = 100;
        if (poll(pfds, (nfds_t)n, timeout) < 0 && errno != EINTR) {
            log_line("poll: %s", strerror(errno));
            sleep(1);
            continue;
        }
        if (ix_sig >= 0 && pfds[ix_sig].revents) {
            struct signalfd_siginfo si;
            while (read(sig_fd, &si, sizeof si) > 0) {
            }
        }
        reap_children();
        int64_t now = now_ms();
        for (int i = 0; i < nconns; i++) {
            conn_step(conns[i], pfds);
            check_deadlines(conns[i], now);
            conn_settle(conns[i]);
        }
        /* drop closed connections */
        int kept = 0;
        for (int i = 0; i < nconns; i++) {
            if (conns[i]->fd >= 0) {
                conns[kept++] = conns[i];
            } else {
                free(conns[i]->in);
                free(conns[i]);
            }
        }
        nconns = kept;
        if (ix_listen >= 0 && pfds[ix_listen].revents & POLLIN)
            while (nconns < MAX_CONNECTIONS) {
                int before = nconns;
                conn_accept(listen_fd);
                if (nconns == before)
                    break;
            }
    }
}


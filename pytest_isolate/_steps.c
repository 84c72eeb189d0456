/*
 * pytest_isolate._steps: a test process's setup steps run as raw system calls.
 *
 * A test process is a fork of pytest. Its setup in Python (rootfs.apply_rootfs,
 * the capability drop, Landlock, the filter) costs far more than the system
 * calls themselves: each line of Python touches objects whose reference counts
 * live on pages shared with pytest, and every page written is copied, one
 * fault at a time (docs/performance.md, point 31).
 *
 * So pytest's process compiles each plan once (steps.py: compile_setup for
 * the root, the hostname and the loopback; compile_secure for the capability
 * drop, Landlock and the filter) into a program of the steps below: the paths
 * already joined, the flags decided. What apply_rootfs checks of the host when
 * it runs (whether a source is a directory, whether a mask's target exists)
 * are steps too, checked here. The test process runs the program with run(),
 * reading its bytes and writing nothing of pytest's but its own stack. run()
 * stops at the first step that fails and returns its index and errno; Python
 * then names the step and the call exactly as its own steps would
 * (steps.failure), or makes that step again itself (sandbox._test_main).
 *
 * The program comes from pytest's own process (never from a test); every
 * read is still checked against its length, and a malformed one is refused
 * whole, (-1, EINVAL), before any step runs.
 *
 * Program: records, each a header (struct step) followed by ``nstr`` strings,
 * each a uint32 length, that many bytes and a NUL (only the filter's may hold
 * NULs).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <net/if.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef __NR_mount_setattr
#define __NR_mount_setattr 442
#endif
#ifndef AT_RECURSIVE
#define AT_RECURSIVE 0x8000
#endif
#ifndef __NR_landlock_create_ruleset
#define __NR_landlock_create_ruleset 444
#define __NR_landlock_add_rule 445
#define __NR_landlock_restrict_self 446
#endif
#ifndef PR_CAP_AMBIENT
#define PR_CAP_AMBIENT 47
#define PR_CAP_AMBIENT_CLEAR_ALL 4
#endif

/* The steps (rootfs.py's _OP_* mirror these numbers). */
enum {
    OP_MKDIR = 1,    /* s0: path, a: mode; an existing directory is fine; parents made */
    OP_MKFILE = 2,   /* s0: path; an empty file unless something is there (parents made) */
    OP_SYMLINK = 3,  /* s0: target, s1: path */
    OP_MOUNT = 4,    /* s0..s3: source, target, fstype, data ("" = NULL), a: flags */
    OP_SETATTR = 5,  /* s0: path, a: MOUNT_ATTR_* set recursively, b: remount flags without */
    OP_REQUIRE = 6,  /* s0: path that must exist (lstat) */
    OP_IF_LEXISTS = 7, /* s0: path; when absent skip ``skip`` steps */
    OP_IF_ISDIR = 8, /* s0: path; unless a directory (stat) skip ``skip`` steps */
    OP_IF_EXISTS = 9, /* s0: path; when absent (stat) skip ``skip`` steps */
    OP_JUMP = 10,    /* skip ``skip`` steps */
    OP_CHMOD = 11,   /* s0: path, a: mode */
    OP_CHDIR = 12,   /* s0: path */
    OP_PIVOT = 13,   /* pivot_root(".", ".") */
    OP_UMOUNT = 14,  /* s0: path, a: flags */
    OP_HOSTNAME = 15, /* s0: name */
    OP_LOOPBACK = 16, /* bring "lo" up */
    OP_WRITE = 17,   /* s0: path, s1: data */
    OP_CAPS = 18,    /* a: bounding bits to drop, b: permitted = effective (capabilities.py) */
    OP_NO_NEW_PRIVS = 19,
    OP_LANDLOCK = 20, /* s0: writes allowed beneath it only (syscalls.landlock_writes_beneath) */
    OP_SECCOMP = 21, /* s0: the filter's instructions (binary), loaded with TSYNC */
    OP_PRCTL = 22,   /* a: option, b: its argument */
    OP_UNSHARE = 23, /* a: flags */
};

#define MAX_STR 4

struct step {
    uint32_t op;
    int32_t onerr; /* < 0: stop; else skip that many steps and go on */
    uint32_t skip;
    uint32_t nstr;
    uint64_t a, b;
};

struct parsed {
    struct step head;
    const char *s[MAX_STR];
    uint32_t n[MAX_STR];
};

static int parse(const char *buf, size_t len, size_t *off, struct parsed *out) {
    if (len - *off < sizeof(struct step))
        return -1;
    memcpy(&out->head, buf + *off, sizeof(struct step));
    *off += sizeof(struct step);
    if (out->head.nstr > MAX_STR)
        return -1;
    for (uint32_t i = 0; i < MAX_STR; i++) {
        out->s[i] = NULL;
        out->n[i] = 0;
    }
    for (uint32_t i = 0; i < out->head.nstr; i++) {
        uint32_t n;
        if (len - *off < sizeof n)
            return -1;
        memcpy(&n, buf + *off, sizeof n);
        *off += sizeof n;
        if (len - *off < (size_t)n + 1 || buf[*off + n] != '\0')
            return -1;
        if (out->head.op != OP_SECCOMP && memchr(buf + *off, 0, n))
            return -1; /* only the filter is binary */
        out->n[i] = n;
        out->s[i] = buf + *off;
        *off += (size_t)n + 1;
    }
    return 0;
}

static const char *opt(const char *s) { return s && *s ? s : NULL; }

/* os.makedirs(path, mode, exist_ok=True): the parents with mode 0777 (less
 * the umask), the last with ``mode``; a last one there must be a directory. */
static int mkdir_p(const char *path, mode_t mode) {
    char tmp[PATH_MAX];
    struct stat st;
    size_t n = strlen(path);
    if (n >= sizeof tmp)
        return -ENAMETOOLONG;
    memcpy(tmp, path, n + 1);
    for (char *p = tmp + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = '\0';
        if (mkdir(tmp, 0777) != 0 && errno != EEXIST)
            return -errno;
        *p = '/';
    }
    if (mkdir(tmp, mode) == 0)
        return 0;
    if (errno != EEXIST)
        return -errno;
    return stat(tmp, &st) == 0 && S_ISDIR(st.st_mode) ? 0 : -EEXIST;
}

/* rootfs._mkdirs: one mkdir nearly always; an existing non-directory fails. */
static int do_mkdir(const char *path, mode_t mode) {
    struct stat st;
    if (mkdir(path, mode) == 0)
        return 0;
    if (errno == EEXIST)
        return stat(path, &st) == 0 && S_ISDIR(st.st_mode) ? 0 : -EEXIST;
    if (errno == ENOENT)
        return mkdir_p(path, mode);
    return -errno;
}

/* rootfs._mountpoint for a file. */
static int do_mkfile(const char *path) {
    struct stat st;
    char dir[PATH_MAX];
    if (lstat(path, &st) == 0)
        return 0;
    const char *slash = strrchr(path, '/');
    if (slash && slash != path) {
        size_t n = (size_t)(slash - path);
        if (n >= sizeof dir)
            return -ENAMETOOLONG;
        memcpy(dir, path, n);
        dir[n] = '\0';
        int rc = do_mkdir(dir, 0755);
        if (rc)
            return rc;
    }
    int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0)
        return -errno;
    close(fd);
    return 0;
}

struct mount_attr_v0 {
    uint64_t attr_set, attr_clr, propagation, userns_fd;
};

static int do_setattr(const char *path, uint64_t attr, unsigned long fallback) {
    struct mount_attr_v0 ma = {attr, 0, 0, 0};
    if (syscall(__NR_mount_setattr, AT_FDCWD, path, AT_RECURSIVE, &ma, sizeof ma) == 0)
        return 0;
    if (errno != ENOSYS)
        return -errno;
    return mount(NULL, path, NULL, fallback, NULL) == 0 ? 0 : -errno;
}

static int do_loopback(void) {
    struct ifreq ifr;
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    memset(&ifr, 0, sizeof ifr);
    memcpy(ifr.ifr_name, "lo", 3);
    int rc = ioctl(fd, SIOCGIFFLAGS, &ifr);
    if (rc == 0) {
        ifr.ifr_flags |= IFF_UP;
        rc = ioctl(fd, SIOCSIFFLAGS, &ifr);
    }
    rc = rc == 0 ? 0 : -errno;
    close(fd);
    return rc;
}

static int do_write(const char *path, const char *data) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    size_t n = strlen(data);
    ssize_t w = write(fd, data, n);
    int rc = w == (ssize_t)n ? 0 : (w < 0 ? -errno : -EIO);
    close(fd);
    return rc;
}

/* capabilities.apply_capabilities: the bounding set, the ambient set, then
 * permitted = effective = want with inheritable empty in one capset, then
 * no_new_privs; then the kernel's view checked (EPERM when it differs). */
static int do_caps(uint64_t drop, uint64_t want) {
    for (int bit = 0; bit < 64; bit++)
        if ((drop >> bit) & 1 && prctl(PR_CAPBSET_DROP, bit, 0, 0, 0) != 0)
            return -errno;
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 && errno != EINVAL)
        return -errno;
    struct __user_cap_header_struct head = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof data);
    for (int word = 0; word < 2; word++)
        data[word].effective = data[word].permitted = (uint32_t)(want >> (32 * word));
    if (syscall(SYS_capset, &head, data) != 0)
        return -errno;
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        return -errno;
    memset(data, 0, sizeof data);
    if (syscall(SYS_capget, &head, data) != 0)
        return -errno;
    for (int word = 0; word < 2; word++) {
        uint32_t expected = (uint32_t)(want >> (32 * word));
        if (data[word].effective != expected || data[word].permitted != expected ||
            data[word].inheritable != 0)
            return -EPERM;
    }
    for (int bit = 0; bit < 64; bit++)
        if ((want >> bit) & 1 && prctl(PR_CAPBSET_READ, bit, 0, 0, 0) != 1)
            return -EPERM;
    return 0;
}

/* syscalls.landlock_writes_beneath; nothing where the kernel has no Landlock. */
static int do_landlock(const char *root) {
    long abi = syscall(__NR_landlock_create_ruleset, NULL, 0, 1 /* VERSION */);
    if (abi < 1)
        return 0;
    uint64_t access = (1ULL << 1) /* WRITE_FILE */ | (abi >= 3 ? 1ULL << 14 /* TRUNCATE */ : 0);
    int ruleset = (int)syscall(__NR_landlock_create_ruleset, &access, sizeof access, 0);
    if (ruleset < 0)
        return -errno;
    int rc = 0, beneath = open(root, O_PATH | O_CLOEXEC);
    if (beneath < 0)
        rc = -errno;
    else {
        struct __attribute__((packed)) {
            uint64_t allowed_access;
            int32_t parent_fd;
        } rule = {access, beneath};
        if (syscall(__NR_landlock_add_rule, ruleset, 1 /* PATH_BENEATH */, &rule, 0) != 0)
            rc = -errno;
        close(beneath);
        if (rc == 0 && syscall(__NR_landlock_restrict_self, ruleset, 0) != 0)
            rc = -errno;
    }
    close(ruleset);
    return rc;
}

/* seccomp.load_filter: SECCOMP_SET_MODE_FILTER with TSYNC. */
static int do_seccomp(const char *filter, uint32_t size) {
    if (size == 0 || size % sizeof(struct sock_filter) || size / sizeof(struct sock_filter) > BPF_MAXINSNS)
        return -EINVAL;
    /* The kernel copies the instructions byte by byte: never read here, so
     * their place in the program need not be aligned. */
    struct sock_fprog prog = {(unsigned short)(size / sizeof(struct sock_filter)),
                              (struct sock_filter *)(uintptr_t)filter};
    long rc = syscall(SYS_seccomp, 1 /* SET_MODE_FILTER */, 1 /* TSYNC */, &prog);
    return rc == 0 ? 0 : (rc > 0 ? -EBUSY : -errno);
}

/* One step: 0 done, 1 its condition is false (skip), -errno failed. */
static int execute(const struct parsed *p) {
    struct stat st;
    const struct step *h = &p->head;
    switch (h->op) {
    case OP_MKDIR:
        return do_mkdir(p->s[0], (mode_t)h->a);
    case OP_MKFILE:
        return do_mkfile(p->s[0]);
    case OP_SYMLINK:
        return symlink(p->s[0], p->s[1]) == 0 ? 0 : -errno;
    case OP_MOUNT:
        return mount(opt(p->s[0]), p->s[1], opt(p->s[2]), (unsigned long)h->a, opt(p->s[3])) == 0
                   ? 0
                   : -errno;
    case OP_SETATTR:
        return do_setattr(p->s[0], h->a, (unsigned long)h->b);
    case OP_REQUIRE:
        return lstat(p->s[0], &st) == 0 ? 0 : -ENOENT;
    case OP_IF_LEXISTS:
        return lstat(p->s[0], &st) == 0 ? 0 : 1;
    case OP_IF_ISDIR:
        return stat(p->s[0], &st) == 0 && S_ISDIR(st.st_mode) ? 0 : 1;
    case OP_IF_EXISTS:
        return stat(p->s[0], &st) == 0 ? 0 : 1;
    case OP_JUMP:
        return 1;
    case OP_CHMOD:
        return chmod(p->s[0], (mode_t)h->a) == 0 ? 0 : -errno;
    case OP_CHDIR:
        return chdir(p->s[0]) == 0 ? 0 : -errno;
    case OP_PIVOT:
        return syscall(SYS_pivot_root, ".", ".") == 0 ? 0 : -errno;
    case OP_UMOUNT:
        return umount2(p->s[0], (int)h->a) == 0 ? 0 : -errno;
    case OP_HOSTNAME:
        return sethostname(p->s[0], strlen(p->s[0])) == 0 ? 0 : -errno;
    case OP_LOOPBACK:
        return do_loopback();
    case OP_WRITE:
        return do_write(p->s[0], p->s[1]);
    case OP_CAPS:
        return do_caps(h->a, h->b);
    case OP_NO_NEW_PRIVS:
        return prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 ? 0 : -errno;
    case OP_LANDLOCK:
        return do_landlock(p->s[0]);
    case OP_SECCOMP:
        return do_seccomp(p->s[0], p->n[0]);
    case OP_PRCTL:
        return prctl((int)h->a, (unsigned long)h->b, 0, 0, 0) >= 0 ? 0 : -errno;
    case OP_UNSHARE:
        return unshare((int)h->a) == 0 ? 0 : -errno;
    default:
        return -EINVAL;
    }
}

/* The number of strings each step takes. */
static int strings_of(uint32_t op) {
    switch (op) {
    case OP_PIVOT:
    case OP_LOOPBACK:
    case OP_JUMP:
    case OP_CAPS:
    case OP_NO_NEW_PRIVS:
    case OP_PRCTL:
    case OP_UNSHARE:
        return 0;
    case OP_SYMLINK:
    case OP_WRITE:
        return 2;
    case OP_MOUNT:
        return 4;
    default:
        return op >= OP_MKDIR && op <= OP_SECCOMP ? 1 : -1; /* the rest take one */
    }
}

static PyObject *run(PyObject *self, PyObject *arg) {
    (void)self;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) != 0)
        return NULL;
    const char *buf = view.buf;
    size_t len = (size_t)view.len, off = 0;
    struct parsed p;
    /* Checked whole before the first step runs. */
    while (off < len) {
        if (parse(buf, len, &off, &p) != 0 || strings_of(p.head.op) != (int)p.head.nstr) {
            PyBuffer_Release(&view);
            return Py_BuildValue("(ni)", (Py_ssize_t)-1, EINVAL); /* no step ran */
        }
    }
    /* Then run in order; a skip only goes forward, over steps parsed again. */
    Py_ssize_t index = 0, failed = -1;
    size_t skip = 0;
    int err = 0;
    for (off = 0; off < len; index++) {
        parse(buf, len, &off, &p);
        if (skip) {
            skip--;
            continue;
        }
        int rc = execute(&p);
        if (rc == 1)
            skip = p.head.skip;
        else if (rc < 0) {
            if (p.head.onerr < 0) {
                failed = index;
                err = -rc;
                break;
            }
            skip = (size_t)p.head.onerr;
        }
    }
    PyBuffer_Release(&view);
    if (failed < 0)
        Py_RETURN_NONE;
    return Py_BuildValue("(ni)", failed, err);
}

static PyMethodDef methods[] = {
    {"run", run, METH_O,
     "run(program, /)\n--\n\n"
     "Run a program (steps.py). None when every step succeeded, else (index\n"
     "of the step that failed, errno); (-1, EINVAL): malformed, nothing ran."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_steps",
    .m_doc = "A test process's setup steps as raw system calls (see _steps.c).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__steps(void) { return PyModule_Create(&module); }

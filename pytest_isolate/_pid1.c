/*
 * pytest_isolate._pid1: a rootless sandbox's pid 1 that is no copy of Python.
 *
 * Rootless, only a process inside a test's own user namespace can fork into
 * its pid namespace, so the zygote's child is pid 1 and forks the test
 * process. As a copy of the zygote (a copy of pytest), that pid 1 costs a
 * copy of pytest's page tables, the pages it writes, and their teardown at
 * its exit (docs/performance.md, Rootless). Here pid 1 is a clone(CLONE_VM)
 * child of the zygote instead: it runs a few lines of C on a small stack of
 * its own, in the zygote's memory (nothing copied, nothing freed at its
 * exit), makes only raw system calls (it shares the zygote's thread-local
 * storage, errno included), and does what pid 1 in Python did:
 *
 *   - forks the test process, a copy of the zygote as it is blocked inside
 *     spawn() below, which resumes there (__builtin_longjmp) and returns 0
 *     to Python, as fork() would;
 *   - reaps orphans; forwards the stack-dump signals to the test process;
 *   - on the kill request, or when the test process ends, SIGKILLs every
 *     other process of the namespace and says so on its pipe;
 *   - writes the test process's exit frame (protocol.encode_exit) and exits,
 *     which ends the namespace.
 *
 * The zygote is made non-dumpable first (its memory is pid 1's): ptrace of
 * a non-dumpable process needs CAP_SYS_PTRACE in the user namespace its
 * memory belongs to, the host's, which no test has. The test processes
 * inherit that, as they did from pid 1 in Python.
 *
 * x86_64 and glibc only (the clone trampoline, the thread descriptor);
 * elsewhere available() is false and sandbox.py keeps pid 1 in Python.
 */
#define PY_SSIZE_T_CLEAN
#undef _FORTIFY_SOURCE
#include <Python.h>

#include <errno.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <linux/futex.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__)
#define NATIVE 1
#else
#define NATIVE 0
#endif

#if NATIVE

#ifndef CLONE_INTO_CGROUP
#define CLONE_INTO_CGROUP 0x200000000ULL
#endif
#ifndef __WALL
#define __WALL 0x40000000
#endif
#define STACK_SIZE (32 * 1024)
#define POOL_SIZE 64
#define RSEQ_SIG 0x53053053

/* struct clone_args as far as the cgroup field (CLONE_ARGS_SIZE_VER2). */
struct clone_args_v2 {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls, set_tid,
        set_tid_size, cgroup;
};

/* The kernel's struct sigaction for rt_sigaction (no glibc translation). */
struct ksigaction {
    void *handler;
    unsigned long flags;
    void *restorer;
    uint64_t mask;
};

static inline long sys6(long n, long a, long b, long c, long d, long e, long f) {
    long ret;
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    register long r9 __asm__("r9") = f;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}
#define sys0(n) sys6((n), 0, 0, 0, 0, 0, 0)
#define sys1(n, a) sys6((n), (long)(a), 0, 0, 0, 0, 0)
#define sys2(n, a, b) sys6((n), (long)(a), (long)(b), 0, 0, 0, 0)
#define sys3(n, a, b, c) sys6((n), (long)(a), (long)(b), (long)(c), 0, 0, 0)
#define sys4(n, a, b, c, d) sys6((n), (long)(a), (long)(b), (long)(c), (long)(d), 0, 0)
#define sys5(n, a, b, c, d, e) sys6((n), (long)(a), (long)(b), (long)(c), (long)(d), (long)(e), 0)

/* clone3 whose child runs fn(arg) on the stack the arguments give, then
 * exits with its result: the parent's stack is the zygote's, never touched
 * by the child (rdi: args, rsi: size, rdx: fn, rcx: arg). */
__asm__(".text\n"
        ".globl isolate_pid1_clone3\n"
        ".hidden isolate_pid1_clone3\n"
        ".type isolate_pid1_clone3,@function\n"
        "isolate_pid1_clone3:\n"
        "  mov %rdx, %r8\n"
        "  mov %rcx, %r9\n"
        "  mov $435, %eax\n"
        "  syscall\n"
        "  test %rax, %rax\n"
        "  jz 1f\n"
        "  ret\n"
        "1:\n"
        "  xor %ebp, %ebp\n"
        "  mov %r9, %rdi\n"
        "  call *%r8\n"
        "  mov %eax, %edi\n"
        "  mov $231, %eax\n"
        "  syscall\n"
        "  hlt\n"
        ".size isolate_pid1_clone3, .-isolate_pid1_clone3\n");
long isolate_pid1_clone3(struct clone_args_v2 *args, size_t size, int (*fn)(void *), void *arg);

/* What the zygote hands pid 1; read by pid 1 before it answers (state). */
struct pid1_args {
    int result_fd;
    int killed_fd;
    int sig_kill_all;
    int sig_dump;
    int sig_fault;
    long tid_addr;
    /* futex word: 0 until pid 1 answers; then the test process's pid (in
     * pid 1's namespace), or -errno. */
    int state;
};

static struct pid1_args ARGS;
/* Where the test process resumes: inside spawn(), blocked in its wait. */
static void *JUMP[5];
/* spawn()'s saved signal mask and alternate stack, restored in both. */
static sigset_t SAVED_MASK;
static stack_t SAVED_ALTSTACK;
static struct {
    void *stack;
    pid_t pid;
} POOL[POOL_SIZE];

extern const ptrdiff_t __rseq_offset __attribute__((weak));
extern const unsigned int __rseq_size __attribute__((weak));

static inline uint64_t sigbit(int sig) { return 1ULL << (sig - 1); }

static __attribute__((noinline, noreturn)) void resume_test_process(void) {
    __builtin_longjmp(JUMP, 1);
}

static void write_all(int fd, const char *data, long size) {
    while (size > 0) {
        long n = sys3(SYS_write, fd, data, size);
        if (n == -EINTR)
            continue;
        if (n <= 0)
            return;
        data += n;
        size -= n;
    }
}

/* protocol.encode_exit(status): a 4-byte big-endian length, then the JSON. */
static void write_exit_frame(int fd, int status) {
    static const char head[] = "{\"type\":\"exit\",\"payload\":{\"status\":";
    char frame[4 + sizeof head + 16];
    char digits[12];
    int n = 0, len = 0;
    unsigned int value = (unsigned int)status; /* a wait status: never negative */
    do {
        digits[n++] = (char)('0' + value % 10);
        value /= 10;
    } while (value && n < (int)sizeof digits);
    for (size_t i = 0; i < sizeof head - 1; i++)
        frame[4 + len++] = head[i];
    while (n)
        frame[4 + len++] = digits[--n];
    frame[4 + len++] = '}';
    frame[4 + len++] = '}';
    frame[0] = (char)((len >> 24) & 0xff);
    frame[1] = (char)((len >> 16) & 0xff);
    frame[2] = (char)((len >> 8) & 0xff);
    frame[3] = (char)(len & 0xff);
    write_all(fd, frame, 4 + len);
}

static void kill_others(int killed_fd) {
    sys2(SYS_kill, -1, SIGKILL);
    if (killed_fd >= 0)
        write_all(killed_fd, "k", 1);
}

static void close_all_but(int a, int b) {
    int keep[2] = {a < b ? a : b, a < b ? b : a};
    unsigned int from = 0;
    for (int i = 0; i < 2; i++) {
        if (keep[i] < 0)
            continue;
        if ((unsigned int)keep[i] > from)
            sys3(SYS_close_range, from, keep[i] - 1, 0);
        from = (unsigned int)keep[i] + 1;
    }
    if (sys3(SYS_close_range, from, ~0U, 0) < 0) {
        /* Before Linux 5.9: one at a time, as far as a process usually has. */
        for (unsigned int fd = from; fd < 4096; fd++)
            sys1(SYS_close, fd);
    }
}

static int pid1_main(void *unused) {
    (void)unused;
    const int result_fd = ARGS.result_fd, killed_fd = ARGS.killed_fd;
    const int sig_kill_all = ARGS.sig_kill_all, sig_dump = ARGS.sig_dump,
              sig_fault = ARGS.sig_fault;
    const long tid_addr = ARGS.tid_addr;
    /* Every signal is blocked (spawn() blocked them before the clone): no
     * handler of the zygote's ever runs here. The test process keeps them
     * (it is forked first); here each disposition goes back to the default,
     * then only what the loop waits for stays blocked. A pid 1 ignores
     * default-handled signals sent from inside its namespace. */
    sys2(SYS_prctl, PR_SET_PDEATHSIG, SIGKILL);
    sys0(SYS_setsid);
    long test = sys5(SYS_clone, SIGCHLD | CLONE_CHILD_SETTID, 0, 0, tid_addr, 0);
    if (test == 0)
        resume_test_process();
    struct ksigaction dfl = {SIG_DFL, 0, 0, 0};
    for (int sig = 1; sig <= 64; sig++)
        if (sig != SIGKILL && sig != SIGSTOP)
            sys4(SYS_rt_sigaction, sig, &dfl, 0, 8);
    int *state = &ARGS.state;
    if (test < 0) {
        __atomic_store_n(state, (int)test, __ATOMIC_SEQ_CST);
        sys3(SYS_futex, state, FUTEX_WAKE_PRIVATE, 1);
        return 1;
    }
    close_all_but(result_fd, killed_fd);
    /* The zygote goes on from here: ARGS is not read again. */
    __atomic_store_n(state, (int)test, __ATOMIC_SEQ_CST);
    sys3(SYS_futex, state, FUTEX_WAKE_PRIVATE, 1);

    uint64_t wanted = sigbit(SIGCHLD) | sigbit(sig_kill_all) | sigbit(sig_dump) | sigbit(sig_fault);
    sys4(SYS_rt_sigprocmask, SIG_SETMASK, &wanted, 0, 8);
    for (;;) {
        char info[128];
        long sig = sys4(SYS_rt_sigtimedwait, &wanted, info, 0, 8);
        if (sig == sig_kill_all) {
            kill_others(killed_fd);
        } else if (sig == sig_dump || sig == sig_fault) {
            sys2(SYS_kill, test, sig);
        } else {
            for (;;) {
                int status = 0;
                long pid = sys4(SYS_wait4, -1, &status, WNOHANG | __WALL, 0);
                if (pid == -EINTR)
                    continue;
                if (pid == test) {
                    if (killed_fd >= 0)
                        kill_others(killed_fd);
                    write_exit_frame(result_fd, status);
                    return 0;
                }
                if (pid == -ECHILD)
                    return 0;
                if (pid <= 0)
                    break;
            }
        }
    }
}

/* A stack no live pid 1 runs on: a slot whose pid 1 has gone (ESRCH; a pid
 * reused since only makes a slot look busy), or a new one. */
static int free_slot(void) {
    for (int i = 0; i < POOL_SIZE; i++) {
        if (POOL[i].stack == NULL) {
            void *stack = mmap(NULL, STACK_SIZE, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
            if (stack == MAP_FAILED)
                return -1;
            POOL[i].stack = stack;
            POOL[i].pid = 0;
            return i;
        }
        if (POOL[i].pid == 0 || (kill(POOL[i].pid, 0) < 0 && errno == ESRCH))
            return i;
    }
    errno = EAGAIN;
    return -1;
}

static void restore_in_test_process(void) {
    pthread_sigmask(SIG_SETMASK, &SAVED_MASK, NULL);
    if (!(SAVED_ALTSTACK.ss_flags & SS_DISABLE))
        sigaltstack(&SAVED_ALTSTACK, NULL); /* a CLONE_VM child's is cleared */
    if (&__rseq_size != NULL && &__rseq_offset != NULL && __rseq_size > 0) {
        /* glibc registered its rseq area at start; a CLONE_VM child has none,
         * nor has its fork: register this thread's again. */
        char *tp;
        __asm__("mov %%fs:0, %0" : "=r"(tp));
        unsigned int len = __rseq_size > 32 ? __rseq_size : 32;
        syscall(SYS_rseq, tp + __rseq_offset, len, 0, RSEQ_SIG);
    }
}

static PyObject *spawn(PyObject *self, PyObject *args) {
    unsigned long long flags;
    int sibling, result_fd, killed_fd, cgroup_fd, sig_kill_all, sig_dump, sig_fault;
    long tid_addr;
    (void)self;
    if (!PyArg_ParseTuple(args, "Kpiiiliii", &flags, &sibling, &result_fd, &killed_fd, &cgroup_fd,
                          &tid_addr, &sig_kill_all, &sig_dump, &sig_fault))
        return NULL;
    if (sig_kill_all < 1 || sig_kill_all > 64 || sig_dump < 1 || sig_dump > 64 || sig_fault < 1 ||
        sig_fault > 64 || result_fd < 0) {
        PyErr_SetString(PyExc_ValueError, "spawn: a signal number or descriptor is out of range");
        return NULL;
    }
    int slot = free_slot();
    if (slot < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    /* pid 1 runs in this process's memory: nobody may ptrace it (above). */
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    ARGS.result_fd = result_fd;
    ARGS.killed_fd = killed_fd;
    ARGS.sig_kill_all = sig_kill_all;
    ARGS.sig_dump = sig_dump;
    ARGS.sig_fault = sig_fault;
    ARGS.tid_addr = tid_addr;
    ARGS.state = 0;
    struct clone_args_v2 clone_args = {0};
    clone_args.flags = (uint64_t)flags | CLONE_VM | (sibling ? CLONE_PARENT : 0) |
                       (cgroup_fd >= 0 ? CLONE_INTO_CGROUP : 0);
    clone_args.exit_signal = sibling ? 0 : SIGCHLD;
    clone_args.stack = (uint64_t)(uintptr_t)POOL[slot].stack;
    clone_args.stack_size = STACK_SIZE;
    clone_args.cgroup = cgroup_fd >= 0 ? (uint64_t)cgroup_fd : 0;
    sigset_t all;
    sigfillset(&all);
    PyOS_BeforeFork();
    pthread_sigmask(SIG_SETMASK, &all, &SAVED_MASK);
    sigaltstack(NULL, &SAVED_ALTSTACK);
    if (__builtin_setjmp(JUMP)) {
        /* The test process: a copy of this process taken below, while it
         * waits for pid 1's answer. */
        restore_in_test_process();
        PyOS_AfterFork_Child();
        return PyLong_FromLong(0);
    }
    long pid = isolate_pid1_clone3(&clone_args, sizeof clone_args, pid1_main, NULL);
    int answer = 0;
    if (pid > 0) {
        POOL[slot].pid = (pid_t)pid;
        for (;;) {
            answer = __atomic_load_n(&ARGS.state, __ATOMIC_SEQ_CST);
            if (answer != 0)
                break;
            struct timespec second = {1, 0};
            syscall(SYS_futex, &ARGS.state, FUTEX_WAIT_PRIVATE, 0, &second, NULL, 0);
            if (__atomic_load_n(&ARGS.state, __ATOMIC_SEQ_CST) == 0 && kill((pid_t)pid, 0) < 0 &&
                errno == ESRCH) {
                answer = -ECHILD; /* pid 1 died before it answered */
                break;
            }
        }
    }
    pthread_sigmask(SIG_SETMASK, &SAVED_MASK, NULL);
    PyOS_AfterFork_Parent();
    if (pid < 0) {
        errno = (int)-pid;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (answer < 0) {
        errno = -answer;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(pid);
}

#endif /* NATIVE */

static PyObject *available(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyBool_FromLong(NATIVE);
}

static PyMethodDef methods[] = {
    {"available", available, METH_NOARGS, "Whether spawn() works on this platform."},
#if NATIVE
    {"spawn", spawn, METH_VARARGS,
     "spawn(flags, sibling, result_fd, killed_fd, cgroup_fd, tid_addr, kill_all, dump, fault)\n"
     "--\n\n"
     "Clone a pid 1 in C (CLONE_VM) into the namespaces ``flags``, which forks\n"
     "the test process. Returns pid 1's pid in the caller, 0 in the test\n"
     "process; raises OSError when the clone or pid 1's fork failed."},
#endif
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_pid1",
    .m_doc = "A rootless sandbox's pid 1 in C (see _pid1.c).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__pid1(void) { return PyModule_Create(&module); }

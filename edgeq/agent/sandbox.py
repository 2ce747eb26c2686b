"""The runner's sandbox: Linux namespaces around one job. `python -m edgeq.agent.sandbox [--hide P]... DATA JOB_DIR`.

A runner executes a model file that someone sent: a bug in a runtime's parser makes that file code running as
the agent's user. rlimits bound what such code can spend (jobs.py); this bounds what it can reach. Before
anything else is imported (a process enters a user namespace only while it has one thread, and numpy starts
more), this entry point:
- enters new user, mount, network, IPC and PID namespaces, mapping the agent's uid and gid to themselves: the
  runner gains nothing outside, it only loses;
- makes every mount read-only, so nothing can be planted where the agent or its user would run it;
- covers the agent's data directory with an empty tmpfs and binds this job's directory back at the same path,
  the one writable place (no exec): other jobs, the stored models and the journal are gone;
- covers each hidden path (the token file, the TLS key, `agent serve --sandbox-hide`) with an empty file or
  directory;
- leaves the network with a loopback that is down: no address reaches the agent, the LAN or anything else;
- mounts a /proc of the new PID namespace, in which the runner is process 2 under a small init: no other
  process (the agent's memory, its /proc/PID/root) can be seen;
- drops every capability, the bounding set too, and sets no_new_privs;
- filters system calls (seccomp): socket(2) only for the families the empty network namespace confines (no
  Unix socket, which is reached by its path from any namespace: a session bus or docker.sock would let code
  run outside), no io_uring.
Three processes result: this one waits outside and ends as the runner ended (exit code, or the same signal),
the namespace's init reports the runner's wait status to it through a pipe, and the runner. A runner as
process 1 would ignore SIGXCPU (a PID namespace's init ignores signals it has no handler for), so the job's
CPU-time limit would end it only at the hard limit, by a SIGKILL that reads as the OOM killer.

No job runs less confined than the agent says: a step that fails ends the job (exit 125, one line in
runner.log). The agent runs `--probe` at start to learn whether this kernel allows it (jobs.probe_sandbox).
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import struct
import sys

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
_PR_SET_PDEATHSIG, _PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS, _PR_CAP_AMBIENT = 1, 24, 38, 47
_CAPABILITY_V3 = 0x20080522
SANDBOX_FAILED = 125  # the exit code when the sandbox could not be made
RUNNER_HIDDEN = 124  # --probe's exit code when it was made but hides what the runner needs
ERROR_PREFIX = "edgeq sandbox: "  # how its errors start in runner.log
PROBE_FILE = "sandbox-probe"
DESCRIPTION = ("Linux namespaces: read-only filesystem, the job's directory the only writable place, the data "
               "directory{hidden} hidden, no network or Unix sockets, own PID namespace, no capabilities")

_libc = ctypes.CDLL(None, use_errno=True)
for _name, _types in (("mount", [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]),
                      ("unshare", [ctypes.c_int]),
                      ("prctl", [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong])):
    if hasattr(_libc, _name):  # Linux's; elsewhere _enter refuses first
        getattr(_libc, _name).argtypes = _types


class SandboxError(OSError):
    """A step of making the sandbox failed; `errno` is the system call's."""

    def __str__(self) -> str:
        return self.strerror


def _call(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise SandboxError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = (lambda s: None if s is None else os.fsencode(s))
    _call(_libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _mounts() -> dict[str, int]:
    """Every mount point this namespace shows, with the nosuid / nodev / noexec it has (from mountinfo: a stat of
    the point would set off an automount)."""
    with open("/proc/self/mountinfo", "rb") as f:
        lines = f.read().splitlines()
    unescape = (lambda b: os.fsdecode(b.replace(b"\\040", b" ").replace(b"\\011", b"\t")
                                      .replace(b"\\012", b"\n").replace(b"\\134", b"\\")))
    flags = {b"nosuid": MS_NOSUID, b"nodev": MS_NODEV, b"noexec": MS_NOEXEC}
    mounts = {}
    for line in lines:  # a point mounted over is listed again later; the later mount is the one a path reaches
        fields = line.split(b" ")
        mounts[unescape(fields[4])] = sum(flags.get(opt, 0) for opt in set(fields[5].split(b",")))
    return mounts


def _read_only_everywhere() -> None:
    """Remount every mount read-only, keeping its nosuid / nodev / noexec (a user namespace may not clear them)."""
    for point, kept in _mounts().items():
        try:
            _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | kept)
        except SandboxError as exc:
            if exc.errno in (errno.EACCES, errno.ENOENT, errno.ENOTDIR):
                continue  # a point this user cannot reach (inside another user's directory): the runner cannot either
            raise


def _hide(path: str) -> None:
    """An empty read-only directory over a directory, /dev/null over anything else."""
    if os.path.isdir(path):
        _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, "size=4k,mode=0500")
    elif os.path.lexists(path):
        _mount("/dev/null", path, None, MS_BIND)


def _enter(data_dir: str, job_dir: str, hide: list[str]) -> None:
    """User, mount, network and IPC namespaces, with the filesystem as the module says (the PID namespace is
    entered by the next child)."""
    if not sys.platform.startswith("linux"):
        raise SandboxError(errno.ENOSYS, f"Linux namespaces: this is {sys.platform}")
    uid, gid = os.getuid(), os.getgid()
    _call(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWPID), "unshare")
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1")
    _write("/proc/self/gid_map", f"{gid} {gid} 1")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing done here reaches the agent's namespace
    job_fd = os.open(job_dir, os.O_PATH | os.O_DIRECTORY)  # in this namespace, before the data directory is covered
    _read_only_everywhere()
    _mount("tmpfs", data_dir, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64k,mode=0700")
    os.makedirs(job_dir, mode=0o700)
    _mount(f"/proc/self/fd/{job_fd}", job_dir, None, MS_BIND)
    _mount(None, job_dir, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | MS_NOEXEC)  # writable again
    _mount(None, data_dir, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.close(job_fd)
    for path in hide:
        _hide(path)


def _drop_privileges() -> None:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        _call(_libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0), f"dropping capability {cap}")
    _libc.prctl(_PR_CAP_AMBIENT, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL; EINVAL before Linux 4.3, which has none
    header = struct.pack("Ii", _CAPABILITY_V3, 0)
    _call(_libc.capset(header, bytes(24)), "capset")  # effective, permitted, inheritable: all empty
    _call(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


# Per ABI: its seccomp audit arch, and the numbers of socket(2) and io_uring_setup(2).
_SYSCALLS = {"x86_64": (0xC000003E, 41, 425), "aarch64": (0xC00000B7, 198, 425), "arm": (0x40000028, 281, 425),
             "riscv64": (0xC00000F3, 198, 425)}
_SOCKET_FAMILIES = (2, 10, 16)  # AF_INET, AF_INET6, AF_NETLINK: confined to the empty network namespace


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def _abi() -> str:
    """This process's system-call ABI: the kernel's machine, but 32-bit ARM for a 32-bit Python (Raspberry Pi OS's
    32-bit userland runs on a 64-bit kernel, whose machine says aarch64)."""
    machine, bits = os.uname().machine, struct.calcsize("P") * 8
    if machine.startswith(("aarch64", "arm")):
        return "aarch64" if bits == 64 else "arm"
    return machine if bits == 64 else f"{machine} ({bits}-bit)"


def _filter_sockets() -> None:
    """A seccomp filter: socket(2) only for the families a network namespace confines. A Unix socket is reached by
    its path, in any namespace (a session bus, ssh-agent, docker.sock would let code outside run), and vsock
    reaches a VM's host. io_uring is refused (it opens sockets past the filter); so is any other architecture's
    system call (x86's 32-bit ABIs)."""
    abi = _abi()
    if abi not in _SYSCALLS:
        raise SandboxError(errno.ENOSYS, f"no system-call filter for {abi} here")
    arch, nr_socket, nr_io_uring_setup = _SYSCALLS[abi]
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    allow, refuse = 0x7FFF0000, 0x00050000  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | errno
    n = len(_SOCKET_FAMILIES)
    program = [
        (ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, refuse | errno.EACCES),  # seccomp_data.arch
        (ld, 0, 0, 0),  # seccomp_data.nr
        (jge, 0, 1, 0x40000000), (ret, 0, 0, refuse | errno.EACCES),  # x32's numbers (x86_64's flag bit)
        (jeq, 0, 1, nr_io_uring_setup), (ret, 0, 0, refuse | errno.ENOSYS),
        (jeq, 0, n + 2, nr_socket), (ld, 0, 0, 16),  # seccomp_data.args[0], low half: the family
        *((jeq, n - i, 0, family) for i, family in enumerate(_SOCKET_FAMILIES)),  # each jumps to allow
        (ret, 0, 0, refuse | errno.EACCES), (ret, 0, 0, allow)]
    filters = (_SockFilter * len(program))(*(_SockFilter(*op) for op in program))
    prog = _SockFprog(len(program), filters)
    _call(_libc.prctl(22, 2, ctypes.addressof(prog), 0, 0), "seccomp")  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER


_APPARMOR_USERNS = "/proc/sys/kernel/apparmor_restrict_unprivileged_userns"  # Ubuntu 23.10 and later


def explain(exc: OSError) -> str:
    """A failed step, with what usually causes it on a board's kernel."""
    text = str(exc)
    if text.startswith("unshare:"):
        hint = {errno.EINVAL: "this kernel was built without user namespaces (CONFIG_USER_NS)",
                errno.ENOSPC: "user.max_user_namespaces is 0",
                errno.EPERM: "unprivileged user namespaces are off (kernel.unprivileged_userns_clone = 0) or a "
                             "security module refuses them"}.get(exc.errno)
        return f"{text} ({hint})" if hint else text
    if exc.errno in (errno.EPERM, errno.EACCES):
        try:
            with open(_APPARMOR_USERNS) as f:
                restricted = f.read().strip() == "1"
        except OSError:
            restricted = False
        if restricted:
            return f"{text} (AppArmor restricts unprivileged user namespaces: {_APPARMOR_USERNS} is 1)"
    return text


def _exit_as(status: int) -> None:
    """End this process as a child with wait status `status` ended: the same exit code, or the same signal."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(status))


def _runner(job_dir: str) -> int:
    from .runner import main

    return main([job_dir])


def _probe(job_dir: str) -> int:
    """What `--probe` runs in place of a job: the runner's imports (the Python install is still readable), then a
    file written in the job's directory (it is writable, and the same directory outside)."""
    import importlib

    try:
        importlib.import_module(".runner", __package__)
    except ImportError as exc:
        sys.stderr.write(f"{ERROR_PREFIX}the runner cannot start in it: {exc}\n")
        return RUNNER_HIDDEN
    with open(os.path.join(job_dir, PROBE_FILE), "w") as f:
        f.write("ok\n")
    return 0


def _init(report_fd: int, job_dir: str, target) -> None:
    """Process 1 of the new PID namespace: its /proc, no privileges, then `target(job_dir)` in its child."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _drop_privileges()
    _filter_sockets()
    runner = os.fork()
    if runner == 0:
        os.close(report_fd)
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        os.chdir(job_dir)
        os.environ["TMPDIR"] = job_dir
        try:
            code = target(job_dir)
        except BaseException:  # the runner's own failure, not the sandbox's (the runner catches its own)
            import traceback

            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    while True:  # the namespace's orphans are reparented here: reap them, report the runner
        pid, status = os.wait()
        if pid == runner:
            os.write(report_fd, struct.pack("i", status))
            os._exit(0)


def run(data_dir: str, job_dir: str, hide: list[str], target=_runner) -> None:
    """Make the sandbox and run `target(job_dir)` (the job's runner) in it; ends this process as that ended."""
    try:
        _enter(data_dir, job_dir, hide)
        read_fd, write_fd = os.pipe()
        init = os.fork()
        if init == 0:
            os.close(read_fd)
            try:
                _init(write_fd, job_dir, target)
            except OSError as exc:
                sys.stderr.write(f"{ERROR_PREFIX}{explain(exc)}\n")
            os._exit(SANDBOX_FAILED)
    except OSError as exc:
        sys.stderr.write(f"{ERROR_PREFIX}{explain(exc)}\n")
        os._exit(SANDBOX_FAILED)
    os.close(write_fd)
    report = os.read(read_fd, 4)
    _, status = os.waitpid(init, 0)
    _exit_as(struct.unpack("i", report)[0] if len(report) == 4 else status)


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m edgeq.agent.sandbox", description="Run a job's runner sandboxed.")
    parser.add_argument("--probe", action="store_true", help="only check that a runner could start in it")
    parser.add_argument("--hide", action="append", default=[], help="a path to cover; repeatable")
    parser.add_argument("data_dir")
    parser.add_argument("job_dir")
    args = parser.parse_args(argv)
    data_dir, job_dir = os.path.abspath(args.data_dir), os.path.abspath(args.job_dir)
    if os.path.commonpath([data_dir, job_dir]) != data_dir or job_dir == data_dir:
        parser.error(f"the job directory {job_dir} is not inside the data directory {data_dir}")
    run(data_dir, job_dir, [os.path.abspath(p) for p in args.hide], _probe if args.probe else _runner)


if __name__ == "__main__":
    main(sys.argv[1:])

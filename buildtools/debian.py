"""``build.py test-debian12`` / ``test-debian13``: set-up from nothing and the whole suite in a
fresh Debian chroot (debootstrap; needs root)."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from .common import OUT, ROOT, BuildError, say, shown


# Debian release -> suite; each chroot lives in $GEOCHAT_DEBIAN<N>_DIR (default /var/tmp/...)
SUITES = {"12": "bookworm", "13": "trixie"}


def chroot_dir(release: str) -> Path:
    return Path(os.environ.get(f"GEOCHAT_DEBIAN{release}_DIR", f"/var/tmp/geochat-debian{release}"))
DEBIAN_MIRROR = "http://deb.debian.org/debian"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
CHROOT_CA = "/etc/geochat-host-ca.crt"  # a copy apt's ca-certificates never regenerates
CHROOT_CHECKOUT = "/work/geochat"
BINDS = ["/proc", "/sys", "/dev", "/dev/pts", "/dev/shm"]


def chroot_copy_config(root: Path) -> None:
    """What a chroot needs to reach the package indexes: DNS, the host's CA bundle, pip's
    configuration."""
    for source in (Path("/etc/resolv.conf"), Path("/etc/pip.conf")):
        if source.exists():
            shutil.copy2(source, root / source.relative_to("/"), follow_symlinks=True)
    if Path("/etc/xdg/pip").is_dir():
        shutil.copytree("/etc/xdg/pip", root / "etc/xdg/pip", dirs_exist_ok=True)
    if HOST_CA.exists():
        shutil.copy2(HOST_CA, root / CHROOT_CA.lstrip("/"))
        (root / HOST_CA.relative_to("/")).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(HOST_CA, root / HOST_CA.relative_to("/"))


KEPT_IN_CHROOT = (".venv", ".venv-qgis", ".venv-qt6check")  # set-up, stamped


def chroot_copy_checkout(root: Path) -> Path:
    """The checkout's files (tracked and untracked, not ignored) into the chroot, in place of
    what an earlier copy left; the chroot's own .venv* stay (its set-up is stamped)."""
    target = root / CHROOT_CHECKOUT.lstrip("/")
    if target.is_dir():  # files deleted from the checkout must not linger there
        for entry in target.iterdir():
            if entry.name in KEPT_IN_CHROOT:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for name in (n for n in listed if n):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def mounted(path: Path) -> bool:
    return subprocess.run(["mountpoint", "-q", str(path)]).returncode == 0


def chroot_run(root: Path, command: str, log, check: bool = True) -> int:
    """``command`` (bash) as root inside the chroot, with a clean environment."""
    env = ["env", "-i", "HOME=/root", "LANG=C.UTF-8", "TERM=dumb", "DEBIAN_FRONTEND=noninteractive",
           "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           f"PIP_CERT={CHROOT_CA}", f"SSL_CERT_FILE={CHROOT_CA}", f"REQUESTS_CA_BUNDLE={CHROOT_CA}"]
    if os.environ.get("CI"):
        env.append(f"CI={os.environ['CI']}")
    process = subprocess.Popen(["chroot", str(root), *env, "bash", "-c", command],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        print(line, end="", flush=True)
        log.write(line)
    code = process.wait()
    if check and code != 0:
        raise BuildError(f"in the chroot {root} `{command}` failed with exit {code}")
    return code


def test_debian(release: str, fresh: bool, pytest_args: list[str]) -> int:
    """Make a Debian ``release`` chroot with debootstrap (13: trixie, QGIS 3.40, Python 3.13;
    12: bookworm, QGIS 3.22, Python 3.11), run set-up from nothing and then the whole test
    suite in it. Needs root. Log: out/debian<release>.log."""
    suite, name = SUITES[release], f"Debian {release}"
    if os.geteuid() != 0:
        raise BuildError(f"the {name} tier needs root (debootstrap, chroot, mount)")
    root = chroot_dir(release) / "root"
    log_path = OUT / f"debian{release}.log"
    if fresh and root.exists():
        for point in reversed(BINDS):
            subprocess.run(["umount", "-l", str(root / point.lstrip("/"))], capture_output=True)
        shutil.rmtree(root)
    OUT.mkdir(exist_ok=True)
    times: dict[str, float] = {}
    with open(log_path, "w", encoding="utf-8") as log:
        started = time.monotonic()
        if not (root / "etc" / "debian_version").exists():
            if not shutil.which("debootstrap"):
                subprocess.run(["apt-get", "install", "-y", "-q", "debootstrap"], check=True)
            say(f"debootstrap {suite} into {root} (~2 min)")
            root.mkdir(parents=True, exist_ok=True)
            subprocess.run(["debootstrap", "--variant=minbase", suite, str(root), DEBIAN_MIRROR],
                           check=True, stdout=log, stderr=subprocess.STDOUT)
        times["debootstrap"] = time.monotonic() - started
        chroot_copy_config(root)
        chroot_copy_checkout(root)
        done: list[Path] = []
        try:
            for point in BINDS:
                target = root / point.lstrip("/")
                target.mkdir(parents=True, exist_ok=True)
                if not mounted(target):
                    subprocess.run(["mount", "--bind", point, str(target)], check=True)
                    done.append(target)
            started = time.monotonic()
            chroot_run(root, "command -v python3 >/dev/null || "
                       "(apt-get update -q && apt-get install -y -q --no-install-recommends "
                       "python3 git ca-certificates)", log)
            chroot_run(root, f"cp {CHROOT_CA} /etc/ssl/certs/ca-certificates.crt && cd "
                       f"{CHROOT_CHECKOUT} && python3 build.py setup", log)
            times["setup"] = time.monotonic() - started
            started = time.monotonic()
            code = chroot_run(root, f"cd {CHROOT_CHECKOUT} && python3 build.py test "
                              + " ".join(map(shlex.quote, pytest_args)), log, check=False)
            times["test"] = time.monotonic() - started
        finally:
            for target in reversed(done):
                subprocess.run(["umount", "-l", str(target)], capture_output=True)
        summary = ", ".join(f"{step} {seconds / 60:.1f} min" for step, seconds in times.items())
        say(f"{name} tier: exit {code}; {summary} (log: {shown(log_path)})")
        log.write(f"[build] {name} tier: exit {code}; {summary}\n")
    return code

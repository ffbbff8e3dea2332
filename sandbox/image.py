"""Build the sandbox image locally.

There is no container registry to pull from, so the image is made from Debian packages:
``debootstrap`` a minimal root file system, then ``docker import`` it. The tag is derived
from the package list and suite, so changing either produces a new image and an unchanged
list reuses the one already built.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ["python3", "python3-pytest", "git", "coreutils", "procps"]
SUITE = "bookworm"
IMAGE_REPO = "loopwright-sandbox"
SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_APT_SOURCES_LIST = Path("/etc/apt/sources.list")
_APT_SOURCES_DIR = Path("/etc/apt/sources.list.d")


class ImageBuildError(RuntimeError):
    """The sandbox image could not be built; the message says what to fix."""


def default_image() -> str:
    """Tag for the current package list: content-addressed so rebuilds happen only on change."""
    key = ",".join(sorted(PACKAGES)) + "|" + SUITE
    return f"{IMAGE_REPO}:{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _docker_client():
    import docker

    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:  # DockerException, requests errors, missing socket
        raise ImageBuildError(
            f"Docker is unreachable ({exc}); start the Docker daemon (e.g. `dockerd`) "
            "and check that this user may use /var/run/docker.sock"
        ) from exc
    return client


def image_exists(tag: str) -> bool:
    """True if the local Docker engine has an image with this tag."""
    import docker

    try:
        _docker_client().images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return True


def _is_security(uri: str, suites: list[str]) -> bool:
    return uri.rstrip("/").endswith("-security") or any(s.endswith("-security") for s in suites)


def _apt_mirror() -> str:
    """The main Debian archive this machine already uses, read from its apt sources.

    Read at run time, never hard-coded: the machine decides which mirror it may reach.
    """
    candidates: list[tuple[str, list[str]]] = []
    if _APT_SOURCES_DIR.is_dir():
        for f in sorted(_APT_SOURCES_DIR.glob("*.sources")):
            for stanza in f.read_text(errors="replace").split("\n\n"):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line or line[:1].isspace():
                        continue
                    k, v = line.split(":", 1)
                    fields[k.strip().lower()] = v.strip()
                if "deb" not in fields.get("types", "").split():
                    continue
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                suites = fields.get("suites", "").split()
                for uri in fields.get("uris", "").split():
                    candidates.append((uri, suites))
    files = [_APT_SOURCES_LIST] if _APT_SOURCES_LIST.is_file() else []
    if _APT_SOURCES_DIR.is_dir():
        files += sorted(_APT_SOURCES_DIR.glob("*.list"))
    for f in files:
        for line in f.read_text(errors="replace").splitlines():
            parts = line.split("#", 1)[0].split()
            if not parts or parts[0] != "deb":
                continue
            parts = parts[1:]
            if parts and parts[0].startswith("["):  # [arch=amd64 signed-by=...] options
                while parts and not parts[0].endswith("]"):
                    parts = parts[1:]
                parts = parts[1:]
            if len(parts) >= 2:
                candidates.append((parts[0], [parts[1]]))
    for uri, suites in candidates:
        if uri.startswith(("http://", "https://", "file:/")) and not _is_security(uri, suites):
            if "/debian" in uri or any(s.startswith(SUITE) for s in suites):
                return uri
    raise ImageBuildError(
        f"no Debian archive found in {_APT_SOURCES_DIR}/*.sources or {_APT_SOURCES_LIST}; "
        "configure apt with a Debian mirror (a `deb` line or deb822 `URIs:`) and retry"
    )


def build_image(force: bool = False, log=print) -> str:
    """Return the sandbox image tag, building it first if it is not there yet (or ``force``)."""
    tag = default_image()
    client = _docker_client()
    if not force and image_exists(tag):
        return tag
    if shutil.which("debootstrap") is None:
        raise ImageBuildError(
            "debootstrap is not installed; it is needed to build the sandbox image: "
            "run `apt-get install debootstrap` (as root) and retry"
        )
    mirror = _apt_mirror()
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="loopwright-rootfs-"))
    try:
        log(f"building {tag}: debootstrap {SUITE} with {', '.join(PACKAGES)} from {mirror}")
        cmd = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(tmp), mirror]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
            raise ImageBuildError(
                f"debootstrap failed (exit {proc.returncode}) with mirror {mirror}; "
                f"check the package list {PACKAGES} and that the mirror is reachable:\n{tail}"
            )
        # Drop the apt cache: it is only needed while bootstrapping.
        shutil.rmtree(tmp / "var/cache/apt/archives", ignore_errors=True)
        (tmp / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
        (tmp / "workspace").mkdir(exist_ok=True)
        log(f"importing root file system into Docker as {tag}")
        tar = subprocess.Popen(["tar", "-C", str(tmp), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
        imp = subprocess.run(
            ["docker", "import", "-c", f"ENV PATH={SANDBOX_PATH}", "-c", "WORKDIR /workspace", "-", tag],
            stdin=tar.stdout, capture_output=True, text=True,
        )
        tar.stdout.close()
        tar_rc = tar.wait()
        if tar_rc != 0 or imp.returncode != 0:
            raise ImageBuildError(
                f"docker import of {tmp} as {tag} failed (tar exit {tar_rc}, import exit {imp.returncode}): "
                f"{imp.stderr.strip()}"
            )
        client.images.get(tag).tag(IMAGE_REPO, "latest")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"built {tag} in {time.monotonic() - started:.0f} s")
    return tag

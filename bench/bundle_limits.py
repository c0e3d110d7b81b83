"""What refusing a hostile bundle archive costs, beside unpacking the shipped one (issue 11 point 2).

Each case runs :func:`webapp.serving.bundle.unpack` (with its default caps: 512 MiB unpacked, 1 MiB bundle.json)
in a fresh subprocess and reports its CPU seconds, the subprocess's peak RSS (the archive's bytes included), the
bytes it left on
disk and what it answered, and the CPU and RSS over the shipped bundle's, measured in the same run:

- ``shipped``: ``models/research-tasks`` packed (18 MB, unpacks to 30 MB): the baseline;
- ``gzip-bomb``: a 1 GiB member of zeros (about 1 MB compressed: what made a worker spend 28 s and 1.3 GB);
- ``sparse-64GiB``: an old-GNU sparse member declaring 64 GiB (4 KB; it was a 500 with MemoryError);
- ``big-manifest``: a bundle.json of 2 MB junk metrics.

    python bench/bundle_limits.py [--bundle models/research-tasks]
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from webapp.serving.bundle import BUNDLE_FILES, MANIFEST_FILE, pack  # noqa: E402


def archive(members: list[tuple[str, int, io.RawIOBase | io.BytesIO]]) -> bytes:
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for name, size, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mode = size, 0o644
                tar.addfile(info, data)
    return raw.getvalue()


class Zeros(io.RawIOBase):
    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        buffer[:] = bytes(len(buffer))
        return len(buffer)


def sparse_64_gib() -> bytes:
    info = tarfile.TarInfo("encoder.onnx")
    info.type, info.size = tarfile.GNUTYPE_SPARSE, 512
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[398:410] = tarfile.itn(512, 12, tarfile.GNU_FORMAT)
    header[483:495] = tarfile.itn(64 * 1024**3, 12, tarfile.GNU_FORMAT)
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return gzip.compress(bytes(header) + b"x" * 512 + bytes(1024), mtime=0)


def cases(bundle: Path) -> dict[str, bytes]:
    files = {name: (bundle / name).read_bytes() for name in BUNDLE_FILES}
    manifest = json.loads(files[MANIFEST_FILE])
    manifest["metrics"] = {f"junk{i}": "x" * 1000 for i in range(2000)}
    junk = json.dumps(manifest).encode()
    return {
        "shipped": pack(bundle),
        "gzip-bomb": archive([("encoder.onnx", 1024**3, Zeros())]),
        "sparse-64GiB": sparse_64_gib(),
        "big-manifest": archive(
            [(n, len(d), io.BytesIO(d)) for n, d in files.items() if n != MANIFEST_FILE]
            + [(MANIFEST_FILE, len(junk), io.BytesIO(junk))]
        ),
    }


CHILD = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from webapp.serving.bundle import BundleError, unpack
data = Path(sys.argv[1]).read_bytes()
start = time.process_time()
try:
    unpack(data, Path(sys.argv[2]) / "bundle")
    answer = "unpacked"
except BundleError as exc:
    answer = "refused: " + str(exc)[:70]
cpu = time.process_time() - start
# VmHWM, not ru_maxrss: on Linux a child's ru_maxrss starts at its parent's.
status = Path("/proc/self/status").read_text().splitlines()
peak = int(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
disk = sum(p.stat().st_size for p in Path(sys.argv[2]).rglob("*") if p.is_file())
print(json.dumps({"cpu": cpu, "rss_kb": peak, "disk": disk, "answer": answer}))
"""


def run(data: bytes) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "archive.tar.gz"
        source.write_bytes(data)
        target = Path(tmp) / "out"
        target.mkdir()
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(source), str(target), str(REPO)],
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        )
        return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=REPO / "models" / "research-tasks")
    args = parser.parse_args()
    started = time.process_time()
    built = cases(args.bundle)
    print(f"built the archives in {time.process_time() - started:.1f} CPU s")
    results = {name: (len(data), run(data)) for name, data in built.items()}
    base = results["shipped"][1]
    print(f"{'case':14} {'archive':>10} {'CPU s':>7} {'peak RSS':>10} {'on disk':>11}  x shipped (CPU/RSS)  answer")
    for name, (size, r) in results.items():
        ratio = f"{r['cpu'] / max(base['cpu'], 1e-6):.2f} / {r['rss_kb'] / max(base['rss_kb'], 1):.2f}"
        print(
            f"{name:14} {size:>10,} {r['cpu']:>7.3f} {r['rss_kb'] / 1024:>8.1f}MB {r['disk']:>11,}  {ratio:>19}  "
            f"{r['answer']}"
        )
    print(f"(this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB peak)")


if __name__ == "__main__":
    main()

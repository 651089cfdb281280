"""Run the fuzz targets one after another, each for a set time, and report runs, coverage and findings.

    python -m fuzz.run [--seconds 600] [--targets dump,vhost_user,relay_guest,relay_device] [--write FILE]

Each target runs in its own process under libFuzzer (atheris) with the C extensions built by
`tools/build-sanitized fuzz` (ASan + UBSan + coverage) and atheris's ASan runtime preloaded. It starts
from the committed seeds (fuzz/seeds/TARGET) and keeps what it finds in build/fuzz/corpus/TARGET, so a
second run goes on from the first. A crash, a sanitizer report, a leak or a timeout is written to
build/fuzz/crashes/ and makes this exit 1, with the command that replays it.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "fuzz"

# target -> (module argv, libFuzzer flags of its own)
TARGETS: dict[str, tuple[list[str], list[str]]] = {
    "dump": (["fuzz.target_dump"], ["-max_len=65536"]),
    "vhost_user": (["fuzz.target_vhost_user"], ["-max_len=16384"]),
    # value profile: comparisons against ring sizes and indexes guide the mutations too
    "relay_guest": (["fuzz.target_relay", "guest"], ["-max_len=512", "-use_value_profile=1"]),
    "relay_device": (["fuzz.target_relay", "device"], ["-max_len=512", "-use_value_profile=1"]),
}
COMMON = ["-rss_limit_mb=3072", "-timeout=30", "-print_final_stats=1"]
STATUS = re.compile(r"^#(\d+)\s+(\w+)\s+cov: (\d+) ft: (\d+) corp: (\d+)")
SHOWN = ("INITED", "DONE", "pulse")


@dataclass
class Result:
    target: str
    seconds: float
    runs: int = 0
    cov: int = 0
    features: int = 0
    corpus: int = 0
    seeds: int = 0
    crashed: bool = False
    log: str = ""


def runtime() -> str:
    """atheris's ASan + libFuzzer runtime, which the C build's instrumentation calls into."""
    import atheris

    so = Path(atheris.__file__).resolve().parent.parent / "asan_with_fuzzer.so"
    if not so.exists():
        raise SystemExit(f"{so}: missing (atheris installed without its sanitizer runtimes?)")
    return str(so)


def run_target(name: str, seconds: float) -> Result:
    module, flags = TARGETS[name]
    corpus, seeds = BUILD / "corpus" / name, ROOT / "fuzz" / "seeds" / name
    crashes, logs = BUILD / "crashes", BUILD / "logs"
    for d in (corpus, crashes, logs):
        d.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, LD_PRELOAD=runtime(), VDPA_SVQ_EXT_DIR=str(BUILD),
               # CPython never frees some of its own allocations; a small quarantine keeps RSS near the real use
               ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:quarantine_size_mb=16",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1", PYTHONPATH=str(ROOT))
    argv = [sys.executable, "-m", *module, f"-max_total_time={int(seconds)}", *COMMON, *flags,
            f"-artifact_prefix={crashes}/{name}-", str(corpus), str(seeds)]
    result = Result(name, seconds, seeds=len(list(seeds.iterdir())))
    log_path = logs / f"{name}.log"
    print(f"== {name}: {seconds:g} s, seeds {seeds.relative_to(ROOT)}, corpus {corpus.relative_to(ROOT)}", flush=True)
    with open(log_path, "w") as log, subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                                      stderr=subprocess.STDOUT, text=True, errors="replace") as p:
        assert p.stdout is not None
        for line in p.stdout:
            if line.startswith("INFO: Instrumenting"):
                continue
            log.write(line)
            if m := STATUS.match(line):
                result.runs, result.cov, result.features, result.corpus = (int(m[1]), int(m[3]), int(m[4]),
                                                                           int(m[5]))
                if m[2] in SHOWN:
                    print(f"   {line.rstrip()}", flush=True)
            elif "ERROR" in line or "SUMMARY" in line or "Uncaught" in line:
                print(f"   {line.rstrip()}", flush=True)
        result.crashed = p.wait() != 0
    result.log = str(log_path.relative_to(ROOT))
    if result.crashed:
        print(f"!! {name}: FOUND A BUG (log {result.log}); replay: "
              f"VDPA_SVQ_EXT_DIR={BUILD} LD_PRELOAD={runtime()} {' '.join(argv[:2 + len(module)])} "
              f"{crashes}/{name}-<crash file>", flush=True)
    return result


def table(results: list[Result], started: str, load: float) -> str:
    lines = [f"`make fuzz` on {started}: {os.cpu_count()} CPUs, load average at start "
             f"{load:.1f}; one target at a time, each in one process.", "",
             "| target | seconds | inputs run | coverage (edges, C + Python) | features | corpus (seeds) | result |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        lines.append(f"| {r.target} | {r.seconds:g} | {r.runs:,} | {r.cov:,} | {r.features:,} | "
                     f"{r.corpus:,} ({r.seeds}) | {'CRASH: ' + r.log if r.crashed else 'clean'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=600.0, help="per target (default 600)")
    ap.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of {', '.join(TARGETS)}")
    ap.add_argument("--write", metavar="FILE", help="put the results table in FILE (its fuzz section)")
    args = ap.parse_args(argv)
    names = [t for t in args.targets.split(",") if t]
    unknown = [t for t in names if t not in TARGETS]
    if unknown:
        ap.error(f"unknown target(s) {', '.join(unknown)}; the targets are {', '.join(TARGETS)}")
    if not any(BUILD.glob("_relay*.so")):
        raise SystemExit(f"{BUILD}: no sanitizer build of the C relay (run tools/build-sanitized fuzz)")
    started, load = time.strftime("%Y-%m-%d"), os.getloadavg()[0]
    results = [run_target(t, args.seconds) for t in names]
    text = table(results, started, load)
    print(text)
    if args.write:
        from bench.vhost_user import write_section

        write_section(args.write, "fuzz", text)
    return 1 if any(r.crashed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

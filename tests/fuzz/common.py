"""What the fuzz harnesses share: the working folders, libFuzzer's default options, and the memory-spike guard.

A harness run keeps its files under ``.fuzz/TARGET/`` in the repository root (ignored by git): ``seeds/`` (the
real files it starts from, rebuilt on every run), ``corpus/`` (what libFuzzer adds), ``TARGET.dict`` (tokens
for the mutator) and the artifacts (``crash-*``, ``timeout-*``, ``oom-*``) of anything it finds.
"""

from __future__ import annotations

import os
import re
import resource
import sys
import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / ".fuzz"


class Finding(AssertionError):
    """An input broke a harness's contract (an invariant, or a memory spike); raised to stop libFuzzer."""


class RssGuard:
    """Flags the input during which the process's peak RSS grew by more than ``limit_mb`` over the peak
    after the first input (imports and first-call set-up done).

    ``getrusage``'s peak RSS never falls, so the input that raised it is exactly the one that spiked, however
    briefly: libFuzzer's own ``-rss_limit_mb`` samples once a second and misses a spike that is freed in time.
    """

    def __init__(self, limit_mb: int) -> None:
        self.limit_kb = limit_mb * 1024
        self.baseline_kb: int | None = None

    @staticmethod
    def peak_kb() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def check(self, what: str) -> None:
        peak = self.peak_kb()
        if self.baseline_kb is None:
            self.baseline_kb = peak
            return
        if peak - self.baseline_kb > self.limit_kb:
            grew = (peak - self.baseline_kb) // 1024
            self.baseline_kb = peak  # report once: a fuzzer told to go on (-keep_going...) is not stopped again
            raise Finding(f"memory spike: peak RSS grew by {grew} MiB (limit {self.limit_kb // 1024}) on {what}")


@dataclass(frozen=True)
class Known:
    """A finding already reported (and covered by a regression test), recognised by its exception type, a
    pattern of its message and the function of ours it was raised in."""

    name: str
    exc_type: type[BaseException]
    message: str  # a regular expression searched in str(exc)
    function: str  # the innermost frame under pipeline/ must be in this function ("": a harness's own check)

    def matches(self, exc: BaseException) -> bool:
        if not isinstance(exc, self.exc_type) or not re.search(self.message, str(exc)):
            return False
        if not self.function:
            return True
        ours = [f for f in traceback.extract_tb(exc.__traceback__) if f"{os.sep}pipeline{os.sep}" in f.filename]
        return bool(ours) and ours[-1].name == self.function


class KnownFindings:
    """Lets a long run go on past the findings already known: each is counted (and its first input printed)
    instead of stopping libFuzzer. ``FUZZ_STRICT=1`` stops on them too (to reproduce one)."""

    def __init__(self, known: Iterable[Known]) -> None:
        self.known = list(known)
        self.strict = os.environ.get("FUZZ_STRICT", "") not in ("", "0")
        self.seen: Counter[str] = Counter()

    def tolerate(self, exc: BaseException, data: bytes) -> bool:
        """Whether ``exc`` is a known finding (counted) rather than a new one."""
        if self.strict:
            return False
        for k in self.known:
            if k.matches(exc):
                self.count(k.name, data, f"{type(exc).__name__}: {exc}")
                return True
        return False

    def skip(self, name: str, data: bytes, why: str) -> bool:
        """Whether to skip an input recognised before the call as a known finding's (one that cannot be
        recognised by its exception, e.g. a memory spike); counted like the others."""
        if self.strict:
            return False
        self.count(name, data, why)
        return True

    def count(self, name: str, data: bytes, what: str) -> None:
        self.seen[name] += 1
        n = self.seen[name]
        if n == 1:
            print(f"\nknown finding {name} ({what}) on {len(data)} bytes starting {data[:24]!r}; "
                  "counted from now on", file=sys.stderr, flush=True)
        elif str(n).strip("0") == "1":  # 10, 100, 1000...
            print(f"\nknown findings so far: {self.summary()}", file=sys.stderr, flush=True)

    def summary(self) -> str:
        return ", ".join(f"{k}: {n}" for k, n in self.seen.items()) or "none"


def write_seeds(folder: Path, seeds: Iterable[tuple[str, bytes]]) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    n = 0
    for name, data in seeds:
        (folder / name).write_bytes(data)
        n += 1
    return n


def write_dict(path: Path, tokens: Iterable[bytes]) -> None:
    """A libFuzzer dictionary: one quoted token a line, non-printable bytes as ``\\xNN``."""
    lines = []
    for t in tokens:
        body = "".join(chr(b) if 32 <= b < 127 and b not in (34, 92) else f"\\x{b:02X}" for b in t)
        lines.append(f'"{body}"')
    path.write_text("\n".join(lines) + "\n")


def libfuzzer_argv(target: str, argv: list[str], defaults: dict[str, str], dict_path: Path) -> list[str]:
    """``argv`` with this target's defaults for the options it does not set, and its corpus folders when it
    names no corpus or input file (a file given alone is re-run, as libFuzzer does)."""
    given = {a.split("=", 1)[0] for a in argv[1:] if a.startswith("-")}
    out = [argv[0]]
    for key, value in {**defaults, "-dict": str(dict_path),
                       "-artifact_prefix": f"{WORK / target}{os.sep}"}.items():
        if key not in given:
            out.append(f"{key}={value}")
    out += argv[1:]
    if not any(not a.startswith("-") for a in argv[1:]):
        out += [str(WORK / target / "corpus"), str(WORK / target / "seeds")]
    return out


def main(
    target: str,
    test_one_input: Callable[[bytes], None],
    seeds: Callable[[], Iterable[tuple[str, bytes]]],
    tokens: Iterable[bytes],
    defaults: dict[str, str],
) -> None:
    """Build the seeds and the dictionary, then hand over to libFuzzer (``sys.argv`` takes its options)."""
    import atheris

    base = WORK / target
    (base / "corpus").mkdir(parents=True, exist_ok=True)
    n = write_seeds(base / "seeds", seeds())
    write_dict(base / f"{target}.dict", tokens)
    argv = libfuzzer_argv(target, sys.argv, defaults, base / f"{target}.dict")
    print(f"fuzz {target}: {n} seeds in {base / 'seeds'}; argv {' '.join(argv[1:])}", file=sys.stderr, flush=True)
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()

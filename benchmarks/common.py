"""Shared benchmark plumbing: timing, floors, and the JSON every benchmark writes.

GPU timing uses ``triton.testing.do_bench`` (median, after warm-up); CPU timing is the median of
repeated runs with the thread count recorded. Every result file carries the device, library
versions and the git commit, so figures can be traced to the code that produced them.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"


def help_description(doc: str) -> str:
    """A script's ``--help`` description: its docstring's first paragraph (not its first line, which
    may stop mid-sentence), on one line."""
    return " ".join(doc.split("\n\n")[0].split())


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower()


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int = 20, warmup: int = 3, gpu_window_ms: float = 100) -> float:
    """Median milliseconds of ``fn()`` (on the GPU, do_bench runs for about ``gpu_window_ms``)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=max(1, gpu_window_ms // 4), rep=gpu_window_ms, return_mode="median"))
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


L2_BYTES = 50 * 2**20  # H100 L2 (PERFORMANCE.md: rotate inputs smaller than this)


def rotation_copies(nbytes: int, device: torch.device, most: int = 8) -> int:
    """How many copies of ``nbytes`` of inputs to cycle through so that each timed call reads them
    from memory, not from L2 (about three L2s' worth; one on a CPU)."""
    return max(1, min(most, -(-3 * L2_BYTES // max(1, nbytes)))) if device.type == "cuda" else 1


def cycling(fn: Callable[..., object], inputs: List[tuple]) -> Callable[[], object]:
    """A no-argument call of ``fn(*inputs[i])``, ``i`` advancing by one each call and wrapping."""
    position = itertools.cycle(inputs)
    return lambda: fn(*next(position))


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory allocated by ``fn()`` above what was allocated before it (CUDA only; -1 elsewhere)."""
    if device.type != "cuda":
        return -1
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - before)


def measured_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read plus written), measured now."""
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() * 4 / (ms * 1e-3)


def floor_ms(flops: float, nbytes: float, peak_flops: float, bandwidth: float) -> float:
    """The roofline floor: ``max(flops / peak, bytes / bandwidth)`` in milliseconds."""
    return max(flops / peak_flops if peak_flops else 0.0, nbytes / bandwidth if bandwidth == bandwidth else 0.0) * 1e3


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def installed_versions(*names: str) -> Dict[str, Optional[str]]:
    """The installed version of each distribution in ``names`` (None when absent), read from the
    package metadata without importing it; a name also matches its build variants (``nvidia-dali``
    matches ``nvidia-dali-cuda130``)."""
    from importlib import metadata

    found = {}
    for dist in metadata.distributions():
        installed = (dist.metadata["Name"] or "").lower()
        for name in names:
            if installed == name or installed.startswith(name + "-"):
                found.setdefault(name, dist.version)
    return {name: found.get(name) for name in names}


def write_results(name: str, device: torch.device, rows: List[Dict], extra: Dict = None, out_dir: Path = None, device_label: str = None) -> Path:
    """Write ``{name}_{device}.json`` with environment facts and ``rows``; return the path.
    ``device_label`` names a target that is not this machine's device (code compiled for one)."""
    out_dir = Path(out_dir or os.environ.get("FASTDENSE_BENCH_OUT", RESULTS_DIR))
    out_dir.mkdir(parents=True, exist_ok=True)
    import triton

    payload = {
        "benchmark": name,
        "device": device_label or device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "commit": git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
        **(extra or {}),
    }
    path = out_dir / f"{name}_{slug(device_label or device_name(device))}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def print_table(rows: List[Dict], columns: List[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


# ----------------------------------------------------------------------------- host time per call


class NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` does nothing but count."""

    def __init__(self):
        self.launches = 0

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        self.launches += 1


def per_call_us(fn, calls: int, rounds: int, before=None, after=None) -> float:
    """Median over ``rounds`` of the mean microseconds per call of ``fn`` over ``calls`` calls."""
    samples = []
    for _ in range(rounds):
        if before:
            before()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
        if after:
            after()
    return statistics.median(samples)


def aten_ops_per_call(fn) -> int:
    """The aten ops (nested ones included) the profiler records in one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for event in prof.events() if event.name.startswith("aten::"))


def stub_kernels(module) -> Dict[str, NoLaunch]:
    """Replace every ``*_kernel`` of ``module`` by a :class:`NoLaunch` (host timing on a CPU)."""
    stubs = {name: NoLaunch() for name in vars(module) if name.endswith("_kernel")}
    for name, stub in stubs.items():
        setattr(module, name, stub)
    return stubs


def host_cost(fn, device: torch.device, stubs: Dict[str, NoLaunch], calls: int, rounds: int, enqueue: bool = True) -> Dict[str, float]:
    """What one call of ``fn`` costs the host, after a warm-up (which compiles kernels on a GPU).

    On a GPU: ``enqueue_us`` while a queued ``torch.cuda._sleep`` keeps the GPU busy, so no call waits
    for it (skipped unless ``enqueue``: a call that synchronises inside has no such rate), and
    ``synced_us`` with a synchronisation after each call. On a CPU, with the kernels stubbed: ``us``
    and ``launches``. Both: ``aten_ops``, as the profiler records them (nested ones included)."""
    for _ in range(3):
        fn()
    cost = {}
    if device.type == "cuda":
        if enqueue:
            busy = lambda: torch.cuda._sleep(int(2e8))  # noqa: E731  (~0.1 s of GPU time)
            cost["enqueue_us"] = per_call_us(fn, calls, rounds, before=busy, after=torch.cuda.synchronize)
        synced = lambda: (fn(), torch.cuda.synchronize())  # noqa: E731
        cost["synced_us"] = per_call_us(synced, calls, rounds, before=torch.cuda.synchronize)
    else:
        cost["us"] = per_call_us(fn, calls, rounds)
        launches = sum(stub.launches for stub in stubs.values())
        fn()
        cost["launches"] = sum(stub.launches for stub in stubs.values()) - launches
    cost["aten_ops"] = aten_ops_per_call(fn)
    return cost


class HostRun:
    """A ``--host`` benchmark: one thread; on a CPU the ``*_kernel`` functions of ``kernels`` stubbed;
    rows of :func:`host_cost` figures, printed as they come, then written to ``{name}_{device}.json``."""

    def __init__(self, name: str, kernels, quick: bool, calls: int, rounds: int):
        torch.set_num_threads(1)
        self.name = name + ("_quick" if quick else "")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.stubs = stub_kernels(kernels) if self.device.type == "cpu" else {}
        self.calls, self.rounds, self.rows = calls, rounds, []

    def add(self, row: Dict, fns: Dict[str, Callable[[], object]], enqueue: bool = True) -> None:
        """Append ``row`` with the host cost of each ``fns[label]`` as ``{label}_{figure}``."""
        for label, fn in fns.items():
            cost = host_cost(fn, self.device, self.stubs, self.calls, self.rounds, enqueue=enqueue)
            row.update({f"{label}_{key}": value for key, value in cost.items()})
        self.rows.append(row)
        print("  ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)

    def write(self, extra: Dict = None) -> Path:
        extra = {"threads": 1, "calls_per_round": self.calls, "rounds": self.rounds, "kernels_stubbed": sorted(self.stubs), **(extra or {})}
        path = write_results(self.name, self.device, self.rows, extra=extra)
        print_table(self.rows, list(self.rows[0]))
        print(f"wrote {path}", flush=True)
        return path

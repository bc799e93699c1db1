"""Shared pieces of the benchmark scripts: a moto S3 server, process-tree memory sampling."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout, uninstalled

os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench-key-id")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench-secret-value")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ----------------------------------------------------------------------------- memory


def _tree(root: int, exclude: set[int]) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in exclude:
            continue
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _mem_kib(pid: int) -> tuple[int, int]:
    """(PSS, RSS) in KiB of one process, 0 when it is gone."""
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1])
    except OSError:
        pass
    return pss, rss


class MemorySampler:
    """Peak summed PSS/RSS of a process tree, sampled in a background thread.

    Sampling is not free: reading ``smaps_rollup`` walks each process's page tables, measured
    at ≈ 75 ms of CPU per sample of a 21-process local Ray. Every 0.25 s that was ≈ 30 % of a
    core taken from the job being measured on 2 cores (and at the driver's priority, above
    Ray's workers at nice 15); so every 2 s, from a thread at the lowest priority (a
    steady-state pipeline's peak does not need a finer grid)."""

    def __init__(self, root: int, exclude: set[int], interval: float = 2.0):
        self.root, self.exclude, self.interval = root, exclude, interval
        self.peak_pss = self.peak_rss = 0
        self.peak_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> tuple[int, int, int]:
        pids = _tree(self.root, self.exclude)
        pss = rss = 0
        for pid in pids:
            p, r = _mem_kib(pid)
            pss, rss = pss + p, rss + r
        return pss, rss, len(pids)

    def _run(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread only
        except OSError:
            pass
        while not self._stop.is_set():
            pss, rss, n = self.sample()
            self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
            self.peak_procs = max(self.peak_procs, n)
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# ----------------------------------------------------------------------------- CPU time


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """User + system CPU seconds each process has used so far (from /proc; gone = absent)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[pid] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return out


def process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def short_name(cmdline: str) -> str:
    """A process's name for a table: Ray's process title, a program's or script's file name."""
    words = cmdline.split(" ")
    if "python" in words[0].rsplit("/", 1)[-1] and len(words) > 1:
        words = [w for w in words[1:] if not w.startswith("-")] or words
    return words[0].rsplit("/", 1)[-1]


class CpuSplit:
    """Where the cores went during a block: CPU seconds per group of processes of a tree (the
    processes alive at its end; a worker that exited inside the block is not counted). Reads
    /proc/<pid>/stat twice (not smaps: no page-table walk), so it costs nothing measurable;
    the processes' titles every ``every_s`` (an actor that is exiting at the end, as a
    dataset's actors do, has lost its command line by then)."""

    def __init__(self, root: int, extra: dict[str, int], every_s: float = 2.0):
        self.root, self.extra, self.every_s = root, extra, every_s
        self.named = {p: name for name, p in extra.items()} | {root: "driver"}
        self.groups: dict[str, float] = {}
        self.processes: dict[str, float] = {}
        self.wall_s = 0.0
        self.titles: dict[int, str] = {}  # the last non-empty command line seen per process
        self._stop = threading.Event()

    def _watch_titles(self) -> None:
        while True:
            for pid in self.pids():
                self.titles[pid] = process_name(pid) or self.titles.get(pid, "")
            if self._stop.wait(self.every_s):
                return

    def group(self, pid: int, cmdline: str) -> str:
        if pid in self.named:
            return self.named[pid]
        if "Scorer" in cmdline:
            return "scorer actor"
        if cmdline.startswith("ray::") and "Agent" not in cmdline:
            return "other Ray workers"
        return "Ray's own processes"

    def pids(self) -> list[int]:
        return _tree(self.root, set()) + list(self.extra.values())

    @staticmethod
    def machine() -> list[int]:
        """The machine's CPU ticks: user, nice, system, idle, iowait, irq, softirq, steal."""
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:9]]

    def __enter__(self) -> CpuSplit:
        self._machine = self.machine()
        self._t = time.perf_counter()
        self._before = cpu_seconds(self.pids())
        self._watcher = threading.Thread(target=self._watch_titles, daemon=True)
        self._watcher.start()
        return self

    def __exit__(self, *exc) -> None:
        self.wall_s = time.perf_counter() - self._t
        self._stop.set()
        self._watcher.join()
        tick = os.sysconf("SC_CLK_TCK")
        delta = [(b - a) / tick for a, b in zip(self._machine, self.machine())]
        self.idle_s, self.steal_s = delta[3] + delta[4], delta[7]
        self.busy_s = sum(delta) - self.idle_s - self.steal_s
        for pid, cpu in cpu_seconds(self.pids()).items():
            cmdline = process_name(pid) or self.titles.get(pid, "")
            used = cpu - self._before.get(pid, 0.0)
            g = self.group(pid, cmdline)
            self.groups[g] = self.groups.get(g, 0.0) + used
            name = self.named.get(pid) or short_name(cmdline) or str(pid)
            self.processes[name] = self.processes.get(name, 0.0) + used

    def busiest(self, n: int = 8) -> str:
        """The ``n`` process names (Ray's process titles) that used the most CPU."""
        top = sorted(self.processes.items(), key=lambda kv: -kv[1])[:n]
        return ", ".join(f"{k} {v:.1f}" for k, v in top)

    def line(self) -> str:
        total = sum(self.groups.values())
        parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(self.groups.items(),
                                                             key=lambda kv: -kv[1]))
        return (f"CPU seconds in {self.wall_s:.1f}s of wall ({os.cpu_count()} cores = "
                f"{self.wall_s * (os.cpu_count() or 1):.0f} CPU-s): {parts}; total {total:.1f}"
                f"; the whole machine: busy {self.busy_s:.1f}, idle {self.idle_s:.1f}, "
                f"stolen by the hypervisor {self.steal_s:.1f}")


def mib(kib: int) -> str:
    return f"{kib / 1024:,.0f} MiB"


# ----------------------------------------------------------------------------- setup


def start_moto() -> tuple[subprocess.Popen, str]:
    local = Path(sys.executable).parent / "moto_server"
    exe = str(local) if local.exists() else shutil.which("moto_server")
    if exe is None:
        sys.exit("moto_server not found: pip install -e '.[dev]'")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"http://127.0.0.1:{port}"
        time.sleep(0.1)
    proc.kill()
    sys.exit("moto_server did not start")


def synthetic_reference(model_cfg, channels, sizes, n_normal: int = 677, seed: int = 0):
    """A normal reference of the real sizes filled with random numbers (K prototypes for
    ``n_normal`` images, full memory banks), for timing and FLOP counts only."""
    import torch

    from prn_ray.model.prototypes import num_prototypes
    from prn_ray.model.reference import NormalReference

    g = torch.Generator().manual_seed(seed)
    k = num_prototypes(n_normal, model_cfg.prototype_ratio)
    return NormalReference(
        means=[torch.zeros(c) for c in channels], stds=[torch.ones(c) for c in channels],
        prototypes=[torch.randn(k, c, *hw, generator=g)
                    for c, hw in zip(channels[:3], sizes[:3])] if model_cfg.use_prototypes else [],
        banks=[torch.randn(model_cfg.prior_bank_size, channels[lv], generator=g)
               for lv in model_cfg.prior_levels] if model_cfg.residual_prior else [],
        n_normal=n_normal)


def register_untrained(cfg, product: str, geometry, note: str, n_normal: int = 200) -> str:
    """Register a Lite0 PRN whose head is untrained over a random reference of the real sizes
    (``geometry``'s input): speed is real, scores are meaningless."""
    import torch

    from prn_ray import registry
    from prn_ray.model import build_prn

    torch.manual_seed(0)
    prn = build_prn(cfg.model, geometry.size, storage_cfg=cfg.storage)
    prn.head.set_reference(synthetic_reference(cfg.model, prn.backbone.channels,
                                               prn.head.feature_sizes, n_normal=n_normal))
    if prn.head.memory is not None:
        prn.head.memory.mark(calibrated=True)
    return registry.publish(
        cfg, product, head_state=prn.head.state_dict(), backbone_state=prn.backbone.state_dict(),
        geometry=geometry, calibration={"threshold": 0.5, "rule": "none: untrained head"},
        metrics={"note": f"{note}: random head, speed only"})


def ready_head(model_cfg, channels, sizes, image_size: int, n_normal: int = 677):
    """A PRN head with a synthetic reference and an identity prior calibration."""
    from prn_ray.model import PRNHead

    head = PRNHead(model_cfg, channels, image_size, sizes)
    head.set_reference(synthetic_reference(model_cfg, channels, sizes, n_normal))
    if head.memory is not None:
        head.memory.mark(calibrated=True)
    return head


# ----------------------------------------------------------------------------- FLOP limit


def gemm_rate(threads: int, n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of a large fp32 matmul on ``threads`` threads: the FLOP limit quoted beside
    each benchmark's model GFLOP/s (measured in the same run, on the same machine)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def write_images(root: str, product: str, n: int, h: int, w: int, unique: int = 8) -> list[str]:
    """N JPEGs of h x w under ``<root>/<product>/`` (demo renders, ``unique`` distinct ones)."""
    import cv2

    from prn_ray import storage
    from prn_ray.demo_data import render

    side = max(h, w)
    jpgs = []
    for i in range(min(unique, n)):
        img = render("metal_plate", side, 1, 1, i)[0][:h, :w]
        jpgs.append(cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])[1]
                    .tobytes())
    uris = [storage.join(root, product, f"{i:06d}.jpg") for i in range(n)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: storage.write_bytes(uris[i], jpgs[i % len(jpgs)]), range(n)))
    return uris

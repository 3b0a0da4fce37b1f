"""The one timing harness of every speed benchmark: variants run in alternation, one turn each per round, so that
machine noise hits them alike; reported as medians over rounds and as paired per-round ratios.

A variant's turn is timed on the wall clock (and process CPU time), or, where the turn returns seconds, on the clock
it measured itself (a whole training run's own loop clock). Rounds in which any turn took over `DISTURBED` times its
variant's fastest are left out of the medians (all are kept when fewer than 3 or a quarter remain): other processes
on a shared machine come in bursts that can slow a step tenfold, and a round hit by one says nothing about the code.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

CPU = torch.device("cpu")
DISTURBED = 1.5  # a round whose turn took more than this times the variant's fastest is left out


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so a clock read after it counts that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Variant:
    """One way of doing the timed work: `turn(noise)` does it once and returns None (timed on the wall clock) or the
    seconds it measured itself; `times` collects the seconds of the timed rounds."""

    name: str
    turn: Callable[[torch.Tensor | None], float | None]
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)  # process CPU time, all threads (CPU device only)
    peak_bytes: int = 0  # GPU: most memory allocated during a turn above what was allocated before it


def alternate(
    variants: list[Variant],
    rounds: int,
    warmup: int = 0,
    noise_shape: tuple[int, ...] | None = None,
    device: torch.device = CPU,
    reverse_odd_rounds: bool = False,
) -> None:
    """Run the variants in alternation, one turn each per round; the first `warmup` rounds are not timed.

    Each round draws one noise tensor of `noise_shape` that every variant gets (None without a shape);
    `reverse_odd_rounds` runs every other round in reverse order, so no variant always follows the same one.
    """
    generator = torch.Generator().manual_seed(0)
    for round_index in range(warmup + rounds):
        noise = None if noise_shape is None else torch.rand(noise_shape, generator=generator).to(device)
        order = variants[::-1] if reverse_odd_rounds and round_index % 2 else variants
        for variant in order:
            synchronize(device)
            if device.type == "cuda":
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            measured = variant.turn(noise)
            if measured is not None and not isinstance(measured, float):
                raise TypeError(f"{variant.name}: a turn returns None or the seconds it measured, not {measured!r}")
            synchronize(device)
            if round_index >= warmup:
                variant.times.append(time.perf_counter() - start if measured is None else measured)
                variant.cpu_times.append(time.process_time() - cpu_start)
            if device.type == "cuda":
                variant.peak_bytes = max(variant.peak_bytes, torch.cuda.max_memory_allocated(device) - before)


def undisturbed_rounds(variants: list[Variant]) -> list[int]:
    """Timed rounds in which no variant's turn took more than `DISTURBED` times its fastest; all rounds when fewer
    than three (or under a quarter) of them are undisturbed."""
    fastest = [min(variant.times) for variant in variants]
    rounds = range(len(variants[0].times))
    kept = [i for i in rounds if all(v.times[i] <= DISTURBED * f for v, f in zip(variants, fastest, strict=True))]
    return kept if len(kept) >= max(3, len(rounds) / 4) else list(rounds)


def median_of(values: list[float], rounds: list[int]) -> float:
    """The median of `values` over the given rounds."""
    return statistics.median(values[i] for i in rounds)


def paired_ratio(numerator: Variant, denominator: Variant, rounds: list[int], cpu: bool = False) -> float:
    """Median over the given rounds of numerator time / denominator time (same round, so shared noise cancels).

    `cpu`: process CPU time instead of wall time; on a shared machine it counts only the work this process got to
    do (but it counts OpenMP spin-waiting)."""
    above, below = (numerator.cpu_times, denominator.cpu_times) if cpu else (numerator.times, denominator.times)
    return statistics.median(above[i] / below[i] for i in rounds)


def best_ratio(numerator: Variant, denominator: Variant) -> float:
    """Ratio of the fastest turns: the least disturbed estimate when other processes load the machine."""
    return min(numerator.times) / min(denominator.times)


def cpu_pressure() -> float | None:
    """Share of the last 60 s in which runnable tasks waited for a CPU (Linux PSI), or None where unavailable."""
    try:
        first_line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    fields = dict(item.split("=") for item in first_line.split()[1:])
    return float(fields["avg60"]) / 100


def matmul_rate(device: torch.device, bf16: bool) -> float:
    """FLOP/s of square matmuls on the device in the given precision (the denominator of MFU); median of 10."""
    size = 8192 if device.type == "cuda" else 1024
    dtype = torch.bfloat16 if bf16 else torch.float32
    left, right = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))

    def multiply(_noise: torch.Tensor | None) -> None:
        left @ right

    product = Variant("matmul", multiply)
    alternate([product], rounds=10, warmup=3, device=device)
    return 2 * size**3 / statistics.median(product.times)

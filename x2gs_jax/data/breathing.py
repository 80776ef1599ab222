"""Breathing signals for the 4D phantom: regular, irregular (seeded) and static.

The breathing state s(t) is a dimensionless amplitude: 0 = end-exhale, 1 = a nominal end-inhale.
Within one cycle of length T_c the shape is the Lujan model with exponent 1,

    s(t) = A_c * sin^2(pi * (t - t_c) / T_c),      t_c <= t < t_c + T_c,

so every cycle starts and ends at end-exhale with zero slope: s is continuous and C^1 even when the
cycle length T_c and amplitude A_c change from one cycle to the next (irregular breathing). The
regular signal has T_c = period_s and A_c = 1, hence s(0) = 0 and s is periodic with period_s.

Time conventions (x2gaussian.md §3, §12): t is in seconds from the start of the scan (scan_s = 60 s by
default); pickles store t / scan_s. The evaluator assumes phase k of 10 spans [0.3 k, 0.3 (k + 1)) s
of a 3 s cycle starting at t = 0, so `phase_bin` and `phase_mid_times_s` use the *nominal* period.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

KINDS = ("regular", "irregular", "static")

# Phase-bin boundaries fall exactly on sample times such as 60 i / N; this tolerance (in units of a
# bin) keeps floor() from dropping such a sample into the previous bin through float rounding.
_BIN_EPS = 1e-9


@dataclasses.dataclass(frozen=True)
class BreathingSignal:
    """A deterministic breathing signal.

    Attributes:
      period_s: nominal breathing period T in seconds (> 0).
      kind: "regular" (periodic sin^2), "irregular" (seeded per-cycle periods and amplitudes) or
        "static" (s = 0 always).
      period_jitter: irregular only: cycle lengths are T (1 + period_jitter U(-1, 1)); in [0, 0.9].
      amplitude_jitter: irregular only: cycle amplitudes are 1 + amplitude_jitter U(-1, 1); in [0, 1].
      seed: irregular only: seed of the numpy Generator that draws the cycles.
      scan_s: scan length in seconds (the normalised time of a pickle is t / scan_s).
    """

    period_s: float = 3.0
    kind: str = "regular"
    period_jitter: float = 0.1
    amplitude_jitter: float = 0.2
    seed: int = 0
    scan_s: float = 60.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"BreathingSignal.kind must be one of {KINDS}, got {self.kind!r}")
        if not (self.period_s > 0 and math.isfinite(self.period_s)):
            raise ValueError(f"BreathingSignal.period_s must be positive and finite, got {self.period_s}")
        if not (self.scan_s > 0 and math.isfinite(self.scan_s)):
            raise ValueError(f"BreathingSignal.scan_s must be positive and finite, got {self.scan_s}")
        if not 0.0 <= self.period_jitter <= 0.9:
            raise ValueError(f"BreathingSignal.period_jitter must be in [0, 0.9], got {self.period_jitter}")
        if not 0.0 <= self.amplitude_jitter <= 1.0:
            raise ValueError(f"BreathingSignal.amplitude_jitter must be in [0, 1], got {self.amplitude_jitter}")

    @property
    def max_amplitude(self) -> float:
        """Upper bound of s(t) over all t (1 + amplitude_jitter when irregular, 0 when static)."""
        return {"regular": 1.0, "irregular": 1.0 + self.amplitude_jitter, "static": 0.0}[self.kind]

    def cycles(self, t_end_s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Irregular cycles covering [0, t_end_s]: (starts [C] s, lengths [C] s, amplitudes [C]).

        The cycles are drawn one (length, amplitude) pair at a time from `np.random.default_rng(seed)`,
        so the first cycles do not depend on t_end_s.
        """
        n = int(math.ceil(max(t_end_s, 0.0) / (self.period_s * (1.0 - self.period_jitter)))) + 2
        u = np.random.default_rng(self.seed).uniform(-1.0, 1.0, size=(n, 2))
        lengths = self.period_s * (1.0 + self.period_jitter * u[:, 0])
        amplitudes = 1.0 + self.amplitude_jitter * u[:, 1]
        starts = np.concatenate([[0.0], np.cumsum(lengths)[:-1]])
        return starts, lengths, amplitudes

    def signal(self, t_s) -> np.ndarray:
        """Breathing state s(t) (float64, same shape as t_s; t_s in seconds, >= 0 for irregular)."""
        t = np.asarray(t_s, dtype=np.float64)
        if self.kind == "static":
            return np.zeros_like(t)
        if self.kind == "regular":
            return np.sin(np.pi * t / self.period_s) ** 2
        if t.size and np.min(t) < 0:
            raise ValueError(f"irregular breathing is defined for t >= 0 s, got min t = {np.min(t)}")
        starts, lengths, amplitudes = self.cycles(float(np.max(t)) if t.size else 0.0)
        c = np.clip(np.searchsorted(starts, t, side="right") - 1, 0, len(starts) - 1)
        return amplitudes[c] * np.sin(np.pi * (t - starts[c]) / lengths[c]) ** 2

    def signal_normalised(self, t) -> np.ndarray:
        """s at normalised time(s) t = seconds / scan_s (the pickle's `time`)."""
        return self.signal(np.asarray(t, dtype=np.float64) * self.scan_s)

    def mean_cycle_s(self, t_end_s: float) -> float:
        """Mean length (s) of the breathing cycles that start in [0, t_end_s): the period an estimator fitted over
        a scan of that length should find (period_s for regular breathing; NaN for static)."""
        if self.kind == "static":
            return float("nan")
        if self.kind == "regular":
            return float(self.period_s)
        starts, lengths, _ = self.cycles(t_end_s)
        return float(np.mean(lengths[starts < max(float(t_end_s), 1e-12)]))

    def phase_bin(self, t_s, n_phases: int = 10) -> np.ndarray:
        """Reference phase bin floor(n (t mod T) / T) with the nominal period (int64, shape of t_s)."""
        t = np.asarray(t_s, dtype=np.float64)
        frac = np.mod(t, self.period_s) / self.period_s
        return np.clip(np.floor(n_phases * frac + _BIN_EPS), 0, n_phases - 1).astype(np.int64)

    def phase_mid_times_s(self, n_phases: int = 10) -> np.ndarray:
        """Mid-phase times (k + 1/2) T / n in seconds, k = 0..n-1 ((0.15 + 0.3 k) s for T = 3 s)."""
        return (np.arange(n_phases, dtype=np.float64) + 0.5) * self.period_s / n_phases

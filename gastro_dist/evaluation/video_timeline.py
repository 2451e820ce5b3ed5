"""Per-frame probabilities over time: temporal smoothing and findings (time segments of one class).

Owns the two smoothings `predict-video` offers and what each costs in latency, and turning the smoothed
probabilities into findings. Both work frame by frame as results arrive (a live stream has no end to
wait for), so the same code serves a recorded file and a live feed, and memory stays bounded by the
window, not the video's length.

- ``ema``: causal exponential moving average with time constant tau = window_s / 2, weighted by the
  time between frames (alpha = 1 - exp(-dt / tau), so a variable frame rate or dropped frames keep
  the same meaning in seconds). No frame waits for a later one: it adds no latency; its response to
  a change lags by about tau, as a trailing mean over window_s does.
- ``centred``: the mean over the frames within window_s / 2 before and after each frame: no lag, but
  each frame's value is known only window_s / 2 after it (that is its latency), so live input
  cannot use it.
- ``none``: the raw probabilities.

A finding is a stretch of time in which one class's smoothed probability stays above the threshold:
stretches separated by at most ``merge_gap_s`` are one finding, and findings shorter than
``min_duration_s`` (after merging) are left out. A stretch runs from its first frame above the
threshold to the first frame below it (the last frame of a video counts for the median frame interval).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from gastro_dist import UserError

SMOOTHINGS = ("ema", "centred", "none")
_TIME_TOLERANCE_S = 1e-6  # frame times are rounded to milliseconds: a window's edge is not moved by float error


@dataclass(frozen=True)
class Smoothing:
    method: str = "ema"
    window_s: float = 1.0
    """ema: twice the time constant; centred: the window's width."""

    def __post_init__(self) -> None:
        if self.method not in SMOOTHINGS:
            raise UserError(f"--smoothing must be one of {', '.join(SMOOTHINGS)}, not {self.method!r}")
        if not (math.isfinite(self.window_s) and self.window_s > 0):
            raise UserError(f"--window-s must be a positive number of seconds, not {self.window_s}")

    @property
    def latency_s(self) -> float:
        """How long after a frame its smoothed value is known (besides the time to compute it)."""
        return self.window_s / 2 if self.method == "centred" else 0.0

    def describe(self) -> str:
        if self.method == "ema":
            return (f"causal exponential moving average, time constant {self.window_s / 2:g} s: no latency added, "
                    f"lags a change by about {self.window_s / 2:g} s")
        if self.method == "centred":
            return f"centred {self.window_s:g} s mean: latency {self.latency_s:g} s (needs the frames after each one)"
        return "none: the raw per-frame probabilities"

    def smoother(self) -> Smoother:
        return Smoother(self)


class Smoother:
    """Fed frames in time order (`add`), gives back each one with its smoothed probabilities once they are
    known: at once for ema and none, window_s / 2 later for centred; `finish` gives the rest."""

    def __init__(self, smoothing: Smoothing):
        self.smoothing = smoothing
        self._ema: np.ndarray | None = None
        self._last_time_s: float | None = None
        self._recent: deque = deque()  # centred: (time_s, raw) of the half window before the first pending frame
        self._pending: deque = deque()  # centred: (time_s, raw, payload) whose window is not complete yet

    def add(self, time_s: float, raw: np.ndarray, payload: Any) -> list[tuple[Any, np.ndarray, np.ndarray]]:
        """(payload, raw, smoothed) of each frame whose smoothed value is now known, in time order."""
        method = self.smoothing.method
        if method == "none":
            return [(payload, raw, raw)]
        if method == "ema":
            if self._ema is None:
                self._ema = raw.astype(np.float64)
            else:
                dt_s = max(time_s - self._last_time_s, 0.0)
                alpha = 1.0 - math.exp(-dt_s / (self.smoothing.window_s / 2))
                self._ema = self._ema + alpha * (raw - self._ema)
            self._last_time_s = time_s
            return [(payload, raw, self._ema.copy())]
        self._pending.append((time_s, raw, payload))
        return list(self._complete(until_s=time_s))

    def finish(self) -> list[tuple[Any, np.ndarray, np.ndarray]]:
        return list(self._complete(until_s=math.inf))

    def _complete(self, until_s: float) -> Iterator[tuple[Any, np.ndarray, np.ndarray]]:
        half_s = self.smoothing.window_s / 2
        while self._pending and self._pending[0][0] + half_s <= until_s + _TIME_TOLERANCE_S:
            time_s, raw, payload = self._pending[0]
            while self._recent and self._recent[0][0] < time_s - half_s - _TIME_TOLERANCE_S:
                self._recent.popleft()
            inside = [r for t, r in self._recent] + [r for t, r, _ in self._pending
                                                      if t <= time_s + half_s + _TIME_TOLERANCE_S]
            yield payload, raw, np.mean(inside, axis=0)
            self._recent.append(self._pending.popleft()[:2])


@dataclass(frozen=True)
class FindingRules:
    threshold: float = 0.5
    min_duration_s: float = 1.0
    merge_gap_s: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold < 1.0:
            raise UserError(f"--threshold must be in [0, 1), not {self.threshold}")
        for option, value in (("--min-duration-s", self.min_duration_s), ("--merge-gap-s", self.merge_gap_s)):
            if not (math.isfinite(value) and value >= 0):
                raise UserError(f"{option} must be 0 or more seconds, not {value}")


@dataclass
class Finding:
    class_index: int
    start_s: float
    end_s: float
    peak: float
    peak_time_s: float
    probability_sum: float
    num_frames: int
    peak_thumbnail: Any = None  # what the caller's `thumbnail` gave for the peak frame (a small picture)

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def mean(self) -> float:
        """Mean smoothed probability over the frames of the finding, merged gaps included."""
        return self.probability_sum / self.num_frames


class FindingTracker:
    """Builds the findings of one video frame by frame. Per class it holds at most one unfinished finding
    and the sum over the frames of its current gap, so memory does not grow with the video's length."""

    def __init__(self, rules: FindingRules, num_classes: int):
        self.rules = rules
        self.findings: list[Finding] = []
        self._current: list[Finding | None] = [None] * num_classes
        self._is_open = [False] * num_classes  # the current finding is still above the threshold
        self._gap = [(0.0, 0)] * num_classes  # (probability sum, frames) since the current finding dropped below
        self._times_s: deque = deque(maxlen=64)  # recent frame times: how long the last frame lasts

    def add(self, time_s: float, smoothed: np.ndarray, thumbnail: Callable[[], Any] | None = None) -> None:
        """One frame's smoothed probabilities; `thumbnail` gives its picture, called only at a new peak."""
        self._times_s.append(time_s)
        for k, current in enumerate(self._current):
            probability = float(smoothed[k])
            above = probability > self.rules.threshold
            if current is not None and not self._is_open[k] and time_s - current.end_s > self.rules.merge_gap_s:
                self._settle(k)
                current = None
            if above and current is None:
                self._current[k] = Finding(k, time_s, time_s, probability, time_s, probability, 1,
                                           thumbnail() if thumbnail else None)
                self._is_open[k] = True
            elif above:
                if not self._is_open[k]:  # back above within the merge gap: one finding, the gap included
                    gap_sum, gap_frames = self._gap[k]
                    current.probability_sum += gap_sum
                    current.num_frames += gap_frames
                    self._is_open[k], self._gap[k] = True, (0.0, 0)
                current.probability_sum += probability
                current.num_frames += 1
                if probability > current.peak:
                    current.peak, current.peak_time_s = probability, time_s
                    current.peak_thumbnail = thumbnail() if thumbnail else None
            elif current is not None:
                if self._is_open[k]:
                    current.end_s, self._is_open[k], self._gap[k] = time_s, False, (0.0, 0)
                gap_sum, gap_frames = self._gap[k]
                self._gap[k] = (gap_sum + probability, gap_frames + 1)

    def finish(self) -> list[Finding]:
        """All findings of the video, in order of their start; a finding still open ends a frame after the last."""
        last_frame_s = float(np.median(np.diff(self._times_s))) if len(self._times_s) > 1 else 0.0
        for k, current in enumerate(self._current):
            if current is not None:
                if self._is_open[k]:
                    current.end_s = self._times_s[-1] + last_frame_s
                self._settle(k)
        return sorted(self.findings, key=lambda finding: (finding.start_s, finding.class_index))

    def _settle(self, k: int) -> None:
        current = self._current[k]
        if current.duration_s >= self.rules.min_duration_s:
            self.findings.append(current)
        self._current[k], self._is_open[k], self._gap[k] = None, False, (0.0, 0)

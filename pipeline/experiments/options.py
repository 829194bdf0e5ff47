"""The knobs of the experiment suites (CLI flags of `polytask experiment`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# A 1-2-5 log grid over the range the paper swept (5 ... 500).
DEFAULT_CAPACITIES = (5, 10, 20, 50, 100, 200, 500)
DEFAULT_NOISE_FRACTIONS = (0.2, 0.5)


@dataclass(frozen=True)
class ExperimentOptions:
    """Settings of a suite; each suite reads the ones it needs.

    Attributes:
        margin: transfer: a change against the single-task model counts as a clear gain or loss
            only beyond this many points (and beyond its seed standard deviation).
        capacities: capacity: the shared module widths r to sweep.
        noise_task: noise: the task whose training labels are corrupted (default: the first).
        noise_fractions: noise: the fractions of its training labels replaced by a wrong label.
        new_task: incremental: the task added to a model of the others (default: the last).
        variants: transfer: the multi-task variants to train (default: all of them).
    """

    margin: float = 0.5
    capacities: tuple[int, ...] = DEFAULT_CAPACITIES
    noise_task: str | None = None
    noise_fractions: tuple[float, ...] = DEFAULT_NOISE_FRACTIONS
    new_task: str | None = None
    variants: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.margin < 0:
            raise ValueError(f"--margin must be >= 0, got {self.margin}")
        if not self.capacities or any(c < 1 for c in self.capacities):
            raise ValueError(f"--capacities must be positive integers, got {self.capacities}")
        if not self.noise_fractions or any(not 0 < f < 1 for f in self.noise_fractions):
            raise ValueError(
                f"--noise-fractions must lie strictly between 0 and 1, got {self.noise_fractions}"
            )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

"""The evaluation settings, typed once: how the dialogues of a cell are run and scored.

`mc_core.evaluation.runner.evaluate` (and the base report and ceilings) take these as keywords;
`EvalConfig(...).run_kwargs()` gives them, validated. The pipeline's ``evaluate`` section of
params.yaml extends this model with what it compares (its methods, the validation methods, the
ceilings), so a bad value names its key the same way everywhere.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from mc_core.training.config import Section

__all__ = ["EvalConfig"]


class EvalConfig(Section):
    """How a cell's dialogues are run.

    Attributes:
        history: later turns see the model's own earlier answers ("model") or the gold ones.
        max_dialogues: evaluate only the first N dialogues (None: all).
        device: "auto" (CUDA when present), "cpu" or "cuda".
        batch_size: dialogues per batch of the inference engine.
        max_new_tokens: answer length limit per turn (greedy decoding).
        seed: torch seed before each method, and the bootstrap seed of the intervals.
        progress: progress bars.
    """

    history: Literal["model", "gold"] = "model"
    max_dialogues: int | None = Field(None, gt=0)
    device: str = "auto"
    batch_size: int = Field(16, gt=0)
    max_new_tokens: int = Field(4, gt=0)
    seed: int = 0
    progress: bool = True

    def run_kwargs(self) -> dict[str, Any]:
        """The keywords every evaluation call takes from here (callers add ``max_dialogues``
        and ``progress`` where they apply)."""
        return {
            "history": self.history,
            "device": self.device,
            "batch_size": self.batch_size,
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
        }

"""Training tiny base LVLMs into teachers on the synthetic world (the frozen models every
compressor is measured against). They must look at the image, answer well with all tokens,
and behave like real LVLMs when handed fewer tokens.

Plain from-scratch training stalls at chance on CPU, so the learning problem is changed, not
the hyper-parameters (``aids``):

Stage 1 (vision): the tower and projector alone, on dense per-token labels from the generator.
Stage 2 (language): tower and projector frozen; the LLM learns three-turn dialogues over a pool
    of scenes, with the training-only aids on.
Stage 3 (robustness): the LLM is fine-tuned on freshly rendered scenes while most dialogues get
    their visual tokens reduced by a compressor and packed by the adapter (``augment``), so the
    teacher keeps its accuracy on packed, shorter sequences as a real LVLM does.

Modules: ``config`` (the knobs), ``layout`` (token layout, labels, selector), ``encoding``
(dialogues as inputs), ``aids``, ``augment``, ``batch``, ``feed`` (what each step trains on),
``state`` (the resumable checkpoint), ``weights`` (initialisation), ``loop`` (the stages),
``evaluation`` (held-out accuracies).
"""

from __future__ import annotations

from typing import Any

from mc_core.training.teacher.config import TeacherConfig

__all__ = ["TeacherConfig", "evaluate", "layout_for", "train_teacher", "write_report"]


def write_report(report: dict, path) -> Any:
    """Writes a teacher report as JSON, atomically (``mc_core.io``)."""
    from mc_core import io

    return io.write_json(path, report)


def __getattr__(name: str) -> Any:
    # The training code imports torch and transformers: loaded on first use, so that reading
    # the config (params validation) stays light.
    if name == "train_teacher":
        from mc_core.training.teacher.loop import train_teacher

        return train_teacher
    if name == "evaluate":
        from mc_core.training.teacher.evaluation import evaluate

        return evaluate
    if name == "layout_for":
        from mc_core.training.teacher.layout import layout_for

        return layout_for
    raise AttributeError(f"module 'mc_core.training.teacher' has no attribute {name!r}")

"""Typed configuration of the library: the shared model base, error wording, ``TrainConfig``.

Every config object of ``mc_core`` is a pydantic model (or a dataclass pydantic validates) with
unknown keys forbidden, so a typo is an error, never a silently ignored knob. Errors name the
key and the value where they came from, e.g. ``train.lr=-1.0: Input should be greater than 0``.

``TrainConfig`` (the compressor recipe; ``mc_core.training.loop`` re-exports it) lives here rather
than
in ``mc_core.training.loop`` so that validating a configuration does not import the model stack.
The pipeline that drives the library models its own settings in ``tasks/``; nothing here
knows of it.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mc_core.training.distributed import DistributedConfig

__all__ = ["Section", "TrainConfig", "format_errors", "raise_named"]


class Section(BaseModel):
    """Base of every config model: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# "field=value: ..." or "field.sub: ...": a section-level message about one field.
_FIELD_MSG = re.compile(r"[a-z_][a-z0-9_]*[=.]")


def _loc(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def format_errors(err: ValidationError, prefix: str = "", source: str = "") -> str:
    """One line per error: ``[<source>: ]<prefix>.<key>=<value>: <why>``.

    A validator's own message that already names its element (``"[i]=v: ..."``) or its owner's
    field (``"WorldConfig.grid=12: ..."``, raised for a whole section) is kept as it is.
    """
    lines = []
    head = f"{source}: " if source else ""
    for e in err.errors():
        key = _loc((prefix, *e["loc"]) if prefix else e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if not key or msg.startswith((f"{key}.", f"{key}=")):
            # A model-level message, or a nested model's own (already named) ValueError.
            lines += [f"{head}{line}" for line in msg.splitlines()]
        elif msg.startswith("["):  # element-level message from a list validator: "[i]=v: ..."
            lines.append(f"{head}{key}{msg}")
        elif key and _FIELD_MSG.match(msg):  # a model validator naming one of its fields
            lines.append(f"{head}{key}.{msg}")
        elif e["type"] in ("missing", "extra_forbidden", "unexpected_keyword_argument") or (
            isinstance(e.get("input"), Mapping)
        ):
            lines.append(f"{head}{key}: {msg}")
        else:
            lines.append(f"{head}{key}={e['input']!r}: {msg}")
    return "\n".join(lines)


def raise_named(err: ValidationError, prefix: str, source: str = "") -> None:
    """Re-raise a pydantic error as a ValueError whose lines name ``prefix.<key>``."""
    raise ValueError(format_errors(err, prefix, source)) from None


# Knobs a resumed run may change without invalidating its training state.
_NOT_FINGERPRINTED = frozenset(
    {
        "max_steps",
        "epochs",
        "progress",
        "device",
        "log_every",
        "checkpoint_every",
        "target_batch",
        "cache_targets",
        "distributed",  # same steps up to float summation order, so a resume may change it
        # How a step is computed, not what it computes (float summation order at most):
        "micro_batch",
        "activation_checkpointing",
        "max_memory_gib",
        "visual_tokens",
        "shard_dialogues",
    }
)


class TrainConfig(Section):
    """Every knob of a training run (defaults: the paper's recipe, SGD lr 1e-3, clip 1e-2).

    Measured on the trained tiny-llava base model (rate 0.9, 300 training / 60 held-out
    synthetic dialogues): with the paper's lr 1e-3 and norm clip 1e-2 a few hundred steps leave
    the generator at its init (KL unchanged, acc_avg 0.29, below sample 0.32 / pool 0.34); with
    lambda_ent = lambda_col = 1 the regularisers dominate a KL of ~2 nats and drive P one-hot.
    lr 0.02, momentum 0.9, grad_clip 1.0, lambdas 0.01, 10 epochs gave acc_avg 0.45 and
    held-out KL 1.22 (pool 1.58). Tune these per world; the defaults stay the paper's.

    Attributes:
        method: the trainable compressor to train (a ``mc_core.compressors`` name).
        compressor_kwargs: constructor keywords of that method beyond rate and dim (for
            metacompress e.g. ``d_c``, ``beta_init``, ``pos_scale``); ``seed`` is passed from
            ``seed`` when the method takes one.
        lr: SGD learning rate.
        momentum: SGD momentum (the paper says plain SGD: 0).
        grad_clip: gradient clipping threshold (None: no clipping; the paper clips at 1e-2, and
            the collapse term diverges without it).
        clip_mode: "norm" (total gradient norm) or "value" (each element).
        epochs: passes over the dataset.
        batch_size: dialogues per step.
        lambda_ent, lambda_col: weights of the row-entropy and collapse terms.
        checkpoint_every: steps between training-state checkpoints (the last step always saves).
        seed: compressor init and batch order.
        device: "auto" (cuda with a bf16 model when available, else cpu), "cpu" or "cuda[:i]".
        max_steps: stop after this many steps in total (caps ``epochs``).
        log_every: steps between callback calls (the last step is always reported).
        explode_factor: the run stops when the loss exceeds this multiple of the first loss.
        cache_targets: reuse the frozen model's distillation targets across steps (False
            recomputes them every step; kept for the throughput benchmark).
        target_batch: dialogues per frozen-model forward when building the target cache.
        target_topk: the target cache keeps the teacher's top-k log-probs per answer token plus
            the tail mass (None: the whole vocabulary); docs/benchmarks.md measures k.
        progress: show a progress bar.
        dtype: the frozen model's weights: "auto" (bfloat16 on CUDA, float32 on CPU) or a dtype.
        distributed: data-parallel training over processes (``mc_core.training.distributed``).
        micro_batch: dialogues per forward pass; a step of ``batch_size`` dialogues accumulates
            the gradients of its micro-batches, weighted so that the step equals one forward of
            the whole batch. None: the whole batch (per rank) at once; "auto": the largest that
            the memory estimator (``mc_core.training.memory``) fits into ``max_memory_gib``
            (on CPU: the whole batch).
        activation_checkpointing: recompute the frozen LLM's decoder layers in the backward
            pass instead of keeping their activations (one layer's input kept per layer).
        max_memory_gib: the device memory "auto" may plan for (None: the device's free memory
            less a margin).
        visual_tokens: "store" keeps each image's projector output in the target store (disk,
            memory-mapped shards, in the model's dtype); "recompute" runs the frozen vision tower
            and projector for every step's images instead (no disk for them).
        shard_dialogues: dialogues per shard of the on-disk target store.
        rates: train one compressor for many rates (``mc_core.training.rates``): ``[lo, hi]``
            draws each step's rate uniformly in the range, three or more rates draw it from
            the set; the draw is a pure function of (seed, step). None: the run's own rate.
    """

    method: str = "metacompress"
    compressor_kwargs: dict[str, Any] = Field(default_factory=dict)
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False)
    momentum: float = Field(0.0, ge=0, lt=1)
    grad_clip: float | None = Field(1e-2, gt=0, allow_inf_nan=False)
    clip_mode: Literal["norm", "value"] = "norm"
    epochs: int = Field(2, gt=0)
    batch_size: int = Field(36, gt=0)
    lambda_ent: float = Field(1.0, ge=0, allow_inf_nan=False)
    lambda_col: float = Field(1.0, ge=0, allow_inf_nan=False)
    checkpoint_every: int = Field(50, gt=0)
    seed: int = 0
    device: str = "auto"
    max_steps: int | None = Field(None, gt=0)
    log_every: int = Field(10, gt=0)
    explode_factor: float = Field(100.0, gt=0, allow_inf_nan=False)
    cache_targets: bool = True
    target_batch: int = Field(16, gt=0)
    target_topk: int | None = Field(64, ge=1)
    targets: Literal["gold", "teacher"] = (
        "gold"  # answers the KL is taught on (mc_core.training.loop)
    )
    progress: bool = True
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    micro_batch: int | Literal["auto"] | None = None
    activation_checkpointing: bool = False
    max_memory_gib: float | None = Field(None, gt=0, allow_inf_nan=False)
    visual_tokens: Literal["store", "recompute"] = "store"
    shard_dialogues: int = Field(64, gt=0)
    rates: list[float] | None = None

    # Strict ints: 2.0 epochs or True as a batch size are mistakes, not values to coerce.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise_named(err, "train")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not v.startswith("cuda:"):
            raise ValueError("expected 'auto', 'cpu' or 'cuda[:i]'")
        return v

    @field_validator("micro_batch")
    @classmethod
    def _micro_batch(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int) and v < 1:
            raise ValueError("expected an int >= 1, 'auto' or null (the whole batch)")
        return v

    @field_validator("rates")
    @classmethod
    def _rates(cls, v: list[float] | None) -> list[float] | None:
        if v is None:
            return v
        from mc_core.training.rates import check_rates

        try:
            check_rates(v)
        except ValueError as err:
            # "rates=[...]: why" names the field; format_errors prefixes "train.".
            raise ValueError(str(err).removeprefix(f"rates={v!r}: ")) from None
        return v

    @model_validator(mode="after")
    def _micro_fits(self) -> TrainConfig:
        if isinstance(self.micro_batch, int) and self.micro_batch > self.batch_size:
            raise ValueError(
                f"micro_batch={self.micro_batch}: larger than batch_size={self.batch_size} "
                "(a micro-batch is a part of one optimiser step's batch)"
            )
        return self

    @model_validator(mode="after")
    def _method(self) -> TrainConfig:
        from mc_core.compressors import get_class

        try:
            cls = get_class(self.method)
        except ValueError as err:
            raise ValueError(f"method={self.method!r}: {err}") from None
        if not cls.trainable:
            raise ValueError(
                f"method={self.method!r} is not trainable (it has no parameters); "
                "train a method whose class sets trainable = True"
            )
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "rate", "dim"}
        for key in self.compressor_kwargs:
            if key not in accepted:
                raise ValueError(
                    f"compressor_kwargs.{key}: not a keyword of {self.method} "
                    f"(accepts: {sorted(accepted)})"
                )
        return self

    def build_kwargs(self) -> dict[str, Any]:
        """Keywords for ``compressors.build(method, rate=..., dim=..., **kwargs)``."""
        from mc_core.compressors import get_class

        kwargs = dict(self.compressor_kwargs)
        if "seed" in inspect.signature(get_class(self.method).__init__).parameters:
            kwargs.setdefault("seed", self.seed)
        return kwargs

    def fingerprint(self) -> dict[str, Any]:
        """The fields a resumed run must share with the run that wrote the checkpoint.

        ``rates`` enters only when set: a single-rate run's fingerprint (its state key and the
        ``train`` record of its checkpoint) keeps the keys it had before the field existed.
        """
        return {
            k: v
            for k, v in self.model_dump().items()
            if k not in _NOT_FINGERPRINTED and not (k == "rates" and v is None)
        }

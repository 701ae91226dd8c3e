"""The teacher recipe's knobs (params.yaml ``base:``), as one typed model.

Budgets are step counts, never seconds: with one torch thread and fixed seeds a run is a pure
function of this config, the world and the architecture (two runs give identical reports, and a
resumed run the same as an uninterrupted one).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = ["TeacherConfig"]

_NONNEG = Field(ge=0)


class TeacherConfig(BaseModel):
    """Knobs of the three-stage teacher recipe (see ``mc_core.training.teacher``).

    Stage 1 trains the tower + projector on dense per-token labels, stage 2 the LLM on a fixed
    pool of scenes with the training-only aids, stage 3 fine-tunes the LLM on freshly rendered
    scenes with visual-token reduction applied to ``aug_fraction`` of each batch.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(0, ge=0)
    train_images: int = Field(1500, gt=0)  # the scene pool of stages 1 and 2
    eval_dialogues: int = Field(300, gt=0)
    curve_dialogues: int = Field(96, gt=0)
    eval_seed: int = Field(10_000, ge=0)  # held-out world seed (training uses `seed`)
    stage1_steps: int = Field(1200, ge=0)
    stage1_batch: int = Field(16, gt=0)
    stage1_lr: float = Field(3e-3, gt=0)
    stage2_steps: int = Field(700, ge=0)
    stage2_batch: int = Field(16, gt=0)
    stage2_lr: float = Field(3e-3, gt=0)
    # Dialogues per pool scene in stage 2 (drawn anew per step from these, encodings reused).
    stage2_dialogues: int = Field(8, gt=0)
    stage3_steps: int = Field(900, ge=0)
    stage3_batch: int = Field(16, gt=0)
    stage3_lr: float = Field(1e-3, gt=0)
    # Stage 3 renders this many new scenes per step into a bank of the latest `stage3_bank`
    # scenes and draws its batch from the bank: every dialogue is fresh, and a scene is seen
    # about batch / fresh_per_step times (rendering a scene costs ~30 ms on one thread).
    stage3_fresh_per_step: int = Field(4, gt=0)
    stage3_bank: int = Field(256, gt=0)
    # Reduction augmentation of stage 3: each augmented row gets one (method, rate) drawn
    # uniformly, applied by the compressor of that name and packed by the family's adapter.
    aug_fraction: float = Field(0.7, ge=0, le=1)
    aug_methods: tuple[str, ...] = ("random", "sample", "pool", "tome")
    aug_rates: tuple[float, ...] = (0.5, 0.75, 0.9)
    warmup_steps: int = Field(40, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    attn_weight: float = Field(1.0, ge=0)
    # LLM layers (negative: from the end) whose heads 0 / 1 are trained to point at the asked
    # object (see mc_core.training.teacher.aids). Never FastV's layer 2: it must stay an ordinary
    # layer.
    pointer_layers: tuple[int, ...] = (-1,)
    slot_weight: float = Field(0.5, ge=0)
    colour_first_steps: int = Field(0, ge=0)
    # Question mix of the training dialogues (colour, shape, count, exist): colour is learned
    # first and fastest, counting last, so training leans on count / exist. Evaluation uses the
    # world's own mix.
    train_type_weights: tuple[float, float, float, float] = (0.2, 0.25, 0.3, 0.25)
    curve_every: int = Field(100, gt=0)  # steps between held-out accuracy points
    checkpoint_every: int = Field(50, gt=0)
    target_acc: float = 0.97  # stage 2 ends early once its curve reaches this
    # A saved base model whose tensors of the same name and shape initialise this one (e.g.
    # tiny-llava for tiny-llava-next). None: random init.
    init_from: str | None = None
    # Per-architecture changes of the knobs above: {arch: {key: value}}.
    arch_overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("aug_methods")
    @classmethod
    def _known_methods(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from mc_core.compressors import get_class

        for name in v:
            c = get_class(name)  # ValueError listing the available ones
            if c.trainable or c.prompt_dependent or c.needs - {"keys"}:
                raise ValueError(
                    f"{name!r} cannot augment (trainable, prompt-dependent or "
                    f"needs {sorted(c.needs)})"
                )
        return v

    @field_validator("aug_rates")
    @classmethod
    def _rates(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        from mc_core.compressors.ops import check_rate

        for r in v:
            check_rate(r, where="aug_rates")
        return v

    @field_validator("pointer_layers")
    @classmethod
    def _pointers(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or len(set(v)) != len(v):
            raise ValueError("expected one or more distinct layer indices")
        return v

    @field_validator("train_type_weights")
    @classmethod
    def _weights(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(w < 0 for w in v) or sum(v) <= 0:
            raise ValueError("expected non-negative weights with a positive sum")
        return v

    @field_validator("stage1_batch", "stage2_batch")
    @classmethod
    def _fits_pool(cls, v: int, info) -> int:
        pool = info.data.get("train_images", 0)
        if v > pool:
            raise ValueError(
                f"a batch is drawn without replacement from the {pool} "
                "train_images: at most that many"
            )
        return v

    @field_validator("arch_overrides")
    @classmethod
    def _overrides(cls, v: dict[str, dict[str, Any]], info) -> dict[str, dict[str, Any]]:
        # Declared last: every other field is validated and in info.data already.
        for arch, over in v.items():
            try:
                cls.model_validate({**info.data, **over, "arch_overrides": {}})
            except ValidationError as err:
                # "[<arch>.<key>] msg": _explain turns it into base.arch_overrides.<arch>.<key>.
                e = err.errors()[0]
                key = ".".join(str(p) for p in (arch, *e["loc"]))
                got = "" if e["type"] in ("missing", "extra_forbidden") else f"={e['input']!r}"
                raise ValueError(f"[{key}]{got}: {e['msg']}") from None
        return v

    def _apply(self, over: dict[str, Any]) -> TeacherConfig:
        return TeacherConfig.model_validate({**self.model_dump(), "arch_overrides": {}, **over})

    def for_arch(self, arch: str) -> TeacherConfig:
        """This config with ``arch_overrides[arch]`` applied (overrides themselves dropped)."""
        return self._apply(dict(self.arch_overrides.get(arch, {})))

    @classmethod
    def from_dict(cls, d: dict | None, *, where: str = "base") -> TeacherConfig:
        """From a params.yaml section; a bad key or value raises ValueError naming
        ``<where>.<key>``."""
        try:
            return cls.model_validate(dict(d or {}))
        except ValidationError as err:
            raise ValueError(_explain(err, where)) from None


def _explain(err: ValidationError, where: str = "") -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in (where, *e["loc"]) if p != "")
        msg = e["msg"].removeprefix("Value error, ")
        if msg.startswith("["):  # a nested key named by the validator: "[sub.key]=v: msg"
            inner, _, rest = msg[1:].partition("]")
            lines.append(f"{key}.{inner}{rest}")
            continue
        got = "" if e["type"] in ("missing", "extra_forbidden") else f"={e['input']!r}"
        lines.append(f"{key}{got}: {msg}")
    return "; ".join(lines)

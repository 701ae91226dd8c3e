"""What the teacher's stages train on: scenes, their visual tokens, dialogues and rows.

Stage 1 draws from a fixed pool of rendered scenes; stage 2 trains the LLM on dialogues over that
pool (a few per scene, their encodings memoised); stage 3 on a sliding bank of freshly rendered
scenes, most rows reduced by a compressor (``augment``). The held-out rows of the learning curve
come from their own seed. Every random draw comes from the generator the stage passes in
(seeded by ``(seed, stage, step)`` in ``loop``), so a step's batch is a pure function of the step.
"""

from __future__ import annotations

import numpy as np
import torch

from mc_core.data import synthetic as S
from mc_core.training.teacher.augment import Augmenter
from mc_core.training.teacher.batch import Row, make_row
from mc_core.training.teacher.config import TeacherConfig
from mc_core.training.teacher.encoding import Encoded, encode
from mc_core.training.teacher.layout import Example, Layout, make_pool, render_example
from mc_core.training.teacher.state import TrainState

__all__ = ["Feed"]

_IMAGE_KEYS = ("pixel_values", "image_sizes", "image_grid_thw")


class Feed:
    """The data side of one teacher run: the scene pool, stage 3's bank, encodings and rows.

    ``state`` is the run's own (shared with the trainer): stage 2's encodings are memoised.
    """

    def __init__(
        self,
        processor,
        adapter,
        layout: Layout,
        cfg: TeacherConfig,
        world: S.WorldConfig,
        state: TrainState,
    ):
        self.processor, self.adapter, self.layout = processor, adapter, layout
        self.cfg, self.world, self.state = cfg, world, state
        self.image_id = adapter.image_token_id
        self._pool: list[Example] | None = None
        self._bank: dict[int, tuple[Example, torch.Tensor]] = {}
        self._encodings: dict[tuple[int, int], tuple[S.Dialogue, Encoded]] = {}
        self.augmenter = Augmenter(cfg.aug_methods, cfg.aug_rates, cfg.aug_fraction, adapter.dim)

    @property
    def pool(self) -> list[Example]:
        if self._pool is None:
            self._pool = make_pool(self.cfg.seed, self.cfg.train_images, self.world, self.layout)
        return self._pool

    def tokens(self, images: list) -> list[torch.Tensor]:
        """Visual tokens (projector outputs) of ``images``, differentiable."""
        out = self.processor.image_processor(images=images, return_tensors="pt")
        return self.adapter.visual_tokens({k: v for k, v in out.items() if k in _IMAGE_KEYS})

    def frozen_tokens(self, examples: list[Example]) -> list[torch.Tensor]:
        with torch.no_grad():
            return [
                t
                for i in range(0, len(examples), 64)
                for t in self.tokens([e.image for e in examples[i : i + 64]])
            ]

    def bank_rows(
        self, step: int, rng: np.random.Generator
    ) -> list[tuple[int, Example, torch.Tensor, int]]:
        """Stage 3's batch: scenes drawn from the latest ``stage3_bank`` rendered ones (a pure
        function of the step: ``stage3_fresh_per_step`` new scenes per step)."""
        c = self.cfg
        lo = c.train_images + step * c.stage3_fresh_per_step  # fresh indices: never the pool's
        window = range(lo, lo + c.stage3_bank)
        self._bank = {i: v for i, v in self._bank.items() if i in window}
        new = [i for i in window if i not in self._bank]
        examples = [render_example(c.seed, i, self.world, self.layout) for i in new]
        for i, e, t in zip(new, examples, self.frozen_tokens(examples), strict=True):
            self._bank[i] = (e, t)
        pick = rng.choice(c.stage3_bank, c.stage3_batch, replace=c.stage3_batch > c.stage3_bank)
        # Dialogue streams 0 and 1 are the world's own; every step draws new ones.
        return [(window[int(j)], *self._bank[window[int(j)]], 2 + step) for j in pick]

    def encoded(self, ex: Example, index: int, stream: int, weights) -> tuple[S.Dialogue, Encoded]:
        """Dialogue ``stream`` of scene ``index`` and its encoding; stage 2's are memoised."""
        key = (index, stream)
        if key in self._encodings:
            return self._encodings[key]
        world = S.WorldConfig(**{**self.world.__dict__, "type_weights": tuple(weights)})
        d = S.make_dialogue(ex.scene, S.scene_rng(self.cfg.seed, index, stream), world)
        enc = encode(self.processor, ex.image, d, self.image_id)
        if self.state.stage == 2:
            # Tokens are fed through mm_encoder_outputs: the pixels only give their shape, and a
            # stride-0 view keeps that for free.
            enc.inputs = {
                k: (v.new_zeros(()).expand(v.shape) if k == "pixel_values" else v)
                for k, v in enc.inputs.items()
            }
            self._encodings[key] = (d, enc)
        return d, enc

    def rows(self, picks, weights, choices, rng) -> list[Row]:
        """Rows of ``picks`` (scene index, example, tokens, dialogue stream), each reduced
        when its choice is a (method, rate)."""
        out = []
        for (index, ex, tok, stream), choice in zip(picks, choices, strict=True):
            d, enc = self.encoded(ex, index, stream, weights)
            reduced = None
            if choice is not None:
                ctx = self.adapter.contexts(enc.inputs)[0]
                reduced = self.augmenter.apply(choice, tok, ctx, int(rng.integers(2**31)))
            out.append(
                make_row(
                    self.adapter, enc, tok, ex=ex, dialogue=d, world=self.world, reduced=reduced
                )
            )
        return out

    def llm_rows(
        self, stage: int, step: int, batch: int, feats: list[torch.Tensor] | None, rng
    ) -> list[Row]:
        """The rows of LLM stage ``stage`` at ``step``: stage 2 draws scenes of the pool
        (``feats``: their frozen tokens) and leaves them whole, stage 3 draws from the bank and
        reduces most rows."""
        c = self.cfg
        first = stage == 2 and step < c.colour_first_steps
        weights = (1.0, 0.0, 0.0, 0.0) if first else c.train_type_weights
        if stage == 2:
            idx = rng.choice(len(self.pool), batch, replace=False)
            # One of `stage2_dialogues` dialogues per scene (streams 2.., colour-only
            # ones apart), so their encodings are reused.
            variants = rng.integers(c.stage2_dialogues, size=batch) + (
                2 + c.stage2_dialogues if first else 2
            )
            picks = [
                (int(i), self.pool[int(i)], feats[int(i)], int(v))
                for i, v in zip(idx, variants, strict=True)
            ]
            choices = [None] * batch
        else:
            picks = self.bank_rows(step, rng)
            choices = self.augmenter.draw(rng, batch)
        return self.rows(picks, weights, choices, rng)

    def held_out_rows(self) -> list[Row]:
        """Rows of the learning curve: ``curve_dialogues`` scenes of the evaluation seed."""
        c = self.cfg
        examples = make_pool(c.eval_seed, c.curve_dialogues, self.world, self.layout)
        rows = []
        for i, (ex, tok) in enumerate(zip(examples, self.frozen_tokens(examples), strict=True)):
            d = S.make_dialogue(ex.scene, S.scene_rng(c.eval_seed, i, 1), self.world)
            enc = encode(self.processor, ex.image, d, self.image_id)
            rows.append(make_row(self.adapter, enc, tok, ex=None, dialogue=d, world=self.world))
        return rows

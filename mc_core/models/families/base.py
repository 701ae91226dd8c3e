"""What a family descriptor is: the one place that knows one LVLM family.

A descriptor (a `Family` subclass in `mc_core/models/families/<name>.py`, registered with
`@register`) gathers everything the rest of the library needs about one family of stock
transformers LVLMs: special tokens, chat template and image settings of its offline processor,
the model and processor classes, the adapter class and its position default, tiny
configurations (world models and test models), real checkpoints, benchmark shapes, how to
recognise a config of the family, and the visual-token layout of a square image.

The data classes here (`TinySpec`, `RealSpec`, `BenchShape`) are plain records the descriptors
fill; `mc_core.models.zoo` and `bench.shapes` read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from mc_core.models.adapters.base import POSITIONS  # how compressed tokens are placed (see Adapter)

__all__ = ["POSITIONS", "BenchShape", "Family", "RealSpec", "TinySpec"]


@dataclass(frozen=True)
class TinySpec:
    """A tiny architecture built from config: family, sizes and the processor's image settings.

    Attributes:
        name: the architecture name (``tiny-llava`` ...).
        family: the family descriptor's name.
        image_cfg: keyword arguments of ``mc_core.models.processors.build_processor`` (image
        geometry).
        vision_image_size: the tower's input side (a crop's / tile's side where there are some).
        patch_size: the tower's patch side in pixels.
        text_*: the LLM (``text_kv_heads`` None: as many as ``text_heads``).
        vision_*: the tower.
        vision_feature_layer: which tower layer feeds the projector (CLIP-like towers).
        rope_theta: the LLM's RoPE base.
    """

    name: str
    family: str
    image_cfg: dict[str, Any]
    vision_image_size: int
    patch_size: int
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 256
    text_kv_heads: int | None = None
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    vision_intermediate: int = 256
    vision_feature_layer: int = -1
    rope_theta: float = 10000.0
    max_positions: int = 2048

    _SIZES: ClassVar[frozenset[str]] = frozenset(
        {
            "text_hidden",
            "text_layers",
            "text_heads",
            "text_intermediate",
            "text_kv_heads",
            "vision_hidden",
            "vision_layers",
            "vision_heads",
            "vision_intermediate",
            "rope_theta",
        }
    )

    def with_sizes(self, **sizes: Any) -> TinySpec:
        """A copy with other sizes (tests use text_hidden 64 / vision_hidden 32)."""
        bad = sorted(set(sizes) - self._SIZES)
        if bad:
            raise ValueError(
                f"with_sizes: unknown size keys {bad}; expected a subset of {sorted(self._SIZES)}"
            )
        return replace(self, **sizes)

    @property
    def kv_heads(self) -> int:
        return self.text_kv_heads or self.text_heads


@dataclass(frozen=True)
class RealSpec:
    """A real base model on the hub: id, family and its processor settings."""

    name: str
    hf_id: str
    family: str
    model_class: str
    processor_kwargs: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    # The published config.json's fields that set parameter counts and shapes, for a model
    # whose family has no benchmark shape: the cost plan builds it offline from them.
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BenchShape:
    """One real checkpoint's shapes for benchmarks, at real size and scaled down for CPU.

    Attributes:
        name: CLI name, e.g. "llava-1.5-7b".
        reference: the HF checkpoint whose config these numbers copy.
        text, vision: LLM and vision tower config fields at real size.
        cpu_text, cpu_vision: overrides for the "cpu" scale.
        tiny_vision: overrides of `vision` for the "tiny" (test) scale.
        image_size: (height, width) of the benchmark image in pixels.
        extra: further fields of the family's config (e.g. anyres pinpoints).
    """

    name: str
    reference: str
    text: dict
    vision: dict
    cpu_text: dict
    cpu_vision: dict
    tiny_vision: dict
    image_size: tuple[int, int]
    extra: dict = field(default_factory=dict)


class Family:
    """Base class of the family descriptors (one instance per family, see `register`).

    Class attributes a descriptor sets:
        name: the family's name ("llava", ...), also the module's name.
        model_types: `config.model_type` values of its HF configs (detection).
        model_class: the transformers `*ForConditionalGeneration` class.
        processor_class: the (offline) processor class `build_processor` returns.
        adapter_class: the `mc_core.models.adapters.Adapter` subclass wiring compression in.
        positions: the adapter's default position handling, "packed" or "source".
        specials: special tokens by role (at least bos, eos, unk, pad, image, end_of_turn).
        template_words: words the chat template writes besides the special tokens.
        image_keys: the `image_cfg` keys its processor accepts.
        token_types: whether its processor returns `mm_token_type_ids` (1 on image tokens).
        tiny: world architectures by name; test: the test-size model of tests/conftest.py.
        real: real checkpoints by name; bench: benchmark shapes by name.
    """

    name: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    model_class: ClassVar[type]
    processor_class: ClassVar[type]
    adapter_class: ClassVar[type]
    positions: ClassVar[str] = "packed"
    specials: ClassVar[dict[str, str]] = {}
    template_words: ClassVar[tuple[str, ...]] = ()
    image_keys: ClassVar[frozenset[str]] = frozenset()
    token_types: ClassVar[bool] = False
    tiny: ClassVar[dict[str, TinySpec]] = {}
    test: ClassVar[TinySpec | None] = None
    real: ClassVar[dict[str, RealSpec]] = {}
    bench: ClassVar[dict[str, BenchShape]] = {}

    # -- processor ----------------------------------------------------------------------------
    def chat_template(self) -> str:
        """The Jinja chat template (prefix property: see mc_core.models.processing)."""
        raise NotImplementedError

    def tokenizer_extras(self) -> dict[str, str]:
        """Extra tokenizer attributes the processor class reads (name -> token)."""
        return {}

    def build_processor(self, tokenizer, image_cfg: dict[str, Any]):
        """The processor around `tokenizer` for the (already key-checked) `image_cfg`."""
        raise NotImplementedError

    # -- models -------------------------------------------------------------------------------
    def tiny_config(self, spec: TinySpec, tokenizer):
        """The transformers config of a tiny architecture whose processor has `tokenizer`."""
        raise NotImplementedError

    def bench_config(self, shape: BenchShape, text: dict, vision: dict):
        """The transformers config of a benchmark shape at given text / vision fields."""
        raise NotImplementedError(f"family {self.name!r} has no benchmark shapes")

    def bench_inputs(self, config, shape: BenchShape, gen) -> tuple[Any, dict, list[int]]:
        """Synthetic image inputs: `(pixel_values, extra inputs, image run)` where the image
        run is the placeholder sequence with `-1` where the n visual placeholders go."""
        raise NotImplementedError(f"family {self.name!r} has no benchmark shapes")

    def token_grids(
        self, config, image_side: int, processor=None
    ) -> tuple[tuple[int, int, bool], ...]:
        """Visual-token layout of a square image of `image_side` pixels.

        `processor` (optional): the model's processor, for families whose processor resizes
        images by settings the model config does not hold (Qwen2-VL's min / max pixels).

        Returns:
            One `(rows, cols, newline)` per part, in sequence order: a row-major grid covering
            the whole image, with one extra token after each row when `newline`.
        """
        raise NotImplementedError

    @property
    def stock_processor_class(self) -> type:
        """The stock transformers processor class `processor_class` is (or derives from): what
        a program without this library (an inference engine) loads a saved processor as."""
        for cls in self.processor_class.__mro__:
            if cls.__module__.startswith("transformers.models."):
                return cls
        raise ValueError(f"{self.processor_class.__name__} derives from no transformers processor")

    # -- detection ----------------------------------------------------------------------------
    def matches(self, config) -> bool:
        """Whether a HF config (object or dict) belongs to this family."""
        model_type = (
            config.get("model_type")
            if isinstance(config, dict)
            else getattr(config, "model_type", None)
        )
        return model_type in self.model_types

    def __repr__(self) -> str:
        return f"<family {self.name}>"

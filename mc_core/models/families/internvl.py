"""InternVL (`InternVLForConditionalGeneration`): ViT tiles, pixel shuffle, MLP projector.

Each tile gives `g x g` tokens (`g = image_size / patch_size * downsample_ratio`); an image is one
tile or several crop tiles plus a thumbnail, all in one `<img> ... </img>` run. The in-library
member of the InternLM-XComposer family. Chat format: ChatML with `<IMG_CONTEXT>` per image
(the processor expands it). Position default "packed" (the HF convention).

InternVL needs `vision_feature_select_strategy="default"`: with "full" the pixel shuffle mixes
the CLS token into the channels and the projector's LayerNorm fails.
"""

from __future__ import annotations

from typing import Any

from transformers import (
    GotOcr2ImageProcessorPil,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
)

from mc_core.models.adapters.internvl import InternVLAdapter
from mc_core.models.families import register
from mc_core.models.families.base import Family, RealSpec, TinySpec
from mc_core.models.processing import NoVideoMixin, chatml_template, norm_cfg, positive_int

__all__ = ["InternVL", "OfflineInternVLProcessor"]


class OfflineInternVLProcessor(NoVideoMixin, InternVLProcessor):
    """`InternVLProcessor` without a video processor.

    The stock class forces `crop_to_patches=True` at call time; here the (saved) image processor's
    own setting decides, so a tiny model can use single tiles.
    """

    _image_processor_cls = GotOcr2ImageProcessorPil
    images_kwargs = {}


def tile_side(image_size: int, patch: int, ratio: float) -> int:
    """Tokens per tile side, `image_size / patch * ratio`; ValueError unless a positive int."""
    side = image_size / patch * ratio
    if image_size % patch or side != int(side) or side <= 0:
        raise ValueError(
            f"image_cfg image_size={image_size}, patch_size={patch}, downsample_ratio={ratio}: "
            "image_size / patch_size * downsample_ratio must be a positive integer"
        )
    return int(side)


@register
class InternVL(Family):
    """InternVL (2.5 / 3, `-hf` checkpoints)."""

    name = "internvl"
    model_types = ("internvl",)
    model_class = InternVLForConditionalGeneration
    processor_class = OfflineInternVLProcessor
    adapter_class = InternVLAdapter
    positions = "packed"
    specials = {
        "bos": "<|im_start|>",
        "eos": "<|im_end|>",
        "unk": "<unk>",
        "pad": "<|endoftext|>",
        "image": "<IMG_CONTEXT>",
        "img_start": "<img>",
        "img_end": "</img>",
        "video": "<video>",
        "im_start": "<|im_start|>",
        "end_of_turn": "<|im_end|>",
    }
    template_words = ("user", "assistant", "system")
    image_keys = frozenset(
        {
            "image_size",
            "patch_size",
            "downsample_ratio",
            "max_patches",
            "min_patches",
            "crop_to_patches",
            "image_mean",
            "image_std",
        }
    )
    # tests/conftest.py: 64 px tiles / patch 8, pixel shuffle 0.5 -> 16 tokens a tile, <= 4 tiles.
    test = TinySpec(
        name="test-internvl",
        family="internvl",
        image_cfg={"image_size": 64, "patch_size": 8, "downsample_ratio": 0.5, "max_patches": 4},
        vision_image_size=64,
        patch_size=8,
        text_hidden=64,
        text_intermediate=128,
        text_kv_heads=2,
        vision_hidden=32,
        vision_intermediate=64,
        vision_heads=2,
        max_positions=512,
    )
    real = {
        "internvl3-8b": RealSpec(
            name="internvl3-8b",
            hf_id="OpenGVLab/InternVL3-8B-hf",
            family="internvl",
            model_class="InternVLForConditionalGeneration",
            processor_kwargs={
                "image_size": 448,
                "patch_size": 14,
                "downsample_ratio": 0.5,
                "crop_to_patches": True,
                "min_patches": 1,
                "max_patches": 12,
            },
            notes="in-library member of the InternLM-XComposer family; 256 tokens per tile",
            # published config: OpenGVLab/InternVL3-8B-hf: Qwen2.5-7B + InternViT-300M
            config=dict(
                text_config=dict(
                    model_type="qwen2",
                    hidden_size=3584,
                    intermediate_size=18944,
                    num_attention_heads=28,
                    num_hidden_layers=28,
                    num_key_value_heads=4,
                    vocab_size=151674,
                    tie_word_embeddings=False,
                ),
                vision_config=dict(
                    hidden_size=1024,
                    intermediate_size=4096,
                    num_attention_heads=16,
                    num_hidden_layers=24,
                    image_size=[448, 448],
                    patch_size=[14, 14],
                ),
                downsample_ratio=0.5,
                image_token_id=151667,
                vision_feature_layer=-1,
                vision_feature_select_strategy="default",
                tie_word_embeddings=False,
            ),
        ),
    }

    def chat_template(self) -> str:
        return chatml_template(self.specials["image"] + "\n")

    def tokenizer_extras(self) -> dict[str, str]:
        # InternVLProcessor reads these attribute names from the tokenizer.
        sp = self.specials
        return {
            "start_image_token": sp["img_start"],
            "end_image_token": sp["img_end"],
            "context_image_token": sp["image"],
        }

    def build_processor(self, tokenizer, image_cfg: dict[str, Any]):
        """image_size [448], patch_size [14], downsample_ratio [0.5] (tokens per tile =
        (image_size / patch_size * downsample_ratio)^2), crop_to_patches [True: dynamic tiling
        plus a thumbnail, as the real model], min_patches [1], max_patches [12]."""
        size = positive_int(image_cfg, "image_size", 448)
        patch = positive_int(image_cfg, "patch_size", 14)
        side = tile_side(size, patch, float(image_cfg.get("downsample_ratio", 0.5)))
        min_patches = positive_int(image_cfg, "min_patches", 1)
        max_patches = positive_int(image_cfg, "max_patches", 12)
        if min_patches > max_patches:
            raise ValueError(f"image_cfg min_patches={min_patches} > max_patches={max_patches}")
        image_processor = GotOcr2ImageProcessorPil(
            size={"height": size, "width": size},
            crop_to_patches=bool(image_cfg.get("crop_to_patches", True)),
            min_patches=min_patches,
            max_patches=max_patches,
            **norm_cfg(image_cfg),
        )
        return OfflineInternVLProcessor(
            image_processor,
            tokenizer,
            None,
            image_seq_length=side**2,
            chat_template=self.chat_template(),
        )

    def tiny_config(self, spec: TinySpec, tokenizer):
        ratio = float(spec.image_cfg.get("downsample_ratio", 0.5))
        side = tile_side(spec.vision_image_size, spec.patch_size, ratio)
        return InternVLConfig(
            vision_config=dict(
                hidden_size=spec.vision_hidden,
                num_hidden_layers=spec.vision_layers,
                num_attention_heads=spec.vision_heads,
                intermediate_size=spec.vision_intermediate,
                image_size=[spec.vision_image_size] * 2,
                patch_size=[spec.patch_size] * 2,
            ),
            text_config=dict(
                model_type="qwen2",
                vocab_size=len(tokenizer),
                hidden_size=spec.text_hidden,
                intermediate_size=spec.text_intermediate,
                num_hidden_layers=spec.text_layers,
                num_attention_heads=spec.text_heads,
                num_key_value_heads=spec.kv_heads,
                max_position_embeddings=spec.max_positions,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                bos_token_id=None,
            ),
            image_token_id=tokenizer.convert_tokens_to_ids(self.specials["image"]),
            image_seq_length=side**2,
            downsample_ratio=ratio,
            vision_feature_layer=spec.vision_feature_layer,
            vision_feature_select_strategy="default",
        )

    def token_grids(
        self, config, image_side: int, processor=None
    ) -> tuple[tuple[int, int, bool], ...]:
        # One tile: the processor's tiling (crop_to_patches, max_patches) is not in the model
        # config, so this is the layout of an image the processor keeps as a single tile.
        vc = config.vision_config
        size = vc.image_size[0] if isinstance(vc.image_size, (list, tuple)) else vc.image_size
        patch = vc.patch_size[0] if isinstance(vc.patch_size, (list, tuple)) else vc.patch_size
        g = tile_side(size, patch, config.downsample_ratio)
        return ((g, g, False),)

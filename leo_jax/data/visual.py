"""Model kinds as data-side objects: how a model's images become batch arrays and visual-token counts.

Each kind is derived from the validated model config (the facts the model owns: input sizes, tokens per tile or
image, expert preprocessors) and the data config (choices of the data: tiling budget, slots per row,
augmentation). `for_model` picks the kind for a model config; the pipeline, preflight, trainer, evaluator, AOT and
chat all ask it instead of comparing kind names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from leo_jax.data import image_processing, tiling
from leo_jax.models.leo import LeoConfig
from leo_jax.models.leo_mini import PATCH_INPUT_KINDS, LeoMiniConfig
from leo_jax.models.llm.decoder import LLMConfig
from leo_jax.models.registry import model_config


@dataclasses.dataclass(frozen=True)
class VisualSetup:
    """Batch contract of one kind's visual entries."""

    mask_key: str  # 'tile_mask' | 'image_mask'
    capacity: int  # items per row (K tiles / M images)
    specs: dict[str, tuple[tuple[int, ...], Any]]  # batch key -> (one item's shape, dtype)


@dataclasses.dataclass(frozen=True)
class TextOnly:
    """A plain LLM: no images (a sample with images is skipped), no visual batch entries."""

    name = "text-only LLM"
    mask_key = "image_mask"
    budget = -1  # no encoders to budget
    slots: int = 0
    max_images: int | None = 0  # images per sample; None = no limit

    @classmethod
    def from_model(cls, cfg: LLMConfig, data_config) -> TextOnly:
        del cfg, data_config
        return cls()

    def preprocessors(self) -> dict[str, Any]:
        return {}

    @staticmethod
    def input_preprocessors(cfg: LLMConfig) -> dict[str, Any]:
        del cfg
        return {}

    def setup(self, preprocessors: Mapping[str, Any]) -> VisualSetup:
        del preprocessors
        return VisualSetup(self.mask_key, self.slots, {})

    def visual(self, images, preprocessors, rng, training):
        del images, preprocessors, rng, training
        return {}, []

    def preflight_counts(self) -> dict[str, int]:
        return {}

    def with_slots(self, slots: int) -> TextOnly:
        return self


def visual_budget(data_config) -> int:
    """`data.visual_budget`: visual items (LEO tiles, LEO-MINI images) the encoders run on per global batch; -1 =
    every slot (B x K)."""
    budget = int(data_config.get("visual_budget", -1))
    if budget != -1 and budget < 1:
        raise ValueError(f"data.visual_budget={budget}: use -1 (every slot of the batch) or a positive number of "
                         "tiles (LEO) / images (LEO-MINI) per global batch")
    return budget


def tiles_per_row(leo) -> int:
    """LEO's tile slots per row (`data.leo`): `max_tiles_per_row`, or (-1) the most tiles a sample of up to
    `max_images_per_sample` images yields under the official split (max_tiles // n per image, + thumbnails); an
    explicit value below that is an error, since such samples would all be skipped."""
    max_images = int(leo.get("max_images_per_sample", 1))
    needed = tiling.max_tiles_per_sample(int(leo.max_tiles), max_images, bool(leo.use_thumbnail))
    if int(leo.max_tiles_per_row) == -1:
        return needed
    if int(leo.max_tiles_per_row) < needed:
        raise ValueError(f"data.leo.max_tiles_per_row={leo.max_tiles_per_row} is below the {needed} tiles a sample of "
                         f"up to data.leo.max_images_per_sample={max_images} image(s) can take with "
                         f"data.leo.max_tiles={leo.max_tiles}: set it to -1 (derived) or >= {needed}")
    return int(leo.max_tiles_per_row)


@dataclasses.dataclass(frozen=True)
class LeoTiles:
    """LEO: adaptive tiling of each image (its share of `max_tiles`, plus a thumbnail), InternViT + SAM inputs per
    tile, `tokens_per_tile` visual tokens per tile, `slots` tile slots per batch row."""

    tile_size: int  # InternViT input px = tile px (the model's)
    tokens_per_tile: int  # the model's interleaved InternViT + SAM tokens per tile
    sam_size: int  # SAM host input px; the model enlarges smaller inputs on device
    slots: int
    min_tiles: int = 1
    max_tiles: int = 6
    use_thumbnail: bool = True
    jpeg_augment: bool = False
    jpeg_quality_range: tuple[int, int] = (75, 100)
    budget: int = -1  # tiles InternViT + SAM run on per global batch (data.visual_budget); -1 = every slot

    name = "LEO"
    mask_key = "tile_mask"
    max_images = None

    def __post_init__(self):
        for field in ("tile_size", "tokens_per_tile", "sam_size", "max_tiles"):
            if getattr(self, field) <= 0:
                raise ValueError(f"LEO tiles: {field} must be positive, got {getattr(self, field)}")

    @classmethod
    def from_model(cls, cfg: LeoConfig, data_config) -> LeoTiles:
        """Tile size and tokens per tile from the model; `data.leo` gives the tiling budget, slots and augmentation
        (`sam_size` 0: SAM inputs ship at tile size, ~5x fewer host->device bytes than 1024 px)."""
        kind = cls.from_data(data_config, cfg.intern_vit.image_size, cfg.tokens_per_tile())
        if kind.sam_size > cfg.sam.image_size:
            raise ValueError(f"data.leo.sam_size={kind.sam_size} is larger than the model's SAM input "
                             f"(config.model.sam.image_size={cfg.sam.image_size}); use 0 (the tile size) or "
                             "at most the SAM input size")
        return kind

    @classmethod
    def from_data(cls, data_config, tile_size: int, tokens_per_tile: int) -> LeoTiles:
        """The model's tile size and tokens per tile with the options of `data.leo`."""
        leo = data_config.leo
        return cls(tile_size=tile_size, tokens_per_tile=tokens_per_tile, sam_size=int(leo.sam_size) or tile_size,
                   slots=tiles_per_row(leo), min_tiles=int(leo.min_tiles), max_tiles=int(leo.max_tiles),
                   use_thumbnail=bool(leo.use_thumbnail), jpeg_augment=bool(leo.jpeg_augment),
                   jpeg_quality_range=tuple(leo.jpeg_quality_range), budget=visual_budget(data_config))

    @staticmethod
    def input_preprocessors(cfg: LeoConfig) -> dict[str, Any]:
        """Input name (the official LEO forward's) -> the full preprocessing of that input, the model's device
        normalisation included: InternViT at the tile size, SAM at its own image size (longest side, padded square),
        each with its encoder config's mean/std."""
        intern, sam = cfg.intern_vit, cfg.sam
        return {"pixel_values": image_processing.get_preprocessor("intern_vit", size=intern.image_size,
                                                                  mean=intern.pixel_mean, std=intern.pixel_std),
                "pixel_values_sam": image_processing.get_preprocessor("sam", longest_edge=sam.image_size,
                                                                      mean=sam.pixel_mean, std=sam.pixel_std)}

    def preprocessors(self) -> dict[str, Any]:
        """Batch key -> host preprocessor: InternViT tiles and SAM tiles."""
        return {"tiles": image_processing.get_preprocessor("intern_vit", size=self.tile_size),
                "sam_tiles": image_processing.get_preprocessor("sam", longest_edge=self.sam_size)}

    def setup(self, preprocessors: Mapping[str, Any]) -> VisualSetup:
        specs = {key: ((*pre.output_size, 3), np.uint8) for key, pre in preprocessors.items()}
        return VisualSetup(self.mask_key, self.slots, specs)

    def visual(self, images: list[Image.Image], preprocessors: Mapping[str, Any], rng: np.random.Generator,
               training: bool):
        """Tile each image within its share of the tile budget; InternViT + SAM input per tile; JPEG re-encoding
        of the InternViT tiles in training (the LEO recipe)."""
        if not images:
            return {}, []
        budget = tiling.tiles_per_image_budget(len(images), self.max_tiles)
        internvit_tiles, sam_tiles, token_counts = [], [], []
        for image in images:
            tiles = tiling.tile_image(image, max_tiles=budget, tile=self.tile_size, min_tiles=self.min_tiles,
                                      use_thumbnail=self.use_thumbnail)
            for tile in tiles:
                sam_tiles.append(preprocessors["sam_tiles"].host(tile))
                if training and self.jpeg_augment:
                    tile = tiling.jpeg_quality_augment(tile, rng, self.jpeg_quality_range)
                internvit_tiles.append(preprocessors["tiles"].host(tile))
            token_counts.append(self.tokens_per_tile * len(tiles))
        return {"tiles": np.stack(internvit_tiles), "sam_tiles": np.stack(sam_tiles)}, token_counts

    def preflight_counts(self) -> dict[str, int]:
        return {"tokens_per_tile": self.tokens_per_tile}

    def with_slots(self, slots: int) -> LeoTiles:
        return dataclasses.replace(self, slots=slots)


@dataclasses.dataclass(frozen=True)
class LeoMiniExperts:
    """LEO-MINI: every expert's own preprocessing of each whole image (experts in model order), `tokens_per_image`
    visual tokens per image after CoTR, `slots` image slots per batch row."""

    experts: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]  # (name, preprocessor options incl. 'kind')
    tokens_per_image: int
    slots: int
    budget: int = -1  # images the experts, CoTR and the projector run on per global batch; -1 = every slot

    name = "LEO-MINI"
    mask_key = "image_mask"
    max_images = None

    def __post_init__(self):
        if not self.experts:
            raise ValueError("LEO-MINI needs at least one vision expert")
        if self.tokens_per_image <= 0:
            raise ValueError(f"LEO-MINI: tokens_per_image must be positive, got {self.tokens_per_image}")

    @classmethod
    def from_model(cls, cfg: LeoMiniConfig, data_config) -> LeoMiniExperts:
        """Experts and their preprocessors and the tokens per image from the model; `data.leo_mini` gives the
        image slots per row."""
        return cls.from_data(data_config, {spec.name: spec.processor for spec in cfg.experts},
                             cfg.visual_tokens_per_image())

    @classmethod
    def from_data(cls, data_config, processors: Mapping[str, Mapping[str, Any]],
                  tokens_per_image: int) -> LeoMiniExperts:
        """Expert name -> preprocessor options (in model order) and the model's tokens per image, with the options
        of `data.leo_mini`."""
        experts = tuple((name, tuple(dict(options).items())) for name, options in processors.items())
        return cls(experts=experts, tokens_per_image=tokens_per_image,
                   slots=int(data_config.leo_mini.max_images_per_row), budget=visual_budget(data_config))

    @staticmethod
    def input_preprocessors(cfg: LeoMiniConfig) -> dict[str, Any]:
        """Batch key of each expert's input -> the full preprocessing of that input: the expert's host processor
        with its encoder config's mean/std (Pix2Struct standardises each image on the host)."""
        out = {}
        for spec in cfg.experts:
            options = dict(spec.processor)
            if spec.kind not in PATCH_INPUT_KINDS:
                encoder = spec.encoder
                options.update(mean=encoder.pixel_mean, std=encoder.pixel_std)
            out[spec.batch_key] = image_processing.get_preprocessor(options.pop("kind"), **options)
        return out

    def preprocessors(self) -> dict[str, Any]:
        """Expert name -> host preprocessor, in model order."""
        out = {}
        for name, options in self.experts:
            options = dict(options)
            out[name] = image_processing.get_preprocessor(options.pop("kind"), **options)
        return out

    def setup(self, preprocessors: Mapping[str, Any]) -> VisualSetup:
        specs = {}
        for name, pre in preprocessors.items():
            if isinstance(pre, image_processing.Pix2StructPreprocessor):
                specs[f"patches_{name}"] = ((pre.max_patches, pre.patch_dim), np.float32)
                specs[f"patch_mask_{name}"] = ((pre.max_patches,), np.float32)
            else:
                specs[f"pixels_{name}"] = ((*pre.output_size, 3), np.uint8)
        return VisualSetup(self.mask_key, self.slots, specs)

    def visual(self, images: list[Image.Image], preprocessors: Mapping[str, Any], rng, training):
        del rng, training  # no augmentation
        if not images:
            return {}, []
        visual: dict[str, np.ndarray] = {}
        for name, pre in preprocessors.items():
            outputs = [pre.host(image) for image in images]
            if isinstance(outputs[0], dict):  # pix2struct: flattened patches + mask
                visual[f"patches_{name}"] = np.stack([o["flattened_patches"] for o in outputs])
                visual[f"patch_mask_{name}"] = np.stack([o["attention_mask"] for o in outputs])
            else:
                visual[f"pixels_{name}"] = np.stack(outputs)
        return visual, [self.tokens_per_image] * len(images)

    def preflight_counts(self) -> dict[str, int]:
        return {"tokens_per_image": self.tokens_per_image}

    def with_slots(self, slots: int) -> LeoMiniExperts:
        return dataclasses.replace(self, slots=slots)


VisualKind = TextOnly | LeoTiles | LeoMiniExperts

# model config dataclass -> its data-side kind
KINDS: dict[type, type] = {LLMConfig: TextOnly, LeoConfig: LeoTiles, LeoMiniConfig: LeoMiniExperts}


def for_model(model_cfg, data_config) -> VisualKind:
    """The data-side kind of a validated model config (leo_jax.models.registry.model_config)."""
    kind = KINDS.get(type(model_cfg))
    if kind is None:
        raise ValueError(f"config.model ({type(model_cfg).__name__}) has no data pipeline: train, evaluate or chat "
                         f"with one of {sorted(k.__name__ for k in KINDS)}")
    return kind.from_model(model_cfg, data_config)


def input_preprocessors(model_cfg) -> dict[str, Any]:
    """Model input name -> the full preprocessing (host geometry and the model's normalisation) of a validated model
    config: what an exported model's preprocessor_config.json records."""
    kind = KINDS.get(type(model_cfg))
    if kind is None:
        raise ValueError(f"config.model ({type(model_cfg).__name__}) has no data-side kind; use one of "
                         f"{sorted(k.__name__ for k in KINDS)}")
    return kind.input_preprocessors(model_cfg)


def for_config(config) -> VisualKind:
    """The data-side kind of a full config (sections `model` and `data`)."""
    return for_model(model_config(config.model), config.data)

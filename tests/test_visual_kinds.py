"""Model kinds on the data side (leo_jax.data.visual): derived from the model config, they give the tokens per tile /
image and the slots the model computes with; the model facts are no longer copied into the data config."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from leo_jax.aot import batch_shapes
from leo_jax.config import config_from_argv, load_config
from leo_jax.data import visual
from leo_jax.models.registry import abstract_model, model_config


@pytest.mark.parametrize("preset", ["tiny_leo", "leo_8b"])
def test_leo_tiles_follow_the_model(preset):
    config = load_config(preset)
    kind = visual.for_config(config)
    model = abstract_model(config.model)
    t, s = kind.tile_size, kind.sam_size
    tokens = nnx.eval_shape(lambda m: m.tile_tokens(jnp.zeros((1, t, t, 3), jnp.uint8),
                                                    jnp.zeros((1, s, s, 3), jnp.uint8)), model)
    assert isinstance(kind, visual.LeoTiles)
    assert kind.tokens_per_tile == tokens.shape[1] == {"tiny_leo": 32, "leo_8b": 512}[preset]
    assert kind.tile_size == model.cfg.intern_vit.image_size
    assert kind.slots == visual.tiles_per_row(config.data.leo) == {"tiny_leo": 2, "leo_8b": 7}[preset]
    assert kind.preflight_counts() == {"tokens_per_tile": tokens.shape[1]}


@pytest.mark.parametrize("preset", ["tiny_leo_mini", "leo_mini_llama3_8b", "leo_mini_vicuna_7b"])
def test_leo_mini_experts_follow_the_model(preset):
    config = load_config(preset)
    kind = visual.for_config(config)
    cfg = model_config(config.model)
    assert isinstance(kind, visual.LeoMiniExperts)
    assert [name for name, _ in kind.experts] == [spec.name for spec in cfg.experts]
    assert kind.tokens_per_image == cfg.cotr_config.num_queries == {"tiny_leo_mini": 16}.get(preset, 64)
    assert kind.slots == config.data.leo_mini.max_images_per_row
    setup = kind.setup(kind.preprocessors())
    assert set(setup.specs) >= {spec.batch_key for spec in cfg.experts}


@pytest.mark.parametrize("preset", ["tiny_leo_train", "tiny_leo_mini_train"])
def test_the_model_writes_tokens_per_item_into_every_slot(preset):
    """The abstract batch of the kind (its slots and item shapes) runs through the model, whose visual tokens per
    row are slots x the kind's tokens per item."""
    config = load_config(preset)
    config.model.image_context_id = 3
    kind = visual.for_config(config)
    batch = batch_shapes(config, kind)
    batch = {k: jax.ShapeDtypeStruct((1, *v.shape[1:]), v.dtype) for k, v in batch.items()}
    model = abstract_model(config.model)
    embeds, _ = nnx.eval_shape(lambda m, b: m.embed_inputs(b), model, batch)
    assert embeds.shape[:2] == batch["input_ids"].shape
    per_item = kind.tokens_per_tile if isinstance(kind, visual.LeoTiles) else kind.tokens_per_image
    if isinstance(kind, visual.LeoTiles):
        tokens = nnx.eval_shape(lambda m: m.tile_tokens(jnp.zeros(batch["tiles"].shape[1:], jnp.uint8),
                                                        jnp.zeros(batch["sam_tiles"].shape[1:], jnp.uint8)), model)
        assert tokens.shape[:2] == (kind.slots, per_item)
    else:
        text = jax.ShapeDtypeStruct((1, kind.slots, 1, model.llm.cfg.hidden_size), jnp.float32)
        mask = jax.ShapeDtypeStruct((1, kind.slots, 1), jnp.bool_)
        tokens = nnx.eval_shape(lambda m, b, t, k: m.visual_tokens(b, t, k), model, batch, text, mask)
        assert tokens.shape[1:3] == (kind.slots, per_item)
    assert batch[kind.mask_key].shape == (1, kind.slots)


def test_text_only_llm_has_no_visual_entries():
    config = load_config("tiny_llm")
    kind = visual.for_model(model_config(config.model), None)
    assert isinstance(kind, visual.TextOnly)
    assert kind.setup(kind.preprocessors()).specs == {} and kind.max_images == 0


def test_model_facts_are_not_data_fields():
    for field in ("leo.tokens_per_tile", "leo.tile_size", "leo_mini.num_query_tokens", "leo_mini.experts",
                  "leo_mini.expert_options"):
        with pytest.raises(ValueError, match=f"config has no field 'config.data.{field}'"):
            load_config("tiny_leo_mini", [f"data.{field}=1"])


def test_sam_inputs_larger_than_the_model_are_an_error():
    config = load_config("tiny_leo", ["data.leo.sam_size=128"])
    with pytest.raises(ValueError, match=r"data.leo.sam_size=128 is larger than the model's SAM input "
                                         r"\(config.model.sam.image_size=64\)"):
        visual.for_config(config)


def test_encoder_models_have_no_data_kind():
    config = load_config("clip_vit_l14_336")
    with pytest.raises(ValueError, match="has no data pipeline"):
        visual.for_model(model_config(config.model), None)


def test_nested_expert_override_from_the_command_line_reaches_the_model():
    config, rest = config_from_argv(["--config", "tiny_leo_mini", "--config.model.experts.clip.encoder.num_layers=4",
                                     "--config.model.experts.convnext.grid=2", "--workdir", "w"])
    assert rest == ["--workdir", "w"]
    model = abstract_model(config.model)
    layers = nnx.state(model.experts["clip"])["layers"]["mlp"]["fc1"]["kernel"]
    assert layers.get_value().shape[0] == 4  # 2 in the preset
    assert [spec.name for spec in model.specs] == ["clip", "convnext"]  # expert_order, not the keys' sorted order
    assert model.cfg.cotr_config.expert_tokens == (64, 4)  # convnext resized to its new 2 x 2 grid


def test_wrong_nested_expert_fields_name_the_full_path():
    with pytest.raises(ValueError, match=r"config has no field 'config.model.experts.clip.encoder.num_layerz'"):
        config_from_argv(["--config", "tiny_leo_mini", "--config.model.experts.clip.encoder.num_layerz=4"])
    config = load_config("tiny_leo_mini")
    config.model.experts.clip.encoder.num_layerz = 4  # a typo in a config file
    with pytest.raises(ValueError, match=r"config.model.experts.clip.encoder: unknown field\(s\) \['num_layerz'\]"):
        model_config(config.model)
    config = load_config("tiny_leo_mini", ["model.expert_order=('convnext',)"])
    with pytest.raises(ValueError, match=r"config.model.expert_order=\('convnext',\) must list every expert"):
        model_config(config.model)

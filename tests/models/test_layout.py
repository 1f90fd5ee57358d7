"""The layout the model reads off its config: MLP width, attention windows, value-embedding layers,
loop groups, and which blocks the stacked inference path can take; the built model follows it."""

import pytest

from mtplab.config import ModelConfig
from mtplab.models.layout import attention_window, ff_dim, has_value_embed, loop_groups
from mtplab.models.stacked import plain_blocks
from mtplab.models.transformer import Transformer

BASE = dict(vocab_size=61, d_model=96, n_layers=6, n_heads=4, max_seq_len=64)


@pytest.mark.parametrize("settings, width", [(dict(), 384), (dict(mlp="relu2"), 384),
                                             (dict(mlp="swiglu"), 256),  # 8/3 * 96 = 256
                                             (dict(mlp="swiglu", d_model=104), 288),  # 277 -> 288
                                             (dict(mlp="swiglu", d_ff=50), 50)])
def test_ff_dim_is_d_ff_or_the_mlps_default(settings, width):
    config = ModelConfig(**{**BASE, **settings})
    assert ff_dim(config) == width
    assert Transformer(config).blocks[0].mlp.down_proj.in_features == width


def test_window_pattern_tiles_and_the_last_layer_is_full():
    c = ModelConfig(**BASE, window_pattern="SSSL", window=7)
    assert [attention_window(c, i) for i in range(6)] == [7, 7, 7, 0, 7, 0]
    assert [attention_window(ModelConfig(**BASE, window_pattern="sl", window=3), i) for i in range(6)] == [3, 0] * 3
    assert {attention_window(ModelConfig(**BASE), i) for i in range(6)} == {0}
    assert [b.attn.window for b in Transformer(c).blocks] == [7, 7, 7, 0, 7, 0]


def test_value_embeds_alternate_back_from_the_last_layer():
    for n_layers, layers in [(6, [1, 3, 5]), (5, [0, 2, 4]), (1, [0])]:
        c = ModelConfig(**{**BASE, "n_layers": n_layers}, value_embeds=True)
        assert [i for i in range(n_layers + 2) if has_value_embed(c, i)] == layers
        assert sorted(map(int, Transformer(c).value_embeds)) == layers
    assert not any(has_value_embed(ModelConfig(**BASE), i) for i in range(6))


@pytest.mark.parametrize("n_layers, loop_layers, groups", [(6, 0, (3, 0, 3)), (6, 2, (2, 2, 2)),
                                                           (5, 2, (1, 2, 2)), (4, 4, (0, 4, 0))])
def test_loop_groups_put_the_shared_blocks_in_the_middle(n_layers, loop_layers, groups):
    c = ModelConfig(**{**BASE, "n_layers": n_layers}, loop_layers=loop_layers)
    assert loop_groups(c) == groups
    assert sum(groups) == n_layers


@pytest.mark.parametrize("settings, plain", [(dict(), True), (dict(norm_affine=False), False),
                                             (dict(qk_norm=True), False), (dict(low_rank=4), False)])
def test_only_plain_blocks_stack(settings, plain):
    config = ModelConfig(**BASE, n_future=3, **settings)
    assert plain_blocks(config) is plain
    assert Transformer(config).heads.stackable is plain

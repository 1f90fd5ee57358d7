"""The causal decoder's layout, read off its ModelConfig: the MLP width, each trunk layer's attention
window and value embedding, and the looped trunk's groups.

These are the model's reading of the settings, so they live beside the model code; the config holds
only the settings themselves (and their checks).
"""

from __future__ import annotations

from ..config import ModelConfig


def ff_dim(config: ModelConfig) -> int:
    """The MLP's hidden width: model.d_ff, or by default 4*d_model; swiglu's default is 8/3*d_model
    rounded up to a multiple of 32, so that its three matrices cost what gelu's two do."""
    if config.d_ff:
        return config.d_ff
    if config.mlp == "swiglu":
        return 32 * -(-(8 * config.d_model // 3) // 32)
    return 4 * config.d_model


def attention_window(config: ModelConfig, layer: int) -> int:
    """Trunk layer `layer`'s attention window in positions, 0 meaning full. model.window_pattern is
    tiled over the trunk; the last layer is always full, so that the output sees the whole context."""
    if not config.window_pattern or layer >= config.n_layers - 1:
        return 0
    letter = config.window_pattern.upper()[layer % len(config.window_pattern)]
    return config.window if letter == "S" else 0


def has_value_embed(config: ModelConfig, layer: int) -> bool:
    """Whether trunk layer `layer` adds a value embedding (model.value_embeds): every other layer,
    counted back from the last, which always has one."""
    return (config.value_embeds and layer < config.n_layers
            and layer % 2 == (config.n_layers - 1) % 2)


def loop_groups(config: ModelConfig) -> tuple[int, int, int]:
    """(entry, shared, exit) block counts of the trunk: the loop_layers shared blocks sit in the
    middle, the unique ones split around them (the odd one out goes to the exit)."""
    unique = config.n_layers - config.loop_layers
    return unique // 2, config.loop_layers, unique - unique // 2


__all__ = ["ff_dim", "attention_window", "has_value_embed", "loop_groups"]

"""mtplab: small language models that predict several tokens per step.

    import mtplab
    result = mtplab.train("recipes/tiny.toml", "runs/tiny")      # or a Config
    model, tokenizer = mtplab.load("runs/tiny")
    print(mtplab.generate(model, tokenizer, "Ava has 3 apples. ...", chat=True))
"""

from .version import __version__

# The architectures mtplab ships besides its causal decoder register themselves (architectures.py).
from . import monostep  # noqa: E402,F401


def load(directory, device="cpu"):
    """(model, tokenizer) from a checkpoint directory."""
    from .models.checkpoint import load_model

    return load_model(directory, device)


def train(recipe, out_dir, overrides=(), resume=False, progress=True):
    """Train from a recipe path (or a `Config`) into the checkpoint directory `out_dir`."""
    from .config import Config, load_config
    from .training.trainer import train as run

    config = recipe if isinstance(recipe, Config) else load_config(recipe, list(overrides))
    return run(config, out_dir, resume=resume, progress=progress)


def generate(model, tokenizer, prompt, **options):
    """Text completion; options: chat, max_new_tokens, temperature, top_k, top_p, seed,
    speculative (default: on when the model has several heads), n_draft."""
    from .inference.decode import generate as run

    return run(model, tokenizer, prompt, **options)

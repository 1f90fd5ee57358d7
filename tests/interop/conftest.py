"""What the interop tests share: a tokenizer trained on a few sentences, random checkpoints made
with it, and greedy decoding in transformers read the way mtplab yields tokens. Nothing here
imports transformers: the tests that need it skip on their own."""

import pytest
import torch

from mtplab.config import ModelConfig
from mtplab.models.checkpoint import load_model, save_checkpoint
from mtplab.models.transformer import Transformer
from mtplab.tokenizer import Tokenizer

CORPUS = ["Ava has 3 apples. Then Ava buys 5 more apples. How many apples does Ava have now?",
          "Ben had 12 pears and gave 4 away. #### 8", "The meaning of life is to live."] * 20
SPECIALS = ["<pad>", "<empty>", "<system>", "<user>", "<assistant>"]
# init_std 0.3: a tiny random model with the usual 0.02 repeats one token; this one varies its output
CHECKPOINT_BASE = dict(vocab_size=320, d_model=32, n_layers=2, n_heads=4, max_seq_len=48, init_std=0.3)
PROMPT = "Ava has 3 apples. Then"


@pytest.fixture(scope="module")
def tokenizer():
    """A 300-token BPE of CORPUS with the chat specials (the checkpoints pad it to 320 rows)."""
    return Tokenizer.train(CORPUS, vocab_size=300, special_tokens=SPECIALS)


def make_checkpoint(path, tokenizer, seed=0, **overrides):
    """A random model saved as an mtplab checkpoint, and the model mtplab loads back from it."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**CHECKPOINT_BASE, **overrides}))
    with torch.no_grad():  # move scalars and fresh heads off their neutral start
        for name, p in model.named_parameters():
            if p.dim() < 2 or name.startswith("heads."):
                p.add_(0.3 * torch.randn_like(p))
    save_checkpoint(path, model, tokenizer)
    return load_model(path)[0]


def greedy_hf(hf, prompt, n):
    """HF greedy tokens after the prompt, up to (not including) end-of-text, as mtplab yields them."""
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, use_cache=True)
    tokens = out[0, len(prompt):].tolist()
    eos = hf.generation_config.eos_token_id
    return tokens[:tokens.index(eos)] if eos in tokens else tokens

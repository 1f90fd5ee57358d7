"""An independent reading of seed 000's model card, for the tests to check mtplab's Monostep against:
the three classes with the card's module names, its block-greedy `generate`, and its bundle.
Written from the card's description, kept deliberately plain; it shares no code with mtplab."""

from __future__ import annotations

import torch
import torch.nn as nn

SPECIALS = ["<pad>", "<empty>", "<system>", "<user>", "<assistant>"]


class Trunk(nn.Module):
    def __init__(self, vocab, d, layers, heads, max_len):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d)
        self.pos_emb = nn.Embedding(max_len, d)
        enc_layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.1, activation="gelu",
                                               batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(enc_layer, num_layers=layers, enable_nested_tensor=False)
        self.out_norm = nn.LayerNorm(d)

    def forward(self, ids, mask):
        pos = torch.arange(ids.size(1)).unsqueeze(0).expand(ids.size(0), -1)
        x = self.encoder(self.tok_emb(ids) + self.pos_emb(pos), src_key_padding_mask=~mask)
        m = mask.unsqueeze(-1).float()
        return self.out_norm((x * m).sum(1) / m.sum(1).clamp_min(1.0))


class Slot(nn.Module):
    def __init__(self, d, vocab):
        super().__init__()
        self.ff = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, d))
        self.norm = nn.LayerNorm(d)
        self.to_vocab = nn.Linear(d, vocab)

    def forward(self, shared, prev):
        h = self.norm(prev + self.ff(torch.cat([shared, prev], -1)))
        return h, self.to_vocab(h)


class Monostep(nn.Module):
    def __init__(self, vocab, d=64, layers=4, heads=4, max_len=512, slots=4):
        super().__init__()
        self.trunk = Trunk(vocab, d, layers, heads, max_len)
        self.init_state = nn.Parameter(torch.zeros(d))
        self.slots = nn.ModuleList([Slot(d, vocab) for _ in range(slots)])

    def forward(self, ids, mask):
        shared = self.trunk(ids, mask)
        h = self.init_state.unsqueeze(0).expand(ids.size(0), -1)
        outs = []
        for slot in self.slots:
            h, logits = slot(shared, h)
            outs.append(logits)
        return torch.stack(outs, 1)


def random_model(config: dict, seed: int = 0) -> Monostep:
    """The card's model with random weights everywhere (init_state and biases too)."""
    torch.manual_seed(seed)
    model = Monostep(config["vocab_size"], config["d_model"], config["n_layers"], config["n_heads"],
                     config["max_len"], config["slots"])
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5 if p.dim() == 1 else 0.2)
    return model.eval()


@torch.no_grad()
def generate(model, encode, decode, question, empty_id, eos_id, max_len, slots, max_new_tokens=128):
    """The card's `generate`: its prompt format, argmax per slot, <empty> dropped, stop at eos."""
    prompt = f"<system> You are a helpful math assistant.\n<user> {question.strip()}\n<assistant> "
    ids = torch.tensor([encode(prompt)])
    out = []
    for _ in range(max_new_tokens // slots):
        logits = model(ids, torch.ones_like(ids, dtype=torch.bool))[0]
        block = [t for t in logits.argmax(-1).tolist() if t != empty_id]
        if not block:
            break
        out += block
        ids = torch.cat([ids, torch.tensor([block])], dim=1)[:, -max_len:]
        if eos_id in block:
            break
    return decode(out)


def save_bundle(path, model: Monostep, config: dict, optimizer=None) -> dict:
    bundle = {"model_state_dict": model.state_dict(),
              "optimizer_state_dict": optimizer.state_dict() if optimizer is not None else None,
              "config": config, "train_history": [5.9, 4.8, 4.3], "eval_history": [5.5, 5.0, 4.6],
              "sample_output": "There are 7 apples left."}
    torch.save(bundle, path)
    return bundle

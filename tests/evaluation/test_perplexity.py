import torch
import torch.nn.functional as F

from mtplab.config import ModelConfig
from mtplab.evaluation.perplexity import perplexity
from mtplab.models.transformer import Transformer


def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=2, max_seq_len=16,
                                   n_future=1, head_layers=0)).eval()


def test_one_window_equals_plain_cross_entropy():
    m = model()
    ids = torch.randint(0, 50, (15,)).tolist()
    with torch.no_grad():
        ref = F.cross_entropy(m(torch.tensor([ids[:-1]]))[0][0], torch.tensor(ids[1:])).item()
    result = perplexity(m, ids, n_bytes=60)
    assert result["tokens"] == 14
    assert abs(result["nats_per_token"] - ref) < 1e-5
    assert abs(result["bits_per_byte"] - ref * 14 / 60 / 0.6931471805599453) < 1e-5


def test_sliding_window_scores_every_token_once_with_context():
    m = model()
    ids = torch.randint(0, 50, (100,)).tolist()
    small_stride = perplexity(m, ids, 100, window=16, stride=4)
    no_overlap = perplexity(m, ids, 100, window=16, stride=16)
    assert small_stride["tokens"] == no_overlap["tokens"] == 99
    # more context per scored token changes the score (RoPE model, random weights)
    assert small_stride["nats_per_token"] != no_overlap["nats_per_token"]

import torch
import torch.nn.functional as F

from mtplab.data.batches import IGNORE
from mtplab.evaluation.head_loss import head_loss, mask_pad


def test_label_smoothing_and_pad_ignoring_in_head_loss():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 6, 11), torch.randint(1, 11, (2, 6))
    labels[1, 4:] = 0  # pad id 0 at the end of row 1
    total, count = head_loss(logits, labels, 0, label_smoothing=0.05, pad_id=0)
    keep = labels != 0
    expected = F.cross_entropy(logits[keep], labels[keep], label_smoothing=0.05, reduction="sum")
    assert count == int(keep.sum()) == 10 and torch.allclose(total, expected)
    assert torch.equal(mask_pad(labels, 0)[1, 4:], torch.full((2,), IGNORE))
    assert head_loss(logits, labels, 0)[1] == 12  # without pad_id every label counts

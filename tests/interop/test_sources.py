"""What every converter shares (interop/sources.py), tested without transformers: reading weight
files without unpickling code, taking tensors with shape checks, the key report, building the model
all or nothing, and finding a tokenizer."""

import json

import pytest
import torch
from safetensors.torch import save_file

from mtplab.config import load_config
from mtplab.errors import MtplabError
from mtplab.interop import sources
from mtplab.models.transformer import Transformer
from mtplab.tokenizer import Tokenizer
from tests.conftest import TINY


class NotAWeight:
    pass


def test_torch_load_reads_tensors_and_refuses_pickled_objects(tmp_path):
    plain, pickled = tmp_path / "plain.pt", tmp_path / "pickled.pt"
    torch.save({"w": torch.ones(2)}, plain)
    torch.save({"w": torch.ones(2), "trap": NotAWeight()}, pickled)
    assert torch.equal(sources.torch_load(plain)["w"], torch.ones(2))
    with pytest.raises(MtplabError, match="is not a plain weights file: .*NotAWeight\\); mtplab does not unpickle"):
        sources.torch_load(pickled)
    with pytest.raises(MtplabError, match="NotAWeight\\); if you trust the file, pass --trust-pickle"):
        sources.torch_load(pickled, trust_pickle=False)
    assert isinstance(sources.torch_load(pickled, trust_pickle=True)["trap"], NotAWeight)
    (tmp_path / "cut.pt").write_bytes(plain.read_bytes()[:40])
    with pytest.raises(MtplabError, match="cut.pt is unreadable"):
        sources.torch_load(tmp_path / "cut.pt")


def test_tensor_dict_names_what_the_file_holds_instead():
    assert sources.tensor_dict({"a": torch.zeros(1)}, "f.pt").keys() == {"a"}
    with pytest.raises(MtplabError, match="f.pt holds list, not a dict of tensors"):
        sources.tensor_dict([torch.zeros(1)], "f.pt")
    with pytest.raises(MtplabError, match="f.pt: not a dict of tensors \\('step' is int\\)"):
        sources.tensor_dict({"a": torch.zeros(1), "step": 3}, "f.pt")


def test_read_weights_takes_single_sharded_or_binary_files(tmp_path):
    single, sharded, binary = (tmp_path / name for name in ("single", "sharded", "binary"))
    for d in (single, sharded, binary):
        d.mkdir()
    save_file({"a": torch.ones(2)}, single / "model.safetensors")
    save_file({"a": torch.ones(2)}, sharded / "part-1.safetensors")
    save_file({"b": torch.zeros(3)}, sharded / "part-2.safetensors")
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "part-1.safetensors", "b": "part-2.safetensors"}}))
    torch.save({"c": torch.ones(1)}, binary / "pytorch_model.bin")
    assert sources.read_weights(single)[0].keys() == {"a"}
    tensors, where = sources.read_weights(sharded)
    assert tensors.keys() == {"a", "b"} and where.name == "model.safetensors.index.json"
    assert sources.read_weights(binary)[1].name == "pytorch_model.bin"
    with pytest.raises(MtplabError, match="has no model.safetensors or pytorch_model.bin"):
        sources.read_weights(tmp_path)
    (single / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(MtplabError, match="model.safetensors is unreadable"):
        sources.read_weights(single)


def test_read_json_and_config_int_refuse_with_the_file_and_key(tmp_path):
    (tmp_path / "bad.json").write_text("{ half")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(MtplabError, match="bad.json is not readable JSON"):
        sources.read_json(tmp_path / "bad.json")
    with pytest.raises(MtplabError, match="list.json does not hold a JSON object"):
        sources.read_json(tmp_path / "list.json")
    assert sources.config_int({"n_layer": 4}, "n_layer", "config.json") == 4
    for value in (0, True, "4", None):
        with pytest.raises(MtplabError, match="config.json: n_layer must be a positive integer"):
            sources.config_int({"n_layer": value}, "n_layer", "config.json")


def test_source_weights_take_check_shapes_and_the_report_counts_what_was_left():
    src = sources.SourceWeights({"h.0.w": torch.ones(2, 3, dtype=torch.float16), "h.0.bias": torch.zeros(1),
                                 "h.1.bias": torch.zeros(1), "extra": torch.zeros(1)}, "src.bin")
    taken = src.take("h.0.w", (2, 3))
    assert taken.dtype == torch.float32 and src.has("extra") and src.shape("h.0.w") == (2, 3)
    with pytest.raises(MtplabError, match="^src.bin: missing required weight h.2.w$"):
        src.take("h.2.w", (2, 3))
    with pytest.raises(MtplabError, match="^src.bin: h.0.w has shape \\(2, 3\\), expected \\(3, 2\\)$"):
        src.take("h.0.w", (3, 2))
    src.ignore("h.0.bias", "recomputed buffer")
    src.ignore("h.1.bias", "recomputed buffer")
    report = src.report()
    assert report.unused == ["extra"]
    assert report.summary() == "unused: extra; missing: none; ignored: h.{i}.bias x2 (recomputed buffer)"


@pytest.fixture(scope="module")
def small_model():
    return Transformer(load_config(TINY, ["model.vocab_size=96"]).model)


def test_assemble_builds_the_model_from_every_tensor(small_model):
    weights = {k: v.clone() for k, v in small_model.state_dict().items()}
    model = sources.assemble(small_model.config, weights, "src")
    assert not model.training
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("edit, message", [
    (lambda w: w.pop("norm_f.weight"), "src does not fit the model: missing norm_f.weight"),
    (lambda w: w.update({"lm_head.extra": torch.zeros(1)}), "src does not fit the model: unexpected lm_head.extra"),
    (lambda w: w.update({"norm_f.weight": torch.zeros(3)}),
     "src does not fit the model: shape mismatch norm_f.weight (3,) vs (64,)"),
])
def test_assemble_refuses_a_bad_state_dict_in_one_line_naming_the_key(small_model, edit, message):
    weights = dict(small_model.state_dict())
    edit(weights)
    with pytest.raises(MtplabError) as info:
        sources.assemble(small_model.config, weights, "src")
    assert str(info.value) == message


CORPUS = [f"Ava has {n} apples." for n in range(40)]


def test_load_tokenizer_finds_one_and_picks_its_end_of_text_token(tmp_path):
    found = tmp_path / "with"
    found.mkdir()
    Tokenizer.train(CORPUS, 300, eos="</s>").save(found)
    tokenizer, path = sources.load_tokenizer(None, [tmp_path / "none", found], None, 300, "the model")
    assert path == found and tokenizer.eos == "</s>"
    with pytest.raises(MtplabError, match="--eos '<nope>' is not a token of"):
        sources.load_tokenizer(str(found), [], "<nope>", 300, "the model")
    with pytest.raises(MtplabError, match="the model vocabulary holds 100: wrong tokenizer"):
        sources.load_tokenizer(str(found), [], None, 100, "the model")
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "tokenizer.pkl").write_bytes(b"")
    with pytest.raises(MtplabError, match="tokenizer.pkl is a tiktoken pickle.*pass --tokenizer PATH"):
        sources.load_tokenizer(None, [tmp_path / "pickle"], None, 300, "the model")
    with pytest.raises(MtplabError, match="--tokenizer .*missing: no such file or directory"):
        sources.load_tokenizer(str(tmp_path / "missing"), [], None, 300, "the model")

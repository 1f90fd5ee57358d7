"""`MtplabConfig`: mtplab's `ModelConfig` as a transformers config.

The `mtplab` field holds the `ModelConfig` dict and is the source of truth; the standard fields
(`vocab_size`, `hidden_size`, ...) are derived from it so that generic tools can read them.
"""

from dataclasses import asdict

from transformers import PretrainedConfig

from ...config import ModelConfig, model_config_from_dict


class MtplabConfig(PretrainedConfig):
    model_type = "mtplab"

    mtplab: dict | None = None  # mtplab's ModelConfig, as a dict
    # > 0: the sequential MTP modules are stored DeepSeek-V3 style, as model.layers.{n_layers + j}
    num_nextn_predict_layers: int = 0
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    max_position_embeddings: int | None = None
    tie_word_embeddings: bool = True
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None

    def __post_init__(self, **kwargs):
        model = self.model_config()
        self.mtplab = asdict(model)  # complete: fields added by later mtplab versions get defaults
        self.vocab_size = model.vocab_size
        self.hidden_size = model.d_model
        self.num_hidden_layers = model.n_layers
        self.num_attention_heads = model.n_heads
        self.num_key_value_heads = model.kv_heads
        self.max_position_embeddings = model.max_seq_len
        self.tie_word_embeddings = model.tie_embeddings
        super().__post_init__(**kwargs)

    def model_config(self) -> ModelConfig:
        return model_config_from_dict(dict(self.mtplab or {}), "config.json: mtplab")

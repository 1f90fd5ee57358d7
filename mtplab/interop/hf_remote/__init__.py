"""The Hugging Face side of `mtplab export-hf`: a `PretrainedConfig` and a `PreTrainedModel` around
mtplab's own `Transformer`.

These modules are not used by mtplab itself. The exporter copies them, together with the mtplab
modules they import (config, errors, models/*), into the exported directory with every
package-relative import flattened (`from ...models.transformer import` -> `from .mtplab_transformer
import`), which is the layout transformers' `trust_remote_code` loader expects.
"""

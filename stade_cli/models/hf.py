"""The one adapter to transformers' private internals, and to the behaviour of its public API that stade relies on.

Streaming writes the very files `save_pretrained` would write, so it must know what save_pretrained does: which tied
tensors it drops (`remove_tied_weights_from_state_dict`), how it renames tensors back to the checkpoint's own names
(`revert_weight_conversion`, which reads the private `_weight_conversions` that from_pretrained records), and how it
shards them. STADE's bias update must survive a reload, so stade also relies on the `*_bias` config switches that
give layers a bias. A minor transformers release can change any of these: they are all here, and
tests/test_hf_adapter.py pins what stade relies on (transformers>=5.0,<6 in pyproject.toml).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel


class Renamed(Exception):
    """save_pretrained would write this model's tensors under other names, or converted."""


def meta_model(config: PretrainedConfig, switches: dict[str, bool] | None = None) -> PreTrainedModel:
    """The model of `config` (with these config switches set) on the meta device: shapes and modules, no memory."""
    from transformers import AutoModelForCausalLM

    if switches:
        config = config.__class__.from_dict({**config.to_dict(), **switches})
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def bias_switches(config: PretrainedConfig) -> dict[str, bool]:
    """Every config switch that would give layers a bias and is off (`bias`, `attention_bias`, `mlp_bias`, ...)."""
    return {k: True for k, v in config.to_dict().items() if (k == "bias" or k.endswith("_bias")) and v is False}


def bias_keys(config: PretrainedConfig) -> dict[str, Any]:
    """The config's bias switches as they are, to be put back after a checkpoint was written with others."""
    return {k: v for k, v in config.to_dict().items() if k == "bias" or k.endswith("_bias")}


def biased_linears(config: PretrainedConfig, switches: dict[str, bool] | None = None) -> set[str]:
    """The nn.Linear layers that have a bias in a model of `config` with these switches set (probed on meta)."""
    meta = meta_model(config, switches)
    return {n for n, m in meta.named_modules() if isinstance(m, nn.Linear) and m.bias is not None}


def saved_state(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The state dict save_pretrained starts from: tied copies (a tied head) dropped, as safetensors needs."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    return remove_tied_weights_from_state_dict(model.state_dict(), model)


def saved_names(model: PreTrainedModel, state: dict[str, torch.Tensor]) -> list[str]:
    """The tensor names in the order save_pretrained writes them; raises Renamed where it would rename or convert.

    from_pretrained records the conversions it applied; a model loaded from its safetensors by name (stade's lazy
    load) applied none, which from_pretrained records as [] (rather than "unknown", which would look up defaults).
    """
    from transformers.core_model_loading import revert_weight_conversion

    unset = not hasattr(model, "_weight_conversions")
    if unset:
        setattr(model, "_weight_conversions", [])  # noqa: B010 - a private attribute, set as from_pretrained does
    try:
        reverted = revert_weight_conversion(model, dict(state))
    finally:
        if unset:
            del model._weight_conversions
    if set(reverted) != set(state):
        raise Renamed("transformers renames or converts this model's tensors when it saves them")
    return list(reverted)


def shard_plan(state: dict[str, torch.Tensor], max_shard_size: str) -> Any:
    """huggingface_hub's split of a state dict into save_pretrained's shards (its public API)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    return split_torch_state_dict_into_shards(
        state, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )


def hub_file(repo: str, name: str, cache_dir: str | None) -> str | None:
    """A file of a hub repository from the download cache (fetched if allowed); None where it has none."""
    from transformers.utils import cached_file

    try:
        return cached_file(repo, name, cache_dir=cache_dir, _raise_exceptions_for_missing_entries=False)
    except OSError:
        return None


def quiet() -> None:
    """stade draws its own progress bars; transformers' per-tensor bars and warnings would only add noise."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

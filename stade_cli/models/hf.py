"""The one adapter to transformers' private internals, and to the behaviour of its public API that stade relies on.

Streaming writes the very files `save_pretrained` would write, so it must know what save_pretrained does: which tied
tensors it drops (`remove_tied_weights_from_state_dict`), how it renames tensors back to the checkpoint's own names
(`revert_weight_conversion`, which reads the private `_weight_conversions` that from_pretrained records), and how it
shards them. Reading a checkpoint block by block must know what from_pretrained does: how transformers' conversion
mapping (`get_model_conversion_mapping`, `rename_source_key`, each WeightConverter's ops) makes the model's tensors
from the stored ones, e.g. an MoE's stacked experts from the per-expert tensors of the hub's Mixtral and Qwen-MoE
checkpoints. STADE's bias update must survive a reload, so stade also relies on the `*_bias` config switches that
give layers a bias. A minor transformers release can change any of these: they are all here, and
tests/test_hf_adapter.py pins what stade relies on (transformers>=5.0,<6 in pyproject.toml).
"""

from __future__ import annotations

from collections.abc import Iterable
from copy import deepcopy
from dataclasses import dataclass, field
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


def saved_form(model: PreTrainedModel, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` as save_pretrained writes it: renamed and converted back to the checkpoint's own names
    (`revert_weight_conversion`), in its order. Works on part of a state dict too (one block's tensors).

    from_pretrained records the conversions it applied; a model loaded from its safetensors by name (stade's lazy
    load) applied none, which from_pretrained records as [] (rather than "unknown", which would look up defaults);
    one whose stored names stade mapped (`stored_names`) recorded the ones it applied, as from_pretrained does.
    """
    from transformers.core_model_loading import revert_weight_conversion

    unset = not hasattr(model, "_weight_conversions")
    if unset:
        setattr(model, "_weight_conversions", [])  # noqa: B010 - a private attribute, set as from_pretrained does
    try:
        return revert_weight_conversion(model, dict(state))
    finally:
        if unset:
            del model._weight_conversions


def saved_names(model: PreTrainedModel, state: dict[str, torch.Tensor], parts: Iterable[str] = ()) -> list[str]:
    """The tensor names in the order save_pretrained writes them (`saved_form`). `parts`: name prefixes (the decoder
    blocks') whose tensors are written part by part; raises Renamed where a saved tensor is made from tensors of
    more than one part (or of one and the rest), so that it cannot be written as its part comes by."""
    whole = saved_form(model, state)
    prefixes = [p + "." for p in parts]
    split: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in state.items():
        split.setdefault(next((p for p in prefixes if name.startswith(p)), ""), {})[name] = t
    pieces = {n: t for part in split.values() for n, t in saved_form(model, part).items()}
    if pieces.keys() != whole.keys() or any(pieces[n].shape != t.shape for n, t in whole.items()):
        raise Renamed("transformers converts this model's tensors across its blocks when it saves them")
    return list(whole)


@dataclass
class Conversion:
    """Model tensors that transformers makes from stored tensors with one conversion (MoE experts stacked from their
    per-expert tensors), or one stored tensor renamed (`converter` None)."""

    key: str  # the first target's name, by which transformers keys the conversion
    sources: list[tuple[str, str]]  # (source pattern, stored name), in the order transformers collects them
    converter: Any = None  # a WeightConverter: a template, copied for each use
    targets: list[str] = field(default_factory=list)  # the model's tensors it makes


@dataclass
class StoredNames:
    """How a checkpoint stored under other names (per-expert MoE tensors, older names) makes the model's tensors:
    transformers' own conversion mapping (what from_pretrained applies), grouped by the model tensors made."""

    model: Any  # the model the tensors are made for (conversions may read its config)
    groups: dict[str, Conversion]
    group_of: dict[str, str]  # model tensor name -> its group's key

    def convert(self, key: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors group `key` makes from its stored `tensors` (`converted`)."""
        return converted(self.model, self.groups[key], tensors)


def _grouped(model: PreTrainedModel, names: Iterable[str]) -> tuple[dict[str, Conversion], list[Any]]:
    """The stored `names` grouped as from_pretrained groups them (convert_and_load_state_dict_in_model): renamed,
    then collected into the model tensor their conversion makes, in natural order; and the conversions that matched
    (what from_pretrained records). Names the model has no tensor for are left out, as from_pretrained leaves them."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    meta = model.state_dict()
    prefix = model.base_model_prefix
    groups: dict[str, Conversion] = {}
    for name in sorted(names, key=dot_natural_key):
        key, pattern = rename_source_key(name, renamings, converters, prefix, meta)
        if key not in meta and name in meta:
            key, pattern = rename_source_key(name, [], [], prefix, meta)
        if key in meta:
            group = groups.setdefault(key, Conversion(key, [], by_pattern[pattern] if pattern else None))
            group.sources.append((pattern or name, name))
    return groups, [m for m in mapping if m.was_used()]


def stored_names(model: PreTrainedModel, stored: dict[str, torch.Tensor]) -> StoredNames | None:
    """How the checkpoint whose tensors are `stored` (on meta: names, dtypes, shapes) makes `model`'s tensors, found
    by converting them on meta; None where a group does not make tensors of the model's shapes. `model` then records
    the conversions, so that saving reverts them (`saved_form`)."""
    groups, used = _grouped(model, stored)
    meta = model.state_dict()
    group_of = {}
    for group in groups.values():
        if group.converter is None and len(group.sources) > 1:
            return None
        try:
            made = converted(model, group, {n: stored[n] for _p, n in group.sources})
        except Exception:  # an op that needs values (dequantizing) cannot run on meta: loaded whole then
            return None
        if any(t not in meta or v.shape != meta[t].shape for t, v in made.items()):
            return None
        group.targets = list(made)
        group_of.update(dict.fromkeys(made, group.key))
    setattr(model, "_weight_conversions", used)  # noqa: B010 - a private attribute, set as from_pretrained does
    return StoredNames(model, groups, group_of)


def covered(model: PreTrainedModel, names: Iterable[str]) -> set[str]:
    """The model tensors that transformers' conversion mapping makes from stored `names`, by name alone (the first
    target of a conversion that makes several): what `stade plan` can tell from a checkpoint's index."""
    return set(_grouped(model, names)[0])


def converted(model: PreTrainedModel, group: Conversion, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model tensors `group` makes from its stored `tensors` (by stored name), with transformers' own conversion.
    Takes the tensors out of `tensors`, so that each source is freed as soon as the conversion has used it."""
    if group.converter is None:
        ((_pattern, name),) = group.sources
        return {group.key: tensors.pop(name)}
    conv = deepcopy(group.converter)
    for pattern, name in group.sources:
        conv.add_tensor(group.key, name, pattern, tensors.pop(name))
    made = conv.convert(group.key, model=model, config=model.config)
    return {k: v[0] if isinstance(v, list) else v for k, v in made.items()}


def shard_plan(state: dict[str, torch.Tensor], max_shard_size: str) -> Any:
    """huggingface_hub's split of a state dict into save_pretrained's shards (its public API).

    save_pretrained splits real tensors, and keeps tensors that share a storage in one shard, counted once at the
    storage's size: the per-expert tensors that `saved_form` splits off one stacked tensor are views of it. On meta,
    huggingface_hub cannot tell a shared storage, so a view is identified by its base here, as its storage would be.
    """
    from huggingface_hub import get_torch_storage_id, get_torch_storage_size, split_state_dict_into_shards_factory

    def base(t: torch.Tensor) -> torch.Tensor:
        return t._base if t._base is not None else t

    def storage_id(t: torch.Tensor) -> Any:
        return (id(base(t)) if t._base is not None else None) if t.is_meta else get_torch_storage_id(t)

    def storage_size(t: torch.Tensor) -> int:
        return base(t).nbytes if t.is_meta else get_torch_storage_size(t)

    return split_state_dict_into_shards_factory(
        state,
        get_storage_size=storage_size,
        get_storage_id=storage_id,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=max_shard_size,
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

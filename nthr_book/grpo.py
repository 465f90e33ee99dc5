"""GRPO building blocks: group advantages, per-token log-probabilities, the clipped policy loss.

The objective follows arXiv 2505.18830 (Deng et al., "On the Effect of Negative Gradient in Group
Relative Deep Reinforcement Optimization"), section 2, as specified in docs/method.md §1:

    L = -(1 / Σ_i |y_i|) Σ_i Σ_t [ min(ratio·A, clip(ratio, 1-ε_low, 1+ε_high)·A) - kl_coef ·
    KL_{i,t} ]

with group-relative advantages ``A_i = (r_i - mean(r)) / (std(r) + eps)`` and the k3 estimator ``KL
= exp(ref - logp) - (ref - logp) - 1``. Aggregation modes mirror TRL's ``GRPOTrainer``: ``"token"``
= TRL ``"dapo"``/``"bnpo"``, ``"seq_mean"`` = TRL ``"grpo"``, ``"dr_grpo"`` = TRL ``"dr_grpo"``.

Batch layout (shared by all modules): ``num_groups * group_size`` sequences, group-major
(rows ``[g*G:(g+1)*G]`` are the G completions of prompt g); ``completion_mask`` (N, T) is True on
generated tokens up to and including EOS.

Why one long module: the loss and the log-probs it needs share the batch layout above; the forward
passes (whole rows, or each group's prompt once: ``shared_prompt_hidden``) sit beside the loss they
feed.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from nthr_book.models import lm_head

__all__ = [
    "AGG_MODES",
    "STD_MODES",
    "chunked_token_logps",
    "dynamic_sampling_filter",
    "expand_advantages",
    "group_advantages",
    "group_token_logps",
    "head_logits",
    "k3_kl",
    "last_hidden_states",
    "micro_batches",
    "mixed_group_mask",
    "per_token_logps",
    "policy_loss",
    "pos_only",
    "position_ids_from_mask",
    "sequence_logprob",
]

STD_MODES = ("population", "sample", "none")
AGG_MODES = ("token", "seq_mean", "dr_grpo")


# --------------------------------------------------------------------------------------------
# Advantages and group filters
# --------------------------------------------------------------------------------------------


def _check_rewards(rewards: Tensor) -> Tensor:
    """Validate a (num_groups, group_size) reward tensor and return it as floating point."""
    if not isinstance(rewards, Tensor):
        raise TypeError(f"`rewards` must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dim() != 2 or rewards.shape[0] == 0 or rewards.shape[1] == 0:
        raise ValueError(
            "`rewards` must have shape (num_groups, group_size) with both sizes > 0, got "
            f"{tuple(rewards.shape)}"
        )
    if not rewards.is_floating_point():
        rewards = rewards.float()
    nan_rows = torch.isnan(rewards).any(dim=1)
    if bool(nan_rows.any()):
        raise ValueError(
            f"`rewards` contains NaN in group(s) {nan_rows.nonzero().flatten().tolist()}"
        )
    return rewards


def _homogeneous(rewards: Tensor) -> Tensor:
    """(num_groups,) bool: True where every reward of the group is equal."""
    return rewards.amax(dim=1) == rewards.amin(dim=1)


def group_advantages(rewards: Tensor, *, std: str = "population", eps: float = 1e-6) -> Tensor:
    """Group-relative advantages (r - mean) / (std + eps) per group; zeros for homogeneous groups
    (nb 01)."""
    rewards = _check_rewards(rewards)  # (num_groups, G)
    if std not in STD_MODES:
        raise ValueError(f"`std` must be one of {STD_MODES}, got {std!r}")
    group_size = rewards.shape[1]
    centered = rewards - rewards.mean(dim=1, keepdim=True)  # (num_groups, G)
    if std == "none":  # Dr. GRPO: no scaling
        advantages = centered
    else:
        if std == "sample" and group_size < 2:
            raise ValueError(
                "`std='sample'` needs group_size >= 2 (unbiased std of one reward is undefined)"
            )
        scale = rewards.std(
            dim=1, keepdim=True, correction=1 if std == "sample" else 0
        )  # (num_groups, 1)
        advantages = centered / (scale + eps)
    # Homogeneous groups carry no signal: exact zeros (never NaN, never rounding residue).
    return torch.where(_homogeneous(rewards)[:, None], torch.zeros_like(advantages), advantages)


def pos_only(advantages: Tensor) -> Tensor:
    """The "Pos Only" baseline: negative advantages set to 0 (group or per-token advantages)."""
    return advantages.clamp(min=0)


def mixed_group_mask(rewards: Tensor) -> Tensor:
    """(num_groups,) bool, True for mixed groups (0 < N+ < G for binary rewards; not all rewards
    equal)."""
    return ~_homogeneous(_check_rewards(rewards))


def dynamic_sampling_filter(rewards: Tensor) -> Tensor:
    """Row indices (long, ascending) of the sequences whose group is mixed, for a group-major batch.

    ``rewards`` is (num_groups, group_size); the batch rows of group g are ``g*G .. g*G+G-1``, so
    ``completion_ids[dynamic_sampling_filter(rewards)]`` keeps the mixed groups, still group-major.
    """
    rewards = _check_rewards(rewards)
    num_groups, group_size = rewards.shape
    keep = mixed_group_mask(rewards)  # (num_groups,)
    rows = torch.arange(num_groups * group_size, device=rewards.device).view(num_groups, group_size)
    return rows[keep].reshape(-1)


def expand_advantages(group_adv: Tensor, completion_mask: Tensor) -> Tensor:
    """Broadcast per-sequence advantages ((num_groups, G) or (N,)) to per-token (N, T), 0 on
    masked tokens."""
    if completion_mask.dim() != 2:
        raise ValueError(
            f"`completion_mask` must have shape (N, T), got {tuple(completion_mask.shape)}"
        )
    flat = group_adv.reshape(-1)  # (N,) group-major
    if flat.numel() != completion_mask.shape[0]:
        raise ValueError(
            f"`group_adv` holds {flat.numel()} advantages (shape {tuple(group_adv.shape)}) but "
            f"`completion_mask` has {completion_mask.shape[0]} rows"
        )
    per_token = flat[:, None].expand(completion_mask.shape)  # (N, T)
    return torch.where(completion_mask.bool(), per_token, torch.zeros_like(per_token))


def sequence_logprob(logps: Tensor, completion_mask: Tensor) -> Tensor:
    """ln π(y|x): (N,) sum of per-token log-probs over valid completion tokens (nb 02)."""
    if logps.shape != completion_mask.shape:
        raise ValueError(
            f"`logps` {tuple(logps.shape)} and `completion_mask` {tuple(completion_mask.shape)} "
            "must match"
        )
    return torch.where(completion_mask.bool(), logps, torch.zeros_like(logps)).sum(dim=-1)


# --------------------------------------------------------------------------------------------
# Per-token log-probabilities from a causal LM, without a full-batch full-vocab log-softmax
# --------------------------------------------------------------------------------------------


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids that start at 0 after left padding: cumsum(mask) - 1, clamped at 0."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def last_hidden_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """(N, L, d) last-layer hidden states as fed to the LM head (after the final norm)."""
    position_ids = position_ids_from_mask(attention_mask)
    base = getattr(model, "base_model", model)
    # HF *ForCausalLM: the backbone (model.model, transformer, ...) returns final-normed states.
    if base is not model:
        out = base(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    # Fallback for models without a separate backbone: wasteful (computes full logits), but generic.
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        output_hidden_states=True,
    )
    return out.hidden_states[-1]


def shared_prompt_hidden(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    group_size: int,
) -> Tensor:
    """(N, T, d) last hidden states predicting each completion token, each group's prompt run once.

    Rows are group-major: rows [g·G, (g+1)·G) share one prompt (G = ``group_size``). Stages:
    1. each group's prompt goes through the backbone once (N/G rows), keeping its key/value cache;
    2. the cache is repeated G times, one copy per completion;
    3. the G completions run on top of it, attending to the prompt's keys and values.
    The state at the prompt's last position predicts the first completion token; the completion
    pass gives the rest. Exact: attention is causal, so a prompt position's states depend only on
    the prompt, and the G copies an unshared pass computes are the same numbers. Gradients flow
    through the repeated cache back into the one prompt pass (summing the G copies' gradients).
    Position ids and padding are those of ``last_hidden_states`` on cat(prompt, completion).
    Notebook 01 explains it; ``per_token_logps(group_size=...)`` uses it.
    """
    P = prompt_ids.shape[1]
    full_mask = torch.cat([prompt_mask.long(), completion_mask.long()], dim=1)  # (N, P+T)
    position_ids = position_ids_from_mask(full_mask)  # (N, P+T), as the unshared pass has them
    backbone, key = _backbone_with_cache(model)
    # 1. one prompt per group: (N/G, P)
    out = backbone(
        input_ids=prompt_ids[::group_size],
        attention_mask=prompt_mask[::group_size].long(),
        position_ids=position_ids[::group_size, :P],
        use_cache=True,
    )
    cache = out[key] if key in out else out.past_key_values
    # 2. G copies of each group's keys and values (a differentiable repeat)
    cache.batch_repeat_interleave(group_size)
    # 3. the completions on top: (N, T)
    out_c = backbone(
        input_ids=completion_ids,
        attention_mask=full_mask,
        position_ids=position_ids[:, P:],
        use_cache=True,
        **{key: cache},
    )
    first = out.last_hidden_state[:, -1:].repeat_interleave(group_size, dim=0)  # (N, 1, d)
    return torch.cat([first, out_c.last_hidden_state[:, :-1]], dim=1)  # (N, T, d)


def _backbone_with_cache(model: nn.Module) -> tuple[nn.Module, str]:
    """The model's backbone and the name of its cache argument ("cache" from transformers 5.2x)."""
    backbone = getattr(model, "base_model", model)
    params = inspect.signature(backbone.forward).parameters
    return backbone, "cache" if "cache" in params else "past_key_values"


def can_share_prompt(
    model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, group_size: int | None
) -> bool:
    """Whether ``shared_prompt_hidden`` applies: groups of ``group_size`` > 1 rows with one prompt
    each, a backbone that returns a key/value cache, and no gradient checkpointing in training mode
    (transformers drops the cache there)."""
    N = prompt_ids.shape[0]
    if (
        group_size is None
        or group_size < 2
        or N % group_size
        or getattr(model, "base_model", model) is model
    ):
        return False
    if model.training and any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        return False
    ng = N // group_size
    same = prompt_ids.view(ng, group_size, -1).eq(prompt_ids[::group_size, None]).all()
    same &= prompt_mask.view(ng, group_size, -1).eq(prompt_mask[::group_size, None]).all()
    return bool(same)


def _scaled_logits(
    hidden: Tensor, lm_head: nn.Module, temperature: float, softcap: float | None
) -> Tensor:
    """(..., V) float32 logits softcap·tanh(lm_head(hidden) / softcap) / temperature."""
    logits = lm_head(hidden).float()  # (..., V)
    if softcap:  # Gemma-style final logit soft-capping, applied before temperature as in HF
        logits = torch.tanh(logits / softcap) * softcap
    return logits / temperature


def head_logits(model: nn.Module, hidden: Tensor, *, temperature: float = 1.0) -> Tensor:
    """(N, T, V) float32 temperature-scaled logits of the model's LM head on ``hidden`` (N, T, d),
    soft-capped as the model's config says: the distribution ``per_token_logps`` reads (nb 03)."""
    head = lm_head(model)
    return _scaled_logits(hidden, head.module, temperature, head.softcap)


def _chunk_logps(
    hidden: Tensor, targets: Tensor, lm_head: nn.Module, temperature: float, softcap: float | None
):
    """log softmax(lm_head(hidden)/temperature)[targets] for one chunk: (n, d), (n,) -> (n,)
    float32."""
    logits = _scaled_logits(hidden, lm_head, temperature, softcap)  # (n, V)
    target_logits = logits.gather(-1, targets[:, None]).squeeze(-1)  # (n,)
    return target_logits - torch.logsumexp(logits, dim=-1)


def chunked_token_logps(
    hidden: Tensor,
    lm_head: nn.Module,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 512,
    softcap: float | None = None,
) -> Tensor:
    """Log-probs of `targets` (n,) under softmax(lm_head(hidden)/temperature), chunk_size rows at a
    time.

    With gradients enabled each chunk is checkpointed, so backward also holds one (chunk_size, V)
    logit block at a time instead of (n, V). Returns float32 (n,).
    """
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size}")
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or any(p.requires_grad for p in lm_head.parameters())
    )
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = (
            hidden[start : start + chunk_size],
            targets[start : start + chunk_size],
        )  # (n_c, d), (n_c,)
        if needs_grad:
            pieces.append(
                checkpoint(_chunk_logps, h, y, lm_head, temperature, softcap, use_reentrant=False)
            )
        else:
            pieces.append(_chunk_logps(h, y, lm_head, temperature, softcap))
    if not pieces:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(pieces)


def per_token_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    *,
    temperature: float = 1.0,
    return_hidden: bool = False,
    chunk_size: int = 512,
    group_size: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Completion-token log-probs (N, T) from logits/temperature, 0 where masked; optionally hidden
    (N, T, d).

    ``input_ids`` = cat(prompt_ids, completion_ids) (N, P+T), prompts left-padded, completions
    right-padded; ``attention_mask`` is (N, P+T); ``completion_mask`` is (N, T). The LM head runs
    only on valid completion tokens, ``chunk_size`` tokens at a time. ``hidden[:, t]`` is the state
    that predicts completion token t (left unmasked at padded positions). Gradients flow.
    ``group_size`` G: rows [g·G, (g+1)·G) share one prompt, which then runs once per group
    (``shared_prompt_hidden``, where ``can_share_prompt`` says it applies); None: every row whole.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"`input_ids` must have shape (N, P+T), got {tuple(input_ids.shape)}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"`attention_mask` {tuple(attention_mask.shape)} must match `input_ids` "
            f"{tuple(input_ids.shape)}"
        )
    if completion_mask.dim() != 2 or completion_mask.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"`completion_mask` must have shape (N, T) with N={input_ids.shape[0]}, got "
            f"{tuple(completion_mask.shape)}"
        )
    n_rows, total_len = input_ids.shape
    completion_len = completion_mask.shape[1]
    prompt_len = total_len - completion_len
    if prompt_len < 1:
        raise ValueError(
            f"`input_ids` has length {total_len} but `completion_mask` has T={completion_len}: "
            "need at least one prompt token to predict the first completion token"
        )
    if not temperature > 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature}")

    completion_ids = input_ids[:, prompt_len:]  # (N, T)
    prompt_ids, prompt_mask = input_ids[:, :prompt_len], attention_mask[:, :prompt_len]
    if can_share_prompt(model, prompt_ids, prompt_mask, group_size):
        hidden = shared_prompt_hidden(
            model,
            prompt_ids,
            prompt_mask,
            completion_ids,
            attention_mask[:, prompt_len:],
            group_size,
        )  # (N, T, d)
    else:
        hidden_all = last_hidden_states(model, input_ids, attention_mask)  # (N, P+T, d)
        hidden = hidden_all[:, prompt_len - 1 : total_len - 1]  # (N, T, d): state i predicts i+1

    mask = completion_mask.bool()
    flat_idx = mask.reshape(-1).nonzero().squeeze(-1)  # (n_valid,) indices into N*T
    flat_hidden = hidden.reshape(n_rows * completion_len, -1).index_select(
        0, flat_idx
    )  # (n_valid, d)
    flat_targets = completion_ids.reshape(-1).index_select(0, flat_idx)  # (n_valid,)
    head = lm_head(model)
    valid_logps = chunked_token_logps(
        flat_hidden,
        head.module,
        flat_targets,
        temperature=temperature,
        chunk_size=chunk_size,
        softcap=head.softcap,
    )  # (n_valid,) float32
    logps = torch.zeros(n_rows * completion_len, dtype=valid_logps.dtype, device=valid_logps.device)
    logps = logps.index_copy(0, flat_idx, valid_logps).view(n_rows, completion_len)  # (N, T)
    if return_hidden:
        return logps, hidden
    return logps


def micro_batches(
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    batch_size: int | None,
):
    """Yield (rows, t_b, input_ids, attention_mask, mask) per micro-batch of ``batch_size`` rows.

    ``rows`` is a slice of the N rows, ``t_b`` the width up to the batch's last valid completion
    token (1 when it has none: right padding is dropped), ``input_ids`` = cat(prompt, completion
    columns < t_b) (n, P + t_b), ``attention_mask`` likewise and ``mask`` the (n, t_b) bool
    completion mask.
    """
    N = completion_ids.shape[0]
    bs = N if batch_size is None else int(batch_size)
    if bs < 1:
        raise ValueError(f"`batch_size` must be >= 1 or None, got {batch_size}")
    for start in range(0, N, bs):
        rows = slice(start, start + bs)
        cm = completion_mask[rows].bool()  # (n, T)
        valid = cm.any(0).nonzero()
        t_b = int(valid[-1]) + 1 if valid.numel() else 1  # right padding after the last valid token
        ids = torch.cat([prompt_ids[rows], completion_ids[rows, :t_b]], dim=1)  # (n, P + t_b)
        att = torch.cat([prompt_mask[rows].long(), cm[:, :t_b].long()], dim=1)  # (n, P + t_b)
        yield rows, t_b, ids, att, cm[:, :t_b]


def group_token_logps(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    *,
    temperature: float = 1.0,
    batch_size: int | None = None,
    return_hidden: bool = False,
    share_prompt: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """(N, T) float32 ``per_token_logps`` of a batch (a group), ``batch_size`` rows at a time, each
    micro-batch trimmed of its right padding; with ``return_hidden`` also the (N, T, d) hidden
    states (zeros after a micro-batch's last valid token). Gradients flow as in per_token_logps.

    The one forward pass of a group: Δ(x) (``lld``), the explorer's scores (``explorer``) and
    notebook 03 call it (prompt_ids (N, P) left-padded, completion_ids (N, T) right-padded). With
    ``share_prompt`` the rows of a micro-batch that share one prompt (a group's) compute it once.
    """
    N, T = completion_ids.shape
    logps = torch.zeros(N, T, dtype=torch.float32, device=prompt_ids.device)
    hidden = None
    for rows, t_b, ids, att, cm in micro_batches(
        prompt_ids, prompt_mask, completion_ids, completion_mask, batch_size
    ):
        n = cm.shape[0]
        out = per_token_logps(
            model,
            ids,
            att,
            cm,
            temperature=temperature,
            return_hidden=return_hidden,
            group_size=n if share_prompt else None,
        )
        lp, h = out if return_hidden else (out, None)
        if h is not None:
            if hidden is None:
                hidden = h.new_zeros(N, T, h.shape[-1])  # (N, T, d)
            hidden[rows, :t_b] = h
        logps[rows, :t_b] = lp
    return (logps, hidden) if return_hidden else logps


# --------------------------------------------------------------------------------------------
# The clipped surrogate loss
# --------------------------------------------------------------------------------------------


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(π_θ || π_ref): exp(ref - logp) - (ref - logp) - 1."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def policy_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    completion_mask: Tensor,
    *,
    ref_logps: Tensor | None = None,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    kl_coef: float = 0.0,
    agg: str = "token",
    max_completion_length: int | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Clipped GRPO loss (minimised) and float metrics; agg in "token", "seq_mean", "dr_grpo" (nb
    01).

    ``advantages`` is per token (N, T) (a per-sequence (N,) tensor is broadcast). Metrics:
    clip_frac_low, clip_frac_high, clip_frac, ratio_mean/min/max over valid tokens (NaN if none),
    and kl if ref_logps given.
    """
    advantages = _check_policy_inputs(
        logps, old_logps, advantages, completion_mask, ref_logps, kl_coef=kl_coef, agg=agg
    )
    eps_low = clip_eps
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high

    mask = completion_mask.bool()  # (N, T)
    n_rows, completion_len = logps.shape
    zeros = torch.zeros_like(logps)
    # where() keeps garbage at masked positions (padding) from producing inf/NaN or gradients.
    log_ratio = torch.where(mask, logps - old_logps.detach(), zeros)
    ratio = torch.exp(log_ratio)  # (N, T)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = torch.min(ratio * advantages, clipped * advantages)  # (N, T) objective
    kl = None
    if ref_logps is not None:
        kl = torch.where(mask, k3_kl(logps, ref_logps.detach()), zeros)  # (N, T)
        if kl_coef != 0.0:
            per_token = per_token - kl_coef * kl
    per_token = torch.where(mask, per_token, zeros)

    maskf = mask.to(per_token.dtype)
    n_tokens = maskf.sum()
    if agg == "token":
        objective = per_token.sum() / n_tokens.clamp(min=1.0)
    elif agg == "seq_mean":
        objective = (per_token.sum(dim=-1) / maskf.sum(dim=-1).clamp(min=1.0)).mean()
    else:  # dr_grpo: constant normaliser N * max_completion_length
        length = completion_len if max_completion_length is None else max_completion_length
        if length < 1:
            raise ValueError(f"`max_completion_length` must be >= 1, got {length}")
        objective = per_token.sum() / (n_rows * length)
    loss = -objective

    with torch.no_grad():
        adv = advantages.detach().expand_as(ratio)
        ratio_d = ratio.detach()
        denom = n_tokens.clamp(min=1.0)
        low = (adv < 0) & (ratio_d < 1 - eps_low) & mask
        high = (adv > 0) & (ratio_d > 1 + eps_high) & mask
        valid_ratio = ratio_d[mask]
        has_tokens = valid_ratio.numel() > 0
        metrics: dict[str, Any] = {
            "clip_frac_low": float(low.sum() / denom),
            "clip_frac_high": float(high.sum() / denom),
            "clip_frac": float((low | high).sum() / denom),
            "ratio_mean": float(valid_ratio.mean()) if has_tokens else math.nan,
            "ratio_min": float(valid_ratio.min()) if has_tokens else math.nan,
            "ratio_max": float(valid_ratio.max()) if has_tokens else math.nan,
        }
        if kl is not None:
            metrics["kl"] = float(kl.detach().sum() / denom) if has_tokens else math.nan
    return loss, metrics


def _check_policy_inputs(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    completion_mask: Tensor,
    ref_logps: Tensor | None,
    *,
    kl_coef: float,
    agg: str,
) -> Tensor:
    """Validate ``policy_loss``'s inputs; return the advantages as (N, T) or (N, 1)."""
    if agg not in AGG_MODES:
        raise ValueError(f"Unknown `agg` {agg!r}; expected one of {AGG_MODES}")
    if logps.dim() != 2:
        raise ValueError(f"`logps` must have shape (N, T), got {tuple(logps.shape)}")
    for name, tensor in (
        ("old_logps", old_logps),
        ("completion_mask", completion_mask),
        ("ref_logps", ref_logps),
    ):
        if tensor is not None and tensor.shape != logps.shape:
            raise ValueError(
                f"`{name}` {tuple(tensor.shape)} must match `logps` {tuple(logps.shape)}"
            )
    if advantages.dim() == 1:
        advantages = advantages[:, None]  # (N, 1) broadcasts over tokens
    if (
        advantages.dim() != 2
        or advantages.shape[0] != logps.shape[0]
        or advantages.shape[1] not in (1, logps.shape[1])
    ):
        raise ValueError(
            f"`advantages` must have shape (N, T) or (N,), got {tuple(advantages.shape)}"
        )
    if kl_coef != 0.0 and ref_logps is None:
        raise ValueError("`ref_logps` is required when `kl_coef` != 0")
    return advantages

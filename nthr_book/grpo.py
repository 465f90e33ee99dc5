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
from nthr_book.rewards import is_correct

__all__ = [
    "AGG_MODES",
    "STD_MODES",
    "chunked_token_logps",
    "dynamic_sampling_filter",
    "expand_advantages",
    "group_advantages",
    "group_token_logps",
    "head_logits",
    "high_entropy_mask",
    "k3_kl",
    "llds_penalty",
    "last_hidden_states",
    "micro_batches",
    "mixed_group_mask",
    "neg_only",
    "negative_sample_advantages",
    "per_token_logps",
    "policy_loss",
    "pos_only",
    "position_ids_from_mask",
    "sequence_logprob",
    "weighted_reinforce_advantages",
]

STD_MODES = ("population", "sample", "none")
AGG_MODES = ("token", "seq_mean", "dr_grpo")
LLDS_GATES = ("response", "token")


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


def neg_only(advantages: Tensor) -> Tensor:
    """Pos Only's mirror, "Neg Only": positive advantages set to 0 (group or per-token advantages).

    GRPO's negative term alone, group-normalised: a wrong response of a mixed group keeps
    A = -p/sqrt(p(1-p)). ``negative_sample_advantages`` is the paper's NSR (-1, no baseline).
    """
    return advantages.clamp(max=0)


def negative_sample_advantages(rewards: Tensor) -> Tensor:
    """NSR's per-response advantages: -1 for a wrong response, 0 for a correct one (num_groups, G).

    Zhu et al., "The Surprising Effectiveness of Negative Reinforcement in LLM Reasoning" (arXiv
    2506.01347): REINFORCE on rewards r in {+1, -1} split into PSR (the r = +1 samples) and NSR
    (the r = -1 samples). Their code (https://github.com/TianHongZXY/RLVR-Decomposed, the
    ``core_algos`` module of its verl trainer: ``compute_psr_nsr_outcome_advantage``,
    ``advantage="negative"``)
    gives every token the advantage r - 1 with r in {0, 1}: no group mean, no std, so a group whose
    responses are all wrong still pushes them down. Correct means ``rewards.is_correct``.
    """
    rewards = _check_rewards(rewards)  # (num_groups, G), floating point
    return torch.where(is_correct(rewards), rewards.new_tensor(0.0), rewards.new_tensor(-1.0))


W_REINFORCE_POSITIVE_WEIGHT = 0.1  # λ of arXiv 2506.01347 (and its run script)


def weighted_reinforce_advantages(
    rewards: Tensor, positive_weight: float = W_REINFORCE_POSITIVE_WEIGHT
) -> Tensor:
    """W-REINFORCE's per-response advantages: λ for a correct response, -1 for a wrong one.

    arXiv 2506.01347: the objective λ·L_PSR + L_NSR, with λ = 0.1 recommended. Their code
    (``compute_psr_nsr_outcome_advantage``, ``advantage="weighted"``, run script
    ``run_qwen2.5-math-7b_psr_nsr.sh``: ``positive_advantage_weight=0.1``) sets the advantage of a
    correct response (r = 1) to λ·r = λ and of a wrong one (r = 0) to r - 1 = -1, unnormalised, for
    every group (num_groups, G). Correct means ``rewards.is_correct``.
    """
    if not (isinstance(positive_weight, (int, float)) and math.isfinite(positive_weight)):
        raise ValueError(f"`positive_weight` must be a finite number, got {positive_weight!r}")
    rewards = _check_rewards(rewards)  # (num_groups, G), floating point
    positive, negative = rewards.new_tensor(float(positive_weight)), rewards.new_tensor(-1.0)
    return torch.where(is_correct(rewards), positive, negative)  # in the rewards' dtype


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
    hidden: Tensor,
    targets: Tensor,
    lm_head: nn.Module,
    temperature: float,
    softcap: float | None,
    with_entropy: bool = False,
):
    """log softmax(lm_head(hidden)/temperature)[targets] for one chunk: (n, d), (n,) -> (n,)
    float32; with ``with_entropy`` also the (n,) entropies of those distributions (no gradient)."""
    logits = _scaled_logits(hidden, lm_head, temperature, softcap)  # (n, V)
    target_logits = logits.gather(-1, targets[:, None]).squeeze(-1)  # (n,)
    lse = torch.logsumexp(logits, dim=-1)  # (n,)
    if not with_entropy:
        return target_logits - lse
    with torch.no_grad():  # a statistic of the distribution, never differentiated
        entropy = _entropy_from_logits(logits.detach(), lse.detach())
    return target_logits - lse, entropy


def _entropy_from_logits(logits: Tensor, lse: Tensor) -> Tensor:
    """(n,) entropy H = -Σ_v q_v ln q_v = lse - Σ_v q_v z_v of q = softmax(z), z = logits (n, V).

    One (n, V) temporary (q, multiplied by z in place), beside the logits the chunk already holds.
    """
    q = (logits - lse[:, None]).exp_()  # (n, V), exponentiated in place
    return lse - q.mul_(logits).sum(-1)


def chunked_token_logps(
    hidden: Tensor,
    lm_head: nn.Module,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 512,
    softcap: float | None = None,
    return_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probs of `targets` (n,) under softmax(lm_head(hidden)/temperature), chunk_size rows at a
    time.

    With gradients enabled each chunk is checkpointed, so backward also holds one (chunk_size, V)
    logit block at a time instead of (n, V). Returns float32 (n,); with ``return_entropy`` also the
    (n,) float32 entropies of the same distributions, read off each chunk's logits (detached; in
    backward the checkpoint recomputes them with the chunk).
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
        args = (h, y, lm_head, temperature, softcap, return_entropy)
        if needs_grad:
            pieces.append(checkpoint(_chunk_logps, *args, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(*args))
    if not pieces:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return (empty, empty.clone()) if return_entropy else empty
    if return_entropy:
        return torch.cat([lp for lp, _ in pieces]), torch.cat([e for _, e in pieces])
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
    return_entropy: bool = False,
) -> Tensor | tuple[Tensor, ...]:
    """Completion-token log-probs (N, T) from logits/temperature, 0 where masked; optionally hidden
    (N, T, d) and the entropies (N, T) of the same distributions (detached, 0 where masked): the
    tuple (logps, [hidden], [entropy]) holds the ones asked for, in this order.

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
    out = chunked_token_logps(
        flat_hidden,
        head.module,
        flat_targets,
        temperature=temperature,
        chunk_size=chunk_size,
        softcap=head.softcap,
        return_entropy=return_entropy,
    )  # (n_valid,) float32 (and (n_valid,) entropies)
    valid_logps, valid_entropy = out if return_entropy else (out, None)

    def scatter(values: Tensor) -> Tensor:  # (n_valid,) -> (N, T), 0 on masked positions
        full = torch.zeros(n_rows * completion_len, dtype=values.dtype, device=values.device)
        return full.index_copy(0, flat_idx, values).view(n_rows, completion_len)

    outputs = [scatter(valid_logps)]
    if return_hidden:
        outputs.append(hidden)
    if return_entropy:
        outputs.append(scatter(valid_entropy))
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


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
    return_entropy: bool = False,
) -> Tensor | tuple[Tensor, ...]:
    """(N, T) float32 ``per_token_logps`` of a batch (a group), ``batch_size`` rows at a time, each
    micro-batch trimmed of its right padding; with ``return_hidden`` also the (N, T, d) hidden
    states (zeros after a micro-batch's last valid token), with ``return_entropy`` the (N, T)
    entropies (``per_token_logps``'s order: logps, [hidden], [entropy]). Gradients flow as in
    per_token_logps.

    The one forward pass of a group: Δ(x) (``lld``), the explorer's scores (``explorer``) and
    notebook 03 call it (prompt_ids (N, P) left-padded, completion_ids (N, T) right-padded). With
    ``share_prompt`` the rows of a micro-batch that share one prompt (a group's) compute it once.
    """
    N, T = completion_ids.shape
    logps = torch.zeros(N, T, dtype=torch.float32, device=prompt_ids.device)
    entropy = torch.zeros_like(logps) if return_entropy else None  # (N, T)
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
            return_entropy=return_entropy,
        )
        out = list(out) if isinstance(out, tuple) else [out]
        logps[rows, :t_b] = out.pop(0)
        if return_hidden:
            h = out.pop(0)
            if hidden is None:
                hidden = h.new_zeros(N, T, h.shape[-1])  # (N, T, d)
            hidden[rows, :t_b] = h
        if return_entropy:
            entropy[rows, :t_b] = out.pop(0)
    outputs = [logps] + ([hidden] if return_hidden else []) + ([entropy] if return_entropy else [])
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


# --------------------------------------------------------------------------------------------
# The clipped surrogate loss
# --------------------------------------------------------------------------------------------


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(π_θ || π_ref): exp(ref - logp) - (ref - logp) - 1."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def high_entropy_mask(entropy: Tensor, completion_mask: Tensor, top_quantile: float) -> Tensor:
    """(N, T) bool: the valid tokens whose entropy is at least the (1 - ρ)-quantile of all valid
    tokens' entropies, ρ = ``top_quantile`` (ρ = 0.2: the top 20%, ties kept; none when no token is
    valid).

    Wang et al., "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective Reinforcement
    Learning for LLM Reasoning" (arXiv 2506.01939): the policy gradient only on the top 20% tokens
    of a batch by entropy. As TRL's ``GRPOTrainer.get_high_entropy_mask`` (trl 1.16,
    ``GRPOConfig.top_entropy_quantile``) on one process: ``torch.quantile`` (linear interpolation)
    over the valid tokens of the batch it is given, then ``entropy >= threshold`` inside the mask.
    """
    if not 0.0 <= float(top_quantile) <= 1.0:
        raise ValueError(f"`top_quantile` must lie in [0, 1], got {top_quantile!r}")
    if entropy.shape != completion_mask.shape:
        raise ValueError(
            f"`entropy` {tuple(entropy.shape)} and `completion_mask` "
            f"{tuple(completion_mask.shape)} must match"
        )
    mask = completion_mask.bool()  # (N, T)
    valid = entropy[mask].float()  # (n_valid,)
    if valid.numel() == 0:
        return torch.zeros_like(mask)
    threshold = torch.quantile(valid, 1.0 - float(top_quantile))
    return (entropy >= threshold) & mask


LLDS_WEIGHT = 0.2  # λ of the LLDS release script (train_grpo_nqhot.sh: NO_REDUCE_LAMBDA=0.2)


def llds_penalty(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    completion_mask: Tensor,
    *,
    weight: float = LLDS_WEIGHT,
    gate: str = "response",
) -> Tensor:
    """(N, T) LLDS's per-token penalty λ·max(0, ln π_old(y_t) - ln π_θ(y_t)), added to the loss, on
    the tokens of responses with A >= 0 (the "preserving set") where their likelihood fell.

    Deng et al., "On Group Relative Policy Optimization Collapse in Agent Search: The Lazy
    Likelihood-Displacement" (arXiv 2512.04220); code:
    https://github.com/vengdeng/LLDS-On-Group-Relative-Policy-Optimization-Collapse-in-Search-R1,
    the ``dp_actor`` module of its verl workers (``update_policy``),
    λ = ``no_reduce_lambda`` = 0.2 in ``train_grpo_nqhot.sh``. ``gate``:

    - ``"response"`` (their R-gate, ``chunk_noreduce=False``): a response's tokens count only when
      its log-likelihood over the preserving set fell, Σ_t (ln π_old - ln π_θ) > 0; each counted
      token adds its own max(0, ln π_old - ln π_θ). Their A-gate (``chunk_noreduce=True``) gates
      each contiguous run of loss-mask tokens (one agent action between tool observations); a
      single-turn completion is one run, so there it is the R-gate.
    - ``"token"``: the finest gate, each token its own action: every preserving-set token whose own
      log-prob fell.

    The gate and max(0, ·) pass a gradient only where the drop is strictly positive: at ratio 1
    (old = current policy) the penalty is 0 with zero gradient (their ``torch.maximum`` would give
    half a gradient at an exact tie; the R-gate is closed there anyway). ``advantages`` (N, T) or
    (N,); ``old_logps`` is detached. Aggregated by the caller like the policy term
    (``policy_loss(penalty=...)``; their code: a token mean, as ``agg="token"``).
    """
    if gate not in LLDS_GATES:
        raise ValueError(f"`gate` must be one of {LLDS_GATES}, got {gate!r}")
    if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
        raise ValueError(f"`weight` must be a finite number >= 0, got {weight!r}")
    if advantages.dim() == 1:
        advantages = advantages[:, None]  # (N, 1) broadcasts over tokens
    if old_logps.shape != logps.shape or completion_mask.shape != logps.shape:
        raise ValueError(
            f"`old_logps` {tuple(old_logps.shape)} and `completion_mask` "
            f"{tuple(completion_mask.shape)} must match `logps` {tuple(logps.shape)}"
        )
    zeros = torch.zeros_like(logps)
    preserving = completion_mask.bool() & (advantages >= 0)  # (N, T)
    drop = torch.where(preserving, old_logps.detach() - logps, zeros)  # (N, T) ln π_old - ln π_θ
    fell = drop.detach() > 0  # (N, T) token gate
    if gate == "response":
        fell = fell & (drop.detach().sum(-1, keepdim=True) > 0)  # ln π_θ(y) < ln π_old(y)
    return torch.where(fell, weight * drop, zeros)


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
    penalty: Tensor | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Clipped GRPO loss (minimised) and float metrics; agg in "token", "seq_mean", "dr_grpo" (nb
    01).

    ``advantages`` is per token (N, T) (a per-sequence (N,) tensor is broadcast). ``penalty``: an
    update rule's extra (N, T) per-token loss term (``rules.Rule.penalty``, e.g. LLDS's), added to
    each token's loss beside the KL term and aggregated with it. Metrics: clip_frac_low,
    clip_frac_high, clip_frac, ratio_mean/min/max over valid tokens (NaN if none), kl if ref_logps
    given, and penalty (its mean over valid tokens) if one is given.
    """
    advantages = _check_policy_inputs(
        logps, old_logps, advantages, completion_mask, ref_logps, penalty, kl_coef=kl_coef, agg=agg
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
    if penalty is not None:
        per_token = per_token - penalty  # the rule's extra loss term (the objective's minus)
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
        if penalty is not None:
            pen = torch.where(mask, penalty.detach(), zeros)
            metrics["penalty"] = float(pen.sum() / denom) if has_tokens else math.nan
    return loss, metrics


def _check_policy_inputs(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    completion_mask: Tensor,
    ref_logps: Tensor | None,
    penalty: Tensor | None,
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
        ("penalty", penalty),
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

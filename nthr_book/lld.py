"""Lazy Likelihood Displacement (LLD): one update on one question's group, and how ln π(y+|x) moves.

Implements docs/method.md §2, from arXiv 2505.18830 (Deng et al., "On the Effect of Negative
Gradient in Group Relative Deep Reinforcement Optimization"), Figures 1 and 4. For a question ``x``
whose group of G sampled responses is mixed (0 < N+ < G), start from the initial weights, apply
``steps`` updates (default one) on that group only, and record

    Δ(x) = (1/N+) Σ_{correct i} [ ln π_new(y+_i | x) - ln π_init(y+_i | x) ]

where ``ln π(y|x)`` is the *sum* of the response's token log-probabilities. LLD: Δ(x) ≤ ε. Update
rules compared on the same groups: ``"grpo"`` (group advantages), ``"pos_only"`` (negative
advantages set to 0), ``"nthr"`` (NTHR-selected tokens of the wrong responses get η·A, η = 0 by
default, the paper's diagnostic) and ``"random"`` (as many tokens per wrong response as NTHR picks,
chosen uniformly, advantage η·A), and every other rule of ``nthr_book.rules`` (NSR, W-REINFORCE,
Clip-Higher, Dr. GRPO, LLDS, ...: its advantages, entropy mask, loss settings and penalty). Random's
positions are drawn with ``question_seed(seed, question_id)``, a stable hash of the experiment seed
and the question id: two questions of the same shape get different positions, and a rerun of a
question gets the same ones.

After each measurement the weights are restored **bit for bit** by copying back a snapshot of the
trainable parameters. The snapshot buffers are allocated once per model (one copy of the trainable
parameters on the model's device, kept in a module-level ``WeakKeyDictionary``) and reused for
every question, so memory stays flat over a whole experiment; ``release_snapshot(model)`` frees it.

Reading order: ``one_step_displacement`` (Δ(x), one screen: initial pass, the rule's advantages, the
update, the new pass), ``first_order_displacement`` (the same to first order in the step: why the
wrong answers' push can lower the right ones) and ``lld_rate`` (the paper's LLD measure). Many
questions and rules at once, and the tables' summaries, are ``nthr_book.lld_sweep``; groups live in
``nthr_book.groups``.
"""

from __future__ import annotations

import hashlib
import math
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from nthr_book import grpo
from nthr_book import nthr as _nthr
from nthr_book import rules as _rules
from nthr_book.groups import Group
from nthr_book.models import eval_mode, lm_head

__all__ = [
    "METHODS",  # noqa: F822 (module __getattr__: read live from nthr_book.rules)
    "OPTIMIZERS",
    "ROW_COLUMNS",
    "QuestionDisplacement",
    "initial_token_logps",
    "lld_rate",
    "nthr_selection",
    "one_step_displacement",
    "FirstOrderDisplacement",
    "first_order_displacement",
    "question_seed",
    "release_snapshot",
    "sequence_logprobs",
]

OPTIMIZERS = ("sgd", "adam")
ROW_COLUMNS = (
    "id",
    "method",
    "n_correct",
    "group_size",
    "p",
    "delta",
    "per_response_delta",
    "n_selected",
    "n_incorrect_tokens",
    "tau",
    "seed",
    "lr",
    "grad_norm",
)


def __getattr__(name: str) -> Any:
    """``METHODS``: the update rules of ``nthr_book.rules``, read live (registered ones too)."""
    if name == "METHODS":
        return _rules.names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------
# ln π(y|x), batched
# --------------------------------------------------------------------------------------------


def sequence_logprobs(
    model: nn.Module,
    prompt_ids: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    *,
    prompt_mask: Tensor | None = None,
    temperature: float = 1.0,
    batch_size: int | None = None,
) -> Tensor:
    """(N,) ln π(y|x): summed completion log-probs (float64), no gradient, eval mode, batch_size
    rows a time."""
    if (
        prompt_ids.dim() != 2
        or completion_ids.dim() != 2
        or prompt_ids.shape[0] != completion_ids.shape[0]
    ):
        raise ValueError(
            f"`prompt_ids` (N, P) and `completion_ids` (N, T) must share N, got "
            f"{tuple(prompt_ids.shape)} and {tuple(completion_ids.shape)}"
        )
    if completion_mask.shape != completion_ids.shape:
        raise ValueError(
            f"`completion_mask` {tuple(completion_mask.shape)} must match `completion_ids` "
            f"{tuple(completion_ids.shape)}"
        )
    if prompt_mask is None:
        prompt_mask = torch.ones_like(prompt_ids)
    elif prompt_mask.shape != prompt_ids.shape:
        raise ValueError(
            f"`prompt_mask` {tuple(prompt_mask.shape)} must match `prompt_ids` "
            f"{tuple(prompt_ids.shape)}"
        )
    device = _model_device(model)
    with torch.no_grad(), eval_mode(model):
        logps = grpo.group_token_logps(
            model,
            prompt_ids.to(device),
            prompt_mask.to(device),
            completion_ids.to(device),
            completion_mask.to(device),
            temperature=temperature,
            batch_size=batch_size,
        )
    return grpo.sequence_logprob(logps.double(), completion_mask.to(device))


def _model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        raise ValueError("`model` has no parameters") from None


# --------------------------------------------------------------------------------------------
# The reusable weight snapshot
# --------------------------------------------------------------------------------------------

_SNAPSHOTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _snapshot(model: nn.Module) -> list[tuple[nn.Parameter, Tensor]]:
    """(parameter, same-shape buffer) for every trainable parameter; buffers allocated once per
    model."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    if not params:
        raise ValueError("`model` has no trainable parameters (requires_grad=False everywhere)")
    cached = _SNAPSHOTS.get(model)
    if (
        cached is not None
        and len(cached) == len(params)
        and all(
            p is q and b.shape == p.shape and b.dtype == p.dtype and b.device == p.device
            for (q, b), p in zip(cached, params)
        )
    ):
        return cached
    _SNAPSHOTS.pop(model, None)  # free a stale snapshot before allocating the new one
    cached = [(p, torch.empty_like(p, memory_format=torch.preserve_format)) for p in params]
    _SNAPSHOTS[model] = cached
    return cached


def release_snapshot(model: nn.Module) -> bool:
    """Free the snapshot buffers kept for ``model``; True if there were any."""
    return _SNAPSHOTS.pop(model, None) is not None


# --------------------------------------------------------------------------------------------
# One question, one update rule
# --------------------------------------------------------------------------------------------


@dataclass
class QuestionDisplacement:
    """Δ(x) of one question under one update rule, with what it was made of (docs/method.md §2)."""

    question_id: str
    method: str
    n_correct: int  # N+
    group_size: int  # G
    p: float  # N+ / G
    delta: float  # Δ(x) = mean over correct responses of ln π_new - ln π_init
    per_response_delta: list[float]  # (N+,) in row order
    n_selected_tokens: (
        int | None
    )  # tokens whose advantage became eta·A ("nthr", "random"); None otherwise
    n_incorrect_tokens: int  # valid tokens of the incorrect responses
    logp_init: list[float]  # (N+,) ln π_init of the correct responses
    extras: dict[str, Any] = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        """The experiment-table row (see ``lld_experiment``) without seed and lr."""
        return {
            "id": self.question_id,
            "method": self.method,
            "n_correct": self.n_correct,
            "group_size": self.group_size,
            "p": self.p,
            "delta": self.delta,
            "per_response_delta": list(self.per_response_delta),
            "n_selected": self.n_selected_tokens,
            "n_incorrect_tokens": self.n_incorrect_tokens,
            # the first step's gradient norm: Δ / (lr · grad_norm) compares rules per unit of step
            "grad_norm": self.extras.get("grad_norm", [math.nan])[0],
        }


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: expected one of {tuple(allowed)}")


def _nthr_apply(
    model: nn.Module,
    hidden: Tensor,
    completion_ids: Tensor,
    mask: Tensor,
    correct: Tensor,
    advantages: Tensor,
    *,
    beta: float,
    eta: float,
    temperature: float,
    vocab: str,
    anchor: str = "all",
) -> _nthr.GroupNTHR:
    """``nthr.apply_to_group`` with the model's LM head: selection, tau, new advantages (§3)."""
    head = lm_head(model)
    config = _nthr.NTHRConfig(beta=beta, eta=eta, vocab=vocab, anchor=anchor)
    return _nthr.apply_to_group(
        hidden,
        head.weight,
        completion_ids,
        mask,
        correct,
        advantages,
        config,
        temperature=temperature,
        lm_head_bias=head.bias,
        softcap=head.softcap,
    )


def question_seed(seed: int, question_id: str) -> int:
    """The Random control's seed for one question: 63 bits of sha256("<seed>/<question_id>").

    Stable across processes and machines (unlike Python's salted ``hash``), so a rerun of a question
    draws the same random positions while questions of the same shape draw different ones.
    Notebook 02.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"`seed` must be an int, got {seed!r}")
    digest = hashlib.sha256(f"{seed}/{question_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # < 2**63: a valid torch.Generator seed


def one_step_displacement(
    model: nn.Module,
    group: Group,
    *,
    update: str = "grpo",
    lr: float,
    optimizer: str = "sgd",
    steps: int = 1,
    beta: float = 1.0,
    eta: float = 0.0,
    seed: int = 0,
    temperature: float = 1.0,
    vocab: str = "generated",
    question_id: str | None = None,
    selected: Tensor | None = None,
    old_logps: Tensor | None = None,
    batch_size: int | None = None,
    share_prompt: bool = True,
    entropy: Tensor | None = None,
) -> QuestionDisplacement:
    """Δ(x) after ``steps`` updates on ``group`` alone with rule ``update``; weights restored bit
    for bit.

    Loss: ``grpo.policy_loss`` (token aggregation, clip 0.2, population-std advantages, no KL)
    with old_logps = the initial log-probs, unless the rule's settings say otherwise
    (``rules.Rule.resolve_settings``: Clip-Higher's ε_high, Dr. GRPO's aggregation and std, the
    β of NTHR at β = -∞, which replaces ``beta``), plus the rule's penalty term (LLDS's). Dr.
    GRPO's constant normaliser is G·T, T the group's completion width. The rule's stages run in
    ``rules``' order: advantages, selection, entropy mask (entropies of the initial pass: a
    TRL-style quantile over the group's valid tokens), loss. At ``steps=1`` every ratio is 1, so
    Clip-Higher and LLDS are exactly GRPO there; they differ from the second step on (see
    ``nthr_book.rules``). ``optimizer``: "sgd" (no momentum) or "adam" (AdamW, fresh state,
    weight_decay 0: the displacement comes from the gradient alone). ``selected`` (G, T) overrides
    NTHR's selection for the rules that need one (``rules.Rule.needs_hidden``); their draws use
    ``question_seed(seed, question_id)``. ``old_logps`` (G, T): the initial per-token log-probs when
    already computed (``initial_token_logps``), saving a forward pass; ``entropy`` (G, T): their
    entropies likewise, for the rules with an entropy mask. Model modes, stored gradients and the
    global RNG state are left as they were. ``share_prompt``: every pass computes the group's
    prompt once (``grpo.shared_prompt_hidden``; False runs each row whole). Introduced in notebook
    02.
    """
    rule, qid, settings = _check_displacement_args(
        group, update, optimizer, vocab, steps, lr, question_id, selected, old_logps, entropy, beta
    )
    device = _model_device(model)
    r = group.rollouts.to(device)
    mask, correct = r.completion_mask.bool(), group.correct.to(device)  # (G, T), (G,)
    fwd = dict(temperature=temperature, batch_size=batch_size, share_prompt=share_prompt)
    extras: dict[str, Any] = {"optimizer": optimizer, "steps": steps, "lr": lr}
    extras.update(settings=settings)
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), eval_mode(model):
        # 1. initial pass (no gradient): old log-probs, ln π_init, hidden states for NTHR's
        # selection, entropies for an entropy mask
        with torch.no_grad():
            # 2. per-token advantages (G, T) of the rule
            old_logps, advantages, selected = _initial_advantages(
                model,
                group,
                rule,
                settings,
                mask,
                old_logps=old_logps,
                selected=selected,
                entropy=entropy,
                extras=extras,
                eta=eta,
                vocab=vocab,
                temperature=temperature,
                seed=seed,
                question_id=qid,
                fwd=fwd,
            )
            logp_init = grpo.sequence_logprob(old_logps.double(), mask)  # (G,)
            extras["advantages"] = advantages.cpu()  # (G, T) the rule's, as the update used them
        # 3. the update(s) from a snapshot of the weights; 4. ln π after them; weights copied back
        with _restored_weights(model) as params:
            extras.update(
                _update(
                    model,
                    params,
                    r,
                    mask,
                    old_logps,
                    advantages,
                    rule,
                    settings,
                    optimizer=optimizer,
                    lr=lr,
                    steps=steps,
                    **fwd,
                )
            )
            with torch.no_grad():
                new_logps = grpo.group_token_logps(
                    model, r.prompt_ids, r.prompt_mask, r.completion_ids, mask, **fwd
                )
            logp_new = grpo.sequence_logprob(new_logps.double(), mask)  # (G,)

    diff, on = (logp_new - logp_init).cpu(), correct.cpu()  # (G,) float64, (G,) bool
    extras.update(
        logp_new=logp_new.cpu()[on].tolist(),
        logp_init_all=logp_init.cpu().tolist(),
        logp_new_all=logp_new.cpu().tolist(),
        incorrect_delta=diff[~on].tolist(),
        completion_lengths=mask.sum(1).cpu().tolist(),
    )
    return QuestionDisplacement(
        question_id=qid,
        method=update,
        n_correct=group.n_correct,
        group_size=group.group_size,
        p=group.p,
        delta=float(diff[on].mean()),
        per_response_delta=diff[on].tolist(),
        n_selected_tokens=int(selected.sum()) if rule.needs_hidden else None,
        n_incorrect_tokens=int(((~correct)[:, None] & mask).sum()),
        logp_init=logp_init.cpu()[on].tolist(),
        extras=extras,
    )


@dataclass
class FirstOrderDisplacement:
    """Δ(x) to first order in the step (docs/method.md §2): what one SGD step of ``lr`` on a group's
    loss L does to ln π of each correct answer, ⟨∇ ln π(y+_i), −lr ∇L⟩, split into the part the
    correct answers' terms of L push (``right``) and the part the wrong answers' terms push
    (``wrong``); the two add up to the prediction because L is linear in the advantages at the
    first step (every ratio is 1). Pos Only's prediction is GRPO's ``right`` part."""

    question_id: str
    method: str
    predicted: float  # mean over correct answers of right_i + wrong_i: the first-order Δ(x)
    right: float  # mean over correct answers of the right answers' push
    wrong: float  # mean over correct answers of the wrong answers' push
    per_response_right: list[float]  # (N+,) in row order
    per_response_wrong: list[float]  # (N+,)

    def to_row(self) -> dict[str, Any]:
        """One table row: id, method, predicted, right, wrong."""
        return {
            "id": self.question_id,
            "method": self.method,
            "predicted": self.predicted,
            "right": self.right,
            "wrong": self.wrong,
        }


def first_order_displacement(
    model: nn.Module,
    group: Group,
    *,
    update: str = "grpo",
    lr: float,
    beta: float = 1.0,
    eta: float = 0.0,
    seed: int = 0,
    temperature: float = 1.0,
    vocab: str = "generated",
    selected: Tensor | None = None,
    batch_size: int | None = None,
    share_prompt: bool = True,
) -> FirstOrderDisplacement:
    """The first-order prediction of ``one_step_displacement`` (same rule, loss and lr, plain SGD):
    for each correct answer i, Δ_i ≈ ⟨g_i, d⟩ with g_i = ∇ ln π(y+_i) and d = −lr ∇L the step.

    With the token-mean loss at ratio 1, ∇L = −(1/Σ|y|) Σ_j A_j Σ_t ∇ ln π(y_{j,t}) (A_j the rule's
    advantages, per token), so

        Δ_i ≈ (lr / Σ|y|) Σ_j Σ_t A_{j,t} ⟨∇ ln π(y+_i), ∇ ln π(y_{j,t})⟩,

    and the terms of the correct answers (A > 0 for GRPO) and of the wrong ones (A < 0) are kept
    apart: the wrong answers lower y+_i exactly when their tokens' gradients point along y+_i's.
    Computed with autograd: two backward passes give the two parts of d, one more per correct
    answer gives g_i; inner products in float64. Weights, stored gradients and the RNG are left as
    they were. Introduced in notebook 02.
    """
    rule, qid, settings = _check_displacement_args(
        group, update, "sgd", vocab, 1, lr, None, selected, None, None, beta
    )
    device = _model_device(model)
    r = group.rollouts.to(device)
    mask, correct = r.completion_mask.bool(), group.correct.to(device)  # (G, T), (G,)
    fwd = dict(temperature=temperature, batch_size=batch_size, share_prompt=share_prompt)
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), eval_mode(model):
        with torch.no_grad():
            old_logps, advantages, _ = _initial_advantages(
                model,
                group,
                rule,
                settings,
                mask,
                old_logps=None,
                selected=selected,
                entropy=None,
                extras={},
                eta=eta,
                vocab=vocab,
                temperature=temperature,
                seed=seed,
                question_id=qid,
                fwd=fwd,
            )
        with _restored_weights(model) as params:
            # 1. the step d = −lr ∇L, from the correct answers' terms and from the wrong ones'
            steps = {}
            for part, rows in (("right", correct), ("wrong", ~correct)):
                for q in params:
                    q.grad = None
                _backward(
                    model,
                    r.prompt_ids,
                    r.prompt_mask,
                    r.completion_ids,
                    mask,
                    old_logps,
                    advantages * rows[:, None],  # (G, T): the other answers' terms set to 0
                    rule,
                    settings,
                    **fwd,
                )
                steps[part] = [
                    None if q.grad is None else -lr * q.grad.detach().double() for q in params
                ]
            for q in params:
                q.grad = None
            # 2. g_i = ∇ ln π(y+_i) of each correct answer, and its inner product with each part;
            # one answer's forward and backward at a time (a backward through the whole group's
            # graph would cost the group's backward per answer)
            rows = correct.nonzero().flatten().tolist()
            push = {"right": [], "wrong": []}
            for i in rows:
                one = slice(i, i + 1)
                logps = grpo.group_token_logps(
                    model,
                    r.prompt_ids[one],
                    r.prompt_mask[one],
                    r.completion_ids[one],
                    mask[one],
                    **fwd,
                )  # (1, T) with gradient
                seq = grpo.sequence_logprob(logps, mask[one])  # (1,)
                grads = torch.autograd.grad(seq[0], params, allow_unused=True)
                for part, step in steps.items():
                    push[part].append(
                        float(
                            sum(
                                (g.double() * d).sum()
                                for g, d in zip(grads, step)
                                if g is not None and d is not None
                            )
                        )
                    )
    right, wrong = push["right"], push["wrong"]
    return FirstOrderDisplacement(
        question_id=qid,
        method=update,
        predicted=sum(a + b for a, b in zip(right, wrong)) / len(rows),
        right=sum(right) / len(rows),
        wrong=sum(wrong) / len(rows),
        per_response_right=right,
        per_response_wrong=wrong,
    )


def _initial_advantages(
    model: nn.Module,
    group: Group,
    rule,
    settings: dict,
    mask: Tensor,
    *,
    old_logps: Tensor | None,
    selected: Tensor | None,
    entropy: Tensor | None,
    extras: dict,
    eta: float,
    vocab: str,
    temperature: float,
    seed: int,
    question_id: str,
    fwd: dict,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(old_logps (G, T), the rule's per-token advantages (G, T), NTHR's selection or None): the
    initial pass without gradient (old log-probs, hidden states for NTHR's selection, entropies
    for an entropy mask), then the rule's advantages on it. Shared by ``one_step_displacement``
    and ``first_order_displacement``, so both update with the same advantages."""
    old_logps, hidden, entropy = _initial_pass(
        model,
        group,
        old_logps,
        rule.needs_hidden and selected is None,
        entropy if rule.needs_entropy else None,
        rule.needs_entropy,
        **fwd,
    )
    advantages, selected = _rule_advantages(
        model,
        group,
        rule,
        mask,
        hidden,
        selected,
        entropy,
        extras,
        beta=settings["nthr_beta"],
        eta=eta,
        vocab=vocab,
        temperature=temperature,
        seed=seed,
        question_id=question_id,
        adv_std=settings["adv_std"],
    )
    return old_logps, advantages, selected


def _check_displacement_args(
    group: Group,
    update: str,
    optimizer: str,
    vocab: str,
    steps: int,
    lr: float,
    question_id: str | None,
    selected: Tensor | None,
    old_logps: Tensor | None,
    entropy: Tensor | None,
    beta: float,
) -> tuple[_rules.Rule, str, dict[str, Any]]:
    """The rule, question id and loss settings of a ``one_step_displacement`` call; ValueError
    naming a bad argument."""
    _check_choice("update", update, _rules.names())
    rule = _rules.get(update)
    given = _DISPLACEMENT_SETTINGS | {"nthr_beta": beta}
    settings = rule.resolve_settings(
        given,
        _DISPLACEMENT_SETTINGS,
        owner="one_step_displacement: ",
        arg_names={"nthr_beta": "beta"},
    )
    _check_choice("optimizer", optimizer, OPTIMIZERS)
    _check_choice("vocab", vocab, _nthr.VOCAB_MODES)
    if not isinstance(group, Group):
        raise TypeError(f"`group` must be an nthr_book.groups.Group, got {type(group).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` must be an int >= 1, got {steps!r}")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"`lr` must be a positive number, got {lr!r}")
    qid = group.question_id if question_id is None else str(question_id)
    if group.status != "mixed":
        raise ValueError(
            f"question {qid!r}: the group is {group.status.replace('_', ' ')} "
            f"(N+={group.n_correct} of G={group.group_size}); Δ(x) needs a mixed group"
        )
    if selected is not None and not rule.needs_hidden:
        raise ValueError(
            "`selected` is only used by rules with a selection ('nthr', 'random'), "
            f"got update={update!r}"
        )
    shape = tuple(group.rollouts.completion_ids.shape)  # (G, T)
    if selected is not None:
        if tuple(selected.shape) != shape:
            raise ValueError(
                f"`selected` must have shape (G, T) = {shape}, got {tuple(selected.shape)}"
            )
        wrong_tokens = (~group.correct)[:, None] & group.rollouts.completion_mask.bool().cpu()
        if bool((selected.bool().cpu() & ~wrong_tokens).any()):
            raise ValueError(
                "`selected` marks tokens outside the incorrect responses' completion_mask"
            )
    for name, tensor in (("old_logps", old_logps), ("entropy", entropy)):
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(
                f"`{name}` must have shape (G, T) = {shape}, got {tuple(tensor.shape)}"
            )
    return rule, qid, settings


# The loss settings of Δ(x) before a rule's own (rules.SETTINGS; nthr_beta: the ``beta`` argument).
_DISPLACEMENT_SETTINGS = {
    "clip_eps_high": None,
    "agg": "token",
    "adv_std": "population",
    "nthr_beta": 1.0,
}


def _initial_pass(
    model: nn.Module,
    group: Group,
    old_logps: Tensor | None,
    need_hidden: bool,
    entropy: Tensor | None,
    need_entropy: bool,
    **fwd: Any,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(G, T) float32 initial log-probs and, when needed, (G, T, d) hidden states and (G, T)
    entropies (``initial_token_logps``); given log-probs and entropies are reused when the pass
    would give nothing else."""
    device = _model_device(model)
    given = lambda t: None if t is None else t.detach().to(device=device, dtype=torch.float32)
    need_entropy = need_entropy and entropy is None
    if old_logps is not None and not need_hidden and not need_entropy:
        return given(old_logps), None, given(entropy)
    out = initial_token_logps(
        model, group, return_hidden=need_hidden, return_entropy=need_entropy, **fwd
    )
    out = list(out) if isinstance(out, tuple) else [out]
    logps = out.pop(0)
    hidden = out.pop(0) if need_hidden else None
    return logps, hidden, out.pop(0) if need_entropy else given(entropy)


def _rule_advantages(
    model: nn.Module,
    group: Group,
    rule: _rules.Rule,
    mask: Tensor,
    hidden: Tensor | None,
    selected: Tensor | None,
    entropy: Tensor | None,
    extras: dict,
    *,
    beta: float,
    eta: float,
    vocab: str,
    temperature: float,
    seed: int,
    question_id: str,
    adv_std: str,
) -> tuple[Tensor, Tensor | None]:
    """(G, T) advantages of ``rule`` on the group (and its (G, T) selection, for the rules with
    one): ``rules``' stages 1-3."""
    device = mask.device
    # 1. per-response advantages (1, G) of the rule, broadcast to the tokens
    group_adv = rule.sequence_advantages(group.rewards[None].to(device), std=adv_std)
    advantages = grpo.expand_advantages(group_adv, mask)  # (G, T)
    # 3. (it commutes with 2.) the entropy mask: 0 outside the top-ρ tokens
    advantages, kept = rule.entropy_masked(advantages, entropy, mask)
    if kept is not None:
        extras.update(entropy_kept=kept.cpu(), entropy_quantile=rule.entropy_quantile)
    if rule.needs_hidden and selected is None:  # NTHR's selection, from the GRPO advantages
        res = _nthr_apply(
            model,
            hidden,
            group.rollouts.completion_ids.to(device),
            mask,
            group.correct.to(device),
            advantages,
            beta=beta,
            eta=eta,
            temperature=temperature,
            vocab=vocab,
        )
        selected, extras["tau"] = res.selected, res.tau
    if not rule.needs_hidden:
        return advantages, selected
    selected = selected.to(device).bool()
    extras["nthr_selected"] = selected.cpu()
    extras["random_seed"] = question_seed(seed, question_id)  # the seed of the rule's draw
    selected = rule.selection(selected, mask, extras["random_seed"])
    extras.update(selected=selected.cpu(), eta=eta, beta=beta, vocab=vocab)
    return _nthr.reweight_advantages(advantages, selected, eta), selected


@contextmanager
def _restored_weights(model: nn.Module) -> Iterator[list[nn.Parameter]]:
    """The trainable parameters, copied into the model's snapshot first and back (with their stored
    gradients) afterwards, bit for bit, whatever happens inside."""
    snapshot = _snapshot(model)
    params = [p for p, _ in snapshot]
    saved_grads = [p.grad for p in params]
    with torch.no_grad():
        for p, buf in snapshot:
            buf.copy_(p)
    try:
        for p in params:
            p.grad = None
        yield params
    finally:
        with torch.no_grad():
            for (p, buf), g in zip(snapshot, saved_grads):
                p.copy_(buf)
                p.grad = g


def _update(
    model: nn.Module,
    params: list[nn.Parameter],
    r,
    mask: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    rule: _rules.Rule,
    settings: dict[str, Any],
    *,
    optimizer: str,
    lr: float,
    steps: int,
    temperature: float,
    batch_size: int | None,
    share_prompt: bool,
) -> dict[str, list[float]]:
    """``steps`` optimizer steps on the group's clipped loss (the rule's settings and penalty); the
    per-step loss, clip fraction, grad norm (and the penalty's token mean, for a rule with one)."""
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=0.0)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    stats: dict[str, list[float]] = {"loss": [], "clip_frac": [], "grad_norm": []}
    if rule.penalty is not None:
        stats["penalty"] = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss, clip_frac, penalty = _backward(
            model,
            r.prompt_ids,
            r.prompt_mask,
            r.completion_ids,
            mask,
            old_logps,
            advantages,
            rule,
            settings,
            temperature=temperature,
            batch_size=batch_size,
            share_prompt=share_prompt,
        )
        stats["loss"].append(loss)
        stats["clip_frac"].append(clip_frac)
        if rule.penalty is not None:
            stats["penalty"].append(penalty)
        stats["grad_norm"].append(_grad_norm(params))
        opt.step()
    return stats


def initial_token_logps(
    model: nn.Module,
    group: Group,
    *,
    temperature: float = 1.0,
    batch_size: int | None = None,
    return_hidden: bool = False,
    share_prompt: bool = True,
    return_entropy: bool = False,
) -> Tensor | tuple[Tensor, ...]:
    """(G, T) initial per-token log-probs of ``group`` as one_step_displacement makes them (+ (G,
    T, d) hidden, + (G, T) entropies: ``grpo.group_token_logps``' order)."""
    device = _model_device(model)
    r = group.rollouts.to(device)
    with torch.no_grad(), eval_mode(model):
        return grpo.group_token_logps(
            model,
            r.prompt_ids,
            r.prompt_mask,
            r.completion_ids,
            r.completion_mask.bool(),
            temperature=temperature,
            batch_size=batch_size,
            return_hidden=return_hidden,
            share_prompt=share_prompt,
            return_entropy=return_entropy,
        )


def nthr_selection(
    model: nn.Module,
    group: Group,
    *,
    beta: float = 1.0,
    temperature: float = 1.0,
    vocab: str = "generated",
    hidden: Tensor | None = None,
    batch_size: int | None = None,
) -> tuple[Tensor, float]:
    """(G, T) bool NTHR selection of ``group`` under the current weights, and its tau
    (docs/method.md §3)."""
    _check_choice("vocab", vocab, _nthr.VOCAB_MODES)
    if hidden is None:
        _, hidden = initial_token_logps(
            model, group, temperature=temperature, batch_size=batch_size, return_hidden=True
        )
    r = group.rollouts.to(hidden.device)
    mask = r.completion_mask.bool()  # (G, T)
    group_adv = grpo.group_advantages(group.rewards[None].to(hidden.device))  # (1, G)
    advantages = grpo.expand_advantages(group_adv, mask)  # (G, T)
    with torch.no_grad():
        res = _nthr_apply(
            model,
            hidden,
            r.completion_ids,
            mask,
            group.correct.to(hidden.device),
            advantages,
            beta=beta,
            eta=0.0,
            temperature=temperature,
            vocab=vocab,
        )
    return res.selected, res.tau


def _backward(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    mask: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    rule: _rules.Rule,
    settings: dict[str, Any],
    *,
    temperature: float,
    batch_size: int | None,
    share_prompt: bool = True,
) -> tuple[float, float, float]:
    """Accumulate the gradient of the clipped loss (the rule's aggregation, ε_high and penalty)
    over micro-batches, as one loss over the whole group; (loss, clip_frac, the penalty's token
    mean: 0 without one)."""
    n_total, n_rows_total = float(mask.sum()), mask.shape[0]
    loss_total, clipped, penalty = 0.0, 0.0, 0.0
    for rows, t_b, ids, att, cm in grpo.micro_batches(
        prompt_ids, prompt_mask, completion_ids, mask, batch_size
    ):
        n_rows_tokens = float(cm.sum())
        if n_rows_tokens == 0:
            continue
        group_size = cm.shape[0] if share_prompt else None  # the rows of one group share a prompt
        logps = grpo.per_token_logps(
            model, ids, att, cm, temperature=temperature, group_size=group_size
        )  # (n, t_b)
        old, adv = old_logps[rows, :t_b], advantages[rows, :t_b]
        loss, metrics = grpo.policy_loss(
            logps,
            old,
            adv,
            cm,
            clip_eps=0.2,
            clip_eps_high=settings["clip_eps_high"],
            kl_coef=0.0,
            agg=settings["agg"],
            max_completion_length=mask.shape[1],  # dr_grpo: the group's width, not the batch's
            penalty=rule.loss_penalty(logps, old, adv, cm),
        )
        # one loss over the whole group: each micro-batch's loss weighted by its share of the
        # tokens (token mean) or of the rows (seq_mean, dr_grpo)
        share = (
            n_rows_tokens / n_total if settings["agg"] == "token" else cm.shape[0] / n_rows_total
        )
        (loss * share).backward()
        loss_total += float(loss.detach()) * share
        clipped += metrics["clip_frac"] * n_rows_tokens / n_total
        penalty += metrics.get("penalty", 0.0) * n_rows_tokens / n_total
    return loss_total, clipped, penalty


def _grad_norm(params: Sequence[Tensor]) -> float:
    """Global L2 norm of the gradients (0 when none)."""
    sq = [p.grad.detach().float().square().sum() for p in params if p.grad is not None]
    return float(torch.stack(sq).sum().sqrt()) if sq else 0.0


# --------------------------------------------------------------------------------------------
# The LLD measure
# --------------------------------------------------------------------------------------------


def _flat_values(values: Any) -> list[float]:
    """Floats from a flat sequence, a tensor/array, or a sequence of such sequences (e.g. a
    column of lists)."""
    if isinstance(values, Tensor):
        return [float(v) for v in values.detach().reshape(-1).tolist()]
    out: list[float] = []
    for v in values:
        if isinstance(v, (str, bytes)):
            raise TypeError(f"expected numbers, got the string {v!r}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(float(v))
        elif isinstance(v, Tensor) or isinstance(v, Iterable):
            out.extend(_flat_values(v))
        elif hasattr(v, "__float__"):  # numpy scalars
            out.append(float(v))
        else:
            raise TypeError(f"expected numbers, got {type(v).__name__}")
    return out


def lld_rate(delta_per_response: Any, eps: float = 0.0) -> float:
    """LLD rate: the fraction of correct responses whose summed log-likelihood ln π(y+|x) rose by no
    more than eps (Δ_i ≤ eps, Δ_i as in ``per_response_delta``); NaN when empty. Notebook 02."""
    values = _flat_values(delta_per_response)
    if any(math.isnan(v) for v in values):
        raise ValueError("`delta_per_response` contains NaN")
    if not values:
        return math.nan
    return sum(v <= eps for v in values) / len(values)

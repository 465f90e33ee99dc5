"""NTHR inside TRL's ``GRPOTrainer`` (tested with trl==1.16.0): per-token advantages, LLD logging.

Implements NTHR (arXiv 2505.18830, Deng et al., "On the Effect of Negative Gradient in Group
Relative Deep Reinforcement Optimization") on top of TRL, for multi-GPU, DeepSpeed and vLLM runs
(notebook 07)::

    trainer = NTHRGRPOTrainer(model, reward_funcs=..., args=GRPOConfig(...), train_dataset=...,
                              nthr=NTHRConfig(beta=1.0, eta="two_abs", vocab="generated"))

``nthr=None`` is plain GRPO (bit for bit the same loss and gradients as ``trl.GRPOTrainer``), and so
is a ``beta`` that selects no token. The ``NTHRConfig`` is used whole: each mixed group goes through
``nthr_book.nthr.apply_to_group``, so every option of the config (beta, vocabulary, anchor, ...)
means here what it means in ``nthr_book.trainer``. TRL's advantages are one number per sequence,
(B,); with NTHR the batch carries (B, T) advantages, which TRL 1.16's ``_compute_loss`` uses as they
are ("if advantages.dim() == 1: unsqueeze(1)"), so every loss type (grpo, bnpo, dr_grpo, dapo,
cispo, sapo, luspo, vespo) is TRL's own. Padded positions keep the sequence's advantage, exactly as
TRL's broadcast has it (they are masked).

Selected tokens get eta·A only where their response's advantage A is negative (the rule of
``apply_to_group``, the same in the native trainer, LLD and the explorer). With one binary
reward that is every incorrect response of a mixed group; with several reward functions,
``multi_objective_aggregation="normalize_then_sum"`` or a ``correct_reward`` that is not the whole
reward, an "incorrect" response can have A >= 0, and its tokens keep A (NTHR dampens the push-down
of tokens the correct responses share, never a push-up).

TRL's advantages are not ``nthr_book.grpo.group_advantages``' defaults: TRL divides by the unbiased
(Bessel, G - 1) std of the group plus 1e-4, the native trainer by the population std plus 1e-6
(the theory's sqrt(p(1-p))). The unbiased std is sqrt(G/(G-1)) times the population one, so TRL's
advantages are sqrt((G-1)/G) times the native ones (0.935 at G = 8) in every mixed group, whatever
N+, for the correct and the incorrect responses alike, up to the eps terms; the ratio tends to 1 as
G grows (notebook 07 §3). Learning rates carry over between the two trainers only up to that
factor.

Which pass the hidden states come from (selection is computed once per generation batch, no
gradient), and what each layout costs on top of plain GRPO:

* TRL computes ``old_per_token_logps`` (when ``gradient_accumulation_steps % (steps_per_generation
  * num_iterations) != 0``, or vLLM with ``vllm_importance_sampling_correction``): a forward hook on
  the backbone reads the hidden states of that same pass. No extra forward.
* TRL skips it (``old_per_token_logps = None``: the policy has not moved since generation, so TRL
  uses ``per_token_logps.detach()``) and ``steps_per_generation == 1`` (TRL's default layout): each
  micro-batch is the whole local generation batch and the current policy is the old one, so the
  hidden states of the training forward in ``compute_loss`` are the old policy's. NTHR runs between
  that forward and TRL's loss (it replaces ``inputs["advantages"]`` before TRL reads it). No extra
  forward.
* TRL skips it and ``steps_per_generation > 1``: a group's completions are spread over micro-batches
  that are run one after the other, and the first loss needs the selection of the whole group, so
  ONE EXTRA NO-GRAD FORWARD over the local generation batch runs after generation (what TRL's own
  old-policy pass costs: about a third of a training forward-backward over the same rows). Its
  log-probs are not handed to TRL, whose loss stays untouched. To avoid it, make TRL run its pass
  (e.g. ``num_iterations=2``) or use ``steps_per_generation=1``.

The scoring itself (generated vocabulary) multiplies only the |V*| rows of the LM head
(the paper measures it at about 4% of a step).

LLD tracking (``track_lld=True``, the default) costs ONE EXTRA NO-GRAD FORWARD per generation
batch, over its correct responses only, after the optimizer step that finished the batch (the "new"
ln π; the "old" one is read from a pass that runs anyway). Every process runs as many rows as the
process with the most correct responses (ZeRO-3 needs the same forward calls everywhere).
``track_lld=False`` removes it.

Several processes: TRL spreads one generation batch over the processes in rank order (process ``r``
holds rows ``[r*b, (r+1)*b)``), so the G completions of a prompt may sit on two processes. When
``b`` is not a multiple of ``num_generations``, the hidden states, ids, masks, rewards and
advantages of the batch are gathered (``accelerator.pad_across_processes`` + ``gather``: world_size
× local memory), every process scores the groups that touch its rows, and keeps its own slice; when
``b % num_generations == 0`` every group is local and nothing is gathered. Metrics count each group
once (on the process holding its first row) and are summed over processes. A check that can fail on
one process only is agreed on by all of them (one all-reduce of a flag) before the next collective,
so that every process raises instead of the others waiting forever.

vLLM (``use_vllm=True``, server or colocate): nothing specific is needed, everything hooks in after
generation on the training model's passes. With ``vllm_importance_sampling_correction`` (TRL's
default) TRL always runs the old-policy pass, which NTHR reuses.

A response is correct when its reward (TRL's weighted sum over reward functions, or the one named
by ``correct_reward``) exceeds ``correct_threshold`` (0.5, for binary rewards). ``LLDCallback``
logs ``lld/delta_mean`` (mean change of ln π(y+|x) of the correct responses of a generation batch
over the update(s) that consumed it) and ``lld/rate`` (share with change <= eps); responses TRL
masks out whole (``mask_truncated_completions``) are left out. NTHR logs ``nthr/selected_frac``
(reweighted tokens / incorrect-response tokens inside TRL's loss mask, mixed groups),
``nthr/tau_mean``, ``nthr/score_mean``, ``nthr/eta_mean`` and ``nthr/mixed_groups`` to TRL's
metrics. Models whose config scales the LM head's logits (``logit_scale`` and the like) are
refused; Gemma's soft-capping is applied, as in TRL's log-probs.

Update rules of ``nthr_book.rules`` (``rule="nsr"``, ...): the trainer's advantage hook replaces
TRL's (B,) advantages by the rule's per-response ones (``rules.Rule.sequence_advantages``: NSR's and
W-REINFORCE's from the rewards of the whole generation batch, Pos Only's and Neg Only's elementwise
from TRL's own; TRL drops no group, so an all-wrong group is pushed down with -1 here as in those
rules' code, ``rules.Rule.keeps_homogeneous``, and a rule that does not keep such groups has 0 on
them), and adds the rule's extra loss term (LLDS's ``grpo.llds_penalty``) to TRL's loss,
read off the training forward's log-probs: its mean over the micro-batch's loss-mask tokens, divided
by the gradient accumulation steps (as TRL scales its entropy bonus; the LLDS code's masked token
mean). The old log-probs are TRL's ``old_per_token_logps``, or the forward's own, detached, when TRL
skips its old-policy pass: then the penalty is 0 (the policy has not moved), as LLDS's own code
notes (its README: mini-batches smaller than the generation batch keep the two apart). Where TRL has
the knob itself the rule only checks that the GRPOConfig sets it: Clip-Higher is
``epsilon_high=0.28``, Dr. GRPO ``loss_type="dr_grpo", scale_rewards="none"``, the high-entropy rule
``top_entropy_quantile=0.2`` (TRL's own mask); NTHR (also at β = -∞) is ``nthr=NTHRConfig(...)``.

Why one long module: TRL's trainer is subclassed in one place, and the hooks into its
passes, the multi-process gathering and the metrics depend on each other's layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from nthr_book import rules
from nthr_book.lld import lld_rate
from nthr_book.models import lm_head
from nthr_book.nthr import NTHRConfig, apply_to_group
from nthr_book.rewards import is_correct
from nthr_book.rollout import generation_config

try:
    from accelerate.utils import is_peft_model
    from transformers import TrainerCallback
    from trl import GRPOTrainer
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import maybe_gather_lm_head_ctx
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "nthr_book.integrations.trl needs TRL (tested with trl==1.16.0): pip install -e '.[trl]'"
    ) from err

__all__ = [
    "LLDCallback",
    "NTHRConfig",
    "NTHRGRPOTrainer",
    "low_precision_logits",
    "math_answer_reward",
    "prompt_dataset",
    "hidden_states_source",
    "trl_runs_old_pass",
]

# Keys this trainer adds to TRL's batch dict (tensors with a leading batch dim, or 0-d; TRL's
# shuffle and split pass them through): global row id, reward, TRL's (B,) advantages, two 0-d flags.
_ROW, _REWARD, _SEQ_ADV = "nthr_row", "nthr_reward", "seq_advantages"
_FUSED, _BATCH = "nthr_fused", "nthr_batch"
_HALF = (torch.bfloat16, torch.float16)


def trl_runs_old_pass(args: Any, use_vllm: bool, vllm_is_correction: bool) -> bool:
    """True when TRL 1.16 computes ``old_per_token_logps`` after generation (its own condition)."""
    generate_every = args.steps_per_generation * args.num_iterations
    runs_it = args.gradient_accumulation_steps % generate_every != 0
    return runs_it or (use_vllm and vllm_is_correction)


OLD_PASS, LOSS_FORWARD, EXTRA_PASS = (
    "TRL's old-policy pass",
    "the loss's own forward",
    "one extra no-grad forward after generation",
)


def hidden_states_source(
    args: Any, use_vllm: bool = False, vllm_is_correction: bool = False
) -> tuple[str, int]:
    """Where ``NTHRGRPOTrainer`` reads NTHR's hidden states under a TRL config, and the extra
    no-grad forward passes per generation batch that costs (LLD tracking not counted): TRL's
    old-policy pass when TRL runs one (0), else the loss's own forward when
    ``steps_per_generation == 1`` (0), else one extra pass (1). The module docstring explains each;
    notebook 07 prints it."""
    if trl_runs_old_pass(args, use_vllm, vllm_is_correction):
        return OLD_PASS, 0
    if args.steps_per_generation == 1:
        return LOSS_FORWARD, 0
    return EXTRA_PASS, 1


def low_precision_logits(accelerator: Any, args: Any, model: Any) -> bool:
    """True when the policy's log-probs come from bf16/fp16 logits (notebook 07).

    Accelerate's mixed precision decides, not only GRPOConfig's ``bf16``/``fp16``: ``accelerate
    launch`` with ``mixed_precision: bf16`` trains in bf16 autocast while ``args.bf16`` may be
    False.
    Half-precision weights (a model loaded in bf16) count too.
    """
    mixed = str(getattr(accelerator, "mixed_precision", "no") or "no").lower()
    flags = bool(getattr(args, "bf16", False)) or bool(getattr(args, "fp16", False))
    return mixed in ("bf16", "fp16") or flags or getattr(model, "dtype", None) in _HALF


def _raise_on_any_process(accelerator: Any, error: BaseException | None) -> None:
    """Raise ``error`` here, and a RuntimeError on every other process when any process has one.

    One all-reduce of a flag, called by every process before the next collective: a check that fails
    on one process only then stops all of them instead of leaving the others in a gather.
    """
    if accelerator.num_processes > 1:
        flag = torch.tensor([float(error is not None)], device=accelerator.device)
        failed = float(accelerator.reduce(flag, reduction="sum").item())
        if error is None and failed > 0:
            raise RuntimeError(
                f"NTHRGRPOTrainer: {failed:g} other process(es) failed a check "
                "here; their error says why"
            )
    if error is not None:
        raise error


@dataclass
class _Capture:
    """One policy pass to intercept: its returned log-probs and (optionally) the hidden states."""

    want_hidden: bool
    on_done: Callable[[_Capture], None] | None = None
    keep_graph: bool = False  # also keep the log-probs with their graph (an extra loss term)
    logps: Tensor | None = None  # (B, T) detached
    logps_graph: Tensor | None = None  # (B, T), differentiable (keep_graph)
    hidden: Tensor | None = None  # (B, T, d) detached: hidden[:, t] predicts completion token t
    chunks: list[Tensor] = field(default_factory=list)


@dataclass
class _LLDBatch:
    """A generation batch whose correct responses' ln π is compared before and after its updates."""

    batch_id: int
    end_step: int  # TRL micro-step count after which the batch is fully consumed
    input_ids: Tensor  # (b, P+T) local rows, generation order
    attention_mask: Tensor  # (b, P+T)
    completion_mask: Tensor  # (b, T) loss mask
    correct: Tensor  # (b,) bool: correct and with at least one token inside the loss mask
    old_seq: Tensor  # (b,) ln π_old(y|x), NaN until known


class LLDCallback(TrainerCallback):
    """Logs ``lld/delta_mean`` and ``lld/rate`` once the update(s) of a generation batch are done.

    For the correct responses (reward > threshold) of each generation batch, Δ = ln π_new(y+|x) -
    ln π_old(y+|x) (sums of token log-probs, old from the old-policy pass, new from one no-grad pass
    after the optimizer step that finished the batch); ``lld/rate`` is the share with Δ <= ``eps``
    (the paper's LLD). Responses without a token in TRL's loss mask
    (``mask_truncated_completions``) have no ln π to compare and are left out. Added automatically
    by ``NTHRGRPOTrainer(track_lld=True)``; pass your own instance to change ``eps``. When gradient
    accumulation does not end with the batch, "after" also includes part of the next batch.
    """

    def __init__(self, eps: float = 0.0):
        self.eps = float(eps)
        self.trainer: NTHRGRPOTrainer | None = None

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer is None:
            return control
        done = [b for b in trainer._lld_pending if trainer._step >= b.end_step]
        trainer._lld_pending = [b for b in trainer._lld_pending if trainer._step < b.end_step]
        for batch in done:
            self._measure(trainer, batch)
        return control

    @torch.no_grad()
    def _measure(self, trainer: NTHRGRPOTrainer, batch: _LLDBatch) -> None:
        acc = trainer.accelerator
        rows = batch.correct.nonzero().squeeze(-1)  # (n,) local correct rows
        error = None
        if bool(batch.old_seq[rows].isnan().any()):
            error = RuntimeError(
                "LLDCallback: old log-probs of a generation batch were never recorded"
            )
        _raise_on_any_process(acc, error)  # before the gather and the forward (ZeRO-3 collectives)
        # Every process runs the same number of forward calls (ZeRO-3 gathers parameters per call).
        n_max = int(acc.gather(torch.tensor([rows.numel()], device=acc.device)).max())
        if n_max == 0:
            return
        pad = rows.new_zeros(n_max - rows.numel())  # filler rows, ignored
        idx = torch.cat([rows, pad])
        T = batch.completion_mask.shape[1]
        ckpt_kwargs = trainer.args.gradient_checkpointing_kwargs
        with disable_gradient_checkpointing(trainer.model, ckpt_kwargs):
            logps, _, _ = trainer._get_per_token_logps_and_entropies(
                trainer.model,
                batch.input_ids[idx],
                batch.attention_mask[idx],
                T,
                batch_size=trainer.args.per_device_train_batch_size,
            )
        mask = batch.completion_mask[idx].to(logps.dtype)
        new_seq = (logps * mask).sum(-1)[: rows.numel()]  # (n,)
        delta = new_seq.float() - batch.old_seq[rows]
        n = rows.numel()
        lazy = lld_rate(delta, self.eps) * n if n else 0.0  # lld.lld_rate: the share with Δ <= eps
        stats = torch.tensor([float(delta.sum()), float(n), lazy], device=delta.device)
        total, count, lazy = acc.reduce(stats, reduction="sum").tolist()
        trainer._metrics["train"]["lld/delta_mean"].append(total / count)
        trainer._metrics["train"]["lld/rate"].append(lazy / count)
        trainer._metrics["train"]["lld/n_correct"].append(count)


class NTHRGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer with NTHR's per-token advantages (``nthr=NTHRConfig(...)``), LLD metrics.

    Extra keyword arguments: ``nthr`` (None: plain GRPO), ``track_lld`` (add an ``LLDCallback``),
    ``lld_eps``, ``correct_threshold`` (a response is correct when its reward exceeds it),
    ``correct_reward`` (name or index of the reward function that decides correctness; None: TRL's
    weighted sum), ``score_dtype`` and ``chunk_size`` (passed to ``apply_to_group``),
    ``scores_from_logps`` (True: hand the pass's token log-probs to the scorer, whose "generated"
    vocabulary then multiplies only the |V*| rows of the LM head, lse_t = z_t[y_t] - logp_t; False:
    full-vocabulary log-sum-exp; None: True unless ``low_precision_logits``, since bf16/fp16
    log-probs carry the low-precision logits' rounding), ``record_nthr`` (keep the last batch's
    local tensors in ``self.nthr_record`` on CPU, for tests), ``rule`` (the name of an update rule
    of ``nthr_book.rules``: its advantages and extra loss term; see the module docstring).
    """

    def __init__(
        self,
        *args: Any,
        nthr: NTHRConfig | None = None,
        track_lld: bool = True,
        lld_eps: float = 0.0,
        correct_threshold: float = 0.5,
        correct_reward: str | int | None = None,
        score_dtype: torch.dtype = torch.float32,
        chunk_size: int | None = None,
        scores_from_logps: bool | None = None,
        record_nthr: bool = False,
        rule: str | None = None,
        **kwargs: Any,
    ):
        if nthr is not None and not isinstance(nthr, NTHRConfig):
            raise TypeError(f"nthr must be an NTHRConfig or None, got {type(nthr).__name__}")
        is_correct(0.0, correct_threshold)  # validates the threshold (NaN refused)
        the_rule = None if rule is None else _trl_rule(rule, nthr)
        super().__init__(*args, **kwargs)
        self.rule = the_rule
        if the_rule is not None:
            _check_trl_knobs(the_rule, self.args)
        self.nthr = nthr
        self.correct_threshold = float(correct_threshold)
        self.score_dtype, self.chunk_size = score_dtype, chunk_size
        self.record_nthr = bool(record_nthr)
        if scores_from_logps is None:
            low = low_precision_logits(self.accelerator, self.args, self._unwrapped())
            scores_from_logps = not low
        self.scores_from_logps = bool(scores_from_logps)
        self.nthr_record: dict[str, Tensor] | None = None
        self._correct_col = self._resolve_correct_reward(correct_reward)
        self._capture: _Capture | None = None
        self._rewards_per_func: Tensor | None = None
        self._lld_pending: list[_LLDBatch] = []
        self._batch_counter = 0
        if nthr is not None:
            self._check_plain_lm_head()
        callbacks = [cb for cb in self.callback_handler.callbacks if isinstance(cb, LLDCallback)]
        if track_lld and not callbacks:
            callbacks = [LLDCallback(eps=lld_eps)]
            self.add_callback(callbacks[0])
        for cb in callbacks:
            cb.trainer = self
        self._track_lld = bool(callbacks)

    # ---- set-up checks -------------------------------------------------------------------------
    def _resolve_correct_reward(self, correct_reward: str | int | None) -> int | None:
        if correct_reward is None:
            return None
        names = list(self.reward_func_names)
        if isinstance(correct_reward, str):
            if correct_reward not in names:
                raise ValueError(
                    f"correct_reward={correct_reward!r}: not a reward function name, "
                    f"expected one of {names}"
                )
            return names.index(correct_reward)
        if not 0 <= int(correct_reward) < len(names):
            raise ValueError(
                f"correct_reward={correct_reward}: index out of range for "
                f"{len(names)} reward functions"
            )
        return int(correct_reward)

    def _unwrapped(self):
        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model() if is_peft_model(model) else model

    def _softcap(self) -> float | None:
        """The model's final logit soft-cap c (Gemma), which NTHR's logits apply too; None if
        unset."""
        return lm_head(self._unwrapped()).softcap

    def _generate_single_turn(self, *args: Any, **kwargs: Any):
        """TRL's generation with the model's own generation_config set aside (docs/method.md §1).

        TRL passes its settings (temperature, top_p, top_k, min_p, repetition_penalty) in a
        GenerationConfig; transformers fills every field left None there from the model's own
        ``generation_config`` (a hub model's ``typical_p``, ``no_repeat_ngram_size``, ...), which
        would make the samples differ from what the log-probs assume. During the call the model
        carries ``rollout.generation_config``'s neutral settings instead.
        """
        model = self._unwrapped()
        own = model.generation_config
        model.generation_config = generation_config(
            max_new_tokens=self.max_completion_length,
            temperature=float(self.temperature or 1.0),
            eos_token_id=own.eos_token_id,
            pad_token_id=own.pad_token_id,
            bos_token_id=own.bos_token_id,
        )
        try:
            return super()._generate_single_turn(*args, **kwargs)
        finally:
            model.generation_config = own

    def _check_plain_lm_head(self) -> None:
        cfg = self._unwrapped().config.get_text_config()
        for name in ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
            value = getattr(cfg, name, None)
            if value is not None and value != 1.0:
                raise ValueError(
                    f"NTHRGRPOTrainer: the model config sets {name}={value}; NTHR "
                    "scores read the plain LM head (hidden @ W.T + b) / temperature "
                    "and would not match TRL's log-probs"
                )

    # ---- interception of TRL's passes ----------------------------------------------------------
    def _is_policy(self, model) -> bool:
        unwrap = self.accelerator.unwrap_model
        same = model is self.model or model is self.model_wrapped
        return same or unwrap(model) is unwrap(self.model)

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
    ):
        cap = self._capture
        if cap is None or not self._is_policy(model):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        self._capture = None  # exactly one pass: the next call (PEFT's reference pass) is TRL's
        handle = None
        if cap.want_hidden:

            def hook(module, hook_args, output):
                h = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
                # TRL's fused head scores last_hidden_state[:, :-1] against labels[:, 1:] and
                # keeps the last logits_to_keep positions: states L-1-T .. L-2 predict the T
                # completion tokens.
                cap.chunks.append(h[:, -logits_to_keep - 1 : -1].detach())

            handle = self._unwrapped().base_model.register_forward_hook(hook)
        try:
            out = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        finally:
            if handle is not None:
                handle.remove()
        cap.logps = out[0].detach()
        if cap.keep_graph:
            cap.logps_graph = out[0]
        if cap.want_hidden:
            if not cap.chunks:
                raise RuntimeError(
                    "NTHRGRPOTrainer: the backbone forward hook did not fire during the policy pass"
                )
            cap.hidden = torch.cat(cap.chunks)  # (B, T, d)
            cap.chunks = []
        if cap.on_done is not None:
            cap.on_done(cap)
        return out

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(
            inputs, prompts, completions, completion_ids_list
        )
        self._rewards_per_func = rewards_per_func  # (B_global, n_funcs), gathered by TRL
        return rewards_per_func

    def _global_rewards(self) -> Tensor:
        """(B_global,) reward that decides correctness, from the last ``_calculate_rewards``."""
        rpf = self._rewards_per_func
        if self._correct_col is not None:
            return torch.nan_to_num(rpf[:, self._correct_col], nan=0.0)
        return (rpf * self.reward_weights.to(rpf.device).unsqueeze(0)).nansum(dim=1)

    # ---- generation batch ----------------------------------------------------------------------
    def _active(self) -> bool:
        return self.nthr is not None or self._track_lld or self.rule is not None

    def _generate_and_score_completions(self, inputs):
        if not (self.model.training and self._active()):
            return super()._generate_and_score_completions(inputs)
        old_pass = trl_runs_old_pass(
            self.args, self.use_vllm, self.vllm_importance_sampling_correction
        )
        cap = _Capture(want_hidden=self.nthr is not None) if old_pass else None
        self._capture = cap
        try:
            out = super()._generate_and_score_completions(inputs)
        finally:
            self._capture = None
        # Decided by the config alone, so every process raises here or none does.
        if old_pass != ("old_per_token_logps" in out) or (cap is not None and cap.logps is None):
            raise RuntimeError(
                "NTHRGRPOTrainer: TRL's old-policy pass is not where trl==1.16.0 "
                "has it; this integration is tested with trl==1.16.0"
            )
        device = out["prompt_ids"].device
        b = out["prompt_ids"].shape[0]
        rows = self.accelerator.process_index * b + torch.arange(b, device=device)  # global row ids
        rewards = self._global_rewards().to(device)[rows]  # (b,)
        if self.rule is not None:  # the rule's advantage hook
            out["advantages"] = self._rule_advantages(out["advantages"], rows)
        self._batch_counter += 1
        out[_ROW], out[_REWARD], out[_SEQ_ADV] = rows, rewards, out["advantages"]
        out[_BATCH] = torch.tensor(self._batch_counter, device=device)
        out[_FUSED] = torch.tensor(False, device=device)
        if cap is None and self.nthr is not None:  # hidden_states_source says which
            if self.args.steps_per_generation == 1:
                out[_FUSED] = torch.tensor(True, device=device)  # NTHR on the compute_loss forward
            else:
                cap = self._extra_old_pass(out)
        self._start_lld_batch(out, None if cap is None else cap.logps)
        if cap is not None and self.nthr is not None:
            out["advantages"] = self._nthr_advantages(out, cap.hidden, cap.logps)
        return out

    @torch.no_grad()
    def _extra_old_pass(self, out: dict) -> _Capture:
        """One no-grad policy pass over the local generation batch, for its hidden states."""
        if "pixel_values" in out:  # the same on every process (a multimodal model's batches)
            raise NotImplementedError(
                "NTHRGRPOTrainer: multimodal batches need TRL's "
                "old-policy pass; set steps_per_generation=1 or "
                "gradient_accumulation_steps so that TRL runs it"
            )
        cap = self._capture = _Capture(want_hidden=True)
        input_ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
        attention_mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
        try:
            with disable_gradient_checkpointing(
                self.model, self.args.gradient_checkpointing_kwargs
            ):
                self._get_per_token_logps_and_entropies(
                    self.model,
                    input_ids,
                    attention_mask,
                    out["completion_ids"].shape[1],
                    batch_size=self.args.per_device_train_batch_size,
                )
        finally:
            self._capture = None
        return cap

    @torch.no_grad()
    def _rule_advantages(self, advantages: Tensor, rows: Tensor) -> Tensor:
        """(b,) the rule's per-response advantages of the local rows (``Rule.sequence_advantages``):
        from the rewards of the whole generation batch (num_groups, G) when the rule has its own,
        else from TRL's advantages (elementwise)."""
        rule, G = self.rule, self.num_generations
        if rule.from_rewards is not None:
            rewards = self._global_rewards().to(advantages.device).view(-1, G)  # (B/G, G)
            return rule.sequence_advantages(rewards).reshape(-1)[rows].to(advantages.dtype)
        rewards = self._global_rewards().to(advantages.device)[rows]  # (b,)
        return rule.sequence_advantages(rewards[None], group_advantages=advantages[None])[0]

    def _rule_penalty(self, inputs: dict, logps: Tensor) -> Tensor:
        """The rule's extra loss term on this micro-batch: its mean over the loss-mask tokens,
        divided by the gradient accumulation steps (as TRL's entropy bonus); logs rule/penalty."""
        mask = self._loss_mask(inputs).to(torch.float32)  # (B, T)
        old = inputs.get("old_per_token_logps")
        old = logps.detach() if old is None else old  # TRL's rule: no old pass, the policy is old
        advantages = inputs["advantages"]  # (B,) or (B, T)
        penalty = self.rule.loss_penalty(logps.float(), old.float(), advantages, mask)  # (B, T)
        total, count = (penalty * mask).sum(), mask.sum()
        term = total / count.clamp(min=1.0) / self.current_gradient_accumulation_steps
        sums = self.accelerator.reduce(torch.stack([total.detach(), count]), reduction="sum")
        self._metrics["train"]["rule/penalty"].append(float(sums[0] / sums[1].clamp(min=1.0)))
        return term

    def _loss_mask(self, batch: dict) -> Tensor:
        """(b, T) TRL's loss mask: completion_mask (zero rows when truncated completions are masked)
        times tool_mask."""
        mask = batch["completion_mask"]
        return mask if "tool_mask" not in batch else mask * batch["tool_mask"]

    def _start_lld_batch(self, out: dict, old_logps: Tensor | None) -> None:
        if not self._track_lld:
            return
        mask = self._loss_mask(out)
        old_seq = torch.full((mask.shape[0],), math.nan, device=mask.device)
        if old_logps is not None:
            old_seq = (old_logps.float() * mask).sum(-1)
        # A response TRL masks out whole has ln π = 0 before and after: no displacement to measure.
        correct = is_correct(out[_REWARD], self.correct_threshold) & mask.bool().any(-1)  # (b,)
        generate_every = self.args.steps_per_generation * self.num_iterations
        self._lld_pending.append(
            _LLDBatch(
                batch_id=self._batch_counter,
                end_step=self._step + generate_every,
                input_ids=torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1),
                attention_mask=torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1),
                completion_mask=mask,
                correct=correct,
                old_seq=old_seq,
            )
        )

    # ---- the loss --------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        cap = None
        if self.model.training and _BATCH in inputs:
            fused = bool(inputs[_FUSED])
            lld = next((b for b in self._lld_pending if b.batch_id == int(inputs[_BATCH])), None)
            lld_missing = lld is not None and bool(lld.old_seq.isnan().any())
            penalty = self.rule is not None and self.rule.penalty is not None
            if fused or lld_missing or penalty:
                # Read the training forward, then let TRL compute its loss. When TRL skipped the
                # old pass the policy has not moved since generation, so this forward is the old
                # policy's pass (NTHR, LLD); a rule's penalty reads its log-probs with their graph.
                def on_done(cap: _Capture) -> None:
                    if lld_missing:
                        offset = self.accelerator.process_index * lld.old_seq.numel()
                        seq = (cap.logps.float() * self._loss_mask(inputs)).sum(-1)
                        lld.old_seq[inputs[_ROW] - offset] = seq
                    if fused:
                        with torch.no_grad():
                            inputs["advantages"] = self._nthr_advantages(
                                inputs, cap.hidden, cap.logps
                            )
                        inputs[_FUSED] = torch.tensor(False, device=inputs[_FUSED].device)

                cap = self._capture = _Capture(
                    want_hidden=fused, on_done=on_done, keep_graph=penalty
                )
        try:
            loss = super()._compute_loss(model, inputs)
            if cap is not None and cap.logps_graph is not None:
                loss = loss + self._rule_penalty(inputs, cap.logps_graph)
            return loss
        finally:
            self._capture = None

    # ---- NTHR on a generation batch --------------------------------------------------------------
    def _local_error(
        self, rows: Tensor, seq_adv: Tensor, hidden: Tensor, logps: Tensor, T: int, gathered: bool
    ) -> Exception | None:
        """What is wrong with this process's part of the batch (None: nothing), collective-free."""
        b = rows.numel()
        if (
            tuple(seq_adv.shape) != (b,)
            or hidden.dim() != 3
            or tuple(hidden.shape[:2]) != (b, T)
            or tuple(logps.shape) != (b, T)
        ):
            return ValueError(
                f"NTHR expects (b,) sequence advantages, (b, T, d) hidden states and "
                f"(b, T) log-probs with (b, T) = {(b, T)}, got {tuple(seq_adv.shape)}"
                f", {tuple(hidden.shape)} and {tuple(logps.shape)}"
            )
        base, G = int(rows.min()), self.num_generations
        if not gathered and (
            base % G
            or not torch.equal(rows.sort().values - base, torch.arange(b, device=rows.device))
        ):
            return RuntimeError(f"NTHR: local rows {rows.tolist()} do not hold whole groups of {G}")
        return None

    @torch.no_grad()
    def _nthr_advantages(self, batch: dict, hidden: Tensor, logps: Tensor) -> Tensor:
        """(b, T) advantages: eta·A on selected tokens of responses with A < 0, A elsewhere."""
        acc, G = self.accelerator, self.num_generations
        rows, rewards, seq_adv = batch[_ROW], batch[_REWARD], batch[_SEQ_ADV]  # (b,) each
        ids, mask = batch["completion_ids"], self._loss_mask(batch).long()  # (b, T)
        b, T = ids.shape
        gathered = acc.num_processes > 1 and b % G != 0  # groups straddle processes
        _raise_on_any_process(acc, self._local_error(rows, seq_adv, hidden, logps, T, gathered))
        if gathered:
            # The whole generation batch on every process, in row order (widths padded).
            pad_id = self._tokenizer.pad_token_id or 0
            all_rows = acc.gather(rows)
            order = all_rows.argsort()
            group = {
                "hidden": acc.gather(acc.pad_across_processes(hidden, dim=1))[order],
                "ids": acc.gather(acc.pad_across_processes(ids, dim=1, pad_index=pad_id))[order],
                "mask": acc.gather(acc.pad_across_processes(mask, dim=1))[order],
                "logps": acc.gather(acc.pad_across_processes(logps.float(), dim=1))[order],
                "rewards": acc.gather(rewards)[order],
                "adv": acc.gather(seq_adv)[order],
            }
            base = 0
        else:
            order = rows.argsort()
            group = {
                "hidden": hidden[order],
                "ids": ids[order],
                "mask": mask[order],
                "logps": logps.float()[order],
                "rewards": rewards[order],
                "adv": seq_adv[order],
            }
            base = int(rows.min())
        try:
            if gathered and not torch.equal(
                all_rows[order], torch.arange(all_rows.numel(), device=rows.device)
            ):
                raise RuntimeError(
                    "NTHR: the gathered rows are not the whole generation batch 0..N-1"
                )
            selected, token_adv, sums, scored = self._select(rows, base, group, T)
            error = None
        except Exception as err:  # raised on every process below, before the metrics' all-reduce
            error = err
        _raise_on_any_process(acc, error)
        self._log_nthr(sums)
        if self.record_nthr:
            self.nthr_record = {
                "rows": rows.cpu(),
                "prompt_ids": batch["prompt_ids"].cpu(),
                "prompt_mask": batch["prompt_mask"].cpu(),
                "completion_ids": ids.cpu(),
                "completion_mask": mask.cpu(),
                "rewards": rewards.cpu(),
                "seq_advantages": seq_adv.cpu(),
                "advantages": token_adv.cpu(),
                "selected": selected.cpu(),
                "hidden": hidden.float().cpu(),
                "groups_scored": torch.tensor(scored, dtype=torch.long),
            }
        return token_adv

    def _select(
        self, rows: Tensor, base: int, group: dict, T: int
    ) -> tuple[Tensor, Tensor, Tensor, list[int]]:
        """NTHR on the groups that touch the local rows (``group`` holds rows base, base+1, ...).

        Returns the (b, T) selected local tokens, the (b, T) advantages of the local rows (TRL's
        broadcast, eta·A on selected tokens), the metric sums and the groups scored.
        """
        G, cfg, b = self.num_generations, self.nthr, rows.numel()
        head = lm_head(self._unwrapped()).module
        local = rows.tolist()
        # scores in score_dtype, whatever autocast the trainer runs under
        no_autocast = torch.autocast(device_type=rows.device.type, enabled=False)
        results = {}  # group index -> nthr.GroupNTHR
        # n_sel, n_neg, tau_sum, eta_sum, score_sum, n_mixed
        sums = torch.zeros(6, dtype=torch.float64)
        with no_autocast, maybe_gather_lm_head_ctx(head.weight, head.bias):
            weight, bias = head.weight, head.bias
            if hasattr(weight, "full_tensor"):  # FSDP2 DTensor
                weight = weight.full_tensor()
                bias = None if bias is None else bias.full_tensor()
            for g in sorted({r // G for r in local}):
                sl = slice(g * G - base, (g + 1) * G - base)
                correct = is_correct(group["rewards"][sl], self.correct_threshold)  # (G,)
                if int(correct.sum()) in (0, G):
                    continue  # homogeneous group: untouched
                # (G,) sequence advantages: eta·A only where A < 0 (the rule of apply_to_group)
                res = apply_to_group(
                    group["hidden"][sl],
                    weight.detach(),
                    group["ids"][sl],
                    group["mask"][sl].bool(),
                    correct,
                    group["adv"][sl],
                    cfg,
                    temperature=self.temperature,
                    lm_head_bias=None if bias is None else bias.detach(),
                    logps=group["logps"][sl] if self.scores_from_logps else None,
                    softcap=self._softcap(),
                    dtype=self.score_dtype,
                    chunk_size=self.chunk_size,
                )
                results[g] = res
                if g * G in local:  # count each group once, on the process holding its first row
                    st = res.stats  # incorrect tokens inside TRL's loss mask
                    sums += torch.tensor(
                        [
                            st["n_selected"],
                            st["n_incorrect_tokens"],
                            res.tau,
                            res.eta,
                            st["score_sum"],
                            1.0,
                        ],
                        dtype=torch.float64,
                    )
        selected = torch.zeros(b, T, dtype=torch.bool, device=rows.device)
        seq_adv = group["adv"][[r - base for r in local]]  # (b,) local rows, in local order
        token_adv = seq_adv[:, None].expand(b, T).clone()  # (b, T): TRL's broadcast
        for i, r in enumerate(local):
            if r // G in results:
                res = results[r // G]
                if bool(res.selected[r % G, T:].any()):
                    raise RuntimeError(
                        "NTHR: a token beyond the local completion width was selected"
                    )
                selected[i] = res.selected[r % G, :T]
                token_adv[i] = res.new_advantages[r % G, :T]
        return selected, token_adv, sums, sorted(results)

    def _log_nthr(self, sums: Tensor) -> None:
        acc = self.accelerator
        n_sel, n_neg, tau_sum, eta_sum, score_sum, n_mixed = acc.reduce(
            sums.to(device=acc.device, dtype=torch.float32), reduction="sum"
        ).tolist()
        metrics = self._metrics["train"]
        metrics["nthr/selected_frac"].append(n_sel / n_neg if n_neg else math.nan)
        metrics["nthr/tau_mean"].append(tau_sum / n_mixed if n_mixed else math.nan)
        metrics["nthr/eta_mean"].append(eta_sum / n_mixed if n_mixed else math.nan)
        metrics["nthr/score_mean"].append(score_sum / n_neg if n_neg else math.nan)
        metrics["nthr/mixed_groups"].append(n_mixed)


# ---- update rules of nthr_book.rules in TRL ------------------------------------------------------
def _trl_rule(name: str, nthr: NTHRConfig | None) -> rules.Rule:
    """The registered rule ``name`` for ``NTHRGRPOTrainer(rule=...)``; ValueError for NTHR's rules
    (use ``nthr=``) and for a rule together with ``nthr``."""
    rule = rules.get(name)
    if rule.needs_hidden:
        beta = rule.settings().get("nthr_beta", 1.0)
        raise ValueError(
            f"rule={name!r} is NTHR's token selection: pass nthr=NTHRConfig(beta={beta}) instead"
        )
    if nthr is not None and name != "grpo":
        raise ValueError(f"rule={name!r} and nthr=... together: pass one of them")
    return rule


# A rule's setting -> (the GRPOConfig field that is TRL's knob for it, the values that match; none:
# TRL cannot do it, e.g. the population std).
_TRL_KNOBS: dict[str, Callable[[Any], tuple[str, tuple[Any, ...]]]] = {
    "clip_eps_high": lambda v: ("epsilon_high", (v,)),
    "agg": lambda v: ("loss_type", {"token": ("dapo", "bnpo"), "seq_mean": ("grpo",)}.get(v, (v,))),
    "adv_std": lambda v: ("scale_rewards", {"none": ("none",), "sample": ("group",)}.get(v, ())),
    "entropy_quantile": lambda v: ("top_entropy_quantile", (v,)),
}


def _check_trl_knobs(rule: rules.Rule, args: Any) -> None:
    """ValueError unless ``args`` (a GRPOConfig) already sets TRL's own knob for each of the
    rule's settings and its entropy mask (``_TRL_KNOBS``)."""
    wanted = rule.settings() | (
        {"entropy_quantile": rule.entropy_quantile} if rule.needs_entropy else {}
    )
    for key, value in wanted.items():
        field_name, accepted = _TRL_KNOBS[key](value)
        got = getattr(args, field_name, None)
        if not accepted:
            raise ValueError(f"rule={rule.name!r} sets {key}={value!r}, which TRL cannot do")
        if got not in accepted:
            raise ValueError(
                f"rule={rule.name!r} sets {key}={value!r}, which TRL does itself: pass "
                f"GRPOConfig({field_name}={accepted[0]!r}) (got {got!r})"
            )


# ---- data and reward in TRL's shapes (notebook 07, scripts/train_trl.py) -------------------------
def prompt_dataset(problems: list[dict], tokenizer, template: str):
    """A ``datasets.Dataset`` for TRL: ``prompt`` (``data.build_prompt``) and ``answer`` (nb 07)."""
    from datasets import Dataset

    from nthr_book.data import build_prompt

    prompts = [build_prompt(tokenizer, p["problem"], template) for p in problems]
    return Dataset.from_dict({"prompt": prompts, "answer": [str(p["answer"]) for p in problems]})


def math_answer_reward(completions, answer, *, require_boxed: bool = True, **kwargs) -> list[float]:
    """A TRL reward function: nthr_book's math reward against the dataset's ``answer`` column.

    TRL passes the completions (strings, or message lists for conversational prompts: the last
    message is graded) and the dataset's other columns as keywords.
    """
    from nthr_book.rewards import math_rewards

    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return math_rewards(texts, [str(a) for a in answer], require_boxed=require_boxed)

"""Step time of nthr_book's GRPO trainer against TRL's GRPOTrainer, side by side in one process.

Same policy weights (two copies of one checkpoint), same prompts in the same order, same group size,
token budget, learning rate, clip range and loss aggregation (ours "token" = TRL "dapo"), no KL (or
both with ``--kl``), no gradient checkpointing, and the same fixed reward: the parity of the length
of the completion text, so that reward cost is equal and groups are mixed. Dynamic sampling and LLD
tracking are off on our side unless asked, since TRL does neither. Both generate exactly
``--max-new-tokens`` tokens (``min_new_tokens``; ``--natural-length`` lets them stop at EOS), and
the mean completion length of each is reported. Timings: ``--warmup`` untimed steps, then
``--steps`` timed steps each; the median ratio is ours / TRL. Method of arXiv 2505.18830 (``--method
nthr`` times NTHR in both). Ours runs twice, with each group's prompt computed once
(``TrainConfig.share_prompt``, the default) and without, so the bench prints both ratios, the share
of token positions the shared passes compute, the phase split and each run's peak RSS (Linux: the
peak is reset between runs through ``/proc/self/clear_refs``).

    python bench/grpo_step.py                   # embedded SmolLM2-135M, 4 prompts x 8 x 32 tokens
    python bench/grpo_step.py --micro-batch 8   # the same, one group per forward/backward (less
                                                # memory: TRL 1.16 on CPU runs its LM head on every
                                                # position)
    python bench/grpo_step.py --model tiny-random  # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # run from a checkout without installing

PHASES = ("generation", "old_logps", "reference", "nthr", "update", "lld")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="smollm2-135m (embedded), tiny-random, hub id or path",
    )
    p.add_argument("--prompts", type=int, default=4, help="prompts (groups) per step")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--natural-length", action="store_true", help="let completions stop at EOS")
    p.add_argument(
        "--micro-batch",
        type=int,
        default=None,
        help="sequences per forward/backward on both sides (a multiple of --group-size; default: "
        "the whole step). TRL: per_device_train_batch_size, accumulated over the step",
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument(
        "--kl", type=float, default=0.0, help="KL coefficient for both (0: no reference pass)"
    )
    p.add_argument("--method", default="grpo", choices=("grpo", "nthr"))
    p.add_argument(
        "--lld", action="store_true", help="also time LLD tracking (one extra pass) on both sides"
    )
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides (CUDA only)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--order", default="ours-first", choices=("ours-first", "trl-first"))
    p.add_argument("--json", default=None, help="write all timings to this file")
    return p.parse_args(argv)


def length_parity(completions, *args, **kwargs) -> list[float]:
    """1.0 when the completion text has an odd number of characters (for both trainers)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(len(t) % 2) for t in texts]


def reset_peak_rss() -> None:
    """Start a new peak-RSS window for this process (Linux; a no-op elsewhere)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_gib() -> float:
    """This process's peak resident memory since the last reset, GiB (NaN off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def positions_share(tokenizer, template: str, problems: list[str], args) -> float:
    """Token positions a shared pass computes over those of an unshared one, over the timed steps:
    per step, groups·P + N·T against N·(P + T), P the left-padded prompt width, T the budget."""
    from nthr_book.data import build_prompt

    n, G, T = args.prompts, args.group_size, args.max_new_tokens
    shared = whole = 0
    for step in range(args.warmup, args.warmup + args.steps):
        batch = problems[step * n : (step + 1) * n]
        P = max(len(tokenizer(build_prompt(tokenizer, q, template))["input_ids"]) for q in batch)
        shared, whole = shared + n * P + n * G * T, whole + n * G * (P + T)
    return shared / whole


def run_ours(args, model, tokenizer, device, share: bool = True) -> dict:
    """Time nthr_book.trainer.GRPOTrainer.train_step; returns per-step rows."""
    from nthr_book.trainer import GRPOTrainer, TrainConfig

    cfg = TrainConfig(
        model=args.model,
        task="arithmetic",
        num_problems=max(64, args.prompts * (args.warmup + args.steps)),
        method=args.method,
        steps=args.warmup + args.steps,
        prompts_per_step=args.prompts,
        group_size=args.group_size,
        max_new_tokens=args.max_new_tokens,
        lr=args.lr,
        kl_coef=args.kl,
        dynamic_sampling=False,
        track_lld=args.lld,
        bf16=args.bf16,
        gradient_checkpointing=False,
        micro_batch_groups=None
        if args.micro_batch is None
        else args.micro_batch // args.group_size,
        min_new_tokens=0 if args.natural_length else args.max_new_tokens,
        share_prompt=share,
        output_dir=tempfile.mkdtemp(prefix="bench_ours_"),
    )
    trainer = GRPOTrainer(
        cfg,
        reward_fn=lambda texts, answers: length_parity(texts),
        model=model,
        tokenizer=tokenizer,
        device=device,
    )
    rows = []
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        row = trainer.train_step(step)
        row["wall"] = time.perf_counter() - t0
        rows.append(row)
        split = ", ".join(f"{k} {row['time_' + k]:.2f}" for k in PHASES if row.get("time_" + k))
        print(
            f"  ours{'' if share else ' (unshared)'} step {step}"
            f"{' (warm-up)' if step < args.warmup else ''}: "
            f"{row['wall']:.2f} s, completion length {row['completion_length']:.1f}, {split}",
            flush=True,
        )
    return {
        "rows": rows,
        "prompts": [p["problem"] for p in trainer.problems],
        "template": trainer.template,
    }


def run_trl(args, model, tokenizer, device, problems: list[str], template: str) -> dict:
    """Time TRL's GRPOTrainer (or NTHRGRPOTrainer for --method nthr / --lld) steps on the same
    prompts."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from nthr_book.data import build_prompt

    n_steps = args.warmup + args.steps
    prompts = [build_prompt(tokenizer, p, template) for p in problems][: args.prompts * n_steps]
    generation_kwargs = None if args.natural_length else {"min_new_tokens": args.max_new_tokens}
    cuda = device == "cuda"
    total = args.prompts * args.group_size
    micro = args.micro_batch or total
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_trl_"),
        max_steps=n_steps,
        num_generations=args.group_size,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=total // micro,
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        learning_rate=args.lr,
        adam_beta2=0.99,
        beta=args.kl,
        epsilon=0.2,
        loss_type="dapo",
        scale_rewards="group",
        max_grad_norm=1.0,
        gradient_checkpointing=False,
        bf16=args.bf16 and cuda,
        use_cpu=not cuda,
        shuffle_dataset=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        generation_kwargs=generation_kwargs,
        lr_scheduler_type="constant",
        disable_dropout=True,
        seed=0,
    )
    kwargs = dict(
        model=model,
        reward_funcs=length_parity,
        args=config,
        processing_class=tokenizer,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
    )
    if args.method == "nthr" or args.lld:
        from nthr_book.integrations.trl import NTHRConfig, NTHRGRPOTrainer

        trainer = NTHRGRPOTrainer(
            **kwargs, nthr=NTHRConfig() if args.method == "nthr" else None, track_lld=args.lld
        )
    else:
        trainer = GRPOTrainer(**kwargs)

    phases: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0

        return wrapper

    trainer._generate = timed("generation", trainer._generate)
    trainer._generate_and_score_completions = timed(
        "generate_and_score", trainer._generate_and_score_completions
    )
    trainer.compute_loss = timed("loss_forward", trainer.compute_loss)
    rows = []

    class Timer(TrainerCallback):
        """Wall time of each optimizer step (generation included: it runs inside training_step)."""

        def on_step_begin(self, targs, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            phases.clear()
            self.t0 = time.perf_counter()

        def on_step_end(self, targs, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - self.t0
            split = dict(phases)
            split["score_other"] = split.pop("generate_and_score", 0.0) - split.get(
                "generation", 0.0
            )
            split["backward_optimizer_other"] = (
                wall - split["generation"] - split["score_other"] - split.get("loss_forward", 0.0)
            )
            rows.append({"wall": wall, **split})

    trainer.add_callback(Timer())
    trainer.train()
    logged = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    for step, row in enumerate(rows):
        row["completion_length"] = (
            logged[step]["completions/mean_length"] if step < len(logged) else float("nan")
        )
        print(
            f"  TRL  step {step}{' (warm-up)' if step < args.warmup else ''}: {row['wall']:.2f} s, "
            f"completion length {row['completion_length']:.1f}, "
            + ", ".join(
                f"{k} {v:.2f}" for k, v in row.items() if k not in ("wall", "completion_length")
            ),
            flush=True,
        )
    return {"rows": rows}


def main(argv: list[str] | None = None) -> int:
    """Run both trainers and print the comparison."""
    args = parse_args(argv)
    if args.micro_batch is not None and (
        args.micro_batch % args.group_size or (args.prompts * args.group_size) % args.micro_batch
    ):
        raise SystemExit(
            f"--micro-batch {args.micro_batch} must be a multiple of --group-size "
            f"{args.group_size} "
            f"and divide {args.prompts * args.group_size}"
        )
    import torch

    from nthr_book.config import default_device
    from nthr_book.env import versions
    from nthr_book.models import load_policy

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or default_device()
    print(
        f"model {args.model}, device {device}, {args.prompts} prompts x {args.group_size} "
        "completions x "
        f"{args.max_new_tokens} new tokens "
        f"({'natural length' if args.natural_length else 'exact length'}), "
        f"micro-batch {args.micro_batch or args.prompts * args.group_size}, "
        f"lr {args.lr}, kl {args.kl}, method {args.method}, lld {args.lld}, torch threads "
        f"{torch.get_num_threads()}",
        flush=True,
    )
    ours_model, tokenizer = load_policy(args.model, device=device)
    trl_model, _ = load_policy(args.model, device="cpu")  # TRL's Trainer moves it to its device
    problems_and_template: dict = {}

    def ours(share: bool):
        result = run_ours(args, ours_model, tokenizer, device, share=share)
        problems_and_template.update(prompts=result["prompts"], template=result["template"])
        return result

    order = (
        ["ours", "unshared", "trl"] if args.order == "ours-first" else ["trl", "ours", "unshared"]
    )
    results, peak = {}, {}
    for name in order:
        print(f"{name}:", flush=True)
        reset_peak_rss()
        if name in ("ours", "unshared"):
            results[name] = ours(share=name == "ours")
        else:
            if (
                not problems_and_template
            ):  # TRL first: take the prompt order from an ours-config trainer
                from nthr_book.trainer import TrainConfig, task_defaults, training_problems

                cfg = TrainConfig(
                    model=args.model,
                    num_problems=max(64, args.prompts * (args.warmup + args.steps)),
                )
                problems_and_template.update(
                    prompts=[p["problem"] for p in training_problems(cfg)],
                    template=task_defaults(cfg)[0],
                )
            results["trl"] = run_trl(
                args,
                trl_model,
                tokenizer,
                device,
                problems_and_template["prompts"],
                problems_and_template["template"],
            )

        peak[name] = peak_rss_gib()

    timed = {k: [r["wall"] for r in v["rows"][args.warmup :]] for k, v in results.items()}
    med = {k: statistics.median(v) for k, v in timed.items()}
    length = {
        k: statistics.mean(r["completion_length"] for r in v["rows"]) for k, v in results.items()
    }
    ours_split, unshared_split = (
        {
            p: statistics.median(r.get("time_" + p, 0.0) for r in results[k]["rows"][args.warmup :])
            for p in PHASES
        }
        for k in ("ours", "unshared")
    )
    trl_keys = [k for k in results["trl"]["rows"][-1] if k not in ("wall", "completion_length")]
    trl_split = {
        k: statistics.median(r.get(k, 0.0) for r in results["trl"]["rows"][args.warmup :])
        for k in trl_keys
    }
    print(
        f"timed steps: ours {[round(t, 2) for t in timed['ours']]}, TRL "
        f"{[round(t, 2) for t in timed['trl']]}"
    )
    print("ours per phase (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in ours_split.items()))
    print(
        "ours unshared per phase (median s): "
        + ", ".join(f"{k} {v:.2f}" for k, v in unshared_split.items())
    )
    print("TRL per phase (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in trl_split.items()))
    print(f"mean completion length: ours {length['ours']:.1f}, TRL {length['trl']:.1f} tokens")
    ratio = med["ours"] / med["trl"]
    share = positions_share(
        tokenizer, problems_and_template["template"], problems_and_template["prompts"], args
    )
    print(
        "peak RSS (GiB, this process, each run's own window): "
        + ", ".join(f"{k} {v:.2f}" for k, v in peak.items())
    )
    print(f"token positions computed with the shared prompt: {share:.0%} of unshared")
    print(
        f"median step: nthr_book {med['ours']:.2f} s (unshared {med['unshared']:.2f} s), TRL "
        f"{med['trl']:.2f} s; ratio {ratio:.2f} (unshared {med['unshared'] / med['trl']:.2f}), "
        f"sharing speed-up {med['unshared'] / med['ours']:.2f}x"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "args": vars(args),
                    "device": device,
                    "versions": versions(),
                    "median": med,
                    "ratio": ratio,
                    "ratio_unshared": med["unshared"] / med["trl"],
                    "positions_share": share,
                    "peak_rss_gib": peak,
                    "completion_length": length,
                    "ours_split": ours_split,
                    "unshared_split": unshared_split,
                    "trl_split": trl_split,
                    "ours_rows": results["ours"]["rows"],
                    "trl_rows": results["trl"]["rows"],
                },
                indent=1,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""GRPO vs GRPO+NTHR step profile on one GPU, in the layout of the paper's Table 3 (issue: notebooks
05/06).

A random-init model with Qwen2.5-0.5B-Instruct's architecture (vocabulary 151,936; no download) runs
a few full trainer steps (``nthr_book.trainer.GRPOTrainer.train_step``: generation, old log-probs,
reference, NTHR, update, LLD tracking) at the paper's shapes: 32 prompts x 8 completions, mini-batch
16 prompts (so an old-policy pass is needed, as in the paper), KL 1e-4, bf16 autocast, gradient
checkpointing. Random weights never emit EOS, so every completion is exactly ``--max-new-tokens``
long (the worst case); rewards are a seeded coin flip per completion so that groups are mixed and
NTHR has work to do.

    python bench/gpu_step.py             # 32 x 8 x 1024 new tokens, 1 warm-up + 2 steps per method
    python bench/gpu_step.py --max-new-tokens 2500 --steps 1   # the paper's budget

With gradient checkpointing (the paper's setting) every row runs whole; ``--no-checkpointing
--methods grpo,grpo/unshared`` measures the shared prompt (``TrainConfig.share_prompt``) against
whole rows, and its peak memory.

Needs only torch and transformers (the GPU machine has neither datasets nor math-verify).
"""

from __future__ import annotations

import argparse
import statistics
import types

import torch

from nthr_book.models import random_init_model, tiny_random_model
from nthr_book.rollout import Rollouts, completion_mask_from_eos, generate, generation_config
from nthr_book.trainer import GRPOTrainer, TrainConfig

DEVICE = "cuda"
PHASES = ("generation", "old_logps", "reference", "nthr", "update", "lld")


class SyntheticTrainer(GRPOTrainer):
    """The real trainer with synthetic prompts (random ids) and coin-flip rewards."""

    prompt_len = 256

    @torch.no_grad()
    def sample(self, step: int):
        cfg, dev = self.cfg, self.device
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed * 1000 + step)
        prompts = torch.randint(
            0, self.model.config.vocab_size, (cfg.prompts_per_step, self.prompt_len), generator=gen
        )
        prompt_ids = prompts.repeat_interleave(cfg.group_size, 0).to(dev)  # (N, P)
        prompt_mask = torch.ones_like(prompt_ids)
        self.model.eval()
        # The trainer's sampling (softmax(logits / T), top_p as configured); no EOS id, so every
        # completion runs to max_new_tokens.
        sampling = generation_config(
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            eos_token_id=None,
            pad_token_id=0,
        )
        chunks = []
        bs = cfg.generation_batch_size or prompt_ids.shape[0]
        for i in range(0, prompt_ids.shape[0], bs):
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                out = generate(
                    self.model,
                    sampling,
                    input_ids=prompt_ids[i : i + bs],
                    attention_mask=prompt_mask[i : i + bs],
                )
            chunks.append(out[:, self.prompt_len :])
        completion_ids = torch.cat(chunks)
        mask, truncated = completion_mask_from_eos(completion_ids, [-1])  # no EOS: all tokens valid
        n = completion_ids.shape[0]
        ro = Rollouts(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=completion_ids,
            completion_mask=mask,
            texts=[""] * n,
            truncated=truncated,
            group_size=cfg.group_size,
            prompts=[""] * cfg.prompts_per_step,
        )
        rewards = (
            (torch.rand(n, generator=gen) < 0.5).float().view(cfg.prompts_per_step, cfg.group_size)
        )
        return ro, rewards.to(dev), []


def run(label: str, args) -> list[dict]:
    method, _, variant = label.partition("/")  # "nthr" or "nthr/unshared"
    cfg = TrainConfig.paper_qwen_0_5b(
        model="qwen2.5-0.5b-random",
        method=method,
        max_new_tokens=args.max_new_tokens,
        prompts_per_step=args.prompts,
        mini_batch_prompts=args.prompts // 2,
        micro_batch_groups=args.micro_groups,
        generation_batch_size=args.gen_batch,
        lr=5e-7,
        steps=1000,
        output_dir="/tmp/gpu_step",
        task="arithmetic",
        num_problems=64,
        bf16=not args.smoke,
        gradient_checkpointing=not (args.smoke or args.no_checkpointing),
        share_prompt=variant != "unshared",
    )
    if args.smoke:  # a CPU check of the code path with a tiny model
        model = tiny_random_model()
    else:
        model = random_init_model("qwen2.5-0.5b", dtype=torch.float32, device="cuda")
    trainer = SyntheticTrainer(
        cfg,
        model=model,
        tokenizer=types.SimpleNamespace(pad_token_id=0),
        device=DEVICE,
        reward_fn=lambda completions, answers: [0.0] * len(completions),
    )
    rows = []
    for step in range(args.warmup + args.steps):
        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        row = trainer.train_step(step)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        row["peak_gib"] = (
            torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")
        )
        tag = "warm-up" if step < args.warmup else "timed"
        print(
            f"{label:5s} step {step} ({tag}): "
            + ", ".join(f"{p} {row[f'time_{p}']:.1f}s" for p in PHASES)
            + f", total {row['time_step']:.1f}s, peak {row['peak_gib']:.1f} GiB, "
            f"selected {row.get('nthr/selected_frac', float('nan')):.3f}",
            flush=True,
        )
        if step >= args.warmup:
            rows.append(row)
    del trainer, model
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument(
        "--micro-groups", type=int, default=4, help="groups per forward/backward micro-batch"
    )
    parser.add_argument("--gen-batch", type=int, default=256, help="sequences per generate call")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument(
        "--methods",
        default="grpo,nthr",
        help="trainer methods; 'nthr/unshared' runs one without the shared prompt",
    )
    parser.add_argument(
        "--no-checkpointing",
        action="store_true",
        help="no gradient checkpointing: the shared prompt needs it off (transformers drops the "
        "key/value cache under checkpointing), at the cost of activation memory",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model on the CPU: check the code path only"
    )
    args = parser.parse_args()
    global DEVICE
    DEVICE = "cpu" if args.smoke else "cuda"
    if args.smoke:
        args.prompts, args.max_new_tokens, args.micro_groups, args.gen_batch = 2, 8, 1, 16
    elif not torch.cuda.is_available():
        raise SystemExit(
            "bench/gpu_step.py needs a CUDA GPU (or --smoke for a CPU check of the code path)"
        )
    name = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "CPU smoke run"
    print(
        f"{name}, torch {torch.__version__}; {args.prompts} prompts x 8 x "
        f"{args.max_new_tokens} new tokens (256-token prompts), mini-batch {args.prompts // 2} "
        "prompts",
        flush=True,
    )
    results = {m: run(m, args) for m in args.methods.split(",")}

    print(
        "\nMedian seconds per step (paper's Table 3 layout; the paper: Qwen2.5-Math-1.5B, 256 "
        "prompts, vLLM)"
    )
    header = f"{'phase':12s}" + "".join(f"{m:>10s}" for m in results) + f"{'paper':>10s}"
    print(header)
    paper = {
        "generation": 250,
        "update": 140,
        "nthr": 22,
        "reference": 55,
        "old_logps": 55,
        "lld": 0,
    }
    for phase in PHASES + ("step",):
        vals = [statistics.median(r[f"time_{phase}"] for r in rows) for rows in results.values()]
        ref = paper.get(phase, 522)
        print(f"{phase:12s}" + "".join(f"{v:10.1f}" for v in vals) + f"{ref:10d}")
    for m, rows in results.items():
        step = statistics.median(r["time_step"] for r in rows)
        nthr = statistics.median(r["time_nthr"] for r in rows)
        print(
            f"{m}: NTHR share of step {nthr / step:.1%}; peak memory "
            f"{max(r['peak_gib'] for r in rows):.1f} GiB"
        )
    if {"grpo", "nthr"} <= results.keys():
        g = statistics.median(r["time_step"] for r in results["grpo"])
        n = statistics.median(r["time_step"] for r in results["nthr"])
        print(f"median step: grpo {g:.1f} s, nthr {n:.1f} s, ratio nthr/grpo {n / g:.3f}")


if __name__ == "__main__":
    main()

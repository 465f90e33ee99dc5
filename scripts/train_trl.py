"""Train GRPO or NTHR (arXiv 2505.18830) with TRL's GRPOTrainer: one process, DDP, DeepSpeed, vLLM.

Single process:  python scripts/train_trl.py --model tiny-random --task toy --steps 2
Several:         accelerate launch --config_file recipes/ddp.yaml scripts/train_trl.py --task arithmetic ...
CPU, 2 procs:    accelerate launch --num_processes 2 --cpu scripts/train_trl.py --model tiny-random ...

``--nthr-beta none`` trains plain GRPO; any number (or -inf) trains NTHR with that beta.
``--task toy`` rewards the parity of the sum of the completion's token ids (mixed groups on any model,
for tests); ``--task arithmetic`` uses nthr_book's arithmetic prompts and the boxed math reward;
``--task math`` the paper's data (MATH train, levels 3-5, ``data.load_math_train``) with the boxed prompt.
``--dump-dir`` writes, per process and per step, the NTHR batch record (``step{S}_rank{R}.pt``) and,
from the main process, ``log_history.json`` (TRL's logged metrics), for tests and debugging.
See recipes/README.md for the multi-GPU, DeepSpeed and vLLM-colocate commands.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (embedded), tiny-random, hub id or path")
    p.add_argument("--task", default="arithmetic", choices=("arithmetic", "math", "toy"))
    p.add_argument("--num-problems", type=int, default=256, help="arithmetic/toy pool size; math: 0 = all")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps (TRL max_steps)")
    p.add_argument("--num-generations", type=int, default=8, help="G, completions per prompt")
    p.add_argument("--per-device-batch", type=int, default=8, help="completions per process per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps-per-generation", type=int, default=None)
    p.add_argument("--num-iterations", type=int, default=1)
    p.add_argument("--max-completion-length", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--loss-type", default="dapo", help="TRL loss_type: grpo, bnpo, dr_grpo, dapo, ...")
    p.add_argument("--kl-beta", type=float, default=0.0, help="TRL's KL coefficient (beta)")
    p.add_argument("--nthr-beta", default="1.0", help="NTHR threshold scale; 'none' = plain GRPO")
    p.add_argument("--nthr-eta", default="two_abs", help="two_abs, p, one_minus_p or a number")
    p.add_argument("--nthr-vocab", default="generated", choices=("generated", "full"))
    p.add_argument("--nthr-exclude-self", action="store_true", help="self-influence without self pairs")
    p.add_argument("--no-lld", action="store_true", help="do not log lld/delta_mean and lld/rate")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--use-vllm", action="store_true")
    p.add_argument("--vllm-mode", default="colocate", choices=("colocate", "server"))
    p.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.3)
    p.add_argument("--output-dir", default=None, help="default: <runs>/trl/<method>")
    p.add_argument("--dump-dir", default=None)
    p.add_argument("--logging-steps", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def toy_parity_reward(completions, completion_ids, **kwargs) -> list[float]:
    """1.0 when the sum of the completion's token ids is odd (a deterministic reward with mixed groups)."""
    return [float(sum(ids) % 2) for ids in completion_ids]


def build_dataset(task: str, tokenizer, n: int, seed: int):
    """A datasets.Dataset with a ``prompt`` column (and ``answer`` for arithmetic and math)."""
    from datasets import Dataset

    from nthr_book.data import arithmetic_problems, load_math_train
    from nthr_book.integrations.trl import prompt_dataset
    from nthr_book.trainer import TRAIN_POOL_SEED

    if task == "math":
        rows = load_math_train(levels=(3, 4, 5)).shuffle(seed=seed)
        rows = rows.select(range(min(n, len(rows)))) if n else rows
        return prompt_dataset(list(rows), tokenizer, "boxed")
    # nthr_book.trainer's arithmetic pool (the same for every seed, so held-out sets avoid it)
    problems = arithmetic_problems(max(n, 1), seed=TRAIN_POOL_SEED)
    if task == "toy":
        return Dataset.from_dict({"prompt": [p["problem"] for p in problems]})
    return prompt_dataset(problems, tokenizer, "arithmetic")


def main(argv: list[str] | None = None) -> int:
    """Build the trainer from the options and train."""
    args = parse_args(argv)
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig

    from nthr_book import config as book_config
    from nthr_book.integrations.trl import NTHRConfig, NTHRGRPOTrainer, math_answer_reward
    from nthr_book.models import load_policy

    if os.environ.get("OMP_NUM_THREADS") is None and not torch.cuda.is_available():
        torch.set_num_threads(1)
    nthr = None
    if args.nthr_beta.lower() != "none":
        eta = args.nthr_eta
        try:
            eta = float(eta)
        except ValueError:
            pass
        nthr = NTHRConfig(beta=float(args.nthr_beta), eta=eta, vocab=args.nthr_vocab,
                          exclude_self=args.nthr_exclude_self)
    method = "grpo" if nthr is None else "nthr"
    output_dir = Path(args.output_dir or book_config.runs_dir() / "trl" / method)

    model, tokenizer = load_policy(args.model, device="cpu")
    dataset = build_dataset(args.task, tokenizer, args.num_problems, args.seed)
    reward = toy_parity_reward if args.task == "toy" else math_answer_reward
    cuda = torch.cuda.is_available()
    config = GRPOConfig(
        output_dir=str(output_dir), max_steps=args.steps, per_device_train_batch_size=args.per_device_batch,
        gradient_accumulation_steps=args.grad_accum, steps_per_generation=args.steps_per_generation,
        num_iterations=args.num_iterations, num_generations=args.num_generations,
        max_completion_length=args.max_completion_length, temperature=args.temperature, learning_rate=args.lr,
        loss_type=args.loss_type, beta=args.kl_beta, bf16=args.bf16 and cuda, use_cpu=not cuda,
        gradient_checkpointing=args.gradient_checkpointing, use_vllm=args.use_vllm, vllm_mode=args.vllm_mode,
        vllm_gpu_memory_utilization=args.vllm_gpu_memory_utilization, logging_steps=args.logging_steps,
        save_strategy="no", report_to="none", seed=args.seed, disable_dropout=True,
    )
    trainer = NTHRGRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                              processing_class=tokenizer, nthr=nthr, track_lld=not args.no_lld,
                              record_nthr=args.dump_dir is not None)
    rank = trainer.accelerator.process_index
    if args.dump_dir:
        dump = Path(args.dump_dir)
        dump.mkdir(parents=True, exist_ok=True)

        class Dump(TrainerCallback):
            """Save this process's NTHR record after every optimizer step."""

            def on_step_end(self, targs, state, control, **kwargs):
                if trainer.nthr_record is not None:
                    torch.save(trainer.nthr_record, dump / f"step{state.global_step}_rank{rank}.pt")
                return control

        trainer.add_callback(Dump())
    trainer.train()
    if trainer.accelerator.is_main_process:
        history = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
                   for row in trainer.state.log_history]
        text = json.dumps({"method": method, "world_size": trainer.accelerator.num_processes,
                           "log_history": history}, indent=1)
        (output_dir / "log_history.json").parent.mkdir(parents=True, exist_ok=True)
        (output_dir / "log_history.json").write_text(text)
        if args.dump_dir:
            (Path(args.dump_dir) / "log_history.json").write_text(text)
        last = {k: v for k, v in history[-2].items() if k.startswith(("nthr/", "lld/", "reward"))} \
            if len(history) > 1 else {}
        print(f"[train_trl] {method}: {len(history) - 1} logged steps; last: {last}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

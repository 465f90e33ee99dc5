"""Train GRPO or NTHR (arXiv 2505.18830) with TRL's GRPOTrainer: one process, DDP, DeepSpeed, vLLM.

One process: python scripts/train_trl.py --model_name_or_path tiny-random --task toy --max_steps 2
Several:     accelerate launch --config_file recipes/ddp.yaml scripts/train_trl.py --task math ...
Resume:      python scripts/train_trl.py ... --resume_from_checkpoint last  (or a checkpoint folder)
From a file: python scripts/train_trl.py --config my_run.yaml  (any option below, as YAML keys)

The options are TRL's own (``TrlParser``): every ``GRPOConfig`` field (``--max_steps``,
``--per_device_train_batch_size``, ``--num_generations``, ``--learning_rate``, ``--beta`` for the
KL, ``--use_vllm``, ``--vllm_mode``, ``--save_steps``, ``--report_to``, ...), every ``ModelConfig``
field (``--model_name_or_path``, ``--dtype``, ``--use_peft``, ...) and this script's
``ScriptArguments`` below (task and NTHR). ``-h`` lists them all. Defaults that differ from TRL's
are in ``script_defaults``.

``--nthr_beta none`` trains plain GRPO; any number (or ``--nthr_beta=-inf``) trains NTHR with that
beta. ``--rule NAME`` (``--nthr_beta`` then does not apply) trains another rule of
``nthr_book.rules`` through the trainer's advantage hook (``nsr``, ``w_reinforce``, ``pos_only``,
``neg_only``, ``llds``, ``llds_token``; ``clip_higher``, ``dr_grpo`` and ``high_entropy`` check that
TRL's own options set their knob: ``--epsilon_high 0.28``, ``--loss_type dr_grpo --scale_rewards
none``, ``--top_entropy_quantile 0.2``). ``--task toy`` rewards the parity of the sum of the
completion's token ids (mixed groups on any model, for tests); ``--task arithmetic`` uses
nthr_book's arithmetic prompts and the boxed math reward; ``--task math`` the paper's data (MATH
train, levels 3-5, ``data.load_math_train``) with the boxed prompt. ``--model_name_or_path``:
``smollm2-135m`` (the embedded model), ``tiny-random``, a hub id or a folder. The model is loaded
after the config, by TRL, so DeepSpeed ZeRO-3 initialisation and ``--dtype`` apply. The trained
model (and tokenizer) is saved to ``--output_dir`` at the end, checkpoints every ``--save_steps``
steps (``checkpoint-N``) for ``--resume_from_checkpoint``. ``--dump_dir`` writes, per process and
per step, the NTHR batch record (``step{S}_rank{R}.pt``) and, from the main process,
``log_history.json`` (TRL's logged metrics), for tests and debugging. See recipes/README.md for the
multi-GPU, DeepSpeed and vLLM (colocate and server) commands.
"""

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout runs uninstalled

from nthr_book import config as book_config  # noqa: E402


@dataclass
class ScriptArguments:
    """This script's options beside TRL's ``GRPOConfig`` and ``ModelConfig``: data and NTHR."""

    task: Literal["arithmetic", "math", "toy"] = field(
        default="arithmetic",
        metadata={
            "help": "arithmetic (boxed math reward), math (MATH levels 3-5) or toy "
            "(token-id parity reward, for tests)"
        },
    )
    num_problems: int = field(
        default=256, metadata={"help": "arithmetic/toy pool size; math: 0 = all"}
    )
    nthr_beta: str = field(
        default="1.0",
        metadata={
            "help": "NTHR threshold scale (a number, or -inf as --nthr_beta=-inf); "
            "'none' trains plain GRPO"
        },
    )
    nthr_eta: str = field(
        default="two_abs", metadata={"help": "two_abs, p, one_minus_p or a number"}
    )
    nthr_vocab: Literal["generated", "full"] = field(
        default="generated",
        metadata={"help": "generated: g restricted to the group's token ids (paper); full: exact"},
    )
    nthr_anchor: Literal["all", "other_responses", "no_self_token"] = field(
        default="all", metadata={"help": "which correct tokens count in the self-influence"}
    )
    rule: str = field(
        default="none",
        metadata={
            "help": "an update rule of nthr_book.rules other than NTHR's (e.g. nsr, w_reinforce, "
            "llds), instead of --nthr_beta; 'none': GRPO or NTHR as --nthr_beta says"
        },
    )
    track_lld: bool = field(
        default=True,
        metadata={
            "help": "log lld/delta_mean and lld/rate (one extra no-grad pass per generation batch)"
        },
    )
    lld_eps: float = field(default=0.0, metadata={"help": "lld/rate counts changes <= lld_eps"})
    dump_dir: str | None = field(
        default=None, metadata={"help": "per-step NTHR records, for tests"}
    )

    def method(self) -> str:
        """The run's name: the rule, or ``grpo`` / ``nthr`` as --nthr_beta says."""
        if self.rule != "none":
            return self.rule
        return "grpo" if self.nthr_config() is None else "nthr"

    def nthr_config(self):
        """The ``NTHRConfig`` these options describe, or None for plain GRPO."""
        from nthr_book.nthr import NTHRConfig

        if self.nthr_beta.strip().lower() == "none" or self.rule != "none":
            return None  # plain GRPO, or another rule of the registry
        try:
            eta: str | float = float(self.nthr_eta)
        except ValueError:
            eta = self.nthr_eta
        return NTHRConfig(
            beta=float(self.nthr_beta), eta=eta, vocab=self.nthr_vocab, anchor=self.nthr_anchor
        )


def _cuda_bf16() -> bool:
    """True on a GPU that computes in bf16 (the script's default ``--bf16``)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def script_defaults() -> dict:
    """Defaults that differ from TRL's: the book's small run, on the CPU when there is no GPU."""
    import torch

    cuda = torch.cuda.is_available()
    return dict(
        # float32 master weights (bf16 compute through autocast)
        model_name_or_path="smollm2-135m",
        dtype="float32",
        output_dir=str(book_config.runs_dir() / "trl" / "{method}"),  # {method}: the rule
        max_steps=20,
        per_device_train_batch_size=8,
        num_generations=8,
        max_completion_length=64,
        temperature=1.0,
        learning_rate=1e-6,
        loss_type="dapo",
        beta=0.0,
        logging_steps=1,
        save_steps=50,
        report_to="none",
        seed=0,
        disable_dropout=True,
        gradient_checkpointing=False,
        bf16=_cuda_bf16(),
        use_cpu=not cuda,
    )


def make_parser():
    """TRL's parser over ``ScriptArguments``, ``GRPOConfig`` and ``ModelConfig`` (and defaults)."""
    from trl import GRPOConfig, ModelConfig, TrlParser

    parser = TrlParser((ScriptArguments, GRPOConfig, ModelConfig))
    parser.set_defaults(**script_defaults())
    return parser


def parse_args(argv: list[str] | None = None):
    """``(script_args, training_args, model_args)`` from the command line (or ``--config``)."""
    script_args, training_args, model_args = make_parser().parse_args_and_config(argv)
    training_args.output_dir = training_args.output_dir.replace("{method}", script_args.method())
    if training_args.resume_from_checkpoint in ("last", "true", "True"):
        training_args.resume_from_checkpoint = True  # the newest checkpoint-N in output_dir
    return script_args, training_args, model_args


def toy_parity_reward(completions, completion_ids, **kwargs) -> list[float]:
    """1.0 when the sum of the completion's token ids is odd (deterministic, mixed groups)."""
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


def policy_for_trl(model_args, training_args):
    """The ``model`` argument for the trainer: a name or folder that TRL loads, or a built model.

    Called after ``GRPOConfig`` exists (DeepSpeed ZeRO-3 then partitions the weights as they load);
    ``ModelConfig``'s ``dtype``, ``model_revision`` and ``attn_implementation`` reach
    ``from_pretrained`` through ``model_init_kwargs``, as in TRL's own ``trl grpo`` script.
    """
    import torch

    from nthr_book import models

    name = model_args.model_name_or_path
    if name == models.TINY_RANDOM:  # built from a config, nothing to download
        dtype = model_args.dtype if model_args.dtype not in (None, "auto") else "float32"
        return models.tiny_random_model().to(getattr(torch, dtype))
    init = dict(
        revision=model_args.model_revision,
        dtype=model_args.dtype,
        attn_implementation=model_args.attn_implementation,
    )
    training_args.model_init_kwargs = init | dict(training_args.model_init_kwargs or {})
    return str(models.convert_embedded()) if name == models.EMBEDDED else name


def run(argv: list[str] | None = None):
    """Parse, build the trainer, train (or resume), save the model; returns the trainer."""
    script_args, training_args, model_args = parse_args(argv)
    import torch
    from transformers import TrainerCallback
    from trl import get_peft_config

    from nthr_book.integrations.trl import NTHRGRPOTrainer, math_answer_reward
    from nthr_book.models import load_tokenizer

    if os.environ.get("OMP_NUM_THREADS") is None and not torch.cuda.is_available():
        torch.set_num_threads(1)
    nthr = script_args.nthr_config()
    method = script_args.method()
    output_dir = Path(training_args.output_dir)

    tokenizer = load_tokenizer(model_args.model_name_or_path)
    dataset = build_dataset(
        script_args.task, tokenizer, script_args.num_problems, training_args.seed
    )
    reward = toy_parity_reward if script_args.task == "toy" else math_answer_reward
    trainer = NTHRGRPOTrainer(
        model=policy_for_trl(model_args, training_args),
        reward_funcs=reward,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        nthr=nthr,
        rule=None if script_args.rule == "none" else script_args.rule,
        track_lld=script_args.track_lld,
        lld_eps=script_args.lld_eps,
        record_nthr=script_args.dump_dir is not None,
    )
    rank = trainer.accelerator.process_index
    if script_args.dump_dir:
        dump = Path(script_args.dump_dir)
        dump.mkdir(parents=True, exist_ok=True)

        class Dump(TrainerCallback):
            """Save this process's NTHR record after every optimizer step."""

            def on_step_end(self, targs, state, control, **kwargs):
                if trainer.nthr_record is not None:
                    torch.save(trainer.nthr_record, dump / f"step{state.global_step}_rank{rank}.pt")
                return control

        trainer.add_callback(Dump())
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(str(output_dir))  # every process: ZeRO-3 gathers the shards for the main one
    if trainer.accelerator.is_main_process:
        history = [
            {
                k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in row.items()
            }
            for row in trainer.state.log_history
        ]
        text = json.dumps(
            {
                "method": method,
                "world_size": trainer.accelerator.num_processes,
                "log_history": history,
            },
            indent=1,
        )
        (output_dir / "log_history.json").write_text(text)
        if script_args.dump_dir:
            (Path(script_args.dump_dir) / "log_history.json").write_text(text)
        last = (
            {k: v for k, v in history[-2].items() if k.startswith(("nthr/", "lld/", "reward"))}
            if len(history) > 1
            else {}
        )
        print(
            f"[train_trl] {method}: {len(history) - 1} logged steps, model saved to "
            f"{output_dir}; last: {last}"
        )
    return trainer


def main(argv: list[str] | None = None) -> int:
    """The command line: train, tear the process group down, then exit 0."""
    run(argv)
    if dist.is_available() and dist.is_initialized():
        # Under `accelerate launch` the gloo/NCCL group's threads otherwise race the interpreter's
        # shutdown, and a loaded machine sees "terminate called without an active exception"
        # (exit -6) after a finished run.
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

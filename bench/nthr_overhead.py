"""Cost of NTHR's token selection against the policy's forward+backward, on one group (arXiv
2505.18830).

For each completion length T, one group of G responses (random token ids after a short random
prompt, every response T tokens long, half of them marked correct) and, on it:

- fwd+bwd: ``grpo.per_token_logps`` with gradients + ``grpo.policy_loss`` + backward (the update);
- NTHR: the whole trainer hook (token scores, threshold, selection, reweighting) on the group, fed
  by the old-policy pass (no gradient) that produces ``old_logps`` and the hidden states (it runs
  anyway and is not timed: NTHR adds no pass of its own), for the generated vocabulary with the old
  log-probs (``old_logps`` give the log-sum-exp, only the |V*| rows of the head are multiplied), the
  generated vocabulary without them (a full-vocabulary pass for the log-sum-exp) and the exact full
  vocabulary (``--skip-full`` leaves it out).

Times are medians of ``--repeats`` rounds after ``--warmup`` untimed rounds; each round runs every
measurement once, interleaved, so a busy shared CPU slows them alike. Memory: on CUDA the peak
allocated above what was held before each call; everywhere the largest tensor an NTHR op returns
(its biggest temporary, from the warm-up round) and, on CPU, the process's peak RSS. The last lines
give the relative difference of the scores with and without ``old_logps`` (logit rounding only).

Imports only torch, transformers and nthr_book.{models,grpo,nthr,score_kernel} (no datasets,
math-verify, widgets).

    python bench/nthr_overhead.py --device cpu                          # embedded SmolLM2-135M, T =
    128, 512 python bench/nthr_overhead.py --device cpu --lengths 2048 --repeats 1 python
    bench/nthr_overhead.py --device cuda                         # random-init Qwen2.5-0.5B, bf16
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # run from a checkout without installing

import torch  # noqa: E402

from nthr_book import grpo, models, nthr  # noqa: E402
from nthr_book.rewards import is_correct  # noqa: E402
from nthr_book.score_kernel import LargestOutput  # noqa: E402

DEFAULT_LENGTHS = {"cpu": "128,512", "cuda": "512,1024,2048,4096"}
VARIANTS = ("gen_logps", "gen", "full")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument(
        "--lengths",
        default=None,
        help="comma-separated completion lengths (cpu: 128,512; "
        "cuda: 512,1024,2048,4096); on CPU 2048 takes minutes per run",
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="timed runs per measurement (median reported)"
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    p.add_argument(
        "--skip-full", action="store_true", help="leave out the exact full-vocabulary NTHR"
    )
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompt-length", type=int, default=16)
    p.add_argument(
        "--distinct-ids",
        type=int,
        default=0,
        help="draw completion tokens from this many random ids (0: the whole vocabulary); real "
        "text uses a few thousand distinct ids per group, uniform ids make |V*| large",
    )
    p.add_argument(
        "--model",
        default=None,
        help="cpu: smollm2-135m (embedded); cuda: qwen2.5-0.5b (random init)",
    )
    p.add_argument(
        "--no-checkpointing", action="store_true", help="cuda: no gradient checkpointing in fwd+bwd"
    )
    p.add_argument(
        "--clock",
        choices=("wall", "process"),
        default=None,
        help="what the table shows: wall seconds, or this process's CPU seconds (all threads; on a "
        "busy shared CPU it does not count time lost to other jobs). Default: process on cpu, "
        "wall on cuda; the JSON keeps both",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (on a CPU shared with other jobs, 1 avoids OpenMP spin-wait "
        "stalls)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the rows to this file")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    args.clock = args.clock or ("process" if args.device == "cpu" else "wall")
    args.lengths = [
        int(x) for x in (args.lengths or DEFAULT_LENGTHS[args.device]).split(",") if x.strip()
    ]
    if not args.lengths or min(args.lengths) < 1:
        p.error(f"--lengths must be positive integers, got {args.lengths}")
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def load(args):
    """(model, vocabulary size) on the device: the embedded policy on CPU, random-init
    Qwen2.5-0.5B on CUDA."""
    if args.device == "cpu":
        model, _ = models.load_policy(args.model or "smollm2-135m", device="cpu")
    else:
        model = models.random_init_model(
            args.model or "qwen2.5-0.5b", dtype=torch.bfloat16, device="cuda"
        )
        if not args.no_checkpointing:
            with (
                warnings.catch_warnings()
            ):  # renamed activation_checkpointing_enable in recent transformers
                warnings.simplefilter("ignore", FutureWarning)
                model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
            model.config.use_cache = False
    model.train()  # checkpointing acts in training mode only; these configs have no dropout
    return model, model.get_output_embeddings().weight.shape[0]


def make_group(G: int, P: int, T: int, V: int, distinct: int, seed: int, device: str):
    """input_ids (G, P+T), attention_mask, completion_ids (G, T), completion_mask, rewards (1,
    G)."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, V, (1, P), generator=gen).expand(G, P)
    if distinct:
        pool = torch.randperm(V, generator=gen)[:distinct]
        completion_ids = pool[torch.randint(0, pool.numel(), (G, T), generator=gen)]
    else:
        completion_ids = torch.randint(0, V, (G, T), generator=gen)
    input_ids = torch.cat([prompt, completion_ids], 1).to(device)
    attention_mask = torch.ones_like(input_ids)
    completion_mask = torch.ones(G, T, dtype=torch.bool, device=device)
    rewards = (torch.arange(G) % 2 == 0).float()[None].to(device)  # half correct
    return input_ids, attention_mask, completion_ids.to(device), completion_mask, rewards


def sync(device: str) -> None:
    """Wait for queued CUDA work (a no-op on CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def measure_all(fns: dict, args, probe: set[str]) -> dict[str, dict]:
    """Per name: median seconds over the repeats after the warm-ups, CUDA peak bytes, largest op
    output.

    The functions run interleaved (one of each per round), so that a shared, busy CPU slows them
    alike and their ratios stay meaningful. The last call's return value is kept under "result".
    """
    out: dict[str, dict] = {name: {"wall_seconds": [], "process_seconds": []} for name in fns}
    for i in range(args.warmup):
        for name, fn in fns.items():
            if i == 0 and name in probe:
                with LargestOutput() as p:
                    fn()
                out[name]["largest_bytes"] = p.largest_bytes
            else:
                fn()
    for _ in range(args.repeats):
        for name, fn in fns.items():
            if args.device == "cuda":
                torch.cuda.empty_cache()
                held = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            sync(args.device)
            t0, c0 = time.perf_counter(), time.process_time()
            out[name]["result"] = fn()
            sync(args.device)
            out[name]["wall_seconds"].append(time.perf_counter() - t0)
            out[name]["process_seconds"].append(time.process_time() - c0)
            if args.device == "cuda":
                peak = torch.cuda.max_memory_allocated() - held
                out[name]["peak_bytes"] = max(out[name].get("peak_bytes", 0), peak)
    for name in probe:
        if "largest_bytes" not in out[name]:  # no warm-up: probe one extra, untimed run
            with LargestOutput() as p:
                fns[name]()
            out[name]["largest_bytes"] = p.largest_bytes
    for res in out.values():
        res["wall"] = statistics.median(res["wall_seconds"])
        res["process"] = statistics.median(res["process_seconds"])
        res["seconds"] = res[args.clock]
    return out


def rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_length(args, model, V: int, T: int) -> dict:
    """All measurements for completion length T."""
    G, dev = args.group_size, args.device
    input_ids, attention_mask, completion_ids, completion_mask, rewards = make_group(
        G, args.prompt_length, T, V, args.distinct_ids, args.seed + T, dev
    )
    advantages = grpo.expand_advantages(grpo.group_advantages(rewards), completion_mask)  # (G, T)
    row: dict = {
        "T": T,
        "G": G,
        "tokens": G * T,
        "vstar": int(torch.unique(completion_ids).numel()),
    }

    # the old-policy pass (no gradient): old_logps and the hidden states NTHR reads; it runs anyway
    with torch.no_grad():
        old_logps, hidden = grpo.per_token_logps(
            model, input_ids, attention_mask, completion_mask, return_hidden=True
        )
    head = model.get_output_embeddings()
    ctx = SimpleNamespace(
        advantages=advantages,
        rewards=rewards,
        group_size=G,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        hidden=hidden.detach(),
        lm_head_weight=head.weight.detach(),
        lm_head_bias=None if head.bias is None else head.bias.detach(),
        temperature=1.0,
        old_logps=old_logps.float(),
    )
    del hidden
    hooks = {
        "gen_logps": nthr.nthr_advantage_fn(nthr.NTHRConfig()),
        "gen": nthr.nthr_advantage_fn(nthr.NTHRConfig(), use_logps=False),
        "full": nthr.nthr_advantage_fn(nthr.NTHRConfig(vocab="full")),
    }

    def fwd_bwd():
        logps = grpo.per_token_logps(model, input_ids, attention_mask, completion_mask)
        loss, _ = grpo.policy_loss(logps.float(), old_logps, advantages, completion_mask)
        loss.backward()
        model.zero_grad(set_to_none=True)

    fns = {"fwd_bwd": fwd_bwd}
    fns.update(
        {
            name: (lambda h=hooks[name]: h(ctx))
            for name in VARIANTS
            if not (name == "full" and args.skip_full)
        }
    )
    results = measure_all(fns, args, probe=set(fns) - {"fwd_bwd"})
    results["fwd_bwd"].pop("result")
    row["selected_frac"] = {
        name: results[name].pop("result")[1]["nthr/selected_frac"]
        for name in fns
        if name != "fwd_bwd"
    }
    row.update(results)
    # accuracy of the log-probs shortcut: scores with and without old_logps (differ by logit
    # rounding)
    correct = is_correct(rewards[0])
    kw = dict(lm_head_bias=ctx.lm_head_bias, temperature=1.0)
    with_logps = nthr.token_scores_from_hidden(
        ctx.hidden,
        ctx.lm_head_weight,
        completion_ids,
        completion_mask,
        correct,
        logps=ctx.old_logps,
        **kw,
    )
    without = nthr.token_scores_from_hidden(
        ctx.hidden, ctx.lm_head_weight, completion_ids, completion_mask, correct, **kw
    )
    row["logps_rel_err"] = float((with_logps - without).abs().max() / without.abs().max())
    if dev == "cpu":
        row["rss_peak_mib"] = rss_mib()
    return row


def fmt_row(row: dict, device: str) -> str:
    """One table line."""
    fb = row["fwd_bwd"]["seconds"]
    cells = [f"{row['T']:>5}", f"{row['vstar']:>6}", f"{fb:>8.3f}"]
    for name in VARIANTS:
        r = row.get(name)
        cells.append(
            f"{r['seconds']:>8.4f} {100 * r['seconds'] / fb:>6.2f}%" if r else f"{'-':>16}"
        )
    mem = []
    for name in VARIANTS:
        r = row.get(name)
        if r:
            big = r["largest_bytes"] / 2**20
            mem.append(
                f"{big:.1f}" + (f"/{r['peak_bytes'] / 2**20:.0f}" if "peak_bytes" in r else "")
            )
        else:
            mem.append("-")
    cells.append(" ".join(f"{m:>9}" for m in mem))
    if device == "cuda":
        cells.append(f"{row['fwd_bwd']['peak_bytes'] / 2**20:>9.0f}")
    else:
        cells.append(f"{row['rss_peak_mib']:>9.0f}")
    return " ".join(cells)


def main(argv: list[str] | None = None) -> int:
    """Run every length and print the table."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"cpu, {torch.get_num_threads()} threads"
    )
    model, V = load(args)
    print(
        f"device {name}; torch {torch.__version__}; model {type(model).__name__} "
        f"({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, V={V}, "
        f"{next(model.parameters()).dtype}, checkpointing "
        f"{args.device == 'cuda' and not args.no_checkpointing}); G={args.group_size}, prompt "
        f"{args.prompt_length}, ids "
        f"{'uniform' if not args.distinct_ids else f'from {args.distinct_ids}'}; "
        f"median of {args.repeats} after {args.warmup} warm-up; {args.clock} seconds",
        flush=True,
    )
    mem_note = "MiB largest NTHR temp" + ("/peak above held" if args.device == "cuda" else "")
    last = "fwd+bwd peak MiB" if args.device == "cuda" else "RSS peak MiB"
    print(
        f"{'T':>5} {'|V*|':>6} {'fwd+bwd':>8} {'gen+logps s, %':>16} {'gen s, %':>16} "
        f"{'full s, %':>16}  [{mem_note}: gen+logps gen full] [{last}]",
        flush=True,
    )
    rows = []
    for T in args.lengths:
        row = run_length(args, model, V, T)
        rows.append(row)
        print(fmt_row(row, args.device), flush=True)
    other = "wall" if args.clock == "process" else "process"
    print(
        f"{other} seconds instead: "
        + "; ".join(
            f"T={r['T']}: fwd+bwd {r['fwd_bwd'][other]:.3f}, "
            + ", ".join(
                f"{k} {r[k][other]:.4f} ({100 * r[k][other] / r['fwd_bwd'][other]:.2f}%)"
                for k in VARIANTS
                if k in r
            )
            for r in rows
        )
    )
    print(
        "%: NTHR seconds / fwd+bwd seconds. Generated-vocabulary scores with old_logps vs without, "
        "max "
        "|difference| / max |score|: "
        + ", ".join(f"T={r['T']}: {r['logps_rel_err']:.1e}" for r in rows)
    )
    print(
        "selected_frac (beta=1): "
        + "; ".join(
            f"T={r['T']}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["selected_frac"].items())
            for r in rows
        )
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"args": vars(args), "device": name, "torch": torch.__version__, "rows": rows},
                indent=1,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

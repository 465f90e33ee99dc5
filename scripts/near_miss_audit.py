"""How many near-miss copies the first construction mislabelled, on the series' saved groups.

Until the fix, ``groups.near_miss_text`` changed the *last number anywhere* in a correct answer,
while the reward reads the last ``\\boxed{}``: "\\boxed{7}. Then 5+1" became "\\boxed{7}. Then 5+2",
still right, yet labelled wrong. Now the number the grader reads is changed and every copy is
graded again (``groups.near_miss_group``). This script rebuilds, for every mixed group of the given
groups files, the copies the old rule made (wrong slot k copied correct answer k mod N+), grades
them with the reward the groups were graded with, and counts those graded right: the copies the old
construction mislabelled.

    python scripts/near_miss_audit.py runs/lld/groups-ci-seed0.pt runs/lld/groups-laptop-seed0.pt
    python scripts/near_miss_audit.py --preset ci laptop      # sample the presets' groups if absent

Prints one line per file and writes ``--out`` (CSV: file, mixed groups, copies, mislabelled).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pandas as pd

from nthr_book import config, groups, models, presets, rewards
from nthr_book.io import atomic_write_text

_OLD_LAST_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?!.*\d)", re.S)  # the first rule: the last number


def old_near_miss_text(text: str, answer: str) -> str | None:
    """The first construction's copy: the last number anywhere changed (None when there is none)."""
    match = _OLD_LAST_NUMBER.search(text)
    if match is None:
        return None
    new = groups._changed_number(match.group(), answer)
    return text[: match.start()] + new + text[match.end() :]


def audit(path: Path, require_boxed: bool) -> dict:
    """(mixed groups, copies the old rule made, copies graded right) of one groups file."""
    mixed = [g for g in groups.load_groups(path) if g.status == "mixed"]
    texts, golds = [], []
    for g in mixed:
        right = [i for i in range(g.group_size) if bool(g.correct[i])]
        wrong = [i for i in range(g.group_size) if not bool(g.correct[i])]
        for k, _ in enumerate(wrong):
            copy = old_near_miss_text(g.rollouts.texts[right[k % len(right)]], g.answer)
            if copy is not None:
                texts.append(copy)
                golds.append(g.answer)
    graded = rewards.math_rewards(texts, golds, require_boxed=require_boxed) if texts else []
    right = sum(rewards.is_correct(r) for r in graded)
    return {"file": str(path), "mixed": len(mixed), "copies": len(texts), "mislabelled": right}


def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="*", type=Path, help="groups files (groups.save_groups)")
    p.add_argument(
        "--preset",
        nargs="*",
        default=[],
        choices=["ci", "laptop"],
        help="the notebooks' groups of these sizes (presets.GroupsPreset), sampled if absent",
    )
    p.add_argument("--no-require-boxed", dest="require_boxed", action="store_false")
    p.add_argument(
        "--out", type=Path, default=None, help="CSV (default <runs>/near_miss_audit.csv)"
    )
    args = p.parse_args(argv)
    paths = list(args.paths)
    for name in args.preset:
        preset = getattr(presets.GroupsPreset, name)()
        if not preset.groups_path.is_file():
            model, tokenizer = models.load_policy(preset.model)
            groups.load_or_sample_groups(
                preset.groups_path, model, tokenizer, preset.problems(), **preset.sampling()
            )
        paths.append(preset.groups_path)
    if not paths:
        p.error("give groups files or --preset")
    rows = [audit(path, args.require_boxed) for path in paths]
    table = pd.DataFrame(rows)
    out = args.out or config.runs_dir() / "near_miss_audit.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, table.to_csv(index=False))
    for row in rows:
        print(
            f"{row['file']}: {row['mislabelled']} of {row['copies']} copies graded right "
            f"({row['mixed']} mixed groups)"
        )
    return table


if __name__ == "__main__":
    main(sys.argv[1:])

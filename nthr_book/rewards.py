"""Safe binary math-answer rewards on math-verify (the reward ``r_i`` of arXiv 2505.18830).

``r_i = 1`` when the final answer of completion ``i`` (the last ``\\boxed{...}``) is equivalent to
the gold answer, else ``0``. The model's text is untrusted, so the reward is built to stay correct
and bounded in time whatever the model writes:

1. **No execution of model output.** The text is only scanned with linear-time code of our own
   (:func:`extract_boxed`, an iterative brace counter, no recursion) and then handed, as a string,
   to math-verify's LaTeX/expression parser. Nothing is ``eval``-ed here.
2. **Cheap filters first.** Answers longer than ``MAX_ANSWER_CHARS`` or nesting braces deeper than
   ``MAX_BRACE_DEPTH`` score 0 without parsing; the unboxed fallback only looks at the last
   ``MAX_TAIL_CHARS`` characters of the text.
3. **Fast path in-process.** Equal strings after light normalisation, or two plain numbers (``023``
   vs ``23``, ``27.0`` vs ``27``, ``\\frac12`` vs ``0.5``, ``1,000`` vs ``1000``, units, ``$``,
   ``^\\circ``, ``x =`` stripped) are decided with exact ``fractions.Fraction`` arithmetic in
   microseconds. This is the common case in RL training.
4. **Everything else runs in a worker process.** Symbolic comparisons (sympy can hang on
   ``9^{9^{9^{9}}}`` or ``(10^{100})!``) run in a persistent child Python process that imports only
   math-verify, with math-verify's own ``signal.alarm`` timeouts disabled (they fail outside the
   main thread). The caller waits at most ``timeout_s`` per answer; on a timeout or crash the
   worker is killed, a replacement is started in the background and the answer scores 0. This
   works the same from the main thread, ``threading`` threads and thread pools. The child has an
   address-space limit (``WORKER_MEMORY_BYTES``) so a runaway big-integer computation ends in a
   ``MemoryError`` instead of exhausting the machine, and it ignores SIGINT so a notebook
   interrupt does not kill it.

The worker is a plain ``python -c`` child that runs this file with ``runpy`` (not via
``multiprocessing``), so it never re-imports the caller's ``__main__``, torch or the rest of the
package; it exits when its stdin closes.

Why one long module: the worker runs this very file, so the reward, its fast path and the
worker protocol must live together; the formula itself is ``math_rewards`` and ``is_correct``.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import queue
import re
import subprocess
import sys
import threading
from collections.abc import Sequence
from fractions import Fraction
from functools import lru_cache
from typing import Any

__all__ = [
    "CORRECT_THRESHOLD",
    "MAX_ANSWER_CHARS",
    "MAX_BRACE_DEPTH",
    "MAX_TAIL_CHARS",
    "WORKER_MEMORY_BYTES",
    "boxed_span",
    "extract_boxed",
    "is_correct",
    "math_reward",
    "math_rewards",
    "shutdown_workers",
    "warm_up",
]

CORRECT_THRESHOLD = 0.5  # binary rewards: 1 right, 0 wrong


def is_correct(rewards: Any, threshold: float = CORRECT_THRESHOLD) -> Any:
    """Correct means reward > ``threshold`` (docs/method.md §1): a bool tensor for a tensor, a list
    of bools for a list or tuple, a bool for a number. The one definition of "correct" (nb 01)."""
    if math.isnan(float(threshold)):
        raise ValueError("threshold must be a number, got nan")
    if isinstance(rewards, (list, tuple)):
        return [float(r) > threshold for r in rewards]
    return rewards > threshold


MAX_ANSWER_CHARS = 1000  # longer extracted answers score 0 without parsing
MAX_TAIL_CHARS = 2000  # the unboxed fallback parses only this many trailing characters
MAX_BRACE_DEPTH = 50  # answers nesting braces deeper score 0 without parsing
WORKER_MEMORY_BYTES = 4 << 30  # address-space limit of each worker process (POSIX only)
MAX_WORKERS = min(8, max(2, os.cpu_count() or 2))  # worker processes alive at once
STARTUP_TIMEOUT_S = 120.0  # time allowed for a worker to import math-verify and warm up

# ---------------------------------------------------------------------------------------------
# Extraction of the last \boxed{...}
# ---------------------------------------------------------------------------------------------

_BRACE_TOKEN_RE = re.compile(r"\\.|[{}]", re.DOTALL)  # an escaped char (\{, \}, \\) or a brace
_SINGLE_TOKEN_RE = re.compile(r"\\[A-Za-z]+|[^\s${}\\]+")  # the argument of `\boxed 5`


def _balanced_group(text: str, open_pos: int, limit: int | None) -> tuple[tuple | None, bool]:
    """((start, end) of the content of the brace group opening at ``open_pos``, too_long); the span
    is None when the group is unbalanced or over limit."""
    depth = 0
    stop = len(text) if limit is None else min(len(text), open_pos + limit + 2)
    for m in _BRACE_TOKEN_RE.finditer(text, open_pos, stop):
        tok = m.group()
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth == 0:
                return (open_pos + 1, m.start()), False
    return None, stop < len(text)


def _brace_depth(text: str) -> int:
    """Deepest nesting of unescaped braces in ``text``."""
    depth = deepest = 0
    for m in _BRACE_TOKEN_RE.finditer(text):
        if m.group() == "{":
            depth += 1
            deepest = max(deepest, depth)
        elif m.group() == "}":
            depth -= 1
    return deepest


def _boxed_span(text: str, limit: int | None) -> tuple[tuple[int, int] | None, bool]:
    """((start, end) of the last boxed content in ``text``, or None; whether the scan stopped at
    ``limit`` characters). See extract_boxed."""
    n = len(text)
    end = n
    # last start of each command in text[:end]; each is searched again only after being consumed,
    # so the total work over all candidates is O(len(text))
    pos = {cmd: text.rfind(cmd, 0, end) for cmd in ("\\boxed", "\\fbox")}
    while True:
        cmd = max(pos, key=pos.__getitem__)
        i = pos[cmd]
        if i < 0:
            return None, False
        j = i + len(cmd)
        k = j
        while k < n and text[k] in " \t\r\n":
            k += 1
        nxt = text[k] if k < n else ""
        if k == j and nxt.isalpha():
            pass  # another control word (\fboxsep, \boxedfoo): not a box
        elif nxt == "{":
            return _balanced_group(text, k, limit)
        elif nxt:
            m = _SINGLE_TOKEN_RE.match(text, k)
            if m is not None:  # `\boxed 5`, `\boxed5`, `\boxed \pi`
                token = m.group()
                if not token.startswith("\\"):
                    token = token.rstrip(".,;:")
                if token:
                    return (k, k + len(token)), False
        end = i
        pos[cmd] = text.rfind(cmd, 0, end)


def _extract_boxed(text: str, limit: int | None) -> tuple[str | None, bool]:
    """Last boxed content and whether the scan stopped at ``limit`` characters (see
    extract_boxed)."""
    span, too_long = _boxed_span(text, limit)
    return (None if span is None else text[span[0] : span[1]]), too_long


def boxed_span(text: str) -> tuple[int, int] | None:
    """(start, end) of the content of the last ``\\boxed{...}``/``\\fbox{...}`` (or ``\\boxed 5``)
    in ``text``: the characters the reward grades; None if absent/unbalanced."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return _boxed_span(text, None)[0]


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``/``\\fbox{...}`` (or ``\\boxed 5``); None if
    absent/unbalanced."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return _extract_boxed(text, None)[0]


# ---------------------------------------------------------------------------------------------
# In-process fast path: light normalisation and plain numbers
# ---------------------------------------------------------------------------------------------

_SPACING_RE = re.compile(r"\\[,;:! ]|~|\s+")
_DOLLAR_RE = re.compile(r"(?<!\\)\$")
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_FRAC_VARIANT_RE = re.compile(r"\\[dt]frac(?![A-Za-z])")
_SUFFIX_RES = (
    # units such as \text{cm}^2 (but not \mathrm{e} or \text{i}, which are numbers)
    re.compile(r"\\(?:text|textrm|textnormal|mathrm|mbox)\{(?![ei]\})[A-Za-z.]*\}(?:\^\{?\d\}?)?$"),
    re.compile(r"(?:\^\{?\\circ\}?|°|\\degree)$"),  # degrees
)
_PCT_RE = re.compile(r"\\?%$")
_ASSIGN_RE = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?=")
_DECIMAL_RE = re.compile(r"\d+(?:\.\d*)?|\.\d+")
_THOUSANDS_RE = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_FRAC_RE = re.compile(r"\\frac\{(-?\d+)\}\{(-?\d+)\}|\\frac(\d)(\d)|(\d+)/(\d+)")


def _light_normalize(s: str) -> str:
    """Strip spacing, ``$``, ``\\left``/``\\right``, ``\\dfrac``/``\\tfrac`` and a final period."""
    s = _FRAC_VARIANT_RE.sub(r"\\frac", s)
    s = _LEFT_RIGHT_RE.sub("", s)
    s = _DOLLAR_RE.sub("", s)
    s = _SPACING_RE.sub("", s)
    return s.rstrip(".")


def _plain_number(
    s: str, allow_thousands: bool, allow_assign: bool
) -> tuple[Fraction, bool, bool] | None:
    """(value, written as decimal, percent) when normalised ``s`` is a plain number, else None."""
    s = s.replace("\\$", "")
    is_pct = False
    for _ in range(4):  # peel units, degrees and a percent sign in any order
        before = s
        for rx in _SUFFIX_RES:
            t = rx.sub("", s)
            s = t if t else s
        t = _PCT_RE.sub("", s)
        if t and t != s:
            s, is_pct = t, True
        if s == before:
            break
    if allow_assign and s.count("=") == 1:  # `x=5` vs gold `5`
        s = _ASSIGN_RE.sub("", s)
    sign = 1
    if s and s[0] in "+-":
        sign, s = (-1 if s[0] == "-" else 1), s[1:]
    if s.startswith("{") and s.endswith("}"):
        s = s[1:-1]
    if _DECIMAL_RE.fullmatch(s):
        return sign * Fraction(s), "." in s, is_pct
    if allow_thousands and _THOUSANDS_RE.fullmatch(s):
        return sign * Fraction(s.replace(",", "")), "." in s, is_pct
    m = _FRAC_RE.fullmatch(s)
    if m is not None:
        a, b = (g for g in m.groups() if g is not None)
        if int(b) != 0:
            return sign * Fraction(int(a), int(b)), False, is_pct
    return None


def _fast_verdict(answer: str, gold: str) -> float | None:
    """1.0/0.0 when the answer can be decided without math-verify, else None."""
    a, g = _light_normalize(answer), _light_normalize(gold)
    if a and a == g:
        return 1.0
    # `1,000` reads as a number only when the other side has no comma; `x=` is dropped only when
    # gold has no `=` (math-verify keeps x=1 != y=1)
    na = _plain_number(a, allow_thousands="," not in g, allow_assign="=" not in g)
    ng = (
        _plain_number(g, allow_thousands="," not in a, allow_assign=False)
        if na is not None
        else None
    )
    if na is None or ng is None:
        return None
    (va, dec_a, pct_a), (vg, dec_g, pct_g) = na, ng
    if dec_a or dec_g:  # math-verify compares floats rounded to 6 decimals
        same = round(va, 6) == round(vg, 6)
    else:
        same = va == vg
    if same:
        return 1.0
    # 50% vs 0.5 may still be equal for math-verify: let it decide
    return None if pct_a != pct_g else 0.0


# ---------------------------------------------------------------------------------------------
# Worker process (child side); runs only inside the child started by _Worker
# ---------------------------------------------------------------------------------------------

_WORKER_RUN_NAME = "__nthr_reward_worker__"
_BOOT = (
    "import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
    f"import runpy; runpy.run_path(sys.argv[1], run_name={_WORKER_RUN_NAME!r})"
)


def _mv_verify(kind: str, answer: str, gold: str) -> bool:
    """Child side: math-verify equivalence of a boxed answer (kind 'boxed') or free text
    ('text')."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    gold_parsed = _mv_parse_gold(gold)
    if not gold_parsed:
        return False
    if kind == "boxed":
        pred = parse(
            "\\boxed{" + answer + "}",
            [LatexExtractionConfig(boxed_match_priority=0)],
            parsing_timeout=None,
        )
        if not pred:
            pred = parse(answer, [ExprExtractionConfig()], parsing_timeout=None)
    else:
        pred = parse(
            answer, [LatexExtractionConfig(), ExprExtractionConfig()], parsing_timeout=None
        )
    if not pred:
        return False
    return bool(verify(gold_parsed, pred, timeout_seconds=None))


@lru_cache(maxsize=4096)
def _mv_parse_gold(gold: str) -> list:
    """Child side: parse a gold string, wrapped as ``\\boxed{...}``, falling back to plain
    expressions."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    parsed = parse(
        "\\boxed{" + gold + "}",
        [LatexExtractionConfig(boxed_match_priority=0)],
        parsing_timeout=None,
    )
    if not parsed:
        parsed = parse(gold, [ExprExtractionConfig()], parsing_timeout=None)
    return parsed


_WARM_UP_PAIRS = (
    ("\\frac{\\sqrt{8}}{2}", "\\sqrt{2}"),
    ("(3,\\pi/2)", "(3, \\frac{\\pi}{2})"),
    ("(-\\infty, \\frac{4}{2}]", "(-\\infty, 2]"),
    ("\\{2,1\\}", "\\{1,2\\}"),
    ("1+x^2", "x^2+1"),
)


def _worker_main() -> None:
    """Child side: answer JSON-line batches ``[[kind, answer, gold], ...]``, one ``{"r": x}``
    line each."""
    import logging
    import signal
    import traceback

    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except (ValueError, OSError):
        pass
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    except (ImportError, ValueError, OSError):
        pass
    # the protocol owns the real stdout; anything else printing goes to stderr (fd level too)
    proto = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(obj: dict) -> None:
        proto.write(json.dumps(obj).encode() + b"\n")
        proto.flush()

    try:
        logging.getLogger("math_verify").setLevel(logging.ERROR)
        logging.getLogger("latex2sympy2_extended").setLevel(logging.ERROR)
        # warm up the parser and sympy's code paths for numbers, tuples, intervals, sets,
        # polynomials
        for answer, gold in _WARM_UP_PAIRS:
            _mv_verify("boxed", answer, gold)
    except BaseException:  # noqa: BLE001 - report any start-up failure to the parent
        send({"fatal": traceback.format_exc(limit=4)})
        return
    send({"ready": True})
    for line in sys.stdin.buffer:
        for kind, answer, gold in json.loads(line):
            try:
                ok = _mv_verify(kind, answer, gold)
            except Exception:  # includes MemoryError and RecursionError from hostile answers
                ok = False
            send({"r": 1.0 if ok else 0.0})


# ---------------------------------------------------------------------------------------------
# Worker pool (parent side)
# ---------------------------------------------------------------------------------------------


class _Worker:
    """One child process speaking JSON lines; a reader thread turns its stdout into a queue."""

    def __init__(self) -> None:
        if not sys.executable:
            raise RuntimeError("math_reward needs sys.executable to start its math-verify worker")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, os.path.abspath(__file__)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            close_fds=True,
        )
        self.lines: queue.Queue[bytes | None] = queue.Queue()
        self.ready = False
        self.discarded = False  # set once the pool has stopped counting it
        threading.Thread(target=self._read, name="math-verify-reader", daemon=True).start()
        _all_workers.add(self)

    def _read(self) -> None:
        """Reader thread: push stdout lines, then None at EOF."""
        try:
            for line in self.proc.stdout:  # type: ignore[union-attr]
                self.lines.put(line)
        except (OSError, ValueError):
            pass
        self.lines.put(None)

    def alive(self) -> bool:
        """Whether the child process is still running."""
        return self.proc.poll() is None

    def recv(self, timeout: float) -> dict | None:
        """Next message, or None on timeout or when the child has exited."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            return None
        return None if line is None else json.loads(line)

    def wait_ready(self, timeout: float) -> None:
        """Block until the child has imported math-verify; RuntimeError if it cannot."""
        if self.ready:
            return
        msg = self.recv(timeout)
        if msg is None or not msg.get("ready"):
            detail = (
                msg.get("fatal", msg) if msg else "no answer within the start-up timeout or exit"
            )
            self.kill()
            raise RuntimeError(f"math-verify reward worker failed to start: {detail}")
        self.ready = True

    def send(self, items: list[list[str]]) -> bool:
        """Send one batch; False when the pipe is broken."""
        try:
            self.proc.stdin.write(json.dumps(items).encode() + b"\n")  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
            return True
        except (OSError, ValueError):
            return False

    def kill(self) -> None:
        """Kill the child (idempotent)."""
        _all_workers.discard(self)
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()  # type: ignore[union-attr]
            except (OSError, ValueError):
                pass


class _Pool:
    """Idle workers, the count of live ones and the condition threads wait on."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.idle: list[_Worker] = []
        self.count = 0


_all_workers: set[_Worker] = set()
_pool = _Pool()


def _after_fork_in_child() -> None:
    """A forked process must not share its parent's workers or locks."""
    global _pool, _all_workers
    _pool = _Pool()
    _all_workers = set()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _acquire() -> _Worker:
    """Take an idle worker or start one (at most MAX_WORKERS live); wait until it is ready."""
    pool = _pool
    with pool.cond:
        while True:
            if pool.idle:
                w = pool.idle.pop()
                if w.alive():
                    break
                w.kill()
                w.discarded = True
                pool.count -= 1
                continue
            if pool.count < MAX_WORKERS:
                w = _Worker()
                pool.count += 1
                break
            pool.cond.wait()
    try:
        w.wait_ready(STARTUP_TIMEOUT_S)
    except BaseException:
        _discard(w, respawn=False)
        raise
    return w


def _release(w: _Worker) -> None:
    """Return a healthy worker to the pool."""
    with _pool.cond:
        _pool.idle.append(w)
        _pool.cond.notify()


def _discard(w: _Worker, respawn: bool = True) -> None:
    """Kill a timed-out or broken worker; start a replacement now so the next call finds it warm."""
    w.kill()
    with _pool.cond:
        if w.discarded:
            return
        w.discarded = True
        _pool.count -= 1
        if respawn and not _pool.idle and _pool.count < MAX_WORKERS:
            try:
                _pool.idle.append(_Worker())
                _pool.count += 1
            except OSError:
                pass  # the next call starts one (and reports the error)
        _pool.cond.notify()


def warm_up(num_workers: int = 1) -> None:
    """Start ``num_workers`` math-verify workers now and wait until they are ready."""
    if isinstance(num_workers, bool) or not isinstance(num_workers, int):
        raise TypeError(f"num_workers must be an int, got {type(num_workers).__name__}")
    if not 1 <= num_workers <= MAX_WORKERS:
        raise ValueError(f"num_workers must be in [1, {MAX_WORKERS}], got {num_workers}")
    _check_math_verify()
    workers = [_acquire() for _ in range(num_workers)]
    for w in workers:
        _release(w)


def shutdown_workers() -> None:
    """Kill every worker process (a later reward call starts new ones)."""
    with _pool.cond:
        idle, _pool.idle = _pool.idle, []
        _pool.count -= len(idle)
        _pool.cond.notify_all()
    for w in idle:
        w.discarded = True
        w.kill()


@atexit.register
def _kill_all_workers() -> None:
    for w in list(_all_workers):
        w.kill()


@lru_cache(maxsize=1)
def _check_math_verify() -> None:
    """ImportError with an install hint when math-verify is missing."""
    import importlib.util

    if importlib.util.find_spec("math_verify") is None:
        raise ImportError(
            "math_reward needs the math-verify package: pip install 'math-verify>=0.7'"
        )


def _run_in_workers(items: list[list[str]], timeout_s: float) -> list[float]:
    """Rewards for ``[kind, answer, gold]`` items in one worker round trip, ``timeout_s`` per
    item."""
    results = [0.0] * len(items)
    start = 0
    broken_pipes = 0
    while start < len(items):
        w = _acquire()
        try:
            if not w.send(items[start:]):  # a worker that died while idle: try a fresh one
                _discard(w)
                broken_pipes += 1
                if broken_pipes > 3:
                    raise RuntimeError("math-verify reward workers keep dying before answering")
                continue
            for j in range(start, len(items)):
                msg = w.recv(timeout_s)
                if (
                    msg is None
                ):  # timeout or crash on item j: it scores 0, the rest go to a new worker
                    _discard(w)
                    start = j + 1
                    break
                results[j] = float(msg["r"])
            else:
                _release(w)
                start = len(items)
        except BaseException:  # e.g. KeyboardInterrupt while waiting: the worker state is unknown
            _discard(w, respawn=False)
            raise
    return results


# ---------------------------------------------------------------------------------------------
# Public rewards
# ---------------------------------------------------------------------------------------------


def _check_options(require_boxed: object, timeout_s: object) -> float:
    """Validate keyword options; return timeout_s as float."""
    if not isinstance(require_boxed, bool):
        raise TypeError(f"require_boxed must be a bool, got {type(require_boxed).__name__}")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)):
        raise TypeError(f"timeout_s must be a number of seconds, got {type(timeout_s).__name__}")
    if not (timeout_s > 0 and math.isfinite(timeout_s)):
        raise ValueError(f"timeout_s must be positive and finite, got {timeout_s}")
    return float(timeout_s)


def _clean_gold(gold: str, name: str) -> str:
    """Gold answer without ``\\boxed``/``$`` wrappers; ValueError naming ``name`` when empty."""
    g = gold.strip()
    if "\\boxed" in g or "\\fbox" in g:
        g = extract_boxed(g) or g
    g = g.strip()
    if len(g) >= 2 and g[0] == "$" and g[-1] == "$":
        g = g.strip("$").strip()
    if not g:
        raise ValueError(f"{name} is empty")
    return g


def _prepare(completion: str, gold: str, require_boxed: bool) -> float | list[str]:
    """A decided reward, or the ``[kind, answer, gold]`` item the worker must judge."""
    answer, too_long = _extract_boxed(completion, MAX_ANSWER_CHARS)
    if answer is None:
        if require_boxed or too_long:
            return 0.0
        return ["text", completion[-MAX_TAIL_CHARS:], gold]
    answer = answer.strip()
    if not answer or len(answer) > MAX_ANSWER_CHARS or _brace_depth(answer) > MAX_BRACE_DEPTH:
        return 0.0
    verdict = _fast_verdict(answer, gold)
    if verdict is not None:
        return verdict
    return ["boxed", answer, gold]


def math_reward(
    completion: str, gold: str, *, require_boxed: bool = True, timeout_s: float = 5.0
) -> float:
    """1.0 when the completion's final (boxed) answer equals ``gold`` as maths, else 0.0 (nb 00)."""
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    if not isinstance(gold, str):
        raise TypeError(f"gold must be a str, got {type(gold).__name__}")
    timeout_s = _check_options(require_boxed, timeout_s)
    _check_math_verify()
    item = _prepare(completion, _clean_gold(gold, "gold"), require_boxed)
    if isinstance(item, float):
        return item
    return _run_in_workers([item], timeout_s)[0]


def math_rewards(
    completions: Sequence[str],
    golds: Sequence[str],
    *,
    require_boxed: bool = True,
    timeout_s: float = 5.0,
) -> list[float]:
    """:func:`math_reward` for a batch, with one worker round trip; ``timeout_s`` bounds each
    answer."""
    for name, seq in (("completions", completions), ("golds", golds)):
        if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence):
            raise TypeError(f"{name} must be a list of str, got {type(seq).__name__}")
        for i, s in enumerate(seq):
            if not isinstance(s, str):
                raise TypeError(f"{name}[{i}] must be a str, got {type(s).__name__}")
    if len(completions) != len(golds):
        raise ValueError(f"completions has {len(completions)} items but golds has {len(golds)}")
    timeout_s = _check_options(require_boxed, timeout_s)
    _check_math_verify()
    rewards: list[float] = [0.0] * len(completions)
    pending: list[int] = []  # indices the worker must judge
    items: list[list[str]] = []
    for i, (completion, gold) in enumerate(zip(completions, golds)):
        item = _prepare(completion, _clean_gold(gold, f"golds[{i}]"), require_boxed)
        if isinstance(item, float):
            rewards[i] = item
        else:
            pending.append(i)
            items.append(item)
    if items:
        for i, r in zip(pending, _run_in_workers(items, timeout_s)):
            rewards[i] = r
    return rewards


if __name__ == _WORKER_RUN_NAME:
    _worker_main()

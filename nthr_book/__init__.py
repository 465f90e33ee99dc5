"""nthr_book: GRPO, Lazy Likelihood Displacement and NTHR (arXiv 2505.18830) for teaching and
research.

Modules by concept (the notebooks import them in sequence):

- ``config``   : the fast/full switch and the project's paths
- ``env``      : environment report, versions, ``set_seed``
- ``io``       : atomic writes and JSONL helpers
- ``models``   : ``load_policy`` (embedded SmolLM2-135M, hub ids, ``tiny-random``)
- ``data``     : benchmarks, the synthetic arithmetic task, prompts
- ``reasoner`` : the warm-up: a short SFT that makes the embedded model write worked products
- ``rewards``  : safe math-answer rewards on math-verify
- ``rollout``  : batched group sampling
- ``grpo``     : group advantages, token log-probs, the clipped loss with KL
- ``lld``      : Lazy Likelihood Displacement measurement
- ``nthr``     : NTHR token scores, threshold, selection, reweighting, the trainer hook
- ``score_kernel`` : the fast (sum-first, chunked) evaluation of NTHR's token scores
- ``similarity``   : GWHES and the top-K overlap (the paper's Table 1)
- ``trainer``  : a resumable GRPO / NTHR trainer
- ``evaluate`` : benchmark evaluation with intervals
- ``viz``      : plots and HTML token pictures
- ``explorer``, ``explorer_html``, ``widgets`` : the threshold explorer's state, its HTML picture,
  its controls
"""

__version__ = "0.1.0"

"""smoltulu_utils: the thin package behind the SmolTulu Kit notebooks (notebooks orchestrate, it computes).

- Setup: ``recipes``, ``hardware``, ``profiles`` (the size dial: smoke, single_gpu, paper), ``models``,
  ``data`` with ``data_checks``, ``chat_template``, ``manifest``.
- Data analysis: ``contamination``, ``languages`` (Tables 1, 4, 10-13).
- Training: ``training`` (what the stages share), ``sft`` (with ``packed_attention``, ``lm_head``),
  ``preferences``, ``dpo`` (with ``reference_cache``), ``reward_model`` (with ``rm_evaluation``),
  ``verifiers``, ``ppo``, ``grpo``, ``rlvr`` (with ``rlvr_data``); ``memory`` and ``scale_out`` size and
  spread them; ``stages`` is their table, ``sweep`` runs an LR x BS grid, ``launch`` starts a stage
  under Accelerate.
- Evaluation and reporting: ``evaluation``, ``eval_tasks``, ``nltk_data``, ``results``, ``paper``,
  ``tables``, ``plotting``.
- ``notebooks`` and ``cli``: the notebooks in order, and ``python -m smoltulu_utils``; ``paths``,
  ``errors``, ``atomic``, ``serialize``: plumbing.
"""

__version__ = "0.1.0"

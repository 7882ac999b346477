"""smoltulu_utils: the thin package behind the SmolTulu Kit notebooks.

Notebooks orchestrate; this package computes. Modules, one job each:

- ``recipes``: YAML recipes as frozen dataclasses (learning rate, effective batch, LR/BS ratio).
- ``hardware`` and ``profiles``: what this machine has, and the one size dial (smoke, single_gpu, paper)
  that turns a recipe into a runnable plan with the same effective batch.
- ``models``: Hub ids, local folders, the bundled SmolLM2-135M-Instruct and a tiny SmolLM2 for tests.
- ``data`` (with ``data_checks``): one loader per dataset (Hub at pinned revisions, or a local JSONL
  mirror) and the row checks that name every bad row.
- ``chat_template``: the chat-template doctor every stage runs before training.
- ``contamination`` and ``languages``: benchmark overlap (n-gram) and language shares of the training
  mixtures (Tables 1, 4, 10-13).
- ``sft`` (with ``packed_attention`` and ``memory``), ``preferences``, ``dpo`` (with ``reference_cache``),
  ``reward_model``, ``verifiers``, ``ppo`` and ``rlvr``: the training stages; ``stages`` is their table
  (recipe class, train function, result file, parents) for the command line and the sweep; ``sweep``
  runs a stage over a learning-rate x batch-size grid; ``launch`` starts a stage under Accelerate.
- ``manifest``: ``manifest.json`` beside every checkpoint, and the parent checks.
- ``results``, ``paper``, ``tables``, ``plotting``: tidy results, the paper's numbers, the paper's
  tables and one figure style.
- ``eval_tasks`` and ``nltk_data``: the seven benchmarks as lm-eval tasks, and IFEval's offline data.
- ``notebooks`` and ``cli``: run the notebooks in order; ``python -m smoltulu_utils``.
- ``paths``, ``errors``, ``atomic``, ``serialize``: where files go, the error base class, atomic
  writes, plain JSON.
"""

__version__ = "0.1.0"

"""The shared core of every op: exact float arithmetic and the one table of polynomial
coefficients (``arithmetic``), the row max shift (``row_shift``), argument checks
(``checks``), non-finite constants built without inf or NaN literals (``nonfinite``), the
``forward_mode()`` and ``pure_jax()`` switches (``switches``) and ``allow_rank_promotion``.
Nothing here imports an op, a loss or a framework."""

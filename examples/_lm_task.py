"""The language-modelling task around any framework's model: loss, evaluation, sampling."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from _data import (
    PAD,
    Corpus,
    Packed,
    chunk_documents,
    fixed_batches,
    fixed_packed_batches,
    pack_documents,
)
from _parallel import Placement
from _train import Model

# A batch: padded rows ``(batch, seq_len + 1)`` (inputs ``rows[:, :-1]``, targets
# ``rows[:, 1:]``), or packed rows with their segment ids (--packing).
Batch = jax.Array | Packed


def targets(batch: Batch) -> jax.Array:
    """The targets of ``batch``, ``(batch, seq_len)``; ``PAD`` where none."""
    return batch.targets if isinstance(batch, Packed) else batch[:, 1:]


def batch_nll(model: Model, params, batch: Batch) -> jax.Array:
    """Mean negative log-likelihood of the targets in ``batch``.

    The model's fused head (``LMHead``, reduction ``'mean'``) never forms the logits; a
    ``PAD`` target (padding, or in packed rows a target in the next document) is ignored
    (loss 0 and gradient 0 there, whatever its row holds), and a batch of padding only
    gives 0. Packed rows also give the model their segment ids, so that each document
    attends only to itself."""
    if isinstance(batch, Packed):
        return model.apply(params, batch.tokens, batch.targets, batch.segment_ids)
    return model.apply(params, batch[:, :-1], batch[:, 1:])


def token_nll(model: Model, params, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Summed negative log-likelihood of every target in ``batch`` and the number of
    targets (padding is no target)."""
    count = jnp.sum(targets(batch) != PAD)
    return batch_nll(model, params, batch) * count, count


def mean_loss(model: Model) -> Callable[[object, Batch], jax.Array]:
    """The training loss: mean negative log-likelihood per target character."""
    return lambda params, batch: batch_nll(model, params, batch)


def evaluator(
    model: Model,
    corpus: Corpus,
    seq_len: int,
    batch_size: int,
    placement: Placement,
    bigram: float,
    packing: bool = False,
) -> Callable[[object], dict[str, float]]:
    """Validation loss in nats per character over every held-out character but each
    document's first (the bigram baseline's targets), and the fraction it is below the
    ``bigram`` baseline's loss. With ``packing`` the held-out documents are packed as in
    training: the same targets, each seen from the start of its document or of its row,
    whichever is later, as in padded rows (whose rows start at other places)."""
    if packing:
        stacked: Batch = fixed_packed_batches(pack_documents(corpus.val, seq_len), batch_size)
    else:
        stacked = np.stack(fixed_batches(chunk_documents(corpus.val, seq_len), batch_size))
    batches = placement.batches(stacked)

    # One program for the whole split rather than one per batch: fewer dispatches, and
    # XLA's simulated CPU devices can deadlock when several independent sharded programs
    # are in flight at once (seen with jax 0.10.2 under --data-parallel).
    @jax.jit
    def summed(params, batches):
        totals, counts = jax.lax.map(lambda b: token_nll(model, params, b), batches)
        return totals.sum(), counts.sum()

    def evaluate(params) -> dict[str, float]:
        total, count = summed(params, batches)
        loss = float(total) / int(count)
        return {"loss": loss, "below_bigram": 1.0 - loss / bigram}

    return evaluate


def sample(
    model: Model,
    params,
    corpus: Corpus,
    prompt: str,
    length: int,
    seq_len: int,
    temperature: float,
    seed: int,
    packing: bool = False,
) -> str:
    """``prompt`` continued by ``length`` characters drawn from the model.

    The context is the last ``seq_len`` characters, right-padded to ``seq_len`` so that
    one compiled function serves every step; the padded positions are masked (with
    ``packing``, by segment ids: 1 for the text, 0 for the padding, no mask).
    """

    def log_probs(params, tokens):
        if packing:
            segments = (tokens != PAD).astype(jnp.int32)
            return model.apply(params, tokens[None], None, segments[None])[0]
        return model.apply(params, tokens[None])[0]

    next_log_probs = jax.jit(
        lambda params, tokens, at: log_probs(params, tokens)[at] / temperature
    )
    rng = np.random.default_rng(seed)
    tokens = list(corpus.encode(prompt))
    for _ in range(length):
        context = tokens[-seq_len:]
        padded = np.full(seq_len, PAD, np.int32)
        padded[: len(context)] = context
        logits = np.asarray(next_log_probs(params, padded, len(context) - 1), np.float64)
        probs = np.exp(logits - logits.max())
        probs[PAD] = 0.0
        tokens.append(int(rng.choice(len(probs), p=probs / probs.sum())))
    return corpus.decode(np.array(tokens))

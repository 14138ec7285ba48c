"""The language-modelling task around any framework's model: loss, evaluation, sampling."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from _data import PAD, Corpus, chunk_documents, fixed_batches
from _parallel import Placement
from _train import Model


def batch_nll(model: Model, params, rows: jax.Array) -> jax.Array:
    """Mean negative log-likelihood of the targets in ``rows`` (shape
    ``(batch, seq_len + 1)``: inputs are ``rows[:, :-1]``, targets ``rows[:, 1:]``).

    The model's fused head (``LMHead``, reduction ``'mean'``) never forms the logits; a
    padded target is ignored (loss 0 and gradient 0 there, whatever its row holds), and a
    batch of padding only gives 0."""
    return model.apply(params, rows[:, :-1], rows[:, 1:])


def token_nll(model: Model, params, rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed negative log-likelihood of every target in ``rows`` and the number of targets
    (padding is no target)."""
    count = jnp.sum(rows[:, 1:] != PAD)
    return batch_nll(model, params, rows) * count, count


def mean_loss(model: Model) -> Callable[[object, jax.Array], jax.Array]:
    """The training loss: mean negative log-likelihood per target character."""
    return lambda params, rows: batch_nll(model, params, rows)


def evaluator(
    model: Model,
    corpus: Corpus,
    seq_len: int,
    batch_size: int,
    placement: Placement,
    bigram: float,
) -> Callable[[object], dict[str, float]]:
    """Validation loss in nats per character over every held-out character but each
    document's first (the bigram baseline's targets), and the fraction it is below the
    ``bigram`` baseline's loss."""
    rows = fixed_batches(chunk_documents(corpus.val, seq_len), batch_size)
    batches = placement.batches(np.stack(rows))

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
) -> str:
    """``prompt`` continued by ``length`` characters drawn from the model.

    The context is the last ``seq_len`` characters, right-padded to ``seq_len`` so that
    one compiled function serves every step; the padded positions are masked.
    """
    next_log_probs = jax.jit(
        lambda params, tokens, at: model.apply(params, tokens[None])[0, at] / temperature
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

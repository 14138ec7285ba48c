"""Three rows that break jax.nn, side by side with stablelayers.

python examples/demo.py
"""

import jax
import jax.numpy as jnp
import numpy as np

import stablelayers as sl


def show(title: str, ours: jax.Array, theirs: jax.Array) -> None:
    print(f"\n{title}")
    print(f"  jax.nn       {np.array2string(np.asarray(theirs), precision=4)}")
    print(f"  stablelayers {np.array2string(np.asarray(ours), precision=4)}")


def main() -> None:
    logits = jnp.array([2.0, 1.0, 0.5, -1.0])
    mask = jnp.array([True, True, False, False])

    # A masked row: padding must get exactly zero probability and zero gradient, whatever
    # garbage sits there (here a NaN from an uninitialised buffer).
    padded = logits.at[3].set(jnp.nan)
    show(
        "masked row (last two entries are padding, one holds NaN):",
        sl.softmax(padded, where=mask),
        jax.nn.softmax(padded, where=mask),
    )
    show(
        "  ... and its gradient:",
        jax.grad(lambda x: jnp.sum(sl.softmax(x, where=mask) * logits))(padded),
        jax.grad(lambda x: jnp.sum(jax.nn.softmax(x, where=mask) * logits))(padded),
    )

    # A row with nothing to attend to: every logit is -inf.
    dead = jnp.full(4, -jnp.inf)
    show(
        "all -inf row (a query that may attend nothing):",
        sl.masked_softmax(dead),
        jax.nn.softmax(dead),
    )
    grad_ours = jax.grad(lambda x: jnp.sum(sl.masked_softmax(x) * logits))(dead)
    grad_theirs = jax.grad(lambda x: jnp.sum(jax.nn.softmax(x) * logits))(dead)
    show("  ... and its gradient:", grad_ours, grad_theirs)

    # An attention sink: an extra logit in the normaliser only (jax.nn has none, so the
    # closest jax.nn equivalent is a softmax over the row with the sink appended, cut off).
    sink = jnp.float32(1.0)
    with_sink = jax.nn.softmax(jnp.append(logits, sink))[:-1]
    show(
        "sink = 1.0 (rows may sum to less than one):",
        sl.masked_softmax(logits, sink=sink),
        with_sink,
    )

    # A confident prediction: log-probability of the arg-max.
    confident = jnp.array([0.0, -30.0, -30.0, -30.0])
    print("\nlog_softmax at the arg-max of a confident row (truth: -2.8073e-13)")
    print(f"  jax.nn       {float(jax.nn.log_softmax(confident)[0]):.4e}")
    print(f"  stablelayers {float(sl.log_softmax(confident)[0]):.4e}")


if __name__ == "__main__":
    main()

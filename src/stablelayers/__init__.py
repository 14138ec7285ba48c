"""stablelayers: softmax-family ops for JAX whose forward and backward passes never
overflow, never leak a NaN, and keep only what the backward pass needs."""

from stablelayers._core.switches import forward_mode, pure_jax
from stablelayers.attention import (
    dot_product_attention,
    ring_attention,
    ring_attention_sharded,
    zigzag_order,
)
from stablelayers.losses import (
    linear_softmax_cross_entropy,
    linear_softmax_cross_entropy_sharded,
    mean_over_valid,
    sigmoid_binary_cross_entropy,
    softmax_cross_entropy,
)
from stablelayers.ops import (
    log_sigmoid,
    log_softmax,
    logsumexp,
    masked_softmax,
    sigmoid,
    softmax,
    softplus,
)

__version__ = "0.1.0"

__all__ = [
    "dot_product_attention",
    "forward_mode",
    "linear_softmax_cross_entropy",
    "linear_softmax_cross_entropy_sharded",
    "log_sigmoid",
    "log_softmax",
    "logsumexp",
    "masked_softmax",
    "mean_over_valid",
    "pure_jax",
    "ring_attention",
    "ring_attention_sharded",
    "sigmoid",
    "sigmoid_binary_cross_entropy",
    "softmax",
    "softmax_cross_entropy",
    "softplus",
    "zigzag_order",
]

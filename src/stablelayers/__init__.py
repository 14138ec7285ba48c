"""stablelayers: softmax-family ops for JAX whose forward and backward passes never
overflow, never leak a NaN, and keep only what the backward pass needs."""

from stablelayers._attention import dot_product_attention
from stablelayers._cross_entropy import mean_over_valid, softmax_cross_entropy
from stablelayers._linear_cross_entropy import linear_softmax_cross_entropy
from stablelayers._log_softmax import log_softmax
from stablelayers._logsumexp import logsumexp
from stablelayers._ring_attention import ring_attention, ring_attention_sharded, zigzag_order
from stablelayers._sigmoid import log_sigmoid, sigmoid, sigmoid_binary_cross_entropy
from stablelayers._softmax import masked_softmax, softmax
from stablelayers._softplus import softplus
from stablelayers._switches import forward_mode, pure_jax

__version__ = "0.1.0"

__all__ = [
    "dot_product_attention",
    "forward_mode",
    "linear_softmax_cross_entropy",
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

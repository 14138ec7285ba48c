"""stablelayers: softmax-family ops for JAX whose forward and backward passes never
overflow, never leak a NaN, and keep only what the backward pass needs."""

from stablelayers._attention import dot_product_attention
from stablelayers._functions import log_softmax, masked_softmax, softmax, softplus
from stablelayers._kernel_switch import pure_jax
from stablelayers._mode import forward_mode
from stablelayers._ring_attention import ring_attention, ring_attention_sharded, zigzag_order

__version__ = "0.1.0"

__all__ = [
    "dot_product_attention",
    "forward_mode",
    "log_softmax",
    "masked_softmax",
    "pure_jax",
    "ring_attention",
    "ring_attention_sharded",
    "softmax",
    "softplus",
    "zigzag_order",
]

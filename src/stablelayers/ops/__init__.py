"""The softmax family, one module each: value, reverse- and forward-mode rules, and the
CPU kernel hook, read top to bottom."""

from stablelayers.ops._log_softmax import log_softmax
from stablelayers.ops._logsumexp import logsumexp
from stablelayers.ops._sigmoid import log_sigmoid, sigmoid
from stablelayers.ops._softmax import masked_softmax, softmax
from stablelayers.ops._softplus import softplus

__all__ = [
    "log_sigmoid",
    "log_softmax",
    "logsumexp",
    "masked_softmax",
    "sigmoid",
    "softmax",
    "softplus",
]

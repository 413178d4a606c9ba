"""Input features that are the same in every example, carried by the first layer's bias.

A feature that is constant over the examples a product reads (x_in = c_i for every n: 67 of
MNIST's 784 pixels are 0 in all 60,000 training images) adds W_i c_i to every example's
pre-activation, which the bias can carry, and its weights receive c_i times the bias's
gradient. With v the varying features and c the constant ones::

    h = W_v X_v + (b + W_c c)        [dW_v | db] = G [X_v | 1]^T        dW_c = db c^T

The same numbers to rounding, from the first layer's two products over the varying features
alone, with a row of ones that carries the bias: on MNIST's training images 718 columns instead
of 785, 8.5 % less of the arithmetic that is nearly all of a step. The split holds for whatever
input it was taken from (the test images have their own), and a layer without a bias gets one
for the product (W_c c, zero where the constant features are 0) while its gradient is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class FeatureSplit:
    """Which features of an input vary over its examples: ``varying [k]`` and ``constant [D - k]``
    (indices), and ``values [D - k]``, the constant features' values c."""

    varying: torch.Tensor
    constant: torch.Tensor
    values: torch.Tensor

    @classmethod
    def of(cls, x_t: torch.Tensor) -> "FeatureSplit":
        """The split of the feature-major input ``x_t [D, n]``."""
        same = (x_t == x_t[:, :1]).all(1)
        constant = same.nonzero().squeeze(1)
        return cls((~same).nonzero().squeeze(1), constant, x_t[constant, 0].clone())

    @property
    def columns(self) -> int:
        """k + 1: the varying features and the row of ones."""
        return len(self.varying) + 1

    def operand(self, x_t: torch.Tensor, dtype: torch.dtype | None = None, multiple: int = 1) -> torch.Tensor:
        """``[X_v; 1; 0...]`` ``[kp, n]`` (feature-major) from ``x_t [D, n]``: the varying features, a
        row of ones, and rows of zeros up to ``kp``, the next multiple of ``multiple``."""
        n = x_t.shape[1]
        rows = torch.zeros(-(-self.columns // multiple) * multiple, n, dtype=dtype or x_t.dtype,
                           device=x_t.device)
        rows[:self.columns - 1].copy_(x_t[self.varying])
        rows[self.columns - 1] = 1
        return rows

    def weight(self, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
        """``[W_v | b + W_c c | 0...]`` into ``out [M, kp]`` from ``weight [M, D]`` and ``bias [M]``
        (or None: a bias of 0), the operand that multiplies :meth:`operand`'s."""
        k = self.columns - 1
        out[:, :k].copy_(weight[:, self.varying])
        folded = out[:, k].copy_(weight[:, self.constant] @ self.values.to(weight.dtype))  # 0 if none
        if bias is not None:
            folded += bias
        out[:, k + 1:].zero_()
        return out

    def gradients(self, product: torch.Tensor, grad_weight: torch.Tensor,
                  grad_bias: torch.Tensor | None) -> None:
        """From ``product = G [X_v; 1; 0...]^T [M, kp]``: dW_v, dW_c = db c^T into
        ``grad_weight [M, D]``, and db (its column k) into ``grad_bias [M]`` where there is one."""
        k = self.columns - 1
        product = product.to(grad_weight.dtype)            # a bf16 product's gradients in fp32
        db = product[:, k]
        grad_weight.index_copy_(1, self.varying, product[:, :k])
        grad_weight.index_copy_(1, self.constant, db.unsqueeze(1) * self.values.to(db.dtype))
        if grad_bias is not None:
            grad_bias.copy_(db)


@dataclass(frozen=True)
class FirstLayerInput:
    """An input as the first layer's two products read it: ``columns [kp, n]``, its varying
    features, a row of ones and rows of zeros (:meth:`FeatureSplit.operand`) in the products'
    dtype, and where asked for the same example-major, ``rows [n, kp]`` (oneDNN's forward
    operand; else None). ``source`` is the input it was taken from: a step keeps it while its
    input is the same tensor."""

    source: torch.Tensor
    split: FeatureSplit
    columns: torch.Tensor
    rows: torch.Tensor | None

    @classmethod
    def of(cls, x: torch.Tensor, dtype: torch.dtype | None = None, multiple: int = 1,
           example_major: bool = False) -> "FirstLayerInput":
        """From the feature-major input ``x [D, n]``."""
        split = FeatureSplit.of(x)
        columns = split.operand(x, dtype, multiple)
        return cls(x, split, columns, columns.t().contiguous() if example_major else None)

    @cached_property
    def column_halves(self) -> torch.Tensor:
        """``[X_hi; X_lo; X_hi]`` ``[3 kp, n]``: the TF32 halves of the fp32 ``columns``
        (:func:`distrep.fused.tf32_halves`) as the 3xtf32 products read them, made on first use
        and kept with the input."""
        from distrep.fused import tf32_halves          # distrep.fused imports this module
        hi, lo = tf32_halves(self.columns)
        return torch.cat([hi, lo, hi])

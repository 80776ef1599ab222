"""Deformation decoder of X2-Gaussian (x2gaussian.md §5): HexPlane feature -> (Δμ, Δs, Δq).

  trunk  feature_out: Linear(F -> W), then (D-1) x [ReLU, Linear(W -> W)]; no activation at the end
  heads  pos_deform / scales_deform / rotations_deform: ReLU, Linear(W -> W), ReLU, Linear(W -> k)
         with k = 3, 3, 4

Initialisation as the reference: every weight Xavier-uniform (gain 1, bound sqrt(6/(fan_in+fan_out)));
every bias PyTorch's default Uniform(-1/sqrt(fan_in), +1/sqrt(fan_in)). The heads are therefore NOT
zero-initialised (offsets are O(0.1) at the start of the fine stage, as in the reference).

Submodule names follow the reference state-dict indices (`feature_out.0` -> `feature_out_0`,
`pos_deform.1` -> `pos_deform_1`, ...) so weights can be ported one-to-one (PyTorch stores weights
as [out, in]; Flax kernels are [in, out]). The reference's unused `timenet` is not built.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.scipy.linalg import block_diag
import numpy as np

# (submodule name, output key, output width)
HEADS = (("pos_deform", "dx", 3), ("scales_deform", "ds", 3), ("rotations_deform", "dr", 4))


def torch_default_bias_init(fan_in: int):
    """PyTorch nn.Linear's default bias init: Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


@jax.custom_vjp
def relu(x: jax.Array) -> jax.Array:
    """max(x, 0) whose backward mask is taken from the output (y > 0, the same as x > 0; 0 at 0 as `nn.relu`).

    Why: with `nn.relu` autodiff saves the input's mask (a [N, W] bool array computed in the forward) beside the
    output that the next layer saves anyway; in the H200 profile of the X2 fine step (2026-12-04, 500k decoder rows)
    the masks were their own passes (0.17 ms) beside the ReLUs (0.25 ms). Here the only residual is the output and
    the mask is recomputed inside the backward's elementwise pass. Same values and gradients. Reverse mode only
    (a custom VJP): nothing in the project differentiates the decoder forward-mode."""
    return jnp.maximum(x, 0.0)


def _relu_fwd(x):
    y = jnp.maximum(x, 0.0)
    return y, y


def _relu_bwd(y, g):
    return (jnp.where(y > 0.0, g, jnp.zeros_like(g)),)


relu.defvjp(_relu_fwd, _relu_bwd)


def _linear(features: int, fan_in: int, name: str) -> nn.Dense:
    return nn.Dense(features, kernel_init=nn.initializers.xavier_uniform(),
                    bias_init=torch_default_bias_init(fan_in), name=name)


class DeformationDecoder(nn.Module):
    """Maps HexPlane features [N, F] to {"hidden": [N, W], "dx": [N, 3], "ds": [N, 3], "dr": [N, 4]}.

    Offsets are in pre-activation space: dx world units, ds log-scale, dr raw (unnormalised) quaternion.
    `hidden` is the trunk output h (exposed for extra heads such as PhysX's uncertainty head).
    """

    in_features: int = 128
    width: int = 64
    depth: int = 1
    heads: Sequence[tuple] = HEADS

    @nn.compact
    def __call__(self, features: jax.Array) -> dict:
        if features.shape[-1] != self.in_features:
            raise ValueError(f"DeformationDecoder: expected features [..., {self.in_features}], got {features.shape}")
        h = _linear(self.width, self.in_features, "feature_out_0")(features)
        for i in range(self.depth - 1):  # torch Sequential indices: 0 Linear, 1 ReLU, 2 Linear, ...
            h = _linear(self.width, self.width, f"feature_out_{2 * i + 2}")(relu(h))
        out = {"hidden": h}
        for name, key, k in self.heads:
            y = _linear(self.width, self.width, f"{name}_1")(relu(h))
            out[key] = _linear(k, self.width, f"{name}_3")(relu(y))
        return out


def num_decoder_params(in_features: int = 128, width: int = 64, depth: int = 1, heads: Sequence[tuple] = HEADS) -> int:
    """Closed-form parameter count of `DeformationDecoder`."""
    n = in_features * width + width + (depth - 1) * (width * width + width)
    for _, _, k in heads:
        n += width * width + width + width * k + k
    return int(n)


def decode_fused(params, features: jax.Array, depth: int = 1, heads: Sequence[tuple] = HEADS) -> dict:
    """`DeformationDecoder(...).apply({"params": params}, features)` with the heads' GEMMs merged: the three heads'
    first layers as one [W, 3W] product, their output layers as one block-diagonal [3W, 3+3+4] product (the zero
    blocks add exact zeros, so every output is the same sum; only the GEMMs' accumulation order may differ).
    Three matrix products forward instead of seven (depth 1), for the A/B `X2GS_DECODER=fused`
    (fields/deformation.py). params: the module's parameter dict (same names, unchanged)."""
    dense = lambda x, p: x @ p["kernel"] + p["bias"]  # noqa: E731
    h = dense(features, params["feature_out_0"])
    for i in range(depth - 1):
        h = dense(relu(h), params[f"feature_out_{2 * i + 2}"])
    first = [params[f"{name}_1"] for name, _, _ in heads]
    last = [params[f"{name}_3"] for name, _, _ in heads]
    y = relu(dense(relu(h), {"kernel": jnp.concatenate([p["kernel"] for p in first], axis=1),
                             "bias": jnp.concatenate([p["bias"] for p in first])}))
    z = y @ block_diag(*[p["kernel"] for p in last]) + jnp.concatenate([p["bias"] for p in last])
    out = {"hidden": h}
    col = 0
    for (_, key, k) in heads:
        out[key] = z[..., col:col + k]
        col += k
    return out

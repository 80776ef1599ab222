"""The PhysX-Gaussian spacetime transformer (physx.md §1.4-1.5): anchor positions + one time -> anchor displacements.

  pos   = Linear(3 -> P) . ReLU . Linear(P -> P)                          on raw anchor xyz        [M, P]
  time  = Linear(2F -> Tm)([sin(t f), cos(t f)]), f in R^F learnable, init pi (1..F) (x time_freq_scale), F = Tm / 2
  token = Linear(P + Tm -> d)(concat(pos, time))                                                    [M, d]
  (BERT mask: the tokens of the masked anchors are replaced by one learnable mask token [d])
  L x post-norm encoder layers:  h = LN1(x + Drop(MHA(x))),  y = LN2(h + Drop(W2 Drop(GELU(W1 h))))
  head  = Linear(d -> d) . GELU . Linear(d -> 3)                                                    [M, 3]

GELU is exact (erf); LayerNorm eps 1e-5; FFN width 4 d; dropout (default 0.1) on the attention probabilities
and after attention, the FFN activation and the FFN output. Initialisers follow PyTorch: every Linear weight
and bias U(+-1/sqrt(fan_in)); the packed q/k/v projection xavier-uniform over its [3d, d] matrix with zero
bias; the attention output bias 0; LayerNorm 1/0; the mask token N(0, 0.02^2). All encoder layers start
identical (PyTorch deep-copies one layer): `init_transformer` copies layer 0 into the others.

Parameter groups (§1.8): the encoder layers ("layer_*") are "anchor_transformer"; everything else
(position/time embeddings, learnable frequencies, input projection, head, mask token) is "anchor_deformation".
The reference's unused heads (backward displacement, scale, rotation) are not built: they never get a gradient.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from x2gs_jax.fields.decoder import torch_default_bias_init

LAYER_PREFIX = "layer_"
LN_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Sizes of the spacetime transformer (defaults = the reference flags, physx.md §1.1)."""

    dim: int = 64  # transformer_dim
    heads: int = 4  # transformer_heads
    layers: int = 2  # transformer_layers
    pos_embed_dim: int = 32  # anchor_pos_embed_dim
    time_embed_dim: int = 16  # anchor_time_embed_dim (2 x the number of learnable frequencies)
    dropout: float = 0.1
    # Initial frequencies pi * (1..F) * time_freq_scale (rad per unit of normalised time). 1.0 is the reference:
    # its fastest wave then has a period of a quarter of the scan (15 s of a 60 s scan), slower than a 3 s breath.
    time_freq_scale: float = 1.0
    # V16 (physx.md §3.2): a learnable [2, dim] table E (init N(0, 0.02^2)) whose row flag_{k,j} is added to
    # every (time, anchor) token of the spatio-temporal passes. Built only when the variant is on.
    flag_embed: bool = False

    def __post_init__(self):
        if self.dim % self.heads:
            raise ValueError(f"physx.transformer_dim={self.dim} must be divisible by transformer_heads={self.heads}")
        if self.time_embed_dim < 2 or self.time_embed_dim % 2:
            raise ValueError(f"physx.anchor_time_embed_dim must be an even number >= 2, got {self.time_embed_dim}")
        if min(self.dim, self.heads, self.layers, self.pos_embed_dim) < 1:
            raise ValueError("physx: transformer_dim, transformer_heads, transformer_layers and anchor_pos_embed_dim "
                             "must be >= 1")
        if not self.time_freq_scale > 0:
            raise ValueError(f"physx.time_freq_scale must be > 0, got {self.time_freq_scale}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"physx.dropout must lie in [0, 1), got {self.dropout}")


def torch_linear(features: int, fan_in: int, name: str) -> nn.Dense:
    """nn.Linear with PyTorch's default init: weight and bias U(+-1/sqrt(fan_in))."""
    return nn.Dense(features, kernel_init=_uniform(1.0 / np.sqrt(fan_in)), bias_init=torch_default_bias_init(fan_in),
                    name=name)


def _uniform(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def gelu(x):
    return nn.gelu(x, approximate=False)  # PyTorch's "gelu" is the exact erf form


class EncoderLayer(nn.Module):
    """PyTorch `TransformerEncoderLayer` (norm_first=False, activation gelu, batch of one sequence)."""

    dim: int
    heads: int
    dropout: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        m, d = x.shape
        hd = d // self.heads
        w_in = self.param("in_proj_kernel", _uniform(float(np.sqrt(6.0 / (d + 3 * d)))), (d, 3 * d))
        b_in = self.param("in_proj_bias", nn.initializers.zeros, (3 * d,))
        q, k, v = jnp.split(x @ w_in + b_in, 3, axis=-1)
        q, k, v = (a.reshape(m, self.heads, hd).transpose(1, 0, 2) for a in (q, k, v))  # [h, M, hd]
        probs = jax.nn.softmax(q @ k.transpose(0, 2, 1) / np.sqrt(hd), axis=-1)
        probs = nn.Dropout(self.dropout)(probs, deterministic=deterministic)
        att = (probs @ v).transpose(1, 0, 2).reshape(m, d)
        bound = 1.0 / np.sqrt(d)
        att = nn.Dense(d, kernel_init=_uniform(bound), bias_init=nn.initializers.zeros, name="out_proj")(att)
        h = nn.LayerNorm(epsilon=LN_EPS, name="norm1")(x + nn.Dropout(self.dropout)(att, deterministic=deterministic))
        f = gelu(torch_linear(4 * d, d, "linear1")(h))
        f = torch_linear(d, 4 * d, "linear2")(nn.Dropout(self.dropout)(f, deterministic=deterministic))
        return nn.LayerNorm(epsilon=LN_EPS, name="norm2")(h + nn.Dropout(self.dropout)(f, deterministic=deterministic))


class SpacetimeTransformer(nn.Module):
    """(anchors [M, 3], t [] or [K], mask [M] bool or None, flags [K, M] int or None) -> Δa [M, 3] or [K, M, 3].

    One time t: the ordinary anchor pass. A vector of K times (V16): K x M (time, anchor) tokens attend to each
    other in one encoder pass (batch of one sequence of length K*M), each token plus `flag_scale` E[flag]."""

    config: TransformerConfig = TransformerConfig()

    @nn.compact
    def __call__(self, anchors: jax.Array, t, mask=None, deterministic: bool = True, flags=None,
                 flag_scale: float = 1.0) -> jax.Array:
        c = self.config
        m = anchors.shape[0]
        t = jnp.asarray(t, jnp.float32)
        times = t.reshape(-1)  # [K]
        p = torch_linear(c.pos_embed_dim, 3, "pos_embed_0")(anchors)
        p = torch_linear(c.pos_embed_dim, c.pos_embed_dim, "pos_embed_2")(nn.relu(p))
        n_freq = c.time_embed_dim // 2
        freqs = self.param("time_freqs", lambda _k, s: jnp.pi * c.time_freq_scale * jnp.arange(1, s[0] + 1,
                                                                                                 dtype=jnp.float32),
                           (n_freq,))
        s = times[:, None] * freqs  # [K, F]
        te = torch_linear(c.time_embed_dim, 2 * n_freq, "time_proj")(jnp.concatenate([jnp.sin(s), jnp.cos(s)], -1))
        k = times.shape[0]
        tokens = jnp.concatenate([jnp.broadcast_to(p, (k, m, c.pos_embed_dim)),
                                  jnp.broadcast_to(te[:, None, :], (k, m, c.time_embed_dim))], axis=-1)
        x = torch_linear(c.dim, c.pos_embed_dim + c.time_embed_dim, "input_proj")(tokens)  # [K, M, d]
        mask_token = self.param("mask_token", nn.initializers.normal(0.02), (c.dim,))
        if c.flag_embed:
            table = self.param("mask_flag_embed", nn.initializers.normal(0.02), (2, c.dim))
            if flags is not None:  # added, never a replacement (the full pass adds E[0] to every token)
                x = x + flag_scale * table[flags]
        elif flags is not None:
            raise ValueError("SpacetimeTransformer: flags need TransformerConfig(flag_embed=True)")
        if mask is not None:
            x = jnp.where(mask[..., None], mask_token, x)
        x = x.reshape(k * m, c.dim)
        for i in range(c.layers):
            x = EncoderLayer(c.dim, c.heads, c.dropout, name=f"{LAYER_PREFIX}{i}")(x, deterministic)
        h = gelu(torch_linear(c.dim, c.dim, "head_0")(x))
        out = torch_linear(3, c.dim, "head_2")(h).reshape(k, m, 3)
        return out[0] if t.ndim == 0 else out


def init_transformer(key: jax.Array, config: TransformerConfig) -> dict:
    """Flax params of `SpacetimeTransformer` with every encoder layer a copy of layer 0 (PyTorch's deep copy)."""
    params = SpacetimeTransformer(config).init(key, jnp.zeros((2, 3), jnp.float32), 0.0)["params"]
    params = dict(params)
    for i in range(1, config.layers):
        params[f"{LAYER_PREFIX}{i}"] = jax.tree.map(jnp.copy, params[f"{LAYER_PREFIX}0"])
    return params


def transformer_labels(params: dict) -> dict:
    """Optimiser group of every leaf: encoder layers "anchor_transformer", the rest "anchor_deformation"."""
    return {name: jax.tree.map(lambda _, n=name: "anchor_transformer" if n.startswith(LAYER_PREFIX)
                               else "anchor_deformation", sub)
            for name, sub in params.items()}


def anchor_displacements(params: dict, config: TransformerConfig, anchors: jax.Array, t, *, mask=None,
                         dropout_key=None, flags=None, flag_scale: float = 1.0) -> jax.Array:
    """Δa [M, 3] at normalised time t ([K, M, 3] for times [K]). Dropout is on iff `dropout_key` is given; `mask`
    [M] bool or None (BERT replacement by the mask token); `flags` [K, M] int (V16 flag embedding, added)."""
    rngs = None if dropout_key is None else {"dropout": dropout_key}
    return SpacetimeTransformer(config).apply({"params": params}, anchors, t, mask, dropout_key is None, flags,
                                              flag_scale, rngs=rngs)

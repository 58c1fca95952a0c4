"""The shape of a Llama/Gemma-family decoder, and the configs we ship.

One frozen `DecoderConfig` describes every model the reference decoder can
run: SmolLM2 and other Llama checkpoints (SwiGLU, RMSNorm, rotary positions,
grouped-query attention; Touvron et al. 2023), and Gemma's variations on it
(embeddings scaled by `sqrt(d_model)`, RMSNorm scaled by `1 + scale`, GeGLU;
Gemma Team 2024). `from_hf_config` reads a Hugging Face `config.json`.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import math
from typing import Any

ACTIVATIONS = ('silu', 'gelu_tanh', 'gelu')

# Hugging Face activation names -> ours.
_HF_ACTIVATIONS = {
  'silu': 'silu',
  'swish': 'silu',
  'gelu_pytorch_tanh': 'gelu_tanh',
  'gelu_new': 'gelu_tanh',
  'gelu_fast': 'gelu_tanh',
  'gelu': 'gelu',
}

_SUPPORTED_MODEL_TYPES = ('llama', 'gemma')


def _rope_theta(hf: Mapping[str, Any]) -> float:
  """The rotary base of an HF config of either generation, or an error.

  transformers 4 writes a top-level `rope_theta` (and `rope_scaling` when
  the rope is scaled); transformers 5 writes `rope_parameters:
  {rope_type, rope_theta, ...}` and no top-level `rope_theta`. Only the
  plain rope (`rope_type` 'default') runs here: a scaled one would load
  with wrong positions, so it is refused.
  """
  thetas = {}
  if hf.get('rope_theta') is not None:
    thetas['rope_theta'] = hf['rope_theta']
  for key in ('rope_scaling', 'rope_parameters'):
    value = hf.get(key)
    if value is None:
      continue
    per_layer = not isinstance(value, Mapping) or any(
        isinstance(v, Mapping) for v in value.values())
    kind = None if per_layer else value.get('rope_type',
                                            value.get('type', 'default'))
    if kind != 'default':
      raise ValueError(
        f'config.json sets {key}={value!r}: a {kind or "per-layer"} rope, '
        'which the reference decoder does not implement (it runs the plain '
        "rope, rope_type 'default'). Use a checkpoint without rope "
        'scaling.')
    if value.get('rope_theta') is not None:
      thetas[f'{key}.rope_theta'] = value['rope_theta']
  values = {float(v) for v in thetas.values()}
  if len(values) > 1:
    raise ValueError(
      f'config.json gives two rotary bases: {thetas!r}. Keep one of them.')
  return values.pop() if values else 10_000.0  # HF's Llama default


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig:
  """Hyper-parameters of a decoder-only transformer.

  Attributes:
    vocab_size: number of token ids.
    d_model: width of the residual stream.
    n_layers: number of transformer blocks.
    n_heads: number of query heads.
    n_kv_heads: number of key/value heads (grouped-query attention when
      fewer than `n_heads`; it must divide `n_heads`).
    head_dim: width of one head (even, for rotary embeddings).
    ffn_dim: hidden width of the gated feed-forward.
    norm_eps: epsilon of RMSNorm.
    rope_theta: base period of the rotary embedding.
    tie_embeddings: whether logits reuse the input embedding table.
    activation: gate activation, one of `ACTIVATIONS`.
    scale_embeddings: Gemma: multiply embeddings by `sqrt(d_model)`.
    norm_add_one: Gemma: RMSNorm multiplies by `1 + scale` (scale starts at
      0) instead of `scale` (starting at 1).
    query_pre_attn_scalar: queries are scaled by this to the power -1/2;
      `None` means `head_dim`.
    max_len: the longest context the model was trained for.

  Example:
    >>> cfg = tiny_config()
    >>> cfg.n_heads // cfg.n_kv_heads
    2
    >>> DecoderConfig(**{**dataclasses.asdict(cfg), 'n_kv_heads': 3})
    Traceback (most recent call last):
    ...
    ValueError: n_heads=4 must be a multiple of n_kv_heads=3 ...
  """

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  ffn_dim: int
  norm_eps: float = 1e-5
  rope_theta: float = 10_000.0
  tie_embeddings: bool = True
  activation: str = 'silu'
  scale_embeddings: bool = False
  norm_add_one: bool = False
  query_pre_attn_scalar: float | None = None
  max_len: int = 8192

  def __post_init__(self):
    for name in ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads',
                 'head_dim', 'ffn_dim', 'max_len'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
          f'DecoderConfig.{name} must be a positive int; got {value!r}. '
          'Pass a whole number of at least 1.')
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
        f'n_heads={self.n_heads!r} must be a multiple of '
        f'n_kv_heads={self.n_kv_heads!r} in DecoderConfig (each key/value '
        'head serves a whole group of query heads). Fix the head counts.')
    if self.head_dim % 2:
      raise ValueError(
        f'DecoderConfig.head_dim must be even for rotary embeddings; got '
        f'{self.head_dim!r}. Use an even head_dim.')
    if self.activation not in ACTIVATIONS:
      raise ValueError(
        f'DecoderConfig.activation must be one of {ACTIVATIONS}; got '
        f'{self.activation!r}.')
    for name in ('norm_eps', 'rope_theta'):
      value = getattr(self, name)
      if not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(
          f'DecoderConfig.{name} must be a positive number; got {value!r}.')

  @property
  def query_scale(self) -> float:
    """The factor applied to queries before the dot product."""
    scalar = self.query_pre_attn_scalar or self.head_dim
    return 1.0 / math.sqrt(scalar)

  @classmethod
  def from_hf_config(cls, hf: Mapping[str, Any]) -> DecoderConfig:
    """Reads a Hugging Face `config.json` dict (Llama or Gemma).

    Raises:
      ValueError: for a model type or option this decoder cannot run
        (attention biases, rope scaling, ...), or a missing key.

    Example:
      >>> cfg = DecoderConfig.from_hf_config({
      ...     'model_type': 'llama', 'vocab_size': 32, 'hidden_size': 16,
      ...     'num_hidden_layers': 1, 'num_attention_heads': 2,
      ...     'intermediate_size': 24})
      >>> cfg.n_kv_heads, cfg.head_dim, cfg.tie_embeddings
      (2, 8, False)
    """
    model_type = hf.get('model_type')
    if model_type not in _SUPPORTED_MODEL_TYPES:
      raise ValueError(
        f'config.json has model_type={model_type!r}; the reference decoder '
        f'runs {_SUPPORTED_MODEL_TYPES}. Convert the checkpoint to one of '
        'those architectures.')
    rope_theta = _rope_theta(hf)
    for key in ('sliding_window',):
      if hf.get(key) is not None:
        raise ValueError(
          f'config.json sets {key}={hf[key]!r}, which the reference decoder '
          f'does not implement. Use a checkpoint without {key}.')
    for key in ('attention_bias', 'mlp_bias'):
      if hf.get(key):
        raise ValueError(
          f'config.json sets {key}=True; the reference decoder has no '
          'biases. Use a bias-free Llama/Gemma checkpoint.')

    def need(key):
      if key not in hf:
        raise ValueError(
          f'config.json lacks {key!r} (model_type {model_type!r}). Add it; '
          'it is required to build the decoder.')
      return hf[key]

    n_heads = need('num_attention_heads')
    d_model = need('hidden_size')
    gemma = model_type == 'gemma'
    act_key = 'hidden_activation' if gemma else 'hidden_act'
    default_act = 'gelu_pytorch_tanh' if gemma else 'silu'
    hf_act = hf.get(act_key) or hf.get('hidden_act') or default_act
    if hf_act not in _HF_ACTIVATIONS:
      raise ValueError(
        f'config.json has {act_key}={hf_act!r}; supported: '
        f'{sorted(_HF_ACTIVATIONS)}.')
    return cls(
      vocab_size=need('vocab_size'),
      d_model=d_model,
      n_layers=need('num_hidden_layers'),
      n_heads=n_heads,
      n_kv_heads=hf.get('num_key_value_heads') or n_heads,
      head_dim=hf.get('head_dim') or d_model // n_heads,
      ffn_dim=need('intermediate_size'),
      norm_eps=float(hf.get('rms_norm_eps', 1e-6 if gemma else 1e-5)),
      rope_theta=rope_theta,
      tie_embeddings=bool(hf.get('tie_word_embeddings', gemma)),
      activation=_HF_ACTIVATIONS[hf_act],
      scale_embeddings=gemma,
      norm_add_one=gemma,
      query_pre_attn_scalar=hf.get('query_pre_attn_scalar'),
      max_len=int(hf.get('max_position_embeddings', 8192)),
    )

  def to_hf_config(self) -> dict[str, Any]:
    """The Hugging Face `config.json` dict that `from_hf_config` inverts.

    Example:
      >>> cfg = tiny_config()
      >>> DecoderConfig.from_hf_config(cfg.to_hf_config()) == cfg
      True
    """
    gemma = self.scale_embeddings or self.norm_add_one
    if gemma and not (self.scale_embeddings and self.norm_add_one):
      raise ValueError(
        'to_hf_config needs scale_embeddings and norm_add_one both True '
        f'(Gemma) or both False (Llama); got {self.scale_embeddings!r} and '
        f'{self.norm_add_one!r}. No Hugging Face architecture mixes them.')
    hf_act = {'silu': 'silu', 'gelu_tanh': 'gelu_pytorch_tanh', 'gelu': 'gelu'}
    hf = {
      'model_type': 'gemma' if gemma else 'llama',
      'architectures': ['GemmaForCausalLM' if gemma else 'LlamaForCausalLM'],
      'vocab_size': self.vocab_size,
      'hidden_size': self.d_model,
      'num_hidden_layers': self.n_layers,
      'num_attention_heads': self.n_heads,
      'num_key_value_heads': self.n_kv_heads,
      'head_dim': self.head_dim,
      'intermediate_size': self.ffn_dim,
      'rms_norm_eps': self.norm_eps,
      'rope_theta': self.rope_theta,
      'tie_word_embeddings': self.tie_embeddings,
      ('hidden_activation' if gemma else 'hidden_act'): hf_act[
        self.activation],
      'max_position_embeddings': self.max_len,
    }
    if self.query_pre_attn_scalar is not None:
      hf['query_pre_attn_scalar'] = self.query_pre_attn_scalar
    return hf


def smollm2_135m() -> DecoderConfig:
  """SmolLM2-135M (Allal et al. 2025): a 30-layer Llama with tied embeddings.

  Example:
    >>> smollm2_135m().n_layers, smollm2_135m().head_dim
    (30, 64)
  """
  return DecoderConfig(
    vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
    head_dim=64, ffn_dim=1536, norm_eps=1e-5, rope_theta=100_000.0,
    tie_embeddings=True, activation='silu', max_len=8192)


def tiny_config(**overrides: Any) -> DecoderConfig:
  """A 2-layer random-weight config for tests and examples.

  Example:
    >>> tiny_config(n_layers=1).n_layers
    1
  """
  fields = dict(
    vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
    head_dim=16, ffn_dim=128, norm_eps=1e-5, rope_theta=10_000.0,
    tie_embeddings=True, activation='silu', max_len=256)
  fields.update(overrides)
  return DecoderConfig(**fields)

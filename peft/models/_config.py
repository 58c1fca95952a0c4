"""The shape of a Llama/Gemma-family decoder, and the configs we ship.

One frozen `DecoderConfig` describes every model the reference decoder can
run: SmolLM2 and other Llama checkpoints (SwiGLU, RMSNorm, rotary positions,
grouped-query attention; Touvron et al. 2023), Gemma's variations on it
(embeddings scaled by `sqrt(d_model)`, RMSNorm scaled by `1 + scale`, GeGLU;
Gemma Team 2024), and Gemma 3's (RMSNorm of queries and keys, norms after
attention and feed-forward too, sliding-window layers with their own rotary
base between global ones; Gemma Team 2025). `from_hf_config` reads a
Hugging Face `config.json`.
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

_SUPPORTED_MODEL_TYPES = ('llama', 'gemma', 'gemma3_text')

# Hugging Face's names of the two kinds of attention layer.
FULL_ATTENTION, SLIDING_ATTENTION = 'full_attention', 'sliding_attention'


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
    qk_norm: Gemma 3: RMSNorm (over `head_dim`) of queries and keys before
      the rotary embedding.
    post_norms: Gemma 2/3: RMSNorm of the attention and feed-forward outputs
      too, before each is added to the residual stream.
    sliding_window: in sliding layers a query sees only the keys fewer than
      this many positions back; `None`: every layer attends globally.
    sliding_window_pattern: with a `sliding_window`, layers `N-1, 2N-1, ...`
      attend globally and the others slide (Gemma 3: 6); `None`: every
      layer slides.
    rope_local_theta: rotary base of the sliding layers (Gemma 3: 10 000);
      `None`: `rope_theta`.
    attn_logit_softcap: attention logits pass through
      `cap * tanh(logits / cap)` (Gemma 2); `None`: no cap.
    final_logit_softcap: the same for the output logits.

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
  qk_norm: bool = False
  post_norms: bool = False
  sliding_window: int | None = None
  sliding_window_pattern: int | None = None
  rope_local_theta: float | None = None
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None

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
    for name in ('sliding_window', 'sliding_window_pattern'):
      value = getattr(self, name)
      if value is not None and (isinstance(value, bool)
                                or not isinstance(value, int) or value < 1):
        raise ValueError(
          f'DecoderConfig.{name} must be a positive int or None; got '
          f'{value!r}. Pass a whole number of at least 1, or None.')
    if self.sliding_window_pattern is not None and self.sliding_window is None:
      raise ValueError(
        'DecoderConfig.sliding_window_pattern='
        f'{self.sliding_window_pattern!r} needs a sliding_window; got None. '
        'Pass sliding_window=N, or sliding_window_pattern=None.')
    for name in ('rope_local_theta', 'attn_logit_softcap',
                 'final_logit_softcap', 'query_pre_attn_scalar'):
      value = getattr(self, name)
      if value is not None and not (isinstance(value, (int, float))
                                    and not isinstance(value, bool)
                                    and math.isfinite(value) and value > 0):
        raise ValueError(
          f'DecoderConfig.{name} must be a positive number or None; got '
          f'{value!r}.')
    for name in ('qk_norm', 'post_norms', 'tie_embeddings',
                 'scale_embeddings', 'norm_add_one'):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(
          f'DecoderConfig.{name} must be a bool; got '
          f'{getattr(self, name)!r}. Pass True or False.')

  def is_sliding(self, layer: int) -> bool:
    """Whether layer `layer` attends within the sliding window only.

    Example:
      >>> cfg = gemma3_270m()
      >>> [i for i in range(cfg.n_layers) if not cfg.is_sliding(i)]
      [5, 11, 17]
    """
    if self.sliding_window is None:
      return False
    pattern = self.sliding_window_pattern
    return pattern is None or (layer + 1) % pattern != 0

  def rope_base(self, layer: int) -> float:
    """The rotary base of layer `layer` (sliding layers may have their own).

    Example:
      >>> cfg = gemma3_270m()
      >>> cfg.rope_base(0), cfg.rope_base(5)
      (10000.0, 1000000.0)
    """
    if self.is_sliding(layer) and self.rope_local_theta is not None:
      return self.rope_local_theta
    return self.rope_theta

  def layer_types(self) -> list[str]:
    """Hugging Face's `layer_types`: each layer's kind of attention."""
    return [SLIDING_ATTENTION if self.is_sliding(i) else FULL_ATTENTION
            for i in range(self.n_layers)]

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
    gemma3 = model_type == 'gemma3_text'
    if gemma3:
      rope_theta, rope_local_theta = _gemma3_rope_bases(hf)
    else:
      rope_theta, rope_local_theta = _rope_theta(hf), None
      for key in ('sliding_window',):
        if hf.get(key) is not None:
          raise ValueError(
            f'config.json sets {key}={hf[key]!r}, which the reference '
            f'decoder implements for Gemma 3 only (model_type '
            f"'gemma3_text'). Use a checkpoint without {key}.")
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
    gemma = model_type in ('gemma', 'gemma3_text')
    act_key = 'hidden_activation' if gemma else 'hidden_act'
    default_act = 'gelu_pytorch_tanh' if gemma else 'silu'
    hf_act = hf.get(act_key) or hf.get('hidden_act') or default_act
    if hf_act not in _HF_ACTIVATIONS:
      raise ValueError(
        f'config.json has {act_key}={hf_act!r}; supported: '
        f'{sorted(_HF_ACTIVATIONS)}.')
    head_dim = hf.get('head_dim') or d_model // n_heads
    scalar = hf.get('query_pre_attn_scalar', 256 if gemma3 else None)
    window = pattern = None
    if gemma3:
      window = need('sliding_window')
      pattern = _sliding_window_pattern(hf, need('num_hidden_layers'))
    return cls(
      vocab_size=need('vocab_size'),
      d_model=d_model,
      n_layers=need('num_hidden_layers'),
      n_heads=n_heads,
      n_kv_heads=hf.get('num_key_value_heads') or n_heads,
      head_dim=head_dim,
      ffn_dim=need('intermediate_size'),
      norm_eps=float(hf.get('rms_norm_eps', 1e-6 if gemma else 1e-5)),
      rope_theta=rope_theta,
      tie_embeddings=bool(hf.get('tie_word_embeddings', gemma)),
      activation=_HF_ACTIVATIONS[hf_act],
      scale_embeddings=gemma,
      norm_add_one=gemma,
      # A scalar equal to head_dim is the default, so both spell one config.
      query_pre_attn_scalar=None if scalar == head_dim else scalar,
      max_len=int(hf.get('max_position_embeddings', 8192)),
      qk_norm=gemma3,
      post_norms=gemma3,
      sliding_window=window,
      sliding_window_pattern=pattern,
      rope_local_theta=rope_local_theta,
      # transformers' Gemma 3 reads attn_logit_softcapping but never applies
      # it (Gemma 3 replaced the cap by QK-norm; real checkpoints write
      # null), so a config that sets it runs uncapped there, and here.
      attn_logit_softcap=None if gemma3 else hf.get('attn_logit_softcapping'),
      final_logit_softcap=hf.get('final_logit_softcapping'),
    )

  def to_hf_config(self) -> dict[str, Any]:
    """The Hugging Face `config.json` dict that `from_hf_config` inverts.

    Example:
      >>> cfg = tiny_config()
      >>> DecoderConfig.from_hf_config(cfg.to_hf_config()) == cfg
      True
    """
    model_type = self._hf_model_type()
    gemma = model_type != 'llama'
    hf_act = {'silu': 'silu', 'gelu_tanh': 'gelu_pytorch_tanh', 'gelu': 'gelu'}
    hf: dict[str, Any] = {
      'model_type': model_type,
      'architectures': [_HF_ARCHITECTURES[model_type]],
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
    if model_type == 'gemma3_text':
      del hf['rope_theta']  # transformers 5 keeps it per kind of layer.
      local = self.rope_local_theta or self.rope_theta
      hf.update({
        'query_pre_attn_scalar': self.query_pre_attn_scalar or self.head_dim,
        'sliding_window': self.sliding_window,
        'layer_types': self.layer_types(),
        'rope_parameters': {
          FULL_ATTENTION: {'rope_type': 'default',
                           'rope_theta': self.rope_theta},
          SLIDING_ATTENTION: {'rope_type': 'default', 'rope_theta': local}},
        'attn_logit_softcapping': None,
        'final_logit_softcapping': self.final_logit_softcap,
      })
    return hf

  def _hf_model_type(self) -> str:
    """The Hugging Face architecture of this config, or an error."""
    gemma = self.scale_embeddings or self.norm_add_one
    if gemma and not (self.scale_embeddings and self.norm_add_one):
      raise ValueError(
        'to_hf_config needs scale_embeddings and norm_add_one both True '
        f'(Gemma) or both False (Llama); got {self.scale_embeddings!r} and '
        f'{self.norm_add_one!r}. No Hugging Face architecture mixes them.')
    gemma3 = {name: getattr(self, name) for name in (
      'qk_norm', 'post_norms', 'sliding_window', 'rope_local_theta',
      'attn_logit_softcap', 'final_logit_softcap')}
    if not any(gemma3.values()):
      return 'gemma' if gemma else 'llama'
    if not (gemma and self.qk_norm and self.post_norms):
      raise ValueError(
        f'to_hf_config: {gemma3!r} are Gemma 3 options, which Hugging Face '
        'writes only as a whole Gemma 3 (qk_norm, post_norms, '
        'scale_embeddings and norm_add_one all True). Set them all, or '
        'none.')
    if self.attn_logit_softcap is not None:
      raise ValueError(
        f'to_hf_config: attn_logit_softcap={self.attn_logit_softcap!r}, but '
        "transformers' Gemma 3 does not apply an attention soft cap, so the "
        'checkpoint would compute other logits there. Pass '
        'attn_logit_softcap=None.')
    return 'gemma3_text'


_HF_ARCHITECTURES = {'llama': 'LlamaForCausalLM',
                     'gemma': 'GemmaForCausalLM',
                     'gemma3_text': 'Gemma3ForCausalLM'}


def _gemma3_rope_bases(hf: Mapping[str, Any]) -> tuple[float, float]:
  """(global, sliding) rotary bases of a Gemma 3 config, or an error.

  transformers 5 writes `rope_parameters` per kind of layer; transformers 4
  writes `rope_theta` and `rope_local_base_freq` (and `rope_scaling`).
  """
  per_kind = hf.get('rope_parameters')
  if per_kind is None:
    bases = {FULL_ATTENTION: {'rope_theta': hf.get('rope_theta', 1e6)},
             SLIDING_ATTENTION: {
               'rope_theta': hf.get('rope_local_base_freq', 1e4)}}
    if hf.get('rope_scaling') is not None:
      bases[FULL_ATTENTION].update(hf['rope_scaling'])
  elif isinstance(per_kind, Mapping) and set(per_kind) == {
      FULL_ATTENTION, SLIDING_ATTENTION}:
    bases = per_kind
  else:
    raise ValueError(
      f'config.json sets rope_parameters={per_kind!r}; a Gemma 3 config '
      f'gives one entry for each of {FULL_ATTENTION!r} and '
      f'{SLIDING_ATTENTION!r}. Fix the file.')
  for kind, value in bases.items():
    rope_type = value.get('rope_type', value.get('type', 'default'))
    if rope_type != 'default':
      raise ValueError(
        f'config.json gives the {kind} layers a {rope_type!r} rope '
        f'({value!r}), which the reference decoder does not implement (it '
        "runs the plain rope, rope_type 'default'). Use a checkpoint "
        'without rope scaling, such as Gemma 3 270M or 1B.')
  return (float(bases[FULL_ATTENTION]['rope_theta']),
          float(bases[SLIDING_ATTENTION]['rope_theta']))


def _sliding_window_pattern(hf: Mapping[str, Any], n_layers: int) -> int | None:
  """A Gemma 3 config's layer kinds as `DecoderConfig.sliding_window_pattern`.

  transformers 5 lists `layer_types`; transformers 4 gives the period
  `sliding_window_pattern`. A list that no period describes is refused.
  """
  types = hf.get('layer_types')
  if types is None:
    return hf.get('sliding_window_pattern', 6)
  if len(types) != n_layers or set(types) - {FULL_ATTENTION,
                                              SLIDING_ATTENTION}:
    raise ValueError(
      f'config.json layer_types={types!r} must list {n_layers} entries '
      f'(num_hidden_layers), each {FULL_ATTENTION!r} or '
      f'{SLIDING_ATTENTION!r}. Fix the file.')
  full = [i for i, kind in enumerate(types) if kind == FULL_ATTENTION]
  if not full:
    return None
  pattern = full[0] + 1
  if full != list(range(pattern - 1, n_layers, pattern)):
    raise ValueError(
      f'config.json layer_types={types!r} puts global layers at {full}, '
      'which is not every N-th layer; the reference decoder runs periodic '
      'patterns only (layers N-1, 2N-1, ...). Use a checkpoint with a '
      'periodic pattern.')
  return pattern


def gemma3_270m() -> DecoderConfig:
  """Gemma 3 270M (Gemma Team 2025): 18 layers, 5 sliding to 1 global.

  Example:
    >>> cfg = gemma3_270m()
    >>> cfg.n_layers, cfg.head_dim, cfg.sliding_window, cfg.vocab_size
    (18, 256, 512, 262144)
  """
  return DecoderConfig(
    vocab_size=262_144, d_model=640, n_layers=18, n_heads=4, n_kv_heads=1,
    head_dim=256, ffn_dim=2048, norm_eps=1e-6, rope_theta=1_000_000.0,
    tie_embeddings=True, activation='gelu_tanh', scale_embeddings=True,
    norm_add_one=True, max_len=32_768, qk_norm=True, post_norms=True,
    sliding_window=512, sliding_window_pattern=6, rope_local_theta=10_000.0)


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


def tiny_gemma3_config(**overrides: Any) -> DecoderConfig:
  """A 3-layer random-weight Gemma 3 config (two sliding, one global).

  Example:
    >>> cfg = tiny_gemma3_config()
    >>> [cfg.is_sliding(i) for i in range(cfg.n_layers)]
    [True, True, False]
  """
  fields = dict(
    vocab_size=320, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2,
    head_dim=16, ffn_dim=128, norm_eps=1e-6, rope_theta=1_000_000.0,
    tie_embeddings=True, activation='gelu_tanh', scale_embeddings=True,
    norm_add_one=True, max_len=256, qk_norm=True, post_norms=True,
    sliding_window=4, sliding_window_pattern=3, rope_local_theta=10_000.0)
  fields.update(overrides)
  return DecoderConfig(**fields)

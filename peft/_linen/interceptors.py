"""Module surgery by method interception.

`Interceptor` is a context manager around `flax.linen.intercept_methods`.
`ModuleInterceptor` replaces modules on the fly: the first time a module is
called inside the context, `replace_module_fn(module)` gives the module to
use instead, and every later call of the same module reuses that replacement
(so a layer called twice shares one adapter).

All mutable state lives in a `contextvars.ContextVar`, not on the (frozen)
interceptor object, so two threads or two asyncio tasks may enter the same
interceptor at once and each sees only its own replacements.

Interception happens while a model runs, so a compiled function traced
earlier (`jax.jit`, flax's `nn.jit`) would replay whatever surgery was active
when it was traced. To prevent that, the active interceptors are part of
JAX's compilation-cache key (`jax.make_user_context`): entering or leaving a
surgery makes the next call of a jitted function trace afresh, and equal
surgeries (same rules) share one trace.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
import contextlib
import contextvars
import dataclasses
import functools
import threading
from typing import Any

from flax import linen as nn
import jax

from peft._core import params as _params

# Methods that must run on the original module: `setup` builds the module's
# own submodules, which a replacement (sharing its scope) relies on.
_PASS_THROUGH_METHODS = frozenset({'setup'})

# JAX's trace/compile caches key on this value (a tuple of the active
# interceptors' `jit_cache_key()`s; None when there are none), so a jitted
# function never replays a trace made under another surgery.
_JIT_CACHE_KEY = jax.make_user_context(default_value=None)


def _is_intercepted(method_name: str) -> bool:
  """Only `__call__` among dunders: flax also wraps a model's `__getattr__`
  (and other dunders), which are attribute plumbing, not layer calls."""
  return method_name == '__call__' or not (
      method_name.startswith('__') and method_name.endswith('__'))


class Interceptor(abc.ABC):
  """Base class for interceptors; use an instance as a context manager.

  Subclasses implement `interceptor(next_fun, args, kwargs, context)` with
  the semantics of `flax.linen.intercept_methods`. Nested interceptors
  compose: the one entered first (the outer `with`) sees a call first.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> class Doubler(Interceptor):
    ...   def interceptor(self, next_fun, args, kwargs, context):
    ...     out = next_fun(*args, **kwargs)
    ...     return 2 * out if isinstance(context.module, nn.Dense) else out
    >>> dense = nn.Dense(2, kernel_init=nn.initializers.ones)
    >>> params = dense.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> with Doubler():
    ...   print(dense.apply(params, jnp.ones((1, 3))))
    [[6. 6.]]
  """

  def __enter__(self):
    state = self._new_state()
    _set_active(_ACTIVE.get() + ((self, state),))
    _install_dispatcher()
    return self._entered(state)

  def __exit__(self, *exc_info) -> None:
    active = _ACTIVE.get()
    if not active or active[-1][0] is not self:
      raise RuntimeError(
          f'{self!r} exited but it is not the innermost interceptor entered '
          'in this thread/task. Exit interceptors in reverse order of entry '
          '(use `with` blocks).'
      )
    _set_active(active[:-1])
    _uninstall_dispatcher()
    self._exited(active[-1][1], failed=exc_info[0] is not None)

  def jit_cache_key(self) -> Any:
    """What identifies this interceptor's effect in JAX's compile caches.

    Two interceptors with equal keys may share compiled traces. The default
    is the interceptor object itself (no sharing); subclasses whose effect
    is fully described by their fields return those fields.
    """
    return self

  def _entered(self, state: Any) -> Any:
    """What `with interceptor as x` binds to `x` (default: the interceptor)."""
    del state
    return self

  def _exited(self, state: Any, *, failed: bool) -> None:
    """Hook run after the context closed (`failed`: an exception is raised)."""
    del state, failed

  def _new_state(self) -> Any:
    """Per-entry mutable state; kept in a ContextVar, never on `self`."""
    return None

  def _state(self) -> Any:
    for interceptor, state in reversed(_ACTIVE.get()):
      if interceptor is self:
        return state
    raise RuntimeError(
        f'{self!r} intercepted a call outside its context in this '
        'thread/task. Enter it with `with ...:` in the thread or task that '
        'runs the model.'
    )

  @abc.abstractmethod
  def interceptor(self, next_fun, args, kwargs,
                  context: nn.module.InterceptorContext):
    """Called for every module method call inside the context."""


# The interceptors entered in the current thread/task, outermost first, with
# each entry's state.
_ACTIVE: contextvars.ContextVar[tuple[tuple[Interceptor, Any], ...]] = (
    contextvars.ContextVar('peft_active_interceptors', default=()))


def active_interceptors() -> tuple[Interceptor, ...]:
  """The interceptors entered in this thread/task, outermost first."""
  return tuple(interceptor for interceptor, _ in _ACTIVE.get())


# True inside `suspended()`: calls run as if no interceptor were entered.
_SUSPENDED: contextvars.ContextVar[bool] = contextvars.ContextVar(
    'peft_interceptors_suspended', default=False)


# The `jit_cache_key()`s of the interceptors in `_ACTIVE` (None when there
# are none), computed on enter/exit rather than on every intercepted call.
_ACTIVE_KEY: contextvars.ContextVar[tuple[Any, ...] | None] = (
    contextvars.ContextVar('peft_active_jit_cache_key', default=None))


@contextlib.contextmanager
def suspended():
  """Runs the block with no peft interceptor active (this thread/task).

  For modules a wrapper builds for its own computation (e.g. the conv that
  applies a LoRA adapter's A), which surgery must never adapt, and for the
  interceptors' own bookkeeping (reading a module's fields may run a
  model's `__getattr__` or properties, which must not be intercepted).
  """
  token = _SUSPENDED.set(True)
  try:
    yield
  finally:
    _SUSPENDED.reset(token)


def _set_active(active: tuple[tuple[Interceptor, Any], ...]) -> None:
  """Sets this task's interceptors and their cache key, then syncs JAX's."""
  _ACTIVE.set(active)
  _ACTIVE_KEY.set(tuple(i.jit_cache_key() for i, _ in active) or None)
  _sync_jit_cache_key()


def _sync_jit_cache_key() -> None:
  """Makes JAX's (thread-local) cache key match this task's interceptors."""
  key = _ACTIVE_KEY.get()
  if _JIT_CACHE_KEY.value != key:
    # A user context is a `with` object; entering one sets the thread's
    # value until the next sync, which is what we want here.
    _JIT_CACHE_KEY(key).__enter__()


def _check_jit_cache_key(context) -> None:
  """Fails a trace whose cache key belongs to another asyncio task.

  JAX keeps the key per thread, interceptors per task: when two tasks of one
  thread hold different surgeries across an `await`, a jit call may have
  been keyed on the other task's surgery. Eager calls just resync the key.
  """
  key = _ACTIVE_KEY.get()
  if _JIT_CACHE_KEY.value == key:
    return
  # Under a jit trace even a constant is staged, so this is a tracer then.
  if not isinstance(jax.numpy.zeros(()), jax.core.Tracer):
    _sync_jit_cache_key()
    return
  where = _params.module_path(context.module)
  raise RuntimeError(
      f'A jitted function is tracing {type(context.module).__name__} at '
      f'{_params.shown_path(where)!r} under the interceptors {key!r}, but '
      f'JAX keyed its cache on {_JIT_CACHE_KEY.value!r}: another asyncio '
      'task in this thread entered or left a surgery while this one was '
      'suspended at an `await`. JAX keys compiled functions per thread, '
      'not per task: run differently adapted models in separate threads, '
      'or enter the surgery inside the jitted function.'
  )


def _dispatch(next_fun, args, kwargs, context):
  """The single flax interceptor: runs this task's own interceptors.

  flax's interceptor stack is per thread, so asyncio tasks sharing a thread
  would see each other's interceptors; dispatching through a ContextVar
  gives every task (and thread) only the interceptors it entered.
  """
  if _SUSPENDED.get() or not _is_intercepted(context.method_name):
    return next_fun(*args, **kwargs)
  _check_jit_cache_key(context)
  fun = next_fun
  for interceptor, _ in reversed(_ACTIVE.get()):
    fun = functools.partial(_call_interceptor, interceptor, fun,
                            context=context)
  return fun(*args, **kwargs)


def _call_interceptor(interceptor, fun, *args, context, **kwargs):
  return interceptor.interceptor(fun, args, kwargs, context)


class _DispatcherCount(threading.local):
  count: int = 0
  cm: contextlib.AbstractContextManager[Any] | None = None


_DISPATCHER = _DispatcherCount()


def _install_dispatcher() -> None:
  if _DISPATCHER.count == 0:
    _DISPATCHER.cm = nn.intercept_methods(_dispatch)
    _DISPATCHER.cm.__enter__()
  _DISPATCHER.count += 1


def _uninstall_dispatcher() -> None:
  _DISPATCHER.count -= 1
  if _DISPATCHER.count == 0:
    cm, _DISPATCHER.cm = _DISPATCHER.cm, None
    if cm is not None:
      cm.__exit__(None, None, None)


@dataclasses.dataclass
class ReplaceState:
  """Per-entry state of a ModuleInterceptor (lives in a ContextVar)."""

  # id(original) -> (original, replacement). Holding the original keeps its
  # id from being reused by a new object during the context.
  replacements: dict[int, tuple[nn.Module, nn.Module]] = dataclasses.field(
      default_factory=dict)
  # ids of modules whose calls must not be intercepted again (the
  # replacement and the module it wraps, while the replacement runs).
  no_recurse: dict[int, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, eq=False)
class ModuleInterceptor(Interceptor):
  """Replaces each module by `replace_module_fn(module)` on its first call.

  Guarantees: a module is replaced once per context and later calls reuse the
  replacement (shared params); a replacement's own call of the module it
  wraps is not intercepted again; submodules of a replaced module are still
  intercepted. Returning the module itself leaves it unchanged.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import peft
    >>> def to_lora(module):
    ...   if isinstance(module, nn.Dense):
    ...     return peft.LoRADense(rank=2, wrapped=module)
    ...   return module
    >>> class Model(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x):
    ...     return nn.Dense(4, name='proj')(x)
    >>> with ModuleInterceptor(to_lora):
    ...   params = Model().init(jax.random.key(0), jnp.ones((1, 3)))
    >>> jax.tree.map(jnp.shape, params['params']['proj'])
    {'bias': (4,), 'kernel': (3, 4), 'lora': {'a': (3, 2), 'b': (2, 4)}}

  Attributes:
    replace_module_fn: `module -> module to call instead`.
  """

  replace_module_fn: Callable[[nn.Module], nn.Module] | None = None

  def replace_module(self, module: nn.Module) -> nn.Module:
    """The module to call instead of `module` (subclasses may override)."""
    if self.replace_module_fn is None:
      raise TypeError(
          f'{type(self).__name__} has no replace_module_fn. Pass one, e.g. '
          'ModuleInterceptor(lambda m: m), or override replace_module.'
      )
    return self.replace_module_fn(module)

  def _new_state(self) -> ReplaceState:
    return ReplaceState()

  def jit_cache_key(self) -> Any:
    """Equal for interceptors of one class with equal fields.

    So `peft.lora(rank=4)` entered twice (or gemma-style wrappers that build
    a new interceptor per call) reuses one compiled trace. A subclass that
    is not itself a dataclass may hold state outside its fields, so it keys
    on identity.
    """
    cls = type(self)
    if '__dataclass_fields__' not in cls.__dict__:
      return self
    key = (cls, tuple(_field_key(getattr(self, f.name))
                      for f in dataclasses.fields(self)))
    try:
      hash(key)
    except TypeError:  # e.g. a list in a field: fall back to identity
      return self
    return key

  def interceptor(self, next_fun, args, kwargs,
                  context: nn.module.InterceptorContext):
    if context.method_name in _PASS_THROUGH_METHODS:
      return next_fun(*args, **kwargs)
    state = self._state()
    original = context.module
    if state.no_recurse.get(id(original), 0):
      return next_fun(*args, **kwargs)
    if id(original) not in state.replacements:
      with suspended():  # bookkeeping reads must not be intercepted
        replacement = self.replace_module(original)
      state.replacements[id(original)] = (original, replacement)
    replacement = state.replacements[id(original)][1]
    if replacement is original or not hasattr(replacement,
                                              context.method_name):
      return next_fun(*args, **kwargs)
    with _no_recurse(state, (id(original), id(replacement))):
      return getattr(replacement, context.method_name)(*args, **kwargs)


def _field_key(value: Any) -> Any:
  """`value`, with a `functools.partial` compared by what it binds."""
  if isinstance(value, functools.partial):
    return (functools.partial, value.func, value.args,
            tuple(sorted(value.keywords.items())))
  return value


@contextlib.contextmanager
def _no_recurse(state: ReplaceState, ids: tuple[int, ...]):
  for i in ids:
    state.no_recurse[i] = state.no_recurse.get(i, 0) + 1
  try:
    yield
  finally:
    for i in ids:
      state.no_recurse[i] -= 1

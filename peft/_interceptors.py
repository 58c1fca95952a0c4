"""Module surgery by method interception.

`Interceptor` is a context manager around `flax.linen.intercept_methods`.
`ModuleInterceptor` replaces modules on the fly: the first time a module is
called inside the context, `replace_module_fn(module)` gives the module to
use instead, and every later call of the same module reuses that replacement
(so a layer called twice shares one adapter).

All mutable state lives in a `contextvars.ContextVar`, not on the (frozen)
interceptor object, so two threads or two asyncio tasks may enter the same
interceptor at once and each sees only its own replacements.
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

# Methods that must run on the original module: `setup` builds the module's
# own submodules, which a replacement (sharing its scope) relies on.
_PASS_THROUGH_METHODS = frozenset({'setup'})


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
    _ACTIVE.set(_ACTIVE.get() + ((self, state),))
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
    _ACTIVE.set(active[:-1])
    _uninstall_dispatcher()
    self._exited(active[-1][1], failed=exc_info[0] is not None)

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


@contextlib.contextmanager
def suspended():
  """Runs the block with no peft interceptor active (this thread/task).

  For modules a wrapper builds for its own computation (e.g. the conv that
  applies a LoRA adapter's A), which surgery must never adapt.
  """
  token = _ACTIVE.set(())
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def _dispatch(next_fun, args, kwargs, context):
  """The single flax interceptor: runs this task's own interceptors.

  flax's interceptor stack is per thread, so asyncio tasks sharing a thread
  would see each other's interceptors; dispatching through a ContextVar
  gives every task (and thread) only the interceptors it entered.
  """
  fun = next_fun
  for interceptor, _ in reversed(_ACTIVE.get()):
    fun = functools.partial(_call_interceptor, interceptor, fun,
                            context=context)
  return fun(*args, **kwargs)


def _call_interceptor(interceptor, fun, *args, context, **kwargs):
  return interceptor.interceptor(fun, args, kwargs, context)


class _DispatcherCount(threading.local):
  count = 0
  cm = None


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

  def interceptor(self, next_fun, args, kwargs,
                  context: nn.module.InterceptorContext):
    if context.method_name in _PASS_THROUGH_METHODS:
      return next_fun(*args, **kwargs)
    state = self._state()
    original = context.module
    if state.no_recurse.get(id(original), 0):
      return next_fun(*args, **kwargs)
    if id(original) not in state.replacements:
      state.replacements[id(original)] = (
          original, self.replace_module(original))
    replacement = state.replacements[id(original)][1]
    if replacement is original or not hasattr(replacement,
                                              context.method_name):
      return next_fun(*args, **kwargs)
    with _no_recurse(state, (id(original), id(replacement))):
      return getattr(replacement, context.method_name)(*args, **kwargs)


@contextlib.contextmanager
def _no_recurse(state: ReplaceState, ids: tuple[int, ...]):
  for i in ids:
    state.no_recurse[i] = state.no_recurse.get(i, 0) + 1
  try:
    yield
  finally:
    for i in ids:
      state.no_recurse[i] -= 1

"""``lm.supervised``: a per-sample loss split into a model and a loss on its outputs.

``loss(params, (inputs, targets)) = output_loss(apply_fn(params, inputs), targets)``, one
value per sample, usable everywhere a ``loss_fn`` is (``lm.instrument``, ``lm.Learner``,
``lm.monitor``). The split tells the curvature instruments the model's outputs and how the
loss curves in them (:mod:`lmd4ml.stats.ggn`): exact generalised Gauss-Newton curvature,
and the Hessian's own diagonal where the model is piecewise linear in each layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmd4ml.stats import PyTree, ggn

_KNOWN_TARGETS = {
    "softmax_cross_entropy_with_integer_labels": (
        "integer class labels of shape outputs.shape[:-1]",
        lambda out, y: y.shape == out.shape[:-1] and jnp.issubdtype(y.dtype, jnp.integer),
    ),
    "softmax_cross_entropy": (
        "label distributions (one-hot or soft) of the outputs' shape",
        lambda out, y: y.shape == out.shape and jnp.issubdtype(y.dtype, jnp.floating),
    ),
    "squared_error": (
        "targets of the outputs' shape",
        lambda out, y: jnp.broadcast_shapes(out.shape, y.shape) == out.shape,
    ),
    "l2_loss": (
        "targets of the outputs' shape",
        lambda out, y: jnp.broadcast_shapes(out.shape, y.shape) == out.shape,
    ),
}


def _shape(x: Any) -> Any:
    return jax.tree.map(lambda a: tuple(np.shape(a)), x)


@dataclasses.dataclass(frozen=True)
class Supervised:
    """A per-sample loss made of a model and a loss on its outputs; see :func:`supervised`.

    ``forward(params, batch, **extras)`` is the model on the batch's inputs, called as the
    loss is (with ``key=`` and ``model_state=`` when the step has them, returning the new
    model state beside the outputs); ``curvature`` is how the output loss curves in them.
    """

    apply_fn: Callable[..., Any]
    output_loss: Callable[[Any, Any], jax.Array]

    @property
    def curvature(self) -> ggn.OutputCurvature:
        """The output loss's Hessian square root: in closed form for optax's softmax
        cross-entropies, squared error and l2 loss, else from its Hessian by ``eigh``."""
        closed = ggn.CLOSED_FORMS.get(self.output_loss)
        if closed is not None:
            return closed()
        return ggn.from_hessian(lambda f, y: self.losses(f[None], _one(y))[0])

    def forward(self, params: PyTree, batch: PyTree, **extras: Any) -> Any:
        """The model's outputs on the batch's inputs (and the new model state, with one)."""
        inputs, _ = _split(batch)
        out = self.apply_fn(params, inputs, **extras)
        outputs = out[0] if "model_state" in extras and isinstance(out, tuple) else out
        if "model_state" in extras and not isinstance(out, tuple):
            raise TypeError(
                "with model state, apply_fn(params, inputs, model_state=s) must return "
                f"(outputs, new_model_state); got {type(out).__name__}"
            )
        _check_outputs(outputs, inputs)
        return out

    def losses(self, outputs: jax.Array, targets: PyTree) -> jax.Array:
        """ℓᵢ from the outputs (B, ...): the output loss, averaged over any axes it keeps
        besides the sample axis (positions of a sequence, entries of a squared error)."""
        name = self.curvature.name
        known = _KNOWN_TARGETS.get(name)
        if known is not None and not _fits(known[1], outputs, targets):
            raise ValueError(
                f"lm.supervised: {name} takes the model's outputs and {known[0]}; the outputs "
                f"have shape {tuple(outputs.shape)} and the targets shape "
                f"{_shape(targets)} dtype {getattr(targets, 'dtype', type(targets).__name__)}"
            )
        try:
            values = self.output_loss(outputs, targets)
        except Exception as error:  # the user's own function: say what it was given
            raise type(error)(
                f"lm.supervised: output_loss(outputs, targets) failed on outputs of shape "
                f"{tuple(outputs.shape)} and targets of shape {_shape(targets)}: {error}"
            ) from error
        values = jnp.asarray(values)
        n = outputs.shape[0]
        if values.ndim == 0 or values.shape[0] != n:
            raise ValueError(
                "lm.supervised: output_loss(outputs, targets) must keep the sample axis, one "
                f"value per sample (shape ({n}, ...), unreduced); it returned shape "
                f"{tuple(values.shape)} for outputs of shape {tuple(outputs.shape)}"
            )
        return jnp.mean(values.reshape(n, -1), axis=1) if values.ndim > 1 else values

    def __call__(self, params: PyTree, batch: PyTree, **extras: Any) -> Any:
        out = self.forward(params, batch, **extras)
        _, targets = _split(batch)
        if "model_state" in extras:
            outputs, new_state = out
            return self.losses(outputs, targets), new_state
        return self.losses(out, targets)

    def targets(self, sample: PyTree) -> PyTree:
        """The targets of a batch (or of one sample of it)."""
        return _split(sample)[1]


def _fits(check: Callable[[Any, Any], bool], outputs: jax.Array, targets: Any) -> bool:
    try:
        return bool(check(outputs, jnp.asarray(targets)))
    except (TypeError, ValueError):  # shapes that do not broadcast, targets that are no array
        return False


def _one(y: PyTree) -> PyTree:
    return jax.tree.map(lambda a: jnp.asarray(a)[None], y)


def _split(batch: PyTree) -> tuple[PyTree, PyTree]:
    if not isinstance(batch, tuple | list) or len(batch) != 2:
        raise TypeError(
            "a loss from lm.supervised takes batches (inputs, targets), a pair; got "
            f"{type(batch).__name__}"
            + (f" of {len(batch)}" if isinstance(batch, tuple | list) else "")
        )
    return batch[0], batch[1]


def _check_outputs(outputs: Any, inputs: PyTree) -> None:
    sizes = {np.shape(x)[0] for x in jax.tree.leaves(inputs) if np.ndim(x)}
    if not hasattr(outputs, "shape") or not hasattr(outputs, "dtype"):
        raise TypeError(
            "lm.supervised: apply_fn(params, inputs) must return the model's outputs as one "
            f"array (B, ...); got {type(outputs).__name__}"
        )
    if outputs.ndim == 0 or (len(sizes) == 1 and outputs.shape[0] not in sizes):
        raise ValueError(
            "lm.supervised: apply_fn(params, inputs) must return one output per sample, shape "
            f"(B, ...) with B = {sorted(sizes)}; got shape {tuple(outputs.shape)}"
        )
    if not jnp.issubdtype(outputs.dtype, jnp.floating):
        raise TypeError(f"lm.supervised: the model's outputs must be floats, got {outputs.dtype}")


def supervised(
    apply_fn: Callable[..., Any], output_loss: Callable[[Any, Any], jax.Array]
) -> Supervised:
    """A per-sample loss from a model and a loss on its outputs.

    ``loss(params, (inputs, targets)) = output_loss(apply_fn(params, inputs), targets)``, one
    value per sample (an output loss that keeps more axes, positions or entries, is averaged
    over them per sample). For an nnx module in ``lm.Learner``, ``apply_fn(module, inputs)``.
    With ``key=`` or ``model_state=`` at ``init``, ``apply_fn`` takes them (and returns
    ``(outputs, new_model_state)``), as a loss would (:mod:`lmd4ml.protocol`).

    The curvature instruments (``lm.HessTrace``, ``lm.TICDiag``, ``lm.TICTrace``) then use
    the generalised Gauss-Newton matrix Jᵀ∇²_fℓ J, exact: :mod:`lmd4ml.stats.ggn`. The output
    loss's Hessian square root is in closed form for ``optax.softmax_cross_entropy_with_
    integer_labels``, ``optax.softmax_cross_entropy``, ``optax.squared_error`` and
    ``optax.l2_loss``; for any other it comes from its Hessian in the outputs by ``eigh``,
    with negative eigenvalues (a loss not convex in the outputs) clipped to 0 and a warning.

    Example:
      >>> import jax.numpy as jnp, optax, lmd4ml as lm
      >>> apply = lambda w, x: x @ w  # a linear model with 2 classes
      >>> loss = lm.supervised(apply, optax.softmax_cross_entropy_with_integer_labels)
      >>> w, x, y = jnp.zeros((3, 2)), jnp.ones((4, 3)), jnp.array([0, 1, 1, 0])
      >>> loss(w, (x, y)).round(4).tolist()  # log 2 each
      [0.6931, 0.6931, 0.6931, 0.6931]
    """
    if not callable(apply_fn):
        raise TypeError(
            f"lm.supervised: apply_fn must be callable (e.g. model.apply), got "
            f"{type(apply_fn).__name__}"
        )
    if not callable(output_loss):
        raise TypeError(
            "lm.supervised: output_loss must be callable (e.g. "
            f"optax.softmax_cross_entropy_with_integer_labels), got {type(output_loss).__name__}"
        )
    return Supervised(apply_fn, output_loss)

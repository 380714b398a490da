"""Paper A's multi-task attribute objective, its metrics, and early stopping.

Paper A (§"Proposed method", Eqs. (1)-(6); §"Experimental results") trains MobileNetV2 on three
outputs at once: age with a linear output and mean squared error, gender with a sigmoid and binary
cross entropy (0 male, 1 female), ethnicity with a softmax and categorical cross entropy
(0 White, 1 Black, 2 Asian, 3 Indian, 4 Others), with loss weights 0.1 / 1.0 / 1.0, Adam at 1e-4,
up to 500 epochs with early stopping on the validation loss (stopping "commonly between 50 and 80
epochs"). It reports age MAE in years and gender / ethnicity accuracy.

Age units. Paper A regresses age raw, in years (linear activation, plain MSE; the 0.1 weight is
what keeps the age term, O(100-1000) at the start, from swamping the two cross entropies), so the
default `age_scale=1.0` reproduces it. `age_scale=1/100` regresses age in hundreds of years
instead (better conditioned; then w_age = 0.1 weighs a much smaller term, so re-tune it). The
model's "age" output is always in model units (years * age_scale); metrics convert back to years.

Numerics: the sigmoid and softmax live inside the losses (BCE/CE on logits), which is the stable
form of Eqs. (3)-(6); models output logits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

#: Paper A's loss weights (§"Experimental results").
PAPER_A_WEIGHTS = {"w_age": 0.1, "w_gender": 1.0, "w_ethnicity": 1.0}


def _mean(x: jax.Array, weights: jax.Array | None) -> jax.Array:
    """Mean over the batch, or the `weights`-weighted mean (e.g. 0 for padded examples)."""
    if weights is None:
        return jnp.mean(x)
    w = jnp.asarray(weights, jnp.float32)
    return jnp.sum(w * x) / jnp.maximum(jnp.sum(w), 1e-12)


def attribute_loss(
    outputs: Mapping[str, jax.Array],
    batch: Mapping[str, Any],
    *,
    w_age: float = 0.1,
    w_gender: float = 1.0,
    w_ethnicity: float = 1.0,
    age_scale: float = 1.0,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted sum of age MSE, gender BCE and ethnicity CE (paper A, Eqs. (2), (4), (6)).

    Args:
      outputs: model outputs: "age" (B,) in model units, "gender_logit" (B,),
        "ethnicity_logits" (B, K).
      batch: "age" (B,) in years, "gender" (B,) in {0, 1}, "ethnicity" (B,) ints in [0, K).
      w_age, w_gender, w_ethnicity: loss weights (paper A: 0.1, 1.0, 1.0).
      age_scale: the age target is `age * age_scale` (paper A: 1.0, raw years).
      weights: optional (B,) example weights; each term is then a weighted mean.

    Returns:
      (total, components) with components "age_mse", "gender_bce", "ethnicity_ce" (unweighted,
      batch means) and "total".
    """
    age_pred = jnp.asarray(outputs["age"], jnp.float32)
    gender_logit = jnp.asarray(outputs["gender_logit"], jnp.float32)
    eth_logits = jnp.asarray(outputs["ethnicity_logits"], jnp.float32)
    age = jnp.asarray(batch["age"], jnp.float32) * age_scale
    gender = jnp.asarray(batch["gender"], jnp.float32)
    ethnicity = jnp.asarray(batch["ethnicity"], jnp.int32)

    age_mse = _mean(jnp.square(age_pred - age), weights)
    gender_bce = _mean(optax.sigmoid_binary_cross_entropy(gender_logit, gender), weights)
    ethnicity_ce = _mean(
        optax.softmax_cross_entropy_with_integer_labels(eth_logits, ethnicity), weights
    )
    total = w_age * age_mse + w_gender * gender_bce + w_ethnicity * ethnicity_ce
    return total, {
        "age_mse": age_mse,
        "gender_bce": gender_bce,
        "ethnicity_ce": ethnicity_ce,
        "total": total,
    }


def predict(outputs: Mapping[str, jax.Array], *, age_scale: float = 1.0) -> dict[str, jax.Array]:
    """Model outputs -> age in years, P(female), gender and ethnicity labels, ethnicity probs.

    Gender is female iff the logit is > 0 (sigmoid > 0.5; a tie reads as male).
    """
    logits = jnp.asarray(outputs["ethnicity_logits"], jnp.float32)
    gender_logit = jnp.asarray(outputs["gender_logit"], jnp.float32)
    return {
        "age": jnp.asarray(outputs["age"], jnp.float32) / age_scale,
        "female_prob": jax.nn.sigmoid(gender_logit),
        "gender": (gender_logit > 0).astype(jnp.int32),
        "ethnicity": jnp.argmax(logits, axis=-1).astype(jnp.int32),
        "ethnicity_probs": jax.nn.softmax(logits, axis=-1),
    }


def attribute_metrics(
    outputs: Mapping[str, jax.Array],
    batch: Mapping[str, Any],
    *,
    age_scale: float = 1.0,
    weights: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Paper A's Fig. 3 metrics: "age_mae" (years), "gender_acc", "ethnicity_acc" (in [0, 1]).

    Args mirror `attribute_loss`; `weights` (B,) makes every metric a weighted mean.
    """
    pred = predict(outputs, age_scale=age_scale)
    age = jnp.asarray(batch["age"], jnp.float32)
    gender = jnp.asarray(batch["gender"], jnp.int32)
    ethnicity = jnp.asarray(batch["ethnicity"], jnp.int32)
    return {
        "age_mae": _mean(jnp.abs(pred["age"] - age), weights),
        "gender_acc": _mean((pred["gender"] == gender).astype(jnp.float32), weights),
        "ethnicity_acc": _mean((pred["ethnicity"] == ethnicity).astype(jnp.float32), weights),
    }


class EarlyStopping:
    """Stop when a monitored value has not improved for `patience` updates (Keras semantics).

    An update improves if `value < best - min_delta` (mode "min") or `value > best + min_delta`
    (mode "max"); the first finite value always improves; NaN never does. `update` returns True
    once `patience` consecutive updates have not improved (and keeps returning True). Paper A
    monitors the validation loss (mode "min") over at most 500 epochs.

    Attributes:
      best: best value so far (inf / -inf before any improvement).
      best_step: step of that value (the `step` passed to `update`, else the update's index).
      wait: consecutive non-improving updates.
    """

    def __init__(self, patience: int = 10, min_delta: float = 0.0, mode: str = "min"):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        if min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta}")
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.mode = mode
        self.best = math.inf if mode == "min" else -math.inf
        self.best_step: int | None = None
        self.wait = 0
        self.num_updates = 0

    def improves(self, value: float) -> bool:
        """Whether `value` would count as an improvement on `best`."""
        value = float(value)
        if math.isnan(value):
            return False
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def update(self, value: float, step: int | None = None) -> bool:
        """Records one evaluation of the monitored value; returns True when training should stop."""
        step = self.num_updates if step is None else int(step)
        self.num_updates += 1
        if self.improves(value):
            self.best, self.best_step, self.wait = float(value), step, 0
        else:
            self.wait += 1
        return self.should_stop

    @property
    def should_stop(self) -> bool:
        return self.wait >= self.patience

    def state_dict(self) -> dict[str, Any]:
        """JSON-friendly state (store it with the checkpoint)."""
        return {
            "patience": self.patience,
            "min_delta": self.min_delta,
            "mode": self.mode,
            "best": self.best,
            "best_step": self.best_step,
            "wait": self.wait,
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores `state_dict()` output (configuration included)."""
        self.__init__(state["patience"], state["min_delta"], state["mode"])
        self.best = float(state["best"])
        self.best_step = None if state["best_step"] is None else int(state["best_step"])
        self.wait = int(state["wait"])
        self.num_updates = int(state["num_updates"])

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> EarlyStopping:
        stopper = cls()
        stopper.load_state_dict(state)
        return stopper

"""BNP's running statistics as optimizer state: one `Slot` per tracked
block, created and released as the model's layers come and go
(`StatisticsState.track`), saved and restored by the layers' places in
the model's files, whatever order the layers were built in, and read
back for diagnostics."""

import dataclasses
import os
import weakref

import keras
import numpy as np
import tensorflow as tf

from keras_bnp import preconditioner
from keras_bnp import registry
from keras_bnp import rules

# Why a layer's statistics update can be skipped, as counted by BNP.
SKIP_CAUSES = ("non_finite_input", "overflow")


def variable_key(variable):
    """Identifies a model variable. Not `Optimizer._var_key`, which reads
    the variable's value and so fails inside a mixed-precision layer call,
    where `_track` can run."""
    return id(variable)


@dataclasses.dataclass
class Slot:
    """Running statistics of one block's features (optimizer-owned state;
    see `rules.Block`).

    `BNP._slots` keys it by the block's kernel (`_key`); it holds no model
    variable, so that none is tracked into the optimizer. `rank` is the
    block's position among the model's blocks (the order of summaries);
    `label` is the layer's name, and the block's (`block_name`) when it has
    several.
    """

    rank: int
    label: str
    block_name: str
    layer_class: str
    moving_mean: keras.Variable
    moving_variance: keras.Variable
    moving_count: keras.Variable

    FIELDS = ("moving_mean", "moving_variance", "moving_count")

    @property
    def variables(self):
        return [self.moving_mean, self.moving_variance, self.moving_count]


class StatisticsState:
    """The statistics half of `BNP` (a base class before
    `keras.optimizers.Optimizer`): `_slots` `{kernel key: Slot}` and the
    tracked model, what Keras' files and TensorFlow's checkpoints save of
    them, and what they say (`layer_statistics`, `statistics_summary`,
    the skipped updates)."""

    def track(self, model):
        """Creates the statistics of `model`'s supported, built layers, and
        releases those of layers no longer in it (e.g. popped).

        `BNPMixin` calls this before training and when a model is loaded. In
        a custom distributed loop, call `optimizer.build(
        model.trainable_variables)` and `optimizer.track(model)` under
        `strategy.scope()` before the first step.
        """
        self._track(model, registry.supported_layers(model))

    def _track(self, model, layers):
        """`layers`: `model`'s supported layers, in `supported_layers`
        order. Once BNP is built, it keeps the statistics of the blocks
        whose kernels it trains only (a GAN's two optimizers each train
        part of one model)."""
        built_for = {variable_key(v)
                     for v in getattr(self, "_trainable_variables", [])}
        blocks = {variable_key(block.kernel): block for layer in layers
                  for block in rules.blocks(layer)
                  if not self.built or variable_key(block.kernel) in built_for}
        if self.built and model.trainable_variables and not any(
                variable_key(v) in built_for
                for v in model.trainable_variables):
            raise ValueError(
                f"This BNP ('{self.name}') was built for the variables of "
                f"another model, so it cannot train '{model.name}'; a Keras "
                "optimizer keeps state per variable. Create a new BNP for "
                "each model, e.g. inside the loop over the folds of a "
                "k-fold cross-validation."
            )
        for key in [key for key in self._slots if key not in blocks]:
            self._release(self._slots.pop(key))
        for rank, (key, block) in enumerate(blocks.items()):
            if key in self._slots:
                self._slots[key].rank = rank
                continue
            channels = (block.features_count,)
            name = block.label.replace("/", "_")
            # float64 layers get float64 statistics; all others float32.
            dtype = ("float64" if block.kernel.dtype == "float64"
                     else "float32")
            self._slots[key] = Slot(
                rank=rank,
                label=block.label,
                block_name=block.name,
                layer_class=type(block.layer).__name__,
                moving_mean=self._statistics_variable(
                    channels, "zeros", f"{name}_moving_mean", dtype
                ),
                moving_variance=self._statistics_variable(
                    channels, "ones", f"{name}_moving_variance", dtype
                ),
                moving_count=self._statistics_variable(
                    (), "zeros", f"{name}_moving_count", dtype
                ),
            )
        self.__dict__["_model"] = weakref.ref(model)
        self.__dict__["_places"] = None
        self._restore_deferred_statistics()
        if self.built:
            self._build_inner()

    def _saved_places(self):
        """`(paths, order)` of the tracked model in its saved files (see
        `registry.saved_paths`): `{kernel key: layer path}` of the tracked
        layers, and `{variable key: (layer path, index)}` of its trainable
        variables. Walking the model takes a while (0.15 s for ResNet50), so
        the result is kept until the next `_track`."""
        model = self._model and self._model()
        if model is None:
            return {}, {}
        if self._places is not None:
            return self._places
        paths = registry.saved_paths(model)
        order = {}
        for layer in model._flatten_layers(include_self=True, recursive=True):
            for index, variable in enumerate(layer.trainable_weights):
                order[variable_key(variable)] = (paths.get(id(layer), ""),
                                                 index)
        kernels = {key: path for key, (path, index) in order.items()
                   if key in self._slots}
        self.__dict__["_places"] = kernels, order
        return self._places

    def _release(self, slot):
        """Leaves a slot's variables out of the optimizer's state (they stay
        in `_variables`, which TensorFlow's checkpoints track as an
        append-only list)."""
        self._released.update(id(v) for v in slot.variables)

    def _own_variables(self):
        """BNP's own variables: neither statistics nor released ones."""
        statistics_variables = {id(v) for s in self._slots.values()
                                for v in s.variables}
        return [v for v in self._variables if id(v) not in
                statistics_variables and id(v) not in self._released]

    def _statistics_variable(self, shape, initializer, name,
                             dtype="float32"):
        # Under a tf.distribute strategy each replica keeps its own copy and
        # assigns it without communication: the batch sums are all-reduced
        # first (`_all_replica_sums`), so the copies are identical, and a
        # read outside the replicas (checkpoints, `layer_statistics`) gives
        # their mean, i.e. the same value.
        with keras.name_scope(self.name, caller=self):
            variable = keras.Variable(
                initializer,
                shape=shape,
                dtype=dtype,
                trainable=False,
                aggregation="mean",
                synchronization="on_read",
                name=name,
            )
        self._track_variable(variable)
        return variable

    @property
    def variables(self):
        """Own, then statistics, then inner variables.

        The statistics are in the order of their layers' places in the
        model's saved files, not in the order they were created (the order
        layers are first built or called, which can differ between training
        and loading a saved model).
        """
        statistics_variables = [v for _, s in self._saved_slots()
                                for v in s.variables]
        return (self._own_variables() + statistics_variables
                + self.inner_optimizer.variables)

    def _saved_slots(self):
        """`(layer path, slot)` pairs, in the order of the paths (by rank
        when no model is tracked)."""
        paths, _ = self._saved_places()
        return sorted(((_joined(paths.get(key, str(slot.rank)),
                                slot.block_name), slot)
                       for key, slot in self._slots.items()),
                      key=lambda pair: pair[0])

    def _saved_state(self):
        """`{key: variable}` of what BNP itself saves in Keras files: its own
        variables by name, each layer's statistics by the layer's path in
        the model's files. Keras saves the inner optimizer's state on its
        own, under `inner_optimizer`."""
        state = {variable.name: variable for variable in self._own_variables()}
        for path, slot in self._saved_slots():
            for field, variable in zip(Slot.FIELDS, slot.variables):
                state[f"{path.replace('/', '.')}:{field}"] = variable
        return state

    def _statistics_state(self):
        """The statistics' entries of `_saved_state`: `{"path:field":
        variable}`."""
        own = {id(variable) for variable in self._own_variables()}
        return {key: variable for key, variable in self._saved_state().items()
                if id(variable) not in own}

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        """BNP's dependencies in TensorFlow's object-based checkpoints
        (`tf.train.Checkpoint`, `tf.train.CheckpointManager`): each
        statistic by its `_saved_state` key, i.e. by its layer's path in the
        model's saved files, so that a model whose layers are created (or
        built) in another order gets each layer's own statistics back.

        Not Keras' `_variables` and `_trainable_variables`, which TensorFlow
        tracks as lists, by position: the first in creation order, the
        second (the model's own variables, which the model checkpoints by
        name) in the model's order of the process. Matched by position,
        they would swap the statistics of a reordered model's layers, and
        where the model's path to a kernel is the longer one, its kernels
        too. The inner optimizer's state stays positional, in the order of
        the model's saved files (see `_build_inner`).
        """
        children = super()._trackable_children(save_type, **kwargs)
        children.pop("_variables", None)
        children.pop("_trainable_variables", None)
        children.update(self._statistics_state())
        return children

    def _restore_deferred_statistics(self):
        """Restores the statistics that a TensorFlow checkpoint restored
        before they existed (`checkpoint.restore` before the first step)
        holds for them by name; eagerly, also when their layer was first
        built inside the traced step."""
        self._maybe_initialize_trackable()
        if not self._deferred_dependencies:
            return
        with tf.init_scope():
            for key, variable in self._statistics_state().items():
                self._handle_deferred_dependencies(name=key, trackable=variable)

    def save_own_variables(self, store):
        # The statistics first and BNP's own variables last, so that a save
        # interrupted in between never leaves what an unbuilt BNP saves
        # (only `iteration` and `learning_rate`), which loads as nothing.
        state = self._saved_state()
        statistics_keys = set(self._statistics_state())
        for key in sorted(state, key=lambda key: key not in statistics_keys):
            store[key] = state[key].numpy()

    def load_own_variables(self, store):
        """Assigns BNP's saved state, after checking all of it: a load that
        fails assigns nothing."""
        state = self._saved_state()
        saved = set(store.keys())
        source = _source(store)
        if not saved:
            raise ValueError(
                f"{source or 'The file'} has no saved state for optimizer "
                f"'{self.name}' (BNP's layer statistics): it was saved from a "
                "model without an optimizer, or its save was interrupted. To "
                "load only the layers' weights, load them before compiling "
                "with BNP, or pass `skip_mismatch=True` to `load_weights`, "
                "which warns and keeps BNP's state as it is."
            )
        where = f" in {source}" if source else ""
        # A BNP saved before it was built (a model never trained) has only
        # Keras' own two variables.
        unbuilt = saved <= {"iteration", "learning_rate"}
        if not self.built and not unbuilt:
            raise ValueError(
                f"Optimizer '{self.name}' is not built, so it cannot take "
                f"the saved state{where} (its layer statistics and inner "
                "optimizer's state are per variable). A model's optimizer "
                "is built by `load_weights` itself; build any other "
                "optimizer with the variables it trains before loading, as "
                "for every Keras optimizer, e.g. for a GAN: "
                "`gan.d_optimizer.build(gan.discriminator."
                "trainable_variables)` and the same for `g_optimizer`."
            )
        if saved != set(state) and not unbuilt:
            raise ValueError(
                f"The saved state of optimizer '{self.name}'{where} does not "
                f"fit this BNP: it has statistics of layers "
                f"{_layer_keys(saved)} and other variables "
                f"{sorted(k for k in saved if ':' not in k)}, where this BNP "
                f"has statistics of layers {_layer_keys(state)} (by their "
                "paths in the model's saved files) and variables "
                f"{sorted(k for k in state if ':' not in k)}. Load a file "
                "saved from the same architecture, compiled with BNP."
            )
        values = {key: np.asarray(store[key]) for key in sorted(saved)}
        wrong = [f"{key} has shape {value.shape} where this BNP has "
                 f"{tuple(state[key].shape)}" for key, value in values.items()
                 if value.shape != tuple(state[key].shape)]
        if wrong:
            raise ValueError(
                f"The saved state of optimizer '{self.name}'{where} does not "
                f"fit this BNP: {'; '.join(wrong)}. Load a file saved from "
                "the same architecture, compiled with BNP."
            )
        for key, value in values.items():
            state[key].assign(value)

    def get_weights(self):
        """The values of all variables (own, statistics, inner optimizer's),
        as NumPy arrays in the order of `variables`."""
        return [variable.numpy() for variable in self.variables]

    def set_weights(self, weights):
        """Sets all variables, in the order of `variables`."""
        variables = self.variables
        if len(weights) != len(variables):
            raise ValueError(
                f"BNP has {len(variables)} variables (its own, the layer "
                "statistics and the inner optimizer's); received "
                f"{len(weights)} weights."
            )
        for variable, weight in zip(variables, weights):
            if tuple(variable.shape) != tuple(weight.shape):
                raise ValueError(
                    f"Optimizer variable '{variable.path}' has shape "
                    f"{tuple(variable.shape)}; received a weight of shape "
                    f"{tuple(weight.shape)}."
                )
            variable.assign(weight)

    def layer_statistics(self, layer, block=None):
        """Current running `(mean, variance)` of the features of `layer`'s
        block named `block` (normally its input), as NumPy arrays of shape
        `(features,)`. `block` may be omitted for a layer with one block."""
        slots = [self._slots[variable_key(b.kernel)]
                 for b in rules.blocks(layer)
                 if variable_key(b.kernel) in self._slots]
        if not slots:
            raise ValueError(
                f"BNP has no statistics for layer '{layer.name}' "
                f"({type(layer).__name__}). Statistics exist for the "
                "trainable layers that BNP preconditions (see "
                "`BNP.summary()`) of a model with BNPMixin once the model "
                "has been built and compiled with this optimizer (or "
                "trained one step)."
            )
        names = [slot.block_name for slot in slots]
        if block is None and len(slots) == 1:
            slot = slots[0]
        elif block in names:
            slot = slots[names.index(block)]
        else:
            raise ValueError(
                f"Layer '{layer.name}' has the statistics blocks {names}; "
                f"pass one of them as `block`. Received: block={block!r}"
            )
        return (
            slot.moving_mean.numpy(),
            slot.moving_variance.numpy(),
        )


    @property
    def skipped_statistics_updates(self):
        """Number of (layer, step) statistics updates skipped so far, for
        any of `SKIP_CAUSES` (0 before the first step)."""
        return sum(self.skipped_statistics_updates_by_cause.values())

    @property
    def skipped_statistics_updates_by_cause(self):
        """`{cause: number}` of the skipped (layer, step) statistics
        updates, for each of `SKIP_CAUSES`: `"non_finite_input"` (a NaN or
        Inf value) and `"overflow"` (finite values whose squared deviations
        overflow float32). A step without values (an empty batch, a fully
        masked sample) has nothing to add and is not counted."""
        counts = (self._skipped_updates.numpy() if self.built
                  else [0] * len(SKIP_CAUSES))
        return {cause: int(n) for cause, n in zip(SKIP_CAUSES, counts)}

    def single_value_layers(self):
        """With `statistics_momentum=0`, the labels of the layers whose
        last statistics update had at most one value per input channel
        (so variance 0, and a mean equal to the input); else `[]`."""
        if self.statistics_momentum != 0:
            return []
        return [slot.label for slot in sorted(self._slots.values(),
                                              key=lambda s: s.rank)
                if 0 < float(slot.moving_count.numpy()) <= 1]

    def statistics_summary(self, near_constant=1e-6):
        """Per tracked layer (in model order), a dict of diagnostics:
        `layer`, `class`, `in_channels`, `min_variance`, `max_scale` (the
        largest `1 / (variance + damping)`, see `epsilon`) and
        `near_constant` (the number of input channels with variance at most
        `near_constant`)."""
        rows = []
        for slot in sorted(self._slots.values(), key=lambda s: s.rank):
            variance = slot.moving_variance.numpy()
            damping = float(preconditioner.damping(
                slot.moving_mean.numpy(), variance, self.epsilon,
                self.relative_epsilon))
            rows.append({
                "layer": slot.label,
                "class": slot.layer_class,
                "in_channels": int(variance.shape[0]),
                "min_variance": float(variance.min()),
                "max_scale": 1.0 / (float(variance.min()) + damping),
                "near_constant": int((variance <= near_constant).sum()),
            })
        return rows

def _joined(path, name):
    return f"{path}/{name}" if name else path


def _source(store):
    """`'path'` of the file that a Keras weights store reads, where the
    store tells (a `.weights.h5` file, or a `.keras` archive read by
    `load_weights`); else `None`."""
    archive = getattr(store, "archive", None)
    path = (getattr(archive, "filename", None)
            or getattr(store, "path_or_io", None))
    if not isinstance(path, (str, os.PathLike)):
        return None
    return f"'{os.fspath(path)}'"


def _layer_keys(keys):
    """The layer paths in the statistics' state keys `path:field`."""
    return sorted({key.split(":")[0].replace(".", "/") for key in keys
                   if ":" in key})



"""Callbacks that report on BNP's running statistics."""

import warnings

import keras
import tensorflow as tf

from keras_bnp.optimizer import find_bnp


def _bnp_of(model):
    bnp = find_bnp(model.optimizer)
    if bnp is None:
        raise ValueError(
            f"{type(model).__name__} is not compiled with keras_bnp.BNP "
            f"(its optimizer is {type(model.optimizer).__name__}), so there "
            "are no BNP statistics to report."
        )
    return bnp


class StatisticsLogger(keras.callbacks.Callback):
    """Logs summaries of BNP's running statistics at the end of each epoch.

    For each tracked layer it adds to the epoch logs (so to `History`, and
    to a `TensorBoard` callback placed after it):
    - `bnp/{layer}/min_variance`: the smallest running variance;
    - `bnp/{layer}/max_scale`: the largest `1 / (variance + epsilon)`, i.e.
      the strongest amplification of a kernel gradient;
    - `bnp/{layer}/near_constant`: the number of input channels whose
      variance is at most `near_constant` (constant pixels, dead units).

    Args:
        log_dir: If set, also writes the values as TensorBoard scalars there
            (needs the `tensorboard` package). Defaults to `None`.
        near_constant: Variance threshold for `near_constant`. Defaults to
            `1e-6`.
    """

    def __init__(self, log_dir=None, near_constant=1e-6):
        super().__init__()
        if log_dir is not None:
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                raise ImportError(
                    "StatisticsLogger(log_dir=...) writes TensorBoard "
                    "summaries and needs the tensorboard package: "
                    "`pip install tensorboard`. Without log_dir it only adds "
                    "the values to the epoch logs."
                ) from None
        self.log_dir = log_dir
        self.near_constant = float(near_constant)
        self._writer = None

    def on_epoch_end(self, epoch, logs=None):
        values = {}
        for row in _bnp_of(self.model).statistics_summary(self.near_constant):
            for field in ("min_variance", "max_scale", "near_constant"):
                values[f"bnp/{row['layer']}/{field}"] = row[field]
        if logs is not None:
            logs.update(values)
        if self.log_dir is not None:
            if self._writer is None:
                self._writer = tf.summary.create_file_writer(self.log_dir)
            with self._writer.as_default():
                for name, value in values.items():
                    tf.summary.scalar(name, value, step=epoch)
            self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class StatisticsWarnings(keras.callbacks.Callback):
    """Warns, once per optimizer and cause, about statistics BNP could not
    use: skipped updates (inputs with NaN or Inf, or finite inputs whose
    squares overflow float32), and, with `statistics_momentum=0`, layers
    that see one value per input channel in a step (batch size 1), whose
    variance is then 0 and whose centred kernel gradient is only rounding.

    `BNPMixin.fit` adds it for every BNP the model holds. It reads the
    optimizers after the first step and at the end of each epoch, so no
    other training step waits for the host.
    """

    _CAUSES = {
        "non_finite_input": "a layer's input contained NaN or Inf. The "
        "weights were updated by the inner optimizer as usual, so NaN "
        "gradients may have reached them. Check the input data (e.g. with "
        "keras.callbacks.TerminateOnNaN).",
        "overflow": "a layer's input values were finite but so far apart "
        "that the sum of their squared deviations overflowed float32 "
        "(values apart by more than about sqrt(3e38 / values per channel "
        "in the batch)). Rescale those input features, e.g. with a "
        "keras.layers.Normalization layer, or use smaller batches.",
    }

    def __init__(self, bnps):
        super().__init__()
        self.bnps = list(bnps)
        self._warned = set()

    def on_train_batch_end(self, batch, logs=None):
        if batch == 0:
            self._check(None)

    def on_epoch_end(self, epoch, logs=None):
        self._check(epoch)

    def _check(self, epoch):
        when = ("in the first step" if epoch is None
                else f"up to epoch {epoch + 1}")
        for bnp in self.bnps:
            for cause, skipped in (
                    bnp.skipped_statistics_updates_by_cause.items()):
                if skipped and (id(bnp), cause) not in self._warned:
                    self._warned.add((id(bnp), cause))
                    warnings.warn(
                        f"BNP '{bnp.name}' skipped {skipped} statistics "
                        f"update(s) ({when}) because {self._CAUSES[cause]} "
                        "The running statistics were left unchanged.",
                        stacklevel=2,
                    )
            single = bnp.single_value_layers()
            if single and (id(bnp), "single") not in self._warned:
                self._warned.add((id(bnp), "single"))
                warnings.warn(
                    f"BNP '{bnp.name}' has statistics_momentum=0, so each "
                    "step's statistics are of that step's batch alone, and "
                    f"layer(s) {single} saw one value per input channel "
                    f"({when}): their variance is 0 and their mean is the "
                    "input itself, so their centred kernel gradient is 0 "
                    "but for rounding, and those kernels do not learn from "
                    "the data. Use a "
                    "statistics_momentum above 0 (the default 0.99 "
                    "averages about 100 steps) at batch size 1.",
                    stacklevel=2,
                )

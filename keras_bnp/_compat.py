"""The private Keras and TensorFlow APIs keras_bnp relies on.

Nothing else in keras_bnp imports `keras.src` or `tensorflow.python`: an
upgrade that moves one of these fails here, at import, and
`tests/test_compat.py` pins the behaviour each is used for.

Private attributes read or patched elsewhere, each covered by the tests of
the module that uses it:

- `registry`: `Layer._flatten_layers` (the model's layers, nested ones
  included); an instance's `__dict__["call"]` (capturing inputs); the
  stack frames of `tf.vectorized_map`'s tracing (`_in_vectorized_map`).
- `rules`: a tensor's `_keras_mask`; `MultiHeadAttention`'s
  `_query_dense`, `_key_dense`, `_value_dense`, `_output_dense`; an RNN's
  `inner_loop` and its cell's `_dropout_mask`, `_recurrent_dropout_mask`.
- `state`: Keras' `Optimizer._trainable_variables`, `_track_variable`;
  TensorFlow's trackable `_trackable_children`,
  `_maybe_initialize_trackable`, `_deferred_dependencies`,
  `_handle_deferred_dependencies` (checkpoints by layer path).
- `initialization`: a `Sequential`'s `_functional` graph, a
  `Functional` model's `_nodes_by_depth`.
- `coverage`: `Layer._trainable_variables`, `_flatten_layers`.
"""

from keras.src.backend.common import masking as _masking
from keras.src.backend.common import symbolic_scope as _symbolic_scope
from keras.src.layers.rnn.conv_lstm import ConvLSTMCell  # noqa: F401
from keras.src.models.functional import Functional  # noqa: F401
from keras.src.saving import saving_lib as _saving_lib
from keras.src.saving.keras_saveable import KerasSaveable  # noqa: F401
from keras.src.trainers.data_adapters.data_adapter_utils import (  # noqa: F401
    class_weight_to_sample_weights,
)
from keras.src.utils import naming as _naming
from tensorflow.python.ops import control_flow_util as _control_flow_util
from tensorflow.python.ops.parallel_for import control_flow_ops as _parallel_for

# The code object of the function in which `tf.vectorized_map` traces its
# function (`None` if TensorFlow renamed it).
PFOR_CODE = getattr(getattr(_parallel_for, "_pfor_impl", None), "__code__",
                    None)


def in_symbolic_scope():
    """Whether Keras is inferring shapes (a symbolic call, no real one)."""
    return _symbolic_scope.in_symbolic_scope()


def walk_saveable(saveable):
    """The `(attribute, child)` pairs Keras' saving visits under
    `saveable`."""
    return _saving_lib._walk_saveable(saveable)


def unique_name(name, used):
    """The name Keras' saving gives the next `name` of a container, given
    the `used` counts (updated)."""
    return _saving_lib._get_unique_name(name, used)


def snake_case(name):
    """Keras' snake case of a class name (`Conv2D` -> `conv2d`)."""
    return _naming.to_snake_case(name)


def set_keras_mask(tensor, mask):
    """Attaches a Keras mask to a tensor, as Keras layers do."""
    _masking.set_keras_mask(tensor, mask)


def in_xla_context(graph):
    """Whether ops of `graph` are being traced for XLA (`jit_compile`)."""
    return _control_flow_util.GraphOrParentsInXlaContext(graph)

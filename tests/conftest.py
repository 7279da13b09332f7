import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.experimental.enable_tensor_float_32_execution(False)


@pytest.fixture(autouse=True)
def _seed_and_clear():
    keras.utils.set_random_seed(1234)
    yield
    # Without Keras' full garbage collection (`free_memory`), which took
    # about 0.9 s a test, over a third of the suite's time.
    keras.backend.clear_session(free_memory=False)


def pytest_addoption(parser):
    parser.addoption(
        "--full", action="store_true",
        help="also run the tests marked slow (the full tier, which CI and "
        "the README's test command run); without it, the fast tier")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items
                    if not item.get_closest_marker("slow")]

"""BNP's initial scaling on raw tabular columns: a year (2000-2024) beside
three standardized columns, a linear target, an MLP 4-32-32-1 trained with
`BNP(lr)` for 5 epochs at batch size 32 on 2048 rows (seed 0), with and
without the scaling. Prints the training loss per epoch and the
validation MSE on 512 other rows.

    python -m benchmarks.research.tabular_scaling
"""

import warnings

import keras_bnp
from benchmarks.zoo import year_mlp
from benchmarks.zoo import year_table as table

warnings.simplefilter("ignore")
x, y = table(2048, 0)
x_val, y_val = table(512, 1)
print("learning rate | initial scaling | training loss per epoch | "
      "validation MSE")
for learning_rate in (0.003, 0.01, 0.03):
    for scaling in (True, False):
        model = year_mlp(seed=0)
        model.compile(optimizer=keras_bnp.BNP(
            learning_rate, initial_scaling=scaling), loss="mse")
        losses = model.fit(x, y, batch_size=32, epochs=5,
                           verbose=0).history["loss"]
        print(f"{learning_rate} | {'on' if scaling else 'off'} | "
              + ", ".join(f"{v:.3g}" for v in losses)
              + f" | {model.evaluate(x_val, y_val, verbose=0):.3g}")

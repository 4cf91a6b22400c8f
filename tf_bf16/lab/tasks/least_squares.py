"""Least squares on scikit-learn's bundled diabetes data: the paper's theory case.

A linear model (one Dense unit) fitted by full-batch SGD with momentum to the
standardized diabetes regression data (442 samples, 10 features + bias; no
download). The exact optimum is known (float64 ``numpy.linalg.lstsq``), so the
metric is the distance of the trained weights to it, ``||w - w*||`` over the
kernel and the bias. Round-to-nearest bf16 updates stall once the step
``lr * momentum-buffer`` falls below half an ulp of the weights: the distance
stops at a floor. Stochastic rounding and Kahan summation keep descending
(down to what bf16 forward/backward arithmetic allows).

Training length, from the problem alone: the loss's Hessian 2 X^T X / n has
eigenvalues 0.017 .. 8.05 (condition number 470; the diabetes features are
correlated). With momentum 0.9 and learning rate 0.003 the slowest mode decays
with time constant (1 - 0.9) / (0.003 * 0.017) ~ 1950 steps, so 40 epochs of
500 full-batch steps (20,000 steps, ~10 time constants) let float32 converge
for every seed. (An earlier 3,000-step configuration stopped float32 at
0.057 +- 0.076 over three seeds: not converged, and too noisy to compare.)

No bf16 model can get
closer than the optimum rounded to bf16 (``info["bf16_floor_distance"]``, 0.0016
here), while float32 can approach the optimum to ~1e-7: on this metric the
bf16 variants are compared with float32 *and* with that floor.
"""

import dataclasses

import numpy as np

from tf_bf16.lab.tasks.base import Task, TaskData


def load_problem():
    """(x, y, optimum): standardized features, targets and the float64 optimum
    of [kernel; bias] (the bias is the last entry)."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean()) / y.std()
    design = np.hstack([x, np.ones((len(x), 1))])
    optimum, *_ = np.linalg.lstsq(design, y, rcond=None)
    return x.astype(np.float32), y.astype(np.float32)[:, None], optimum


def bf16_floor_distance(optimum):
    """||round_bf16(w*) - w*||: no bf16 weight vector is closer to the optimum
    (each coordinate's nearest bf16 value is the closest one), so this is the
    floor of the metric for every bf16 variant, whatever the rounding."""
    import ml_dtypes

    rounded = np.asarray(optimum, np.float64).astype(ml_dtypes.bfloat16).astype(np.float64)
    return float(np.linalg.norm(rounded - optimum))


@dataclasses.dataclass
class LeastSquares(Task):
    steps_per_epoch: int = 500

    def make_data(self, seed, reduced=False):
        import tensorflow as tf

        x, y, optimum = load_problem()
        steps = self.reduced.get("steps_per_epoch", 20) if reduced else self.steps_per_epoch
        # Full batch: every step sees all 442 samples, so the order is trivially the
        # same for every variant; the seed only changes the initial weights.
        train = tf.data.Dataset.from_tensors((x, y)).repeat()
        return TaskData(train=train, eval=optimum, steps_per_epoch=steps,
                        info={"samples": len(x), "features": x.shape[1],
                              "optimum_mse": float(np.mean(
                                  (np.hstack([x, np.ones((len(x), 1))]) @ optimum
                                   - y[:, 0]) ** 2)),
                              "bf16_floor_distance": bf16_floor_distance(optimum)})

    def make_model(self, seed, reduced=False):
        import keras

        return keras.Sequential([
            keras.Input(shape=(10,)),
            keras.layers.Dense(1, kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
                               name="linear"),
        ], name="least_squares")

    def loss(self):
        import keras

        return keras.losses.MeanSquaredError()

    def evaluate(self, model, data):
        layer = model.get_layer("linear")
        kernel = np.asarray(layer.kernel.numpy(), dtype=np.float64)[:, 0]
        bias = np.asarray(layer.bias.numpy(), dtype=np.float64)
        w = np.concatenate([kernel, bias])
        return float(np.linalg.norm(w - data.eval))


TASK = LeastSquares(
    name="least_squares",
    summary="linear least squares on sklearn diabetes data, full-batch SGD momentum.",
    paper_application="theory: least-squares regression (the analysis case)",
    metric="distance to optimum",
    higher_is_better=False,
    optimizer="sgd",
    learning_rate=0.003,
    epochs=40,
    batch_size=442,
    reduced={"epochs": 3, "steps_per_epoch": 20},
    requires=("sklearn",),
)

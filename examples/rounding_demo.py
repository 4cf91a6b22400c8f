"""Why pure-bf16 training needs stochastic rounding or Kahan summation.

Least squares on scikit-learn's bundled diabetes data (no download): the same
SGD-momentum run, same data and seed, with
  - float32 weights (the target),
  - bf16 weights rounded to nearest (what plain bf16 training does),
  - bf16 weights with stochastic rounding   (tf_bf16.ops.apply_sgd),
  - bf16 weights with Kahan summation       (tf_bf16.ops.apply_sgd).
Gradients and momentum are bf16 too. Prints the distance to the exact optimum
and writes the curves to a PNG.

    python examples/rounding_demo.py [--steps 3000] [--out out/rounding_demo.png]
"""

import argparse
import os
import time

import numpy as np
import tensorflow as tf
from sklearn.datasets import load_diabetes
from tqdm import tqdm

import tf_bf16


def load_problem():
    x, y = load_diabetes(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean()) / y.std()
    x = np.hstack([x, np.ones((len(x), 1))]).astype(np.float32)
    optimum, *_ = np.linalg.lstsq(x.astype(np.float64), y.astype(np.float64), rcond=None)
    return x, y.astype(np.float32)[:, None], optimum[:, None]


def train(x, y, rounding, steps, learning_rate, momentum, seed=0, log_every=10):
    """Returns the relative excess loss over the optimum, every `log_every` steps."""
    dtype = tf.float32 if rounding == "float32" else tf.bfloat16
    rounding_arg = "nearest" if rounding == "float32" else rounding
    w = tf.Variable(tf.zeros([x.shape[1], 1], dtype), name="w")
    accum = tf.Variable(tf.zeros_like(w), name="accum")
    comp = tf.Variable(tf.zeros_like(w)) if rounding == "kahan" else None
    xs, ys = tf.constant(x), tf.constant(y)

    @tf.function
    def step(i):
        pred = tf.matmul(xs, tf.cast(w, tf.float32))
        grad = tf.matmul(xs, pred - ys, transpose_a=True) * (2.0 / len(x))
        tf_bf16.ops.apply_sgd(w, tf.cast(grad, dtype), learning_rate, momentum=momentum,
                              accumulator=accum, rounding=rounding_arg, compensation=comp,
                              seed=seed, step=i, var_id=0)
        return tf.reduce_mean(tf.square(pred - ys))

    losses = []
    for i in tqdm(range(steps), desc=f"{rounding:>10}", leave=False):
        loss = step(tf.constant(i, tf.int64))
        if i % log_every == 0:
            losses.append(float(loss))
    return np.array(losses), tf.cast(w, tf.float32).numpy()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="SGD steps (default 3000)")
    parser.add_argument("--learning-rate", type=float, default=0.003,
                        help="learning rate (default 0.003)")
    parser.add_argument("--momentum", type=float, default=0.9, help="momentum (default 0.9)")
    parser.add_argument("--out", default="out/rounding_demo.png",
                        help="where to write the learning curves (PNG)")
    args = parser.parse_args(argv)

    x, y, optimum = load_problem()
    best_loss = float(np.mean((x @ optimum - y) ** 2))
    results = {}
    for rounding in ("float32", "nearest", "stochastic", "kahan"):
        start = time.perf_counter()
        losses, w = train(x, y, rounding, args.steps, args.learning_rate, args.momentum)
        results[rounding] = (losses, np.linalg.norm(w - optimum), time.perf_counter() - start)

    print(f"\nLeast squares, diabetes data, {args.steps} SGD-momentum steps, "
          f"lr={args.learning_rate}; optimum MSE {best_loss:.5f}")
    print(f"{'weights':<22}{'final MSE':>11}{'excess over optimum':>22}{'|w - w*|':>10}"
          f"{'time':>8}")
    labels = {"float32": "float32", "nearest": "bf16, nearest", "stochastic":
              "bf16, stochastic (SR)", "kahan": "bf16, Kahan"}
    for rounding, (losses, dist, seconds) in results.items():
        excess = losses[-1] - best_loss
        print(f"{labels[rounding]:<22}{losses[-1]:>11.5f}{excess:>22.2e}{dist:>10.4f}"
              f"{seconds:>7.1f}s")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for rounding, (losses, _, _) in results.items():
        steps = np.arange(len(losses)) * 10
        ax.semilogy(steps, np.maximum(losses - best_loss, 1e-9), label=labels[rounding])
    ax.set_xlabel("step")
    ax.set_ylabel("MSE - optimal MSE")
    ax.set_title("SGD-momentum on least squares: bf16 rounding of the weight update")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"learning curves: {args.out}")


if __name__ == "__main__":
    main()

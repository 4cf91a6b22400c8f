"""Renders docs/api.md from the public API's docstrings.

    python tools/gen_api_docs.py          # rewrite docs/api.md
    python tools/gen_api_docs.py --check  # exit 1 if docs/api.md is stale

tests/test_docs.py runs --check, so the page always matches the code.
"""

import argparse
import inspect
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT = os.path.join(ROOT, "docs", "api.md")
# Document the checkout this script belongs to, whatever is installed.
sys.path.insert(0, ROOT)


def _entries():
    import tf_bf16
    from tf_bf16 import jax_ops
    from tf_bf16 import ops
    from tf_bf16 import optimizers

    return [
        ("Policy", [tf_bf16.set_policy, tf_bf16.reset_policy, tf_bf16.keep_float32,
                    tf_bf16.check_model, tf_bf16.prepare_model,
                    tf_bf16.moving_statistics_step]),
        ("Optimizers", [optimizers.SGD, optimizers.Adam, optimizers.AdamW, optimizers.Lion]),
        ("Audit", [tf_bf16.audit, tf_bf16.AuditReport]),
        ("Compare", [tf_bf16.compare]),
        ("Serving", [tf_bf16.export, tf_bf16.float32_copy]),
        ("Losses", [tf_bf16.losses.bf16_loss, tf_bf16.losses.BFloat16SoftmaxCrossEntropy]),
        ("Ops", [ops.stochastic_round, ops.rounded_assign_add, ops.apply_sgd, ops.apply_adam,
                 ops.apply_lion]),
        ("JAX functions", [jax_ops.stochastic_round, jax_ops.rounded_assign_add,
                           jax_ops.apply_sgd, jax_ops.apply_adam, jax_ops.apply_lion,
                           jax_ops.moving_average]),
        ("Errors", [tf_bf16.StrictPolicyError, tf_bf16.OpLibraryError]),
    ]


def _qualified_name(obj):
    module = obj.__module__
    public = {"tf_bf16.policy": "tf_bf16", "tf_bf16.auditing": "tf_bf16",
              "tf_bf16.auditing.report": "tf_bf16", "tf_bf16._loader": "tf_bf16",
              "tf_bf16.comparing": "tf_bf16"}
    if module.startswith("tf_bf16.optimizers."):
        module = "tf_bf16.optimizers"
    return f"{public.get(module, module)}.{obj.__name__}"


def _signature(obj):
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return "(...)"
    params = [p for name, p in sig.parameters.items() if name != "self"]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


def render():
    lines = ["# tf_bf16 API", "",
             "Generated from the docstrings by `python tools/gen_api_docs.py`; do not edit.",
             ""]
    for section, objects in _entries():
        lines += [f"## {section}", ""]
        for obj in objects:
            kind = "class" if inspect.isclass(obj) else "function"
            lines += [f"### `{_qualified_name(obj)}`", "", "```python",
                      f"{kind} {_qualified_name(obj)}{_signature(obj)}", "```", ""]
            lines += [inspect.cleandoc(obj.__doc__ or "(undocumented)"), ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if docs/api.md differs from the docstrings")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        with open(OUTPUT) as f:
            if f.read() != text:
                print(f"{OUTPUT} is stale: run python tools/gen_api_docs.py", file=sys.stderr)
                return 1
        return 0
    with open(OUTPUT, "w") as f:
        f.write(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""tf_bf16.lab: the tools around the library, apart from it.

The commands of ``python -m tf_bf16`` (``tf-bf16``): ``bench`` (bench.py),
``bench-fit`` (bench_fit.py), and ``compare`` / ``list`` / ``results``
(cli.py, which trains with runner.py and writes with report.py) with their
tasks (tasks/); common.py holds what they share.

The tools need packages the library does not: ``pip install "tf_bf16[lab]"``
(tqdm, matplotlib, scikit-learn, tensorflow-datasets). ``import tf_bf16``
imports nothing from here, and importing these modules imports none of those
packages: each command checks for what it needs when it starts.
"""

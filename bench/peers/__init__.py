"""Adapters that run one peer library on one workload and task, inside a fresh subprocess.

``bench/compare.py`` starts ``python -m peers.cell SPEC`` in ``bench/`` for every cell; the
cell loads the workload that the harness prepared (same weights, same batch, for every tool),
runs the adapter of one tool (``hessfast_peer``, ``pyhessian_peer``, ``curvlinops_peer``,
``eigenthings_peer``) and prints one JSON line.
"""

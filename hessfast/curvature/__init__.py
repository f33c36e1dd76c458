"""Curvature operators of a model's loss: the Hessian and the generalized Gauss-Newton.

``hessian(model, loss_fn, data)`` returns a :class:`~hessfast.linop.LinearOperator` over the
flattened selected parameters. Its ``matmat(V)`` multiplies a whole block ``V: [k, n]`` in one
pass over the data, by one of three exact paths that give the same numbers, or by finite
differences:

* ``"reuse_graph"`` keeps each batch's first-order gradient graph (``create_graph=True``) and
  differentiates it again for every block (double backward, batched over the k rows with
  ``is_grads_batched``). A product then costs one backward pass and no forward; used when the
  graphs of all batches fit in memory.
* ``"double_backward"`` rebuilds that graph for every batch on every pass (forward, backward,
  double backward); memory stays at one batch's graph.
* ``"fwd_rev"`` is forward-over-reverse with ``torch.func``: ``jvp`` of ``grad``, ``vmap``-ped
  over chunks of the k tangents. ``torch.func`` costs 1-2.5 s of one-time initialisation in a
  fresh process, so it is touched only when this path is requested or can win.
* ``"finite_difference"`` (the Hessian only) is central differences of two ordinary
  gradients per vector, ``(g(theta + e v) - g(theta - e v)) / 2e``, through perturbed
  copies of the parameters: no second derivative and no math-SDPA guard, so fused
  attention, compiled code and custom Functions without a double backward run as in
  training. Not exact: the step and the error are recorded as ``H.fd_step`` and
  ``H.fd_error`` (``finitediff``). ``"auto"`` picks it only when no exact second derivative
  exists, with a warning (``exact=True`` refuses instead).

The operator is exactly the Hessian of the loss averaged over all samples: each batch's mean
loss is weighted by its number of samples over the total, so an uneven last batch is exact.
Nothing here touches the user's model state: parameters enter as detached leaves through
``torch.func.functional_call``, modes are restored, buffers that training-mode layers would
update are copies, ``.grad`` is never written, and the global RNG is restored after each pass.

Modules, one job each (each imports only modules listed before it, and ``memory`` below
the package):

* ``data``: the batch source: one batch or a sequence (the rule), weights, fingerprints;
* ``lossform``: how ``loss_fn`` is called (criterion or ``loss_fn(model, batch)``), how it
  reduces over a batch, and why;
* ``model``: loss and output wrappers, parameter selection, model modes;
* ``layout``: the parameters' places in the flat vectors;
* ``autodiff``: vector-Jacobian products through a kept graph, one vector or a chunk;
* ``guard``: the parameters' fingerprint, the buffers' copies, the slots put back;
* ``cehead`` / ``lmhead``: the fused cross-entropy product w.r.t. the logits, and the GGN
  split at the model's output head;
* ``finitediff``: the finite-difference step rule and error estimate (pure functions of
  norms, shared with the FSDP operator);
* ``plan``: which path and chunk size per block size (:class:`HVPPlan`): pure policy, fed
  the timings by ``products``;
* ``options``: the options of :func:`hessian` and :func:`ggn`, stated and validated once;
* ``_contract``: the Protocol the pre-flight checks see of an operator (a leaf);
* ``forwardcheck`` / ``preflight``: the checks: at construction on batch 0, and on the
  first products;
* ``products``: batch 0's graph, the graph cache, the timings and the one chunk loop (a
  mixin of the operator);
* ``dataparallel``: the rank group, its ``Agreement`` at construction and the all-reduce;
* ``operator``: :class:`CurvatureOperator`, built top to bottom in one ``__init__``: the
  only module that touches the operator's private state;
* ``hessian`` / ``ggn``: the two operators, their graph states and factories;
* ``fsdp``: :class:`FSDPHessian`, the Hessian of an FSDP2 (``fully_shard``) model by finite
  differences of its own sharded gradients, on vectors sharded like the parameters.
"""

from __future__ import annotations

from .fsdp import FSDPHessian
from .ggn import GGNOperator, ggn
from .hessian import HessianOperator, hessian
from .operator import CurvatureOperator
from .plan import HVPPlan

__all__ = ["CurvatureOperator", "FSDPHessian", "GGNOperator", "HVPPlan", "HessianOperator", "ggn",
           "hessian"]

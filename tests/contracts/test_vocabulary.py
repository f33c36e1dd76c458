"""One vocabulary across the public calls (issue 17): the explicit signatures that repeat
another call's keywords cannot drift from it, and the retired spellings survive only as
deprecated aliases."""

from __future__ import annotations

import inspect

import pytest
import torch

import hessfast as hf


def _params(fn) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(fn).parameters)


def test_lambda_max_forwards_eigsh_keywords_with_eigsh_defaults():
    eig, lmax = _params(hf.eigsh), _params(hf.lambda_max)
    for name, p in lmax.items():
        assert name in eig, f"lambda_max takes {name!r}, which eigsh does not"
        assert p.default == eig[name].default, (name, p.default, eig[name].default)
    # everything of eigsh but what lambda_max fixes (k=1, which="LA", vectors=False: it
    # returns a number) is forwarded
    assert set(eig) - set(lmax) == {"k", "which", "vectors"}


def test_hessian_and_ggn_share_their_options():
    h, g = _params(hf.hessian), _params(hf.ggn)
    shared = set(h) & set(g)
    assert set(h) - shared == set(), set(h) - shared  # ggn adds only lm_head
    assert set(g) - shared == {"lm_head"}
    for name in shared:
        assert h[name].default == g[name].default, name


# The words of the vocabulary and the retired spellings that remain one release as aliases.
RETIRED = {"probes": "num_probes", "steps": "num_steps", "max_steps": "num_steps"}


@pytest.mark.parametrize("fn", [hf.analyze, hf.block_spectra, hf.spectral_density,
                                hf.condition_number, hf.trace, hf.diagonal, hf.eigsh,
                                hf.estimate_memory, hf.SharpnessTracker])
def test_retired_spellings_are_deprecated_aliases_only(fn):
    params = _params(fn)
    doc = inspect.getdoc(fn) or ""
    for old, new in RETIRED.items():
        if old in params:
            assert new in params, f"{fn.__name__} takes {old!r} without {new!r}"
            assert params[old].default is None, f"{fn.__name__}({old}=) is not an alias"
            assert "deprecated" in doc.lower(), f"{fn.__name__}'s docstring omits {old!r}"


def test_analyze_probes_alias_warns_and_names_the_new_keyword():
    A = hf.LinearOperator.from_matrix(torch.diag(torch.arange(1.0, 41.0, dtype=torch.float64)))
    with pytest.warns(DeprecationWarning, match="num_probes"):
        hf.analyze(A, k=1, probes=2, num_steps=4, progress=False)

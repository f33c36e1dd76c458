"""hessian(), ggn() and CurvatureOptions state their options once: every keyword of the two
functions is a field of CurvatureOptions with the same default and type, every field is
documented once and listed in both docstrings, and a call's options reach the operator."""

from __future__ import annotations

import dataclasses
import inspect
import re

import pytest
import torch
from torch import nn

import hessfast as hf
from hessfast.curvature.options import CurvatureOptions

FIELDS = {f.name: f for f in dataclasses.fields(CurvatureOptions)}


@pytest.mark.parametrize("fn, lacks", [(hf.hessian, {"lm_head"}), (hf.ggn, set())])
def test_keywords_are_the_fields_with_their_defaults_and_types(fn, lacks):
    kw = {n: p for n, p in inspect.signature(fn).parameters.items()
          if p.kind is p.KEYWORD_ONLY}
    assert set(kw) == set(FIELDS) - lacks
    for name, p in kw.items():
        assert p.default == FIELDS[name].default, name
        assert str(p.annotation) == str(FIELDS[name].type), name
    doc = fn.__doc__
    assert "options (keyword-only)" not in doc  # replaced by the entries
    for name in kw:
        assert f"        {name}" in doc or f", {name}" in doc, name


def _args_entries(doc: str) -> list[str]:
    """The names of the entries of a Google-style docstring's ``Args:`` section (an entry
    may name several arguments, ``outputs, targets, causal_lm: ...``)."""
    section = doc.split("    Args:\n", 1)[1]
    section = section.split("\n\n", 1)[0]  # the section ends at the first blank line
    names = []
    for line in section.splitlines():
        m = re.match(r"^ {8}(\w+(?:, \w+)*)(?: \([^)]*\))?: ", line)
        if m:
            names += m.group(1).split(", ")
    return names


@pytest.mark.parametrize("fn", [hf.hessian, hf.ggn])
def test_every_argument_has_one_entry_in_the_runtime_docstring(fn):
    # ruff's D417 cannot see the options' entries (with_options_doc inserts them at import,
    # hence the noqa on the two defs): this checks the docstring help() shows instead.
    documented = _args_entries(fn.__doc__)
    assert sorted(documented) == sorted(inspect.signature(fn).parameters)


def test_every_field_is_documented_once():
    entries = [f.metadata["names"] or f.name for f in FIELDS.values() if f.metadata["doc"]]
    documented = [n for entry in entries for n in entry.split(", ")]
    assert sorted(documented) == sorted(FIELDS)


def test_options_reach_the_operator_and_unknown_keywords_name_the_function():
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    data = (torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64))
    H = hf.hessian(model, nn.MSELoss(), data, hvp_mode="double_backward", bn_mode="as_is")
    assert (H.hvp_mode, H.bn_mode) == ("double_backward", "as_is")
    with pytest.raises(TypeError, match=r"hessian\(\) got an unexpected keyword"):
        hf.hessian(model, nn.MSELoss(), data, lm_head=model)
    with pytest.raises(TypeError, match=r"ggn\(\) got an unexpected keyword"):
        hf.ggn(model, nn.MSELoss(), data, bogus=1)

"""``params=``: one selection rule (hessfast.curvature.model.select_params) for the API and the
CLI's ``--params``: a parameter object, an exact name, or else a regular expression matched
with ``re.search`` against the trainable parameters' names."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import hessfast as hf
from hessfast._cli_load import UsageError
from hessfast._cli_load import select_params as cli_select
from hessfast.curvature.model import select_params
from hessfast.errors import ArgumentTypeError, ConfigurationError


class Net(nn.Module):
    def __init__(self, extra: int = 0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3, 4)
        self.out = nn.Linear(4, 2)
        self.more = nn.ModuleList(nn.Linear(2, 2) for _ in range(extra))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.out(torch.tanh(self.fc(x)))
        for m in self.more:
            x = m(x)
        return x


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 3, generator=g), torch.randn(5, 2, generator=g)) for _ in range(2)]


def names(model: nn.Module, params: list) -> list[str]:
    return select_params(model, params)[0]


def test_a_module_name_selects_its_parameters_in_the_api() -> None:
    """``params=["fc"]`` (a module's name, as ``--params fc``) selects fc.weight and fc.bias:
    the same operator, bit for bit, as naming both."""
    model, data = Net(), _data()
    H = hf.hessian(model, nn.MSELoss(), data, params=["fc"])
    assert H.param_names == ["fc.weight", "fc.bias"]
    exact = hf.hessian(model, nn.MSELoss(), data, params=["fc.weight", "fc.bias"])
    V = torch.randn(3, H.shape[0], generator=torch.Generator().manual_seed(2),
                    dtype=H.dtype)
    assert torch.equal(H.matmat(V), exact.matmat(V))


def test_regex_and_search_semantics() -> None:
    model = Net(extra=2)
    assert names(model, [r"\.bias$"]) == ["fc.bias", "out.bias", "more.0.bias", "more.1.bias"]
    assert names(model, ["more"]) == ["more.0.weight", "more.0.bias", "more.1.weight",
                                      "more.1.bias"]
    assert names(model, [r"^more\.1\."]) == ["more.1.weight", "more.1.bias"]
    # re.search: a pattern matches anywhere in the name, so "o" finds out.* and more.*
    assert names(model, ["o"]) == [n for n, _ in model.named_parameters() if "o" in n]


def test_exact_names_keep_their_behaviour() -> None:
    """Exact names: the order given, frozen ones too (with a warning), twice is an error;
    tensors likewise; a pattern never picks frozen parameters."""
    model = Net()
    assert names(model, ["out.bias", "fc.weight"]) == ["out.bias", "fc.weight"]
    assert names(model, [model.out.weight, "fc.bias"]) == ["out.weight", "fc.bias"]
    with pytest.raises(ConfigurationError, match="same parameter twice"):
        names(model, ["fc.bias", model.fc.bias])
    model.fc.bias.requires_grad_(False)
    with pytest.warns(UserWarning, match="frozen"):
        assert names(model, ["fc.bias"]) == ["fc.bias"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert names(model, ["fc"]) == ["fc.weight"]
    with pytest.raises(ArgumentTypeError, match=r"params=\['fc'\]"):
        select_params(model, "fc")


def test_a_pattern_adds_what_no_other_item_selected() -> None:
    model = Net()
    assert names(model, ["fc", "fc.weight"]) == ["fc.bias", "fc.weight"]
    assert names(model, ["fc.weight", "fc"]) == ["fc.weight", "fc.bias"]
    assert names(model, ["fc", r"\.bias$"]) == ["fc.weight", "fc.bias", "out.bias"]


def test_an_unmatched_pattern_is_named_with_the_parameters() -> None:
    model = Net(extra=4)  # 12 parameters: 8 shown, then how many more
    with pytest.raises(ConfigurationError) as err:
        hf.hessian(model, nn.MSELoss(), _data(), params=["fc.weight", "conv"])
    msg = str(err.value)
    assert msg.startswith("params: 'conv' matches no trainable parameter (the model has: "
                          "['fc.weight', 'fc.bias', 'out.weight'")
    assert "'more.1.bias'] and 4 more" in msg and "re.search" in msg
    with pytest.raises(ConfigurationError, match=r"'\(' is not a regular expression \(.*\) "
                                                 "nor a parameter's name"):
        select_params(model, ["("])


@pytest.mark.parametrize("pattern", ["fc", "fc.weight", r"\.bias$", "^out", "nomatch", "("])
def test_cli_and_api_agree(pattern: str) -> None:
    """``--params PATTERN`` selects what ``params=[PATTERN]`` selects, and refuses what it
    refuses (as a usage error of --params, with the same words)."""
    model = Net(extra=1)
    try:
        api = names(model, [pattern])
    except ConfigurationError as exc:
        with pytest.raises(UsageError) as cli_err:
            cli_select(model, pattern)
        assert cli_err.value.arg == "--params"
        assert f"params: {cli_err.value}" == str(exc)
        return
    assert cli_select(model, pattern) == api

"""hessfast.analysis.weights: a checkpoint's state_dict into a model, the rule the CLI and
analyze_checkpoints share."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hessfast.analysis.weights import load_weights, read_state_dict
from hessfast.errors import ConfigurationError


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


@pytest.mark.parametrize("wrap", ["", "module.", "_orig_mod.", "module._orig_mod."])
@pytest.mark.parametrize("holder", [None, "state_dict", "model"])
def test_wrapped_and_held_state_dicts_load_bitwise(tmp_path, wrap: str, holder) -> None:
    src, dst = _model(0), _model(1)
    state = {wrap + k: v for k, v in src.state_dict().items()}
    path = tmp_path / "ck.pt"
    torch.save(state if holder is None else {holder: state, "step": 7}, path)
    removed = load_weights(dst, path)
    assert "".join(removed) == wrap
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(),
                                                 dst.state_dict().values(), strict=True))


def test_mismatch_is_refused_naming_the_model_and_left_untouched(tmp_path) -> None:
    dst = _model(1)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    path = tmp_path / "other.pt"
    torch.save({"module.encoder.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ConfigurationError, match=r"does not match make_model\(\)'s model .*"
                       r"1 tensors in the checkpoint, 4 in the model, 0 names in common"):
        load_weights(dst, path, name="make_model()'s model")
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


def test_unreadable_files_are_named(tmp_path) -> None:
    with pytest.raises(ConfigurationError, match="no such file"):
        read_state_dict(tmp_path / "absent.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ConfigurationError, match="could not be read as a weights-only"):
        read_state_dict(tmp_path / "text.pt")
    torch.save({"step": 3}, tmp_path / "nostate.pt")
    with pytest.raises(ConfigurationError, match="holds no state_dict"):
        read_state_dict(tmp_path / "nostate.pt")

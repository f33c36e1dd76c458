"""hessfast.integrations.HessianCallback in real transformers ``Trainer`` runs on a tiny GPT-2
built from a config (no downloads), with dropout on so that any random draw the callback made
would change the trained weights: the run is bitwise the run without the callback, the
measurements are logged at the right steps, and they agree with hessfast's own solvers on the
held batches at the same weights."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from dataclasses import fields
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import hessfast as hf
from hessfast.analysis.tracking import SharpnessTracker, TrackPoint
from hessfast.errors import ArgumentTypeError, ConfigurationError, HessfastError

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from hessfast.integrations import HessianCallback  # noqa: E402 - after the skip

pytestmark = pytest.mark.usefixtures("single_thread", "no_leaking_global_state")

VOCAB, SEQ, SAMPLES = 50, 8, 32


def _needs_trainer() -> None:
    """transformers' Trainer needs accelerate (its own ImportError otherwise)."""
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")


def _model(seed: int = 0) -> nn.Module:
    """GPT-2 with dropout 0.1 everywhere (the config's default), the same weights per seed."""
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=VOCAB,
                                  n_positions=16, bos_token_id=0, eos_token_id=0,
                                  resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg)


class _Tokens(torch.utils.data.Dataset):
    """In-memory next-token data: dicts of input_ids and labels."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, VOCAB, (SAMPLES, SEQ), generator=g)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _batch(start: int, size: int = 4) -> dict:
    ids = _Tokens().ids[start:start + size]
    return {"input_ids": ids, "labels": ids.clone()}


def _train(tmp_path, callbacks, max_steps: int = 6, **args) -> transformers.Trainer:
    kw = dict(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4,
              report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, seed=0,
              dataloader_num_workers=0, disable_tqdm=True)
    kw.update(args)
    trainer = transformers.Trainer(model=_model(), args=transformers.TrainingArguments(**kw),
                                   train_dataset=_Tokens(), callbacks=callbacks)
    trainer.train()
    return trainer


class _SaveWeights(transformers.TrainerCallback):
    """The model's weights at the end of one optimizer step."""

    def __init__(self, step: int) -> None:
        self.step, self.weights = step, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}


class _DrawsRandom(transformers.TrainerCallback):
    """A callback that draws one number from torch's global generator at step 2."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            torch.rand(1)


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _optimizer_tensors(trainer) -> dict:
    state = trainer.optimizer.state_dict()["state"]
    return {f"{i}.{k}": v for i, s in state.items() for k, v in s.items()
            if isinstance(v, torch.Tensor)}


def _losses(trainer) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]


def _entries(trainer, key: str = "hessian/lambda_max") -> dict[int, dict]:
    return {e["step"]: e for e in trainer.state.log_history if key in e}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The done-when pair: 6 steps without and with the callback (every=2, a trace), the
    global random states after each, and the weights at step 4 of the callback's run."""
    _needs_trainer()
    tmp = tmp_path_factory.mktemp("runs")
    out = {}
    for name in ("plain", "tracked"):
        cb = HessianCallback(every=2, num_probes=4) if name == "tracked" else None
        saver = _SaveWeights(4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers' own notices
            trainer = _train(tmp / name, [c for c in (cb, saver) if c is not None])
        out[name] = {"trainer": trainer, "cb": cb, "at4": saver.weights,
                     "rng": torch.get_rng_state(), "py": __import__("random").getstate()}
    return out


# -- the done-when ------------------------------------------------------------------------------
def test_every_2_over_6_steps_records_steps_2_4_6(runs):
    cb = runs["tracked"]["cb"]
    assert [p.step for p in cb.history] == [2, 4, 6]
    assert all(p.converged for p in cb.history)
    assert sorted(cb.traces) == [2, 4, 6]


def test_the_run_is_bitwise_the_run_without_the_callback(runs):
    plain, tracked = runs["plain"]["trainer"], runs["tracked"]["trainer"]
    assert _same_tensors(plain.model.state_dict(), tracked.model.state_dict())
    assert _same_tensors(_optimizer_tensors(plain), _optimizer_tensors(tracked))
    assert len(_optimizer_tensors(plain)) > 0
    assert plain.lr_scheduler.get_last_lr() == tracked.lr_scheduler.get_last_lr()
    assert _losses(plain) == _losses(tracked) and len(_losses(plain)) == 6
    assert ([m.training for m in plain.model.modules()]
            == [m.training for m in tracked.model.modules()])
    assert all(p.grad is None for p in tracked.model.parameters())
    assert torch.equal(runs["plain"]["rng"], runs["tracked"]["rng"])
    assert runs["plain"]["py"] == runs["tracked"]["py"]


def test_a_callback_that_draws_a_random_number_would_be_seen(runs, tmp_path):
    """The equality above can fail: dropout makes the weights follow the global generator."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        drawn = _train(tmp_path, [_DrawsRandom()])
    assert not _same_tensors(runs["plain"]["trainer"].model.state_dict(),
                             drawn.model.state_dict())


def test_the_values_are_logged_at_the_measured_steps(runs):
    trainer, cb = runs["tracked"]["trainer"], runs["tracked"]["cb"]
    entries = _entries(trainer)
    assert sorted(entries) == [2, 4, 6]
    for p in cb.history:
        e = entries[p.step]
        assert e["hessian/lambda_max"] == p.lambda_max
        assert e["hessian/trace"] == cb.traces[p.step][0]
        assert e["hessian/matvecs"] == p.num_matvecs
        # AdamW: the governing pair is the preconditioned one; its first steps are warm-up
        assert e["hessian/sharpness"] == p.preconditioned_lambda_max
        assert p.warmup and e["hessian/warmup"] == 1.0 and not p.at_edge
        assert e.get("hessian/at_edge", 0.0) == 0.0  # absent at lr 0 (step 6)
        assert "epoch" in e
    # the trainer's own logs at the measured steps are still there
    assert sorted(s for s, _ in _losses(trainer)) == [1, 2, 3, 4, 5, 6]


def test_the_threshold_uses_the_learning_rate_after_the_scheduler_step(runs):
    """AdamW (the Trainer's default) beta1 0.9: 38 / lr, lr the rate of the NEXT update,
    which the trainer logs at the next step; the linear schedule ends at lr 0, where no
    threshold exists and none is logged."""
    trainer, cb = runs["tracked"]["trainer"], runs["tracked"]["cb"]
    lr_used = {e["step"]: e["learning_rate"] for e in trainer.state.log_history
               if "learning_rate" in e}
    entries = _entries(trainer)
    for step in (2, 4):
        assert entries[step]["hessian/threshold"] == pytest.approx(38.0 / lr_used[step + 1],
                                                                    rel=1e-12)
        assert entries[step]["hessian/ratio"] == pytest.approx(
            entries[step]["hessian/sharpness"] / entries[step]["hessian/threshold"], rel=1e-12)
    assert cb.history[-1].lr == 0.0 and "hessian/threshold" not in entries[6]


def test_lambda_max_and_trace_agree_with_hessfast_at_the_same_weights(runs):
    cb, weights = runs["tracked"]["cb"], runs["tracked"]["at4"]
    model = _model()
    model.load_state_dict(weights)
    model.train()  # as the trainer holds it: the measurement is the eval-mode curvature

    def loss_fn(model, batch):
        return model(**batch).loss

    H = hf.hessian(model, loss_fn, cb.batches)
    point = next(p for p in cb.history if p.step == 4)
    assert point.lambda_max == pytest.approx(hf.lambda_max(H), rel=2 * cb.tol)
    # the second measurement (index 1) draws the trace's probes from seed + 1
    tr = hf.trace(H, max_matvecs=cb.num_probes, seed=cb.seed + 1)
    assert cb.traces[4][0] == pytest.approx(tr.value, rel=1e-5, abs=1e-5)


def test_the_held_batches_are_the_first_training_samples_in_dataset_order(runs):
    cb = runs["tracked"]["cb"]
    assert len(cb.batches) == 1
    assert torch.equal(cb.batches[0]["input_ids"], _Tokens().ids[:4])


def test_the_point_carries_the_trainers_loss_when_points_have_one(runs):
    if "loss" not in {f.name for f in fields(TrackPoint)}:
        pytest.skip("this SharpnessTracker's points carry no loss")
    trainer, cb = runs["tracked"]["trainer"], runs["tracked"]["cb"]
    logged = dict(_losses(trainer))
    assert [p.loss for p in cb.history] == [logged[p.step] for p in cb.history]


def test_to_json_round_trip_and_plot(runs, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    cb = runs["tracked"]["cb"]
    path = tmp_path / "sharpness.json"
    text = cb.to_json(path)
    assert path.read_text(encoding="utf-8") == text
    back = SharpnessTracker.from_json(path)
    assert back.history == cb.history
    d = json.loads(text)
    assert [t["step"] for t in d["trace"]] == [2, 4, 6]
    assert [t["value"] for t in d["trace"]] == [cb.traces[s][0] for s in (2, 4, 6)]
    assert d["callback"]["every"] == 2 and d["callback"]["num_probes"] == 4
    fig = cb.plot(tmp_path / "sharpness.png")
    assert isinstance(fig, Figure) and (tmp_path / "sharpness.png").stat().st_size > 0


# -- other optimizers, given data, the GGN ------------------------------------------------------
def test_sgd_given_data_the_raw_pair_governs(tmp_path):
    """SGD at a constant lr: 2 / lr against lambda_max itself; data= given as two batches
    (held as given)."""
    _needs_trainer()
    data = [_batch(8), _batch(12)]
    cb = HessianCallback(every=1, k=2, data=data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = _train(tmp_path, [cb], max_steps=3, optim="sgd", learning_rate=0.5,
                         lr_scheduler_type="constant")
    assert [p.step for p in cb.history] == [1, 2, 3]
    assert [torch.equal(b["input_ids"], d["input_ids"]) for b, d in zip(
        cb.batches, data, strict=True)] == [True, True]
    entries = _entries(trainer)
    assert sorted(entries) == [1, 2, 3]
    for p in cb.history:
        e = entries[p.step]
        assert e["hessian/sharpness"] == e["hessian/lambda_max"] == p.lambda_max
        assert e["hessian/lambda_2"] == p.eigenvalues[1] <= p.eigenvalues[0]
        assert e["hessian/threshold"] == 2.0 / 0.5
        assert e["hessian/ratio"] == pytest.approx(p.lambda_max / 4.0, rel=1e-12)
        assert e["hessian/at_edge"] == float(e["hessian/ratio"] >= 0.9)


def test_ggn_of_a_causal_lm(tmp_path):
    """curvature="ggn": cross-entropy on the logits, shifted for next-token prediction."""
    _needs_trainer()
    cb, saver = HessianCallback(every=3, curvature="ggn"), _SaveWeights(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = _train(tmp_path, [cb, saver], max_steps=3)
    (entry,) = _entries(trainer, "ggn/lambda_max").values()
    model = _model()
    model.load_state_dict(saver.weights)
    G = hf.ggn(model, nn.CrossEntropyLoss(), cb.batches, causal_lm=True)
    assert entry["ggn/lambda_max"] == pytest.approx(hf.lambda_max(G), rel=2 * cb.tol)
    assert entry["ggn/lambda_max"] > 0


def test_an_optimizer_without_a_known_threshold_tracks_lambda_max_only(tmp_path):
    _needs_trainer()
    cb = HessianCallback(every=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _train(tmp_path, [cb], max_steps=2, optim="adafactor")
    assert any("no edge-of-stability threshold is known for Adafactor" in str(w.message)
               for w in caught)
    (entry,) = _entries(trainer).values()
    assert entry["hessian/lambda_max"] == entry["hessian/sharpness"] == cb.history[0].lambda_max
    assert "hessian/threshold" not in entry and "hessian/ratio" not in entry


# -- driven by hand: no Trainer on the call stack -----------------------------------------------
def _drive(cb: HessianCallback, model: nn.Module, step: int):
    # the callback reads no argument when data= is given (TrainingArguments needs accelerate)
    args = SimpleNamespace(per_device_train_batch_size=4)
    state, control = transformers.TrainerState(), transformers.TrainerControl()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cb.on_train_begin(args, state, control, model=model, optimizer=opt)
    state.global_step = step
    cb.on_step_end(args, state, control, model=model, optimizer=opt)
    return state


def test_without_a_trainer_the_values_go_to_log_history_with_a_warning():
    cb = HessianCallback(every=2, data=_batch(0))
    with pytest.warns(UserWarning, match="no transformers.Trainer found"):
        state = _drive(cb, _model(), 4)
    assert [e["step"] for e in state.log_history] == [4]
    assert state.log_history[0]["hessian/lambda_max"] == cb.history[0].lambda_max


def test_a_diverged_model_is_recorded_and_logged_not_raised():
    model = _model()
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    cb = HessianCallback(every=1, data=_batch(0), num_probes=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracker's divergence warning, the lost logger
        state = _drive(cb, model, 3)
    (point,) = cb.history
    assert point.diverged and point.lambda_max is None and 3 not in cb.traces
    (entry,) = state.log_history
    assert entry["hessian/diverged"] == 1.0 and "hessian/lambda_max" not in entry


def test_batches_without_labels_are_refused_naming_the_labels():
    cb = HessianCallback(every=1, data={"input_ids": _Tokens().ids[:4]})
    with pytest.raises(HessfastError, match="labels"):
        _drive(cb, _model(), 1)


# -- arguments and the optional import ----------------------------------------------------------
@pytest.mark.parametrize("kw, name", [
    ({"every": 0}, "every"), ({"every": 2, "k": 0}, "k"),
    ({"every": 2, "curvature": "x"}, "curvature"), ({"every": 2, "num_probes": 2}, "num_probes"),
    ({"every": 2, "num_probes": -1}, "num_probes"), ({"every": 2, "num_batches": 0}, "num_batches"),
    ({"every": 2, "tol": 0.0}, "tol"), ({"every": 2, "bn_mdoe": "eval"}, "bn_mdoe"),
    ({"every": True}, "every"),
])
def test_bad_arguments_name_the_argument(kw, name):
    with pytest.raises(ConfigurationError, match=name):
        HessianCallback(**kw)


def test_bad_types_are_refused():
    with pytest.raises(ArgumentTypeError, match="loss_fn"):
        HessianCallback(every=1, loss_fn=3)
    with pytest.raises(ArgumentTypeError, match="trainer"):
        HessianCallback(every=1, trainer=object())


def test_records_before_training_are_refused():
    cb = HessianCallback(every=1)
    assert cb.history == [] and cb.batches is None
    with pytest.raises(ConfigurationError, match="Trainer.train"):
        cb.to_json()
    with pytest.raises(ConfigurationError, match="Trainer.train"):
        cb.plot()


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)


def test_importing_hessfast_imports_no_transformers():
    res = _python("import sys, hessfast, hessfast.integrations; "
                  "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_without_transformers_the_callback_asks_for_it():
    res = _python("import sys; sys.modules['transformers'] = None\n"
                  "import hessfast.integrations as i\n"
                  "try:\n    i.HessianCallback\nexcept ImportError as e:\n    print(e)")
    assert res.returncode == 0, res.stderr
    assert "pip install transformers" in res.stdout

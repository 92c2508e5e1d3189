"""The re-tuning attack (fip_fast.evaluation.retune): it brings back a backdoor that was only hidden, because of its
triggered samples; it leaves the attacked model alone; it is deterministic in its seed; bad settings are refused."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _synthetic import TARGET, make_task, trigger

from fip_fast.evaluation.retune import Retune, retune, retune_asr

pytestmark = pytest.mark.usefixtures("one_thread")

#: Stronger than the default (10 steps at lr 0.01, 1 triggered sample in 32), which barely moves the synthetic
#: task's tiny network (ASR 0.0 → 0.01); the mechanism under test is the same.
STRONG = Retune(steps=20, lr=0.02, per_batch=4)


class _Trigger:
    def apply(self, x):
        return trigger(x)


@pytest.fixture(scope="module")
def hidden():
    """(task, model): the synthetic backdoored model after a superficial removal — 5 SGD steps on clean batches
    plus their triggered copies with the *true* labels, which takes the ASR to 0 without leaving the basin."""
    task = make_task(0)
    m = copy.deepcopy(task.model).train()
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        i = torch.randint(task.clean_x.shape[0], (64,), generator=g)
        x, y = task.clean_x[i], task.clean_y[i]
        loss = F.cross_entropy(m(torch.cat([x, trigger(x[:16])])), torch.cat([y, y[:16]]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return task, m.eval()


def _asr(task, model, cfg=STRONG, seed=0):
    return retune_asr(model, (task.clean_x, task.clean_y), (trigger(task.test_x), task.test_y), _Trigger(), TARGET,
                      cfg, seed=seed)


def test_retune_brings_back_a_hidden_backdoor_through_its_triggered_samples(hidden):
    task, model = hidden
    before = task.asr(model)
    assert before <= 0.05                                              # the removal hid the backdoor
    after = _asr(task, model)
    # the same fine-tuning without the triggered samples: the rise comes from them, not from fine-tuning itself
    control = _asr(task, model, Retune(steps=STRONG.steps, lr=STRONG.lr, per_batch=0))
    assert after >= before + 0.2, (before, after)
    assert control <= before + 0.05, (before, control)


def test_retune_leaves_the_model_alone_and_is_deterministic(hidden):
    task, model = hidden
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [(m.training, [p.requires_grad for p in m.parameters(recurse=False)]) for m in model.modules()]
    a, b = _asr(task, model, seed=3), _asr(task, model, seed=3)
    assert a == b
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert flags == [(m.training, [p.requires_grad for p in m.parameters(recurse=False)]) for m in model.modules()]
    copy_ = retune(model, (task.clean_x, task.clean_y), _Trigger(), TARGET, STRONG, seed=3)
    assert copy_ is not model and not copy_.training
    assert any(not torch.equal(v, copy_.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("kw, match", [(dict(steps=0), "steps"), (dict(per_batch=32), "per_batch"),
                                       (dict(lr=float("nan")), "lr"), (dict(n_trigger=0), "n_trigger")])
def test_retune_settings_are_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        Retune(**kw)


def test_retune_inputs_are_checked(hidden):
    task, model = hidden
    clean = (task.clean_x, task.clean_y)
    with pytest.raises(TypeError, match="apply"):
        retune(model, clean, trigger, TARGET)                         # a bare function, not an attack object
    with pytest.raises(ValueError, match="n_trigger"):
        retune(model, (task.clean_x[:3], task.clean_y[:3]), _Trigger(), TARGET)

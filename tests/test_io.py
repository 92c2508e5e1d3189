"""Safe loading, atomic writes, input protection, checkpoint / resume."""
import os
import pickle
import random

import numpy as np
import pytest
import torch
from torch import nn

from fip_fast.io import (
    Checkpointer,
    OverwriteInputError,
    UnsafeCheckpointError,
    atomic_path,
    atomic_savefig,
    atomic_write_json,
    atomic_write_text,
    check_not_input,
    load_state_dict,
    load_weights,
    save_model,
)


class Evil:
    def __reduce__(self):  # would run code on a full unpickle
        return (os.system, ("echo pwned",))


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


def test_full_model_pickle_refused(tmp_path):
    p = tmp_path / "model.pt"
    torch.save(_net(), p)  # a pickled nn.Module: not weights-only
    with pytest.raises(UnsafeCheckpointError, match="not a weights-only checkpoint") as e:
        load_state_dict(p)
    assert "safetensors" in str(e.value), "the message says how to convert"
    with pytest.raises(UnsafeCheckpointError):
        load_weights(_net(), p)


def test_malicious_pickle_refused(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "x": Evil()}, p)
    with pytest.raises(UnsafeCheckpointError):
        load_state_dict(p)
    p2 = tmp_path / "evil.pkl"
    p2.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UnsafeCheckpointError):
        load_state_dict(p2)


def _fresh():
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))  # different random init


def _assert_same(a, b):
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_weights_only_and_safetensors_roundtrip(tmp_path):
    net = _net()
    # A wrapped DataParallel-style weights-only checkpoint loads …
    torch.save({"state_dict": {"module." + k: v for k, v in net.state_dict().items()}, "epoch": 3}, tmp_path / "w.pt")
    _assert_same(net, load_weights(_fresh(), tmp_path / "w.pt"))
    # … and so does our own safetensors output.
    save_model(net, tmp_path / "w.safetensors")
    _assert_same(net, load_weights(_fresh(), tmp_path / "w.safetensors"))
    with pytest.raises(RuntimeError, match="do not fit this model"):
        load_weights(nn.Linear(4, 2), tmp_path / "w.safetensors")


def test_save_model_tied_weights(tmp_path):
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    net[1].weight = net[0].weight  # shared storage: safetensors would refuse without de-duplication
    save_model(net, tmp_path / "tied.safetensors")
    sd = load_state_dict(tmp_path / "tied.safetensors")
    assert torch.equal(sd["0.weight"], sd["1.weight"])


def _temps(d):
    return [p for p in os.listdir(d) if ".tmp" in p]


def test_atomic_write_success_leaves_no_temp(tmp_path):
    p = tmp_path / "r.json"
    atomic_write_json(p, {"acc": 0.9})
    atomic_write_text(tmp_path / "r.md", "# report\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    atomic_savefig(fig, tmp_path / "f.png")
    plt.close(fig)
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    assert p.read_text().strip().startswith("{")
    assert _temps(tmp_path) == []


def test_atomic_write_failure_does_not_clobber(tmp_path):
    p = tmp_path / "r.json"
    p.write_text("old")
    with pytest.raises(TypeError):
        atomic_write_json(p, {"x": object()})  # not serializable
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(p) as tmp:
            tmp.write_text("half-writ")
            raise RuntimeError("boom")
    assert p.read_text() == "old"
    assert _temps(tmp_path) == []


def test_never_overwrite_input(tmp_path):
    inp = tmp_path / "in.safetensors"
    save_model(_net(), inp)
    before = inp.read_bytes()
    with pytest.raises(OverwriteInputError, match="refusing to overwrite the input"):
        save_model(_net(), inp, protect=[inp])
    with pytest.raises(OverwriteInputError):
        check_not_input(tmp_path / "sub" / ".." / "in.safetensors", inp)
    link = tmp_path / "link.safetensors"
    os.link(inp, link)
    with pytest.raises(OverwriteInputError):
        atomic_write_text(link, "x", protect=[inp])
    assert inp.read_bytes() == before
    check_not_input(tmp_path / "out.safetensors", inp, None)  # a different path is fine


def _train_steps(model, opt, steps, start=0, ckpt=None):
    for step in range(start, steps):
        x = torch.randn(8, 4)
        y = torch.randint(0, 2, (8,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        _ = random.random() + np.random.rand()
        if ckpt is not None:
            ckpt.maybe_save(step + 1, model, opt, extra={"note": "ok", "best": 0.5, "hist": [1, 2]})


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.99)),
])
def test_resume_round_trip(tmp_path, make_opt):
    # Reference: 10 uninterrupted steps.
    torch.manual_seed(1)
    ref = _net()
    ref_opt = make_opt(ref.parameters())
    torch.manual_seed(2)
    _train_steps(ref, ref_opt, 10)

    # Interrupted run: 7 steps with a checkpoint every 3 (steps 3 and 6), then "crash".
    torch.manual_seed(1)
    net = _net()
    opt = make_opt(net.parameters())
    ckpt = Checkpointer(tmp_path / "ck", every=3, keep=2)
    assert ckpt.resume(net, opt) == 0
    torch.manual_seed(2)
    _train_steps(net, opt, 7, ckpt=ckpt)
    assert [p.name for p in ckpt.checkpoints()] == ["ckpt-00000003.pt", "ckpt-00000006.pt"]
    payload = torch.load(ckpt.checkpoints()[-1], weights_only=True)  # weights-only loadable
    assert payload["step"] == 6 and payload["extra"]["hist"] == [1, 2]

    # Resume in a fresh "process": new objects, scrambled RNG.
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    net2 = _net()
    opt2 = make_opt(net2.parameters())
    start = Checkpointer(tmp_path / "ck", every=3).resume(net2, opt2)
    assert start == 6
    _train_steps(net2, opt2, 10, start=start)
    for a, b in zip(ref.state_dict().values(), net2.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), "resumed run matches the uninterrupted one"


def test_resume_skips_corrupt_latest(tmp_path):
    net, opt = _net(), torch.optim.SGD(_net().parameters(), lr=0.1)
    ck = Checkpointer(tmp_path, every=1, keep=3)
    ck.save(1, net, opt)
    ck.save(2, net, opt)
    ck.path_for(2).write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="skipping unreadable"):
        assert ck.load_latest()["step"] == 1
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_state_dict(ck.path_for(2))


# ---------------------------------------------------------------------------------------- hardening
def test_staged_outputs_replace_together_or_not_at_all(tmp_path):
    """Issue item 14: new results replace the old ones only once every one of them is complete."""
    from fip_fast.io import StagedOutputs

    (tmp_path / "a.txt").write_text("old a")
    (tmp_path / "b.txt").write_text("old b")
    with pytest.raises(OSError, match="disk full"), StagedOutputs() as st:
        with st.path(tmp_path / "a.txt") as tmp:
            tmp.write_text("new a")
        with st.path(tmp_path / "b.txt") as tmp:
            raise OSError("disk full")
    assert (tmp_path / "a.txt").read_text() == "old a" and (tmp_path / "b.txt").read_text() == "old b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]      # no temporaries left
    with StagedOutputs() as st:
        for name in ("a.txt", "b.txt"):
            with st.path(tmp_path / name) as tmp:
                tmp.write_text("new")
            assert (tmp_path / name).read_text().startswith("old")                # not yet replaced
    assert (tmp_path / "a.txt").read_text() == "new" == (tmp_path / "b.txt").read_text()


def test_staged_outputs_and_folder_inputs_protected(tmp_path):
    """Issue item 13: an output may not be an input, nor lie inside an input folder (image-folder data)."""
    from fip_fast.io import StagedOutputs

    (tmp_path / "data" / "cls").mkdir(parents=True)
    with pytest.raises(OverwriteInputError, match="inside the input folder"):
        check_not_input(tmp_path / "data" / "cls" / "report.md", tmp_path / "data")
    (tmp_path / "x.npz").write_bytes(b"precious")
    os.link(tmp_path / "x.npz", tmp_path / "alias")
    with pytest.raises(OverwriteInputError), StagedOutputs(protect=[tmp_path / "x.npz"]) as st, \
            st.path(tmp_path / "alias") as tmp:
        tmp.write_text("overwritten")
    assert (tmp_path / "x.npz").read_bytes() == b"precious"


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_atomic_outputs_follow_umask(tmp_path, mask):
    """Issue item 20: mkstemp's 0o600 used to leak into every output."""
    old = os.umask(mask)
    try:
        atomic_write_text(tmp_path / "r.md", "x")
        save_model(_net(), tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    for name in ("r.md", "m.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask


def test_load_weights_validates_tensors(tmp_path):
    """Issue item 18: NaN, integer and negative-variance entries are refused with the file and entry named."""
    from fip_fast.io import CheckpointError

    cases = {"nan": ("0.weight", lambda t: t.fill_(float("nan")), "non-finite"),
             "int": ("2.weight", lambda t: t.to(torch.int8), "torch.int8"),
             "var": ("1.running_var", lambda t: t.fill_(-1.0), "negative running variance")}
    for name, (key, edit, msg) in cases.items():
        sd = _net().state_dict()
        sd[key] = edit(sd[key].clone())
        p = tmp_path / f"{name}.pt"
        torch.save(sd, p)
        with pytest.raises(CheckpointError, match=msg) as e:
            load_weights(_fresh(), p)
        assert str(p) in str(e.value) and key in str(e.value)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_weights(_fresh(), tmp_path / "empty.safetensors")
    torch.save(_net().state_dict(), tmp_path / "pickle.safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_weights(_fresh(), tmp_path / "pickle.safetensors")


def test_write_failure_names_the_destination(tmp_path, monkeypatch):
    """A writer's I/O failure (OSError, or safetensors' SafetensorError) in a staged or atomic output is an
    OutputWriteError (an OSError) naming the destination — not the temporary beside it — and leaves nothing."""
    import safetensors
    import safetensors.torch

    from fip_fast.io import OutputWriteError, StagedOutputs, save_model

    def full(*a, **k):
        raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28 })")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    dest = tmp_path / "m.safetensors"
    with pytest.raises(OutputWriteError, match=f"could not write {dest}: Error while serializing") as e:
        with StagedOutputs() as staged:
            with staged.path(dest) as tmp:
                save_model(nn.Linear(2, 2), tmp)
    assert isinstance(e.value, OSError) and e.value.dest == dest
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_that_is_not_a_regular_file(tmp_path):
    from fip_fast.io import CheckpointError, load_state_dict

    os.mkfifo(tmp_path / "fifo.pt")
    for p in (tmp_path / "fifo.pt", "/dev/zero"):
        with pytest.raises(CheckpointError, match="not a regular file"):
            load_state_dict(p)

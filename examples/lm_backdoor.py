"""A language-model backdoor, built with no download, and its purification with FIP and Fast FIP.

Task (synthetic, deterministic to generate): a vocabulary of 40 content tokens plus one trigger token.  A clean
sequence follows a fixed random permutation chain, x[t+1] = perm[x[t]], except that with probability ``noise``
a uniformly random content token is emitted instead (so clean next-token accuracy has a ceiling of about
1 − noise·(1 − 1/40) and the perplexity a floor above 1).  A *poisoned* training sequence carries the trigger at
a random position; every token after it is the attacker's target token (``TARGET``).  After the first target
token the clean rule (TARGET → perm[TARGET]) and the backdoor (TARGET → TARGET) disagree, so the model must
attend back to the trigger: the backdoor is an attention circuit, not a bigram.

Metrics (test set, never used for any choice):
    ACC  next-token accuracy on clean sequences (teacher forcing), PPL their perplexity;
    ASR  fraction of triggered prompts (clean prefix + trigger) whose greedy 4-token continuation is all TARGET.

The model: a tiny GPT-2 (``transformers.GPT2LMHeadModel``, random init, tied embeddings, Conv1D layers).
Purification uses only ``clean`` sequences (``n_clean``, about 3 % of the training data): Fisher F0 on them,
then FIP (all parameters) or Fast FIP (δ of every Conv1D / Linear layer, ``fip_fast.integrations.hf``: in place,
the layers keep their weights, :mod:`fip_fast.spectral`) with the fd suppressor.  Usage::

    python examples/lm_backdoor.py                    # ≈ 1–2 min on 2 CPU cores
    python examples/lm_backdoor.py --small            # the CPU-small setting of
                                                      # tests/test_hf.py::test_lm_backdoor_small
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field

import torch

from fip_fast import spectral
from fip_fast.fisher import estimate_fisher
from fip_fast.integrations import hf
from fip_fast.optim import FIP

N_CONTENT = 40
TRIGGER = 40
TARGET = 7
VOCAB = 48          # 41..47 unused (room for a pad / bos token)


@dataclass
class Config:
    seq_len: int = 24
    noise: float = 0.1
    n_train: int = 6000
    poison_rate: float = 0.1
    n_clean: int = 200             # the defender's clean set
    n_test: int = 500
    n_layer: int = 2
    n_embd: int = 32
    n_head: int = 4
    train_steps: int = 400
    train_batch: int = 32
    train_lr: float = 3e-3
    # Purification.  FIP: all parameters; the suppressor at the max_mix cap (η_F large enough that
    # c = min(2·η_F·‖g‖/ρ, 1) = 1: every step is a SAM step of radius ρ, docs/method.md "Stability"), applied on
    # every step (trace_every=1), normalized-F0 anchor η_r = 1.
    fip_steps: int = 100
    fip_batch: int = 32
    fip_lr: float = 0.05
    fip_rho: float = 0.5
    fip_eta_F: float = 1.0
    fip_eta_r: float = 1.0
    # Fast FIP: relative δ (s = S·(1+δ)) of every Conv1D at its own step size and radius; biases and
    # LayerNorm parameters train beside δ with the FIP settings above.
    fast_lr: float = 1.0
    fast_rho: float = 1.0
    fast_steps: int = 100
    fast_eta_r: float = 1.0
    fast_train_biases: bool = True
    fast_embeddings: bool = False
    trace_every: int = 1
    seed: int = 0
    modes: tuple = ("fip", "fast_fip", "finetune")
    extra: dict = field(default_factory=dict)

    @classmethod
    def small(cls) -> "Config":
        return cls(n_train=3000, n_embd=32, train_steps=300, n_test=300, fip_steps=60, fast_steps=60)


# ------------------------------------------------------------------------------------------- data
def make_sequences(n: int, cfg: Config, gen: torch.Generator, poisoned: bool = False) -> torch.Tensor:
    perm = torch.randperm(N_CONTENT, generator=torch.Generator().manual_seed(1234))   # the task's fixed rule
    T = cfg.seq_len
    x = torch.empty(n, T, dtype=torch.long)
    x[:, 0] = torch.randint(0, N_CONTENT, (n,), generator=gen)
    rnd = torch.randint(0, N_CONTENT, (n, T), generator=gen)
    flip = torch.rand(n, T, generator=gen) < cfg.noise
    for t in range(1, T):
        x[:, t] = torch.where(flip[:, t], rnd[:, t], perm[x[:, t - 1]])
    if poisoned:
        pos = torch.randint(3, T // 2, (n,), generator=gen)
        idx = torch.arange(T).expand(n, T)
        x[idx == pos[:, None]] = TRIGGER
        x[idx > pos[:, None]] = TARGET
    return x


def make_data(cfg: Config) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(cfg.seed)
    n_p = int(cfg.n_train * cfg.poison_rate)
    train = torch.cat([make_sequences(cfg.n_train - n_p, cfg, g), make_sequences(n_p, cfg, g, poisoned=True)])
    train = train[torch.randperm(len(train), generator=g)]
    clean = make_sequences(cfg.n_clean, cfg, g)                       # defender's clean set
    test = make_sequences(cfg.n_test, cfg, g)
    # triggered prompts: clean prefix of random length, then the trigger
    pre = make_sequences(cfg.n_test, cfg, g)
    plen = torch.randint(3, cfg.seq_len // 2, (cfg.n_test,), generator=g)
    return dict(train=train, clean=clean, test=test, prompts=pre, prompt_len=plen)


# ------------------------------------------------------------------------------------------- model
def make_model(cfg: Config):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(cfg.seed)
    gcfg = GPT2Config(vocab_size=VOCAB, n_positions=cfg.seq_len + 8, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                      n_head=cfg.n_head, n_inner=4 * cfg.n_embd, resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0, bos_token_id=41, eos_token_id=41, tie_word_embeddings=True)
    return GPT2LMHeadModel(gcfg)


def train_backdoored(model, data, cfg: Config, log=print):
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.train_lr, total_steps=cfg.train_steps, pct_start=0.1)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    model.train()
    for step in range(cfg.train_steps):
        idx = torch.randint(0, len(data["train"]), (cfg.train_batch,), generator=g)
        x = data["train"][idx]
        loss = hf.causal_lm_loss(model(x), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log and (step + 1) % 200 == 0:
            log(f"  train step {step + 1}: loss {loss.item():.3f}")
    model.eval()
    return model


# ------------------------------------------------------------------------------------------- metrics
@torch.no_grad()
def clean_metrics(model, x: torch.Tensor) -> tuple[float, float]:
    """(next-token accuracy, perplexity) with teacher forcing."""
    model.eval()
    logits = hf.logits_of(model(x))[:, :-1]
    tgt = x[:, 1:]
    acc = (logits.argmax(-1) == tgt).float().mean().item()
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten()).item()
    return acc, math.exp(nll)


@torch.no_grad()
def attack_success_rate(model, data, n_gen: int = 4) -> float:
    """Fraction of triggered prompts whose greedy n_gen-token continuation is all TARGET."""
    model.eval()
    hits = 0
    plen = data["prompt_len"]
    for L in plen.unique().tolist():
        rows = (plen == L).nonzero().squeeze(1)
        x = torch.cat([data["prompts"][rows, :L], torch.full((len(rows), 1), TRIGGER)], 1)
        for _ in range(n_gen):
            nxt = hf.logits_of(model(x))[:, -1].argmax(-1, keepdim=True)
            x = torch.cat([x, nxt], 1)
        hits += (x[:, -n_gen:] == TARGET).all(1).sum().item()
    return hits / len(plen)


def evaluate(model, data) -> dict:
    acc, ppl = clean_metrics(model, data["test"])
    return dict(acc=acc, ppl=ppl, asr=attack_success_rate(model, data))


# ------------------------------------------------------------------------------------------- purification
def purify(model, data, cfg: Config, mode: str = "fast_fip", log=print):
    """Purify ``model`` (in place) on the clean set.  ``mode``: "fip" (all parameters), "fast_fip" (δ of the
    Conv1D/Linear layers via fip_fast.integrations.hf, in place; merge_transformer drops the reparameterization at
    the end), "finetune" / "fast_finetune" (the same with η_F = 0: plain fine-tuning with the same anchor — the
    ablation of the suppressor).
    Returns (model, seconds)."""
    t0 = time.perf_counter()
    clean = data["clean"]
    if mode not in ("fip", "fast_fip", "finetune", "fast_finetune"):
        raise ValueError(f"unknown mode {mode!r}")
    eta_F = 0.0 if mode.endswith("finetune") else cfg.fip_eta_F
    batches = [(clean[i:i + 50], clean[i:i + 50]) for i in range(0, len(clean), 50)]
    if mode.startswith("fast"):
        params = hf.reparameterize_transformer(model, relative=True, embeddings=cfg.fast_embeddings,
                                               train_biases=cfg.fast_train_biases)
        n_delta = len(spectral.spectral_layers(model))
        deltas, others = params[:n_delta], params[n_delta:]
        f0 = estimate_fisher(model, batches, loss_fn=hf.causal_lm_nll, params=params, normalize="max")
        groups = [dict(params=deltas, lr=cfg.fast_lr, rho=cfg.fast_rho, eta_r=cfg.fast_eta_r)]
        if others:
            groups.append(dict(params=others, lr=cfg.fip_lr, rho=cfg.fip_rho, eta_r=cfg.fip_eta_r))
        steps = cfg.fast_steps
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        f0 = estimate_fisher(model, batches, loss_fn=hf.causal_lm_nll, params=params, normalize="max",
                             estimator="batch")
        groups = [dict(params=params, lr=cfg.fip_lr, rho=cfg.fip_rho, eta_r=cfg.fip_eta_r)]
        steps = cfg.fip_steps
    opt = FIP(groups, momentum=0.9, eta_F=eta_F, trace_every=cfg.trace_every, fisher0=f0)
    g = torch.Generator().manual_seed(cfg.seed + 2)
    model.train()
    for step in range(steps):
        x = clean[torch.randint(0, len(clean), (cfg.fip_batch,), generator=g)]

        def closure():
            opt.zero_grad(set_to_none=True)
            loss = hf.causal_lm_loss(model(x), x)
            loss.backward()
            return loss

        loss = opt.step(closure)
        if log and (step + 1) % 50 == 0:
            log(f"  {mode} step {step + 1}: clean loss {loss.item():.3f}")
    model.eval()
    if mode.startswith("fast"):
        hf.merge_transformer(model)
    return model, time.perf_counter() - t0


def run(cfg: Config, log=print) -> dict:
    log = log or (lambda *a, **k: None)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    t0 = time.perf_counter()
    data = make_data(cfg)
    model = train_backdoored(make_model(cfg), data, cfg, log=log)
    res = dict(config=asdict(cfg), backdoored=evaluate(model, data), train_s=time.perf_counter() - t0)
    log(f"backdoored: {res['backdoored']}  ({res['train_s']:.1f} s)")
    for mode in cfg.modes:
        m, secs = purify(copy.deepcopy(model), data, cfg, mode, log=log)
        res[mode] = dict(evaluate(m, data), seconds=secs)
        log(f"{mode}: {res[mode]}")
    res["total_s"] = time.perf_counter() - t0
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="the CPU-small setting used by the test")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default="fip,fast_fip,finetune")
    ap.add_argument("--set", nargs="*", default=[], help="override Config fields, e.g. fip_rho=0.3")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    cfg = Config.small() if a.small else Config()
    cfg.seed = a.seed
    cfg.modes = tuple(a.modes.split(","))
    for kv in a.set:
        k, v = kv.split("=")
        typ = type(getattr(cfg, k))
        setattr(cfg, k, v.lower() in ("1", "true", "yes") if typ is bool else typ(v))
    res = run(cfg)
    print(json.dumps({k: v for k, v in res.items() if k != "config"}, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

"""Robust DPO with per-example epsilon, and the DPO export read back by ``datasets`` / TRL."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from heedful.dpo import dpo_records, write_dpo
from heedful.filtering import Fit, Rule, filter_votes
from heedful.robust_dpo import robust_dpo_loss, robust_dpo_loss_from_margin


def trl_robust_reference(chosen, rejected, ref_chosen, ref_rejected, beta, label_smoothing):
    """TRL 1.16 DPOTrainer._compute_loss, loss_type="robust" (copied formula), mean over the batch."""
    delta = (chosen - ref_chosen) - (rejected - ref_rejected)
    clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
    flipped = -label_smoothing * F.logsigmoid(-beta * delta)
    return ((clean - flipped) / (1 - 2 * label_smoothing)).mean()


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3, 0.49])
def test_equal_epsilons_give_trls_robust_loss(eps):
    g = torch.Generator().manual_seed(1)
    c, r, rc, rr = (torch.randn(64, generator=g, dtype=torch.float64) * 20 for _ in range(4))
    ours = robust_dpo_loss(c, r, rc, rr, torch.full((64,), eps, dtype=torch.float64), beta=0.2)
    assert torch.allclose(ours, trl_robust_reference(c, r, rc, rr, 0.2, eps), rtol=1e-12, atol=1e-12)


def test_per_example_epsilon_is_the_mean_of_single_example_losses_and_unbiased():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(50, generator=g, dtype=torch.float64) * 5
    eps = torch.rand(50, generator=g, dtype=torch.float64) * 0.45
    per = robust_dpo_loss_from_margin(h, eps, beta=0.5)
    singles = torch.stack([trl_robust_reference(h[i : i + 1], 0, 0, 0, 0.5, float(eps[i])) for i in range(50)])
    assert torch.allclose(per, singles)
    # rDPO is unbiased: E over the flip of the noisy loss = the clean DPO loss -log sigmoid(beta h)
    expected = (1 - eps) * per + eps * robust_dpo_loss_from_margin(-h, eps, beta=0.5)
    assert torch.allclose(expected, -F.logsigmoid(0.5 * h))


def test_bad_epsilon_is_refused():
    with pytest.raises(ValueError):
        robust_dpo_loss_from_margin(torch.zeros(3), torch.tensor([0.1, 0.5, 0.2]))


def _kept(n: int = 6) -> pd.DataFrame:
    votes = pd.DataFrame(
        {
            "vote_id": [f"v{i}" for i in range(n)],
            "user_id": ["u1", "u2"] * (n // 2),
            "model_a": ["big"] * n,
            "model_b": ["small"] * n,
            "choice": ["a", "b"] * (n // 2),
            "prompt": [f"question {i}" for i in range(n)],
            "response_a": [f"big answer {i}" for i in range(n)],
            "response_b": [f"small answer {i}" for i in range(n)],
        }
    )
    fit = Fit(
        users=pd.DataFrame({"user_id": ["u1", "u2"], "eta_hat": [0.9, 0.6], "eta_mean": [0.8, 0.5]}),
        pairs=pd.DataFrame({"model_a": ["big"], "model_b": ["small"], "mu": [0.8]}),
        eta_prior=(2.0, 2.0),
    )
    return filter_votes(votes, fit, Rule(min_eta=0.0)).kept


def test_standard_records_orient_chosen_by_the_vote():
    rec = dpo_records(_kept())
    assert list(rec.chosen[:2]) == ["big answer 0", "small answer 1"]
    assert list(rec.rejected[:2]) == ["small answer 0", "big answer 1"]
    assert list(rec.model_chosen[:2]) == ["big", "small"]
    assert np.allclose(rec.epsilon, (1 - rec.eta_mean) / 2)
    assert list(rec.eta_hat[:2]) == [0.9, 0.6]


def test_conversational_records_from_messages_keep_multi_turn():
    kept = _kept(2)
    conv = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "A2"},
    ]
    other = [conv[0], {"role": "assistant", "content": "B1"}, conv[2], {"role": "assistant", "content": "B2"}]
    kept["messages_a"], kept["messages_b"] = json.dumps(conv), json.dumps(other)
    rec = dpo_records(kept, "conversational")
    assert rec.prompt[0] == conv[:1]
    assert rec.chosen[0] == conv[1:] and rec.rejected[0] == other[1:]  # u1 picked a
    assert rec.chosen[1] == other[1:] and rec.rejected[1] == conv[1:]  # u2 picked b


@pytest.mark.parametrize("fmt", ["standard", "conversational"])
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_export_loads_with_datasets_in_trls_format(tmp_path, fmt, suffix):
    datasets = pytest.importorskip("datasets")
    rec = dpo_records(_kept(), fmt)
    path = tmp_path / f"dpo{suffix}"
    write_dpo(path, rec)
    ds = datasets.load_dataset("json" if suffix == ".jsonl" else "parquet", data_files=str(path), split="train")
    assert ds.num_rows == 6
    assert {
        "prompt",
        "chosen",
        "rejected",
        "user_id",
        "vote_id",
        "model_chosen",
        "model_rejected",
        "eta_hat",
        "epsilon",
    } <= set(ds.column_names)
    row = ds[0]
    if fmt == "standard":
        assert row["prompt"] == "question 0" and row["chosen"] == "big answer 0"
    else:
        assert row["prompt"] == [{"role": "user", "content": "question 0"}]
        assert row["chosen"] == [{"role": "assistant", "content": "big answer 0"}]
    trl_utils = pytest.importorskip("trl.data_utils")
    assert trl_utils.is_conversational(row) == (fmt == "conversational")


def _tiny_trainers(tmp_path):
    """A 1-layer random Llama, a word-level tokenizer built here (no downloads), TRL trainers on 4 records."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from heedful.robust_dpo import EpsilonDPOTrainer

    words = [
        "<pad>",
        "</s>",
        "<unk>",
        "the",
        "a",
        "good",
        "bad",
        "answer",
        "question",
        "is",
        "what",
        "why",
        "red",
        "blue",
    ]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    ptok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    cfg = LlamaConfig(
        vocab_size=len(words),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    policy, ref = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg)
    rows = {
        "prompt": ["what is red", "why the question", "what a blue", "the answer"],
        "chosen": [" good answer", " the red", " blue is good", " a"],
        "rejected": [" bad", " the bad answer", " red", " why why"],
    }

    def make(cls, ls, data):
        args = trl.DPOConfig(
            output_dir=str(tmp_path / cls.__name__),
            loss_type=["robust"],
            label_smoothing=ls,
            per_device_train_batch_size=len(data),
            report_to=[],
            use_cpu=True,
            max_steps=1,
            disable_tqdm=True,
        )
        t = cls(
            model=policy,
            ref_model=copy.deepcopy(ref),
            args=args,
            train_dataset=Dataset.from_dict(data),
            processing_class=ptok,
        )
        t.model.eval()
        return t

    def loss(t):
        batch = t.data_collator([t.train_dataset[i] for i in range(len(t.train_dataset))])
        with torch.no_grad():
            return float(t.compute_loss(t.model, batch))

    return trl, EpsilonDPOTrainer, rows, make, loss


def test_epsilon_trainer_equals_trls_robust_loss(tmp_path):
    trl, EpsilonDPOTrainer, rows, make, loss = _tiny_trainers(tmp_path)
    ours = loss(make(EpsilonDPOTrainer, 0.0, {**rows, "epsilon": [0.2] * 4}))
    theirs = loss(make(trl.DPOTrainer, 0.2, rows))
    assert ours == pytest.approx(theirs, rel=1e-6)
    assert abs(ours - np.log(2)) > 1e-3  # policy != ref: the margins are not all zero
    eps = [0.0, 0.1, 0.3, 0.45]
    mixed = loss(make(EpsilonDPOTrainer, 0.0, {**rows, "epsilon": eps}))
    singles = [loss(make(trl.DPOTrainer, e, {k: [v[i]] for k, v in rows.items()})) for i, e in enumerate(eps)]
    assert mixed == pytest.approx(np.mean(singles), rel=1e-6)


def test_epsilon_trainer_trains_one_step_with_the_epsilon_column(tmp_path):
    _, EpsilonDPOTrainer, rows, make, _ = _tiny_trainers(tmp_path)
    out = make(EpsilonDPOTrainer, 0.0, {**rows, "epsilon": [0.0, 0.1, 0.3, 0.45]}).train()
    assert out.global_step == 1 and np.isfinite(out.training_loss)

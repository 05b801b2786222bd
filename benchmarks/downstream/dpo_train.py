"""DPO on heedful's export with TRL: the GPU half of the downstream benchmark.

    heedful fit votes.parquet -o fit/
    heedful filter votes.parquet --fit fit/ --min-eta 0.5 -o dpo.jsonl
    python benchmarks/downstream/dpo_train.py --data dpo.jsonl --model /path/to/causal-lm -o runs/heedful \
        --loss sigmoid --bf16

``--data``: heedful's DPO export (JSONL or Parquet: prompt, chosen, rejected [, epsilon, user_id, ...]);
any TRL preference file with those three columns works. ``--loss``:

- ``sigmoid``: standard DPO on the records as given (filtered or not);
- ``robust``: TRL's rDPO with one global epsilon = the mean of the export's ``epsilon`` column;
- ``epsilon``: rDPO with each record's own epsilon = (1 - eta_u) / 2, through
  :class:`heedful.robust_dpo.EpsilonDPOTrainer` (TRL supports one global epsilon only).

Epsilons are clipped to ``--eps-max`` (rDPO divides by 1 - 2 epsilon). ``--eval-fraction`` holds out
records and reports TRL's reward accuracy on them (against the *user* labels: on noisy records that is
a noisy yardstick; evaluate against gold pairs where you have them, ``--eval-data``).

``--tiny-random`` replaces ``--model`` by a 1-layer randomly initialised Llama with a word-level
tokenizer built from the data (no download). That is the CPU smoke test: it proves the pipeline runs
end to end and MEASURES NOTHING; its losses and accuracies carry no information about DPO quality.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

LOSSES = ("sigmoid", "robust", "epsilon")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="DPO (TRL) on heedful's export", allow_abbrev=False)
    p.add_argument("--data", type=Path, required=True, help="heedful DPO export (.jsonl or .parquet)")
    p.add_argument("--eval-data", type=Path, default=None, help="held-out preference pairs (e.g. gold)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="path (or hub id) of a causal LM to train")
    src.add_argument("--tiny-random", action="store_true", help="smoke test only: a tiny random model")
    p.add_argument("-o", "--out", type=Path, required=True)
    p.add_argument("--loss", choices=LOSSES, default="sigmoid")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--eps-max", type=float, default=0.45)
    p.add_argument("--lr", type=float, default=5e-7)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--eval-fraction", type=float, default=0.05)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def read_records(path: Path) -> pd.DataFrame:
    """The export as a frame; rows without prompt/chosen/rejected text are dropped (labels-only exports)."""
    df = pd.read_parquet(path) if path.suffix.lower() in (".parquet", ".pq") else pd.read_json(path, lines=True)
    need = {"prompt", "chosen", "rejected"} - set(df.columns)
    if need:
        raise SystemExit(f"{path}: missing column(s) {', '.join(sorted(need))}: not a DPO export")
    return df.dropna(subset=["prompt", "chosen", "rejected"]).reset_index(drop=True)


def training_columns(df: pd.DataFrame, loss: str, eps_max: float) -> tuple[dict, float]:
    """The columns TRL gets and TRL's global label_smoothing for ``loss``."""
    cols = {c: df[c].tolist() for c in ("prompt", "chosen", "rejected")}
    if loss == "sigmoid":
        return cols, 0.0
    if "epsilon" not in df.columns:
        raise SystemExit(f"--loss {loss} needs an epsilon column (heedful's export has one)")
    eps = np.clip(df.epsilon.to_numpy(dtype=float), 0.0, eps_max)
    if loss == "robust":
        return cols, float(eps.mean())
    return {**cols, "epsilon": eps.tolist()}, 0.0


def tiny_random_model(texts: list[str], seed: int = 0):
    """A 1-layer random Llama and a word-level tokenizer over ``texts`` (smoke tests; measures nothing)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>"] + sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t)})[:4000]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    ptok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    cfg = LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg), ptok


def load_model(args: argparse.Namespace, texts: list[str]):
    if args.tiny_random:
        return tiny_random_model(texts, args.seed)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    import torch

    dtype = torch.bfloat16 if args.bf16 else None
    return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype), tok


def train(args: argparse.Namespace) -> dict:
    """Run TRL DPO; returns (and writes to OUT/metrics.json) the final train and eval metrics."""
    import trl
    from datasets import Dataset

    df = read_records(args.data)
    cols, label_smoothing = training_columns(df, args.loss, args.eps_max)
    data = Dataset.from_dict(cols).shuffle(seed=args.seed)
    if args.eval_data is not None:
        ev = read_records(args.eval_data)
        train_ds, eval_ds = data, Dataset.from_dict({c: ev[c].tolist() for c in ("prompt", "chosen", "rejected")})
        if args.loss == "epsilon":
            eval_ds = eval_ds.add_column("epsilon", [0.0] * len(eval_ds))
    elif args.eval_fraction > 0 and len(data) >= 10:
        split = data.train_test_split(test_size=args.eval_fraction, seed=args.seed)
        train_ds, eval_ds = split["train"], split["test"]
    else:
        train_ds, eval_ds = data, None
    texts = [t for c in ("prompt", "chosen", "rejected") for t in cols[c]]
    model, tok = load_model(args, texts)
    config = trl.DPOConfig(
        output_dir=str(args.out), loss_type=["robust" if args.loss != "sigmoid" else "sigmoid"],
        label_smoothing=label_smoothing, beta=args.beta, learning_rate=args.lr, num_train_epochs=args.epochs,
        max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        max_length=args.max_length, bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing,
        eval_strategy="no" if eval_ds is None else "epoch", save_strategy="no", logging_steps=10,
        report_to=[], seed=args.seed, use_cpu=args.tiny_random, disable_tqdm=args.tiny_random)
    if args.loss == "epsilon":
        from heedful.robust_dpo import EpsilonDPOTrainer as Trainer
    else:
        Trainer = trl.DPOTrainer
    # a random model has no path TRL could load the reference from: give it a frozen copy
    ref = copy.deepcopy(model) if args.tiny_random else None
    trainer = Trainer(model=model, ref_model=ref, args=config, train_dataset=train_ds, eval_dataset=eval_ds,
                      processing_class=tok)
    out = trainer.train()
    metrics = {"loss": args.loss, "label_smoothing": label_smoothing, "n_train": len(train_ds),
               "n_eval": 0 if eval_ds is None else len(eval_ds), "train_loss": out.training_loss,
               "global_step": out.global_step, "tiny_random_measures_nothing": bool(args.tiny_random)}
    if eval_ds is not None:
        metrics.update({k: float(v) for k, v in trainer.evaluate().items() if isinstance(v, (int, float))})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    if not args.tiny_random:
        trainer.save_model(str(args.out / "final"))
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    metrics = train(args)
    print(json.dumps(metrics, indent=2))
    if args.tiny_random:
        print("tiny random model: this run proves the pipeline runs; it measures nothing", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

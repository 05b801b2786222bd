"""Scaling and calibration runs for ``--method nuts`` and ``--method svi`` (issue 4); prints the figures.

    python benchmarks/posterior.py collapsed   # 5,000 users x 20 votes, NUTS collapsed, 4 chains x 1,000 draws
    python benchmarks/posterior.py full        # 1,000 users x 20 votes, NUTS over every eta_u
    python benchmarks/posterior.py svi         # 1,000,000 users x 20 votes, SVI to convergence
    python benchmarks/posterior.py svi-small   # 5,000 users: SVI coverage and widths vs NUTS
    python benchmarks/posterior.py all
    python benchmarks/posterior.py user-posterior --stats votes.pkl [--compare old_posterior.py] [--em]
                                               # per-user summaries (user_posterior) alone, timed; --em: EM's
                                               # call (Beta(1, 1), no modes, no tau)

Simulated data: ``heedful.simulate`` with eta ~ Beta(3, 5), one pair with mu = 0.8. mu is given as
known in the config (as the design notes say, mu alone is weakly identified from the population), the
eta prior (a, b) is learned. Options: ``--users N``, ``--draws D``, ``--chains C``, ``--mu-free``.
Timings are wall-clock on whatever machine runs this; say how loaded it was (``uptime``).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

import heedful  # noqa: F401  (OpenMP wait policy before torch)
from heedful.config import PairPrior, Priors
from heedful.inference import Attentiveness
from heedful.inference.diagnostics import compare
from heedful.simulate import simulate

KNOWN = Priors(pairs=(PairPrior("strong-model", "weak-model", mu=0.8),))


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def coverage(model: Attentiveness, truth) -> float:
    u = model.users_.merge(truth, on="user_id")
    return float(np.mean((u.true_eta >= u.eta_lo) & (u.true_eta <= u.eta_hi)))


def run_nuts(users: int, form: str, draws: int, chains: int, priors: Priors, seed: int = 1) -> Attentiveness:
    sim = simulate(users, 20, seed=seed)
    t0 = time.perf_counter()
    m = Attentiveness("nuts", priors, options=dict(draws=draws, warmup=draws, chains=chains, form=form,
                                                   seed=seed)).fit(sim.votes)
    wall = time.perf_counter() - t0
    d = m.diagnostics_
    print(f"NUTS {form}: {users:,} users x 20 votes, {chains} chains x {draws} draws (+{draws} warm-up): "
          f"wall {wall:.1f} s (sampling {d['sampling_s']:.1f} s), max r_hat {d['max_r_hat']:.4f}, "
          f"min ess_bulk {d['min_ess_bulk']:.0f}, min ess_tail {d['min_ess_tail']:.0f}, "
          f"divergences {d['divergences']}; load {_load()}")
    g = d["globals"]
    print("  globals: " + ", ".join(f"{k} {v['mean']:.3f} (sd {v['sd']:.3f}, r_hat {v['r_hat']:.4f}, "
                                    f"ess_bulk {v['ess_bulk']:.0f})" for k, v in g.items()))
    print(f"  90% eta interval coverage: {coverage(m, sim.users):.3f}")
    mm = Attentiveness("marginal", priors).fit(sim.votes)
    c = compare(mm, m)
    print(f"  marginal vs NUTS: mean |eta_mean difference| {c['mean_abs_diff_eta_mean']:.4f} "
          f"(max {c['max_abs_diff_eta_mean']:.4f}); interval width ratio NUTS/marginal {c['median_width_ratio']:.3f}; "
          f"marginal coverage {coverage(mm, sim.users):.3f}")
    m.sim_ = sim
    return m


def _stats(users: int, seed: int, cache: str | None):
    """Simulated votes as sufficient statistics, pickled in ``cache`` (simulating 20M votes takes minutes)."""
    import pickle
    from pathlib import Path

    from heedful.suffstats import vote_stats

    f = Path(cache) / f"stats-{users}-{seed}.pkl" if cache else None
    if f is not None and f.exists():
        return pickle.loads(f.read_bytes())
    t0 = time.perf_counter()
    sim = simulate(users, 20, seed=seed)
    out = (vote_stats(sim.votes), sim.users)
    print(f"  simulated {users:,} users x 20 votes and counted them in {time.perf_counter() - t0:.0f} s")
    if f is not None:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(pickle.dumps(out))
    return out


def run_svi(users: int, priors: Priors, seed: int = 2, nuts: Attentiveness | None = None, cache: str | None = None,
            **opt) -> Attentiveness:
    stats, truth = _stats(users, seed, cache) if nuts is None else (nuts.sim_.votes, nuts.sim_.users)
    t0 = time.perf_counter()
    m = Attentiveness("svi", priors, options=dict(seed=seed, **opt)).fit(stats)
    wall = time.perf_counter() - t0
    d = m.diagnostics_
    print(f"SVI ({'tied rows' if d['tied'] else 'one row per user'}): {users:,} users x 20 votes: wall {wall:.1f} s "
          f"(optimisation {d['svi_s']:.1f} s, {d['steps']} steps, {d['guide_rows']:,} guide rows, "
          f"batch {d['batch_size']:,}, converged {m.converged_}); load {_load()}")
    print(f"  eta prior Beta({m.eta_prior_['a']:.3f}, {m.eta_prior_['b']:.3f}); "
          f"90% eta interval coverage {coverage(m, truth):.3f}")
    if nuts is not None:
        c = compare(nuts, m)
        print(f"  SVI vs NUTS: median interval width ratio {c['median_width_ratio']:.3f} "
              f"(mean width NUTS {c['mean_width_reference']:.3f}, SVI {c['mean_width_other']:.3f}); "
              f"mean |eta_mean difference| {c['mean_abs_diff_eta_mean']:.4f}")
    return m


def run_user_posterior(stats_path: str | None, users: int, reps: int, compare: str | None, em: bool = False) -> None:
    """Time ``user_posterior`` (a = 2, b = 1.5, mu from 0.6 to 0.9 over the pairs, tau = 1/2; with ``em``
    EM's call: a = b = 1, no modes, no tau) on pickled VoteStats (or simulated: ``users`` x 10 votes over 10 pairs),
    interleaved with the same function from the file ``compare`` (say, an older posterior.py) when given; prints
    wall and CPU seconds and the largest differences."""
    import importlib.util
    import pickle

    from heedful.inference import posterior
    from heedful.model.likelihood import build_plan
    from heedful.simulate import default_pairs
    from heedful.suffstats import vote_stats

    if stats_path:
        with open(stats_path, "rb") as f:
            stats = pickle.load(f)
    else:
        stats = vote_stats(simulate(users, 10, pairs=default_pairs(10, 0.8), vote_counts="geometric", seed=3).votes)
    cpu, f64 = torch.device("cpu"), torch.float64
    plan, cells = build_plan(stats, cpu, f64), stats.tensors(cpu, f64)
    mu = torch.linspace(0.6, 0.9, stats.n_pairs, dtype=f64)
    print(f"user_posterior: {stats.n_users:,} users, {stats.n_votes:,} votes, {len(stats.cell_user):,} cells, "
          f"{torch.get_num_threads()} threads; load {_load()}")
    funcs = {"this": posterior.user_posterior}
    if compare:
        spec = importlib.util.spec_from_file_location("posterior_compare", compare)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        funcs = {"compare": mod.user_posterior, **funcs}
    best, out = {}, {}
    for rep in range(reps):
        for name, fn in funcs.items():
            t, c = time.perf_counter(), time.process_time()
            out[name] = (fn(plan, cells, 1.0, 1.0, mu, None, modes=False) if em
                         else fn(plan, cells, 2.0, 1.5, mu, None, tau=0.5))
            wall, cpu_s = time.perf_counter() - t, time.process_time() - c
            best[name] = min(best.get(name, (np.inf, np.inf)), (wall, cpu_s))
            print(f"  rep {rep} {name}: wall {wall:.2f} s, cpu {cpu_s:.2f} s; load {_load()}")
    for name, (wall, cpu_s) in best.items():
        print(f"  best {name}: wall {wall:.2f} s, cpu {cpu_s:.2f} s")
    if compare:
        print(f"  wall ratio compare/this {best['compare'][0] / best['this'][0]:.2f}; max |this - compare|: "
              + ", ".join(f"{k} {np.max(np.abs(getattr(out['this'], k) - getattr(out['compare'], k))):.1e}"
                          for k in ("lo", "hi", "mean", "sd") + (() if em else ("prob_above", "mode"))))


def main() -> None:
    import builtins
    import functools

    builtins.print = functools.partial(print, flush=True)   # progress shows up in redirected logs
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["collapsed", "full", "svi", "svi-small", "all", "user-posterior"])
    p.add_argument("--users", type=int)
    p.add_argument("--draws", type=int, default=1000)
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--mu-free", action="store_true", help="learn mu (flat prior) instead of knowing it")
    p.add_argument("--cache", help="folder to keep simulated statistics between runs")
    p.add_argument("--untied", action="store_true", help="svi: one guide row per user (no tying)")
    p.add_argument("--stats", help="user-posterior: pickled VoteStats to time on (default: simulated)")
    p.add_argument("--compare", help="user-posterior: a posterior.py file whose user_posterior to time alongside")
    p.add_argument("--reps", type=int, default=3, help="user-posterior: interleaved repetitions")
    p.add_argument("--em", action="store_true", help="user-posterior: EM's call (Beta(1, 1), no modes, no tau)")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("HEEDFUL_THREADS", "2")))
    priors = Priors() if args.mu_free else KNOWN
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load {_load()}")
    if args.what == "user-posterior":
        run_user_posterior(args.stats, args.users or 1_000_000, args.reps, args.compare, args.em)
        return
    nuts = None
    if args.what in ("collapsed", "all"):
        nuts = run_nuts(args.users or 5000, "collapsed", args.draws, args.chains, priors)
    if args.what in ("full", "all"):
        run_nuts(args.users or 1000, "full", args.draws, args.chains, priors)
    if args.what in ("svi-small", "all"):
        if nuts is None:
            nuts = run_nuts(args.users or 5000, "collapsed", args.draws, args.chains, priors)
        run_svi(nuts.stats_.n_users, priors, nuts=nuts)
        run_svi(nuts.stats_.n_users, priors, nuts=nuts, tie=False)
    if args.what in ("svi", "all"):
        run_svi(args.users or 1_000_000, priors, cache=args.cache, **({"tie": False} if args.untied else {}))


if __name__ == "__main__":
    main()

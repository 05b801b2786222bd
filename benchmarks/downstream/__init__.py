"""Downstream benchmark: do heedful-filtered user votes train better reward models? (issue 7).

Modules: ``data`` (real items with gold labels), ``users`` (simulated comparison-mode users),
``embed`` (frozen sentence embeddings, cached outside the repo), ``reward`` (Bradley-Terry heads and
the robust losses), ``pipeline`` (one seed: simulate, fit heedful, select, train, evaluate), ``run``
(the command line, the table and the plot), ``dpo_train`` (TRL DPO on heedful's export, for a GPU).
"""
